"""A mask node read as a formula: its value at every index, in sympy, with per-sequence lengths as `L(b)`.

The paged op's masks are functions of each sequence's length: `key < lengths[b]`, a chunk's causal
`key <= lengths[b] - Tq + i`, a window behind it. Sampling sizes cannot prove such a mask for every
length; this small interpreter reads the nodes that build it (`arange`, views, integer arithmetic,
comparisons, and / or / not) as sympy expressions in the index of each dim, so the mask classifier
can compare it with the op's relations exactly (`masks.classify_length_mask`).

A tensor is an `IndexExpr`: its sizes and one expression in the index symbols `INDEX[0..rank)` of its
own dims (a size-1 dim is always read at index 0). The one tensor of data it may read is a rank-1
integer tensor, the lengths: its value at index x is `LENGTH(x)`; with `functions=True` (documents) any
integer or bool tensor of data is an unknown function of its indices instead. Anything else raises
`NotSymbolic` with the reason, and the caller keeps its other proofs (or none).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import sympy
import torch
import torch.fx as fx

from .vocabulary import op_name, rule_registrar, value_of

aten = torch.ops.aten

__all__ = ["INDEX", "LENGTH", "IndexExpr", "IndexInterpreter", "NotSymbolic", "resolve_tables"]

INDEX = tuple(sympy.Symbol(f"x{k}", integer=True, nonnegative=True) for k in range(8))
LENGTH = sympy.Function("L")       # LENGTH(x): the lengths tensor at index x


class NotSymbolic(Exception):
    """The node cannot be read as a formula over its indices; the message says which op and why."""


@dataclass(frozen=True)
class IndexExpr:
    """A tensor as a formula: `value` over `INDEX[:len(shape)]`; `kind` "int", "bool" or "float"."""

    shape: tuple
    value: sympy.Basic
    kind: str


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point or dtype.is_complex else "int"


# integer dtypes by width: a cast to a narrower one may wrap, so it is not read through
_INT_BITS = {torch.uint8: 8, torch.int8: 8, torch.int16: 16, torch.int32: 32, torch.int64: 64}
_VIEW_COPIES = {"clone", "contiguous", "alias", "detach", "lift_fresh_copy"}
_AND = {"bitwise_and", "logical_and", "__and__", "and_"}
_OR = {"bitwise_or", "logical_or", "__or__", "or_"}
_NOT = {"bitwise_not", "logical_not", "__invert__", "invert"}
_RELATIONS = {"lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt, "ge": sympy.Ge, "eq": sympy.Eq, "ne": sympy.Ne}


class IndexInterpreter:
    """Reads nodes as `IndexExpr`s.

    `size_expr(size)` turns an int / SymInt into a sympy expression; `same_size(a, b)` compares two
    sizes; `is_data(node)` says whether a node's value depends on tensor data. A data node this
    interpreter has no rule for is accepted once, as the lengths, when it is a rank-1 integer
    tensor (`self.lengths` records it); a second one, or any other, raises `NotSymbolic`.
    """

    def __init__(self, size_expr: Callable, same_size: Callable, is_data: Callable[[fx.Node], bool],
                 tables: dict | None = None, functions: bool = False):
        self.size_expr, self.same_size, self.is_data = size_expr, same_size, is_data
        self.lengths: fx.Node | None = None
        # `functions`: any tensor of data this reading has no rule for is read as an unknown function of its
        # indices, `F_name(x0, x1, ...)` (document ids, positions): relations between its reads (`D[b, i] ==
        # D[b, j]`) are then formulas; `function_of` maps each function back to its node
        self.functions = functions
        self.function_of: dict[sympy.FunctionClass, fx.Node] = {}
        self._memo: dict[fx.Node, IndexExpr] = {}
        # tensors whose value is known (module buffers, guarded): read as a table `T_name(x0, x1, ...)`,
        # which `resolve_tables` replaces by what the table is as a function of its indices
        self.tables: dict[fx.Node, torch.Tensor] = dict(tables or {})
        self.table_of: dict[sympy.FunctionClass, tuple[fx.Node, torch.Tensor]] = {}

    # ---- entry

    def read(self, node) -> IndexExpr:
        """`node` (a graph node, or a Python / symbolic number) as an `IndexExpr`."""
        if not isinstance(node, fx.Node):
            return self._scalar(node)
        if node not in self._memo:
            self._memo[node] = self._read_node(node)
        return self._memo[node]

    def _scalar(self, x) -> IndexExpr:
        if isinstance(x, bool):
            return IndexExpr((), sympy.true if x else sympy.false, "bool")
        if isinstance(x, int):
            return IndexExpr((), sympy.Integer(x), "int")
        if isinstance(x, float):
            if x.is_integer() and math.isfinite(x):
                return IndexExpr((), sympy.Integer(int(x)), "float")
            raise NotSymbolic(f"the number {x} is not an integer")
        if isinstance(x, (torch.SymInt,)):
            return IndexExpr((), self.size_expr(x), "int")
        raise NotSymbolic(f"{x!r} is not a number this reading understands")

    def _read_node(self, node: fx.Node) -> IndexExpr:
        val = value_of(node)
        if isinstance(val, torch.SymInt):
            return IndexExpr((), self.size_expr(val), "int")
        if node in self.tables:
            table = sympy.Function(f"T_{node.name}")
            self.table_of[table] = (node, self.tables[node])
            return IndexExpr(tuple(val.shape), table(*INDEX[:val.dim()]), _kind(val.dtype))
        if node.op == "call_function":
            rule = _RULES.get(op_name(node))
            if rule is not None:
                return rule(self, node)
        if self.functions and self.is_data(node) and isinstance(val, torch.Tensor) and _kind(val.dtype) != "float":
            function = sympy.Function(f"F_{node.name}")
            self.function_of[function] = node
            return IndexExpr(tuple(val.shape), function(*INDEX[:val.dim()]), _kind(val.dtype))
        if self.is_data(node) and isinstance(val, torch.Tensor) and val.dim() == 1 and _kind(val.dtype) == "int":
            if self.lengths is not None and self.lengths is not node:
                raise NotSymbolic(f"it reads two tensors of lengths, `{self.lengths.name}` and `{node.name}`")
            self.lengths = node
            return IndexExpr(tuple(val.shape), LENGTH(INDEX[0]), "int")
        what = f"`{node.name}` ({op_name(node)})" if node.op == "call_function" else f"`{node.name}`"
        if self.is_data(node):
            raise NotSymbolic(f"it reads {what}, tensor data other than a rank-1 integer tensor of lengths")
        raise NotSymbolic(f"{what} is not an op this reading understands")

    # ---- helpers

    def sizes(self, node: fx.Node) -> tuple:
        return tuple(value_of(node).shape)

    def with_value(self, node: fx.Node, value) -> IndexExpr:
        val = value_of(node)
        return IndexExpr(tuple(val.shape), value, _kind(val.dtype))

    def broadcast(self, node: fx.Node, *operands) -> list[sympy.Basic]:
        """Each operand's value as a function of `node`'s indices (right-aligned, size-1 dims at 0)."""
        out_shape = self.sizes(node)
        values = []
        for x in operands:
            e = self.read(x)
            shift = len(out_shape) - len(e.shape)
            if shift < 0:
                raise NotSymbolic(f"`{node.name}` has fewer dims than its operand")
            mapping = {}
            for k, size in enumerate(e.shape):
                mapping[INDEX[k]] = sympy.Integer(0) if self.same_size(size, 1) else INDEX[k + shift]
            values.append(e.value.xreplace(mapping))
        return values

    def reindex(self, node: fx.Node, source, index_of_source: list) -> IndexExpr:
        """`node` reads `source` at `index_of_source[k]` (an expression in `node`'s indices) for each dim k."""
        e = self.read(source)
        mapping = {INDEX[k]: (sympy.Integer(0) if self.same_size(size, 1) else index_of_source[k])
                   for k, size in enumerate(e.shape)}
        return self.with_value(node, e.value.xreplace(mapping))


# --------------------------------------------------------------------------------------------
# the rules, one per op family: (interpreter, node) -> IndexExpr

_RULES: dict[str, Callable[[IndexInterpreter, fx.Node], IndexExpr]] = {}


_rule = rule_registrar(_RULES)   # @_rule(*names): the rule of the ops named `names`


@_rule("arange")
def _arange(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    args = list(n.args)
    if n.target is aten.arange.default:
        start, step = 0, 1
    elif n.target is aten.arange.start:
        start, step = args[0], 1
    elif n.target is aten.arange.start_step:
        start, step = args[0], args[2] if len(args) > 2 else n.kwargs.get("step", 1)
    else:
        raise NotSymbolic(f"`{n.name}` is an arange overload this reading does not know")
    if _kind(value_of(n).dtype) != "int":
        raise NotSymbolic(f"`{n.name}` is a float arange")
    first, stride = it.read(start).value, it.read(step).value
    return it.with_value(n, first + stride * INDEX[0])


@_rule("scalar_tensor", "full")
def _constant(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    fill = n.args[0] if op_name(n) == "scalar_tensor" else n.args[1]
    return it.with_value(n, it.read(fill).value)


@_rule(*_VIEW_COPIES)
def _same(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    return it.with_value(n, it.read(n.args[0]).value)


@_rule("_to_copy", "to", "type_as")
def _cast(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    """Casts that keep every value: to the same dtype, bool to bool, an integer to a wider signed one."""
    src = n.args[0]
    before, after = value_of(src).dtype, value_of(n).dtype
    widening = (before in _INT_BITS and after in _INT_BITS and after != torch.uint8
                and _INT_BITS[after] > _INT_BITS[before])
    if after == torch.bool and before != torch.bool:
        return it.with_value(n, sympy.Ne(it.read(src).value, 0))     # `.bool()`: nonzero is True
    if not (before == after or widening):
        raise NotSymbolic(f"`{n.name}` casts {before} to {after}")
    return it.with_value(n, it.read(src).value)


@_rule("unsqueeze")
def _unsqueeze(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    rank = len(it.sizes(n))
    d = n.args[1] % rank
    return it.reindex(n, n.args[0], [INDEX[k] if k < d else INDEX[k + 1] for k in range(rank - 1)])


@_rule("squeeze")
def _squeeze(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    src_shape = it.sizes(n.args[0])
    rank = len(src_shape)
    if len(n.args) < 2:
        dropped = {k for k, s in enumerate(src_shape) if it.same_size(s, 1)}
    else:
        dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        dropped = {d % rank for d in dims if it.same_size(src_shape[d % rank], 1)} if rank else set()
    index, out = [], 0
    for k in range(rank):
        if k in dropped:
            index.append(sympy.Integer(0))
        else:
            index.append(INDEX[out])
            out += 1
    return it.reindex(n, n.args[0], index)


@_rule("expand", "expand_as", "broadcast_to")
def _expand(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    (value,) = it.broadcast(n, n.args[0])
    return it.with_value(n, value)


@_rule("permute")
def _permute(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    perm = [p % len(n.args[1]) for p in n.args[1]]
    index = [None] * len(perm)
    for out, src in enumerate(perm):
        index[src] = INDEX[out]
    return it.reindex(n, n.args[0], index)


@_rule("transpose", "swapaxes", "swapdims")
def _transpose(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    rank = len(it.sizes(n))
    a, b = n.args[1] % rank, n.args[2] % rank
    index = list(INDEX[:rank])
    index[a], index[b] = index[b], index[a]
    return it.reindex(n, n.args[0], index)


@_rule("view", "reshape", "_unsafe_view", "view_as", "reshape_as")
def _reshape(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    """Only reshapes that add or drop size-1 dims: the other dims keep their sizes, in order."""
    src_shape, out_shape = it.sizes(n.args[0]), it.sizes(n)
    src_big = [k for k, s in enumerate(src_shape) if not it.same_size(s, 1)]
    out_big = [k for k, s in enumerate(out_shape) if not it.same_size(s, 1)]
    if len(src_big) != len(out_big) or not all(it.same_size(src_shape[a], out_shape[b])
                                               for a, b in zip(src_big, out_big)):
        raise NotSymbolic(f"`{n.name}` reshapes {list(src_shape)} to {list(out_shape)}, moving elements across dims")
    index = [sympy.Integer(0)] * len(src_shape)
    for a, b in zip(src_big, out_big):
        index[a] = INDEX[b]
    return it.reindex(n, n.args[0], index)


@_rule("slice")
def _slice(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    args = list(n.args) + [None] * (5 - len(n.args))
    src_shape = it.sizes(args[0])
    dim = (args[1] or 0) % len(src_shape)
    start, step = args[2], args[4] if args[4] is not None else 1
    start = 0 if start is None else start
    if isinstance(start, fx.Node):
        start = value_of(start)
    if isinstance(start, int) and start < 0:
        start = src_shape[dim] + start
    if isinstance(start, int) and start < 0:
        start = 0
    first = it.read(start).value
    if not first.is_nonnegative:
        raise NotSymbolic(f"`{n.name}` slices from {first}, which may be negative (then the slice clamps)")
    index = list(INDEX[:len(src_shape)])
    index[dim] = first + it.read(step).value * INDEX[dim]
    return it.reindex(n, args[0], index)


@_rule("select")
def _select(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    src_shape = it.sizes(n.args[0])
    dim, at = n.args[1] % len(src_shape), n.args[2]
    if isinstance(at, int) and at < 0:
        at = src_shape[dim] + at
    index = [INDEX[k] if k < dim else INDEX[k - 1] for k in range(len(src_shape))]
    index[dim] = it.read(at).value
    return it.reindex(n, n.args[0], index)


@_rule("index")
def _index(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    """`src[idx0, idx1, ...]` with index tensors for the leading dims (HF's `mask[batch_idx, q_idx]`): each
    index broadcast over the result's leading dims, the remaining dims of `src` read as they are."""
    src, indices = n.args[0], list(n.args[1])
    if not indices or any(not isinstance(i, fx.Node) for i in indices):
        raise NotSymbolic(f"`{n.name}` indexes with None or a number")
    if any(_kind(value_of(i).dtype) != "int" for i in indices):
        raise NotSymbolic(f"`{n.name}` indexes with a mask (bool)")
    src_shape, out_shape = it.sizes(src), it.sizes(n)
    lead = len(out_shape) - (len(src_shape) - len(indices))
    positions = []
    for idx in indices:
        e = it.read(idx)
        shift = lead - len(e.shape)
        if shift < 0:
            raise NotSymbolic(f"`{n.name}`: an index has more dims than the result's broadcast")
        mapping = {INDEX[k]: (sympy.Integer(0) if it.same_size(size, 1) else INDEX[k + shift])
                   for k, size in enumerate(e.shape)}
        position = e.value.xreplace(mapping)
        if not position.is_nonnegative:
            raise NotSymbolic(f"`{n.name}` reads at {position}, which may be negative (then it wraps around)")
        positions.append(position)
    rest = [INDEX[lead + r] for r in range(len(src_shape) - len(indices))]
    return it.reindex(n, src, positions + rest)


def _arith(op):
    def rule(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
        if _kind(value_of(n).dtype) == "bool":
            raise NotSymbolic(f"`{n.name}` ({op_name(n)}) of bools")
        operands = [a for a in n.args[:2]]
        a, b = it.broadcast(n, *operands)
        alpha = n.kwargs.get("alpha", n.args[2] if len(n.args) > 2 else 1)
        return it.with_value(n, op(a, b, it.read(alpha).value))
    return rule


_RULES["add"] = _arith(lambda a, b, alpha: a + alpha * b)
_RULES["sub"] = _arith(lambda a, b, alpha: a - alpha * b)
_RULES["rsub"] = _arith(lambda a, b, alpha: b - alpha * a)
_RULES["mul"] = _arith(lambda a, b, alpha: a * b)


@_rule("neg")
def _neg(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    return it.with_value(n, -it.read(n.args[0]).value)


def _relation(name):
    def rule(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
        a, b = it.broadcast(n, n.args[0], n.args[1])
        return it.with_value(n, _RELATIONS[name](a, b))
    return rule


for _name in _RELATIONS:
    _RULES[_name] = _relation(_name)


def _logic(combine):
    def rule(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
        if _kind(value_of(n).dtype) != "bool":
            raise NotSymbolic(f"`{n.name}` ({op_name(n)}) of integers is arithmetic, not logic")
        values = it.broadcast(n, *[a for a in n.args if isinstance(a, (fx.Node, bool))])
        return it.with_value(n, combine(*values))
    return rule


for _name in _AND:
    _RULES[_name] = _logic(sympy.And)
for _name in _OR:
    _RULES[_name] = _logic(sympy.Or)
for _name in _NOT:
    _RULES[_name] = _logic(sympy.Not)
_RULES["bitwise_xor"] = _RULES["logical_xor"] = _RULES["__xor__"] = _logic(sympy.Xor)


@_rule("where")
def _where(it: IndexInterpreter, n: fx.Node) -> IndexExpr:
    cond, a, b = it.broadcast(n, *n.args[:3])
    if _kind(value_of(n).dtype) == "bool":
        return it.with_value(n, sympy.Or(sympy.And(cond, a), sympy.And(sympy.Not(cond), b)))
    return it.with_value(n, sympy.Piecewise((a, cond), (b, True)))


def resolve_tables(it: IndexInterpreter, formula: sympy.Basic) -> sympy.Basic:
    """`formula` with each table read `T(..., a, c)` replaced by what the table holds as a function of
    `c - a`: a table whose leading dims are 1 and whose every diagonal is constant (nanoGPT's `tril`,
    GPT-Neo's band) is a piecewise function of the diagonal, checked on every entry of the table. The
    result is a formula without tables; raises NotSymbolic for any other table."""
    replacements = {}
    for applied in formula.atoms(sympy.core.function.AppliedUndef):
        if applied.func not in it.table_of:
            continue
        node, table = it.table_of[applied.func]
        if table.dim() < 2 or any(size != 1 for size in table.shape[:-2]):
            raise NotSymbolic(f"`{node.name}` of shape {list(table.shape)} is not a [.., P, Q] table")
        a, c = applied.args[-2], applied.args[-1]
        replacements[applied] = _diagonal_function(node, table.reshape(table.shape[-2:]), c - a)
    formula = formula.xreplace(replacements)
    return _fold(formula)


def _diagonal_function(node: fx.Node, table: torch.Tensor, d: sympy.Expr) -> sympy.Basic:
    """The table as a function of its diagonal index `d = column - row`: a Piecewise over runs of equal
    values, or NotSymbolic when some diagonal holds two values."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        rows, cols = table.shape
        values = []
        for offset in range(-(rows - 1), cols):
            diagonal = torch.diagonal(table, offset=offset)
            first = diagonal[0]
            if not bool((diagonal == first).all()):
                raise NotSymbolic(f"`{node.name}` is not constant along its diagonal {offset}")
            values.append((offset, first.item()))
    runs: list[tuple[int, object]] = []      # (last offset of the run, value)
    for offset, value in values:
        if runs and runs[-1][1] == value:
            runs[-1] = (offset, value)
        else:
            runs.append((offset, value))
    pieces = [(_number(value), sympy.Le(d, last)) for last, value in runs[:-1]]
    pieces.append((_number(runs[-1][1]), True))
    return sympy.Piecewise(*pieces)


def _number(value):
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    return sympy.Integer(value) if float(value).is_integer() else sympy.Float(value)


def _fold(formula: sympy.Basic) -> sympy.Basic:
    """Relations and logic of Piecewise values folded into plain logic: `Eq(Piecewise((1, c), (0, True)), 0)`
    becomes `Not(c)`."""
    formula = sympy.piecewise_fold(formula)
    if isinstance(formula, sympy.Piecewise):
        result, earlier = sympy.false, []
        for value, condition in formula.args:
            if not isinstance(value, sympy.logic.boolalg.Boolean):
                raise NotSymbolic(f"a table's value {value} is used as a number, not compared")
            result = sympy.Or(result, sympy.And(_fold(value), condition, *[sympy.Not(c) for c in earlier]))
            earlier.append(condition)
        return result
    if isinstance(formula, (sympy.And, sympy.Or, sympy.Not)):
        return type(formula)(*[_fold(a) for a in formula.args])
    return formula
