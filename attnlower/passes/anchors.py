"""Stage find_anchors: a site for every softmax and every SDPA call of the graph.

A site is anchored on its softmax: an explicit one (`softmax`, `_softmax`, `_safe_softmax`), one
written by hand (`HAND_WRITTEN_SOFTMAX`: `e / e.sum(-1)`, `exp(x - logsumexp(x))`, `exp(log_softmax(x))`,
and `exp(x - logaddexp(logsumexp(x), sink))`, a softmax with a sink logit), or the softmax inside `scaled_dot_product_attention` (any op of its family). Attention that `to_aten`
left to a tensor subclass (DTensor) becomes a site refused with the reason. Nothing is proven here:
the next stages grow each anchor into a site or refuse it.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from .canonicalize import SUBCLASS_ATTENTION
from .site import AttentionSite, Context
from .vocabulary import SDPA_OPS, SOFTMAX_OPS, shape_of

aten = torch.ops.aten


def find_anchors(gm: fx.GraphModule, ctx: Context) -> str:
    """Add a site to `ctx.sites` for every softmax (explicit or hand-written) and SDPA call of `gm`,
    then one, already refused, for every attention call on tensor-subclass values."""
    found = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SOFTMAX_OPS or manual_softmax(node) is not None:
            spelling = "softmax"
        elif node.target in SDPA_OPS:
            spelling = "sdpa"
        else:
            continue
        ctx.sites.append(AttentionSite(len(ctx.sites), node, spelling))
        found += 1
    left = 0
    for node in gm.graph.nodes:
        if SUBCLASS_ATTENTION in node.meta:
            spelling, subclass = node.meta[SUBCLASS_ATTENTION]
            site = AttentionSite(len(ctx.sites), node, spelling)
            site.refuse(f"attention on {subclass} values: attnlower rewrites attention on plain (local) tensors "
                        f"and leaves this one to {subclass}; to fuse it, hand attention local tensors (for tensor "
                        "parallelism: ColwiseParallel's default use_local_output=True on q/k/v)")
            ctx.sites.append(site)
            left += 1
    return f"{found} candidate(s)" + (f", {left} left to a tensor subclass" if left else "")


# --------------------------------------------------------------------------------------------
# softmax written by hand


def manual_softmax(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(softmax input, the form's inner nodes) when `node` computes softmax over the last dim by hand
    (one of `HAND_WRITTEN_SOFTMAX`); each form equals `softmax(x, -1)`, fully masked rows (NaN) included."""
    if node.op != "call_function":
        return None
    for form in HAND_WRITTEN_SOFTMAX.get(node.target, ()):
        found = form(node)
        if found is not None:
            return found
    return None


def _sum_normalized(node: fx.Node):
    """`e / e.sum(-1, keepdim=True)` with `e = exp(x)` or `exp(x - rowmax(x))`."""
    if len(node.args) != 2:
        return None
    e, s = node.args
    if not (isinstance(e, fx.Node) and isinstance(s, fx.Node)):
        return None
    if e.target is not aten.exp.default or s.target is not aten.sum.dim_IntList or s.args[0] is not e:
        return None
    if not _is_last_dim(s.args[1], len(shape_of(e))) or not _keepdim(s, 2):
        return None
    x, inner = e.args[0], [s, e]
    if x.target is aten.sub.Tensor and len(x.args) == 2 and x.kwargs.get("alpha", 1) == 1:
        row_max = row_max_of(x.args[1], x.args[0])
        if row_max is not None:
            return x.args[0], inner + [x] + row_max
    return x, inner


def _exp_of_log_softmax(node: fx.Node):
    """`exp(log_softmax(x, -1))` (no dtype change inside)."""
    y = node.args[0]
    if not isinstance(y, fx.Node) or y.target not in (aten._log_softmax.default, aten.log_softmax.int):
        return None
    if not _is_last_dim(y.args[1], len(shape_of(y))):
        return None
    if y.target is aten.log_softmax.int and (len(y.args) > 2 and y.args[2] is not None or y.kwargs.get("dtype")):
        return None
    return y.args[0], [y]


def _exp_minus_logsumexp(node: fx.Node):
    """`exp(x - logsumexp(x, -1, keepdim=True))`."""
    y = node.args[0]
    if not isinstance(y, fx.Node) or y.target is not aten.sub.Tensor or len(y.args) != 2 or y.kwargs.get("alpha", 1) != 1:
        return None
    x, lse = y.args
    if (isinstance(lse, fx.Node) and lse.target is aten.logsumexp.default and lse.args[0] is x
            and _is_last_dim(lse.args[1], len(shape_of(x))) and _keepdim(lse, 2)):
        return x, [y, lse]
    return None


def _exp_minus_logaddexp(node: fx.Node):
    """`exp(x - logaddexp(logsumexp(x, -1, keepdim=True), c))`: softmax with one more logit `c` per row in
    the denominator (the log-sum-exp spelling of attention sinks); `softmax_sink` reads `c`."""
    found = _lse_with_sink(node)
    return None if found is None else found[:2]


def _lse_with_sink(node: fx.Node):
    y = node.args[0]
    if not isinstance(y, fx.Node) or y.target is not aten.sub.Tensor or len(y.args) != 2 or y.kwargs.get("alpha", 1) != 1:
        return None
    x, denominator = y.args
    if not isinstance(denominator, fx.Node) or denominator.target is not aten.logaddexp.default:
        return None
    a, b = denominator.args[:2]
    for lse, sink in ((a, b), (b, a)):
        if (isinstance(lse, fx.Node) and lse.target is aten.logsumexp.default and lse.args[0] is x
                and _is_last_dim(lse.args[1], len(shape_of(x))) and _keepdim(lse, 2) and isinstance(sink, fx.Node)):
            return x, [y, denominator, lse], sink
    return None


def softmax_sink(node: fx.Node) -> fx.Node | None:
    """The per-row extra logit of a hand-written softmax that has one (`exp(x - logaddexp(lse(x), c))`:
    `c`), else None."""
    if node.op != "call_function" or node.target is not aten.exp.default:
        return None
    found = _lse_with_sink(node)
    return None if found is None else found[2]


# The node that ends the form -> the forms it may end, tried in order.
HAND_WRITTEN_SOFTMAX: dict[object, tuple[Callable[[fx.Node], tuple[fx.Node, list[fx.Node]] | None], ...]] = {
    aten.div.Tensor: (_sum_normalized,),
    aten.exp.default: (_exp_of_log_softmax, _exp_minus_logsumexp, _exp_minus_logaddexp),
}


def row_max_of(m, x: fx.Node) -> list[fx.Node] | None:
    """The nodes of `x.amax(-1, keepdim=True)` / `x.max(-1, keepdim=True).values` when `m` is one, else None."""
    if not isinstance(m, fx.Node):
        return None
    last = (-1, len(shape_of(x)) - 1)
    if m.target is aten.amax.default and m.args[0] is x:
        dims = list(m.args[1]) if len(m.args) > 1 else list(m.kwargs.get("dim", []))
        keep = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
        return [m] if len(dims) == 1 and dims[0] in last and keep else None
    if m.target is operator.getitem and m.args[1] == 0 and isinstance(m.args[0], fx.Node):
        mx = m.args[0]
        if mx.target is aten.max.dim and mx.args[0] is x:
            dim = mx.args[1]
            keep = mx.args[2] if len(mx.args) > 2 else mx.kwargs.get("keepdim", False)
            if dim in last and keep and all(u.target is operator.getitem and u.args[1] == 0 for u in mx.users):
                return [m, mx]
    return None


def _is_last_dim(dims, rank: int) -> bool:
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and dims[0] in (-1, rank - 1)


def _keepdim(node: fx.Node, index: int) -> bool:
    return bool(node.args[index] if len(node.args) > index else node.kwargs.get("keepdim", False))
