"""Why did the dK/dV kernel give a wrong dK with 32x128 pipelined tiles? A minimal reproducer.

    python bench/bwd_tiles_repro.py          # GPU only; writes $OUT/bwd_tiles.json when OUT is set

History (bench/RESULTS.md, H100, 2026-11-23): `_flash_bwd_dkdv_kernel` with BLOCK_M=32 queries
streamed, BLOCK_N=128 keys held, 2-3 stages gave dK wrong by 15-30% of max|dK| (dQ, dV right); 64x64
with one stage was right. This script separates the three suspects on the same bf16 inputs:

  tile shape   32x128 (and 32x64, 64x128) with num_stages=1: no software pipelining at all
  pipelining   the same shapes with 2 and 3 stages, and 64x64 with 2-3 stages
  a race       each config runs 3 times on identical inputs: results that differ bit-wise are a race
               (a missing wait / barrier); a deterministic wrong answer is a miscompile or a bug here
  one fix each, on the failing config, as a source patch of the inner loop (kernel arguments unchanged):
    noaccmb    `tl.range(..., disallow_acc_multi_buffer=True)`: no multi-buffered dot accumulators
    nopipe     `tl.range(..., num_stages=1)` on the dK/dV loop only

Every result is against a float64 oracle (tests/lowering/attention_oracle.py) from the same bf16
inputs: max|err| / max|ref| for dq, dk, dv, plus where dK's error sits inside the key tile (rows
counted modulo BLOCK_N). Then each config that is right is timed (the whole backward, dQ kernel fixed).
Kernels are compiled first in parallel worker processes (the on-disk Triton cache), then run here.
"""
from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "lowering"))

NO_RNG = torch.empty(0, dtype=torch.int64)
# (block_m, block_n, num_warps, num_stages)
CONFIGS = [(64, 64, 4, 1), (32, 128, 4, 1), (32, 128, 4, 2), (32, 128, 4, 3), (32, 128, 8, 3),
           (32, 64, 4, 1), (32, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 1), (64, 128, 8, 2)]
PATCHES = {
    "noaccmb": "tl.range(lo, hi, BLOCK_M, disallow_acc_multi_buffer=True)",
    "nopipe": "tl.range(lo, hi, BLOCK_M, num_stages=1)",
}
PATCHED_CONFIGS = [(32, 128, 4, 3), (32, 128, 4, 2)]
SPECS = [(64, False), (128, True)]  # (head_dim, causal): both failed in 2026-11-23's run
CHECK_SHAPE = dict(batch=2, q_heads=4, kv_heads=2, n=1024)
TIME_SHAPE = dict(batch=4, q_heads=16, kv_heads=16, n=4096)


def bwd_module(patch: str | None):
    """kernels/flash_bwd.py itself, or a copy with the dK/dV inner loop's `range` replaced."""
    import attnlower.lowering.kernels.flash_bwd as original
    if patch is None:
        return original
    src = Path(original.__file__).read_text()
    old = "for start_m in range(lo, hi, BLOCK_M):"
    assert src.count(old) == 1, "the dK/dV inner loop moved: update bwd_tiles_repro.py"
    path = Path(os.environ.get("TMPDIR", "/tmp"), f"attnlower_flash_bwd_{patch}.py")
    path.write_text(src.replace(old, "for start_m in " + PATCHES[patch] + ":"))
    spec = importlib.util.spec_from_file_location(f"attnlower_flash_bwd_{patch}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_backward(q, k, v, grad_out, causal, cfg, patch):
    from attnlower.lowering import launch
    from attnlower.lowering.configs import KernelConfig
    module = bwd_module(patch)
    from attnlower.lowering.params import AttentionParams
    saved = launch.flash_bwd._flash_bwd_dkdv_kernel   # the launcher looks kernels up on their module per call
    launch.flash_bwd._flash_bwd_dkdv_kernel = module._flash_bwd_dkdv_kernel
    try:
        params = AttentionParams(1.0 / math.sqrt(q.shape[-1]), causal)
        out, lse = launch.flash_forward(q, k, v, params)
        dq, dk, dv, *_ = launch.flash_backward(grad_out, q, k, v, out, lse, params, config_kv=KernelConfig(*cfg))
    finally:
        launch.flash_bwd._flash_bwd_dkdv_kernel = saved
    return dq, dk, dv


def inputs(batch, q_heads, kv_heads, n, head_dim, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, q_heads, n, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(batch, kv_heads, n, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    return q, k, v, torch.randn_like(q)


def _compile(job):
    """Worker: run one (spec, config, patch) once on a tiny problem so its kernels land in the cache."""
    (head_dim, causal), cfg, patch = job
    try:
        q, k, v, g = inputs(1, 2, 1, 256, head_dim)
        run_backward(q, k, v, g, causal, cfg, patch)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported by the main process, which reruns it
        return f"{type(e).__name__}: {str(e)[:200]}"


def jobs():
    out = [(spec, cfg, None) for spec in SPECS for cfg in CONFIGS]
    out += [(spec, cfg, patch) for spec in SPECS for cfg in PATCHED_CONFIGS for patch in PATCHES]
    return out


def oracle_grads(q, k, v, grad_out, causal):
    from attention_oracle import oracle
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    with torch.device(q.device):
        out, _ = oracle(*leaves, causal=causal)
    out.backward(grad_out.double())
    return [x.grad for x in leaves]


def where_in_tile(err_dk, block_n):
    """Max dK error by row position inside the key tile (modulo block_n): a summary string of the
    row ranges whose error exceeds 10x the median position's error."""
    by_row = err_dk.amax(dim=(0, 1, 3))  # [Tk]
    n = by_row.numel() // block_n * block_n
    pos = by_row[:n].view(-1, block_n).amax(0)
    bad = (pos > 10 * pos.median()).nonzero().flatten().tolist()
    if not bad:
        return "uniform"
    ranges, start = [], bad[0]
    for a, b in zip(bad, bad[1:] + [None]):
        if b != a + 1:
            ranges.append(f"{start}-{a}" if a != start else f"{start}")
            if b is not None:
                start = b
    return "rows " + ",".join(ranges) + f" of {block_n}"


def main() -> None:
    import triton
    t0 = time.time()
    todo = jobs()
    with mp.get_context("spawn").Pool(min(16, len(todo))) as pool:
        errors = pool.map(_compile, todo)
    print(f"compiled {len(todo)} variants in {time.time() - t0:.0f}s; worker errors: "
          f"{sum(e is not None for e in errors)}", flush=True)
    rows = []
    for (spec, cfg, patch), werr in zip(todo, errors):
        head_dim, causal = spec
        row = dict(D=head_dim, causal=causal, cfg=list(cfg), patch=patch or "-")
        try:
            q, k, v, g = inputs(head_dim=head_dim, seed=1, **CHECK_SHAPE)
            ref = oracle_grads(q, k, v, g, causal)
            runs = [run_backward(q, k, v, g, causal, cfg, patch) for _ in range(3)]
            for name, got, r in zip(("dq", "dk", "dv"), runs[0], ref):
                row[name] = ((got.double() - r).abs().max() / r.abs().max()).item()
            row["deterministic"] = all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
            row["dk_error_at"] = where_in_tile((runs[0][1].double() - ref[1]).abs(), cfg[1])
            q2, k2, v2, g2 = inputs(head_dim=head_dim, seed=2, **CHECK_SHAPE)
            ref2 = oracle_grads(q2, k2, v2, g2, causal)
            dk2 = run_backward(q2, k2, v2, g2, causal, cfg, patch)[1]
            row["dk_seed2"] = ((dk2.double() - ref2[1]).abs().max() / ref2[1].abs().max()).item()
            if row["dk"] < 1e-2 and row["dk_seed2"] < 1e-2:
                qt, kt, vt, gt = inputs(head_dim=head_dim, seed=3, **TIME_SHAPE)
                row["bwd_ms"] = triton.testing.do_bench(lambda: run_backward(qt, kt, vt, gt, causal, cfg, patch),
                                                        return_mode="median")
                del qt, kt, vt, gt
        except Exception as e:  # noqa: BLE001 - a config that fails to compile / launch is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}" + (f" (worker: {werr})" if werr else "")
        rows.append(row)
        print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bwd_tiles.json").write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=rows),
            indent=1))
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"check B,Hq,Hkv,N={tuple(CHECK_SHAPE.values())}; time B,H,N={TIME_SHAPE['batch']},"
          f"{TIME_SHAPE['q_heads']},{TIME_SHAPE['n']} (fwd+bwd launch, ms)")
    print(f"{'D':>4} {'causal':>6} {'BMxBN w s':>12} {'patch':>8} {'dq':>8} {'dk':>8} {'dk s2':>8} {'dv':>8} "
          f"{'det':>4} {'ms':>7}  dk error at")
    for r in rows:
        cfg = "{}x{} {} {}".format(*r["cfg"])
        if "error" in r:
            print(f"{r['D']:>4} {str(r['causal']):>6} {cfg:>12} {r['patch']:>8} {r['error'][:90]}")
            continue
        ms = f"{r['bwd_ms']:7.3f}" if "bwd_ms" in r else "      -"
        print(f"{r['D']:>4} {str(r['causal']):>6} {cfg:>12} {r['patch']:>8} {r['dq']:8.1e} {r['dk']:8.1e} "
              f"{r['dk_seed2']:8.1e} {r['dv']:8.1e} {str(r['deterministic'])[0]:>4} {ms}  {r['dk_error_at']}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/bwd_tiles_repro.py needs a CUDA GPU")
    main()
