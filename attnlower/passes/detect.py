"""Find attention sites: anchor on a softmax, grow out through the dataflow to the two matmuls.

No templates: from the softmax we walk *up* the score chain (views, casts, scalar scales, mask
adds / masked_fill / where, a tanh softcap) to the Q·Kᵀ product, and *down* the probability
chain (casts, dropout, views) to the P·V product; the operands of both products are then traced
to their sources through any chain of views (`kv.resolve_operand`), which also sees through GQA
repeats. Calls of `scaled_dot_product_attention` (and its device-specific forms) are sites too.
A walk that meets anything it cannot prove equivalent stops and records why.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .kv import OperandRef, PagedRef, resolve_operand, resolve_paged
from .layout import Layout, NotAView, layout_of
from .vocabulary import (CONSTANT_PRESERVING, PRODUCTS, SCORE_PASS_THROUGH, SDPA_OPS, SOFTMAX_OPS, WHERES, is_one, reads_only_size,
                         shape_of, sizes_equal, value_of)

aten = torch.ops.aten

class NotAttention(Exception):
    """The walk from an anchor met something it cannot prove; the message is the report's reason."""


@dataclass
class ScoreTerm:
    """One mask/bias applied to the scores.

    kind "bias": `scores += coef * node` (a bool or int node is the number it holds, True = 1: only
    `where`, `masked_fill` and SDPA's `attn_mask` make a bool a mask); "fill": `scores = value` where
    node is True; "keep": `scores = value` where node is False. Values and coefs already include every
    scalar multiplier applied after the term, so they are in the units of the softmax input.
    """

    kind: str
    node: fx.Node
    value: float
    score_shape: tuple = ()              # the scores' shape where the term is applied: it broadcasts against it
    score_dtype: torch.dtype | None = None  # the scores' dtype there: a bool / int bias is that kind of number
    row_inserted: bool = False           # the scores had no Tq dim (decode einsum): unsqueeze(-2) the term first


@dataclass
class HeadScale:
    """A per-head multiplier of the scores whose value is data (a learned temperature, SwinV2's
    `logit_scale.exp()`): `scores * node` (or `/ node` when `divide`), constant over the query and key
    positions, applied before every mask/bias term. The rewrite folds it into q (`q * node`), so the op's
    `scale` keeps only the static factor and autograd reaches the parameter through that product."""

    node: fx.Node
    divide: bool = False


@dataclass
class AttentionMatch:
    """A proven attention site, ready for the analyzer.

    The softmax input equals `softcap(scale * q·kᵀ) (+/fill) terms`, with q/k/v given as views of
    nodes that stay in the graph; `output` is the node whose value the fused op replaces, and
    `output_steps` turn the op's `[B, Hq, Tq, Dv]` result into that node's layout.
    """

    anchor: fx.Node
    spelling: str
    q: OperandRef
    k: OperandRef
    v: OperandRef
    batch: object
    q_heads: object
    kv_heads: object
    q_len: object
    k_len: object
    head_dim: object
    v_head_dim: object
    scale: float
    softcap: float = 0.0
    terms: list[ScoreTerm] = field(default_factory=list)
    is_causal: bool = False           # SDPA's is_causal (top-left)
    dropout_p: float = 0.0
    safe_softmax: bool = False        # fully masked rows give 0 in the source (SDPA / _safe_softmax)
    output: fx.Node | None = None
    output_steps: tuple[tuple[str, object], ...] = ()
    region: list[fx.Node] = field(default_factory=list)
    paged: tuple[PagedRef, PagedRef] | None = None   # K and V gathered from block pools
    paged_scale: float = 0.0                          # the score scale when reading K paged
    shape_reads: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (user, region node): size reads
    head_scale: HeadScale | None = None   # a per-head multiplier that is data, folded into q by the rewrite

    @property
    def location(self) -> str:
        return source_location(self.anchor)


def _paged_pair(k_op, k_logical, v_op, v_logical, score_scale_without_k):
    pk = resolve_paged(k_op, k_logical)
    pv = resolve_paged(v_op, v_logical)
    if pk is None or pv is None or pk.table is not pv.table or pv.scale != 1.0:
        return None, 0.0
    return (pk, pv), score_scale_without_k * pk.scale


@dataclass
class Refusal:
    """An anchor that looked like attention but could not be proven; `reason` goes to the report."""

    anchor: fx.Node
    spelling: str
    reason: str

    @property
    def location(self) -> str:
        return source_location(self.anchor)


def source_location(node: fx.Node) -> str:
    """The user's source line for a node, from Dynamo's stack trace ("file.py:12 in f: code")."""
    st = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in st.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            head = lines[i]
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            try:
                fname = head.split('"')[1].rsplit("/", 1)[-1]
                rest = head.split('"', 2)[2]
                lineno = rest.split("line ")[1].split(",")[0]
                func = rest.split(" in ")[-1]
                return f"{fname}:{lineno} in {func}: {code}"[:160]
            except IndexError:
                return head[:160]
    return node.name


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionMatch | Refusal]:
    """Every softmax and SDPA call of the graph, as a proven match or a refusal with a reason."""
    out: list[AttentionMatch | Refusal] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            if node.target in SOFTMAX_OPS or _is_manual_softmax(node):
                out.append(_match_softmax(node))
            elif node.target in SDPA_OPS:
                out.append(_match_sdpa(node))
        except (NotAttention, NotAView) as e:
            spelling = "sdpa" if node.target in SDPA_OPS else "softmax"
            out.append(Refusal(node, spelling, str(e)))
    return out


# --------------------------------------------------------------------------------------------
# helpers

def _users(n: fx.Node) -> list[fx.Node]:
    return list(n.users)


def _only_user(n: fx.Node, what: str) -> fx.Node:
    users = _users(n)
    if len(users) != 1:
        raise NotAttention(f"the {what} ({n.name}) is used {len(users)} times; a fused op would hide the other uses")
    return users[0]


def size_sources(shape, before: fx.Node, exclude: set) -> list | None:
    """For each size of `shape`: the int, or a (node, dim) / SymInt node outside `exclude` and before
    `before` that holds the same (symbolic) size; None when one has no such source."""
    graph_nodes = list(before.graph.nodes)
    earlier = graph_nodes[:graph_nodes.index(before)]
    out = []
    for size in shape:
        if isinstance(size, int):
            out.append(size)
            continue
        found = None
        for n in earlier:
            if n in exclude:
                continue
            val = n.meta.get("val")
            if isinstance(val, torch.SymInt) and val.node.expr == size.node.expr:
                found = n
                break
            if isinstance(val, torch.Tensor):
                dims = [d for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt) and s.node.expr == size.node.expr]
                if dims:
                    found = (n, dims[0])
                    break
        if found is None:
            return None
        out.append(found)
    return out


def _real_float(make) -> float:
    """float(make().item()), computed on real tensors even if a fake mode is active."""
    with unset_fake_temporarily():
        return float(make().item())


def _constant_value(x) -> float | None:
    """A python number, or a node that is a scalar constant (`scalar_tensor`, `full([], c)`, ...)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function":
        t = x.target
        if t is aten.scalar_tensor.default:
            return float(x.args[0])
        if t in (aten.full.default,) and len(shape_of(x)) == 0 or (t is aten.full.default and all(
                sizes_equal(s, 1) for s in shape_of(x))):
            return float(x.args[1])
        if t in CONSTANT_PRESERVING:
            value = _constant_value(x.args[0])
            out = x.meta.get("val")
            if value is not None and isinstance(out, torch.Tensor):
                value = _real_float(lambda: torch.tensor(value, dtype=out.dtype))  # a cast rounds the constant
            return value
        if t is aten.zeros.default and all(sizes_equal(s, 1) for s in shape_of(x)):
            return 0.0
    if isinstance(x, fx.Node) and x.op == "get_attr":
        # A tensor the trace lifted out of the code (`torch.tensor(float("-inf"))`, finfo.min) is a
        # constant of the graph. Any other attribute (a buffer) may be written between calls: data.
        value = getattr(x.graph.owning_module, str(x.target), None)
        if (str(x.target).startswith("_tensor_constant") and isinstance(value, torch.Tensor)
                and value.numel() == 1 and value.device.type != "meta"):
            return _real_float(lambda: value.reshape(()))
        return None
    if isinstance(x, fx.Node) and isinstance(x.meta.get("val"), (torch.SymInt, torch.SymFloat)):
        # A scalar computed from sizes: `q.size(-1) ** -0.5` under dynamic=True. The op takes a float,
        # so specialize: float() guards on the symbols it reads (the head dim in practice) and Dynamo
        # recompiles if they change. Never a silent wrong scale.
        return float(x.meta["val"])
    return None


# --------------------------------------------------------------------------------------------
# the score chain: a table of small rules, one per op family
#
# Walking up from the softmax input, each rule reads one node of the chain, records what it does
# to the scores in the walk (a scale, a mask/bias term, a softcap) and returns the node that holds
# the scores before it. The walk ends at a product (PRODUCTS); any op without a rule stops it.


@dataclass
class _ScoreWalk:
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
        if self.inside_tanh:
            raise NotAttention("a mask or bias is applied inside the softcap's tanh")
        self.refuse_below_head_scale("a mask or bias")
        val = value_of(at)
        self.terms.append(ScoreTerm(kind, node, value, tuple(shape_of(at)), val.dtype))

    def refuse_below_head_scale(self, what: str) -> None:
        # The walk goes up: a term met after the multiplier is applied to the scores before it, so the
        # multiplier would scale it too (a -inf fill times a negative or zero scale is +inf or NaN).
        if self.head_scale is not None:
            raise NotAttention(f"{what} is applied to the scores before they are multiplied by "
                               f"{self.head_scale[0].name}, a tensor whose value is data: folding that "
                               "factor into q would change the term")


_SCORE_RULES: dict = {}


def _rule(*ops):
    def register(fn):
        for op in ops:
            _SCORE_RULES[op] = fn
        return fn
    return register


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = shape_of(a), shape_of(b)
    return len(sa) == len(sb) and all(sizes_equal(x, y) for x, y in zip(sa, sb))


def _scores_operand(node: fx.Node, scores: fx.Node) -> fx.Node:
    """`scores`, after checking the op did not broadcast them to a larger shape (a term may not add dims)."""
    if not _same_shape(scores, node):
        raise NotAttention(f"{node.name} broadcasts the scores from {list(shape_of(scores))} to {list(shape_of(node))}")
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
        if x.target in _SCORE_RULES:
            stack.extend(a for a in x.args if isinstance(a, fx.Node))
    return False


@_rule(*SCORE_PASS_THROUGH)
def _score_pass_through(cur: fx.Node, w: _ScoreWalk) -> fx.Node:
    src = cur.args[0]
    if len(shape_of(src)) < 2 or list(shape_of(src))[-2:] != list(shape_of(cur))[-2:]:
        raise NotAttention(f"{cur.target} changes the [Tq, Tk] dims of the scores")
    if cur.target is aten.expand.default and not _same_shape(src, cur):
        raise NotAttention("the scores are broadcast")
    if value_of(cur).dtype in (torch.bool,) or not value_of(cur).dtype.is_floating_point:
        raise NotAttention(f"the scores are cast to {value_of(cur).dtype}")
    return src


@_rule(aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
def _score_scale(cur: fx.Node, w: _ScoreWalk) -> fx.Node:
    a, b = cur.args[0], cur.args[1]
    is_mul = cur.target in (aten.mul.Tensor, aten.mul.Scalar)
    if is_mul and (not isinstance(a, fx.Node) or _constant_value(a) is not None
                   or not carries_scores(a) and carries_scores(b)):
        a, b = b, a   # c * s
    if not is_mul and not carries_scores(a) and carries_scores(b):
        raise NotAttention(f"{cur.name} divides by the scores")
    c = _constant_value(b)
    if c is None:
        _record_head_scale(cur, a, b, w, divide=not is_mul)
        return _scores_operand(cur, a)
    w.post = w.post * c if cur.target in (aten.mul.Tensor, aten.mul.Scalar) else w.post / c
    return _scores_operand(cur, a)


def _record_head_scale(cur: fx.Node, scores, b, w: _ScoreWalk, divide: bool) -> None:
    """`scores * b` with `b` data: accept it as a per-head scale (folded into q later) when `b` is a
    float tensor constant over the query and key positions; the heads it varies over are checked
    against the site's [B, H] once they are known (`_check_head_scale`)."""
    name = getattr(b, "name", b)
    what = f"the scores are {'divided' if divide else 'multiplied'} by a tensor ({name}) whose value is data"
    if not isinstance(b, fx.Node) or not isinstance(value_of(b), torch.Tensor) or carries_scores(b):
        raise NotAttention(what)
    if not value_of(b).dtype.is_floating_point:
        raise NotAttention(f"{what} and is {value_of(b).dtype}, not a float per-head scale")
    if w.head_scale is not None:
        raise NotAttention(f"{what}, a second per-head scale after {w.head_scale[0].name}")
    sb, ss = list(shape_of(b)), list(shape_of(cur))
    if len(sb) > len(ss) or len(ss) < 2:
        raise NotAttention(f"{what} of shape {sb}, more dims than the scores {ss}")
    aligned = [1] * (len(ss) - len(sb)) + sb
    if not (is_one(aligned[-1]) and is_one(aligned[-2])):
        raise NotAttention(f"{what} of shape {sb}: against scores of shape {ss} it varies over the query or "
                           "key positions, so it is not a per-head scale that can move into q")
    w.head_scale = (b, divide, tuple(aligned), tuple(ss))


def _check_head_scale(w: _ScoreWalk, batch, heads, row_inserted: bool) -> HeadScale | None:
    """The walk's per-head scale, once the site's [B, H] is known: constant over the batch, and over the
    heads unless the scores where it is applied are [B, H, Tq, Tk] in the op's head order."""
    if w.head_scale is None:
        return None
    node, divide, aligned, score_shape = w.head_scale
    lead, score_lead = list(aligned[:-2]), list(score_shape[:-2])
    what = f"the scores are multiplied by {node.name} (shape {list(shape_of(node))}), a tensor whose value is data"
    if row_inserted:
        raise NotAttention(f"{what}, on scores without a query dim")
    if not all(is_one(d) for d in lead):
        per_head = (len(lead) == 2 and len(score_lead) == 2 and is_one(lead[0]) and sizes_equal(lead[1], heads)
                    and sizes_equal(score_lead[0], batch) and sizes_equal(score_lead[1], heads))
        if not per_head:
            raise NotAttention(f"{what}, varying over dims {lead} of scores whose leading dims are "
                               f"{list(score_lead)}: only a per-head [H, 1, 1] (or scalar) factor moves into q")
    return HeadScale(node, divide)


def _row_max_of(m, x: fx.Node) -> list[fx.Node] | None:
    """The nodes of `x.amax(-1, keepdim=True)` / `x.max(-1, keepdim=True).values` when `m` is one, else None."""
    if not isinstance(m, fx.Node):
        return None
    last = (-1, len(shape_of(x)) - 1)
    if m.target is aten.amax.default and m.args[0] is x:
        dims = list(m.args[1]) if len(m.args) > 1 else list(m.kwargs.get("dim", []))
        keep = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
        return [m] if len(dims) == 1 and dims[0] in last and keep else None
    if m.target is operator.getitem and m.args[1] == 0 and isinstance(m.args[0], fx.Node):
        mx = m.args[0]
        if mx.target is aten.max.dim and mx.args[0] is x:
            dim = mx.args[1]
            keep = mx.args[2] if len(mx.args) > 2 else mx.kwargs.get("keepdim", False)
            if dim in last and keep and all(u.target is operator.getitem and u.args[1] == 0 for u in mx.users):
                return [m, mx]
    return None


@_rule(aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar)
def _score_add(cur: fx.Node, w: _ScoreWalk) -> fx.Node:
    """`a + alpha * b` (`a - alpha * b`): the scores on either side, the other operand a bias term."""
    a, b = cur.args[0], cur.args[1]
    alpha = _constant_value(cur.kwargs.get("alpha", cur.args[2] if len(cur.args) > 2 else 1))
    if alpha is None:
        raise NotAttention(f"{cur.name} scales by an alpha that is data")
    sign = -1.0 if cur.target in (aten.sub.Tensor, aten.sub.Scalar) else 1.0
    row_max = _row_max_of(b, a) if sign < 0 and alpha == 1.0 else None
    if row_max is not None:
        # s - max_j(s): the same shift for every key of a row, which softmax removes
        w.region += row_max
        return a
    a_is, b_is = carries_scores(a), carries_scores(b)
    if a_is == b_is:
        raise NotAttention(f"{cur.name}: {'both' if a_is else 'neither'} of its operands reach the Q·Kᵀ product "
                           "through ops that keep the scores' [.., Tq, Tk] layout (views, casts, scales, masks)")
    scores, other, other_coef, scores_coef = (a, b, sign * alpha, 1.0) if a_is else (b, a, 1.0, sign * alpha)
    if isinstance(other, fx.Node) and _constant_value(other) is None:
        # a bool or an int here is a number (0/1, the integer): `ScoreTerm.dtype` says which float it becomes
        w.add_term("bias", other, w.post * other_coef, cur)
    # adding a constant shifts every score of a row equally: softmax does not change
    w.post *= scores_coef
    return _scores_operand(cur, scores)


def _fill_value(v: float, post: float) -> float:
    return v * post if math.isfinite(v) else v * (1 if post > 0 else -1)


@_rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _score_masked_fill(cur: fx.Node, w: _ScoreWalk) -> fx.Node:
    s, m, val = cur.args[0], cur.args[1], cur.args[2]
    v = _constant_value(val)
    if v is None:
        raise NotAttention("masked_fill with a value that is data")
    w.add_term("fill", m, _fill_value(v, w.post), cur)
    return _scores_operand(cur, s)


@_rule(*WHERES)
def _score_where(cur: fx.Node, w: _ScoreWalk) -> fx.Node:
    m, a, b = cur.args
    a_is, b_is = carries_scores(a), carries_scores(b)
    if a_is == b_is:
        raise NotAttention("cannot tell the scores from the fill value in a where")
    v = _constant_value(b if a_is else a)
    if v is None:
        raise NotAttention("where() fills with a tensor that is data")
    w.add_term("keep" if a_is else "fill", m, _fill_value(v, w.post), cur)
    return _scores_operand(cur, a if a_is else b)


@_rule(aten.tanh.default)
def _score_tanh(cur: fx.Node, w: _ScoreWalk) -> fx.Node:
    if w.softcap or w.inside_tanh:
        raise NotAttention("two tanh on the scores")
    w.refuse_below_head_scale("the softcap's tanh")
    # terms already recorded are outside the tanh: softcap(s) + terms is the op's order
    w.softcap = w.post
    w.inside_tanh = True
    return cur.args[0]


def _walk_scores(x: fx.Node, w: _ScoreWalk) -> tuple[fx.Node, list[fx.Node]]:
    """Walk up from the softmax input `x` to the product; returns (product, chain nodes)."""
    chain: list[fx.Node] = []
    cur = x
    while True:
        chain.append(cur)  # every region node's users are checked once the region is whole
        if cur.op != "call_function":
            raise NotAttention(f"the scores come from {cur.op} {cur.name}, not a matmul")
        if cur.target in PRODUCTS:
            return cur, chain
        rule = _SCORE_RULES.get(cur.target)
        if rule is None:
            raise NotAttention(f"the scores pass through {getattr(cur.target, '__name__', cur.target)} "
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
    if len(lead) != 1:
        raise NotAttention(f"scores have {len(lead)} batch dims; expected [B, H, Tq, Tk]")
    for n in chain:
        s = shape_of(n)
        if len(s) == 4 and not is_one(s[0]) and not is_one(s[1]) and sizes_equal(s[0] * s[1], lead[0]):
            return s[0], s[1]
    return lead[0], 1


# --------------------------------------------------------------------------------------------
# softmax-anchored sites

def _softmax_dim_is_last(node: fx.Node) -> bool:
    dim = node.args[1]
    rank = len(shape_of(node))
    return dim in (-1, rank - 1)


def _is_last_dim(dims, rank: int) -> bool:
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and dims[0] in (-1, rank - 1)


def _keepdim(node: fx.Node, index: int) -> bool:
    return bool(node.args[index] if len(node.args) > index else node.kwargs.get("keepdim", False))


def _manual_softmax(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(softmax input, the form's inner nodes) when `node` computes softmax over the last dim by hand:

    `e / e.sum(-1, keepdim=True)` with `e = exp(x)` or `exp(x - rowmax(x))`; `exp(x - logsumexp(x, -1,
    keepdim=True))`; `exp(log_softmax(x, -1))`. Each equals `softmax(x, -1)`, fully masked rows (NaN) included.
    """
    if node.op != "call_function":
        return None
    if node.target is aten.div.Tensor and len(node.args) == 2:
        e, s = node.args
        if not (isinstance(e, fx.Node) and isinstance(s, fx.Node)):
            return None
        if e.target is not aten.exp.default or s.target is not aten.sum.dim_IntList or s.args[0] is not e:
            return None
        if not _is_last_dim(s.args[1], len(shape_of(e))) or not _keepdim(s, 2):
            return None
        x, inner = e.args[0], [s, e]
        if x.target is aten.sub.Tensor and len(x.args) == 2 and x.kwargs.get("alpha", 1) == 1:
            row_max = _row_max_of(x.args[1], x.args[0])
            if row_max is not None:
                return x.args[0], inner + [x] + row_max
        return x, inner
    if node.target is aten.exp.default and isinstance(node.args[0], fx.Node):
        y = node.args[0]
        if y.target in (aten._log_softmax.default, aten.log_softmax.int) and _is_last_dim(y.args[1], len(shape_of(y))):
            if y.target is aten.log_softmax.int and (len(y.args) > 2 and y.args[2] is not None or y.kwargs.get("dtype")):
                return None
            return y.args[0], [y]
        if y.target is aten.sub.Tensor and len(y.args) == 2 and y.kwargs.get("alpha", 1) == 1:
            x, lse = y.args
            if (isinstance(lse, fx.Node) and lse.target is aten.logsumexp.default and lse.args[0] is x
                    and _is_last_dim(lse.args[1], len(shape_of(x))) and _keepdim(lse, 2)):
                return x, [y, lse]
    return None


def _is_manual_softmax(node: fx.Node) -> bool:
    return _manual_softmax(node) is not None


def _match_softmax(sm: fx.Node) -> AttentionMatch:
    manual = sm.target not in SOFTMAX_OPS
    if manual:
        x, inner = _manual_softmax(sm)
        for n in inner:
            for u in n.users:
                if u is not sm and u not in inner:
                    raise NotAttention("a node of the hand-written softmax is used elsewhere")
    else:
        if not _softmax_dim_is_last(sm):
            raise NotAttention("softmax is not over the last dim")
        x, inner = sm.args[0], []
    shape = shape_of(sm)
    if len(shape) < 2:
        raise NotAttention("softmax over a vector")
    q_len, k_len = shape[-2], shape[-1]

    # ---- up the score chain
    walk = _ScoreWalk()
    product, chain = _walk_scores(x, walk)
    batch, heads = _heads_split(shape, chain)
    region: list[fx.Node] = [sm] + inner + chain + walk.region
    terms, post, softcap = walk.terms, walk.post, walk.softcap
    if post <= 0:
        raise NotAttention("the scores are scaled by a non-positive factor")
    if walk.inside_tanh and softcap <= 0:
        raise NotAttention("softcap with a non-positive cap")

    # ---- the Q·Kᵀ product
    q_op, kt_op, spelling, qk_batch_shape, extra_terms, alpha, _ = _product_operands(product, "qk")
    if extra_terms:
        walk.refuse_below_head_scale("baddbmm's input")
    head_scale = _check_head_scale(walk, batch, heads, _has_row_inserted(q_op))
    for node_, coef in extra_terms:
        terms.append(ScoreTerm("bias", node_, coef * post, tuple(shape_of(product)), value_of(product).dtype))
    post *= alpha
    pshape = shape_of(product)
    if _has_row_inserted(q_op):
        # one query per row (decode's `bhd,bhsd->bhs`): the scores are [.., Tk], Tq = 1 is implied;
        # terms broadcast against them and get the row dim back in the rewrite
        q_len, k_len = 1, shape[-1]
        batch, heads = _heads_split(list(shape[:-1]) + [1, shape[-1]], [])
        for t in terms:
            t.row_inserted = True
            t.score_shape = tuple(t.score_shape[:-1]) + (1, t.score_shape[-1])
        if not sizes_equal(pshape[-1], k_len):
            raise NotAttention("the product's Tk differs from the softmax's")
    elif not (sizes_equal(pshape[-2], q_len) and sizes_equal(pshape[-1], k_len)):
        raise NotAttention("the product's [Tq, Tk] differ from the softmax's")

    # ---- down the probability chain to P·V
    p_chain: list[fx.Node] = []
    dropout_p = 0.0
    cur = sm
    while True:
        u = _only_user(cur, "attention probabilities")
        if u.op != "call_function":
            raise NotAttention("the probabilities are an output of the graph")
        t = u.target
        if t in PRODUCTS:
            pv = u
            break
        if t in SCORE_PASS_THROUGH:
            p_chain.append(u)
            cur = u
            continue
        if t is aten.dropout.default:
            p, train = u.args[1], u.args[2]
            if train and p > 0:
                if dropout_p:
                    raise NotAttention("two dropouts on the probabilities")
                dropout_p = float(p)
            p_chain.append(u)
            cur = u
            continue
        if t is aten.native_dropout.default:
            p, train = u.args[1], u.args[2]
            getitems = list(u.users)
            if not all(g.target is operator.getitem for g in getitems) or any(g.args[1] != 0 for g in getitems):
                raise NotAttention("the dropout mask is used elsewhere")
            if train and p > 0:
                dropout_p = float(p)
            p_chain += [u] + getitems
            if len(getitems) != 1:
                raise NotAttention("dropout output used several times")
            cur = getitems[0]
            continue
        raise NotAttention(f"the probabilities pass through {getattr(t, '__name__', t)} before the matmul with V")
    region += p_chain
    region.append(pv)
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
                raise NotAttention(f"{u.name} reads the size of {n.name}, and no tensor outside the attention "
                                   "has those sizes")
            shape_reads.append((u, n))
            outside.remove(u)
        if outside:
            what = "attention probabilities" if n in p_chain or n is sm else "scores"
            raise NotAttention(f"the {what} ({n.name}) are also used by {outside[0].name}; "
                               "a fused op would hide that use")
    p_op, v_op, spelling_pv, pv_batch_shape, pv_extra, pv_alpha, pv_out_perm = _product_operands(pv, "pv")
    if pv_extra or pv_alpha != 1.0:
        raise NotAttention("the P·V product adds or scales")
    (p_op, p_perm), (v_op, v_perm) = _split(p_op), _split(v_op)
    (q_op, q_perm), (kt_op, k_perm) = _split(q_op), _split(kt_op)
    if p_op is not (p_chain[-1] if p_chain else sm):
        raise NotAttention("the probabilities are not the first operand of the P·V product")

    # probabilities must reach P·V with their [B, H, Tq, Tk] layout unchanged
    _check_probabilities_layout(p_op, p_perm, sm, p_chain, pv_batch_shape, batch, heads, q_len, k_len)

    logical_qk = _logical(qk_batch_shape, batch, heads)
    q_ref = resolve_operand(q_op, lambda lay: logical_qk(_in_order(q_perm)(lay)), "q")
    k_ref = resolve_operand(kt_op, lambda lay: logical_qk(_in_order(k_perm)(lay)).transpose(2, 3), "kv")
    logical_pv = _logical(pv_batch_shape, batch, heads)
    v_ref = resolve_operand(v_op, lambda lay: logical_pv(_in_order(v_perm)(lay)), "v")

    scale = post * q_ref.scale * k_ref.scale
    if not sizes_equal(k_ref.heads, v_ref.heads):
        raise NotAttention(f"K has {k_ref.heads} heads and V {v_ref.heads}")
    head_dim = shape_of(q_op)[q_perm[-1] if q_perm else -1]
    v_head_dim = shape_of(pv)[-1] if pv_out_perm is None else shape_of(pv)[pv_out_perm.index(len(shape_of(pv)) - 1)]

    if isinstance(p_perm, _Order) != isinstance(q_perm, _Order):
        raise NotAttention("one product has a query dim and the other not")
    out_steps = _output_steps(pv, pv_batch_shape)
    if isinstance(p_perm, _Order):
        out_steps += (("squeeze", -2),)   # the implied query row
    if pv_out_perm is not None:
        out_steps += (("permute", tuple(pv_out_perm)),)
    paged, paged_scale = _paged_pair(
        kt_op, lambda lay: logical_qk(_in_order(k_perm)(lay)).transpose(2, 3),
        v_op, lambda lay: logical_pv(_in_order(v_perm)(lay)), post * q_ref.scale)
    return AttentionMatch(
        anchor=sm, spelling=("manual-softmax " if manual else "") + spelling, q=q_ref, k=k_ref, v=v_ref,
        batch=batch, q_heads=heads, kv_heads=k_ref.heads, q_len=q_len, k_len=k_len,
        head_dim=head_dim, v_head_dim=v_head_dim, scale=scale, softcap=softcap, terms=terms,
        dropout_p=dropout_p, safe_softmax=sm.target is aten._safe_softmax.default,
        output=pv, output_steps=out_steps, region=region, paged=paged, paged_scale=paged_scale,
        shape_reads=shape_reads, head_scale=head_scale,
    )


def _einsum_perms(eq: str, which: str):
    """Permutations that bring einsum operands to matmul form `[batch, m, k] x [batch, k, n]`, and the
    permutation `out_perm` with `einsum_out = matmul_out.permute(out_perm)` (None when it is the identity).

    Batch dims keep the order of the first operand (`bqhd,bkhd->bhqk` reads q as [b, h, q, d]). The
    Q·Kᵀ product must write [batch, m, n] (the softmax reads the last dim as the keys); P·V may write
    any order (`bhqk,bkhd->bqhd` is the BSHD output, a permute of the op's [B, H, Tq, D]).
    """
    eq = eq.replace(" ", "")
    if "->" not in eq or "..." in eq:
        raise NotAttention(f"einsum '{eq}' is not a batched matmul this pass understands")
    ins, out = eq.split("->")
    a, b = ins.split(",")
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1:
        raise NotAttention(f"einsum '{eq}' does not contract exactly one index")
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
        raise NotAttention(f"einsum '{eq}' is not [batch, m, k] x [batch, k, n] -> a permutation of [batch, m, n]")
    out_perm = [canonical.index(c) for c in out]
    if which == "qk" and out_perm != list(range(len(out))):
        raise NotAttention(f"einsum '{eq}' writes the scores as {out}, not [{''.join(canonical)}]: "
                           "the softmax would not run over the keys of each query")
    perm_a = [a.index(c) for c in batch + m + [d]]
    perm_b = [b.index(c) for c in batch + [d] + n]
    if row is not None:
        perm_a = _Order(perm_a, row)
    return perm_a, perm_b, (None if out_perm == list(range(len(out))) else out_perm)


def _product_operands(node: fx.Node, which: str):
    """(left operand, right operand, spelling, batch shape, extra bias terms, alpha, out_perm) of a product.

    For einsum the operands are wrapped so that their layouts are read in matmul order, and `out_perm`
    says how the einsum's output permutes the matmul-order result (None: not at all).
    """
    t = node.target
    shape = shape_of(node)
    batch_shape = shape[:-2]
    if t is aten.matmul.default:
        a, b = node.args
        if len(shape_of(a)) < 2 or len(shape_of(b)) < 2:
            raise NotAttention("matmul with a vector")
        return a, b, "matmul", batch_shape, [], 1.0, None
    if t is aten.bmm.default:
        a, b = node.args
        return a, b, "bmm", batch_shape, [], 1.0, None
    if t is aten.baddbmm.default:
        inp, a, b = node.args[:3]
        # under dynamic=True Dynamo may pass alpha / beta as symbolic floats (graph nodes)
        beta = _constant_value(node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1))
        alpha = _constant_value(node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1))
        if alpha is None or beta is None:
            raise NotAttention("baddbmm's alpha or beta is data")
        extra = [] if beta == 0 else [(inp, beta)]
        return a, b, "baddbmm", batch_shape, extra, alpha, None
    if t is aten.einsum.default:
        eq, operands = node.args[0], node.args[1]
        if len(operands) != 2:
            raise NotAttention("einsum of more than two operands")
        perm_a, perm_b, out_perm = _einsum_perms(eq, which)
        if out_perm is not None:   # the matmul-order shape: canonical dim j is written at out_perm.index(j)
            shape = [shape[out_perm.index(j)] for j in range(len(shape))]
            batch_shape = shape[:-2]
        if isinstance(perm_a, _Order):   # [batch, n]: every dim but the last is batch
            batch_shape = shape[:-1]
        return (operands[0], perm_a), (operands[1], perm_b), "einsum", batch_shape, [], 1.0, out_perm
    raise NotAttention(f"{t} is not a product")


@dataclass(frozen=True)
class _Order:
    """An einsum operand's permutation to matmul order, then a size-1 row dim inserted at `row`
    (the operand has no row index: decode's `q` in `bhd,bhsd->bhs`, `p` in `bhs,bhsd->bhd`)."""

    perm: list
    row: int

    def __getitem__(self, i):
        return self.perm[i]


def _has_row_inserted(operand) -> bool:
    return isinstance(operand, tuple) and isinstance(operand[1], _Order)


def _split(operand):
    """(node, permutation to matmul order or None): einsum operands carry their permutation."""
    if isinstance(operand, tuple):
        return operand
    return operand, None


def _in_order(perm):
    if isinstance(perm, _Order):
        return lambda lay: lay.permute(perm.perm).unsqueeze(perm.row)
    return (lambda lay: lay) if perm is None else (lambda lay: lay.permute(perm))


def _logical(batch_shape, batch, heads):
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


def _check_probabilities_layout(p_op, p_perm, sm, p_chain, pv_batch_shape, batch, heads, q_len, k_len):
    chain = [n for n in p_chain if n.target not in (aten.dropout.default, aten.native_dropout.default)
             and n.target is not operator.getitem]
    lay = layout_of(p_op, sm, chain) if p_op is not sm else Layout.contiguous(shape_of(sm))
    lay = _logical(pv_batch_shape, batch, heads)(_in_order(p_perm)(lay))
    ref = Layout.contiguous([batch, heads, q_len, k_len])
    for k in range(4):
        got, want = lay.clean(k), ref.clean(k)
        if len(got) != len(want) or any(not (sizes_equal(g[0], w[0]) and sizes_equal(g[1], w[1])) for g, w in zip(got, want)):
            raise NotAttention("the probabilities reach the P·V product rearranged")


def _output_steps(pv: fx.Node, pv_batch_shape) -> tuple[tuple[str, object], ...]:
    n = len(pv_batch_shape)
    if n == 2:
        return ()
    if n == 1:
        return (("flatten", (0, 1)),)
    if n == 0:
        return (("squeeze", 0), ("squeeze", 0))
    raise NotAttention("the P·V product has more than two batch dims")


# --------------------------------------------------------------------------------------------
# SDPA calls

def _sdpa_args(node: fx.Node):
    """Normalize the SDPA op family to (q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)."""
    t = node.target
    a, kw = list(node.args), dict(node.kwargs)

    def get(i, name, default):
        if name in kw:
            return kw[name]
        return a[i] if len(a) > i else default

    q, k, v = a[0], a[1], a[2]
    if t is aten.scaled_dot_product_attention.default:
        return (q, k, v, get(3, "attn_mask", None), get(4, "dropout_p", 0.0), get(5, "is_causal", False),
                get(6, "scale", None), get(7, "enable_gqa", False))
    if t is aten._scaled_dot_product_flash_attention_for_cpu.default:
        return (q, k, v, kw.get("attn_mask"), get(3, "dropout_p", 0.0), get(4, "is_causal", False),
                kw.get("scale"), False)
    if t is aten._scaled_dot_product_flash_attention.default:
        return (q, k, v, None, get(3, "dropout_p", 0.0), get(4, "is_causal", False), get(6, "scale", None), False)
    if t is aten._scaled_dot_product_efficient_attention.default:
        return (q, k, v, get(3, "attn_bias", None), get(5, "dropout_p", 0.0), get(6, "is_causal", False),
                get(7, "scale", None), False)
    if t is aten._scaled_dot_product_cudnn_attention.default:
        return (q, k, v, get(3, "attn_bias", None), get(5, "dropout_p", 0.0), get(6, "is_causal", False),
                get(8, "scale", None), False)
    raise NotAttention(f"unknown SDPA op {t}")


def _match_sdpa(node: fx.Node) -> AttentionMatch:
    q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_args(node)
    output = node
    region = [node]
    if node.target is not aten.scaled_dot_product_attention.default:
        users = list(node.users)
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in users) or len(users) != 1:
            raise NotAttention("the SDPA call's log-sum-exp or other outputs are used")
        output = users[0]
        region.append(output)
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise NotAttention(f"SDPA with {len(qs)}-D inputs; the fused ops take [B, H, T, D]")
    batch, heads, q_len, head_dim = qs
    k_len = ks[2]
    ident = lambda lay: lay  # noqa: E731  SDPA operands are already [B, H, T, D]
    q_ref = resolve_operand(q, ident, "q")
    k_ref = resolve_operand(k, ident, "kv")
    v_ref = resolve_operand(v, ident, "v")
    if not enable_gqa and not sizes_equal(ks[1], heads):
        raise NotAttention("SDPA with fewer K/V heads than query heads but enable_gqa=False")
    terms = []
    if mask is not None:
        mv = value_of(mask)
        if mv.dtype == torch.bool:
            terms.append(ScoreTerm("keep", mask, float("-inf"), (batch, heads, q_len, k_len), value_of(q).dtype))
        else:
            terms.append(ScoreTerm("bias", mask, 1.0, (batch, heads, q_len, k_len), value_of(q).dtype))
    # a symbolic head dim (dynamic=True) is specialized: int() guards on it, Dynamo recompiles if it changes
    scale_v = (1.0 / math.sqrt(int(head_dim))) if scale is None else _constant_value(scale)
    if scale_v is None:
        raise NotAttention(f"SDPA's scale {scale} is not a number")
    paged, paged_scale = _paged_pair(k, ident, v, ident, scale_v * q_ref.scale)
    return AttentionMatch(
        anchor=node, spelling="sdpa", q=q_ref, k=k_ref, v=v_ref, batch=batch, q_heads=heads,
        kv_heads=k_ref.heads, q_len=q_len, k_len=k_len, head_dim=head_dim, v_head_dim=vs[-1],
        scale=scale_v * q_ref.scale * k_ref.scale, terms=terms, is_causal=bool(is_causal),
        dropout_p=float(dropout_p), safe_softmax=True, output=output, output_steps=(), region=region,
        paged=paged, paged_scale=paged_scale,
    )
