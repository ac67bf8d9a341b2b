"""Biases and masks on the scores, spelled as other projects spell them (issue 9, items 1-4; issue 12.1).

Each case: compiled (strict, inner eager) equals eager, NaN where eager has NaN, and the site is
rewritten (or, for the near misses, left unfused with its reason).
- `alpha`: `torch.add(mask, scores, alpha=c)` scales the scores, `torch.add(scores, mask, alpha=c)` the mask.
- a bool or int tensor that enters the scores as a number is the number 0/1 (or the integer), never a
  keep-mask; only `where`, `masked_fill` and SDPA's `attn_mask` make a bool a mask.
- scores flattened to `[B*H, Tq, Tk]` for `bmm` / `baddbmm`, with the mask added in a 4-D view
  (BART, mBART, BLOOM's ALiBi through baddbmm, diffusers' cross-attention `get_attention_scores`).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import B, H, T, D, check_fused, check_unfused, qkv
from helpers import rand as bias

SCALE = D ** -0.5


def keep_with_empty_row():
    keep = torch.rand(B, 1, T, T, generator=torch.Generator().manual_seed(2)) > 0.5
    keep[0, 0, 3] = False          # a row whose every key is "masked" if the bool were read as a mask
    return keep


# ---- alpha (issue 9.1) --------------------------------------------------------------------------

def add_mask_first(q, k, v, m):
    return torch.softmax(torch.add(m, q @ k.transpose(-1, -2), alpha=SCALE), -1) @ v


def add_scores_first(q, k, v, m):
    return torch.softmax(torch.add(q @ k.transpose(-1, -2) * SCALE, m, alpha=2.0), -1) @ v


def tensor_add_alpha(q, k, v, m):
    return (q @ k.transpose(-1, -2) * SCALE).add(m, alpha=0.5).softmax(-1) @ v


def sub_alpha(q, k, v, m):
    return F.softmax(torch.sub(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D), m, alpha=3.0), dim=-1) @ v


def sub_negative_alpha_scores_second(q, k, v, m):
    # m - (-c) * s = m + c * s: the scores scaled by c
    return torch.softmax(torch.sub(m, q @ k.mT, alpha=-SCALE), -1) @ v


def add_alpha_inplace(q, k, v, m):
    s = q @ k.mT * SCALE
    s.add_(m, alpha=1.5)
    return s.softmax(-1) @ v


@pytest.mark.parametrize("fn", [add_mask_first, add_scores_first, tensor_add_alpha, sub_alpha,
                                sub_negative_alpha_scores_second, add_alpha_inplace])
def test_alpha_scales_the_right_operand(fn):
    check_fused(fn, *qkv(), bias(B, 1, T, T))


def test_alpha_on_a_causal_additive_mask():
    causal = torch.full((T, T), float("-inf")).triu(1)
    check_fused(lambda q, k, v, m: torch.softmax(torch.add(q @ k.mT * SCALE, m, alpha=2.0), -1) @ v, *qkv(), causal)


def test_scores_subtracted_stay_unfused():
    # m - s negates the scores: no kernel computes softmax(-q·k)
    check_unfused(lambda q, k, v, m: torch.softmax(torch.sub(m, q @ k.mT), -1) @ v, *qkv(), bias(B, 1, T, T),
                  reason="non-positive")


# ---- bools and ints are numbers unless their consumer makes them a mask (issue 9.2, 9.4) ---------

def plus_bool(q, k, v, keep):
    return torch.softmax(q @ k.mT * SCALE + keep, -1) @ v


def bool_plus_scores(q, k, v, keep):
    return torch.softmax(keep + torch.matmul(q, k.transpose(-2, -1)) * SCALE, dim=-1) @ v


def plus_bool_times_value(q, k, v, keep):
    # a 0/1 bias scaled by a number: a soft preference, not a mask
    return torch.softmax(q @ k.mT * SCALE + keep * 2.0, -1) @ v


def plus_float_of_bool(q, k, v, keep):
    return torch.softmax(q @ k.mT * SCALE + keep.to(q.dtype), -1) @ v


def plus_old_bert_extended_mask(q, k, v, keep):
    # BERT before masking_utils: (1 - mask) * -10000.0, a large but finite penalty
    return torch.softmax(q @ k.mT * SCALE + (1.0 - keep.float()) * -10000.0, -1) @ v


def plus_data_free_bool(q, k, v, keep):
    tril = torch.tril(torch.ones(T, T, dtype=torch.bool))    # a causal pattern, but added: +1 below the diagonal
    return torch.softmax(q @ k.mT * SCALE + tril, -1) @ v


@pytest.mark.parametrize("fn", [plus_bool, bool_plus_scores, plus_bool_times_value, plus_float_of_bool,
                                plus_old_bert_extended_mask, plus_data_free_bool])
def test_bool_entering_as_a_number_is_a_number(fn):
    site = check_fused(fn, *qkv(), keep_with_empty_row())
    assert site.spec["bias_kind"] == "float"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_int_bias_is_cast_to_the_scores_dtype(dtype):
    m = torch.randint(-3, 4, (B, 1, T, T), generator=torch.Generator().manual_seed(3))
    m = m.clamp_min(0) if dtype == torch.uint8 else m
    site = check_fused(plus_bool, *qkv(), m.to(dtype))
    assert site.spec["bias_kind"] == "float"


def test_int_bias_in_bf16():
    m = torch.randint(-3, 4, (1, H, T, T), generator=torch.Generator().manual_seed(3))
    check_fused(plus_bool, *qkv(dtype=torch.bfloat16), m, rtol=3e-2)


def test_bool_keeps_its_mask_meaning_where_the_consumer_gives_it():
    keep = keep_with_empty_row()
    site = check_fused(lambda q, k, v, m: (q @ k.mT * SCALE).masked_fill(~m, float("-inf")).softmax(-1) @ v,
                       *qkv(), keep)
    assert site.spec["bias_kind"] == "bool"
    site = check_fused(lambda q, k, v, m: torch.softmax(torch.where(m, q @ k.mT * SCALE, float("-inf")), -1) @ v,
                       *qkv(), keep)
    assert site.spec["bias_kind"] == "bool"
    check_fused(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), *qkv(), keep)


def test_scores_times_bool_stays_unfused():
    # s * keep zeroes scores (exp(0) = 1 is not masking): no kernel multiplies the scores by data
    check_unfused(lambda q, k, v, m: torch.softmax(q @ k.mT * m, -1) @ v, *qkv(), keep_with_empty_row(),
                  reason="multiplied by a tensor")


# ---- scores flattened to [B*H, Tq, Tk] (issue 9.3, issue 12.1) ------------------------------------

def _flat(*xs):
    return [x.reshape(B * H, x.shape[2], D) for x in xs]


def mbart(q, k, v, mask):
    # mBART / BART eager attention: bmm, the mask added in a 4-D view, softmax on the flat scores
    q3, k3, v3 = _flat(q * SCALE, k, v)
    w = torch.bmm(q3, k3.transpose(1, 2))
    w = w.view(B, H, T, T) + mask
    w = w.view(B * H, T, T)
    return torch.bmm(F.softmax(w, dim=-1), v3).view(B, H, T, D)


def bart_softmax_4d(q, k, v, mask):
    q3, k3, v3 = _flat(q, k, v)
    w = torch.bmm(q3, k3.transpose(1, 2)).view(B, H, T, T) * SCALE
    w = w.masked_fill(mask == 0, float("-inf"))
    p = w.softmax(-1).view(B * H, T, T)
    return torch.bmm(p, v3)


def bloom_alibi(q, k, v, mask):
    # BLOOM: baddbmm with ALiBi as the input (beta=1), then a causal fill in the 4-D view
    q3, k3, v3 = _flat(q, k, v)
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
    alibi = (slopes[:, None] * torch.arange(T)[None, :]).repeat(B, 1)[:, None, :]      # [B*H, 1, T]
    w = torch.baddbmm(alibi, q3, k3.transpose(1, 2), beta=1.0, alpha=SCALE).view(B, H, T, T)
    w = w.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), torch.finfo(w.dtype).min)
    p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype).view(B * H, T, T)
    return torch.bmm(p, v3).view(B, H, T, D)


def diffusers_cross_attention(q, k, v, mask):
    # diffusers' Attention.get_attention_scores: the mask [B*H, 1, Tk] is baddbmm's input
    q3, k3, v3 = _flat(q, k, v)
    m3 = mask.repeat_interleave(H, dim=0)                  # prepare_attention_mask: [B, 1, Tk] -> [B*H, 1, Tk]
    scores = torch.baddbmm(m3, q3, k3.transpose(-1, -2), beta=1, alpha=SCALE)
    return torch.bmm(scores.softmax(dim=-1), v3)


def flat_mask_added_flat(q, k, v, mask):
    q3, k3, v3 = _flat(q, k, v)
    w = torch.bmm(q3, k3.transpose(1, 2)) * SCALE + mask.expand(B, H, T, T).reshape(B * H, T, T)
    return torch.bmm(w.softmax(-1), v3)


@pytest.mark.parametrize("fn,mask", [
    (mbart, "additive4d"), (bart_softmax_4d, "keep4d"), (bloom_alibi, None),
    (diffusers_cross_attention, "additive_keys"), (flat_mask_added_flat, "additive4d")])
def test_bias_on_flattened_scores_is_lifted_to_heads(fn, mask):
    m = {"additive4d": torch.zeros(B, 1, T, T).masked_fill(~keep_with_empty_row(), torch.finfo(torch.float32).min),
         "keep4d": torch.tril(torch.ones(T, T)).expand(B, 1, T, T),
         "additive_keys": bias(B, 1, T),
         None: None}[mask]
    check_fused(fn, *qkv(), m)


def test_heads_permuted_in_the_4d_view_stay_unfused():
    def f(q, k, v, mask):
        q3, k3, v3 = _flat(q, k, v)
        w = torch.bmm(q3, k3.transpose(1, 2)).view(B, H, T, T).transpose(0, 1) + mask
        return torch.bmm(w.reshape(B * H, T, T).softmax(-1), v3)

    check_unfused(f, *qkv(), bias(H, 1, T, T), reason="neither of its operands")


def test_bart_flattened_scores_under_dynamic_shapes():
    def bart(q, k, v, mask):
        (bsz, _, tgt, d), heads = q.shape, H   # the head count is the module's int, the rest symbolic
        src = k.shape[2]
        w = torch.bmm(q.reshape(bsz * heads, tgt, d) * d ** -0.5, k.reshape(bsz * heads, src, d).transpose(1, 2))
        w = w.view(bsz, heads, tgt, src) + mask
        w = F.softmax(w.view(bsz * heads, tgt, src), dim=-1)
        return torch.bmm(w, v.reshape(bsz * heads, src, d)).view(bsz, heads, tgt, d)

    mask = torch.zeros(B, 1, T, T).masked_fill(~keep_with_empty_row(), torch.finfo(torch.float32).min)
    check_fused(bart, *qkv(), mask, dynamic=True)
    flat = bias(B * H, 1, T)

    def baddbmm_flat(q, k, v, m):
        (bsz, _, tgt, d), heads = q.shape, H
        s = torch.baddbmm(m, q.reshape(bsz * heads, tgt, d), k.reshape(bsz * heads, -1, d).transpose(1, 2),
                          beta=1.0, alpha=d ** -0.5)
        return torch.bmm(s.softmax(-1), v.reshape(bsz * heads, -1, d))

    check_fused(baddbmm_flat, *qkv(), flat, dynamic=True)


def test_hf_bloom_alibi_through_baddbmm():
    # BLOOM: baddbmm(alibi [B*H, 1, T], q, kᵀ, beta=1, alpha=1/sqrt(d)) on [B*H] scores, padding mask in 4-D
    import transformers

    from helpers import check_fused_model

    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0,
                                   attention_dropout=0.0)
    cfg._attn_implementation = "eager"
    net = transformers.BloomModel(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0

    def run(ids, mask):
        return net(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    check_fused_model(run, ids, mask, ops=["flash_attention"] * 2)
