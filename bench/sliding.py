"""Sliding-window benchmark: attnlower's Triton kernels (window > 0) against the ways PyTorch can do it.

    python bench/sliding.py          # GPU only; writes $OUT/sliding.json when OUT is set

bf16, B=1, H=16, D=128, (N, W) in {(4096, 1024), (16384, 4096), (32768, 4096)}: key j visible from
query i iff i - W < j <= i. Each candidate's output is checked against SDPA with a dense band mask
(efficient backend) before timing (triton.testing.do_bench, median), forward and forward + backward:

  attnlower         launch.flash_forward / flash_backward with window=W (visits in-window key blocks only)
  sdpa-mask-cudnn / sdpa-mask-efficient   SDPA with the dense [N, N] bool band mask
  flex-sliding      torch.compile(flex_attention) with a sliding-window BlockMask
  sdpa-causal       SDPA flash backend, full causal (no window): what ignoring the window costs

Useful TFLOP/s counts only the in-window pairs, sum_i min(i + 1, W): 4 * H * D * pairs (forward),
3.5x that for forward + backward, for every candidate alike (sdpa-causal included, so its number
shows how much of its work is wasted). Ratio: each candidate's time over attnlower's.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    sys.exit("bench/sliding.py needs a CUDA GPU (it times compiled Triton kernels); none is visible here. "
             "For the CPU correctness checks run: pytest tests/lowering/test_sliding_kernel.py")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnlower.lowering.launch import flash_backward, flash_forward  # noqa: E402
from attnlower.lowering.params import AttentionParams  # noqa: E402
from bench._common import autograd_fns  # noqa: E402

DTYPE = torch.bfloat16
HEADS, HEAD_DIM = 16, 128
CASES = [(4096, 1024), (16384, 4096), (32768, 4096)]


def useful_flops(n, window, mode):
    pairs = sum(min(i + 1, window) for i in range(n))
    forward = 4.0 * HEADS * HEAD_DIM * pairs
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def attnlower_fns(q, k, v, window, scale):
    params = AttentionParams(scale, True, window=window)
    out, lse = flash_forward(q, k, v, params)
    grad_out = torch.randn_like(out)

    def fwd():
        return flash_forward(q, k, v, params)[0]

    def fwd_bwd():
        o, l = flash_forward(q, k, v, params)
        flash_backward(grad_out, q, k, v, o, l, params)
    return fwd, fwd_bwd


def band_mask(n, window):
    i = torch.arange(n, device="cuda")[:, None]
    j = torch.arange(n, device="cuda")[None, :]
    return (j <= i) & (j > i - window)


def sdpa_mask_fns(backend, q, k, v, mask):
    def attend(q_, k_, v_):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)
    return autograd_fns(attend, q, k, v)


def sdpa_causal_fns(q, k, v):
    def attend(q_, k_, v_):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
    return autograd_fns(attend, q, k, v)


def flex_fns(q, k, v, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    n = q.shape[2]
    block_mask = create_block_mask(lambda b, h, i, j: (j <= i) & (j > i - window), None, None, n, n,
                                   device="cuda")
    # one shape per compile: without the reset Dynamo's recompile limit (8) sends later shapes to eager
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention)
    return autograd_fns(lambda q_, k_, v_: compiled(q_, k_, v_, block_mask=block_mask), q, k, v)


def main() -> None:
    rows = []
    scale = 1.0 / math.sqrt(HEAD_DIM)
    for n, window in CASES:
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(3))
        mask = band_mask(n, window)
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        candidates = {
            "attnlower": lambda: attnlower_fns(q, k, v, window, scale),
            "sdpa-mask-cudnn": lambda: sdpa_mask_fns(SDPBackend.CUDNN_ATTENTION, q, k, v, mask),
            "sdpa-mask-efficient": lambda: sdpa_mask_fns(SDPBackend.EFFICIENT_ATTENTION, q, k, v, mask),
            "flex-sliding": lambda: flex_fns(q, k, v, window),
            "sdpa-causal": lambda: sdpa_causal_fns(q, k, v),
        }
        for name, make in candidates.items():
            row = dict(N=n, W=window, impl=name)
            try:
                fwd, fwd_bwd = make()
                err = (fwd().float() - expected.float()).abs().max().item()
                if name != "sdpa-causal" and not err < 3e-2:  # full causal is a different function
                    raise RuntimeError(f"output differs from SDPA with the band mask by {err:.3g}")
                for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    ms = triton.testing.do_bench(fn, return_mode="median")
                    rows.append(dict(row, mode=mode, ms=ms, max_err=err,
                                     useful_tflops=useful_flops(n, window, mode) / ms / 1e9))
            except Exception as error:  # a backend refusing a shape is a result, not a crash
                for mode in ("fwd", "fwd+bwd"):
                    rows.append(dict(row, mode=mode, error=f"{type(error).__name__}: {str(error)[:160]}"))
        del q, k, v, mask
        torch.cuda.empty_cache()

    mine = {(r["N"], r["mode"]): r for r in rows if r["impl"] == "attnlower" and "ms" in r}
    for r in rows:
        if "ms" in r and (r["N"], r["mode"]) in mine:
            r["speedup_of_attnlower"] = r["ms"] / mine[(r["N"], r["mode"])]["ms"]
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "sliding.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                                 torch=torch.__version__,
                                                                 triton=triton.__version__, rows=rows), indent=1))
    impls = list(candidates)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"bf16 H={HEADS} D={HEAD_DIM}")
    print("useful TFLOP/s (in-window pairs only) and attnlower's speedup over each (their time / attnlower's)")
    print(f"{'N':>6} {'W':>5} {'mode':>8} " + " ".join(f"{i:>20}" for i in impls))
    for n, window in CASES:
        for mode in ("fwd", "fwd+bwd"):
            cells = []
            for impl in impls:
                r = next(x for x in rows if (x["N"], x["mode"], x["impl"]) == (n, mode, impl))
                cells.append("error" if "ms" not in r else
                             f"{r['useful_tflops']:7.1f} ({r.get('speedup_of_attnlower', float('nan')):4.2f}x)")
            print(f"{n:>6} {window:>5} {mode:>8} " + " ".join(f"{c:>20}" for c in cells))
    if os.environ.get("OUT"):   # the chart next to the table (bench/plots.py)
        from bench.plots import plot_file

        plot_file(Path(os.environ["OUT"]) / "sliding.json")


if __name__ == "__main__":
    main()
