"""`dynamic=True` with a `tril` / `triu` mask: proven causal for every size the guards allow (issue 12.9).

A triangle of ones of shape [Tq, Tk] (through views, casts, `== 0`, `~`) is read symbolically: visible
iff `j - i <= e`, and `e` is compared with 0 (top-left) and `Tk - Tq` (bottom-right) as expressions, not
at sampled sizes. One compile serves every length; the output equals eager at each. Near misses (a
diagonal of 1, a `triu` keep-mask) are not causal and stay a bias.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlower.compiler import backend
from attnlower.compiler.backend import attnlower_backend
from helpers import assert_matches_eager

B, H, D = 2, 4, 16


def tril_bool_keep(q, k, v):
    t = q.size(-2)
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
    return (q @ k.mT / math.sqrt(D)).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def tril_float_eq_zero(q, k, v):
    t = q.size(-2)
    return F.softmax((q @ k.mT * D ** -0.5).masked_fill(torch.ones(t, t).tril() == 0, float("-inf")), -1) @ v


def sdpa_bottom_right(q, k, v):
    t, s = q.size(-2), k.size(-2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.tril(torch.ones(t, s, dtype=torch.bool),
                                                                        diagonal=s - t))


def triu_fill_bottom_right(q, k, v):
    t, s = q.size(-2), k.size(-2)
    future = torch.ones(t, s, dtype=torch.bool).triu(s - t + 1)
    return ((q @ k.mT) * D ** -0.5).masked_fill(future, float("-inf")).softmax(-1) @ v


CASES = {tril_bool_keep: (False, 0), tril_float_eq_zero: (False, 0), sdpa_bottom_right: (True, 5),
         triu_fill_bottom_right: (True, 3)}


@pytest.mark.parametrize("fn", list(CASES))
def test_triangle_proven_causal_for_every_size(fn):
    bottom_right, extra = CASES[fn]
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs, **kw):
        graphs.append(gm)
        return attnlower_backend(gm, example_inputs, **kw)

    compiled = torch.compile(fn, backend=counting, dynamic=True, options={"inner": "eager", "strict": True})
    start = len(backend.reports())
    for t in (7, 12, 19):
        g = torch.Generator().manual_seed(t)
        q = torch.randn(B, H, t, D, generator=g)
        k, v = (torch.randn(B, H, t + extra, D, generator=g) for _ in range(2))
        assert_matches_eager(compiled(q, k, v), fn(q, k, v))
    assert len(graphs) == 1, f"{len(graphs)} compiles for three lengths"
    (site,) = [s for r in backend.reports()[start:] for s in r.sites]
    assert site.op == "flash_attention" and site.spec["causal"] and site.spec["bottom_right"] == bottom_right
    assert "proven for every size" in site.reason, site.reason


@pytest.mark.parametrize("mask", ["diagonal_1", "triu_keep"])
def test_triangles_that_are_not_causal_stay_a_bias(mask):
    def f(q, k, v):
        t = q.size(-2)
        ones = torch.ones(t, t, dtype=torch.bool)
        keep = torch.tril(ones, diagonal=1) if mask == "diagonal_1" else torch.triu(ones)
        return (q @ k.mT * D ** -0.5).masked_fill(~keep, float("-inf")).softmax(-1) @ v

    q, k, v = (torch.randn(B, H, 9, D) for _ in range(3))
    torch._dynamo.reset()
    start = len(backend.reports())
    got = torch.compile(f, backend="attnlower", dynamic=True, options={"inner": "eager", "strict": True})(q, k, v)
    assert_matches_eager(got, f(q, k, v))
    (site,) = [s for r in backend.reports()[start:] for s in r.sites]
    assert site.spec is None or not site.spec["causal"], site.reason
