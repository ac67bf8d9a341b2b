"""Stage 0: turn Dynamo's torch-level graph into one pre-dispatch aten graph with full metadata."""
from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from .buffers import mark_static_inputs


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
        return _KeepSubclassCalls(gm).run(*args)

    with mode, _preserve_source_info(), _vanilla_checkpoint_context(gm):
        aten = make_fx(run, pre_dispatch=True, tracing_mode="real")(*fake_inputs)
    for _, body in checkpoint_bodies(aten, copy=False):
        if body.meta.get("_checkpoint_context_fn") is _VANILLA_CONTEXT:
            del body.meta["_checkpoint_context_fn"]   # run as plain activation checkpointing, as Dynamo made it
    aten.graph.eliminate_dead_code()
    aten.recompile()
    mark_static_inputs(aten, gm, example_inputs)   # module buffers a mask may be proven from (passes/buffers.py)
    return aten


# --------------------------------------------------------------------------------------------
# torch.utils.checkpoint: Dynamo wraps the checkpointed code in a `tag_activation_checkpoint` call of a
# subgraph module (HF's gradient_checkpointing_enable() does it per layer). The passes run on each body.

CHECKPOINT_HOPS = (torch.ops.higher_order.tag_activation_checkpoint,)


def _vanilla_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.PREFER_RECOMPUTE


def _vanilla_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_vanilla_policy)


_VANILLA_CONTEXT = _vanilla_context   # a marker: the context we lent the trace, removed afterwards


@contextlib.contextmanager
def _vanilla_checkpoint_context(gm: fx.GraphModule):
    """Tracing a checkpoint call to pre-dispatch aten reads `body.meta["_checkpoint_context_fn"]`, which
    Dynamo sets only when the user passed `context_fn` (torch 2.13 raises KeyError otherwise). Lend the
    bodies the context plain checkpointing uses (recompute everything) while tracing."""
    lent = []
    for _, body in checkpoint_bodies(gm, copy=False):
        if "_checkpoint_context_fn" not in body.meta:
            body.meta["_checkpoint_context_fn"] = _VANILLA_CONTEXT
            lent.append(body)
    # the trace runs the checkpoint once and would log "context_fn is passed": it is not, by the user
    wrap_log = logging.getLogger("torch._higher_order_ops.wrap")
    level = wrap_log.level
    if lent:
        wrap_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        wrap_log.setLevel(level)
        for body in lent:
            body.meta.pop("_checkpoint_context_fn", None)


def checkpoint_bodies(gm: fx.GraphModule, copy: bool = True) -> list[tuple[str, fx.GraphModule]]:
    """The subgraph modules that `gm`'s checkpoint calls run, nested ones included, outermost first.

    With `copy=True` each body is first replaced (in its owner) by a private copy, so a pass may
    rewrite it while the graph `gm` was copied from keeps the original (the fallback when a pass fails).
    """
    found: list[tuple[str, fx.GraphModule]] = []
    stack: list[tuple[str, fx.GraphModule]] = [("", gm)]
    while stack:
        prefix, owner = stack.pop(0)
        for node in owner.graph.nodes:
            if node.op != "call_function" or node.target not in CHECKPOINT_HOPS:
                continue
            body_node = node.args[0]
            if not (isinstance(body_node, fx.Node) and body_node.op == "get_attr"):
                continue
            name = str(body_node.target)
            body = getattr(owner, name)
            if not isinstance(body, fx.GraphModule):
                continue
            if copy:
                clone = fx.GraphModule(body, _copy_graph(body.graph))
                clone.meta.update(body.meta)
                setattr(owner, name, clone)
                body = clone
            path = f"{prefix}.{name}" if prefix else name
            found.append((path, body))
            stack.append((path, body))
    return found


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    import copy

    return copy.deepcopy(graph)   # keeps node.meta; FakeTensors are shared


@contextlib.contextmanager
def _preserve_source_info():
    """Keep `stack_trace` on the traced nodes, so sites can name the user's source line."""
    from torch.fx import traceback as fx_traceback

    with fx_traceback.preserve_node_meta():
        yield


# --------------------------------------------------------------------------------------------
# tensor subclasses (DTensor): kept as Dynamo's calls, traced around

class _KeepSubclassCalls(fx.Interpreter):
    """Runs Dynamo's graph under make_fx, copying calls on tensor subclasses into the trace unchanged.

    Pre-dispatch tracing cannot see through a wrapper subclass such as DTensor: its ops dispatch
    below autograd, so the pre-dispatch proxy mode answers `NotImplemented` and the trace dies
    ("Unable to cast NotImplemented to Tensor"). Under tensor parallelism the subclass calls are
    the sharded linears and their hooks (`from_local`, `redistribute`, `to_local`); the attention
    between them runs on plain local tensors with the local head count. So a node that takes or
    makes a subclass value is copied as Dynamo wrote it (its value computed under the fake mode,
    not traced), and the plain tensors it returns are tracked like any traced value: attention
    sites are found on the local tensors, and the inner compiler (AOTAutograd) desugars the
    subclass calls as it does for `aot_eager`, autograd included.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self._copied: dict[fx.Node, fx.Node] = {}   # Dynamo node -> its copy in the trace

    def run_node(self, n: fx.Node):
        if n.op in ("call_function", "call_method") and self._on_subclass(n):
            return self._copy_call(n)
        return super().run_node(n)

    def _on_subclass(self, n: fx.Node) -> bool:
        inputs = [self.env[a] for a in n.all_input_nodes]
        if any(a in self._copied and not isinstance(self.env[a], torch.Tensor) for a in n.all_input_nodes):
            return True   # e.g. getitem of a copied call's tuple
        # Dynamo's `example_value` says whether the call makes one (`DTensor.from_local` takes plain x)
        return _holds_subclass(inputs) or _holds_subclass(n.meta.get("example_value"))

    def _copy_call(self, n: fx.Node):
        from torch.fx.experimental.proxy_tensor import (disable_proxy_modes_tracing, get_proxy_mode,
                                                        get_proxy_slot, has_proxy_slot, track_tensor_tree)

        tracer = get_proxy_mode().tracer
        with disable_proxy_modes_tracing():
            out = super().run_node(n)
        placeholders = [p for p in tracer.graph.nodes if p.op == "placeholder"]
        dynamo_placeholders = [p for p in self.graph.nodes if p.op == "placeholder"]

        def traced(a: fx.Node) -> fx.Node:
            if a in self._copied:
                return self._copied[a]
            value = self.env[a]
            if isinstance(value, torch.Tensor) and has_proxy_slot(value, tracer):
                return get_proxy_slot(value, tracer).proxy.node
            if a.op == "placeholder":   # a DeviceMesh, a process group: stays an input
                return placeholders[dynamo_placeholders.index(a)]
            raise NotImplementedError(
                f"attnlower: the call {n.format_node()} on a tensor subclass reads {a.name} "
                f"({type(value).__name__}), which is neither a traced tensor nor a graph input; expected "
                "tensors computed by the graph, inputs and constants. The graph is compiled without "
                "attnlower's passes.")

        copy = tracer.graph.create_node(n.op, n.target, fx.node.map_arg(n.args, traced),
                                        fx.node.map_arg(n.kwargs, traced), name=n.name)
        copy.meta["stack_trace"] = n.meta.get("stack_trace")
        spelling = _attention_spelling(n)
        if spelling:   # reported as a site left to the subclass (anchors.find_anchors)
            copy.meta[SUBCLASS_ATTENTION] = (spelling, type(out).__name__)
        self._copied[n] = copy
        if isinstance(out, torch.Tensor) and not _holds_subclass(out):
            track_tensor_tree(out, fx.Proxy(copy, tracer), constant=None, tracer=tracer)
        else:
            copy.meta["val"] = out
        return out


SUBCLASS_ATTENTION = "attnlower_subclass_attention"   # node.meta key: (spelling, subclass name); anchors.py reads it


def _attention_spelling(n: fx.Node) -> str | None:
    """'sdpa' / 'softmax' for the torch-level calls that anchor attention sites, else None."""
    import torch.nn.functional as F

    if n.target in (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention):
        return "sdpa"
    if n.target in (torch.softmax, F.softmax, torch.special.softmax, "softmax"):
        return "softmax"
    return None


def _holds_subclass(value) -> bool:
    """Whether `value` (a tensor, or a nest of them) holds a wrapper subclass such as DTensor."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    from torch.utils._pytree import tree_leaves

    return any(is_traceable_wrapper_subclass(x) for x in tree_leaves(value))
