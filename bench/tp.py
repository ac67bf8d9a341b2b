"""Tensor-parallel benchmark: an 8-layer Llama-shaped model, TP=2, attnlower against Inductor, tokens/s.

    torchrun --nproc-per-node 2 bench/tp.py            # two GPUs, NCCL; writes $OUT/tp.json when OUT is set
    python bench/tp.py                                 # the same: spawns the 2 ranks itself
    python bench/tp.py --smoke                         # CPU, gloo, tiny shapes: checks the script end to end

The model is transformers' Llama decoder (RMSNorm, rotary embeddings, GQA through `repeat_kv`, SwiGLU)
on hidden states, bf16, Llama-3-8B's layer shape by default (d=4096, 32 query / 8 KV heads, ffn 14336),
sharded with torch's Llama TP plan (q/k/v and gate/up `ColwiseParallel`, o and down `RowwiseParallel`),
so each rank attends over 16 query / 4 KV heads. Candidates, each `torch.compile`d afresh:

  eager       the sharded model as is (the baseline both compilers must match)
  inductor    torch.compile(model)
  attnlower   torch.compile(model, backend="attnlower")  (its passes, then Inductor)

Two workloads, timed after a warm-up (median of --iters, every rank synchronized):
  prefill     forward under no_grad on [B, T, d]
  train       forward + backward + SGD step

Before timing, each compiled candidate's prefill output is checked against eager's (bf16: max abs
error <= 0.05 on outputs of order 1), and attnlower's sites are counted: every layer's attention must be
rewritten, with the rank's local head count. tokens/s = B * T / time; ratio = attnlower / inductor.
NVLink multicast stays off in every rank (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1), set before torch initializes communication.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLS_OFF)   # before torch: inherited by every process this one starts

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANDIDATES = ("eager", "inductor", "attnlower")
BF16_TOL = 0.05   # bf16 outputs of order 1 through 8 layers: eager vs compiled differ by rounding only


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                   help="transformers' attn_implementation: F.scaled_dot_product_attention or matmul-softmax-matmul")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not started by torchrun (TP degree)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU + gloo, 2 tiny layers, fp32, 1 iteration, attnlower's inner compiler eager: "
                        "checks the script runs, measures nothing")
    args = p.parse_args(argv)
    args.candidates = args.candidates.split(",")
    unknown = set(args.candidates) - set(CANDIDATES)
    if unknown:
        p.error(f"unknown candidate(s) {sorted(unknown)}; valid: {', '.join(CANDIDATES)}")
    if args.smoke:
        args.layers, args.dim, args.heads, args.kv_heads, args.ffn = 2, 64, 4, 2, 96
        args.batch, args.seq, args.iters, args.warmup = 1, 16, 1, 0
        args.candidates = [c for c in args.candidates if c != "inductor"]   # a C++ build per rank: minutes on CPU
    for name in ("heads", "kv_heads"):
        if getattr(args, name) % args.nproc:
            p.error(f"--{name.replace('_', '-')} must divide by the TP degree {args.nproc}, got {getattr(args, name)}")
    if not args.smoke and not torch.cuda.is_available():
        p.error("bench/tp.py times NCCL tensor parallelism on GPUs and sees none; for the CPU check run --smoke")
    return args


# --------------------------------------------------------------------------------------------
# the model: tests/distributed/llama.py, the one the distributed tests shard (same model, same plan)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))
from llama import Llama, tensor_parallel  # noqa: E402


def build(a, device, dtype, mesh) -> nn.Module:
    torch.manual_seed(0)   # every rank builds the same full model, then keeps its shards
    with torch.device(device):
        model = Llama(a.dim, a.heads, a.kv_heads, a.ffn, a.layers, attention=a.attention,
                      rope_base=500000.0).to(dtype)   # Llama 3's rotary base
    for p in model.parameters():   # 1/sqrt(fan_in)-scaled weights keep activations of order 1 over 8 layers
        if p.dim() == 2:
            nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return tensor_parallel(model, mesh)


# --------------------------------------------------------------------------------------------
# timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def median_seconds(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    # every rank's median, the slowest one counts (a TP step is as fast as its slowest rank)
    m = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)   # NCCL: a GPU tensor
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m.item()


def compiled(model, name):
    torch._dynamo.reset()
    if name == "eager":
        return model
    if name == "inductor":
        return torch.compile(model)
    return torch.compile(model, backend="attnlower", options={"inner": "eager" if ARGS.smoke else "inductor"})


def run(a) -> dict:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank()))) if not a.smoke \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtype = torch.float32 if a.smoke else torch.bfloat16
    model = build(a, device, dtype, mesh)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)   # stateless: same memory for every candidate
    x = torch.randn(a.batch, a.seq, a.dim, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(1))
    grad = torch.randn_like(x)
    with torch.no_grad():
        reference = model(x)
    tokens = a.batch * a.seq
    results = {"config": {k: v for k, v in vars(a).items()}, "world_size": dist.get_world_size(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "candidates": {}}
    for name in a.candidates:
        fn = compiled(model, name)
        from attnlower.compiler.backend import reports

        start = len(reports())

        def prefill():
            with torch.no_grad():
                return fn(x)

        def train():
            opt.zero_grad(set_to_none=True)
            fn(x).backward(grad)
            opt.step()

        err = (prefill().float() - reference.float()).abs().max().item()
        if not err <= BF16_TOL:
            raise AssertionError(f"{name}: prefill output differs from eager by {err:.3g} (tolerance {BF16_TOL})")
        row = {"prefill_max_abs_err": err}
        row["prefill_s"] = median_seconds(prefill, device, a.warmup, a.iters)
        state = {n: p.detach().clone() for n, p in model.named_parameters()}   # train steps move the weights
        row["train_s"] = median_seconds(train, device, a.warmup, a.iters)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n])
        row["prefill_tokens_per_s"] = tokens / row["prefill_s"]
        row["train_tokens_per_s"] = tokens / row["train_s"]
        if name == "attnlower":
            sites = [s for r in reports()[start:] for s in r.sites]
            row["sites"] = {"found": len(sites), "rewritten": sum(s.rewritten for s in sites),
                            "local_heads": sorted({(s.spec["q_heads"], s.spec["kv_heads"]) for s in sites if s.spec}),
                            "refused": sorted({s.reason for s in sites if not s.rewritten})}
            # one prefill graph (no_grad) and one training graph, each with every layer's attention
            expected = 2 * a.layers
            if row["sites"]["rewritten"] < expected:
                raise AssertionError(f"attnlower rewrote {row['sites']['rewritten']} attention sites, expected "
                                     f"{expected} ({a.layers} layers x prefill + train graphs): {row['sites']}")
        results["candidates"][name] = row
    c = results["candidates"]
    if "attnlower" in c and "inductor" in c:
        results["attnlower_over_inductor"] = {
            w: c["attnlower"][f"{w}_tokens_per_s"] / c["inductor"][f"{w}_tokens_per_s"] for w in ("prefill", "train")}
    return results


def report(results: dict) -> None:
    print(f"TP={results['world_size']} on {results['device']}, torch {results['torch']}: "
          f"B={results['config']['batch']} T={results['config']['seq']}, {results['config']['layers']} layers")
    print(f"  {'candidate':10s} {'prefill tok/s':>14s} {'train tok/s':>12s}  max|err| vs eager")
    for name, row in results["candidates"].items():
        print(f"  {name:10s} {row['prefill_tokens_per_s']:14.0f} {row['train_tokens_per_s']:12.0f}  "
              f"{row['prefill_max_abs_err']:.2e}" + (f"  sites {row['sites']}" if "sites" in row else ""))
    if "attnlower_over_inductor" in results:
        r = results["attnlower_over_inductor"]
        print(f"  attnlower / inductor: prefill {r['prefill']:.3f}x, train {r['train']:.3f}x")


def rank_main(rank: int, world_size: int, port: int, argv) -> None:
    global ARGS
    os.environ.update(NVLS_OFF)
    ARGS = a = parse_args(argv)
    backend = "gloo" if a.smoke else "nccl"
    if port:   # spawned by this script: loopback only
        dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
    else:      # torchrun
        dist.init_process_group(backend)
    try:
        results = run(a)
        if dist.get_rank() == 0:
            report(results)
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], "tp.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        dist.destroy_process_group()


ARGS: argparse.Namespace


def main() -> None:
    a = parse_args()
    if "RANK" in os.environ:   # under torchrun
        rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), 0, sys.argv[1:])
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(a.nproc, port, sys.argv[1:]), nprocs=a.nproc)


if __name__ == "__main__":
    main()
