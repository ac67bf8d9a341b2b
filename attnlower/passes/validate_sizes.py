"""Translation validation at reduced sizes: a static region too large to evaluate is checked smaller.

A static graph holds its sizes as literals (`view(x, [2, 4096, 16, 64])`, `full([4096, 4096], -inf)`,
`arange(4096)`, `slice(mask, 3, 0, 4096)`). `reduce_pair` generalizes both copies of a validation
pair (the source region and its rewrite, `validate._Pair`) over the sizes that make them large, and
instantiates them at smaller ones; `validate` then runs its usual check on those.

How (`_Generalizer`): the values of the largest tensor's dims, largest first, become symbols of one
ShapeEnv (every boundary dim of that value is that symbol: dims equal at the traced sizes stay equal).
Both copies are re-run on fake tensors of those symbolic shapes, node by node, and every size literal an
op takes (its schema's `size` / `shape` / `start` / `end` / `index` / `diagonal` / ... arguments) is
replaced by the one symbolic expression it equals at the traced sizes: for a view, the product or the
factor of the input dims it splits or merges (`_gen_view`); for an expand, the input's dim or a size seen
before; elsewhere a size seen before, or one plus or minus a small offset, or a difference of two
(bottom-right diagonals). Two candidates, or a large literal with none, and the pair is not reduced.

Why that is sound, i.e. why the reduced pair agreeing says the traced pair agrees:
1. Exactness at the traced sizes (checked): every literal is replaced by an expression that equals it
   at the traced sizes, so the generalized pair instantiated there *is* the pair. Literals left as they
   are must be small (below every reduced size) or a static dim of the region; a position left as it is
   (a diagonal, a slice bound that is no size) raises the reduced sizes above it as a constant does.
2. Well-formedness at the reduced sizes (checked): the fake run records the guards the ops need
   (broadcasts, view compatibility); they must hold at the reduced sizes, and both copies run there.
3. Size-genericity (the argument): every op of a region (views, products, softmax, elementwise ops,
   reductions over a dim, the attnlower ops' reference) computes each output element by the same rule at
   every size; sizes enter values only through masks made from positions (arange, tril / triu,
   comparisons, the ops' causal / window geometry), i.e. through linear comparisons of positions with
   sizes and integer constants. The kinds of rows such a mask has (all keys, none, a prefix, a band
   inside the keys or cut by an edge) are the same at every size once the sizes are large enough
   against its constants and keep their order and their small differences. So:
   - every reduced size is at least 2|c| + 2 for every integer constant c of a size-only node (a window,
     an offset, a diagonal: `_thresholds`, and positions kept as constants) and the ops' `window`: a
     comparison `j - i <= c` of positions in [0, T - 1] shows both outcomes once T >= |c| + 2, a band
     of two bounds its rows inside and past it once T >= 2|c| + 2 (checked);
   - reduced sizes keep the traced sizes' order and equalities, and every difference up to the
     smallest reduced size exactly (larger ones stay larger than it): `_assign`;
   - a reduced size never equals a static dim of the region (no new equalities).
   Values read from tensor data (masks, biases) are drawn at random at the reduced sizes as at the
   traced ones. What is not covered: an op whose algorithm changes with size beyond rounding (none in
   the vocabulary; the attnlower reference chunks queries, which is exact).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from .evaluate import op_contract_dtypes, score_shape, sdpa_reference

aten = torch.ops.aten

# The smallest size a reduced dim gets: above Dynamo's 0/1 specialization, a few key blocks of the
# smallest tiles, and still cheap (B*H*24*24 scores). Raised above any constant the masks compare with.
REDUCED_FLOOR = 24
# Literals within this of a size (`arange(T + 1)`, `select(x, 2, T - 1)`) read as that size plus the offset.
POSITION_OFFSET = 16

# Schema argument names that hold sizes, and those that hold positions (a size plus an offset may be
# meant). Dims, values and flags are neither.
SIZE_ARGUMENTS = {"size", "shape", "sizes", "split_size", "split_sizes", "repeats", "output_size", "length", "pad"}
POSITION_ARGUMENTS = {"start", "end", "step", "index", "diagonal"}
NOT_THRESHOLDS = {"dim", "dims", "dim0", "dim1", "dimension", "dtype", "layout", "device", "pin_memory",
                  "memory_format", "keepdim", "non_blocking", "copy", "implicit", "half_to_float", "value",
                  "fill_value", "correction", "unbiased", "approximate"}
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SENTINEL = 2 ** 62       # slice's "to the end" (INT64_MAX) and the like: not a size


class CannotReduce(Exception):
    """The pair cannot be generalized over its sizes; the message says why."""


class KeptPosition(CannotReduce):
    """A position literal (a diagonal, a slice bound) that is no size stays a constant: every reduced size
    must exceed it (`reduce_pair` raises the floor and tries again)."""

    def __init__(self, literal: int, where: str, floor: int):
        super().__init__(f"{where}: the position {literal} is no size being reduced and not below {floor}")
        self.literal, self.where = abs(literal), where


@dataclass
class Reduction:
    """The pair at reduced sizes: two graphs, their inputs, and what was reduced."""

    old_gm: fx.GraphModule
    new_gm: fx.GraphModule
    inputs: list
    note: str


def reduce_pair(pair, budget: int) -> Reduction:
    """`pair` (a `validate._Pair` at static sizes) generalized over its largest sizes and instantiated at
    sizes where no tensor exceeds `budget` elements; raises CannotReduce saying why not."""
    old_gm, new_gm = pair.graphs()
    nodes = [n for gm in (old_gm, new_gm) for n in gm.graph.nodes]
    shapes = [tuple(v.shape) for n in nodes for v in _tensors(n.meta.get("val"))]
    shapes += [tuple(s) for n in nodes if n.op == "call_function"
               for s in [score_shape(n, lambda a: a.meta.get("val") if isinstance(a, fx.Node) else None)] if s]
    if not shapes:
        raise CannotReduce("no tensor shapes to reduce")
    largest = max(shapes, key=math.prod)
    candidates = sorted({d for d in largest if d > REDUCED_FLOOR}, reverse=True)
    if not candidates:
        raise CannotReduce(f"the largest tensor {list(largest)} has no dim above {REDUCED_FLOOR} to reduce")
    limits = _thresholds(old_gm, new_gm, {n.name for n in pair.pure})
    while True:
        try:
            return _reduce(pair, old_gm, new_gm, shapes, largest, candidates, limits, budget)
        except KeptPosition as e:            # a position literal kept as a constant: the floor goes above it
            if any(c == e.literal for c, _ in limits):
                raise
            limits.append((e.literal, e.where))


def _reduce(pair, old_gm, new_gm, shapes, largest, candidates, limits, budget) -> Reduction:
    # positions span [0, T - 1], their differences [-(T - 1), T - 1]: `j - i <= c` takes both values once
    # T >= |c| + 2, and a band of two such bounds (a window) shows its rows in and past it once T >= 2|c| + 2
    floor = max([REDUCED_FLOOR] + [2 * c + 2 for c, _ in limits])
    why = ""
    for count in range(1, len(candidates) + 1):
        values = candidates[:count]
        static = {d for s in shapes for d in s if d not in values}
        reduced = _assign(values, floor, static)
        if all(reduced[v] >= v for v in values):
            biggest = max(limits, key=lambda cv: cv[0]) if limits else None
            raise CannotReduce(f"no size can go below {floor}" + (
                f" (the region compares positions with {biggest[0]}, in {biggest[1]})" if biggest else ""))
        at_least = math.prod(reduced.get(d, d) for d in largest)   # the largest tensor, its dims reduced
        if at_least > budget:
            why = f"at reduced sizes the region still makes a tensor of {at_least} elements"
            continue
        gen = _Generalizer(values, floor, static)
        inputs = [gen.fake_input(i) for i in pair.inputs]
        gen.run(old_gm, inputs)
        gen.run(new_gm, inputs)
        subs = {gen.symbol(v).node.expr: reduced[v] for v in values}
        gen.check_guards(subs)
        numel = max(gen.largest(subs), max(math.prod(_instantiate(gen.size(d), subs) for d in i.shape)
                                           for i in pair.inputs if i.shape) if pair.inputs else 1)
        if numel <= budget:
            note = ", ".join(f"{v}->{reduced[v]}" for v in sorted(values, reverse=True))
            return Reduction(gen.instantiate(old_gm, subs), gen.instantiate(new_gm, subs),
                             [gen.reduced_input(i, subs) for i in pair.inputs], f"reduced sizes {note}")
        why = f"at reduced sizes the region still makes a tensor of {numel} elements"
    raise CannotReduce(why)


def _tensors(val):
    vals = val if isinstance(val, (tuple, list)) else [val]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def _assign(values: list[int], floor: int, static: set[int]) -> dict[int, int]:
    """Reduced sizes for `values`: in the same order, equal gaps up to `floor` kept exactly (larger gaps
    become `floor`, still larger than every kept one), the smallest at `floor`, none equal to a static dim."""
    out: dict[int, int] = {}
    previous_value = previous = None
    for v in sorted(values):
        r = floor if previous is None else previous + min(v - previous_value, floor)
        while r in static:
            r += 1
        out[v] = r
        previous_value, previous = v, r
    return out


def _thresholds(old_gm: fx.GraphModule, new_gm: fx.GraphModule, pure_names: set[str]) -> list[tuple[int, str]]:
    """(|constant|, node name) of every integer constant a size-only node computes positions with (a
    window, an offset, a bucket bound), and of the ops' `window`: reduced sizes must exceed them."""
    found = []
    for gm in (old_gm, new_gm):
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            if getattr(n.target, "namespace", None) == "attnlower":
                window = n.kwargs.get("window", n.args[3] if n.target is torch.ops.attnlower.sliding_window_attention.default
                                      and len(n.args) > 3 else None)
                if isinstance(window, int) and window:
                    found.append((abs(window), n.name))
                continue
            if n.name not in pure_names or n.target in (aten.where.ScalarOther, aten.where.ScalarSelf,
                                                          aten.where.Scalar):
                continue
            for name, value in _named_arguments(n):
                if name in NOT_THRESHOLDS or name in SIZE_ARGUMENTS or name in POSITION_ARGUMENTS:
                    continue
                for x in (value if isinstance(value, (list, tuple)) else [value]):
                    if isinstance(x, bool) or not isinstance(x, (int, float)):
                        continue
                    if math.isfinite(x) and float(x).is_integer() and 2 <= abs(x) < 2 ** 31:
                        found.append((int(abs(x)), n.name))
    return found


def _named_arguments(n: fx.Node):
    """(schema name, value) of each argument of an aten call."""
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        return []
    out = [(a.name, v) for a, v in zip(schema.arguments, n.args)]
    return out + list(n.kwargs.items())


def _instantiate(x, subs: dict) -> int:
    if isinstance(x, torch.SymInt):
        return int(x.node.expr.xreplace(subs))
    if isinstance(x, sympy.Expr):
        return int(x.xreplace(subs))
    return x


def _expr(x):
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


class _Generalizer:
    """One ShapeEnv over the sizes being reduced; generalizes both copies' literals against it."""

    def __init__(self, values: list[int], floor: int, static: set[int]):
        from torch._dynamo.source import ConstantSource

        self.env = ShapeEnv(should_record_events=False)
        self.mode = FakeTensorMode(shape_env=self.env, allow_non_fake_inputs=False)
        self.floor, self.static = floor, static
        self._symbols = {}
        for v in values:
            sym = self.env.create_symbol(v, source=ConstantSource(f"size_{v}"), dynamic_dim=DimDynamic.DYNAMIC)
            self._symbols[v] = self.env.create_symintnode(sym, hint=v)
        self.pool: dict[int, set] = {}               # traced value -> symbolic expressions equal to it
        for v, s in self._symbols.items():
            self.pool.setdefault(v, set()).add(s.node.expr)
        self.literals: dict[tuple[int, str], tuple] = {}   # (graph id, node name) -> generalized (args, kwargs)
        self.values: dict[tuple[int, str], object] = {}    # (graph id, node name) -> fake value
        self.scores: list[tuple] = []                      # the scores attention calls make inside

    def symbol(self, v: int) -> torch.SymInt:
        return self._symbols[v]

    def size(self, d: int):
        """The symbolic size of a boundary dim of traced size `d`."""
        return self._symbols.get(d, d)

    # -- inputs ------------------------------------------------------------------------------------
    def fake_input(self, i):
        if i.kind in ("size", "scalar"):
            return i.value
        shape = [self.size(d) for d in i.shape]
        stride = _dense_strides(shape, i.stride)
        with self.mode:
            return torch.empty_strided(shape, stride, dtype=i.dtype)

    def reduced_input(self, i, subs: dict):
        if i.kind in ("size", "scalar") or not i.shape:
            return i
        shape = tuple(_instantiate(self.size(d), subs) for d in i.shape)
        stride = tuple(_instantiate(s, subs) for s in _dense_strides([self.size(d) for d in i.shape], i.stride))
        low, high = i.low, i.high
        if i.kind in ("index", "length"):
            low = _instantiate(self.lookup(i.low, True, i.node.name), subs)
            high = _instantiate(self.lookup(i.high, True, i.node.name), subs)
        return replace(i, shape=shape, stride=stride, low=low, high=high)

    # -- the walk -----------------------------------------------------------------------------------
    def run(self, gm: fx.GraphModule, inputs: list) -> None:
        """Re-run `gm` on fake values of symbolic shape, generalizing the literals of each node."""
        env: dict[fx.Node, object] = {}
        placeholders = iter(inputs)
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
            elif n.op == "get_attr":
                t = getattr(gm, n.target)
                if isinstance(t, torch.Tensor) and any(d in self._symbols for d in t.shape):
                    raise CannotReduce(f"the constant {n.target} has the size {list(t.shape)}")
                env[n] = self.mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
            elif n.op == "call_function":
                args, kwargs = self.generalize(n, env)
                fargs, fkwargs = torch.fx.node.map_arg((args, kwargs), lambda a: env[a])
                fkwargs = op_contract_dtypes(n.target, fkwargs)
                try:
                    with self.mode:
                        out = (_sdpa_shape(*fargs, **fkwargs) if n.target is sdpa_reference
                               else n.target(*fargs, **fkwargs))
                except CannotReduce:
                    raise
                except Exception as e:  # noqa: BLE001 - any failure means: not reducible this way
                    raise CannotReduce(f"{n.name} ({n.target}) does not run at symbolic sizes: "
                                       f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
                env[n] = out
                self.literals[(id(gm), n.name)] = (args, kwargs)
                self.values[(id(gm), n.name)] = out
                scores = score_shape(n, lambda a: env.get(a) if isinstance(a, fx.Node) else None)
                if scores is not None:
                    self.scores.append(scores)
                for t in _tensors(out):
                    for d in t.shape:
                        if isinstance(d, torch.SymInt) and d.node.expr.free_symbols:
                            self.pool.setdefault(int(d.node.hint), set()).add(d.node.expr)

    def generalize(self, n: fx.Node, env: dict):
        """`n`'s (args, kwargs) with each size literal replaced by the size it stands for."""
        if n.target in _VIEW_OPS:
            x, sizes = n.args[0], n.args[1]
            out = [int(d) for d in n.meta["val"].shape]
            return (x, self._gen_view(env[x], list(sizes), out, n.name), *n.args[2:]), dict(n.kwargs)
        if n.target is aten.expand.default:
            x, sizes = n.args[0], n.args[1]
            return (x, self._gen_expand(env[x], list(sizes), n.name), *n.args[2:]), dict(n.kwargs)
        schema = getattr(n.target, "_schema", None)
        if schema is None:
            return n.args, dict(n.kwargs)
        names = [a.name for a in schema.arguments]
        args = [self._gen_argument(names[i] if i < len(names) else "", a, n.name) for i, a in enumerate(n.args)]
        kwargs = {k: self._gen_argument(k, v, n.name) for k, v in n.kwargs.items()}
        return tuple(args), kwargs

    def _gen_argument(self, name: str, value, where: str):
        if name not in SIZE_ARGUMENTS and name not in POSITION_ARGUMENTS:
            return value
        positional = name in POSITION_ARGUMENTS
        if isinstance(value, (list, tuple)):
            return type(value)(self._gen_argument(name, v, where) for v in value)
        if isinstance(value, bool) or not isinstance(value, int):
            return value
        return self.lookup(value, positional, where)

    def lookup(self, literal: int, positional: bool, where: str):
        """The one symbolic size `literal` stands for, or the literal when it is a small or static constant."""
        if abs(literal) >= _SENTINEL or literal in (-1, 0, 1):
            return literal
        found = {e for e in self.pool.get(literal, ()) if e.free_symbols}
        if positional and not found:
            exprs = {e for es in self.pool.values() for e in es if e.free_symbols}
            hint = {e: int(e.xreplace({s.node.expr: v for v, s in self._symbols.items()})) for e in exprs}
            for e in exprs:
                if abs(literal - hint[e]) <= POSITION_OFFSET:
                    found.add(e + (literal - hint[e]))
            for a, b in itertools.permutations(exprs, 2):
                offset = literal - (hint[a] - hint[b])
                if hint[a] > hint[b] and abs(offset) <= POSITION_OFFSET:
                    found.add(sympy.expand(a - b + offset))
            found = {e for e in found if e.free_symbols}
        if len(found) > 1:
            raise CannotReduce(f"{where}: the literal {literal} could stand for any of "
                               f"{sorted(map(str, found))}")
        if found:
            (e,) = found
            return self.env.create_symintnode(e, hint=literal)
        # a literal kept as it is must stay below every reduced size (the floor): a size may also be a static
        # dim of the region (a head_dim), a position (a diagonal, a slice bound, an index) may not
        if abs(literal) >= self.floor and positional:
            raise KeptPosition(literal, where, self.floor)
        if abs(literal) >= self.floor and abs(literal) not in self.static:
            raise CannotReduce(f"{where}: the literal {literal} is no size being reduced and not below {self.floor}")
        return literal

    def _gen_view(self, x, sizes: list, out: list[int], where: str) -> list:
        """A view's target sizes from its input's symbolic dims: each target dim is the product of the
        input dims it merges, or the factor of the input dim it splits (unique, or CannotReduce)."""
        ins = [_expr(d) for d in x.shape]
        in_hint = [int(d.node.hint) if isinstance(d, torch.SymInt) else int(d) for d in x.shape]
        result: list = list(sizes)
        i = j = 0
        while i < len(ins) or j < len(out):
            if j < len(out) and out[j] == 1 and (i >= len(ins) or in_hint[i] != 1):
                result[j] = 1 if sizes[j] != -1 else -1
                j += 1
                continue
            if i < len(ins) and in_hint[i] == 1 and (j >= len(out) or out[j] != 1):
                i += 1
                continue
            if i >= len(ins) or j >= len(out):
                raise CannotReduce(f"{where}: view {sizes} of {in_hint} does not group")
            gi, gj = [i], [j]
            pi, pj = in_hint[i], out[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    if i >= len(ins):
                        raise CannotReduce(f"{where}: view {sizes} of {in_hint} does not group")
                    gi.append(i)
                    pi *= in_hint[i]
                    i += 1
                else:
                    if j >= len(out):
                        raise CannotReduce(f"{where}: view {sizes} of {in_hint} does not group")
                    gj.append(j)
                    pj *= out[j]
                    j += 1
            for k, e in zip(gj, self._split(sympy.Mul(*[ins[t] for t in gi]), [out[t] for t in gj], where)):
                result[k] = -1 if sizes[k] == -1 else (self.env.create_symintnode(e, hint=out[k])
                                                        if e.free_symbols else int(e))
        return result

    def _split(self, total: sympy.Expr, parts: list[int], where: str) -> list:
        """`total` (a product of symbols and an integer) as a product of len(parts) factors whose values at
        the traced sizes are `parts`, each the one way to take it from what is left."""
        if len(parts) == 1:
            return [total]
        atoms, coeff = [], 1
        for f in sympy.Mul.make_args(sympy.expand(total)):
            if f.is_Integer:
                coeff *= int(f)
            elif f.is_Pow and f.exp.is_Integer and f.exp > 0:
                atoms += [f.base] * int(f.exp)
            else:
                atoms.append(f)
        values = {s.node.expr: v for v, s in self._symbols.items()}
        hint = lambda e: int(e.xreplace(values))  # noqa: E731
        factors = []
        for part in parts[:-1]:
            options = {}
            for r in range(len(atoms) + 1):
                for pick in itertools.combinations(range(len(atoms)), r):
                    p = math.prod(hint(atoms[t]) for t in pick)
                    if part % p == 0 and coeff % (part // p) == 0:
                        options.setdefault(tuple(sorted(str(atoms[t]) for t in pick)), (pick, part // p))
            if len(options) != 1:
                raise CannotReduce(f"{where}: cannot tell which sizes the view's {part} is ({len(options)} ways)")
            ((pick, c),) = options.values()
            factors.append(sympy.Mul(*[atoms[t] for t in pick]) * c)
            atoms = [a for t, a in enumerate(atoms) if t not in pick]
            coeff //= c
        factors.append(sympy.Mul(*atoms) * coeff)
        if hint(factors[-1]) != parts[-1]:
            raise CannotReduce(f"{where}: the view's sizes {parts} do not multiply to {total}")
        return factors

    def _gen_expand(self, x, sizes: list, where: str) -> list:
        out = []
        offset = len(sizes) - x.dim()
        for j, literal in enumerate(sizes):
            i = j - offset
            if literal == -1:
                out.append(-1)
            elif i >= 0 and isinstance(x.shape[i], torch.SymInt) and int(x.shape[i].node.hint) == literal:
                out.append(x.shape[i])
            elif i >= 0 and x.shape[i] == literal:
                out.append(literal)
            else:
                out.append(self.lookup(literal, False, where))
        return out

    # -- after the walk -----------------------------------------------------------------------------
    def check_guards(self, subs: dict) -> None:
        for guard in self.env.guards:
            held = guard.expr.xreplace(subs)
            if held.free_symbols:   # a size the reduction does not set (GPT-2's qkv split: `(s6 + 767) // 768 == 3`)
                raise CannotReduce(f"a condition the ops need, {guard.expr}, reads a size the reduction does not set")
            if not bool(held):
                raise CannotReduce(f"the reduced sizes break a condition the ops need: {guard.expr}")

    def largest(self, subs: dict) -> int:
        shapes = [t.shape for value in self.values.values() for t in _tensors(value)] + self.scores
        return max([1] + [math.prod(_instantiate(d, subs) for d in shape) for shape in shapes])

    def instantiate(self, gm: fx.GraphModule, subs: dict) -> fx.GraphModule:
        """A copy of `gm` with every generalized literal at the sizes `subs`."""
        import copy

        graph = copy.deepcopy(gm.graph)
        for n in graph.nodes:
            key = (id(gm), n.name)
            if key not in self.literals:
                continue
            args, kwargs = self.literals[key]
            conv = lambda a: _instantiate(a, subs) if isinstance(a, (torch.SymInt, sympy.Expr)) else a  # noqa: E731
            names = {m.name: m for m in graph.nodes}
            relink = lambda a: names[a.name] if isinstance(a, fx.Node) else a  # noqa: E731
            n.args = torch.utils._pytree.tree_map(conv, torch.fx.node.map_arg(args, relink))
            n.kwargs = torch.utils._pytree.tree_map(conv, torch.fx.node.map_arg(kwargs, relink))
        module = fx.GraphModule(gm, graph, class_name=gm.__class__.__name__)
        return module


def _sdpa_shape(query, key, value, attn_mask=None, outputs=0, **kwargs):
    """What `evaluate.sdpa_reference` returns, as empty tensors: its output is q's shape with v's last dim
    (running its math on symbolic sizes cost ~0.1 s a call, and it takes no size literal to generalize).
    The broadcast of the mask against the scores is checked as the math would."""
    scores = torch.broadcast_shapes(tuple(query.shape[:-1]) + (key.shape[-2],),
                                    tuple(attn_mask.shape) if attn_mask is not None else ())
    out = query.new_empty(tuple(scores[:-1]) + (value.shape[-1],))
    if not outputs:
        return out
    return (out, query.new_empty(tuple(scores[:-1]))) + (None,) * (outputs - 2)


def _dense_strides(shape: list, stride: tuple) -> list:
    """Strides of a dense tensor of `shape` whose dims are laid out in the order of `stride` (0 stays 0)."""
    order = sorted(range(len(shape)), key=lambda d: (-stride[d], -d))
    out = [0] * len(shape)
    acc = 1
    for d in reversed(order):
        if stride[d] == 0:
            continue
        out[d] = acc
        acc = acc * shape[d]
    return out

