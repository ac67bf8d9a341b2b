"""Stage validate (translation validation): check every rewritten site against the region it replaced.

A rewrite is only as right as the detector's reasoning; this pass does not reuse any of it. For
each site it takes the two computations that now coexist in the graph (the replaced output node,
still there until dead-code elimination, and the node that replaced it), cuts both at the values
they share, and evaluates the two on random values at that cut, in float64 on CPU:

- the *boundary* is every shared node that depends on tensor data (graph inputs, parameters,
  buffers, and anything computed from them); it is drawn at random from its dtype, with edge
  values (zeros, negatives, the dtype's most negative finite value, -inf, all-False and all-True
  rows, indices at both ends of what their consumer can index);
- nodes computed only from sizes and constants (arange, tril of ones, full, comparisons of those:
  mask builders) are recomputed on both sides, so a proven causal mask keeps its real value;
- float casts (to fp16 / bf16 / fp32) become casts to float64 on both sides and devices become CPU,
  so the comparison can be tight (`evaluate.TOLERANCE`); NaN positions must match exactly;
- dropout is switched off on both sides (p = 0), which the report says;
- a module buffer the rewrite froze (`buffers.freeze`: a structure proven from its value) is a constant read
  at its real value, so the draws check the op's structured path; where the op also checks the buffer on the
  device (`verified`), one more evaluation changes the buffer on both sides and forces `verified` False, so
  the op's dense fallback bias is checked against the source at a value it no longer holds the structure
  (`_Pair.fallback_graphs`).

A mismatch (or a rewrite that raises where the source computes) undoes the rewrite: the stage
reroutes the users of the new output back to the old one, and the clean_up stage removes the new nodes.
Identical sites (same subgraph structure, shapes and constants, e.g. the layers of one model)
are checked once per process (`verdicts.py`).
"""
from __future__ import annotations

import base64
import copy
import hashlib
import io
import logging
import math
import operator
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from .buffers import frozen_buffers
from .evaluate import (compare, constants_to_float64_cpu, is_attention_op, reference_ops, run_float64, score_shape,
                       to_float64_cpu)
from .site import Context
from .validate_first_call import CannotPlan, first_call_check, plan_for
from .validate_sizes import CannotReduce, reduce_pair
from .verdicts import Verdict, earlier, remember
from .vocabulary import (ADDS, BROADCASTS, CASTS, COMPARISONS, COPIES, DROPOUTS, FLOAT_DTYPES, MATRIX_PRODUCTS,
                         MOVES, PERMUTES, RESHAPES, SIZE_QUERIES, SLICES, SOFTMAX_FORMS, SQUEEZES, SUBTRACTS,
                         ancestors, op_name)

aten = torch.ops.aten
log = logging.getLogger("attnlower")

# Largest tensor (elements) either side may create. One site's check (3 draws, one thread) took, on
# the 2-core dev box (2026-12-01, timing the validate pass on an eager causal site, D=64): 0.36 s at
# 393k score elements, 1.07 s at 1.6M, 5.9 s at 8.4M, i.e. ~0.7 us per element. 2**21 (~1.4 s)
# keeps a site well under 10% of the compile of a graph that size; above it a static graph is
# left fused and the report says "not validated", a dynamic one is checked at smaller sizes
# (`REDUCED_SIZE`).
MAX_ELEMENTS = 2 ** 21
# Value substituted for a free symbol (dynamic=True) when the size hints exceed MAX_ELEMENTS:
# small, yet above Dynamo's 0/1 specialization and larger than a typical head_dim tile.
REDUCED_SIZE = 17

# Ops through which an integer input keeps its role as an index or a length (`_int_range`): views,
# casts and copies move it, an added offset shifts it, a getitem picks it out of a tuple.
_KEEPS_INDEX_ROLE = (COPIES | CASTS | RESHAPES | BROADCASTS | PERMUTES | SQUEEZES | SLICES | ADDS | SUBTRACTS
                     | {operator.getitem})
# Ops whose result is a view or a copy of (part of) one input: a boundary value made by one of these is
# drawn at that input and recomputed, so two views of one tensor are drawn as one (`_Pair._absorbable`).
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default}
_VIEWS = (COPIES | RESHAPES | BROADCASTS | PERMUTES | SQUEEZES | SLICES | MOVES | _SPLITS
          | {aten.narrow.default, aten.unflatten.int, operator.getitem})
# Ops a mask or a bias is built with from its sources (padding masks from an attention_mask, ALiBi from
# slopes and positions): cheap, deterministic, elementwise or along one dim. A boundary mask or bias made
# by one of these is computed from what made it, so its draws are values its producer can give.
_PRODUCERS = CASTS | {aten.cumsum.default, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar,
                      aten.tril.default, aten.triu.default, aten.any.dim, aten.all.dim, aten.sum.dim_IntList,
                      aten.amax.default, aten.floor_divide.default, aten.__and__.Tensor, aten.__or__.Tensor,
                      aten.__xor__.Tensor}
# ... and index ops, when what indexes is computed from sizes alone (`padding[batch_idx, kv_idx]`)
_INDEXING = {aten.index.Tensor, aten.index_select.default, aten.embedding.default, aten.gather.default}


class CannotCheck(Exception):
    """The pair cannot be evaluated (random op, bitcast, ...); the message says why."""


# --------------------------------------------------------------------------------------------
# the stage

def validate(gm: fx.GraphModule, ctx: Context) -> str:
    """Check each site rewritten in `gm` against the region it replaced; undo and refuse those that differ.

    With `ctx.validate` off, every rewritten site says "not checked: options validate=False".
    """
    rewritten = [s for s in ctx.sites_in(gm) if s.rewritten]
    if not ctx.validate:
        for site in rewritten:
            site.validated = "not checked: options validate=False"
        return "off (validate=False)"
    shape_env = getattr(ctx.fake_mode, "shape_env", None)
    refused = cached = unchecked = first_call = 0
    for site in rewritten:
        old, new = site.match.output, site.replacement
        verdict = validate_rewrite(gm, old, new, shape_env=shape_env, repro_dir=ctx.repro_dir,
                                   site=(site.index, f"site {site.index} ({site.location})"),
                                   first_call=not ctx.in_checkpoint)
        site.validated = verdict.checked_on
        cached += verdict.cached
        unchecked += verdict.checked_on.startswith("not validated")
        plan = verdict.first_call
        if plan is not None and not plan.result:
            first_call += 1
            if verdict.cached:
                plan.also.append(site.index)      # its report row learns the verdict with the checked one's
            else:
                _insert_first_call_check(gm, new, plan)
        if not verdict.ok:
            # undo: the old output is still in the graph; the inserted nodes die in clean_up
            new.replace_all_uses_with(old)
            site.refuse(verdict.reason)
            site.validation_repro = verdict.repro
            refused += 1
            log.warning("attnlower: site %d (%s) refused: %s", site.index, site.location, verdict.reason)
    return (f"{len(rewritten)} checked ({cached} by an identical earlier site), {refused} refused, "
            f"{first_call} checked on the first call, {unchecked} not validated")


def _insert_first_call_check(gm: fx.GraphModule, new: fx.Node, plan) -> None:
    """`first_call_check(plan, new, *boundary)` after `new`, read by `new`'s users: the backend keeps it
    in the graph of the first call only (validate_first_call.split_first_call_checks)."""
    graph = new.graph
    with graph.inserting_after(new):
        check = graph.call_function(first_call_check, (plan.id, new, *plan.boundary))
    check.meta["val"] = new.meta.get("val")
    check.meta["stack_trace"] = new.meta.get("stack_trace", "")
    new.replace_all_uses_with(check, delete_user_cb=lambda user: user is not check)


# --------------------------------------------------------------------------------------------
# one rewrite

def _reduced(pair):
    """`reduce_pair` at MAX_ELEMENTS; an error inside it (a case the reduction does not know) is a reason not to
    reduce, said with its type, so that the site falls back to its first-call check instead of failing the
    graph's passes (a TypeError there once left every site of HF GPT-2 unfused)."""
    try:
        return reduce_pair(pair, MAX_ELEMENTS)
    except CannotReduce:
        raise
    except Exception as e:  # noqa: BLE001 - reported in the site's validation line
        raise CannotReduce(f"the reduction failed: {type(e).__name__}: {e}") from e


def validate_rewrite(gm: fx.GraphModule, old: fx.Node, new: fx.Node, *, shape_env=None,
                     repro_dir: str | None = None, draws: int = 3, site: tuple[int, str] = (0, "site"),
                     first_call: bool = False) -> Verdict:
    """Evaluate `old` (the replaced node) and `new` (its replacement) on random boundary inputs.

    A static pair too large to evaluate is checked at reduced sizes (validate_sizes); when that cannot
    be done and `first_call` allows, on the first call of the graph (validate_first_call: the verdict
    carries the plan, pending); else it is left fused, "not validated", with the reason. `site` is the
    site's (report row, description) for the first-call check's messages."""
    try:
        pair = _Pair(gm, old, new, shape_env)
    except CannotCheck as e:
        return Verdict(False, f"not checked: {e}", f"translation validation could not run: {e}; "
                       "the site stays unfused (set options validate=False to skip the check)")
    key = pair.key()
    v = earlier(key)
    if v is not None:
        return Verdict(v.ok, v.checked_on + " (same structure as a site checked earlier: not re-run)",
                       v.reason, v.repro, cached=True, first_call=v.first_call)
    if pair.too_large:
        if pair.subs:
            return Verdict(True, f"not validated: {pair.too_large}")
        try:
            # a static region: generalized over its sizes and checked smaller (validate_sizes says why
            # that is sound), or else on the first call
            pair.use(_reduced(pair))
        except CannotReduce as e:
            why = f"{pair.too_large}: smaller sizes not possible ({e})"
            if not first_call:
                return Verdict(True, f"not validated: {why}; inside a checkpoint body there is no first-call check")
            try:
                plan = plan_for(pair, site[1], site[0])
            except CannotPlan as e2:
                return Verdict(True, f"not validated: {why}; no first-call check either: {e2}")
            plan.key, plan.boundary, plan.why = key, list(pair.boundary), why
            verdict = Verdict(True, f"first-call check pending: {why}; the first call compares "
                                    f"{plan.describe(plan.source_shape)} with the source on the real inputs",
                              first_call=plan)
            return remember(key, verdict)
    return remember(key, pair.check(draws, repro_dir))


# --------------------------------------------------------------------------------------------
# cutting the graph

def _is_random(n: fx.Node) -> bool:
    tags = getattr(n.target, "tags", ())
    # dropout, in ops of its own or inside attention ops, is switched off in the copies (p = 0)
    return (torch.Tag.nondeterministic_seeded in tags and n.target not in DROPOUTS
            and not is_attention_op(n))


def _size_only(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends only on sizes and constants (mask builders), not on tensor data."""
    pure: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            if not isinstance(n.meta.get("val"), torch.Tensor):
                pure.add(n)           # a SymInt / int input: a size, given its concrete value
        elif n.op == "get_attr":
            if n.target.startswith("_tensor_constant"):
                pure.add(n)           # lifted constants; other attributes may be rewritten between calls
        elif n.op == "call_function":
            if op_name(n) in SIZE_QUERIES or (not _is_random(n) and all(a in pure for a in n.all_input_nodes)):
                pure.add(n)
    return pure


_FACTS: list = []   # [(weakref to graph, node count, facts)]: one graph's facts, shared by its sites


def _graph_facts(graph: fx.Graph):
    """(size-only nodes, node order, alias roots, in-place writers) of a graph, computed once for
    all the sites of one validation pass (the graph does not change between them)."""
    if _FACTS and _FACTS[0][0]() is graph and _FACTS[0][1] == len(graph.nodes):
        return _FACTS[0][2]
    facts = (_size_only(graph), {n: i for i, n in enumerate(graph.nodes)}, *_aliasing(graph))
    _FACTS[:] = [(weakref.ref(graph), len(graph.nodes), facts)]
    return facts


def _numel_hint(val: torch.Tensor) -> int:
    return math.prod(int(s) if isinstance(s, int) else (s.node.hint or 0) for s in val.shape)


def _concrete(x, subs: dict) -> int:
    if isinstance(x, int):
        return x
    return int(x.node.expr.xreplace(subs))


@dataclass
class _Input:
    node: fx.Node
    kind: str                     # "size" | "float" | "data" | "bool" | "index" | "length" | "int" | "scalar"
                                  # | "fixed" (a guarded number held in a tensor: `value`)
    shape: tuple = ()
    stride: tuple = ()
    dtype: torch.dtype | None = None
    low: int = 0
    high: int = 0                 # inclusive, for index / length
    value: Any = None             # for size / scalar inputs
    source_dtype: torch.dtype | None = None   # the dtype in the graph (drawn as float64 when a float)
    queries: int = 0              # lengths read by paged_attention: its Tq (a draw holds a sequence shorter than it)

    def describe(self) -> str:
        if self.kind in ("size", "scalar"):
            return f"{self.node.name}={self.value}"
        if self.kind == "fixed":
            return f"{self.node.name}={self.value:.6g} (guarded)"
        dims = ",".join(str(s) for s in self.shape)
        extra = f" in [{self.low}, {self.high}]" if self.kind in ("index", "length") else ""
        if self.queries > 1:
            extra += f" (draws after the first: one length in [1, Tq={self.queries}))"
        short = {torch.float64: "f64", torch.bool: "bool", torch.int64: "i64", torch.int32: "i32"}
        return f"{short.get(self.dtype, str(self.dtype).replace('torch.', ''))}[{dims}]{extra}"


class _Pair:
    """The source computation and its rewrite, as two standalone float64 CPU graphs with one signature."""

    def __init__(self, gm: fx.GraphModule, old: fx.Node, new: fx.Node, shape_env):
        # the module owning the nodes: a site inside a higher-order op's subgraph is checked there
        gm = old.graph.owning_module or gm
        self.gm, self.old, self.new = gm, old, new
        self.pure, order, root, writers = _graph_facts(gm.graph)
        self.root, self.writers = root, writers
        # Cut at the values both sides share, then move the cut up to the true sources: a boundary
        # value that is a view of another (or a mask / bias built from others, `_absorbable`) is
        # recomputed on both sides from what made it, until nothing more can be.
        absorbed: set[fx.Node] = set()
        while True:
            boundary, computed = self._cut(absorbed, order)
            self.computed = computed
            more = {b for b in boundary if self._absorbable(b)}
            if not more:
                break
            absorbed |= more
        self.absorbed = absorbed
        self.boundary = sorted(boundary, key=order.__getitem__)
        self._check_writes(order)
        for n in computed["old"] | computed["new"]:
            if _is_random(n):
                raise CannotCheck(f"{n.name} ({n.target}) draws random numbers")
            if n.target is aten.view.dtype:
                raise CannotCheck(f"{n.name} reinterprets bits (view.dtype), which float64 would change")
        self.shape_env = shape_env
        self.subs, self.sizes_note = self._sizes(shape_env)
        self.inputs = [self._input(b) for b in self.boundary]
        self.largest = max([self._numel(n) for n in computed["old"] | computed["new"] | set(self.boundary)] + [1])
        self.too_large = ""
        if self.largest > MAX_ELEMENTS:
            why = ", and smaller sizes were not possible" if self.subs else ""
            self.too_large = (f"the region makes a tensor of {self.largest} elements at {self.sizes_note}, "
                              f"over the {MAX_ELEMENTS} a float64 CPU check may use{why}")
        self._graphs: tuple[fx.GraphModule, fx.GraphModule] | None = None

    def _cut(self, absorbed: set, order: dict) -> tuple[set, dict]:
        """(boundary, {side: the nodes it computes}): each side is walked up from its output through
        what it alone computes, size-only nodes and the `absorbed` ones; the rest is its boundary."""
        old, new, pure, root, writers = self.old, self.new, self.pure, self.root, self.writers
        if not hasattr(self, "_ancestors"):
            self._ancestors = ancestors([old]), ancestors([new])
        anc_old, anc_new = self._ancestors
        shared = anc_old & anc_new
        boundary: set[fx.Node] = set()
        computed = {}
        for side, out, anc in (("old", old, anc_old), ("new", new, anc_new)):
            inside, replay, stack = set(), set(), [out]
            while stack:
                while stack:
                    n = stack.pop()
                    if n in inside or n in boundary:
                        continue
                    own = n in anc and n not in shared
                    if n.op == "placeholder" or (n.op == "get_attr" and n not in pure) or not (
                            n in pure or own or n in replay or n in absorbed):
                        boundary.add(n)       # computed outside the region from tensor data
                        continue
                    inside.add(n)
                    stack.extend(n.all_input_nodes)
                # memory this side computes and something writes into in place (a mask built with
                # ones() then sliced and filled): replay those writes, in graph order, in the copy
                for n in list(inside):
                    for w in writers.get(root[n], ()):
                        if w not in inside and root[n] in inside and order[w] < order[out]:
                            replay.add(w)
                            stack.append(w)
            computed[side] = inside
        return boundary, computed

    def _absorbable(self, b: fx.Node) -> bool:
        """Whether boundary value `b` is drawn at what makes it instead (and recomputed on both sides).

        - A view or copy of another value (`_VIEWS`): two views of one tensor must be drawn as one, or
          a rewrite reading V through an equivalent view (V before its transpose, then permuted) sees
          other numbers than the source.
        - A mask or bias built by cheap elementwise ops (`_PRODUCERS`, pointwise ops, index ops whose
          indices are computed from sizes) that reaches no product operand: its draws must be values
          its producer can give (BLOOM's ALiBi, slopes x distances, is finite and bounded; a padding
          mask from an attention_mask holds 0 and finfo.min). Its sources are drawn instead.

        Only where nothing writes in place into the memory `b` or its inputs read (the recomputed value
        is then the value the region read), and `b` stays within the size budget.
        """
        if b.op != "call_function" or _is_random(b) or b.target is aten.view.dtype:
            return False
        schema = getattr(b.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return False
        if any(self.root.get(n, n) in self.writers for n in [b, *b.all_input_nodes]):
            return False
        val = b.meta.get("val")
        if b.target is operator.getitem:      # a piece of a split: the split is the view
            return getattr(b.args[0], "target", None) in _SPLITS
        if b.target in _VIEWS:
            return True
        if not isinstance(val, torch.Tensor) or _numel_hint(val) > MAX_ELEMENTS or self._feeds_product(b):
            return False
        if b.target in _PRODUCERS or torch.Tag.pointwise in getattr(b.target, "tags", ()):
            return True
        if b.target in _INDEXING:
            data = {aten.index.Tensor: [b.args[0]], aten.index_select.default: [b.args[0]],
                    aten.embedding.default: [b.args[0]], aten.gather.default: [b.args[0]]}[b.target]
            indices = [a for a in b.all_input_nodes if a not in data]
            return all(i in self.pure for i in indices)
        return False

    @property
    def old_gm(self) -> fx.GraphModule:
        return self.graphs()[0]

    @property
    def new_gm(self) -> fx.GraphModule:
        return self.graphs()[1]

    def native_source(self) -> fx.GraphModule:
        """The source region as it runs in the graph (its own dtypes and devices): a first-call fallback."""
        return self._extract(self.computed["old"], self.old, "NativeSource", native=True)

    def use(self, reduction) -> None:
        """Check at the reduced sizes of `reduction` (validate_sizes.reduce_pair) from now on."""
        self._graphs = (reduction.old_gm, reduction.new_gm)
        self.inputs = reduction.inputs
        self.sizes_note = (f"{reduction.note} (the traced static sizes generalized; "
                           "passes/validate_sizes.py says why that is sound)")

    def graphs(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        """The two standalone graphs, built on first use (a cache hit never needs them)."""
        if self._graphs is None:
            self._graphs = (self._extract(self.computed["old"], self.old, "Source"),
                            self._extract(self.computed["new"], self.new, "Rewrite"))
        return self._graphs

    def _check_writes(self, order: dict) -> None:
        """A boundary input is one random value for both sides: sound only if no in-place write
        into its memory falls between the reads of the source and those of the rewrite (which sit
        just before the replaced output)."""
        inside = self.computed["old"] | self.computed["new"]
        readers: dict[fx.Node, list[fx.Node]] = {}
        for n in inside:
            base = self.root[n]
            if base in self.writers and base not in inside:
                readers.setdefault(base, []).append(n)
        for base, nodes in readers.items():
            first, last = min(order[n] for n in nodes), max(order[n] for n in nodes)
            for w in self.writers[base]:
                if w not in inside and first < order[w] < last:
                    raise CannotCheck(f"{base.name} is written in place by {w.name} between the reads "
                                      "of the source and of the rewrite")

    # -- sizes ---------------------------------------------------------------------------------
    def _symbols(self) -> set:
        syms = set()
        for n in self.boundary + list(self.computed["old"] | self.computed["new"]):
            val = n.meta.get("val")
            for x in _sizes_of(val):
                if not isinstance(x, int):
                    syms |= x.node.expr.free_symbols
        return syms

    def _sizes(self, shape_env) -> tuple[dict, str]:
        syms = self._symbols()
        if not syms:
            return {}, "the traced (static) sizes"
        if shape_env is None:
            raise CannotCheck("symbolic sizes without a shape environment to read their hints from")
        # backed_var_to_val: torch >= 2.13 (var_to_val is deprecated there); var_to_val: 2.11
        to_val = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val
        hints = {s: int(to_val[s]) for s in syms}
        self.subs = hints
        largest = max([self._numel(n) for n in self.computed["old"] | self.computed["new"]] + [1])
        names = lambda subs: ", ".join(f"{s}={v}" for s, v in sorted(subs.items(), key=lambda kv: str(kv[0])))
        if largest <= MAX_ELEMENTS:
            return hints, f"the size hints {names(hints)}"
        reduced = {s: min(v, REDUCED_SIZE) for s, v in hints.items()}
        if _guards_hold(shape_env, reduced):
            return reduced, f"reduced sizes {names(reduced)} (hints {names(hints)})"
        return hints, f"the size hints {names(hints)} (smaller sizes break the graph's guards)"

    def _numel(self, n: fx.Node) -> int:
        """The largest tensor `n` makes, the scores an attention op makes inside included."""
        val = n.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else [val]
        shapes = [v.shape for v in vals if isinstance(v, torch.Tensor)]
        scores = score_shape(n, lambda a: a.meta.get("val") if isinstance(a, fx.Node) else None)
        if scores is not None:
            shapes.append(scores)
        return max([math.prod(_concrete(s, self.subs) for s in shape) for shape in shapes] + [0])

    # -- boundary inputs -----------------------------------------------------------------------
    def _input(self, b: fx.Node) -> _Input:
        val = b.meta.get("val")
        if not isinstance(val, torch.Tensor):
            if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
                return _Input(b, "size", value=_concrete(val, self.subs))
            if isinstance(val, (float, bool)):
                return _Input(b, "scalar", value=val)
            if isinstance(val, torch.SymFloat):
                return _Input(b, "scalar", value=float(val.node.hint))
            raise CannotCheck(f"boundary input {b.name} is a {type(val).__name__}, not a tensor or a number")
        shape = tuple(_concrete(s, self.subs) for s in val.shape)
        stride = tuple(_concrete(s, self.subs) for s in val.stride())
        fixed = self._guarded_value(b)
        if fixed is not None:
            return _Input(b, "fixed", shape, stride, torch.float64 if val.dtype in FLOAT_DTYPES else val.dtype,
                          value=fixed)
        if val.dtype in FLOAT_DTYPES:
            kind = "data" if self._feeds_product(b) else "float"
            return _Input(b, kind, shape, stride, torch.float64, source_dtype=val.dtype)
        if val.dtype == torch.bool:
            return _Input(b, "bool", shape, stride, torch.bool)
        if val.dtype.is_floating_point or val.dtype.is_complex:
            raise CannotCheck(f"boundary input {b.name} is {val.dtype}")
        rng = self._int_range(b)
        if rng is None:
            return _Input(b, "int", shape, stride, val.dtype, -2, 3)
        kind, low, high, queries = rng
        return _Input(b, kind, shape, stride, val.dtype, low, high, queries=queries)

    def _guarded_value(self, b: fx.Node):
        """The value of a one-element tensor that the region reads only through `.item()`, where the
        trace specialized that number with a guard (a python float Dynamo passed as a tensor under
        dynamic=True, read by the detector as the scale): the graph only ever runs with that value."""
        val = b.meta["val"]
        users = self._users_inside(b)
        if val.numel() != 1 or not users or any(u.target is not aten.item.default for u in users):
            return None
        values = set()
        for u in users:
            x = u.meta.get("val")
            if isinstance(x, (torch.SymFloat, torch.SymInt)):
                expr = self.shape_env.replace(x.node.expr) if self.shape_env is not None else x.node.expr
                if expr.is_number:
                    x = float(expr) if isinstance(x, torch.SymFloat) else int(expr)
                elif x.node.hint is not None:
                    # guarded through a function of it (`math.sqrt(scale)` specialized by the detector's
                    # float()): check at the traced value, the one those guards admit
                    x = float(x.node.hint) if isinstance(x, torch.SymFloat) else int(x.node.hint)
                else:
                    return None
            if not isinstance(x, (int, float)):
                return None
            values.add(x)
        return values.pop() if len(values) == 1 else None

    def _users_inside(self, n: fx.Node):
        return [u for u in n.users if u in self.computed["old"] or u in self.computed["new"]]

    def _feeds_product(self, b: fx.Node) -> bool:
        """Whether `b` reaches an operand of a product (q, k, v) without passing a softmax.

        Such inputs are drawn normal only: an extreme q or k makes both sides' rounding (of
        different but equivalent orderings) differ far beyond any tolerance. Masks and biases,
        which reach the products only through the softmax, get the edge values.
        """
        stack, seen = [b], set()
        while stack:
            n = stack.pop()
            for u in self._users_inside(n):
                if u in seen or u.target in SOFTMAX_FORMS:
                    continue
                seen.add(u)
                if u.target in MATRIX_PRODUCTS and not (u.target is aten.baddbmm.default and u.args[0] is n):
                    return True               # (baddbmm's first operand is added, not multiplied)
                if is_attention_op(u):
                    if any(a is n for a in u.args[:3]):
                        return True
                    continue
                stack.append(u)
        return False

    def _int_range(self, b: fx.Node):
        """(kind, low, high, queries) of an integer input from how the region consumes it, or None for a number;
        queries: the Tq of a paged_attention reading it as its lengths (else 0)."""
        found = None
        stack, seen = [b], set()
        while stack:
            n = stack.pop()
            for u in self._users_inside(n):
                if u in seen:
                    continue
                seen.add(u)
                rng = self._consumer_range(n, u)
                if rng is not None:
                    rng = (*rng, 0) if len(rng) == 3 else rng
                    found = rng if found is None else (found[0], max(found[1], rng[1]), min(found[2], rng[2]),
                                                       max(found[3], rng[3]))
                elif u.target in _KEEPS_INDEX_ROLE:
                    stack.append(u)
        return found

    def _consumer_range(self, n: fx.Node, u: fx.Node):
        def size(node, dim):
            return _concrete(node.meta["val"].shape[dim], self.subs)
        t = u.target
        if t is aten.index.Tensor and u.args[0] is not n:
            for dim, idx in enumerate(u.args[1]):
                if idx is n:
                    return ("index", 0, size(u.args[0], dim) - 1)
        if t in (aten.index_select.default, aten.gather.default) and u.args[2] is n:
            return ("index", 0, size(u.args[0], u.args[1]) - 1)
        if t is aten.embedding.default and u.args[1] is n:
            return ("index", 0, size(u.args[0], 0) - 1)
        if t in (aten.index_put_.default, aten.index_put.default):
            for dim, idx in enumerate(u.args[1]):
                if idx is n:
                    return ("index", 0, size(u.args[0], dim) - 1)
        if is_attention_op(u) and "paged" in str(t):
            table, lens, cache = u.args[3], u.args[4], u.args[1]
            if n is table:
                return ("index", 0, size(cache, 0) - 1)
            if n is lens:
                return ("length", 0, size(table, 1) * size(cache, 2), size(u.args[0], 2))
        if t in COMPARISONS:
            other = u.args[1] if u.args[0] is n else u.args[0]
            if isinstance(other, fx.Node) and other in self.pure:
                # a length or position compared with positions: inside what those positions span
                return ("length", 0, max([_concrete(s, self.subs) for s in other.meta["val"].shape] + [1]))
        return None

    # -- the standalone graphs -----------------------------------------------------------------
    def _extract(self, inside: set[fx.Node], out: fx.Node, name: str, native: bool = False) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for b in self.boundary:
            env[b] = g.placeholder(b.name)
            env[b].meta["val"] = b.meta.get("val")
        for n in self.gm.graph.nodes:
            if n in inside:
                env[n] = g.node_copy(n, lambda a: env[a])
                if not native:
                    to_float64_cpu(env[n])
        g.output(env[out])
        module = fx.GraphModule(self.gm, g, class_name=name)
        if not native:
            constants_to_float64_cpu(module)
        return module

    def key(self) -> str:
        """The structure of both sides and their inputs, independent of node names."""
        parts = [repr([(i.kind, i.shape, i.stride, str(i.dtype), i.low, i.high, i.value) for i in self.inputs])]
        index = {b: f"in{i}" for i, b in enumerate(self.boundary)}
        for side, out in (("old", self.old), ("new", self.new)):
            nodes = [n for n in self.gm.graph.nodes if n in self.computed[side]]
            index.update({n: f"%{side}{j}" for j, n in enumerate(nodes)})
            def ref(a):
                return index[a] if isinstance(a, fx.Node) else a
            for n in nodes:
                target = n.target
                if n.op == "get_attr":
                    t = getattr(self.gm, target)
                    if isinstance(t, torch.Tensor):
                        data = t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                        target = f"const:{t.dtype}:{list(t.shape)}:{hashlib.sha1(data).hexdigest()}"
                parts.append(repr((n.op, str(target), tree_map(ref, n.args), tree_map(ref, n.kwargs))))
            parts.append(f"out {index[out]}")
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()

    # -- running -------------------------------------------------------------------------------
    def _draws(self, count: int) -> list[list]:
        g = torch.Generator().manual_seed(0)
        return [[_draw(i, d, g) for i in self.inputs] for d in range(count)]

    def check(self, count: int, repro_dir: str | None) -> Verdict:
        styles = ["normal", "edge values", "masked rows"][:count] + ["normal"] * max(0, count - 3)
        shapes = " ".join(i.describe() for i in self.inputs if i.kind not in ("size", "scalar"))
        checked_on = (f"float64 CPU, {count} input draws ({', '.join(styles)}) on inputs {shapes} "
                      f"at {self.sizes_note}, dropout off")
        skipped = []
        draws = self._draws(count)
        for d, inputs in enumerate(draws):
            failure = self._compare(inputs)
            if failure.startswith(_SOURCE_RAISED):
                # inputs outside the source's own domain (a drawn scalar under math.sqrt) say nothing
                # about the rewrite: skip the draw, but some draw must run the source
                skipped.append((d, failure))
                continue
            if failure:
                repro = write_repro(self, inputs, failure, repro_dir)
                reason = (f"translation validation failed: {failure} on random inputs (draw {d}: {styles[d]}) "
                          f"[{shapes}] at {self.sizes_note}; repro: {repro}")
                return Verdict(False, checked_on, reason, repro)
        if len(skipped) == count:
            d, failure = skipped[0]
            repro = write_repro(self, draws[d], failure, repro_dir)
            return Verdict(False, checked_on, f"translation validation could not run the source on any draw "
                                              f"({failure}); repro: {repro}", repro)
        if skipped:
            checked_on += (f" (draw{'s' if len(skipped) > 1 else ''} {', '.join(str(d) for d, _ in skipped)} "
                           f"skipped: the source itself raised on {'them' if len(skipped) > 1 else 'it'})")
        ran = next(d for d in range(count) if d not in {d for d, _ in skipped})
        fallback = self.fallback_graphs()
        if fallback is not None:
            # the site's op checks a module buffer on the device: its dense fallback is checked too, once
            source, rewrite, buffers = fallback
            failure = self._compare(draws[ran], (source, rewrite))
            if failure:
                repro = write_repro(self, draws[ran], failure, repro_dir, graphs=(source, rewrite))
                names = ", ".join(f"`{b}`" for b in buffers) or "its buffer"
                reason = (f"translation validation failed: the op's dense fallback, which it takes when its device "
                          f"check finds {names} changed (`verified` False), differs from the source at such a value: "
                          f"{failure} on draw {ran} ({styles[ran]}) [{shapes}] with {FALLBACK_CHANGE}, at "
                          f"{self.sizes_note}; repro: {repro}")
                return Verdict(False, checked_on, reason, repro)
            checked_on += (f"; the op's dense fallback (`verified` False) once more, on draw {ran} with "
                           f"{FALLBACK_CHANGE}")
        return Verdict(True, checked_on)

    def fallback_graphs(self) -> tuple[fx.GraphModule, fx.GraphModule, list[str]] | None:
        """(source, rewrite, buffer placeholder names): the pair to check the dense fallback of an op that checks
        a module buffer on the device (`verified`, issue 22 class 1), or None when the rewrite has no such op.

        Both sides read every buffer `buffers.freeze` made a constant at one changed value (`_changed`: what a
        write through `.data` could leave, no longer the structure), and the rewrite's op gets `verified` False
        whatever its check computes, so the bias it applies densely then (`Decision.fallback`) is what is compared:
        a wrong fallback is refused even when no draw ever makes the check fail. One evaluation per such site."""
        old_gm, new_gm = self.graphs()
        if not any(is_attention_op(n) and isinstance(n.kwargs.get("verified"), fx.Node) for n in new_gm.graph.nodes):
            return None
        frozen = frozen_buffers(self.gm)
        read = sorted({n.target for gm in (old_gm, new_gm) for n in gm.graph.nodes
                       if n.op == "get_attr" and n.target in frozen})
        g = torch.Generator().manual_seed(0)
        values = {t: _changed(getattr(new_gm, t) if hasattr(new_gm, t) else getattr(old_gm, t), g) for t in read}
        graph = copy.deepcopy(new_gm.graph)
        for n in list(graph.nodes):
            if is_attention_op(n) and isinstance(n.kwargs.get("verified"), fx.Node):
                with graph.inserting_before(n):
                    failed = graph.call_function(aten.full.default, ([], False), {"dtype": torch.bool})
                n.kwargs = {**n.kwargs, "verified": failed}
        graph.eliminate_dead_code()      # the check itself is not run: its result is replaced
        source = fx.GraphModule(old_gm, copy.deepcopy(old_gm.graph), class_name="Source")
        rewrite = fx.GraphModule(new_gm, graph, class_name="Rewrite")
        for target, value in values.items():
            for module in (source, rewrite):
                if hasattr(module, target):
                    setattr(module, target, value)
        return source, rewrite, [frozen[t].name for t in read]

    def _compare(self, inputs: list, graphs: tuple[fx.GraphModule, fx.GraphModule] | None = None) -> str:
        old_gm, new_gm = graphs or self.graphs()
        with reference_ops():                    # one thread for the comparison too
            try:
                want = run_float64(old_gm, _cloned(inputs))
            except Exception as e:
                return f"{_SOURCE_RAISED} {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            try:
                got = run_float64(new_gm, _cloned(inputs))
            except Exception as e:
                return (f"the rewrite raised {type(e).__name__} where the source computes: "
                        f"{str(e).splitlines()[0][:200]}")
            return compare(want, got)


# --------------------------------------------------------------------------------------------
# helpers

def _sizes_of(val):
    vals = val if isinstance(val, (tuple, list)) else [val]
    for v in vals:
        if isinstance(v, torch.Tensor):
            yield from v.shape
            yield from v.stride()
        elif isinstance(v, torch.SymInt):
            yield v


def _aliasing(graph: fx.Graph) -> tuple[dict, dict]:
    """(root, writers): each node's alias root through views and in-place ops, and the nodes that
    write in place into each root's memory."""
    root: dict[fx.Node, fx.Node] = {}
    writers: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        root[n] = n
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if schema is None:
            continue
        if schema.returns and schema.returns[0].alias_info is not None and n.args and \
                isinstance(n.args[0], fx.Node):
            root[n] = root[n.args[0]]
        for arg, value in zip(schema.arguments, n.args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node):
                writers.setdefault(root[value], []).append(n)
    return root, writers


def _guards_hold(shape_env, subs: dict) -> bool:
    """Whether every guard recorded while tracing holds with the symbols replaced by `subs`."""
    try:
        for guard in shape_env.guards:
            if not bool(guard.expr.xreplace(subs)):
                return False
        for sym, r in shape_env.var_to_range.items():
            if sym in subs and not (r.lower <= subs[sym] <= r.upper):
                return False
    except (TypeError, AttributeError):
        return False
    return True


_SOURCE_RAISED = "the source region raised"


def _cloned(inputs: list) -> list:
    # a region may write into its inputs (a paged cache update): each side gets its own copy
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, t.shape[-1]) if t.dim() else t.view(1, 1)


# How the fallback check changes a buffer (`_changed`), in the report's words.
FALLBACK_CHANGE = "each module buffer the op checks changed: its entries shuffled, its first row at its least entry"


def _changed(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A value a write through `.data` could leave in a buffer a structure was proven from: its own entries
    shuffled (a tril of ones: a random 0 / 1 mask of the same density; an ALiBi table: no longer a function of
    j - i) and its first row (dim -2) at its least entry (a keep-mask's row with every key hidden: NaN in eager's
    softmax, which the fallback must give too). Values of the buffer's own kind, so each masks as it did."""
    flat = t.reshape(-1)
    changed = flat[torch.randperm(flat.numel(), generator=g)].reshape(t.shape).clone()
    if changed.dim() >= 2 and changed.numel():
        changed.select(-2, 0).fill_(flat.min())
    return changed


def _draw(i: _Input, style: int, g: torch.Generator):
    """One random value for boundary input `i`; style 0 normal, 1 edge values, 2 masked rows."""
    if i.kind in ("size", "scalar"):
        return i.value
    if i.kind == "fixed":
        return torch.full(i.shape, i.value, dtype=i.dtype)
    # dims broadcast in the source (stride 0) stay broadcast: draw them once, then expand
    base_shape = [1 if st == 0 else s for s, st in zip(i.shape, i.stride)]
    n = math.prod(base_shape)
    if i.kind == "data":
        t = torch.randn(base_shape, generator=g, dtype=torch.float64)
    elif i.kind == "float":
        t = torch.randn(base_shape, generator=g, dtype=torch.float64)
        if style == 1:
            pick = torch.randint(0, 5, base_shape, generator=g)
            lowest = torch.finfo(i.source_dtype or torch.float32).min   # HF's finfo(dtype).min masks
            t = torch.where(pick == 1, 0.0, torch.where(pick == 2, lowest, torch.where(pick == 3, -t.abs() * 1e4, t)))
            if t.numel() and t.shape[-1:] != (0,):
                _rows(t)[0] = lowest          # a row masked with a finite value: a uniform average
        elif style == 2:
            pick = torch.randint(0, 10, base_shape, generator=g)
            t = torch.where(pick < 4, 0.0, torch.where(pick < 7, 1.0, float("-inf")))
            if t.numel():
                _rows(t)[0] = float("-inf")   # a fully masked row: NaN in eager softmax
    elif i.kind == "bool":
        p = (0.5, 0.15, 0.9)[style % 3]
        t = torch.rand(base_shape, generator=g) < p
        if t.numel():
            rows = _rows(t)
            rows[0] = False                   # every key masked
            if rows.shape[0] > 1:
                rows[1] = True                # none masked
    elif i.kind in ("index", "length"):
        if i.high < i.low:
            raise CannotCheck(f"{i.node.name} indexes an empty dim")
        # lengths: the normal draw keeps every sequence non-empty and the edge draw empties one.
        # (A batch where *every* length is 0 is not drawn: on 2026-12-01 the paged reference
        # crashed on it, a bug of lowering/reference.py reported to its owner, not of a rewrite.)
        low = max(i.low, 1) if i.kind == "length" and i.high >= 1 else i.low
        t = torch.randint(low, i.high + 1, base_shape, generator=g)
        if style == 1 and n:
            t.view(-1)[0], t.view(-1)[-1] = i.low, i.high
        elif style == 2:
            t.fill_(i.high if i.kind == "length" else i.low)
        # a chunk of Tq queries longer than its sequence (its first queries see no key): in every draw but the
        # first, one sequence gets a length in [1, Tq) (the last with the edge values: the first is 0 there)
        short = min(i.queries - 1, i.high)
        if i.kind == "length" and style > 0 and n and short >= 1 and max(i.low, 1) <= short:
            t.view(-1)[-1 if style == 1 and n > 1 else 0] = int(torch.randint(max(i.low, 1), short + 1, (),
                                                                              generator=g))
        t = t.to(i.dtype)
    else:
        values = torch.tensor([0, 1, -1, 2, -2, 3], dtype=torch.int64)
        t = values[torch.randint(0, (2, 6, 3)[style % 3], base_shape, generator=g)]
        if style and t.numel():
            rows = _rows(t)
            rows[0] = 0                       # an all-zero row: a sequence with every token padded
            if style == 2 and rows.shape[0] > 1:
                rows[1] = 1                   # and one with none
        t = t.to(i.dtype)
    if i.kind in ("data", "float"):
        t = t.to(torch.float64)               # torch.where of python scalars gives the default dtype
    t = t.expand(i.shape) if list(t.shape) != list(i.shape) else t
    if t.stride() != i.stride and all(st != 0 for st in i.stride):
        # the source saw these strides (a transposed view, say): a later .view may depend on them
        out = torch.empty_strided(i.shape, i.stride, dtype=t.dtype)
        out.copy_(t)
        t = out
    return t


# --------------------------------------------------------------------------------------------
# the repro

def write_repro(pair: _Pair, inputs: list, failure: str, repro_dir: str | None,
                graphs: tuple[fx.GraphModule, fx.GraphModule] | None = None) -> str:
    """A runnable .py holding both subgraphs (`graphs`, else the pair's) and the inputs on which they differ."""
    folder = repro_dir or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="attnlower_validate_", suffix=".py", dir=folder)
    graphs = graphs or (pair.old_gm, pair.new_gm)
    consts = {}
    for gm in graphs:
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                consts[n.target] = getattr(gm, n.target)
    buf = io.BytesIO()
    torch.save({"inputs": inputs, "constants": consts}, buf)
    blob = base64.b64encode(buf.getvalue()).decode()
    with os.fdopen(fd, "w") as f:
        f.write("# attnlower translation validation: the rewrite of a site differs from the region it replaced.\n")
        f.write(f"# {failure}\n")
        f.write("# Run: python this_file.py  (evaluates both in float64 on CPU and prints the difference)\n")
        f.write("import base64\nimport io\n\nimport torch\nimport torch.fx\nfrom torch import device\n"
                "from math import inf, nan  # printed graphs spell them bare\n\n"
                "import attnlower.lowering.ops  # noqa: F401  registers torch.ops.attnlower\n"
                "from attnlower.passes.evaluate import compare, run_float64, sdpa_reference\n\n"
                "# the copies call SDPA by its math definition (evaluate.sdpa_reference): a leaf when traced\n"
                "attnlower_passes_evaluate_sdpa_reference = sdpa_reference\n"
                "torch.fx.wrap('attnlower_passes_evaluate_sdpa_reference')\n\n")
        for gm in graphs:
            f.write(gm.print_readable(print_output=False))
            f.write("\n\n")
        f.write(f"DATA = {blob!r}\n\n")
        f.write("if __name__ == '__main__':\n"
                "    data = torch.load(io.BytesIO(base64.b64decode(DATA)), weights_only=False)\n"
                "    source, rewrite = Source(), Rewrite()\n"
                "    for name, value in data['constants'].items():\n"
                "        setattr(source, name, value)\n"
                "        setattr(rewrite, name, value)\n"
                "    want = run_float64(source, [x.clone() if isinstance(x, torch.Tensor) else x for x in data['inputs']])\n"
                "    got = run_float64(rewrite, [x.clone() if isinstance(x, torch.Tensor) else x for x in data['inputs']])\n"
                "    print(compare(want, got) or 'the two agree')\n")
    return path
