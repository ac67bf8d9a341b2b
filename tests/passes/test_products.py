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


def deepseek_query_major(q, k, v):
    # DeepSeek-V3's reference writes the scores [b, s, h, t]: the key index last, the softmax over it
    s = torch.einsum("bqhd,bkhd->bqhk", q, k) * SCALE
    s = s + torch.full((T, T), float("-inf")).triu(1).unsqueeze(1)
    return torch.einsum("bqhk,bkhd->bqhd", s.softmax(-1), v)


def test_scores_written_query_major_are_fused_causal():
    """The key index last is all the softmax needs; the [s, 1, t] mask added to [b, s, h, t] scores is read
    against the scores' [b, h, s, t] matmul order, and proven causal."""
    site = check_fused(deepseek_query_major, *bshd())
    assert site.spec["causal"] and site.spec["bias_kind"] == "none", site.reason


def test_scores_with_the_key_index_not_last_stay_unfused():
    def f(q, k, v):   # the softmax would run over the queries of each key
        s = torch.einsum("bqhd,bkhd->bhkq", q, k) * SCALE
        return torch.einsum("bhkq,bkhd->bqhd", s.softmax(-1), v)

    check_unfused(f, *bshd(), reason="key index 'k' not last")


def latent_mqa(q, kv, v):
    # absorbed MLA: one latent K/V row per key, no head index, shared by every query head
    s = torch.einsum("bshc,btc->bsht", q, kv) * SCALE
    s = s + torch.full((T, T), float("-inf")).triu(1).unsqueeze(1)
    return torch.einsum("bsht,btc->bshc", s.softmax(-1), kv)


def test_keys_without_a_head_index_are_one_kv_head():
    g = torch.Generator().manual_seed(0)
    site = check_fused(latent_mqa, torch.randn(B, T, H, D, generator=g), torch.randn(B, T, D, generator=g),
                        None)
    assert (site.spec["kv_heads"], site.spec["q_heads"], site.spec["causal"]) == (1, H, True), site.spec


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


def latent_and_rope_in_one_row(q_latent, q_pe, kv_row, scale):
    # absorbed MLA over one latent row [B, T, R + P] (vLLM / FlashMLA): scores = latent part + rotary part
    r = q_latent.shape[-1]
    s = (torch.einsum("bshc,btc->bsht", q_latent, kv_row[..., :r])
         + torch.einsum("bshr,btr->bsht", q_pe, kv_row[..., r:])) * scale
    return torch.einsum("bsht,btc->bshc", s.softmax(dim=-1), kv_row[..., :r])


def latent_and_rope_apart(q_latent, q_pe, latent, rope, scale):
    s = (torch.einsum("bshc,btc->bsht", q_latent, latent) + torch.einsum("bshr,btr->bsht", q_pe, rope)) * scale
    return torch.einsum("bsht,btc->bshc", s.softmax(dim=-1), latent)


def test_a_split_head_dim_is_one_product():
    """Q1·K1ᵀ + Q2·K2ᵀ over the same indices is one product over Dqk = R + P; one KV head (MQA), Dv = R;
    K is one view when both parts are adjacent slices of one row, else a concatenation."""
    g = torch.Generator().manual_seed(0)
    q_latent, q_pe = torch.randn(B, T, H, 20, generator=g), torch.randn(B, T, H, 6, generator=g)
    row = torch.randn(B, T, 26, generator=g)
    for fn, args, how in ((latent_and_rope_in_one_row, (row,), "K read as one view"),
                          (latent_and_rope_apart, (row[..., :20].clone(), row[..., 20:].clone()),
                           "K concatenated per call")):
        site = check_fused(fn, q_latent, q_pe, *args, 26 ** -0.5)
        assert (site.spec["head_dim"], site.spec["v_head_dim"], site.spec["kv_heads"]) == (26, 20, 1), site.spec
        assert how in site.reason, site.reason


def test_a_sum_of_products_scaled_apart_stays_unfused():
    def f(q1, q2, k1, k2, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q1, k1) + torch.einsum("bhqd,bhkd->bhqk", q2, k2) * 0.5
        return s.softmax(-1) @ v

    g = torch.Generator().manual_seed(0)
    check_unfused(f, *[torch.randn(B, H, T, D, generator=g) for _ in range(5)], reason="scaled")
