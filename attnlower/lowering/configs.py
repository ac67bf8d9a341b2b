"""Block sizes, warps and stages for every kernel, in one place.

Each launcher asks one function here for its configuration. Every constant says which
measurement chose it (GPU, shape, date) or that it is a starting point awaiting one.

Not here: which kernel the dense forward launches on Hopper (the Gluon one or `_flash_fwd_kernel`) and the Gluon
config it then takes: `plan.choose_forward_kernel`, with the H200 measurement beside its constants.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelConfig:
    """A launch configuration: tile sizes are constexprs of the kernel, warps/stages go to the launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# ---------------------------------------------------------------------------------------------
# Dense attention: flash / sliding window (kernels/flash_fwd.py, kernels/flash_bwd.py, launch.py)
# ---------------------------------------------------------------------------------------------

# Triton's interpreter (CPU): the smallest tiles tl.dot takes, so that the small odd test shapes
# still span several query and key blocks (exercising the masked / unmasked block split).
_FLASH_INTERPRET = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)

# GPU tables, keyed by padded head dim upper bound -> (block_m, block_n, num_warps, num_stages).
# Forward: measured on an H200 (torch 2.11, triton 3.6, bf16, bench/flash_tune.py, 2026-12-01, one run,
# bench/RESULTS.md): 9 tile / warp / stage choices per head dim at N = 1024, 4096, 16384 (B*N = 16k
# tokens, H*D = 2048), causal and not, and at T = 197, 257, 577 (B*H = 768). When the caller does not
# pass seq_len, 64x64 tiles, 4 warps, 3 stages: within 0.90 (D=64) / 0.81 (D=128, T=197 only; else
# 0.94) of the best measured choice at every shape, and 0.98-1.16x the previous 128x64 tiles
# (D=64: 4 warps, D=128: 8 warps) except D=64 N=16384 non-causal (0.95x: 386 vs 407 TFLOP/s).
# D=256 is untimed: FlashAttention-2's smaller tiles for head_dim 256 (fp32 accumulator pressure).
_FLASH_FWD = {64: (64, 64, 4, 3), 128: (64, 64, 4, 3), 256: (64, 64, 8, 2)}
# Sliding window (window > 0): the tiles bench/sliding.py measured on H100 (torch 2.11, triton 3.6,
# 2026-11-23, D=128: 0.82-1.09x flex); the 2026-12-01 sweep above covered no window, so they stay.
_FLASH_FWD_WINDOW = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 64, 8, 2)}
# With seq_len (the key length Tk) known, no window, 16-bit inputs (fp32 keeps the table above, whose
# halved key tile is sure to fit: the 128x128 entry halved to 128x64 fp32 needs 229888 of the 232448
# bytes of shared memory under triton 3.9, too close to trust on another version): (largest Tk, causal (None: either), tiles), first match wins.
# Same measurement. Each bucket names the shapes where its entry was the fastest; the boundaries
# between measured lengths (320 between 257 and 577; 1024 to 4096) are not measured.
_FLASH_FWD_BY_LEN = {
    # T=197 / 257: 143 / 173 TFLOP/s (64x64: 136 / 155; cuDNN 156 / 142)
    # N=1024 and T=577 (577: 270 vs 280 for 128x64x8x3, within one run's noise of ~4%)
    # N=4096 / 16384: 414 / 424 non-causal, 377 / 405 causal (64x64: 403 / 386, 363 / 395)
    64: [(320, None, (64, 32, 4, 3)), (1024, None, (64, 64, 4, 3)), (None, None, (128, 64, 8, 3))],
    # T=197: 177 TFLOP/s (64x64: 143; cuDNN 238); N=1024: 431 / 325 (128x64x8x3: 394 / 289)
    # N=4096 / 16384 non-causal: 485 / 489 (64x64: 458 / 466); causal 64x64: 415 / 496 (128x128: 417 / 472)
    128: [(320, None, (128, 32, 8, 3)), (1024, None, (64, 64, 4, 3)), (None, False, (128, 128, 8, 3)),
          (None, True, (64, 64, 4, 3))],
}
# dK/dV tiles. H100 (2026-11-23) gave a wrong dK with the tutorial's 32x128 tiles and 2-3 stages.
# bench/bwd_tiles_repro.py on an H200 (torch 2.11, triton 3.6, 2026-12-01) isolated it: a race in the
# software-pipelined code Triton 3.6 emits for this kernel, not the tile shape and not this kernel's
# indexing. With num_stages=1 every shape tried is right and bit-for-bit deterministic (32x128, 32x64,
# 64x64, 64x128; D=64 and 128); with 2-3 stages 32x128 gives dK errors of 0.1-0.3 of max|dK| that change
# from run to run (D=64 4 warps: in key rows 64-127 of each 128-key tile; D=128 causal: with 8
# warps, not 4), while 64x64 with 2-3 stages stayed right. 64x64 with one stage is also the fastest
# choice measured (fwd+bwd, B=4 H=16 N=4096: 3.20 ms D=64, 3.36 ms D=128 causal; 32x128: 3.58 / 5.88 ms);
# 64x64 with 3 stages was 7% faster at D=64 (2.97 ms) but is pipelined code of the kind that raced,
# so it waits until that race is understood.
_FLASH_BWD_KV = {64: (64, 64, 4, 1), 128: (64, 64, 4, 1), 256: (64, 64, 8, 1)}
# dQ tiles: correct on H100 (dQ error = SDPA's, bench/accuracy.py, 2026-11-23); untimed.
_FLASH_BWD_Q = {64: (128, 32, 4, 3), 128: (128, 32, 8, 2), 256: (64, 32, 8, 2)}
# fp32 tiles hold twice the bytes: halve the key tile (forward, dQ) / the query tile (dK/dV).
# unmeasured starting point (no GPU this session); autotune/sweep with bench/flash.py
_FLASH_FP32_SHRINK = 2
# A window narrower than this many keys wastes most of a 128-key tile on masked pairs: use 64.
# unmeasured starting point (no GPU this session); autotune/sweep with bench/sliding.py
_FLASH_NARROW_WINDOW = 256
# Before Hopper (sm_80/86/89) there is less shared memory per SM: at most 2 stages.
# unmeasured starting point (no GPU this session)
_FLASH_PRE_HOPPER_MAX_STAGES = 2

_FLASH_TABLES = {"fwd": _FLASH_FWD, "bwd_kv": _FLASH_BWD_KV, "bwd_q": _FLASH_BWD_Q}
# The 256-wide class with 16-bit inputs (MLA's Dqk 192 / Dv 128, D 256): bench/wide_tiles.py on an H200 (torch 2.11,
# triton 3.6, bf16, causal, H 16, B=4 T=1024 and B=1 T=4096, 2026-12-04, bench/RESULTS.md). Forward 128x64x8x2:
# 0.110 / 0.317 ms at 192/128 (the table's 64x64x8x2: 0.186 / 0.574; the best, 64x32x4x3 at T=4096, 0.303) and the
# fastest at 256/256 (0.134 / 0.370 vs 0.63 at T=4096). dK/dV 128x64x8x1: the fastest of five in all four cases
# (0.52 / 1.60 ms at 192/128; 64x64x8x1: 0.67 / 2.13). dQ 128x64x8x1: the fastest at 256/256 (0.50 / 1.40) and within
# 5% of the fastest at 192/128 (0.365 / 1.042 vs 64x32x4x2's 0.347 / 1.031; the table's 64x32x8x2: 0.52 / 1.59).
# fp32 keeps the table above (unmeasured there).
_FLASH_WIDE_16BIT = {"fwd": (128, 64, 8, 2), "bwd_kv": (128, 64, 8, 1), "bwd_q": (128, 64, 8, 1)}


def flash_config(arch: int, head_dim: int, dtype, causal: bool, window: int, direction: str,
                 seq_len: int | None = None, bias_bytes: int = 0, shared_limit: int = 0) -> KernelConfig:
    """Tiles of the dense kernels.

    arch: SM version (90 = Hopper), 0 for Triton's interpreter. direction: "fwd" (forward, also the
    backward preprocess), "bwd_kv" (dK/dV kernel: block_n keys held, block_m queries streamed) or
    "bwd_q" (dQ kernel: block_m queries held, block_n keys streamed). seq_len: the key length Tk,
    when the caller has it (the forward's measured tiles depend on it); None gives tiles chosen to
    be good across lengths. bias_bytes: the bias's element size (0: no bias; a bool mask is 1), whose tile the
    forward pipelines with K and V; shared_limit: the most shared memory a block may use (the target's; 0: no
    limit known), which the forward's stages are cut to. Any choice computes the same function: tiles only change
    speed.
    """
    if direction not in _FLASH_TABLES:
        raise ValueError(f"flash_config: expected direction in {sorted(_FLASH_TABLES)}, got {direction!r}")
    if arch == 0:
        return _FLASH_INTERPRET
    head_dim_pad = max(16, _next_power_of_2(head_dim))
    key = _by_head_dim_key(head_dim_pad)
    block_m, block_n, num_warps, num_stages = _FLASH_TABLES[direction][key]
    if key == 256 and dtype.itemsize == 2:
        block_m, block_n, num_warps, num_stages = _FLASH_WIDE_16BIT[direction]
    if direction == "fwd" and window > 0:
        block_m, block_n, num_warps, num_stages = _FLASH_FWD_WINDOW[key]
    elif direction == "fwd" and seq_len is not None and key in _FLASH_FWD_BY_LEN and dtype.itemsize == 2:
        for max_len, for_causal, tiles in _FLASH_FWD_BY_LEN[key]:
            if (max_len is None or seq_len <= max_len) and for_causal in (None, bool(causal)):
                block_m, block_n, num_warps, num_stages = tiles
                break
    if dtype.itemsize >= 4:
        if direction == "bwd_kv":
            block_m = max(16, block_m // _FLASH_FP32_SHRINK)
            if head_dim_pad > 128:
                # fp32 K, V, dK, dV tiles of 64 keys x 256 dims do not fit: sm_90 compile (triton 3.6, TF32 dots,
                # 32x64, 8 warps, 1 stage) needs 262144 bytes of shared memory, a block gets 232448
                # (tests/lowering/sm90_compile.py --fits, 2026-12-03). 32 keys: unmeasured speed.
                block_n = max(16, block_n // _FLASH_FP32_SHRINK)
        else:
            block_n = max(16, block_n // _FLASH_FP32_SHRINK)
    if 0 < window < _FLASH_NARROW_WINDOW and direction != "bwd_kv":
        block_n = min(block_n, 64)
    if arch < 90:
        num_stages = min(num_stages, _FLASH_PRE_HOPPER_MAX_STAGES)
    if direction == "fwd" and shared_limit:
        while num_stages > 1 and forward_shared_bytes(block_m, block_n, num_stages, head_dim_pad, dtype.itemsize,
                                                      bias_bytes) > shared_limit:
            num_stages -= 1
    return KernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def forward_shared_bytes(block_m: int, block_n: int, num_stages: int, head_dim_pad: int, itemsize: int,
                         bias_bytes: int) -> int:
    """The shared memory Triton 3.6 allocates for `_flash_fwd_kernel`: q's tile once, a K and a V tile per stage
    and a bias tile per stage but one. Exact for every 16-bit forward compiled for sm_90 on 2026-12-04 (tiles
    128x128x3, 128x128x2, 128x64x3, 64x64x3; no bias, bool, 16-bit and fp32 bias; .probe's compiles with
    tests/lowering/sm90_compile.py's recorder): 128x128x3 needs 229376 bytes without a bias, 262144 with a bool
    mask, 294912 with a 16-bit and 360448 with an fp32 bias, over the 232448 a block gets (a bench/modern.py dense
    bias at T=8192 failed to launch on the H200 that day). fp32 inputs need less than it says (TF32 tiles: 229888
    measured for 128x64x3 where it says 262144): an upper bound there. tests/lowering/sm90_compile.py --fits checks
    every planned launch against the compiler itself."""
    tile = head_dim_pad * itemsize
    return block_m * tile + num_stages * 2 * block_n * tile + (num_stages - 1) * block_m * block_n * bias_bytes


def _by_head_dim_key(head_dim_pad: int) -> int:
    """The smallest table key >= head_dim_pad (tables are keyed 64, 128, 256)."""
    for key in (64, 128, 256):
        if head_dim_pad <= key:
            return key
    raise NotImplementedError(f"flash kernels: expected head_dim <= 256, got padded {head_dim_pad}")


# ---------------------------------------------------------------------------------------------
# Paged attention (attnlower/lowering/kernels/paged_decode.py, launcher launch_paged.py)
# ---------------------------------------------------------------------------------------------

# tl.dot needs at least 16 rows; decode packs GROUP query heads (x Tq) into them.
# unmeasured starting point (no GPU this session); sweep with bench/paged.py
_PAGED_MIN_BLOCK_M = 16
# Rows per program once GROUP * Tq is large (chunked prefill): caps the fp32 accumulator at
# BLOCK_M x HEAD_DIM_PAD per program. unmeasured starting point (no GPU this session); sweep with bench/paged.py
# 512: a value head dim up to 512 (MLA's absorbed decode, Dv = 512; q·k then runs in 64-wide chunks): a
# [16, 512] fp32 accumulator. Unmeasured starting point (no GPU this session), fits sm_90
# (tests/lowering/sm90_compile.py --fits); sweep with bench/paged.py --mla.
_PAGED_MAX_BLOCK_M = {128: 64, 256: 32, 512: 16}        # keyed by padded head dim upper bound
# Key tokens per tile: 64 keeps K+V tiles of 2 stages at 64 KB (bf16, D=128) on Hopper; wider heads take 32 to stay
# within sm_90's shared memory (tests/lowering/sm90_compile.py --fits). Unmeasured for tiles of more than 16 rows
# (chunked prefill); decode tiles below.
_PAGED_BLOCK_N = {128: 64, 256: 32, 512: 32}
_PAGED_NUM_WARPS_SMALL = 4          # BLOCK_M * HEAD_DIM_PAD <= 8192; unmeasured starting point
_PAGED_NUM_WARPS_LARGE = 8
# Stages of the paged tiles other than decode's (below): 2. Measured only for decode tiles.
_PAGED_NUM_STAGES = 2
# Decode tiles (16 rows) of heads up to 128 wide: 64 keys, 3 stages, 8 warps. From 3 stages on the kernel reads the
# block table one tile ahead (TABLE_AHEAD, kernels/paged_decode.py), so K and V are double-buffered: 71680 bytes and
# 116 registers on sm_90, 2 CTAs per SM (triton 3.6; bench/RESULTS.md, 2026-12-04 night). bench/paged_sweep.py on the
# H200 (2026-12-04 late, /work/.device/2: torch 2.11, triton 3.6, bf16, Hq 32, Hkv 8, D 128, cache block 16, L 4096,
# under CUDA graphs, 66 candidates per batch size, each checked against SDPA first), ms at the split counts below:
#   B=1  16 splits: 64x3 0.0113, 128x2 0.0115, 128x3 0.0112 (32 splits: 0.0123, 0.0117, 0.0152)
#   B=8   4 splits: 64x3 0.0455 (the best of all 66), 128x2 0.0470, 128x3 0.0528
#   B=32  1 split:  64x3 0.1496, 128x2 0.1475 (the best), 128x3 0.2003 (one CTA per SM: 139264 bytes)
# 64x3 is within 2% of the best candidate without PDL at each batch size (at B=1 the best of all, 128x3 with PDL, took
# 0.0107: 5.6% less). Against the tile of before, 128x2: B=8 at 4 splits 3% faster, B=32 1.4% slower, B=1 at 16 splits
# 2% faster (the plan's own B=1 call, 32 splits of 128x2 before, timed 0.0111 then and 0.0114 now: within noise). A
# 64-key tile with 2 stages (one K and one V buffer) loses 15-37% to 64x3 wherever a program walks many tiles.
_PAGED_DECODE_BLOCK_N = 64
_PAGED_DECODE_NUM_STAGES = 3
_PAGED_DECODE_NUM_WARPS = 8
# A 512-wide accumulator (MLA decode): 8 warps. sm90_compile.py (triton 3.9, bf16, 576 / 512, 16x32 tiles, 2 stages,
# 2026-12-04): 4 warps spill 560-632 bytes per thread, 8 warps 40-48; speed unmeasured (no GPU this session).
_PAGED_WIDE_V = 512
# Split-KV: split a grid that leaves SMs idle into as many partitions as fit in one wave of _PAGED_PROGRAMS_PER_SM
# programs per SM (floor: a partial second wave costs a whole tile walk), never fewer than _PAGED_MIN_TOKENS_PER_SPLIT
# keys per split (the reduce pass and each split's q load stay small next to its K/V traffic), and no more than the
# reduce kernel's single tile holds. The same sweep (decode tiles above): B=8 (64 programs) timed 4 splits at 0.0455 ms,
# 8 at 0.0496 and 2 at 0.0573 (the ceiling rule of before chose 5: 0.0549 with 128x2 tiles); B=1 (8 programs), 64x3:
# 16 splits of 256 keys 0.0113, 32 of 128 0.0123, 8 of 512 0.0167.
_PAGED_PROGRAMS_PER_SM = 2
_PAGED_MIN_TOKENS_PER_SPLIT = 256
_PAGED_MAX_SPLITS = 64
# How a split call combines its partials: "fused" (the last split program of each tile combines it: one launch) or
# "separate" (`_paged_reduce_kernel`, a second launch). Measured on the H200 (torch 2.11, triton 3.6, 2026-12-04,
# bench/paged_sweep.py --reduce fused,separate, bf16 Hq 32 Hkv 8 D 128 L 4096, under CUDA graphs): fused is slower,
# B=1 32 splits 0.0172 vs 0.0111 ms, B=8 0.0628 (5 splits) vs 0.0470 (4), both with the 128x2 tiles and split rule of
# then (the sweep of the decode tiles above timed only the separate reduce): the last program combines its tile's rows
# one after another while the separate kernel combines every row in parallel. Separate stays the default; fused is
# kept selectable (paged_forward(reduce="fused")) for the next step: a combine spread over the tile's rows.
PAGED_REDUCE = "separate"
# The fused combine (kernels/paged_decode.py COMBINE_ROWS) loads the partials of several of a tile's rows at once,
# [rows, SPLITS_PAD, HEAD_DIM_V_PAD] fp32, instead of one row after another (why fused lost to separate above): at most
# _PAGED_COMBINE_ELEMENTS elements, the tile the per-row combine already loads for one row at 16 splits of MLA's
# 512-wide V. Compiled for sm_90 (triton 3.6, 2026-12-05, no spills; sm90_compile.py --fits checks every planned
# launch), bf16 Hq 32 Hkv 8 decode, 32 splits: D 128 2 rows at once, 128 registers (114 one row at a time), D 64
# 4 rows, 106-108 (106-109). The budget counts elements, not registers per thread: it holds for the 8-warp decode
# tiles compiled here, and --fits compiles every other planned launch. Not yet timed (bench/paged_sweep.py --reduce
# fused,separate): PAGED_REDUCE stays "separate" until it is.
_PAGED_COMBINE_ELEMENTS = 16 * 512


def paged_combine_rows(rows: int, block_m: int, splits_pad: int, v_head_dim_pad: int) -> int:
    """COMBINE_ROWS of a fused split call: the power of two covering a tile's rows (min(rows, block_m)), as far as
    _PAGED_COMBINE_ELEMENTS allows; at least 1."""
    want = _next_power_of_2(min(rows, block_m))
    fits = max(1, _PAGED_COMBINE_ELEMENTS // (splits_pad * v_head_dim_pad))
    while want > fits:
        want //= 2
    return want


# Programmatic dependent launch of the separate reduce (sm_90+; kernels/paged_decode.py LAUNCH_DEPENDENTS): the reduce
# kernel's programs are scheduled while the attention kernel finishes and wait on the device, saving the second
# launch's latency (FlashAttention-3 launches its combine so). Off: the sweep of the decode tiles above (--pdl off,on)
# timed the split calls -4% to +1% with it (B=1, 16 splits, 128x3: 0.0112 -> 0.0107 ms; B=8: no change at any tile),
# within the run's noise; correct on the H200 (test_paged_gpu_table_ahead_and_pdl, CUDA graphs included).
PAGED_PDL = False
# The fused combine's tile counters: one int32 per (b, kvh, row tile), one buffer per device allocated once
# (launch_paged.split_counters: 256 KiB). The default split rule splits only grids of fewer programs than SMs and keeps
# the split grid within _PAGED_PROGRAMS_PER_SM * SM count programs (264 on 132 SMs), far under the counters; a larger
# grid split by an explicit num_splits takes the separate reduce.
PAGED_FUSED_MAX_TILES = 1 << 16


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _by_head_dim(table: dict[int, int], head_dim_pad: int) -> int:
    for bound in sorted(table):
        if head_dim_pad <= bound:
            return table[bound]
    raise ValueError(f"paged attention supports head dims up to {max(table)}, got a padded head dim of "
                     f"{head_dim_pad}; such sites should have been left unfused by the analyzer")


def paged_config(arch: int, head_dim: int, dtype, block_size: int, group: int, tq: int) -> KernelConfig:
    """Tiles, warps and stages of the paged-attention kernel.

    head_dim: the widest register tile's dims (the plan passes max(q's chunk, Dv padded)).
    `group * tq` query rows of one KV head share each K/V tile; BLOCK_M covers them up to a cap,
    BLOCK_N (key tokens per tile) does not depend on the cache's block_size (the kernel gathers
    per token). `arch` (SM version, 0 off-GPU), `dtype` and `block_size` are accepted so that
    measured per-arch / per-dtype choices can be added here without touching the launcher.
    """
    del arch, dtype, block_size  # no measurement distinguishes them yet
    head_dim_pad = _next_power_of_2(max(head_dim, 16))
    rows = group * tq
    block_m = min(max(_PAGED_MIN_BLOCK_M, _next_power_of_2(rows)), _by_head_dim(_PAGED_MAX_BLOCK_M, head_dim_pad))
    block_n = _by_head_dim(_PAGED_BLOCK_N, head_dim_pad)
    num_warps = _PAGED_NUM_WARPS_SMALL if block_m * head_dim_pad <= 8192 else _PAGED_NUM_WARPS_LARGE
    num_stages = _PAGED_NUM_STAGES
    if block_m == _PAGED_MIN_BLOCK_M and head_dim_pad <= 128:   # a decode tile: the swept one
        block_n, num_warps, num_stages = _PAGED_DECODE_BLOCK_N, _PAGED_DECODE_NUM_WARPS, _PAGED_DECODE_NUM_STAGES
    if head_dim_pad >= _PAGED_WIDE_V:
        num_warps = _PAGED_NUM_WARPS_LARGE
    return KernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def paged_num_splits(sm_count: int, programs: int, max_seq_len: int) -> int:
    """How many split-KV partitions each program's key range is cut into (1 = no split).

    programs: B * Hkv * (row tiles), the grid without splitting. Splitting pays only when that
    leaves SMs idle; it is bounded by the longest sequence (so each split keeps enough keys)
    and by _PAGED_MAX_SPLITS; the split grid stays within one wave of _PAGED_PROGRAMS_PER_SM programs per SM.
    """
    if programs <= 0 or programs >= sm_count:
        return 1
    for_occupancy = _PAGED_PROGRAMS_PER_SM * sm_count // programs
    for_length = max_seq_len // _PAGED_MIN_TOKENS_PER_SPLIT
    splits = min(for_occupancy, for_length, _PAGED_MAX_SPLITS)
    return splits if splits >= 2 else 1
