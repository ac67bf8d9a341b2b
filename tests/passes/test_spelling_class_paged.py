"""Issue 22, class 5: paged gathers become `paged_attention`, decode and chunked prefill.

A KV cache gathered through a block table, as serving code spells it: vLLM's `[num_blocks, block, Hkv, D]`
pools (one `[2, ...]` tensor unbound into K and V, as its v1 FlashAttention backend stores them; gathered
`key_cache[block_table]` as its `ref_paged_attn` does), FlashInfer's HND `[pages, 2, Hkv, page, D]` cache
(`kv_cache[:, 0]`, gathered with `index_select`), then SDPA or matmuls with a length mask spelled in any of
the ways models spell masks. Recognized, the site reads the pools in place (`paged_attention`): decode
(Tq = 1) and chunked prefill (Tq > 1, causal within the chunk, bottom-right aligned to the cached prefix).

The op is inference-only (no autograd): forward tests only. Each test checks eager parity (NaN where eager
has NaN), the op, the proven mask ("length", "causal" for the prefill) and the pool's block size. Nothing is
skipped (docs/design/issue22.md, class 5). A chunk may be longer than a sequence (the lengths are data): the
rewrite passes `paged_attention(empty_rows_nan=...)` with the source's value for the rows before its first token.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import spellings_issue22 as S

PAGED = "paged_attention"
HKV, D = S.HKV, S.D


def paged_site(sites, causal=False):
    site = S.only(sites)
    S.assert_site(site, PAGED, paged_block_size=S.BLOCK_SIZE, causal=causal)
    assert "length" in site.mask, S.describe([site])
    assert "in place" in site.reason, S.describe([site])
    return site


# ---- decode -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_vllm_layout_decode(inner):
    _, sites = S.check_forward(S.vllm_decode, *S.paged_inputs(1, layout="vllm"), inner=inner)
    paged_site(sites)


def test_flashinfer_layout_decode():
    _, sites = S.check_forward(S.flashinfer_decode, *S.paged_inputs(1, layout="flashinfer"))
    paged_site(sites)


def test_decode_with_an_empty_sequence():
    """A sequence of length 0: SDPA gives 0 there (its safe softmax), the manual spelling NaN."""
    for fn, layout in ((S.vllm_decode, "vllm"), (S.flashinfer_decode, "flashinfer")):
        _, sites = S.check_forward(fn, *S.paged_inputs(1, layout=layout, lens=(0, 37)))
        paged_site(sites)


# ---- the length mask, spelled as models spell masks ------------------------------------------------------

def _gathered(kv_cache, block_tables):
    b = block_tables.shape[0]
    k = kv_cache[0][block_tables].view(b, -1, HKV, D).transpose(1, 2)
    v = kv_cache[1][block_tables].view(b, -1, HKV, D).transpose(1, 2)
    return k, v


def additive_length_bias(q, kv_cache, block_tables, seq_lens):
    """A float mask: 0 for the sequence's keys, -inf past its length (SDPA's float `attn_mask`)."""
    k, v = _gathered(kv_cache, block_tables)
    pos = torch.arange(k.shape[2])
    bias = torch.zeros(q.shape[0], 1, 1, k.shape[2]).masked_fill(
        pos[None, None, None, :] >= seq_lens[:, None, None, None], float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


def hf_repeat_kv_masked_fill(q, kv_cache, block_tables, seq_lens):
    """transformers' eager attention on the gathered cache: `repeat_kv` (expand + reshape), the keep-mask
    negated into `masked_fill(~keep, -inf)`, softmax in fp32."""
    k, v = _gathered(kv_cache, block_tables)

    def repeat_kv(x, n_rep):
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)

    k, v = repeat_kv(k, q.shape[1] // HKV), repeat_kv(v, q.shape[1] // HKV)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
    keep = torch.arange(k.shape[2])[None, None, None, :] < seq_lens[:, None, None, None]
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def expanded_keep_mask(q, kv_cache, block_tables, seq_lens):
    """The keep-mask built `[B, L]` first (`arange(L).expand(B, L) < lens.unsqueeze(-1)`), then viewed
    `[:, None, None, :]`."""
    k, v = _gathered(kv_cache, block_tables)
    length = k.shape[2]
    keep = torch.arange(length).expand(q.shape[0], length) < seq_lens.unsqueeze(-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)


@pytest.mark.parametrize("fn", [additive_length_bias, hf_repeat_kv_masked_fill, expanded_keep_mask],
                         ids=["additive_inf", "repeat_kv_masked_fill", "expanded_keep"])
def test_decode_length_mask_spellings(fn):
    _, sites = S.check_forward(fn, *S.paged_inputs(1, layout="vllm"))
    paged_site(sites)


@pytest.mark.parametrize("fn", [S.vllm_decode, additive_length_bias, hf_repeat_kv_masked_fill, expanded_keep_mask],
                         ids=["vllm", "additive_inf", "repeat_kv_masked_fill", "expanded_keep"])
def test_decode_batch_of_one(fn):
    """B = 1: `seq_lens[:, None, None, None]` has size 1 where the scores' batch does too; index 0 there is
    the batch index (not a single length broadcast over a batch)."""
    q, cache, table, lens = S.paged_inputs(1, layout="vllm")
    _, sites = S.check_forward(fn, q[:1], cache, table[:1], lens[1:2])
    paged_site(sites)


def one_length_for_the_batch(q, kv_cache, block_tables, seq_lens):
    """One length (a [1] tensor) broadcast over a batch of two: not the paged op's lengths [B]."""
    k, v = _gathered(kv_cache, block_tables)
    keep = torch.arange(k.shape[2])[None, None, None, :] < seq_lens[:1, None, None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)


def test_one_length_broadcast_over_the_batch_is_not_paged():
    _, sites = S.check_forward(one_length_for_the_batch, *S.paged_inputs(1, layout="vllm"))
    site = S.only(sites)
    assert site.op != PAGED, S.describe([site])


# ---- chunked prefill --------------------------------------------------------------------------------------

@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_vllm_layout_chunked_prefill(inner):
    """4 new tokens per sequence at the end of 29 and 37 cached ones: query i sits at len - 4 + i."""
    _, sites = S.check_forward(S.vllm_chunked_prefill, *S.paged_inputs(4, layout="vllm"), inner=inner)
    paged_site(sites, causal=True)


def test_flashinfer_layout_chunked_prefill():
    _, sites = S.check_forward(S.flashinfer_chunked_prefill, *S.paged_inputs(4, layout="flashinfer"))
    paged_site(sites, causal=True)


def test_chunked_prefill_whole_sequence():
    """A chunk as long as the first sequence (Tq = 29 = its length): its first query sees one key."""
    _, sites = S.check_forward(S.flashinfer_chunked_prefill, *S.paged_inputs(29, layout="flashinfer", lens=(29, 37)))
    paged_site(sites, causal=True)


def prefill_top_left(q, kv_cache, block_tables, seq_lens):
    """A causal mask aligned top-left (`tril` of [Tq, L]) on a gathered cache: query i sees keys 0..i, not
    the cached prefix. Not the paged op's alignment: it must stay dense, with the reason."""
    k, v = _gathered(kv_cache, block_tables)
    keep = torch.tril(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool))
    keep = keep & (torch.arange(k.shape[2])[None, None, None, :] < seq_lens[:, None, None, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)


def test_top_left_causal_on_a_cache_is_not_paged():
    _, sites = S.check_forward(prefill_top_left, *S.paged_inputs(4, layout="vllm"))
    site = S.only(sites)
    assert site.op != PAGED, S.describe(sites)
    assert "paged gather was seen" in site.reason and "align" in site.reason, S.describe(sites)


def test_chunk_longer_than_a_sequence_gives_eager_nan_rows():
    """Sequence 0 holds 2 tokens but the chunk has 4 queries: queries 0 and 1 sit before its first token
    (position L - Tq + i < 0) and see no key. Eager's softmax gives NaN there, SDPA's 0: each as its source."""
    for fn, layout in ((S.vllm_chunked_prefill, "vllm"), (S.flashinfer_chunked_prefill, "flashinfer")):
        _, sites = S.check_forward(fn, *S.paged_inputs(4, layout=layout, lens=(2, 37)))
        paged_site(sites, causal=True)


@pytest.mark.parametrize("fn, layout, value", [(S.vllm_chunked_prefill, "vllm", "NaN"),
                                               (S.flashinfer_chunked_prefill, "flashinfer", "0")])
def test_chunk_report_says_what_rows_before_a_sequence_take(fn, layout, value):
    """The rewrite passes empty_rows_nan with the source's value (eager softmax: NaN, SDPA: 0), and the report
    says so; the real lengths (29, 37) are all >= Tq: the op must not raise for shorter ones either (data)."""
    _, sites = S.check_forward(fn, *S.paged_inputs(4, layout=layout))
    site = paged_site(sites, causal=True)
    S.assert_site(site, PAGED, empty_rows_nan=value == "NaN")
    assert "queries before their sequence's first token" in site.reason, S.describe(sites)
    assert f"see no key: {value}, as the source's" in site.reason, S.describe(sites)
    assert "[1, Tq=4)" in site.validated, site.validated


def test_chunked_prefill_dynamic_shapes_one_graph():
    """dynamic=True: the chunk length, the table width and the pool are symbolic; the causal bound
    `j <= L[b] - Tq + i` is proven for every Tq, and other chunk lengths reuse the graph."""
    from attnlower.compiler import backend

    # Tq = 3 at the first call: 4 would equal H, and Dynamo's duck sizing would tie the two sizes
    compiled, sites = S.check_forward(S.vllm_chunked_prefill, *S.paged_inputs(3, layout="vllm"), dynamic=True)
    site = S.only(sites)      # the block size is a symbol too: not compared with 8
    S.assert_site(site, PAGED, mask="causal+length", causal=True)
    graphs = len(backend.reports())
    for tq in (5, 6):
        args = S.paged_inputs(tq, layout="vllm", seed=tq)
        S.assert_matches_eager(compiled(*args), S.vllm_chunked_prefill(*args), what=f"Tq={tq}")
    assert len(backend.reports()) == graphs, "a new chunk length recompiled"
