"""Accuracy on the GPU: attnlower's dense kernels and PyTorch's SDPA backends, all against float64.

    python bench/accuracy.py         # GPU only; writes $OUT/accuracy.json when OUT is set

bf16 inputs (randn), B=1, Hq=4, Hkv=2 (GQA), causal / not / sliding window, N in {1024, 4096},
D in {64, 128}. For out, dq, dk, dv: the max abs error against a float64 oracle computed from the
same bf16 inputs, divided by the max abs of the oracle (so rows of different scale compare).
A 16-bit kernel is as good as it can be when its error is of the order of SDPA's flash / cuDNN
backends on the same inputs; tests/lowering's real-size GPU tests bound attnlower's error by a
multiple of SDPA's. Also attnlower with fp32 inputs (IEEE dots): there the error must be ~1e-6.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    sys.exit("bench/accuracy.py needs a CUDA GPU; the CPU checks are pytest tests/lowering")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lowering"))
from attention_oracle import oracle  # noqa: E402  (the float64 oracle the kernel tests use)
from attnlower.lowering.configs import KernelConfig  # noqa: E402
from attnlower.lowering.launch import flash_backward, flash_forward  # noqa: E402
from attnlower.lowering.params import AttentionParams  # noqa: E402



def band(n, causal, window, device):
    """SDPA's bool attn_mask for a sliding window (True = visible)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    keep = torch.ones(n, n, dtype=torch.bool, device=device)
    if causal or window:
        keep &= j <= i
    if window:
        keep &= j > i - window
    return keep


def reference(q, k, v, grad_out, causal, window, scale):
    """[out, dq, dk, dv] in float64 from tests/lowering/attention_oracle.py."""
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    with torch.device(q.device):  # the oracle's aranges
        out, _ = oracle(*leaves, scale=scale, causal=causal or window > 0, window=window)
    out.backward(grad_out.double())
    return [out.detach()] + [x.grad for x in leaves]


def attnlower(q, k, v, grad_out, causal, window, scale, configs=None):
    fwd_cfg, kv_cfg, q_cfg = configs or (None, None, None)
    params = AttentionParams(scale, causal or window > 0, window=window)
    out, lse = flash_forward(q, k, v, params, config=fwd_cfg)
    dq, dk, dv, *_ = flash_backward(grad_out, q, k, v, out, lse, params, config_kv=kv_cfg, config_q=q_cfg)
    return [out, dq, dk, dv]


def sdpa(backend, q, k, v, grad_out, causal, window, scale):
    group = q.shape[1] // k.shape[1]
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    qq, kk, vv = leaves[0], leaves[1].repeat_interleave(group, 1), leaves[2].repeat_interleave(group, 1)
    mask = band(q.shape[2], causal, window, q.device) if window else None
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=causal and not window,
                                             scale=scale)
    out.backward(grad_out)
    return [out.detach()] + [x.grad for x in leaves]


def main() -> None:
    torch.manual_seed(0)
    rows = []
    small = (KernelConfig(64, 64, 4, 1), KernelConfig(64, 64, 4, 1), KernelConfig(64, 64, 4, 1))
    for head_dim in (64, 128):
        for n in (1024, 4096):
            for causal, window in ((False, 0), (True, 0), (True, 256)):
                q = torch.randn(1, 4, n, head_dim, device="cuda", dtype=torch.bfloat16)
                k, v = (torch.randn(1, 2, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                grad_out = torch.randn_like(q)
                scale = 1.0 / math.sqrt(head_dim)
                ref = reference(q, k, v, grad_out, causal, window, scale)
                cands = {"attnlower": lambda: attnlower(q, k, v, grad_out, causal, window, scale),
                         "attnlower-64x64-1stage": lambda: attnlower(q, k, v, grad_out, causal, window, scale, small),
                         "attnlower-fp32": lambda: attnlower(q.float(), k.float(), v.float(), grad_out.float(),
                                                             causal, window, scale)}
                backends = {"sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
                if not window:
                    backends["sdpa-flash"] = SDPBackend.FLASH_ATTENTION
                for name, backend in backends.items():
                    cands[name] = lambda backend=backend: sdpa(backend, q, k, v, grad_out, causal, window, scale)
                for name, run in cands.items():
                    row = dict(D=head_dim, N=n, causal=causal, window=window, impl=name)
                    try:
                        got = run()
                        for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
                            err = (g.double() - r).abs()
                            row[what] = (err.max() / r.abs().max()).item()
                            row[what + "_abs"] = err.max().item()
                            row[what + "_where"] = list(divmod(int(err.flatten().argmax()), head_dim))[:1]
                    except Exception as e:  # noqa: BLE001 - a backend refusing is a result
                        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    rows.append(row)
                del q, k, v, grad_out, ref
                torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "accuracy.json").write_text(json.dumps(rows, indent=1))
    print("max |err| / max |ref| vs float64 (bf16 inputs; attnlower-fp32: fp32 inputs)")
    print(f"{'D':>4} {'N':>5} {'mask':>8} {'impl':>24} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
    for r in rows:
        mask = f"w{r['window']}" if r["window"] else ("causal" if r["causal"] else "none")
        cells = (" ".join(f"{r[w]:9.2e}" for w in ("out", "dq", "dk", "dv"))
                 if "error" not in r else r["error"][:60])
        print(f"{r['D']:>4} {r['N']:>5} {mask:>8} {r['impl']:>24} {cells}")


if __name__ == "__main__":
    main()
