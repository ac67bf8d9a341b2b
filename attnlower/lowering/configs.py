"""Block sizes, warps and stages for every kernel, in one place.

Each launcher asks one function here for its configuration. Every constant says which
measurement chose it (GPU, shape, date) or that it is a starting point awaiting one.
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
# Sources: Triton's fused-attention tutorial (06-fused-attention.py: forward 128x64 / 128x128 tiles,
# backward BLOCK_M1=32, BLOCK_N1=128 for dK/dV and BLOCK_M2=128, BLOCK_N2=32 for dQ) and
# FlashAttention-2's smaller tiles for head_dim 256 (register pressure of the fp32 accumulators).
# Timed, not swept: on H100 (torch 2.11, triton 3.6, 2026-11-23) the D=64 / 128 forward reached
# 295-475 TFLOP/s bf16, 1.05-1.39x SDPA-flash and 0.68-0.90x cuDNN (bench/RESULTS.md); D=256 untimed.
_FLASH_FWD = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 64, 8, 2)}
# Measured on H100 (torch 2.11, triton 3.6; bench/accuracy.py, 2026-11-23): the tutorial's 32x128
# tiles with 2-3 stages compiled to a dK that is wrong by 15-30% of max|dK| (dQ and dV right), in
# bf16, D=64 and 128, causal or not; 64x64 tiles with one stage give SDPA's error (3e-3). The cause
# (tile shape or pipelining) is not isolated: only the verified shape is used, D=256 included.
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


def flash_config(arch: int, head_dim: int, dtype, causal: bool, window: int, direction: str) -> KernelConfig:
    """Tiles of the dense kernels.

    arch: SM version (90 = Hopper), 0 for Triton's interpreter. direction: "fwd" (forward, also the
    backward preprocess), "bwd_kv" (dK/dV kernel: block_n keys held, block_m queries streamed) or
    "bwd_q" (dQ kernel: block_m queries held, block_n keys streamed). causal is accepted so that
    a measured split (causal wants smaller tiles at short N) can land here without changing callers.
    """
    if direction not in _FLASH_TABLES:
        raise ValueError(f"flash_config: expected direction in {sorted(_FLASH_TABLES)}, got {direction!r}")
    if arch == 0:
        return _FLASH_INTERPRET
    head_dim_pad = max(16, _next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _FLASH_TABLES[direction][_by_head_dim_key(head_dim_pad)]
    if dtype.itemsize >= 4:
        if direction == "bwd_kv":
            block_m = max(16, block_m // _FLASH_FP32_SHRINK)
        else:
            block_n = max(16, block_n // _FLASH_FP32_SHRINK)
    if 0 < window < _FLASH_NARROW_WINDOW and direction != "bwd_kv":
        block_n = min(block_n, 64)
    if arch < 90:
        num_stages = min(num_stages, _FLASH_PRE_HOPPER_MAX_STAGES)
    return KernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


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
_PAGED_MAX_BLOCK_M = {128: 64, 256: 32}                 # keyed by padded head dim upper bound
# Key tokens per tile: 64 keeps K+V tiles of 2 stages at 64 KB (bf16, D=128) on Hopper.
# unmeasured starting point (no GPU this session); sweep with bench/paged.py
_PAGED_BLOCK_N = {128: 64, 256: 32}
# unmeasured starting point (no GPU this session); sweep with bench/paged.py
_PAGED_NUM_WARPS_SMALL = 4          # BLOCK_M * HEAD_DIM_PAD <= 8192
_PAGED_NUM_WARPS_LARGE = 8
_PAGED_NUM_STAGES = 2
# The paged constants below were timed, not swept, on H100 (2026-11-23, bf16 Hq=32 Hkv=8 D=128,
# block 16): decode at 0.95-0.98x cuDNN SDPA on a contiguous cache for B >= 8 (bench/RESULTS.md).
# Split-KV: aim for this many programs per SM so latency of the gathers is hidden,
# never give a split fewer than _PAGED_MIN_TOKENS_PER_SPLIT keys (the reduce pass and the
# per-split q load must stay small next to the split's K/V traffic), and keep the split count
# within what the reduce kernel's single tile holds.
# unmeasured starting point (no GPU this session); sweep with bench/paged.py
_PAGED_PROGRAMS_PER_SM = 2
_PAGED_MIN_TOKENS_PER_SPLIT = 256
_PAGED_MAX_SPLITS = 64


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
    return KernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=_PAGED_NUM_STAGES)


def paged_num_splits(sm_count: int, programs: int, max_seq_len: int) -> int:
    """How many split-KV partitions each program's key range is cut into (1 = no split).

    programs: B * Hkv * (row tiles), the grid without splitting. Splitting pays only when that
    leaves SMs idle; it is bounded by the longest sequence (so each split keeps enough keys)
    and by _PAGED_MAX_SPLITS.
    """
    if programs <= 0 or programs >= sm_count:
        return 1
    for_occupancy = -(-_PAGED_PROGRAMS_PER_SM * sm_count // programs)
    for_length = max_seq_len // _PAGED_MIN_TOKENS_PER_SPLIT
    splits = min(for_occupancy, for_length, _PAGED_MAX_SPLITS)
    return splits if splits >= 2 else 1
