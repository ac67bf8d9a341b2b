"""The launch plan: what every kernel of an op is launched with, computed once per signature.

`dense_plan` and `paged_plan` turn (AttentionParams, the tensors' shapes and dtypes, the target)
into the kernels to launch, each with its grid, tile config and constexprs. The launchers
(`launch.py`, `launch_paged.py`) only add the tensors and their strides; the dump tool
(`attnlower/target.py`'s `kernel_plan`, the pass side's seam) calls the same functions, so what it prints is what runs; `kernel_plan`
below is the one that plans the real Tq and Tk.

Strides are not part of the plan: they are passed to the kernels as they are, and Triton keys its
own specialization on them (divisibility by 16). Plans are cached in bounded LRU caches
(`PLAN_CACHE_SIZE` entries each): a repeat call with the same shapes pays one dict lookup.
Symbolic sizes (while torch.compile traces) are not hashable: those calls are planned uncached.

This module does not import triton, so the dump tool can show plans where triton is missing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from attnlower.lowering import configs
from attnlower.lowering.configs import (PAGED_FUSED_MAX_TILES, KernelConfig, flash_config, paged_combine_rows,
                                        paged_config, paged_num_splits)
from attnlower.lowering.env import switch_from_env
from attnlower.lowering.launch_gluon import GluonFwdConfig, default_config as gluon_default_config
from attnlower.lowering.params import AttentionParams
from attnlower.lowering.target import Target, target_of  # noqa: F401  (one Target: lowering/target.py)

# kernels/common.py's DOT_PRECISION codes (kept here too: this module must not import triton)
DOT_CODES = {"tf32": 0, "ieee": 1, "upcast_ieee": 2}

# Bounded: a process that sees many shapes (dynamic serving, many models) must not grow without
# end (issue 10: host cost must not grow with what a process accumulated). 1024 signatures is far
# more than one model uses (one per layer shape x direction), each entry is a few hundred bytes.
PLAN_CACHE_SIZE = 1024

# Head-dim limits of the kernels (issue 21.1): the dense kernels keep a q/k and a v tile of up to 256 dims each
# (padded to a power of two, independently); the paged kernel runs q·k over 64-wide chunks past 256 dims
# (MLA's absorbed decode: 576 = 512 latent + 64 rope) and holds up to 512 value dims.
MAX_HEAD_DIM = 256            # dense ops, q/k and v alike (the pass side's analyzer reads it)
PAGED_MAX_HEAD_DIM_QK = 576
PAGED_MAX_HEAD_DIM_V = 512
PAGED_QK_CHUNK = 64           # q·k chunk width of the paged kernel past 256 dims (576 = 9 x 64; speed unmeasured)
BIAS_NONE, BIAS_BOOL, BIAS_FLOAT = 0, 1, 2


# Meta and Target (lowering/target.py) are NamedTuples: they are hashed on every call (the cache key), in C.
class Meta(NamedTuple):
    """What the plan reads from a tensor: its shape and dtype."""

    shape: tuple
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor | None) -> "Meta | None":
        return None if t is None else cls(t.shape, t.dtype)


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: `kernel[grid](*tensors, *strides, *scalars, **constexprs, num_warps=..)`."""

    kernel: str
    grid: tuple
    config: KernelConfig
    constexprs: tuple[tuple[str, Any], ...]

    options: tuple[tuple[str, Any], ...] = ()   # other launch options (launch_pdl)

    @functools.cached_property
    def launch_kwargs(self) -> dict[str, Any]:
        """The constexprs plus num_warps / num_stages and `options`, as the kernel's launch takes them (built once)."""
        return dict(self.constexprs, num_warps=self.config.num_warps, num_stages=self.config.num_stages,
                    **dict(self.options))


@dataclass(frozen=True)
class DensePlan:
    """The kernels of one dense call. `trivial`: "empty" (nothing to compute), "no_keys" (Tk = 0:
    every row is empty, filled without a kernel) or "" (launch `launches` in order)."""

    launches: tuple[KernelLaunch, ...]
    trivial: str = ""


@dataclass(frozen=True)
class PagedPlan:
    """The kernels of one paged call: the attention kernel, then the split-KV reduce when split and `reduce` is
    "separate"; with `reduce` "fused" the attention kernel combines the splits itself (FUSED_REDUCE: one launch,
    reading the device's tile counters, launch_paged.split_counters). `reduce` is "" when not split."""

    launches: tuple[KernelLaunch, ...]
    num_splits: int
    trivial: str = ""
    reduce: str = ""

    @property
    def fused(self) -> bool:
        return self.reduce == "fused"


PAGED_REDUCES = ("fused", "separate")


# How a split paged call combines its partials unless the call says: configs.PAGED_REDUCE ("separate", timed faster
# on the H200). "fused", asked per call, shares per-device counters (launch_paged.split_counters): not for a process
# that runs split paged calls on several streams of one device at once.
PAGED_REDUCE = configs.PAGED_REDUCE
PAGED_PDL = configs.PAGED_PDL


@functools.cache
def _grid_dependency_control() -> bool:
    """Whether the installed Triton writes griddepcontrol (`triton.language.extra.cuda.gdc_wait`: triton >= 3.4)."""
    try:
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True


def cached_unless_symbolic(fn):
    """An LRU cache of `fn` that runs it uncached when an argument is not hashable (symbolic sizes
    while tracing). Exceptions are never cached. Used for the plans here and validation in ops.py."""
    cached = functools.lru_cache(maxsize=PLAN_CACHE_SIZE)(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return cached(*args, **kwargs)
        except TypeError as error:  # a SymInt: "unhashable type: non-nested SymInt"
            if "unhashable" not in str(error):
                raise
            return fn(*args, **kwargs)

    call.cache_info = cached.cache_info
    call.cache_clear = cached.cache_clear
    return call


def _cdiv(a, b):
    return -(-a // b)


def _next_power_of_2(n) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def head_dim_pad(head_dim: int) -> int:
    """The power of two >= max(head_dim, 16) the tiles use (loads are masked past head_dim)."""
    return max(16, _next_power_of_2(head_dim))


def dense_dot_precision(dtype: torch.dtype, target: Target) -> str:
    """fp32 dots: exact ("ieee") unless TF32 is allowed for CUDA matmuls. 16-bit inputs use "tf32" (Triton's
    default; tensor cores multiply fp16/bf16 exactly), except bf16 under the interpreter, whose tl.dot
    multiplies bf16 as raw integers: "upcast_ieee" converts both operands to fp32 first."""
    if dtype == torch.bfloat16 and target.kind != "cuda":
        return "upcast_ieee"
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if target.kind == "cuda" and target.allow_tf32 else "ieee"


def bias_kind(bias: Meta | None) -> int:
    if bias is None:
        return BIAS_NONE
    return BIAS_BOOL if bias.dtype == torch.bool else BIAS_FLOAT


def dense_constexprs(params: AttentionParams, head_dim: int, dtype: torch.dtype, bias: int,
                     has_alibi: bool, target: Target, has_sinks: bool = False,
                     v_head_dim: int | None = None, has_docs: bool = False,
                     has_verified: bool = False) -> dict[str, Any]:
    """The constexprs shared by every dense kernel (forward, dK/dV, dQ). v_head_dim: Dv (None: = head_dim)."""
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim),
        HEAD_DIM_V=v_head_dim, HEAD_DIM_V_PAD=head_dim_pad(v_head_dim),
        IS_CAUSAL=params.is_causal, HAS_WINDOW=params.window > 0, HAS_SOFTCAP=params.softcap > 0,
        HAS_ALIBI=has_alibi, BIAS_KIND=bias, HAS_DROPOUT=params.dropout_p > 0,
        DOT_PRECISION=DOT_CODES[dense_dot_precision(dtype, target)],   # kernels/common.py: an int constexpr
        HAS_FILL=params.has_fill, HAS_SINKS=has_sinks, HAS_DOCS=has_docs, HAS_VERIFIED=has_verified,
    )


def _check_dense_supported(params: AttentionParams, q: Meta, k: Meta, v: Meta) -> None:
    """Limits of the kernels themselves (ops.py validates what a user can get wrong in general)."""
    check_dense_head_dims(q.shape[-1], v.shape[-1])
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash kernels: expected fp16/bf16/fp32, got {q.dtype}; compute in fp32 or "
                         f"run on CPU")
    if params.dropout_p > 0 and q.shape[2] * k.shape[2] >= 2**32:
        # the Philox counter of a (b, h) holds i * Tk + j in 32 bits (kernels/flash_fwd.py, _dropout_keep)
        raise NotImplementedError(f"flash kernels: dropout needs Tq * Tk < 2**32, got Tq={q.shape[2]}, "
                                  f"Tk={k.shape[2]}")


def check_dense_head_dims(head_dim: int, v_head_dim: int) -> None:
    """The dense kernels' head-dim limits, said the way the analyzer repeats them when it refuses."""
    for what, dim in (("q/k", head_dim), ("v", v_head_dim)):
        if dim > MAX_HEAD_DIM:
            raise NotImplementedError(f"flash kernels: expected {what}'s head dim <= {MAX_HEAD_DIM} for the dense "
                                      f"kernels, got {dim}; run on CPU through the reference implementation")


def check_paged_head_dims(head_dim: int, v_head_dim: int) -> None:
    """The paged kernel's head-dim limits (MLA's absorbed decode: 576 / 512)."""
    if head_dim > PAGED_MAX_HEAD_DIM_QK or v_head_dim > PAGED_MAX_HEAD_DIM_V:
        raise NotImplementedError(
            f"paged kernel: expected q/k's head dim <= {PAGED_MAX_HEAD_DIM_QK} and v's <= {PAGED_MAX_HEAD_DIM_V}, got "
            f"{head_dim} and {v_head_dim}; gather the cache and run on CPU through the reference implementation")


def _rows_for(cfg: KernelConfig, tq: int) -> KernelConfig:
    """A 16-row tile (tl.dot's minimum) when Tq <= 16, the tables' tile otherwise. A decode step through the
    dense kernel (Tq = 1) with the 128-row tile wasted 127 rows, and with Tq = 1 a compile-time constant (Triton
    and Inductor specialize ints equal to 1) that launch needed 262144 bytes of shared memory on sm_90, over the
    232448 a block gets (H200, triton 3.6, 2026-12-03, D = 128, Tk = 4096; tests/lowering/sm90_compile.py --fits
    now compiles Tq = 1)."""
    if type(tq) is not int or tq > _FEW_ROWS:   # a symbolic length (tracing): no guard on it
        return cfg
    return cfg if _FEW_ROWS >= cfg.block_m else KernelConfig(_FEW_ROWS, cfg.block_n, cfg.num_warps, cfg.num_stages)


_FEW_ROWS = 16   # decode and speculative steps (Tq <= 16) take 16-row tiles; longer Tq keep the measured tables


@cached_unless_symbolic
def dense_plan(params: AttentionParams, direction: str, q: Meta, k: Meta, v: Meta, bias: Meta | None,
               has_alibi: bool, target: Target, configs: tuple = (), has_sinks: bool = False,
               has_docs: bool = False, has_verified: bool = False) -> DensePlan:
    """The plan of a dense forward (`direction="fwd"`) or backward (`"bwd"`).

    configs: tile overrides, () for the configs.flash_config choice; one KernelConfig for the
    forward, (dK/dV, dQ) for the backward (either may be None). has_sinks / has_docs / has_verified: sinks / doc_ids /
    a verified flag are passed.
    """
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"dense_plan: expected direction 'fwd' or 'bwd', got {direction!r}")
    _check_dense_supported(params, q, k, v)
    batch, q_heads, tq, head_dim = q.shape
    kv_heads, tk, v_head_dim = k.shape[1], k.shape[2], v.shape[3]
    if batch * q_heads * tq * v_head_dim == 0:
        return DensePlan((), "empty")
    if tk == 0:
        return DensePlan((), "no_keys")
    shared = dense_constexprs(params, head_dim, q.dtype, bias_kind(bias), has_alibi, target, has_sinks, v_head_dim,
                              has_docs, has_verified)

    def config(which: str, override) -> KernelConfig:
        if override is not None:
            return override
        # the forward's tiles depend on the key length (configs._FLASH_FWD_BY_LEN, measured on an H200)
        seq_len = tk if which == "fwd" else None
        # tiles for the wider of the two head dims (Dv != D: unmeasured, the tables were timed at Dv = D)
        return flash_config(target.arch, max(head_dim, v_head_dim), q.dtype, params.causal, params.window, which,
                            seq_len=seq_len, bias_bytes=0 if bias is None else bias.dtype.itemsize,
                            shared_limit=target.shared_memory_per_block)

    if direction == "fwd":
        cfg = config("fwd", configs[0] if configs else None)
        if not configs or configs[0] is None:
            cfg = _rows_for(cfg, tq)
        fwd = KernelLaunch("_flash_fwd_kernel", (_cdiv(tq, cfg.block_m), batch * q_heads, 1), cfg,
                           tuple(dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                      EMPTY_ROWS_NAN=params.empty_rows_nan, **shared).items()))
        return DensePlan((fwd,))
    cfg_kv = config("bwd_kv", configs[0] if configs else None)
    cfg_q = config("bwd_q", configs[1] if configs else None)
    if not configs or configs[1] is None:
        cfg_q = _rows_for(cfg_q, tq)
    pre_cfg = KernelConfig(cfg_q.block_m, cfg_q.block_n, cfg_q.num_warps, 3)  # 3: Triton's default; no loop to pipeline
    pre = KernelLaunch("_flash_bwd_preprocess_kernel", (_cdiv(tq, cfg_q.block_m), batch * q_heads, 1), pre_cfg,
                       (("BLOCK_M", cfg_q.block_m), ("HEAD_DIM_V", v_head_dim),
                        ("HEAD_DIM_V_PAD", shared["HEAD_DIM_V_PAD"])))
    # the dK/dV kernel reads the sinks only through lse (and the dQ kernel's LseFill): no HAS_SINKS
    dkdv_shared = {name: value for name, value in shared.items() if name != "HAS_SINKS"}
    dkdv = KernelLaunch("_flash_bwd_dkdv_kernel", (_cdiv(tk, cfg_kv.block_n), batch * kv_heads, 1), cfg_kv,
                        tuple(dict(BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n, **dkdv_shared).items()))
    dq = KernelLaunch("_flash_bwd_dq_kernel", (_cdiv(tq, cfg_q.block_m), batch * q_heads, 1), cfg_q,
                      tuple(dict(BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, **shared).items()))
    return DensePlan((pre, dkdv, dq))


# ------------------------------------------------------------------ the dense forward's kernel: Gluon or Triton

TRITON_FORWARD = "_flash_fwd_kernel"
GLUON_FORWARD = "_gluon_attn_fwd_kernel"   # kernels/gluon_fwd.py, launched by launch_gluon.py


def _gluon_from_env() -> bool:
    return switch_from_env("ATTNLOWER_GLUON", on="eager dense forwards on Hopper take the Gluon kernel where it was "
                                                 "measured faster", off="always the Triton kernel")


# ATTNLOWER_GLUON=0: every dense forward launches the Triton kernel (read once, at import; tests set this).
GLUON_ENABLED = _gluon_from_env()

# Where the Gluon forward runs: measured on an H200 (torch 2.11.0+cu130, triton 3.6.0, 2026-12-03,
# bench/gluon_probe.py, /work/gpu-logs/call4/gluon_probe.log, bench/RESULTS.md "the Gluon forward's first run").
# Forward TFLOP/s, bf16, B*N = 16384 tokens, H*D = 2048, Tq = Tk = N, Hq = Hkv, BHSD-contiguous:
#   D=128 non-causal  N=1024 / 4096 / 16384: Gluon ping-pong 506 / 552 / 561, Triton 349 / 471 / 489
#   D=128 causal      N=1024 / 4096 / 16384: Gluon without ping-pong 343 / 428 / 458, Triton 322 / 414 / 437
#                     (ping-pong causal: 213 at N=1024, 0.49x cuDNN, so causal calls take pingpong=False)
#   D=64  every case: Triton 365-424 vs Gluon 249-403: D=64 keeps the Triton kernel.
# fp16 was not timed (same kernel, same tensor-core rate as bf16; correctness checked on the H200).
GLUON_ARCH = 90                 # sm_90 only (wgmma, TMA, setmaxnreg)
GLUON_HEAD_DIM = 128            # D = Dv = 128 (D = 64 measured slower than Triton, above)
GLUON_MIN_LENGTH = 1024         # Tq and Tk >= the shortest length measured; shorter calls are unmeasured: Triton
GLUON_CONFIGS = {               # causal -> the Gluon variant measured fastest (block_n 128, 2 stages)
    False: gluon_default_config(128),                                  # "ws": ping-pong
    True: GluonFwdConfig(block_n=128, num_stages=2, pingpong=False),   # "ws-nopp"
}
GLUON_TRITON = "3.6"            # Gluon's API changes between releases: written for triton 3.6.x (launch_gluon.py)
_GLUON_DTYPES = (torch.float16, torch.bfloat16)


class ForwardChoice(NamedTuple):
    """Which kernel a dense forward launches: `gluon` the Gluon config (kernel GLUON_FORWARD) or None (the Triton
    kernel, TRITON_FORWARD, planned by dense_plan); `reason` says why, either way (the dump's note)."""

    gluon: GluonFwdConfig | None
    reason: str

    @property
    def kernel(self) -> str:
        return GLUON_FORWARD if self.gluon is not None else TRITON_FORWARD


@cached_unless_symbolic
def choose_forward_kernel(params: AttentionParams, q: Meta, k: Meta, v: Meta, bias: Meta | None, has_alibi: bool,
                          target: Target, has_sinks: bool = False, has_docs: bool = False,
                          has_verified: bool = False, enabled: bool = True, tracing: bool = False) -> ForwardChoice:
    """The one decision: the Gluon forward (launch_gluon.py) or the Triton one (launch.flash_forward's default).

    Gluon when every condition holds, in this order (the reason names the first that fails): enabled
    (ATTNLOWER_GLUON, GLUON_ENABLED), not tracing (inside torch.compile Inductor launches the kernels itself through
    wrap_triton, which compiles a kernel as plain Triton and knows only Triton's TensorDescriptor: no Gluon), a CUDA
    sm_90 target with triton 3.6.x, no bias / ALiBi / soft-cap / dropout / window / sinks / documents / fill /
    verified flag, fp16 or bf16, D = Dv = 128, Tq and Tk >= GLUON_MIN_LENGTH; the config then follows causal
    (GLUON_CONFIGS). One more condition is the launcher's, at run time (a plan holds no strides or addresses): q, k,
    v (and out, allocated in q's layout) must be TMA-readable (launch_gluon.layout_problem), else Triton.
    """
    def triton(why: str) -> ForwardChoice:
        return ForwardChoice(None, why)

    if not enabled:
        return triton("ATTNLOWER_GLUON=0")
    if tracing:
        return triton("traced: Inductor launches Triton kernels itself (wrap_triton takes no Gluon kernel)")
    if target.nvidia_arch != GLUON_ARCH:
        where = "an AMD GPU" if target.rocm else f"sm_{target.arch}" if target.kind == "cuda" else target.kind
        return triton(f"the Gluon forward needs an sm_{GLUON_ARCH} GPU, this target is {where}")
    if not target.triton.startswith(GLUON_TRITON + "."):
        return triton(f"the Gluon forward is written for triton {GLUON_TRITON}.x, installed: "
                      f"triton {target.triton or '(unknown)'}")
    features = [(bias is not None, "a bias"), (has_alibi, "ALiBi"), (params.softcap > 0, "soft-capping"),
                (params.dropout_p > 0, "dropout"), (params.window > 0, "a window"), (has_sinks, "sinks"),
                (has_docs, "doc_ids"), (params.has_fill, "a fill"), (has_verified, "a verified flag")]
    lacking = [what for present, what in features if present]
    if lacking:
        return triton(f"the Gluon forward takes no {', '.join(lacking)}")
    if q.dtype not in _GLUON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return triton(f"the Gluon forward takes fp16 / bf16 q, k, v of one dtype, got {q.dtype}")
    batch, q_heads, tq, head_dim = q.shape
    tk, v_head_dim = k.shape[2], v.shape[3]
    if head_dim != GLUON_HEAD_DIM or v_head_dim != GLUON_HEAD_DIM:
        return triton(f"routed to Gluon only at D = Dv = {GLUON_HEAD_DIM} (D = 64 measured slower than Triton), "
                      f"got D = {head_dim}, Dv = {v_head_dim}")
    if tq < GLUON_MIN_LENGTH or tk < GLUON_MIN_LENGTH:
        return triton(f"routed to Gluon only for Tq, Tk >= {GLUON_MIN_LENGTH} (measured at 1024..16384), "
                      f"got Tq = {tq}, Tk = {tk}")
    if batch * q_heads == 0 or max(batch, q_heads, tq, tk) >= 2**31:
        return triton(f"the Gluon forward needs 0 < sizes < 2**31 (int32 TMA coordinates), got q {list(q.shape)}")
    config = GLUON_CONFIGS[bool(params.causal)]
    return ForwardChoice(config, f"Gluon warp-specialized forward ({'no ping-pong' if params.causal else 'ping-pong'}"
                                 f", block_n={config.block_n}, {config.num_stages} stages): measured faster than "
                                 f"Triton at D=128 on an H200")


def paged_qk_chunks(head_dim: int) -> tuple[int, int]:
    """(QK_CHUNK, NUM_QK_CHUNKS) of the paged kernel's q·k: one power-of-two chunk up to 256 dims, else chunks of
    PAGED_QK_CHUNK (576 -> 9 x 64; 25% of q·k wasted if 576 were padded to 1024 instead)."""
    if head_dim <= MAX_HEAD_DIM:
        return head_dim_pad(head_dim), 1
    return PAGED_QK_CHUNK, _cdiv(head_dim, PAGED_QK_CHUNK)


def paged_dot_mode(dtype: torch.dtype, target: Target) -> tuple[str, bool]:
    """(DOT_PRECISION, DOT_FP32_INPUTS) of the paged kernel's tl.dot calls."""
    # Off-GPU the kernel runs in Triton's interpreter, whose bf16 tl.dot is wrong: dot in fp32
    # from the same rounded values instead (see the kernel header).
    fp32_inputs = target.kind != "cuda" and dtype != torch.float32
    # fp32 inputs get IEEE fp32 dots: TF32 would miss the fp32 accuracy users of fp32 expect
    return ("ieee" if dtype == torch.float32 or fp32_inputs else "tf32"), fp32_inputs


@cached_unless_symbolic
def paged_plan(params: AttentionParams, q: Meta, k_cache: Meta, block_table: Meta, has_alibi: bool,
               target: Target, check_bounds: bool, num_splits: int | None = None,
               config: KernelConfig | None = None, has_sinks: bool = False,
               v_head_dim: int | None = None, reduce: str | None = None, pdl: bool | None = None) -> PagedPlan:
    """The plan of a paged call. num_splits / config / reduce: overrides (tests, benchmarks), None = choose.
    has_sinks: a sinks tensor is passed (the unsplit kernel or the combine adds it). v_head_dim: v_cache's head
    dim (None: the q/k head dim). reduce: how a split call combines its partials, "fused" (in the attention
    kernel, one launch) or "separate" (`_paged_reduce_kernel`); None: PAGED_REDUCE (configs.PAGED_REDUCE), separate
    for a grid of more than configs.PAGED_FUSED_MAX_TILES tiles (the counters one device holds). Ignored when not
    split. pdl: launch the separate reduce with programmatic dependent launch (sm_90+ CUDA targets only; None:
    PAGED_PDL).

    The split count is bounded by the table's width (max_blocks * block_size), never by
    seq_lens.max(): reading it would synchronize the host with the GPU on every decode step.
    """
    batch, q_heads, tq, head_dim = q.shape
    num_blocks, kv_heads, block_size, _ = k_cache.shape
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    check_paged_head_dims(head_dim, v_head_dim)
    if batch * q_heads * tq * v_head_dim == 0:
        return PagedPlan((), 1, "empty")
    group = q_heads // kv_heads
    qk_chunk, qk_chunks = paged_qk_chunks(head_dim)
    v_pad = head_dim_pad(v_head_dim)
    # the tiles follow the widest register tile: q (one chunk) or the accumulator (Dv)
    cfg = config or paged_config(target.arch, max(qk_chunk, v_pad), q.dtype, block_size, group, tq)
    m_tiles = _cdiv(group * tq, cfg.block_m)
    programs = batch * kv_heads * m_tiles
    if num_splits is None:
        num_splits = paged_num_splits(target.sm_count, programs, block_table.shape[1] * block_size)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if reduce is not None and reduce not in PAGED_REDUCES:
        raise ValueError(f"reduce: expected one of {PAGED_REDUCES} or None (choose), got {reduce!r}")
    if num_splits == 1:
        reduce = ""
    elif reduce is None:
        reduce = PAGED_REDUCE if programs <= PAGED_FUSED_MAX_TILES else "separate"
    elif reduce == "fused" and programs > PAGED_FUSED_MAX_TILES:
        raise ValueError(f"reduce='fused' needs one counter per tile: expected B * Hkv * row tiles <= "
                         f"{PAGED_FUSED_MAX_TILES} (configs.PAGED_FUSED_MAX_TILES), got {programs}; pass "
                         f"reduce='separate' or None")
    splits_pad = max(2, _next_power_of_2(num_splits))
    precision, fp32_inputs = paged_dot_mode(q.dtype, target)
    # griddepcontrol is sm_90's (NVIDIA; triton >= 3.4 writes it): the interpreter, older GPUs and ROCm launch the
    # reduce after the attention kernel, plainly
    pdl = (reduce == "separate" and target.nvidia_arch >= 90 and (PAGED_PDL if pdl is None else pdl)
           and _grid_dependency_control())
    attn = KernelLaunch("_paged_attn_kernel", (batch * kv_heads, m_tiles, num_splits), cfg, tuple(dict(
        GROUP=group, HEAD_DIM=head_dim, QK_CHUNK=qk_chunk, NUM_QK_CHUNKS=qk_chunks, HEAD_DIM_V=v_head_dim,
        HEAD_DIM_V_PAD=v_pad, BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=params.causal, HAS_WINDOW=params.window > 0,
        HAS_SOFTCAP=params.softcap > 0, HAS_ALIBI=has_alibi, SPLIT=num_splits > 1,
        FUSED_REDUCE=reduce == "fused", SPLITS_PAD=splits_pad if reduce == "fused" else 1,
        COMBINE_ROWS=paged_combine_rows(group * tq, cfg.block_m, splits_pad, v_pad) if reduce == "fused" else 1,
        CHECK_BOUNDS=check_bounds, DOT_PRECISION=precision, DOT_FP32_INPUTS=fp32_inputs,
        HAS_SINKS=has_sinks, SHORT_SEQUENCES=params.short_sequences,
        EMPTY_ROWS_NAN=bool(params.empty_rows_nan), TABLE_AHEAD=cfg.num_stages >= 3,
        LAUNCH_DEPENDENTS=pdl).items()))
    if reduce != "separate":
        return PagedPlan((attn,), num_splits, reduce=reduce)
    # 4 warps cover a 128-wide row of the reduce; 8 for 256 and wider (unmeasured starting point, as before)
    reduce_cfg = KernelConfig(1, 1, 4 if v_pad <= 128 else 8, 1)
    combine = KernelLaunch("_paged_reduce_kernel", (batch * q_heads * tq, 1, 1), reduce_cfg, (
        ("HEAD_DIM_V", v_head_dim), ("HEAD_DIM_V_PAD", v_pad), ("SPLITS_PAD", splits_pad),
        ("HAS_SINKS", has_sinks), ("EMPTY_ROWS_NAN", bool(params.empty_rows_nan)), ("WAIT_PRIOR", pdl)),
        (("launch_pdl", True),) if pdl else ())
    return PagedPlan((attn, combine), num_splits, reduce=reduce)




def kernel_plan(op: str, params: AttentionParams, *, batch: int, q_heads: int, kv_heads: int, tq: int, tk: int,
                head_dim: int, dtype: torch.dtype, target: Target, bias: str = "none", has_alibi: bool = False,
                block_size: int = 16, direction: str = "forward", v_head_dim: int | None = None,
                has_sinks: bool = False, has_docs: bool = False, traced: bool = False) -> dict[str, Any]:
    """The launches `op` makes for one call of these sizes on `target`: what the dump and the report show.

    The same planner the launchers use (choose_forward_kernel, dense_plan / paged_plan) on the real Tq and Tk (for
    the paged op, Tk is the block table's width in tokens: the split-KV decision reads it, never the lengths). bias:
    "none", "bool" or "float". v_head_dim: Dv (None: = head_dim); has_sinks / has_docs: the call passes sinks /
    doc_ids. traced: the call sits in a graph Inductor compiles with the kernels decomposed (it launches the Triton
    forward then); False: an eager call, which takes the Gluon forward where choose_forward_kernel picks it (the
    note then says it is subject to the tensors' layout, and names the Triton tiles used otherwise).
    Returns {"kernels": [...], "launches": [{kernel, grid, block_m, block_n, num_warps,
    num_stages, constexprs}, ...], "note": ...}; raises what the planner raises for a shape the kernels
    do not support (NotImplementedError / ValueError).
    """
    from attnlower.lowering.registry import OPS

    spec = OPS[op]
    if direction not in spec.kernels:
        raise ValueError(f"kernel_plan: {op} has no {direction!r} kernels; it has {sorted(spec.kernels)}")
    q = Meta((batch, q_heads, tq, head_dim), dtype)
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    note = ""
    if spec.family in ("dense", "dense_backward"):
        k = Meta((batch, kv_heads, tk, head_dim), dtype)
        v = Meta((batch, kv_heads, tk, v_head_dim), dtype)
        bias_meta = {"none": None, "bool": Meta((1,), torch.bool), "float": Meta((1,), dtype)}[bias]
        planned = dense_plan(params, "fwd" if direction == "forward" else "bwd", q, k, v, bias_meta, has_alibi,
                             target, (), has_sinks, has_docs)
        if direction == "forward" and not planned.trivial:
            choice = choose_forward_kernel(params, q, k, v, bias_meta, has_alibi, target, has_sinks, has_docs, False,
                                           GLUON_ENABLED, traced)
            if choice.gluon is not None:
                return _gluon_kernel_plan(params, q, k, v, choice, target, planned.launches[0])
    else:
        max_blocks = max(1, -(-tk // block_size))
        pool = Meta((1, kv_heads, block_size, head_dim), dtype)
        table = Meta((batch, max_blocks), torch.int32)
        planned = paged_plan(params, q, pool, table, has_alibi, target, True, None, None, has_sinks, v_head_dim)
        note = f"split-KV into {planned.num_splits} (from {target.sm_count} SMs and a {tk}-token table)"
        if planned.num_splits > 1:
            note += ("; the last split of each tile combines them (FUSED_REDUCE, one launch)" if planned.fused else
                     "; _paged_reduce_kernel combines them (a second launch)")
    if planned.trivial:
        note = {"empty": "nothing to compute", "no_keys": "Tk = 0: every row is empty, no kernel"}[planned.trivial]
    launches = [dict(kernel=launch.kernel, grid=list(launch.grid), block_m=launch.config.block_m,
                     block_n=launch.config.block_n, num_warps=launch.config.num_warps,
                     num_stages=launch.config.num_stages, constexprs=dict(launch.constexprs))
                for launch in planned.launches]
    return {"kernels": list(spec.kernels[direction].names), "launches": launches, "note": note}


def _gluon_kernel_plan(params: AttentionParams, q: Meta, k: Meta, v: Meta, choice: ForwardChoice, target: Target,
                       fallback: KernelLaunch) -> dict[str, Any]:
    """kernel_plan's answer where choose_forward_kernel picks the Gluon forward: launch_gluon's own host-side plan
    (on meta tensors: no GPU, no triton import), and the Triton launch taken when the layout is not TMA-readable."""
    from attnlower.lowering import launch_gluon

    def meta(m: Meta) -> torch.Tensor:
        return torch.empty(m.shape, dtype=m.dtype, device="meta")

    gluon = launch_gluon.plan_gluon_forward(meta(q), meta(k), meta(v), params, config=choice.gluon,
                                            sm_count=target.sm_count or 132)
    launch = dict(kernel=GLUON_FORWARD, grid=list(gluon.grid), block_m=launch_gluon.BLOCK_M,
                  block_n=choice.gluon.block_n, num_warps=gluon.options["num_warps"],
                  num_stages=choice.gluon.num_stages, constexprs=dict(gluon.constexprs))
    note = (f"{choice.reason}; when q, k, v are TMA-readable (last dim contiguous, other strides multiples of 16 "
            f"bytes, 16-byte aligned data: launch_gluon.check_tma_layout, decided at run time), else "
            f"{fallback.kernel} with BLOCK_M={fallback.config.block_m}, BLOCK_N={fallback.config.block_n}, "
            f"num_warps={fallback.config.num_warps}, num_stages={fallback.config.num_stages}; the Gluon kernel runs "
            f"2 more warpgroups (consumers) besides these num_warps; inside torch.compile (kernels decomposed for "
            f"Inductor) the Triton kernel runs")
    return {"kernels": [GLUON_FORWARD], "launches": [launch], "note": note}
