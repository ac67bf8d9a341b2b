"""The continuous-batching attention on its own (attnlower/integrations/continuous_batching.py), without a model:
packed queries of requests with different past and new lengths, their K/V laid out the way transformers'
PagedAttentionCache lays them out (full-attention pages; a sliding window's ring of slots; the dense copy of the
fallback), against plain softmax attention per request in float64. Every query layout (one token per row,
segments, one row per request) and the CUDA-graph shapes (padded token count, empty padding requests, a padded
max_length_k) give the same rows."""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from attnlower.integrations import continuous_batching as cb  # noqa: E402

HQ, HKV, D, PAGE = 4, 2, 8, 4
SCALE = 0.35


class _Module(torch.nn.Module):
    is_causal = True


def _expected(q, k, v, pos, window, softcap=0.0):
    """softmax over the keys 0..pos (within the window) of one request: q [Hq, D], k/v [T, Hkv, D]."""
    keys = torch.arange(k.shape[0])
    visible = keys <= pos
    if window:
        visible &= keys > pos - window
    kk = k.repeat_interleave(HQ // HKV, 1).transpose(0, 1)   # [Hq, T, D]
    vv = v.repeat_interleave(HQ // HKV, 1).transpose(0, 1)
    s = SCALE * torch.einsum("hd,htd->ht", q, kk)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    return torch.einsum("ht,htd->hd", p, vv)


def _batch(requests, layout, window=0, pad_tokens=0, pad_requests=0, pad_keys=0, seed=0, block_table=False):
    """A forward of `requests` [(past, new)] over a cache laid out as `layout` ("pages", "ring" or "dense").

    Returns (query [1, Hq, N, D], LayerKV, kwargs, expected [N_real, Hq, D]). Positions: request b's new tokens
    are past .. past + new - 1; its keys, as transformers lists them: all of them (pages), or the last
    window - 1 cached ones and the new ones (ring, dense)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_slots = 4096
    k_tokens = torch.randn(num_slots, HKV, D, generator=g, dtype=torch.float64)
    v_tokens = torch.randn(num_slots, HKV, D, generator=g, dtype=torch.float64)
    free_pages = list(range(2, num_slots // PAGE))   # page 0: transformers' read trash (zeros)
    rng.shuffle(free_pages)
    k_tokens[:PAGE] = 0
    v_tokens[:PAGE] = 0
    cu_q, cu_k, reads, writes, dense_k, dense_v, queries, expected = [0], [0], [], [], [], [], [], []
    page_lists = []
    for past, new in requests:
        total = past + new
        k_true = torch.randn(total, HKV, D, generator=g, dtype=torch.float64)
        v_true = torch.randn(total, HKV, D, generator=g, dtype=torch.float64)
        q = torch.randn(new, HQ, D, generator=g, dtype=torch.float64)
        if layout == "pages":
            pages = [free_pages.pop() for _ in range(-(-total // PAGE))]
            page_lists.append(pages)

            def slot(p, pages=pages):
                return pages[p // PAGE] * PAGE + p % PAGE
            first = 0
        else:
            ring = [free_pages.pop() for _ in range(-(-window // PAGE))]

            def slot(p, ring=ring):
                return ring[(p % window) // PAGE] * PAGE + (p % window) % PAGE
            first = past - min(past, window - 1)
            assert layout == "dense" or total - first <= window, "a ring holds the chunk only within the window"
        for p in range(first, total):
            k_tokens[slot(p)], v_tokens[slot(p)] = k_true[p], v_true[p]
        cached = list(range(first, past))
        if layout == "pages":
            reads += [slot(p) for p in range(total)]     # written first, then the whole sequence read back
        else:
            reads += [slot(p) for p in cached] + [1] * new   # 1: transformers' sentinel for the new tokens
        writes += [slot(p) for p in range(past, total)]
        dense_k.append(k_true[first:])
        dense_v.append(v_true[first:])
        cu_q.append(cu_q[-1] + new)
        cu_k.append(cu_k[-1] + total - first)
        queries.append(q)
        for i in range(new):
            expected.append(_expected(q[i], k_true, v_true, past + i, window))
    num_real = cu_q[-1]
    cu_q += [cu_q[-1]] * pad_requests          # CUDA-graph padding: empty requests, extra tokens
    cu_k += [cu_k[-1]] * pad_requests
    query = torch.cat(queries + [torch.randn(pad_tokens, HQ, D, generator=g, dtype=torch.float64)])
    query = query.transpose(0, 1).unsqueeze(0)    # [1, Hq, N, D]
    if layout == "dense":
        kv = cb.LayerKV(torch.cat(dense_k).unsqueeze(2), torch.cat(dense_v).unsqueeze(2), 1, None, None, window,
                        "sliding_attention", "window_copies", _Owner())
    else:
        block = PAGE if layout == "pages" else 1
        k_pool, v_pool = (x.unflatten(0, (-1, block)).transpose(1, 2) for x in (k_tokens, v_tokens))
        kv = cb.LayerKV(k_pool, v_pool, block, torch.tensor(reads), torch.tensor(writes + [0] * pad_tokens), window,
                        "full_attention" if layout == "pages" else "sliding_attention", "in_place", _Owner())
    lengths = [b - a for a, b in zip(cu_k, cu_k[1:])]
    kwargs = {"cu_seq_lens_q": torch.tensor(cu_q, dtype=torch.int32),
              "cu_seq_lens_k": torch.tensor(cu_k, dtype=torch.int32),
              "max_length_q": query.shape[2] if pad_tokens else max(n for _, n in requests),
              "max_length_k": max(lengths) + pad_keys}
    if block_table:   # transformers' decode fast path: its page table (-1 past a request's pages), no indices
        width = max(len(pages) for pages in page_lists) + 2
        table = torch.full((len(cu_q) - 1, width), -1, dtype=torch.int32)
        for b, pages in enumerate(page_lists):
            table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        kv = kv._replace(read_index=None, write_index=None, block_table=table, trash_slot=num_slots - 1)
    return query, kv, kwargs, torch.stack(expected)[:num_real]


class _Owner:
    """Stands for the PagedAttentionCache: attend keeps the forward's layouts on it."""


REQUESTS = [(0, 5), (9, 1), (3, 7), (14, 1), (0, 1), (6, 3)]   # (past, new): prefills, chunked prefills, decodes


@pytest.mark.parametrize("segment", [None, 1, 3, 16])
@pytest.mark.parametrize("layout", ["pages", "ring", "dense"])
def test_packed_requests_match_per_request_attention(layout, segment, monkeypatch):
    window = 0 if layout == "pages" else 10
    requests = REQUESTS if layout != "ring" else [(0, 5), (9, 1), (3, 7), (14, 1), (0, 1), (6, 3), (2, 8)]
    query, kv, kwargs, want = _batch(requests, layout, window)
    monkeypatch.setattr(cb, "QUERY_SEGMENT", segment)
    out = cb.attend(_Module(), query, kv, SCALE, window or None, None, kwargs)
    assert out.shape == (1, query.shape[2], HQ, D)
    torch.testing.assert_close(out[0], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["pages", "ring"])
def test_cuda_graph_shapes_padding_tokens_and_requests(layout):
    """transformers pads a captured batch: extra query tokens past the last request, empty requests (cumulative
    lengths that plateau), max_length_k rounded up, max_length_q set to the token count. The real tokens' rows
    are unchanged and the padding tokens get zeros."""
    window = 0 if layout == "pages" else 10
    query, kv, kwargs, want = _batch(REQUESTS, layout, window, pad_tokens=6, pad_requests=3, pad_keys=9)
    out = cb.attend(_Module(), query, kv, SCALE, window or None, None, kwargs)
    real = want.shape[0]
    torch.testing.assert_close(out[0, :real], want, rtol=1e-10, atol=1e-10)
    assert torch.equal(out[0, real:], torch.zeros_like(out[0, real:]))


def test_a_decode_batch_has_no_padded_query_slots():
    query, kv, kwargs, want = _batch([(5, 1), (12, 1), (1, 1), (30, 1)], "pages")
    before = dict(cb.stats)
    out = cb.attend(_Module(), query, kv, SCALE, None, None, kwargs)
    torch.testing.assert_close(out[0], want, rtol=1e-10, atol=1e-10)
    assert cb.stats["query_tokens"] - before["query_tokens"] == 4
    assert cb.stats["padded_query_slots"] == before["padded_query_slots"]
    assert cb.stats["in_place"] == before["in_place"] + 1


def test_the_layout_is_built_once_per_forward_and_layer_type(monkeypatch):
    """Every layer of a forward shares cu_seq_lens_q: the rows and block tables are computed once."""
    query, kv, kwargs, want = _batch(REQUESTS, "pages")
    built = []
    real = cb.row_layout
    monkeypatch.setattr(cb, "row_layout", lambda *a, **k: built.append(1) or real(*a, **k))
    for _ in range(3):   # three layers of one forward
        out = cb.attend(_Module(), query, kv, SCALE, None, None, kwargs)
    torch.testing.assert_close(out[0], want, rtol=1e-10, atol=1e-10)
    assert len(built) == 1
    kwargs = dict(kwargs, cu_seq_lens_q=kwargs["cu_seq_lens_q"].clone())   # the next forward's tensors
    cb.attend(_Module(), query, kv, SCALE, None, None, kwargs)
    assert len(built) == 2


def test_a_batch_packed_in_more_than_one_row_is_refused():
    query, kv, kwargs, _ = _batch(REQUESTS, "pages")
    with pytest.raises(ValueError, match=r"expected query \[1, Hq, N, D\]"):
        cb.attend(_Module(), query.expand(2, -1, -1, -1), kv, SCALE, None, None, kwargs)


@pytest.mark.parametrize("pad", [False, True], ids=["exact", "graph-padded"])
def test_decode_fast_path_reads_transformers_page_table(pad):
    """Every request decodes: transformers hands its page table instead of indices. One row per token, the
    request's pages as they are; the new token's K/V slot is its last key's; padding tokens write to the trash."""
    requests = [(5, 1), (12, 1), (1, 1), (30, 1), (0, 1)]
    query, kv, kwargs, want = _batch(requests, "pages", pad_tokens=3 if pad else 0, pad_requests=3 if pad else 0,
                                     block_table=True)
    before = dict(cb.stats)
    out = cb.attend(_Module(), query, kv, SCALE, None, None, kwargs)
    torch.testing.assert_close(out[0, :len(requests)], want, rtol=1e-10, atol=1e-10)
    assert cb.stats["decode_fast_path"] == before["decode_fast_path"] + 1
    assert cb.stats["padded_query_slots"] == before["padded_query_slots"]
    layout = cb.decode_layout(kv, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], query.shape[2])
    table = kv.block_table
    expected_slots = [int(table[b, past // PAGE]) * PAGE + past % PAGE for b, (past, _) in enumerate(requests)]
    assert layout.write_slots[:len(requests)].tolist() == expected_slots
    assert layout.write_slots[len(requests):].tolist() == [kv.trash_slot] * (query.shape[2] - len(requests))


def _as_float32(query, kv, want):
    pools = {"k_pool": kv.k_pool.float(), "v_pool": kv.v_pool.float()}
    return query.float(), kv._replace(**pools), want.float()


@pytest.mark.parametrize("segment", [None, 1])
@pytest.mark.parametrize("layout", ["pages", "ring", "dense", "decode fast path"])
def test_the_triton_kernel_reads_the_same_rows(layout, segment, monkeypatch):
    """The rows, key lengths and block tables over HF-shaped views (strided pages, block size 1 rings) through
    the Triton kernel (interpreted on CPU), not only the reference."""
    from attnlower.lowering import launch_paged

    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    monkeypatch.setattr(cb, "QUERY_SEGMENT", segment)
    launches = []
    real = launch_paged.paged_forward
    monkeypatch.setattr(launch_paged, "paged_forward", lambda *a, **k: launches.append(1) or real(*a, **k))
    if layout == "decode fast path":
        batch = _batch([(5, 1), (12, 1), (1, 1), (30, 1)], "pages", pad_tokens=2, pad_requests=2, block_table=True)
    else:
        window = 0 if layout == "pages" else 10
        batch = _batch(REQUESTS, layout, window, pad_tokens=3, pad_requests=1, pad_keys=5)
    query, kv, want = _as_float32(*batch[:2], batch[3])
    out = cb.attend(_Module(), query, kv, SCALE, kv.window or None, None, batch[2])
    torch.testing.assert_close(out[0, :want.shape[0]], want, rtol=1e-5, atol=1e-5)
    assert launches == [1]
