"""Anchors (passes/anchors.py): softmax spelled other ways (issue 12.6) and the row-max stabilization (issue 15, `max.dim`).

`exp(s - logsumexp(s, -1, keepdim=True))`, `log_softmax(s, -1).exp()`, and `s - s.max(-1, keepdim=True)
.values` (or `amax`) before a softmax: each equals `softmax(s, -1)`, fully masked rows (NaN) included.
Near misses over another dim stay unfused.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import check_fused, check_unfused

B, H, T, D = 2, 4, 8, 16


def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g) for _ in range(3)]


def keep_with_empty_row():
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(B, 1, T, T).clone()
    keep[1, 0, 2] = False            # a fully masked row: eager gives NaN there
    return keep


def scores(q, k, keep):
    return (q @ k.mT * D ** -0.5).masked_fill(~keep, float("-inf"))


def exp_minus_logsumexp(q, k, v, keep):
    s = scores(q, k, keep)
    return torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True)) @ v


def log_softmax_exp(q, k, v, keep):
    return F.log_softmax(scores(q, k, keep), dim=-1).exp() @ v


def log_softmax_method_exp(q, k, v, keep):
    return torch.exp(scores(q, k, keep).log_softmax(-1)) @ v


def manual_with_max_values(q, k, v, keep):
    s = scores(q, k, keep)
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return (e / e.sum(-1, keepdim=True)) @ v


def max_values_before_softmax(q, k, v, keep):
    s = scores(q, k, keep)
    return F.softmax(s - s.max(-1, keepdim=True)[0], dim=-1) @ v


def amax_before_softmax(q, k, v, keep):
    s = scores(q, k, keep)
    return (s - s.amax(-1, keepdim=True)).softmax(-1) @ v


@pytest.mark.parametrize("fn", [exp_minus_logsumexp, log_softmax_exp, log_softmax_method_exp,
                                manual_with_max_values, max_values_before_softmax, amax_before_softmax])
@pytest.mark.parametrize("empty_row", [False, True], ids=["full_rows", "empty_row"])
def test_other_softmax_forms_are_fused(fn, empty_row):
    keep = keep_with_empty_row() if empty_row else torch.tril(torch.ones(T, T, dtype=torch.bool))
    check_fused(fn, *qkv(), keep)


def test_logsumexp_over_queries_stays_unfused():
    def f(q, k, v, keep):
        s = scores(q, k, keep)
        return torch.exp(s - torch.logsumexp(s, dim=-2, keepdim=True)) @ v

    check_unfused(f, *qkv(), torch.ones(T, T, dtype=torch.bool))


def test_max_over_queries_stays_unfused():
    # s - max over the queries is a per-column shift: it changes the softmax over keys
    def f(q, k, v, keep):
        s = scores(q, k, keep)
        return F.softmax(s - s.max(-2, keepdim=True).values, dim=-1) @ v

    check_unfused(f, *qkv(), torch.ones(T, T, dtype=torch.bool))


def test_max_used_elsewhere_stays_unfused():
    def f(q, k, v, keep):
        s = scores(q, k, keep)
        m = s.max(-1, keepdim=True)
        return F.softmax(s - m.values, dim=-1) @ v, m.indices

    from helpers import assert_matches_eager, compiled_sites

    want = f(*qkv(), torch.ones(T, T, dtype=torch.bool))
    got, sites = compiled_sites(f, *qkv(), torch.ones(T, T, dtype=torch.bool))
    for g, w in zip(got, want):
        assert torch.equal(g, w) if not g.is_floating_point() else assert_matches_eager(g, w) is None
    assert [s.op for s in sites] == [None]
