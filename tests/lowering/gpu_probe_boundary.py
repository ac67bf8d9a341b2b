"""GPU probe of the op boundary (issue 18): host cost per call, the cached launch, Inductor launching the kernels.

    python tests/lowering/gpu_probe_boundary.py [--iters N]

A script, not a test module (pytest does not collect it): it needs a CUDA GPU and prints a short table at
the end. Each check prints one line "ok"/"FAIL"/"ERROR" as it finishes, so a cut-off run still says something.
Rows:
  host us per call (launch-bound loop of tiny shapes, no profiler): SDPA; attnlower.ops.flash_attention
    (direct: the cached launch) with the cache on and off; torch.ops.attnlower.flash_attention (the opaque op);
    the paged op direct; the launcher alone; Triton's JIT launch alone.
  the cached launch computes what the JIT path computes (bit for bit), for q/k/v contiguous, BSHD views,
    a pointer 4 bytes off a 16-byte boundary, fp16 / bf16 / fp32, bias, dropout; and the cache keys them apart.
  torch.compile: Inductor's output code launches _flash_fwd_kernel itself (no attnlower op call), forward and
    backward, against SDPA; the attnlower backend's graph too.
  layouts: a [B, T, H, D] view in gives out whose transpose(1, 2).reshape(B, T, H * D) is a view.
  the compiled paged decode at B=1 (bench/e2e.py's spelling): runs, or names the kernel that failed.
  a reduce-overhead training step (the issue-18 item-5 failure): passes or prints its error.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attnlower  # noqa: E402
import attnlower.ops as public  # noqa: E402
from attnlower.lowering import fastpath, launch  # noqa: E402
from attnlower.lowering import ops as lowering_ops  # noqa: E402
from attnlower.lowering.params import AttentionParams  # noqa: E402

ROWS: list[tuple[str, str, str]] = []   # (check, status, detail)


def row(check: str, status: str, detail: str = "") -> None:
    ROWS.append((check, status, detail))
    print(f"{status:5s} {check}: {detail}", flush=True)


def check(name: str):
    def wrap(fn):
        def run(*args):
            try:
                fn(*args)
            except Exception as error:  # noqa: BLE001 - every check reports, the probe goes on
                row(name, "ERROR", f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")
                traceback.print_exc()
        run.__name__ = fn.__name__
        return run
    return wrap


def host_us(fn, iters: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
        torch.cuda.synchronize()
    return best


def qkv(b=1, hq=4, hkv=4, t=64, d=64, dtype=torch.bfloat16, layout="bhsd", requires_grad=False):
    def make(h):
        if layout == "bshd":
            x = torch.randn(b, t, h, d, device="cuda", dtype=dtype).transpose(1, 2)
        else:
            x = torch.randn(b, h, t, d, device="cuda", dtype=dtype)
        return x.requires_grad_(requires_grad)
    return make(hq), make(hkv), make(hkv)


@check("host us per call")
def host_table(iters):
    q, k, v = qkv()
    sdpa = host_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), iters)
    direct = host_us(lambda: public.flash_attention(q, k, v, causal=True), iters)
    fastpath.ENABLED = False
    direct_jit = host_us(lambda: public.flash_attention(q, k, v, causal=True), iters)
    fastpath.ENABLED = True
    opaque = host_us(lambda: torch.ops.attnlower.flash_attention.default(q, k, v, None, None, None, True), iters)
    params = AttentionParams(0.125, True)
    launcher = host_us(lambda: launch.flash_forward(q, k, v, params), iters)
    cache = attnlower.PagedKVCache(num_blocks=64, block_size=16, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16,
                                   device="cuda")
    ids = [cache.add_sequence() for _ in range(2)]
    for seq in ids:
        kv = torch.randn(1, 4, 100, 64, device="cuda", dtype=torch.bfloat16)
        cache.append(seq, kv, kv)
    table, lens = cache.block_table(ids, max_blocks=16), cache.seq_lens(ids)
    pq = torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    paged = host_us(lambda: public.paged_attention(pq, cache.k_pool, cache.v_pool, table, lens), iters)
    qg, kg, vg = qkv(requires_grad=True)
    grad = torch.randn_like(qg)
    train_sdpa = host_us(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(grad), iters // 3)
    train_ours = host_us(lambda: public.flash_attention(qg, kg, vg, causal=True).backward(grad), iters // 3)
    row("host eager training step (forward + backward): SDPA vs attnlower.ops", "info",
        f"{train_sdpa:6.1f} vs {train_ours:6.1f} us")
    for name, us in (("F.scaled_dot_product_attention", sdpa), ("attnlower.ops.flash_attention (cached launch)", direct),
                     ("attnlower.ops.flash_attention (ATTNLOWER_FAST_LAUNCH=0: Triton's JIT)", direct_jit),
                     ("torch.ops.attnlower.flash_attention.default (opaque op)", opaque),
                     ("launch.flash_forward (launcher + JIT)", launcher), ("attnlower.ops.paged_attention", paged)):
        row(f"host {name}", "info", f"{us:6.1f} us")
    row("direct call <= SDPA's host cost", "ok" if direct <= sdpa * 1.05 else "FAIL", f"{direct:.1f} vs {sdpa:.1f} us")


@check("cached launch == JIT launch")
def fast_equals_jit(_iters):
    failures = []
    combos = [(torch.bfloat16, layout, case) for layout in ("bhsd", "bshd")
              for case in ("plain", "bias", "misaligned", "gqa")]
    combos += [(torch.float32, "bhsd", "plain"), (torch.float32, "bshd", "misaligned"), (torch.float16, "bshd", "gqa")]
    for dtype, layout, case in combos:
        q, k, v = qkv(b=2, hq=8, hkv=2 if case == "gqa" else 8, t=77, d=80, dtype=dtype, layout=layout)
        if case == "misaligned":
            flat = torch.randn(q.numel() + 2, device="cuda", dtype=dtype)
            q = flat[2:].view(q.shape) if layout == "bhsd" else flat[2:].view(2, 77, 8, 80).transpose(1, 2)
        bias = torch.randn(1, 8, 77, 77, device="cuda", dtype=dtype) if case == "bias" else None
        fastpath.ENABLED = False
        want = public.flash_attention(q, k, v, bias, causal=True)
        fastpath.ENABLED = True
        first = public.flash_attention(q, k, v, bias, causal=True)   # JIT, recorded
        again = public.flash_attention(q, k, v, bias, causal=True)   # cached launch
        # float64 copies (SDPA's math backend): fp32 SDPA on a misaligned q faults on the H200 (torch 2.11)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=None if bias is None
                                             else bias.double() + torch.full((77, 77), float("-inf"), device="cuda",
                                                                             dtype=torch.float64).triu(1),
                                             is_causal=bias is None, enable_gqa=True)
        tag = f"{dtype} {layout} {case}"
        if not (torch.equal(want, first) and torch.equal(first, again)):
            failures.append(f"{tag}: cached launch differs from the JIT launch")
        if again.stride() != q.stride() and case != "misaligned":
            failures.append(f"{tag}: out strides {again.stride()} != q's {q.stride()}")
        err = (again.float() - ref).abs().max().item()
        if not err < (2e-2 if dtype != torch.float32 else 2e-3):
            failures.append(f"{tag}: max error vs SDPA {err:.3g}")
    entries = len(fastpath._CALLS)
    row(f"cached launch == JIT launch ({len(combos)} dtype / layout / bias / misaligned / GQA cases)",
        "FAIL" if failures else "ok", "; ".join(failures[:4]) or f"{entries} cache entries")


@check("dropout through the cached launch")
def fast_dropout(_iters):
    q, k, v = qkv(t=128)
    a = public.flash_attention(q, k, v, dropout_p=0.3)
    b = public.flash_attention(q, k, v, dropout_p=0.3)
    full = public.flash_attention(q, k, v)
    ok = not torch.equal(a, b) and torch.isfinite(b).all() and abs(b.float().mean() - full.float().mean()) < 0.05
    row("dropout: each cached call draws a new mask", "ok" if ok else "FAIL", "")


@check("torch.compile: Inductor launches the kernels")
def inductor_launches(_iters):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    q, k, v = qkv(b=2, hq=8, hkv=2, t=256, d=64, requires_grad=True)
    fn = torch.compile(lambda q, k, v: public.flash_attention(q, k, v, causal=True), fullgraph=True)
    out, codes = run_and_get_code(fn, q, k, v)
    code = "\n".join(codes)
    launched = "_flash_fwd_kernel" in code and "torch.ops.attnlower.flash_attention" not in code
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    err = (out.float() - want.float()).abs().max().item()
    out.float().square().sum().backward()
    grads_ok = all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    qs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*qs, is_causal=True, enable_gqa=True).float().square().sum().backward()
    # relative to the largest gradient: two bf16 backward implementations differ by a few bf16 ulps of it
    gerr = max(((a.grad.float() - b.grad.float()).abs().max() / b.grad.float().abs().max()).item()
               for a, b in zip((q, k, v), qs))
    ok = launched and err < 2e-2 and grads_ok and gerr < 2e-2
    row("Inductor's code launches _flash_fwd_kernel (fwd + bwd vs SDPA)", "ok" if ok else "FAIL",
        f"kernel in code: {launched}; fwd err {err:.3g}; grad err {gerr:.3g} of max |grad|")
    # Inductor compiles user kernels with debug=True (inductor_meta assert_indirect_indexing): Triton then keeps its
    # int32 overflow checks (41 device asserts in the forward's PTX on sm_90, none without debug). Their cost:
    from triton.testing import do_bench

    torch._dynamo.reset()
    qb, kb, vb = qkv(b=4, hq=16, hkv=16, t=2048, d=64)
    with torch.no_grad():
        compiled = torch.compile(lambda q, k, v: public.flash_attention(q, k, v, causal=True), fullgraph=True)
        compiled(qb, kb, vb)
        t_inductor = do_bench(lambda: compiled(qb, kb, vb), warmup=50, rep=200)
        t_direct = do_bench(lambda: public.flash_attention(qb, kb, vb, causal=True), warmup=50, rep=200)
    row("kernel time B=4 H=16 T=2048 D=64 causal: Inductor-launched (debug=True) vs direct", "info",
        f"{t_inductor * 1e3:.1f} vs {t_direct * 1e3:.1f} us ({t_inductor / t_direct:.2f}x)")
    clones = code.count("clone")
    row("no clones of q/k/v around the kernel (mutation analysis found the outputs only)",
        "ok" if clones == 0 else "info", f"'clone' appears {clones}x in the output code")


@check("layouts")
def layouts(_iters):
    b, t, h, d = 2, 128, 8, 64
    q, k, v = qkv(b=b, hq=h, hkv=h, t=t, d=d, layout="bshd")
    out = public.flash_attention(q, k, v, causal=True)
    merged = out.transpose(1, 2).reshape(b, t, h * d)
    ok = merged.data_ptr() == out.data_ptr() and merged._base is not None
    row("BSHD view in -> out.transpose(1, 2).reshape(B, T, H*D) is a view", "ok" if ok else "FAIL",
        f"out strides {out.stride()}")


@check("compiled paged decode B=1")
def paged_decode_b1(_iters):
    from attnlower.cache import gather_blocks, length_mask

    torch._dynamo.reset()
    length, block_size, hq, hkv, d, b = 4096, 16, 32, 8, 128, 1
    max_blocks = length // block_size
    k_pool = torch.randn(b * max_blocks, hkv, block_size, d, device="cuda", dtype=torch.bfloat16)
    v_pool = torch.randn_like(k_pool)
    table = torch.randperm(b * max_blocks, device="cuda", dtype=torch.int32).view(b, max_blocks)
    lens = torch.full((b,), length, device="cuda", dtype=torch.int32)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)

    def decode_attention(q, k_pool, v_pool, table, lens):
        keys, values = gather_blocks(k_pool, table), gather_blocks(v_pool, table)
        keep = length_mask(lens, keys.shape[2])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, enable_gqa=True)

    want = decode_attention(q, k_pool, v_pool, table, lens)
    from attnlower.compiler.backend import attnlower_backend  # the callable: works without the entry point installed

    # the paged op (B = 1 is paged since 2026-12-03), then the dense flash path forced (ops=...), whose
    # compile raised OutOfResources (262144 bytes of shared memory) on 2026-12-03: its output code is logged
    for what, options in (("paged", {}), ("dense flash forced", {"ops": ("flash_attention",)})):
        torch._dynamo.reset()
        fn = torch.compile(decode_attention, backend=attnlower_backend, options=options)
        if options:
            torch._logging.set_logs(output_code=True)
        try:
            got = fn(q, k_pool, v_pool, table, lens)
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001
            row(f"compiled decode B=1 runs ({what})", "FAIL", f"{type(error).__name__}: {str(error)[:200]}")
            traceback.print_exc()
            continue
        finally:
            torch._logging.set_logs()
        err = (got.float() - want.float()).abs().max().item()
        row(f"compiled decode B=1 runs ({what})", "ok" if err < 2e-2 else "FAIL", f"max error {err:.3g}")


@check("reduce-overhead training step")
def reduce_overhead_training(_iters):
    torch._dynamo.reset()
    q, k, v = qkv(b=2, hq=8, hkv=2, t=256, d=64, requires_grad=True)

    def step(q, k, v):
        return public.flash_attention(q, k, v, causal=True).float().square().sum()

    def sdpa_step(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float().square().sum()

    # grads set to None before each step, as optimizer.zero_grad() does: a step's grads are graph outputs
    # that the next replay overwrites (accumulating into them is what the 2026-12-03 probe did wrong);
    # SDPA in the same loop is the control
    results = {}
    for name, body in (("sdpa", sdpa_step), ("attnlower.ops", step)):
        torch._dynamo.reset()
        fn = torch.compile(body, mode="reduce-overhead")
        try:
            for _ in range(3):
                q.grad = k.grad = v.grad = None
                torch.compiler.cudagraph_mark_step_begin()
                loss = fn(q, k, v)
                loss.backward()
            results[name] = (loss.detach().clone(), q.grad.clone(), k.grad.clone())
        except Exception as error:  # noqa: BLE001
            row(f"reduce-overhead training step ({name})", "FAIL", f"{type(error).__name__}: {str(error)[:160]}")
            traceback.print_exc()
    if len(results) == 2:
        (l0, dq0, dk0), (l1, dq1, dk1) = results["sdpa"], results["attnlower.ops"]
        rel = abs(l1.item() - l0.item()) / max(1.0, abs(l0.item()))
        gq = ((dq1 - dq0).abs().max() / dq0.abs().max()).item()
        gk = ((dk1 - dk0).abs().max() / dk0.abs().max()).item()
        row("reduce-overhead training step (3 steps, forward + backward, vs SDPA's)",
            "ok" if rel < 2e-2 and gq < 2e-2 and gk < 2e-2 else "FAIL",
            f"loss rel err {rel:.3g}, dq {gq:.3g}, dk {gk:.3g} of max")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--only", nargs="+", default=None, help="run these probes only (function names)")
    ns = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_probe_boundary.py needs a CUDA GPU")
    import triton
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"INDUCTOR_KERNELS={lowering_ops.INDUCTOR_KERNELS} fast launch usable={fastpath.usable()}", flush=True)
    for probe in (host_table, fast_equals_jit, fast_dropout, layouts, inductor_launches, paged_decode_b1,
                  reduce_overhead_training):
        if ns.only is None or probe.__name__ in ns.only:
            probe(ns.iters)
    print("\n=== gpu_probe_boundary summary")
    width = max(len(c) for c, _, _ in ROWS)
    for name, status, detail in ROWS:
        print(f"{status:5s}  {name:{width}s}  {detail}")
    failed = sum(status in ("FAIL", "ERROR") for _, status, _ in ROWS)
    print(f"{failed} failed of {len(ROWS)} rows")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
