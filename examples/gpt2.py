"""GPT-2 (Hugging Face, random weights) through attnlower: eager and SDPA attention, prefill and generate().

For each attention implementation HF offers ("eager": matmul / causal mask / softmax / matmul;
"sdpa": `scaled_dot_product_attention`), it compiles the model with attnlower, prints the site
table, compares the prefill logits with eager, then runs greedy `generate()` with the compiled
forward and compares the generated token ids. On CUDA it also times the prefill against eager and
against Inductor alone.

    python examples/gpt2.py [--attn eager sdpa] [--seq-len 32] [--new-tokens 4] [--device cpu|cuda]
"""
from __future__ import annotations

import sys

import torch
import transformers

import _common as C


def build(attn: str, args) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(args.seed)
    if args.gpu:   # GPT-2 small's shape
        dims = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
    else:
        dims = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128)
    cfg = transformers.GPT2Config(n_positions=max(1024, args.seq_len + args.new_tokens), attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, **dims)
    cfg._attn_implementation = attn
    return transformers.GPT2LMHeadModel(cfg).to(args.device, args.torch_dtype).eval()


def run(attn: str, args) -> list[bool]:
    model = build(attn, args)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=args.device)
    print(f"\n-- GPT-2, attn_implementation={attn!r}")
    checks = []
    with torch.no_grad():
        # prefill: logits of the whole prompt
        prefill = lambda m: m(input_ids=ids, use_cache=False).logits  # noqa: E731
        ref = prefill(model)
        compiled = C.compile_with_reports(model, args.inner)
        got = prefill(compiled.fn)
        C.print_sites(compiled.reports)
        checks.append(C.check_sites(compiled.reports, "flash_attention", at_least=model.config.n_layer))
        checks.append(C.check_close("prefill logits", got, ref, C.RTOL[args.torch_dtype]))
        if args.gpu:
            base = C.inductor(model)
            C.print_speed(f"prefill B={args.batch} T={args.seq_len}", {
                "eager": C.bench_ms(lambda: prefill(model)),
                "inductor": C.bench_ms(lambda: prefill(base)),
                "attnlower": C.bench_ms(lambda: prefill(compiled.fn)),
            })

        # generate: greedy, the compiled forward called by HF's loop (prefill, then one token at a time)
        gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                   pad_token_id=0, return_dict_in_generate=True, output_scores=True)
        ref = model.generate(ids, **gen)
        compiled = C.compile_with_reports(model.forward, args.inner)
        model.forward = compiled.fn
        try:
            got = model.generate(ids, **gen)
        finally:
            del model.forward   # back to the class's eager forward
        C.print_sites(compiled.reports)
        checks.append(C.check_sites(compiled.reports, "flash_attention", at_least=model.config.n_layer))
        checks.append(C.check_generation("generate()", got, ref, args.seq_len, C.RTOL[args.torch_dtype],
                                         require_equal_ids=args.torch_dtype == torch.float32))
    return checks


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--attn", nargs="+", choices=["eager", "sdpa"], default=["eager", "sdpa"])
    p.add_argument("--new-tokens", type=int, default=4)
    args = C.resolve(p.parse_args(argv), cpu_seq=32, gpu_seq=1024)
    C.header("GPT-2", args)
    checks = [ok for attn in args.attn for ok in run(attn, args)]
    return C.finish(checks)


if __name__ == "__main__":
    sys.exit(main())
