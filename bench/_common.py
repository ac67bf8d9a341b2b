"""What the benchmark scripts share."""
from __future__ import annotations

import torch


def autograd_fns(attend, q, k, v):
    """(forward, forward + backward) closures of a differentiable attention function `attend(q, k, v)`.

    The forward runs under no_grad; forward + backward runs on leaf copies of q, k, v and backpropagates
    one fixed random grad_out, clearing the leaves' grads each time.
    """
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    grad_out = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            return attend(q, k, v)

    def fwd_bwd():
        for leaf in leaves:
            leaf.grad = None
        attend(*leaves).backward(grad_out)
    return fwd, fwd_bwd
