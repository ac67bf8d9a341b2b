"""Uses of the scores that read only their size are not real uses (issue 12.4).

`mask.expand_as(scores)`, `mask.expand(scores.size())`, `torch.zeros_like(scores)`: the rewrite reads the
same sizes from a tensor that stays in the graph (symbolic sizes under dynamic=True included), so the
site is fused. A read of the values keeps it unfused.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import check_fused, compiled_sites, assert_matches_eager

B, H, T, D = 2, 4, 9, 16


def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g) for _ in range(3)]


def keep():
    k = torch.rand(B, 1, T, T, generator=torch.Generator().manual_seed(1)) > 0.3
    return k | torch.eye(T, dtype=torch.bool)


def expand_as_scores(q, k, v, mask):
    s = q @ k.mT / math.sqrt(D)
    return (s + mask.expand_as(s)).softmax(-1) @ v


def expand_to_scores_size(q, k, v, keep):
    s = q @ k.mT / math.sqrt(D)
    return s.masked_fill(~keep.expand(s.size()), float("-inf")).softmax(-1) @ v


def zeros_like_scores(q, k, v, keep):
    s = q @ k.mT / math.sqrt(D)
    bias = torch.zeros_like(s).masked_fill(~keep, torch.finfo(s.dtype).min)
    return torch.softmax(s + bias, dim=-1) @ v


def full_like_scores(q, k, v, keep):
    s = q @ k.mT / math.sqrt(D)
    bias = torch.where(keep, torch.full_like(s, 0.0), float("-inf"))
    return torch.softmax(s + bias, dim=-1) @ v


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("fn", [expand_as_scores, expand_to_scores_size, zeros_like_scores, full_like_scores])
def test_size_reads_are_not_uses(fn, dynamic):
    mask = keep() if fn is not expand_as_scores else torch.randn(B, 1, T, T)
    check_fused(fn, *qkv(), mask, dynamic=dynamic)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_element_count_read_is_not_a_use(dynamic):
    def f(q, k, v, mask):
        s = q @ k.mT / math.sqrt(D)
        return (s + mask).softmax(-1) @ v / s.numel()

    check_fused(f, *qkv(), torch.randn(B, 1, T, T), dynamic=dynamic)


def test_reading_the_values_stays_unfused():
    def f(q, k, v, mask):
        s = q @ k.mT / math.sqrt(D)
        return (s + mask).softmax(-1) @ v / s.abs().amax()

    mask = torch.randn(B, 1, T, T)
    want = f(*qkv(), mask)
    got, sites = compiled_sites(f, *qkv(), mask, dynamic=True)
    assert_matches_eager(got, want)
    assert [s.op for s in sites] == [None], [(s.op, s.reason) for s in sites]
