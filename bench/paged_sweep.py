"""Paged decode: which split count, key tile, stages and warps the H200 wants (issue 20 item 4), in one call.

    python bench/paged_sweep.py                 # GPU: B 1/8/32/128, L 4096; $OUT/paged_sweep.json when OUT is set
    python bench/paged_sweep.py --batches 1,8 --splits 8,16,32 --block-n 128 --stages 2 --warps 8
                                                # GPU, fused vs separate combine (--reduce, both by default)
    python bench/paged_sweep.py --reduce separate --pdl off,on --block-n 64,128 --stages 2,3,4 --warps 8
                                                # GPU: the reduce by programmatic dependent launch or not; 3+ stages
                                                # read the block table a tile ahead (double-buffered K/V)
    python bench/paged_sweep.py --smoke         # CPU (Triton's interpreter): the script end to end, times nothing

The decode shape of bench/paged.py (bf16, Hq 32, Hkv 8, D 128, cache block 16, one query per sequence, a random
block table). For each batch size every candidate launch (`paged_forward(num_splits=, config=, reduce=)`, the
overrides the plan takes; `reduce` only for split counts above 1: "fused", the last split program of each tile
combines the partials, one launch, or "separate", `_paged_reduce_kernel`, a second launch) is first checked against
gather + SDPA in float32, then timed replayed from a CUDA graph (the way decode runs in a server), next to what the
launch plan chooses today and cuDNN SDPA on an already contiguous cache (the target: >= 1.0x). A candidate that does
not compile or fit (shared memory) is reported and skipped. The table last: per batch size the plan's choice, the
best candidate and both against cuDNN, so `configs.py` can cite it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--splits", default="1,2,4,8,16,32", help="split counts tried (capped by the length)")
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--stages", default="2,3,4")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--reduce", default="fused,separate", help="how split candidates combine their partials")
    p.add_argument("--pdl", default="off", help="off and / or on: the separate reduce by programmatic dependent launch")
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: checks the script")
    args = p.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    args.batches, args.splits, args.block_n = ints(args.batches), ints(args.splits), ints(args.block_n)
    args.stages, args.warps = ints(args.stages), ints(args.warps)
    args.reduce = args.reduce.split(",")
    wrong = [r for r in args.reduce if r not in ("fused", "separate")]
    if wrong:
        p.error(f"--reduce: expected fused and / or separate, got {wrong}")
    args.pdl = [{"off": False, "on": True}.get(x, x) for x in args.pdl.split(",")]
    if any(not isinstance(x, bool) for x in args.pdl):
        p.error(f"--pdl: expected off and / or on, got {args.pdl}")
    if args.smoke:
        global Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE
        Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 16, 4
        args.batches, args.length, args.splits, args.block_n = [2], 128, [1, 2], [16]   # 2 splits of 64 keys
        args.stages, args.warps = [1], [4]
    elif not torch.cuda.is_available():
        p.error("bench/paged_sweep.py times kernels on a GPU and sees none; for the CPU check run --smoke")
    return args


def make_inputs(batch: int, length: int, device, dtype):
    blocks_per_seq = length // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    g = torch.Generator(device="cpu").manual_seed(batch)
    k = torch.randn(num_blocks, KV_HEADS, BLOCK_SIZE, HEAD_DIM, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, KV_HEADS, BLOCK_SIZE, HEAD_DIM, generator=g).to(device, dtype)
    table = torch.randperm(num_blocks, generator=g).int().view(batch, blocks_per_seq).to(device)
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, generator=g).to(device, dtype)
    return q, k, v, table, lens


def contiguous(cache, table):
    batch = table.shape[0]
    return cache[table.long()].permute(0, 2, 1, 3, 4).reshape(batch, KV_HEADS, -1, HEAD_DIM).contiguous()


def timer(smoke: bool):
    if smoke:
        return lambda fn: (fn(), 0.0)[1]
    import triton

    return lambda fn: triton.testing.do_bench_cudagraph(fn, return_mode="median")


def summary(row: dict, columns: bool = False) -> str:
    """One batch size's plan choice and best candidate, each against cuDNN (a table line with `columns`)."""
    best, cudnn, chosen = row["best"], row.get("cudnn_ms"), row["chosen"]
    ratio = (lambda ms: f"{cudnn / ms:.2f}x" if cudnn and ms else "-")
    best_text = (f"s{best['splits']} {best['reduce']}{' pdl' if best.get('pdl') else ''} n{best['block_n']} "
                 f"st{best['stages']} w{best['warps']} {best['ms']:.4f}" if best else "-")
    chosen_text = f"s{chosen['splits']} {chosen['reduce']} {chosen['ms']:.4f}"
    if columns:
        return (f"{row['batch']:>4} {chosen_text:>26} {best_text:>48} "
                f"{cudnn or 0:>8.4f} {ratio(chosen['ms']):>12} {ratio(best['ms'] if best else None):>10}")
    return (f"chosen {chosen_text} ms ({ratio(chosen['ms'])} cuDNN), best {best_text} ms "
            f"({ratio(best['ms'] if best else None)} cuDNN), cuDNN {cudnn or 0:.4f} ms")


def main(argv=None) -> int:
    args = parse_args(argv)
    from attnlower.lowering.configs import KernelConfig
    from attnlower.lowering.launch_paged import paged_forward
    from attnlower.lowering.params import AttentionParams
    from attnlower.lowering import plan as planning

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    time_ms = timer(args.smoke)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    params = AttentionParams(scale, True)
    import triton

    name = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name()
    print(f"{name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__}
    rows = []
    for batch in args.batches:
        q, k, v, table, lens = make_inputs(batch, args.length, device, dtype)
        want = F.scaled_dot_product_attention(q.float(), contiguous(k, table).float(), contiguous(v, table).float(),
                                              scale=scale, enable_gqa=True)
        chosen = planning.paged_plan(params, planning.Meta.of(q), planning.Meta.of(k), planning.Meta.of(table), False,
                                     planning.target_of(q.device), True, None, None, False, HEAD_DIM)
        row = {"batch": batch, "length": args.length, "candidates": [],
               "chosen": {"splits": chosen.num_splits, "reduce": chosen.reduce or "-"}}
        row["chosen"]["ms"] = time_ms(lambda: paged_forward(q, k, v, table, lens, params))
        if not args.smoke:
            kc, vc = contiguous(k, table), contiguous(v, table)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                row["cudnn_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, kc, vc, scale=scale,
                                                                                  enable_gqa=True))
            del kc, vc
        splits = [s for s in args.splits if s == 1 or args.length // s >= 64]
        for s, reduce, pdl, bn, st, w in itertools.product(splits, args.reduce, args.pdl, args.block_n, args.stages,
                                                            args.warps):
            if s == 1 and reduce != args.reduce[0]:
                continue   # not split: nothing to combine, one candidate
            if pdl and (s == 1 or reduce != "separate"):
                continue   # PDL launches the separate reduce: nothing to launch so otherwise
            reduce = reduce if s > 1 else None
            cfg = KernelConfig(block_m=16, block_n=bn, num_warps=w, num_stages=st)
            entry = {"splits": s, "reduce": reduce or "-", "pdl": pdl, "block_n": bn, "stages": st, "warps": w}
            try:
                out = paged_forward(q, k, v, table, lens, params, num_splits=s, config=cfg, reduce=reduce, pdl=pdl)
                err = (out.float() - want).abs().max().item()
                if not err < 2e-2:
                    entry["error"] = f"wrong: max |diff| {err:.3g}"
                else:
                    entry["ms"] = time_ms(lambda: paged_forward(q, k, v, table, lens, params, num_splits=s,
                                                                config=cfg, reduce=reduce, pdl=pdl))
            except Exception as e:  # noqa: BLE001 - a config that does not compile / fit: reported, skipped
                entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            row["candidates"].append(entry)
        timed = [c for c in row["candidates"] if "ms" in c]
        row["best"] = min(timed, key=lambda c: c["ms"]) if timed else None
        rows.append(row)
        wrong = [c for c in row["candidates"] if c.get("error", "").startswith("wrong")]
        if wrong:
            print(f"B={batch}: {len(wrong)} candidate(s) WRONG: {wrong[:3]}", flush=True)
        print(f"B={batch}: {len(timed)} of {len(row['candidates'])} candidates timed; " + summary(row), flush=True)
        if os.environ.get("OUT"):   # after every batch size: a run cut by its time limit keeps what it finished
            Path(os.environ["OUT"], "paged_sweep.json").write_text(json.dumps(dict(meta, rows=rows), indent=1))
    print(f"{'B':>4} {'chosen':>26} {'best':>48} {'cuDNN':>8} {'chosen/cuDNN':>12} {'best/cuDNN':>10}")
    for row in rows:
        print(summary(row, columns=True))
    if os.environ.get("OUT") and rows:   # the table first: a chart that fails must not take it along
        from bench.plots import plot_file

        try:
            plot_file(Path(os.environ["OUT"], "paged_sweep.json"))
        except Exception as error:  # noqa: BLE001 - a benchmark never fails on its picture
            print(f"no chart for paged_sweep.json: {type(error).__name__}: {error}")
    return 1 if any(c.get("error", "").startswith("wrong") for r in rows for c in r["candidates"]) else 0


if __name__ == "__main__":
    sys.exit(main())
