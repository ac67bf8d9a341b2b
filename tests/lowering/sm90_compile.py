"""Compile every kernel specialization the launchers pick on Hopper to PTX and cubin, without a GPU.

    TRITON_INTERPRET=0 python tests/lowering/sm90_compile.py [--quick]

Triton's interpreter (how the CPU tests run the kernels) accepts programs the real compiler rejects
(dot shapes, layouts, constexpr misuse, register pressure at launch). This script runs the real
launchers (`launch.flash_forward`, `launch.flash_backward`, `launch_paged.paged_forward`) on CPU
tensors with `JITFunction.run` replaced by a recorder, so each launch yields the exact kernel,
argument types, constexprs, num_warps and num_stages it would use on an SM 9.0 GPU (and the forward
once more with each tile choice configs.flash_config makes from a sequence length); then it compiles
each distinct one with `triton.compile(..., target=GPUTarget("cuda", 90, 32))` (Triton ships ptxas).
Prints one line per kernel and exits 1 if any fails. tests/lowering/test_sm90_compile.py runs it.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
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
_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.bool: "*i1",
            torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8"}


class Launch:
    def __init__(self, fn: JITFunction, args: tuple, kwargs: dict):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        names = fn.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        constexpr_names = {names[i] for i in fn.constexprs}
        signature, constexprs = {}, {}
        for name in names:
            value = bound[name]
            if name in constexpr_names or value is None:
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = _POINTER[value.dtype]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {name} has unexpected type {type(value)}")
        self.fn, self.signature, self.constexprs, self.options = fn, signature, constexprs, options

    def key(self):
        return (self.fn.__name__, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        shown = {k: v for k, v in self.constexprs.items() if v is not None}
        return f"{self.fn.__name__} {shown} {self.options}"


LAUNCHES: dict = {}


def _record(self, *args, grid, warmup, **kwargs):
    launch_ = Launch(self, args, dict(kwargs))
    LAUNCHES.setdefault(launch_.key(), launch_)


def record_launches(quick: bool) -> None:
    """Call the launchers over the feature grid; nothing runs, every launch is recorded."""
    # plan the launches for an H100 (sm_90, 132 SMs, TF32 off: the dot precisions CUDA gets)
    plan.target_of = lambda device: plan.Target("cuda", 90, 132, False)
    rng = torch.tensor([1, 2], dtype=torch.int64)
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    head_dims = [64, 128] if quick else [64, 80, 128, 256]
    for dtype in dtypes:
        for d in head_dims:
            q = torch.empty(1, 4, 96, d, dtype=dtype)
            k = v = torch.empty(1, 2, 96, d, dtype=dtype)
            variants = [dict(), dict(causal=True), dict(causal=True, window=32)]
            if not quick:
                variants += [dict(bias=torch.zeros(96, 96, dtype=dtype)),
                             dict(bias=torch.zeros(1, 1, 96, 96, dtype=torch.bool), causal=True),
                             dict(softcap=30.0, alibi=torch.ones(4)),
                             dict(dropout_p=0.1, rng=rng)]
            for var in variants:
                bias, alibi = var.get("bias"), var.get("alibi")
                params = AttentionParams(d ** -0.5, var.get("causal", False), window=var.get("window", 0),
                                         softcap=var.get("softcap", 0.0), dropout_p=var.get("dropout_p", 0.0))
                tensors = dict(bias=bias, alibi_slopes=alibi, rng_state=var.get("rng"))
                out, lse = launch.flash_forward(q, k, v, params, **tensors)
                launch.flash_backward(torch.empty_like(out), q, k, v, out, lse, params, **tensors,
                                      bias_requires_grad=bias is not None and bias.dtype != torch.bool)
            for seq_len in (197, 1024, 4096):  # the length-keyed forward tiles (configs._FLASH_FWD_BY_LEN)
                for causal in (False, True):
                    config = configs.flash_config(90, d, dtype, causal, 0, "fwd", seq_len=seq_len)
                    launch.flash_forward(q, k, v, AttentionParams(d ** -0.5, causal), config=config)
            for tq, splits in ((1, None), (1, 1), (16, None)):
                caches = torch.empty(64, 2, 16, d, dtype=dtype)
                table = torch.zeros(2, 512, dtype=torch.int32)  # 8192 keys wide: the launcher splits KV
                lens = torch.tensor([100, 7], dtype=torch.int32)
                launch_paged.paged_forward(torch.empty(2, 8, tq, d, dtype=dtype), caches, caches, table, lens,
                                           AttentionParams(d ** -0.5, True), num_splits=splits)


def main() -> int:
    quick = "--quick" in sys.argv
    JITFunction.run = _record
    record_launches(quick)
    failed = 0
    t_all = time.perf_counter()
    for launch_ in LAUNCHES.values():
        t0 = time.perf_counter()
        try:
            src = triton.compiler.ASTSource(fn=launch_.fn, signature=launch_.signature,
                                            constexprs=launch_.constexprs)
            compiled = triton.compile(src, target=TARGET, options=launch_.options)
            if compiled.metadata.shared > SM90_SHARED_BYTES:  # the launch would fail with OutOfResources
                raise RuntimeError(f"needs {compiled.metadata.shared} bytes of shared memory, "
                                   f"an sm_90 block gets at most {SM90_SHARED_BYTES}")
            regs = getattr(compiled, "n_regs", None)
            status = f"ok  {time.perf_counter() - t0:5.1f}s shared={compiled.metadata.shared}"
            status += f" regs={regs}" if regs is not None else ""
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the script fails
            failed += 1
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(file=sys.stderr)
        print(f"{status}  {launch_.describe()}", flush=True)
    print(f"{len(LAUNCHES)} kernels, {failed} failed, {time.perf_counter() - t_all:.0f}s "
          f"(triton {triton.__version__}, target sm_90)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
