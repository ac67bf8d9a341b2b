"""Attention sinks on the pass side (passes/score_chain.py, anchors.py, analyze.py; issue 21.2).

A sink is one logit per query head in the softmax denominator that adds no value. The score chain reads it in
three spellings: a column concatenated to the scores and dropped before P·V (GPT-OSS), `exp(s - logaddexp(lse,
c))` (the log-sum-exp form), and `softmax(s) v * exp(lse - logaddexp(lse, c))` (the rescale form). The column is
proven to be a per-head logit through the layout algebra; anything else is refused with what it is. The analyzer
hands it to the op only when the op takes `sinks` (checked both ways).
"""
from __future__ import annotations

import pytest
import torch

from attnlower.passes import analyze as analyze_module
from attnlower.passes.analyze import analyze_site
from attnlower.target import Target
from helpers import found_sites

B, H, T, D = 2, 4, 9, 8


def inputs(heads=H):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, heads, T, D, generator=g) for _ in range(3)] + [torch.randn(heads, generator=g)]


def chain_of(fn, *args):
    (site,) = found_sites(fn, *args, last="score_chain")
    return site


def concat(q, k, v, sinks):
    s = q @ k.mT * D ** -0.5
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    logits = torch.cat([s, column], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    return torch.softmax(logits, dim=-1)[..., :-1] @ v


def concat_scaled_after(q, k, v, sinks):   # a scale after the concatenation scales the sink too
    column = sinks.view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], 1)
    return (torch.cat([q @ k.mT, column], -1) * 0.5).softmax(-1).narrow(-1, 0, k.shape[-2]) @ v


def lse_form(q, k, v, sinks):
    s = q @ k.mT * D ** -0.5
    return torch.exp(s - torch.logaddexp(torch.logsumexp(s, -1, keepdim=True), sinks.view(1, -1, 1, 1))) @ v


def rescale_form(q, k, v, sinks):
    s = q @ k.mT * D ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    return (s.softmax(-1) @ v) * torch.sigmoid(lse - sinks.view(1, -1, 1)).unsqueeze(-1)


@pytest.mark.parametrize("fn,form,scale", [(concat, "concat", 1.0), (concat_scaled_after, "concat", 0.5),
                                           (lse_form, "logsumexp", 1.0), (rescale_form, "rescale", 1.0)])
def test_sink_spellings(fn, form, scale):
    site = chain_of(fn, *inputs())
    assert site.open, site.refusal
    sinks = site.chain.sinks
    assert (sinks.form, sinks.scale, sinks.source.op) == (form, scale, "placeholder"), sinks
    assert site.chain.k_len == T     # the sink is no key


def column_per_query(q, k, v, extra):       # [B, H, T, 1] data: a different logit per query
    return torch.cat([q @ k.mT, extra], -1).softmax(-1)[..., :-1] @ v


def column_per_batch(q, k, v, sinks):       # one logit per batch row, the same for every head: not [Hq]
    column = sinks.view(B, 1, 1, 1).expand(-1, H, T, 1)
    return torch.cat([q @ k.mT, column], -1).softmax(-1)[..., :-1] @ v


def column_kept(q, k, v, sinks):            # the column reaches P·V: a key with a value
    column = sinks.view(1, -1, 1, 1).expand(B, -1, T, 1)
    return torch.cat([q @ k.mT, column], -1).softmax(-1) @ torch.cat([v, v[:, :, :1]], dim=2)


def column_first(q, k, v, sinks):
    column = sinks.view(1, -1, 1, 1).expand(B, -1, T, 1)
    return torch.cat([column, q @ k.mT], -1).softmax(-1)[..., 1:] @ v


def mask_over_the_column(q, k, v, sinks):   # a mask added after the concatenation masks the sink too
    column = sinks.view(1, -1, 1, 1).expand(B, -1, T, 1)
    keep = torch.ones(T, T + 1, dtype=torch.bool).tril()
    return torch.cat([q @ k.mT, column], -1).masked_fill(~keep, float("-inf")).softmax(-1)[..., :-1] @ v


@pytest.mark.parametrize("fn,data,reason", [
    (column_per_query, lambda: torch.randn(B, H, T, 1), "depends on the query"),
    (column_per_batch, lambda: torch.randn(B), "not one logit per head"),
    (column_kept, lambda: torch.randn(H), "reaches the P·V product"),
    (column_first, lambda: torch.randn(H), "before the scores"),
    (mask_over_the_column, lambda: torch.randn(H), "with the concatenated column"),
])
def test_what_is_not_a_sink_is_refused(fn, data, reason):
    q, k, v, _ = inputs()
    site = chain_of(fn, q, k, v, data())
    assert not site.open and reason in site.refusal, site.refusal


def test_sinks_per_batch_and_head_fold_the_batch_into_the_heads():
    """A logit per (batch, head): B * H heads of one batch, the sinks [B * H]."""
    def attend(q, k, v, sinks):
        column = sinks.view(B, H, 1, 1).expand(-1, -1, T, 1)
        return torch.cat([q @ k.mT, column], -1).softmax(-1)[..., :-1] @ v

    q, k, v, _ = inputs()
    (site,) = found_sites(attend, q, k, v, torch.randn(B * H))
    assert site.open, site.refusal
    assert (site.match.batch, site.match.q_heads) == (1, B * H)


def test_openai_s_head_split_folds_the_batch_into_the_heads():
    """openai/gpt-oss: scores [Hkv, q_mult, T, T] and sinks reshaped (Hkv, q_mult): the op's heads are both."""
    def attend(q, k, v, sinks):
        n, hkv, mult, _ = q.shape
        k = k[:, :, None, :].expand(-1, -1, mult, -1)
        v = v[:, :, None, :].expand(-1, -1, mult, -1)
        s = sinks.reshape(hkv, mult, 1, 1).expand(-1, -1, n, -1)
        qk = torch.cat([torch.einsum("qhmd,khmd->hmqk", q, k), s], dim=-1)
        return torch.einsum("hmqk,khmd->qhmd", torch.softmax(qk, dim=-1)[..., :-1], v)

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(T, 2, 2, D, generator=g), torch.randn(T, 2, D, generator=g), torch.randn(T, 2, D, generator=g)
    (site,) = found_sites(attend, q, k, v, torch.randn(4, generator=g))
    assert site.open, site.refusal
    assert (site.match.batch, site.match.q_heads, site.match.kv_heads) == (1, 4, 2)


def test_the_analyzer_passes_sinks():
    (site,) = found_sites(concat, *inputs(), last="classify_masks")
    d = analyze_site(site.match, Target("cpu"), ("flash_attention",), site.mask)
    assert d.spec.sinks and "per-head sinks" in d.reason, d.reason


def test_a_rescaled_output_of_a_softmax_that_can_empty_a_row_is_refused():
    """softmax of a fully masked row is NaN and stays NaN after the rescale; the op with sinks gives 0 there."""
    def padded(q, k, v, sinks, keep):
        s = (q @ k.mT).masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        return (s.softmax(-1) @ v) * torch.exp(lse - torch.logaddexp(lse, sinks.view(1, -1, 1))).unsqueeze(-1)

    keep = torch.ones(B, 1, 1, T, dtype=torch.bool)
    (site,) = found_sites(padded, *inputs(), keep, last="classify_masks")
    with pytest.raises(analyze_module.Refused, match="eager gives NaN there"):
        analyze_site(site.match, Target("cpu"), ("flash_attention",), site.mask)
