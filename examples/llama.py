"""Llama (Hugging Face, random weights, grouped-query attention) through attnlower: prefill and static-cache decode.

attnlower sees through HF's `repeat_kv` (or SDPA's `enable_gqa`), so each site runs as one
`flash_attention` over the Hkv key/value heads, with no repeated K/V. The example compares the
prefill logits with eager, then runs greedy `generate()` with HF's static cache
(`cache_implementation="static"`: fixed shapes, so decode compiles once) through the compiled
forward and compares the scores and tokens. On CUDA (bf16, prefill at 4k, 32 decode steps) it also
times both against eager and against Inductor alone.

    python examples/llama.py [--attn sdpa eager] [--seq-len 32] [--new-tokens 4] [--device cpu|cuda]
"""
from __future__ import annotations

import sys

import torch
import transformers

import _common as C


def build(attn: str, args) -> transformers.LlamaForCausalLM:
    torch.manual_seed(args.seed)
    if args.gpu:   # a ~1B Llama: 32 query heads over 8 KV heads
        dims = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=32000)
    else:          # 4 query heads over 2 KV heads
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=128)
    cfg = transformers.LlamaConfig(max_position_embeddings=args.seq_len + args.new_tokens, **dims)
    cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).to(args.device, args.torch_dtype).eval()


def check_gqa(reports, kv_heads: int) -> bool:
    """Each site reads the KV heads as they are (no repeated K/V): its spec has Hkv = the config's."""
    got = sorted({int(s.spec["kv_heads"]) for r in reports for s in r.rewritten if s.spec})
    ok = got == [kv_heads]
    print(f"{'ok  ' if ok else 'FAIL'} GQA: sites read {got} KV head(s), the model has {kv_heads}")
    return ok


def run(attn: str, args) -> list[bool]:
    model = build(attn, args)
    cfg = model.config
    print(f"\n-- Llama, attn_implementation={attn!r}, {cfg.num_attention_heads} query heads "
          f"over {cfg.num_key_value_heads} KV heads")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=args.device)
    rtol = C.RTOL[args.torch_dtype]
    checks = []
    with torch.no_grad():
        prefill = lambda m: m(input_ids=ids, use_cache=False).logits  # noqa: E731
        ref = prefill(model)
        compiled = C.compile_with_reports(model, args.inner)
        got = prefill(compiled.fn)
        C.print_sites(compiled.reports)
        C.print_specs(compiled.reports, ("q_heads", "kv_heads", "head_dim", "causal", "bias_kind"))
        checks.append(C.check_sites(compiled.reports, "flash_attention", at_least=cfg.num_hidden_layers))
        checks.append(check_gqa(compiled.reports, cfg.num_key_value_heads))
        checks.append(C.check_close("prefill logits", got, ref, rtol))
        if args.gpu:
            base = C.inductor(model)
            C.print_speed(f"prefill B={args.batch} T={args.seq_len}", {
                "eager": C.bench_ms(lambda: prefill(model)),
                "inductor": C.bench_ms(lambda: prefill(base)),
                "attnlower": C.bench_ms(lambda: prefill(compiled.fn)),
            })
        del compiled, got

        # disable_compile: on CUDA, HF would otherwise wrap a static-cache decode in its own Inductor
        # compile, making "eager" Inductor and hiding the attnlower-compiled forward inside it
        gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                   cache_implementation="static", disable_compile=True, return_dict_in_generate=True,
                   output_scores=True)
        generate = lambda: model.generate(ids, **gen)  # noqa: E731
        ref = generate()
        eager_ms = C.bench_ms(generate) if args.gpu else None
        compiled = C.compile_with_reports(model.forward, args.inner)
        model.forward = compiled.fn
        try:
            got = generate()
            attnlower_ms = C.bench_ms(generate) if args.gpu else None
        finally:
            del model.forward   # back to the class's eager forward
        C.print_sites(compiled.reports)
        C.print_specs(compiled.reports, ("q_heads", "kv_heads", "head_dim", "causal", "bias_kind"))
        checks.append(C.check_sites(compiled.reports, "flash_attention", at_least=2 * cfg.num_hidden_layers))
        checks.append(C.check_generation("static-cache generate()", got, ref, args.seq_len, rtol,
                                         require_equal_ids=args.torch_dtype == torch.float32))
        if args.gpu:
            model.forward = C.inductor(model.forward)
            try:
                generate()
                inductor_ms = C.bench_ms(generate)
            finally:
                del model.forward
            C.print_speed(f"generate() prefill + {args.new_tokens} decode steps, static cache", {
                "eager": eager_ms, "inductor": inductor_ms, "attnlower": attnlower_ms})
    return checks


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--attn", nargs="+", choices=["eager", "sdpa"], default=["sdpa", "eager"])
    p.add_argument("--new-tokens", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    args = C.resolve(p.parse_args(argv), cpu_seq=32, gpu_seq=4096)
    if args.new_tokens is None:
        args.new_tokens = 32 if args.gpu else 4
    C.header("Llama (GQA)", args)
    checks = [ok for attn in args.attn for ok in run(attn, args)]
    return C.finish(checks)


if __name__ == "__main__":
    sys.exit(main())
