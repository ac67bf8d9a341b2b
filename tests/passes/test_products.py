"""The products (passes/products.py): einsum with permuted operands or output (issue 12.5).

Q and K read in BSHD order (`bqhd,bkhd->bhqk`), the output written in BSHD order (`bhqk,bkhd->bqhd`),
other index letters, the decode form without a query dim (`bhd,bhsd->bhs`, Tq = 1 implied): fused,
equal to eager. Scores written in another order than [batch, q, k] stay unfused with a reason.
"""
from __future__ import annotations

import pytest
import torch

from helpers import check_fused, check_unfused

B, H, T, D = 2, 4, 9, 16
SCALE = D ** -0.5


def bshd():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, T, H, D, generator=g) for _ in range(3)]


def bshd_in_bhsd_scores_bshd_out(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * SCALE
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def bshd_in_bhsd_out(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q * SCALE, k)
    return torch.einsum("bhqk,bkhd->bhqd", torch.softmax(s, dim=-1), v)


def bhsd_in_bshd_out(q, k, v):
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    s = torch.einsum("bnqd,bnkd->bnqk", q, k) / D ** 0.5
    s = s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    return torch.einsum("bnqk,bnkd->bqnd", s.softmax(-1), v)


def spaced_equations(q, k, v):
    s = torch.einsum("b i h d, b j h d -> b h i j", q, k) * SCALE
    return torch.einsum("b h i j, b j h d -> b i h d", s.softmax(-1), v)


def heads_first_output(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * SCALE
    return torch.einsum("bhqk,bkhd->hbqd", s.softmax(-1), v)


@pytest.mark.parametrize("fn", [bshd_in_bhsd_scores_bshd_out, bshd_in_bhsd_out, bhsd_in_bshd_out,
                                spaced_equations, heads_first_output])
def test_permuted_einsum_is_fused(fn):
    check_fused(fn, *bshd())


def test_scores_written_query_major_stay_unfused():
    def f(q, k, v):
        s = torch.einsum("bqhd,bkhd->bqhk", q, k) * SCALE
        return torch.einsum("bqhk,bkhd->bqhd", s.softmax(-1), v)

    check_unfused(f, *bshd(), reason="writes the scores")


def decode_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, H, D, generator=g), torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)


def decode_plain(q, k, v, lens):
    s = torch.einsum("bhd,bhsd->bhs", q, k) * SCALE
    return torch.einsum("bhs,bhsd->bhd", s.softmax(-1), v)


def decode_length_mask(q, k, v, lens):
    # one new token per sequence over a cache of T slots, `lens` of them filled
    s = torch.einsum("bhd,bhsd->bhs", q, k) / D ** 0.5
    s = s.masked_fill(torch.arange(T)[None, None, :] >= lens[:, None, None], float("-inf"))
    return torch.einsum("bhs,bshd->bhd", torch.softmax(s, dim=-1), v.transpose(1, 2))


def decode_bias_bshd_cache(q, k, v, lens):
    s = torch.einsum("bhd,bshd->bhs", q * SCALE, k.transpose(1, 2)) + lens.float()[:, None, None] * 0.01
    return torch.einsum("bhs,bhsd->bhd", s.softmax(-1), v)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("fn", [decode_plain, decode_length_mask, decode_bias_bshd_cache])
def test_decode_einsum_without_a_query_dim_is_fused(fn, dynamic):
    check_fused(fn, *decode_inputs(), torch.tensor([5, T]), dynamic=dynamic)


def test_decode_scores_written_key_major_stay_unfused():
    def f(q, k, v, lens):
        s = torch.einsum("bhd,bhsd->bsh", q, k) * SCALE    # softmax(-1) would run over the heads
        return torch.einsum("bsh,bhsd->bhd", s.softmax(-1), v)

    check_unfused(f, *decode_inputs(), torch.tensor([5, T]), reason="einsum")
