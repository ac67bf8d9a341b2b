"""Issue 22, class 3: masks and biases added through a re-batched view of the scores.

Windowed vision attention (Swin, Swin-V2, Video Swin) computes scores `[B*nW, H, N, N]`, views them
`[B, nW, H, N, N]` to add the shifted-window mask `[nW, 1, N, N]` (broadcast over the images), and views
them back. Under that view the mask is still a bias of the `[B*nW, H, N, N]` problem: `mask[b % nW]`.
The analysis must lift it through the views (no refusal for the scores' extra dim), so the site is fused,
with gradients to the relative-position table (and, for V2, to the learned logit scale).

Swin's mask holds 0 and -100.0: a finite *bias* (exp(-100) is not 0 in fp32), not a mask; it must stay
additive. Nothing is skipped: these fail until issue 22 lands (docs/design/issue22.md, class 3).
"""
from __future__ import annotations

import pytest
import torch

import spellings_issue22 as S

FLASH = "flash_attention"


def fused(sites):
    site = S.only(sites)
    S.assert_site(site, FLASH, bias_kind="float")
    return site


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_timm_window_attention(inner):
    torch.manual_seed(0)
    _, sites = S.check_forward(S.TimmWindowAttention().eval(), S.windows(), inner=inner)
    fused(sites)


def test_timm_window_attention_gradients():
    torch.manual_seed(0)
    model = S.TimmWindowAttention().train()
    sites = S.check_training(model, S.windows(requires_grad=True))
    fused(sites)


def test_hf_swin_v4_self_attention():
    torch.manual_seed(0)
    model = S.HFSwinSelfAttention().train()
    sites = S.check_training(model, S.windows(requires_grad=True), S.shifted_window_mask())
    fused(sites)


def test_timm_swin_v2_cosine_attention():
    """The learned `logit_scale [H, 1, 1]` is a per-head scale (folded into q, tests/passes/test_head_scale.py)
    and the re-batched mask is a bias on top: both at once."""
    torch.manual_seed(0)
    model = S.TimmWindowAttentionV2().train()
    sites = S.check_training(model, S.windows(requires_grad=True), S.shifted_window_mask())
    fused(sites)


def test_window_mask_for_a_different_window_count():
    """The same layer on a batch whose window count is not the mask's: `view(-1, nW, ...)` of 8 windows
    with a 2-window mask regroups the batch as [4, 2]; the lifted bias is `mask[b % 2]`, whatever B is."""
    torch.manual_seed(0)
    model = S.HFSwinSelfAttention().eval()
    mask = S.shifted_window_mask()[:2]
    _, sites = S.check_forward(model, S.windows(), mask)
    fused(sites)


def rebatched_causal(q, k, v):
    """A -inf mask (not a bias) under a re-batched view: the causal mask of a window, added per window
    group. Lifted, it is a causal mask of the problem (blocks skipped), not a dense bias."""
    bnw, h, n, _ = q.shape
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.full((n, n), float("-inf")).triu(1)
    s = s.view(-1, S.N_WIN, h, n, n) + causal.view(1, 1, 1, n, n)
    s = s.view(-1, h, n, n)
    return s.softmax(-1) @ v


def test_causal_mask_through_the_view_is_causal():
    q, k, v = (S.randn(S.B * S.N_WIN, S.SWIN_HEADS, S.N_TOK, S.D, seed=i) for i in range(3))
    _, sites = S.check_forward(rebatched_causal, q, k, v)
    S.assert_site(S.only(sites), FLASH, mask="causal", causal=True, bias_kind="none")


def merged_batch_bias(q, k, v, bias):
    """A per-(batch, head) bias added while the scores are viewed `[B * H, T, T]` (fairseq / BART style), then
    viewed back: a merge of the batch dims, the converse of Swin's split."""
    b, h, t, _ = q.shape
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = (s.view(b * h, t, t) + bias).view(b, h, t, t)
    return s.softmax(-1) @ v


def test_bias_under_a_merged_view_is_a_bias_of_the_problem():
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i, requires_grad=True) for i in range(3))
    bias = S.randn(S.B * S.H, 1, S.T, seed=9, requires_grad=True)       # one bias per (b, h) and key
    sites = S.check_training(S.FnModule(merged_batch_bias), q, k, v, bias)
    S.assert_site(S.only(sites), FLASH, bias_kind="float")


def test_window_mask_under_the_view_with_dynamic_shapes():
    """dynamic=True: the batch of windows is symbolic; the lifted bias is built from its symbolic size."""
    torch.manual_seed(0)
    model = S.HFSwinSelfAttention().eval()
    compiled, sites = S.check_forward(model, S.windows(), S.shifted_window_mask(), dynamic=True)
    fused(sites)
    x = S.randn(3 * S.N_WIN, S.N_TOK, S.SWIN_DIM, seed=5)
    S.assert_matches_eager(compiled(x, S.shifted_window_mask()), model(x, S.shifted_window_mask()), what="B=3")
