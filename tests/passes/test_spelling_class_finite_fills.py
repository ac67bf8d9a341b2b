"""Issue 22, class 2: finite fills.

The Annotated Transformer masks with `masked_fill(mask == 0, -1e9)`; transformers' GPT-2 (4.0) with a
`masked_bias` buffer of -1e4; BERT-era models add `(1 - mask) * -10000.0`; DistilBERT fills with
`finfo(dtype).min`. A masked score then *takes that value*: a row whose every key is masked is a uniform
average over all keys, not NaN and not 0, and eager gives exactly that. The fused op must reproduce it
(a `fill` mode: `AttentionSpec.fill` and a kernel constexpr), or prove the fill equivalent to -inf
masking (every row keeps a key, so the filled keys weigh exp(fill - rowmax) = 0 in fp32).

Each test compares with eager, NaN where eager has NaN, on inputs that include fully masked rows where
the spelling can produce them, and checks the op, the mask the report proved and the spec's fill.
Nothing is skipped: the -1e9 / -1e4 cases fail until issue 22 lands (docs/design/issue22.md, class 2).
"""
from __future__ import annotations

import re

import pytest
import torch

import models as M
import spellings_issue22 as S

FLASH = "flash_attention"


def fill_is(value, rel=1e-6):
    def check(got):
        return got is not None and abs(got - value) <= rel * abs(value)
    check.__name__ = f"fill == {value:g}"
    return check


# ---- the Annotated Transformer: masked_fill(mask == 0, -1e9) ---------------------------------------

@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_annotated_decoder_causal_and_padding(inner):
    """`make_std_mask`: `(tgt != pad).unsqueeze(-2) & subsequent_mask(T)`. Row 0 is left-padded: its first
    queries see only pad keys, so their rows are fully masked and eager averages every key uniformly."""
    torch.manual_seed(0)
    model = S.AnnotatedDecoderSelfAttention().eval()
    _, sites = S.check_forward(model, S.padded_tokens(), inner=inner)
    S.assert_site(S.only(sites), FLASH, mask="causal+padding", causal=True, fill=fill_is(-1e9))


def test_annotated_decoder_gradients():
    torch.manual_seed(0)
    model = S.AnnotatedDecoderSelfAttention().train()
    sites = S.check_training(model, S.padded_tokens())
    S.assert_site(S.only(sites), FLASH, mask="causal+padding", causal=True, fill=fill_is(-1e9))


def test_annotated_encoder_fully_padded_sequence():
    """Sequence 1 is all padding: every one of its rows is masked; eager gives the mean of V over all keys."""
    torch.manual_seed(0)
    _, sites = S.check_forward(S.AnnotatedEncoderSelfAttention().eval(), S.padded_tokens(empty_row=1))
    S.assert_site(S.only(sites), FLASH, mask="padding", fill=fill_is(-1e9))


class SubsequentOnly(torch.nn.Module):
    """The Annotated Transformer's `greedy_decode` passes `subsequent_mask(ys.size(1))` alone: every
    query keeps its own key, so -1e9 never empties a row and the fill may be proven equivalent to -inf."""

    def __init__(self):
        super().__init__()
        self.attn = S.AnnotatedMultiHeadedAttention()

    def forward(self, x):
        return self.attn(x, x, x, S.subsequent_mask(x.size(1), x.device))


def test_annotated_subsequent_mask_is_causal():
    torch.manual_seed(0)
    _, sites = S.check_forward(SubsequentOnly().eval(), S.randn(S.B, S.T, S.HIDDEN))
    # causal, no dense bias; the fill is either kept (fill mode) or proven equivalent to -inf
    S.assert_site(S.only(sites), FLASH, mask="causal", causal=True, bias_kind="none",
                  fill=lambda f: f is None or f == float("-inf") or f == -1e9)


def test_annotated_probabilities_kept_on_the_module_stay_unfused():
    """The original stores `self.attn = p_attn` (for visualisation): the probabilities leave the graph."""
    torch.manual_seed(0)
    model = S.AnnotatedDecoderSelfAttention(keep_attn=True).eval()
    _, sites = S.check_forward(model, S.padded_tokens())
    site = S.only(sites)
    assert site.op is None and re.search(M.PROBS_USED, site.reason), S.describe(sites)


def test_annotated_fill_in_bf16():
    """-1e9 in bf16 is a finite fill (about -9.99e8): the fully padded sequence averages every key."""
    torch.manual_seed(0)
    model = S.AnnotatedEncoderSelfAttention().to(torch.bfloat16).eval()
    _, sites = S.check_forward(model, S.padded_tokens(empty_row=1), rtol=S.RTOL[torch.bfloat16])
    S.assert_site(S.only(sites), FLASH, mask="padding", fill=fill_is(-1e9, rel=1e-2))


# ---- transformers GPT-2 4.0: a -1e4 fill kept in a buffer -------------------------------------------

def test_gpt2_v4_masked_bias_buffer():
    """`where(bias[:, :, ns - nd : ns, :ns].bool(), w, masked_bias.to(w.dtype))` with `masked_bias` a
    buffer holding -1e4: the fill value comes from a buffer too (class 1), the mask is causal."""
    torch.manual_seed(0)
    _, sites = S.check_forward(S.GPT2V4Attention().eval(), S.randn(S.B, S.T, S.HIDDEN))
    S.assert_site(S.only(sites), FLASH, mask="causal", causal=True, bias_kind="none",
                  fill=lambda f: f is None or f == float("-inf") or f == -1e4)


def test_gpt2_v4_masked_bias_changed_after_compiling():
    """The fill read from `masked_bias` is baked into the op: the buffer is guarded like a mask buffer, so an
    in-place change recompiles and the new fill is read (here -5.0: near the scores, so every filled key
    weighs; a graph that kept -1e4 would differ)."""
    torch.manual_seed(0)
    model = S.GPT2V4Attention().eval()
    x = S.randn(S.B, S.T, S.HIDDEN)
    compiled, sites = S.check_forward(model, x)
    assert "masked_bias" in S.only(sites).reason, S.describe(sites)
    with torch.no_grad():
        model.masked_bias.fill_(-5.0)
    S.assert_matches_eager(compiled(x), model(x), what="after masked_bias.fill_(-5.0)")


def causal_fill_minus_1e4(q, k, v):
    """GPT-2 4.0's semantics with the fill as a literal: `where(causal, scores, tensor(-1e4))`."""
    s = q @ k.transpose(-1, -2) / S.D ** 0.5
    keep = torch.tril(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool))
    return torch.where(keep, s, torch.tensor(-1e4)).softmax(-1) @ v


def test_fill_near_the_scores_is_not_minus_inf():
    """Scores around -1e4 (one large shared component in q and k): the filled keys weigh as much as the
    visible ones, so only a real fill mode matches eager; a kernel that skips the masked blocks as if they
    were -inf does not. (rtol 5e-3: scores of magnitude 1e4 carry fp32 rounding of ~1e-3.)"""
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i) for i in range(3))
    q[..., 0], k[..., 0] = -100.0, 400.0          # every score shifted by -100 * 400 / 4 = -1e4
    _, sites = S.check_forward(causal_fill_minus_1e4, q, k, v, rtol=5e-3)
    S.assert_site(S.only(sites), FLASH, mask="causal", causal=True, bias_kind="none", fill=fill_is(-1e4))


# ---- BERT-era additive -10000.0, DistilBERT's finfo.min ---------------------------------------------

@pytest.mark.parametrize("fill", [-10000.0, -5000.0, torch.finfo(torch.float32).min],
                         ids=["-10000", "-5000", "finfo_min"])
def test_bert_era_additive_padding(fill):
    """`scores + (1 - mask) * fill`: an additive finite mask keeps the scores (a fully padded sequence gives
    softmax of its raw scores, by shift invariance); proven a padding mask, not a general bias."""
    torch.manual_seed(0)
    model = S.BertEraSelfAttention(fill=fill).eval()
    _, sites = S.check_forward(model, S.randn(S.B, S.T, S.HIDDEN), S.padding_mask(empty_row=1))
    S.assert_site(S.only(sites), FLASH, mask="padding")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_distilbert_finfo_min_fill(dtype):
    """`masked_fill(mask, tensor(finfo.min))`: a fully padded sequence averages every key uniformly (in fp16
    the fill is -65504, the value fp16 models use because -1e9 overflows)."""
    torch.manual_seed(0)
    model = S.DistilBertSelfAttention().to(dtype).eval()
    _, sites = S.check_forward(model, S.randn(S.B, S.T, S.HIDDEN, dtype=dtype), S.padding_mask(empty_row=1),
                               rtol=S.RTOL[dtype])
    S.assert_site(S.only(sites), FLASH, mask="padding")


# ---- what can be proven equivalent to -inf masking today (no fill mode needed) --------------------------

def fp16_product_upcast_fill(q, k, v):
    """vLLM's reference style: Q·Kᵀ in fp16, upcast to fp32, a causal `masked_fill(-1e9)`. Every row keeps
    its diagonal key, and an fp16 product is at most 65504 (times the scale 0.25): every visible score is
    above -16376, so exp(-1e9 - max) is exactly 0 in fp32 and -1e9 masks as -inf does."""
    t = q.shape[-2]
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -1e9)
    return s.softmax(-1).to(v.dtype) @ v


def softcapped_fill(q, k, v, cap: float = 20.0, fill: float = -1e4):
    """Gemma-2 style: the scores capped by `cap * tanh(s / cap)`, then a causal finite fill."""
    t = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), fill)
    return s.softmax(-1) @ v


def test_fill_proven_minus_inf_by_an_fp16_product():
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i, dtype=torch.float16) for i in range(3))
    _, sites = S.check_forward(fp16_product_upcast_fill, q, k, v, rtol=S.RTOL[torch.float16])
    site = S.only(sites)
    S.assert_site(site, FLASH, mask="causal", causal=True, bias_kind="none")
    assert "is -inf masking" in site.reason and "float16" in site.reason, S.describe(sites)


def test_fill_proven_minus_inf_by_a_softcap():
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i) for i in range(3))
    _, sites = S.check_forward(softcapped_fill, q, k, v)
    site = S.only(sites)
    S.assert_site(site, FLASH, mask="causal", causal=True, bias_kind="none", softcap=20.0)
    assert "softcap" in site.reason, S.describe(sites)


def test_fill_within_reach_of_a_softcap_takes_the_fill_mode():
    """cap 20, fill -100: a visible score can be -20, only 80 above the fill: exp(-80) is not 0 in fp32, so
    -100 is not -inf masking (the reason says why) and the op's fill mode computes it. (Until the ops had a
    fill mode this site was refused for that reason.)"""
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i) for i in range(3))
    _, sites = S.check_forward(lambda q, k, v: softcapped_fill(q, k, v, fill=-100.0), q, k, v)
    site = S.only(sites)
    S.assert_site(site, FLASH, mask="causal", causal=True, bias_kind="none", softcap=20.0, fill=fill_is(-100.0))
    assert "fill mode" in site.reason and "within 104" in site.reason, S.describe(sites)


def test_minus_1e9_in_fp16_scores_is_minus_inf():
    """`where(keep, s, -1e9)` on fp16 scores: -1e9 rounds to -inf in fp16, a real mask."""
    def fp16_where(q, k, v):
        t = q.shape[-2]
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.where(torch.ones(t, t, dtype=torch.bool).tril(), s, -1e9).softmax(-1) @ v

    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i, dtype=torch.float16) for i in range(3))
    _, sites = S.check_forward(fp16_where, q, k, v, rtol=S.RTOL[torch.float16])
    S.assert_site(S.only(sites), FLASH, mask="causal", causal=True, bias_kind="none")
