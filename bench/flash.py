"""Dense-attention benchmark: attnlower's Triton flash kernels against SDPA (each backend) and FlexAttention.

    python bench/flash.py            # GPU only; writes $OUT/flash.json when OUT is set

bf16, D in {64, 128}, H * D = 2048, N in {512 .. 16384} with B * N = 16384 tokens, causal and not,
plus encoder lengths (T = 197, 257, 577 at B = 64, H = 12, D = 64: ViT / BERT-style, B*H = 768),
forward ("fwd") and forward + backward ("fwd+bwd"). Each candidate's output is first checked against
SDPA's (math backend for small N, flash otherwise); then timed with triton.testing.do_bench (median):

  attnlower       launch.flash_forward (+ flash_backward), the kernels alone, tiles as the launcher picks them
                  (and the forward kernel: Gluon where plan.choose_forward_kernel picks it; ATTNLOWER_GLUON=0 for
                  the Triton forward alone)
  attnlower-len   the same with the forward tiles configs.flash_config picks from the sequence length
                  (what the launcher gets once it passes seq_len; identical to attnlower until then)
  sdpa-flash / sdpa-cudnn / sdpa-efficient   F.scaled_dot_product_attention under sdpa_kernel(backend)
  flex            torch.compile(flex_attention), with a causal BlockMask when causal

TFLOP/s counts 4 * B * H * N^2 * D for the forward (half of it when causal) and 2.5x that for the
backward. Ratio: each candidate's time over attnlower's (> 1: attnlower is faster). A candidate
that refuses a shape (or gives a wrong answer) is reported with its error instead of a time.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    sys.exit("bench/flash.py needs a CUDA GPU (it times compiled Triton kernels); none is visible here. "
             "For the CPU correctness checks run: pytest tests/lowering/test_flash_kernel.py")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnlower.lowering.launch import flash_backward, flash_forward  # noqa: E402
from attnlower.lowering.params import AttentionParams  # noqa: E402
from bench._common import autograd_fns  # noqa: E402

DTYPE = torch.bfloat16
TOKENS = 16384
MODEL_DIM = 2048
# BENCH_SEQ_LENS=1024,4096 narrows the sweep (a device call is limited to 10 minutes)
SEQ_LENS = [int(n) for n in os.environ.get("BENCH_SEQ_LENS", "512,1024,2048,4096,8192,16384").split(",")]
HEAD_DIMS = [64, 128]
# BENCH_SHORT= (empty) leaves the encoder lengths out; (T, B, H, D), non-causal
SHORT_SHAPES = [(int(t), 64, 12, 64) for t in os.environ.get("BENCH_SHORT", "197,257,577").split(",") if t]
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def attnlower_fns(q, k, v, causal, scale):
    params = AttentionParams(scale, causal)

    def fwd():
        return flash_forward(q, k, v, params)[0]

    out, lse = flash_forward(q, k, v, params)
    grad_out = torch.randn_like(out)

    def fwd_bwd():
        o, l = flash_forward(q, k, v, params)
        flash_backward(grad_out, q, k, v, o, l, params)
    return fwd, fwd_bwd


def sdpa_fns(backend, q, k, v, causal):
    def attend(q_, k_, v_):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal)
    return autograd_fns(attend, q, k, v)


def flex_fns(q, k, v, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    # one shape per compile: without the reset Dynamo's recompile limit (8) sends later shapes to eager
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention)
    block_mask = None
    if causal:
        n = q.shape[2]
        block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, n, n, device="cuda")
    return autograd_fns(lambda q_, k_, v_: compiled(q_, k_, v_, block_mask=block_mask), q, k, v)


def reference(q, k, v, causal):
    backend = SDPBackend.MATH if q.shape[2] <= 2048 else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def flops(batch, heads, n, head_dim, causal, mode):
    forward = 4.0 * batch * heads * n * n * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def main() -> None:
    rows = []
    shapes = [(n, TOKENS // n, MODEL_DIM // d, d, (False, True)) for d in HEAD_DIMS for n in SEQ_LENS]
    shapes += [(t, batch, heads, d, (False,)) for t, batch, heads, d in SHORT_SHAPES]
    for n, batch, heads, head_dim, causal_modes in shapes:
        q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=DTYPE) for _ in range(3))
        scale = 1.0 / math.sqrt(head_dim)
        for causal in causal_modes:
            expected = reference(q, k, v, causal)
            candidates = {"attnlower": lambda: attnlower_fns(q, k, v, causal, scale)}
            for name, backend in SDPA_BACKENDS.items():
                candidates[name] = lambda backend=backend: sdpa_fns(backend, q, k, v, causal)
            candidates["flex"] = lambda: flex_fns(q, k, v, causal)
            for name, make in candidates.items():
                row = dict(D=head_dim, N=n, B=batch, H=heads, causal=causal, impl=name)
                try:
                    fwd, fwd_bwd = make()
                    err = (fwd().float() - expected.float()).abs().max().item()
                    if not err < 3e-2:
                        raise RuntimeError(f"output differs from SDPA by {err:.3g}")
                    for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                        ms = triton.testing.do_bench(fn, return_mode="median")
                        rows.append(dict(row, mode=mode, ms=ms, max_err=err,
                                         tflops=flops(batch, heads, n, head_dim, causal, mode) / ms / 1e9))
                except Exception as error:  # a backend refusing a shape is a result, not a crash
                    for mode in ("fwd", "fwd+bwd"):
                        rows.append(dict(row, mode=mode, error=f"{type(error).__name__}: {str(error)[:160]}"))
        del q, k, v
        torch.cuda.empty_cache()

    by_key = {(r["D"], r["N"], r["causal"], r["mode"]): r for r in rows if r["impl"] == "attnlower" and "ms" in r}
    for r in rows:
        mine = by_key.get((r["D"], r["N"], r["causal"], r["mode"]))
        if mine is not None and "ms" in r:
            r["speedup_of_attnlower"] = r["ms"] / mine["ms"]
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "flash.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                               torch=torch.__version__,
                                                               triton=triton.__version__, rows=rows), indent=1))
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  bf16")
    print("TFLOP/s (and attnlower's speedup over each: their time / attnlower's time)")
    impls = ["attnlower", "attnlower-len", *SDPA_BACKENDS, "flex"]
    print(f"{'D':>4} {'N':>6} {'causal':>6} {'mode':>8} " + " ".join(f"{i:>20}" for i in impls))
    for (head_dim, n, causal, mode) in sorted({(r["D"], r["N"], r["causal"], r["mode"]) for r in rows}):
        cells = []
        for impl in impls:
            r = next(x for x in rows if (x["D"], x["N"], x["causal"], x["mode"], x["impl"]) == (head_dim, n, causal, mode, impl))
            cells.append("error" if "ms" not in r else
                         f"{r['tflops']:7.1f} ({r.get('speedup_of_attnlower', float('nan')):4.2f}x)")
        print(f"{head_dim:>4} {n:>6} {str(causal):>6} {mode:>8} " + " ".join(f"{c:>20}" for c in cells))
    if os.environ.get("OUT"):   # the chart next to the table (bench/plots.py)
        from bench.plots import plot_file

        plot_file(Path(os.environ["OUT"]) / "flash.json")


if __name__ == "__main__":
    main()
