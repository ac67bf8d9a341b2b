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

from .anchors import manual_softmax, row_max_of, softmax_sink
from .buffers import static_value
from .constants import constant_value, real_float
from .layout import Layout, NotAView, layout_chain, layout_of
from .products import Product, ProductOperand, einsum_row_indices, logical_map, output_steps, read_product
from .sdpa import sdpa_arguments
from .site import AttentionChain, Context, HeadScale, Operand, Refused, ScoreTerm, Sinks
from .vocabulary import (ADDS, CONSTANT_PRESERVING, MASKED_FILLS, MULTIPLIES, PERMUTES, PRODUCTS, SCALES, SCORE_PASS_THROUGH,
                         SOFTMAX_OPS, SUBTRACTS, WHERES, is_one, reads_only_size, rule_registrar, shape_of, size_sources,
                         sizes_equal, value_of)

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
    # a sum of two products met (`Q1·K1ᵀ + Q2·K2ᵀ`, a split head dim): (the other branch, the add, post there,
    # how many terms were recorded there); the walk goes on up the first branch
    split: tuple[fx.Node, fx.Node, float, int] | None = None
    # a column concatenated to the scores (`cat([scores, column], -1)`, GPT-OSS's sinks): (column, post there)
    sink: tuple[fx.Node, float] | None = None

    def add_term(self, kind: str, node: fx.Node, value: float, at: fx.Node, speculated_from: tuple = ()) -> None:
        """Record a mask / bias term applied at node `at` (refused inside the softcap or below a head scale);
        `speculated_from`: the module buffers its value was read from (`_fill_constant`)."""
        if self.inside_tanh:
            raise Refused("a mask or bias is applied inside the softcap's tanh")
        self.refuse_below_head_scale("a mask or bias")
        val = value_of(at)
        self.terms.append(ScoreTerm(kind, node, value, tuple(shape_of(at)), val.dtype, speculated_from=speculated_from))

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


score_rule = rule_registrar(SCORE_RULES)   # @score_rule(*ops): the score-chain rule of `ops`


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
    if a_is and b_is and sign > 0 and alpha == 1.0 and w.split is None and not w.inside_tanh:
        # Q1·K1ᵀ + Q2·K2ᵀ (absorbed MLA: latent part + rotary part): one product over a split head dim, if
        # the other branch proves to be a product of the same scores (`_split_product`)
        w.split = (b, cur, w.post, len(w.terms))
        return _scores_operand(cur, a)
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


def _fill_constant(x) -> tuple[float | None, tuple]:
    """(the fill value, the module buffers it was read from): a constant (`constant_value`), or a one-element
    module buffer (GPT-2 4.0's `masked_bias`, -1e4) read at its value through casts and copies (`.to(w.dtype)`
    rounds it as the source does); the rewrite guards such a buffer (`buffers.freeze`). (None, ()) for data."""
    v = constant_value(x)
    if v is not None or not isinstance(x, fx.Node):
        return v, ()
    chain, node = [], x
    while node.op == "call_function" and node.target in CONSTANT_PRESERVING and node.args \
            and isinstance(node.args[0], fx.Node):
        chain.append(node)
        node = node.args[0]
    buffer = static_value(node)
    if buffer is None or buffer.numel() != 1:
        return None, ()

    def read():
        value = buffer.detach().reshape(())
        for step in reversed(chain):        # each cast rounds as the source's does
            out = step.meta.get("val")
            if isinstance(out, torch.Tensor):
                value = value.to(out.dtype)
        return value
    return real_float(read), (node,)


@score_rule(*MASKED_FILLS)
def _score_masked_fill(cur: fx.Node, w: ScoreWalk) -> fx.Node:
    s, m, val = cur.args[0], cur.args[1], cur.args[2]
    v, buffers = _fill_constant(val)
    if v is None:
        raise Refused("masked_fill with a value that is data")
    w.add_term("fill", m, _fill_value(v, w.post, cur), cur, buffers)
    return _scores_operand(cur, s)


@score_rule(*WHERES)
def _score_where(cur: fx.Node, w: ScoreWalk) -> fx.Node:
    m, a, b = cur.args
    a_is, b_is = carries_scores(a), carries_scores(b)
    if a_is == b_is:
        raise Refused("cannot tell the scores from the fill value in a where")
    v, buffers = _fill_constant(b if a_is else a)
    if v is None:
        raise Refused("where() fills with a tensor that is data")
    w.add_term("keep" if a_is else "fill", m, _fill_value(v, w.post, cur), cur, buffers)
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


@score_rule(aten.cat.default)
def _score_cat(cur: fx.Node, w: ScoreWalk) -> fx.Node:
    """`cat([scores, column], dim=-1)`: one more logit per row (GPT-OSS's sink); what it is (one logit per
    head, constant over the batch and the queries) is proven once the site's heads are known (`_sink_source`),
    and the probability chain must drop exactly that column before P·V."""
    tensors = cur.args[0]
    dim = cur.args[1] if len(cur.args) > 1 else cur.kwargs.get("dim", 0)
    rank = len(shape_of(cur))
    if not isinstance(dim, int) or dim % rank != rank - 1:
        raise Refused(f"the scores are concatenated along dim {dim}, not along the keys")
    if len(tensors) != 2 or not all(isinstance(t, fx.Node) for t in tensors):
        raise Refused(f"{len(tensors)} tensors are concatenated to the scores: one sink column is what the op takes")
    scores, column = tensors
    if not carries_scores(scores):
        raise Refused("a column is concatenated before the scores (the op's sink is a logit after the keys)")
    if carries_scores(column):
        raise Refused("the concatenated column depends on the query (it is computed from a product): a null key, "
                      "not a per-head sink")
    if w.sink is not None:
        raise Refused("two columns are concatenated to the scores")
    if w.terms or w.inside_tanh or w.head_scale is not None:
        raise Refused("a mask, softcap or per-head scale is applied to the scores with the concatenated column "
                      "(the op applies them to the scores only)")
    ss, cs, out = shape_of(scores), shape_of(column), shape_of(cur)
    if len(cs) != rank or not is_one(cs[-1]) or not all(sizes_equal(a, b) for a, b in zip(ss[:-1], out[:-1])):
        raise Refused(f"the concatenated {list(cs)} is not one column of the scores {list(ss)}")
    w.sink = (column, w.post)
    return scores


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
    keys: object = None          # with a sink column: Tk, the columns that must reach P·V (the sink dropped)
    sink_dropped: bool = False


# op -> rule(node, walk) -> the node holding the probabilities after `node`
PROBABILITY_RULES: dict[object, Callable[[fx.Node, ProbabilityWalk], fx.Node]] = {}


probability_rule = rule_registrar(PROBABILITY_RULES)   # @probability_rule(*ops): the probability-chain rule of `ops`


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


@probability_rule(aten.slice.Tensor, aten.narrow.default)
def _probabilities_drop_sink(u: fx.Node, w: ProbabilityWalk) -> fx.Node:
    """`p[..., :-1]` (`narrow`, `[:Tk]`): the sink column dropped; only where one was concatenated, and
    only the first Tk columns kept."""
    args = list(u.args) + [None] * (5 - len(u.args))
    src, dim, start, step = args[0], args[1] or 0, args[2], (args[4] or 1) if u.target is aten.slice.Tensor else 1
    rank = len(shape_of(src))
    if w.keys is None:
        raise Refused("the probabilities are sliced before the matmul with V")
    if w.sink_dropped:
        raise Refused("the probabilities are sliced twice")
    kept = shape_of(u)
    first = start in (None, 0)
    if dim % rank != rank - 1 or step != 1 or not first or not sizes_equal(kept[-1], w.keys):
        which = "from column 0" if first else f"from column {start}"
        raise Refused(f"the slice {which} keeps {kept[-1]} of the {shape_of(src)[-1]} columns along dim {dim}: "
                      f"it drops another column than the concatenated sink (the last)")
    w.sink_dropped = True
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
    sink_columns = 1 if walk.sink is not None else 0     # the softmax row holds Tk keys and the sink
    k_len = k_len - sink_columns
    if post <= 0:
        raise Refused("the scores are scaled by a non-positive factor")
    if walk.inside_tanh and softcap <= 0:
        raise Refused("softcap with a non-positive cap")

    # ---- the Q·Kᵀ product
    query = _query_index(product, terms)
    qk = read_product(product, "qk", query)
    split = None
    if walk.split is not None:
        split, branch = _split_product(walk, product, qk, query)
        region += branch
    score_order = None
    if qk.out_perm is not None:
        # scores written in another order than [batch, q, k] (DeepSeek's `bshd,bthd->bsht`), the key index
        # last: read them as the product's matmul order, the terms permuted along
        ps, ss = shape_of(product), shape_of(sm)
        if len(ps) != len(ss) or not all(sizes_equal(a, b) for a, b in zip(ps[:-1], ss[:-1])):
            raise Refused(f"the scores {list(shape_of(product))}, written by einsum in another order than "
                          f"[batch, q, k], are regrouped to {list(shape)} before the softmax")
        if walk.head_scale is not None:
            raise Refused("a per-head scale of scores written by einsum in another order than [batch, q, k]")
        score_order = [qk.out_perm.index(j) for j in range(len(shape))]
        shape = [shape[i] for i in score_order]
        q_len, k_len = shape[-2], shape[-1] - sink_columns
        batch, heads = _heads_split(shape, [])
        terms = [_reordered_term(t, score_order, sm) for t in terms]
    sinks = None
    lse_sink = softmax_sink(sm) if manual else None
    if lse_sink is not None:
        if walk.sink is not None:
            raise Refused("a sink column concatenated to the scores and a sink in the log-sum-exp")
        source, fold = _sink_source(lse_sink, score_order, shape[:-2], batch, heads)
        if fold:
            _refuse_fold_with_head_scale(walk)
            batch, heads = 1, batch * heads
        sinks = Sinks(source, 1.0, "logsumexp", lse_sink)
    if walk.sink is not None:
        if qk.left.row_inserted:
            raise Refused("a sink column concatenated to scores without a query dim")
        column, sink_post = walk.sink
        source, fold = _sink_source(column, score_order, shape[:-2], batch, heads)
        if fold:
            _refuse_fold_with_head_scale(walk)
            # the sinks vary over what the scores' leading dims call the batch (openai/gpt-oss: [Hkv, q_mult]):
            # every leading dim is a head of the op, one batch
            batch, heads = 1, batch * heads
        sinks = Sinks(source, sink_post, "concat", column)
    if qk.extra_terms:
        walk.refuse_below_head_scale("baddbmm's input")
    head_scale = _check_head_scale(walk, batch, heads, qk.left.row_inserted)
    for node_, coef in qk.extra_terms:
        terms.append(ScoreTerm("bias", node_, coef * post, tuple(shape_of(product)), value_of(product).dtype))
    post *= qk.alpha
    pshape = shape_of(product) if score_order is None else [shape_of(product)[i] for i in score_order]
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
    probabilities = ProbabilityWalk(keys=k_len if sink_columns else None)
    pv_node = _walk_probabilities(sm, probabilities)
    if sink_columns and not probabilities.sink_dropped:
        raise Refused("the concatenated column reaches the P·V product: it is a key with a value, not a sink")
    p_chain = probabilities.chain
    region += p_chain
    region.append(pv_node)
    output = pv_node
    rescale = _rescale_epilogue(pv_node, x, shape)
    if rescale is not None:
        # out * exp(lse - logaddexp(lse, sink)): the sink applied after the attention through its lse
        if sinks is not None:
            raise Refused("a second sink rescales the output of attention that already has one")
        output, epilogue, column, keepdim = rescale
        source, fold = _sink_source(column, score_order, shape[:-2], batch, heads, rows_only=not keepdim)
        if fold:
            _refuse_fold_with_head_scale(walk)
            batch, heads = 1, batch * heads
        sinks = Sinks(source, 1.0, "rescale", output)
        region += [n for n in epilogue if n is not output] + [output]   # the output last, as the region's end
    shape_reads = _size_reads(region, sm, p_chain)
    p_node = p_chain[-1] if p_chain else sm
    # an einsum P·V with two row indices (`bsht,btc->bshc`): the query is the one under which the
    # probabilities reach it as the softmax made them
    rows = einsum_row_indices(pv_node.args[0]) if pv_node.target is aten.einsum.default else []
    failure = None
    for query in (rows if len(rows) == 2 else [None]):
        try:
            pv, p_operand, x_operand, transposed = _read_pv(pv_node, query, p_node, qk)
            # probabilities must reach P·V with their [B, H, Tq, Tk] layout unchanged
            _check_probabilities_layout(pv, p_operand, transposed, sm, p_chain, batch, heads, q_len, k_len,
                                        score_order, bool(sink_columns))
            break
        except (Refused, NotAView) as e:
            failure = e
    else:
        raise failure
    if rescale is not None and (score_order is not None or pv.out_perm is not None or transposed
                                or len(pv.batch_shape) != len(qk.batch_shape)
                                or not all(sizes_equal(a, b) for a, b in zip(pv.batch_shape, qk.batch_shape))):
        # the weight is per row of the scores as the softmax holds them: the output must hold its rows alike
        raise Refused("the sink's rescale multiplies an output whose rows are not in the scores' order")

    logical_qk = logical_map(qk.batch_shape, batch, heads)
    logical_pv = logical_map(pv.batch_shape, batch, heads)
    q_operand = Operand(qk.left.node, lambda lay: logical_qk(qk.left.in_matmul_order(lay)))
    k_operand = Operand(qk.right.node, lambda lay: logical_qk(qk.right.in_matmul_order(lay)).transpose(2, 3))
    if transposed:
        v_operand = Operand(x_operand.node, lambda lay: logical_pv(x_operand.in_matmul_order(lay).transpose(-2, -1)))
    else:
        v_operand = Operand(x_operand.node, lambda lay: logical_pv(x_operand.in_matmul_order(lay)))
    head_dim = _contracted_size(qk)
    split_operands = None
    if split is not None:
        logical_split = logical_map(split.batch_shape, batch, heads)
        split_operands = (Operand(split.left.node, lambda lay: logical_split(split.left.in_matmul_order(lay))),
                          Operand(split.right.node,
                                  lambda lay: logical_split(split.right.in_matmul_order(lay)).transpose(2, 3)))
        head_dim = head_dim + _contracted_size(split)
    out_shape = shape_of(pv_node)
    value_dim = len(out_shape) - (2 if transposed else 1)          # in matmul order
    v_head_dim = out_shape[value_dim] if pv.out_perm is None else out_shape[pv.out_perm.index(value_dim)]
    if pv.left.row_inserted != qk.left.row_inserted:
        raise Refused("one product has a query dim and the other not")
    return AttentionChain(
        spelling=("manual-softmax " if manual else "") + qk.spelling, q_operand=q_operand, k_operand=k_operand,
        v_operand=v_operand, batch=batch, q_heads=heads, q_len=q_len, k_len=k_len, head_dim=head_dim,
        v_head_dim=v_head_dim, score_scale=post, softcap=softcap, terms=terms, dropout_p=probabilities.dropout_p,
        safe_softmax=sm.target is aten._safe_softmax.default, output=output,
        output_steps=output_steps(pv, batch, heads, transposed),
        region=region, shape_reads=shape_reads, head_scale=head_scale, split_qk=split_operands, sinks=sinks,
    )


def _refuse_fold_with_head_scale(walk: ScoreWalk) -> None:
    """Sinks that vary over the batch make the batch heads of the op; a per-head scale shaped for the old heads
    would no longer line up with q's."""
    if walk.head_scale is not None:
        raise Refused("sinks that vary over the batch (read as heads of one batch) and a per-head scale of the scores")


def _rescale_epilogue(pv_node: fx.Node, x: fx.Node, score_shape):
    """(the multiply, its nodes, the sink, whether lse keeps its dim) when the P·V output's one use is `out * w` with `w` per row
    `exp(lse - logaddexp(lse, c))` or `sigmoid(lse - c)`, `lse = logsumexp(x, -1)` of the softmax input `x`
    itself, the output [.., Tq, Dv] in the scores' row order: the sink `c` applied after the attention
    (vLLM's merge of attention with sinks). None when the output is used otherwise."""
    users = list(pv_node.users)
    if len(users) != 1 or users[0].target is not aten.mul.Tensor or len(users[0].args) != 2:
        return None
    mul = users[0]
    weight = mul.args[1] if mul.args[0] is pv_node else mul.args[0]
    out_shape, rows = shape_of(pv_node), list(score_shape[:-1])
    if not isinstance(weight, fx.Node) or len(out_shape) != len(score_shape) \
            or not all(sizes_equal(a, b) for a, b in zip(out_shape[:-1], rows)):
        return None
    nodes = [mul]
    w = weight
    if w.target is aten.unsqueeze.default and w.args[1] in (-1, len(rows)):
        nodes.append(w)
        w = w.args[0]
    if not all(sizes_equal(a, b) for a, b in zip(shape_of(w)[:len(rows)], rows)) or len(shape_of(w)) not in (
            len(rows), len(rows) + 1):
        return None
    keepdim = len(shape_of(w)) == len(rows) + 1
    found = None
    if w.target is aten.exp.default and isinstance(w.args[0], fx.Node) and w.args[0].target is aten.sub.Tensor:
        lse, denominator = w.args[0].args[:2]
        if (isinstance(denominator, fx.Node) and denominator.target is aten.logaddexp.default
                and lse in denominator.args[:2]):
            column = denominator.args[1] if denominator.args[0] is lse else denominator.args[0]
            found = (lse, column, [w, w.args[0], denominator])
    elif w.target is aten.sigmoid.default and isinstance(w.args[0], fx.Node) and w.args[0].target is aten.sub.Tensor:
        lse, column = w.args[0].args[:2]
        found = (lse, column, [w, w.args[0]])
    if found is None:
        return None
    lse, column, more = found
    if not (isinstance(lse, fx.Node) and lse.target is aten.logsumexp.default and lse.args[0] is x
            and _last_dim_only(lse.args[1], len(score_shape)) and bool(_keepdim_of(lse)) == keepdim
            and isinstance(column, fx.Node)):
        return None
    inner = nodes + more + [lse]
    for n in inner[1:]:
        if any(u not in inner for u in n.users):
            return None
    return mul, inner, column, keepdim


def _last_dim_only(dims, rank: int) -> bool:
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and dims[0] in (-1, rank - 1)


def _keepdim_of(node: fx.Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _sink_source(column: fx.Node, score_order, lead, batch, heads, rows_only: bool = False) -> tuple[fx.Node, bool]:
    """(S, fold): the sink column added to scores with leading dims `lead` (in matmul order) is `S` read
    as one logit per query head: S holds Hq values, and the column, read as [B, H, Tq, 1] through any chain
    of views, is S's values along the heads and constant over the batch and the queries. `fold`: it varies
    over the batch too, [B, H] read as B * H heads of one batch (openai/gpt-oss's [Hkv, q_mult] scores).
    Raises Refused with what the column depends on otherwise."""
    chain = layout_chain(column)
    rank = len(lead) + 2
    problem, found = "no candidate", []
    for idx in range(len(chain) - 1, -1, -1):
        src = chain[idx]
        try:
            lay = layout_of(column, src, list(reversed(chain[:idx])))
        except NotAView as e:
            problem = str(e)
            continue
        if rows_only:   # broadcast against the rows [.., Tq] (a logsumexp without keepdim): give it the key dim
            lay = lay.unsqueeze(len(lay.dims))
        for _ in range(rank - len(lay.dims)):
            lay = lay.unsqueeze(0)
        if score_order is not None:
            lay = lay.permute(score_order)
        try:
            lay = logical_map(lead, batch, heads)(lay)
        except NotAView as e:
            problem = str(e)
            continue
        if any(not sizes_equal(st, 0) for _, st in lay.clean(2) + lay.clean(3)):
            found.append("the concatenated column depends on the query (it varies along the query positions): "
                         "a null key, not a per-head sink")
            continue
        batch_varies = any(not sizes_equal(st, 0) for _, st in lay.clean(0))
        head_subs = (lay.clean(0) if batch_varies else []) + lay.clean(1)
        merged = Layout([head_subs]).coalesced(0)
        numel = math.prod(shape_of(src)) if shape_of(src) else 1
        if len(merged) == 1 and sizes_equal(merged[0][1], 1) and sizes_equal(merged[0][0], numel):
            return src, batch_varies
        found.append(f"the concatenated column is not one logit per head: read as [B, H, Tq, 1] it holds "
                     f"{src.name} {list(shape_of(src))} along {merged}")
    # what the farthest source says (the nearer ones are views of it, and say less)
    raise Refused(found[0] if found else problem)


def _contracted_size(product: Product):
    """The size of the index a Q·Kᵀ product contracts (the q/k head dim), from its left operand."""
    left = product.left
    shape = shape_of(left.node)
    if isinstance(left.perm, list) or left.perm is None or left.row_inserted:
        return shape[left.node_dim(-1)]
    raise Refused("the Q·Kᵀ product's left operand has inserted dims")


def _split_product(walk: ScoreWalk, product: fx.Node, qk: Product, query) -> tuple[Product, list[fx.Node]]:
    """The other product of a sum `Q1·K1ᵀ + Q2·K2ᵀ` the walk met, proven to be a product of the same scores:
    the same kind of product, batch dims, row / key sizes and output order, reached through views and casts
    only, and nothing (a scale, a mask, a softcap) applied to one branch and not the other."""
    other, add, post_at_add, terms_at_add = walk.split
    if len(walk.terms) != terms_at_add or walk.softcap or walk.head_scale is not None:
        raise Refused(f"{add.name} adds two products, and a mask, softcap or scale applies to one of them only")
    if walk.post != post_at_add:
        raise Refused(f"{add.name} adds two products, one of them scaled by {walk.post / post_at_add:g} alone")
    branch_walk = ScoreWalk()
    second, branch = _walk_scores(other, branch_walk)
    if branch_walk.post != 1.0:
        raise Refused(f"{add.name} adds two products, one of them scaled by {branch_walk.post:g} alone")
    if branch_walk.terms or branch_walk.softcap or branch_walk.head_scale or branch_walk.split:
        raise Refused(f"{add.name} adds two products, and a mask, softcap or third product applies to "
                      f"{other.name} alone")
    if query is not None and second.target is aten.einsum.default:
        # the same query as the first product's: the index at the same position of the output
        out1 = product.args[0].replace(" ", "").split("->")[1]
        out2 = second.args[0].replace(" ", "").split("->")[1]
        query = out2[out1.index(query)] if len(out1) == len(out2) else None
    split = read_product(second, "qk", query)
    if split.extra_terms or split.alpha != 1.0 or qk.extra_terms or qk.alpha != 1.0:
        raise Refused(f"{add.name} adds two products, one of which adds or scales (baddbmm)")
    same = (split.out_perm == qk.out_perm and split.left.row_inserted == qk.left.row_inserted
            and len(shape_of(second)) == len(shape_of(product))
            and all(sizes_equal(a, b) for a, b in zip(shape_of(second), shape_of(product))))
    if not same:
        raise Refused(f"{add.name} adds {product.name} {list(shape_of(product))} and {second.name} "
                      f"{list(shape_of(second))}, which are not products over the same (batch, head, query, key)")
    return split, branch + branch_walk.region


def _read_pv(pv_node: fx.Node, query, p_node: fx.Node, qk: Product):
    """The P·V product read with `query` as its row index: (product, P's operand, the other, transposed)."""
    pv = read_product(pv_node, "pv", query)
    if pv.extra_terms or pv.alpha != 1.0:
        raise Refused("the P·V product adds or scales")
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
    return pv, p_operand, x_operand, transposed


def _query_index(product: fx.Node, terms: list[ScoreTerm]) -> str | None:
    """Of an einsum Q·Kᵀ with two row indices (`bshc,btc->bsht`: one latent K head for every query head),
    the query index: the one some mask / bias term varies along while broadcasting over the other (masks are
    per position, shared by the heads). None (the first) when no term tells them apart: then either reading
    computes the same attention, only a mask could not be classified."""
    if product.target is not aten.einsum.default:
        return None
    rows = einsum_row_indices(product.args[0])
    if len(rows) != 2:
        return None
    out = product.args[0].replace(" ", "").split("->")[1]
    positions = [out.index(c) for c in rows]
    for t in terms:
        shape = list(shape_of(t.node)) if isinstance(t.node, fx.Node) else []
        aligned = [1] * (len(out) - len(shape)) + shape[max(len(shape) - len(out), 0):]
        varies = [not is_one(aligned[p]) for p in positions]
        if varies[0] != varies[1]:
            return rows[0] if varies[0] else rows[1]
    return None


def _reordered_term(term: ScoreTerm, order: list[int], before: fx.Node) -> ScoreTerm:
    """The term applied to scores `s`, for scores `s.permute(order)`: views of its node inserted into the
    graph before `before` (given the scores' rank, permuted), its score shape permuted. Dead code unless the
    rewrite reads it."""
    x = term.node
    rank = len(term.score_shape)
    graph = x.graph

    def view(target, args):
        with graph.inserting_before(before):
            n = graph.call_function(target, args)
        n.meta["val"] = target(value_of(args[0]), *args[1:])
        n.meta["stack_trace"] = x.meta.get("stack_trace", "")
        return n

    for _ in range(rank - len(shape_of(x))):
        x = view(aten.unsqueeze.default, (x, 0))
    x = view(aten.permute.default, (x, list(order)))
    return ScoreTerm(term.kind, x, term.value, tuple(term.score_shape[i] for i in order), term.score_dtype,
                     term.row_inserted)


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
                                batch, heads, q_len, k_len, score_order=None, sink: bool = False) -> None:
    """The probabilities reach P·V as the [B, H, Tq, Tk] the softmax made, moved by views only (and, as
    the right operand `transposed`, with their last two dims swapped: `X @ Pᵀ`). `score_order`: the
    softmax's scores are [B, H, Tq, Tk] permuted (read as `scores.permute(score_order)`)."""
    chain = [n for n in p_chain if n.target not in (aten.dropout.default, aten.native_dropout.default)
             and n.target is not operator.getitem]
    lay = layout_of(p.node, sm, chain) if p.node is not sm else Layout.contiguous(shape_of(sm))
    lay = p.in_matmul_order(lay)
    if transposed:
        lay = lay.transpose(-2, -1)
    lay = logical_map(pv.batch_shape, batch, heads)(lay)
    ref = Layout.contiguous([batch, heads, q_len, k_len])
    if score_order is not None or sink:
        # the softmax's own layout (its row holds the sink column too), read as [B, H, Tq, Tk]
        ref = Layout.contiguous(shape_of(sm))
        if sink:
            ref = ref.prefix(-1, k_len)
        if score_order is not None:
            ref = ref.permute(score_order)
        ref = ref.reshape([batch, heads, q_len, k_len])
    for k in range(4):
        got, want = lay.coalesced(k), ref.coalesced(k)
        if len(got) != len(want) or any(not (sizes_equal(g[0], w[0]) and sizes_equal(g[1], w[1]))
                                        for g, w in zip(got, want)):
            raise Refused("the probabilities reach the P·V product rearranged")
