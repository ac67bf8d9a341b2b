"""Public Python entry points to the attnlower attention ops.

Each wrapper calls the `torch.ops.attnlower.*` op (registered by importing this module) and
returns the attention output only. Tensors are `q [B, Hq, Tq, D]`, `k`/`v [B, Hkv, Tk, D]` with
`Hq % Hkv == 0` (grouped-query attention without repeating K/V); any strides. Exact semantics:
docs/INTERFACES.md section 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

import attnlower.lowering.ops  # noqa: F401  (registers torch.ops.attnlower.*)

__all__ = ["flash_attention", "sliding_window_attention", "paged_attention"]


def flash_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, *,
                    alibi_slopes: Tensor | None = None, scale: float | None = None,
                    causal: bool = False, bottom_right: bool = False, softcap: float = 0.0,
                    dropout_p: float = 0.0, empty_rows_nan: bool = False) -> Tensor:
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
    """
    return torch.ops.attnlower.flash_attention(
        q, k, v, bias, alibi_slopes, scale, causal, bottom_right, softcap, dropout_p,
        empty_rows_nan)[0]


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int,
                             bias: Tensor | None = None, *, alibi_slopes: Tensor | None = None,
                             scale: float | None = None, bottom_right: bool = False,
                             softcap: float = 0.0, dropout_p: float = 0.0,
                             empty_rows_nan: bool = False) -> Tensor:
    """Causal attention over the `window` most recent keys: query `i` sees `i - window < j <= i`.

    With `bottom_right`, `i` is shifted by `Tk - Tq` (queries are the last Tq positions).
    `window` must be > 0; the other arguments are as in `flash_attention`.
    """
    return torch.ops.attnlower.sliding_window_attention(
        q, k, v, window, bias, alibi_slopes, scale, bottom_right, softcap, dropout_p,
        empty_rows_nan)[0]


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                    seq_lens: Tensor, *, alibi_slopes: Tensor | None = None,
                    scale: float | None = None, causal: bool = True, window: int = 0,
                    softcap: float = 0.0) -> Tensor:
    """Attention of `q [B, Hq, Tq, D]` over a paged KV cache (decode or chunked prefill).

    Args:
        k_cache, v_cache: `[num_blocks, Hkv, block_size, D]` pools (e.g. `PagedKVCache.k_pool`).
        block_table: int32 `[B, max_blocks]`; token `t` of sequence `b` is in block
            `block_table[b, t // block_size]` at slot `t % block_size`.
        seq_lens: int32 `[B]`; the queries are the last Tq tokens of each sequence.
        causal: query at position `p` sees keys `t <= p`.
        window: when > 0, also only keys `t > p - window`.
        alibi_slopes, scale, softcap: as in `flash_attention`.
    Rows with no visible key give 0. No autograd.
    """
    return torch.ops.attnlower.paged_attention(
        q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, scale, causal, window, softcap)
