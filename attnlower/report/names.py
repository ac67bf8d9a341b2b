"""Name graph nodes the way the user wrote them, for the report.

The passes see an aten graph whose nodes are called `arg3_1`, `le`, `index`: names the user
never wrote. `describe(node)` says what a node is in the user's words (the argument or attribute
it reads, or the source line that computes it), and `humanize(text, graph)` rewrites the node
names inside a reason. `argument_names(aten_graph, dynamo_graph)` maps the aten graph's
placeholders to what they stand for in the user's code: Dynamo names its placeholders after their
source (`L_attention_mask_`, `L_self_modules_attn_buffers_bias_`), and the aten graph keeps their
order (canonicalize.to_aten).
"""
from __future__ import annotations

import re

import torch.fx as fx

from ..passes.site import source_frame

# Dynamo's mangled sources: L['self']._modules['attn']._buffers['bias'] -> L_self_modules_attn_buffers_bias_
_ATTRIBUTE_STEP = re.compile(r"_(?:modules|buffers|parameters)_")
_GENERATED = re.compile(r"^(arg\d+_\d+|_tensor_constant\d+|.*_\d+)$")
_TOKEN = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)`(?: \(([A-Za-z_][A-Za-z0-9_.]*)\))?|\b([A-Za-z_][A-Za-z0-9_]*)\b")


def source_name(placeholder: str) -> str:
    """What a Dynamo placeholder name stands for: `L_attention_mask_` -> `attention_mask`,
    `L_self_modules_attn_buffers_bias_` -> `self.attn.bias`. Other names come back unchanged."""
    m = re.fullmatch(r"[LG]_(.+?)_?", placeholder)
    if not m:
        return placeholder
    body = m.group(1)
    if body.startswith("kwargs_"):       # forward(**kwargs): L['kwargs']['attention_mask']
        body = body[len("kwargs_"):]
    steps = _ATTRIBUTE_STEP.split(body)
    # L['args'][3] (a function taking *args) -> args_3
    steps[0] = re.sub(r"^(args)_(\d+)$", r"\1[\2]", steps[0])
    return ".".join(steps)


def argument_names(aten_graph: fx.Graph | fx.GraphModule, dynamo_graph: fx.Graph | fx.GraphModule | None
                   ) -> dict[str, str]:
    """Aten placeholder name -> the user's name for it (through the Dynamo graph's placeholders)."""
    aten = [n for n in _graph(aten_graph).nodes if n.op == "placeholder"]
    if dynamo_graph is None:
        return {}
    dynamo = [n for n in _graph(dynamo_graph).nodes if n.op == "placeholder"]
    if len(aten) != len(dynamo):   # not the same inputs: names would be guesses
        return {}
    return {a.name: source_name(str(d.target)) for a, d in zip(aten, dynamo)}


def _graph(g) -> fx.Graph:
    return g.graph if isinstance(g, fx.GraphModule) else g


def _source_line(node: fx.Node) -> tuple[str, str] | None:
    """(`file.py:12`, the code on that line) of the user's frame that made `node`, when known."""
    frame = source_frame(node)
    return None if frame is None else (f"{frame[0]}:{frame[1]}", frame[3])


def describe(node: fx.Node, arguments: dict[str, str] | None = None) -> str:
    """The node in the user's words: `attention_mask` (an input), `self.attn.bias` (an attribute),
    a constant tensor, or the source line that computes it (`mask[:, None] == 0` at model.py:12)."""
    arguments = arguments or {}
    if node.op == "placeholder":
        return f"`{arguments.get(node.name, node.name)}`"
    if node.op == "get_attr":
        target = str(node.target)
        if target.startswith("_tensor_constant"):
            where = _first_user_line(node)
            return "a constant tensor" + (f" (used at {where})" if where else "")
        return f"`self.{target}`"
    where = _source_line(node)
    if where is None:
        op = getattr(node.target, "__name__", str(node.target))
        return f"`{op.split('.')[0]}` (an op with no source line)"
    loc, code = where
    return f"`{code}` at {loc}" if code else f"the expression at {loc}"


def _first_user_line(node: fx.Node) -> str | None:
    for u in node.users:
        where = _source_line(u)
        if where:
            return where[0]
    return None


def humanize(text: str, graph: fx.Graph | fx.GraphModule, arguments: dict[str, str] | None = None) -> str:
    """Rewrite the graph's node names inside `text` as `describe` names them.

    Rewritten: backquoted names (`` `index` (index) `` included: the op name after it goes), and
    bare names that are plainly generated (`arg3_1`, `_tensor_constant0`, `add_6`).
    A bare word that merely equals a node name (`softmax`, `le`) is left alone: it may be prose.
    """
    nodes = {n.name: n for n in _graph(graph).nodes}

    def replace(m: re.Match) -> str:
        quoted, bare = m.group(1), m.group(3)   # group 2, the op name after a quoted node, goes with it
        if quoted is not None:
            node = nodes.get(quoted)
            if node is None:
                return m.group(0)
            return describe(node, arguments)
        node = nodes.get(bare)
        if node is None or not _GENERATED.match(bare):
            return m.group(0)
        return describe(node, arguments)

    return _TOKEN.sub(replace, text)


def dedupe(text: str) -> str:
    """Drop from each parenthesis the clauses the text already said before it.

    "causal (top-left), blocks above the diagonal skipped (causal (top-left), at Tq=Tk=48)"
    -> "causal (top-left), blocks above the diagonal skipped (at Tq=Tk=48)".
    """
    out, i = [], 0
    while i < len(text):
        if text[i] == "`":   # code the report quotes (`doc = (pos == 0).cumsum(-1)`) is never cut
            end = text.find("`", i + 1)
            end = len(text) - 1 if end < 0 else end
            out.append(text[i:end + 1])
            i = end + 1
            continue
        if text[i] != "(":
            out.append(text[i])
            i += 1
            continue
        end = _closing(text, i)
        if end is None:
            out.append(text[i:])
            break
        inner = text[i + 1:end]
        before = "".join(out)   # only what was already said: a later clause may restate this one
        kept = [c for c in _clauses(inner) if c.rstrip(",;").strip() and c.rstrip(",;").strip() not in before]
        # and a nested "(top-left)" the text already said: "SDPA is_causal=True (top-left)" -> "SDPA is_causal=True"
        kept = [re.sub(r" \(([^()]*)\)", lambda m: "" if m.group(1) in before else m.group(0), c) for c in kept]
        if kept:
            out.append("(" + " ".join(kept).rstrip(",;").strip() + ")")
        elif out and out[-1] == " ":
            out.pop()
        i = end + 1
    return "".join(out)


def _closing(text: str, start: int) -> int | None:
    depth = 0
    for j in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return j
    return None


def _clauses(inner: str) -> list[str]:
    """Split at top-level ", " / "; ", keeping each separator at the end of its clause."""
    parts, depth, cur = [], 0, ""
    for j, ch in enumerate(inner):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        cur += ch
        if depth == 0 and ch in ",;" and inner[j + 1:j + 2] == " ":
            parts.append(cur)
            cur = ""
    parts.append(cur)
    return [p.strip() for p in parts]
