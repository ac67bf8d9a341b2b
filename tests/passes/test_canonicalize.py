"""passes/canonicalize.py, stage 0: Dynamo's torch-level graph traced to pre-dispatch aten. What the later
stages rely on: the placeholders keep Dynamo's order and meaning, SDPA and matmul stay one node each,
every node has an example value, and aten nodes keep the user's source line (the report shows it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnlower.passes.canonicalize import fake_mode_for, to_aten

aten = torch.ops.aten


def _dynamo_and_aten(fn, *args, dynamic=False):
    pairs = []

    def capture(gm, example_inputs):
        pairs.append((gm, example_inputs, to_aten(gm, example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, dynamic=dynamic)(*args)
    (pair,) = pairs
    return pair


def attention(q, k, v, bias):
    w = torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias, dim=-1)   # the line the report must name
    return w @ v, F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _args():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 5, 16, generator=g) for _ in range(3)] + [torch.randn(1, 1, 5, 5, generator=g)]


def test_placeholders_keep_dynamos_order_and_values():
    dynamo_gm, example_inputs, gm = _dynamo_and_aten(attention, *_args())
    theirs = [n.meta["example_value"].shape for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    ours = [n.meta["val"].shape for n in gm.graph.nodes if n.op == "placeholder"]
    assert ours == theirs == [x.shape for x in example_inputs]


def test_sdpa_and_matmul_stay_one_node_each_and_every_node_has_a_value():
    _, _, gm = _dynamo_and_aten(attention, *_args())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.scaled_dot_product_attention.default) == 1
    assert targets.count(aten.matmul.default) == 2
    assert not any("_scaled_dot_product_flash" in str(t) or "_efficient_attention" in str(t) for t in targets)
    missing = [n.name for n in gm.graph.nodes if n.op not in ("output",) and "val" not in n.meta]
    assert not missing, missing


def test_aten_nodes_keep_the_users_source_line():
    _, _, gm = _dynamo_and_aten(attention, *_args())
    (softmax,) = [n for n in gm.graph.nodes if n.target in (aten.softmax.int, aten._softmax.default)]
    assert "test_canonicalize.py" in softmax.meta.get("stack_trace", "") and \
        "the line the report must name" in softmax.meta["stack_trace"]


def test_dynamic_sizes_stay_symbolic():
    _, _, gm = _dynamo_and_aten(attention, *_args(), dynamic=True)
    q = next(n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta["val"], torch.Tensor))
    assert any(isinstance(s, torch.SymInt) for s in q.meta["val"].shape)


def test_fake_mode_is_the_inputs_own_or_a_new_one():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fake = mode.from_tensor(torch.randn(2))
    assert fake_mode_for([3, fake]) is mode
    assert isinstance(fake_mode_for([torch.randn(2)]), FakeTensorMode)
