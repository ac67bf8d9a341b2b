"""In-place ops on the scores, made out-of-place by the functionalize stage (issue 12.3), and which add
operand carries Q·Kᵀ (issue 12.2, HF Falcon, whose scores are divided in place).

In-place ops are functionalized before detection (`functionalize.functionalize_scores`) when no other
node can observe the mutation; the add operand holding the scores is found by dataflow, whatever its
position or shape. Each case: compiled equals eager, the op asserted; near misses stay unfused.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (B, H, T, D, assert_matches_eager, causal, check_fused, check_fused_model, check_unfused,
                     compiled_sites, qkv, rand)


# ---- in-place score ops ---------------------------------------------------------------------------

def t5_inplace_bias(q, k, v, position_bias):
    # T5Attention: scores = matmul(q, k.T); scores += position_bias_masked; softmax(scores.float()).type_as
    scores = torch.matmul(q, k.transpose(3, 2))
    scores += position_bias
    attn = F.softmax(scores.float(), dim=-1).type_as(scores)
    return torch.matmul(attn, v)


def falcon_inplace_div(q, k, v, mask):
    # Falcon (no alibi): attention_scores /= sqrt(head_dim); softmax(attention_scores + attention_mask)
    attention_scores = q @ k.transpose(-1, -2)
    attention_scores /= math.sqrt(D)
    return F.softmax(attention_scores + mask, dim=-1) @ v


def masked_fill_inplace(q, k, v, keep):
    s = q @ k.mT
    s.mul_(D ** -0.5)
    s.masked_fill_(~keep, float("-inf"))
    return s.softmax(-1) @ v


def chained_inplace_methods(q, k, v, bias):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k)
    s.div_(math.sqrt(D)).add_(bias)
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def inplace_on_a_view(q, k, v, mask):
    # BART-style flat bmm scores, mutated through their 4-D view
    w = torch.bmm(q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2))
    w4 = w.view(B, H, T, T)
    w4 *= D ** -0.5
    w4 += mask
    return torch.bmm(F.softmax(w4.view(B * H, T, T), dim=-1), v.reshape(B * H, T, D))


@pytest.mark.parametrize("fn,extra", [
    (t5_inplace_bias, lambda: rand(1, H, T, T)),
    (falcon_inplace_div, lambda: torch.zeros(B, 1, T, T).masked_fill(~causal(), torch.finfo(torch.float32).min)),
    (masked_fill_inplace, causal),
    (chained_inplace_methods, lambda: rand(B, 1, 1, T)),
    (inplace_on_a_view, lambda: rand(B, 1, T, T)),
])
def test_inplace_score_ops_are_fused(fn, extra):
    check_fused(fn, *qkv(), extra())


def test_mutation_seen_through_another_alias_stays_unfused():
    # a view of the scores taken before the mutation is read after it: the mutation is observable
    def f(q, k, v, bias):
        s = q @ k.mT
        first_row = s[:, :, 0]
        s += bias
        return s.softmax(-1) @ v, first_row.sum()

    want = f(*qkv(), rand(1, H, T, T))
    got, sites = compiled_sites(f, *qkv(), rand(1, H, T, T))
    for g, w in zip(got, want):
        assert_matches_eager(g, w)
    assert [s.op for s in sites] == [None]


def test_mutated_input_stays_unfused():
    # the caller sees its own tensor change: never functionalized
    def f(q, k, v, bias):
        bias += 1.0
        return torch.softmax(q @ k.mT + bias, -1) @ v

    q, k, v = qkv()
    b1, b2 = rand(1, H, T, T), rand(1, H, T, T)
    want = f(q, k, v, b1)
    got, _ = compiled_sites(f, q, k, v, b2)
    assert_matches_eager(got, want)
    assert torch.equal(b1, b2), "the compiled call did not mutate its input as eager does"


# ---- which operand carries the scores: dataflow (Falcon) -------------------------------------------

@pytest.mark.parametrize("order", ["scores_first", "mask_first"])
def test_operand_order_does_not_matter(order):
    def f(q, k, v, m):
        s = q @ k.mT * D ** -0.5
        return torch.softmax(s + m if order == "scores_first" else m + s, -1) @ v

    check_fused(f, *qkv(), rand(B, H, T, T))   # the bias has the scores' own shape: shape cannot tell


def test_two_products_are_one_over_a_split_head_dim():
    # Transformer-XL / DeBERTa style: q·kᵀ + q·rᵀ = cat(q, q)·cat(k, r)ᵀ, one product over 2D (issue 21)
    def f(q, k, v, r):
        return torch.softmax(q @ k.mT + q @ r.mT, -1) @ v

    site = check_fused(f, *qkv(), rand(B, H, T, D))
    assert site.spec["head_dim"] == 2 * D and "concatenated per call" in site.reason, site.reason


@pytest.mark.parametrize("alibi", [False, True], ids=["rotary", "alibi"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_falcon(impl, alibi):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    alibi=alibi, new_decoder_architecture=False, multi_query=False, bias=False,
                                    parallel_attn=True, hidden_dropout=0.0, attention_dropout=0.0)
    cfg._attn_implementation = impl
    net = transformers.FalconForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0

    def run(ids, mask):
        return net(input_ids=ids, attention_mask=mask, use_cache=False).logits

    check_fused_model(run, ids, mask, ops=["flash_attention"] * 2)
