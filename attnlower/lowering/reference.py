"""Plain-PyTorch reference of every attnlower op: the CPU implementation and the kernels' oracle.

Semantics are exactly those of docs/INTERFACES.md section 1. Everything is computed in fp32
(fp64 for fp64 inputs) and chunked over queries, so a long sequence never holds the whole
`[B, Hq, Tq, Tk]` score tensor: one chunk's scores stay under `SCORE_CHUNK_BYTES`.
GQA is handled by folding the query heads of one KV head into the row dimension
(`[B, Hq, c, D] -> [B, Hkv, G * c, D]`), so K and V are never repeated.

These functions take already-validated inputs (validation lives in `lowering/ops.py`) and an
`AttentionParams` (resolved scale and flags), with the launchers' signatures (`lowering/launch*.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlower.lowering import errors
from attnlower.lowering.params import AttentionParams, default_scale  # noqa: F401  (default_scale: re-export)

# One query chunk's fp32 score tensor is kept under this many bytes. The chunk also holds a few
# temporaries of that size (probabilities, mask, dropout keep), so peak extra memory is ~4x this:
# ~1 GB, which fits a CPU test box and leaves a GPU (when the reference runs there as an oracle)
# room for the inputs. Tests shrink it to force many chunks.
SCORE_CHUNK_BYTES = 256 * 2**20

_MASK32 = 0xFFFFFFFF
# Multiplier of the well-known 32-bit integer mixer `x = ((x >> 16) ^ x) * 0x45d9f3b` (good
# avalanche, and small enough that a 32-bit value times it stays far below int64 overflow).
_HASH_MULTIPLIER = 0x45D9F3B


@dataclass(frozen=True)
class _Geometry:
    """Where queries sit relative to keys, and which keys exist.

    query_offset: position of query 0 in key coordinates: an int for dense attention
        (`Tk - Tq` bottom-right, 0 top-left), or an int64 `[B, 1, 1, 1]` tensor for paged
        attention, where each sequence has its own length.
    key_lens: None (all `Tk` keys exist) or int64 `[B, 1, 1, 1]`: keys at or past it are padding.
    docs: None or int64 `[B, Tk]` document ids (dense only): query i (key position i + query_offset) sees key j only
        when their ids are equal.
    """

    query_offset: int | Tensor
    causal: bool
    window: int
    key_lens: Tensor | None = None
    docs: Tensor | None = None


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _query_chunks(batch: int, heads: int, tq: int, tk: int, dtype: torch.dtype):
    """Slices of query rows whose score tensor `[batch, heads, rows, tk]` fits SCORE_CHUNK_BYTES."""
    row_bytes = max(1, batch * heads * tk * torch.finfo(dtype).bits // 8)
    rows = max(1, SCORE_CHUNK_BYTES // row_bytes)
    for start in range(0, tq, rows):
        yield slice(start, min(start + rows, tq))


def _fold_heads(x: Tensor, kv_heads: int) -> Tensor:
    """[B, Hq, c, X] -> [B, Hkv, G * c, X]: the G query heads sharing a KV head become rows."""
    b, hq, c, last = x.shape
    return x.reshape(b, kv_heads, (hq // kv_heads) * c, last)


def _unfold_heads(x: Tensor, q_heads: int) -> Tensor:
    """[B, Hkv, G * c, X] -> [B, Hq, c, X] (inverse of `_fold_heads`)."""
    b, hkv, gc, last = x.shape
    return x.reshape(b, q_heads, gc // (q_heads // hkv), last)


def _bias_as_4d(bias: Tensor | None) -> Tensor | None:
    if bias is None:
        return None
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _bias_rows(bias4: Tensor, rows: slice) -> Tensor:
    return bias4 if bias4.shape[2] == 1 else bias4[:, :, rows]


def _mix32(x):
    """32-bit integer hash of an int64 tensor (or Python int) holding values below 2**32."""
    x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _MASK32
    x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _MASK32
    return (x >> 16) ^ x


def _dropout_keep(rng_state: Tensor, dropout_p: float, shape: tuple[int, int, int, int],
                  rows: slice, device: torch.device) -> Tensor:
    """Keep-mask of rows `rows` of the `[B, Hq, Tq, Tk]` dropout pattern named by rng_state.

    A counter-based hash of (seed, offset + flat element index): the same element always gets
    the same draw, whatever the chunking, so forward and backward agree. This is the reference's
    own stream; the Triton kernels use Philox and draw a different (equally valid) pattern.
    """
    seed, offset = (int(x) for x in rng_state.tolist())
    seed_key = _mix32((seed & _MASK32) ^ _mix32((seed >> 32) & _MASK32))
    b, h, tq, tk = shape
    ar = lambda n, start=0: torch.arange(start, start + n, device=device, dtype=torch.int64)  # noqa: E731
    counter = (((ar(b).view(b, 1, 1, 1) * h + ar(h).view(1, h, 1, 1)) * tq
                + ar(rows.stop - rows.start, rows.start).view(1, 1, -1, 1)) * tk
               + ar(tk).view(1, 1, 1, tk) + offset)
    bits = _mix32((counter & _MASK32) ^ _mix32(((counter >> 32) & _MASK32) ^ seed_key))
    uniform = (bits >> 8).to(torch.float64) * 2.0**-24  # 24 random bits -> [0, 1)
    return uniform >= dropout_p


def dropout_keep_mask(rng_state: Tensor, dropout_p: float, shape: tuple[int, int, int, int],
                      device: torch.device | str | None = None) -> Tensor:
    """The whole bool keep-mask `[B, Hq, Tq, Tk]` the reference applies for `rng_state`, on `device`
    (default: rng_state's device, where the reference computes it).

    For tests and debugging: lets an oracle apply the very dropout pattern the reference used.
    """
    device = rng_state.device if device is None else torch.device(device)
    return _dropout_keep(rng_state, dropout_p, tuple(shape), slice(0, shape[2]), device)


def _chunk_scores(q_folded: Tensor, k: Tensor, rows: slice, *, q_heads: int, scale: float,
                  softcap: float, alibi_slopes: Tensor | None, bias4: Tensor | None,
                  geometry: _Geometry, fill: float = float("-inf")
                  ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Masked scores `[B, Hq, c, Tk]` of query rows `rows` (steps 1-5 of the contract).

    Returns the scores, `tanh(scale * q.k / softcap)` when softcap > 0 (for the backward), and in fill mode
    (`fill` finite) the bool mask of the positions whose score was replaced by `fill` (their gradient is 0).
    Masked positions are a False keep-mask entry, causal, window, other documents and paging; a float bias adds
    (its -inf entries stay -inf: they are not masks).
    """
    cd = k.dtype
    s = _unfold_heads(torch.matmul(q_folded, k.transpose(-1, -2)), q_heads) * scale
    tanh_term = None
    if softcap > 0:
        tanh_term = torch.tanh(s / softcap)
        s = softcap * tanh_term

    tk = k.shape[2]
    key_pos = torch.arange(tk, device=k.device).view(1, 1, 1, tk)
    query_pos = torch.arange(rows.start, rows.stop, device=k.device).view(1, 1, -1, 1) + geometry.query_offset
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(cd).reshape(-1 if alibi_slopes.dim() == 2 else 1, q_heads, 1, 1)
        s = s + slopes * (key_pos - query_pos).to(cd)
    hidden = None
    if bias4 is not None:
        bias_rows = _bias_rows(bias4, rows)
        if bias_rows.dtype == torch.bool:
            hidden = ~bias_rows
        else:
            s = s + bias_rows.to(cd)

    def hide(more: Tensor) -> None:
        nonlocal hidden
        hidden = more if hidden is None else hidden | more

    if geometry.causal:
        hide(key_pos > query_pos)
    if geometry.window > 0:
        hide(key_pos <= query_pos - geometry.window)
    if geometry.key_lens is not None:
        hide(key_pos >= geometry.key_lens)
    if geometry.docs is not None:
        off = geometry.query_offset
        q_docs = geometry.docs[:, rows.start + off:rows.stop + off]
        hide(q_docs[:, None, :, None] != geometry.docs[:, None, None, :])
    filled = None
    if hidden is not None:
        if fill == float("-inf"):
            s = s.masked_fill(hidden, float("-inf"))
        else:
            filled = hidden.expand(s.shape)
            s = s.masked_fill(filled, fill)
    return s, tanh_term, filled


def out_like(q: Tensor, dv, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized [B, Hq, Tq, Dv] tensor with q's stride order: what the dense ops return (their real
    and fake implementations and this reference all allocate through this function, so strides agree). A
    [B, T, H, D] view in gives BSHD memory out. Dense q with Dv = D gives exactly q's strides (empty_like);
    otherwise dense strides in q's order."""
    if dv == q.shape[-1]:
        return torch.empty_like(q, dtype=dtype, memory_format=torch.preserve_format)
    from torch._prims_common import compute_elementwise_output_logical_to_physical_perm

    order = compute_elementwise_output_logical_to_physical_perm(q)
    if isinstance(order, tuple) and order and isinstance(order[0], list):   # torch >= 2.12: (perm, ambiguous)
        order = order[0]
    return torch.empty_permuted((*q.shape[:-1], dv), tuple(order), dtype=dtype or q.dtype, device=q.device)


def _softmax(s: Tensor, sink: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(p, lse, empty) of scores s `[B, Hq, c, Tk]`, with an optional sink logit `[1, Hq, 1, 1]` in the normalizer
    (it adds no column). Empty rows (every score and the sink -inf) give p = 0, lse = -inf (subtracting 0
    instead of -inf there, so exp gives 0, not NaN); a sink makes no row empty."""
    row_max = s.amax(dim=-1, keepdim=True)
    if sink is not None:
        row_max = torch.maximum(row_max, sink)
    empty = row_max == float("-inf")
    shift = torch.where(empty, 0.0, row_max)
    exp_s = torch.exp(s - shift)
    row_sum = exp_s.sum(dim=-1, keepdim=True)
    if sink is not None:
        row_sum = row_sum + torch.exp(sink - shift)
    p = torch.where(empty, 0.0, exp_s / row_sum)
    return p, shift + torch.log(row_sum), empty


def _sink_logits(sinks: Tensor | None, cd: torch.dtype) -> Tensor | None:
    return None if sinks is None else sinks.to(cd).view(1, -1, 1, 1)


def _attention_forward(q, k, v, bias, alibi_slopes, scale, softcap, dropout_p, rng_state,
                       empty_rows_nan, geometry: _Geometry, fill: float = float("-inf"),
                       sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    batch, q_heads, tq, _ = q.shape
    kv_heads, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    cd = _compute_dtype(q)
    out = out_like(q, dv)
    lse = torch.empty((batch, q_heads, tq), dtype=torch.float32, device=q.device)
    if tk == 0:  # no keys at all: every row is empty (with sinks: out 0, lse = the sink)
        if sinks is not None:
            out.fill_(0.0)
            lse.copy_(sinks.float().view(1, -1, 1).expand(batch, q_heads, tq))
            return out, lse
        out.fill_(float("nan") if empty_rows_nan else 0.0)
        lse.fill_(float("-inf"))
        return out, lse

    k_c, v_c, bias4 = k.to(cd), v.to(cd), _bias_as_4d(bias)
    sink = _sink_logits(sinks, cd)
    for rows in _query_chunks(batch, q_heads, tq, tk, cd):
        q_folded = _fold_heads(q[:, :, rows].to(cd), kv_heads)
        s, _, _ = _chunk_scores(q_folded, k_c, rows, q_heads=q_heads, scale=scale, softcap=softcap,
                                alibi_slopes=alibi_slopes, bias4=bias4, geometry=geometry, fill=fill)
        p, lse_rows, empty = _softmax(s, sink)
        lse[:, :, rows] = lse_rows.squeeze(-1).float()
        if dropout_p > 0:
            keep = _dropout_keep(rng_state, dropout_p, (batch, q_heads, tq, tk), rows, q.device)
            p = p * keep / (1.0 - dropout_p)
        out_rows = _unfold_heads(torch.matmul(_fold_heads(p, kv_heads), v_c), q_heads)
        if empty_rows_nan:
            out_rows = out_rows.masked_fill(empty, float("nan"))
        out[:, :, rows] = out_rows.to(q.dtype)
    return out, lse


def reference_flash_forward(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, *,
                            bias: Tensor | None = None, alibi_slopes: Tensor | None = None,
                            rng_state: Tensor | None = None, sinks: Tensor | None = None,
                            doc_ids: Tensor | None = None, verified: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dense (flash / sliding-window) attention forward; returns `(out, lse)`.

    out: `[B, Hq, Tq, Dv]` in q's dtype and layout (`out_like`). lse: fp32 `[B, Hq, Tq]`, `-inf` for empty
    rows. `params.window > 0` restricts each query to the `window` most recent keys (sliding op).
    verified (one-element bool): both calls computed, `where(verified, structured, dense)`: the structure (causal /
    window / alibi, no bias) where it holds, the bias alone (no causal / window / alibi) where it does not.
    """
    if verified is not None:
        structured, dense = _verified_pair(params)
        kw = dict(rng_state=rng_state, sinks=sinks, doc_ids=doc_ids)
        s_out, s_lse = reference_flash_forward(q, k, v, structured, alibi_slopes=alibi_slopes, **kw)
        d_out, d_lse = reference_flash_forward(q, k, v, dense, bias=bias, **kw)
        ok = verified.reshape(()).to(q.device)
        return torch.where(ok, s_out, d_out, out=out_like(q, v.shape[3])), torch.where(ok, s_lse, d_lse)
    geometry = _dense_geometry(q, k, params, doc_ids)
    return _attention_forward(q, k, v, bias, alibi_slopes, params.scale, params.softcap, params.dropout_p,
                              rng_state, params.empty_rows_nan, geometry, params.mask_fill, sinks)


def _verified_pair(params: AttentionParams) -> tuple[AttentionParams, AttentionParams]:
    """(the structured call's params, the fallback's): the fallback drops causal / window (alibi: its caller)."""
    return params, params._replace(causal=False, window=0)


def _dense_geometry(q: Tensor, k: Tensor, params: AttentionParams, doc_ids: Tensor | None) -> _Geometry:
    batch, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    docs = None if doc_ids is None else doc_ids.to(device=q.device, dtype=torch.int64).expand(batch, tk)
    return _Geometry(query_offset=tk - tq if params.bottom_right else 0, causal=params.causal, window=params.window,
                     docs=docs)


def _reduce_to_bias_shape(ds: Tensor, bias4: Tensor) -> Tensor:
    """Sum a `[B, Hq, c, Tk]` gradient over the dims (other than rows) where the bias broadcasts."""
    dims = [d for d in (0, 1, 3) if bias4.shape[d] == 1 and ds.shape[d] != 1]
    return ds.sum(dim=dims, keepdim=True) if dims else ds


def reference_flash_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             params: AttentionParams, *, bias: Tensor | None = None,
                             alibi_slopes: Tensor | None = None, rng_state: Tensor | None = None,
                             bias_requires_grad: bool = False, sinks: Tensor | None = None,
                             sinks_requires_grad: bool = False, doc_ids: Tensor | None = None,
                             verified: Tensor | None = None
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients `(dq, dk, dv, dbias, dsinks)` of the dense forward, recomputing P from `lse` per chunk.

    With Z = P * keep / (1 - dropout_p) (Z = P without dropout), O = Z V:
    dV = Zᵀ dO;  dZ = dO Vᵀ;  dP = dZ * keep / (1 - dropout_p);  dS = P * (dP - rowsum(dO * O));
    dbias = dS (reduced to the bias's shape); through softcap, dX = dS * (1 - tanh²(X / softcap));
    dQ = scale * dX K;  dK = scale * dXᵀ Q (summed over the GQA group). Empty rows get 0. In fill mode
    dS = 0 at the filled positions (their score is the constant fill), which still feed dV through P.
    With sinks, lse includes them (so does P's normalizer) and dsinks[h] = -sum_{b,i} exp(sink_h - lse) * delta,
    delta = rowsum(dO * O). `dbias` is None unless `bias_requires_grad` (and the bias is float), `dsinks` unless
    `sinks_requires_grad` (and sinks are given). With `verified`, both calls' gradients, selected as the forward's
    outputs (the structured call's dbias is 0: it does not read the bias).
    """
    if verified is not None:
        structured, dense = _verified_pair(params)
        kw = dict(rng_state=rng_state, sinks=sinks, sinks_requires_grad=sinks_requires_grad, doc_ids=doc_ids)
        s_out, s_lse = reference_flash_forward(q, k, v, structured, alibi_slopes=alibi_slopes, rng_state=rng_state,
                                               sinks=sinks, doc_ids=doc_ids)
        d_out, d_lse = reference_flash_forward(q, k, v, dense, bias=bias, rng_state=rng_state, sinks=sinks,
                                               doc_ids=doc_ids)
        s_grads = reference_flash_backward(grad_out, q, k, v, s_out, s_lse, structured, alibi_slopes=alibi_slopes, **kw)
        d_grads = reference_flash_backward(grad_out, q, k, v, d_out, d_lse, dense, bias=bias,
                                           bias_requires_grad=bias_requires_grad, **kw)
        ok = verified.reshape(()).to(q.device)
        return tuple(None if d is None else torch.where(ok, torch.zeros_like(d) if s is None else s, d)
                     for s, d in zip(s_grads, d_grads))
    scale, softcap, dropout_p = params.scale, params.softcap, params.dropout_p
    batch, q_heads, tq, _ = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    cd = _compute_dtype(q)
    geometry = _dense_geometry(q, k, params, doc_ids)
    k_c, v_c, bias4 = k.to(cd), v.to(cd), _bias_as_4d(bias)
    want_dbias = bias_requires_grad and bias is not None and bias.dtype != torch.bool

    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dk = torch.zeros(k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(v.shape, dtype=cd, device=q.device)
    dbias4 = torch.zeros(bias4.shape, dtype=cd, device=q.device) if want_dbias else None
    sink = _sink_logits(sinks, cd)
    dsinks = torch.zeros(q_heads, dtype=cd, device=q.device) if sinks_requires_grad and sinks is not None else None
    for rows in _query_chunks(batch, q_heads, tq, tk, cd) if tk > 0 else ():
        q_folded = _fold_heads(q[:, :, rows].to(cd), kv_heads)
        s, tanh_term, filled = _chunk_scores(q_folded, k_c, rows, q_heads=q_heads, scale=scale,
                                             softcap=softcap, alibi_slopes=alibi_slopes, bias4=bias4,
                                             geometry=geometry, fill=params.mask_fill)
        lse_rows = lse[:, :, rows].to(cd).unsqueeze(-1)
        empty = lse_rows == float("-inf")
        if filled is None:
            p = torch.exp(s - torch.where(empty, 0.0, lse_rows))  # empty rows: s is all -inf -> 0
        else:
            # fill mode: P from the scores themselves, not from lse. A row near a large fill (-1e9, finfo.min) has
            # lse = fill + log(n), which fp32 rounds to the fill; exp(s - lse) would lose log(n)
            p, lse_rows, _ = _softmax(s, sink)
        grad_rows = grad_out[:, :, rows].to(cd)
        # rowsum(dO * O); empty rows' O may be NaN (empty_rows_nan) and must not leak.
        delta = torch.where(empty, 0.0, (grad_rows * out[:, :, rows].to(cd)).sum(-1, keepdim=True))
        if dsinks is not None:   # the sink's probability is exp(sink - lse); rows with no key have O = 0, delta 0
            dsinks -= (torch.exp(sink - torch.where(empty, 0.0, lse_rows)) * delta).sum(dim=(0, 2, 3))
        grad_folded = _fold_heads(grad_rows, kv_heads)
        dp = _unfold_heads(torch.matmul(grad_folded, v_c.transpose(-1, -2)), q_heads)
        z = p
        if dropout_p > 0:
            keep = _dropout_keep(rng_state, dropout_p, (batch, q_heads, tq, tk), rows, q.device)
            keep_scaled = keep.to(cd) / (1.0 - dropout_p)
            z = p * keep_scaled
            dp = dp * keep_scaled
        dv += torch.matmul(_fold_heads(z, kv_heads).transpose(-1, -2), grad_folded)
        ds = p * (dp - delta)
        if filled is not None:  # a replaced score is a constant: no gradient (its p still weighs V above)
            ds = ds.masked_fill(filled, 0.0)
        if dbias4 is not None:
            reduced = _reduce_to_bias_shape(ds, bias4)
            if bias4.shape[2] == 1:
                dbias4 += reduced.sum(dim=2, keepdim=True)
            else:
                dbias4[:, :, rows] = reduced
        dx = ds if tanh_term is None else ds * (1.0 - tanh_term * tanh_term)
        dx_folded = _fold_heads(dx, kv_heads)
        dq[:, :, rows] = _unfold_heads(torch.matmul(dx_folded, k_c), q_heads) * scale
        dk += torch.matmul(dx_folded.transpose(-1, -2), q_folded) * scale

    dbias = None
    if dbias4 is not None:
        dbias = dbias4.reshape(bias.shape).to(bias.dtype).contiguous()
    if dsinks is not None:
        dsinks = dsinks.to(sinks.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, dsinks


def reference_paged_forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                            seq_lens: Tensor, params: AttentionParams, *,
                            alibi_slopes: Tensor | None = None, sinks: Tensor | None = None) -> Tensor:
    """Attention of `q [B, Hq, Tq, D]` over a paged KV cache; returns `out [B, Hq, Tq, Dv]`.

    Gathers each sequence's blocks through `block_table` into a dense `[B, Hkv, L, D]` (L the
    longest sequence), zeroes positions past each sequence's length (pool memory there may hold
    anything, even NaN, and `0 * NaN` would leak through P V), then runs the dense reference with
    query `i` at position `seq_lens[b] - Tq + i`. Rows with no visible key give 0, NaN with
    `params.empty_rows_nan` True. A length outside `[0, max_blocks * block_size]`, a length in `(0, Tq)` unless
    `params.short_sequences`, or a used block id outside `[0, num_blocks)` raises errors.PagedInputError,
    the kernel's error (raised here at once: the reference reads on the host).
    """
    batch, _, tq, _ = q.shape
    num_blocks, kv_heads, block_size, _ = k_cache.shape
    lens = seq_lens.to(device=q.device, dtype=torch.int64)
    capacity = block_table.shape[1] * block_size
    bad_len = (lens < 0) | (lens > capacity)
    if bool(bad_len.any()):
        b = int(bad_len.nonzero()[0, 0])
        kinds = errors.LEN_NEGATIVE if int(lens[b]) < 0 else errors.LEN_TOO_LONG
        raise errors.PagedInputError(errors.paged_input_message(kinds, b, num_blocks, capacity, lazily=False)
                                     + f" (seq_lens[{b}] = {int(lens[b])})")
    short = (lens > 0) & (lens < tq)
    if not params.short_sequences and bool(short.any()):
        b = int(short.nonzero()[0, 0])
        raise errors.PagedInputError(errors.paged_input_message(errors.SHORTER_THAN_TQ, b, num_blocks, capacity,
                                                                lazily=False, tq=tq)
                                     + f" (seq_lens[{b}] = {int(lens[b])}, Tq = {tq})")
    longest = int(lens.max()) if batch > 0 else 0
    blocks_used = -(-longest // block_size)
    table = block_table[:, :blocks_used].to(device=q.device, dtype=torch.int64)
    # Table entries past a sequence's own blocks are padding (any value): read block 0 instead.
    block_pos = torch.arange(blocks_used, device=q.device).view(1, -1)
    in_use = block_pos < (-(-lens // block_size)).view(-1, 1)
    bad = in_use & ((table < 0) | (table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise errors.PagedInputError(
            errors.paged_input_message(errors.BAD_BLOCK_ID, b, num_blocks, capacity, lazily=False)
            + f" (block_table[{b}, {j}] = {int(table[b, j])}, seq_lens[{b}] = {int(lens[b])})")
    table = torch.where(in_use, table, 0)

    def gather(cache: Tensor) -> Tensor:
        dense = cache[table]  # [B, blocks, Hkv, block_size, X]
        dense = dense.permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, blocks_used * block_size, cache.shape[-1])  # not -1: 0 blocks used is legal
        dense = dense[:, :, :longest]
        valid = torch.arange(longest, device=q.device).view(1, 1, -1, 1) < lens.view(-1, 1, 1, 1)
        return torch.where(valid, dense, torch.zeros((), dtype=dense.dtype, device=dense.device))

    geometry = _Geometry(query_offset=(lens - tq).view(-1, 1, 1, 1), causal=params.causal,
                         window=params.window, key_lens=lens.view(-1, 1, 1, 1))
    out, _ = _attention_forward(q, gather(k_cache), gather(v_cache), None, alibi_slopes, params.scale,
                                params.softcap, 0.0, None, bool(params.empty_rows_nan), geometry, sinks=sinks)
    return out
