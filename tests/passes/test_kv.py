"""K/V resolution (passes/kv.py): q, k and v traced to the tensors the fused op reads.

`resolve_operand` sees through the spellings models use between the projections and the products
(HF's `repeat_kv`, `repeat_interleave`, nanoGPT's BSHD view + transpose, timm's `q * scale`) and must
not see through what is not a view; `resolve_paged` reads a block-table gather of a KV pool (vLLM-style
`k_cache[block_table]`, `index_select`) as the pool and its table. Then the paged spellings end to end.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import attnlower
from attnlower.passes.kv import paged_pair, resolve_operand, resolve_paged
from attnlower.passes.layout import NotAView
from attnlower.passes.site import Operand
from attnlower.passes.canonicalize import to_aten
from attnlower.report.names import argument_names
from helpers import B, H, T, D, found_sites, qkv


def _sdpa_operands(fn, *args) -> tuple[fx.Node, fx.Node, fx.Node, dict[str, fx.Node]]:
    """q, k, v as the (one) SDPA call of `fn`'s aten graph receives them, and the graph's inputs by the
    names `fn` gave its arguments."""
    graphs = []

    def capture(gm, example_inputs):
        aten = to_aten(gm, example_inputs)
        names = argument_names(aten, gm)
        graphs.append((aten, {names[p.name]: p for p in aten.graph.nodes if p.op == "placeholder"}))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture)(*args)
    ((gm, inputs),) = graphs
    (call,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    return call.args[0], call.args[1], call.args[2], inputs


def as_is(layout):
    """SDPA's operands are already the logical [B, H, T, D]."""
    return layout


# ---- resolve_operand ----------------------------------------------------------------------------

def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    # transformers' Llama / Mistral `repeat_kv`, as written there
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def test_hf_repeat_kv_resolves_to_the_unrepeated_heads():
    def llama(q, k, v):
        return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2))

    q, k, v, inputs = _sdpa_operands(llama, *qkv(hkv=2))
    kref, vref = resolve_operand(k, as_is, "kv"), resolve_operand(v, as_is, "v")
    assert (kref.source, kref.heads, kref.steps, kref.scale) == (inputs["k"], 2, (), 1.0)
    assert (vref.source, vref.heads) == (inputs["v"], 2)


def test_repeat_interleave_is_a_gqa_group_too():
    # the GQA reference in PyTorch's own SDPA docs: key.repeat_interleave(Hq // Hkv, -3)
    def gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(2, -3), v.repeat_interleave(2, -3))

    _, k, _, inputs = _sdpa_operands(gqa, *qkv(hkv=2))
    ref = resolve_operand(k, as_is, "kv")
    assert ref.source is inputs["k"] and ref.heads == 2


def test_heads_repeated_outer_are_not_a_gqa_group():
    # `k.repeat(1, 2, 1, 1)` puts head h at h % Hkv, not h // group: the op's GQA would read the wrong head
    def tiled(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1))

    _, k, _, inputs = _sdpa_operands(tiled, *qkv(hkv=2))
    ref = resolve_operand(k, as_is, "kv")
    assert ref.source is not inputs["k"] and ref.heads == H


def test_nanogpt_bshd_view_is_read_in_place_with_a_permute():
    # nanoGPT: k = k.view(B, T, n_head, C // n_head).transpose(1, 2)
    def nanogpt(x, k, v):
        q = x.view(B, T, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, _, _, _ = _sdpa_operands(nanogpt, torch.randn(B, T, H * D), *qkv()[1:])
    ref = resolve_operand(q, as_is, "q")
    # the [B, T, H * D] input itself, its last dim split into the heads: views only, no copy
    assert ref.steps == (("unflatten", (2, [H, D])), ("permute", [0, 2, 1, 3]))
    assert ref.source.op == "placeholder" and list(ref.source.meta["val"].shape) == [B, T, H * D]


def test_a_sequence_first_input_split_into_heads_is_read_in_place():
    # fairseq: q.view(T, B * H, D).transpose(0, 1) of a [T, B, E] input, heads from the [B, H, T, S] view
    def fairseq(x, k, v):
        q = x.view(T, B * H, D).transpose(0, 1)
        s = torch.bmm(q, k.reshape(B * H, T, D).transpose(1, 2)).view(B, H, T, T).view(B * H, T, T)
        return torch.bmm(s.softmax(-1), v.reshape(B * H, T, D))

    (site,) = found_sites(fairseq, torch.randn(T, B, H * D), *qkv()[1:])
    ref = site.match.q
    assert ref.source.op == "placeholder" and list(ref.source.meta["val"].shape) == [T, B, H * D]
    assert ref.steps == (("unflatten", (2, [H, D])), ("permute", [1, 2, 0, 3])), ref.steps


def test_a_slice_of_a_dim_is_not_a_view_of_it():
    # q holds half of the features: the source's last dim is not tiled by the operand's head dim
    def half(x, k, v):
        q = x[..., :D].view(B, T, 1, D).transpose(1, 2).expand(B, H, T, D)
        return F.scaled_dot_product_attention(q, k, v)

    x = torch.randn(B, T, 2 * D)
    (site,) = found_sites(half, x, *qkv()[1:])
    assert site.match.q.source.op != "placeholder"      # read from the slice, not from x


def test_a_query_scale_is_taken_out_of_q_but_never_out_of_v():
    # timm's Attention: q = q * self.scale before q @ k.transpose(-2, -1)
    def timm(q, k, v):
        return F.scaled_dot_product_attention(q * 0.125, k, v * 3.0, scale=1.0)

    q, _, v, inputs = _sdpa_operands(timm, *qkv())
    qref, vref = resolve_operand(q, as_is, "q"), resolve_operand(v, as_is, "v")
    assert qref.source is inputs["q"] and qref.scale == 0.125
    assert vref.source is v and vref.scale == 1.0     # V's factor is not the scores' scale: the mul stays


def test_queries_broadcast_over_heads_are_not_seen_through():
    # one query head shared by all heads is not a layout the op's q takes: the expanded q stays the operand
    def shared_query(q, k, v):
        return F.scaled_dot_product_attention(q.expand(B, H, T, D), k, v)

    q, k, _, _ = _sdpa_operands(shared_query, qkv()[0][:, :1], *qkv()[1:])
    ref = resolve_operand(q, as_is, "q")
    assert ref.source is q and ref.heads == H


def test_a_real_slice_is_not_seen_through():
    # keys cut to their first 5 positions: the slice is the operand, not the whole cache
    def sliced(q, k, v):
        return F.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5])

    _, k, _, _ = _sdpa_operands(sliced, *qkv())
    assert resolve_operand(k, as_is, "kv").source is k


def test_an_operand_that_is_no_4d_view_raises():
    def too_many_batch_dims(lay):
        raise NotAView("operand has more batch dims than the product")

    _, k, _, _ = _sdpa_operands(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv())
    with pytest.raises(NotAView, match="not a view of a \\[B, H, T, D\\] tensor"):
        resolve_operand(k, too_many_batch_dims, "kv")


# ---- resolve_paged -------------------------------------------------------------------------------

NB, BS, MAXB, HKV = 12, 8, 3, 2


def paged_inputs():
    kp, vp = torch.randn(NB, HKV, BS, D), torch.randn(NB, HKV, BS, D)
    table = torch.randperm(NB)[: B * MAXB].view(B, MAXB).to(torch.int32)
    lens = torch.tensor([13, 24], dtype=torch.int32)
    return torch.randn(B, H, 1, D), kp, vp, table, lens


def _gather(pool, table):
    return pool[table.long()].permute(0, 2, 1, 3, 4).reshape(B, HKV, MAXB * BS, D)


def test_block_table_gather_reads_the_pool_in_place():
    _, k, v, inputs = _sdpa_operands(lambda q, kp, vp, table, lens: F.scaled_dot_product_attention(
        q, _gather(kp, table), _gather(vp, table), enable_gqa=True), *paged_inputs())
    ref = resolve_paged(k, as_is)
    assert (ref.pool, ref.table, ref.pool_perm) == (inputs["kp"], inputs["table"], (0, 1, 2, 3))  # .long() seen through
    assert (ref.heads, ref.block_size, ref.length, ref.scale) == (HKV, BS, MAXB * BS, 1.0)
    (pk, pv), paged_scale = paged_pair(Operand(k, as_is), Operand(v, as_is), 0.5)
    assert pv.pool is inputs["vp"] and pk.table is pv.table and paged_scale == 0.5


def test_vllm_pool_layout_is_permuted_not_copied():
    # vLLM's flash layout keeps a pool as [num_blocks, block_size, Hkv, D]
    def vllm(q, kp, vp, table, lens):
        # kp: [num_blocks, block_size, Hkv, D]; gathered [B, max_blocks, block_size, Hkv, D]
        k = kp[table.long()].permute(0, 3, 1, 2, 4).reshape(B, HKV, MAXB * BS, D)
        return F.scaled_dot_product_attention(q, k, _gather(vp, table), enable_gqa=True)

    q, kp, vp, table, lens = paged_inputs()
    _, k, _, inputs = _sdpa_operands(vllm, q, kp.permute(0, 2, 1, 3).contiguous(), vp, table, lens)
    ref = resolve_paged(k, as_is)
    assert ref is not None and ref.pool is inputs["kp"] and ref.pool_perm == (0, 2, 1, 3)


def test_index_select_of_the_flattened_table_is_a_gather_too():
    def flat(q, kp, vp, table, lens):
        k = kp.index_select(0, table.long().flatten()).view(B, MAXB, HKV, BS, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k.reshape(B, HKV, MAXB * BS, D), _gather(vp, table), enable_gqa=True)

    _, k, _, inputs = _sdpa_operands(flat, *paged_inputs())
    ref = resolve_paged(k, as_is)
    assert ref is not None and ref.table is inputs["table"] and ref.length == MAXB * BS


def test_no_gather_and_different_tables_are_not_paged():
    _, k, v, _ = _sdpa_operands(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv())
    assert resolve_paged(k, as_is) is None
    _, k, v, _ = _sdpa_operands(lambda q, kp, vp, table, lens: F.scaled_dot_product_attention(
        q, _gather(kp, table), _gather(vp, table.flip(0)), enable_gqa=True), *paged_inputs())
    assert resolve_paged(k, as_is) is not None
    assert paged_pair(Operand(k, as_is), Operand(v, as_is), 1.0) == (None, 0.0)   # V through another table


# ---- the paged spellings end to end --------------------------------------------------------------

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
