"""Stage score_chain: from each softmax up the score chain to Q·Kᵀ, and down the probabilities to P·V.

No templates: two tables of small rules, one per op family, walk the dataflow. Up from the softmax
input, each rule of `SCORE_RULES` reads one node (views, casts, scalar scales, mask adds /
`masked_fill` / `where`, a tanh softcap), records what it does to the scores in the walk and returns
the node holding the scores before it, until a product. Down from the softmax, each rule of
`PROBABILITY_RULES` (views, casts, dropout) passes the probabilities on to their one user, until the
P·V product. Any op without a rule stops the walk, and the site is refused with the reason. An SDPA
call needs no walk: its arguments say it all (`sdpa.sdpa_arguments`).

The result is the site's `AttentionChain`: the terms, scale and softcap of the scores, both products'
operands as views to be traced (`resolve_kv`), the region the fused op replaces and its output layout.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from .anchors import manual_softmax, row_max_of
from .constants import constant_value, real_float
from .layout import Layout, NotAView, layout_of
from .products import Product, ProductOperand, logical_map, output_steps, read_product
from .sdpa import sdpa_arguments
from .site import AttentionChain, Context, HeadScale, Operand, Refused, ScoreTerm
from .vocabulary import (ADDS, MASKED_FILLS, MULTIPLIES, PERMUTES, PRODUCTS, SCALES, SCORE_PASS_THROUGH, SOFTMAX_OPS, SUBTRACTS,
                         WHERES, is_one, reads_only_size, shape_of, size_sources, sizes_equal, value_of)

aten = torch.ops.aten


def score_chain(gm: fx.GraphModule, ctx: Context) -> str:
    """Grow each open site of `gm` from its anchor into its `AttentionChain`, or refuse it with the reason."""
    proven = 0
    for site in ctx.open_sites(gm):
        try:
            site.chain = sdpa_chain(site.anchor) if site.spelling == "sdpa" else softmax_chain(site.anchor)
        except (Refused, NotAView) as e:
            site.refuse(str(e))
            continue
        proven += 1
    return f"{proven} chain(s) proven"


# --------------------------------------------------------------------------------------------
# up: the score chain
#
# Walking up from the softmax input, each rule reads one node of the chain, records what it does
# to the scores in the walk (a scale, a mask/bias term, a softcap) and returns the node that holds
# the scores before it. The walk ends at a product (PRODUCTS); any op without a rule stops it.


@dataclass
class ScoreWalk:
    """What the rules have read so far, from the softmax input up.

    `post` is the product of every scalar factor between the current node and the softmax: terms
    recorded now are multiplied by it, so every term is in the units of the softmax input.
    """

    post: float = 1.0
    softcap: float = 0.0
    inside_tanh: bool = False
    terms: list[ScoreTerm] = field(default_factory=list)
    region: list[fx.Node] = field(default_factory=list)   # nodes read besides the chain itself
    # (multiplier, divide, its shape aligned right against the scores' shape where it is applied, that shape)
    head_scale: tuple[fx.Node, bool, tuple, tuple] | None = None

    def add_term(self, kind: str, node: fx.Node, value: float, at: fx.Node) -> None:
        """Record a mask / bias term applied at node `at` (refused inside the softcap or below a head scale)."""
        if self.inside_tanh:
            raise Refused("a mask or bias is applied inside the softcap's tanh")
        self.refuse_below_head_scale("a mask or bias")
        val = value_of(at)
        self.terms.append(ScoreTerm(kind, node, value, tuple(shape_of(at)), val.dtype))

    def refuse_below_head_scale(self, what: str) -> None:
        """Refuse `what` when a per-head scale that is data was already met (it would scale `what` too)."""
        # The walk goes up: a term met after the multiplier is applied to the scores before it, so the
        # multiplier would scale it too (a -inf fill times a negative or zero scale is +inf or NaN).
        if self.head_scale is not None:
            raise Refused(f"{what} is applied to the scores before they are multiplied by "
                          f"{self.head_scale[0].name}, a tensor whose value is data: folding that "
                          "factor into q would change the term")


# op -> rule(node, walk) -> the node holding the scores before `node`
SCORE_RULES: dict[object, Callable[[fx.Node, "ScoreWalk"], fx.Node]] = {}


def _registrar(table: dict):
    """A decorator factory: `@rule(*ops)` enters the decorated function in `table` for each of `ops`."""
    def rule(*ops):
        def register(fn):
            for op in ops:
                table[op] = fn
            return fn
        return register
    return rule


score_rule = _registrar(SCORE_RULES)   # @score_rule(*ops): the score-chain rule of `ops`


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = shape_of(a), shape_of(b)
    return len(sa) == len(sb) and all(sizes_equal(x, y) for x, y in zip(sa, sb))


def _scores_operand(node: fx.Node, scores: fx.Node) -> fx.Node:
    """`scores`, after checking the op did not broadcast them to a larger shape (a term may not add dims)."""
    if not _same_shape(scores, node):
        raise Refused(f"{node.name} broadcasts the scores from {list(shape_of(scores))} to {list(shape_of(node))}")
    return scores


def carries_scores(n, _seen=None) -> bool:
    """Does `n` hold the Q·Kᵀ product, i.e. is a product reachable from it through score-chain ops?

    Decided by dataflow alone (never by operand position or shape): a bias or a mask is computed
    from other tensors; the scores are the operand through which the walk reaches the product.
    """
    seen = set() if _seen is None else _seen
    stack = [n]
    while stack:
        x = stack.pop()
        if not isinstance(x, fx.Node) or x in seen or x.op != "call_function":
            continue
        seen.add(x)
        if x.target in PRODUCTS:
            return True
        if x.target in SCORE_RULES:
            stack.extend(a for a in x.args if isinstance(a, fx.Node))
    return False


@score_rule(*SCORE_PASS_THROUGH)
def _score_pass_through(cur: fx.Node, w: ScoreWalk) -> fx.Node:
    src = cur.args[0]
    if len(shape_of(src)) < 2 or list(shape_of(src))[-2:] != list(shape_of(cur))[-2:]:
        raise Refused(f"{cur.target} changes the [Tq, Tk] dims of the scores")
    if cur.target is aten.expand.default and not _same_shape(src, cur):
        raise Refused("the scores are broadcast")
    if value_of(cur).dtype in (torch.bool,) or not value_of(cur).dtype.is_floating_point:
        raise Refused(f"the scores are cast to {value_of(cur).dtype}")
    return src


@score_rule(*SCALES)
def _score_scale(cur: fx.Node, w: ScoreWalk) -> fx.Node:
    a, b = cur.args[0], cur.args[1]
    is_mul = cur.target in MULTIPLIES
    if is_mul and (not isinstance(a, fx.Node) or constant_value(a) is not None
                   or not carries_scores(a) and carries_scores(b)):
        a, b = b, a   # c * s
    if not is_mul and not carries_scores(a) and carries_scores(b):
        raise Refused(f"{cur.name} divides by the scores")
    c = constant_value(b)
    if c is None:
        _record_head_scale(cur, a, b, w, divide=not is_mul)
        return _scores_operand(cur, a)
    w.post = w.post * c if is_mul else w.post / c
    return _scores_operand(cur, a)


def _record_head_scale(cur: fx.Node, scores, b, w: ScoreWalk, divide: bool) -> None:
    """`scores * b` with `b` data: accept it as a per-head scale (folded into q later) when `b` is a
    float tensor constant over the query and key positions; the heads it varies over are checked
    against the site's [B, H] once they are known (`_check_head_scale`)."""
    name = getattr(b, "name", b)
    what = f"the scores are {'divided' if divide else 'multiplied'} by a tensor ({name}) whose value is data"
    if not isinstance(b, fx.Node) or not isinstance(value_of(b), torch.Tensor) or carries_scores(b):
        raise Refused(what)
    if not value_of(b).dtype.is_floating_point:
        raise Refused(f"{what} and is {value_of(b).dtype}, not a float per-head scale")
    if w.head_scale is not None:
        raise Refused(f"{what}, a second per-head scale after {w.head_scale[0].name}")
    sb, ss = list(shape_of(b)), list(shape_of(cur))
    if len(sb) > len(ss) or len(ss) < 2:
        raise Refused(f"{what} of shape {sb}, more dims than the scores {ss}")
    aligned = [1] * (len(ss) - len(sb)) + sb
    if not (is_one(aligned[-1]) and is_one(aligned[-2])):
        raise Refused(f"{what} of shape {sb}: against scores of shape {ss} it varies over the query or "
                      "key positions, so it is not a per-head scale that can move into q")
    w.head_scale = (b, divide, tuple(aligned), tuple(ss))


def _check_head_scale(w: ScoreWalk, batch, heads, row_inserted: bool) -> HeadScale | None:
    """The walk's per-head scale, once the site's [B, H] is known: constant over the batch, and over the
    heads unless the scores where it is applied are [B, H, Tq, Tk] in the op's head order."""
    if w.head_scale is None:
        return None
    node, divide, aligned, score_shape = w.head_scale
    lead, score_lead = list(aligned[:-2]), list(score_shape[:-2])
    what = f"the scores are multiplied by {node.name} (shape {list(shape_of(node))}), a tensor whose value is data"
    if row_inserted:
        raise Refused(f"{what}, on scores without a query dim")
    if not all(is_one(d) for d in lead):
        per_head = (len(lead) == 2 and len(score_lead) == 2 and is_one(lead[0]) and sizes_equal(lead[1], heads)
                    and sizes_equal(score_lead[0], batch) and sizes_equal(score_lead[1], heads))
        if not per_head:
            raise Refused(f"{what}, varying over dims {lead} of scores whose leading dims are "
                          f"{list(score_lead)}: only a per-head [H, 1, 1] (or scalar) factor moves into q")
    return HeadScale(node, divide)


@score_rule(*ADDS, *SUBTRACTS)
def _score_add(cur: fx.Node, w: ScoreWalk) -> fx.Node:
    """`a + alpha * b` (`a - alpha * b`): the scores on either side, the other operand a bias term."""
    a, b = cur.args[0], cur.args[1]
    alpha = constant_value(cur.kwargs.get("alpha", cur.args[2] if len(cur.args) > 2 else 1))
    if alpha is None:
        raise Refused(f"{cur.name} scales by an alpha that is data")
    sign = -1.0 if cur.target in SUBTRACTS else 1.0
    row_max = row_max_of(b, a) if sign < 0 and alpha == 1.0 else None
    if row_max is not None:
        # s - max_j(s): the same shift for every key of a row, which softmax removes
        w.region += row_max
        return a
    a_is, b_is = carries_scores(a), carries_scores(b)
    if a_is == b_is:
        raise Refused(f"{cur.name}: {'both' if a_is else 'neither'} of its operands reach the Q·Kᵀ product "
                      "through ops that keep the scores' [.., Tq, Tk] layout (views, casts, scales, masks)")
    scores, other, other_coef, scores_coef = (a, b, sign * alpha, 1.0) if a_is else (b, a, 1.0, sign * alpha)
    if isinstance(other, fx.Node) and constant_value(other) is None:
        # a bool or an int here is a number (0/1, the integer): `ScoreTerm.dtype` says which float it becomes
        w.add_term("bias", other, w.post * other_coef, cur)
    # adding a constant shifts every score of a row equally: softmax does not change
    w.post *= scores_coef
    return _scores_operand(cur, scores)


def _fill_value(v: float, post: float, at: fx.Node | None = None) -> float:
    """A fill `v` applied at node `at`, in the units of the softmax input: rounded to the scores' dtype
    there first (fp16 makes -1e9 -inf, a real mask; bf16 makes it -998244352), then times `post`."""
    if at is not None and math.isfinite(v):
        dtype = value_of(at).dtype
        if dtype.is_floating_point:
            v = real_float(lambda: torch.tensor(v, dtype=dtype))
    return v * post if math.isfinite(v) else v * (1 if post > 0 else -1)


@score_rule(*MASKED_FILLS)
def _score_masked_fill(cur: fx.Node, w: ScoreWalk) -> fx.Node:
    s, m, val = cur.args[0], cur.args[1], cur.args[2]
    v = constant_value(val)
    if v is None:
        raise Refused("masked_fill with a value that is data")
    w.add_term("fill", m, _fill_value(v, w.post, cur), cur)
    return _scores_operand(cur, s)


@score_rule(*WHERES)
def _score_where(cur: fx.Node, w: ScoreWalk) -> fx.Node:
    m, a, b = cur.args
    a_is, b_is = carries_scores(a), carries_scores(b)
    if a_is == b_is:
        raise Refused("cannot tell the scores from the fill value in a where")
    v = constant_value(b if a_is else a)
    if v is None:
        raise Refused("where() fills with a tensor that is data")
    w.add_term("keep" if a_is else "fill", m, _fill_value(v, w.post, cur), cur)
    return _scores_operand(cur, a if a_is else b)


@score_rule(aten.tanh.default)
def _score_tanh(cur: fx.Node, w: ScoreWalk) -> fx.Node:
    if w.softcap or w.inside_tanh:
        raise Refused("two tanh on the scores")
    w.refuse_below_head_scale("the softcap's tanh")
    # terms already recorded are outside the tanh: softcap(s) + terms is the op's order
    w.softcap = w.post
    w.inside_tanh = True
    return cur.args[0]


def _walk_scores(x: fx.Node, w: ScoreWalk) -> tuple[fx.Node, list[fx.Node]]:
    """Walk up from the softmax input `x` to the product; returns (product, chain nodes)."""
    chain: list[fx.Node] = []
    cur = x
    while True:
        chain.append(cur)  # every region node's users are checked once the region is whole
        if cur.op != "call_function":
            raise Refused(f"the scores come from {cur.op} {cur.name}, not a matmul")
        if cur.target in PRODUCTS:
            return cur, chain
        rule = SCORE_RULES.get(cur.target)
        if rule is None:
            raise Refused(f"the scores pass through {getattr(cur.target, '__name__', cur.target)} "
                          "before the softmax")
        cur = rule(cur, w)


def _heads_split(shape, chain: list[fx.Node]):
    """(batch, heads) of the scores: the softmax's own [B, H] or, for scores flattened to [B*H, Tq, Tk],
    the [B, H] of a 4-D view of them on the chain (BART's `view(bsz, heads, tgt, src) + mask`), so the
    op runs per head and a mask added in that view keeps its own broadcast."""
    lead = shape[:-2]
    if len(lead) == 2:
        return lead[0], lead[1]
    if len(lead) == 0:
        return 1, 1
    if len(lead) > 2:
        # [B, H, nBlocks, Tq, Tk] (block-local attention): the extra dims fold into the heads; the
        # operands are read with H * nBlocks heads (kv._fit), the output split back (products.output_steps)
        return lead[0], math.prod(lead[1:])
    for n in chain:
        s = shape_of(n)
        if len(s) == 4 and not is_one(s[0]) and not is_one(s[1]) and sizes_equal(s[0] * s[1], lead[0]):
            return s[0], s[1]
    return lead[0], 1


# --------------------------------------------------------------------------------------------
# down: the probability chain
#
# From the softmax, each rule takes the probabilities' one user, records what it does (a dropout) and
# returns the node holding the probabilities after it. The walk ends at the P·V product.


@dataclass
class ProbabilityWalk:
    """What the rules have read from the softmax down: the nodes passed and the dropout applied."""

    chain: list[fx.Node] = field(default_factory=list)
    dropout_p: float = 0.0


# op -> rule(node, walk) -> the node holding the probabilities after `node`
PROBABILITY_RULES: dict[object, Callable[[fx.Node, ProbabilityWalk], fx.Node]] = {}


probability_rule = _registrar(PROBABILITY_RULES)   # @probability_rule(*ops): the probability-chain rule of `ops`


@probability_rule(*SCORE_PASS_THROUGH, *PERMUTES)
def _probabilities_pass_through(u: fx.Node, w: ProbabilityWalk) -> fx.Node:
    # their layout on the way is checked as a whole at P·V (`_check_probabilities_layout`)
    w.chain.append(u)
    return u


@probability_rule(aten.dropout.default)
def _probabilities_dropout(u: fx.Node, w: ProbabilityWalk) -> fx.Node:
    p, train = u.args[1], u.args[2]
    if train and p > 0:
        if w.dropout_p:
            raise Refused("two dropouts on the probabilities")
        w.dropout_p = float(p)
    w.chain.append(u)
    return u


@probability_rule(aten.native_dropout.default)
def _probabilities_native_dropout(u: fx.Node, w: ProbabilityWalk) -> fx.Node:
    p, train = u.args[1], u.args[2]
    getitems = list(u.users)
    if not all(g.target is operator.getitem for g in getitems) or any(g.args[1] != 0 for g in getitems):
        raise Refused("the dropout mask is used elsewhere")
    if train and p > 0:
        w.dropout_p = float(p)
    w.chain += [u] + getitems
    if len(getitems) != 1:
        raise Refused("dropout output used several times")
    return getitems[0]


def _walk_probabilities(sm: fx.Node, w: ProbabilityWalk) -> fx.Node:
    """Walk down from the softmax `sm` to the P·V product; returns it."""
    cur = sm
    while True:
        u = _only_user(cur, "attention probabilities")
        if u.op != "call_function":
            raise Refused("the probabilities are an output of the graph")
        if u.target in PRODUCTS:
            return u
        rule = PROBABILITY_RULES.get(u.target)
        if rule is None:
            raise Refused(f"the probabilities pass through {getattr(u.target, '__name__', u.target)} "
                          "before the matmul with V")
        cur = rule(u, w)


def _only_user(n: fx.Node, what: str) -> fx.Node:
    users = list(n.users)
    if len(users) != 1:
        raise Refused(f"the {what} ({n.name}) is used {len(users)} times; a fused op would hide the other uses")
    return users[0]


# --------------------------------------------------------------------------------------------
# the two kinds of anchor


def softmax_chain(sm: fx.Node) -> AttentionChain:
    """The chain of a softmax-anchored site: up to Q·Kᵀ, down to P·V, their operands and the region."""
    manual = sm.target not in SOFTMAX_OPS
    if manual:
        x, inner = manual_softmax(sm)
        for n in inner:
            for u in n.users:
                if u is not sm and u not in inner:
                    raise Refused("a node of the hand-written softmax is used elsewhere")
    else:
        if sm.args[1] not in (-1, len(shape_of(sm)) - 1):
            raise Refused("softmax is not over the last dim")
        x, inner = sm.args[0], []
    shape = shape_of(sm)
    if len(shape) < 2:
        raise Refused("softmax over a vector")
    q_len, k_len = shape[-2], shape[-1]

    # ---- up the score chain
    walk = ScoreWalk()
    product, chain = _walk_scores(x, walk)
    batch, heads = _heads_split(shape, chain)
    region: list[fx.Node] = [sm] + inner + chain + walk.region
    terms, post, softcap = walk.terms, walk.post, walk.softcap
    if post <= 0:
        raise Refused("the scores are scaled by a non-positive factor")
    if walk.inside_tanh and softcap <= 0:
        raise Refused("softcap with a non-positive cap")

    # ---- the Q·Kᵀ product
    qk = read_product(product, "qk")
    if qk.extra_terms:
        walk.refuse_below_head_scale("baddbmm's input")
    head_scale = _check_head_scale(walk, batch, heads, qk.left.row_inserted)
    for node_, coef in qk.extra_terms:
        terms.append(ScoreTerm("bias", node_, coef * post, tuple(shape_of(product)), value_of(product).dtype))
    post *= qk.alpha
    pshape = shape_of(product)
    if qk.left.row_inserted:
        # one query per row (decode's `bhd,bhsd->bhs`): the scores are [.., Tk], Tq = 1 is implied;
        # terms broadcast against them and get the row dim back in the rewrite
        q_len, k_len = 1, shape[-1]
        batch, heads = _heads_split(list(shape[:-1]) + [1, shape[-1]], [])
        for t in terms:
            t.row_inserted = True
            t.score_shape = tuple(t.score_shape[:-1]) + (1, t.score_shape[-1])
        if not sizes_equal(pshape[-1], k_len):
            raise Refused("the product's Tk differs from the softmax's")
    elif not (sizes_equal(pshape[-2], q_len) and sizes_equal(pshape[-1], k_len)):
        raise Refused("the product's [Tq, Tk] differ from the softmax's")

    # ---- down the probability chain to P·V
    probabilities = ProbabilityWalk()
    pv_node = _walk_probabilities(sm, probabilities)
    p_chain = probabilities.chain
    region += p_chain
    region.append(pv_node)
    shape_reads = _size_reads(region, sm, p_chain)
    pv = read_product(pv_node, "pv")
    if pv.extra_terms or pv.alpha != 1.0:
        raise Refused("the P·V product adds or scales")
    p_node = p_chain[-1] if p_chain else sm
    if pv.left.node is p_node and pv.right.node is p_node:
        raise Refused("the probabilities are multiplied by themselves")
    # X @ Pᵀ = (P @ Xᵀ)ᵀ: P as the right operand (taming-transformers' `bmm(v, w_.permute(0, 2, 1))`) is
    # attention with V = Xᵀ, and the op's output transposed
    transposed = pv.right.node is p_node
    if pv.left.node is not p_node and not transposed:
        raise Refused("the probabilities are not an operand of the P·V product")
    p_operand, x_operand = (pv.right, pv.left) if transposed else (pv.left, pv.right)
    if transposed and qk.left.row_inserted:
        raise Refused("the probabilities have no query dim and are the right operand of the P·V product")

    # probabilities must reach P·V with their [B, H, Tq, Tk] layout unchanged
    _check_probabilities_layout(pv, p_operand, transposed, sm, p_chain, batch, heads, q_len, k_len)

    logical_qk = logical_map(qk.batch_shape, batch, heads)
    logical_pv = logical_map(pv.batch_shape, batch, heads)
    q_operand = Operand(qk.left.node, lambda lay: logical_qk(qk.left.in_matmul_order(lay)))
    k_operand = Operand(qk.right.node, lambda lay: logical_qk(qk.right.in_matmul_order(lay)).transpose(2, 3))
    if transposed:
        v_operand = Operand(x_operand.node, lambda lay: logical_pv(x_operand.in_matmul_order(lay).transpose(-2, -1)))
    else:
        v_operand = Operand(x_operand.node, lambda lay: logical_pv(x_operand.in_matmul_order(lay)))
    head_dim = shape_of(qk.left.node)[qk.left.node_dim(-1)]
    out_shape = shape_of(pv_node)
    value_dim = len(out_shape) - (2 if transposed else 1)          # in matmul order
    v_head_dim = out_shape[value_dim] if pv.out_perm is None else out_shape[pv.out_perm.index(value_dim)]
    if pv.left.row_inserted != qk.left.row_inserted:
        raise Refused("one product has a query dim and the other not")
    return AttentionChain(
        spelling=("manual-softmax " if manual else "") + qk.spelling, q_operand=q_operand, k_operand=k_operand,
        v_operand=v_operand, batch=batch, q_heads=heads, q_len=q_len, k_len=k_len, head_dim=head_dim,
        v_head_dim=v_head_dim, score_scale=post, softcap=softcap, terms=terms, dropout_p=probabilities.dropout_p,
        safe_softmax=sm.target is aten._safe_softmax.default, output=pv_node,
        output_steps=output_steps(pv, batch, heads, transposed),
        region=region, shape_reads=shape_reads, head_scale=head_scale,
    )


def sdpa_chain(node: fx.Node) -> AttentionChain:
    """The chain of an SDPA call: its arguments are [B, H, T, D] q, k, v, an optional mask, the scale."""
    a = sdpa_arguments(node)
    output = node
    region = [node]
    if node.target is not aten.scaled_dot_product_attention.default:
        users = list(node.users)
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in users) or len(users) != 1:
            raise Refused("the SDPA call's log-sum-exp or other outputs are used")
        output = users[0]
        region.append(output)
    qs, ks, vs = shape_of(a.q), shape_of(a.k), shape_of(a.v)
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise Refused(f"SDPA with {len(qs)}-D inputs; the fused ops take [B, H, T, D]")
    batch, heads, q_len, head_dim = qs
    k_len = ks[2]
    if not a.enable_gqa and not sizes_equal(ks[1], heads):
        raise Refused("SDPA with fewer K/V heads than query heads but enable_gqa=False")
    terms = []
    if a.mask is not None:
        kind, value = ("keep", float("-inf")) if value_of(a.mask).dtype == torch.bool else ("bias", 1.0)
        terms.append(ScoreTerm(kind, a.mask, value, (batch, heads, q_len, k_len), value_of(a.q).dtype))
    # a symbolic head dim (dynamic=True) is specialized: int() guards on it, Dynamo recompiles if it changes
    scale = (1.0 / math.sqrt(int(head_dim))) if a.scale is None else constant_value(a.scale)
    if scale is None:
        raise Refused(f"SDPA's scale {a.scale} is not a number")
    as_is = lambda lay: lay  # noqa: E731  SDPA operands are already [B, H, T, D]
    return AttentionChain(
        spelling="sdpa", q_operand=Operand(a.q, as_is), k_operand=Operand(a.k, as_is), v_operand=Operand(a.v, as_is),
        batch=batch, q_heads=heads, q_len=q_len, k_len=k_len, head_dim=head_dim, v_head_dim=vs[-1],
        score_scale=scale, terms=terms, is_causal=bool(a.is_causal), dropout_p=float(a.dropout_p),
        safe_softmax=True, output=output, output_steps=(), region=region,
    )


def _size_reads(region: list[fx.Node], sm: fx.Node, p_chain: list[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """The (user, region node) pairs where a user outside the region reads only a region node's size;
    refuses when any other outside user reads a region node's values (the fused op would hide it)."""
    inside = set(region)
    shape_reads: list[tuple[fx.Node, fx.Node]] = []
    for n in region[:-1]:
        outside = [u for u in n.users if u not in inside]
        for u in [u for u in outside if reads_only_size(u, n)]:
            # `mask.expand_as(scores)`, `scores.size(0)`: not a use of the values; the rewrite reads
            # the same sizes from a tensor that stays in the graph
            sources = size_sources(shape_of(n), u, inside)
            if u.target is aten.sym_size.int and sources is not None and isinstance(sources[u.args[1]], int):
                sources = None   # a static size read as a node: nothing to re-point it to
            if sources is None:
                raise Refused(f"{u.name} reads the size of {n.name}, and no tensor outside the attention "
                              "has those sizes")
            shape_reads.append((u, n))
            outside.remove(u)
        if outside:
            what = "attention probabilities" if n in p_chain or n is sm else "scores"
            raise Refused(f"the {what} ({n.name}) are also used by {outside[0].name}; "
                          "a fused op would hide that use")
    return shape_reads


def _check_probabilities_layout(pv: Product, p: ProductOperand, transposed: bool, sm: fx.Node, p_chain,
                                batch, heads, q_len, k_len) -> None:
    """The probabilities reach P·V as the [B, H, Tq, Tk] the softmax made, moved by views only (and, as
    the right operand `transposed`, with their last two dims swapped: `X @ Pᵀ`)."""
    chain = [n for n in p_chain if n.target not in (aten.dropout.default, aten.native_dropout.default)
             and n.target is not operator.getitem]
    lay = layout_of(p.node, sm, chain) if p.node is not sm else Layout.contiguous(shape_of(sm))
    lay = p.in_matmul_order(lay)
    if transposed:
        lay = lay.transpose(-2, -1)
    lay = logical_map(pv.batch_shape, batch, heads)(lay)
    ref = Layout.contiguous([batch, heads, q_len, k_len])
    for k in range(4):
        got, want = lay.coalesced(k), ref.coalesced(k)
        if len(got) != len(want) or any(not (sizes_equal(g[0], w[0]) and sizes_equal(g[1], w[1]))
                                        for g, w in zip(got, want)):
            raise Refused("the probabilities reach the P·V product rearranged")
