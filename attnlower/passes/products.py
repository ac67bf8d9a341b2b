"""The two products of a site (Q·Kᵀ and P·V), whatever op spells them: matmul, bmm, baddbmm, einsum.

`read_product` reads a product node as matmul order `[batch, m, k] x [batch, k, n]`: its two operands
(each with the permutation that brings an einsum operand to that order), the batch shape, baddbmm's
added input and alpha, and how an einsum's output permutes the matmul-order result. `logical_map`
maps an operand's layout to the op's `[B, H, X, Y]`; `output_steps` turn the op's `[B, Hq, Tq, Dv]`
result back into the P·V product's layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .constants import constant_value
from .layout import Layout, NotAView
from .site import Refused
from .vocabulary import shape_of, sizes_equal, static_size

aten = torch.ops.aten


@dataclass(frozen=True)
class RowInserted:
    """An einsum operand's permutation to matmul order, then a size-1 row dim inserted at `row`
    (the operand has no row index: decode's `q` in `bhd,bhsd->bhs`, `p` in `bhs,bhsd->bhd`)."""

    perm: list
    row: int


@dataclass(frozen=True)
class ProductOperand:
    """One operand of a product: `node`, read in matmul order after `perm` (einsum only; None: as it is)."""

    node: fx.Node
    perm: list | RowInserted | None = None

    @property
    def row_inserted(self) -> bool:
        """The operand has no row index: the product implies a size-1 row (Tq = 1 for q)."""
        return isinstance(self.perm, RowInserted)

    def node_dim(self, i: int) -> int:
        """The dim of `node` that is dim `i` of the operand in matmul order (before an inserted row)."""
        if self.perm is None:
            return i
        return (self.perm.perm if self.row_inserted else self.perm)[i]

    def in_matmul_order(self, lay: Layout) -> Layout:
        """`node`'s layout `lay`, permuted (and given its row) as the matmul reads it."""
        if self.row_inserted:
            return lay.permute(self.perm.perm).unsqueeze(self.perm.row)
        return lay if self.perm is None else lay.permute(self.perm)


@dataclass(frozen=True)
class Product:
    """A product node read as matmul order. `extra_terms` are baddbmm's `(input, beta)` added to it,
    `alpha` its factor on the product; `out_perm` how an einsum permutes the result (None: not at all)."""

    node: fx.Node
    left: ProductOperand
    right: ProductOperand
    spelling: str
    batch_shape: list
    extra_terms: list = field(default_factory=list)
    alpha: float = 1.0
    out_perm: list | None = None


def read_product(node: fx.Node, which: str) -> Product:
    """The product `node` in matmul order; `which` is "qk" or "pv" (only P·V may permute its output)."""
    t = node.target
    shape = shape_of(node)
    batch_shape = shape[:-2]
    if t is aten.matmul.default:
        a, b = node.args
        if len(shape_of(a)) < 2 or len(shape_of(b)) < 2:
            raise Refused("matmul with a vector")
        return Product(node, ProductOperand(a), ProductOperand(b), "matmul", batch_shape)
    if t is aten.bmm.default:
        a, b = node.args
        return Product(node, ProductOperand(a), ProductOperand(b), "bmm", batch_shape)
    if t is aten.baddbmm.default:
        inp, a, b = node.args[:3]
        # under dynamic=True Dynamo may pass alpha / beta as symbolic floats (graph nodes)
        beta = constant_value(node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1))
        alpha = constant_value(node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1))
        if alpha is None or beta is None:
            raise Refused("baddbmm's alpha or beta is data")
        extra = [] if beta == 0 else [(inp, beta)]
        return Product(node, ProductOperand(a), ProductOperand(b), "baddbmm", batch_shape, extra, alpha)
    if t is aten.einsum.default:
        eq, operands = node.args[0], node.args[1]
        if len(operands) != 2:
            raise Refused("einsum of more than two operands")
        perm_a, perm_b, out_perm = einsum_permutations(eq, which)
        if out_perm is not None:   # the matmul-order shape: canonical dim j is written at out_perm.index(j)
            shape = [shape[out_perm.index(j)] for j in range(len(shape))]
            batch_shape = shape[:-2]
        if isinstance(perm_a, RowInserted):   # [batch, n]: every dim but the last is batch
            batch_shape = shape[:-1]
        return Product(node, ProductOperand(operands[0], perm_a), ProductOperand(operands[1], perm_b), "einsum",
                       batch_shape, out_perm=out_perm)
    raise Refused(f"{t} is not a product")


def einsum_permutations(eq: str, which: str):
    """Permutations that bring einsum operands to matmul form `[batch, m, k] x [batch, k, n]`, and the
    permutation `out_perm` with `einsum_out = matmul_out.permute(out_perm)` (None when it is the identity).

    Batch dims keep the order of the first operand (`bqhd,bkhd->bhqk` reads q as [b, h, q, d]). The
    Q·Kᵀ product must write [batch, m, n] (the softmax reads the last dim as the keys); P·V may write
    any order (`bhqk,bkhd->bqhd` is the BSHD output, a permute of the op's [B, H, Tq, D]).
    """
    eq = eq.replace(" ", "")
    if "->" not in eq or "..." in eq:
        raise Refused(f"einsum '{eq}' is not a batched matmul this pass understands")
    ins, out = eq.split("->")
    a, b = ins.split(",")
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1:
        raise Refused(f"einsum '{eq}' does not contract exactly one index")
    d = contracted[0]
    m = [c for c in a if c not in b]
    n = [c for c in b if c not in a]
    batch = [c for c in a if c in b and c in out]
    canonical = batch + m + n
    row = None
    if not m and len(n) == 1:
        row = len(batch)   # no query / row index (decode's `bhd,bhsd->bhs`): a size-1 row is implied
    if len(m) > 1 or (len(m) == 0 and row is None) or len(n) != 1 or sorted(out) != sorted(canonical) \
            or len(set(out)) != len(out) \
            or set(a) != set(batch + m + [d]) or set(b) != set(batch + n + [d]):
        raise Refused(f"einsum '{eq}' is not [batch, m, k] x [batch, k, n] -> a permutation of [batch, m, n]")
    out_perm = [canonical.index(c) for c in out]
    if which == "qk" and out_perm != list(range(len(out))):
        raise Refused(f"einsum '{eq}' writes the scores as {out}, not [{''.join(canonical)}]: "
                      "the softmax would not run over the keys of each query")
    perm_a = [a.index(c) for c in batch + m + [d]]
    perm_b = [b.index(c) for c in batch + [d] + n]
    if row is not None:
        perm_a = RowInserted(perm_a, row)
    return perm_a, perm_b, (None if out_perm == list(range(len(out))) else out_perm)


def logical_map(batch_shape, batch, heads):
    """Map an operand layout [pbatch..., X, Y] (already in product order) to [B, H, X, Y]."""

    def to_logical(lay: Layout) -> Layout:
        dims = lay.dims
        n_op_batch = len(dims) - 2
        n_batch = len(batch_shape)
        if n_op_batch > n_batch:
            raise NotAView("operand has more batch dims than the product")
        xy = lay.shape[-2:]
        lay = lay.expand(list(batch_shape) + list(xy))
        return lay.reshape([batch, heads] + list(xy))

    return to_logical


def output_steps(pv: Product, batch, heads, transposed: bool = False) -> tuple[tuple[str, object], ...]:
    """The steps from the op's `[B, Hq, Tq, Dv]` result to the P·V product's own layout.

    `transposed`: the product is `X @ Pᵀ` (P its right operand), whose matmul-order result is the op's
    `[.., Dv, Tq]`. The product's batch dims are the op's `[B, Hq]` as they are, flattened (`[B*H]`),
    absent (B = H = 1), or split further (`[B, H, nBlocks]` with `Hq = H * nBlocks`).
    """
    steps: tuple = (("permute", (0, 1, 3, 2)),) if transposed else ()
    shape = [static_size(size) for size in pv.batch_shape]
    n = len(shape)
    if n == 2 and sizes_equal(shape[0], batch) and sizes_equal(shape[1], heads):
        pass
    elif n == 1:
        steps += (("flatten", (0, 1)),)
    elif n == 0:
        steps += (("squeeze", 0), ("squeeze", 0))
    else:
        split = (1, shape[1:]) if sizes_equal(shape[0], batch) else (0, shape)
        if sum(not isinstance(size, int) for size in split[1]) > 1:
            raise Refused(f"the P·V product's batch dims {shape} hold more than one symbolic size "
                          f"besides the batch: they cannot be split back from the op's [B, H]")
        steps += ((("unflatten", split),) if split[0] == 1 else (("flatten", (0, 1)), ("unflatten", split)))
    if pv.left.row_inserted:
        steps += (("squeeze", -2),)   # the implied query row
    if pv.out_perm is not None:
        steps += (("permute", tuple(pv.out_perm)),)
    return steps
