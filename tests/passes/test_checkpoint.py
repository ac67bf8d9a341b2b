"""Attention inside `torch.utils.checkpoint` (issue 9.5, issue 12.11).

Dynamo emits the `tag_activation_checkpoint` higher-order op calling a subgraph module; the passes
run on each body. Checked: the site inside is fused, forward and gradients equal eager with
`use_reentrant=False`, HF's `gradient_checkpointing_enable()` path, dropout inside a body refused
(the recomputation would not replay the op's mask), and a failure inside a body falls back.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import attnlower
import models as M
from helpers import assert_matches_eager, compiled_sites

B, H, T, D = 2, 4, 12, 16


def attention(q, k, v):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    s = s.masked_fill(~torch.tril(torch.ones(q.size(-2), k.size(-2), dtype=torch.bool)), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def inputs(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def grads_of(fn, xs):
    out = fn(*xs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    g = [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    return out.detach(), g


def ck_functional(q, k, v):
    return checkpoint(attention, q, k, v, use_reentrant=False)


def ck_two_layers(q, k, v):
    x = checkpoint(attention, q, k, v, use_reentrant=False)
    return checkpoint(attention, x, k, v, use_reentrant=False) + x


def ck_nested(q, k, v):
    def outer(q, k, v):
        return checkpoint(attention, q * 2.0, k, v, use_reentrant=False).relu()
    return checkpoint(outer, q, k, v, use_reentrant=False)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("fn,count", [(ck_functional, 1), (ck_two_layers, 2), (ck_nested, 1)])
def test_fused_inside_checkpoint_forward_and_backward(fn, count, inner):
    if inner == "inductor" and fn is not ck_functional:
        pytest.skip("one spelling through Inductor is enough for the CPU suite")
    xs = inputs()
    want, want_grads = grads_of(fn, xs)
    torch._dynamo.reset()
    _, sites = compiled_sites(fn, *[x.detach() for x in xs], inner=inner)
    assert [s.op for s in sites] == ["flash_attention"] * count, [(s.op, s.reason) for s in sites]
    compiled = torch.compile(fn, backend="attnlower", options={"inner": inner, "strict": True})
    got, got_grads = grads_of(compiled, xs)
    assert_matches_eager(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_matches_eager(g, w, rtol=1e-4)


def test_checkpointed_nanogpt_block_gradients():
    torch.manual_seed(0)
    block = M.Block().train()

    def fn(x):
        return checkpoint(block, x, use_reentrant=False)

    x = torch.randn(2, 16, M.HIDDEN, requires_grad=True)
    want = fn(x)
    want.sum().backward()
    want_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    reports = attnlower.inspect(fn, x.detach(), options={"inner": "eager", "strict": True})
    assert [s.op for r in reports for s in r.sites] == ["flash_attention"]
    torch._dynamo.reset()
    got = torch.compile(fn, backend="attnlower", options={"inner": "eager", "strict": True})(x)
    got.sum().backward()
    assert_matches_eager(got, want)
    for n, p in block.named_parameters():
        assert_matches_eager(p.grad, want_grads[n], rtol=1e-4)


def _enable_checkpointing(model) -> None:
    """HF gradient checkpointing as the installed transformers spells it (5.25 renamed the method)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _checkpoint_side_effect_breaks(reports) -> list:
    return [b for r in reports for b in r.graph_breaks if "torch.utils.checkpoint" in b.meaning]


def test_hf_gradient_checkpointing_enable():
    """HF's gradient checkpointing compiled with attnlower: every layer's attention fused inside its
    checkpoint body, forward and gradients equal eager. transformers >= 5.25 (with `kernels`) wraps
    attention modules with a side effect that makes Dynamo run checkpointed layers outside the graph:
    there the report must say so and name the fix, and with the fix applied the layers fuse."""
    case = M.hf_model("llama", "eager", "nomask")
    net = case.model.train()
    _enable_checkpointing(net)
    ids = case.inputs.kwargs["input_ids"]
    want = net(input_ids=ids, use_cache=False).logits
    want.sum().backward()
    want_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)

    def logits(ids):
        return net(input_ids=ids, use_cache=False).logits

    reports = attnlower.inspect(logits, ids, options={"inner": "eager", "strict": True})
    config = {}
    if _checkpoint_side_effect_breaks(reports):
        assert not any(s.rewritten for r in reports for s in r.sites)
        shown = str(reports)
        assert "graph break" in shown and "skip_fwd_side_effects_in_bwd_under_checkpoint" in shown, shown
        config = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}   # the fix the report names
    with torch._dynamo.config.patch(**config):
        reports = attnlower.inspect(logits, ids, options={"inner": "eager", "strict": True})
        assert [s.op for r in reports for s in r.sites] == ["flash_attention"] * M.LAYERS, str(reports)
        torch._dynamo.reset()
        compiled = torch.compile(logits, backend="attnlower", options={"inner": "eager", "strict": True})
        got = compiled(ids)
        got.sum().backward()
    assert_matches_eager(got, want)
    for n, p in net.named_parameters():
        assert_matches_eager(p.grad, want_grads[n], rtol=1e-4)


class _Context:
    """A context variable kept on an object, as `kernels`' CompileableContextVar keeps it under compile."""

    def __init__(self):
        self.value = None

    def set(self, value):
        previous, self.value = self.value, value
        return previous


def test_graph_break_inside_a_checkpoint_is_explained():
    """A checkpointed layer that changes outside state graph-breaks in Dynamo: the layer runs outside any
    graph and its attention is not seen. The report says why and what to do, instead of only
    "0 attention site(s)"; with Dynamo's switch set, the same code fuses."""
    context = _Context()

    def layer(q, k, v):
        context.set((context.value or 0) + 1)   # a new value each call: never undone inside the checkpoint
        return attention(q, k, v)

    def fn(q, k, v):
        return checkpoint(layer, q * 2.0, k, v, use_reentrant=False) + 1.0

    xs = inputs()
    reports = attnlower.inspect(fn, *xs, options={"inner": "eager"})
    assert not any(s.rewritten for r in reports for s in r.sites)
    breaks = _checkpoint_side_effect_breaks(reports)
    assert breaks, str(reports)
    shown = str(reports)
    assert "not seen" in shown and "skip_fwd_side_effects_in_bwd_under_checkpoint = True" in shown, shown
    assert "attn_implementation" in shown, shown
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            reports = attnlower.inspect(fn, *xs, options={"inner": "eager"})
        assert [s.op for r in reports for s in r.sites] == ["flash_attention"], str(reports)
        assert not _checkpoint_side_effect_breaks(reports)


def test_dropout_inside_checkpoint_is_refused():
    def fn(q, k, v):
        return checkpoint(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.3), q, k, v,
                          use_reentrant=False)

    _, sites = compiled_sites(fn, *inputs(requires_grad=False))
    assert [s.op for s in sites] == [None] and "checkpoint" in sites[0].reason


def test_failure_inside_a_checkpoint_body_falls_back(monkeypatch):
    import dataclasses

    from attnlower.compiler import backend
    from attnlower.passes import pipeline

    first, *rest = pipeline.STAGES

    def anchors_failing_in_bodies(gm, ctx):
        if ctx.in_checkpoint:
            raise RuntimeError("broken on purpose")
        return first.run(gm, ctx)

    monkeypatch.setattr(pipeline, "STAGES", (dataclasses.replace(first, run=anchors_failing_in_bodies), *rest))
    xs = inputs(requires_grad=False)
    want = ck_functional(*xs)
    torch._dynamo.reset()
    start = len(backend.reports())
    got = torch.compile(ck_functional, backend="attnlower", options={"inner": "eager"})(*xs)
    reports = backend.reports()[start:]
    assert reports and "broken on purpose" in reports[0].error
    assert_matches_eager(got, want)
