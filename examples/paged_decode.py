"""Paged decode: a small Llama-style model (GQA) over attnlower.PagedKVCache, compiled once.

Prefill writes the prompt's K/V into the cache's block pools; each decode step writes one token's
K/V and attends over its sequence's blocks. The model reads the cache through
`attnlower.cache.gather_blocks` + `length_mask`. In the decode steps attnlower recognizes that gather and
runs `paged_attention` on the pools in place: no dense copy of the K/V is built. The prefill's mask is
causal within the prompt from data (`seq_lens`), so today it is fused as `flash_attention` with that mask
as a bias, over the gathered copy (chunked prefill through `paged_attention` is issue 22, item 5).

It compiles once per phase: the block table has a fixed width (`max_blocks`), so every decode step
has the same shapes and only tensor *values* change (table entries, lengths, write slots).

    python examples/paged_decode.py [--steps 16] [--inner eager|inductor] [--device cpu|cuda] [--cuda-graphs]

--cuda-graphs (with --inner inductor, on CUDA) compiles with `mode="reduce-overhead"`: Inductor's CUDA
graphs for the graphs attnlower hands it. The K/V pools are written in place by the model, so they are
marked static (`torch._dynamo.mark_static_address`, as HF's StaticCache does): CUDA graphs then keep them
in place instead of refusing a graph that mutates an input; the block table, lengths and write slots
are the per-step inputs.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnlower
from attnlower.cache import PagedKVCache, gather_blocks, length_mask


class PagedGQAAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x, k_pool, v_pool, block_table, seq_lens, slots):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv_heads, self.hd)
        v = self.v(x).view(B, T, self.kv_heads, self.hd)
        # write the new tokens' K/V into their slots: rows of the pool seen as [blocks*bs, Hkv, D]
        nb, hkv, bs, d = k_pool.shape
        for pool, new in ((k_pool, k), (v_pool, v)):
            slot_view = pool.permute(0, 2, 1, 3)          # [nb, bs, Hkv, D], a view: writes land in the pool
            slot_view[slots.flatten() // bs, slots.flatten() % bs] = new.reshape(B * T, hkv, d)
        keys, values = gather_blocks(k_pool, block_table), gather_blocks(v_pool, block_table)
        L = keys.shape[2]
        keep = length_mask(seq_lens, L)
        if T > 1:   # prefill: queries are the last T positions, causal within them
            pos = seq_lens[:, None] - T + torch.arange(T, device=x.device)[None, :]
            keep = keep & (torch.arange(L, device=x.device)[None, None, None, :] <= pos[:, None, :, None])
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = PagedGQAAttention(dim, heads, kv_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 3 * dim, bias=False), nn.SiLU(), nn.Linear(3 * dim, dim, bias=False))

    def forward(self, x, k_pool, v_pool, table, lens, slots):
        x = x + self.attn(self.n1(x), k_pool, v_pool, table, lens, slots)
        return x + self.mlp(self.n2(x))


class TinyLlama(nn.Module):
    def __init__(self, vocab=256, dim=128, heads=8, kv_heads=2, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, pools, table, lens, slots):
        x = self.emb(tokens)
        for blk, (kp, vp) in zip(self.blocks, pools):
            x = blk(x, kp, vp, table, lens, slots)
        return self.head(self.norm(x))


def run(model, fwd, prompt, steps, max_blocks, block_size, device):
    """Greedy decode; returns generated ids. `fwd` is the model or its compiled version."""
    B, T = prompt.shape
    cfg = model.blocks[0].attn
    caches = [PagedKVCache(num_blocks=B * max_blocks + 4, block_size=block_size, num_kv_heads=cfg.kv_heads,
                           head_dim=cfg.hd, dtype=torch.float32, device=device) for _ in model.blocks]
    for c in caches:   # written in place every step: static addresses for CUDA graphs (--cuda-graphs)
        torch._dynamo.mark_static_address(c.k_pool)
        torch._dynamo.mark_static_address(c.v_pool)
    seqs = [caches[0].add_sequence() for _ in range(B)]
    for c in caches[1:]:
        assert [c.add_sequence() for _ in range(B)] == seqs
    pools = [(c.k_pool, c.v_pool) for c in caches]

    def reserve(n):
        # allocate blocks for n more tokens per sequence (the model writes the values itself)
        zeros = torch.zeros(B, cfg.kv_heads, n, cfg.hd, device=device)
        for c in caches:
            c.append(seqs, zeros, zeros)
        lens = caches[0].seq_lens(seqs).to(device)
        table = caches[0].block_table(seqs, max_blocks=max_blocks).to(device)
        pos = lens[:, None] - n + torch.arange(n, device=device)[None, :]
        blocks = torch.gather(table.long(), 1, pos // block_size)
        return table, lens, (blocks * block_size + pos % block_size).to(torch.int64)

    table, lens, slots = reserve(T)
    logits = fwd(prompt, pools, table, lens, slots)
    out = [logits[:, -1].argmax(-1)]
    for _ in range(steps - 1):
        table, lens, slots = reserve(1)
        logits = fwd(out[-1][:, None], pools, table, lens, slots)
        out.append(logits[:, -1].argmax(-1))
    return torch.stack(out, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--inner", choices=["eager", "inductor"], default="eager")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cuda-graphs", action="store_true", help="Inductor CUDA graphs (needs --inner inductor)")
    a = p.parse_args(argv)
    if a.cuda_graphs and (a.inner != "inductor" or not a.device.startswith("cuda")):
        p.error("--cuda-graphs needs --inner inductor and a CUDA device")
    torch.manual_seed(0)
    model = TinyLlama().to(a.device).eval()
    max_blocks = -(-(a.prompt_len + a.steps) // a.block_size)
    prompt = torch.randint(0, 256, (a.batch, a.prompt_len), device=a.device)
    with torch.no_grad():
        ref = run(model, model, prompt, a.steps, max_blocks, a.block_size, a.device)
        torch._dynamo.reset()
        from attnlower.compiler import backend

        start = len(backend.reports())
        options = {"inner": a.inner, "mode": "reduce-overhead" if a.cuda_graphs else "default"}
        compiled = torch.compile(model, backend="attnlower", options=options)
        t0 = time.perf_counter()
        got = run(model, compiled, prompt, a.steps, max_blocks, a.block_size, a.device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(model, compiled, prompt, a.steps, max_blocks, a.block_size, a.device)
        steady = time.perf_counter() - t0
    reports = backend.reports()[start:]
    for r in reports:
        print(r.table())
    ops = [s.op for r in reports for s in r.sites]
    print(f"\ngraphs compiled: {len(reports)} (one prefill, one decode step: no recompile per step)")
    print(f"tokens/s (batch {a.batch}, {a.steps} tokens each, second run, {a.device}, inner={a.inner}): "
          f"{a.batch * a.steps / steady:.1f}   [first run incl. compile: {first:.1f} s]")
    same = torch.equal(got, ref)
    print(f"generated ids equal eager: {same}")
    ok = same and len(reports) == 2 and "paged_attention" in ops
    if not ok:
        print("FAILED: expected identical tokens, 2 graphs, and paged_attention in the decode graph")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
