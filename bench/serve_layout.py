"""What regrouping the packed queries costs in continuous batching with attnlower (integrations/continuous_batching.py).

    python bench/serve_layout.py                 # CPU (the ops' reference) or the GPU when there is one
    python bench/serve_layout.py --segments 1,0,64

paged_attention takes one query count Tq for every row, so each forward's packed queries are regrouped: cut into
segments of S query tokens, one row each, padded at the end (0 = the default rule: S = 1 for an all-decode batch,
else the kernel's query tile). This runs generate_batch on a small Llama with a mixed workload (prompts cut into
chunks, decodes beside them) for each S and reports, per forward summed over the run:

  layout     building the rows, their key lengths and block tables (once per forward and layer type)
  regroup    scattering the packed queries into the rows and gathering the outputs back (every layer)
  op         paged_attention itself (every layer)
  padded     query slots the rows hold beyond the real query tokens (work the op does for nothing)
  total      generate_batch's wall time, and the tokens equal to sdpa's

The op change that would remove the regrouping: paged_attention over a packed varlen query (docs in the module).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segments", default="1,0,16,64", help="S values to compare (0: the default rule)")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(8, 120))
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--max-batch-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="runs per S; the fastest is shown (a shared machine is noisy)")
    args = p.parse_args(argv)

    import transformers
    from transformers import ContinuousBatchingConfig, GenerationConfig

    import attnlower  # noqa: F401
    from attnlower import ops
    from attnlower.integrations import continuous_batching as cb

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                      head_dim=32, intermediate_size=512, vocab_size=512, max_position_embeddings=1024,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(*args.prompt_len))] for _ in range(args.requests)]
    gen = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb_config = dict(page_size=16, num_blocks=1024, max_batch_tokens=args.max_batch_tokens)

    def generate(impl):
        model.set_attn_implementation(impl)
        start = time.perf_counter()
        out = model.generate_batch(prompts, generation_config=gen,
                                   continuous_batching_config=ContinuousBatchingConfig(**cb_config))
        return time.perf_counter() - start, [o.generated_tokens for o in out.values()]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    timers = {"layout": 0.0, "op": 0.0, "attend": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                timers[name] += time.perf_counter() - t
        return wrapper

    cb.row_layout = timed("layout", cb.row_layout)
    ops.paged_attention = timed("op", ops.paged_attention)
    cb.attend = timed("attend", cb.attend)

    generate("attnlower")   # warm-up: imports, first calls
    seconds_sdpa, want = generate("sdpa")
    print(f"device {device} | {args.requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, "
          f"{args.new_tokens} new, {args.max_batch_tokens} tokens per forward | sdpa {seconds_sdpa:.2f} s")
    print(f"{'S':>8} {'total s':>8} {'attend s':>9} {'layout s':>9} {'regroup s':>10} {'op s':>8} "
          f"{'tokens':>8} {'padded':>8} {'padded %':>9} {'= sdpa':>7}")
    for segment in (int(s) for s in args.segments.split(",")):
        cb.QUERY_SEGMENT = segment or None
        runs = []
        for _ in range(args.repeat):
            for k in timers:
                timers[k] = 0.0
            before = dict(cb.stats)
            seconds, got = generate("attnlower")
            tokens = cb.stats["query_tokens"] - before["query_tokens"]
            padded = cb.stats["padded_query_slots"] - before["padded_query_slots"]
            runs.append((seconds, dict(timers), tokens, padded, got == want))
        seconds, t, tokens, padded, same = min(runs, key=lambda r: r[0])
        regroup = t["attend"] - t["layout"] - t["op"]
        print(f"{segment or 'rule':>8} {seconds:>8.2f} {t['attend']:>9.3f} {t['layout']:>9.3f} "
              f"{regroup:>10.3f} {t['op']:>8.3f} {tokens:>8} {padded:>8} {100 * padded / tokens:>8.0f}% "
              f"{str(all(r[4] for r in runs)):>7}")
    cb.QUERY_SEGMENT = None


if __name__ == "__main__":
    main()
