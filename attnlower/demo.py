"""`attnlower demo`: compile a small GPT-style model and show what attnlower did."""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    """nanoGPT-style attention written by hand: matmul, tril mask, softmax, matmul."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
        att = att.masked_fill(~causal, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class GQAAttention(nn.Module):
    """Llama-style grouped-query attention through SDPA with a repeat_kv."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.hd).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(B, self.kv_heads, rep, T, self.hd).reshape(B, self.heads, T, self.hd)
        v = v[:, :, None].expand(B, self.kv_heads, rep, T, self.hd).reshape(B, self.heads, T, self.hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, dim, heads, max_len, gqa: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = GQAAttention(dim, heads, heads // 2) if gqa else CausalSelfAttention(dim, heads, max_len)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Two blocks, one of each attention spelling."""

    def __init__(self, vocab=256, dim=64, heads=4, max_len=128):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, max_len, gqa=False), Block(dim, heads, max_len, gqa=True)])
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def main(inner: str = "inductor", seq_len: int = 48, batch: int = 2) -> int:
    """Compile TinyGPT with attnlower, print the site table and the max difference against eager."""
    import attnlower

    torch.manual_seed(0)
    model = TinyGPT().eval()
    idx = torch.randint(0, 256, (batch, seq_len))
    with torch.no_grad():
        ref = model(idx)
        t0 = time.perf_counter()
        reports = attnlower.inspect(model, idx, options={"inner": inner})
        compile_s = time.perf_counter() - t0
        compiled = torch.compile(model, backend="attnlower", options={"inner": inner})
        out = compiled(idx)
    print(f"attnlower {attnlower.__version__} demo: TinyGPT (2 blocks: hand-written causal attention, "
          f"GQA through SDPA), batch {batch}, seq {seq_len}, on CPU, inner={inner}\n")
    print(reports)   # the site tables
    for r in reports:
        for s in r.sites:
            if s.spec:
                keys = ("q_heads", "kv_heads", "head_dim", "causal", "bottom_right", "window", "bias_kind", "scale")
                print(f"    site {s.index} spec: " + ", ".join(f"{k}={s.spec[k]}" for k in keys))
    err = (out - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    n = sum(r.count() for r in reports)
    print(f"\nrewritten {n} attention site(s); compile + first run {compile_s:.1f} s")
    print(f"max |compiled - eager| = {err:.3e} (relative {rel:.3e})")
    print("\non CPU tensors the fused ops run attnlower's plain-PyTorch reference (the same semantics, not a "
          "kernel): the Triton kernels run on CUDA GPUs, or on CPU through Triton's interpreter with "
          "TRITON_INTERPRET=1 ATTNLOWER_CPU_KERNELS=triton (slow: for testing)")
    ok = n == 2 and rel < 1e-5
    print("OK" if ok else "MISMATCH: expected 2 rewritten sites and relative error < 1e-5")
    return 0 if ok else 1
