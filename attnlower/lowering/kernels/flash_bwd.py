"""Triton backward kernels of the dense attention ops: the FlashAttention-2 scheme in three launches.

1. `_flash_bwd_preprocess_kernel`: delta_i = rowsum(dO_i * O_i) (fp32), 0 on empty rows.
2. `_flash_bwd_dkdv_kernel`: one program per (key block, batch, kv head); holds k, v and the dk, dv
   accumulators and loops over every query head of the GQA group and the query blocks that can see
   the key block, so dk / dv come out already reduced over the group, with no atomics and no
   repeated K/V. It also writes dS for dbias (each (h, i, j) is visited exactly once here).
3. `_flash_bwd_dq_kernel`: one program per (query block, batch, query head); loops over the same key
   blocks as the forward. Separate from (2) rather than atomics so that dq is deterministic and fp32
   accumulation stays in registers; the price is recomputing q·k and p once more.

Symbols: as in flash_fwd.py, plus
  DO, Delta, DQ, DK, DV   dO (any strides), delta fp32 [B, Hq, Tq], dq [B, Hq, Tq, D], dk / dv [B, Hkv, Tk, D]
  DS, stride_dsz/...      dS = d loss / d score (the score after soft-cap, the quantity the float bias is
                          added to), written through 4 strides when WRITE_DS
  HKV                     number of kv heads (H // GROUP)
  p                       softmax probabilities recomputed as exp2(s - lse * log2(e)) (before dropout)
  pd, dpd                 p and dP after dropout: pd = p * keep / (1 - dropout_p)
"""
import triton
import triton.language as tl

from attnlower.lowering.kernels.common import LOG2E, _as_fp32, _dot, _load_tile
from attnlower.lowering.kernels.flash_fwd import _dropout_keep, _kv_block_range, _load_rng, _scores, _span


@triton.jit
def _flash_bwd_preprocess_kernel(
    Out, DO, Lse, Delta,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_doz, stride_doh, stride_dom, stride_dod,
    H, N_CTX_Q,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """delta = rowsum(dO * O) for one query block of one (batch, head). Grid: (cdiv(Tq, BLOCK_M), B * Hq)."""
    off_hz = tl.program_id(1)
    off_z = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    o = _load_tile(Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                   offs_m, offs_d, N_CTX_Q, HEAD_DIM, True, HEAD_DIM != HEAD_DIM_PAD).to(tl.float32)
    do = _load_tile(DO + off_z * stride_doz + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    offs_m, offs_d, N_CTX_Q, HEAD_DIM, True, HEAD_DIM != HEAD_DIM_PAD).to(tl.float32)
    row = off_hz.to(tl.int64) * N_CTX_Q + offs_m
    lse = tl.load(Lse + row, mask=offs_m < N_CTX_Q, other=0.0)
    # empty rows: out may be NaN (EMPTY_ROWS_NAN) and their gradients are zero by contract
    delta = tl.where(lse == float("-inf"), 0.0, tl.sum(o * do, 1))
    tl.store(Delta + row, delta, mask=offs_m < N_CTX_Q)


@triton.jit
def _load_lse2(Lse, row, offs_m, N_CTX_Q):
    """lse in log2 units; +inf on empty rows and rows past Tq so that exp2(s - lse2) is exactly 0 there."""
    lse = tl.load(Lse + row, mask=offs_m < N_CTX_Q, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _q_block_range(start_n, N_CTX_Q, N_CTX_K, diag_offset, window,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query ranges that can see the key block [start_n, start_n + BLOCK_N), as three consecutive
    BLOCK_M-aligned spans [lo, full_lo) masked (causal diagonal), [full_lo, full_hi) unmasked,
    [full_hi, hi) masked (window edge, Tq tail). The mirror of flash_fwd._kv_block_range; numerators
    of `//` are kept non-negative for the same reason."""
    lo = 0
    full_lo = 0
    hi = N_CTX_Q
    full_hi = (N_CTX_Q // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # query i sees key j iff i >= j - off
        lo = (tl.maximum(start_n - diag_offset, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag_offset, 0), BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        # query i sees key j iff i < j - off + W
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - diag_offset + window, 0), N_CTX_Q)
        full_hi = tl.minimum(full_hi, (tl.maximum(start_n - diag_offset + window, 0) // BLOCK_M) * BLOCK_M)
    hi_up = tl.cdiv(hi, BLOCK_M) * BLOCK_M
    lo = tl.minimum(lo, hi_up)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi_up)
    full_hi = tl.maximum(full_hi, full_lo)
    if start_n + BLOCK_N > N_CTX_K:
        # this key block crosses Tk: every query block needs the key-boundary mask
        full_hi = full_lo
    return lo, full_lo, full_hi, hi


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, ds_base,
                    slope, seed, rng_lo, rng_hi, off_hz, start_n, lo, hi, offs_n, offs_d,
                    stride_qm, stride_qd, stride_dom, stride_dod, stride_bm, stride_bn,
                    stride_dsm, stride_dsn,
                    sm_scale, softcap, diag_offset, window, dropout_p, N_CTX_Q, N_CTX_K,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    WRITE_DS: tl.constexpr, MASK_EDGES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dk, dv of one key block over the query blocks [lo, hi) of one query head."""
    offs_m0 = tl.arange(0, BLOCK_M)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       offs_m, offs_d, N_CTX_Q, HEAD_DIM, MASK_EDGES, PAD_D)
        do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                        offs_m, offs_d, N_CTX_Q, HEAD_DIM, MASK_EDGES, PAD_D)
        qk = _dot(q, tl.trans(k), None, DOT_PRECISION)
        s, t = _scores(qk, offs_m, offs_n,
                       bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                       slope, sm_scale, softcap, diag_offset, window, N_CTX_Q, N_CTX_K,
                       HAS_SOFTCAP, HAS_ALIBI, BIAS_KIND, IS_CAUSAL, HAS_WINDOW, MASK_EDGES)
        lse2 = _load_lse2(lse_base, offs_m, offs_m, N_CTX_Q)
        p = tl.math.exp2(s - lse2[:, None])
        delta = tl.load(delta_base + offs_m, mask=offs_m < N_CTX_Q, other=0.0)
        dp = _dot(do, tl.trans(v), None, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_lo, rng_hi, off_hz, offs_m, offs_n, N_CTX_K, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            pd = tl.where(keep, p * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            pd = p
        dv = _dot(tl.trans(pd.to(do.dtype)), do, dv, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if WRITE_DS:
            ds_ptrs = ds_base + offs_m[:, None] * stride_dsm + offs_n[None, :] * stride_dsn
            tl.store(ds_ptrs, ds.to(ds_base.dtype.element_ty),
                     mask=(offs_m[:, None] < N_CTX_Q) & (offs_n[None, :] < N_CTX_K))
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, Bias, Slopes, DO, Lse, Delta, DK, DV, DS, Rng,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_bz, stride_bh, stride_bm, stride_bn,
    stride_sz, stride_sh,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd,
    stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    stride_dsz, stride_dsh, stride_dsm, stride_dsn,
    H, HKV, GROUP, N_CTX_Q, N_CTX_K,
    sm_scale, softcap, diag_offset, window, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WRITE_DS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dk, dv of one key block of one (batch, kv head). Grid: (cdiv(Tk, BLOCK_N), B * Hkv)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(HEAD_DIM_PAD >= HEAD_DIM and HEAD_DIM_PAD >= 16, "HEAD_DIM_PAD: pow2 >= max(D, 16)")
    tl.static_assert(not HAS_WINDOW or IS_CAUSAL, "a window is always causal")
    start_n = tl.program_id(0) * BLOCK_N
    off_zkv = tl.program_id(1)
    off_z = (off_zkv // HKV).to(tl.int64)
    off_hkv = (off_zkv % HKV).to(tl.int64)
    seed, rng_lo, rng_hi = _load_rng(Rng, HAS_DROPOUT)
    # fp32 whatever the caller typed them (Inductor passes fp64, see common._as_fp32)
    sm_scale, softcap, dropout_p = _as_fp32(sm_scale), _as_fp32(softcap), _as_fp32(dropout_p)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD

    # k and v stay in SRAM for the whole loop over the group's query heads and query blocks
    k = _load_tile(K + off_z * stride_kz + off_hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, offs_d, N_CTX_K, HEAD_DIM, True, PAD_D)
    v = _load_tile(V + off_z * stride_vz + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   offs_n, offs_d, N_CTX_K, HEAD_DIM, True, PAD_D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _q_block_range(start_n, N_CTX_Q, N_CTX_K, diag_offset, window,
                                              BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)

    for g in range(0, GROUP):
        off_h = off_hkv * GROUP + g
        off_hz = off_z * H + off_h
        q_base = Q + off_z * stride_qz + off_h * stride_qh
        do_base = DO + off_z * stride_doz + off_h * stride_doh
        lse_base = Lse + off_hz * N_CTX_Q
        delta_base = Delta + off_hz * N_CTX_Q
        bias_base = Bias + off_z * stride_bz + off_h * stride_bh
        ds_base = DS + off_z * stride_dsz + off_h * stride_dsh
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + off_z * stride_sz + off_h * stride_sh).to(tl.float32)
        # span 0: causal-diagonal blocks (masked; empty when not causal), 1: interior blocks (no
        # element masks), 2: window-edge / Tq-tail blocks (masked)
        for span in tl.static_range(3):
            if IS_CAUSAL or span != 0:
                start, end = _span(span, lo, full_lo, full_hi, hi)
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, ds_base,
                                         slope, seed, rng_lo, rng_hi, off_hz, start_n, start, end, offs_n, offs_d,
                                         stride_qm, stride_qd, stride_dom, stride_dod, stride_bm, stride_bn,
                                         stride_dsm, stride_dsn,
                                         sm_scale, softcap, diag_offset, window, dropout_p, N_CTX_Q, N_CTX_K,
                                         BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, HAS_SOFTCAP, HAS_ALIBI, BIAS_KIND,
                                         IS_CAUSAL, HAS_WINDOW, HAS_DROPOUT, WRITE_DS, span != 1, DOT_PRECISION)

    # the score is sm_scale * q·k (before the soft-cap, whose derivative is already in ds)
    dk = dk * sm_scale
    mask = offs_n[:, None] < N_CTX_K
    if PAD_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + off_z * stride_dkz + off_hkv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + off_z * stride_dvz + off_hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, slope, seed, rng_lo, rng_hi, off_hz,
                  lo, hi, offs_m, offs_d,
                  stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                  sm_scale, softcap, diag_offset, window, dropout_p, N_CTX_Q, N_CTX_K,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  MASK_EDGES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dq of one query block over the key blocks [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        kt = _load_tile(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                        offs_d, offs_n, HEAD_DIM, N_CTX_K, PAD_D, MASK_EDGES)
        vt = _load_tile(v_base + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn,
                        offs_d, offs_n, HEAD_DIM, N_CTX_K, PAD_D, MASK_EDGES)
        qk = _dot(q, kt, None, DOT_PRECISION)
        s, t = _scores(qk, offs_m, offs_n,
                       bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                       slope, sm_scale, softcap, diag_offset, window, N_CTX_Q, N_CTX_K,
                       HAS_SOFTCAP, HAS_ALIBI, BIAS_KIND, IS_CAUSAL, HAS_WINDOW, MASK_EDGES)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, vt, None, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_lo, rng_hi, off_hz, offs_m, offs_n, N_CTX_K, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, DOT_PRECISION)
    return dq


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, Bias, Slopes, DO, Lse, Delta, DQ, Rng,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_bz, stride_bh, stride_bm, stride_bn,
    stride_sz, stride_sh,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, N_CTX_Q, N_CTX_K,
    sm_scale, softcap, diag_offset, window, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq of one query block of one (batch, query head). Grid: (cdiv(Tq, BLOCK_M), B * Hq)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(HEAD_DIM_PAD >= HEAD_DIM and HEAD_DIM_PAD >= 16, "HEAD_DIM_PAD: pow2 >= max(D, 16)")
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
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD

    q = _load_tile(Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, offs_d, N_CTX_Q, HEAD_DIM, True, PAD_D)
    do = _load_tile(DO + off_z * stride_doz + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    offs_m, offs_d, N_CTX_Q, HEAD_DIM, True, PAD_D)
    row = off_hz.to(tl.int64) * N_CTX_Q + offs_m
    lse2 = _load_lse2(Lse, row, offs_m, N_CTX_Q)
    delta = tl.load(Delta + row, mask=offs_m < N_CTX_Q, other=0.0)
    k_base = K + off_z * stride_kz + off_hkv * stride_kh
    v_base = V + off_z * stride_vz + off_hkv * stride_vh
    bias_base = Bias + off_z * stride_bz + off_h * stride_bh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_z * stride_sz + off_h * stride_sh).to(tl.float32)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _kv_block_range(start_m, N_CTX_K, diag_offset, window,
                                               BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    # the forward's spans: window lower-edge (masked), interior (no element masks), diagonal / Tk tail (masked)
    for span in tl.static_range(3):
        if HAS_WINDOW or span != 0:
            start, end = _span(span, lo, full_lo, full_hi, hi)
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, slope, seed, rng_lo, rng_hi,
                               off_hz, start, end, offs_m, offs_d,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                               sm_scale, softcap, diag_offset, window, dropout_p, N_CTX_Q, N_CTX_K,
                               BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, HAS_SOFTCAP, HAS_ALIBI, BIAS_KIND,
                               IS_CAUSAL, HAS_WINDOW, HAS_DROPOUT, span != 1, DOT_PRECISION)

    dq = dq * sm_scale
    mask = offs_m[:, None] < N_CTX_Q
    if PAD_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(DQ + off_z * stride_dqz + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask)
