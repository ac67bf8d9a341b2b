"""Module buffers whose value the passes may prove a structure from, and the guard that keeps it sound.

Dynamo hands a module's buffers (and plain tensor attributes) to the backend as graph inputs, with the
real tensors among the example inputs; it guards their metadata (shape, strides, dtype, device), never
their values or their identity: `model.bias.fill_(1)` or `model.bias = other` run the old compiled graph
with no recompile (docs/design/issue22.md, class 1). A structure proven from such a value (nanoGPT's
`tril` buffer is causal) is therefore only sound behind a guard the backend adds itself.

The guard this module installs, through the Dynamo guards of the frame being compiled: the tensor's
identity (`ID_MATCH`: reassigning the attribute recompiles), its version counter (`_version`: every
in-place op bumps it, `load_state_dict` included) and its data pointer (`t.data = other`). A change to
any of them recompiles the frame and the passes prove again from the new value. Blind spots: writes that
bypass the version counter, i.e. in place through `t.data` (`model.bias.data.fill_(0)`), through a NumPy /
DLPack alias, or by a kernel writing the raw pointer. Where the op computes a structure proven from the buffer
(causal, a band, ALiBi) the rewrite closes them on the device: the op takes the source's mask as its `bias` and
`verified = (mask == the proven pattern).all()`, computed in the graph each call from the buffer itself (one
read of the mask's [Tq, Tk] slice, no host sync); False makes the op apply the mask densely (docs/INTERFACES.md,
`verified`). A value the op takes as a number (a fill read from a one-element buffer) stays behind the host
guard alone, as do the paged op (no `verified`) and a structure beside documents (the check compares the whole
mask with the structure); the report says which (`analyze._buffer_note`). Tensors made under `inference_mode` have
no version counter: they are never speculated on.

A tensor that changes after a graph relied on it is not speculated on again (its next compile reads it
as data, with no guard): a buffer written between calls costs one recompile, not one per call.

Only what the guard covers is offered: a placeholder that Dynamo marked as a module tensor
(`_dynamo_static_input_type`), not a parameter, not requiring grad, never written by the graph itself,
compiled inside a Dynamo frame. `freeze` then replaces the graph's reads of it by a graph constant
(`_tensor_constant_attnlower_*`, the same tensor object: no copy), which is what the guarded graph
computes, so translation validation checks the rewrite at the buffer's real value. After validation, `thaw`
gives the reads that remain (the device check and its fallback bias) back to the placeholder: an input,
read on every call, which Inductor neither folds nor has to trace as a real tensor.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

__all__ = ["STATIC_INPUT", "StaticInput", "mark_static_inputs", "static_value", "freeze", "thaw", "frozen_buffers",
           "describe_guard"]

STATIC_INPUT = "attnlower_static_input"   # placeholder meta key: the StaticInput of a module tensor
# The module tensors a compiled graph relies on, with the version it relied on. A tensor that changed after
# that (its guard failed: the frame is recompiling) is data from then on: a buffer written between calls
# (a streaming mask) would otherwise recompile on every change until Dynamo's recompile limit.
# (keyed by id, the tensor held weakly: a tensor's == is elementwise, so it cannot be a dict key itself)
_RELIED_ON: dict[int, tuple[weakref.ref, int]] = {}


def _relied_on_version(tensor: torch.Tensor) -> int | None:
    entry = _RELIED_ON.get(id(tensor))
    return entry[1] if entry is not None and entry[0]() is tensor else None


def _rely_on(tensor: torch.Tensor, version: int) -> None:
    key = id(tensor)
    _RELIED_ON[key] = (weakref.ref(tensor, lambda _, key=key: _RELIED_ON.pop(key, None)), version)


@dataclass(frozen=True)
class StaticInput:
    """A module tensor handed to the backend as a graph input: where Dynamo found it and its state then."""

    source: object                   # Dynamo's Source (`L['self']._buffers['bias']`): what a guard reads
    tensor: weakref.ref              # the tensor itself (the module owns it; no reference kept here)
    version: int
    data_ptr: int


def mark_static_inputs(aten_gm: fx.GraphModule, dynamo_gm: fx.GraphModule, example_inputs) -> None:
    """Record on each placeholder of `aten_gm` (same order as `dynamo_gm`'s) that is a module tensor the
    passes may speculate on its `StaticInput` (meta `STATIC_INPUT`)."""
    ours = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    theirs = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    if len(ours) != len(theirs) or len(theirs) != len(example_inputs):
        return
    for node, dynamo_node, value in zip(ours, theirs, example_inputs):
        marked = (dynamo_node.meta.get("tensor_dict") or {}).get("_dynamo_static_input_type")
        grapharg = dynamo_node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if (not marked or source is None or not isinstance(value, torch.Tensor)
                or isinstance(value, (torch.nn.Parameter, torch._subclasses.FakeTensor))
                or value.requires_grad or value.is_inference() or type(value) is not torch.Tensor):
            continue
        node.meta[STATIC_INPUT] = StaticInput(source, weakref.ref(value), value._version, value.data_ptr())


def static_value(node: fx.Node) -> torch.Tensor | None:
    """The real value of placeholder `node` when a structure proven from it can be guarded: a module
    tensor (`mark_static_inputs`), unchanged since tracing, never written by the graph, compiled inside a
    Dynamo frame (whose guards `freeze` extends); None otherwise (the value is then data)."""
    info = node.meta.get(STATIC_INPUT) if node.op == "placeholder" else None
    if info is None:
        return None
    tensor = info.tensor()
    if tensor is None or tensor._version != info.version or tensor.data_ptr() != info.data_ptr:
        return None
    relied = _relied_on_version(tensor)
    if relied is not None and relied != tensor._version:
        return None                      # changed since a graph relied on it: treated as data from now on
    from torch._guards import TracingContext

    if TracingContext.try_get() is None:
        return None
    if _written_by_graph(node):
        return None
    return tensor


def _written_by_graph(node: fx.Node) -> bool:
    """Some op of the graph writes in place into `node`'s memory (through any view of it)."""
    aliases = {node}
    for n in node.graph.nodes:
        if n.op != "call_function":
            continue
        schema = getattr(n.target, "_schema", None)
        if schema is None:
            if n.args and n.args[0] in aliases:      # getitem of an aliasing op, or an unknown call
                aliases.add(n)
            continue
        if schema.returns and schema.returns[0].alias_info is not None and n.args and n.args[0] in aliases:
            aliases.add(n)
        for arg, value in zip(schema.arguments, n.args):
            if arg.alias_info is not None and arg.alias_info.is_write and value in aliases:
                return True
        for name, value in n.kwargs.items():
            if value in aliases and any(a.name == name and a.alias_info is not None and a.alias_info.is_write
                                        for a in schema.arguments):
                return True
    return False


def describe_guard(node: fx.Node) -> str:
    """The host guard in the report's words; the analyzer adds whether the op also checks the buffer on the device
    (`analyze._buffer_note`). Said only where the rewrite does guard the buffer (`Decision.speculated`)."""
    return f"guarded: a change to `{node.name}` (in place, or a new tensor) recompiles"


def freeze(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Guard the module tensor `node` (identity, version, data pointer) in the frame being compiled and
    make the graph read it as a constant: a `get_attr` of the same tensor replaces every use. Returns the
    constant's node; a second call for the same placeholder returns the first one's."""
    frozen = node.meta.get("attnlower_frozen")
    if frozen is not None:
        return frozen
    info = node.meta[STATIC_INPUT]
    tensor = info.tensor()
    if tensor is None:
        raise RuntimeError(f"the module tensor behind {node.name} was freed while compiling")
    _install_guards(info, tensor)
    _rely_on(tensor, info.version)
    graph = gm.graph
    name = f"_tensor_constant_attnlower_{node.name}"
    index = 0
    while hasattr(gm, f"{name}_{index}"):
        index += 1
    name = f"{name}_{index}"
    gm.register_buffer(name, tensor, persistent=False)   # a get_attr reads it (plain attributes warn)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        constant = graph.get_attr(name)
    constant.meta["val"] = node.meta.get("val")
    constant.meta["stack_trace"] = node.meta.get("stack_trace")
    node.replace_all_uses_with(constant)
    node.meta["attnlower_frozen"] = constant
    return constant


def frozen_buffers(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """{attribute name of the constant: its placeholder} for each buffer `freeze` made a constant of in `gm` and
    `thaw` has not given back yet (validation reads them: the fallback check changes their value)."""
    frozen = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        constant = node.meta.get("attnlower_frozen")
        if constant is not None and constant.graph is gm.graph:
            frozen[constant.target] = node
    return frozen


def thaw(gm: fx.GraphModule) -> int:
    """Where the graph still reads a frozen buffer (the op's `verified` check and fallback bias read it each
    call), read it from its placeholder again: the same tensor (the guard matches its identity), now an input,
    which Inductor reads on every call (a constant it would fold, or trace as data it cannot fake). Run after
    validation, which checked the graph at the constant's value. Returns how many buffers it gave back."""
    thawed = 0
    for node in list(gm.graph.find_nodes(op="placeholder")):
        constant = node.meta.get("attnlower_frozen")
        if constant is None or constant.graph is not gm.graph:
            continue
        if constant.users:
            constant.replace_all_uses_with(node)
            thawed += 1
        if not constant._erased:       # an unread constant is gone already (dead-code elimination)
            gm.graph.erase_node(constant)
        if hasattr(gm, constant.target):
            delattr(gm, constant.target)
        del node.meta["attnlower_frozen"]
    return thawed


def _install_guards(info: StaticInput, tensor: torch.Tensor) -> None:
    """Identity, version counter and data pointer of the tensor, as guards of the frame being compiled."""
    from torch._dynamo.guards import GuardBuilder
    from torch._dynamo.source import AttrSource
    from torch._guards import Guard, TracingContext

    context = TracingContext.try_get()
    if context is None:
        raise RuntimeError("no Dynamo frame is being compiled: a buffer's value cannot be guarded")
    guards = context.guards_context.dynamo_guards
    pointer = info.data_ptr

    def data_pointer(builder, guard):
        manager = builder.get_guard_manager(guard)
        manager.add_lambda_guard(lambda t: t.data_ptr() == pointer,
                                 [f"{guard.name}.data_ptr() == {pointer}  # attnlower: a proven buffer"],
                                 guard.user_stack)

    guards.add(Guard(info.source, GuardBuilder.ID_MATCH))
    guards.add(Guard(AttrSource(info.source, "_version"), GuardBuilder.EQUALS_MATCH))
    guards.add(Guard(info.source, data_pointer))
