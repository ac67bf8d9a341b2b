"""Translation validation on the first call: sampled rows of a site's real output against its source.

A static site too large to evaluate at compile time that cannot be reduced either
(`validate_sizes.CannotReduce`: a window wider than any affordable size, a literal of two readings) is
checked on the first call of the compiled graph, on the real inputs. The validate stage puts a node
after the fused op, `first_call_check(plan, out, *boundary)`, which the backend keeps only in a copy of
the graph that runs, eagerly, on the first call (`split_first_call_checks`, `FirstCallChecked`): later
calls run the compiled graph without it.

The check (`Plan.run`): pick a few indices of every dim of the site's output but the last (first, last
and spread; the query rows get the most), trace that restriction up the source region op by op
(`_demands`: a product's rows come from its first operand's rows and all of its second, a softmax over
the keys keeps the query rows, a view keeps a dim that it does not merge, ...), and evaluate the source
on the restricted real inputs in float64 on CPU (`_RestrictedRun`; a dim an op cannot restrict is
computed whole and sliced after). Those elements of the fused op's output must match within the op's
dtype's tolerance (`TOLERANCE`). The causal masks a region builds from positions (arange, tril / triu,
SDPA's is_causal) are built at the sampled rows' own positions.

A failure is loud and safe: the check returns the unfused region's own output (the region as written,
evaluated on the device) for this call, logs a warning, marks the site refused in the report, and the
graph is compiled again with that site (and every site of the same structure) unfused for later calls.
Wrong numbers are never returned, and a correct program keeps running: a rewrite bug of attnlower's
must not crash it. With `strict=True` the check raises `FirstCallCheckFailed` instead.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
import operator
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .evaluate import compare_scaled, reference_ops, sdpa_reference
from .verdicts import record_first_call, refuse_by_structure
from .vocabulary import BROADCASTS, CASTS, COPIES, DROPOUTS, PERMUTES, RESHAPES, SOFTMAX_OPS, SQUEEZES

aten = torch.ops.aten
log = logging.getLogger("attnlower")

# max |op - reference| / max |reference| over the sampled elements, by the output's dtype. The reference
# is float64 on the op's own (rounded) inputs, so this is the op's error alone: bench/accuracy.py measured
# 2.5e-3 for bf16 at D=128, N=4096 against float64 (H100, 2026-11-23); fp32 may use TF32 dots on the GPU
# (~1e-3). Each bound is ~10x that; a dropped causal flag or scale is off by 0.1-1 on the first rows.
TOLERANCE = {torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-6}
# Most elements one check may create (float64 on CPU): 2**24 (128 MiB).
BUDGET = 2 ** 24
# Indices sampled along the output's largest dim (the query rows) and along each other dim but the last.
ROWS, OTHERS = 16, 2

_LAYOUT = RESHAPES | BROADCASTS | PERMUTES | SQUEEZES | COPIES | {aten.slice.Tensor, aten.select.int,
                                                                  operator.getitem}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
# Ops that make a tensor from a size, a fill and a dtype (and read another tensor for its size or
# dtype only): made at the restricted shape. The fill value's position, or None for zeros / ones / empty.
_MAKERS = {aten.full.default: 1, aten.ones.default: None, aten.zeros.default: None, aten.empty.memory_format: None,
           aten.new_full.default: 2, aten.new_ones.default: None, aten.new_zeros.default: None,
           aten.new_empty.default: None, aten.zeros_like.default: None, aten.ones_like.default: None,
           aten.full_like.default: 1, aten.empty_like.default: None}
_ONES = {aten.ones.default, aten.new_ones.default, aten.ones_like.default}
# elementwise ops not tagged pointwise (the torch-level bitwise operators, where with a number, ...)
_ELEMENTWISE = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.ScalarOther, aten.where.ScalarSelf,
                aten.where.Scalar, aten.__and__.Tensor, aten.__or__.Tensor, aten.__xor__.Tensor}
_REDUCTIONS = {aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.mean.dim, aten.logsumexp.default,
               aten.any.dim, aten.all.dim, aten.max.dim, aten.min.dim}

_PLANS: dict[int, "Plan"] = {}
_next_plan = itertools.count()


class FirstCallCheckFailed(RuntimeError):
    """A fused site's output differs from its source on the first call (raised with strict=True)."""


class CannotPlan(Exception):
    """The source region cannot be evaluated on sampled rows within the budget; the message says why."""


@dataclass
class Plan:
    """One site's first-call check: the restricted evaluation planned at compile time."""

    key: str                        # the pair's structural key (verdicts.py)
    site: str                       # "site 3 (file.py:12 in f: ...)", for messages
    index: int                      # the site's row in its graph's report
    source: fx.GraphModule          # the region, float64 on CPU (validate._Pair's Source copy)
    native: fx.GraphModule          # the region as it runs in the graph: the fallback
    restriction: dict               # output dim -> sampled indices (int64, CPU)
    demands: dict                   # source node -> the restriction it is computed with
    needs: dict                     # (node, input) -> the restriction the node reads that input with
    elements: int                   # elements the check creates
    dtype: torch.dtype              # the output's dtype (its tolerance)
    source_shape: list = field(default_factory=list)   # the output's shape
    why: str = ""                   # why not at compile time (validate sets it)
    boundary: list = field(default_factory=list)       # the graph's nodes the check reads (validate sets it)
    strict: bool = False            # raise instead of falling back (the backend sets it)
    also: list = field(default_factory=list)   # report rows of sites of the same structure
    result: str = ""                # what the check found ("" before the first call)
    failed: str = ""                # the refusal reason when it failed
    seconds: float = 0.0
    error: float = 0.0              # max |op - source| / max |source| over the sampled elements
    id: int = -1

    def describe(self, shape) -> str:
        picked = "x".join(str(len(self.restriction[d])) if d in self.restriction else str(s)
                          for d, s in enumerate(shape))
        return f"{picked} sampled elements of the output {list(shape)}"

    # -- the check ----------------------------------------------------------------------------------
    def run(self, out: torch.Tensor, boundary: list) -> str:
        """Compare the sampled elements of the op's `out` with the source's; '' when they agree, else why.
        Sets `error`, max |op - source| / max |source| over them."""
        with reference_ops(), torch.no_grad():
            want = _RestrictedRun(self).run(boundary)
            got = _restrict(out.detach(), self.restriction, {})
        keep = ~torch.isnan(want) & ~torch.isnan(got) & torch.isfinite(want)
        scale = float(want[keep].abs().max()) if keep.any() else 0.0
        self.error = float((want[keep] - got[keep]).abs().max()) / scale if scale > 0 else 0.0
        return compare_scaled(want, got, TOLERANCE.get(self.dtype, 1e-2))


def first_call_check(plan_id: int, out: torch.Tensor, *boundary):
    """The node the validate stage puts after a fused op checked on the first call: returns `out`, or
    the unfused region's output when the sampled elements differ (`Plan`)."""
    plan = _PLANS.get(plan_id)
    if plan is None or plan.result:
        return out
    started = time.perf_counter()
    try:
        failure = plan.run(out, list(boundary))
    except Exception as e:  # noqa: BLE001 - a check that cannot run leaves the site as it was, and says so
        plan.seconds = time.perf_counter() - started
        plan.result = (f"not validated: the first-call check could not run ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]})")
        log.warning("attnlower: %s: %s", plan.site, plan.result)
        return out
    plan.seconds = time.perf_counter() - started
    shape = list(out.shape)
    checked = (f"first call: float64 CPU on {plan.describe(shape)} against the source region on the real "
               f"inputs ({plan.seconds:.3f} s; max error {plan.error:.2g} x max |source|, tolerance "
               f"{TOLERANCE.get(plan.dtype, 1e-2):g} for {str(plan.dtype).replace('torch.', '')}; "
               f"not at compile time: {plan.why})")
    if not failure:
        plan.result = checked
        return out
    plan.result = checked
    plan.failed = f"translation validation failed on the first call: {failure} on {plan.describe(shape)}"
    if plan.strict:
        raise FirstCallCheckFailed(f"attnlower: {plan.site}: {plan.failed}. The fused op would have returned "
                                   "these numbers (strict=True raises instead of running the unfused region); "
                                   "please report it with this message. options validate=False skips the check")
    plan.failed += ("; the unfused region ran instead, and the graph is compiled again without this site. "
                    "Please report it; options validate=False skips the check")
    log.warning("attnlower: %s refused: %s", plan.site, plan.failed)
    return plan.native(*boundary)


# --------------------------------------------------------------------------------------------
# planning: which part of each value the sampled output elements need

def plan_for(pair, site: str, index: int) -> Plan:
    """The first-call check of `pair` (a static `validate._Pair` at its traced sizes); raises CannotPlan."""
    old_gm = pair.graphs()[0]
    out_node = next(n for n in old_gm.graph.nodes if n.op == "output").args[0]
    out_val = out_node.meta.get("val")
    if not isinstance(out_val, torch.Tensor) or out_val.dim() < 2:
        raise CannotPlan("the region's output is not a tensor of two or more dims")
    restriction = _sample(list(out_val.shape))
    demands, needs = _demands(old_gm, out_node, restriction)
    elements = _elements(old_gm, demands)
    if elements > BUDGET:
        raise CannotPlan(f"evaluating sampled rows would create {elements} elements, over the {BUDGET} allowed")
    plan = Plan(key="", site=site, index=index, source=old_gm, native=pair.native_source(), restriction=restriction,
                demands=demands, needs=needs, elements=elements, dtype=out_val.dtype,
                source_shape=[int(s) for s in out_val.shape])
    plan.id = next(_next_plan)
    _PLANS[plan.id] = plan
    return plan


def _sample(shape: list[int]) -> dict:
    """Indices of every dim but the last: ROWS along the largest (first, last, spread, a few random),
    OTHERS (first and last) along the rest; dims of size 1 or 2 whole."""
    g = torch.Generator().manual_seed(0)
    dims = [d for d in range(len(shape) - 1) if shape[d] > 2]
    rows = max(dims, key=lambda d: shape[d], default=None)
    out = {}
    for d in dims:
        n = shape[d]
        k = ROWS if d == rows else OTHERS
        picks = {0, n - 1} | {round(x) for x in torch.linspace(0, n - 1, max(k // 2, 2)).tolist()}
        picks |= set(torch.randint(0, n, (max(k - len(picks), 0),), generator=g).tolist())
        out[d] = torch.tensor(sorted(picks)[:max(k, 2)] if len(picks) > k else sorted(picks), dtype=torch.int64)
    return out


def _shape(n) -> list | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return [int(s) for s in val.shape]
    if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
        return [int(s) for s in val[0].shape]
    return None


def _meet(a: dict | None, b: dict) -> dict:
    if a is None:
        return dict(b)
    return {d: i for d, i in a.items() if d in b and torch.equal(b[d], i)}


def _demands(gm: fx.GraphModule, out: fx.Node, restriction: dict) -> tuple[dict, dict]:
    """For each node the sampled output needs: the restriction it is computed with (what its users need
    and its op can give), and for each (node, input) the restriction the node reads the input with."""
    wanted: dict[fx.Node, dict] = {out: dict(restriction)}
    demands: dict[fx.Node, dict] = {}
    needs: dict[tuple, dict] = {}
    for n in reversed(list(gm.graph.nodes)):
        if n not in wanted or n.op in ("output",):
            continue
        want = wanted[n]
        if n.op != "call_function":
            demands[n] = want            # placeholders and constants: sliced as read
            continue
        computed, reads = _rule(n, want)
        demands[n] = computed
        for x, need in reads:
            needs[(n, x)] = need
            wanted[x] = _meet(wanted.get(x), need)
    return demands, needs


def _aligned(x: fx.Node, out_shape: list, want: dict) -> dict:
    """The restriction an elementwise op's input `x` (broadcast against the output) is read with."""
    xs = _shape(x)
    if xs is None:
        return {}
    offset = len(out_shape) - len(xs)
    return {d - offset: i for d, i in want.items() if d - offset >= 0 and xs[d - offset] == out_shape[d] != 1}


def _tensor_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if _shape(a) is not None or isinstance(a.meta.get("val"), (tuple, list))]


def _rule(n: fx.Node, want: dict) -> tuple[dict, list]:
    """(the restriction `n` is computed with, [(input, the restriction it is read with)])."""
    t, shape = n.target, _shape(n)
    inputs = _tensor_inputs(n)
    everything = ({}, [(x, {}) for x in inputs])
    if shape is None and t is not operator.getitem and t not in _SPLITS:
        return everything
    if t in _MAKERS or t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        return want, []                  # made at the restricted shape; a *_like reads a size only
    if t in PERMUTES:
        perm = _permutation(n, len(shape))
        return want, [(n.args[0], {perm[d]: i for d, i in want.items()})]
    if t in SQUEEZES:
        return _squeeze_rule(n, want, shape)
    if t in BROADCASTS:
        return want, [(n.args[0], _aligned(n.args[0], shape, want))]
    if t in RESHAPES and t not in (aten.flatten.using_ints, aten.unflatten.int) and t is not aten.view_as.default \
            and t is not aten.reshape_as.default:
        mapping = _view_dims(_shape(n.args[0]), shape)
        computed = {d: i for d, i in want.items() if d in mapping}
        return computed, [(n.args[0], {mapping[d]: i for d, i in computed.items()})]
    if t is aten.slice.Tensor:
        dim = n.args[1] % len(shape)
        xs = _shape(n.args[0])
        start = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
        step = n.args[4] if len(n.args) > 4 else 1
        start = start + xs[dim] if start < 0 else min(start, xs[dim])
        return want, [(n.args[0], {d: (start + i * step if d == dim else i) for d, i in want.items()})]
    if t is aten.select.int:
        dim = n.args[1] % (len(shape) + 1)
        return want, [(n.args[0], {(d if d < dim else d + 1): i for d, i in want.items()})]
    if t is operator.getitem:
        source = n.args[0]
        if getattr(source, "target", None) in _SPLITS or getattr(source, "target", None) in DROPOUTS \
                or (getattr(source, "target", None) is sdpa_reference and n.args[1] == 0):
            return want, [(source, want)]
        return everything
    if t in _SPLITS:
        dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % len(shape)
        computed = {d: i for d, i in want.items() if d != dim}
        return computed, [(n.args[0], computed)]
    if t in (aten.tril.default, aten.triu.default):
        return want, [(n.args[0], want)]
    if t in SOFTMAX_OPS or t in (aten.log_softmax.int, aten._log_softmax.default, aten.cumsum.default):
        dim = n.args[1] % len(shape)
        computed = {d: i for d, i in want.items() if d != dim}
        return computed, [(n.args[0], computed)]
    if t in _REDUCTIONS:
        return _reduction_rule(n, want, shape)
    if t in (aten.matmul.default, aten.bmm.default, aten.mm.default, aten.baddbmm.default):
        return _product_rule(n, want, shape)
    if t is aten.einsum.default:
        return _einsum_rule(n, want, shape)
    if t is sdpa_reference:
        return _sdpa_rule(n, want, shape)
    if t in COPIES or t in CASTS or t in DROPOUTS or t in _ELEMENTWISE or torch.Tag.pointwise in getattr(t, "tags", ()):
        return want, [(x, _aligned(x, shape, want)) for x in inputs]
    return everything


def _permutation(n: fx.Node, rank: int) -> list[int]:
    """out dim d is input dim perm[d]."""
    t = n.target
    if t is aten.permute.default:
        return [p % rank for p in n.args[1]]
    perm = list(range(rank))
    if t is aten.t.default:
        a, b = 0, min(1, rank - 1)
    else:
        a, b = n.args[1] % rank, n.args[2] % rank
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _squeeze_rule(n: fx.Node, want: dict, shape: list):
    xs = _shape(n.args[0])
    if n.target is aten.unsqueeze.default:
        dim = n.args[1] % len(shape)
        return want, [(n.args[0], {(d if d < dim else d - 1): i for d, i in want.items() if d != dim})]
    if n.target is aten.squeeze.default:
        removed = [d for d, s in enumerate(xs) if s == 1]
    else:
        dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        removed = [d % len(xs) for d in dims if xs[d % len(xs)] == 1]
    kept = [d for d in range(len(xs)) if d not in removed]
    return want, [(n.args[0], {kept[d]: i for d, i in want.items()})]


def _view_dims(ins: list, outs: list) -> dict:
    """out dim -> in dim for the dims a view keeps whole (neither split nor merged)."""
    mapping, i, j = {}, 0, 0
    while i < len(ins) and j < len(outs):
        if ins[i] == outs[j]:
            if ins[i] != 1:
                mapping[j] = i
            i, j = i + 1, j + 1
            continue
        if outs[j] == 1:
            j += 1
            continue
        if ins[i] == 1:
            i += 1
            continue
        pi, pj = ins[i], outs[j]
        i, j = i + 1, j + 1
        while pi != pj and i <= len(ins) and j <= len(outs):
            if pi < pj and i < len(ins):
                pi *= ins[i]
                i += 1
            elif pj < pi and j < len(outs):
                pj *= outs[j]
                j += 1
            else:
                return mapping
    return mapping


def _reduction_rule(n: fx.Node, want: dict, shape: list):
    xs = _shape(n.args[0])
    dims = n.args[1] if len(n.args) > 1 else list(range(len(xs)))
    dims = [d % len(xs) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    kept = list(range(len(xs))) if keepdim else [d for d in range(len(xs)) if d not in dims]
    computed = {d: i for d, i in want.items() if kept[d] not in dims}
    return computed, [(n.args[0], {kept[d]: i for d, i in computed.items()})]


def _product_rule(n: fx.Node, want: dict, shape: list):
    """matmul / bmm / mm / baddbmm: rows from the first operand, columns from the second, batch from both."""
    t = n.target
    a, b = (n.args[1], n.args[2]) if t is aten.baddbmm.default else (n.args[0], n.args[1])
    sa, sb = _shape(a), _shape(b)
    if len(sa) < 2 or len(sb) < 2:
        return {}, [(x, {}) for x in _tensor_inputs(n)]
    rank = len(shape)
    need_a, need_b = {}, {}
    for d, i in want.items():
        if d == rank - 2:
            need_a[len(sa) - 2] = i
        elif d == rank - 1:
            need_b[len(sb) - 1] = i
        else:
            for operand, s, need in ((a, sa, need_a), (b, sb, need_b)):
                e = d - (rank - len(s))
                if e >= 0 and s[e] == shape[d] != 1:
                    need[e] = i
    reads = [(a, need_a), (b, need_b)]
    if t is aten.baddbmm.default:
        reads.append((n.args[0], _aligned(n.args[0], shape, want)))
    return want, reads


def _einsum_rule(n: fx.Node, want: dict, shape: list):
    equation, operands = n.args[0], list(n.args[1])
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if "." in equation or not rhs or len(terms) != len(operands):
        return {}, [(x, {}) for x in operands]
    reads = []
    for term, x in zip(terms, operands):
        xs = _shape(x)
        reads.append((x, {term.index(rhs[d]): i for d, i in want.items()
                          if rhs[d] in term and xs[term.index(rhs[d])] == shape[d] != 1}))
    return want, reads


def _sdpa_rule(n: fx.Node, want: dict, shape: list):
    """sdpa_reference: query rows from q (and the mask), batch dims from all of q, k, v and the mask."""
    q, k, v = n.args[0], n.args[1], n.args[2]
    mask = n.kwargs.get("attn_mask")
    sq, sk = _shape(q), _shape(k)
    rank = len(shape)
    computed = dict(want)
    if n.kwargs.get("enable_gqa") and len(sq) >= 3 and sq[-3] != sk[-3]:
        computed.pop(rank - 3, None)     # K/V heads are shared by groups of query heads: keep them whole
    computed.pop(rank - 1, None)
    reads = []
    for x, rows in ((q, True), (k, False), (v, False), (mask, True)):
        if not isinstance(x, fx.Node):
            continue
        xs = _shape(x)
        need = {}
        for d, i in computed.items():
            e = d - (rank - len(xs))
            if e < 0 or (d == rank - 2 and not rows):
                continue
            if xs[e] == shape[d] != 1 or (d == rank - 2 and rows and xs[e] != 1):
                need[e] = i
        reads.append((x, need))
    return computed, reads


def _elements(gm: fx.GraphModule, demands: dict) -> int:
    """Elements the restricted evaluation creates: every computed value but free views, restricted."""
    total = 0
    for n, restriction in demands.items():
        shape = _shape(n)
        if shape is None or (n.op == "call_function" and n.target in _LAYOUT):
            continue
        total += math.prod(len(restriction[d]) if d in restriction else s for d, s in enumerate(shape))
    return total


# --------------------------------------------------------------------------------------------
# evaluating the restricted source

def _restrict(x, restriction: dict, have: dict):
    """`x` (computed with `have`) restricted to `restriction`, as CPU values (float64 when floating)."""
    if not isinstance(x, torch.Tensor):
        return x
    for d, i in restriction.items():
        if d in have:
            if not torch.equal(have[d], i):
                raise ValueError(f"dim {d} was computed at other indices than a user reads")
            continue
        x = x.index_select(d, i.to(x.device))
    x = x.to("cpu")
    return x.double() if x.is_floating_point() else x


class _RestrictedRun:
    """Evaluates a plan's source region on the real boundary values, restricted as planned."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def run(self, boundary: list):
        plan, env = self.plan, {}
        placeholders = iter(boundary)
        for n in plan.source.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
                continue
            if n.op == "output":
                out = n.args[0]
                return _restrict(env[out], plan.restriction, plan.demands.get(out, {}) if out.op == "call_function"
                                 else {})
            if n not in plan.demands:
                continue
            if n.op == "get_attr":
                env[n] = getattr(plan.source, n.target)
                continue
            env[n] = self._node(n, env)
        raise AssertionError("the source region has no output")

    def _arg(self, n: fx.Node, x, env):
        if not isinstance(x, fx.Node):
            return x
        have = self.plan.demands.get(x, {}) if x.op == "call_function" else {}
        return _restrict(env[x], self.plan.needs.get((n, x), {}), have)

    def _node(self, n: fx.Node, env):
        want = self.plan.demands[n]
        shape = _shape(n)
        restricted = [len(want[d]) if d in want else s for d, s in enumerate(shape)] if shape is not None else None
        t = n.target
        if t in _MAKERS or t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            dtype = n.meta["val"].dtype
            dtype = torch.float64 if dtype.is_floating_point else dtype
            if t in _MAKERS:                 # made at the restricted shape (empty ones as zeros)
                fill = n.args[_MAKERS[t]] if _MAKERS[t] is not None else (1 if t in _ONES else 0)
                return torch.full(restricted, fill, dtype=dtype)
            start = 0 if t is aten.arange.default else n.args[0]
            step = n.args[2] if t is aten.arange.start_step else 1
            picked = want[0] if 0 in want else torch.arange(shape[0])
            return (start + picked * step).to(dtype)
        if t is operator.getitem:
            # a piece of a tuple (a split, dropout's (out, mask)): the tuple was computed with its own
            # restriction, the piece is read with this node's
            source = n.args[0]
            piece = env[source][n.args[1]]
            return _restrict(piece, want, self.plan.demands.get(source, {}))
        args = fx.node.map_arg(n.args, lambda x: self._arg(n, x, env))
        kwargs = fx.node.map_arg(n.kwargs, lambda x: self._arg(n, x, env))
        if t in RESHAPES or t in BROADCASTS:
            x = args[0]
            return x.reshape(restricted) if t not in BROADCASTS else x.expand(restricted)
        elif t is aten.slice.Tensor:
            dim = n.args[1] % len(shape)
            if dim in want:
                return args[0]          # the input was read at the sliced positions
        elif t in (aten.tril.default, aten.triu.default):
            return _positional_triangle(args[0], args[1] if len(args) > 1 else 0, want, shape,
                                        lower=t is aten.tril.default)
        elif t is sdpa_reference and len(shape) - 2 in want:
            kwargs = {**kwargs, "query_positions": want[len(shape) - 2]}
        return t(*args, **kwargs)


def _positional_triangle(x: torch.Tensor, diagonal: int, want: dict, shape: list, lower: bool):
    """tril / triu of `x` (restricted as `want`) at the sampled positions' own row and column numbers."""
    rows = want.get(len(shape) - 2, torch.arange(shape[-2]))
    cols = want.get(len(shape) - 1, torch.arange(shape[-1]))
    offset = cols[None, :] - rows[:, None]
    keep = offset <= diagonal if lower else offset >= diagonal
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype))


# --------------------------------------------------------------------------------------------
# the first call

def split_first_call_checks(gm: fx.GraphModule):
    """(the graph to compile, the graph for the first call or None): the check nodes the validate stage
    inserted stay only in a copy, run on the first call; the graph compiled for every call has none."""
    checks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is first_call_check]
    if not checks:
        return gm, None
    first = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    plans = [_PLANS[n.args[0]] for n in checks]
    for n in checks:
        n.replace_all_uses_with(n.args[1])
        gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, (first, plans)


class FirstCallChecked:
    """The compiled graph, whose first call runs the graph with its first-call checks instead (eagerly),
    then every later call the compiled graph, or, when a check failed, the graph compiled again without
    the failed sites (`recompile(args)`)."""

    def __init__(self, compiled, first: fx.GraphModule, plans: list[Plan], report, recompile, strict: bool):
        self.compiled, self.first, self.plans, self.report = compiled, first, plans, report
        self.recompile = recompile
        self.current = None
        for plan in plans:
            plan.strict = strict

    def __call__(self, *args):
        # Dynamo calls a backend's result with the arguments unpacked (aot_autograd's `forward` copies
        # `_boxed_call` from what it wraps but is not boxed itself)
        if self.current is not None:
            return self.current(*args)
        out = self.first(*args)
        self._report()
        failed = [p for p in self.plans if p.failed]
        if failed:
            for plan in failed:
                refuse_by_structure(plan.key, plan.failed)
            log.warning("attnlower: compiling graph %s again without the site(s) that failed the first-call "
                        "check", getattr(self.report, "graph_id", "?"))
            self.current = self.recompile()
        else:
            self.current = self.compiled
        for plan in self.plans:
            _PLANS.pop(plan.id, None)
        self.first = None                 # its graph is not run again
        return out

    def _report(self) -> None:
        rows = {s.index: s for s in getattr(self.report, "sites", [])}
        for plan in self.plans:
            record_first_call(plan)
            for index in [plan.index, *plan.also]:
                row = rows.get(index)
                if row is None:
                    continue
                row.validated = plan.result + ("" if index == plan.index else
                                               f" (same structure as site {plan.index}: checked there)")
                if plan.failed:
                    row.op, row.reason = None, plan.failed
