"""The analyzer (passes/analyze.py) called on the sites real spellings make: which op, and which sites stay
unfused and why (docs/ARCHITECTURE.md, "How the op is chosen")."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlower.passes.analyze import analyze_site
from attnlower.passes.site import Refused
from attnlower.target import Target
from helpers import found_sites, qkv

ALL = ("flash_attention", "sliding_window_attention", "paged_attention")
H100 = Target("cuda", arch=90, sm_count=132, name="NVIDIA H100")


def decide(fn, *args, target=Target("cpu"), ops=ALL):
    """analyze_site on `fn`'s one site, as the analyze stage would call it."""
    (site,) = found_sites(fn, *args, last="classify_masks")
    assert site.open, site.refusal
    return analyze_site(site.match, target, ops, site.mask, site.paged_mask)


def mistral_window(q, k, v):
    # a sliding window of 4 keys, written as HF's masking_utils compose it: causal and within the window
    t = q.size(-2)
    i, j = torch.arange(t).view(-1, 1), torch.arange(t).view(1, -1)
    keep = (j <= i) & (j > i - 4)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_a_band_becomes_the_sliding_op_and_drops_its_mask():
    d = decide(mistral_window, *qkv(t=12))
    assert (d.spec.op, d.spec.window, d.spec.causal, d.bias.kind) == ("sliding_window_attention", 4, True, "none")


def test_without_the_sliding_op_a_band_is_refused():
    with pytest.raises(Refused, match="sliding_window_attention is not among the enabled ops"):
        decide(mistral_window, *qkv(t=12), ops=("flash_attention",))


def test_a_finite_fill_that_does_not_mask_takes_the_op_fill_mode():
    def bert_old(q, k, v):   # old BERT: (1 - mask) * -10000.0 added to the scores, here as a fill
        s = q @ k.mT / math.sqrt(q.size(-1))
        return s.masked_fill(torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).triu(1), -10000.0).softmax(-1) @ v

    d = decide(bert_old, *qkv(t=6))
    assert (d.spec.op, d.spec.causal, d.spec.fill, d.bias.kind) == ("flash_attention", True, -10000.0, "none")
    assert "fills scores with -10000.0, which does not mask them out" in d.reason and "op fill mode" in d.reason


def padded_causal(fill):
    def fn(q, k, v, attention_mask):   # HF-style key padding and a causal triangle, one keep-mask
        keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
        return (q @ k.mT).masked_fill(~keep, fill).softmax(-1) @ v
    return fn


def test_causal_and_padding_masked_with_minus_inf_skips_the_blocks_above_the_diagonal():
    """The structure goes to the op (blocks above the diagonal skipped) and the mask rides along as the bias:
    a key the causal part hides weighs nothing whether its block is visited or not."""
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    attention_mask[0, :2] = 0
    d = decide(padded_causal(float("-inf")), *qkv(b=2, t=6), attention_mask)
    assert (d.mask.kind, d.spec.causal, d.bias.kind, d.spec.empty_rows_nan) == ("causal+padding", True, "bool", True)


def test_causal_and_padding_masked_with_finfo_min_visits_every_block():
    """finfo.min as the masking value: a fully padded row averages every key, the ones above the diagonal too,
    so no block may be skipped (the mask is the op's float bias, causal off)."""
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    attention_mask[0, :2] = 0
    d = decide(padded_causal(torch.finfo(torch.float32).min), *qkv(b=2, t=6), attention_mask)
    assert (d.mask.kind, d.spec.causal, d.bias.kind) == ("causal+padding", False, "float")


def test_a_finite_fill_beside_a_minus_inf_mask_is_refused():
    """The op's fill mode takes one keep-mask whose hidden keys all take the fill: a -inf mask beside it would
    need a second bias."""
    def fill_and_inf(q, k, v):
        s = q @ k.mT / math.sqrt(q.size(-1))
        s = s.masked_fill(torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).triu(1), -10000.0)
        return s.masked_fill(torch.eye(q.size(-2), k.size(-2), dtype=torch.bool), float("-inf")).softmax(-1) @ v

    with pytest.raises(Refused, match="a -inf mask .* is applied with the finite fill -10000"):
        decide(fill_and_inf, *qkv(t=6))


def test_head_dims_past_the_kernels_and_float64_on_cuda_are_refused():
    with pytest.raises(Refused, match="q/k head dim 320 > 256"):
        decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv(d=320))
    with pytest.raises(Refused, match="float64 on CUDA"):
        decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv(dtype=torch.float64), target=H100)
    d = decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv(dtype=torch.float64))
    assert d.spec.op == "flash_attention" and d.spec.dtype == "float64"      # the CPU reference takes it


def test_a_value_head_dim_of_its_own_is_the_spec_s_v_head_dim():
    """MLA: Dqk 24, Dv 16 fuses, the spec carries both; each dim has its own limit, named when refused."""
    q, k = torch.randn(1, 2, 9, 24), torch.randn(1, 2, 9, 24)
    d = decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, torch.randn(1, 2, 9, 16))
    assert (d.spec.op, d.spec.head_dim, d.spec.v_head_dim) == ("flash_attention", 24, 16)
    with pytest.raises(Refused, match=r"v head dim 272 > 256: the dense kernels"):
        decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, torch.randn(1, 2, 9, 272))


def test_sdpa_is_causal_with_a_mask_is_refused():
    def both(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)

    with pytest.raises(Refused, match="both is_causal and attn_mask"):
        decide(both, *qkv(), torch.zeros(8, 8))
