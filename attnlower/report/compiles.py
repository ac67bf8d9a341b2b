"""Which Triton kernels a compiled graph makes Triton compile, and how long each compile took (explain=True)."""
from __future__ import annotations

import time
from typing import Any

from ..target import kernels_of
from .records import CompileReport

_EXPLAINING = False     # an explain=True compile happened in this process: report kernel compiles
KERNEL_COMPILES: list[dict[str, Any]] = []


def explain_kernels(report: CompileReport, target=None) -> None:
    """For explain=True: say in the report which kernels the first call compiles, and from now on
    print each compile of an attnlower kernel as it finishes (timed through Triton's hooks on CUDA)."""
    global _EXPLAINING
    _EXPLAINING = True
    report.kernels = kernels_to_compile(report, target)
    if getattr(target, "kind", "cpu") == "cuda" and report.rewritten:
        watch_triton_compiles()


def kernels_to_compile(report: CompileReport, target=None) -> str:
    """Which Triton kernels the graph's first call compiles (one per configuration), or why none."""
    if not report.rewritten:
        return ""
    kind = getattr(target, "kind", "cpu")
    if kind == "cpu":
        return ("kernels: none compiled; on CPU tensors the ops run the plain-PyTorch reference "
                "(ATTNLOWER_CPU_KERNELS=triton runs the Triton kernels through the interpreter)")
    by_kernel: dict[str, list[int]] = {}
    for s in report.rewritten:
        for _, names, _ in kernels_of(s.op, "forward"):
            for name in names:
                by_kernel.setdefault(name, []).append(s.index)
    listed = "; ".join(f"{k} (site{'s' if len(v) > 1 else ''} {', '.join(map(str, v))})" for k, v in by_kernel.items())
    return (f"kernels: the first call compiles {listed} (one compile per configuration; the backward "
            "kernels on the first backward)" + ("; each compile is reported as it finishes" if kind == "cuda" else
                                                 "; the interpreter runs them without compiling"))


def watch_triton_compiles() -> bool:
    """Time every compile of an attnlower kernel through Triton's JIT hooks (`triton.knobs.runtime`:
    `jit_cache_hook` runs before a compile, `jit_post_compile_hook` after it) and report each with
    record_kernel_compile. Hooks someone else installed keep running. False where this Triton has no
    such hooks (before 3.4); the interpreter compiles nothing, so nothing is reported there."""
    global _WATCHING
    if _WATCHING:
        return True
    try:
        from triton import knobs
        runtime = knobs.runtime
        before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    except (ImportError, AttributeError):
        return False
    started: dict = {}

    def _ours(fn) -> bool:
        return str(getattr(fn, "module", "")).startswith("attnlower.")

    def cache_hook(*args, **kwargs):
        if _ours(kwargs.get("fn")):
            started[str(kwargs.get("key"))] = time.perf_counter()
        return before(*args, **kwargs) if before else None   # truthy would skip the compile: pass theirs on

    def post_compile_hook(*args, **kwargs):
        t0 = started.pop(str(kwargs.get("key")), None)
        if t0 is not None:
            compile_kw = kwargs.get("compile") or {}
            config = ", ".join(f"{k}={compile_kw[k]}" for k in ("num_warps", "num_stages") if k in compile_kw)
            record_kernel_compile(kwargs["fn"].name, config, time.perf_counter() - t0)
        return after(*args, **kwargs) if after else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = cache_hook, post_compile_hook
    _WATCHING = True
    return True


_WATCHING = False


def record_kernel_compile(kernel: str, config: str, seconds: float) -> None:
    """Record that `kernel` was compiled for `config` in `seconds`: kept in KERNEL_COMPILES, printed when a
    graph was compiled with explain=True in this process. Called by the Triton hooks that
    `watch_triton_compiles` installs (the launchers do not call it)."""
    KERNEL_COMPILES.append({"kernel": kernel, "config": config, "seconds": seconds})
    if _EXPLAINING:
        print(f"attnlower: compiled Triton kernel {kernel} ({config}) in {seconds:.2f} s", flush=True)
