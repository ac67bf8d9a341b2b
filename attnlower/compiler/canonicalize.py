"""Stage 0: turn Dynamo's torch-level graph into one pre-dispatch aten graph with full metadata."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx


def fake_mode_for(example_inputs: Sequence[object]) -> FakeTensorMode:
    """The fake mode Dynamo traced with (so symbolic sizes survive), or a fresh one outside Dynamo."""
    mode = detect_fake_mode(example_inputs)
    if mode is None:
        ctx = torch._guards.TracingContext.try_get()
        mode = ctx.fake_mode if ctx is not None else None
    if mode is None:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    return mode


def to_aten(gm: fx.GraphModule, example_inputs: Sequence[object]) -> fx.GraphModule:
    """Trace `gm` to pre-dispatch aten under the inputs' fake mode.

    Pre-dispatch keeps autograd-level ops (`aten.matmul`, `aten.softmax`,
    `aten.scaled_dot_product_attention`) as single nodes instead of their device-specific or
    decomposed forms, and every node gets `meta["val"]` with shapes, dtypes, strides and
    symbolic sizes. Placeholders keep the order and meaning of `gm`'s inputs.
    """
    mode = fake_mode_for(example_inputs)
    fake_inputs = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and not isinstance(x, torch._subclasses.FakeTensor):
            x = mode.from_tensor(x)
        fake_inputs.append(x)
    # Dynamo's graphs take a flat list of inputs; make_fx keeps that calling convention.
    # Run through an fx.Interpreter so each traced aten node inherits the Dynamo node's
    # stack_trace (the user's source line), which the report shows.
    def run(*args):
        return fx.Interpreter(gm).run(*args)

    with mode, _preserve_source_info():
        aten = make_fx(run, pre_dispatch=True, tracing_mode="real")(*fake_inputs)
    aten.graph.eliminate_dead_code()
    aten.recompile()
    return aten


@contextlib.contextmanager
def _preserve_source_info():
    """Keep `stack_trace` on the traced nodes, so sites can name the user's source line."""
    from torch.fx import traceback as fx_traceback

    with fx_traceback.preserve_node_meta():
        yield
