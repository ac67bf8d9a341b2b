"""Helpers shared by the examples: arguments, compiling with a report, parity checks, GPU timing.

An example builds a model, calls `compile_with_reports` to get the attnlower-compiled callable,
compares it to eager with `check_close` / `check_equal`, prints what attnlower found with
`print_sites`, asserts the expected op with `check_sites`, and ends with `sys.exit(finish(checks))`:
exit status 1 when any check failed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

# Make `import attnlower` work from a plain checkout too (the examples run as `python examples/x.py`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attnlower.compiler import backend  # noqa: E402
from attnlower.report.records import CompileReport  # noqa: E402

# Max relative error (max |compiled - eager| / max |eager|) accepted per dtype, as in tests/models.py.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """The arguments every example takes; CPU defaults are small, GPU defaults come from the example."""
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--inner", choices=["eager", "inductor"], default=None,
                   help="what runs the rewritten graph (default: inductor on CUDA, eager on CPU)")
    p.add_argument("--batch", type=int, default=defaults.pop("batch", 2))
    p.add_argument("--seq-len", type=int, default=None, help="default: small on CPU, larger on CUDA")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(**defaults)
    return p


def resolve(args: argparse.Namespace, cpu_seq: int, gpu_seq: int, gpu_dtype: str = "bf16") -> argparse.Namespace:
    """Fill the device-dependent defaults (seq-len, dtype, inner) once --device is known."""
    gpu = args.device.startswith("cuda")
    if args.seq_len is None:
        args.seq_len = gpu_seq if gpu else cpu_seq
    if args.dtype is None:
        args.dtype = gpu_dtype if gpu else "fp32"
    if args.inner is None:
        args.inner = "inductor" if gpu else "eager"
    args.torch_dtype = DTYPES[args.dtype]
    args.gpu = gpu
    return args


@dataclass
class Compiled:
    """A compiled callable and the reports of the graphs it has made so far."""

    fn: Callable
    _start: int = field(default=0)

    @property
    def reports(self) -> list[CompileReport]:
        return backend.reports()[self._start:]


def compile_with_reports(fn: Callable, inner: str, **compile_kwargs) -> Compiled:
    """`torch.compile(fn, backend="attnlower")`, keeping the CompileReports it makes from here on."""
    torch._dynamo.reset()
    start = len(backend.reports())
    return Compiled(torch.compile(fn, backend="attnlower", options={"inner": inner}, **compile_kwargs), start)


def header(title: str, args: argparse.Namespace) -> None:
    print(f"== {title}: device={args.device} dtype={args.dtype} inner={args.inner} "
          f"batch={args.batch} seq_len={args.seq_len}")


def print_sites(reports: list[CompileReport]) -> None:
    """The site table of every graph that has attention sites (or that failed)."""
    shown = [r for r in reports if r.sites or r.error]
    for r in shown:
        print(r.table())
    if len(shown) < len(reports):
        print(f"({len(reports) - len(shown)} more graph(s) without attention sites)")


def print_specs(reports: list[CompileReport], keys: tuple[str, ...]) -> None:
    """The chosen AttentionSpec fields `keys` of each distinct rewritten site (same spec printed once)."""
    seen = set()
    for r in reports:
        for s in r.rewritten:
            line = f"    spec of {s.op}: " + ", ".join(f"{k}={s.spec.get(k)}" for k in keys)
            if s.spec and line not in seen:
                seen.add(line)
                print(line)


def check_sites(reports: list[CompileReport], op: str, at_least: int) -> bool:
    """Every site found was rewritten, at least `at_least` of them into `op`, and no graph fell back."""
    failed = [r for r in reports if r.error]
    refused = [s for r in reports for s in r.refused]
    n = sum(r.count(op) for r in reports)
    ok = not failed and not refused and n >= at_least
    print(f"{'ok  ' if ok else 'FAIL'} sites: {n} rewritten to {op} (expected >= {at_least}), "
          f"{len(refused)} unfused, {len(failed)} graph(s) fell back unmodified")
    for s in refused:
        print(f"     unfused site {s.index} at {s.location}: {s.reason}")
    for r in failed:
        print(f"     graph {r.graph_id}: {r.error}")
    return ok


def max_rel_diff(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |got - ref|, that divided by max |ref|), computed in fp32."""
    got, ref = got.float(), ref.float()
    err = (got - ref).abs().max().item()
    return err, err / max(ref.abs().max().item(), 1e-30)


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    err, rel = max_rel_diff(got, ref)
    ok = rel <= rtol  # NaN compares False: a NaN fails
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max |compiled - eager| = {err:.3e} (relative {rel:.3e}, limit {rtol:.0e})")
    return ok


def check_equal(name: str, got: torch.Tensor, ref: torch.Tensor) -> bool:
    ok = torch.equal(got, ref)
    shown = "" if got.numel() > 16 else f": compiled {got.tolist()} vs eager {ref.tolist()}"
    print(f"{'ok  ' if ok else 'FAIL'} {name} equal{shown}")
    return ok


def check_generation(name: str, got, ref, prompt_len: int, rtol: float, require_equal_ids: bool) -> bool:
    """Compare two `generate(..., return_dict_in_generate=True, output_scores=True)` results.

    The scores must agree within `rtol` at every step up to and including the first step whose chosen
    token differs (until then both saw the same inputs). The ids must be equal when
    `require_equal_ids` (fp32); in 16-bit a near-tie may legitimately pick another token.
    """
    got_ids, ref_ids = got.sequences[:, prompt_len:], ref.sequences[:, prompt_len:]
    if got_ids.shape != ref_ids.shape:   # one of them stopped early at an end-of-sequence token
        n = min(got_ids.shape[1], ref_ids.shape[1])
        print(f"FAIL {name}: compiled made {got_ids.shape[1]} token(s), eager {ref_ids.shape[1]}")
        got_ids, ref_ids, ok_len = got_ids[:, :n], ref_ids[:, :n], False
    else:
        ok_len = True
    differs = (got_ids != ref_ids).any(0).nonzero()
    same_until = int(differs[0]) if len(differs) else got_ids.shape[1]
    steps = min(same_until + 1, got_ids.shape[1])
    ok = check_close(f"{name} scores of the first {steps} step(s)",
                     torch.stack(got.scores[:steps]), torch.stack(ref.scores[:steps]), rtol)
    if require_equal_ids:
        return check_equal(f"{name} {got_ids.shape[1]} greedy token(s)", got_ids, ref_ids) and ok and ok_len
    print(f"     {name}: greedy tokens equal for {same_until} of {got_ids.shape[1]} step(s) "
          f"(16-bit: a near-tie may pick another token after that)")
    return ok and ok_len


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of `fn()` on CUDA (triton.testing.do_bench, or CUDA events when Triton is missing)."""
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    except ImportError:
        for _ in range(5):
            fn()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def print_speed(label: str, timings: dict[str, float]) -> None:
    """One line: each candidate's median ms and its speed-up over the first (eager)."""
    base_name, base = next(iter(timings.items()))
    cells = [f"{name} {ms:.3f} ms ({base / ms:.2f}x)" for name, ms in timings.items()]
    print(f"speed {label} [vs {base_name}]: " + ", ".join(cells))


def inductor(fn: Callable, **compile_kwargs) -> Callable:
    """The baseline: torch.compile with Inductor alone."""
    return torch.compile(fn, backend="inductor", **compile_kwargs)


def finish(checks: list[bool]) -> int:
    ok = all(checks)
    print("PASSED" if ok else f"FAILED: {checks.count(False)} of {len(checks)} check(s) failed")
    return 0 if ok else 1
