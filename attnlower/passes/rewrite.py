"""Replace a proven attention region by one attnlower op call, after checking the region is convex."""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx

from .analyze import Decision
from .detect import AttentionMatch
from .layout import _val

aten = torch.ops.aten


class NotConvex(Exception):
    pass


def graph_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph's dataflow as a networkx DiGraph (node -> user)."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for u in n.users:
            g.add_edge(n, u)
    return g


def check_convex(dg: nx.DiGraph, region: list[fx.Node], output: fx.Node) -> None:
    """No value leaves the region except the output, and no path leaves it and comes back."""
    inside = set(region)
    for n in region:
        if n is output:
            continue
        outside_users = [u for u in dg.successors(n) if u not in inside]
        if outside_users:
            raise NotConvex(f"{n.name} is used outside the attention ({outside_users[0].name})")
    for n in region:
        for u in dg.successors(n):
            if u in inside:
                continue
            if inside & nx.descendants(dg, u):
                raise NotConvex(f"a path leaves the region at {u.name} and comes back")


class _Emitter:
    """Inserts nodes before a point, giving each a fake value so later passes and dumps see shapes.

    Every node it creates is appended to `created` (translation validation reads them)."""

    def __init__(self, graph: fx.Graph, before: fx.Node, fake_mode, created: list | None = None):
        self.graph, self.before, self.fake_mode = graph, before, fake_mode
        self.created = created if created is not None else []

    def __call__(self, target, args, kwargs=None, name=None):
        kwargs = kwargs or {}
        with self.graph.inserting_before(self.before):
            n = self.graph.call_function(target, tuple(args), kwargs)
        self.created.append(n)
        if name:
            n.name = self.graph._graph_namespace.create_name(name, None)
        def fake(x):
            return _val(x) if isinstance(x, fx.Node) else x
        try:
            fa = torch.utils._pytree.tree_map(fake, args)
            fk = torch.utils._pytree.tree_map(fake, kwargs)
            if self.fake_mode is not None:
                with self.fake_mode:
                    n.meta["val"] = target(*fa, **fk)
            else:
                n.meta["val"] = target(*fa, **fk)
        except Exception as e:  # a value we cannot fake is not fatal for the rewrite itself
            n.meta["fake_error"] = repr(e)
        n.meta["stack_trace"] = self.before.meta.get("stack_trace", "")
        return n


def _prepare(emit: _Emitter, ref) -> fx.Node:
    x = ref.source
    for kind, arg in ref.steps:
        if kind == "squeeze":
            x = emit(aten.squeeze.dim, (x, arg))
        elif kind == "unsqueeze":
            x = emit(aten.unsqueeze.default, (x, arg))
        elif kind == "permute":
            x = emit(aten.permute.default, (x, list(arg)))
        else:
            raise ValueError(f"unknown layout step {kind}")
    return x


def _bias_node(emit: _Emitter, decision: Decision) -> fx.Node | None:
    plan = decision.bias
    if plan.kind == "none":
        return None
    if plan.kind == "bool":
        (t,) = plan.terms
        return t.node if t.kind == "keep" else emit(aten.bitwise_not.default, (t.node,))
    total = None
    for t in plan.terms:
        if t.kind == "bias":
            part = t.node if t.value == 1.0 else emit(aten.mul.Tensor, (t.node, t.value))
        else:
            # fill/keep as an additive float: 0 where visible, the fill value where masked
            masked = t.node if t.kind == "fill" else emit(aten.bitwise_not.default, (t.node,))
            zeros = emit(aten.zeros_like.default, (masked,), {"dtype": torch.float32})
            part = emit(aten.masked_fill.Scalar, (zeros, masked, t.value))
        total = part if total is None else emit(aten.add.Tensor, (total, part))
    return total


def rewrite_site(gm: fx.GraphModule, m: AttentionMatch, decision: Decision, fake_mode,
                 created: list | None = None) -> list[str]:
    """Insert the op call before the region's output and reroute the output's users to it.

    Returns the names of the replaced nodes. The region's other nodes are left for dead-code
    elimination (they have no other users; `check_convex` proved it). The nodes inserted are
    appended to `created` when given.
    """
    import attnlower.lowering.ops  # noqa: F401  registers torch.ops.attnlower

    g = gm.graph
    emit = _Emitter(g, m.output, fake_mode, created)
    if decision.paged is not None:
        return _rewrite_paged(emit, m, decision)
    q = _prepare(emit, m.q)
    k = _prepare(emit, m.k)
    v = _prepare(emit, m.v)
    bias = _bias_node(emit, decision)
    s = decision.spec
    common = dict(scale=float(s.scale), bottom_right=s.bottom_right, softcap=float(s.softcap),
                  dropout_p=float(s.dropout_p), empty_rows_nan=s.empty_rows_nan)
    if s.op == "sliding_window_attention":
        call = emit(torch.ops.attnlower.sliding_window_attention.default, (q, k, v, s.window),
                    dict(bias=bias, alibi_slopes=None, **common), name="attnlower_sliding")
    else:
        call = emit(torch.ops.attnlower.flash_attention.default, (q, k, v),
                    dict(bias=bias, alibi_slopes=None, causal=s.causal, **common), name="attnlower_flash")
    out = emit(operator.getitem, (call, 0))
    old_dtype = _val(m.output).dtype
    if _val(out) is not None and hasattr(_val(out), "dtype") and _val(out).dtype != old_dtype:
        out = emit(aten._to_copy.default, (out,), {"dtype": old_dtype})
    return _finish(emit, m, out)


def _finish(emit: _Emitter, m: AttentionMatch, out: fx.Node) -> list[str]:
    """Bring the op's [B, Hq, Tq, Dv] result to the replaced node's shape and strides, reroute users."""
    for kind, arg in m.output_steps:
        if kind == "flatten":
            out = emit(aten.flatten.using_ints, (out, *arg))
        elif kind == "squeeze":
            out = emit(aten.squeeze.dim, (out, arg))
    out = _match_strides(emit, out, _val(m.output))
    m.output.replace_all_uses_with(out)
    return [n.name for n in m.region]


def _match_strides(emit: _Emitter, out: fx.Node, want) -> fx.Node:
    """The graph after the site was traced with the replaced node's strides (SDPA returns q's
    dim order, and a later `.view` may rely on it): copy into that order when ours differs."""
    have = _val(out)
    if have is None or want is None or not hasattr(want, "stride"):
        return out
    big = [d for d in range(want.dim()) if not bool(want.shape[d] == 1)]
    if all(bool(have.stride()[d] == want.stride()[d]) for d in big):
        return out
    order = sorted(range(want.dim()), key=lambda d: (-int(want.stride()[d]) if isinstance(want.stride()[d], int)
                                                     else -want.stride()[d].node.hint, d))
    inverse = [order.index(d) for d in range(want.dim())]
    x = emit(aten.permute.default, (out, order))
    x = emit(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
    return emit(aten.permute.default, (x, inverse))


def _rewrite_paged(emit: _Emitter, m: AttentionMatch, decision: Decision) -> list[str]:
    """paged_attention on the pools themselves: the gather and its repeats become dead code."""
    plan = decision.paged
    q = _prepare(emit, m.q)
    pools = []
    for ref in (plan.k, plan.v):
        pool = ref.pool
        if ref.pool_perm != (0, 1, 2, 3):
            pool = emit(aten.permute.default, (pool, list(ref.pool_perm)))
        pools.append(pool)
    table = plan.k.table
    if _val(table).dtype != torch.int32:
        table = emit(aten._to_copy.default, (table,), {"dtype": torch.int32})
    if plan.seq_lens is None:
        batch = emit(aten.sym_size.int, (table, 0))
        seq_lens = emit(aten.full.default, ([batch], plan.k.length), {"dtype": torch.int32,
                                                                       "device": _val(table).device})
    else:
        seq_lens = plan.seq_lens
        if _val(seq_lens).dtype != torch.int32:
            seq_lens = emit(aten._to_copy.default, (seq_lens,), {"dtype": torch.int32})
    s = decision.spec
    out = emit(torch.ops.attnlower.paged_attention.default, (q, pools[0], pools[1], table, seq_lens),
               dict(alibi_slopes=None, scale=float(s.scale), causal=False, window=0, softcap=float(s.softcap)),
               name="attnlower_paged")
    if plan.nan_for_empty:
        # eager softmax over a row of -inf gives NaN; the paged op gives 0 for an empty sequence
        empty = emit(aten.eq.Scalar, (seq_lens, 0))
        empty = emit(aten.view.default, (empty, [-1, 1, 1, 1]))
        out = emit(aten.masked_fill.Scalar, (out, empty, float("nan")))
    return _finish(emit, m, out)
