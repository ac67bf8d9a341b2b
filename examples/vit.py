"""ViT (Hugging Face `ViTModel`, random weights) through attnlower: bidirectional attention with no mask.

The image is cut into patches plus a [CLS] token, so T = (image/patch)^2 + 1 (17 at the CPU
default: an odd length). Every site must become a `flash_attention` with no mask and no bias. The
example compares the last hidden state with eager; on CUDA it also times the forward against eager
and Inductor alone.

    python examples/vit.py [--attn sdpa eager] [--image-size 32] [--patch-size 8] [--device cpu|cuda]
"""
from __future__ import annotations

import sys

import torch
import transformers

import _common as C


def build(attn: str, args) -> transformers.ViTModel:
    torch.manual_seed(args.seed)
    if args.gpu:   # ViT-B/16's shape
        dims = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    else:
        dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    cfg = transformers.ViTConfig(image_size=args.image_size, patch_size=args.patch_size, num_channels=3,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **dims)
    cfg._attn_implementation = attn
    return transformers.ViTModel(cfg, add_pooling_layer=False).to(args.device, args.torch_dtype).eval()


def run(attn: str, args) -> list[bool]:
    model = build(attn, args)
    print(f"\n-- ViT, attn_implementation={attn!r}, {args.image_size}x{args.image_size} image, "
          f"{args.patch_size}x{args.patch_size} patches: T={args.seq_len}")
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device, dtype=args.torch_dtype)
    forward = lambda m: m(pixel_values=pixels).last_hidden_state  # noqa: E731
    with torch.no_grad():
        ref = forward(model)
        compiled = C.compile_with_reports(model, args.inner)
        got = forward(compiled.fn)
        C.print_sites(compiled.reports)
        C.print_specs(compiled.reports, ("q_heads", "head_dim", "causal", "mask_kind", "bias_kind"))
        checks = [C.check_sites(compiled.reports, "flash_attention", at_least=model.config.num_hidden_layers),
                  check_no_mask(compiled.reports),
                  C.check_close("last hidden state", got, ref, C.RTOL[args.torch_dtype])]
        if args.gpu:
            base = C.inductor(model)
            C.print_speed(f"forward B={args.batch} T={args.seq_len}", {
                "eager": C.bench_ms(lambda: forward(model)),
                "inductor": C.bench_ms(lambda: forward(base)),
                "attnlower": C.bench_ms(lambda: forward(compiled.fn)),
            })
    return checks


def check_no_mask(reports) -> bool:
    """ViT attends everywhere: no site may carry a causal mask or a bias."""
    kinds = sorted({(s.spec["causal"], s.spec["bias_kind"]) for r in reports for s in r.rewritten if s.spec})
    ok = kinds == [(False, "none")]
    print(f"{'ok  ' if ok else 'FAIL'} no mask: (causal, bias) of the sites = {kinds}")
    return ok


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--attn", nargs="+", choices=["eager", "sdpa"], default=["sdpa", "eager"])
    p.add_argument("--image-size", type=int, default=None, help="default: 32 on CPU, 224 on CUDA")
    p.add_argument("--patch-size", type=int, default=None, help="default: 8 on CPU, 16 on CUDA")
    args = p.parse_args(argv)
    if args.seq_len is not None:
        p.error("--seq-len does not apply to ViT: T follows from --image-size and --patch-size")
    args = C.resolve(args, cpu_seq=0, gpu_seq=0)
    args.image_size = args.image_size or (224 if args.gpu else 32)
    args.patch_size = args.patch_size or (16 if args.gpu else 8)
    args.seq_len = (args.image_size // args.patch_size) ** 2 + 1
    if args.gpu and args.batch == 2:
        args.batch = 32
    C.header("ViT (no mask)", args)
    checks = [ok for attn in args.attn for ok in run(attn, args)]
    return C.finish(checks)


if __name__ == "__main__":
    sys.exit(main())
