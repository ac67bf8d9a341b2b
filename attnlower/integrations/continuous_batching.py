"""transformers' continuous batching on attnlower's paged attention, reading HF's own paged cache in place.

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnlower", dtype=torch.bfloat16)
    outputs = model.generate_batch(prompts, generation_config=GenerationConfig(max_new_tokens=64, do_sample=False))

`model.generate_batch`, `init_continuous_batching` and `continuous_batching_context_manager` schedule a batch
of requests per forward: prefill chunks (Tq > 1, some after earlier chunks) and one-token decodes, packed into one
`[1, total_tokens]` row, their K/V in transformers' `PagedAttentionCache` (one flat tensor, pages of `page_size`
tokens; full-attention layers page by page, sliding-window layers in a ring of `sliding_window` slots per
request). With attn_implementation="attnlower", each layer:

1. writes the step's new K/V into that cache (HF's own allocator write, `write_index`), and nothing else: HF's
   varlen path would now read every request's whole K/V back out of the cache (`index_select` on `read_index`)
   into a dense `[1, Hkv, total_keys, D]` copy, and this is the step attnlower removes;
2. runs `attnlower.ops.paged_attention` on views of the cache itself: `[pages, Hkv, page_size, D]` for a
   full-attention layer (block table: each request's pages, from HF's `read_index`), `[slots, Hkv, 1, D]` for a
   sliding-window layer (block table: each request's ring slots in position order, block size 1), with per-row
   key lengths, causal bottom-right alignment and the layer's window.

When every request of a forward decodes, transformers' decode fast path hands a page table per request instead of
read / write indices (no index lists built on the host each step; CUDA graphs per power of two of requests): the
new K/V are written through that table and the op reads it as it is (`decode_layout`). transformers keeps that path
for flash_attn_with_kvcache only; attnlower takes it wherever the cache's layer types allow (full attention).

The op takes one query count Tq for all rows, so the packed queries are regrouped (`row_layout`): each request's
queries are cut into segments of S, each segment one row `[Hq, S, D]` with its own key length, padded at the end
(`query_segment`: S = 1 when every request decodes, no padding; else as many queries as fill the kernel's query
tile with the GQA group, at most the longest request's count). Everything is computed on the device from the
forward's tensors (cumulative lengths, read / write indices, page table), without a host sync, so a captured CUDA
graph replays it. A varlen query layout in the op (packed `[total_q, Hq, D]` queries with `cu_seqlens_q`, one
program per request and query tile) would remove the regrouping and its padding.

One case still copies: a sliding-window layer where some request's chunk crosses its window (the layer's
`max_length_k > sliding_window`, a prompt chunk longer than what the ring holds). Writing first would overwrite
keys that the chunk's first queries still see, so that layer takes HF's read-then-write (a copy of each request's
last window; nothing when nothing is cached: then the new K/V are all the keys) and the op reads that
(`stats["window_copies"]` and `stats["new_kv"]` count these calls). An op reading the chunk's own K/V from the new
tensors (the cache for the older keys) would remove it.

Nothing in transformers' continuous batching offers an extension point for this (transformers 5.25):
`ContinuousBatchingManager.switch_to_cb_friendly_attn` accepts only "paged|eager", "sdpa" and names containing
"flash" (a "flash" name makes transformers load a kernel from the Hub), `PagedAttentionCache.update` reads the
dense copy before any attention function runs, and `initialization.ensure_decode_fast_path_is_available` keeps the
decode fast path for flash only. `enable()` changes exactly those three, for models whose implementation is
"attnlower" only (every other implementation runs transformers' code unchanged). It is written against
transformers 5.25 and checks the signatures it relies on before patching.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, NamedTuple

import torch

NAME = "attnlower"
WRITTEN_AGAINST = "5.25"
# The kwarg through which the patched cache update hands the layer's cache views to attention_forward.
KV_KWARG = "attnlower_paged_kv"

# What ran, for tests and benchmarks, in calls of paged_attention: on HF's cache in place ("in_place"), on a copy
# of a sliding window read out of it ("window_copies"), on the new K/V themselves when nothing was cached
# ("new_kv"); of the in-place calls, those of transformers' decode fast path ("decode_fast_path": its page table,
# no read indices); and the query slots the regrouping added (padding) next to the query tokens. Counted in Python:
# a CUDA graph's replays are not counted, its capture is.
stats = {"in_place": 0, "window_copies": 0, "new_kv": 0, "decode_fast_path": 0, "query_tokens": 0,
         "padded_query_slots": 0}

# Query tokens per row: None follows query_segment's rule; an int forces it (to measure one layout against another).
QUERY_SEGMENT: int | None = None

_enabled = False


class LayerKV(NamedTuple):
    """What attention reads for one layer: a pool `[blocks, Hkv, block_size, D]` pair and where each request's
    keys are in it (row_layout's docstring). `source`: "in_place" (views of HF's cache tensor), or a dense
    `[keys, Hkv, 1, D]` K/V of the sliding-window fallback ("window_copies": HF's copy of each request's
    window; "new_kv": the step's new K/V, when nothing was cached), whose key t of request b is at
    `cu_seq_lens_k[b] + t`."""

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    block_size: int
    read_index: torch.Tensor | None    # physical slots of each request's cached keys, requests back to back
    write_index: torch.Tensor | None   # physical slots where this step's keys were written
    window: int
    layer_type: str
    source: str
    cache: Any                         # the PagedAttentionCache: holds the layouts of the current forward
    block_table: torch.Tensor | None = None   # decode fast path: transformers' [B, max_blocks] page table
    trash_slot: int = 0                # where the decode fast path writes a padding token's K/V


def enable() -> bool:
    """Let transformers' continuous batching run models loaded with attn_implementation="attnlower".

    Called by `attnlower.integrations.hf.register()`. Patches three functions of transformers' continuous batching
    (see the module docstring: there is no public extension point for any of them); for any other implementation
    they call transformers' own code. Returns False (and warns) when this transformers does not have the
    methods and signatures the patch was written against (5.25); `generate_batch` then refuses "attnlower"
    with transformers' own error. Idempotent.
    """
    global _enabled
    if _enabled:
        return True
    try:
        from transformers.generation.continuous_batching import cache as cb_cache
        from transformers.generation.continuous_batching import cache_allocators, continuous_api, initialization
    except ImportError:   # a transformers without continuous batching (or without its 5.25 layout): nothing to do
        return False
    manager, paged_cache = continuous_api.ContinuousBatchingManager, cb_cache.PagedAttentionCache
    full = getattr(cache_allocators, "FullAttentionCacheAllocator", None)
    # what the patch and _update call, with the parameters transformers 5.25 gives them (None: exists)
    expected = {(manager, "switch_to_cb_friendly_attn"): ["self", "model", "auto_switch_to_flash"],
                (paged_cache, "update"): ["self", "key_states", "value_states", "layer_idx", "kwargs"],
                (initialization, "ensure_decode_fast_path_is_available"): ["config", "cb_config", "user_requested"],
                (full, "update"): ["self", "key_states", "value_states", "layer_idx", "read_index", "write_index"],
                (full, "get_cache_for_block_table"): ["self", "layer_idx"],
                (cb_cache, "group_layers_by_attn_type"): ["config"], (cb_cache, "ATTN_TYPE_TO_ALLOCATOR"): None}
    for (owner, name), params in expected.items():
        found = getattr(owner, name, None)
        got = None if found is None else list(inspect.signature(found).parameters) if callable(found) else None
        if found is None or (params is not None and got != params):
            import transformers

            where = getattr(owner, "__name__", type(owner).__name__)
            warnings.warn(f"attnlower: continuous batching not enabled: expected {where}.{name}"
                          f"{'' if params is None else '(' + ', '.join(params) + ')'} as in transformers "
                          f"{WRITTEN_AGAINST}, got {'nothing' if found is None else got} in transformers "
                          f"{transformers.__version__}; generate_batch() will refuse attn_implementation='{NAME}'",
                          stacklevel=2)
            return False

    original_switch, original_update = manager.switch_to_cb_friendly_attn, paged_cache.update
    original_ensure = initialization.ensure_decode_fast_path_is_available

    @functools.wraps(original_switch)
    def switch_to_cb_friendly_attn(self, model, auto_switch_to_flash: bool = True):
        # attnlower reads the paged cache itself: keep it, and never switch it to flash behind the user's back
        if _implementation(model.config) == NAME:
            return None
        return original_switch(self, model, auto_switch_to_flash)

    @functools.wraps(original_update)
    def update(self, key_states, value_states, layer_idx, kwargs):
        if _implementation(self.config) != NAME:
            return original_update(self, key_states, value_states, layer_idx, kwargs)
        return _update(self, original_update, key_states, value_states, layer_idx, kwargs)

    @functools.wraps(original_ensure)
    def ensure_decode_fast_path_is_available(config, cb_config, user_requested):
        if _implementation(config) != NAME:
            return original_ensure(config, cb_config, user_requested)
        # transformers keeps its decode fast path (a page table per request, no read indices built on the host)
        # for flash_attn_with_kvcache only; attnlower reads the same table. Only the layer types can rule it out.
        if not all(cb_cache.ATTN_TYPE_TO_ALLOCATOR[kind].supports_block_table
                   for kind in cb_cache.group_layers_by_attn_type(config)):
            cb_config.max_blocks_per_request = 0
        return None

    manager.switch_to_cb_friendly_attn = switch_to_cb_friendly_attn
    paged_cache.update = update
    initialization.ensure_decode_fast_path_is_available = ensure_decode_fast_path_is_available
    _enabled = True
    return True


def _implementation(config) -> str | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None)


@torch.compiler.disable   # as transformers' own update: it works on views of the cache tensor
def _update(cache, original_update, key_states, value_states, layer_idx: int, kwargs: dict[str, Any]):
    """PagedAttentionCache.update for attnlower: write the new K/V, read nothing back; hand attention the views."""
    from transformers.generation.continuous_batching.cache_allocators import FullAttentionCacheAllocator

    allocator = cache.layer_to_allocator[layer_idx]
    if not isinstance(allocator, FullAttentionCacheAllocator) or not hasattr(allocator, "_kv_token_views"):
        raise NotImplementedError(
            f"attn_implementation='{NAME}' in continuous batching reads full-attention and sliding-window caches; "
            f"layer {layer_idx} has a {type(allocator).__name__} (e.g. MLA's compressed latents). Load this model "
            "with attn_implementation='sdpa' for generate_batch()")
    layer_type = allocator.layer_type
    window = int(getattr(allocator, "sliding_window", 0) or 0)
    k_tokens, v_tokens = allocator._kv_token_views[layer_idx]   # [slots, Hkv, D] views of the cache tensor
    if kwargs.get("block_table") is not None:
        # transformers' decode fast path (every request decodes one token): a page table per request and no
        # read / write indices; the new K/V are written here, through that table (flash_attn_with_kvcache's job)
        kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_k"][layer_type].to(torch.int32)
        kwargs["max_length_k"] = kwargs["max_length_k"][layer_type]
        block = allocator.tokens_per_page
        k_pool, v_pool = allocator.get_cache_for_block_table(layer_idx)   # [pages, page_size, Hkv, D]
        kv = LayerKV(k_pool.transpose(1, 2), v_pool.transpose(1, 2), block, None, None, 0, layer_type, "in_place",
                     cache, kwargs["block_table"][allocator.index], allocator.write_trash_index)
        layout = _cached_layout(kv, kwargs, key_states.shape[2], 1)
        for tokens, new in ((k_tokens, key_states), (v_tokens, value_states)):
            tokens.index_copy_(0, layout.write_slots, new[0].transpose(0, 1))
        kwargs[KV_KWARG] = kv
        return key_states, value_states
    read_index = kwargs["read_index"][allocator.index]
    write_index = kwargs["write_index"][allocator.index]
    if window and kwargs["max_length_k"][layer_type] > window:
        # A chunk crosses its window: writing first would overwrite keys its first queries see. transformers'
        # read-then-write, then the op on that copy of each request's last window (module docstring).
        keys, values = original_update(cache, key_states, value_states, layer_idx, kwargs)
        k_pool, v_pool = (x[0].transpose(0, 1).unsqueeze(2) for x in (keys, values))   # [total_k, Hkv, 1, D]
        source = "window_copies" if read_index.numel() else "new_kv"   # HF reads nothing when nothing is cached
        kwargs[KV_KWARG] = LayerKV(k_pool, v_pool, 1, None, None, window, layer_type, source, cache)
        return key_states, value_states
    kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_k"][layer_type].to(torch.int32)   # as transformers' update does
    kwargs["max_length_k"] = kwargs["max_length_k"][layer_type]
    # transformers' allocator writes the new K/V (an empty read index: its write-only path, nothing read back)
    new_k, new_v = (x.squeeze(0).transpose(0, 1) for x in (key_states, value_states))
    allocator.update(new_k, new_v, layer_idx, read_index[:0], write_index)
    # a ring's keys are not page-aligned (slot = position % window): the table then names every slot
    block = 1 if window else allocator.tokens_per_page
    blocks = min(k_tokens.shape[0], v_tokens.shape[0]) // block   # V's view starts a page later: as many as both hold
    k_pool, v_pool = (x[:blocks * block].unflatten(0, (blocks, block)).transpose(1, 2) for x in (k_tokens, v_tokens))
    kwargs[KV_KWARG] = LayerKV(k_pool, v_pool, block, read_index, write_index, window, layer_type, "in_place", cache)
    return key_states, value_states


class RowLayout(NamedTuple):
    """The packed queries regrouped into rows of `segment` query slots (one row per segment of a request)."""

    segment: int
    row_of_token: torch.Tensor   # [N] int64; tokens outside every request (CUDA-graph padding) go to empty rows
    slot_of_token: torch.Tensor  # [N] int64
    seq_lens: torch.Tensor       # [rows] int32: keys the row's last slot sees (0 for an unused row)
    block_table: torch.Tensor    # [rows, max_blocks] int32
    write_slots: torch.Tensor | None = None   # decode fast path: [N] where each token's new K/V go


def query_segment(group: int, head_dim: int, dtype: torch.dtype, max_length_q: int) -> int:
    """Query tokens per row: 1 when every request decodes (`max_length_q` 1: no padding at all), else as many as
    fill the paged kernel's query tile with the GQA group's heads (its BLOCK_M // group), at most max_length_q.
    Under CUDA graphs transformers sets max_length_q to the padded token count, so a decode batch gets segments."""
    if max_length_q <= 1:
        return 1
    from attnlower.lowering.configs import paged_config

    tile = paged_config(0, head_dim, dtype, 1, group, max_length_q).block_m
    return max(1, min(max_length_q, tile // group))


def row_layout(kv: LayerKV, cu_q: torch.Tensor, cu_k: torch.Tensor, num_tokens: int, max_length_k: int,
               segment: int) -> RowLayout:
    """Rows, their key lengths and block tables for the packed queries of one forward, on the device.

    Request b has tq = cu_q[b+1] - cu_q[b] new tokens and lk = cu_k[b+1] - cu_k[b] keys, the last tq of which
    are the new ones (cached = lk - tq before them). Its query i goes to row seg_start[b] + i // S, slot i % S;
    the row's length is cached + (i // S + 1) * S, so slot s sits at key position cached + (i // S) * S + s
    (the op's bottom-right alignment) and sees exactly its causal keys; the slots past the request's last query
    are padding whose keys (past lk) come from block 0, never seen by a real query (causal). Key t of request b:
    the cached ones at read_index[cu_k[b] + t], the new ones at write_index[cu_q[b] + t - cached] (a dense K/V:
    cu_k[b] + t); the block table holds those slots // block_size, one entry per block.
    """
    device = cu_q.device
    batch = cu_q.numel() - 1
    cu_q, cu_k = cu_q.to(torch.int64), cu_k.to(torch.int64)
    tq, lk = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    cached = lk - tq
    tokens = torch.arange(num_tokens, device=device)
    req = torch.searchsorted(cu_q[1:].contiguous(), tokens, right=True)
    real = req < batch      # False for the tokens past the last request (CUDA-graph padding)
    req = req.clamp(max=max(batch - 1, 0))
    local = tokens - cu_q[req]
    if segment == 1:        # a row per token (token j is row j), padding tokens on empty rows of their own
        rows, row = num_tokens, tokens
    else:   # a bound on the rows from the shapes alone (a captured graph replays it for any mix of requests),
        # and one more row, empty, for the padding tokens
        rows = min(num_tokens, -(-num_tokens // segment) + batch) + 1
        segments = (tq + segment - 1) // segment
        seg_start = torch.cumsum(segments, 0) - segments
        row = torch.where(real, seg_start[req] + local // segment, rows - 1)
    slot = torch.where(real, local % segment, 0)
    seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)
    seq_lens[row] = torch.where(real, cached[req] + (local // segment + 1) * segment, 0).to(torch.int32)
    row_req = torch.full((rows,), batch, dtype=torch.int64, device=device)
    row_req[row] = torch.where(real, req, batch)
    # each request's block table: entry j names the block holding its key j * block_size
    width = -(-(max_length_k + segment - 1) // kv.block_size)
    keys = (torch.arange(width, device=device) * kv.block_size)[None, :]
    in_seq = keys < lk[:, None]
    if kv.source != "in_place":
        slots = cu_k[:-1, None] + keys
    else:
        new = (cu_q[:-1, None] + keys - cached[:, None]).clamp(0, max(kv.write_index.numel() - 1, 0))
        slots = kv.write_index[new]
        if kv.read_index.numel():
            old = (cu_k[:-1, None] + keys).clamp(max=kv.read_index.numel() - 1)
            slots = torch.where(keys < cached[:, None], kv.read_index[old], slots)
    table = torch.where(in_seq, slots // kv.block_size, 0).to(torch.int32)
    table = torch.cat([table, table.new_zeros(1, width)])   # row `batch`: unused rows, every entry block 0
    return RowLayout(segment, row, slot, seq_lens, table[row_req])


def decode_layout(kv: LayerKV, cu_q: torch.Tensor, cu_k: torch.Tensor, num_tokens: int) -> RowLayout:
    """transformers' decode fast path: one new token per request, its page table given. Token j of request b is
    row j with b's lk keys (the last one its own, written at slot `write_slots[j]`); padding tokens past the last
    request get empty rows and write to transformers' write trash."""
    device = cu_q.device
    batch = cu_q.numel() - 1
    cu_q, cu_k = cu_q.to(torch.int64), cu_k.to(torch.int64)
    tokens = torch.arange(num_tokens, device=device)
    req = torch.searchsorted(cu_q[1:].contiguous(), tokens, right=True)
    real = req < batch
    req = req.clamp(max=max(batch - 1, 0))
    lk = (cu_k[1:] - cu_k[:-1])[req]
    seq_lens = torch.where(real, lk, 0).to(torch.int32)
    table = kv.block_table[req]
    last = (lk - 1).clamp(min=0)
    page = table.gather(1, (last // kv.block_size)[:, None]).squeeze(1).to(torch.int64)
    write_slots = torch.where(real & (lk > 0), page * kv.block_size + last % kv.block_size, kv.trash_slot)
    return RowLayout(1, tokens, torch.zeros_like(tokens), seq_lens, table, write_slots)


@torch.compiler.disable   # the layout is cached per forward in Python; the op itself is opaque anyway
def attend(module, query: torch.Tensor, kv: LayerKV, scaling: float | None, sliding_window: int | None,
           softcap: float | None, kwargs: dict[str, Any], sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the packed queries `[1, Hq, N, D]` over HF's paged cache through `paged_attention`;
    returns `[1, N, Hq, D]` as transformers' attention functions do. `sinks`: GPT-OSS's `s_aux`, one logit per
    query head (the op adds it once per row; the padding rows it keeps from being empty are never read back)."""
    from attnlower import ops

    if query.shape[0] != 1:
        raise ValueError(f"continuous batching packs a batch into one row: expected query [1, Hq, N, D], "
                         f"got {list(query.shape)}")
    _, heads, num_tokens, head_dim = query.shape
    window = kv.window or int(sliding_window or 0)   # a full cache with a module window: the op applies it
    group = heads // kv.k_pool.shape[1]
    segment = 1 if kv.block_table is not None else (
        QUERY_SEGMENT or query_segment(group, head_dim, query.dtype, int(kwargs["max_length_q"])))
    layout = _cached_layout(kv, kwargs, num_tokens, segment)
    rows = layout.seq_lens.numel()
    q_rows = query.new_zeros(rows, layout.segment, heads, head_dim)
    q_rows[layout.row_of_token, layout.slot_of_token] = query[0].transpose(0, 1)
    out = ops.paged_attention(q_rows.transpose(1, 2), kv.k_pool, kv.v_pool, layout.block_table, layout.seq_lens,
                              scale=scaling, causal=True, window=window, softcap=float(softcap or 0.0), sinks=sinks)
    stats[kv.source] += 1
    stats["decode_fast_path"] += kv.block_table is not None
    stats["query_tokens"] += num_tokens
    stats["padded_query_slots"] += rows * layout.segment - num_tokens
    return out.transpose(1, 2)[layout.row_of_token, layout.slot_of_token].unsqueeze(0)


def _cached_layout(kv: LayerKV, kwargs: dict[str, Any], num_tokens: int, segment: int) -> RowLayout:
    """One layout per forward and layer type, shared by the layers: keyed on the forward's cu_seq_lens_q tensor
    object (a new view per forward; the entry keeps it alive so its id is not reused) and on whether a CUDA
    graph is being captured (a capture must record the layout's kernels, not reuse the warm-up's tensors)."""
    cu_q = kwargs["cu_seq_lens_q"]
    capturing = cu_q.is_cuda and torch.cuda.is_current_stream_capturing()
    entry = getattr(kv.cache, "_attnlower_layouts", None)
    if entry is None or entry[0] is not cu_q or entry[1] != capturing:
        entry = (cu_q, capturing, {})
        kv.cache._attnlower_layouts = entry
    key = (kv.layer_type, kv.source, kv.block_table is not None, segment)
    layout = entry[2].get(key)
    if layout is None:
        if kv.block_table is not None:
            layout = decode_layout(kv, cu_q, kwargs["cu_seq_lens_k"], num_tokens)
        else:
            layout = row_layout(kv, cu_q, kwargs["cu_seq_lens_k"], num_tokens, int(kwargs["max_length_k"]), segment)
        entry[2][key] = layout
    return layout
