"""A small script for `attnlower dump` tests: three attention sites in one compiled function.

1. hand-written causal attention (matmul / tril mask / softmax / matmul)     -> flash_attention
2. scaled_dot_product_attention with a sliding-window band mask            -> sliding_window_attention
3. a softmax over something that is not attention (no Q·Kᵀ product)       -> refused, with a reason

Run: python tests/report/dump_script.py [--seq-len N]
"""
import argparse
import math

import torch
import torch.nn.functional as F


def attention_block(q, k, v, x):
    t = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    scores = scores.masked_fill(~causal, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    i = torch.arange(t)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 4)
    out2 = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    gate = torch.softmax(x * 2.0, dim=-1)       # a softmax that is not attention
    return out + out2, gate


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=13)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, args.seq_len, 8) for _ in range(3))
    x = torch.randn(2, 5)
    compiled = torch.compile(attention_block, backend="attnlower", options={"inner": "eager"})
    out, gate = compiled(q, k, v, x)
    ref, ref_gate = attention_block(q, k, v, x)
    print("max abs difference vs eager:", float((out - ref).abs().max()))


if __name__ == "__main__":
    main()
