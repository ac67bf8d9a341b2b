"""Hugging Face transformers without torch.compile: `attn_implementation="attnlower"` and a paged KV cache.

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnlower")
    cache = attnlower.integrations.hf.PagedCache(model.config, num_blocks=256, block_size=16)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

`import attnlower` registers the implementation once transformers is loaded
(attnlower/integrations/__init__.py); `register()` does it explicitly. The attention function is
called by every HF model that dispatches through `ALL_ATTENTION_FUNCTIONS` (Llama, Mistral,
Gemma-2, Qwen2, ...) with the model's own query / key / value `[B, H, T, D]` and mask, and runs
attnlower's ops on them directly:

- the mask HF builds for "attnlower" is the one it builds for "sdpa" (a bool keep-mask
  `[B, 1, Tq, Tk]`, or None when HF proves the mask is plain causal or empty), except where HF's
  flash path builds none (no padding mask, Tq == Tk from position 0): packed rows
  (DataCollatorWithFlattening) are then split by their `position_ids` (or `cu_seq_lens_q`) into the
  ops' `doc_ids`, computed on the device, as the flash path does. A mask is passed to
  `flash_attention` as its bool bias: it already holds causal, padding and sliding-window
  structure, so the op is exact whatever the cache layout;
- with no mask, the call is causal exactly as HF's SDPA integration makes it (top-left, only
  when Tq > 1 and the module is causal); a `sliding_window` then runs `sliding_window_attention`;
- `scaling`, `softcap` (Gemma-2's attn_logit_softcapping), `dropout` and GQA (Hkv < Hq, no
  repeat_kv) come from the model's attention module; GPT-OSS's sinks (`s_aux`) become the ops' `sinks`;
  a value head dim of its own (DeepSeek's MLA) is passed as it is;
- keys / values from a `PagedCache` are read in place by `paged_attention`.
"""
from __future__ import annotations

import torch
# Imported only with transformers loaded: by the import hook (attnlower/integrations/__init__.py)
# right after transformers.modeling_utils, or by a user who uses transformers.
from transformers.cache_utils import Cache, DynamicLayer

from . import continuous_batching

NAME = "attnlower"


def register(name: str = NAME) -> None:
    """Register attnlower with transformers' AttentionInterface (and its mask with AttentionMaskInterface)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, attention_forward)
    # The "sdpa" mask builder (a bool keep-mask, or None where plain causal is exact), except where HF's flash
    # path builds none: then packed rows are split by their position_ids (`attention_forward`).
    AttentionMaskInterface.register(name, mask_builder(ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]))
    # generate_batch() / init_continuous_batching(): HF's paged cache read in place (continuous_batching.py)
    continuous_batching.enable()


def mask_builder(sdpa_mask):
    """The mask function registered for "attnlower": None where HF's flash-attention mask builder returns None
    (no 2-D padding mask, no extra mask function, queries and keys from position 0, Tq == Tk), so that the
    attention function reads packed documents from position_ids as the flash path does; `sdpa_mask` otherwise."""

    def attnlower_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                       attention_mask=None, use_vmap=False, **kwargs):
        # (a 2-D mask of all ones would qualify too, but telling needs a host sync: it keeps sdpa's mask)
        if attention_mask is None and not use_vmap and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
            return None
        extra = {} if mask_function is None else {"mask_function": mask_function}
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, attention_mask=attention_mask, use_vmap=use_vmap, **extra, **kwargs)

    return attnlower_mask


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, position_bias: torch.Tensor | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function: `query [B, Hq, Tq, D]`, `key`/`value [B, Hkv, Tk, D]` ->
    (`[B, Tq, Hq, D]`, None). Attention weights are never materialized, so none are returned."""
    from attnlower import ops

    sinks = kwargs.get("s_aux")
    extra = {} if sinks is None else {"sinks": sinks}
    serving = kwargs.get(continuous_batching.KV_KWARG)
    if serving is not None:   # transformers' continuous batching: its paged cache, read in place
        return continuous_batching.attend(module, query, serving, scaling, sliding_window, softcap, kwargs,
                                          sinks), None
    if kwargs.get("read_index") is not None and kwargs.get("cu_seq_lens_q") is not None:
        raise RuntimeError(f"attn_implementation='{NAME}' was called by transformers' continuous batching without "
                           "attnlower's cache update, so key/value are a dense copy of the cache; call "
                           "attnlower.integrations.continuous_batching.enable() (it warns when this transformers "
                           f"differs from the {continuous_batching.WRITTEN_AGAINST} it was written against)")
    paged = getattr(key, "_attnlower_paged", None)
    if paged is not None:
        return paged.attend(module, query, value, attention_mask, scaling, sliding_window, softcap, dropout, sinks)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA integration: causal only without a mask and for more than one query,
    # aligned top-left, on the first Tq keys when HF hands over more (a static cache's prefill).
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    bias = attention_mask
    if position_bias is not None:   # T5-style learned bias, combined with the mask
        if bias is None:
            bias = position_bias
        elif bias.dtype == torch.bool:
            bias = position_bias.masked_fill(~bias, float("-inf"))
        else:
            bias = position_bias + bias
    if attention_mask is None and causal and not kv_len > q_len:
        # as HF's flash path: without a mask, documents packed in a row are split by their position_ids
        doc_ids = _documents(kwargs, q_len)
        if doc_ids is not None:
            extra["doc_ids"] = doc_ids
    common = dict(scale=scaling, softcap=float(softcap or 0.0), dropout_p=float(dropout or 0.0), **extra)
    window = int(sliding_window or 0)
    if causal and window and key.shape[2] > window:
        out = ops.sliding_window_attention(query, key, value, window, bias, **common)
    else:
        out = ops.flash_attention(query, key, value, bias, causal=causal, **common)
    return out.transpose(1, 2).contiguous(), None


_LAST_DOCUMENTS: list = []   # [(position_ids, its _version, doc_ids)]: every layer of a forward reads the same ids


def _documents(kwargs: dict, q_len: int):
    """doc_ids [B|1, Tq] of packed rows, from `cu_seq_lens_q` (DataCollatorWithFlattening(return_flash_attn_kwargs=
    True)) or from position_ids that restart per document, computed on the device (no host sync), once per
    position_ids tensor; None when neither is given."""
    from attnlower import ops

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None and cu_seqlens.dim() == 1:
        return ops.doc_ids_from_cu_seqlens(cu_seqlens, q_len)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != q_len:
        return None
    if torch.compiler.is_compiling():
        return ops.doc_ids_from_position_ids(position_ids)
    if _LAST_DOCUMENTS:
        last, version, doc_ids = _LAST_DOCUMENTS[0]
        if last is position_ids and version == position_ids._version:
            return doc_ids
    doc_ids = ops.doc_ids_from_position_ids(position_ids)
    # the same tensor, not written since (a static buffer refilled in place is new data): every layer reuses it
    _LAST_DOCUMENTS[:] = [(position_ids, position_ids._version, doc_ids)]
    return doc_ids


# ------------------------------------------------------------------------------------------------
# the paged cache


def _row_list(indices, rows: int) -> list[int]:
    """Row indices as a list of ints in [0, rows): an index tensor or sequence (negative ones count from the end, as
    tensor indexing does) or a 1-D bool mask over the rows; IndexError otherwise (as DynamicCache's indexing)."""
    if isinstance(indices, torch.Tensor) and indices.dtype == torch.bool:
        if indices.dim() != 1 or indices.numel() != rows:
            raise IndexError(f"PagedCache: expected a bool mask of shape [{rows}] (one entry per row), got "
                             f"{list(indices.shape)}")
        indices = indices.nonzero().flatten()
    values = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if any(not -rows <= i < rows for i in values):
        raise IndexError(f"PagedCache: row indices {values} out of range for {rows} rows")
    return [i % rows for i in values]


class PagedLayer(DynamicLayer):
    """One layer's K/V in a PagedKVCache; `keys` / `values` are its pools, tagged for attention_forward."""

    def __init__(self, owner: "PagedCache", layer_idx: int, num_blocks: int, block_size: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.num_blocks, self.block_size = num_blocks, block_size
        self.pool = None
        self.seq_ids: list[int] = []

    def lazy_initialization(self, key_states, *args, **kwargs):
        from attnlower.cache import PagedKVCache

        b, heads, _, dim = key_states.shape
        self.pool = PagedKVCache(self.num_blocks, self.block_size, heads, dim, dtype=key_states.dtype,
                                 device=key_states.device)
        self.seq_ids = [self.pool.add_sequence() for _ in range(b)]
        self.device = key_states.device
        self.keys, self.values = self.pool.k_pool, self.pool.v_pool
        # attention_forward recognizes the pools by this tag and reads them with paged_attention
        self.keys._attnlower_paged = self.values._attnlower_paged = self
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != len(self.seq_ids):
            raise ValueError(f"PagedCache layer {self.layer_idx}: expected a batch of {len(self.seq_ids)} rows "
                             f"(the cache's rows), got {key_states.shape[0]}; build a new PagedCache per batch")
        if self.layer_idx == 0:
            self.owner._checked_masks.clear()   # a new forward: its masks are new tensors
        from attnlower.cache import CacheFullError

        try:
            self.pool.append(self.seq_ids, key_states, value_states)
        except CacheFullError as full:
            # inside generate() the user cannot free sequences: the advice is the size to build
            length = self.get_seq_length() + key_states.shape[2]
            need = len(self.seq_ids) * -(-length // self.block_size)
            raise CacheFullError(
                f"PagedCache(num_blocks={self.num_blocks}, block_size={self.block_size}) is full: {len(self.seq_ids)} "
                f"sequence(s) of {length} tokens need {need} blocks per layer. Build it with num_blocks >= batch * "
                f"ceil((prompt_len + max_new_tokens) / block_size), e.g. num_blocks={need} for {length} tokens per "
                f"sequence") from full
        self.block_table = self.pool.block_table(self.seq_ids)
        self.seq_lens = self.pool.seq_lens(self.seq_ids)
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.pool.seq_len(self.seq_ids[0]) if self.is_initialized and self.seq_ids else 0

    def attend(self, module, query, value, attention_mask, scaling, sliding_window, softcap, dropout, sinks=None):
        """attention_forward on this layer's pools: paged_attention with the module's options (and its sinks)."""
        from attnlower import ops

        if dropout:
            raise ValueError(f"PagedCache: paged_attention is an inference op, got dropout={dropout}; "
                             "call model.eval() before generate()")
        causal = bool(getattr(module, "is_causal", True))
        window = int(sliding_window or 0)
        if attention_mask is not None:
            self._check_mask(attention_mask, query.shape[2], causal, window)
        extra = {} if sinks is None else {"sinks": sinks}
        out = ops.paged_attention(query, self.keys, self.values, self.block_table, self.seq_lens,
                                  scale=scaling, causal=causal, window=window, softcap=float(softcap or 0.0), **extra)
        return out.transpose(1, 2).contiguous(), None

    def _check_mask(self, mask, q_len: int, causal: bool, window: int) -> None:
        """The paged op computes visibility from positions; HF's mask must agree (no padding).
        Checked once per mask tensor (all layers of one forward share it): one host sync a step."""
        key = (id(mask), causal, window)
        if key in self.owner._checked_masks:
            return
        length = self.get_seq_length()
        if mask.dtype != torch.bool or mask.shape[-1] != length:
            raise ValueError(f"PagedCache: expected HF's bool attention mask over the {length} cached keys, got "
                             f"{mask.dtype} {list(mask.shape)}; load the model with attn_implementation='attnlower'")
        pos = torch.arange(length, device=mask.device)
        query_pos = pos[length - q_len:, None]
        visible = torch.ones(q_len, length, dtype=torch.bool, device=mask.device)
        if causal:
            visible &= pos[None, :] <= query_pos
        if window:
            visible &= pos[None, :] > query_pos - window
        if not bool((mask == visible).all()):
            raise ValueError("PagedCache: the attention mask hides keys the paged op would attend to (padding?). "
                             "The cache stores every token of each row, so prompts must have equal lengths "
                             "without padding; for padded batches use transformers' DynamicCache")
        self.owner._checked_masks[key] = mask   # keeps the tensor alive, so its id is not reused

    # generate()'s row operations: beam search reorders rows, assisted decoding crops them, contrastive search
    # repeats and selects them. Each row is one pool sequence, so each is a change of which sequences the rows are.
    # PagedCache runs them for all layers with the indices read once (_row_list: one host read, not one per layer).

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row i becomes old row beam_idx[i] (beam search, once a step)."""
        self._select_rows(_row_list(beam_idx, len(self.seq_ids)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row `repeats` times, in place: rows 0, 0, 1, 1, ... for repeats=2."""
        self._select_rows([row for row in range(len(self.seq_ids)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Only the rows `indices` (an index or bool tensor over the rows), in that order."""
        self._select_rows(_row_list(indices, len(self.seq_ids)))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens of every row (all of them when there are fewer), as transformers'
        DynamicCache; a positive value keeps that many tokens (transformers' older meaning, which 5.25 refuses)."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        length = self.get_seq_length()
        keep = max(0, length + tokens_to_remove) if tokens_to_remove < 0 else min(tokens_to_remove, length)
        for seq_id in self.seq_ids:
            self.pool.truncate(seq_id, keep)

    def _select_rows(self, rows: list[int]) -> None:
        """Row i becomes old row rows[i] (valid indices, _row_list). A source's first use keeps its sequence (no
        copy), a repeat forks it; sources nobody uses are freed first, so their blocks can hold the forks. Nothing
        changes when the pool cannot hold the forks (CacheFullError)."""
        if not self.is_initialized:
            return
        old = self.seq_ids
        used = set(rows)
        need = sum(len(self.pool.blocks_of(old[r])) for r in rows) - sum(len(self.pool.blocks_of(old[r])) for r in used)
        free = self.pool.num_free_blocks + sum(len(self.pool.blocks_of(s)) for r, s in enumerate(old) if r not in used)
        if need > free:
            from attnlower.cache import CacheFullError

            raise CacheFullError(
                f"PagedCache(num_blocks={self.num_blocks}, block_size={self.block_size}) is full: {len(rows)} rows of "
                f"{self.get_seq_length()} tokens need {need} more blocks per layer, {free} are free. Build it with "
                f"num_blocks >= rows * ceil((prompt_len + max_new_tokens) / block_size), rows = batch * num_beams")
        for row, seq_id in enumerate(old):
            if row not in used:
                self.pool.free_sequence(seq_id)
        taken: set[int] = set()
        new = []
        for row in rows:
            new.append(self.pool.fork(old[row]) if row in taken else old[row])
            taken.add(row)
        self.seq_ids = new

    def reset(self) -> None:
        if self.is_initialized:
            for seq_id in self.seq_ids:
                self.pool.free_sequence(seq_id)
            self.seq_ids = [self.pool.add_sequence() for _ in self.seq_ids]


class PagedCache(Cache):
    """A transformers `Cache` whose layers keep K/V in `attnlower.PagedKVCache` block pools.

    Args:
        config: the model's config (its text config gives the layer count); the model must use
            `attn_implementation="attnlower"`, which reads the pools in place with `paged_attention`.
        num_blocks, block_size: each layer's pool; a sequence takes blocks from the free list as it
            grows (`CacheFullError` when the pool is exhausted).
    One sequence per batch row, created at the first forward. Every token of a row is stored, so a
    row must not carry padding (equal-length prompts): a mask that hides keys the paged op would
    show raises ValueError. Beam search (rows reordered: a row used twice is copied into blocks of its own),
    assisted decoding (rows cropped) and row repeats / selections keep each row's K/V as transformers'
    DynamicCache does (`crop` with a positive value keeps that many tokens, where transformers 5.25 refuses it).
    """

    def __init__(self, config, num_blocks: int, block_size: int = 16):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        impl = getattr(text, "_attn_implementation", None)
        if impl != NAME:
            raise ValueError(f"PagedCache: expected a model loaded with attn_implementation='{NAME}', got "
                             f"{impl!r}; other implementations would read the block pools as dense K/V")
        self._checked_masks: dict = {}
        super().__init__(layers=[PagedLayer(self, i, num_blocks, block_size) for i in range(text.num_hidden_layers)])

    # each layer holds the same rows: the indices are read (one host sync for a device tensor) once, not per layer

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self._select_rows_of_every_layer(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows_of_every_layer(indices)

    def _select_rows_of_every_layer(self, indices) -> None:
        initialized = [layer for layer in self.layers if layer.is_initialized]
        if initialized:   # before the first forward there are no rows yet
            rows = _row_list(indices, len(initialized[0].seq_ids))
            for layer in initialized:
                layer._select_rows(rows)
