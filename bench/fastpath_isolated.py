"""The cached launch (lowering/fastpath.py) against Triton's JIT launch, each case in its own process.

Each case runs in its own process (a CUDA fault poisons the context) with CUDA_LAUNCH_BLOCKING=1:
  1. the JIT path alone (fast path off): must not fault, and must match SDPA in float64;
  2. the JIT path recorded, then the cached launch; the recorded kernel's hash against the kernel Triton's
     JIT picks for the second call's arguments, and each argument slot's (name, value kind) printed.
"""
import os
import subprocess
import sys

CASES = [(dt, layout, case) for layout in ("bhsd", "bshd") for case in ("plain", "bias", "misaligned", "gqa")
         for dt in ("bfloat16",)] + [("float32", "bhsd", "plain"), ("float32", "bshd", "misaligned"),
                                    ("float16", "bshd", "gqa"), ("bfloat16", "bhsd", "plain64")]


def one(dt, layout, case):
    import torch
    import torch.nn.functional as F
    import attnlower.ops as public
    from attnlower.lowering import fastpath
    dtype = getattr(torch, dt)
    t, d = (64, 64) if case == "plain64" else (77, 80)
    hkv = 2 if case == "gqa" else 8

    def make(h):
        if layout == "bshd":
            return torch.randn(2, t, h, d, device="cuda", dtype=dtype).transpose(1, 2)
        return torch.randn(2, h, t, d, device="cuda", dtype=dtype)
    q, k, v = make(8), make(hkv), make(hkv)
    if case == "misaligned":
        flat = torch.randn(q.numel() + 2, device="cuda", dtype=dtype)
        q = flat[2:].view(q.shape) if layout == "bhsd" else flat[2:].view(2, t, 8, d).transpose(1, 2)
    bias = torch.randn(1, 8, t, t, device="cuda", dtype=dtype) if case == "bias" else None
    fastpath.ENABLED = False
    want = public.flash_attention(q, k, v, bias, causal=True)
    torch.cuda.synchronize()
    # float64 copies: fp32 SDPA on a q 8 bytes off 16 faults with "misaligned address" (torch 2.11, H200)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=None if bias is None else
                                         bias.double() + torch.full((t, t), float("-inf"), device="cuda",
                                                                    dtype=torch.float64).triu(1),
                                         is_causal=bias is None, enable_gqa=True)
    print(f"  JIT ok, max err vs SDPA {(want.float() - ref).abs().max().item():.3g}", flush=True)
    fastpath.ENABLED = True
    first = public.flash_attention(q, k, v, bias, causal=True)
    torch.cuda.synchronize()
    call = next(iter(fastpath._CALLS.values()), None)
    print(f"  recorded first call: cached={call is not None}", flush=True)
    if call is None:
        return
    for kernel in call.kernels:
        c = kernel.compiled
        names = c.src.fn.arg_names if hasattr(c.src, "fn") else []
        sig = getattr(c.src, "signature", {})
        slots = dict(kernel.slots)
        shown = []
        for i, n in enumerate(names):
            val = kernel.template[i]
            shown.append(f"{n}={'<ptr %d>' % slots[i] if i in slots else val!r}:{sig.get(n, '?')}")
        print(f"  kernel {c.name} grid={kernel.grid} hash={c.hash[:12]} shared={c.metadata.shared}", flush=True)
        print("    " + " ".join(shown), flush=True)
        attrs = getattr(c.src, "attrs", None)
        print(f"    attrs={attrs}", flush=True)
    again = public.flash_attention(q, k, v, bias, causal=True)
    torch.cuda.synchronize()
    print(f"  cached ok, equal to JIT: {torch.equal(want, again)}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(*sys.argv[1:])
        sys.exit(0)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for dt, layout, case in CASES:
        print(f"== {dt} {layout} {case}", flush=True)
        r = subprocess.run([sys.executable, __file__, dt, layout, case], env=env, capture_output=True, text=True,
                           timeout=120)
        print(r.stdout, end="")
        if r.returncode:
            print("  FAILED rc=%d: %s" % (r.returncode, "\n  ".join(r.stderr.strip().splitlines()[-6:])))
