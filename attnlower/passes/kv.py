"""Stage resolve_kv: see through the producers of Q, K and V to the tensors the fused op reads.

The fused ops want q `[B, Hq, T, D]` and k/v `[B, Hkv, T, D]` *before* any repeat: a model's
`repeat_kv` (unsqueeze → expand → reshape) or `repeat_interleave` materializes `Hq/Hkv` copies
that the kernel does not need. `resolve_operand` walks up the chain of layout ops from a product
operand, and returns the farthest tensor of which the operand is provably a view
(`layout.Layout`), with the size-free steps (squeeze, unsqueeze, permute) that turn it into the
4-D form and the GQA group it was repeated by. `resolve_paged` sees K / V gathered from a block pool
through a block table (`pool[table]`, any gather spelling), which the paged op reads in place.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx as fx

from .layout import (Layout, NotAView, contiguous_strides, dim_holding, is_scale_node, layout_chain, layout_of,
                     scale_of)
from .site import AttentionChain, AttentionMatch, Context, Operand, OperandRef, PagedRef, Refused
from .vocabulary import is_one, shape_of, size_hint, sizes_equal, static_size, value_of

aten = torch.ops.aten


def resolve_kv(gm: fx.GraphModule, ctx: Context) -> str:
    """Trace each open site's q, k and v to their sources (`AttentionMatch`), or refuse it with the reason."""
    resolved = paged = 0
    for site in ctx.open_sites(gm):
        try:
            site.match = resolve_match(site.chain)
        except (Refused, NotAView) as e:
            site.refuse(str(e))
            continue
        resolved += 1
        paged += site.match.paged is not None
    return f"{resolved} site(s) resolved, {paged} reading a paged cache"


def resolve_match(chain: AttentionChain) -> AttentionMatch:
    """The chain's operands traced to their sources: the match the analyzer reads."""
    q = resolve_operand(chain.q_operand.node, chain.q_operand.to_logical, "q")
    k = resolve_operand(chain.k_operand.node, chain.k_operand.to_logical, "kv")
    v = resolve_operand(chain.v_operand.node, chain.v_operand.to_logical, "v")
    if not sizes_equal(k.heads, v.heads):
        raise Refused(f"K has {k.heads} heads and V {v.heads}")
    paged, paged_scale = paged_pair(chain.k_operand, chain.v_operand, chain.score_scale * q.scale)
    return AttentionMatch.of(chain, q=q, k=k, v=v, kv_heads=k.heads, scale=chain.score_scale * q.scale * k.scale,
                             paged=paged, paged_scale=paged_scale)


def paged_pair(k: Operand, v: Operand, score_scale_without_k: float):
    """((K, V) PagedRefs, the score scale when reading K paged) when both are gathered from pools through
    one table (V unscaled), else (None, 0.0)."""
    pk = resolve_paged(k.node, k.to_logical)
    pv = resolve_paged(v.node, v.to_logical)
    if pk is None or pv is None or pk.table is not pv.table or pv.scale != 1.0:
        return None, 0.0
    return (pk, pv), score_scale_without_k * pk.scale


def resolve_operand(operand: fx.Node, to_logical: Callable[[Layout], Layout], role: str) -> OperandRef:
    """The farthest source of which `operand` is a view, fitted to `[B, H, T, D]`.

    `to_logical` maps the operand's own layout to the logical `[B, H, T, D]` order (it transposes
    kᵀ back, splits a flattened `B*H` batch, broadcasts a matmul batch). `role` is "q", "kv" or
    "v": K and V may be a head-broadcast (GQA/MQA) of their source; V may not be scaled on the
    way (the scale of the scores does not apply to it), so its walk stops at a multiply.
    """
    chain = layout_chain(operand)
    if role == "v":
        for i, n in enumerate(chain):
            if is_scale_node(n):
                chain = chain[:i + 1]
                break
        role = "kv"
    last_error = "no candidate"
    for idx in range(len(chain) - 1, -1, -1):
        src = chain[idx]
        if len(shape_of(src)) > 5:
            continue
        down = list(reversed(chain[:idx]))
        try:
            lay = to_logical(layout_of(operand, src, down))
            steps, heads = _fit(src, lay, role)
        except NotAView as e:
            last_error = str(e)
            continue
        scale = 1.0
        for n in chain[:idx]:
            if is_scale_node(n):
                scale *= scale_of(n)[1]
        return OperandRef(src, tuple(steps), heads, scale)
    raise NotAView(f"{role} operand {operand.name} is not a view of a [B, H, T, D] tensor ({last_error})")


def _fit(src: fx.Node, lay: Layout, role: str):
    """Express the logical `[B, H, T, D]` layout `lay` as steps from `src`; return (steps, heads of the
    prepared tensor).

    Each logical dim is a list of sub-dims of `src`'s (virtual, contiguous) index space. Every sub-dim
    must lie within one dim of `src`, and the sub-dims within a dim must tile it exactly (no slice, no
    stride): the steps then unflatten each dim of `src` into its sub-dims, permute them into the logical
    order and flatten the sub-dims of each logical dim back into one (fairseq's `[T, B, E]` read as
    `[B, H, T, D]`: unflatten E, permute; block-local attention's `[B, H, nB, Tb, D]` read with `H * nB`
    heads: flatten). Unflatten and permute are views; a flatten is a view wherever the strides allow it,
    else a copy of the operand. K/V may broadcast over the heads (GQA / MQA): that sub-dim is dropped and
    the op reads the group from the head count.
    """
    shape = shape_of(src)
    strides = contiguous_strides(shape)
    if len(lay.dims) != 4:
        raise NotAView("logical operand is not 4-D")

    wanted: list[list[tuple[object, object]]] = []   # per logical dim: its sub-dims in src, outer first
    heads = None
    for k in range(4):
        subs = lay.clean(k)
        if k == 1 and role == "kv":
            if len(subs) >= 2 and not sizes_equal(subs[0][1], 0) and sizes_equal(subs[-1][1], 0):
                heads = math.prod(size for size, _ in subs[:-1])   # GQA: head h reads source head h // group
                subs = subs[:-1]
            elif len(subs) == 1 and sizes_equal(subs[0][1], 0):
                heads = 1                    # MQA: every head reads the one source head
                subs = []
        if any(sizes_equal(st, 0) for _, st in subs):
            raise NotAView(f"logical dim {k} is a broadcast")
        wanted.append(subs)
    if heads is None:
        heads = lay.shape[1]

    # each sub-dim to the dim of src it lies in, as (logical dim, size, stride relative to that dim)
    per_dim: dict[int, list[tuple[tuple[int, int], object, object]]] = {d: [] for d in range(len(shape))}
    for k, subs in enumerate(wanted):
        for index, (size, stride) in enumerate(subs):
            d = dim_holding(shape, strides, size, stride)
            if d is None:
                raise NotAView(f"logical dim {k} is not made of whole dims of {src.name} or of pieces of them")
            per_dim[d].append(((k, index), size, stride // strides[d]))
    # per dim of src: its pieces ((logical dim, index among that dim's sub-dims), size), outer first
    pieces: list[list[tuple[tuple[int, int], object]]] = []
    for d, held in per_dim.items():
        if not held:
            if not is_one(shape[d]):
                raise NotAView(f"{src.name} has a dim of size {shape[d]} the operand does not use")
            pieces.append([])
            continue
        held.sort(key=lambda piece: -(size_hint(piece[2]) or 0))
        expected = 1
        for _, size, relative in reversed(held):
            if not sizes_equal(relative, expected):
                raise NotAView(f"dim {d} of {src.name} is not tiled by the operand's dims (a slice or a step)")
            expected = expected * size
        if not sizes_equal(expected, shape[d]):
            raise NotAView(f"dim {d} of {src.name} is not tiled by the operand's dims (a slice)")
        pieces.append([(key, size) for key, size, _ in held])

    steps: list[tuple[str, object]] = []
    for d in reversed(range(len(shape))):             # from the back: earlier dims keep their index
        if len(pieces[d]) > 1:
            sizes = [static_size(size) for _, size in pieces[d]]
            if sum(not isinstance(size, int) for size in sizes) > 1:
                raise NotAView(f"dim {d} of {src.name} splits into {sizes}: more than one symbolic size")
            steps.append(("unflatten", (d, sizes)))
    flat = [piece for ps in pieces for piece in (ps or [None])]   # the dims after unflattening
    spare = [i for i, piece in enumerate(flat) if piece is None]
    for i in reversed(spare):                          # size-1 dims nobody needs
        steps.append(("squeeze", i))
    flat = [piece for piece in flat if piece is not None]
    # permute: logical dim 0's pieces first, each logical dim's pieces outer first (their order in `wanted`)
    order = sorted(range(len(flat)), key=lambda i: flat[i][0])
    if order != list(range(len(order))):
        steps.append(("permute", order))
    at = 0
    for k in range(4):
        count = len(wanted[k])
        if count == 0:
            steps.append(("unsqueeze", at))
            at += 1
            continue
        if count > 1:
            steps.append(("flatten", (at, at + count - 1)))
        at += 1
    return steps, heads


# --------------------------------------------------------------------------------------------
# paged caches: K/V gathered from a block pool through a block table


def _gather_parts(node: fx.Node):
    """(pool, index node, index is flattened) for a gather along the pool's first dim, else None."""
    t = node.target
    if t is aten.index.Tensor:
        pool, indices = node.args
        if len(indices) == 1 and isinstance(indices[0], fx.Node):
            return pool, indices[0]
    if t is aten.index_select.default and node.args[1] == 0:
        return node.args[0], node.args[2]
    if t is aten.embedding.default:
        return node.args[0], node.args[1]
    return None


def _table_2d(index: fx.Node, batch, max_blocks) -> fx.Node | None:
    """The [B, max_blocks] table an index tensor is (or is a flatten of)."""
    shape = shape_of(index)
    if len(shape) == 2 and sizes_equal(shape[0], batch) and sizes_equal(shape[1], max_blocks):
        return index
    chain = layout_chain(index)
    for cand in chain[1:]:
        cs = shape_of(cand)
        if len(cs) == 2 and sizes_equal(cs[0], batch) and sizes_equal(cs[1], max_blocks):
            try:
                lay = layout_of(index, cand, list(reversed(chain[:chain.index(cand)])))
            except NotAView:
                continue
            if [lay.clean(0)] == [[(s, st) for s, st in Layout.contiguous(cs).reshape([batch * max_blocks]).clean(0)]]:
                return _uncast_index(cand)
    return None


def _uncast_index(index: fx.Node) -> fx.Node:
    """Look through integer-to-integer casts of an index (`table.long()`): K and V then share a table."""
    while (index.op == "call_function" and index.target in (aten._to_copy.default, aten.to.dtype)
           and isinstance(index.args[0], fx.Node) and not value_of(index.args[0]).dtype.is_floating_point
           and value_of(index.args[0]).dtype != torch.bool):
        index = index.args[0]
    return index


def resolve_paged(operand: fx.Node, to_logical: Callable[[Layout], Layout]) -> PagedRef | None:
    """If the K/V operand is a view of `pool[table]` (any gather spelling), how to read it paged."""
    chain = layout_chain(operand)
    gather = chain[-1]
    parts = _gather_parts(gather) if gather.op == "call_function" else None
    if parts is None:
        return None
    pool, index = parts
    pshape = shape_of(pool)
    ishape = shape_of(index)
    try:
        lay = to_logical(layout_of(operand, gather, list(reversed(chain[:-1]))))
    except NotAView:
        return None
    if gather.target is aten.embedding.default:
        return None  # a 2-D weight: the pool's [Hkv, block, D] structure is flattened away
    if len(pshape) != 4 or len(ishape) not in (1, 2):
        return None
    gshape = list(ishape) + list(pshape[1:])
    strides = [st for (_, st), in Layout.contiguous(gshape).dims]
    batch = lay.shape[0]
    if len(ishape) == 2:
        b_sub = [(ishape[0], strides[0])]
        blk_sub = [(ishape[1], strides[1])]
        max_blocks = ishape[1]
        pool_dim0 = 2  # gathered dims 2..4 are the pool's dims 1..3
    else:
        if not sizes_equal(ishape[0] % batch, 0):
            return None
        max_blocks = ishape[0] // batch
        b_sub = [(batch, strides[0] * max_blocks)]
        blk_sub = [(max_blocks, strides[0])]
        pool_dim0 = 1
    pool_sub = {j: (gshape[j], strides[j]) for j in range(pool_dim0, pool_dim0 + 3)}

    def clean(subs):
        return [(s, st) for s, st in subs if not is_one(s)]

    def same(a, b):
        return len(a) == len(b) and all(sizes_equal(x[0], y[0]) and sizes_equal(x[1], y[1]) for x, y in zip(a, b))

    if not same(lay.clean(0), clean(b_sub)):
        return None
    head_subs = lay.clean(1)
    heads_src = None
    if len(head_subs) == 2 and sizes_equal(head_subs[1][1], 0):
        head_subs = head_subs[:1]
    elif len(head_subs) == 1 and sizes_equal(head_subs[0][1], 0):
        head_subs = []
    t_subs, d_subs = lay.clean(2), lay.clean(3)
    if len(t_subs) == 0 or len(t_subs) > 2 or len(d_subs) != 1 or len(head_subs) > 1:
        return None
    if len(t_subs) == 2:
        if not same(t_subs[:1], clean(blk_sub)):
            return None
        offset = t_subs[1]
    else:
        if not is_one(max_blocks):
            return None
        offset = t_subs[0]

    def find(sub):
        for j, ps in pool_sub.items():
            if not is_one(ps[0]) and sizes_equal(ps[0], sub[0]) and sizes_equal(ps[1], sub[1]):
                return j
        return None

    j_blk, j_d = find(offset), find(d_subs[0])
    j_h = find(head_subs[0]) if head_subs else None
    used = {j for j in (j_blk, j_d, j_h) if j is not None}
    if j_blk is None or j_d is None or (head_subs and j_h is None) or len(used) != len(
            [x for x in (j_blk, j_d, j_h) if x is not None]):
        return None
    if j_h is None:
        rest = [j for j in pool_sub if j not in used]
        if len(rest) != 1 or not is_one(pool_sub[rest[0]][0]):
            return None
        j_h = rest[0]
    heads_src = pool_sub[j_h][0]
    table = _table_2d(_uncast_index(index), batch, max_blocks)
    if table is None:
        return None
    perm = (0, j_h - pool_dim0 + 1, j_blk - pool_dim0 + 1, j_d - pool_dim0 + 1)
    scale = 1.0
    for n in chain[:-1]:
        if is_scale_node(n):
            scale *= scale_of(n)[1]
    return PagedRef(pool=pool, pool_perm=perm, table=table, heads=heads_src,
                    block_size=pool_sub[j_blk][0], length=max_blocks * pool_sub[j_blk][0], scale=scale)
