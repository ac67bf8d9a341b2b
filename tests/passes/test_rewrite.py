"""The rewrite stage's two steps called directly (passes/rewrite.py): `check_convex` on regions that
leak or re-enter, and `rewrite_site` on real spellings, checked by running the rewritten graph."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from attnlower.passes.canonicalize import to_aten
from attnlower.passes.rewrite import check_convex, graph_digraph, rewrite_site
from attnlower.passes.site import Refused
from attnlower.report.names import argument_names
from helpers import B, H, D, aten_graphs, qkv, run_stages_until

aten = torch.ops.aten
attnlower_ops = torch.ops.attnlower   # registered by the rewrite (attnlower.lowering.ops)


def _the(gm: fx.GraphModule, target) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.target is target]
    return node


# ---- check_convex ---------------------------------------------------------------------------------

def _scores_and_users(extra):
    """The aten graph of `s = x @ x.mT; p = s.softmax(-1)` plus `extra(s, p)`, and its (s, p) nodes."""
    def f(x):
        s = x @ x.mT
        p = s.softmax(-1)
        return p, extra(s, p)

    (gm,) = aten_graphs(f, torch.randn(2, 5, 4))
    return gm, _the(gm, aten.matmul.default), _the(gm, aten._softmax.default if any(
        n.target is aten._softmax.default for n in gm.graph.nodes) else aten.softmax.int)


def test_a_region_whose_inner_value_is_read_outside_is_refused():
    gm, s, p = _scores_and_users(lambda s, p: s.sum())
    with pytest.raises(Refused, match=f"{s.name} is used outside the attention"):
        check_convex(graph_digraph(gm), [s, p], p)


def test_a_side_computation_that_feeds_back_in_is_refused_where_it_leaves():
    def f(x):
        s = x @ x.mT
        t = torch.relu(s)            # outside the region, and read by the region again
        return (s + t).softmax(-1)

    (gm,) = aten_graphs(f, torch.randn(2, 5, 4))
    s, t, add = _the(gm, aten.matmul.default), _the(gm, aten.relu.default), _the(gm, aten.add.Tensor)
    out = next(iter(add.users))
    with pytest.raises(Refused, match=f"{s.name} is used outside the attention \\({t.name}\\)"):
        check_convex(graph_digraph(gm), [s, add, out], out)
    check_convex(graph_digraph(gm), [s, t, add, out], out)     # with the side computation inside, it is whole


def test_reading_only_the_scores_size_outside_is_not_a_use():
    # HF-style `torch.zeros_like(scores)` next to the attention: the rewrite re-points it
    gm, s, p = _scores_and_users(lambda s, p: torch.zeros_like(s))
    check_convex(graph_digraph(gm), [s, p], p)
    gm, s, p = _scores_and_users(lambda s, p: s * 2)      # a read of the values is a use
    with pytest.raises(Refused):
        check_convex(graph_digraph(gm), [s, p], p)


# ---- rewrite_site ---------------------------------------------------------------------------------

def _analyzed(fn, *args):
    """(aten graph, its one site after the analyze stage, the inputs in the graph's placeholder order)."""
    graphs = []

    def capture(gm, example_inputs):
        aten_gm = to_aten(gm, example_inputs)
        graphs.append((aten_gm, argument_names(aten_gm, gm)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture)(*args)
    ((gm, names),) = graphs
    (site,) = run_stages_until(gm, "analyze")
    assert site.open, site.refusal
    by_name = dict(zip(fn.__code__.co_varnames, args))
    inputs = [by_name[names[p.name]] for p in gm.graph.nodes if p.op == "placeholder"]
    return gm, site, inputs


def _rewrite_and_run(gm, site, inputs):
    created: list[fx.Node] = []
    fake_mode = site.match.output.meta["val"].fake_mode
    replaced = rewrite_site(gm, site.match, site.decision, fake_mode, created)
    assert replaced == [n.name for n in site.match.region]
    assert not site.match.output.users                     # every reader now reads the op's result
    gm.graph.eliminate_dead_code(lambda n: n.is_impure(impure_random=False))   # as inside Dynamo's compile
    gm.graph.lint()
    gm.recompile()
    return created, gm(*inputs)


def nanogpt_causal(q, k, v):
    # nanoGPT's CausalSelfAttention without flash: the mask a tril of ones, applied with masked_fill
    t = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(torch.tril(torch.ones(t, t)).view(1, 1, t, t) == 0, float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ v


def test_nanogpt_causal_becomes_one_flash_call_without_a_bias():
    args = qkv(t=11)
    gm, site, inputs = _analyzed(nanogpt_causal, *args)
    created, (out,) = _rewrite_and_run(gm, site, inputs)
    (call,) = [n for n in created if n.target is attnlower_ops.flash_attention.default]
    assert call.kwargs["causal"] and call.kwargs["bias"] is None
    assert call.kwargs["scale"] == pytest.approx(1 / math.sqrt(D))
    assert not [n for n in gm.graph.nodes if n.target in (aten.softmax.int, aten._softmax.default, aten.tril.default)]
    torch.testing.assert_close(out, nanogpt_causal(*args), rtol=1e-5, atol=1e-6)


def repeat_kv(hidden_states, n_rep):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def llama_eager(q, k, v, attention_mask):
    # transformers' eager_attention_forward: repeat_kv, scores + causal_mask, softmax in fp32, then back
    key_states, value_states = repeat_kv(k, 2), repeat_kv(v, 2)
    attn_weights = torch.matmul(q, key_states.transpose(2, 3)) * D ** -0.5
    attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()


def test_llama_eager_reads_the_unrepeated_kv_and_keeps_the_bshd_output():
    q, k, v = qkv(t=9, hkv=2)
    mask = torch.zeros(B, 1, 9, 9).masked_fill(torch.rand(B, 1, 9, 9) > 0.7, torch.finfo(torch.float32).min)
    gm, site, inputs = _analyzed(llama_eager, q, k, v, mask)
    created, (out,) = _rewrite_and_run(gm, site, inputs)
    (call,) = [n for n in created if n.target is attnlower_ops.flash_attention.default]
    placeholders = {p: x for p, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs)}
    assert placeholders[call.args[1]] is k and placeholders[call.args[2]] is v   # no repeat: GQA in the op
    assert call.kwargs["bias"] is not None and not call.kwargs["causal"]          # a data mask is a bias
    want = llama_eager(q, k, v, mask)
    assert out.shape == want.shape == (B, 9, H, D)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_paged_gather_becomes_paged_attention_on_the_pools():
    nb, bs, maxb, hkv = 10, 4, 3, 2
    kp, vp = torch.randn(nb, hkv, bs, D), torch.randn(nb, hkv, bs, D)
    table = torch.randperm(nb)[: B * maxb].view(B, maxb).to(torch.int32)
    lens = torch.tensor([7, 12], dtype=torch.int32)

    def decode(q, kp, vp, table, lens):
        k = kp[table.long()].permute(0, 2, 1, 3, 4).reshape(B, hkv, maxb * bs, D)
        v = vp[table.long()].permute(0, 2, 1, 3, 4).reshape(B, hkv, maxb * bs, D)
        keep = torch.arange(maxb * bs)[None, None, None, :] < lens[:, None, None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)

    q = torch.randn(B, H, 1, D)
    gm, site, inputs = _analyzed(decode, q, kp, vp, table, lens)
    created, (out,) = _rewrite_and_run(gm, site, inputs)
    (call,) = [n for n in created if n.target is attnlower_ops.paged_attention.default]
    placeholders = {p: x for p, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs)}
    assert placeholders[call.args[1]] is kp and placeholders[call.args[2]] is vp
    assert not [n for n in gm.graph.nodes if n.target is aten.index.Tensor]     # the gather is gone
    torch.testing.assert_close(out, decode(q, kp, vp, table, lens), rtol=1e-5, atol=1e-6)


# ---- the op's own checks ---------------------------------------------------------------------------

def test_a_site_the_op_refuses_at_trace_time_is_undone(monkeypatch):
    """The inserted op's fake impl runs the op's input checks (on the site's devices: a kernel limit on CUDA);
    when they raise, the rewrite is undone and the site refused with the op's words, not left to fail at run time."""
    from attnlower.passes import rewrite as rewrite_module

    real = rewrite_module._Emitter.__call__

    def refusing(self, target, args, kwargs=None, name=None):
        node = real(self, target, args, kwargs, name)
        if str(target).startswith("attnlower."):
            node.meta["fake_error"] = "ValueError('the Triton kernels expect ...')"
        return node

    monkeypatch.setattr(rewrite_module._Emitter, "__call__", refusing)
    (gm,) = aten_graphs(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv())
    (site,) = run_stages_until(gm, "clean_up")
    assert not site.rewritten and "refuses the site's inputs: ValueError('the Triton kernels" in site.refusal
    assert not any(str(n.target).startswith("attnlower.") for n in gm.graph.nodes)   # the inserted nodes are gone
    x = qkv()
    torch.testing.assert_close(gm(*x)[0], F.scaled_dot_product_attention(*x))


# ---- the output's layout -----------------------------------------------------------------------------
# The op returns q's dim order; the replaced matmul returned [B, H, T, D] contiguous. The rewrite copies into
# the old order only where something downstream can tell (issue 18 item 7: GPT-2 eager had a copy per layer).

def _bshd_views(t=9):
    """q, k, v as [B, H, T, D] views of [B, T, H, D] memory (a head split then a transpose, as GPT-2 writes it)."""
    return [x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv(t=t)]


def gpt2_eager(q, k, v):
    # transformers' eager_attention_forward as GPT-2 calls it, then the merge of heads
    w = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5
    w = F.softmax(w, dim=-1)
    out = torch.matmul(w, v).transpose(1, 2).contiguous()
    return out.reshape(out.shape[0], out.shape[1], -1)


def heads_as_rows(q, k, v):
    # a consumer that views the result with the matmul's strides: [B, H, T, D] -> [B, H*T, D] is a view only there
    out = F.softmax(q @ k.transpose(-1, -2) * D ** -0.5, dim=-1) @ v
    return out.view(out.shape[0], -1, out.shape[-1])


def returned_as_is(q, k, v):
    return F.softmax(q @ k.transpose(-1, -2) * D ** -0.5, dim=-1) @ v


def _copies(created):
    return [n for n in created if n.target is aten.clone.default]


def test_a_result_merged_through_contiguous_keeps_the_ops_layout():
    args = _bshd_views()
    gm, site, inputs = _analyzed(gpt2_eager, *args)
    created, (out,) = _rewrite_and_run(gm, site, inputs)
    assert not _copies(created)              # `.contiguous()` after the transpose now copies nothing
    torch.testing.assert_close(out, gpt2_eager(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [heads_as_rows, returned_as_is])
def test_a_result_whose_strides_are_read_gets_the_replaced_layout(fn):
    args = _bshd_views()
    gm, site, inputs = _analyzed(fn, *args)
    created, (out,) = _rewrite_and_run(gm, site, inputs)
    assert len(_copies(created)) == 1
    want = fn(*args)
    assert out.stride() == want.stride()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


# ---- what Inductor receives: a buffer-proven mask vs is_causal -----------------------------------------------

class _PositionsGPT(torch.nn.Module):
    """nanoGPT's trunk: token + position embeddings (`torch.arange(T)`), one Block (buffer mask or is_causal), head."""

    def __init__(self, flash: bool, t: int = 16):
        super().__init__()
        from models import Block

        self.wte, self.wpe = torch.nn.Embedding(50, 32), torch.nn.Embedding(t, 32)
        self.block = Block(n_embd=32, n_head=2, flash=flash)
        self.block.attn.bias = self.block.attn.bias[:, :, :t, :t].clone() if not flash else None
        self.head = torch.nn.Linear(32, 50)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.block(x)).sum()


def _inductor_forward(flash: bool, monkeypatch) -> fx.GraphModule:
    """The forward graph Inductor compiles for `_PositionsGPT(flash)` under attnlower (after AOTAutograd)."""
    import torch._inductor.compile_fx as compile_fx_module

    received = []
    real = compile_fx_module._compile_fx_inner

    def recording(gm, inputs, *args, **kwargs):
        if not kwargs.get("is_backward"):
            received.append(gm)
        return real(gm, inputs, *args, **kwargs)

    monkeypatch.setattr(compile_fx_module, "_compile_fx_inner", recording)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _PositionsGPT(flash)
    idx = torch.randint(0, 50, (2, 16))
    # A cached compile skips the inner compiler: record what it would compile. torch's config modules are
    # patched through their own `patch`: pytest 9.2's monkeypatch undoes a module attribute it did not find
    # in the module's __dict__ by deleting it, which hides a torch config entry for every later test.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch.compile(model, backend="attnlower")(idx).backward()
    (gm,) = received
    return gm


def _outside_the_op(gm: fx.GraphModule) -> list[tuple]:
    """Each node that is not the flash call nor only computes its bias / verified: (op, (shape, dtype), its users in
    the model, its users in the check)."""
    (call,) = [n for n in gm.graph.nodes if n.target is attnlower_ops.flash_attention.default]
    # what feeds only the op's arguments past q, k, v (the mask and the device check), saved for the backward or not
    own = set()
    for node in reversed(gm.graph.nodes):
        feeds = [u for u in node.users if u in own or u is call]
        if node.op == "call_function" and feeds and node not in call.args[:3] \
                and all(u in own or u is call or u.op == "output" for u in node.users):
            own.add(node)
    rows = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n in own or n is call or n.args and n.args[0] is call:
            continue
        val = n.meta.get("val")
        shape = (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None
        # (users in the model, users in the check): a model node the check reads is a difference Inductor sees
        rows.append((str(n.target), shape, sum(u not in own and u.op != "output" for u in n.users),
                     sum(u in own for u in n.users)))
    return rows


def test_a_buffer_proven_mask_gives_inductor_the_is_causal_graph_outside_the_op(monkeypatch):
    """issue 22: outside the op's call and what computes its `bias` and `verified`, Inductor's forward graph for
    nanoGPT's buffer mask is the is_causal one. The device check's indices are its own: an int64 `arange` there was
    CSE'd by AOTAutograd with the model's positions (`torch.arange(T)`), so the check read the model's iota and
    Inductor materialized it in another kernel (the first, not the loss's)."""
    causal, buffer = _inductor_forward(True, monkeypatch), _inductor_forward(False, monkeypatch)
    assert any(n.name.startswith("any") for n in buffer.graph.nodes)   # the device check is there
    assert _outside_the_op(buffer) == _outside_the_op(causal)
    # the model's positions feed the model alone (its embedding and what the backward saves), as under is_causal
    (positions,) = [n for n in buffer.graph.nodes if n.target is torch.ops.prims.iota.default
                    and n.kwargs["dtype"] is torch.int64]
    assert not any(u.target is aten.unsqueeze.default for u in positions.users)
