"""The walk from an anchor (passes/anchors.py, score_chain.py, through resolve_kv): what it proves about the
scores, the products and the operands, on the graphs the backend sees; and the sites it must refuse."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlower.passes.site import AttentionMatch
from helpers import B, H, T, D, found_sites, qkv


def only_match(fn, *args, **kw) -> AttentionMatch:
    found = found_sites(fn, *args, **kw)
    assert len(found) == 1, found
    assert found[0].match is not None, found[0].refusal
    return found[0].match


def test_manual_causal_with_div_scale():
    def f(q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        m = torch.tril(torch.ones(T, T, dtype=torch.bool))
        return torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v

    m = only_match(f, *qkv())
    assert m.scale == pytest.approx(D ** -0.5)
    assert [(t.kind, t.value) for t in m.terms] == [("fill", float("-inf"))]


def test_scale_split_between_q_and_k_and_gqa_repeat():
    def f(q, k, v):
        k = k[:, :, None].expand(B, 2, 2, T, D).reshape(B, 4, T, D)
        v = torch.repeat_interleave(v, 2, dim=1)
        return torch.softmax((q * 0.5) @ (k.transpose(2, 3) * 0.5), -1) @ v

    q, k, v = qkv(hkv=2)
    m = only_match(f, q, k, v)
    assert m.scale == pytest.approx(0.25)
    assert m.kv_heads == 2 and m.k.source.name.startswith("arg") and m.v.source.name.startswith("arg")


def test_bshd_einsum_without_copies():
    def f(x, k, v):
        q = x.view(B, T, H, D).transpose(1, 2)
        s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.25
        return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, -1), v)

    m = only_match(f, torch.randn(B, T, H * D), *qkv()[1:])
    assert ("permute", [0, 2, 1, 3]) in m.q.steps


def test_baddbmm_on_flattened_heads():
    def f(q, k, v):
        q3, k3, v3 = (x.reshape(B * H, T, D) for x in (q, k, v))
        p = torch.softmax(torch.baddbmm(torch.zeros(B * H, T, T), q3, k3.transpose(1, 2), beta=0, alpha=0.25), -1)
        return torch.bmm(p, v3)

    m = only_match(f, *qkv())
    assert m.scale == pytest.approx(0.25) and m.output_steps == (("flatten", (0, 1)),)


def test_softcap_recognized():
    def f(q, k, v):
        s = torch.tanh((q @ k.transpose(-1, -2)) * 0.25 / 30.0) * 30.0
        return torch.softmax(s, -1) @ v

    m = only_match(f, *qkv())
    assert m.softcap == pytest.approx(30.0) and m.scale == pytest.approx(0.25)


def test_sdpa_arguments_read():
    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)

    m = only_match(f, *qkv(), torch.randn(T, T))
    assert m.scale == pytest.approx(0.3) and m.terms[0].kind == "bias" and m.safe_softmax


@pytest.mark.parametrize("case", ["probs_returned", "softmax_dim0", "scores_reused", "scaled_v_by_tensor"])
def test_negative_sites_are_refused_with_a_reason(case):
    def probs_returned(q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2), -1)
        return p @ v, p

    def softmax_dim0(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), 0) @ v

    def scores_reused(q, k, v):
        s = q @ k.transpose(-1, -2)
        return torch.softmax(s, -1) @ v + s.sum()

    def scaled_v_by_tensor(q, k, v):
        # a multiplier that is data and varies over the keys (a scalar one is folded into q: test_head_scale)
        s = q @ k.transpose(-1, -2)
        return torch.softmax(s * k.mean(-1).unsqueeze(-2), -1) @ v

    fn = locals()[case]
    found = found_sites(fn, *qkv())
    assert found and all(s.match is None for s in found)
    assert all(s.refusal for s in found)


def test_symbolic_sizes_survive():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v

    m = found_sites(f, *qkv(), dynamic=True)[0].match
    assert isinstance(m, AttentionMatch) and not isinstance(m.q_len, int)
