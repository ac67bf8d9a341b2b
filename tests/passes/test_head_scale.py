"""A learned per-head temperature on the scores (SwinV2's cosine attention, XCiT, timm's `[H, 1, 1]`
parameters) is folded into q: the site is fused, outputs and gradients (the parameter's included) equal
eager. A multiplier that varies over query or key positions, or one applied after a mask, stays unfused."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnlower
from helpers import assert_matches_eager, compiled_sites

B, H, T, D = 2, 4, 8, 16


def _grads(module, x, run=None):
    """(output, x's grad, every parameter's grad) of `run(x)` (`module` itself unless given, e.g. compiled)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = (module if run is None else run)(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def check_fused_with_grads(module, x, inner="eager", rtol=1e-5):
    """`module(x)` compiled: one site rewritten into flash_attention, output and every gradient equal eager."""
    want, want_dx, want_dp = _grads(module, x)
    torch._dynamo.reset()
    from attnlower.compiler import backend
    start = len(backend.reports())
    compiled = torch.compile(module, backend="attnlower", options={"inner": inner, "strict": True})
    got, got_dx, got_dp = _grads(module, x, compiled)
    reports = backend.reports()[start:]
    assert not [r.error for r in reports if r.error]
    sites = [s for r in reports for s in r.sites]
    assert [s.op for s in sites] == ["flash_attention"], [(s.op, s.reason) for s in sites]
    assert "folded into q" in sites[0].reason, sites[0].reason
    assert_matches_eager(got, want, rtol)
    assert_matches_eager(got_dx, want_dx, rtol)
    assert want_dp.keys() == got_dp.keys()
    for name in want_dp:
        assert_matches_eager(got_dp[name], want_dp[name], rtol)
    return sites[0]


class SwinV2WindowAttention(nn.Module):
    """timm's swin_transformer_v2.WindowAttention: cosine attention with a clamped, exponentiated
    per-head logit scale and a continuous relative position bias (an MLP over log-spaced coordinates)."""

    def __init__(self, dim=64, window=(4, 4), num_heads=H, rel_bias=True):
        super().__init__()
        self.num_heads, self.window, self.rel_bias = num_heads, window, rel_bias
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand((num_heads, 1, 1)) + 0.5))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 32, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(32, num_heads, bias=False))
        rh = torch.arange(-(window[0] - 1), window[0], dtype=torch.float32)
        rw = torch.arange(-(window[1] - 1), window[1], dtype=torch.float32)
        table = torch.stack(torch.meshgrid([rh, rw], indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
        table[:, :, :, 0] /= window[0] - 1
        table[:, :, :, 1] /= window[1] - 1
        table *= 8
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
        self.register_buffer("relative_coords_table", table, persistent=False)
        coords = torch.stack(torch.meshgrid([torch.arange(window[0]), torch.arange(window[1])], indexing="ij"))
        flat = torch.flatten(coords, 1)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window[0] - 1
        rel[:, :, 1] += window[1] - 1
        rel[:, :, 0] *= 2 * window[1] - 1
        self.register_buffer("relative_position_index", rel.sum(-1), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B_, N, C = x.shape
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1))
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()
        attn = attn * logit_scale
        if self.rel_bias:
            bias_table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
            bias = bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
            bias = 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())
            attn = attn + bias.unsqueeze(0)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj(x)


class XCA(nn.Module):
    """timm's xcit.XCA, cross-covariance attention: the "queries" and "keys" are the channels of a head
    and the contraction runs over the tokens, so it is attention with Tq = Tk = C/H and head dim N."""

    def __init__(self, dim=64, num_heads=H):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.linspace(0.5, 2.0, num_heads).reshape(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)   # [B, H, C/H, N]
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = attn.softmax(dim=-1)
        x = (attn @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        return self.proj(x)


class TimmHeadTemperature(nn.Module):
    """A timm-style Attention with a learned `[H, 1, 1]` temperature dividing the scaled scores,
    and one whose sign is negative for some heads (folding into q needs no positive scale)."""

    def __init__(self, dim=64, num_heads=H, divide=False, init=None):
        super().__init__()
        self.num_heads, self.head_dim, self.divide = num_heads, dim // num_heads, divide
        self.scale = self.head_dim ** -0.5
        self.temp = nn.Parameter(init if init is not None else torch.ones(num_heads, 1, 1) * 1.5)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn / self.temp if self.divide else attn * self.temp
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


def test_swinv2_cosine_attention_with_relative_position_bias():
    torch.manual_seed(0)
    check_fused_with_grads(SwinV2WindowAttention(), torch.randn(3, 16, 64))


def test_swinv2_cosine_attention_without_bias():
    torch.manual_seed(1)
    site = check_fused_with_grads(SwinV2WindowAttention(rel_bias=False), torch.randn(3, 16, 64))
    assert site.mask == "none"


def test_swinv2_through_inductor():
    torch.manual_seed(2)
    check_fused_with_grads(SwinV2WindowAttention(), torch.randn(2, 16, 64), inner="inductor", rtol=1e-4)


def test_xcit_temperature_over_channels():
    # 16 channels per head attend to each other; the head dim of the fused op is the token count N
    torch.manual_seed(3)
    check_fused_with_grads(XCA(), torch.randn(2, 24, 64))


def test_xcit_with_more_tokens_than_a_head_holds_is_refused_for_its_head_dim():
    # N = 300 tokens is the op's head dim: above what the kernels keep in registers
    torch.manual_seed(4)
    module, x = XCA(), torch.randn(1, 300, 64)
    _, sites = compiled_sites(module, x)
    assert [s.op for s in sites] == [None]
    assert "head dim 300 > 256" in sites[0].reason, sites[0].reason


@pytest.mark.parametrize("divide", [False, True])
def test_timm_head_temperature(divide):
    torch.manual_seed(5)
    check_fused_with_grads(TimmHeadTemperature(divide=divide), torch.randn(2, T, 64))


def test_negative_per_head_scale():
    # heads with a negative temperature attend to the least similar keys; q * scale_h computes the same
    torch.manual_seed(6)
    init = torch.tensor([1.0, -2.0, 0.5, -0.25]).reshape(H, 1, 1)
    check_fused_with_grads(TimmHeadTemperature(init=init), torch.randn(2, T, 64))


def test_scalar_learned_temperature_and_1h11_parameter():
    torch.manual_seed(7)
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    for t in (torch.tensor([0.7]), torch.tensor(1.3), torch.linspace(-1, 2, H).reshape(1, H, 1, 1)):
        fn = lambda q, k, v, t: torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5 * t, -1) @ v  # noqa: E731
        want = fn(q, k, v, t)
        got, sites = compiled_sites(fn, q, k, v, t)
        assert [s.op for s in sites] == ["flash_attention"], [s.reason for s in sites]
        assert_matches_eager(got, want)


def test_scalar_multiplier_computed_from_k_is_folded():
    # `s * k.mean()`: a data scalar, the same for every head, query and key; q * k.mean() is exact
    torch.manual_seed(12)
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    fn = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * k.mean(), -1) @ v  # noqa: E731
    got, sites = compiled_sites(fn, q, k, v)
    assert [s.op for s in sites] == ["flash_attention"], [s.reason for s in sites]
    assert_matches_eager(got, fn(q, k, v))


def test_inspect_reports_the_site_rewritten():
    torch.manual_seed(8)
    reports = attnlower.inspect(TimmHeadTemperature(), torch.randn(2, T, 64), options={"inner": "eager"})
    sites = [s for r in reports for s in r.sites]
    assert len(sites) == 1 and sites[0].rewritten, [(s.op, s.reason) for s in sites]
    assert "per-head scale" in sites[0].reason and "folded into q" in sites[0].reason


# ---- near misses: stay unfused with a reason, and equal eager --------------------------------

def _unfused(fn, *args, reason):
    import re
    want = fn(*args)
    got, sites = compiled_sites(fn, *args)
    assert_matches_eager(got, want)
    assert sites and all(s.op is None for s in sites), [(s.op, s.reason) for s in sites]
    assert any(re.search(reason, s.reason) for s in sites), [s.reason for s in sites]


@pytest.mark.parametrize("shape", [(H, T, 1), (1, 1, 1, T), (T,)])
def test_multiplier_varying_over_positions_stays_unfused(shape):
    # (T,) with as many heads as keys: a vector the length of H broadcasts against the keys, not the heads
    torch.manual_seed(9)
    heads = T if shape == (T,) else H
    q, k, v = (torch.randn(B, heads, T, D) for _ in range(3))
    t = torch.rand(shape) + 0.5
    _unfused(lambda q, k, v, t: torch.softmax(q @ k.transpose(-2, -1) * t, -1) @ v, q, k, v, t,
             reason="varies over the query or key positions")


def test_multiplier_varying_over_batch_stays_unfused():
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    t = torch.rand(B, 1, 1, 1) + 0.5
    _unfused(lambda q, k, v, t: torch.softmax(q @ k.transpose(-2, -1) * t, -1) @ v, q, k, v, t,
             reason="only a per-head")


def test_multiplier_after_a_mask_fill_stays_unfused():
    # masked_fill(-inf) then * t: a negative t turns the fill into +inf; the fold would change it
    torch.manual_seed(10)
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    t = torch.linspace(0.5, 2.0, H).reshape(H, 1, 1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def fn(q, k, v, t, m):
        s = (q @ k.transpose(-2, -1)).masked_fill(~m, float("-inf")) * t
        return torch.softmax(s, -1) @ v

    _unfused(fn, q, k, v, t, causal, reason="before they are multiplied by")


def test_multiplier_after_a_bias_stays_unfused_and_before_it_fuses():
    torch.manual_seed(11)
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    t = torch.linspace(0.5, 2.0, H).reshape(H, 1, 1)
    bias = torch.randn(1, H, T, T)
    _unfused(lambda q, k, v, t, b: torch.softmax((q @ k.mT + b) * t, -1) @ v, q, k, v, t, bias,
             reason="before they are multiplied by")
    fn = lambda q, k, v, t, b: torch.softmax(q @ k.mT * t + b, -1) @ v  # noqa: E731
    got, sites = compiled_sites(fn, q, k, v, t, bias)
    assert [s.op for s in sites] == ["flash_attention"], [s.reason for s in sites]
    assert_matches_eager(got, fn(q, k, v, t, bias))


def test_multiplier_outside_a_softcap_stays_unfused():
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    t = torch.linspace(0.5, 2.0, H).reshape(H, 1, 1)
    _unfused(lambda q, k, v, t: torch.softmax(torch.tanh(q @ k.mT / 30.0) * 30.0 * t, -1) @ v, q, k, v, t,
             reason="softcap")


def test_per_head_scale_under_dynamic_shapes():
    # symbolic heads: the [H, 1, 1] parameter's H is the same symbol as the scores' head dim
    torch.manual_seed(13)
    fn = lambda q, k, v, t: torch.softmax(q @ k.mT * 0.25 * t, -1) @ v  # noqa: E731
    t = torch.randn(H, 1, 1)
    for b, tq in ((2, T), (3, T + 2)):
        q, k, v = (torch.randn(b, H, tq, D) for _ in range(3))
        got, sites = compiled_sites(fn, q, k, v, t, dynamic=True)
        assert [s.op for s in sites] == ["flash_attention"], [s.reason for s in sites]
        assert_matches_eager(got, fn(q, k, v, t))
