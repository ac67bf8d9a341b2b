"""Issue 22, class 4: transposed probabilities, scores with extra batch dims, flattening reshapes.

- Probabilities transposed before the product with V: taming-transformers' / latent-diffusion's `AttnBlock`
  (Stable Diffusion's VAE) computes `bmm(v, softmax(q @ k).permute(0, 2, 1))` giving `[B, C, HW]`;
  BigGAN's SAGAN block `bmm(g, beta.transpose(1, 2))`. `A @ Pᵀ` is `(P @ Aᵀ)ᵀ`: the op's output, transposed.
- Scores with extra batch dims: block-local attention `[B, H, nBlocks, Tb, Tb]`: fold the extra dims into
  the op's batch / heads.
- Operands through flattening reshapes: fairseq's `MultiheadAttention` splits heads with
  `view(T, B * H, D).transpose(0, 1)` from a sequence-first `[T, B, E]`; BLOOM reshapes a strided slice
  of `[B, T, H, 3, D]` to `[B * H, T, D]` (a copy); a head-fastest `(d h)` split.

Every spelling either fuses (the op reads the operands through their layout, the output gets the
layout steps back) or is refused with the exact reason; a refusal may never blame the layout. The
Slot Attention softmax over the *queries* must stay unfused. Nothing is skipped: the transposed and
5-D spellings and fairseq fail until issue 22 lands (docs/design/issue22.md, class 4).
"""
from __future__ import annotations

import re

import pytest
import torch

import spellings_issue22 as S

FLASH = "flash_attention"


# ---- probabilities transposed before the product with V ---------------------------------------------

@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_taming_attn_block(inner):
    torch.manual_seed(0)
    _, sites = S.check_forward(S.TamingAttnBlock().eval(), S.randn(S.B, 32, 6, 6), inner=inner)
    S.assert_site(S.only(sites), FLASH, mask="none")


def test_taming_attn_block_gradients():
    torch.manual_seed(0)
    sites = S.check_training(S.TamingAttnBlock().train(), S.randn(S.B, 32, 6, 6, requires_grad=True))
    S.assert_site(S.only(sites), FLASH)


def test_biggan_attention():
    """SAGAN's value head dim (C/2) differs from its query/key dim (C/8): that is issue 21's feature. Here
    the transposed probabilities must not be the obstacle: fused, or refused *only* for the V head dim."""
    torch.manual_seed(0)
    model = S.BigGANAttention().train()
    sites = S.check_training(model, S.randn(S.B, 64, 8, 8, requires_grad=True))
    site = S.only(sites)
    if site.op is None:
        assert re.search(r"V head dim .* differs", site.reason), S.describe(sites)
    else:
        S.assert_site(site, FLASH)


# ---- scores with extra batch dims ----------------------------------------------------------------------

@pytest.mark.parametrize("fn", [S.block_local_matmul, S.block_local_einsum], ids=["matmul", "einsum"])
def test_block_local_attention_five_dim_scores(fn):
    sites = S.check_training(S.FnModule(fn), *S.block_local_qkv(requires_grad=True))
    S.assert_site(S.only(sites), FLASH, mask="none")


def test_block_local_attention_with_shared_memory_keys():
    """Every block of a head reads the same `[B, H, 1, M, D]` memory keys (broadcast over the blocks):
    folded as heads `H * nBlocks` reading `H` K/V heads, i.e. GQA with a group of nBlocks."""
    q = S.randn(S.B, S.H, S.N_BLOCKS, S.BLOCK, S.D, seed=0)
    k, v = S.randn(S.B, S.H, 1, 12, S.D, seed=1), S.randn(S.B, S.H, 1, 12, S.D, seed=2)

    def memory_attention(q, k, v):
        return ((q @ k.transpose(-1, -2)) * S.D ** -0.5).softmax(-1) @ v

    _, sites = S.check_forward(memory_attention, q, k, v)
    S.assert_site(S.only(sites), FLASH, mask="none")


# ---- operands through flattening reshapes ---------------------------------------------------------------

def test_fairseq_multihead_attention():
    torch.manual_seed(0)
    model = S.FairseqMultiheadAttention().train()
    sites = S.check_training(model, S.randn(S.T, S.B, S.HIDDEN, requires_grad=True), S.padding_mask() == 0)
    S.assert_site(S.only(sites), FLASH, mask="padding")


def test_hf_bloom_model():
    """The real transformers BLOOM: `[B, T, H, 3, D]` slices reshaped (copied) to `[B * H, T, D]`, ALiBi
    through `alibi.baddbmm`, the mask added in a `[B, H, Tq, Tk]` view."""
    model = S.bloom_model()
    ids = torch.randint(0, 128, (S.B, S.T), generator=torch.Generator().manual_seed(0))
    _, sites = S.check_forward(lambda ids: model(input_ids=ids, use_cache=False).last_hidden_state, ids)
    assert len(sites) == 2 and all(s.op == FLASH for s in sites), S.describe(sites)


def test_head_fastest_split():
    w = S.randn(3, S.HIDDEN, S.HIDDEN, seed=5) * 0.1
    _, sites = S.check_forward(S.interleaved_heads, S.randn(S.B, S.T, S.HIDDEN), w)
    S.assert_site(S.only(sites), FLASH, mask="none")


# ---- must stay unfused -----------------------------------------------------------------------------------

def test_slot_attention_softmax_over_slots_stays_unfused():
    ws = [S.randn(S.D, S.D, seed=10 + i) * 0.3 for i in range(3)]
    _, sites = S.check_forward(S.slot_attention_step, S.randn(S.B, S.T, S.D), S.randn(S.B, 5, S.D, seed=3), *ws)
    site = S.only(sites)
    assert site.op is None and "softmax is not over the last dim" in site.reason, S.describe(sites)


def causal_transposed_output(q, k, v):
    """`vᵀ @ Pᵀ`: a causal site whose output is [B, H, D, Tq] (X @ Pᵀ with X = vᵀ, so V = v)."""
    t = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return v.transpose(-1, -2) @ s.softmax(-1).transpose(-2, -1)


def test_transposed_probabilities_keep_their_mask():
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i, requires_grad=True) for i in range(3))
    sites = S.check_training(S.FnModule(causal_transposed_output), q, k, v)
    S.assert_site(S.only(sites), FLASH, mask="causal", causal=True, bias_kind="none")


def contraction_over_queries(q, k, v):
    """`Pᵀ @ V` sums over the queries (each key gathers the queries weighting it): not attention."""
    p = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
    return p.transpose(-2, -1) @ v


def test_transposed_probabilities_on_the_left_stay_unfused():
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i) for i in range(3))
    _, sites = S.check_forward(contraction_over_queries, q, k, v)
    site = S.only(sites)
    assert site.op is None and "rearranged" in site.reason, S.describe(sites)
