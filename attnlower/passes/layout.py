"""Layout algebra: prove that a tensor is a view of another one, whatever chain of views made it.

A chain of layout ops (view, reshape, permute, transpose, expand, unsqueeze, clone, ...) never
changes values, only which source element sits at which index. We track that map exactly, in the
style of CuTe layouts: every logical dim of the current tensor is a row-major list of *sub-dims*
`(size, stride)` into the source's virtual contiguous index space (stride 0 = broadcast).
A reshape regroups the flat sequence of sub-dims (splitting one where a new size divides it);
if it cannot, the chain is not a view of the source and we say so instead of guessing.

Sizes may be SymInts (dynamic shapes): comparisons go through `bool(...)`, which evaluates with
the traced hint and records a guard, so the proof holds for every size the graph is reused for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from .constants import scalar_value
from .vocabulary import (BROADCASTS, CASTS, COPIES, LAYOUT_OPS, MOVES, MULTIPLIES, RESHAPES, SCALES, is_one,
                         shape_of, sizes_equal, value_of)

aten = torch.ops.aten

SubDim = tuple[object, object]  # (size, stride); both int or SymInt


class NotAView(Exception):
    """The chain cannot be expressed as a view of the source."""


@dataclass
class Layout:
    """`dims[k]` is the row-major list of (size, stride) sub-dims of logical dim k."""

    dims: list[list[SubDim]]

    @classmethod
    def contiguous(cls, shape: Sequence[object]) -> "Layout":
        """The layout of a contiguous tensor of `shape`: one sub-dim per dim, row-major strides."""
        strides, acc = [], 1
        for s in reversed(list(shape)):
            strides.append(acc)
            acc = acc * s
        strides.reverse()
        return cls([[(s, st)] for s, st in zip(shape, strides)])

    @property
    def shape(self) -> list[object]:
        """The size of each logical dim (the product of its sub-dims)."""
        return [math.prod(s for s, _ in d) if d else 1 for d in self.dims]

    def clean(self, k: int) -> list[SubDim]:
        """Sub-dims of dim k without size-1 entries."""
        return [(s, st) for s, st in self.dims[k] if not is_one(s)]

    def coalesced(self, k: int) -> list[SubDim]:
        """Sub-dims of dim k without size-1 entries, neighbours merged where they are one strided run
        (outer stride = inner size * inner stride): the fewest (size, stride) pairs that describe it."""
        merged: list[SubDim] = []
        for s, st in self.clean(k):
            if merged and sizes_equal(merged[-1][1], s * st):
                outer, _ = merged.pop()
                merged.append((outer * s, st))
            else:
                merged.append((s, st))
        return merged

    # -- the view ops ---------------------------------------------------------------------------
    def permute(self, perm: Sequence[int]) -> "Layout":
        """The layout after `x.permute(perm)`."""
        n = len(self.dims)
        return Layout([self.dims[p % n] for p in perm])

    def transpose(self, a: int, b: int) -> "Layout":
        """The layout after `x.transpose(a, b)`."""
        n = len(self.dims)
        perm = list(range(n))
        perm[a % n], perm[b % n] = perm[b % n], perm[a % n]
        return self.permute(perm)

    def unsqueeze(self, d: int) -> "Layout":
        """The layout after `x.unsqueeze(d)`: a new dim of size 1."""
        n = len(self.dims) + 1
        dims = list(self.dims)
        dims.insert(d % n, [])
        return Layout(dims)

    def squeeze(self, ds: Sequence[int] | None) -> "Layout":
        """The layout after `x.squeeze(ds)` (all size-1 dims when `ds` is None)."""
        n = len(self.dims)
        shape = self.shape
        drop = set(range(n)) if ds is None else {d % n for d in ds}
        return Layout([d for k, d in enumerate(self.dims) if not (k in drop and is_one(shape[k]))])

    def expand(self, sizes: Sequence[object]) -> "Layout":
        """The layout after `x.expand(sizes)`: new leading dims and size-1 dims broadcast (stride 0)."""
        new = len(sizes) - len(self.dims)
        if new < 0:
            raise NotAView("expand to fewer dims")
        dims = [[(sizes[k], 0)] for k in range(new)]
        shape = self.shape
        for k, d in enumerate(self.dims):
            target = sizes[new + k]
            if isinstance(target, int) and target == -1 or sizes_equal(target, shape[k]):
                dims.append(d)
            elif is_one(shape[k]):
                dims.append([(target, 0)])
            else:
                raise NotAView(f"expand of a dim of size {shape[k]} to {target}")
        return Layout(dims)

    def reshape(self, sizes: Sequence[object]) -> "Layout":
        """The layout after `x.reshape(sizes)`, when it is a view; raises NotAView when it is not."""
        queue = [sd for d in self.dims for sd in d if not is_one(sd[0])]
        out: list[list[SubDim]] = []
        for n in sizes:
            taken: list[SubDim] = []
            rem = n
            while not is_one(rem):
                if not queue:
                    raise NotAView("reshape needs more elements than there are")
                s, st = queue.pop(0)
                if sizes_equal(rem % s, 0):
                    taken.append((s, st))
                    rem = rem // s
                elif sizes_equal(s % rem, 0):
                    taken.append((rem, st * (s // rem)))
                    queue.insert(0, (s // rem, st))
                    rem = 1
                else:
                    raise NotAView(f"reshape to {list(sizes)} splits a dim of size {s} unevenly")
            out.append(taken)
        if queue:
            raise NotAView("reshape leaves elements over")
        return Layout(out)

    def repeat_interleave(self, repeats: object, dim: int) -> "Layout":
        """The layout after `x.repeat_interleave(repeats, dim)`: each element repeated (a stride-0 sub-dim)."""
        dims = list(self.dims)
        d = dim % len(dims)
        dims[d] = list(dims[d]) + [(repeats, 0)]
        return Layout(dims)


def contiguous_strides(shape: Sequence[object]) -> list[object]:
    """The row-major strides of `shape`."""
    strides, acc = [], 1
    for size in reversed(list(shape)):
        strides.append(acc)
        acc = acc * size
    strides.reverse()
    return strides


def dim_holding(shape: Sequence[object], strides: Sequence[object], size, stride) -> int | None:
    """The dim d of a tensor of `shape` (with `strides`) within which the sub-dim (size, stride) lies:
    its stride a multiple of d's, its extent inside d's; None when there is none."""
    for d in range(len(shape)):
        if is_one(shape[d]):
            continue
        if not sizes_equal(stride % strides[d], 0):
            continue
        relative = stride // strides[d]
        if sizes_equal(shape[d] % (relative * size), 0):
            return d
    return None


def lift_to_problem(term_shape: Sequence[object], score_shape: Sequence[object], problem: Sequence[object]):
    """How a term that broadcasts against scores of `score_shape` becomes a bias of the `problem`
    `[B, H, Tq, Tk]`, the scores `score_shape` being a regrouping (a reshape) of the problem's.

    None when the term broadcasts against the problem as it is (the scores are the problem's shape, or the
    term does not vary over their batch dims). Else `(aligned, expand_to, reshape_to)`: the term viewed with
    the scores' rank (`aligned`, leading 1s added), expanded to `expand_to` (the scores' shape, except the
    dims the term does not vary over and that hold only problem dims it does not vary over either: kept at
    1), then reshaped to `reshape_to` (the problem's shape, 1 where the term is a broadcast). What that
    materializes is the bias's own size, never the scores' (Swin's `[nW, 1, N, N]` window mask under a
    `[B, nW, H, N, N]` view becomes `[B * nW, 1, N, N]`). Raises NotAView when the scores are not a
    regrouping of the problem.
    """
    rank = len(score_shape)
    t = list(term_shape)
    t = t[len(t) - rank:] if len(t) > rank else [1] * (rank - len(t)) + t
    if rank == 4 and all(sizes_equal(a, b) for a, b in zip(score_shape, problem)):
        return None
    if all(is_one(d) for d in t[:-2]):
        return None
    term_strides = [0 if is_one(size) else st for size, st in zip(t, contiguous_strides(t))]
    canonical = Layout([[(score_shape[d], term_strides[d])] for d in range(rank)]).reshape(list(problem))
    broadcast = [all(sizes_equal(st, 0) for _, st in canonical.clean(k)) for k in range(4)]
    # which dims of the problem each dim of the scores holds pieces of
    owners = Layout.contiguous(score_shape).reshape(list(problem))
    view_strides = contiguous_strides(score_shape)
    holds: list[set[int]] = [set() for _ in range(rank)]
    for k in range(4):
        for size, stride in owners.clean(k):
            d = dim_holding(score_shape, view_strides, size, stride)
            if d is None:
                raise NotAView(f"scores {list(score_shape)} are not a regrouping of {list(problem)}")
            holds[d].add(k)
    stays_one = [broadcast[k] and all(all(broadcast[kk] for kk in holds[d]) for d in range(rank) if k in holds[d])
                 for k in range(4)]
    expand_to = [1 if all(stays_one[k] for k in holds[d]) else score_shape[d] for d in range(rank)]
    reshape_to = [1 if stays_one[k] else problem[k] for k in range(4)]
    return t, expand_to, reshape_to


# Ops that keep every value and only move them; the handler maps (layout, node) -> layout.
def _apply(layout: Layout, node: fx.Node) -> Layout:
    t = node.target
    # Size arguments may be graph nodes under dynamic shapes (`repeat_interleave(k, s0, 1)`, a slice
    # to `T`): read them as their SymInt values.
    a = fx.node.map_arg(node.args, value_of)
    if t in COPIES or t in CASTS or t in MOVES:
        return layout
    if t in (aten.permute.default,):
        return layout.permute(a[1])
    if t in (aten.transpose.int, aten.swapaxes.default, aten.swapdims.default):
        return layout.transpose(a[1], a[2])
    if t is aten.t.default:
        return layout.transpose(0, 1) if len(layout.dims) == 2 else layout
    if t is aten.unsqueeze.default:
        return layout.unsqueeze(a[1])
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        ds = a[1] if isinstance(a[1], (list, tuple)) else [a[1]]
        return layout.squeeze(ds)
    if t is aten.squeeze.default:
        return layout.squeeze(None)
    if t in BROADCASTS:
        return layout.expand(shape_of(node))
    if t in RESHAPES:
        return layout.reshape(shape_of(node))
    if t in (aten.repeat_interleave.self_int,):
        if len(a) < 3 and "dim" not in node.kwargs:
            raise NotAView("repeat_interleave without dim flattens")
        dim = a[2] if len(a) > 2 else node.kwargs["dim"]
        return layout.repeat_interleave(a[1], dim)
    if t is aten.slice.Tensor:
        dim = a[1] if len(a) > 1 else 0
        start = a[2] if len(a) > 2 else None
        end = a[3] if len(a) > 3 else None
        step = a[4] if len(a) > 4 else 1
        size = shape_of(node.args[0])[dim]
        if (start in (None, 0)) and step == 1 and (end is None or (isinstance(end, int) and end >= 2**62)
                                                   or sizes_equal(end, size)):
            return layout
        raise NotAView("a real slice")
    raise NotAView(f"{t} is not a layout op")



def layout_of(use: fx.Node, source: fx.Node, chain: Sequence[fx.Node]) -> Layout:
    """The layout of `use` in terms of `source`, applying `chain` (source's consumers down to use)."""
    lay = Layout.contiguous(shape_of(source))
    for n in chain:
        if not is_scale_node(n):  # scalar multiplies move no element
            lay = _apply(lay, n)
    if len(lay.dims) != len(shape_of(use)):
        raise NotAView("rank mismatch after the chain")
    return lay


def layout_chain(node: fx.Node) -> list[fx.Node]:
    """Walk up from `node` through layout ops and scalar multiplies (they commute with layout).

    Returns the ancestors: `[node, its tensor input, that one's, ...]`. The walk stops at anything
    else, including casts to a different float dtype. (Callers read the scale of the multiplies on
    the part of the chain they use, with `scale_of`.)
    """
    chain = [node]
    cur = node
    while True:
        t = cur.target
        if cur.op != "call_function":
            break
        if t in LAYOUT_OPS and isinstance(cur.args[0], fx.Node):
            if t in CASTS:
                src_dt, dst_dt = value_of(cur.args[0]).dtype, value_of(cur).dtype
                if src_dt != dst_dt:
                    break
            cur = cur.args[0]
            chain.append(cur)
            continue
        found = scale_of(cur)
        if found is not None:
            cur = found[0]
            chain.append(cur)
            continue
        break
    return chain


def scale_of(n: fx.Node) -> tuple[fx.Node, float] | None:
    """(tensor, factor) when `n` multiplies or divides a tensor by a scalar (`x * c`, `c * x`, `x / c`)."""
    t = n.target
    if n.op != "call_function" or t not in SCALES or len(n.args) != 2:
        return None
    x, c = n.args
    if t in MULTIPLIES and scalar_value(x) is not None and scalar_value(c) is None:
        x, c = c, x   # c * x
    value = scalar_value(c)
    if not isinstance(x, fx.Node) or isinstance(x.meta.get("val"), (torch.SymInt, torch.SymFloat)) or value is None:
        return None
    return x, value if t in MULTIPLIES else 1.0 / value


def is_scale_node(n: fx.Node) -> bool:
    """A multiply or divide by a scalar: it moves no element, so layouts look through it."""
    return scale_of(n) is not None
