"""Triton forward kernel of the dense attention ops (flash_attention, sliding_window_attention).

Semantics: docs/INTERFACES.md, "Semantics (dense ops)". Grid, strides and configs: lowering/launch.py.

Symbols used by every function in this file (and by flash_bwd.py, which imports the helpers):
  Q, K, V, Out         q [B, Hq, Tq, D], k / v [B, Hkv, Tk, D], out [B, Hq, Tq, D] (contiguous)
  stride_qz/qh/qm/qd   strides of q over (batch, head, query row, dim); k, v use n for the key row;
                       o for out; b for the bias (0 on every broadcast dim)
  Lse                  fp32 [B, Hq, Tq] contiguous: logsumexp_j of the scores, natural log, -inf on empty rows
  Bias                 bool keep-mask (BIAS_KIND 1) or float additive bias (BIAS_KIND 2), read through its
                       own 4 strides as if it were [B, Hq, Tq, Tk]
  Slopes               fp32 ALiBi slopes read at b * stride_sz + h * stride_sh (stride_sz = 0 for [Hq])
  Rng                  int64 [2] on the device: (seed, base counter) of the call's dropout (rng_state)
  seed, rng_lo, rng_hi Philox key and the low / high 32 bits of the base counter, loaded from Rng (_load_rng)
  H, GROUP             Hq and Hq // Hkv: query head h reads kv head h // GROUP (K/V are never repeated)
  N_CTX_Q, N_CTX_K     Tq, Tk
  diag_offset          off = Tk - Tq (bottom-right alignment) or 0: key j is causally visible iff j <= i + off
  window               W (HAS_WINDOW): key j also needs j > i + off - W
  sm_scale, softcap    score scale, tanh soft-cap (HAS_SOFTCAP)
  dropout_p            probability of dropping one p_ij (HAS_DROPOUT)
  BLOCK_M, BLOCK_N     query rows / key rows of one tile
  HEAD_DIM, HEAD_DIM_PAD  D and the power of two >= max(D, 16) the tiles use (loads masked past D)
  offs_m, offs_n, offs_d  query rows, key rows, dims of the current tile
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
def _scores(qk, offs_m, offs_n, bias_ptrs, slope, sm_scale, softcap, diag_offset, window,
            N_CTX_Q, N_CTX_K,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr,
            IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_EDGES: tl.constexpr):
    """Steps 1-5 of the semantics on one [BLOCK_M, BLOCK_N] tile of q·k (fp32).

    Returns (s, t): s in log2 units with -inf where masked, t = tanh(scale * qk / softcap) (the
    backward needs it for the soft-cap derivative; equal to s when HAS_SOFTCAP is off).
    MASK_EDGES: the tile may cross Tk or the causal / window edges, so those masks are applied;
    interior tiles skip them (the block ranges guarantee every pair there is visible).
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
    if BIAS_KIND != 0:
        in_bounds = (offs_m[:, None] < N_CTX_Q) & (offs_n[None, :] < N_CTX_K)
        if BIAS_KIND == 1:
            keep = tl.load(bias_ptrs, mask=in_bounds, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            b = tl.load(bias_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
            b = tl.where(b == float("-inf"), b, tl.maximum(b, BIAS_FLOOR))
            s += b * LOG2E
    if MASK_EDGES:
        visible = offs_n[None, :] < N_CTX_K
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag_offset)
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > offs_m[:, None] + diag_offset - window)
        s = tl.where(visible, s, float("-inf"))
    return s, t


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
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, slope, seed, rng_lo, rng_hi, off_hz,
               start_m, lo, hi, offs_m, offs_d,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
               sm_scale, softcap, diag_offset, window, dropout_p, N_CTX_Q, N_CTX_K,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               MASK_EDGES: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
        s, _ = _scores(qk, offs_m, offs_n,
                       bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                       slope, sm_scale, softcap, diag_offset, window, N_CTX_Q, N_CTX_K,
                       HAS_SOFTCAP, HAS_ALIBI, BIAS_KIND, IS_CAUSAL, HAS_WINDOW, MASK_EDGES)
        p, alpha, m_i, l_i = _online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            # l_i sums the undropped p: dropout applies after the softmax normalization
            keep = _dropout_keep(seed, rng_lo, rng_hi, off_hz, offs_m, offs_n, N_CTX_K, dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, offs_d, N_CTX_K, HEAD_DIM, MASK_EDGES, HEAD_DIM != HEAD_DIM_PAD)
        acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Bias, Slopes, Out, Lse, Rng,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_bz, stride_bh, stride_bm, stride_bn,
    stride_sz, stride_sh,
    stride_oz, stride_oh, stride_om, stride_od,
    H, GROUP, N_CTX_Q, N_CTX_K,
    sm_scale, softcap, diag_offset, window, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMPTY_ROWS_NAN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = one query block of one (batch, query head). Grid: (cdiv(Tq, BLOCK_M), B * Hq)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(HEAD_DIM_PAD >= HEAD_DIM and HEAD_DIM_PAD >= 16, "HEAD_DIM_PAD: pow2 >= max(D, 16)")
    tl.static_assert((BIAS_KIND >= 0) and (BIAS_KIND <= 2), "BIAS_KIND: 0 none, 1 bool, 2 float")
    tl.static_assert(not HAS_WINDOW or IS_CAUSAL, "a window is always causal")
    start_m = tl.program_id(0) * BLOCK_M
    off_hz = tl.program_id(1)
    off_z = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    off_hkv = off_h // GROUP
    seed, rng_lo, rng_hi = _load_rng(Rng, HAS_DROPOUT)
    # fp32 whatever the caller typed them (Inductor passes fp64, see common._as_fp32)
    sm_scale, softcap, dropout_p = _as_fp32(sm_scale), _as_fp32(softcap), _as_fp32(dropout_p)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_hkv * stride_kh
    v_base = V + off_z * stride_vz + off_hkv * stride_vh
    bias_base = Bias + off_z * stride_bz + off_h * stride_bh

    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_z * stride_sz + off_h * stride_sh).to(tl.float32)

    # load q: it stays in registers / SRAM for the whole key loop
    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, offs_d, N_CTX_Q, HEAD_DIM, True, HEAD_DIM != HEAD_DIM_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _kv_block_range(start_m, N_CTX_K, diag_offset, window,
                                               BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    # span 0: window lower-edge blocks (masked; empty without a window), 1: interior blocks (no
    # element masks), 2: causal-diagonal / Tk-tail blocks (masked)
    for span in tl.static_range(3):
        if HAS_WINDOW or span != 0:
            start, end = _span(span, lo, full_lo, full_hi, hi)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, slope, seed, rng_lo, rng_hi,
                                       off_hz, start_m, start, end, offs_m, offs_d,
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                       sm_scale, softcap, diag_offset, window, dropout_p, N_CTX_Q, N_CTX_K,
                                       BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, HAS_SOFTCAP, HAS_ALIBI, BIAS_KIND,
                                       IS_CAUSAL, HAS_WINDOW, HAS_DROPOUT, span != 1, DOT_PRECISION)

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
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)

    o_ptrs = Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if HEAD_DIM != HEAD_DIM_PAD:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < N_CTX_Q) & (offs_d[None, :] < HEAD_DIM))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < N_CTX_Q)
    tl.store(Lse + off_hz.to(tl.int64) * N_CTX_Q + offs_m, lse, mask=offs_m < N_CTX_Q)
