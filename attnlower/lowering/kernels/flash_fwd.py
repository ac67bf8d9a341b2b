"""Triton forward kernel of the dense attention ops (flash_attention, sliding_window_attention).

Where they run: CUDA tensors on the GPU; CPU tensors only through Triton's interpreter (TRITON_INTERPRET=1 set
before triton is imported) and only when ATTNLOWER_CPU_KERNELS=triton asks (else CPU runs lowering/reference.py).

Semantics: docs/INTERFACES.md, "Semantics (dense ops)". Grid, strides and configs: lowering/launch.py.

Symbols used by every function in this file (and by flash_bwd.py, which imports the helpers):
  Q, K, V, Out         q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv], out [B, Hq, Tq, Dv] (any strides)
  stride_qz/qh/qm/qd   strides of q over (batch, head, query row, dim); k, v use n for the key row;
                       o for out; b for the bias (0 on every broadcast dim)
  Lse                  fp32 [B, Hq, Tq] contiguous: logsumexp_j of the scores, natural log, -inf on empty rows
  Bias                 bool keep-mask (BIAS_KIND 1) or float additive bias (BIAS_KIND 2), read through its
                       own 4 strides as if it were [B, Hq, Tq, Tk]
  Slopes               fp32 ALiBi slopes read at b * stride_sz + h * stride_sh (stride_sz = 0 for [Hq])
  DocIds, Bounds       HAS_DOCS (packed sequences): document ids [B|1, Tk] through (stride_dz, stride_dn)
                       (batch stride 0 for [1, Tk]); row i takes the id of key position i + off. Bounds int32
                       [B|1, 2, Tk] (batch stride stride_boz): each position's run of equal ids
                       (lowering/documents.py); a query block visits only the key blocks of its rows' documents
                       (_doc_key_range), every tile masked
  Verified             HAS_VERIFIED (issue 22, class 1): one bool on the device. True: IS_CAUSAL / HAS_WINDOW /
                       HAS_ALIBI describe the call and the bias is never read; False (`fallback`): the bias alone
                       over every key block (causal / window / alibi ignored). One launch, the flag read by each
                       program (no host sync, CUDA-graph safe), which then runs one of two key loops, each compiled
                       as a call without the other's mask code. (A tile carrying both, its bias loads masked off and
                       the two structures merged per element, made the forward kernel 1.74x, dQ 1.49x and dK/dV
                       1.22x slower than a plain causal call: H200, nanoGPT-124M training, D=64, 2026-12-04.)
  Sinks                HAS_SINKS: one logit per query head (any float dtype, read as fp32) at h * stride_sink:
                       a virtual key with a zero value, so the online softmax starts from m_i = sink * log2(e),
                       l_i = 1, acc = 0 (l_i = 0 for a -inf sink); no row is then empty, and lse includes it
  Rng                  int64 [2] on the device: (seed, base counter) of the call's dropout (rng_state)
  seed, rng_lo, rng_hi Philox key and the low / high 32 bits of the base counter, loaded from Rng (_load_rng)
  H, GROUP             Hq and Hq // Hkv: query head h reads kv head h // GROUP (K/V are never repeated)
  N_CTX_Q, N_CTX_K     Tq, Tk
  diag_offset          off = Tk - Tq (bottom-right alignment) or 0: key j is causally visible iff j <= i + off
  window               W (HAS_WINDOW): key j also needs j > i + off - W
  sm_scale, softcap    score scale, tanh soft-cap (HAS_SOFTCAP)
  dropout_p            probability of dropping one p_ij (HAS_DROPOUT)
  fill, fill_log2      HAS_FILL (the fill mode): every masked pair (a False keep-mask entry, causal, window, two
                       documents) takes
                       the score `fill` instead of -inf; fill_log2 = max(fill, BIAS_FLOOR) * log2(e). Key blocks
                       the block range skips then hold only filled pairs: _fwd_fill_inner adds them (V only)
                       for the tiles that have a row they do not underflow in (FILL_REACH)
  BLOCK_M, BLOCK_N     query rows / key rows of one tile
  HEAD_DIM, HEAD_DIM_PAD  D (q / k) and the power of two >= max(D, 16) its tiles use (loads masked past D)
  HEAD_DIM_V, HEAD_DIM_V_PAD  Dv (v, the accumulator, out), padded the same way, independently (issue 21.1)
  offs_m, offs_n, offs_d, offs_dv  query rows, key rows, q/k dims, v dims of the current tile
  DOT_PRECISION, s, m_i, l_i   as in common.py (the dot-precision policy, log2-unit scores, the
                       online softmax's running max and sum); acc is the running (unnormalized) out
  SPAN                 which of the three key spans of _kv_block_range a loop walks (0, 1, 2); only
                       span 1 is interior (no element masks), see _span
"""
import triton
import triton.language as tl

from attnlower.lowering.kernels.common import LN2, LOG2E, _as_fp32, _dot, _load_tile, _online_softmax_step, _tanh

# A finite float bias below this is clamped to it so that bias * log2(e) stays finite in fp32:
# finfo(fp32).min * log2(e) overflows to -inf and would turn a finfo.min-masked row (a uniform
# average in eager) into an empty one. Every score this low still underflows exp2 to exactly 0.
BIAS_FLOOR = tl.constexpr(-1.0e38)
# exp2(x) of fp32 is exactly 0 for x < -149 (the smallest denormal is 2**-149; GPUs flush below 2**-126): a
# filled key whose score sits more than this below a row's running max adds nothing, so a tile whose rows
# all sit that far above the fill skips the blocks the block range skipped. Any margin >= 150 is exact.
FILL_REACH = tl.constexpr(160.0)


@triton.jit
def _fill_log2(fill):
    """The fill in log2 units, finite: finfo(fp32).min * log2(e) would overflow to -inf."""
    return tl.maximum(_as_fp32(fill), BIAS_FLOOR) * LOG2E


@triton.jit
def _load_rng(Rng, HAS_DROPOUT: tl.constexpr):
    """(seed, rng_lo, rng_hi) read on the device: no host read of rng_state, so launches stay graph-safe."""
    if HAS_DROPOUT:
        base = tl.load(Rng + 1)
        return tl.load(Rng).to(tl.int32), (base & 0xFFFFFFFF).to(tl.uint32), (base >> 32).to(tl.uint32)
    else:
        return 0, 0, 0


@triton.jit
def _dropout_keep(seed, rng_lo, rng_hi, off_hz, offs_m, offs_n, N_CTX_K, dropout_p):
    """keep_ij for this tile: one Philox draw per (b, h, i, j).

    Counter = (i * Tk + j, b * Hq + h, base_lo, base_hi): unique per (b, h, i, j) and per call's base
    counter, all in 32 bits (the launcher checks Tq * Tk < 2**32). Forward and backward call this with
    the same arguments, so they regenerate the same mask.
    """
    c0 = (offs_m[:, None] * N_CTX_K + offs_n[None, :]).to(tl.uint32)
    zero = tl.zeros_like(c0)
    c1 = zero + off_hz.to(tl.uint32)
    c2 = (zero + rng_lo).to(tl.uint32)
    c3 = (zero + rng_hi).to(tl.uint32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return tl.uint_to_uniform_float(r0) >= dropout_p


@triton.jit
def _scores(qk, offs_m, offs_n, bias_ptrs, slope, sm_scale, softcap, diag_offset, window, fill_log2,
            doc_q, doc_k, N_CTX_Q, N_CTX_K,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr,
            IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_FILL: tl.constexpr, HAS_DOCS: tl.constexpr,
            MASK_EDGES: tl.constexpr):
    """Steps 1-5 of the semantics on one [BLOCK_M, BLOCK_N] tile of q·k (fp32).

    Returns (s, t, filled): s in log2 units with -inf where masked (fill_log2 in fill mode; keys past Tk are
    -inf either way), t = tanh(scale * qk / softcap) (the backward needs it for the soft-cap derivative;
    equal to s when HAS_SOFTCAP is off), filled the pairs whose score is the fill (HAS_FILL; otherwise t,
    unused: their gradient is 0).
    MASK_EDGES: the tile may cross Tk or the causal / window edges, so those masks are applied;
    interior tiles skip them (the block ranges guarantee every pair there is visible). HAS_DOCS: doc_q [BLOCK_M]
    and doc_k [BLOCK_N] are the rows' and keys' document ids; pairs of two documents are masked (only under
    MASK_EDGES: in document mode every visited tile is an edge tile, see _doc_key_range).
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * (sm_scale / softcap))
        s = t * (softcap * LOG2E)
    else:
        s = qk * (sm_scale * LOG2E)
        t = s
    if HAS_ALIBI:
        # slope * (j - (i + off)): 0 on the aligned diagonal, -slope * distance before it
        rel = offs_n[None, :] - (offs_m[:, None] + diag_offset)
        s += (slope * LOG2E) * rel.to(tl.float32)
    filled = t
    if HAS_FILL:
        filled = (offs_m[:, None] < 0) & (offs_n[None, :] < 0)   # all False
    if BIAS_KIND != 0:
        in_bounds = (offs_m[:, None] < N_CTX_Q) & (offs_n[None, :] < N_CTX_K)
        if BIAS_KIND == 1:
            keep = tl.load(bias_ptrs, mask=in_bounds, other=0) != 0
            if HAS_FILL:
                filled = keep == 0
            else:
                s = tl.where(keep, s, float("-inf"))
        else:
            b = tl.load(bias_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
            b = tl.where(b == float("-inf"), b, tl.maximum(b, BIAS_FLOOR))
            s += b * LOG2E
    if MASK_EDGES:
        in_k = offs_n[None, :] < N_CTX_K      # [1, BLOCK_N]: broadcasts against the conditions below
        if HAS_FILL:
            hidden = offs_n[None, :] < 0      # pairs masked by causal / window / documents
            if IS_CAUSAL:
                hidden = hidden | (offs_n[None, :] > offs_m[:, None] + diag_offset)
            if HAS_WINDOW:
                hidden = hidden | (offs_n[None, :] <= offs_m[:, None] + diag_offset - window)
            if HAS_DOCS:
                hidden = hidden | (doc_q[:, None] != doc_k[None, :])
            filled = (filled | hidden) & in_k
            s = tl.where(filled, fill_log2, tl.where(in_k, s, float("-inf")))
        else:
            visible = in_k
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag_offset)
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > offs_m[:, None] + diag_offset - window)
            if HAS_DOCS:
                visible = visible & (doc_q[:, None] == doc_k[None, :])
            s = tl.where(visible, s, float("-inf"))
    elif HAS_FILL and BIAS_KIND == 1:
        s = tl.where(filled, fill_log2, s)
    return s, t, filled


@triton.jit
def _kv_block_range(start_m, N_CTX_K, diag_offset, window,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key ranges a query block [start_m, start_m + BLOCK_M) must visit, as three consecutive
    BLOCK_N-aligned spans [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked.

    The first span holds the blocks crossing the window's lower edge, the last the blocks crossing
    the causal diagonal or Tk; key blocks outside [lo, hi) hold no visible key and are never loaded.
    Divisions only ever see non-negative numerators: Triton's `//` truncates on GPU but floors in
    the interpreter, and the two disagree below zero.
    """
    hi = N_CTX_K
    full_hi = (N_CTX_K // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # last visible key of the block is start_m + BLOCK_M - 1 + off
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag_offset, 0), N_CTX_K)
        # every row sees key j when j <= start_m + off
        full_hi = tl.minimum(full_hi, (tl.maximum(start_m + diag_offset + 1, 0) // BLOCK_N) * BLOCK_N)
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        # first visible key of the block is start_m + off - W + 1
        lo = (tl.maximum(start_m + diag_offset - window + 1, 0) // BLOCK_N) * BLOCK_N
        # every row sees key j when j >= start_m + BLOCK_M - 1 + off - W + 1
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M + diag_offset - window, 0), BLOCK_N) * BLOCK_N
    hi_up = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    lo = tl.minimum(lo, hi_up)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi_up)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _span(SPAN: tl.constexpr, lo, full_lo, full_hi, hi):
    """[start, end) of span SPAN of a (lo, full_lo, full_hi, hi) block range: 0 -> [lo, full_lo),
    1 -> [full_lo, full_hi) (interior, unmasked), 2 -> [full_hi, hi)."""
    tl.static_assert(SPAN >= 0 and SPAN <= 2, "SPAN: 0, 1 or 2")
    if SPAN == 0:
        start = lo
        end = full_lo
    elif SPAN == 1:
        start = full_lo
        end = full_hi
    else:
        start = full_hi
        end = hi
    return start, end


@triton.jit
def _fallback_range(fallback, lo, full_lo, full_hi, hi, n):
    """HAS_VERIFIED: with the structure not verified (fallback), every block [0, n), all masked (the bias decides)."""
    return (tl.where(fallback, 0, lo), tl.where(fallback, 0, full_lo), tl.where(fallback, 0, full_hi),
            tl.where(fallback, n, hi))


@triton.jit
def _load_fallback(Verified, HAS_VERIFIED: tl.constexpr):
    """The negated verified flag (one bool on the device, read by every program: no host sync); False without it."""
    if HAS_VERIFIED:
        return tl.load(Verified) == 0
    else:
        return False


@triton.jit
def _load_docs(doc_base, pos, n, stride_dn, HAS_DOCS: tl.constexpr):
    """Document ids at key positions pos (masked past n; 0 without documents: unused then)."""
    if HAS_DOCS:
        return tl.load(doc_base + pos.to(tl.int64) * stride_dn, mask=pos < n, other=-1)
    else:
        return 0


@triton.jit
def _doc_bounds(bounds_base, first, last, N_CTX_K):
    """[start of the run holding key position `first`, end of the run holding `last`) from the document bounds
    (lowering/documents.py: bounds[b, 0, t] the start of t's run, bounds[b, 1, t] its end; [0, Tk) on rows whose
    ids are not non-decreasing). For non-decreasing ids no position outside it shares a document with a position
    in [first, last]: ids before a run are smaller, after it larger."""
    return tl.load(bounds_base + first), tl.load(bounds_base + N_CTX_K + last)


@triton.jit
def _doc_key_range(bounds_base, start_m, lo, hi, N_CTX_Q, N_CTX_K, diag_offset,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The block range of a query block in document mode: the causal / window range [lo, hi) intersected with the
    keys of the documents of its rows (positions start_m + off .. last row + off; Tq <= Tk keeps them inside
    [0, Tk)), BLOCK_N-aligned below. Every visited tile is an edge tile (a document's edge may cross it), so the
    three spans collapse to the last, masked one: returns (lo, full_lo, full_hi, hi) with full_lo = full_hi = lo."""
    last = tl.minimum(start_m + BLOCK_M, N_CTX_Q) - 1
    doc_lo, doc_hi = _doc_bounds(bounds_base, start_m + diag_offset, last + diag_offset, N_CTX_K)
    lo = tl.maximum(lo, (doc_lo // BLOCK_N) * BLOCK_N)
    hi = tl.maximum(tl.minimum(hi, doc_hi), lo)
    return lo, lo, lo, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, slope, doc_base, doc_q, seed, rng_lo, rng_hi,
               off_hz, start_m, lo, hi, offs_m, offs_d, offs_dv,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_dn,
               sm_scale, softcap, diag_offset, window, dropout_p, fill_log2, N_CTX_Q, N_CTX_K,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               HAS_FILL: tl.constexpr, HAS_DOCS: tl.constexpr, MASK_EDGES: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation over key blocks [lo, hi) of one query block. The one loop body of
    the forward: the kernel walks each span of the block range through it, MASK_EDGES off only
    on the interior span."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        # k^T tile [HEAD_DIM_PAD, BLOCK_N]
        kt = _load_tile(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                        offs_d, offs_n, HEAD_DIM, N_CTX_K, HEAD_DIM != HEAD_DIM_PAD, MASK_EDGES)
        qk = _dot(q, kt, None, DOT_PRECISION)
        doc_k = _load_docs(doc_base, offs_n, N_CTX_K, stride_dn, HAS_DOCS)
        s, _, _ = _scores(qk, offs_m, offs_n,
                          bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                          slope, sm_scale, softcap, diag_offset, window, fill_log2, doc_q, doc_k, N_CTX_Q,
                          N_CTX_K, HAS_SOFTCAP, HAS_ALIBI, BIAS_KIND, IS_CAUSAL, HAS_WINDOW, HAS_FILL, HAS_DOCS,
                          MASK_EDGES)
        acc, l_i, m_i = _fwd_accumulate(acc, l_i, m_i, s, v_base, seed, rng_lo, rng_hi, off_hz, offs_m, offs_n,
                                        offs_dv, stride_vn, stride_vd, dropout_p, N_CTX_K, HEAD_DIM_V,
                                        HEAD_DIM_V_PAD, HAS_DROPOUT, MASK_EDGES, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_spans(acc, l_i, m_i, q, k_base, v_base, bias_base, slope, doc_base, doc_q, seed, rng_lo, rng_hi,
               off_hz, start_m, lo, full_lo, full_hi, hi, offs_m, offs_d, offs_dv,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_dn,
               sm_scale, softcap, diag_offset, window, dropout_p, fill_log2, N_CTX_Q, N_CTX_K,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, HAS_FILL: tl.constexpr, HAS_DOCS: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One query block's key loop over the spans of its block range: 0 the window's lower-edge blocks (masked;
    empty without a window), 1 the interior blocks (no element masks), 2 the causal-diagonal / Tk-tail blocks
    (masked)."""
    for span in tl.static_range(3):
        if HAS_WINDOW or span != 0:
            start, end = _span(span, lo, full_lo, full_hi, hi)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, slope, doc_base, doc_q, seed,
                                       rng_lo, rng_hi, off_hz, start_m, start, end, offs_m, offs_d, offs_dv,
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_dn,
                                       sm_scale, softcap, diag_offset, window, dropout_p, fill_log2,
                                       N_CTX_Q, N_CTX_K, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V,
                                       HEAD_DIM_V_PAD, HAS_SOFTCAP, HAS_ALIBI,
                                       BIAS_KIND, IS_CAUSAL, HAS_WINDOW, HAS_DROPOUT, HAS_FILL, HAS_DOCS,
                                       span != 1, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_accumulate(acc, l_i, m_i, s, v_base, seed, rng_lo, rng_hi, off_hz, offs_m, offs_n, offs_dv,
                    stride_vn, stride_vd, dropout_p, N_CTX_K,
                    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    MASK_EDGES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block's scores s into the running (acc, l_i, m_i): the softmax step, dropout, P·V."""
    p, alpha, m_i, l_i = _online_softmax_step(s, m_i, l_i)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        # l_i sums the undropped p: dropout applies after the softmax normalization
        keep = _dropout_keep(seed, rng_lo, rng_hi, off_hz, offs_m, offs_n, N_CTX_K, dropout_p)
        p = tl.where(keep, p, 0.0)
    v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                   offs_n, offs_dv, N_CTX_K, HEAD_DIM_V, MASK_EDGES, HEAD_DIM_V != HEAD_DIM_V_PAD)
    acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_fill_inner(acc, l_i, m_i, v_base, seed, rng_lo, rng_hi, off_hz, lo, hi, offs_m, offs_dv,
                    stride_vn, stride_vd, dropout_p, fill_log2, N_CTX_K,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    HEAD_DIM_V_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fill mode, key blocks [lo, hi) the block range skipped: every pair there is masked, so every score is the
    fill and each row's p is one number, p_row = 2^(fill - m): no q·k, no bias, only V is read. The block adds
    p_row * (its number of keys) to l and p_row * sum_j v_j to acc (with dropout, sum_j keep_ij v_j, one dot of
    the 0/1 keep tile; the dropout bools never meet the dot operand's layout change, which Triton 3.9 cannot do
    for i1 tensors at 256-wide heads: sm90_compile.py --fits)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        m_new = tl.maximum(m_i, fill_log2)                  # finite: the fill is
        alpha = tl.math.exp2(m_i - m_new)
        p_row = tl.math.exp2(fill_log2 - m_new)
        l_i = l_i * alpha + p_row * tl.minimum(N_CTX_K - start_n, BLOCK_N).to(tl.float32)
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                       offs_n, offs_dv, N_CTX_K, HEAD_DIM_V, True, HEAD_DIM_V != HEAD_DIM_V_PAD)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_lo, rng_hi, off_hz, offs_m, offs_n, N_CTX_K, dropout_p)
            kept_v = _dot(tl.where(keep, 1.0, 0.0).to(v.dtype), v, None, DOT_PRECISION)
        else:
            kept_v = tl.zeros([BLOCK_M, HEAD_DIM_V_PAD], dtype=tl.float32) + tl.sum(v.to(tl.float32), 0)[None, :]
        acc = acc * alpha[:, None] + p_row[:, None] * kept_v
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sink_log2(Sinks, off_h, stride_sink):
    """The sink logit of query head off_h in log2 units (fp32 whatever Sinks' dtype)."""
    return tl.load(Sinks + off_h * stride_sink).to(tl.float32) * LOG2E


@triton.jit
def _softmax_start(Sinks, off_h, stride_sink, BLOCK_M: tl.constexpr, HAS_SINKS: tl.constexpr):
    """(m_i, l_i) before the first key: nothing seen, or the sink as a virtual key (value 0) already seen."""
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:
        sink = _sink_log2(Sinks, off_h, stride_sink)
        m_i = l_i + sink
        l_i = l_i + tl.where(sink == float("-inf"), 0.0, 1.0)
    else:
        m_i = l_i + float("-inf")
    return m_i, l_i


@triton.jit
def _fill_needed(m_i, fill_log2, offs_m, N_CTX_Q):
    """Whether a row of the tile still weighs filled keys: fill_log2 within FILL_REACH of its running max
    (a row that has seen nothing has m_i = -inf and needs them all). One scalar per tile."""
    gap = tl.where(offs_m < N_CTX_Q, fill_log2 - m_i, float("-inf"))
    return tl.max(gap, 0) > -FILL_REACH


@triton.jit
def _check_dense_constexprs(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                            HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
                            IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The tile and head-dim rules every dense kernel (forward, dK/dV, dQ) checks at compile time."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(HEAD_DIM_PAD >= HEAD_DIM and HEAD_DIM_PAD >= 16, "HEAD_DIM_PAD: pow2 >= max(D, 16)")
    tl.static_assert(HEAD_DIM_V_PAD >= HEAD_DIM_V and HEAD_DIM_V_PAD >= 16, "HEAD_DIM_V_PAD: pow2 >= max(Dv, 16)")
    tl.static_assert(HEAD_DIM_PAD <= 256 and HEAD_DIM_V_PAD <= 256, "dense kernels: head dims up to 256")
    tl.static_assert(not HAS_WINDOW or IS_CAUSAL, "a window is always causal")


@triton.jit
def _entry_scalars(Rng, sm_scale, softcap, dropout_p, fill, HAS_DROPOUT: tl.constexpr, HAS_FILL: tl.constexpr):
    """What every dense kernel reads at entry: (seed, rng_lo, rng_hi) (_load_rng), sm_scale, softcap and dropout_p
    in fp32 whatever the caller typed them (Inductor passes fp64, see common._as_fp32), and fill_log2 (0.0 without
    HAS_FILL)."""
    seed, rng_lo, rng_hi = _load_rng(Rng, HAS_DROPOUT)
    fill_log2 = 0.0
    if HAS_FILL:
        fill_log2 = _fill_log2(fill)
    return seed, rng_lo, rng_hi, _as_fp32(sm_scale), _as_fp32(softcap), _as_fp32(dropout_p), fill_log2


@triton.jit
def _query_block_program(H, GROUP, BLOCK_M: tl.constexpr):
    """(start_m, off_hz, off_z, off_h, off_hkv) of a program of the grid (cdiv(Tq, BLOCK_M), B * Hq): the forward's
    and the dQ kernel's."""
    start_m = tl.program_id(0) * BLOCK_M
    off_hz = tl.program_id(1)
    off_z = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    return start_m, off_hz, off_z, off_h, off_h // GROUP


@triton.jit
def _alibi_slope(Slopes, off_z, off_h, stride_sz, stride_sh, HAS_ALIBI: tl.constexpr):
    """Query head off_h's ALiBi slope in fp32; 0.0 without alibi (a verified structure's fallback passes HAS_ALIBI
    False to its tiles: alibi is part of the proven structure)."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_z * stride_sz + off_h * stride_sh).to(tl.float32)
    return slope


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Bias, Slopes, Sinks, DocIds, Bounds, Verified, Out, Lse, Rng,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_bz, stride_bh, stride_bm, stride_bn,
    stride_sz, stride_sh, stride_sink, stride_dz, stride_dn, stride_boz,
    stride_oz, stride_oh, stride_om, stride_od,
    H, GROUP, N_CTX_Q, N_CTX_K,
    sm_scale, softcap, diag_offset, window, dropout_p, fill,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMPTY_ROWS_NAN: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_FILL: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_VERIFIED: tl.constexpr,
):
    """One program = one query block of one (batch, query head). Grid: (cdiv(Tq, BLOCK_M), B * Hq)."""
    _check_dense_constexprs(BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, IS_CAUSAL, HAS_WINDOW)
    tl.static_assert((BIAS_KIND >= 0) and (BIAS_KIND <= 2), "BIAS_KIND: 0 none, 1 bool, 2 float")
    start_m, off_hz, off_z, off_h, off_hkv = _query_block_program(H, GROUP, BLOCK_M)
    seed, rng_lo, rng_hi, sm_scale, softcap, dropout_p, fill_log2 = _entry_scalars(Rng, sm_scale, softcap, dropout_p,
                                                                                   fill, HAS_DROPOUT, HAS_FILL)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_hkv * stride_kh
    v_base = V + off_z * stride_vz + off_hkv * stride_vh
    bias_base = Bias + off_z * stride_bz + off_h * stride_bh
    doc_base = DocIds + off_z * stride_dz
    doc_q = _load_docs(doc_base, offs_m + diag_offset, N_CTX_Q + diag_offset, stride_dn, HAS_DOCS)

    fallback = _load_fallback(Verified, HAS_VERIFIED)
    slope = _alibi_slope(Slopes, off_z, off_h, stride_sz, stride_sh, HAS_ALIBI)

    # load q: it stays in registers / SRAM for the whole key loop
    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, offs_d, N_CTX_Q, HEAD_DIM, True, HEAD_DIM != HEAD_DIM_PAD)

    m_i, l_i = _softmax_start(Sinks, off_h, stride_sink, BLOCK_M, HAS_SINKS)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PAD], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _kv_block_range(start_m, N_CTX_K, diag_offset, window,
                                               BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if HAS_VERIFIED:
        lo, full_lo, full_hi, hi = _fallback_range(fallback, lo, full_lo, full_hi, hi, N_CTX_K)
    if HAS_DOCS:   # only the key blocks of the rows' documents (device-side bounds), every tile masked
        lo, full_lo, full_hi, hi = _doc_key_range(Bounds + off_z * stride_boz, start_m, lo, hi, N_CTX_Q, N_CTX_K,
                                                  diag_offset, BLOCK_M, BLOCK_N)
    # HAS_VERIFIED: the flag picks the key loop once per program, not per tile (Verified, in the header)
    if HAS_VERIFIED:
        if fallback:   # the bias alone over every key block (all masked): causal / window / alibi ignored
            acc, l_i, m_i = _fwd_spans(acc, l_i, m_i, q, k_base, v_base, bias_base, slope, doc_base, doc_q, seed,
                                       rng_lo, rng_hi, off_hz, start_m, lo, full_lo, full_hi, hi, offs_m, offs_d,
                                       offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                       stride_dn, sm_scale, softcap, diag_offset, window, dropout_p, fill_log2, N_CTX_Q,
                                       N_CTX_K, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD,
                                       HAS_SOFTCAP, False, BIAS_KIND, False, False, HAS_DROPOUT, HAS_FILL, HAS_DOCS,
                                       DOT_PRECISION)
        else:          # the proven structure, no bias code at all
            acc, l_i, m_i = _fwd_spans(acc, l_i, m_i, q, k_base, v_base, bias_base, slope, doc_base, doc_q, seed,
                                       rng_lo, rng_hi, off_hz, start_m, lo, full_lo, full_hi, hi, offs_m, offs_d,
                                       offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                       stride_dn, sm_scale, softcap, diag_offset, window, dropout_p, fill_log2, N_CTX_Q,
                                       N_CTX_K, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD,
                                       HAS_SOFTCAP, HAS_ALIBI, 0, IS_CAUSAL, HAS_WINDOW, HAS_DROPOUT, HAS_FILL,
                                       HAS_DOCS, DOT_PRECISION)
    else:
        acc, l_i, m_i = _fwd_spans(acc, l_i, m_i, q, k_base, v_base, bias_base, slope, doc_base, doc_q, seed, rng_lo,
                                   rng_hi, off_hz, start_m, lo, full_lo, full_hi, hi, offs_m, offs_d, offs_dv,
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_dn,
                                   sm_scale, softcap, diag_offset, window, dropout_p, fill_log2, N_CTX_Q, N_CTX_K,
                                   BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, HAS_SOFTCAP, HAS_ALIBI,
                                   BIAS_KIND, IS_CAUSAL, HAS_WINDOW, HAS_DROPOUT, HAS_FILL, HAS_DOCS, DOT_PRECISION)
    if HAS_FILL and (IS_CAUSAL or HAS_DOCS):
        # the skipped key blocks [0, lo) and [cdiv(hi), Tk) hold only filled pairs: added when a row still
        # weighs them (a row with nothing visible averages every key), else skipped exactly
        need = _fill_needed(m_i, fill_log2, offs_m, N_CTX_Q)
        hi_up = tl.cdiv(hi, BLOCK_N) * BLOCK_N
        head_end = tl.where(need, lo, 0)
        tail_start = tl.where(need, hi_up, N_CTX_K)
        acc, l_i, m_i = _fwd_fill_inner(acc, l_i, m_i, v_base, seed, rng_lo, rng_hi, off_hz, 0, head_end,
                                        offs_m, offs_dv, stride_vn, stride_vd, dropout_p, fill_log2, N_CTX_K,
                                        BLOCK_M, BLOCK_N, HEAD_DIM_V, HEAD_DIM_V_PAD, HAS_DROPOUT, DOT_PRECISION)
        acc, l_i, m_i = _fwd_fill_inner(acc, l_i, m_i, v_base, seed, rng_lo, rng_hi, off_hz, tail_start,
                                        N_CTX_K, offs_m, offs_dv, stride_vn, stride_vd, dropout_p, fill_log2,
                                        N_CTX_K, BLOCK_M, BLOCK_N, HEAD_DIM_V, HEAD_DIM_V_PAD, HAS_DROPOUT,
                                        DOT_PRECISION)

    # epilogue: normalize; rows that saw no visible key (l_i == 0) are "empty"
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        inv_l = inv_l * (1.0 / (1.0 - dropout_p))
    out = acc * inv_l[:, None]
    if EMPTY_ROWS_NAN:
        out = tl.where(empty[:, None], float("nan"), out)
    else:
        out = tl.where(empty[:, None], 0.0, out)
    log2_l = tl.math.log2(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), (m_i + log2_l) * LN2)
    if HAS_FILL:
        # a row whose max is the fill: fill + log(l) in natural units, exact also for a fill below BIAS_FLOOR
        lse = tl.where(m_i == fill_log2, _as_fp32(fill) + log2_l * LN2, lse)

    o_ptrs = Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    if HEAD_DIM_V != HEAD_DIM_V_PAD:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty),
                 mask=(offs_m[:, None] < N_CTX_Q) & (offs_dv[None, :] < HEAD_DIM_V))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < N_CTX_Q)
    tl.store(Lse + off_hz.to(tl.int64) * N_CTX_Q + offs_m, lse, mask=offs_m < N_CTX_Q)
