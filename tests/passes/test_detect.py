"""Detection, layout algebra and paged-gather recognition, checked on the graphs the backend sees."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlower
from attnlower.passes.layout import Layout, NotAView
from attnlower.passes.site import AttentionMatch
from helpers import B, H, T, D, found_sites, qkv


# ---- layout algebra -----------------------------------------------------------------------------

def test_layout_repeat_kv_is_a_head_broadcast():
    # [B, Hkv, T, D] -> unsqueeze(2) -> expand(B, Hkv, 2, T, D) -> reshape(B, 2*Hkv, T, D)
    lay = Layout.contiguous([2, 3, 5, 7]).unsqueeze(2).expand([2, 3, 2, 5, 7]).reshape([2, 6, 5, 7])
    assert lay.clean(1) == [(3, 35), (2, 0)]   # head h reads source head h // 2
    assert lay.clean(2) == [(5, 7)] and lay.clean(3) == [(7, 1)]


def test_layout_repeat_is_not_a_group_broadcast():
    # x.repeat-like order (group outer, heads inner): head h reads h % Hkv, not a GQA group
    lay = Layout.contiguous([2, 3, 5, 7]).unsqueeze(1).expand([2, 2, 3, 5, 7]).reshape([2, 6, 5, 7])
    assert lay.clean(1) == [(2, 0), (3, 35)]


def test_layout_reshape_that_is_not_a_view_raises():
    lay = Layout.contiguous([4, 6]).transpose(0, 1)      # [6, 4] with strides (1, 6)
    assert lay.reshape([24]).clean(0) != [(24, 1)]         # flattening a transpose is no longer contiguous
    with pytest.raises(NotAView):
        Layout.contiguous([4, 6]).reshape([5, 5])


def test_layout_matches_torch_on_random_chains():
    # the algebra's index map equals torch's for a chain of views on an index tensor
    src = torch.arange(2 * 3 * 4 * 5).view(2, 3, 4, 5)
    x = src.permute(0, 2, 1, 3).reshape(2, 4, 15).unsqueeze(1).expand(2, 2, 4, 15)
    lay = Layout.contiguous([2, 3, 4, 5]).permute([0, 2, 1, 3]).reshape([2, 4, 15]).unsqueeze(1).expand([2, 2, 4, 15])
    for idx in [(1, 0, 3, 14), (0, 1, 2, 7), (1, 1, 0, 0)]:
        flat = 0
        for k, i in enumerate(idx):
            rem = i
            subs = lay.dims[k]
            for j, (size, stride) in enumerate(subs):
                inner = math.prod(s for s, _ in subs[j + 1:])
                flat += (rem // inner) * stride
                rem = rem % inner
        assert flat == x[idx].item()


# ---- detection ----------------------------------------------------------------------------------

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


# ---- paged gathers ------------------------------------------------------------------------------

NB, BS, MAXB, HKV = 12, 8, 3, 2


def paged_inputs():
    kp, vp = torch.randn(NB, HKV, BS, D), torch.randn(NB, HKV, BS, D)
    table = torch.randperm(NB)[: B * MAXB].view(B, MAXB).to(torch.int32)
    lens = torch.tensor([13, 24], dtype=torch.int32)
    return torch.randn(B, H, 1, D), kp, vp, table, lens


def _gather(pool, table):
    return pool[table.long()].permute(0, 2, 1, 3, 4).reshape(B, HKV, MAXB * BS, D)


def paged_sdpa(q, kp, vp, table, lens):
    mask = torch.arange(MAXB * BS)[None, None, None, :] < lens[:, None, None, None]
    return F.scaled_dot_product_attention(q, _gather(kp, table), _gather(vp, table), attn_mask=mask, enable_gqa=True)


def paged_manual_index_select(q, kp, vp, table, lens):
    k = kp.index_select(0, table.long().flatten()).view(B, MAXB, HKV, BS, D).transpose(1, 2).reshape(B, HKV, MAXB * BS, D)
    k, v = k.repeat_interleave(2, dim=1), _gather(vp, table).repeat_interleave(2, dim=1)
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(torch.arange(MAXB * BS).view(1, 1, 1, -1) >= lens.view(-1, 1, 1, 1), float("-inf"))
    return s.softmax(-1) @ v


def paged_no_mask(q, kp, vp, table, lens):
    return F.scaled_dot_product_attention(q, _gather(kp, table), _gather(vp, table), enable_gqa=True)


def paged_cache_helpers(q, kp, vp, table, lens):
    from attnlower.cache import gather_blocks, length_mask

    k, v = gather_blocks(kp, table), gather_blocks(vp, table)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=length_mask(lens, k.shape[2]), enable_gqa=True)


@pytest.mark.parametrize("fn", [paged_sdpa, paged_manual_index_select, paged_no_mask, paged_cache_helpers])
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_paged_gathers_become_paged_attention(fn, inner):
    if inner == "inductor" and fn is not paged_sdpa:
        pytest.skip("one spelling through Inductor is enough for the CPU suite")
    args = paged_inputs()
    ref = fn(*args)
    reports = attnlower.inspect(fn, *args, options={"inner": inner, "strict": True})
    assert [s.op for r in reports for s in r.sites] == ["paged_attention"]
    out = torch.compile(fn, backend="attnlower", options={"inner": inner})(*args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_empty_sequence_keeps_eager_nan():
    # eager softmax over a row of -inf is NaN: the paged rewrite must give NaN there too, not 0
    q, kp, vp, table, _ = paged_inputs()
    lens = torch.tensor([0, 24], dtype=torch.int32)
    ref = paged_manual_index_select(q, kp, vp, table, lens)
    out = torch.compile(paged_manual_index_select, backend="attnlower", options={"inner": "eager"})(q, kp, vp, table, lens)
    assert torch.isnan(ref[0]).all() and torch.isnan(out[0]).all()
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)


def test_paged_with_dropout_falls_back_to_dense_with_a_reason():
    def f(q, kp, vp, table, lens):
        return F.scaled_dot_product_attention(q, _gather(kp, table), _gather(vp, table), dropout_p=0.5,
                                              enable_gqa=True)

    reports = attnlower.inspect(f, *paged_inputs(), options={"inner": "eager"})
    (site,) = [s for r in reports for s in r.sites]
    assert site.op == "flash_attention" and "dropout on a paged cache" in site.reason
