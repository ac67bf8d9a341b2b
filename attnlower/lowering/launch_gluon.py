"""Launcher of the warp-specialized Hopper forward (`kernels/gluon_fwd.py`, Gluon, Triton 3.6, sm_90).

Same contract as `launch.flash_forward` (docs/INTERFACES.md, "Semantics (dense ops)") for the calls
it supports; for every other call it raises NotImplementedError naming what it lacks, so the caller
falls back to `launch.flash_forward`:

  supported   fp16 / bf16, D = Dv in {64, 128}, causal (top-left or bottom-right) or not, any Tq / Tk
              (odd lengths included), GQA (Hq % Hkv == 0), empty rows (0 or NaN), lse; CUDA sm_90
              with triton 3.6.x (Gluon's API changes between releases)
  refused     bias, ALiBi, soft-cap, dropout, sliding window, other head dims, fp32, other GPUs or
              Triton versions, and tensor layouts TMA cannot read (below)

TMA layout rules (q, k, v are read and out is written through 4-D TMA descriptors over [B, H, T, D]):
the last dim must be contiguous (stride 1), every other stride a multiple of 16 bytes (8 elements of
a 16-bit dtype), and the data pointer 16-byte aligned. BHSD-contiguous tensors and BSHD views
(`x.transpose(1, 2)` of [B, T, H, D] storage) both qualify; when one does not, `.contiguous()` it or
use `launch.flash_forward`, which takes any strides.

`plan_gluon_forward` is the host-only part (checks, grid, constexprs, tuning): it touches no GPU,
so tests compile exactly what it plans for sm_90 on a machine without one.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlower.lowering.params import AttentionParams

SUPPORTED_TRITON = "3.6"
SUPPORTED_HEAD_DIMS = (64, 128)
M_PER_CONSUMER = 64   # rows of one consumer warpgroup's wgmma tile (kernels/gluon_fwd.py)
BLOCK_M = 128         # two consumer warpgroups
LOG2E = 1.4426950408889634

# Registers a thread: 3 warpgroups (producer + 2 consumers) of 128 threads share 65536 registers.
# The kernel starts capped at MAXNREG (65536 / 384 = 170.7, rounded down to ptxas' multiple of 8);
# setmaxnreg then gives each consumer CONSUMER_REGS and leaves the producer 24 (24 + 2 * 240 = 504 =
# 65536 / 128). FlashAttention-3's split for this shape of kernel; unmeasured here.
MAXNREG = 168
CONSUMER_REGS = 240
NUM_WARPS = 4  # the default (producer) partition; the consumers are 2 more warpgroups

# Tiles are ordered in groups of heads whose K and V fit this many bytes, so the CTAs running at
# one time share K/V through L2 (H200: 50 MB of L2). Unmeasured starting point.
L2_KV_BYTES = 16 * 2**20


@dataclass(frozen=True)
class GluonFwdConfig:
    """The Gluon forward's tuning knobs (timed by bench/gluon_probe.py on an H200, 2026-12-03: bench/RESULTS.md;
    the configs production calls take are chosen in plan.choose_forward_kernel).

    block_n: key rows of a K/V tile (the wgmma N of S = Q K^T); num_stages: depth of the K and of the
    V shared-memory rings; pingpong: the two consumer warpgroups take turns issuing wgmmas.
    """

    block_n: int = 128
    num_stages: int = 2
    pingpong: bool = True


# FlashAttention-3's Hopper forward uses 128-key tiles for D = 128 with 2 stages; D = 64 tiles are half
# the bytes, so one stage more fits. Starting points; at D=128 the H200 measured this config (ping-pong) fastest
# non-causal, 1-2% ahead of no ping-pong (bench/RESULTS.md, 2026-12-03 evening); D=64 is not routed to Gluon.
_DEFAULT_CONFIGS = {64: GluonFwdConfig(block_n=128, num_stages=3), 128: GluonFwdConfig(block_n=128, num_stages=2)}

# 227 KB: the most shared memory one block may use on H100 / H200.
SM90_SHARED_BYTES = 232448


def default_config(head_dim: int) -> GluonFwdConfig:
    """The tiles used when the caller passes no config."""
    return _DEFAULT_CONFIGS[head_dim]


def shared_bytes(head_dim: int, elem_bytes: int, config: GluonFwdConfig) -> int:
    """Shared memory the kernel allocates: Q and O halves of both consumers, the K and V rings, barriers."""
    q_and_o = 2 * 2 * M_PER_CONSUMER * head_dim * elem_bytes
    rings = 2 * config.num_stages * config.block_n * head_dim * elem_bytes
    return q_and_o + rings + 1024  # barriers and alignment


def _triton_version() -> str:
    import triton

    return triton.__version__


def _check_supported(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, bias, alibi_slopes,
                     config: GluonFwdConfig) -> None:
    """NotImplementedError (expected / got / fallback) for everything this kernel does not do."""
    fallback = "use launch.flash_forward"
    refused = [(bias is not None, "an attention bias"), (alibi_slopes is not None, "ALiBi slopes"),
               (params.softcap > 0, f"soft-capping (softcap={params.softcap})"),
               (params.dropout_p > 0, f"dropout (dropout_p={params.dropout_p})"),
               (params.window > 0, f"a sliding window (window={params.window})")]
    for present, what in refused:
        if present:
            raise NotImplementedError(f"gluon_flash_forward: {what} is not supported yet; {fallback}")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise NotImplementedError(f"gluon_flash_forward: expected fp16 or bf16 q, k, v of one dtype, got "
                                  f"{q.dtype}, {k.dtype}, {v.dtype}; {fallback}")
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS or k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise NotImplementedError(f"gluon_flash_forward: expected head dims D = Dv in {SUPPORTED_HEAD_DIMS}, got "
                                  f"q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}; {fallback}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"gluon_flash_forward: expected q [B, Hq, Tq, D], k = v [B, Hkv, Tk, D] with Hq % Hkv == 0, "
                         f"got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if config.block_n % 16 or not 16 <= config.block_n <= 256 or config.num_stages < 1:
        raise ValueError(f"gluon_flash_forward: expected block_n a multiple of 16 in [16, 256] and num_stages >= 1, "
                         f"got {config}")
    need = shared_bytes(head_dim, q.element_size(), config)
    if need > SM90_SHARED_BYTES:
        raise ValueError(f"gluon_flash_forward: {config} needs about {need} bytes of shared memory at D={head_dim}, "
                         f"an sm_90 block gets {SM90_SHARED_BYTES}; use fewer stages or a smaller block_n")


def tma_strides(t: Tensor) -> list[int]:
    """t's strides for a TMA descriptor: a dim of size 1 is only ever read at index 0, so its stride
    (which torch leaves arbitrary, e.g. after a transpose) is replaced by the contiguous one."""
    strides, contiguous = [], 1
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        strides.append(contiguous if size == 1 else stride)
        contiguous *= size
    return strides[::-1]


def check_tma_layout(name: str, t: Tensor) -> None:
    """NotImplementedError unless `t` can be read / written by a TMA descriptor (see the module docstring)."""
    elem = t.element_size()
    strides = tma_strides(t)
    if strides[-1] != 1:
        raise NotImplementedError(f"gluon_flash_forward: expected {name} with a contiguous last dim (stride 1) for "
                                  f"TMA, got strides {tuple(t.stride())}; call {name}.contiguous() first or "
                                  f"use launch.flash_forward")
    if any((s * elem) % 16 for s in strides[:-1]):
        raise NotImplementedError(f"gluon_flash_forward: expected every stride of {name} but the last to be a multiple "
                                  f"of 16 bytes ({16 // elem} elements) for TMA, got strides {tuple(t.stride())}; "
                                  f"call {name}.contiguous() first or use launch.flash_forward")
    if t.data_ptr() % 16:
        raise NotImplementedError(f"gluon_flash_forward: expected {name}'s data 16-byte aligned for TMA, got address "
                                  f"{t.data_ptr():#x} (an offset view?); call {name}.clone() first or use "
                                  f"launch.flash_forward")


def layout_problem(**tensors: Tensor) -> str | None:
    """Why one of `tensors` (name=tensor) cannot go through a TMA descriptor, or None when all can: the
    router's check (launch.flash_forward picks the Triton kernel then, which takes any strides)."""
    for name, t in tensors.items():
        try:
            check_tma_layout(name, t)
        except NotImplementedError as refusal:
            return str(refusal)
    return None


def heads_per_group(tk: int, head_dim: int, elem_bytes: int, group: int, bh: int) -> int:
    """How many (batch, query head) pairs one tile group spans: their K and V fit L2_KV_BYTES."""
    kv_bytes_per_q_head = 2 * tk * head_dim * elem_bytes / group  # a GQA group shares its K and V
    return max(1, min(bh, int(L2_KV_BYTES // max(kv_bytes_per_q_head, 1))))


@dataclass(frozen=True)
class GluonLaunch:
    """What `gluon_flash_forward` launches: grid, runtime scalars, constexprs and options (no tensors)."""

    grid: tuple
    scalars: dict
    constexprs: dict
    options: dict
    config: GluonFwdConfig


def plan_gluon_forward(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, *, bias=None,
                       alibi_slopes=None, rng_state=None, config: GluonFwdConfig | None = None,
                       sm_count: int = 132) -> GluonLaunch | None:
    """The host-side plan of one call (no GPU needed); None when there is nothing to compute.

    Raises NotImplementedError for what the kernel does not support (the caller falls back).
    rng_state is accepted for the contract's sake: dropout is refused, so it is never read.
    """
    del rng_state
    batch, q_heads, tq, head_dim = q.shape
    config = config if config is not None else (default_config(head_dim) if head_dim in _DEFAULT_CONFIGS
                                                else GluonFwdConfig())
    _check_supported(q, k, v, params, bias, alibi_slopes, config)
    kv_heads, tk = k.shape[1], k.shape[2]
    if batch * q_heads * tq == 0 or tk == 0:
        return None
    if max(batch, q_heads, tq, tk) >= 2**31:
        raise NotImplementedError(f"gluon_flash_forward: TMA coordinates are int32, got q {list(q.shape)}, "
                                  f"k {list(k.shape)}; use launch.flash_forward")
    num_m_blocks = math.ceil(tq / BLOCK_M)
    num_tiles = num_m_blocks * batch * q_heads
    group = q_heads // kv_heads
    scalars = dict(H=q_heads, GROUP=group, N_CTX_Q=tq, N_CTX_K=tk,
                   diag_offset=(tk - tq) if params.bottom_right else 0, qk_scale=params.scale * LOG2E,
                   num_m_blocks=num_m_blocks, num_tiles=num_tiles,
                   heads_per_group=heads_per_group(tk, head_dim, q.element_size(), group, batch * q_heads))
    constexprs = dict(BLOCK_N=config.block_n, HEAD_DIM=head_dim, NUM_STAGES=config.num_stages,
                      IS_CAUSAL=bool(params.causal), PINGPONG=bool(config.pingpong),
                      EMPTY_ROWS_NAN=bool(params.empty_rows_nan), CONSUMER_REGS=CONSUMER_REGS)
    return GluonLaunch(grid=(min(sm_count, num_tiles),), scalars=scalars, constexprs=constexprs,
                       options=dict(num_warps=NUM_WARPS, maxnreg=MAXNREG), config=config)


def make_descriptors(q: Tensor, k: Tensor, v: Tensor, out: Tensor, config: GluonFwdConfig) -> tuple:
    """TMA descriptors (q, k, v, out) over [B, H, T, D]: blocks of 64 query rows / block_n key rows."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        check_tma_layout(name, t)
    head_dim = q.shape[-1]
    elem = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_block = [1, 1, M_PER_CONSUMER, head_dim]
    kv_block = [1, 1, config.block_n, head_dim]
    q_layout = gl.NVMMASharedLayout.get_default_for(q_block, elem)
    kv_layout = gl.NVMMASharedLayout.get_default_for(kv_block, elem)

    def descriptor(t, block, layout):
        return TensorDescriptor(t, list(t.shape), tma_strides(t), block, layout)
    return (descriptor(q, q_block, q_layout), descriptor(k, kv_block, kv_layout), descriptor(v, kv_block, kv_layout),
            descriptor(out, q_block, q_layout))


def kernel_function():
    """The Gluon kernel (imported on first use: importing Gluon 3.6 code under another Triton may fail)."""
    version = _triton_version()
    if not version.startswith(SUPPORTED_TRITON + "."):
        raise NotImplementedError(f"gluon_flash_forward: written for Gluon as shipped in triton {SUPPORTED_TRITON}.x "
                                  f"(its API changes between releases), got triton {version}; "
                                  f"use launch.flash_forward")
    try:
        from attnlower.lowering.kernels import gluon_fwd
    except ImportError as error:
        raise NotImplementedError(f"gluon_flash_forward: triton {version} has no usable Gluon ({error}); "
                                  f"use launch.flash_forward") from error
    return gluon_fwd._gluon_attn_fwd_kernel


@functools.lru_cache(maxsize=16)
def _sm90_device(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    if (props.major, props.minor) != (9, 0):
        raise NotImplementedError(f"gluon_flash_forward: expected a Hopper GPU (sm_90), got {props.name} "
                                  f"(sm_{props.major}{props.minor}); use launch.flash_forward")
    return props.multi_processor_count


def gluon_flash_forward(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, *, bias: Tensor | None = None,
                        alibi_slopes: Tensor | None = None, rng_state: Tensor | None = None,
                        config: GluonFwdConfig | None = None, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dense attention forward on Hopper -> (out, lse), as `launch.flash_forward` computes it.

    q [B, Hq, Tq, D], k / v [B, Hkv, Tk, D] (TMA-compatible strides: module docstring). Returns out
    [B, Hq, Tq, D] in q's dtype, contiguous unless `out` (an uninitialized [B, Hq, Tq, D] tensor of q's dtype
    with a TMA-compatible layout, written in place: launch.flash_forward passes one in q's layout) is given,
    and lse fp32 [B, Hq, Tq] contiguous (natural log, -inf on empty rows).
    Raises NotImplementedError for what it does not support (module docstring): fall back then.
    """
    out, lse, _ = gluon_flash_forward_with_kernel(q, k, v, params, bias=bias, alibi_slopes=alibi_slopes,
                                                  rng_state=rng_state, config=config, out=out)
    return out, lse


def gluon_flash_forward_with_kernel(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, *,
                                    bias: Tensor | None = None, alibi_slopes: Tensor | None = None,
                                    rng_state: Tensor | None = None, config: GluonFwdConfig | None = None,
                                    out: Tensor | None = None):
    """`gluon_flash_forward`, also returning the compiled kernel it launched (None when it launched none):
    benchmarks read its registers, spills and shared memory (`n_regs`, `n_spills`, `metadata.shared`)."""
    if q.device.type != "cuda":
        raise NotImplementedError(f"gluon_flash_forward: expected CUDA tensors, got {q.device}; "
                                  f"use launch.flash_forward")
    sm_count = _sm90_device(q.device.index if q.device.index is not None else torch.cuda.current_device())
    fn = kernel_function()
    launch = plan_gluon_forward(q, k, v, params, bias=bias, alibi_slopes=alibi_slopes, rng_state=rng_state,
                                config=config, sm_count=sm_count)
    batch, q_heads, tq, head_dim = q.shape
    if out is None:
        out = torch.empty((batch, q_heads, tq, head_dim), dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (batch, q_heads, tq, head_dim) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"gluon_flash_forward: expected out {[batch, q_heads, tq, head_dim]} {q.dtype} on {q.device}, "
                         f"got {list(out.shape)} {out.dtype} on {out.device}")
    lse = torch.empty((batch, q_heads, tq), dtype=torch.float32, device=q.device)
    if launch is None:
        if out.numel() and k.shape[2] == 0:  # no keys: every row is empty
            out.fill_(float("nan") if params.empty_rows_nan else 0.0)
            lse.fill_(float("-inf"))
        return out, lse, None
    q_desc, k_desc, v_desc, o_desc = make_descriptors(q, k, v, out, launch.config)
    compiled = fn[launch.grid](q_desc, k_desc, v_desc, o_desc, lse, **launch.scalars, **launch.constexprs,
                               **launch.options)
    return out, lse, compiled
