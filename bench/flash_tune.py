"""Forward-kernel tuning on the GPU: tiles / warps / stages and source variants, one change at a time.

    python bench/flash_tune.py               # GPU only; writes $OUT/flash_tune.json when OUT is set

Variants of kernels/flash_fwd.py (source patches of the loop or prologue; the kernel's arguments
never change, so each runs through launch.flash_forward unmodified):
  cur      the kernel as committed
  old      bench/_old_flash_fwd.py when present: 2026-12-01 it held the kernel before its one-body
           restructuring (`git show e17cbff:attnlower/lowering/kernels/flash_fwd.py`); skipped when absent
  rev      query blocks issued longest-first (program 0 takes the last query block): causal tails
  ws       `tl.range(lo, hi, BLOCK_N, warp_specialize=True)` on the key loop (Triton's automatic
           warp specialization; Hopper support is new in the 3.5 / 3.6 releases)
  tma      K and V tiles through device-side TMA descriptors (`tl.make_tensor_descriptor`; contiguous
           last dim assumed, which every bench tensor has; out-of-range rows are zero-filled by TMA)
  fold     exp2 with the scale folded in: row max taken on the raw q·k, then one FMA per score
           (assumes scale > 0, which every bench shape has; kept out of the kernel unless it pays)
Each variant is first checked against a float64 oracle (bf16 inputs, odd Tq/Tk, causal and not),
then timed with triton.testing.do_bench (median) next to SDPA's cuDNN and flash backends. All
kernels are compiled first by parallel worker processes into Triton's on-disk cache.
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
TOKENS, MODEL_DIM = 16384, 2048
LONG_NS = [1024, 4096, 16384]
SHORT = [(197, 64, 12), (257, 64, 12), (577, 64, 12), (197, 128, 6)]  # (T, batch, heads): B*H >= 384..768
# (block_m, block_n, num_warps, num_stages)
CONFIGS = {
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3),
         (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
          (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 8, 3), (64, 32, 4, 3)],
}
VARIANTS = ["cur", "old", "rev", "ws", "tma", "fold"]
VARIANT_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3)}   # the committed table's entries

_FOLD_OLD = """        s, _ = _scores(qk, offs_m, offs_n,
                       bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                       slope, sm_scale, softcap, diag_offset, window, N_CTX_Q, N_CTX_K,
                       HAS_SOFTCAP, HAS_ALIBI, BIAS_KIND, IS_CAUSAL, HAS_WINDOW, MASK_EDGES)
        p, alpha, m_i, l_i = _online_softmax_step(s, m_i, l_i)
"""
_FOLD_NEW = """        qk_scale = sm_scale * LOG2E
        if MASK_EDGES:
            visible = offs_n[None, :] < N_CTX_K
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag_offset)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
"""
_PATCHES = {
    "rev": [("start_m = tl.program_id(0) * BLOCK_M",
             "start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M")],
    "ws": [("for start_n in range(lo, hi, BLOCK_N):",
            "for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):")],
    "fold": [(_FOLD_OLD, _FOLD_NEW)],
    "tma": [("""        kt = _load_tile(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                        offs_d, offs_n, HEAD_DIM, N_CTX_K, HEAD_DIM != HEAD_DIM_PAD, MASK_EDGES)
""", """        kt = tl.trans(k_base.load([start_n, 0]))
"""), ("""        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, offs_d, N_CTX_K, HEAD_DIM, MASK_EDGES, HEAD_DIM != HEAD_DIM_PAD)
""", """        v = v_base.load([start_n, 0])
"""), ("""    bias_base = Bias + off_z * stride_bz + off_h * stride_bh
""", """    bias_base = Bias + off_z * stride_bz + off_h * stride_bh
    k_base = tl.make_tensor_descriptor(k_base, shape=[N_CTX_K, HEAD_DIM], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM_PAD])
    v_base = tl.make_tensor_descriptor(v_base, shape=[N_CTX_K, HEAD_DIM], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM_PAD])
""")],
}


def _set_allocator():
    """Device-side TMA descriptors need scratch memory from a Triton allocator."""
    import triton
    if hasattr(triton, "set_allocator"):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def fwd_kernel(variant: str):
    import attnlower.lowering.kernels.flash_fwd as original
    if variant == "cur":
        return original._flash_fwd_kernel
    if variant == "old":
        path = Path(__file__).with_name("_old_flash_fwd.py")
        if not path.exists():
            raise FileNotFoundError(f"{path} (copy the previous kernel there to time it)")
    else:
        src = Path(original.__file__).read_text()
        for old, new in _PATCHES[variant]:
            assert src.count(old) == 1, f"variant {variant}: the patched text moved in flash_fwd.py"
            src = src.replace(old, new)
        path = Path(os.environ.get("TMPDIR", "/tmp"), f"attnlower_flash_fwd_{variant}.py")
        path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"attnlower_flash_fwd_{variant}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._flash_fwd_kernel


_KERNELS: dict = {}


def forward(q, k, v, causal, cfg, variant):
    from attnlower.lowering import launch
    from attnlower.lowering.configs import KernelConfig
    if variant not in _KERNELS:
        _KERNELS[variant] = fwd_kernel(variant)
    from attnlower.lowering.params import AttentionParams
    saved = launch.flash_fwd._flash_fwd_kernel   # the launcher looks kernels up on their module per call
    launch.flash_fwd._flash_fwd_kernel = _KERNELS[variant]
    try:
        return launch.flash_forward(q, k, v, AttentionParams(1.0 / math.sqrt(q.shape[-1]), causal),
                                    config=KernelConfig(*cfg))[0]
    finally:
        launch.flash_fwd._flash_fwd_kernel = saved


def rand(batch, heads, n, head_dim, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(3)]


def jobs():
    out = []
    for d in (64, 128):
        for causal in (False, True):
            out += [(d, causal, cfg, "cur") for cfg in CONFIGS[d]]
            out += [(d, causal, VARIANT_CONFIGS[d], var) for var in VARIANTS if var != "cur"]
    return out


def _compile(job):
    d, causal, cfg, variant = job
    _set_allocator()
    try:
        q, k, v = rand(1, 2, 200, d, 0)
        forward(q, k, v, causal, cfg, variant)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:200]}"


def check(d, causal, cfg, variant) -> float:
    """max|err| / max|ref| against float64 at odd lengths (Tq = Tk = 333 and 1000), or raises."""
    from attention_oracle import oracle
    worst = 0.0
    for n, seed in ((333, 11), (1000, 12)):
        q, k, v = rand(2, 3, n, d, seed)
        with torch.device("cuda"):
            ref, _ = oracle(q, k, v, causal=causal)
        poison = torch.full_like(q, float("nan"))  # freed, so the launcher's torch.empty likely gets
        del poison                                  # this NaN block: an unwritten element fails below
        out = forward(q, k, v, causal, cfg, variant)
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        if not err < 2e-2:  # bf16 output rounding is ~4e-3 of max|ref|; NaN fails here too
            raise RuntimeError(f"wrong result: max|err|/max|ref| = {err:.3g} at N={n}")
        worst = max(worst, err)
    return worst


def sdpa_ms(q, k, v, causal, backend):
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def fn():
        with sdpa_kernel(b):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    fn()
    return triton.testing.do_bench(fn, warmup=25, rep=60, return_mode="median")


def main() -> None:
    import triton
    _set_allocator()
    t0 = time.time()
    todo = jobs()
    with mp.get_context("spawn").Pool(16) as pool:
        werrs = dict(zip(todo, pool.map(_compile, todo)))
    print(f"compiled {len(todo)} kernels in {time.time() - t0:.0f}s; worker errors: "
          f"{ {k: v for k, v in werrs.items() if v} }", flush=True)
    ok = {}
    for job in todo:
        try:
            ok[job] = check(*job)
        except Exception as e:  # noqa: BLE001 - reported, excluded from timing
            print(f"check failed {job}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    shapes = []
    for d in (64, 128):
        for n in LONG_NS:
            for causal in (False, True):
                shapes.append((d, n, TOKENS // n, MODEL_DIM // d, causal))
    for n, batch, heads in SHORT:
        d = 64 if heads == 12 else 128
        shapes.append((d, n, batch, heads, False))
    rows = []
    for d, n, batch, heads, causal in shapes:
        q, k, v = rand(batch, heads, n, d, 5)
        flop = 4.0 * batch * heads * n * n * d * (0.5 if causal else 1.0)
        row = dict(D=d, N=n, B=batch, H=heads, causal=causal, ms={})
        for backend in ("cudnn", "flash"):
            try:
                row["ms"][backend] = sdpa_ms(q, k, v, causal, backend)
            except Exception as e:  # noqa: BLE001
                row["ms"][backend] = None
                print(f"sdpa {backend} {d} {n}: {e}", flush=True)
        for job in todo:
            jd, jc, cfg, variant = job
            if (jd, jc) != (d, causal) or job not in ok:
                continue
            key = f"{variant}:{'x'.join(map(str, cfg))}"
            row["ms"][key] = triton.testing.do_bench(lambda: forward(q, k, v, causal, cfg, variant),
                                                     warmup=25, rep=60, return_mode="median")
        row["tflops"] = {k: (flop / ms / 1e9 if ms else None) for k, ms in row["ms"].items()}
        rows.append(row)
        best = min((k for k in row["ms"] if ":" in k), key=lambda k: row["ms"][k])
        print(json.dumps(dict(D=d, N=n, causal=causal, best=best, best_tflops=round(row["tflops"][best], 1),
                              cur=round(row["tflops"].get("cur:" + "x".join(map(str, VARIANT_CONFIGS[d])), 0) or 0, 1),
                              cudnn=round(row["tflops"]["cudnn"] or 0, 1))), flush=True)
        del q, k, v
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "flash_tune.json").write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
            checks={str(k): v for k, v in ok.items()}, rows=rows), indent=1))
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} bf16 fwd TFLOP/s")
    print(f"{'D':>4} {'N':>6} {'c':>1} {'cudnn':>6} {'flash':>6} {'cur':>6} " +
          " ".join(f"{v:>6}" for v in VARIANTS[1:]) + "  best config (TFLOP/s)")
    for r in rows:
        t = r["tflops"]
        base = "x".join(map(str, VARIANT_CONFIGS[r["D"]]))
        cells = [t.get(f"{v}:{base}") for v in VARIANTS]
        tuned = {k: x for k, x in t.items() if k.startswith("cur:") and x}
        best = max(tuned, key=tuned.get) if tuned else "-"
        fmt = lambda x: f"{x:6.0f}" if x else "     -"  # noqa: E731
        print(f"{r['D']:>4} {r['N']:>6} {'y' if r['causal'] else 'n'} {fmt(t.get('cudnn'))} {fmt(t.get('flash'))} "
              + " ".join(fmt(c) for c in cells) + f"  {best[4:]} ({tuned.get(best, 0):.0f})")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/flash_tune.py needs a CUDA GPU")
    main()
