"""Stage functionalize: in-place ops on intermediates become their out-of-place forms.

`scores += position_bias` (T5), `scores /= sqrt(d)` (Falcon), `scores.masked_fill_(...)`: a mutation
hides the dataflow the later stages walk, so each one whose effect no other node can observe is
replaced by its out-of-place form before anything is anchored. A mutation something else can see
(an input, a view read later) stays, and so does the site around it (unfused, with the reason).
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx

from .site import Context
from .vocabulary import METADATA_ONLY_WRITES


def functionalize(gm: fx.GraphModule, ctx: Context) -> str:
    """Replace each unobserved in-place op on an intermediate of `gm` by its out-of-place form."""
    return f"{functionalize_scores(gm)} in-place op(s) made out-of-place"


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
    if not name.endswith("_") or name.startswith("_") or name in METADATA_ONLY_WRITES or name == "copy_":
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
        name = node.name
        gm.graph.erase_node(node)
        # the node standing where the in-place op stood keeps its name: reasons, the report and the dump
        # name it as in the traced graph (`before_gm`), which still holds the in-place op
        out.name = name
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
