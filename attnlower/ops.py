"""Public Python entry points to the attnlower attention ops.

Each wrapper calls the `torch.ops.attnlower.*` op (registered by importing this module) and
returns the attention output only. Tensors are `q [B, Hq, Tq, D]`, `k`/`v [B, Hkv, Tk, D]` with
`Hq % Hkv == 0` (grouped-query attention without repeating K/V); any strides. Exact semantics:
docs/INTERFACES.md section 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attnlower.lowering import ops as _impl  # importing it registers torch.ops.attnlower.*
from attnlower.lowering.documents import doc_ids_from_cu_seqlens, doc_ids_from_position_ids
from attnlower.lowering.ops import check_window_type

__all__ = ["flash_attention", "sliding_window_attention", "paged_attention", "doc_ids_from_position_ids",
           "doc_ids_from_cu_seqlens"]


def _direct(*tensors) -> bool:
    """Whether this call may skip the dispatcher and run the op's implementation itself.

    Only for plain eager tensors needing no gradient: nothing traces (torch.compile, FX, export),
    no dispatch mode or functorch transform is active, no tensor subclass (FakeTensor, DTensor).
    Then the dispatcher would only add its own host cost (issue 10: a repeat call must cost at
    most 1.5x SDPA's); everything else goes through `torch.ops.attnlower.*` as before.
    """
    return _plain_eager(tensors) == "direct"


def _plain_eager(tensors) -> str:
    """"direct" (plain eager tensors, no gradient wanted), "autograd" (the same, but a gradient is wanted:
    the op's autograd glue as a torch.autograd.Function over the implementations, lowering/ops.py
    EAGER_AUTOGRAD) or "" (through the dispatcher: tracing, a mode, a functorch transform, a subclass)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._are_functorch_transforms_active():
        return ""
    grad = torch.is_grad_enabled()
    wants_grad = False
    for t in tensors:
        if t is not None:
            if type(t) is not Tensor:
                return ""
            wants_grad = wants_grad or (grad and t.requires_grad)
    return "autograd" if wants_grad else "direct"


def _check_optional_tensors(op: str, **named) -> None:
    """A bool or number where an optional tensor goes (`flash_attention(q, k, v, True)`): say what goes there
    and how to pass the flag, before the schema's raw "expected Tensor?" error."""
    for name, value in named.items():
        if value is not None and not isinstance(value, Tensor):
            hint = (" (a bool here is usually meant as causal=True: pass it by keyword, "
                    f"{op}(q, k, v, causal=True))" if isinstance(value, bool) else "")
            raise ValueError(f"attnlower.ops.{op}: expected {name} a Tensor or None (bias: a bool keep-mask or float "
                             f"bias broadcastable to [B, Hq, Tq, Tk]; alibi_slopes: float32 [Hq] or [B, Hq]), got "
                             f"{type(value).__name__} {value!r}{hint}")


def _dense_op(name: str, q, k, v, bias, alibi_slopes, sinks, doc_ids, verified):
    """What runs the dense op `name` for these tensors (see _plain_eager): its implementation, its eager autograd
    Function, or `torch.ops.attnlower.<name>`; a bool or number passed for bias or alibi_slopes raises first."""
    if bias is not None and type(bias) is not Tensor or alibi_slopes is not None and type(alibi_slopes) is not Tensor:
        _check_optional_tensors(name, bias=bias, alibi_slopes=alibi_slopes)
    path = _plain_eager((q, k, v, bias, alibi_slopes, sinks, doc_ids, verified))
    if path == "direct":
        return getattr(_impl, name)
    if path == "autograd":
        return _impl.EAGER_AUTOGRAD[name].apply
    return getattr(torch.ops.attnlower, name)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, *,
                    alibi_slopes: Tensor | None = None, scale: float | None = None,
                    causal: bool = False, bottom_right: bool = False, softcap: float = 0.0,
                    dropout_p: float = 0.0, empty_rows_nan: bool = False, sinks: Tensor | None = None,
                    doc_ids: Tensor | None = None, fill: float | None = None,
                    verified: Tensor | None = None) -> Tensor:
    """Dense attention `softmax(scale * q kᵀ + bias) v`, returns `[B, Hq, Tq, Dv]` in q's dtype.

    Args:
        bias: bool keep-mask (True = attend) or float additive bias, broadcastable to
            `[B, Hq, Tq, Tk]`; a float bias that requires grad receives a gradient.
        alibi_slopes: float32 `[Hq]` or `[B, Hq]`; adds `slope * (j - i)` (0 on the diagonal).
        scale: softmax scale, `1 / sqrt(D)` when None.
        causal: query `i` sees keys `j <= i` (`j <= i + Tk - Tq` with `bottom_right`).
        bottom_right: align the causal diagonal to the last query/key (KV-cache style).
        softcap: when > 0, scores become `softcap * tanh(scores / softcap)` before bias/alibi.
        dropout_p: attention dropout probability (training); pass 0.0 in eval.
        empty_rows_nan: rows with every key masked give NaN (eager softmax) instead of 0.
        sinks: float `[Hq]` (any float dtype), one logit per query head that joins the softmax denominator
            unscaled and unmasked and adds no value (GPT-OSS, StreamingLLM): `p_ij = exp(s_ij) / (sum_j exp(s_ij)
            + exp(sinks[h]))`; a row with no visible key gives 0 (whatever `empty_rows_nan`). Receives a gradient.
        doc_ids: int32 / int64 `[B, Tk]` or `[1, Tk]` document ids (packed sequences; needs Tq <= Tk): query `i`
            (key position `i + off`, `off` as for causal) sees key `j` only when `doc_ids[b, i + off] ==
            doc_ids[b, j]`, on top of bias / causal / window. Any ids are exact; rows whose ids are non-decreasing
            (documents as runs: `doc_ids_from_position_ids`, `doc_ids_from_cu_seqlens`) skip the key blocks of
            other documents, forward and backward.
        fill: a finite value every masked score takes instead of being removed (`masked_fill(~keep, fill)`,
            as masks written with -1e9 / -10000.0 / finfo.min compute): a row with every key masked then
            averages all Tk keys, and a row whose scores sit near the fill gives the masked keys their weight.
            None (or -inf) masks. Masked: a False `bias` entry, causal, window; a float bias adds.
        verified: a one-element bool tensor on q's device, for a structure proven from a mask's value (issue 22,
            class 1): True computes with causal / window / alibi_slopes and never reads `bias`; False with `bias`
            alone over every key block (causal / window / alibi ignored). Read by the kernels (one launch, no host
            sync, CUDA-graph safe), so a mask that stops matching its structure between calls falls back exactly.
    """
    op = _dense_op("flash_attention", q, k, v, bias, alibi_slopes, sinks, doc_ids, verified)
    return op(q, k, v, bias, alibi_slopes, scale, causal, bottom_right, softcap, dropout_p, empty_rows_nan, sinks,
              doc_ids, fill, verified)[0]


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int,
                             bias: Tensor | None = None, *, alibi_slopes: Tensor | None = None,
                             scale: float | None = None, bottom_right: bool = False,
                             softcap: float = 0.0, dropout_p: float = 0.0,
                             empty_rows_nan: bool = False, sinks: Tensor | None = None,
                             doc_ids: Tensor | None = None, fill: float | None = None,
                             verified: Tensor | None = None) -> Tensor:
    """Causal attention over the `window` most recent keys: query `i` sees `i - window < j <= i`.

    With `bottom_right`, `i` is shifted by `Tk - Tq` (queries are the last Tq positions).
    `window` must be an int > 0; the other arguments are as in `flash_attention`.
    """
    check_window_type("sliding_window_attention", window)
    op = _dense_op("sliding_window_attention", q, k, v, bias, alibi_slopes, sinks, doc_ids, verified)
    return op(q, k, v, window, bias, alibi_slopes, scale, bottom_right, softcap, dropout_p, empty_rows_nan, sinks,
              doc_ids, fill, verified)[0]


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                    seq_lens: Tensor, *, alibi_slopes: Tensor | None = None,
                    scale: float | None = None, causal: bool = True, window: int = 0,
                    softcap: float = 0.0, sinks: Tensor | None = None, fill: float | None = None,
                    empty_rows_nan: bool | None = None) -> Tensor:
    """Attention of `q [B, Hq, Tq, D]` over a paged KV cache (decode or chunked prefill).

    Args:
        k_cache, v_cache: `[num_blocks, Hkv, block_size, D]` pools (e.g. `PagedKVCache.k_pool`).
        block_table: int32 `[B, max_blocks]`; token `t` of sequence `b` is in block
            `block_table[b, t // block_size]` at slot `t % block_size`.
        seq_lens: int32 `[B]`; the queries are the last Tq tokens of each sequence.
        causal: query at position `p` sees keys `t <= p`.
        window: when > 0, also only keys `t > p - window`.
        alibi_slopes, scale, softcap, sinks: as in `flash_attention` (split-KV adds the sink once, in the reduce).
        fill: refused (NotImplementedError, below); None or -inf masks.
        empty_rows_nan: None (default): a sequence shorter than its Tq queries (0 < seq_len < Tq) raises
            `PagedInputError`, and the rows of an empty sequence give 0. False / True: such a chunk is computed;
            its queries before the sequence's first token (position < 0; causal) and every row of an empty
            sequence see no key and give 0 / NaN, as `flash_attention(empty_rows_nan=...)`: SDPA's value / eager
            softmax's. A finite sink keeps a row from being empty (0 either way).
    Rows with no visible key give 0 unless `empty_rows_nan=True`. No autograd.

    A block id outside `[0, num_blocks)` or a length outside `[0, max_blocks * block_size]` raises
    `PagedInputError`: on CPU at once; on CUDA, without a host sync, at the next paged call or at
    `attnlower.check_errors()` (the kernel never reads outside its tensors either way).
    `attnlower.set_paged_checks(False)` skips the reports for loops that validate their tables.

    `fill` (a finite value for masked scores, as in `flash_attention`) is refused: a row of an empty
    sequence (seq_lens 0, a padding slot) would average the table's unused blocks, whatever they hold.
    """
    if fill is not None and fill != float("-inf"):
        raise NotImplementedError(
            f"attnlower.ops.paged_attention: fill={fill} (masked scores taking a finite value) is not supported: a "
            f"fully masked row would average every key, and a row of an empty sequence (a padding slot) the "
            f"table's unused blocks, whatever they hold; gather the cache and call flash_attention(..., fill=...)")
    check_window_type("paged_attention", window)
    op = (_impl.paged_attention_impl if _direct(q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, sinks)
          else torch.ops.attnlower.paged_attention)
    return op(q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, scale, causal, window, softcap, sinks,
              empty_rows_nan)
