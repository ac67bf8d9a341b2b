"""Paged-attention decode benchmark: attnlower's Triton kernel against what PyTorch offers.

    python bench/paged.py            # GPU only; writes $OUT/paged.json when OUT is set

bf16, Hq=32, Hkv=8, D=128, cache block 16, one query per sequence (decode), every sequence of
length L, block table a random permutation of the cache's blocks. For each (B, L) it checks
attnlower's output against eager gather + SDPA, then times (triton.testing.do_bench, median):

  attnlower            paged_forward, split-KV as the launcher chooses
  attnlower-cudagraph  the same, replayed from a CUDA graph (no host launch overhead)
  attnlower-nosplit    paged_forward with num_splits=1 (what split-KV buys)
  eager-gather+sdpa    index the cache with the block table, then SDPA (enable_gqa)
  inductor-gather+sdpa the same function through torch.compile (Inductor)
  sdpa-cudnn / sdpa-flash   SDPA on an already contiguous [B, Hkv, L, D] cache: the
                       bandwidth bound a paged layout competes with

Effective bandwidth = bytes of K and V read (B * L * Hkv * D * 2 tensors * 2 bytes) / time.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    sys.exit("bench/paged.py needs a CUDA GPU (it times compiled Triton kernels); none is visible here. "
             "For the CPU correctness checks run: pytest tests/lowering/test_paged_kernel.py")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnlower.lowering.launch_paged import paged_forward  # noqa: E402
from attnlower.lowering.params import AttentionParams  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SHAPES = [(1, 4096), (8, 8192), (32, 4096), (64, 8192), (128, 2048), (16, 32768)]
SCALE = 1.0 / math.sqrt(HEAD_DIM)


def make_inputs(batch: int, length: int):
    blocks_per_seq = length // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, KV_HEADS, BLOCK_SIZE, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    block_table = torch.randperm(num_blocks, device="cuda").int().view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=DTYPE)
    return q, k_cache, v_cache, block_table, seq_lens


def gather_sdpa(q, k_cache, v_cache, block_table):
    """K/V gathered through the block table to [B, Hkv, L, D], then SDPA: how models without a
    paged kernel run (every sequence has the full table's length here, so no mask)."""
    batch = block_table.shape[0]

    def gather(cache):
        blocks = cache[block_table]                         # [B, nblk, Hkv, bs, D]
        return blocks.permute(0, 2, 1, 3, 4).reshape(batch, KV_HEADS, -1, HEAD_DIM)

    return F.scaled_dot_product_attention(q, gather(k_cache), gather(v_cache), scale=SCALE, enable_gqa=True)


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def contiguous_sdpa_ms(backend, q, k, v) -> tuple[float | None, str]:
    """SDPA on contiguous K/V through one backend; (None, why) when the backend refuses."""
    try:
        with sdpa_kernel(backend):
            fn = lambda: F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            return bench_ms(fn), ""
    except RuntimeError as err:        # backend does not take this shape / GQA: report, keep going
        return None, str(err).splitlines()[0][:120]


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    # one shape per compile: without the reset Dynamo's recompile limit (8) sends later shapes to eager
    torch._dynamo.reset()
    compiled_gather_sdpa = torch.compile(gather_sdpa, dynamic=False)
    results = []
    for batch, length in SHAPES:
        torch.manual_seed(0)
        q, k_cache, v_cache, block_table, seq_lens = make_inputs(batch, length)
        run = lambda **kw: paged_forward(q, k_cache, v_cache, block_table, seq_lens,  # noqa: E731
                                         AttentionParams(SCALE, True), **kw)
        # correctness before timing: both kernel paths against eager gather + SDPA
        reference = gather_sdpa(q, k_cache, v_cache, block_table).float()
        for name, out in (("attnlower", run()), ("attnlower-nosplit", run(num_splits=1))):
            err = (out.float() - reference).abs().max().item()
            if not err < 2e-2:
                sys.exit(f"{name} disagrees with gather+SDPA at B={batch}, L={length}: max |diff| = {err}")

        kv_bytes = 2 * batch * length * KV_HEADS * HEAD_DIM * k_cache.element_size()
        times = {
            "attnlower": bench_ms(run),
            # replayed from a CUDA graph: GPU time without Python/launch overhead (how servers run decode)
            "attnlower-cudagraph": triton.testing.do_bench_cudagraph(run, return_mode="median"),
            "attnlower-nosplit": bench_ms(lambda: run(num_splits=1)),
            "eager-gather+sdpa": bench_ms(lambda: gather_sdpa(q, k_cache, v_cache, block_table)),
            "inductor-gather+sdpa": bench_ms(lambda: compiled_gather_sdpa(q, k_cache, v_cache, block_table)),
        }
        notes = {}
        k_flat = k_cache[block_table].permute(0, 2, 1, 3, 4).reshape(batch, KV_HEADS, length, HEAD_DIM).contiguous()
        v_flat = v_cache[block_table].permute(0, 2, 1, 3, 4).reshape(batch, KV_HEADS, length, HEAD_DIM).contiguous()
        for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            ms, why = contiguous_sdpa_ms(backend, q, k_flat, v_flat)
            times[name] = ms
            if why:
                notes[name] = why
        del k_flat, v_flat
        row = {
            "batch": batch, "seq_len": length, "kv_bytes": kv_bytes, "ms": times,
            "kv_gb_per_s": {k: (kv_bytes / (ms * 1e-3) / 1e9 if ms else None) for k, ms in times.items()},
            "speedup_vs": {k: (ms / times["attnlower"] if ms else None) for k, ms in times.items() if k != "attnlower"},
            "notes": notes,
        }
        results.append(row)
        print(f"B={batch:4d} L={length:6d}: " + ", ".join(
            f"{k} {ms:.3f} ms" if ms else f"{k} n/a" for k, ms in times.items()), flush=True)
        for name, why in notes.items():
            print(f"    {name} unavailable: {why}")

    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "paged.json"
        path.write_text(json.dumps({"device": props.name, "torch": torch.__version__,
                                    "triton": triton.__version__, "results": results}, indent=1))
        print(f"wrote {path}")

    others = ["attnlower-cudagraph", "attnlower-nosplit", "eager-gather+sdpa", "inductor-gather+sdpa", "sdpa-cudnn", "sdpa-flash"]
    print("\nattnlower paged decode, bf16 Hq=32 Hkv=8 D=128 block 16; "
          "GB/s = K+V bytes / median time; xN = other's time / attnlower's")
    print(f"{'B':>4} {'L':>6} {'ms':>7} {'GB/s':>6} " + " ".join(f"{n:>20}" for n in others))
    for row in results:
        ms = row["ms"]["attnlower"]
        cells = [f"x{row['speedup_vs'][n]:.2f}" if row["speedup_vs"][n] else "n/a" for n in others]
        print(f"{row['batch']:>4} {row['seq_len']:>6} {ms:7.3f} {row['kv_gb_per_s']['attnlower']:6.0f} "
              + " ".join(f"{c:>20}" for c in cells))
    if os.environ.get("OUT"):   # the chart next to the table (bench/plots.py)
        from bench.plots import plot_file

        plot_file(Path(os.environ["OUT"]) / "paged.json")


if __name__ == "__main__":
    main()
