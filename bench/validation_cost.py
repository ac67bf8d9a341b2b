"""What translation validation costs: its share of compile time on every example, on the CPU.

Runs each `examples/*.py` (CPU defaults, `--inner eager` and `--inner inductor`) in a fresh
process, so the structural-key cache starts empty for each, as it would for a user. Per run it sums:

- validate: seconds in the `validate` pass (every graph's `CompileReport.passes`);
- backend: seconds inside the attnlower backend (canonicalize to aten, the passes, the inner
  compiler), timed around every call Dynamo makes to it. Dynamo's own tracing comes on top, so
  validate / backend is an upper bound on validation's share of compile time;
- wall: the whole example (compiles, eager references, checks), for scale;

and prints a markdown table plus the number of sites checked, served by the cache, checked at reduced
sizes, checked on the first call (with the seconds those checks took, inside the first call), refused
and left unchecked.

    python bench/validation_cost.py [--examples gpt2 llama ...] [--inner eager inductor] [--gpu-sizes]

`--gpu-sizes` runs each example at the sequence length of its GPU default (batch 1, the CPU model
dims), where the sites are over validate.MAX_ELEMENTS: reduced sizes and first-call checks.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ("gpt2", "llama", "mistral", "bert", "vit", "paged_decode")
# the examples' GPU defaults (sequence length, Mistral's window), run on the CPU with batch 1
GPU_SIZES = {"gpt2": ["--seq-len", "1024"], "llama": ["--seq-len", "4096"],
             "mistral": ["--seq-len", "4096", "--window", "1024"], "bert": ["--seq-len", "512"]}


def _one(example: str, inner: str, extra: list[str]) -> dict:
    """Run one example in this process and measure; returns the row as a dict."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    sys.path.insert(0, ROOT)
    import importlib

    from torch._dynamo.backends import registry

    from attnlower.compiler import backend

    spent = {"backend": 0.0}

    def timed_backend(gm, example_inputs, **kwargs):
        t = time.perf_counter()
        try:
            return backend.attnlower_backend(gm, example_inputs, **kwargs)
        finally:
            spent["backend"] += time.perf_counter() - t

    registry.lookup_backend("attnlower")           # load the entry point, then shadow it
    registry._COMPILER_FNS["attnlower"] = timed_backend
    module = importlib.import_module(example)
    start = len(backend.reports())
    out = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out):
        status = module.main(["--device", "cpu", "--inner", inner, *extra])
    wall = time.perf_counter() - t
    reports = backend.reports()[start:]
    validate = [p for r in reports for p in r.passes if p["name"] == "validate"]
    sites = [s for r in reports for s in r.sites if s.validated]
    return {
        "example": example, "inner": inner, "status": status, "graphs": len(reports), "wall": wall,
        "backend": spent["backend"], "validate": sum(p["seconds"] for p in validate),
        "sites": len(sites),
        "cached": sum("not re-run" in s.validated or "same structure as site" in s.validated for s in sites),
        "reduced": sum(s.validated.startswith("float64 CPU") and "at reduced sizes" in s.validated for s in sites),
        "first_call": sum(s.validated.startswith(("first call", "first-call")) for s in sites),
        "first_call_s": sum(_first_call_seconds(s.validated) for s in sites if "same structure" not in s.validated),
        "refused": sum(s.reason.startswith("translation validation") for s in sites),
        "unchecked": sum(s.validated.startswith(("not validated", "not checked")) for s in sites),
    }


def _first_call_seconds(validated: str) -> float:
    """The seconds a first-call check took, as its verdict says ("... real inputs (0.012 s; ...")."""
    import re

    found = re.search(r"on the real inputs \(([0-9.]+) s", validated) if validated.startswith("first call") else None
    return float(found.group(1)) if found else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", nargs="*", default=list(EXAMPLES))
    p.add_argument("--inner", nargs="*", default=["eager", "inductor"])
    p.add_argument("--gpu-sizes", action="store_true", help="each example at its GPU sequence length, batch 1")
    p.add_argument("--one", nargs=2, metavar=("EXAMPLE", "INNER"), help=argparse.SUPPRESS)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(_one(*args.one, args.extra)))
        return 0
    if args.gpu_sizes:
        args.examples = [e for e in args.examples if e in GPU_SIZES]
    import torch

    rows = []
    for example in args.examples:
        for inner in args.inner:
            env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
            extra = ["--extra", "--batch", "1", *GPU_SIZES[example]] if args.gpu_sizes else []
            proc = subprocess.run([sys.executable, __file__, "--one", example, inner, *extra], capture_output=True,
                                  text=True, env=env, cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            if proc.returncode or not line:
                print(f"{example} --inner {inner}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}",
                      file=sys.stderr)
                continue
            rows.append(json.loads(line[0][4:]))
            r = rows[-1]
            print(f"  {example} {inner}: validate {r['validate']:.3f}s of backend {r['backend']:.2f}s",
                  file=sys.stderr)
    print(f"torch {torch.__version__}, CPU, {time.strftime('%Y-%m-%d')}"
          f"{', GPU sequence lengths, batch 1' if args.gpu_sizes else ''}\n")
    print("| example | inner | graphs | sites checked (cached) | at reduced sizes | on the first call | refused | "
          "unchecked | validate s | first-call checks s | backend s | (validate + first call) / backend | "
          "example wall s | example ok |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['example']} | {r['inner']} | {r['graphs']} | {r['sites']} ({r['cached']}) | {r['reduced']} | "
              f"{r['first_call']} | {r['refused']} | {r['unchecked']} | {r['validate']:.3f} | "
              f"{r['first_call_s']:.3f} | {r['backend']:.2f} | "
              f"{100 * (r['validate'] + r['first_call_s']) / max(r['backend'], 1e-9):.1f}% | {r['wall']:.1f} | "
              f"{'yes' if r['status'] == 0 else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
