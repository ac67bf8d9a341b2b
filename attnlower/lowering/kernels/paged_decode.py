"""Triton kernels for `attnlower::paged_attention`: decode (Tq = 1) and chunked prefill (Tq > 1).

Where they run: CUDA tensors on the GPU; CPU tensors only through Triton's interpreter (TRITON_INTERPRET=1 set
before triton is imported) and only when ATTNLOWER_CPU_KERNELS=triton asks (else CPU runs lowering/reference.py).

Symbols (see docs/INTERFACES.md, "Semantics (paged)"):
  B            batch (sequences);        b = program's sequence
  Hq, Hkv      query / KV heads;         GROUP = Hq // Hkv query heads share one KV head
  Tq           queries per sequence;     query i sits at position pos = seq_len - Tq + i
  D            q/k head dim (HEAD_DIM). q·k runs over NUM_QK_CHUNKS chunks of QK_CHUNK dims: one chunk of the
               power of two >= max(D, 16) up to 256 dims (q then stays in registers for the whole key loop);
               past 256 (MLA's absorbed decode: 576 = 512 latent + 64 rope) chunks of 64, q's chunk re-read
               (from L1 / L2) per key tile
  Dv           v head dim (HEAD_DIM_V, up to 512), padded to the power of two HEAD_DIM_V_PAD: the accumulator,
               out and the split-KV workspace are Dv wide; v_cache may be any view (MLA: a prefix of the k pool)
  M            rows of one KV head's problem = GROUP * Tq; row r is query head
               kvh * GROUP + r // Tq, query r % Tq. All GROUP heads of a KV head are packed
               into the M dimension so every K/V tile loaded is shared by all of them, and
               row r's output sits at contiguous offset r * D of out[b, kvh * GROUP:, :, :].
  BLOCK_M      rows of M per program (>= 16: tl.dot's minimum)
  BLOCK_N      key tokens per inner-loop tile; independent of the cache's BLOCK_SIZE, so one
               tile may cover part of a cache block or span several
  BLOCK_SIZE   tokens per cache block: token t of sequence b lives in physical block
               block_table[b, t // BLOCK_SIZE] at slot t % BLOCK_SIZE
  k_cache, v_cache   [num_blocks, Hkv, BLOCK_SIZE, D] and [num_blocks, Hkv, BLOCK_SIZE, Dv]
  scale        softmax scale applied to q.k; SOFTCAP > 0 then applies softcap * tanh(s / softcap)
  alibi        s += slope[b?, h] * (t - pos)
  visible      t < seq_len and (not IS_CAUSAL or t <= pos) and (not HAS_WINDOW or t > pos - window)
  m, l, acc    online-softmax running max (log2 units), running sum, unnormalized output
  sinks        HAS_SINKS: one logit per query head (read as fp32) in the normalizer, adding no value: unsplit,
               the online softmax starts from it (m = sink * log2(e), l = 1); split, the partials never see it
               and the combine adds it once: M = max(max_s m_s, sink), L = sum_s l_s 2^(m_s - M)
               + 2^(sink - M). A row with no visible key then gives 0
  NUM_SPLITS   split-KV (flash-decoding): the key range of one program's rows is cut into
               num_splits contiguous, BLOCK_N-aligned chunks (grid axis 2); each writes its partial
               (m, l, acc) of R = B * Hq * Tq rows to one fp32 workspace (`_workspaces`), combined
               (`_combine_partials`) in one of two ways:
  FUSED_REDUCE the last split program to finish a tile combines the tile's rows itself, COMBINE_ROWS rows
               at a time (their partials loaded together): one launch.
               Each split program counts itself done in Counters[tile] (int32, one per
               (b, kvh, pid_m) tile, zero between launches: the last one resets it; see
               `_last_split_combines` for the memory ordering). Else (False, split):
               `_paged_reduce_kernel`, a second launch, one program per output row.
  COMBINE_ROWS power of two: the rows the fused combine loads and combines at once (1 without FUSED_REDUCE);
               the plan keeps COMBINE_ROWS * SPLITS_PAD * HEAD_DIM_V_PAD within a budget unless one row already
               exceeds it (configs.paged_combine_rows)
  SPLITS_PAD   power of two >= num_splits (>= 2): the combine's split axis (1, unused, in an attention
               kernel without FUSED_REDUCE)

  num_blocks   blocks in the pool; max_blocks: columns of block_table; capacity = max_blocks * BLOCK_SIZE
  CHECK_BOUNDS record bad inputs in Err (int32 [4], lowering/errors.py): bit 1 a block id outside
               [0, num_blocks), bit 2 seq_len > capacity, bit 4 seq_len < 0, bit 8 0 < seq_len < Tq
               (unless SHORT_SEQUENCES); Err[1] = smallest such b.
  SHORT_SEQUENCES  the call set empty_rows_nan (False / True): 0 < seq_len < Tq is computed, not reported; its
               queries at pos < 0 see no key (causal) and are empty rows
  EMPTY_ROWS_NAN   an empty row (no visible key and no finite sink: l = 0) is written NaN instead of 0; split,
               the combine decides it from the combined L
               Whatever CHECK_BOUNDS says, reads are clamped: seq_len to [0, capacity], and a bad
               block id's tokens are masked (never loaded), so no input makes the kernel read
               outside its tensors.

  TABLE_AHEAD  read each tile's physical blocks one iteration ahead (a loop-carried value): K and V then depend on no
               load of their own iteration and Triton's pipeliner buffers them as direct loads, num_stages - 1 tiles
               deep; read in the same iteration they are indirect loads, given a pipeline distance of
               (num_stages - 1) // 2: one K and one V buffer up to 4 stages (triton's AssignLatencies). The plan
               sets it from 3 stages on; at 2 it buys no buffer and costs registers (sm_90 compile, triton 3.6,
               128 keys, 8 warps: 166 registers against 106).
  LAUNCH_DEPENDENTS  programmatic dependent launch (sm_90+, the separate reduce launched with `launch_pdl`): after its
               key loop each program lets the reduce kernel be scheduled (`griddepcontrol.launch_dependents`); the
               reduce's WAIT_PRIOR (`griddepcontrol.wait`) then waits for this whole grid and its memory. What it
               saves: the second launch's latency (configs.PAGED_PDL says whether the plan uses it).
  DOT_FP32_INPUTS  upcast q, k, v (and P after its rounding to v's dtype) to fp32 before tl.dot:
               set on CPU, where Triton's interpreter computes bf16 x bf16 dots wrongly
               (triton 3.9 returns garbage); the products of the rounded values are the same.

Scores are fp32 and use exp2 (scores are scaled by LOG2E after softcap/alibi). An empty row
(no visible key, no finite sink) keeps m = -inf and l = 0 and is written as 0, or NaN with EMPTY_ROWS_NAN.
"""
import triton
import triton.language as tl

try:   # grid dependency control (PDL), triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:   # older triton: never launched with PDL (plan.paged_plan asks for it only where these exist)
    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass

from attnlower.lowering.kernels.common import _as_fp32

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def _tanh(x):
    # tanh through exp: portable across the compiled backend and the interpreter (libdevice's
    # tanh is CUDA-only). exp overflow to inf for large |x| still yields exactly +-1.
    e = tl.exp(2.0 * x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _flag(err_ptr, kinds, b, num_blocks, capacity):
    """Record bad inputs of sequence b (lowering/errors.py reads Err lazily, never on the hot path)."""
    tl.atomic_or(err_ptr, kinds)
    tl.atomic_min(err_ptr + 1, b)
    tl.store(err_ptr + 2, num_blocks)
    tl.store(err_ptr + 3, capacity)


@triton.jit
def _block_ids(bt_row, tok, seq_len, stride_btn, BLOCK_SIZE: tl.constexpr):
    """The physical block of each token of `tok` (BLOCK_SIZE is constexpr: // is cheap); 0 at and past seq_len."""
    return tl.load(bt_row + (tok // BLOCK_SIZE) * stride_btn, mask=tok < seq_len, other=0)


@triton.jit
def _load_q_chunk(q_rows, offs_c, row_ok, stride_qd, c: tl.constexpr, HEAD_DIM: tl.constexpr,
                  QK_CHUNK: tl.constexpr, DOT_FP32_INPUTS: tl.constexpr):
    """Dims [c * QK_CHUNK, (c + 1) * QK_CHUNK) of the tile's q rows, [BLOCK_M, QK_CHUNK] (0 past HEAD_DIM)."""
    d = c * QK_CHUNK + offs_c
    q = tl.load(q_rows + d[None, :] * stride_qd, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32_INPUTS:
        q = q.to(tl.float32)
    return q


@triton.jit
def _load_k_chunk(k_cols, offs_c, tok_ok, stride_kd, c: tl.constexpr, HEAD_DIM: tl.constexpr,
                  QK_CHUNK: tl.constexpr, DOT_FP32_INPUTS: tl.constexpr):
    """The same dims of the tile's keys, transposed: [QK_CHUNK, BLOCK_N] (0 past HEAD_DIM and on masked tokens)."""
    d = c * QK_CHUNK + offs_c
    k = tl.load(k_cols + d[:, None] * stride_kd, mask=tok_ok[None, :] & (d[:, None] < HEAD_DIM), other=0.0)
    if DOT_FP32_INPUTS:
        k = k.to(tl.float32)
    return k


@triton.jit
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, alibi_ptr, sinks_ptr,
    out_ptr, ws_ptr, counters_ptr, err_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kn, stride_kh, stride_kt, stride_kd,
    stride_vn, stride_vh, stride_vt, stride_vd,
    stride_btb, stride_btn,
    stride_sl,
    stride_ab, stride_ah, stride_sink,
    stride_ob, stride_oh, stride_ot, stride_od,
    Hq, Hkv, Tq, rows_total, ws_plane,
    scale, softcap, window, num_splits, num_blocks, max_blocks,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, QK_CHUNK: tl.constexpr, NUM_QK_CHUNKS: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    SPLIT: tl.constexpr, FUSED_REDUCE: tl.constexpr, SPLITS_PAD: tl.constexpr, COMBINE_ROWS: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32_INPUTS: tl.constexpr, HAS_SINKS: tl.constexpr,
    SHORT_SEQUENCES: tl.constexpr, EMPTY_ROWS_NAN: tl.constexpr, TABLE_AHEAD: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 rows")
    tl.static_assert(HEAD_DIM <= QK_CHUNK * NUM_QK_CHUNKS, "the q·k chunks must cover HEAD_DIM")
    tl.static_assert(HEAD_DIM_V <= HEAD_DIM_V_PAD, "HEAD_DIM_V_PAD must cover HEAD_DIM_V")
    tl.static_assert(SPLIT or not FUSED_REDUCE, "FUSED_REDUCE combines split partials: it needs SPLIT")

    # fp32 whatever the caller typed them (Inductor passes fp64, see common._as_fp32)
    scale, softcap = _as_fp32(scale), _as_fp32(softcap)
    pid_bh = tl.program_id(0)           # b * Hkv + kvh
    pid_m = tl.program_id(1)            # tile of M rows
    pid_s = tl.program_id(2)            # split index (0 when not SPLIT)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    rows_m = GROUP * Tq

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, QK_CHUNK)           # q/k dims of one chunk
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < rows_m
    dv_ok = offs_dv < HEAD_DIM_V
    g = offs_m // Tq
    qi = offs_m % Tq
    head = kvh * GROUP + g

    seq_len = tl.load(seq_lens_ptr + b * stride_sl).to(tl.int32)
    capacity = max_blocks * BLOCK_SIZE
    if CHECK_BOUNDS:
        bad_len = tl.where(seq_len < 0, 4, 0) | tl.where(seq_len > capacity, 2, 0)
        if SHORT_SEQUENCES:   # the call opted in: its queries before the first token are empty rows
            short = bad_len * 0
        else:                 # queries before the sequence's first token: an error
            short = tl.where((seq_len > 0) & (seq_len < Tq), 8, 0)
        if ((bad_len | short) != 0) & (pid_m == 0) & (pid_s == 0) & (kvh == 0):  # once per sequence
            _flag(err_ptr, bad_len | short, b, num_blocks, capacity)
        len_ok = bad_len == 0  # a bad length makes the table's padding look used: report the length only
    seq_len = tl.minimum(tl.maximum(seq_len, 0), capacity)   # never index past the table
    pos = seq_len - Tq + qi                                  # [BLOCK_M]

    # q's rows (int64: large q views overflow int32); one chunk: loaded once, kept for the whole key loop
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh \
        + qi.to(tl.int64)[:, None] * stride_qt
    q = _load_q_chunk(q_rows, offs_c, row_ok, stride_qd, 0, HEAD_DIM, QK_CHUNK, DOT_FP32_INPUTS)

    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + b * stride_ab + head * stride_ah, mask=row_ok, other=0.0).to(tl.float32)

    # Key range this tile of rows can see: [lo, hi). Visiting only it is what makes sliding
    # windows and causal prefill skip whole cache blocks instead of masking them.
    pos_max = tl.max(tl.where(row_ok, pos, -1), axis=0)
    pos_min = tl.min(tl.where(row_ok, pos, seq_len), axis=0)
    hi = seq_len
    if IS_CAUSAL:
        hi = tl.minimum(hi, pos_max + 1)
    lo = pos_min * 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, pos_min - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N                        # tiles aligned to BLOCK_N
    n_tiles = tl.maximum(tl.cdiv(hi - lo, BLOCK_N), 0)
    if SPLIT:
        tiles_per_split = tl.cdiv(n_tiles, num_splits)
        start = lo + pid_s * tiles_per_split * BLOCK_N
        end = tl.minimum(hi, start + tiles_per_split * BLOCK_N)
    else:
        start = lo
        end = lo + n_tiles * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS and not SPLIT:   # the sink as a virtual key already seen (split: the combine adds it once)
        sink = tl.load(sinks_ptr + head * stride_sink, mask=row_ok, other=float("-inf")).to(tl.float32) * LOG2E
        m_i = sink
        l_i = tl.where(sink == float("-inf"), 0.0, 1.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PAD], dtype=tl.float32)

    kv_head_off_k = kvh.to(tl.int64) * stride_kh
    kv_head_off_v = kvh.to(tl.int64) * stride_vh
    bt_row = block_table_ptr + b.to(tl.int64) * stride_btb

    if CHECK_BOUNDS:
        bad_seen = tl.zeros([BLOCK_N], dtype=tl.int32)
    if TABLE_AHEAD:   # the first tile's physical blocks (read one tile ahead: see TABLE_AHEAD above)
        phys_next = _block_ids(bt_row, start + offs_n, seq_len, stride_btn, BLOCK_SIZE)
    for start_n in range(start, end, BLOCK_N):
        tok = start_n + offs_n                                 # [BLOCK_N] token positions
        tok_ok = tok < seq_len
        if TABLE_AHEAD:   # this tile's, read by the iteration before; the next tile's now (past the last: unused)
            phys = phys_next.to(tl.int64)
            phys_next = _block_ids(bt_row, tok + BLOCK_N, seq_len, stride_btn, BLOCK_SIZE)
        else:
            phys = _block_ids(bt_row, tok, seq_len, stride_btn, BLOCK_SIZE).to(tl.int64)
        bad_block = tok_ok & ((phys < 0) | (phys >= num_blocks))
        if CHECK_BOUNDS:
            bad_seen |= bad_block.to(tl.int32)                 # reported once, after the loop
        tok_ok = tok_ok & ~bad_block                           # a bad block's tokens are never loaded
        phys = tl.where(bad_block, 0, phys)
        slot = (tok % BLOCK_SIZE).to(tl.int64)
        # K chunks loaded already transposed, [QK_CHUNK, BLOCK_N]
        k_cols = k_ptr + phys[None, :] * stride_kn + kv_head_off_k + slot[None, :] * stride_kt
        s = tl.dot(q, _load_k_chunk(k_cols, offs_c, tok_ok, stride_kd, 0, HEAD_DIM, QK_CHUNK, DOT_FP32_INPUTS),
                   input_precision=DOT_PRECISION)
        for c in tl.static_range(1, NUM_QK_CHUNKS):
            q_c = _load_q_chunk(q_rows, offs_c, row_ok, stride_qd, c, HEAD_DIM, QK_CHUNK, DOT_FP32_INPUTS)
            s = tl.dot(q_c, _load_k_chunk(k_cols, offs_c, tok_ok, stride_kd, c, HEAD_DIM, QK_CHUNK, DOT_FP32_INPUTS),
                       s, input_precision=DOT_PRECISION)
        s = s * scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        if HAS_ALIBI:
            s += slope[:, None] * (tok[None, :] - pos[:, None]).to(tl.float32)
        visible = tok_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            visible &= tok[None, :] <= pos[:, None]
        if HAS_WINDOW:
            visible &= tok[None, :] > pos[:, None] - window
        s = tl.where(visible, s * LOG2E, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # an all-masked row so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]

        v_off = phys[:, None] * stride_vn + kv_head_off_v + slot[:, None] * stride_vt + offs_dv[None, :] * stride_vd
        v = tl.load(v_ptr + v_off, mask=tok_ok[:, None] & dv_ok[None, :], other=0.0)
        p_low = p.to(v.dtype)           # P rounded to V's dtype, as the tensor-core dot takes it
        if DOT_FP32_INPUTS:
            acc = tl.dot(p_low.to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(p_low, v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    if LAUNCH_DEPENDENTS:   # the reduce kernel (launched with PDL) may start; it waits for this grid in gdc_wait
        gdc_launch_dependents()
    if CHECK_BOUNDS:
        if (tl.max(bad_seen, axis=0) > 0) & len_ok & (pid_m == 0) & (kvh == 0):
            _flag(err_ptr, 1, b, num_blocks, capacity)

    # global row (b, h, i) = (b * Hkv + kvh) * M + r, contiguous in r
    row_global = pid_bh.to(tl.int64) * rows_m + offs_m
    if SPLIT:
        m_ws_ptr, l_ws_ptr, acc_ws_ptr = _workspaces(ws_ptr, ws_plane, HEAD_DIM_V)
        ws_row = pid_s.to(tl.int64) * rows_total + row_global
        tl.store(m_ws_ptr + ws_row, m_i, mask=row_ok)
        tl.store(l_ws_ptr + ws_row, l_i, mask=row_ok)
        tl.store(acc_ws_ptr + ws_row[:, None] * HEAD_DIM_V + offs_dv[None, :], acc,
                 mask=row_ok[:, None] & dv_ok[None, :])
        if FUSED_REDUCE:
            counter = counters_ptr + pid_bh * tl.num_programs(1) + pid_m    # this tile's (b, kvh, pid_m)
            if _last_split_combines(counter, num_splits):
                # the tile's rows COMBINE_ROWS at a time: each batch's partials are loaded together
                tile_end = tl.minimum(rows_m, (pid_m + 1) * BLOCK_M)
                if COMBINE_ROWS == 1:
                    for r in range(pid_m * BLOCK_M, tile_end):
                        _combine_row(out_ptr, m_ws_ptr, l_ws_ptr, acc_ws_ptr, sinks_ptr,
                                     pid_bh.to(tl.int64) * rows_m + r, b, kvh * GROUP + r // Tq, r % Tq,
                                     stride_ob, stride_oh, stride_ot, stride_od, stride_sink, rows_total, num_splits,
                                     HEAD_DIM_V, HEAD_DIM_V_PAD, SPLITS_PAD, HAS_SINKS, EMPTY_ROWS_NAN)
                else:
                    offs_r = tl.arange(0, COMBINE_ROWS)
                    for r0 in range(pid_m * BLOCK_M, tile_end, COMBINE_ROWS):
                        r = r0 + offs_r
                        _combine_rows(out_ptr, m_ws_ptr, l_ws_ptr, acc_ws_ptr, sinks_ptr,
                                      pid_bh.to(tl.int64) * rows_m + r, r < tile_end, b + r * 0,
                                      kvh * GROUP + r // Tq, r % Tq, stride_ob, stride_oh, stride_ot, stride_od,
                                      stride_sink, rows_total, num_splits, HEAD_DIM_V, HEAD_DIM_V_PAD, SPLITS_PAD,
                                      HAS_SINKS, EMPTY_ROWS_NAN)
                # every split of this tile has counted itself: zero it for the next launch (graph-safe, no memset)
                tl.store(counter, 0)
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]    # empty rows: acc = 0, write 0
        if EMPTY_ROWS_NAN:
            out = tl.where((l_i > 0.0)[:, None], out, float("nan"))
        # out[b, head, qi, :] through its strides: it has q's layout (lowering/launch_paged.py)
        o_off = (b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh
                 + qi.to(tl.int64)[:, None] * stride_ot + offs_dv[None, :] * stride_od)
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _workspaces(ws_ptr, ws_plane, HEAD_DIM_V: tl.constexpr):
    """(m, l, acc) of the split partials in the one fp32 workspace (lowering/launch_paged.py allocates it): acc
    [num_splits * rows_total, HEAD_DIM_V] from its start, then m and l, one plane of ws_plane elements each (a
    multiple of 16 >= num_splits * rows_total: each part starts 64-byte aligned)."""
    acc_ws_ptr = ws_ptr
    m_ws_ptr = ws_ptr + tl.cast(ws_plane, tl.int64) * HEAD_DIM_V   # tl.cast: Inductor may pass a constant
    return m_ws_ptr, m_ws_ptr + ws_plane, acc_ws_ptr


@triton.jit
def _last_split_combines(counter_ptr, num_splits):
    """Count this split program done in its tile's counter; True for the last of the num_splits to finish.

    Why the last one then sees every split's partials (the PTX memory model; the pattern of CUDA's cooperative-groups
    grid sync and CUTLASS's semaphore: barrier, then one thread's gpu-scope release):
      - a scalar tl.atomic_add runs once per program, in thread 0, and Triton broadcasts its result to the other
        threads through shared memory behind a bar.sync (triton 3.6's sm_90 PTX: `@p atom.global.gpu.acq_rel.add.u32`,
        `@p st.shared`, `bar.sync 0`, where p = (tid == 0));
      - release: the program's threads stored their partials; `debug_barrier` (bar.sync) orders all those stores
        before thread 0's increment, a gpu-scope release (sem="acq_rel", scope="gpu"), which is cumulative: it makes
        visible at gpu scope every store ordered before it, the other threads' included;
      - acquire: the increment that returns num_splits - 1 is the last in the counter's modification order, so it
        reads from the release sequence of every other split's increment, and as an acquire it synchronizes with
        them all; the broadcast's bar.sync orders it before every thread's loads of the partials;
      - those loads go through L2 (`_combine_row`'s ".cg"): the other SMs' stores were never in this SM's L1.
    Triton's interpreter runs the programs one after another, so the CPU tests cannot show a race: the GPU suite runs
    the fused path on the H200.
    """
    tl.debug_barrier()
    done_before = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return done_before == num_splits - 1


@triton.jit
def _combine_partials(m, l, acc, sink, SPLIT_AXIS: tl.constexpr, HAS_SINKS: tl.constexpr,
                      EMPTY_ROWS_NAN: tl.constexpr):
    """softmax(s) @ v of rows from their splits' partials (m, l over the split axis SPLIT_AXIS; acc with the head dim
    after it) and their sinks (log2 units, -inf: none), added once: M = max(max_s m_s, sink), L = sum_s l_s 2^(m_s - M)
    + 2^(sink - M), out = sum_s acc_s 2^(m_s - M) / L. One row ([S], [S, D]: SPLIT_AXIS 0) or R rows ([R, S],
    [R, S, D]: 1)."""
    m_max = tl.max(m, axis=SPLIT_AXIS)
    if HAS_SINKS:
        m_max = tl.maximum(m_max, sink)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)    # all splits empty: weights 0
    w = tl.exp2(m - tl.expand_dims(m_safe, SPLIT_AXIS))
    l_sum = tl.sum(l * w, axis=SPLIT_AXIS)
    if HAS_SINKS:
        l_sum += tl.exp2(sink - m_safe)
    out = tl.sum(acc * tl.expand_dims(w, SPLIT_AXIS + 1), axis=SPLIT_AXIS) \
        / tl.expand_dims(tl.where(l_sum > 0.0, l_sum, 1.0), SPLIT_AXIS)
    if EMPTY_ROWS_NAN:   # every split empty and no finite sink: the row saw no key
        out = tl.where(tl.expand_dims(l_sum > 0.0, SPLIT_AXIS), out, float("nan"))
    return out


@triton.jit
def _combine_row(out_ptr, m_ws_ptr, l_ws_ptr, acc_ws_ptr, sinks_ptr, row, b, h, i,
                 stride_ob, stride_oh, stride_ot, stride_od, stride_sink, rows_total, num_splits,
                 HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
                 HAS_SINKS: tl.constexpr, EMPTY_ROWS_NAN: tl.constexpr):
    """Combine the num_splits partials of workspace row `row` = (b * Hq + h) * Tq + i (and the sink, once), written
    to out[b, h, i, :] through out's strides (q's layout): the separate reduce's program, and the fused combine one
    row at a time (COMBINE_ROWS 1).

    The partials are loaded through L2 (".cg", bypassing L1): in the fused mode other SMs stored them during this
    launch (`_last_split_combines`); they are read once, so L1 would not help the separate reduce either."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_V_PAD)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM_V
    ws_row = offs_s.to(tl.int64) * rows_total + row
    m = tl.load(m_ws_ptr + ws_row, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(l_ws_ptr + ws_row, mask=s_ok, other=0.0, cache_modifier=".cg")
    acc = tl.load(acc_ws_ptr + ws_row[:, None] * HEAD_DIM_V + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
    sink = float("-inf")
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h * stride_sink).to(tl.float32) * LOG2E
    out = _combine_partials(m, l, acc, sink, 0, HAS_SINKS, EMPTY_ROWS_NAN)
    o_off = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_ot + offs_d * stride_od
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _combine_rows(out_ptr, m_ws_ptr, l_ws_ptr, acc_ws_ptr, sinks_ptr, row, row_ok, b, h, i,
                  stride_ob, stride_oh, stride_ot, stride_od, stride_sink, rows_total, num_splits,
                  HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
                  HAS_SINKS: tl.constexpr, EMPTY_ROWS_NAN: tl.constexpr):
    """`_combine_row` of R rows at once (row, row_ok, b, h, i: [R]), their partials loaded together: [R, SPLITS_PAD]
    m and l, [R, SPLITS_PAD, HEAD_DIM_V_PAD] acc (the fused combine, COMBINE_ROWS > 1). Not for one row: compiled
    for sm_90 (triton 3.6), a [1, S, D] tile took more registers than `_combine_row`'s [S, D] (MLA's fused decode:
    173 against 122)."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_V_PAD)
    d_ok = offs_d < HEAD_DIM_V
    ws_rows = offs_s.to(tl.int64)[None, :] * rows_total + row[:, None]              # [R, S]
    rs_ok = row_ok[:, None] & (offs_s < num_splits)[None, :]
    m = tl.load(m_ws_ptr + ws_rows, mask=rs_ok, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(l_ws_ptr + ws_rows, mask=rs_ok, other=0.0, cache_modifier=".cg")
    acc = tl.load(acc_ws_ptr + ws_rows[:, :, None] * HEAD_DIM_V + offs_d[None, None, :],
                  mask=rs_ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
    sink = tl.full(row_ok.shape, float("-inf"), tl.float32)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h * stride_sink, mask=row_ok, other=float("-inf")).to(tl.float32) * LOG2E
    out = _combine_partials(m, l, acc, sink, 1, HAS_SINKS, EMPTY_ROWS_NAN)
    o_off = (b.to(tl.int64)[:, None] * stride_ob + h.to(tl.int64)[:, None] * stride_oh
             + i.to(tl.int64)[:, None] * stride_ot + offs_d[None, :] * stride_od)
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_reduce_kernel(
    out_ptr, ws_ptr, sinks_ptr,
    stride_ob, stride_oh, stride_ot, stride_od, stride_sink,
    Hq, Tq, rows_total, ws_plane, num_splits,
    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr, HAS_SINKS: tl.constexpr, EMPTY_ROWS_NAN: tl.constexpr,
    WAIT_PRIOR: tl.constexpr,
):
    """The two-launch split-KV path (FUSED_REDUCE off): one program per output row combines its num_splits
    partials, after `_paged_attn_kernel` has finished writing them (stream order; with WAIT_PRIOR, launched with
    programmatic dependent launch: its programs may start before, and wait here for that grid and its stores)."""
    if WAIT_PRIOR:
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)      # (b * Hq + h) * Tq + i
    m_ws_ptr, l_ws_ptr, acc_ws_ptr = _workspaces(ws_ptr, ws_plane, HEAD_DIM_V)
    _combine_row(out_ptr, m_ws_ptr, l_ws_ptr, acc_ws_ptr, sinks_ptr, row, row // (Hq * Tq), (row // Tq) % Hq,
                 row % Tq, stride_ob, stride_oh, stride_ot, stride_od, stride_sink, rows_total, num_splits,
                 HEAD_DIM_V, HEAD_DIM_V_PAD, SPLITS_PAD, HAS_SINKS, EMPTY_ROWS_NAN)
