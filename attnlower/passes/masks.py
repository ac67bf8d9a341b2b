"""Classify an attention mask by what it computes as a function of (query index, key index).

Models spell masks in many ways (`tril` of ones, `triu(1)` as a fill, `arange` comparisons with
offsets, HF's `masking_utils` and-chains over batch/q/kv index vectors, `where(mask, 0, finfo.min)`,
registered buffers). Instead of matching templates, `classify_mask`:

1. factors the mask into a conjunction of visibility factors (`&`, `*` of bools, `|` of fill masks,
   sums of additive masks, `where` / `masked_fill` with a masking constant, views and casts);
2. sorts the factors into *data-free* ones, whose value depends only on sizes, and *data-dependent*
   ones, which read tensor data (an input, a parameter or buffer, a constant attribute, random numbers);
3. evaluates the data-free factors concretely on CPU with an `fx.Interpreter`, at the traced sizes and,
   when sizes are symbolic, at other sizes the shape guards allow, and compares the resulting
   [Tq, Tk] visibility with the patterns the kernels implement (none, causal, causal band);
4. accepts a data-dependent factor only as a padding mask ([B|1, 1, 1, Tk]: depends on batch and key), or,
   when every data factor reads so, as documents: `D[q] == D[k]` (packed sequences; `_read_documents`).

A static graph is specialized to its sizes, so one evaluation there proves the pattern for that graph.
A symbolic graph is checked at several consistent sizes, which catches masks that only look like a
fixed band at the traced size (a window of T // 2). Anything unproven is kind "tensor" with a reason:
the analyzer then passes the mask on as a bias, which is always exact.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from .layout import NotAView, lift_to_problem
from .site import AlibiInfo, Context, MaskInfo
from .buffers import static_value
from .symbolic import INDEX, LENGTH, IndexInterpreter, NotSymbolic, resolve_tables
from .visibility import Visibility, masking_threshold
from .vocabulary import (BROADCASTS, value_of, ancestors, CASTS, COPIES, METADATA_ONLY_WRITES, SQUEEZES, UNINITIALIZED, op_name, op_names,
                         size_read_index, sizes_equal)

aten = torch.ops.aten

__all__ = ["classify_masks", "classify_mask", "classify_conjunction", "classify_length_mask", "LENGTH_KINDS",
           "MAX_EVAL_ELEMENTS", "POLARITIES"]

POLARITIES = ("keep", "fill", "additive")
# how a score term uses its mask (site.ScoreTerm.kind -> polarity)
POLARITY_OF_TERM = {"bias": "additive", "fill": "fill", "keep": "keep"}


def classify_masks(gm: fx.GraphModule, ctx: Context) -> str:
    """Classify the mask of each open site of `gm` (`site.mask`): its one term, or the conjunction of its
    terms when every one of them masks; where K/V are read from a paged cache, also read the mask as the
    paged op's (`site.paged_mask`: `key < lengths[b]`, causal within a chunk aligned to each sequence's end).
    """
    kinds = []
    for site in ctx.open_sites(gm):
        m = site.match
        if m.paged is not None:
            site.paged_mask = _paged_reading(m)
        if not m.terms:
            continue
        if len(m.terms) == 1:
            term = m.terms[0]
            site.mask = classify_mask(term.node, POLARITY_OF_TERM[term.kind], m.q_len, m.k_len)
        elif all(_masking_term(t) for t in m.terms):
            site.mask = classify_conjunction([(t.node, POLARITY_OF_TERM[t.kind]) for t in m.terms], m.q_len, m.k_len)
            if site.mask.kind == "tensor":
                site.mask = None     # not one mask: the terms stay separate biases (the analyzer says so)
        if len(m.terms) > 1 and (site.mask is None or site.mask.kind == "tensor"):
            _find_alibi(site)
        if site.mask is not None:
            kinds.append(site.mask.kind)
    return f"{len(kinds)} mask(s) classified" + (f": {', '.join(kinds)}" if kinds else "")


def _find_alibi(site) -> None:
    """A site with a bias term besides its masks: when the masks alone are a causal pattern (or a band)
    and the bias is ALiBi on the keys they leave visible (`classify_alibi`), record both."""
    m = site.match
    for term in m.terms:
        if term.kind != "bias" or term.value != 1.0:
            continue
        others = [t for t in m.terms if t is not term]
        if not all(t.kind != "bias" or t.value == 1.0 for t in others) or not all(_masking_term(t) for t in others):
            continue
        mask = classify_conjunction([(t.node, POLARITY_OF_TERM[t.kind]) for t in others], m.q_len, m.k_len)
        if mask.kind not in ("causal", "band") or mask.data_dependent:
            continue
        alibi = classify_alibi(term, mask, m)
        if alibi is not None:
            site.mask, site.alibi = mask, alibi
            return


def classify_alibi(term, mask: MaskInfo, m) -> AlibiInfo | None:
    """The bias term as ALiBi, proven from its value: on every key `mask` (causal / band) leaves visible it
    equals `slopes[h] * (j - (i + off))` for one slope per head (off = Tk - Tq when bottom-right), constant
    over the batch and finite everywhere; None otherwise. Its value is evaluated at the traced sizes (a
    module buffer at its real value, guarded by the rewrite), so only static sizes are read."""
    if not all(isinstance(x, int) for x in (m.batch, m.q_heads, m.q_len, m.k_len)):
        return None
    facts = _GraphFacts([term.node], (m.q_len, m.k_len))
    if facts.mutation_reason() or facts.data_reason.get(term.node):
        return None
    try:
        evaluator = _Evaluator([term.node], facts)
        if evaluator.symbols or evaluator.largest_numel({}) > MAX_EVAL_ELEMENTS:
            return None
        (value,) = evaluator.run({})
    except _Refusal:
        return None
    if not value.is_floating_point():
        return None
    value = value.to(torch.float64)
    if term.row_inserted:
        value = value.unsqueeze(-2)
    shape = list(value.shape)
    score_shape = list(term.score_shape)
    if len(shape) > len(score_shape):
        value = value.reshape(shape[len(shape) - len(score_shape):])
        shape = list(value.shape)
    problem = [m.batch, m.q_heads, m.q_len, m.k_len]
    try:
        plan = lift_to_problem(shape, score_shape, problem)
    except NotAView:
        return None
    if plan is not None:
        aligned, expand_to, reshape_to = plan
        value = value.reshape(aligned).expand(expand_to).reshape(reshape_to)
    while value.dim() < 4:
        value = value.unsqueeze(0)
    value = value.expand(value.shape[0], m.q_heads, m.q_len, m.k_len)
    if not bool(torch.isfinite(value).all()) or not bool((value == value[:1]).all()):
        return None                           # -inf somewhere (a mask, not a slope), or it varies over the batch
    value = value[0]                          # [Hq, Tq, Tk]
    model = Visibility(mask.kind, mask.bottom_right, mask.window)
    visible = model.visible(m.q_len, m.k_len)
    off = m.k_len - m.q_len if mask.bottom_right else 0
    distance = (torch.arange(m.k_len).view(1, -1) - torch.arange(m.q_len).view(-1, 1) - off).to(torch.float64)
    fit = visible & (distance != 0)
    if not bool(fit.any()):
        return None
    i, j = [int(x) for x in fit.nonzero()[0]]
    slopes = value[:, i, j] / distance[i, j]
    want = slopes.view(-1, 1, 1) * distance
    scale = value[:, visible].abs().max().clamp_min(1.0)
    if not bool(((value - want).abs()[:, visible] <= 1e-6 * scale).all()):
        return None
    speculated = tuple(sorted(facts.speculated, key=facts.order.__getitem__))
    source = f" of {_buffers_named(speculated)}" if speculated else ""
    # how the value stays true (a guard, the op's device check, or neither) is the analyzer's to say: it knows the op
    reason = (f"ALiBi: `{term.node.name}` equals slope[h] * (j - i{' - (Tk - Tq)' if off else ''}) on every visible key, "
              f"proven from the value{source}")
    return AlibiInfo(term=term, slopes=slopes.to(torch.float32), speculated_from=speculated, reason=reason)


def _masking_term(term) -> bool:
    """A term that can only mask: a fill / keep (which keys it hides, whatever value they take: the
    analyzer judges a finite value), or a float added as it is (the classifier then proves it holds 0 and
    masking values only)."""
    if term.kind == "bias":
        return term.value == 1.0
    return True


def _paged_reading(m) -> MaskInfo:
    """The site's terms read as the paged op's mask (`classify_length_mask`), or why they cannot be."""
    if not m.terms:
        return MaskInfo("none", reason="no mask: every gathered key visible")
    for t in m.terms:
        if t.kind != "bias" and t.value != -math.inf:
            return MaskInfo("tensor", reason=f"masked keys take the finite value {t.value:g}, not -inf: a sequence "
                                             "with no visible key averages them, which the paged op does not compute")
        if t.kind == "bias" and t.value != 1.0:
            return MaskInfo("tensor", reason=f"the mask is added times {t.value:g}")
        shape = t.score_shape
        if len(shape) != 4 or not (sizes_equal(shape[0], m.batch) and sizes_equal(shape[1], m.q_heads)):
            return MaskInfo("tensor", reason=f"the mask is applied to scores of shape {list(shape)}, not the "
                                             f"[B={m.batch}, H={m.q_heads}, Tq, Tk] the lengths are read against")
    return classify_length_mask([(t.node, POLARITY_OF_TERM[t.kind], t.row_inserted) for t in m.terms],
                                m.q_len, m.k_len, batch=m.batch, q_heads=m.q_heads)


# Largest tensor the classifier materializes on CPU while evaluating a mask: a bool [8192, 8192]
# pattern is 64M elements (64 MiB); beyond that the evaluation costs more than the proof is worth.
MAX_EVAL_ELEMENTS = 64 * 2**20

# Sizes tried besides the traced ones (hints), applied to every backed symbol of the shape env at once
# so that relations between sizes (Tk = Tq + past, equal dims) are kept; each must satisfy the guards.
_SIZE_VARIATIONS: tuple[tuple[str, Callable[[int], int]], ...] = (
    ("hint", lambda h: h),
    ("hint+5", lambda h: h + 5),
    ("2*hint+3", lambda h: 2 * h + 3),
    ("3", lambda h: 3),
)


def classify_mask(mask: fx.Node, polarity: str, q_len, k_len) -> MaskInfo:
    """Classify the mask produced by `mask` for an attention site with Tq=`q_len`, Tk=`k_len`.

    `polarity` says how the site uses the mask's value: "keep" (bool, True = visible), "fill"
    (bool, True = masked) or "additive" (float added to the scores: 0 = visible, -inf or a value
    <= -1e30 / finfo(dtype).min = masked). `q_len`/`k_len` are ints or SymInts.

    Never raises on odd graphs: anything that cannot be proven comes back as kind "tensor" with a
    reason. Raises ValueError / TypeError only for misuse (unknown polarity, `mask` not an fx.Node).
    """
    if polarity not in POLARITIES:
        raise ValueError(
            f"classify_mask: polarity must be one of {POLARITIES}, got {polarity!r}; use 'keep' for a "
            "bool mask where True is visible, 'fill' where True is masked, 'additive' for a float mask"
        )
    if not isinstance(mask, fx.Node):
        raise TypeError(f"classify_mask: expected the fx.Node producing the mask, got {type(mask).__name__}")
    return classify_conjunction([(mask, polarity)], q_len, k_len)


def classify_conjunction(masks: list[tuple[fx.Node, str]], q_len, k_len) -> MaskInfo:
    """Classify several masks applied to the same scores as one: a key is visible iff every mask
    leaves it visible (each `(node, polarity)` as in `classify_mask`). Exact when each masks with
    -inf (or a value that masks as -inf does): the order they are applied in then does not matter."""
    for mask, polarity in masks:
        if polarity not in POLARITIES:
            raise ValueError(f"classify_conjunction: polarity must be one of {POLARITIES}, got {polarity!r}")
        if not isinstance(mask, fx.Node):
            raise TypeError(f"classify_conjunction: expected fx.Nodes producing the masks, got {type(mask).__name__}")
    facts = _GraphFacts([m for m, _ in masks], (q_len, k_len))
    try:
        return _classify(masks, q_len, k_len, facts)
    except _Refusal as refusal:
        reason = str(refusal)
        if facts.speculated and not reason.startswith("buffer"):
            reason += f" (from the value of {_buffers_named(sorted(facts.speculated, key=facts.order.__getitem__))})"
        return MaskInfo("tensor", data_dependent=facts.data_dependent_seen, reason=reason)


# --------------------------------------------------------------------------------------------------
# Op vocabulary. Names are overload-packet names (`aten.bitwise_and.Tensor` -> "bitwise_and") or, for
# Python-level targets (`operator.and_`), the function name, so torch-level graphs read the same.

# Conjunction of visibility per polarity: the result is visible iff every operand is visible.
_CONJUNCTIONS = {
    "keep": {"bitwise_and", "logical_and", "__and__", "and_", "mul", "minimum"},
    "fill": {"bitwise_or", "logical_or", "__or__", "or_", "add", "maximum"},  # masked iff any is masked
    "additive": {"add", "minimum"},  # 0 + 0 = 0; anything plus a masking value stays masking
}
_NEGATIONS = {"bitwise_not", "logical_not", "__invert__", "invert"}  # keep <-> fill
# Ops whose output is the input's value with size-1 dims inserted or removed anywhere, or broadcast, or a
# slice that takes everything (`[:, None]` with symbolic sizes) (checked on the shapes: `_lifted_dims`).
# (layout.py's vocabulary: no permutes, no flatten / unflatten, which would move values across dims)
_BROADCAST_NAMES = op_names(BROADCASTS) | {"broadcast_to"}
_PASS_THROUGH = op_names(COPIES | CASTS | SQUEEZES | {
    aten.view.default, aten.view_as.default, aten.reshape.default, aten._unsafe_view.default,
    aten.slice.Tensor}) | _BROADCAST_NAMES
class _Refusal(Exception):
    """Internal: the mask cannot be proven to be anything but a tensor; the message is the reason."""


def _describe(node: fx.Node) -> str:
    return f"`{node.name}` ({op_name(node)})" if node.op == "call_function" else f"`{node.name}`"


def _tensor_val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is_sym(value: Any) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


# --------------------------------------------------------------------------------------------------
# Graph facts: value ancestors, data dependence, mutation, symbolic sizes.


class _GraphFacts:
    """What the classifier needs to know about the graph around one mask node."""

    def __init__(self, masks: fx.Node | list[fx.Node], sizes: Iterable[Any], score_sizes: dict | None = None):
        roots = [masks] if isinstance(masks, fx.Node) else list(masks)
        self.graph = roots[0].graph
        self.known: dict[fx.Node, torch.Tensor] = {}  # module buffers read at their real value (guarded)
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.ancestors = self._value_ancestors(roots)
        self.data_reason: dict[fx.Node, str | None] = {}
        for node in sorted(self.ancestors, key=self.order.__getitem__):
            self.data_reason[node] = self._own_data_reason(node)
        self.data_dependent_seen = False  # set once a data-dependent factor is found
        self.finite_fills: set[float] = set()  # masking values met that are finite (finfo.min, not -inf)
        self.speculated: set[fx.Node] = set()  # module buffers whose value an evaluation read (buffers.py)
        self.shape_env = self._find_shape_env(list(self.ancestors) + list(sizes))
        self.score_sizes: dict = score_sizes or {}  # score index symbol -> its size, where the caller knows it

    @staticmethod
    def _value_inputs(node: fx.Node) -> list[fx.Node]:
        """Inputs whose *value* `node` reads: a shape-only op's first argument is read for its size only."""
        inputs = node.all_input_nodes
        index = size_read_index(node)
        if index is not None:
            sized = node.args[index]
            others = [a for i, a in enumerate(node.args) if i != index and isinstance(a, fx.Node)]
            others += [a for a in node.kwargs.values() if isinstance(a, fx.Node)]
            return others if sized not in others else inputs
        return inputs

    def _value_ancestors(self, roots: list[fx.Node]) -> set[fx.Node]:
        """`roots` and every node whose value they read, transitively."""
        return ancestors(roots, self._value_inputs)

    def _own_data_reason(self, node: fx.Node) -> str | None:
        """Why `node`'s value depends on tensor data, or None when it depends on sizes only."""
        reason = self.intrinsic_data_reason(node)
        if reason:
            return reason
        for inp in self._value_inputs(node):
            reason = self.data_reason.get(inp)
            if reason:
                return reason
        return None

    def intrinsic_data_reason(self, node: fx.Node) -> str | None:
        """Why `node` itself reads data (an input, an attribute, random numbers), whatever its inputs hold."""
        if node.op == "placeholder":
            if "val" not in node.meta:
                return f"input `{node.name}` has no metadata (treated as tensor data)"
            if not isinstance(node.meta["val"], torch.Tensor):
                return None
            value = self.known.get(node)
            if value is None:
                value = static_value(node)   # a module buffer whose value can be guarded
            if value is not None:
                self.known[node] = value
                return None
            return f"reads tensor input `{node.name}`"
        if node.op == "get_attr":
            owner = self.graph.owning_module
            try:
                value = operator.attrgetter(str(node.target))(owner) if owner is not None else None
            except AttributeError:
                value = None
            # Submodules (higher-order op bodies) are code, not data.
            if isinstance(value, torch.nn.Module):
                return None
            # A tensor literal of the traced code (`torch.tensor(-inf)` in forward): make_fx stores it as
            # a constant read only through `lift_fresh_copy`; it is rebuilt with the same value on every
            # call, so it is as fixed as the code. Any other stored tensor (a parameter, a buffer) is data.
            if node.users and all(op_name(u) == "lift_fresh_copy" for u in node.users):
                return None
            return f"reads attribute `{node.target}` (its content can change without a recompile)"
        if node.op == "call_module":
            return f"calls module `{node.target}`, whose result is opaque"
        if node.op == "call_function":
            target = node.target
            if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
                return f"draws random numbers ({_describe(node)})"
            if op_name(node) in UNINITIALIZED:
                return f"reads uninitialized memory ({_describe(node)})"
        return None

    def mutation_reason(self) -> str | None:
        """A reason when some op writes in place to (a view of) what the mask reads, else None."""
        mutated: dict[fx.Node, fx.Node] = {}
        for node in self.graph.nodes:
            target = node.target
            if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
                continue
            if op_name(node) in METADATA_ONLY_WRITES:
                continue
            for index, arg in enumerate(target._schema.arguments):
                if arg.alias_info is None or not arg.alias_info.is_write:
                    continue
                value = node.args[index] if index < len(node.args) else node.kwargs.get(arg.name)
                if isinstance(value, fx.Node):
                    mutated.setdefault(self._storage_root(value), node)
        for node in self.ancestors:
            writer = mutated.get(self._storage_root(node))
            if writer is not None:
                return f"`{node.name}` is written in place by {_describe(writer)}, so its value is not its producer's"
        return None

    @staticmethod
    def _storage_root(node: fx.Node) -> fx.Node:
        """Follow views (ops whose result aliases their first input) back to the node that owns the storage."""
        while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
            target = node.target
            aliasing = target is operator.getitem or (
                isinstance(target, torch._ops.OpOverload)
                and any(r.alias_info is not None for r in target._schema.returns)
            )
            if not aliasing:
                break
            node = node.args[0]
        return node

    @staticmethod
    def _find_shape_env(values: Iterable[Any]):
        for value in values:
            if isinstance(value, fx.Node):
                value = value.meta.get("val")
            if _is_sym(value):
                return value.node.shape_env
            fake_mode = getattr(value, "fake_mode", None)
            if fake_mode is not None and fake_mode.shape_env is not None:
                return fake_mode.shape_env
        return None

    # ---- symbolic sizes ----

    def expr(self, size: Any) -> sympy.Expr:
        """The sympy expression of an int / SymInt size, with the shape env's replacements applied."""
        if _is_sym(size):
            expr = size.node.expr
            env = size.node.shape_env
            return env.replace(expr) if env is not None else expr
        if isinstance(size, (bool, int, float)):
            return sympy.sympify(size)
        raise _Refusal(f"size {size!r} is neither an int nor a SymInt")

    def same_size(self, a: Any, b: Any) -> bool:
        difference = self.expr(a) - self.expr(b)
        return difference == 0 or sympy.expand(difference) == 0

    def concrete(self, size: Any, subs: dict) -> int:
        """`size` evaluated at one substitution of the shape symbols."""
        value = self.expr(size).xreplace(subs)
        if not value.is_number:
            raise _Refusal(f"size {size} does not become a number at {_show_subs(subs)}")
        return int(value)

    def substitutions(self, symbols: set[sympy.Symbol]) -> list[dict]:
        """Concrete values for every shape symbol: the traced sizes first, then the variations that
        satisfy the shape guards and value ranges (so they are sizes this graph may really run at)."""
        if not symbols:
            return [{}]
        env = self.shape_env
        if env is None:
            raise _Refusal("sizes are symbolic but no shape environment was found to read their hints")
        hints = getattr(env, "backed_var_to_val", None)
        if hints is None:  # torch < 2.12 keeps hints in var_to_val only
            hints = env.var_to_val
        missing = sorted(str(s) for s in symbols if s not in hints)
        if missing:
            raise _Refusal(f"size {', '.join(missing)} has no hint (a data-dependent size)")
        chosen: list[dict] = []
        for _, vary in _SIZE_VARIATIONS:
            # Only integer symbols are sizes; SymFloats (a scale read from a config) keep their value.
            # only the sizes the mask and the site read vary; the others (a head dim an int() pinned
            # with a guard) keep their traced value, or every variation would break that guard
            subs = {s: sympy.Integer(vary(int(h))) if s.is_integer and s in symbols else sympy.sympify(h)
                    for s, h in hints.items()}
            if chosen and not self._allowed(subs):
                continue
            if subs not in chosen:
                chosen.append(subs)
        return chosen

    def _allowed(self, subs: dict) -> bool:
        env = self.shape_env
        for symbol, value in subs.items():
            bounds = env.var_to_range.get(symbol)
            try:
                if bounds is not None and not (bool(value >= bounds.lower) and bool(value <= bounds.upper)):
                    return False
            except TypeError:  # a bound sympy cannot compare to a number: don't guess
                return False
        for guard in env.guards:
            if guard.expr.xreplace(subs) is not sympy.true:
                return False
        return True


def _show_subs(subs: dict) -> str:
    return ", ".join(f"{s}={v}" for s, v in sorted(subs.items(), key=lambda kv: str(kv[0]))) or "the traced sizes"


# --------------------------------------------------------------------------------------------------
# Factoring into a conjunction of visibility factors.


@dataclass(frozen=True)
class _Factor:
    """One conjunct: `value` (a node or a Python number) read with `polarity`; `dtypes` are the float
    dtypes the value passed through on its way to the mask (an fp16 cast makes -65504 a masking value).

    `dims` places the value in the mask it is a factor of: per dim of `value`, the mask dim it runs along,
    counted from the right (-1: the key dim, -2: the query dim), or None for a dim of size 1 that a view
    dropped. None as a whole: right-aligned as it is (broadcasting's own placement). A factor found under a
    view that inserts or removes size-1 dims anywhere (`make_std_mask`'s `(pad & causal).unsqueeze(1)`) keeps
    its own dims this way: the view moves where they sit, not their order (`_lifted_dims`)."""

    value: Any
    polarity: str
    dtypes: frozenset = frozenset()
    dims: tuple | None = None


def _dtype_of(value: Any) -> torch.dtype | None:
    val = _tensor_val(value)
    return val.dtype if val is not None else None


def _masks_everything(value: Any, polarity: str, dtypes: frozenset, facts: _GraphFacts) -> bool:
    """True when `value` is a constant that masks under `polarity` (False for keep, True for fill,
    -inf / finfo.min for additive): the branch of a `where` / the fill of a `masked_fill`."""
    constant = _static_scalar(value, facts)
    if constant is None:
        return False
    if polarity == "keep":
        return constant == 0
    if polarity == "fill":
        return constant != 0
    masks = constant == -math.inf or constant <= masking_threshold(dtypes | {_dtype_of(value)})
    if masks and constant != -math.inf:
        facts.finite_fills.add(constant)
    return masks


def _static_scalar(value: Any, facts: _GraphFacts) -> float | None:
    """The value of a Python number, or of a one-element data-free node with no symbolic inputs."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    val = _tensor_val(value)
    if val is None or facts.data_reason.get(value) or any(not isinstance(d, int) or d != 1 for d in val.shape):
        return None
    evaluator = _Evaluator([value], facts)
    if evaluator.symbols:
        return None
    (result,) = evaluator.run({})
    return float(result.reshape(()).item())


def _placement(factor: _Factor) -> tuple:
    """`factor.dims`, spelled out: per dim of its value, the mask dim it sits at (from the right) or None."""
    if factor.dims is not None:
        return factor.dims
    val = _tensor_val(factor.value)
    rank = val.dim() if val is not None else 0
    return tuple(range(-rank, 0))


def _placed(dims: tuple, shape, facts: _GraphFacts) -> tuple | None:
    """`dims` for a value of `shape`, None when it is right-aligned placement anyway (only the dims of size
    other than 1 matter: a size-1 dim broadcasts wherever it sits)."""
    rank = len(shape)
    if all(d == k - rank for k, (d, size) in enumerate(zip(dims, shape)) if not facts.same_size(size, 1)):
        return None
    return dims


def _lifted_dims(source: Any, result: Any, broadcast: bool, facts: _GraphFacts) -> list | None:
    """Per dim of `source`, the dim of `result` that holds its values (None: a size-1 dim it drops), when
    `result` is `source` with size-1 dims inserted or removed anywhere (`broadcast`: right-aligned, its
    size-1 dims broadcast: expand); None when the op moves values across dims (a merge, a split, a permute)."""
    src, dst = _tensor_val(source), _tensor_val(result)
    if src is None or dst is None:
        return None
    src, dst = list(src.shape), list(dst.shape)
    if broadcast:
        offset = len(dst) - len(src)
        if offset < 0:
            return None
        out = []
        for k, size in enumerate(src):
            if facts.same_size(size, 1):
                out.append(None)
            elif facts.same_size(size, dst[k + offset]):
                out.append(k + offset)
            else:
                return None
        return out
    # the dims of size other than 1 in the same order, of the same sizes: the row-major order of the
    # elements is unchanged, so each of them is the same dim on both sides
    src_big = [k for k, size in enumerate(src) if not facts.same_size(size, 1)]
    dst_big = [k for k, size in enumerate(dst) if not facts.same_size(size, 1)]
    if len(src_big) != len(dst_big) or not all(facts.same_size(src[a], dst[b]) for a, b in zip(src_big, dst_big)):
        return None
    out = [None] * len(src)
    for a, b in zip(src_big, dst_big):
        out[a] = b
    return out


def _factor_shape(factor: _Factor, facts: _GraphFacts) -> list:
    """The factor's shape as it sits in the mask (right-aligned: leading dims of size 1 left out)."""
    shape = list(_tensor_val(factor.value).shape)
    if factor.dims is None:
        return shape
    sizes = {d: size for d, size in zip(factor.dims, shape) if d is not None and not facts.same_size(size, 1)}
    rank = max((-d for d in sizes), default=0)
    return [sizes.get(d, 1) for d in range(-rank, 0)]


def _in_mask_frame(value: torch.Tensor, factor: _Factor) -> torch.Tensor:
    """An evaluated factor reshaped to where it sits in the mask (size-1 dims inserted / removed: a view)."""
    if factor.dims is None:
        return value
    sizes = {d: size for d, size in zip(factor.dims, value.shape) if d is not None and size != 1}
    rank = max((-d for d in sizes), default=0)
    return value.reshape([sizes.get(d, 1) for d in range(-rank, 0)])


def _index_names(factor: _Factor, shape, names: tuple, facts: _GraphFacts) -> dict:
    """The factor's own index symbols (symbolic.INDEX) renamed to the mask's `names` (right-aligned: the last
    name is the mask's last dim) where they sit; a dim of size 1 reads index 0."""
    dims = factor.dims if factor.dims is not None else tuple(range(-len(shape), 0))
    mapping = {}
    for k, (d, size) in enumerate(zip(dims, shape)):
        if facts.same_size(size, 1):
            mapping[INDEX[k]] = sympy.Integer(0)
        elif len(names) + d < 0:
            raise _Refusal(f"the mask has more dims than the scores ({-d} > {len(names)})")
        else:
            mapping[INDEX[k]] = names[len(names) + d]
    return mapping


def _same_dtype_class(a: torch.dtype | None, b: torch.dtype | None) -> bool:
    if a is None or b is None:
        return False
    return (a == torch.bool) == (b == torch.bool) and a.is_floating_point == b.is_floating_point


def _split(factor: _Factor, facts: _GraphFacts) -> list[_Factor] | None:
    """The conjuncts `factor` splits into, or None when it is a leaf to evaluate or inspect."""
    node, polarity, dtypes = factor.value, factor.polarity, factor.dtypes
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    name = op_name(node)
    out_dtype = _dtype_of(node)
    args = node.args

    here = _placement(factor)     # where `node`'s dims sit in the mask

    def sub(value, pol=polarity, dims=None):
        if dims is None and isinstance(value, fx.Node) and _tensor_val(value) is not None:
            rank = _tensor_val(value).dim()     # an operand broadcasts right-aligned against `node`
            dims = here[len(here) - rank:] if rank <= len(here) else None
        if dims is not None:
            dims = _placed(dims, _tensor_val(value).shape, facts)
        return _Factor(value, pol, dtypes | {_dtype_of(value), out_dtype} - {None} if pol == "additive" else frozenset(),
                       dims)

    if name in _CONJUNCTIONS[polarity] and len(args) >= 2 and out_dtype is not None:
        boolean = out_dtype == torch.bool
        if polarity != "additive" and not boolean:
            return None  # `mul`/`add` of non-bools is arithmetic, not a conjunction
        if polarity == "additive" and (not out_dtype.is_floating_point or node.kwargs.get("alpha", 1) != 1):
            return None
        return [sub(args[0]), sub(args[1])]
    if name in _NEGATIONS and polarity != "additive" and out_dtype == torch.bool and args:
        return [sub(args[0], "fill" if polarity == "keep" else "keep")]
    if name in ("eq", "ne") and polarity != "additive" and len(args) == 2 and _dtype_of(args[0]) == torch.bool:
        if isinstance(args[1], (bool, int)) and args[1] in (0, 1):
            same = (name == "eq") == bool(args[1])  # x == True / x != False is x itself
            flipped = "fill" if polarity == "keep" else "keep"
            return [sub(args[0], polarity if same else flipped)]
        return None
    if name == "where" and len(args) == 3 and _dtype_of(args[0]) == torch.bool:
        cond, then_value, else_value = args
        if _masks_everything(else_value, polarity, dtypes, facts):
            return [sub(cond, "keep"), sub(then_value)]
        if _masks_everything(then_value, polarity, dtypes, facts):
            return [sub(cond, "fill"), sub(else_value)]
        return None
    if name == "masked_fill" and len(args) == 3 and _dtype_of(args[1]) == torch.bool:
        if _masks_everything(args[2], polarity, dtypes, facts):
            return [sub(args[0]), sub(args[1], "fill")]
        return None
    if name in _PASS_THROUGH and args and isinstance(args[0], fx.Node):
        source = args[0]
        lifted = _lifted_dims(source, node, name in _BROADCAST_NAMES, facts)
        if _same_dtype_class(_dtype_of(source), out_dtype) and lifted is not None:
            return [sub(source, dims=tuple(None if d is None else here[d] for d in lifted))]
    return None


def _factorize(mask: fx.Node, polarity: str, facts: _GraphFacts) -> list[_Factor]:
    """Split the mask into conjuncts until each one is a leaf (worklist: mask graphs can be deep)."""
    work = [_Factor(mask, polarity, frozenset({_dtype_of(mask)} - {None}))]
    seen: set[tuple[Any, str, Any]] = set()
    leaves: list[_Factor] = []
    while work:
        factor = work.pop()
        if isinstance(factor.value, fx.Node):
            key = (factor.value, factor.polarity, factor.dims)
            if key in seen:
                continue  # the same conjunct reached twice (a diamond): and-ing it again changes nothing
            seen.add(key)
        parts = _split(factor, facts)
        if parts is None:
            leaves.append(factor)
        else:
            work.extend(parts)
    return leaves


# --------------------------------------------------------------------------------------------------
# Concrete evaluation of the data-free part.


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.device):
        return torch.device("cpu")
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        return value.cpu()
    return value


class _CpuInterpreter(fx.Interpreter):
    """Runs an extracted mask subgraph on CPU whatever device it was traced for.

    Device arguments become "cpu", and tensors the graph holds as constants (`get_attr`: a buffer, or
    `torch.tensor(finfo.min, device=...)` lifted by the trace) are copied to the CPU: on a GPU model
    they live on the GPU, and mixing them with the CPU aranges made every mask a bias tensor.
    """

    def get_attr(self, target, args, kwargs):
        return _on_cpu(super().get_attr(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        args, kwargs = tree_map(_on_cpu, (args, kwargs))
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        return target(*args, **kwargs)

    def run_node(self, n):
        try:
            return super().run_node(n)
        except _Refusal:
            raise
        except Exception as error:  # noqa: BLE001 - any op may reject concrete sizes; the mask then stays a tensor
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise _Refusal(f"evaluating {_describe(n)} failed: {type(error).__name__}: {message[:200]}") from error


class _Evaluator:
    """The data-free subgraph computing `outputs`, runnable at any concrete sizes.

    Placeholders of the subgraph are the SymInt inputs it uses and *stand-ins* for the tensors whose
    size (never data) it reads through shape-only ops; a stand-in is a zero-stride expanded scalar,
    so it costs no memory whatever its size.
    """

    def __init__(self, outputs: list[fx.Node], facts: _GraphFacts, given: Iterable[fx.Node] = ()):
        self.facts = facts
        self.given = set(given)   # nodes whose values `run` is handed (cut there: their inputs are not needed)
        needed = ancestors(outputs, lambda n: [] if n in self.given else facts._value_inputs(n))
        for node in needed:
            if node not in self.given and facts.intrinsic_data_reason(node):
                raise _Refusal(f"internal: data-free factor depends on {_describe(node)}")
        stand_in_for = set()
        for node in needed:
            index = size_read_index(node)
            if index is not None and node.args[index] not in needed:
                stand_in_for.add(node.args[index])
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        self.inputs: list[tuple[fx.Node, Any]] = []  # (placeholder in the original graph or stand-in, its meta value)
        ordered = sorted(needed | stand_in_for, key=facts.order.__getitem__)
        for node in ordered:
            if node.op == "placeholder" or node in stand_in_for or node in self.given:
                if "val" not in node.meta:
                    raise _Refusal(f"input {_describe(node)} of the mask has no metadata")
                if node in facts.known and node not in stand_in_for:
                    facts.speculated.add(node)
                env[node] = graph.placeholder(f"in_{node.name}")
                self.inputs.append((node, node.meta["val"]))
        for node in ordered:
            if node not in env:
                env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(tuple(env[n] for n in outputs))
        owner = facts.graph.owning_module or torch.nn.Module()
        self.module = fx.GraphModule(owner, graph)
        self.sized_nodes = [n for n in ordered if n not in stand_in_for and _tensor_val(n) is not None]
        self.symbols: set[sympy.Symbol] = set()
        for _, value in self.inputs:
            for size in _sizes_of(value):
                self.symbols |= facts.expr(size).free_symbols

    def largest_numel(self, subs: dict) -> int:
        """The most elements any evaluated node holds at these sizes (stand-ins hold none)."""
        largest = 1
        for node in self.sized_nodes:
            numel = 1
            for size in _tensor_val(node).shape:
                numel *= self.facts.concrete(size, subs)
            largest = max(largest, numel)
        return largest

    def run(self, subs: dict, values: dict | None = None) -> list[torch.Tensor]:
        """The outputs at the sizes `subs`; `values` holds a tensor for each of the `given` nodes."""
        values = values or {}
        args = [values[node] if node in self.given else self._concrete_input(node, value, subs)
                for node, value in self.inputs]
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        # Real tensors even when called under the backend's fake mode; no autograd bookkeeping.
        with unset_fake_temporarily(), torch.no_grad():
            results = _CpuInterpreter(self.module).run(*args)
        return [r if isinstance(r, torch.Tensor) else torch.tensor(r) for r in results]

    def _concrete_input(self, node: fx.Node, value: Any, subs: dict) -> Any:
        if node in self.facts.known:
            return self.facts.known[node]
        if isinstance(value, torch.Tensor):
            shape = [self.facts.concrete(s, subs) for s in value.shape]
            return torch.zeros((), dtype=value.dtype).expand(shape)
        if _is_sym(value):
            concrete = self.facts.expr(value).xreplace(subs)
            if not concrete.is_number:
                raise _Refusal(f"input `{node.name}` = {value} does not become a number at {_show_subs(subs)}")
            if isinstance(value, torch.SymBool):
                return bool(concrete)
            return int(concrete) if isinstance(value, torch.SymInt) else float(concrete)
        return value


def _sizes_of(value: Any) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return [value]
    return []


def _visibility(value: torch.Tensor, factor: _Factor, facts: _GraphFacts | None = None) -> torch.Tensor:
    """Bool tensor, True where the factor leaves the score visible; refuses values that are not a mask.
    (`facts` records the finite masking values an additive factor holds.)"""
    if factor.polarity in ("keep", "fill"):
        if value.dtype != torch.bool:
            raise _Refusal(f"a {factor.polarity} mask factor has dtype {value.dtype}, expected bool")
        return value if factor.polarity == "keep" else ~value
    if value.dtype == torch.bool:
        raise _Refusal("a bool tensor is added to the scores: a 0/1 bias, not a mask")
    value = value if value.is_floating_point() else value.to(torch.float64)
    visible = value == 0
    masked = (value == -math.inf) | (value <= masking_threshold(factor.dtypes | {value.dtype}))
    other = ~(visible | masked)
    if facts is not None and bool((masked & (value != -math.inf)).any()):
        facts.finite_fills.add(float(value[masked & (value != -math.inf)].max()))
    if other.any():
        example = value[other].reshape(-1)[0].item()
        raise _Refusal(f"additive mask holds {example!r} besides 0 and -inf/finfo.min: a general bias, not a mask")
    return visible


def _query_key_matrix(visible: torch.Tensor, tq: int, tk: int) -> torch.Tensor:
    """The [Tq, Tk] visibility shared by every batch/head slice of the broadcast mask."""
    if visible.dim() < 2:
        visible = visible.reshape((1,) * (2 - visible.dim()) + tuple(visible.shape))
    rows, cols = visible.shape[-2:]
    if rows not in (1, tq) or cols not in (1, tk):
        raise _Refusal(f"mask has shape {list(visible.shape)} but the site has Tq={tq}, Tk={tk}")
    slices = visible.reshape(-1, rows, cols)
    if slices.shape[0] > 1 and not bool((slices == slices[0]).all()):
        raise _Refusal("mask differs across batch/head slices")
    return slices[0].expand(tq, tk)


# --------------------------------------------------------------------------------------------------
# Samples of the mask, held against the patterns the kernels implement (visibility.Visibility).


@dataclass(frozen=True)
class _Sample:
    """The evaluated [Tq, Tk] visibility at one substitution of the sizes."""

    tq: int
    tk: int
    visible: torch.Tensor

    @property
    def where(self) -> str:
        return f"Tq=Tk={self.tq}" if self.tq == self.tk else f"Tq={self.tq}, Tk={self.tk}"


def _inferred_windows(sample: _Sample) -> set[int]:
    """Band widths worth trying: the longest visible run of a row is the width unless the band covers
    everything behind the diagonal (then the sample also fits plain causal, which is tried first)."""
    widest = int(sample.visible.sum(dim=1).max()) if sample.tq and sample.tk else 0
    return {widest} if widest >= 1 else set()


def _best_model(samples: list[_Sample]) -> Visibility:
    """The first model (none, causal, band; top-left before bottom-right) matching every sample."""
    candidates = [Visibility("none"), Visibility("causal", False), Visibility("causal", True)]
    for sample in samples:
        for width in sorted(_inferred_windows(sample)):
            for bottom_right in (False, True):
                candidates.append(Visibility("band", bottom_right, width))
    seen: set[Visibility] = set()
    for model in candidates:
        if model in seen:
            continue
        seen.add(model)
        if all(torch.equal(s.visible, model.visible(s.tq, s.tk)) for s in samples):
            return model
    raise _Refusal(_explain_mismatch(samples))


def _explain_mismatch(samples: list[_Sample]) -> str:
    """Why no single model fits: a size-dependent window, a non-causal band, or another pattern."""
    per_sample: list[Visibility | None] = []
    for sample in samples:
        fitting = None
        for model in [Visibility("none"), Visibility("causal", False), Visibility("causal", True)] + [
            Visibility("band", br, w) for w in sorted(_inferred_windows(sample)) for br in (False, True)
        ]:
            if torch.equal(sample.visible, model.visible(sample.tq, sample.tk)):
                fitting = model
                break
        per_sample.append(fitting)
    if all(m is not None for m in per_sample):
        shown = "; ".join(f"{m.describe()} at {s.where}" for m, s in zip(per_sample, samples))
        if any(m.kind == "band" for m in per_sample):
            return f"the window changes with the sizes ({shown}): only a fixed window is a band"
        return f"the pattern changes with the sizes ({shown})"
    sample = samples[per_sample.index(None)]
    return f"{_describe_pattern(sample)} at {sample.where}"


def _describe_pattern(sample: _Sample) -> str:
    visible = sample.visible
    if not bool(visible.any()):
        return "mask hides every key"
    distance = torch.arange(sample.tk).unsqueeze(0) - torch.arange(sample.tq).unsqueeze(1)  # j - i
    lowest, highest = int(distance[visible].min()), int(distance[visible].max())
    if torch.equal(visible, (distance >= lowest) & (distance <= highest)):
        if highest > max(0, sample.tk - sample.tq):
            return f"band is not causal: keys up to {highest} positions after the query are visible"
        return (
            f"diagonal band j - i in [{lowest}, {highest}] matches neither the top-left nor the "
            "bottom-right causal alignment"
        )
    return "mask pattern is neither full, causal nor a causal band"


# --------------------------------------------------------------------------------------------------
# The classifier.


def _padding_shape(factor: _Factor, k_len: Any, facts: _GraphFacts) -> bool:
    """True when the factor broadcasts as [B|1, 1, 1, Tk] where it sits: it depends on batch and key only."""
    if _tensor_val(factor.value) is None:
        return False
    dims = _factor_shape(factor, facts)
    while len(dims) > 4:
        if not facts.same_size(dims.pop(0), 1):
            return False
    if not dims or not facts.same_size(dims[-1], k_len):
        return False
    return all(facts.same_size(d, 1) for d in dims[-3:-1])


def _classify(masks: list[tuple[fx.Node, str]], q_len, k_len, facts: _GraphFacts) -> MaskInfo:
    mutated = facts.mutation_reason()
    if mutated:
        facts.data_dependent_seen = any(facts.data_reason.values())
        raise _Refusal(mutated)
    factors = [f for mask, polarity in masks for f in _factorize(mask, polarity, facts)]
    data_factors = [f for f in factors if isinstance(f.value, fx.Node) and facts.data_reason.get(f.value)]
    free_factors = [f for f in factors if f not in data_factors]
    facts.data_dependent_seen = bool(data_factors)
    if any(not _padding_shape(f, k_len, facts) for f in data_factors):
        # not padding: documents (`D[q] == D[k]`, packed sequences) when every data factor reads as them
        documents = _documents_or_none(data_factors, q_len, k_len, facts)
        if documents is not None:
            return _document_mask(documents, free_factors, data_factors, q_len, k_len, facts)
    for factor in data_factors:
        dtype = _dtype_of(factor.value)
        if factor.polarity == "additive" and dtype is not None and not dtype.is_floating_point:
            # True + s is s + 1: a bool (or int) added to the scores is a number, never a keep-mask
            raise _Refusal(f"{_describe(factor.value)} is {dtype} added to the scores: a number, not a mask")
        if not _padding_shape(factor, k_len, facts):
            shape = _factor_shape(factor, facts) if _tensor_val(factor.value) is not None else "unknown"
            raise _Refusal(
                f"{_describe(factor.value)} {facts.data_reason[factor.value]}; its shape {shape} is not "
                "a [B|1, 1, 1, Tk] padding mask"
            )
    model, checked = _prove_pattern(free_factors, q_len, k_len, facts)
    padding = ""
    if data_factors:
        sources = "; ".join(f"{_describe(f.value)} {facts.data_reason[f.value]}" for f in data_factors)
        padding = f"; padding: {sources}"
    speculated = tuple(sorted(facts.speculated, key=facts.order.__getitem__))
    checked += _from_buffers(speculated)
    if data_factors and model.kind == "none":
        return MaskInfo("padding", data_dependent=True, reason=f"shape-only part: {checked}{padding}",
                        speculated_from=speculated)
    kind = model.kind + ("+padding" if data_factors else "")
    return MaskInfo(
        kind,
        causal=model.causal,
        bottom_right=model.bottom_right,
        window=model.window,
        data_dependent=bool(data_factors),
        reason=f"{checked}{padding}",
        speculated_from=speculated,
    )


# --------------------------------------------------------------------------------------------------
# Documents: packed sequences, causal (or not) within a document and nothing across documents.
#
# A data factor `D[.., q] == D[.., k]` (one tensor of document ids read at the query's and the key's
# position) is the op's document mode: the kernels take D as `doc_ids` and skip every block in which no
# query shares a document with a key. Positions that restart per document (HF's packing: causal becomes
# `P[b, k] <= P[b, q]`) are index causal within a document when D is proven to be the runs of P stepping
# by one (`find_packed_sequence_indices`' cumsum(diff(P) != 1)). Read as formulas (`symbolic`, data tensors
# as unknown functions of their indices), then cross-checked on drawn ids and positions.

DOCUMENT_KINDS = ("document", "causal+document", "band+document")


@dataclass(frozen=True)
class _Documents:
    """A proven document reading: `node` D read at (`roles` per dim of D: "b", "pos" or "one"), the query at
    key position i + `offset`; `positional` the visibility the position relations give within documents."""

    node: fx.Node
    roles: tuple
    offset: Any
    positional: Visibility
    reason: str
    from_positions: tuple = ()    # (diff, ne, cumsum): how `node` is computed from the positions, when they bound keys


def _read_bool_factor(reader: IndexInterpreter, factor, relation: str):
    """The symbolic read of a data factor that keeps or drops keys, or a refusal: a float mask that is data (its
    values cannot be read), a factor the reader cannot write as a relation of `relation`, a value that is not bool."""
    if factor.polarity == "additive":
        raise _Refusal(f"{_describe(factor.value)} is a float mask that is data: its values cannot be read")
    try:
        read = reader.read(factor.value)
    except NotSymbolic as e:
        raise _Refusal(f"{_describe(factor.value)} is not a relation of {relation}: {e}") from e
    if read.kind != "bool":
        raise _Refusal(f"{_describe(factor.value)} is not a bool mask")
    return read


def _documents_or_none(data_factors, q_len, k_len, facts: _GraphFacts) -> "_Documents | None":
    try:
        return _read_documents(data_factors, q_len, k_len, facts)
    except _Refusal:
        return None


def _read_documents(data_factors, q_len, k_len, facts: _GraphFacts) -> _Documents:
    reader = IndexInterpreter(facts.expr, facts.same_size, lambda n: bool(facts.data_reason.get(n)), functions=True)
    atoms: list = []
    for factor in data_factors:
        read = _read_bool_factor(reader, factor, "document ids")
        formula = read.value.xreplace(_index_names(factor, read.shape, SCORE_INDICES[4], facts))
        atoms += _relations(formula if factor.polarity == "keep" else sympy.Not(formula), factor.value)
    documents, positional = None, []
    for atom in atoms:
        reads = [a for a in atom.atoms(sympy.core.function.AppliedUndef)]
        if isinstance(atom, sympy.Eq) and all(isinstance(x, sympy.core.function.AppliedUndef)
                                              for x in (atom.lhs, atom.rhs)):
            found = _query_and_key_reads(atom.lhs, atom.rhs, facts)
            if documents is not None and found[:2] != documents[:2]:
                raise _Refusal("two different document relations")
            documents = found
        elif isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)) and len(reads) == 2:
            positional.append(atom)
        else:
            raise _Refusal(f"{atom} is not `D[q] == D[k]` nor a relation of positions")
    if documents is None:
        raise _Refusal("no `D[q] == D[k]` relation")
    function, roles, offset, _ = documents
    node = reader.function_of[function]
    shape = list(_tensor_val(node).shape)
    for role, size in zip(roles, shape):
        if role == "pos" and not facts.same_size(size, k_len):
            raise _Refusal(f"the document ids `{node.name}` {shape} are read at key positions along a dim of {size}, "
                           f"not the {k_len} keys")
        if role == "one" and not facts.same_size(size, 1):
            raise _Refusal(f"the document ids `{node.name}` {shape} are read at index 0 of a dim of {size}")
    model, how, chain = Visibility("none"), "", ()
    if positional:
        model, how = _positions_within_documents(positional, function, roles, node, reader, facts)
        chain = (node.args[0].args[0], node.args[0], node)
    reason = (f"key j visible only within the query's document: `{node.name}`[b, i] == `{node.name}`[b, j]"
              + (f"; {how}" if how else ""))
    return _Documents(node, roles, offset, model, reason, chain)


def _conjunction_atoms(formula, node: fx.Node):
    """The atoms of the formula (True = visible) read as a conjunction, in turn: `And` flattened, `Not` pushed
    through `Or` and into relations; each caller says which atoms it accepts. Refuses a formula that hides every key."""
    work = [formula]
    while work:
        f = work.pop()
        if f is sympy.true:
            continue
        if f is sympy.false:
            raise _Refusal(f"{_describe(node)} hides every key")
        if isinstance(f, sympy.And):
            work.extend(f.args)
        elif isinstance(f, sympy.Not) and isinstance(f.args[0], sympy.Or):
            work.extend(sympy.Not(a) for a in f.args[0].args)
        elif isinstance(f, sympy.Not) and isinstance(f.args[0], sympy.core.relational.Relational):
            work.append(f.args[0].negated)
        else:
            yield f


def _relations(formula, node: fx.Node) -> list:
    """The formula (True = visible) as a conjunction of relations, or a refusal."""
    out = []
    for f in _conjunction_atoms(formula, node):
        if not isinstance(f, sympy.core.relational.Relational) or isinstance(f, sympy.Ne):
            raise _Refusal(f"{_describe(node)} is {f}, not a conjunction of relations")
        out.append(f)
    return out


def _query_and_key_reads(a, b, facts: _GraphFacts):
    """(function, roles, query offset, the query read) when `a` and `b` read one function at the query's
    position (i + offset) and the key's (j), at the same batch index (b, or 0 on a dim of size 1)."""
    if a.func != b.func or len(a.args) != len(b.args):
        raise _Refusal(f"{a} and {b} read different tensors")
    if b.has(_I) and a.has(_J):
        a, b = b, a
    roles, offset = [], None
    for x, y in zip(a.args, b.args):
        if x == y:
            if x == _B:
                roles.append("b")
            elif x == 0:
                roles.append("one")
            else:
                raise _Refusal(f"{a} and {b} are read at {x}, not at the batch index")
            continue
        if offset is not None or y != _J:
            raise _Refusal(f"{a} and {b} are not read at the query's and the key's position")
        difference = sympy.expand(x - _I)
        if difference.free_symbols & {_B, _H, _I, _J}:
            raise _Refusal(f"{a} is not read at the query's position i plus a constant")
        offset = difference
        roles.append("pos")
    if offset is None:
        raise _Refusal(f"{a} == {b} compares one read with itself")
    return a.func, tuple(roles), offset, a


def _positions_within_documents(atoms, function, roles, node, reader, facts) -> tuple[Visibility, str]:
    """The position relations (`P[b, k] <= P[b, q]`, HF's causal remapped to packed positions) as index
    relations within documents: proven when the documents `node` are the runs of P stepping by one."""
    positions = None
    upper, lower = set(), set()
    for atom in atoms:
        reads = list(atom.atoms(sympy.core.function.AppliedUndef))
        p_fn, p_roles, p_offset, query_read = _query_and_key_reads(reads[0], reads[1], facts)
        key_read = reads[1] if reads[0] is query_read else reads[0]
        if p_roles != roles or sympy.expand(p_offset) != 0:
            raise _Refusal(f"{atom} reads positions other than where the documents are read")
        if positions is not None and p_fn != positions:
            raise _Refusal("two tensors of positions")
        positions = p_fn
        pi, pj = sympy.Symbol("p_i", integer=True), sympy.Symbol("p_j", integer=True)
        e = atom.lhs - atom.rhs if isinstance(atom, (sympy.Le, sympy.Lt)) else atom.rhs - atom.lhs
        e = sympy.expand(e.xreplace({query_read: pi, key_read: pj}) + (1 if isinstance(atom, (sympy.Lt, sympy.Gt)) else 0))
        cj, ci = e.coeff(pj), e.coeff(pi)
        rest = sympy.expand(e - cj * pj - ci * pi)
        if rest.free_symbols:
            raise _Refusal(f"the position bound {atom} is not on P[k] - P[q]")
        if (cj, ci) == (1, -1):
            upper.add(-rest)           # p_j - p_i <= -rest
        elif (cj, ci) == (-1, 1):
            lower.add(rest)            # p_j - p_i >= rest
        else:
            raise _Refusal(f"the position bound {atom} is not on P[k] - P[q]")
    p_node = reader.function_of[positions]
    if not _runs_of(node, p_node):
        raise _Refusal(f"positions `{p_node.name}` bound the keys, but the documents `{node.name}` are not proven to "
                       f"be the runs of `{p_node.name}` stepping by one (cumsum(diff(P) != 1))")
    if _dtype_of(p_node) is None or _dtype_of(p_node).is_floating_point or _dtype_of(p_node) == torch.bool:
        raise _Refusal(f"positions `{p_node.name}` are not integers")
    if upper != {0} or len(lower) > 1:
        raise _Refusal(f"the position bounds ({sorted(map(str, upper))}, {sorted(map(str, lower))}) are not causal "
                       "or a causal band")
    if lower:
        width = sympy.expand(1 - next(iter(lower)))
        if not (width.is_Integer and int(width) > 0):
            raise _Refusal(f"a band of {width} positions")
        model = Visibility("band", False, int(width))
    else:
        model = Visibility("causal", False)
    how = (f"{model.describe()} over the positions `{p_node.name}`, index {model.describe()} within each document "
           f"(`{node.name}` is the runs of `{p_node.name}` stepping by one)")
    return model, how


def _runs_of(documents: fx.Node, positions: fx.Node) -> bool:
    """`documents` is `cumsum(diff(positions, prepend=<one column>) != 1, -1)` along the positions' last dim
    (transformers' find_packed_sequence_indices): within a run of equal ids the positions step by exactly
    one, so P[k] - P[q] = k - q there, whatever the first id (the prepended column) is."""
    def last_dim(dim, node):
        rank = len(_tensor_val(node).shape)
        return isinstance(dim, int) and dim % rank == rank - 1

    if op_name(documents) != "cumsum" or not last_dim(documents.args[1], documents):
        return False
    changed = documents.args[0]
    if not isinstance(changed, fx.Node) or op_name(changed) != "ne" or changed.args[1] != 1:
        return False
    diff = changed.args[0]
    if not isinstance(diff, fx.Node) or op_name(diff) != "diff":
        return False
    args = list(diff.args) + [None] * (5 - len(diff.args))
    source, n, dim, prepend, append = args[0], args[1] if args[1] is not None else 1, args[2], args[3], args[4]
    dim = -1 if dim is None else dim
    if source is not positions or n != 1 or not last_dim(dim, positions) or append is not None:
        return False
    before = _tensor_val(prepend) if isinstance(prepend, fx.Node) else None
    return before is not None and before.dim() == _tensor_val(positions).dim() and before.shape[-1] == 1


def _intersect(a: Visibility, b: Visibility) -> Visibility | None:
    """The visibility both leave, when it is one of the kernels' patterns."""
    if a.kind == "none":
        return b
    if b.kind == "none":
        return a
    if a.bottom_right != b.bottom_right:
        return None
    if a.kind == "causal":
        return b
    if b.kind == "causal":
        return a
    return Visibility("band", a.bottom_right, min(a.window, b.window))


def _document_mask(documents: _Documents, free_factors, data_factors, q_len, k_len, facts: _GraphFacts) -> MaskInfo:
    """The mask of a site whose data factors are documents: the shape-only factors' pattern and the positions'
    within documents, intersected; the query's document read where the op reads it (`i + off`)."""
    free_model, checked = _prove_pattern(free_factors, q_len, k_len, facts)
    model = _intersect(free_model, documents.positional)
    if model is None:
        raise _Refusal(f"{free_model.describe()} and {documents.positional.describe()} within documents are not one "
                       "of the kernels' patterns")
    tq, tk = facts.expr(q_len), facts.expr(k_len)
    offset = sympy.expand(documents.offset)
    bottom_right = model.bottom_right
    if sympy.expand(tk - tq) != 0:
        if model.kind == "none":
            bottom_right = sympy.expand(offset - (tk - tq)) == 0
        want = tk - tq if bottom_right else 0
        if sympy.expand(offset - want) != 0:
            raise _Refusal(f"the query's document is read at key position i + {offset}, not where its "
                           f"{'bottom-right' if bottom_right else 'top-left'} alignment puts it (i + {want})")
    elif offset != 0:
        raise _Refusal(f"the query's document is read at key position i + {offset}, not at i")
    _cross_check_documents(documents, data_factors, bottom_right, q_len, k_len, facts)
    kind = ("document" if model.kind == "none" else f"{model.kind}+document")
    speculated = tuple(sorted(facts.speculated, key=facts.order.__getitem__))
    return MaskInfo(kind, causal=model.causal, bottom_right=bottom_right, window=model.window, data_dependent=True,
                    reason=f"{documents.reason}; shape-only part: {checked}{_from_buffers(speculated)}",
                    speculated_from=speculated,
                    documents=documents.node, document_roles=documents.roles,
                    documents_from_positions=documents.from_positions)


def _draw(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random data of `value`'s dtype and shape: small integers (repeated, unsorted, negative), bools, normals."""
    shape = [int(x) for x in value.shape]
    if value.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if value.dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(value.dtype)
    return torch.randint(-2, 4, shape, generator=generator).to(value.dtype)


def _cross_check_documents(documents: _Documents, data_factors, bottom_right: bool, q_len, k_len,
                           facts: _GraphFacts) -> None:
    """Evaluate the data factors on drawn ids / positions (small integers: repeated, unsorted, negative) at
    the traced sizes and compare with the proven reading: a second, independent reading of the same nodes."""
    nodes = [f.value for f in data_factors]
    needed = ancestors(nodes + [documents.node], facts._value_inputs)
    roots = sorted((n for n in needed if facts.intrinsic_data_reason(n)), key=facts.order.__getitem__)
    evaluator = _Evaluator([documents.node] + nodes, facts, given=roots)
    symbols = set(evaluator.symbols)
    for size in (q_len, k_len):
        symbols |= facts.expr(size).free_symbols
    subs = facts.substitutions(symbols)[0]
    tq, tk = facts.concrete(q_len, subs), facts.concrete(k_len, subs)
    if max(evaluator.largest_numel(subs), tq * tk) > MAX_EVAL_ELEMENTS:
        return   # too large to evaluate: the symbolic proof stands alone
    if any(not isinstance(_tensor_val(r), torch.Tensor) for r in roots):
        raise _Refusal("the document ids are computed from something other than tensors")
    generator = torch.Generator().manual_seed(0)
    pattern = documents.positional.visible(tq, tk)
    off = tk - tq if bottom_right else 0
    for _ in range(3):
        values = {}
        for root in roots:
            value = _tensor_val(root)
            shape = [facts.concrete(x, subs) for x in value.shape]
            values[root] = _draw(torch.empty(shape, dtype=value.dtype), generator)
        results = evaluator.run(subs, values)
        docs = results[0]
        kept = [d for d, role in enumerate(documents.roles) if role != "one"]
        docs = docs.permute(kept + [d for d in range(docs.dim()) if d not in kept]).reshape(
            [docs.shape[d] for d in kept])
        if "b" in documents.roles and documents.roles.index("b") > documents.roles.index("pos"):
            docs = docs.transpose(0, 1)
        docs = docs.reshape(-1, tk)
        want = (docs[:, None, off:off + tq, None] == docs[:, None, None, :]) & pattern
        got = None
        for value, factor in zip(results[1:], data_factors):
            part = _visibility(_in_mask_frame(value, factor), factor)
            got = part if got is None else got & part
        shape = torch.broadcast_shapes(got.shape, want.shape)
        if not torch.equal(got.expand(shape), want.expand(shape)):
            raise _Refusal("internal: the mask evaluated on drawn document ids differs from its proven reading "
                           "(a bug of attnlower: please report it)")


def _buffers_named(nodes) -> str:
    names = ", ".join(f"`{n.name}`" for n in nodes)
    return f"buffer{'s' if len(nodes) > 1 else ''} {names}"


def _from_buffers(speculated) -> str:
    """The clause naming the module buffers a pattern was read off. Whether anything keeps that value true (a host
    guard, the op's device check) depends on what the analyzer makes of the pattern: its reason says so."""
    return f", proven from the value of {_buffers_named(speculated)}" if speculated else ""


# Ops between a triangle and its use that keep which elements are nonzero, and those that negate it.
_TRIANGLE_KEEPS = op_names(COPIES | CASTS | {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                                              aten.expand.default, aten.unsqueeze.default})
_ONES = {"ones", "ones_like", "new_ones"}


def _triangle_bound(node: fx.Node, q_len, k_len, facts: _GraphFacts):
    """`(sign, e)` when `node` is nonzero exactly where `j - i <= e` (sign +1) or `j - i >= e` (sign -1), for
    query i and key j, at every size: a `tril` / `triu` of ones of shape [Tq, Tk], through views, casts and
    `== 0` / `!= 0` / `~`. Negations turn `<= e` into `>= e + 1` and back. None for anything else."""
    negated = False
    while node.op == "call_function":
        name = op_name(node)
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None:
            return None
        val, sval = _tensor_val(node), _tensor_val(src)
        if val is None or sval is None or val.dim() < 2 or sval.dim() < 2:
            return None
        if not all(facts.same_size(a, b) for a, b in zip(val.shape[-2:], sval.shape[-2:])):
            return None   # the op moves elements across the [Tq, Tk] dims
        if name in _TRIANGLE_KEEPS:
            node = src
        elif name in ("eq", "ne") and len(node.args) == 2 and node.args[1] in (0, 0.0, False):
            negated ^= name == "eq"
            node = src
        elif name in _NEGATIONS and val.dtype == torch.bool:
            negated = not negated
            node = src
        elif name in ("tril", "triu"):
            base = src
            if base.op != "call_function" or op_name(base) not in _ONES and not (
                    op_name(base) == "full" and isinstance(base.args[1], (int, float, bool)) and base.args[1] != 0):
                return None
            if not (facts.same_size(sval.shape[-2], q_len) and facts.same_size(sval.shape[-1], k_len)):
                return None
            diagonal = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
            if isinstance(diagonal, fx.Node):
                diagonal = diagonal.meta.get("val")
            if not isinstance(diagonal, (int, torch.SymInt)):
                return None
            e = facts.expr(diagonal)
            sign = 1 if name == "tril" else -1      # tril keeps j - i <= d, triu keeps j - i >= d
            if negated:
                return (-sign, e + 1 if sign > 0 else e - 1)
            return (sign, e)
        else:
            return None
    return None


def _symbolic_triangle(factors: list[_Factor], q_len, k_len, facts: _GraphFacts) -> tuple[Visibility, str] | None:
    """A single `tril` / `triu` factor proven causal for every size, symbolically (no sampling)."""
    if (len(factors) != 1 or not isinstance(factors[0].value, fx.Node) or factors[0].polarity == "additive"
            or factors[0].dims is not None):
        return None
    found = _triangle_bound(factors[0].value, q_len, k_len, facts)
    if found is None:
        return None
    sign, e = found
    if factors[0].polarity == "fill":     # visible where the factor is zero: the complement
        sign, e = -sign, (e + 1 if sign > 0 else e - 1)
    if sign < 0:
        return None                        # visible j - i >= e: keys after the query, not causal
    for model, offset in ((Visibility("causal", False), 0), (Visibility("causal", True), facts.expr(k_len) - facts.expr(q_len))):
        if sympy.expand(e - offset) == 0:
            return model, (f"{model.describe()}, proven for every size: visible iff j - i <= {offset} "
                           "(a triangle of ones of shape [Tq, Tk])")
    return None


def _prove_pattern(factors: list[_Factor], q_len, k_len, facts: _GraphFacts) -> tuple[Visibility, str]:
    """Evaluate the data-free factors at every allowed substitution and find the one model they all fit."""
    if not factors:
        return Visibility("none"), "no shape-only factor: every key visible"
    symbolic = _symbolic_triangle(factors, q_len, k_len, facts)
    if symbolic is not None:
        return symbolic
    nodes = [f.value for f in factors if isinstance(f.value, fx.Node)]
    evaluator = _Evaluator(nodes, facts)
    symbols = set(evaluator.symbols)
    for size in (q_len, k_len):
        symbols |= facts.expr(size).free_symbols
    if symbols and facts.speculated:
        # a buffer's value proves nothing at sizes not evaluated: read it as a function of the indices
        return _symbolic_pattern(factors, q_len, k_len, facts)
    substitutions = facts.substitutions(symbols)
    samples: list[_Sample] = []
    for index, subs in enumerate(substitutions):
        tq, tk = facts.concrete(q_len, subs), facts.concrete(k_len, subs)
        needed = max(evaluator.largest_numel(subs), tq * tk)
        if needed > MAX_EVAL_ELEMENTS:
            if index == 0:
                raise _Refusal(
                    f"evaluating the mask needs {needed} elements at {_show_subs(subs)}, over the "
                    f"{MAX_EVAL_ELEMENTS} limit"
                )
            continue  # a larger variation; the others still test the sizes
        values = iter(evaluator.run(subs))
        visible = None
        for factor in factors:
            value = _in_mask_frame(next(values), factor) if isinstance(factor.value, fx.Node) else torch.tensor(factor.value)
            part = _visibility(value, factor, facts)
            try:
                visible = part if visible is None else visible & part
            except RuntimeError as error:
                raise _Refusal(f"mask factors do not broadcast together: {error}") from error
        samples.append(_Sample(tq, tk, _query_key_matrix(visible, tq, tk).contiguous()))
    if symbols and len(samples) < 2:
        raise _Refusal(
            "sizes are symbolic but only the traced sizes satisfy the shape guards: the pattern "
            "cannot be shown not to depend on them"
        )
    model = _best_model(samples)
    sizes = ", ".join(dict.fromkeys(s.where for s in samples))
    how = f"checked at {len(samples)} sizes within the shape guards ({sizes})" if symbols else f"at {sizes}"
    return model, f"{model.describe()}, {how}"


def _symbolic_pattern(factors: list[_Factor], q_len, k_len, facts: _GraphFacts) -> tuple[Visibility, str]:
    """The data-free factors (module buffers read as tables) as formulas over the query index i and the
    key index j, for every size: a conjunction of `j - i <= E` (causal, E = 0 top-left or Tk - Tq
    bottom-right) and `j - i >= E'` (a band of E - E' + 1 keys), compared as expressions."""
    buffers = _buffers_named(sorted(facts.speculated, key=facts.order.__getitem__))
    reader = IndexInterpreter(facts.expr, facts.same_size, lambda n: bool(facts.data_reason.get(n)),
                              tables=facts.known)
    atoms = []
    for factor in factors:
        if not isinstance(factor.value, fx.Node):
            if not bool(_visibility(torch.tensor(factor.value), factor).all()):
                raise _Refusal("a constant factor hides every key")
            continue
        if factor.polarity == "additive":
            raise _Refusal(f"{buffers} read at symbolic sizes in an additive mask: not read as a formula")
        try:
            read = reader.read(factor.value)
            if read.kind != "bool":
                raise NotSymbolic(f"{_describe(factor.value)} is not a bool mask")
            formula = resolve_tables(reader, read.value)
        except NotSymbolic as e:
            raise _Refusal(f"{buffers} read at symbolic sizes, and its mask is not a formula of the "
                           f"positions: {e}") from e
        # the mask's dims before the query dim stay index symbols: a formula that reads them varies there
        names = INDEX[:-2] + (_I, _J)
        formula = formula.xreplace(_index_names(factor, read.shape, names, facts))
        if formula.free_symbols & set(INDEX):
            raise _Refusal(f"{buffers}: the mask varies over the batch or the heads")
        visible = formula if factor.polarity == "keep" else sympy.Not(formula)
        atoms += _conjuncts(visible, factor.value)
    upper, lower = set(), set()
    for e in atoms:                                    # e <= 0, linear in i and j
        cj, ci = e.coeff(_J), e.coeff(_I)
        rest = sympy.expand(e - cj * _J - ci * _I)
        if rest.free_symbols & {_I, _J, _LB}:
            raise _Refusal(f"{buffers}: the bound {e} <= 0 is not linear in the positions")
        if (cj, ci) == (1, -1):
            upper.add(sympy.expand(-rest))              # j - i <= -rest
        elif (cj, ci) == (-1, 1):
            lower.add(sympy.expand(rest))               # j - i >= rest
        else:
            raise _Refusal(f"{buffers}: the bound {e} <= 0 is not on j - i")
    if len(upper) > 1 or len(lower) > 1:
        raise _Refusal(f"{buffers}: several bounds on j - i ({sorted(map(str, upper | lower))})")
    if not upper:
        if lower:
            raise _Refusal(f"{buffers}: keys after the query are visible (no upper bound on j - i)")
        return Visibility("none"), "every key visible, proven for every size"
    (bound,) = upper
    tq, tk = facts.expr(q_len), facts.expr(k_len)
    if sympy.expand(bound) == 0:
        bottom_right = False
    elif sympy.expand(bound - (tk - tq)) == 0:
        bottom_right = True
    else:
        raise _Refusal(f"{buffers}: visible iff j - i <= {bound}, neither top-left (0) nor bottom-right (Tk - Tq)")
    if not lower:
        model = Visibility("causal", bottom_right)
    else:
        width = sympy.expand(bound - next(iter(lower)) + 1)
        if not (width.is_Integer and int(width) > 0):
            raise _Refusal(f"{buffers}: a band of {width} keys, not a fixed width")
        model = Visibility("band", bottom_right, int(width))
    return model, f"{model.describe()}, proven for every size"


# --------------------------------------------------------------------------------------------------
# Length masks: the paged op's visibility, a function of each sequence's length, proven symbolically.
#
# `classify_mask` calls a data-dependent [B|1, 1, 1, Tk] factor "padding" by its shape alone (what padding
# a user's attention_mask holds is data). The paged op needs more: the very tensor of lengths to read,
# and, for a chunk of Tq > 1 queries, the causal bound aligned to each sequence's end. Both are relations
# between the key index j, the query index i and the length L[b]: the data factors are read as formulas
# (`symbolic.IndexInterpreter`) and held against the op's relations exactly, for every length.

LENGTH_KINDS = ("length", "causal+length", "band+length")
_B, _H, _I, _J = (sympy.Symbol(n, integer=True, nonnegative=True) for n in ("b", "h", "i", "j"))
_LB = sympy.Symbol("L_b", integer=True)
# the indices of the scores [B, H, Tq, Tk] a mask broadcasts against; without a query dim (decode einsum) [B, H, Tk]
SCORE_INDICES = {4: (_B, _H, _I, _J), 3: (_B, _H, _J)}


def classify_length_mask(masks: list[tuple[fx.Node, str, bool]], q_len, k_len, *, batch=None,
                         q_heads=None) -> MaskInfo:
    """The paged op's mask, proven for every length: kind "length" (key j visible iff j < L[b]),
    "causal+length" (also j <= L[b] - Tq + i: query i sits at position L[b] - Tq + i, the chunk aligned
    to each sequence's end) or "band+length" (also j > L[b] - Tq + i - window), with `lengths` the
    rank-1 integer node L; kind "none" when every key is visible; else kind "tensor" with the reason.

    `masks` are the terms applied to the scores [B, H, Tq, Tk]: `(node, polarity, row_inserted)`, where
    `row_inserted` says the scores had no query dim where the term was applied (a decode einsum's [B, H, Tk]).
    Every masked key must take -inf: a finite masking value gives a sequence with no visible key the
    average of its masked keys, which the paged op does not compute.
    `batch` / `q_heads`: the scores' B and H where known (with B = 1 and one length, the lengths read at
    index 0 are read at the batch index).
    """
    facts = _GraphFacts([m for m, _, _ in masks], (q_len, k_len),
                        score_sizes={_B: batch, _H: q_heads, _I: q_len, _J: k_len})
    try:
        return _classify_lengths(masks, q_len, k_len, facts)
    except _Refusal as refusal:
        return MaskInfo("tensor", data_dependent=facts.data_dependent_seen, reason=str(refusal))


def _classify_lengths(masks, q_len, k_len, facts: _GraphFacts) -> MaskInfo:
    mutated = facts.mutation_reason()
    if mutated:
        raise _Refusal(mutated)
    factors: list[tuple[_Factor, int]] = []
    for mask, polarity, row_inserted in masks:
        rank = 3 if row_inserted else 4
        factors += [(f, rank) for f in _factorize(mask, polarity, facts)]
    data = [(f, r) for f, r in factors if isinstance(f.value, fx.Node) and facts.data_reason.get(f.value)]
    free = [f for f, r in factors if (f, r) not in data]
    facts.data_dependent_seen = bool(data)
    model, checked = _prove_pattern(free, q_len, k_len, facts)
    if model.kind != "none":
        if model.bottom_right:
            raise _Refusal(f"{checked}: aligned to the end of the gathered keys (Tk = {k_len}), not to each "
                           "sequence's length; the paged op aligns a chunk's queries to the end of each sequence")
        raise _Refusal(f"{checked}: aligned top-left (query i sees keys <= i); the paged op aligns a chunk's "
                       "queries to the end of each sequence")
    speculated = tuple(sorted(facts.speculated, key=facts.order.__getitem__))
    if not data:
        if facts.finite_fills:
            raise _Refusal(_finite_fill_reason(facts))
        return MaskInfo("none", reason=checked, speculated_from=speculated)
    reader = IndexInterpreter(facts.expr, facts.same_size, lambda n: bool(facts.data_reason.get(n)))
    atoms: list[sympy.Expr] = []
    for factor, rank in data:
        read = _read_bool_factor(reader, factor, "positions and lengths")
        formula = _at_score_indices(read, factor, rank, facts, reader.lengths)
        atoms += _conjuncts(formula if factor.polarity == "keep" else sympy.Not(formula), factor.value)
    if facts.finite_fills:
        raise _Refusal(_finite_fill_reason(facts))
    lengths = reader.lengths
    if lengths is None:
        raise _Refusal("the mask reads data but no tensor of lengths")
    causal, window, length = _length_relations(atoms, q_len, facts)
    kind = "band+length" if window else "causal+length" if causal else "length"
    _cross_check(data, lengths, causal, window, q_len, k_len, facts)
    what = {"length": f"key j visible iff j < `{lengths.name}`[b]",
            "causal+length": f"key j visible iff j <= `{lengths.name}`[b] - Tq + i (causal within the chunk, "
                             "aligned to each sequence's end)",
            "band+length": f"key j visible iff `{lengths.name}`[b] - Tq + i - {window} < j <= `{lengths.name}`[b] - Tq + i "
                           "(a causal band within the chunk, aligned to each sequence's end)"}[kind]
    return MaskInfo(kind, causal=causal, bottom_right=causal, window=window, data_dependent=True,
                    reason=f"{what}, proven for every length", lengths=lengths, speculated_from=speculated)


def _finite_fill_reason(facts: _GraphFacts) -> str:
    shown = ", ".join(f"{v:g}" for v in sorted(facts.finite_fills))
    return (f"masked keys take the finite value {shown}, not -inf: a sequence with no visible key averages "
            "them, which the paged op does not compute")


def _at_score_indices(read, factor: _Factor, rank: int, facts: _GraphFacts,
                      lengths: fx.Node | None = None) -> sympy.Basic:
    """`read` (of `factor`) as a formula of the scores' indices (b, h, i, j) where the factor sits; the
    lengths read at the batch index become the symbol L_b (with a batch of one and one length, index 0 is
    the batch index)."""
    formula = read.value.xreplace(_index_names(factor, read.shape, SCORE_INDICES[rank], facts))
    if _is_one(facts.score_sizes.get(_B), facts) and lengths is not None and _is_one(_numel(lengths), facts):
        formula = formula.xreplace({LENGTH(sympy.Integer(0)): LENGTH(_B)})  # a batch of one: b is 0
    for applied in formula.atoms(sympy.core.function.AppliedUndef):
        if applied.func == LENGTH and applied.args != (_B,):
            raise _Refusal(f"the lengths are read at index {applied.args[0]}, not at the batch index b")
    formula = formula.xreplace({LENGTH(_B): _LB})
    if formula.free_symbols & {_B, _H}:
        raise _Refusal("the mask varies over the batch or the heads other than through the lengths")
    return formula


def _is_one(size, facts: _GraphFacts) -> bool:
    return size is not None and facts.same_size(size, 1)


def _numel(node: fx.Node):
    value = value_of(node)
    return value.numel() if isinstance(value, torch.Tensor) else None


def _conjuncts(formula, node: fx.Node) -> list[sympy.Expr]:
    """The formula (True = visible) as a conjunction of atoms `e <= 0` (integer, linear), or a refusal."""
    out: list[sympy.Expr] = []
    for f in _conjunction_atoms(formula, node):
        if isinstance(f, sympy.Not) and isinstance(f.args[0], sympy.And):
            raise _Refusal(f"{_describe(node)} leaves a key visible when any of several conditions holds")
        if not isinstance(f, (sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge)):
            raise _Refusal(f"{_describe(node)} is {f}, not a conjunction of bounds on the key position")
        lhs, rhs = f.lhs, f.rhs
        if isinstance(f, (sympy.Gt, sympy.Ge)):
            lhs, rhs = rhs, lhs
        e = sympy.expand(lhs - rhs + (1 if isinstance(f, (sympy.Lt, sympy.Gt)) else 0))  # integers: a < b iff a - b + 1 <= 0
        out.append(e)
    return out


def _length_relations(atoms: list[sympy.Expr], q_len, facts: _GraphFacts) -> tuple[bool, int, bool]:
    """(causal, window, length) from atoms `e <= 0`: `j - L_b + 1` (j < L_b), `j - L_b - i + Tq`
    (j <= L_b - Tq + i) and `-j + L_b + i - Tq - W + 1` (j > L_b - Tq + i - W); any other refuses."""
    tq = facts.expr(q_len)
    length = causal = False
    window = 0
    for e in atoms:
        try:
            poly = sympy.Poly(e, _I, _J, _LB)
        except sympy.PolynomialError as error:
            raise _Refusal(f"the bound {e} <= 0 is not linear in the positions and the length") from error
        if poly.total_degree() > 1:
            raise _Refusal(f"the bound {e} <= 0 is not linear in the positions and the length")
        cj, ci, cl = (poly.coeff_monomial(x) for x in (_J, _I, _LB))
        rest = sympy.expand(e - cj * _J - ci * _I - cl * _LB)
        shown = _show_bound(e)
        if (cj, cl) == (1, -1) and ci == 0 and sympy.expand(rest - 1) == 0:
            length = True
        elif (cj, cl, ci) == (1, -1, -1) and sympy.expand(rest - tq) == 0:
            causal = True
        elif (cj, cl, ci) == (-1, 1, 1) and (w := sympy.expand(1 - tq - rest)).is_Integer and int(w) > 0:
            if window and window != int(w):
                raise _Refusal(f"two windows, {window} and {int(w)}")
            window = int(w)
        else:
            raise _Refusal(f"the bound {shown} is not one the paged op computes (j < L[b], "
                           "j <= L[b] - Tq + i, j > L[b] - Tq + i - window)")
    if window and not causal:
        raise _Refusal(f"a window of {window} keys without the causal bound j <= L[b] - Tq + i")
    if not (length or causal):
        raise _Refusal("no bound j < L[b]: keys past a sequence's length would be visible")
    return causal, window, length


def _show_bound(e: sympy.Expr) -> str:
    """`e <= 0` in the user's terms, solved for the key position j (i is the query's, L[b] the length)."""
    cj = e.coeff(_J)
    if cj in (1, -1):
        rest = sympy.expand(-(e - cj * _J) / cj)
        shown = f"j {'<=' if cj == 1 else '>='} {rest}"
    else:
        shown = f"{e} <= 0"
    return shown.replace("L_b", "L[b]")


def _cross_check(data, lengths: fx.Node, causal: bool, window: int, q_len, k_len, facts: _GraphFacts) -> None:
    """Evaluate the data factors on drawn lengths at the traced sizes and compare with the proven
    relations: a second, independent reading of the same nodes (a bug in either refuses the site)."""
    evaluator = _Evaluator([f.value for f, _ in data], facts, given=[lengths])
    batch_size = _tensor_val(lengths).shape[0]
    symbols = set(evaluator.symbols)
    for size in (q_len, k_len, batch_size):
        symbols |= facts.expr(size).free_symbols
    subs = facts.substitutions(symbols)[0]           # the traced sizes
    tq, tk, batch = (facts.concrete(x, subs) for x in (q_len, k_len, batch_size))
    if max(evaluator.largest_numel(subs), batch * tq * tk) > MAX_EVAL_ELEMENTS:
        return   # too large to evaluate: the symbolic proof stands alone
    generator = torch.Generator().manual_seed(0)
    dtype = _tensor_val(lengths).dtype
    draws = [torch.randint(0, tk + 1, (batch,), generator=generator), torch.zeros(batch, dtype=torch.long),
             torch.full((batch,), tk), torch.arange(batch) % (tk + 1)]
    i = torch.arange(tq).view(1, 1, -1, 1)
    j = torch.arange(tk).view(1, 1, 1, -1)
    for drawn in draws:
        values = iter(evaluator.run(subs, {lengths: drawn.to(dtype)}))
        got = None
        for factor, rank in data:
            part = _visibility(_in_mask_frame(next(values), factor), factor)
            part = part.unsqueeze(-2) if rank == 3 else part
            got = part if got is None else got & part
        lens = drawn.view(-1, 1, 1, 1)
        want = j < lens
        if causal:
            want = want & (j <= lens - tq + i)
        if window:
            want = want & (j > lens - tq + i - window)
        shape = torch.broadcast_shapes(got.shape, want.shape)
        if not torch.equal(got.expand(shape), want.expand(shape)):
            raise _Refusal(f"internal: the mask evaluated at lengths {drawn.tolist()} differs from its proven "
                           "reading (a bug of attnlower: please report it)")
