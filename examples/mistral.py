"""Mistral (Hugging Face, random weights) through attnlower: the sliding-window mask becomes `sliding_window_attention`.

HF builds Mistral's mask as causal AND (query - key < window). attnlower evaluates that mask as a
function of (query, key), proves it is a band, and picks `sliding_window_attention`, which only
visits the key blocks inside the window: its cost grows as T·W instead of T². The example checks
the op and the prefill logits against eager; on CUDA it also times the prefill at several T with
the window fixed, against eager and Inductor alone, to show that scaling.

    python examples/mistral.py [--attn sdpa eager] [--seq-len 32] [--window 8] [--device cpu|cuda]
"""
from __future__ import annotations

import sys

import torch
import transformers

import _common as C


def build(attn: str, args, max_len: int) -> transformers.MistralForCausalLM:
    torch.manual_seed(args.seed)
    if args.gpu:
        dims = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                    num_key_value_heads=4, head_dim=64, vocab_size=32000)
    else:
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=128)
    cfg = transformers.MistralConfig(sliding_window=args.window, max_position_embeddings=max_len, **dims)
    cfg._attn_implementation = attn
    return transformers.MistralForCausalLM(cfg).to(args.device, args.torch_dtype).eval()


def prefill(model, ids):
    # use_cache=True: the prefill of generation, where HF's mask is the plain band (no packed-sequence
    # term built from position_ids), which attnlower proves to be a window.
    return model(input_ids=ids, use_cache=True).logits


def run(attn: str, args) -> list[bool]:
    model = build(attn, args, max(args.scaling_lens + [args.seq_len]))
    cfg = model.config
    print(f"\n-- Mistral, attn_implementation={attn!r}, sliding_window={cfg.sliding_window}, T={args.seq_len}")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=args.device)
    with torch.no_grad():
        ref = prefill(model, ids)
        compiled = C.compile_with_reports(model, args.inner)
        got = prefill(compiled.fn, ids)
        C.print_sites(compiled.reports)
        C.print_specs(compiled.reports, ("q_heads", "kv_heads", "causal", "bottom_right", "window", "bias_kind"))
        checks = [C.check_sites(compiled.reports, "sliding_window_attention", at_least=cfg.num_hidden_layers),
                  C.check_close("prefill logits", got, ref, C.RTOL[args.torch_dtype])]
        if args.gpu and attn == "eager":
            print("(T scaling timed with attn_implementation='sdpa' only: eager attention's fp32 T x T "
                  "scores need tens of GB at 16k)")
        elif args.gpu:
            base = C.inductor(model)
            print(f"prefill time vs T at window {cfg.sliding_window} (attnlower should grow ~linearly in T):")
            for t in args.scaling_lens:
                x = torch.randint(0, cfg.vocab_size, (args.batch, t), device=args.device)
                C.print_speed(f"B={args.batch} T={t:6d}", {
                    "eager": C.bench_ms(lambda: prefill(model, x)),
                    "inductor": C.bench_ms(lambda: prefill(base, x)),
                    "attnlower": C.bench_ms(lambda: prefill(compiled.fn, x)),
                })
    return checks


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--attn", nargs="+", choices=["eager", "sdpa"], default=["sdpa", "eager"])
    p.add_argument("--window", type=int, default=None, help="default: 8 on CPU, 1024 on CUDA")
    p.add_argument("--scaling-lens", type=int, nargs="+", default=None,
                   help="T values timed on CUDA (default 2048 4096 8192 16384)")
    args = C.resolve(p.parse_args(argv), cpu_seq=32, gpu_seq=4096)
    args.window = args.window or (1024 if args.gpu else 8)
    args.scaling_lens = (args.scaling_lens or [2048, 4096, 8192, 16384]) if args.gpu else []
    C.header("Mistral (sliding window)", args)
    checks = [ok for attn in args.attn for ok in run(attn, args)]
    return C.finish(checks)


if __name__ == "__main__":
    sys.exit(main())
