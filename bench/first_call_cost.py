"""What the first-call check costs, and how far a correct fused op is from its float64 source.

Each row runs in a fresh process with a fresh Inductor cache, twice: `validate=True` and
`validate=False`, and reports the first call's wall time (Dynamo, the passes, Inductor's compile, the
run), the seconds the first-call checks took inside it, the relative error each check measured
(max |op - source| / max |source| over the sampled elements) against its tolerance, and the first
call's overhead: (first call with validation - without) / without.

Configurations: `band` is a sliding window wider than any size the compile-time check can afford
(it is checked on the first call as it comes); `gpt2` and `llama` are HF models at the GPU example
sizes (random weights) with every site forced onto the first-call path (`--force`), so that the
check's cost is measured on real graphs.

    python bench/first_call_cost.py [--configs band gpt2 llama] [--dtypes bf16 fp16 fp32] [--device cuda]
                                    [--inner inductor|eager] [--repeat N]

On the CPU, `FIRST_CALL_COST_SMALL=1` shrinks every configuration (band: T=2048, window 1500; the HF
models to 2 layers of 64 at 64 tokens) and `--repeat` takes the median of N fresh processes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("bf16", "fp16", "fp32")


def _model(config: str, dtype, device: str):
    """(callable, its inputs)."""
    import torch

    torch.manual_seed(0)
    small = os.environ.get("FIRST_CALL_COST_SMALL") == "1"      # a smoke test on the CPU
    if config == "band":
        b, h, t, d, window = (1, 2, 2048, 16, 1500) if small else (2, 16, 8192, 128, 4096)

        def band(q, k, v):
            i = torch.arange(q.size(-2), device=q.device)
            keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
            s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
            return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v

        return band, [torch.randn(b, h, t, d, device=device, dtype=dtype) for _ in range(3)]
    import transformers

    if config == "gpt2":     # GPT-2 small, examples/gpt2.py's GPU size
        dims = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128) if small else \
            dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
        cfg = transformers.GPT2Config(n_positions=1024, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **dims)
        cfg._attn_implementation = "sdpa"
        net, t = transformers.GPT2LMHeadModel(cfg), (64 if small else 1024)
    else:                    # a ~1B Llama (GQA 32/8), examples/llama.py's GPU size
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=128) if small else \
            dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64, vocab_size=32000)
        cfg = transformers.LlamaConfig(max_position_embeddings=4096, **dims)
        cfg._attn_implementation = "sdpa"
        net, t = transformers.LlamaForCausalLM(cfg), (64 if small else 4096)
    net = net.to(device, dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, t), device=device)

    def run(ids):
        with torch.no_grad():
            return net(input_ids=ids, use_cache=False).logits

    return run, [ids]


def _one(config: str, dtype_name: str, validate: bool, force: bool, device: str, inner: str) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    import attnlower  # noqa: F401  (registers the backend)
    from attnlower.compiler import backend
    from attnlower.passes import validate as V
    from attnlower.passes import validate_first_call as VF
    from attnlower.passes import validate_sizes as VS

    if force:
        def no_reduction(pair, budget):
            raise VS.CannotReduce("forced onto the first-call path by bench/first_call_cost.py --force")

        V.reduce_pair = no_reduction
        V.MAX_ELEMENTS = 1
    plans = []
    plan_for = VF.plan_for

    def keep(*args, **kwargs):
        plans.append(plan_for(*args, **kwargs))
        return plans[-1]

    V.plan_for = keep
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    fn, inputs = _model(config, dtype, device)
    compiled = torch.compile(fn, backend="attnlower", options={"inner": inner, "validate": validate})
    torch.cuda.synchronize() if device == "cuda" else None
    started = time.perf_counter()
    out = compiled(*inputs)
    torch.cuda.synchronize() if device == "cuda" else None
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(3):
        out = compiled(*inputs)
    torch.cuda.synchronize() if device == "cuda" else None
    later = (time.perf_counter() - started) / 3
    want = fn(*inputs)
    rel = float((out.float() - want.float()).abs().max() / want.float().abs().max())
    sites = [s for r in backend.reports() for s in r.sites]
    return {"config": config, "dtype": dtype_name, "validate": validate, "first_call_s": first, "later_call_s": later,
            "checks": len([p for p in plans if p.result]), "check_s": sum(p.seconds for p in plans),
            "errors": [p.error for p in plans if p.result], "failed": sum(bool(p.failed) for p in plans),
            "sites": len(sites), "rewritten": sum(s.rewritten for s in sites),
            "first_call_sites": sum(s.validated.startswith("first call") for s in sites),
            "vs_eager": rel, "tolerance": VF.TOLERANCE[dtype]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=["band", "gpt2", "llama"])
    p.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--repeat", type=int, default=1, help="fresh processes per row; the median first call is kept")
    p.add_argument("--out", default=None, help="a JSON lines file for the rows, written as they finish")
    p.add_argument("--one", nargs=4, metavar=("CONFIG", "DTYPE", "VALIDATE", "FORCE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        config, dtype, validate, force = args.one
        print("ROW " + json.dumps(_one(config, dtype, validate == "1", force == "1", args.device, args.inner)))
        return 0
    rows = []
    for config in args.configs:
        for dtype in args.dtypes:
            pair, runs = {}, {True: [], False: []}
            for _ in range(args.repeat):
                for validate in (True, False):     # interleaved: a busy machine slows both alike
                    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor_"),
                           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
                    force = "1" if config != "band" else "0"
                    proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--inner", args.inner,
                                           "--one", config, dtype, "1" if validate else "0", force],
                                          capture_output=True, text=True, env=env)
                    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                    if proc.returncode or not line:
                        print(f"{config} {dtype} validate={validate}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                        continue
                    runs[validate].append(json.loads(line[0][4:]))
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(runs[validate][-1]) + "\n")
            for validate, got in runs.items():
                if got:
                    pair[validate] = sorted(got, key=lambda r: r["first_call_s"])[len(got) // 2]
            if True in pair and False in pair:
                rows.append((pair[True], pair[False]))
                on, off = pair[True], pair[False]
                print(f"  {config} {dtype}: first call {on['first_call_s']:.2f}s vs {off['first_call_s']:.2f}s, "
                      f"checks {on['check_s']:.3f}s", file=sys.stderr)
    print(f"{args.device}, inner={args.inner}, median of {args.repeat} fresh process(es) per row\n")
    print("| config | dtype | sites (first-call checked) | checks | check s | first call s (validate on / off) | "
          "first-call overhead | check / first call | max check error / tolerance | later call s (on / off) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for on, off in rows:
        worst = max(on["errors"] or [0.0])
        print(f"| {on['config']} | {on['dtype']} | {on['sites']} ({on['first_call_sites']}) | {on['checks']} | "
              f"{on['check_s']:.3f} | {on['first_call_s']:.2f} / {off['first_call_s']:.2f} | "
              f"{100 * (on['first_call_s'] - off['first_call_s']) / off['first_call_s']:+.1f}% | "
              f"{100 * on['check_s'] / on['first_call_s']:.2f}% | {worst:.2g} / {on['tolerance']:g} | "
              f"{on['later_call_s']:.4f} / {off['later_call_s']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
