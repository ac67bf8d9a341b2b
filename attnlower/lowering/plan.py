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

from attnlower.lowering.configs import KernelConfig, flash_config, paged_config, paged_num_splits
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

    @functools.cached_property
    def launch_kwargs(self) -> dict[str, Any]:
        """The constexprs plus num_warps / num_stages, as the kernel's launch takes them (built once)."""
        return dict(self.constexprs, num_warps=self.config.num_warps, num_stages=self.config.num_stages)


@dataclass(frozen=True)
class DensePlan:
    """The kernels of one dense call. `trivial`: "empty" (nothing to compute), "no_keys" (Tk = 0:
    every row is empty, filled without a kernel) or "" (launch `launches` in order)."""

    launches: tuple[KernelLaunch, ...]
    trivial: str = ""


@dataclass(frozen=True)
class PagedPlan:
    """The kernels of one paged call: the attention kernel, then the split-KV reduce when split."""

    launches: tuple[KernelLaunch, ...]
    num_splits: int
    trivial: str = ""


def cached_unless_symbolic(fn):
    """An LRU cache of `fn` that runs it uncached when an argument is not hashable (symbolic sizes
    while tracing). Exceptions are never cached. Used for the plans here and validation in ops.py."""
    cached = functools.lru_cache(maxsize=PLAN_CACHE_SIZE)(fn)

    @functools.wraps(fn)
    def call(*args):
        try:
            return cached(*args)
        except TypeError as error:  # a SymInt: "unhashable type: non-nested SymInt"
            if "unhashable" not in str(error):
                raise
            return fn(*args)

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
                            seq_len=seq_len)

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
               v_head_dim: int | None = None) -> PagedPlan:
    """The plan of a paged call. num_splits / config: overrides (tests, benchmarks), None = choose.
    has_sinks: a sinks tensor is passed (the unsplit kernel or the reduce adds it). v_head_dim: v_cache's head
    dim (None: the q/k head dim).

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
    precision, fp32_inputs = paged_dot_mode(q.dtype, target)
    attn = KernelLaunch("_paged_attn_kernel", (batch * kv_heads, m_tiles, num_splits), cfg, tuple(dict(
        GROUP=group, HEAD_DIM=head_dim, QK_CHUNK=qk_chunk, NUM_QK_CHUNKS=qk_chunks, HEAD_DIM_V=v_head_dim,
        HEAD_DIM_V_PAD=v_pad, BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=params.causal, HAS_WINDOW=params.window > 0,
        HAS_SOFTCAP=params.softcap > 0, HAS_ALIBI=has_alibi, SPLIT=num_splits > 1,
        CHECK_BOUNDS=check_bounds, DOT_PRECISION=precision, DOT_FP32_INPUTS=fp32_inputs,
        HAS_SINKS=has_sinks, SHORT_SEQUENCES=params.short_sequences,
        EMPTY_ROWS_NAN=bool(params.empty_rows_nan)).items()))
    if num_splits == 1:
        return PagedPlan((attn,), 1)
    # 4 warps cover a 128-wide row of the reduce; 8 for 256 and wider (unmeasured starting point, as before)
    reduce_cfg = KernelConfig(1, 1, 4 if v_pad <= 128 else 8, 1)
    reduce = KernelLaunch("_paged_reduce_kernel", (batch * q_heads * tq, 1, 1), reduce_cfg, (
        ("HEAD_DIM_V", v_head_dim), ("HEAD_DIM_V_PAD", v_pad), ("SPLITS_PAD", max(2, _next_power_of_2(num_splits))),
        ("HAS_SINKS", has_sinks), ("EMPTY_ROWS_NAN", bool(params.empty_rows_nan))))
    return PagedPlan((attn, reduce), num_splits)




def kernel_plan(op: str, params: AttentionParams, *, batch: int, q_heads: int, kv_heads: int, tq: int, tk: int,
                head_dim: int, dtype: torch.dtype, target: Target, bias: str = "none", has_alibi: bool = False,
                block_size: int = 16, direction: str = "forward", v_head_dim: int | None = None,
                has_sinks: bool = False, has_docs: bool = False) -> dict[str, Any]:
    """The launches `op` makes for one call of these sizes on `target`: what the dump and the report show.

    The same planner the launchers use (dense_plan / paged_plan) on the real Tq and Tk (for the paged op, Tk
    is the block table's width in tokens: the split-KV decision reads it, never the lengths). bias: "none",
    "bool" or "float". v_head_dim: Dv (None: = head_dim); has_sinks / has_docs: the call passes sinks / doc_ids.
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
    else:
        max_blocks = max(1, -(-tk // block_size))
        pool = Meta((1, kv_heads, block_size, head_dim), dtype)
        table = Meta((batch, max_blocks), torch.int32)
        planned = paged_plan(params, q, pool, table, has_alibi, target, True, None, None, has_sinks, v_head_dim)
        note = f"split-KV into {planned.num_splits} (from {target.sm_count} SMs and a {tk}-token table)"
    if planned.trivial:
        note = {"empty": "nothing to compute", "no_keys": "Tk = 0: every row is empty, no kernel"}[planned.trivial]
    launches = [dict(kernel=launch.kernel, grid=list(launch.grid), block_m=launch.config.block_m,
                     block_n=launch.config.block_n, num_warps=launch.config.num_warps,
                     num_stages=launch.config.num_stages, constexprs=dict(launch.constexprs))
                for launch in planned.launches]
    return {"kernels": list(spec.kernels[direction].names), "launches": launches, "note": note}
