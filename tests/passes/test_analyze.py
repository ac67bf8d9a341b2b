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


def test_a_finite_fill_that_does_not_mask_is_refused():
    def bert_old(q, k, v):   # old BERT: (1 - mask) * -10000.0 added to the scores, here as a fill
        s = q @ k.mT / math.sqrt(q.size(-1))
        return s.masked_fill(torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).triu(1), -10000.0).softmax(-1) @ v

    with pytest.raises(Refused, match="fills scores with -10000.0, which does not mask them out"):
        decide(bert_old, *qkv(t=6))


def test_head_dims_past_the_kernels_and_float64_on_cuda_are_refused():
    with pytest.raises(Refused, match="head_dim 320 > 256"):
        decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv(d=320))
    with pytest.raises(Refused, match="float64 on CUDA"):
        decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv(dtype=torch.float64), target=H100)
    d = decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv(dtype=torch.float64))
    assert d.spec.op == "flash_attention" and d.spec.dtype == "float64"      # the CPU reference takes it


def test_sdpa_is_causal_with_a_mask_is_refused():
    def both(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)

    with pytest.raises(Refused, match="both is_causal and attn_mask"):
        decide(both, *qkv(), torch.zeros(8, 8))
