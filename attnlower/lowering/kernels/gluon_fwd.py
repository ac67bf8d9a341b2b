"""Warp-specialized Hopper (sm_90) attention forward in Gluon (`triton.experimental.gluon`, Triton 3.6).

Semantics: docs/INTERFACES.md, "Semantics (dense ops)", for the subset the launcher
(`lowering/launch_gluon.py`) accepts: scale, causal (top-left or bottom-right through a diagonal
offset), odd lengths, GQA, empty rows (0 or NaN), lse. Bias, ALiBi, soft-cap, dropout and windows
are refused by the launcher (NotImplementedError), never dropped here.

The schedule (FlashAttention-3's, written out in Gluon):
  - one CTA owns a 128-row query block (BLOCK_M) of one (batch, query head) at a time, and walks
    the blocks of a persistent tile list (grid = number of SMs, tile = program_id + i * grid);
  - the default partition (4 warps, ~24 registers a thread) is the producer: it issues TMA loads of
    the two 64-row Q halves and of the K and V tiles into two NUM_STAGES-deep shared-memory rings,
    each slot guarded by a "ready" mbarrier (TMA bytes arrived) and an "empty" one (both consumers
    are done with it);
  - two consumer partitions (one warpgroup each, ~240 registers a thread) own rows [0, 64) and
    [64, 128) of the block. Each runs the online softmax over the key blocks with async wgmma:
    S_j = Q K_j^T and O += P_{j-1} V_{j-1} are issued together, the softmax of S_j runs while the
    PV wgmma is still in flight (intra-warpgroup overlap), and with PINGPONG the two consumers take
    turns issuing their wgmmas (two mbarriers pass the turn), so one consumer's softmax runs while
    the other's wgmmas own the tensor cores;
  - the epilogue normalizes O, writes it through shared memory by a TMA store (rows >= Tq are
    clipped by TMA) and writes lse with a masked store.

Symbols:
  q_desc, o_desc     TMA descriptors of q [B, Hq, Tq, D] and out [B, Hq, Tq, D], block [1, 1, 64, D]
  k_desc, v_desc     TMA descriptors of k, v [B, Hkv, Tk, D], block [1, 1, BLOCK_N, D]; TMA fills
                     rows >= Tk (and >= Tq for q) with zeros
  Lse                fp32 [B, Hq, Tq] contiguous: logsumexp_j of the scores, natural log, -inf on empty rows
  H, GROUP           Hq and Hq // Hkv: query head h reads kv head h // GROUP
  N_CTX_Q, N_CTX_K   Tq, Tk
  diag_offset        off = Tk - Tq (bottom-right alignment) or 0: key j is causally visible iff j <= i + off
  qk_scale           sm_scale * log2(e): scores are kept in log2 units, exp(score) = exp2(s)
  num_m_blocks       cdiv(Tq, BLOCK_M); num_tiles = num_m_blocks * B * Hq
  heads_per_group    tiles are ordered in groups of this many (batch, head) pairs (L2 reuse of K/V);
                     inside a group the query blocks go from the last (most keys under a causal mask)
                     to the first, so the longest tiles start first (causal load balance)
  BLOCK_M            query rows of one tile: NUM_CONSUMERS * M_PER_CONSUMER (2 * 64)
  M_PER_CONSUMER     64: the rows one warpgroup's wgmma covers (instr shape m64)
  BLOCK_N            key rows of one K/V tile
  HEAD_DIM           D (64 or 128: the swizzled rows TMA and wgmma want)
  NUM_STAGES         depth of the K ring and of the V ring
  NUM_CONSUMERS      consumer warpgroups (2); CONSUMER: which one a partition is (0 or 1)
  PINGPONG           the consumers take turns issuing wgmmas (turn_bars); off: they issue freely
  EMPTY_ROWS_NAN     rows with no visible key get NaN (eager softmax) instead of 0
  CONSUMER_REGS      registers a consumer thread gets by setmaxnreg (the producer keeps what is left)
  s, m_i, l_i        log2-unit scores of a [64, BLOCK_N] tile, running row max (-inf while a row has
                     seen no visible key) and running sum of exp2(s - m_i); acc the unnormalized out
  kv_count           key tiles this CTA has consumed so far (all tiles): ring slot kv_count % NUM_STAGES,
                     its mbarrier phase (kv_count // NUM_STAGES) & 1
  tile_count         tiles this CTA has done: phase of the Q barriers
  turn_count         wgmma issues a consumer has made: phase of its turn barrier (PINGPONG)

mbarrier phases: a fresh barrier is in phase 0; wait(bar, p) returns once the phase of parity p has
completed, so waiting for parity 1 on a fresh barrier returns at once (how the producer's first pass
over the "empty" barriers and consumer 0's first turn start without a signal).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E = gl.constexpr(1.4426950408889634)
LN2 = gl.constexpr(0.6931471805599453)

NUM_CONSUMERS = gl.constexpr(2)
M_PER_CONSUMER = gl.constexpr(64)


@gluon.jit
def _tile_coords(tile, num_m_blocks, H, BH, heads_per_group):
    """(batch, query head, first query row) of persistent tile `tile`.

    Tiles come in groups of heads_per_group (batch, head) pairs; inside a group the query block index
    runs from the last to the first (heaviest first under a causal mask), heads fastest.
    """
    per_group = num_m_blocks * heads_per_group
    group = tile // per_group
    first_bh = group * heads_per_group
    heads_here = gl.minimum(BH - first_bh, heads_per_group)  # the last group may be short
    within = tile - group * per_group
    m_block = num_m_blocks - 1 - within // heads_here
    bh = first_bh + within % heads_here
    return bh // H, bh % H, m_block * (NUM_CONSUMERS * M_PER_CONSUMER)


@gluon.jit
def _kv_blocks(start_m, N_CTX_K, diag_offset,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """(n_blocks, full_hi): the query block visits key tiles [0, n_blocks); tiles starting at or past
    full_hi (a multiple of BLOCK_N) cross Tk or the causal diagonal and need element masks.

    Numerators stay non-negative before `//` (truncation and floor agree there).
    """
    hi = N_CTX_K
    full_hi = (N_CTX_K // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # last visible key of the block: start_m + BLOCK_M - 1 + off
        hi = gl.minimum(gl.maximum(start_m + BLOCK_M + diag_offset, 0), N_CTX_K)
        # every row of the block sees key j when j <= start_m + off
        full_hi = gl.minimum(full_hi, (gl.maximum(start_m + diag_offset + 1, 0) // BLOCK_N) * BLOCK_N)
    n_blocks = (hi + BLOCK_N - 1) // BLOCK_N
    return n_blocks, full_hi


# ----------------------------------------------------------------------------------------- producer


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs,
              q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
              H, GROUP, N_CTX_K, diag_offset, num_m_blocks, num_tiles, heads_per_group,
              BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
              IS_CAUSAL: gl.constexpr):
    """Default partition: TMA loads only. Walks the same tiles and key blocks as the consumers."""
    BLOCK_M: gl.constexpr = NUM_CONSUMERS * M_PER_CONSUMER
    BH = num_tiles // num_m_blocks
    kv_count = 0
    tile_count = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        off_b, off_h, start_m = _tile_coords(tile, num_m_blocks, H, BH, heads_per_group)
        off_hkv = off_h // GROUP
        # Q halves: wait until the consumer released the previous tile's (it signals after its last S wgmma)
        for c in gl.static_range(NUM_CONSUMERS):
            mbarrier.wait(q_empty.index(c), (tile_count & 1) ^ 1)
            mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m + c * M_PER_CONSUMER, 0],
                                            q_ready.index(c), q_bufs.index(c))
        n_blocks, full_hi = _kv_blocks(start_m, N_CTX_K, diag_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
        for j in range(n_blocks):
            stage = kv_count % NUM_STAGES
            phase = (kv_count // NUM_STAGES) & 1
            mbarrier.wait(k_empty.index(stage), phase ^ 1)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [off_b, off_hkv, j * BLOCK_N, 0],
                                            k_ready.index(stage), k_bufs.index(stage))
            mbarrier.wait(v_empty.index(stage), phase ^ 1)
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [off_b, off_hkv, j * BLOCK_N, 0],
                                            v_ready.index(stage), v_bufs.index(stage))
            kv_count += 1
        tile_count += 1


# ----------------------------------------------------------------------------------------- consumers


@gluon.jit
def _as_mma_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr):
    """p (fp32, accumulator layout) as the 16-bit register A operand of the PV wgmma (no shared memory:
    for 16-bit types the accumulator and the A-operand layouts hold the same elements per thread)."""
    return gl.convert_layout(p.to(dtype), p_layout)


@gluon.jit
def _softmax_step(s_raw, m_i, l_i, start_n, rows, full_hi, N_CTX_K, diag_offset, qk_scale,
                  BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """One key tile of the online softmax. s_raw: fp32 q.k of [64, BLOCK_N] (mma layout).

    Returns (p, alpha, m_new, l_new): p = exp2(s - m_new) unnormalized, alpha = exp2(m_i - m_new) the
    factor the accumulator is rescaled by. -inf-safe: a row with nothing visible yet keeps
    m = -inf and subtracts 0 instead, so exp2(-inf - -inf) never makes a NaN.
    """
    s = s_raw * qk_scale
    if start_n >= full_hi:  # a tile crossing Tk or the causal diagonal: element masks
        # key indices made here, not kept across the loop: 32 registers a thread the overlap needs
        keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_raw.type.layout))
        visible = gl.expand_dims(keys < N_CTX_K, 0)
        if IS_CAUSAL:
            visible = visible & (gl.expand_dims(keys, 0) <= gl.expand_dims(rows + diag_offset, 1))
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s - gl.expand_dims(m_sub, 1))
    alpha = gl.exp2(m_i - m_sub)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _consumer(q_bufs, k_bufs, v_bufs, o_bufs, o_desc, Lse,
              q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn_bars,
              H, N_CTX_Q, N_CTX_K, diag_offset, qk_scale, num_m_blocks, num_tiles, heads_per_group,
              CONSUMER: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
              IS_CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, EMPTY_ROWS_NAN: gl.constexpr):
    """Worker partition (one warpgroup): rows [CONSUMER * 64, CONSUMER * 64 + 64) of every tile."""
    BLOCK_M: gl.constexpr = NUM_CONSUMERS * M_PER_CONSUMER
    dtype: gl.constexpr = o_desc.dtype
    # wgmma accumulator layouts: 4 warps along M (one m64 instruction row each 16), N = the tile width
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    # P is the register (A) operand of the PV wgmma; k_width 2: two 16-bit values per 32-bit register
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = q_bufs.index(CONSUMER).reshape([M_PER_CONSUMER, HEAD_DIM])
    o_smem = o_bufs.index(CONSUMER).reshape([M_PER_CONSUMER, HEAD_DIM])
    my_turn = turn_bars.index(CONSUMER)
    next_turn = turn_bars.index((CONSUMER + 1) % NUM_CONSUMERS)
    row_offs = gl.arange(0, M_PER_CONSUMER, layout=row_layout)
    orow_offs = gl.arange(0, M_PER_CONSUMER, layout=orow_layout)

    BH = num_tiles // num_m_blocks
    kv_count = 0
    tile_count = 0
    turn_count = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        off_b, off_h, start_m = _tile_coords(tile, num_m_blocks, H, BH, heads_per_group)
        row0 = start_m + CONSUMER * M_PER_CONSUMER
        rows = row0 + row_offs
        n_blocks, full_hi = _kv_blocks(start_m, N_CTX_K, diag_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)

        m_i = gl.full([M_PER_CONSUMER], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.zeros([M_PER_CONSUMER], gl.float32, layout=row_layout)
        acc = gl.zeros([M_PER_CONSUMER, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([M_PER_CONSUMER, BLOCK_N], gl.float32, layout=s_layout)

        mbarrier.wait(q_ready.index(CONSUMER), tile_count & 1)
        if n_blocks > 0:
            # prologue: S_0 = Q K_0^T and its softmax; no PV yet
            stage = kv_count % NUM_STAGES
            mbarrier.wait(k_ready.index(stage), (kv_count // NUM_STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(my_turn, (turn_count & 1) ^ (1 - CONSUMER))
            k_t = k_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            s_tok = warpgroup_mma(q_smem, k_t, s_zero, use_acc=False, is_async=True)
            if PINGPONG:
                mbarrier.arrive(next_turn, count=1)
                turn_count += 1
            s_raw = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
            mbarrier.arrive(k_empty.index(stage), count=1)
            if n_blocks == 1:
                mbarrier.arrive(q_empty.index(CONSUMER), count=1)
            p, alpha, m_i, l_i = _softmax_step(s_raw, m_i, l_i, 0, rows, full_hi, N_CTX_K,
                                               diag_offset, qk_scale, BLOCK_N, IS_CAUSAL)
            p_op = _as_mma_operand(p, dtype, p_layout)
            v_stage = stage
            v_phase = (kv_count // NUM_STAGES) & 1
            kv_count += 1

            # steady state: issue S_j and PV_{j-1} together; softmax of S_j overlaps PV_{j-1}
            for j in range(1, n_blocks):
                stage = kv_count % NUM_STAGES
                mbarrier.wait(k_ready.index(stage), (kv_count // NUM_STAGES) & 1)
                mbarrier.wait(v_ready.index(v_stage), v_phase)
                if PINGPONG:
                    mbarrier.wait(my_turn, (turn_count & 1) ^ (1 - CONSUMER))
                k_t = k_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
                s_tok = warpgroup_mma(q_smem, k_t, s_zero, use_acc=False, is_async=True)
                v_smem = v_bufs.index(v_stage).reshape([BLOCK_N, HEAD_DIM])
                o_tok = warpgroup_mma(p_op, v_smem, acc, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(next_turn, count=1)
                    turn_count += 1
                # S_j is the older group: wait for it, leave PV_{j-1} in flight
                s_raw = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
                mbarrier.arrive(k_empty.index(stage), count=1)
                p, alpha, m_i, l_i = _softmax_step(s_raw, m_i, l_i, j * BLOCK_N, rows, full_hi,
                                                   N_CTX_K, diag_offset, qk_scale, BLOCK_N, IS_CAUSAL)
                # Here, after the softmax, on purpose: this branch ends a basic block. ptxas moves the
                # PV wait below (WARPGROUP.DEPBAR) up to the top of its basic block; with this branch
                # before the softmax, that was above every exp2 and the softmax waited for PV_{j-1}
                # (SASS, triton 3.6 ptxas, 2026-12-03). Placed here, all 64 exp2 a thread run while
                # PV_{j-1} is in flight (tests/lowering/test_gluon_fwd.py checks the SASS).
                if j == n_blocks - 1:
                    mbarrier.arrive(q_empty.index(CONSUMER), count=1)  # the last S of the tile is done
                # PV_{j-1} done (p_op stays alive until here: the wgmma reads it from registers)
                acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
                mbarrier.arrive(v_empty.index(v_stage), count=1)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
                p_op = _as_mma_operand(p, dtype, p_layout)
                v_stage = stage
                v_phase = (kv_count // NUM_STAGES) & 1
                kv_count += 1

            # tail: PV of the last key tile
            mbarrier.wait(v_ready.index(v_stage), v_phase)
            if PINGPONG:
                mbarrier.wait(my_turn, (turn_count & 1) ^ (1 - CONSUMER))
            v_smem = v_bufs.index(v_stage).reshape([BLOCK_N, HEAD_DIM])
            o_tok = warpgroup_mma(p_op, v_smem, acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(next_turn, count=1)
                turn_count += 1
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
            mbarrier.arrive(v_empty.index(v_stage), count=1)
        else:
            # no visible key tile (bottom-right causal with Tq > Tk): Q is not read
            mbarrier.arrive(q_empty.index(CONSUMER), count=1)

        # epilogue: normalize; rows that saw no visible key (l_i == 0) are "empty"
        empty = l_i == 0.0
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(gl.where(empty, 1.0, l_i))) * LN2)
        inv_l = gl.convert_layout(1.0 / gl.where(empty, 1.0, l_i), orow_layout)
        out = acc * gl.expand_dims(inv_l, 1)
        o_empty = gl.expand_dims(gl.convert_layout(empty, orow_layout), 1)
        if EMPTY_ROWS_NAN:
            out = gl.where(o_empty, float("nan"), out)
        else:
            out = gl.where(o_empty, 0.0, out)
        tma.store_wait(pendings=0)  # the previous tile's store has finished reading o_smem
        o_smem.store(out.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [off_b, off_h, row0, 0], o_bufs.index(CONSUMER))
        lse_rows = row0 + orow_offs
        gl.store(Lse + (off_b * H + off_h).to(gl.int64) * N_CTX_Q + lse_rows,
                 gl.convert_layout(lse, orow_layout), mask=lse_rows < N_CTX_Q)
        tile_count += 1
    tma.store_wait(pendings=0)


# ----------------------------------------------------------------------------------------- kernel


@gluon.jit
def _gluon_attn_fwd_kernel(
    q_desc, k_desc, v_desc, o_desc, Lse,
    H, GROUP, N_CTX_Q, N_CTX_K, diag_offset, qk_scale, num_m_blocks, num_tiles, heads_per_group,
    BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
    NUM_STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
    EMPTY_ROWS_NAN: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):
    """Persistent: grid = (min(#SMs, num_tiles),). Launch with num_warps=4 (the producer) and a
    maxnreg that lets the register split below fit (the launcher passes it)."""
    gl.static_assert(HEAD_DIM == 64 or HEAD_DIM == 128, "HEAD_DIM: 64 or 128 (swizzled TMA rows)")
    gl.static_assert(BLOCK_N % 16 == 0 and BLOCK_N >= 16 and BLOCK_N <= 256, "BLOCK_N: wgmma N in [16, 256], /16")
    gl.static_assert(q_desc.block_type.shape[2] == M_PER_CONSUMER, "q/o descriptors: blocks of 64 rows")
    gl.static_assert(k_desc.block_type.shape[2] == BLOCK_N, "k/v descriptors: blocks of BLOCK_N rows")
    gl.static_assert(q_desc.block_type.shape[3] == HEAD_DIM, "descriptor blocks span the head dim")
    gl.static_assert(NUM_STAGES >= 1, "NUM_STAGES >= 1")
    dtype: gl.constexpr = q_desc.dtype

    q_bufs = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    o_bufs = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + o_desc.block_type.shape, o_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)

    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_ready.index(c), count=1)
        mbarrier.init(q_empty.index(c), count=1)
        mbarrier.init(turn_bars.index(c), count=1)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        # a K or V slot is free once every consumer has arrived
        mbarrier.init(k_empty.index(s), count=NUM_CONSUMERS)
        mbarrier.init(v_empty.index(s), count=NUM_CONSUMERS)

    gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs,
                     q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                     H, GROUP, N_CTX_K, diag_offset, num_m_blocks, num_tiles, heads_per_group,
                     BLOCK_N, NUM_STAGES, IS_CAUSAL)),
        (_consumer, (q_bufs, k_bufs, v_bufs, o_bufs, o_desc, Lse,
                     q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn_bars,
                     H, N_CTX_Q, N_CTX_K, diag_offset, qk_scale, num_m_blocks, num_tiles, heads_per_group,
                     0, BLOCK_N, HEAD_DIM, NUM_STAGES, IS_CAUSAL, PINGPONG, EMPTY_ROWS_NAN)),
        (_consumer, (q_bufs, k_bufs, v_bufs, o_bufs, o_desc, Lse,
                     q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn_bars,
                     H, N_CTX_Q, N_CTX_K, diag_offset, qk_scale, num_m_blocks, num_tiles, heads_per_group,
                     1, BLOCK_N, HEAD_DIM, NUM_STAGES, IS_CAUSAL, PINGPONG, EMPTY_ROWS_NAN)),
    ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
