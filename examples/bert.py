"""BERT (Hugging Face, random weights) through attnlower: bidirectional attention with a padding mask, trained.

Each row of the batch is right-padded to a different length and the 2-D `attention_mask` says so;
attnlower runs each site as `flash_attention` with the padding as a bias (no causal mask). One
training step (forward, a loss, backward) runs compiled and eagerly on identical copies of the
model; the example compares the loss and the gradient of every parameter. On CUDA it also times the
step against eager and Inductor alone.

    python examples/bert.py [--attn sdpa eager] [--seq-len 32] [--device cpu|cuda]
"""
from __future__ import annotations

import copy
import sys

import torch
import transformers

import _common as C


def build(attn: str, args) -> transformers.BertModel:
    torch.manual_seed(args.seed)
    if args.gpu:   # BERT-base's shape
        dims = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    vocab_size=30522)
    else:
        dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    vocab_size=128)
    # no dropout: eager and compiled draw different random streams, so dropout would make them differ
    cfg = transformers.BertConfig(max_position_embeddings=max(512, args.seq_len), hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **dims)
    cfg._attn_implementation = attn
    return transformers.BertModel(cfg, add_pooling_layer=False).to(args.device, args.torch_dtype).train()


def inputs(args, cfg):
    """Token ids, an attention_mask keeping T, ..., T/2 tokens in the rows, and a regression target."""
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=args.device)
    lengths = torch.linspace(args.seq_len, args.seq_len // 2, args.batch, device=args.device).long()
    mask = (torch.arange(args.seq_len, device=args.device)[None, :] < lengths[:, None]).long()
    target = torch.randn(args.batch, args.seq_len, cfg.hidden_size, device=args.device, dtype=args.torch_dtype)
    return ids, mask, target


def train_step(model, ids, mask, target):
    """Forward, a loss over the non-padded tokens, backward; returns the loss (the grads stay on the params)."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask[..., None].to(hidden.dtype)
    loss = (((hidden - target) ** 2) * keep).sum() / keep.sum()
    loss.backward()
    return loss.detach()


def run(attn: str, args) -> list[bool]:
    eager_model = build(attn, args)
    model = copy.deepcopy(eager_model)
    ids, mask, target = inputs(args, eager_model.config)
    print(f"\n-- BERT, attn_implementation={attn!r}, token counts per row {mask.sum(1).tolist()}")
    rtol = C.RTOL[args.torch_dtype]

    ref_loss = train_step(eager_model, ids, mask, target)
    compiled = C.compile_with_reports(model, args.inner)
    loss = train_step(compiled.fn, ids, mask, target)
    C.print_sites(compiled.reports)
    C.print_specs(compiled.reports, ("q_heads", "kv_heads", "causal", "mask_kind", "bias_kind"))
    checks = [C.check_sites(compiled.reports, "flash_attention", at_least=eager_model.config.num_hidden_layers),
              C.check_close("loss", loss, ref_loss, rtol)]

    # Every parameter's gradient, at 2x the forward tolerance (longer sums). Each error is measured
    # against max(|that gradient|, 1e-3 x the largest gradient of the model): some gradients are zero in
    # exact arithmetic (the key bias: softmax ignores a constant added to a row) and hold only rounding
    # noise, which no relative error can compare.
    grads = {name: (p.grad, p_ref.grad) for (name, p), (_, p_ref)
             in zip(model.named_parameters(), eager_model.named_parameters())}
    missing = [name for name, (g, g_ref) in grads.items() if g is None or g_ref is None]
    if missing:
        print(f"FAIL no gradient for {missing}")
        checks.append(False)
    grads = {name: (g.float(), g_ref.float()) for name, (g, g_ref) in grads.items() if name not in missing}
    floor = 1e-3 * max(g_ref.abs().max().item() for _, g_ref in grads.values())
    rel = {name: (g - g_ref).abs().max().item() / max(g_ref.abs().max().item(), floor)
           for name, (g, g_ref) in grads.items()}
    worst = max(rel, key=lambda name: float("inf") if rel[name] != rel[name] else rel[name])  # NaN is worst
    ok = rel[worst] <= 2 * rtol
    print(f"{'ok  ' if ok else 'FAIL'} gradients of {len(rel)} parameters: worst relative error {rel[worst]:.3e} "
          f"({worst}), limit {2 * rtol:.0e}")
    checks.append(ok)

    if args.gpu:
        base = C.inductor(copy.deepcopy(eager_model))
        C.print_speed(f"train step (fwd + bwd) B={args.batch} T={args.seq_len}", {
            "eager": C.bench_ms(lambda: train_step(eager_model, ids, mask, target)),
            "inductor": C.bench_ms(lambda: train_step(base, ids, mask, target)),
            "attnlower": C.bench_ms(lambda: train_step(compiled.fn, ids, mask, target)),
        })
    return checks


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--attn", nargs="+", choices=["eager", "sdpa"], default=["sdpa", "eager"])
    args = C.resolve(p.parse_args(argv), cpu_seq=32, gpu_seq=512)
    C.header("BERT (bidirectional, padding mask, training step)", args)
    checks = [ok for attn in args.attn for ok in run(attn, args)]
    return C.finish(checks)


if __name__ == "__main__":
    sys.exit(main())
