"""Compile attnlower's kernels for Hopper (sm_90) to PTX and cubin, without a GPU.

    TRITON_INTERPRET=0 python tests/lowering/sm90_compile.py [--quick] [--inductor] [--fits] [--jobs N]
                                                             [--kernels paged]

Triton's interpreter (how the CPU tests run the kernels) accepts programs the real compiler rejects
(dot shapes, layouts, constexpr misuse, shared memory at launch). This script runs the real launchers
(`launch.flash_forward`, `launch.flash_backward`, `launch_paged.paged_forward`) on CPU tensors with
`JITFunction.run` replaced by a recorder, so each launch yields the exact kernel, argument types,
constexprs, num_warps and num_stages it would use on an SM 9.0 GPU; then it compiles each distinct one
with `triton.compile(..., target=GPUTarget("cuda", 90, 32))` (Triton ships ptxas). Modes:

  (default)   the feature grid (dtypes x head dims x bias / softcap / alibi / dropout / window, paged
              split and not); --quick: a smaller grid.
  --inductor  every kernel as Inductor types it when it launches the kernel itself (triton_op): Python
              floats as fp64, ints equal to 1 as constexprs, debug=True (the signature an H200 run of
              torch 2.11 printed), and Inductor's TTIR mutation analysis of torch 2.11, which makes
              every scalar argument a constant (`generate_ttir`: constants = every non-tensor argument).
  --fits      every configuration the launch plan can choose (each op, head dim 16..256, dtype, bias
              kind, dropout, window, GQA group, paged block size and split count, batch size) compiled
              once per distinct kernel (twice where a key loop is pipelined: every feature on, and as
              planned) through Triton's passes up to its shared-memory allocation, and checked against
              sm_90's 232448 bytes per block (a sample also read from LLVM IR: the two must agree).
  --kernels S only the kernels whose name contains S (e.g. `paged`: `_paged_attn_kernel`, both split-KV
              combines, and `_paged_reduce_kernel`), in any mode.

Prints one line per compiled kernel and a summary line; exits 1 if any fails.
tests/lowering/test_sm90_compile.py runs it.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("sm90_compile.py compiles real kernels: run it with TRITON_INTERPRET=0")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from attnlower.lowering import configs, launch, launch_paged, plan  # noqa: E402
from attnlower.lowering.params import AttentionParams  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SM90_SHARED_BYTES = 232448  # 227 KB: the most dynamic shared memory one block may use on H100 / H200
SM90_SM_COUNT = 132         # H100 SXM (the H200 has the same 132 SMs)
_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.bool: "*i1",
            torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8"}


class Launch:
    """One recorded launch: kernel, Triton signature, constexprs and options.

    typing "jit": as Triton's own launcher types the arguments (floats fp32, ints equal to 1 constexprs).
    "inductor": as Inductor's generated code does (floats fp64, ints equal to 1 constexprs, debug=True).
    """

    def __init__(self, fn: JITFunction, args: tuple, kwargs: dict, typing: str = "jit"):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        if typing == "inductor":
            options["debug"] = True
        names = fn.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        constexpr_names = {names[i] for i in fn.constexprs}
        signature, constexprs = {}, {}
        for name in names:
            value = bound[name]
            if name in constexpr_names or value is None or \
                    (type(value) is int and value == 1):   # Triton's JIT and Inductor both specialize 1s
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = _POINTER[value.dtype]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[name] = "fp64" if typing == "inductor" else "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {name} has unexpected type {type(value)}")
        self.fn, self.signature, self.constexprs, self.options, self.typing = fn, signature, constexprs, options, typing
        self.bound = bound

    def key(self):
        return (self.fn.__name__, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        shown = {k: v for k, v in self.constexprs.items() if v is not None and not k.startswith("stride")}
        return f"{self.fn.__name__} [{self.typing}] {shown} {self.options}"


LAUNCHES: dict = {}
_RECORDING = {"typing": "jit", "into": LAUNCHES, "tag": None}


def _record(self, *args, grid, warmup, **kwargs):
    launch_ = Launch(self, args, dict(kwargs), _RECORDING["typing"])
    launch_.tag = _RECORDING["tag"]
    _RECORDING["into"].setdefault(launch_.key(), launch_)


def _hopper_target(device) -> plan.Target:
    # plan the launches for an H100 / H200 (sm_90, 132 SMs, TF32 off: the dot precisions CUDA gets)
    return plan.Target("cuda", 90, SM90_SM_COUNT, False, SM90_SHARED_BYTES)


def record_launches(quick: bool) -> None:
    """Call the launchers over the feature grid; nothing runs, every launch is recorded."""
    rng = torch.tensor([1, 2], dtype=torch.int64)
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    head_dims = [64, 128] if quick else [64, 80, 128, 256]
    for dtype in dtypes:
        for d in head_dims:
            q = torch.empty(1, 4, 96, d, dtype=dtype)
            k = v = torch.empty(1, 2, 96, d, dtype=dtype)
            variants = [dict(), dict(causal=True), dict(causal=True, window=32),
                        dict(doc_ids=torch.zeros(1, 96, dtype=torch.int32), causal=True)]   # + the bounds' kernel
            if not quick:
                variants += [dict(bias=torch.zeros(96, 96, dtype=dtype)),
                             dict(bias=torch.zeros(1, 1, 96, 96, dtype=torch.bool), causal=True),
                             dict(softcap=30.0, alibi=torch.ones(4)),
                             dict(dropout_p=0.1, rng=rng),
                             dict(fill=-1e9, causal=True, window=32,
                                  bias=torch.zeros(1, 1, 96, 96, dtype=torch.bool)),
                             dict(sinks=torch.zeros(4, dtype=dtype), causal=True),
                             dict(doc_ids=torch.zeros(1, 96, dtype=torch.int32), causal=True),
                             dict(doc_ids=torch.zeros(1, 96, dtype=torch.int64), fill=-1e9, dropout_p=0.1, rng=rng),
                             dict(verified=torch.ones((), dtype=torch.bool), causal=True, window=32,
                                  bias=torch.zeros(96, 96, dtype=dtype))]
            for var in variants:
                bias, alibi = var.get("bias"), var.get("alibi")
                params = AttentionParams(d ** -0.5, var.get("causal", False), window=var.get("window", 0),
                                         softcap=var.get("softcap", 0.0), dropout_p=var.get("dropout_p", 0.0),
                                         mask_fill=var.get("fill", float("-inf")))
                tensors = dict(bias=bias, alibi_slopes=alibi, rng_state=var.get("rng"), sinks=var.get("sinks"),
                               doc_ids=var.get("doc_ids"), verified=var.get("verified"))
                out, lse = launch.flash_forward(q, k, v, params, **tensors)
                launch.flash_backward(torch.empty_like(out), q, k, v, out, lse, params, **tensors,
                                      bias_requires_grad=bias is not None and bias.dtype != torch.bool,
                                      sinks_requires_grad=var.get("sinks") is not None)
            for seq_len in (197, 1024, 4096):  # the length-keyed forward tiles (configs._FLASH_FWD_BY_LEN)
                for causal in (False, True):
                    config = configs.flash_config(90, d, dtype, causal, 0, "fwd", seq_len=seq_len)
                    launch.flash_forward(q, k, v, AttentionParams(d ** -0.5, causal), config=config)
            if d == 80:   # Dv != Dqk, both padded apart (issue 21.1)
                vv = torch.empty(1, 2, 96, 48, dtype=dtype)
                params = AttentionParams(d ** -0.5, True, mask_fill=-1e9)
                out, lse = launch.flash_forward(q, k, vv, params, sinks=torch.zeros(4))
                launch.flash_backward(torch.empty_like(out), q, k, vv, out, lse, params, sinks=torch.zeros(4),
                                      sinks_requires_grad=True)
            for tq, splits in ((1, None), (1, 1), (16, None)):
                caches = torch.empty(64, 2, 16, d, dtype=dtype)
                table = torch.zeros(2, 512, dtype=torch.int32)  # 8192 keys wide: the launcher splits KV
                lens = torch.tensor([100, 7], dtype=torch.int32)
                for sinks, reduce in itertools.product((None, torch.zeros(8, dtype=dtype)), ("fused", "separate")):
                    launch_paged.paged_forward(torch.empty(2, 8, tq, d, dtype=dtype), caches, caches, table, lens,
                                               AttentionParams(d ** -0.5, True), num_splits=splits, sinks=sinks,
                                               reduce=reduce)
                # the reduce by programmatic dependent launch (griddepcontrol in both kernels), and 3 stages: the block
                # table read a tile ahead
                launch_paged.paged_forward(torch.empty(2, 8, tq, d, dtype=dtype), caches, caches, table, lens,
                                           AttentionParams(d ** -0.5, True), num_splits=splits, reduce="separate",
                                           pdl=True, config=configs.KernelConfig(16, 64, 8, 3) if d <= 128 else None)


def record_mla_launches(quick: bool) -> None:
    """The paged kernel at MLA's absorbed decode sizes: q·k in 9 chunks of 64, v a 512-wide prefix of the pool."""
    for dtype in [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]:
        pool = torch.empty(64, 1, 64, 576, dtype=dtype)
        table = torch.zeros(4, 128, dtype=torch.int32)
        lens = torch.tensor([100, 7, 4096, 1], dtype=torch.int32)
        for heads, splits, reduce in ((16, None, "fused"), (16, None, "separate"), (128, 1, None), (16, 1, None)):
            launch_paged.paged_forward(torch.empty(4, heads, 1, 576, dtype=dtype), pool, pool[..., :512], table, lens,
                                       AttentionParams(192 ** -0.5, True), num_splits=splits,
                                       sinks=torch.zeros(heads), reduce=reduce)


def record_inductor_launches() -> None:
    """One launch of every kernel with every runtime feature on (dropout, softcap, alibi, float bias,
    window, dbias), typed the way Inductor types the kernels it launches itself."""
    _RECORDING["typing"] = "inductor"
    try:
        rng = torch.tensor([1, 2], dtype=torch.int64)
        for dtype in (torch.bfloat16, torch.float32):
            q = torch.empty(1, 4, 96, 80, dtype=dtype)
            k = v = torch.empty(1, 2, 96, 80, dtype=dtype)
            bias = torch.zeros(1, 4, 96, 96, dtype=dtype)
            params = AttentionParams(0.1, True, True, window=40, softcap=30.0, dropout_p=0.1, mask_fill=-1e9)
            tensors = dict(bias=bias, alibi_slopes=torch.ones(4), rng_state=rng, sinks=torch.zeros(4),
                           doc_ids=torch.zeros(1, 96, dtype=torch.int32), verified=torch.ones((), dtype=torch.bool))
            out, lse = launch.flash_forward(q, k, v, params, **tensors)
            launch.flash_backward(torch.empty_like(out), q, k, v, out, lse, params, **tensors, bias_requires_grad=True,
                                  sinks_requires_grad=True)
            caches = torch.empty(64, 2, 16, 80, dtype=dtype)
            table = torch.zeros(2, 512, dtype=torch.int32)
            lens = torch.tensor([100, 7], dtype=torch.int32)
            for reduce in ("fused", "separate"):
                launch_paged.paged_forward(torch.empty(2, 4, 1, 80, dtype=dtype), caches, caches, table, lens,
                                           AttentionParams(0.1, True, window=40, softcap=30.0),
                                           alibi_slopes=torch.ones(4), sinks=torch.zeros(4), reduce=reduce)
    finally:
        _RECORDING["typing"] = "jit"


# ------------------------------------------------------------------------------------ the plan space

FIT_HEAD_DIMS = (16, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 224, 256)
FIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FIT_LENGTHS = (1, 37, 197, 320, 577, 1024, 4096, 16384)   # every bucket edge of configs._FLASH_FWD_BY_LEN
FIT_GROUPS = (1, 2, 4, 8, 16)
FIT_BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
FIT_BATCHES = (1, 2, 8, 32, 128)
FIT_PAGED_TQ = (1, 2, 4, 16, 64)
# Dv != Dqk (issue 21.1): dense pairs (DeepSeek's prefill 192 / 128, either side wider, both padded apart) and the
# paged ones up to MLA's absorbed decode (576 = 512 latent + 64 rope, v a prefix of the pool; q·k chunked past 256)
FIT_DENSE_DIM_PAIRS = ((192, 128), (128, 192), (256, 64), (64, 256), (24, 16), (40, 80))
FIT_PAGED_DIM_PAIRS = ((576, 512), (320, 256), (192, 128), (128, 512), (26, 20))
FIT_PAGED_V_DIMS = (320, 448, 512)
FITS_CROSS_CHECK = 64   # --fits reads one launch in this many twice (allocation alone, LLVM IR): ~17 of ~1000


def plan_space():
    """Every launch the plan can choose over the grid above: yields (what, KernelLaunch, dtype, bias dtype, TF32,
    Tq).

    The grid covers every input of the plan's choices: head dim (its padded class and odd values), dtype
    and the TF32 flag (fp32 dot precision), key length (the length-keyed forward tiles), causal / window
    (narrow and wide), bias kind and dtype, dropout, alibi, softcap, GQA group, paged block size, Tq,
    table width and batch (the split count)."""
    for allow_tf32 in (False, True):
        target = plan.Target("cuda", 90, SM90_SM_COUNT, allow_tf32, SM90_SHARED_BYTES)
        dense_dims = [(d, d) for d in FIT_HEAD_DIMS] + list(FIT_DENSE_DIM_PAIRS)
        for dtype, (d, dv) in itertools.product(FIT_DTYPES, dense_dims):
            if allow_tf32 and dtype != torch.float32:
                continue  # the flag only changes fp32 dots
            for tk, causal, window, bias_dtype, dropout in itertools.product(
                    FIT_LENGTHS, (False, True), (0, 16, 1000), (None, torch.bool, dtype, torch.float32), (0.0, 0.1)):
                if window and not causal:
                    continue
                params = AttentionParams(0.1, causal, window=window, dropout_p=dropout)
                for tq in sorted({tk, 1}):   # Tq = Tk, and a decode step (Tq = 1: a constexpr once launched)
                    qm = plan.Meta((2, 8, tq, d), dtype)
                    km = plan.Meta((2, 2, tk, d), dtype)
                    vm = plan.Meta((2, 2, tk, dv), dtype)
                    bias = None if bias_dtype is None else plan.Meta((2, 8, tq, tk), bias_dtype)
                    for direction in ("fwd", "bwd"):
                        for launch_ in plan.dense_plan(params, direction, qm, km, vm, bias, True, target).launches:
                            yield (f"dense {direction} Tq={tq} Tk={tk} D={d}/{dv}", launch_, dtype, bias_dtype,
                                   allow_tf32, tq)
        paged_dims = [(d, d) for d in FIT_HEAD_DIMS] + list(FIT_PAGED_DIM_PAIRS)
        for dtype, (d, dv) in itertools.product(FIT_DTYPES, paged_dims):
            if allow_tf32:
                continue  # the paged plan does not read the flag
            groups = FIT_GROUPS + ((128,) if d > 256 else ())   # MLA: up to 128 query heads on one latent head
            for group, block_size, tq, batch in itertools.product(groups, FIT_BLOCK_SIZES, FIT_PAGED_TQ, FIT_BATCHES):
                kv_heads = 1 if d > 256 else 2
                qm = plan.Meta((batch, kv_heads * group, tq, d), dtype)
                pool = plan.Meta((64, kv_heads, block_size, d), dtype)
                for width_tokens in (block_size, 4096, 131072):
                    table = plan.Meta((batch, max(1, width_tokens // block_size)), torch.int32)
                    for (window, check), reduce in itertools.product(((0, True), (64, False)), plan.PAGED_REDUCES):
                        params = AttentionParams(0.1, True, window=window, softcap=0.0)
                        try:
                            planned = plan.paged_plan(params, qm, pool, table, True, target, check, None, None,
                                                      True, dv, reduce)
                        except ValueError:   # more tiles than the fused combine's counters: never chosen fused
                            continue
                        for launch_ in planned.launches:
                            yield f"paged B={batch} Tq={tq} D={d}/{dv}", launch_, dtype, None, False, tq


_PLAIN_FLAGS = ("IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_DROPOUT", "HAS_FILL", "HAS_DOCS",
                "HAS_VERIFIED", "HAS_SINKS", "EMPTY_ROWS_NAN", "CHECK_BOUNDS", "SHORT_SEQUENCES", "MASK_EDGES")


# the split-KV combine's widest split axis: the most splits the plan chooses, padded to a power of two
WIDEST_SPLITS_PAD = 1 << (configs._PAGED_MAX_SPLITS - 1).bit_length()


def _representatives(launch_: plan.KernelLaunch, dtype, bias_dtype):
    """The kernel compiles that stand for this launch, as [(key, constexprs, bias dtype)]: the same tiles, warps,
    stages, padded head dims, dtype and dot precision, compiled twice.

    "every feature": each runtime feature that adds loads, registers or a second key loop switched on (an odd head
    dim when the padded class has one, a float32 bias, dropout, alibi, softcap, window, docs, verified, dbias): the
    most registers. "as planned": the launch's own flags with its head dims at their padded width and its real bias
    dtype: the loads the software pipeliner buffers in full, the most shared memory. The features do not only add
    math: with them Triton 3.6 pipelines less, and the plain kernel needs more shared memory (128x128 tiles, 3
    stages, a bool bias: 262144 bytes as planned, 198656 with every feature; an H200 launch failed on it,
    2026-12-04, bench/modern.py's dense-bias row)."""
    c = dict(launch_.constexprs)
    planned = dict(c)
    # "as planned" keeps what sets the pipelined tiles (tiles, stages, warps, head dims, dtypes, the bias kind and
    # dtype, Tq = 1); the flags that only add masks or math are off, as in the plainest launch of these tiles (the
    # probe above: a causal and a non-causal 64x64 bool-bias forward need the same 122880 bytes)
    planned.update({flag: False for flag in _PLAIN_FLAGS if flag in planned})
    if launch_.kernel == "_paged_attn_kernel":
        planned.update(GROUP=4, BLOCK_SIZE=16, SPLIT=True)
        if planned.get("FUSED_REDUCE"):   # the combine's tile after the loop: the most splits, and its rows then
            planned.update(SPLITS_PAD=WIDEST_SPLITS_PAD, COMBINE_ROWS=configs.paged_combine_rows(
                planned["BLOCK_M"], planned["BLOCK_M"], WIDEST_SPLITS_PAD, planned["HEAD_DIM_V_PAD"]))
    every_bias = bias_dtype
    if launch_.kernel in ("_flash_fwd_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel"):
        c.update(IS_CAUSAL=True, HAS_WINDOW=True, HAS_SOFTCAP=True, HAS_ALIBI=True, BIAS_KIND=2, HAS_DROPOUT=True,
                 HAS_FILL=True, HAS_DOCS=True, HAS_VERIFIED=True)
        if launch_.kernel != "_flash_bwd_dkdv_kernel":
            c["HAS_SINKS"] = True
        every_bias = torch.float32
    if launch_.kernel == "_flash_bwd_dq_kernel":
        c["WRITE_DSINKS"] = True  # a launch argument, not a plan constexpr (launch.flash_backward)
        planned["WRITE_DSINKS"] = False
    if launch_.kernel == "_flash_bwd_dkdv_kernel":
        c["WRITE_DS"] = True  # a launch argument, not a plan constexpr (launch.flash_backward)
        planned["WRITE_DS"] = bias_dtype is not None and bias_dtype != torch.bool
    if launch_.kernel == "_paged_attn_kernel":
        # GROUP, BLOCK_SIZE and SPLIT only enter index math (token -> block, slot; row -> head) and the stores
        c.update(HAS_WINDOW=True, HAS_SOFTCAP=True, HAS_ALIBI=True, CHECK_BOUNDS=True, GROUP=4, BLOCK_SIZE=16,
                 SPLIT=True, HAS_SINKS=True)
        if c["FUSED_REDUCE"]:   # the combine's [COMBINE_ROWS, SPLITS_PAD, HEAD_DIM_V_PAD] tile: the most rows at once
            rows = configs.paged_combine_rows(c["BLOCK_M"], c["BLOCK_M"], 2, c["HEAD_DIM_V_PAD"])
            splits_pad = 2
            budget = configs._PAGED_COMBINE_ELEMENTS
            while splits_pad < WIDEST_SPLITS_PAD and rows * splits_pad * 2 * c["HEAD_DIM_V_PAD"] <= budget:
                splits_pad *= 2
            c.update(COMBINE_ROWS=rows, SPLITS_PAD=splits_pad)   # ("as planned": the most splits)
    if launch_.kernel == "_paged_reduce_kernel":   # its one tile, [SPLITS_PAD, HEAD_DIM_V_PAD]: at its widest
        c.update(HAS_SINKS=True, SPLITS_PAD=WIDEST_SPLITS_PAD)
    if dtype == torch.float16:
        dtype = torch.bfloat16  # the same element size and tensor-core shapes: the same tiles in shared memory
    for dim, padded in (("HEAD_DIM", "HEAD_DIM_PAD"), ("HEAD_DIM_V", "HEAD_DIM_V_PAD"), ("HEAD_DIM", "QK_CHUNK")):
        pad = c.get(padded)
        if pad is not None and (padded != "QK_CHUNK" or c["NUM_QK_CHUNKS"] == 1):   # chunked q·k: its own D
            odd = [d for d in FIT_HEAD_DIMS + FIT_PAGED_V_DIMS if plan.head_dim_pad(d) == pad and d != pad]
            c[dim] = max(odd) if odd else pad
            planned[dim] = pad
    if bias_dtype == torch.float16:
        bias_dtype = torch.bfloat16   # the same bytes per bias tile
    out = []
    for flags, bias in ((c, every_bias), (planned, bias_dtype)):
        if flags is planned and (launch_.kernel in ("_paged_reduce_kernel", "_flash_bwd_preprocess_kernel")
                                 or launch_.config.num_stages == 1):
            # no key loop, or one stage: nothing pipelined, and the "every feature" compile (the widest bias) stands
            # for it (one-stage dK/dV and dQ: the same bytes as planned, 2026-12-04, the full --fits under triton 3.6)
            continue
        key = (launch_.kernel, dtype, bias if "BIAS_KIND" in flags else None, tuple(sorted(flags.items())),
               launch_.config.num_warps, launch_.config.num_stages)
        out.append((key, flags, bias))
    return out


def _kernel_fn(name: str):
    from attnlower.lowering.kernels import flash_bwd, flash_fwd, paged_decode
    for module in (flash_fwd, flash_bwd, paged_decode):
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(name)


def fits_launches() -> tuple[dict, int]:
    """The representative compiles of the plan space: {key: Launch}, and how many plan launches they cover."""
    reps: dict = {}
    count = 0
    for what, launch_, dtype, bias_dtype, _, tq in plan_space():
        count += 1
        ones = {"N_CTX_Q", "Tq"} if tq == 1 else set()   # launched, Tq = 1 is a constexpr (it changes the compile)
        for index, (key, constexprs, bias) in enumerate(_representatives(launch_, dtype, bias_dtype)):
            if index and ones:   # a decode step (Tq = 1): its "every feature" compile only, to keep CI's time
                continue
            key += (tuple(sorted(ones)),)
            if key in reps:
                continue
            fn = _kernel_fn(launch_.kernel)
            args = _synthetic_args(fn, constexprs, dtype, bias, ones)
            rec = Launch(fn, args, dict(constexprs, num_warps=launch_.config.num_warps,
                                        num_stages=launch_.config.num_stages))
            rec.tag = what
            reps[key] = rec
    return reps, count


_SIZE_ARGS = {"H", "HKV", "GROUP", "N_CTX_Q", "N_CTX_K", "Hq", "Hkv", "Tq"}


def _synthetic_args(fn, constexprs: dict, dtype, bias_dtype, ones: set = frozenset()) -> tuple:
    """Positional runtime arguments of `fn`: tensors of the right dtype per pointer, ints, floats; the size
    arguments named in `ones` are 1."""
    pointer_dtype = {"Bias": bias_dtype or dtype, "Slopes": torch.float32, "Lse": torch.float32,
                     "Delta": torch.float32, "LseFill": torch.float32, "Sinks": torch.float32,
                     "DSinks": torch.float32, "sinks_ptr": torch.float32, "DocIds": torch.int64,
                     "Bounds": torch.int32, "Verified": torch.bool, "Rng": torch.int64, "DS": torch.float32,
                     "block_table_ptr": torch.int32, "seq_lens_ptr": torch.int32, "alibi_ptr": torch.float32,
                     "ws_ptr": torch.float32,
                     "counters_ptr": torch.int32, "err_ptr": torch.int32}
    floats = {"sm_scale", "softcap", "dropout_p", "scale", "fill"}
    args = []
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            break
        if (name[0].isupper() and name not in _SIZE_ARGS) or name.endswith("_ptr"):
            args.append(torch.empty(1, dtype=pointer_dtype.get(name, dtype)))
        elif name in floats:
            args.append(0.5)
        elif name in ones:
            args.append(1)
        else:
            args.append(48)  # strides and sizes: a multiple of 16 (Triton's "divisible by 16" specialization)
    return tuple(args)


# ------------------------------------------------------------------------------------ compiling


def divisibility_attrs(launch_: Launch) -> dict:
    """What a GPU launch tells the compiler about its arguments: every pointer 16-byte aligned and every int
    a multiple of 16 (Triton's `tt.divisibility` specialization; Inductor's `configs` say the same). That is
    the worst case for shared memory: with it the compiler vectorizes and pipelines loads through shared
    memory (cp.async stages); without it (a compile with no attrs) it does not, and a kernel measured that
    way needed 98304 bytes where the H200 launch of the same kernel needed 262144 (2026-12-03,
    /work/gpu-logs/call4/probe.log: the dense decode Tq=1, Tk=4096, D=128 under Inductor)."""
    attrs = {}
    for index, (name, kind) in enumerate(launch_.signature.items()):
        if kind.startswith("*") or kind in ("i32", "i64"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def compile_launch(launch_: Launch):
    src = triton.compiler.ASTSource(fn=launch_.fn, signature=launch_.signature, constexprs=launch_.constexprs,
                                    attrs=divisibility_attrs(launch_))
    return triton.compile(src, target=TARGET, options=launch_.options)


def ttir_with_constant_scalars(launch_: Launch) -> None:
    """Build the TTIR as torch 2.11's Inductor mutation analysis does (`generate_ttir`): every argument
    that is not a tensor becomes a constant. Raises what Triton raises (Inductor would then assume every
    input is mutated and clone them all)."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend

    signature, constexprs = dict(launch_.signature), dict(launch_.constexprs)
    for name, value in launch_.bound.items():
        if not isinstance(value, torch.Tensor):
            signature[name] = "constexpr"
            constexprs[name] = value
    src = triton.compiler.ASTSource(fn=launch_.fn, signature=signature, constexprs=constexprs)
    backend = make_backend(TARGET)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(TARGET, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    if not module.verify():
        raise RuntimeError("the TTIR does not verify")


# What each kernel writes: Inductor's mutation analysis must find exactly these (anything it cannot analyze
# it treats as mutated, and then clones every input of every launch).
def expected_writes(launch_: Launch) -> set:
    c = launch_.constexprs
    if launch_.fn.__name__ == "_paged_attn_kernel":   # split: partial results to the workspaces, the combine writes out
        writes = {"ws_ptr"} if c.get("SPLIT") else {"out_ptr"}
        if c.get("FUSED_REDUCE"):   # the last split of a tile writes out and counts in (then resets) its counter
            writes |= {"out_ptr", "counters_ptr"}
        return writes | ({"err_ptr"} if c.get("CHECK_BOUNDS") else set())
    return {"_flash_fwd_kernel": {"Out", "Lse"}, "_flash_bwd_preprocess_kernel": {"Delta"},
            "_flash_bwd_dkdv_kernel": {"DK", "DV"} | ({"DS"} if c.get("WRITE_DS") else set()),
            "_flash_bwd_dq_kernel": {"DQ"} | ({"LseFill"} if c.get("HAS_FILL") else set())
            | ({"DSinks"} if c.get("WRITE_DSINKS") else set()),
            "_paged_reduce_kernel": {"out_ptr"}, "_doc_bounds_kernel": {"bounds_ptr"}}[launch_.fn.__name__]


class _Sm90Driver:
    """Just enough of a Triton driver for torch's TTIR analysis to target sm_90 on a machine without a GPU."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def is_active(self):
        return True


def inductor_mutations(launch_: Launch) -> set:
    """The tensors Inductor's own analysis (the installed torch) says the launch writes."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    triton.runtime.driver.set_active(_Sm90Driver())
    kwargs = dict(launch_.bound, num_warps=launch_.options.get("num_warps", 4),
                  num_stages=launch_.options.get("num_stages", 3))
    if hasattr(wrap, "identify_accessed_tensors"):       # torch >= 2.12
        accesses = wrap.identify_accessed_tensors(launch_.fn, kwargs, {})
        return {dep.name for dep in accesses.read_writes.writes}
    return set(wrap.identify_mutated_tensors(launch_.fn, kwargs, {}))


def _to_ttgir(launch_: Launch):
    """Triton's own pipeline for `launch_` on sm_90 up to TritonGPU IR (tiles, layouts, software pipelining
    decided): (module, options, metadata, stages)."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend

    src = triton.compiler.ASTSource(fn=launch_.fn, signature=launch_.signature, constexprs=launch_.constexprs,
                                    attrs=divisibility_attrs(launch_))
    backend = make_backend(TARGET)
    options = backend.parse_options(dict(launch_.options))
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    metadata = {"target": TARGET, **options.__dict__}
    module = src.make_ir(TARGET, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    for ext in ("ttir", "ttgir"):
        module = stages[ext](module, metadata)
    return module, options, metadata, stages


def shared_bytes_to_llir(launch_: Launch) -> int:
    """The shared memory `launch_` needs on sm_90, from Triton's own pipeline stopped after LLVM IR (`ttg.shared`,
    what the launch checks against the device's limit; ptxas adds nothing to it: on 6 random launches of the plan
    space, triton 3.6, 2026-12-04, it equalled the full compile's `metadata.shared`). The reference for
    `shared_bytes_allocated`."""
    module, _, metadata, stages = _to_ttgir(launch_)
    stages["llir"](module, metadata)
    return metadata["shared"]


def shared_bytes_allocated(launch_: Launch) -> int:
    """`shared_bytes_to_llir` without the lowering to LLVM (a third of its time): after TritonGPU IR, only the passes
    Triton's `make_llir` runs up to and including its shared-memory allocation (the same order in triton 3.6 and
    3.9), then the `ttg.shared` the allocation wrote. On 10 random launches of the plan space it equalled the LLVM IR
    reading under triton 3.6 and 3.9 (2026-12-04); --fits cross-checks a sample of its launches each run."""
    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.nvidia.compiler import get_ptx_version_from_options

    module, options, _, _ = _to_ttgir(launch_)
    pm = ir.pass_manager(module.context)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    try:
        passes.ttgpuir.add_allocate_warp_groups(pm, False)   # triton 3.9: (pm, consan)
    except TypeError:
        passes.ttgpuir.add_allocate_warp_groups(pm)          # triton 3.6
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, TARGET.arch, get_ptx_version_from_options(options, TARGET.arch))
    try:
        pm.run(module, "allocate_shared_memory")   # triton 3.9 names each run
    except TypeError:
        pm.run(module)
    return module.get_int_attr("ttg.shared")


def check_fits(launch_: Launch, cross_check: bool = False) -> str:
    """--fits: the launch's shared memory within sm_90's limit (raises when over). `cross_check`: the allocation
    alone must read what the LLVM IR reading does (raises when not: Triton's pass order changed)."""
    t0 = time.perf_counter()
    shared = shared_bytes_allocated(launch_)
    if cross_check and shared != (reference := shared_bytes_to_llir(launch_)):
        raise RuntimeError(f"the shared-memory allocation alone read {shared} bytes, the LLVM IR {reference}: "
                           f"shared_bytes_allocated no longer follows this Triton's make_llir")
    if shared > SM90_SHARED_BYTES:  # the launch would fail with OutOfResources
        raise RuntimeError(f"needs {shared} bytes of shared memory, an sm_90 block gets at most {SM90_SHARED_BYTES}")
    checked = " (= LLVM IR)" if cross_check else ""
    return f"ok  {time.perf_counter() - t0:5.1f}s shared={shared}{checked}"


def check_one(launch_: Launch, constant_scalars: bool = False) -> str:
    """Compile one launch; returns a status line (raises on failure)."""
    t0 = time.perf_counter()
    if constant_scalars:
        ttir_with_constant_scalars(launch_)
        written = inductor_mutations(launch_)
        if written != expected_writes(launch_):
            raise RuntimeError(f"Inductor's mutation analysis found writes to {sorted(written)}, expected "
                               f"{sorted(expected_writes(launch_))}")
        return (f"ok  {time.perf_counter() - t0:5.1f}s TTIR with every scalar a constant; Inductor's analysis "
                f"finds writes to {sorted(written)} only")
    compiled = compile_launch(launch_)
    shared = compiled.metadata.shared
    if shared > SM90_SHARED_BYTES:  # the launch would fail with OutOfResources
        raise RuntimeError(f"needs {shared} bytes of shared memory, an sm_90 block gets at most {SM90_SHARED_BYTES}")
    # programmatic dependent launch: the instruction each side's constexpr asks for is in the PTX
    for flag, instruction in (("LAUNCH_DEPENDENTS", "griddepcontrol.launch_dependents"),
                              ("WAIT_PRIOR", "griddepcontrol.wait")):
        if launch_.constexprs.get(flag) and instruction not in compiled.asm["ptx"]:
            raise RuntimeError(f"{flag}=True compiled without {instruction}")
    regs, stack = register_usage(compiled)
    threads = 32 * launch_.options.get("num_warps", 4)
    if regs is not None and regs * threads > SM90_REGISTERS_PER_BLOCK:
        raise RuntimeError(f"needs {regs} registers x {threads} threads, an sm_90 block gets {SM90_REGISTERS_PER_BLOCK}")
    usage = "" if regs is None else f" regs={regs} spill_stack={stack}"
    return f"ok  {time.perf_counter() - t0:5.1f}s shared={shared}{usage}"


SM90_REGISTERS_PER_BLOCK = 65536


def register_usage(compiled) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes per thread: spills) of a compiled kernel, from the cuobjdump Triton
    ships; (None, None) where it is missing. ptxas keeps registers within the block's share (Triton sets
    maxntid), so the limit cannot fail a launch; spills only cost speed (printed, not failed)."""
    import re
    import subprocess
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists() or "cubin" not in compiled.asm:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


_ITEMS: list = []   # what the workers compile: forked processes inherit it (kernels do not pickle)


def _check_worker(index: int):
    launch_, constant_scalars = _ITEMS[index]
    try:
        if constant_scalars in ("fits", "fits+llir"):
            return index, True, check_fits(launch_, cross_check=constant_scalars == "fits+llir")
        return index, True, check_one(launch_, constant_scalars)
    except Exception as e:  # noqa: BLE001 - every failure is reported, then the script fails
        return index, False, (f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
                              + traceback.format_exc())


def run(items: list, jobs: int) -> int:
    _ITEMS[:] = items
    work = range(len(items))
    if jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return _report(items, pool.map(_check_worker, work, chunksize=4))
    return _report(items, map(_check_worker, work))


def _report(items, results) -> int:
    failed = 0
    for index, ok, status in results:
        launch_ = items[index][0]
        if not ok:
            failed += 1
            print(status.split("\n", 1)[1], file=sys.stderr)
            status = status.split("\n", 1)[0]
        tag = f" ({launch_.tag})" if getattr(launch_, "tag", None) else ""
        print(f"{status}  {launch_.describe()}{tag}", flush=True)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--inductor", action="store_true", help="also compile every kernel as Inductor types it")
    parser.add_argument("--fits", action="store_true", help="only: every config the plan can choose fits sm_90")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--kernels", default="", help="only the kernels whose name contains this (e.g. paged)")
    ns = parser.parse_args()
    JITFunction.run = _record
    plan.target_of = _hopper_target
    t_all = time.perf_counter()
    items = []
    if ns.fits:
        reps, covered = fits_launches()
        print(f"plan space: {covered} launches, {len(reps)} distinct kernel compiles", flush=True)
        # shared memory from Triton's allocation; every FITS_CROSS_CHECK-th launch also read from LLVM IR
        items = [(launch_, "fits+llir" if i % FITS_CROSS_CHECK == 0 else "fits")
                 for i, launch_ in enumerate(reps.values())]
    else:
        record_launches(ns.quick)
        record_mla_launches(ns.quick)
        if ns.inductor:
            record_inductor_launches()
        items = [(launch_, False) for launch_ in LAUNCHES.values()]
        if ns.inductor:
            items += [(launch_, True) for launch_ in LAUNCHES.values() if launch_.typing == "inductor"]
    items = [item for item in items if ns.kernels in item[0].fn.__name__]
    failed = run(items, ns.jobs)
    print(f"{len(items)} kernels, {failed} failed, {time.perf_counter() - t_all:.0f}s "
          f"(triton {triton.__version__}, target sm_90)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
