"""Tiles for the 256-wide head-dim class (MLA's Dqk 192 / Dv 128, and D 256), forward and backward, in one call.

    python bench/wide_tiles.py                 # GPU: bf16, causal, H 16; $OUT/wide_tiles.json when OUT is set
    python bench/wide_tiles.py --smoke         # CPU (Triton's interpreter), tiny shapes: the script end to end

configs.py's 256 entries (forward 64x64, 8 warps, 2 stages; dK/dV 64x64x8x1; dQ 64x32x8x2) were never timed, and
bench/modern.py found MLA prefill at Dqk 192 / Dv 128 at 0.29-0.35x cuDNN on the H200 (2026-12-04). Every candidate
goes through the launchers' own overrides (`launch.flash_forward(config=)`, `launch.flash_backward(config_kv=,
config_q=)`) and is first checked against SDPA's math backend in float32 (out, dq, dk, dv within 3e-2 of max |ref|);
a wrong one or one that does not fit (shared memory) is reported, not timed. Timed with triton.testing.do_bench
(median). The backward sweeps dK/dV tiles with the dQ tile fixed at the committed one, then dQ tiles with the best
dK/dV tile. cuDNN SDPA at the same shape is the reference (ratio > 1: faster than cuDNN).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (block_m, block_n, num_warps, num_stages)
FWD = [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3), (64, 128, 8, 2),
       (128, 64, 8, 1)]
BWD_KV = [(64, 64, 8, 1), (64, 64, 4, 1), (32, 64, 4, 1), (64, 32, 4, 1), (128, 64, 8, 1)]   # stages 1: the race
BWD_Q = [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 1)]
CASES = [(4, 1024), (1, 4096)]          # (B, T): bench/modern.py's MLA cases
DIMS = [(192, 128), (256, 256)]         # (Dqk, Dv)
HEADS = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        p.error("bench/wide_tiles.py times kernels on a GPU and sees none; for the CPU check run --smoke")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    from attnlower.lowering import launch
    from attnlower.lowering.configs import KernelConfig
    from attnlower.lowering.params import AttentionParams

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    cases = [(1, 40)] if args.smoke else CASES
    heads = 2 if args.smoke else HEADS
    fwd_grid = [(16, 16, 1, 1), (32, 16, 1, 1)] if args.smoke else FWD
    kv_grid = [(16, 16, 1, 1), (16, 32, 1, 1)] if args.smoke else BWD_KV
    q_grid = [(16, 16, 1, 1), (32, 16, 1, 1)] if args.smoke else BWD_Q
    timer = (lambda fn: 0.0) if args.smoke else (lambda fn: triton.testing.do_bench(fn, return_mode="median"))
    rows = []

    def record(**row):
        rows.append(row)
        shown = f"{row['ms']:.4f} ms" if "ms" in row else row["error"][:160]
        print(f"  D={row['dqk']}/{row['dv']} B={row['batch']} T={row['t']} {row['kind']} {row.get('config')}: {shown}",
              flush=True)

    for (dqk, dv), (batch, t) in [(d, c) for d in DIMS for c in cases]:
        torch.manual_seed(0)
        q, k = (torch.randn(batch, heads, t, dqk, device=device, dtype=dtype) for _ in range(2))
        v = torch.randn(batch, heads, t, dv, device=device, dtype=dtype)
        grad_out = torch.randn(batch, heads, t, dv, device=device, dtype=dtype)
        params = AttentionParams(dqk ** -0.5, True)
        leaves = [x.float().requires_grad_() for x in (q, k, v)]
        ref = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=dqk ** -0.5)
        ref.backward(grad_out.float())
        want = [ref.detach()] + [x.grad for x in leaves]
        base = dict(dqk=dqk, dv=dv, batch=batch, t=t)

        def error(got: list) -> float:
            return max(float((g.float() - w).abs().max() / w.abs().max()) for g, w in zip(got, want))

        if not args.smoke:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=dqk ** -0.5)
            try:
                record(**base, kind="cudnn fwd", ms=timer(cudnn))
            except RuntimeError as e:
                record(**base, kind="cudnn fwd", error=str(e).splitlines()[0])
            cq, ck, cv = (x.detach().requires_grad_() for x in (q, k, v))

            def cudnn_bwd():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    F.scaled_dot_product_attention(cq, ck, cv, is_causal=True, scale=dqk ** -0.5).backward(grad_out)
            try:
                record(**base, kind="cudnn fwd+bwd", ms=timer(cudnn_bwd))
            except RuntimeError as e:
                record(**base, kind="cudnn fwd+bwd", error=str(e).splitlines()[0])

        out, lse = launch.flash_forward(q, k, v, params)
        for tiles in fwd_grid:
            config = KernelConfig(*tiles)
            try:
                o, _ = launch.flash_forward(q, k, v, params, config=config)
                err = error([o, want[1], want[2], want[3]])
                if err > 3e-2:
                    record(**base, kind="fwd", config=tiles, error=f"wrong: {err:.3g}")
                    continue
                record(**base, kind="fwd", config=tiles, err=err,
                       ms=timer(lambda: launch.flash_forward(q, k, v, params, config=config)))
            except Exception as e:  # noqa: BLE001 - a tile that does not fit is a result
                record(**base, kind="fwd", config=tiles, error=f"{type(e).__name__}: {str(e).splitlines()[0]}")

        def backward(kv, qq):
            return launch.flash_backward(grad_out, q, k, v, out, lse, params, config_kv=KernelConfig(*kv),
                                         config_q=KernelConfig(*qq))[:3]

        def sweep(kind, grid, fixed, kv_first):
            best = None
            for tiles in grid:
                kv, qq = (tiles, fixed) if kv_first else (fixed, tiles)
                try:
                    err = error([want[0], *backward(kv, qq)])
                    if err > 3e-2:
                        record(**base, kind=kind, config=tiles, error=f"wrong: {err:.3g}")
                        continue
                    ms = timer(lambda: backward(kv, qq))
                    record(**base, kind=kind, config=tiles, err=err, ms=ms)
                    if best is None or ms < best[1]:
                        best = (tiles, ms)
                except Exception as e:  # noqa: BLE001
                    record(**base, kind=kind, config=tiles, error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
            return best

        best_kv = sweep("bwd dk/dv", kv_grid, q_grid[0], True)
        sweep("bwd dq", q_grid, best_kv[0] if best_kv else kv_grid[0], False)

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "wide_tiles.json").write_text(json.dumps(rows, indent=1))
    print("\nbest per case (ms; cuDNN's in brackets):")
    for (dqk, dv), (batch, t) in [(d, c) for d in DIMS for c in cases]:
        mine = [r for r in rows if (r["dqk"], r["dv"], r["batch"], r["t"]) == (dqk, dv, batch, t) and "ms" in r]
        parts = []
        for kind in ("fwd", "bwd dk/dv", "bwd dq"):
            timed = [r for r in mine if r["kind"] == kind]
            if timed:
                b = min(timed, key=lambda r: r["ms"])
                parts.append(f"{kind} {b['config']} {b['ms']:.4f}")
        cud = {r["kind"]: r["ms"] for r in mine if r["kind"].startswith("cudnn")}
        print(f"  D={dqk}/{dv} B={batch} T={t}: " + "; ".join(parts) + f"  [cudnn {cud}]")
    wrong = [r for r in rows if r.get("error", "").startswith("wrong")]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
