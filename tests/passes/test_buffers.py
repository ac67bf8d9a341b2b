"""passes/buffers.py: which graph inputs are module buffers a proof may read, the guard, the freeze."""
from __future__ import annotations

import torch
import torch.nn as nn

from attnlower.passes.buffers import STATIC_INPUT, freeze, static_value
from helpers import aten_graphs


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(4, 4, dtype=torch.bool)))
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x.masked_fill(~self.mask, 0.0) @ self.weight


def _placeholders(model, x):
    (gm,) = aten_graphs(model, x)
    return gm, {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}


def test_only_module_buffers_are_marked():
    gm, inputs = _placeholders(Holder(), torch.randn(4, 4))
    marked = [n for n in inputs.values() if STATIC_INPUT in n.meta]
    assert len(marked) == 1 and marked[0].meta["val"].dtype == torch.bool   # the buffer; not x, not the parameter


def test_no_value_outside_a_dynamo_frame():
    """Outside the frame being compiled no guard can be added: the buffer is data."""
    gm, inputs = _placeholders(Holder(), torch.randn(4, 4))
    (buffer,) = [n for n in inputs.values() if STATIC_INPUT in n.meta]
    assert static_value(buffer) is None


def _compiled_with(model, look):
    """`model` compiled by a backend that hands `look(aten_graph, buffer_placeholder)` the aten graph of each frame
    and its one marked buffer, then runs the graph as `look` left it."""
    def backend(gm, example_inputs):
        from attnlower.passes.canonicalize import to_aten

        aten = to_aten(gm, example_inputs)
        (buffer,) = [n for n in aten.graph.nodes if n.op == "placeholder" and STATIC_INPUT in n.meta]
        look(aten, buffer)
        aten.recompile()
        return aten

    torch._dynamo.reset()
    return torch.compile(model, backend=backend)


def test_freeze_guards_and_replaces_the_reads():
    seen = {}

    def look(aten, buffer):
        seen["value"] = static_value(buffer)
        seen["constant"] = freeze(aten, buffer)
        seen["unused"] = not buffer.users

    model = Holder()
    compiled = _compiled_with(model, look)
    x = torch.randn(4, 4)
    torch.testing.assert_close(compiled(x), model(x))
    assert seen["value"] is model.mask and seen["unused"]
    assert seen["constant"].op == "get_attr" and seen["constant"].target.startswith("_tensor_constant_attnlower")
    with torch.no_grad():
        model.mask.fill_(True)                 # the guard fails: recompiled, and the new value is used
    seen.clear()
    torch.testing.assert_close(compiled(x), model(x))
    assert "constant" in seen


def test_thaw_gives_the_reads_left_back_to_the_input():
    """After validation, what still reads a frozen buffer (the op's device check) reads the graph input again:
    the same tensor, read each call (a write through `.data` is seen), which Inductor takes as an input."""
    from attnlower.passes.buffers import thaw

    seen = {}

    def look(aten, buffer):
        constant = freeze(aten, buffer)
        seen["thawed"] = thaw(aten)
        seen["reads"] = len(buffer.users)
        seen["left"] = [n for n in aten.graph.nodes if n.op == "get_attr"] + [
            name for name, _ in aten.named_buffers() if name == constant.target]

    model = Holder()
    compiled = _compiled_with(model, look)
    x = torch.randn(4, 4)
    torch.testing.assert_close(compiled(x), model(x))
    assert seen == {"thawed": 1, "reads": 1, "left": []}, seen
    model.mask.data.fill_(True)                # not seen by the guard; read from the input all the same
    torch.testing.assert_close(compiled(x), model(x))
