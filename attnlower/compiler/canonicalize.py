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

    with mode, _preserve_source_info(), _vanilla_checkpoint_context(gm):
        aten = make_fx(run, pre_dispatch=True, tracing_mode="real")(*fake_inputs)
    for _, body in checkpoint_bodies(aten, copy=False):
        if body.meta.get("_checkpoint_context_fn") is _VANILLA_CONTEXT:
            del body.meta["_checkpoint_context_fn"]   # run as plain activation checkpointing, as Dynamo made it
    functionalize_scores(aten)
    aten.graph.eliminate_dead_code()
    aten.recompile()
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
# In-place ops on intermediates: `scores += position_bias` (T5), `scores /= sqrt(d)` (Falcon),
# `scores.masked_fill_(...)`. A mutation hides the dataflow the detector walks, so each one whose
# effect no other node can observe becomes its out-of-place form before detection.

_METADATA_ONLY = {"detach_", "requires_grad_"}


def _returns_alias(node: fx.Node) -> bool:
    t = node.target
    return not isinstance(t, torch._ops.OpOverload) or any(r.alias_info is not None for r in t._schema.returns)


def _owns_storage(node) -> bool:
    """A fresh tensor of an op that returns no alias of its inputs (not a view, input or attribute)."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and not _returns_alias(node)
            and not node.target._schema.is_mutable)


def _out_of_place(node: fx.Node):
    """The functional overload of an in-place aten op (`add_.Tensor` -> `add.Tensor`), or None."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    name = t.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_") or name in _METADATA_ONLY or name == "copy_":
        return None
    if torch.Tag.nondeterministic_seeded in t.tags:
        return None
    args = t._schema.arguments
    if not args or args[0].alias_info is None or not args[0].alias_info.is_write:
        return None
    if any(a.alias_info is not None and a.alias_info.is_write for a in args[1:]):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    functional = getattr(packet, t._overloadname, None) if packet is not None else None
    if functional is None or functional._schema.is_mutable:
        return None
    if [a.name for a in functional._schema.arguments] != [a.name for a in args]:
        return None
    return functional


def _mutation_unobserved(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> bool:
    """True when `node` (an in-place op on `x`) writes memory no other node reads afterwards.

    The storage `x` shares with its views is found by walking up through views to the tensor that owns
    it (an op result, never an input or attribute) and down to every view of that tensor. Each of them,
    and each of their other readers, must run before `node`: later readers use `node`'s result.
    """
    root = x
    while root.op == "call_function" and isinstance(root.target, torch._ops.OpOverload) and _returns_alias(root):
        if not root.args or not isinstance(root.args[0], fx.Node):
            return False
        root = root.args[0]
    if not _owns_storage(root):
        return False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    aliases, stack = set(), [root]
    while stack:
        a = stack.pop()
        if a in aliases:
            continue
        aliases.add(a)
        for u in a.users:
            if u is node:
                continue
            if u.op != "call_function" or order[u] > order[node]:
                return False   # a reader after the mutation (or the graph's output)
            if not isinstance(u.target, torch._ops.OpOverload):
                return False   # a higher-order op or getitem: cannot tell what it keeps
            if _returns_alias(u):
                if not (u.args and u.args[0] is a):
                    return False   # an alias of another argument: keep it simple, leave the mutation
                stack.append(u)   # a view: its readers see the mutation too
    return True


def functionalize_scores(gm: fx.GraphModule) -> int:
    """Replace each in-place op on a fresh intermediate by its out-of-place form; returns how many.

    Safe when nothing else can see the mutation: the mutated tensor owns its storage (no view, input or
    attribute), no other node aliases it (no view of it was taken), and every other reader of it runs
    before the mutation (later readers use the in-place op's result, which the new node replaces).
    The result keeps the mutated tensor's dtype (`bf16 += fp32` stays bf16) by a cast where they differ.
    """
    done = 0
    for node in list(gm.graph.nodes):
        functional = _out_of_place(node)
        if functional is None:
            continue
        x = node.args[0]
        if not isinstance(x, fx.Node) or "val" not in node.meta or not _mutation_unobserved(gm, node, x):
            continue
        want = node.meta["val"]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(functional, node.args, node.kwargs)
            new.meta = dict(node.meta)
            try:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
                with want.fake_mode if getattr(want, "fake_mode", None) is not None else contextlib.nullcontext():
                    got = functional(*args, **kwargs)
            except Exception:  # noqa: BLE001 - cannot tell the out-of-place dtype: leave the mutation
                gm.graph.erase_node(new)
                continue
            new.meta["val"] = got
            out = new
            if got.dtype != want.dtype:
                out = gm.graph.call_function(torch.ops.aten._to_copy.default, (new,), {"dtype": want.dtype})
                out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    for _, body in checkpoint_bodies(gm, copy=False):
        done += functionalize_scores(body)
    return done
