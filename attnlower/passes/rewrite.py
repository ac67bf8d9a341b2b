"""Stage rewrite: replace each proven attention region by one attnlower op call.

First `check_convex`: no value of the region escapes but its output, and no path leaves it and comes
back (a fused op could not be placed). Then `rewrite_site` inserts the op call (and the steps that
bring q/k/v, the bias and the output into place) before the region's output and reroutes the output's
users to it; the region itself is left for the clean_up stage (it has no other users).
"""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx

from .site import AttentionMatch, BiasPlan, Context, Decision, Refused, adjacent_key_parts, problem_shape
from .buffers import freeze
from .layout import lift_to_problem
from .visibility import masking_threshold
from .vocabulary import SIZE_QUERIES, op_name, reads_only_size, size_sources, sizes_equal, value_of

aten = torch.ops.aten


def rewrite(gm: fx.GraphModule, ctx: Context) -> str:
    """Rewrite each open site of `gm` into its op (`site.replacement`), or refuse a region that is not convex."""
    dg = graph_digraph(gm)   # the dataflow before any rewrite: each region is judged in the graph as traced
    done = 0
    for site in ctx.open_sites(gm):
        try:
            check_convex(dg, site.match.region, site.match.output)
        except Refused as e:
            site.refuse(str(e))
            continue
        created: list[fx.Node] = []
        site.replaced = rewrite_site(gm, site.match, site.decision, ctx.fake_mode, created)
        inserted = set(created)
        # the replacement: the one inserted node that the replaced node's users now read
        (site.replacement,) = [n for n in created if any(u not in inserted for u in n.users)]
        refusal = _op_refusal(created)
        if refusal:
            # the op's own checks (run by its fake impl) refuse these inputs, e.g. a feature its kernels on this
            # device do not have yet: undo (the inserted nodes die in clean_up), say why
            site.replacement.replace_all_uses_with(site.match.output)
            site.refuse(refusal)
            continue
        for buffer in site.decision.speculated:
            # the op computes the structure proven from the buffer's value: guard the value (a change the guard
            # sees recompiles; `verified` covers the rest on the device), and let the graph read it as the
            # constant it now is (validation then checks at its real value)
            freeze(gm, buffer)
        done += 1
    return f"{done} rewritten"


def _op_refusal(created: list[fx.Node]) -> str:
    """Why the inserted attnlower op refuses its inputs (its fake impl raised: the op's input checks run there,
    on the site's devices and dtypes), or ""."""
    for n in created:
        if n.op == "call_function" and str(n.target).startswith("attnlower.") and "fake_error" in n.meta:
            return f"{n.target} refuses the site's inputs: {n.meta['fake_error']}"
    return ""


def graph_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph's dataflow as a networkx DiGraph (node -> user)."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for u in n.users:
            g.add_edge(n, u)
    return g


def check_convex(dg: nx.DiGraph, region: list[fx.Node], output: fx.Node) -> None:
    """No value leaves the region except the output (in the dataflow `dg`); raises Refused naming the
    node that leaves.

    That is all convexity asks of a site's region: every region node is an ancestor of the output (the
    walk made it so), so a path that leaves through another node is such a use, and a path that leaves
    through the output cannot come back (the graph is acyclic). A read of a size only
    (`mask.expand_as(scores)`) is no use: the rewrite re-points it.
    """
    inside = set(region)
    for n in region:
        if n is output:
            continue
        outside_users = [u for u in dg.successors(n) if u not in inside and not reads_only_size(u, n)]
        if outside_users:
            raise Refused(f"{n.name} is used outside the attention ({outside_users[0].name})")


class _Emitter:
    """Inserts nodes before a point, giving each a fake value so later passes and dumps see shapes.

    Every node it creates is appended to `created` (translation validation reads them)."""

    def __init__(self, graph: fx.Graph, before: fx.Node, fake_mode, created: list | None = None):
        self.graph, self.before, self.fake_mode = graph, before, fake_mode
        self.created = created if created is not None else []

    def __call__(self, target, args, kwargs=None, name=None):
        """Insert `target(*args, **kwargs)` and give it a fake value; returns the new node."""
        kwargs = kwargs or {}
        with self.graph.inserting_before(self.before):
            n = self.graph.call_function(target, tuple(args), kwargs)
        self.created.append(n)
        if name:
            n.name = self.graph._graph_namespace.create_name(name, None)
        def fake(x):
            return value_of(x) if isinstance(x, fx.Node) else x
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


def _unflatten(emit: "_Emitter", x: fx.Node, arg) -> fx.Node:
    """`x.unflatten(dim, sizes)`; symbolic sizes are read from `x` itself where they cannot be -1."""
    dim, sizes = arg
    symbolic = [i for i, size in enumerate(sizes) if not isinstance(size, int)]
    if len(symbolic) > 1:
        raise ValueError(f"unflatten to {list(sizes)}: more than one symbolic size; the stage that "
                         "planned the step should have refused the site")
    sizes = [-1 if i in symbolic else size for i, size in enumerate(sizes)]
    return emit(aten.unflatten.int, (x, dim, sizes))


# The layout steps an OperandRef or an output carries: (kind, arg) -> the node that takes the step.
_STEPS = {
    "squeeze": lambda emit, x, dim: emit(aten.squeeze.dim, (x, dim)),
    "unsqueeze": lambda emit, x, dim: emit(aten.unsqueeze.default, (x, dim)),
    "permute": lambda emit, x, perm: emit(aten.permute.default, (x, list(perm))),
    "flatten": lambda emit, x, dims: emit(aten.flatten.using_ints, (x, *dims)),
    "unflatten": _unflatten,
}


def _take_steps(emit: _Emitter, x: fx.Node, steps) -> fx.Node:
    """`x` after each (kind, arg) layout step of `steps` (`_STEPS`)."""
    for kind, arg in steps:
        if kind not in _STEPS:
            raise ValueError(f"unknown layout step {kind!r}; expected one of {sorted(_STEPS)}")
        x = _STEPS[kind](emit, x, arg)
    return x


def _prepare(emit: _Emitter, ref) -> fx.Node:
    """The operand `ref` (an OperandRef) as the op's 4-D input: its source after its steps."""
    return _take_steps(emit, ref.source, ref.steps)


def _query(emit: _Emitter, m: AttentionMatch) -> fx.Node:
    """q as the op's [B, Hq, Tq, D], times the site's per-head scale when it has one.

    `s * h` with h constant over the query and key positions (score_chain proved it) is
    `(q * h) @ kᵀ`: the factor moves into q, whatever its sign (the kernels take the row max of the
    scores they compute), and autograd reaches h through this product. The product is cast back to
    q's dtype: the op takes q, k and v of one dtype.
    """
    q = _prepare(emit, m.q)
    if m.split is not None:     # a split head dim: the op reads the parts side by side
        q = emit(aten.cat.default, ([q, _prepare(emit, m.split[0])], -1), name="attnlower_q_parts")
    if m.head_scale is None:
        return q
    hs = m.head_scale
    op = aten.div.Tensor if hs.divide else aten.mul.Tensor
    scaled = emit(op, (q, hs.node), name="attnlower_head_scaled_q")
    dtype = value_of(q).dtype
    if value_of(scaled) is not None and value_of(scaled).dtype != dtype:
        scaled = emit(aten._to_copy.default, (scaled,), {"dtype": dtype})
    return scaled


def _split_keys(emit: _Emitter, m: AttentionMatch) -> fx.Node:
    """K of a split head dim: one view of the buffer holding both parts side by side, else their concatenation."""
    base = adjacent_key_parts(m)
    if base is not None:
        return _take_steps(emit, base, m.k.steps)
    return emit(aten.cat.default, ([_prepare(emit, m.k), _prepare(emit, m.split[1])], -1), name="attnlower_k_parts")


def _term_tensor(emit: _Emitter, term, m: AttentionMatch) -> fx.Node:
    """The term's tensor, broadcastable to the op's [B, Hq, Tq, Tk].

    The term broadcasts against the scores where it was applied (`term.score_shape`), a regrouping of the
    problem's scores (`[B*H, Tq, Tk]`, Swin's `[B, nW, H, N, N]`). `layout.lift_to_problem` plans how it
    becomes a bias of the problem: as it is, or expanded over the scores' dims it varies with and reshaped
    (`analyze.lift_problem` refused what this cannot express).
    """
    x = term.node
    if term.row_inserted and value_of(x).dim():   # scores without a Tq dim (decode einsum): give the term its row
        x = emit(aten.unsqueeze.default, (x, -2))
    shape = list(value_of(x).shape)
    score_shape = list(term.score_shape)
    extra = len(shape) - len(score_shape)
    if extra > 0:  # leading dims of size 1 (lift_problem checked)
        x = emit(aten.squeeze.dims, (x, list(range(extra))))
        shape = shape[extra:]
    plan = lift_to_problem(shape, score_shape, problem_shape(m))
    if plan is None:
        if len(shape) > 4:     # scores of more dims, the term constant over their leading ones
            x = emit(aten.squeeze.dims, (x, list(range(len(shape) - 4))))
        return x
    aligned, expand_to, reshape_to = plan
    for _ in range(len(aligned) - len(shape)):
        x = emit(aten.unsqueeze.default, (x, 0))
    if any(not sizes_equal(a, b) for a, b in zip(expand_to, aligned)):
        sizes = [-1 if sizes_equal(a, b) else a for a, b in zip(expand_to, aligned)]
        x = emit(aten.expand.default, (x, _size_args(emit, sizes, m)))
    return emit(aten.reshape.default, (x, _size_args(emit, reshape_to, m, one_free=True)))


def _size_args(emit: _Emitter, sizes, m: AttentionMatch, one_free: bool = False) -> list:
    """`sizes` as arguments of a node: ints as they are, a symbolic size as -1 (`one_free`: the first one, for
    a reshape) or read from a tensor outside the region that holds it (analyze.lift_problem checked one does)."""
    out = list(sizes)
    symbolic = [i for i, size in enumerate(out) if not isinstance(size, int)]
    if one_free and symbolic:
        out[symbolic.pop(0)] = -1
    if symbolic:
        sources = size_sources([out[i] for i in symbolic], m.output, set(m.region))
        for i, source in zip(symbolic, sources):
            out[i] = emit(aten.sym_size.int, source) if isinstance(source, tuple) else source
    return out


def _bias_node(emit: _Emitter, plan: BiasPlan, m: AttentionMatch) -> fx.Node | None:
    """The op's `bias` built from `plan`'s terms: one bool keep-mask, or their float sum."""
    if plan.kind == "none":
        return None
    if plan.kind == "bool":
        # one keep-mask: a key is visible iff every term leaves it visible (several terms: fill mode, one value)
        keep = None
        for t in plan.terms:
            x = _term_tensor(emit, t, m)
            x = x if t.kind == "keep" else emit(aten.bitwise_not.default, (x,))
            keep = x if keep is None else emit(aten.bitwise_and.Tensor, (keep, x))
        return keep
    total = None
    for t in plan.terms:
        x = _term_tensor(emit, t, m)
        if t.kind == "bias":
            if not value_of(x).dtype.is_floating_point:
                # a bool or int added to the scores is a number (True = 1), never a keep-mask
                x = emit(aten._to_copy.default, (x,), {"dtype": t.score_dtype or torch.float32})
            part = x if t.value == 1.0 else emit(aten.mul.Tensor, (x, t.value))
        else:
            # fill/keep as an additive float: 0 where visible, the fill value where masked
            masked = x if t.kind == "fill" else emit(aten.bitwise_not.default, (x,))
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
    _repoint_size_reads(m, fake_mode)
    emit = _Emitter(g, m.output, fake_mode, created)
    if decision.paged is not None:
        return _rewrite_paged(emit, m, decision)
    q = _query(emit, m)
    if m.split is not None:
        k = _split_keys(emit, m)
    else:
        k = _prepare(emit, m.k)
    v = _prepare(emit, m.v)
    bias = _bias_node(emit, decision.bias, m)
    slopes = _alibi_slopes(gm, decision, q, fake_mode) if decision.alibi is not None else None
    s = decision.spec
    common = dict(scale=float(s.scale), bottom_right=s.bottom_right, softcap=float(s.softcap),
                  dropout_p=float(s.dropout_p), empty_rows_nan=s.empty_rows_nan)
    if s.verified:
        # the structure was proven from a buffer's value: the source's mask rides along as the bias, and the op
        # applies it (every key block) only where the check below finds the buffer no longer holds the structure
        bias = _bias_node(emit, decision.fallback, m)
        common["verified"] = _verified(emit, decision, m, q, k, slopes)
    if m.sinks is not None:
        common["sinks"] = _sinks(emit, m)
    if s.documents:
        common["doc_ids"] = _doc_ids(emit, decision.mask)
    if s.fill is not None:
        common["fill"] = float(s.fill)     # every masked score takes it, as the source's masked_fill / where
    if s.op == "sliding_window_attention":
        call = emit(torch.ops.attnlower.sliding_window_attention.default, (q, k, v, s.window),
                    dict(bias=bias, alibi_slopes=slopes, **common), name="attnlower_sliding")
    else:
        call = emit(torch.ops.attnlower.flash_attention.default, (q, k, v),
                    dict(bias=bias, alibi_slopes=slopes, causal=s.causal, **common), name="attnlower_flash")
    out = emit(operator.getitem, (call, 0))
    old_dtype = value_of(m.output).dtype
    if value_of(out) is not None and hasattr(value_of(out), "dtype") and value_of(out).dtype != old_dtype:
        out = emit(aten._to_copy.default, (out,), {"dtype": old_dtype})
    return _finish(emit, m, out)


def _verified(emit: _Emitter, decision: Decision, m: AttentionMatch, q: fx.Node, k: fx.Node,
              slopes: fx.Node | None) -> fx.Node:
    """The op's `verified`: one bool on the device, True iff the source's mask terms (`decision.fallback`), as
    they read the buffer this call, hide exactly the keys the spec's structure hides (visibility.py's rule: j <=
    i + off, and j > i + off - window for a band), an additive term holds only 0 and masking values, and an
    ALiBi term equals `slopes[h] * (j - (i + off))` on the visible keys (to 1e-6 relative: fp32 rounding of the
    same product).

    Cost: every term is read once per call, a buffer's [Tq, Tk] slice included (nanoGPT at T = 1024: 4 MiB of
    fp32, ~1 us at H200 bandwidth per layer: an estimate, not measured); the pattern is iota comparisons, fused
    into the reduction (`any` of what differs, one per kind of term). No host sync: the op reads the flag on
    the device. The op's bias, built from the same terms, is computed each call as well (nanoGPT: a [Tq, Tk]
    bool, T * T bytes written, Inductor fuses it with the check's read); the kernels read it only where the
    flag is False."""
    s = decision.spec
    device = value_of(q).device
    tq, tk = _size(emit, q, 2, m.q_len), _size(emit, k, 2, m.k_len)
    # the query rows' diagonal key, i + off: off = Tk - Tq bottom-right, so the rows run from Tk - Tq to Tk
    symbolic = isinstance(tq, fx.Node) or isinstance(tk, fx.Node)
    start = (emit(operator.sub, (tk, tq)) if symbolic else tk - tq) if s.bottom_right else 0
    end = tk if s.bottom_right else tq
    # int32 indices, the check's own: an int64 arange is the same iota as the model's own positions
    # (`torch.arange(T)`), which AOTAutograd's CSE then shares, moving where Inductor materializes the model's
    # (nanoGPT: into the first kernel, for the check to load). Sizes here are < 2**31 (the kernels index in int32).
    index = {"device": device, "dtype": torch.int32}
    diagonal = emit(aten.unsqueeze.default, (emit(aten.arange.start, (start, end), index), 1))
    keys = emit(aten.unsqueeze.default, (emit(aten.arange.default, (tk,), index), 0))
    pattern = None
    if s.causal or s.window:
        pattern = emit(aten.le.Tensor, (keys, diagonal))                                  # [Tq, Tk]
        if s.window:
            inside = emit(aten.gt.Tensor, (emit(aten.add.Scalar, (keys, s.window)), diagonal))
            pattern = emit(aten.bitwise_and.Tensor, (pattern, inside))
    alibi_term = decision.alibi.term if decision.alibi is not None else None
    # what differs from the structure, as bool tensors: an xor, not an `eq` of bools (Inductor's range analysis
    # fails on `==` of two index-built bools, torch 2.13)
    visible, wrong = None, []
    for t in decision.fallback.terms:
        if t is alibi_term:
            continue
        x = _term_tensor(emit, t, m)
        if t.kind == "bias":      # additive: 0 is visible, -inf or at most the masking threshold hides
            part = emit(aten.eq.Scalar, (x, 0))
            hidden = emit(aten.le.Scalar, (x, masking_threshold({value_of(x).dtype, t.score_dtype})))
            wrong.append(emit(aten.bitwise_not.default, (emit(aten.bitwise_or.Tensor, (part, hidden)),)))
        else:
            if value_of(x).dtype != torch.bool:
                x = emit(aten.ne.Scalar, (x, 0))
            part = x if t.kind == "keep" else emit(aten.bitwise_not.default, (x,))
        visible = part if visible is None else emit(aten.bitwise_and.Tensor, (visible, part))
    if visible is not None:
        wrong.append(emit(aten.bitwise_xor.Tensor, (visible, pattern)) if pattern is not None
                     else emit(aten.bitwise_not.default, (visible,)))
    if alibi_term is not None:
        x = _term_tensor(emit, alibi_term, m)
        distance = emit(aten.sub.Tensor, (keys, diagonal))                                 # j - (i + off)
        want = emit(aten.mul.Tensor, (emit(aten.view.default, (slopes, [-1, 1, 1])), distance))   # [Hq, Tq, Tk]
        error = emit(aten.abs.default, (emit(aten.sub.Tensor, (x, want)),))
        limit = emit(aten.mul.Scalar, (emit(aten.add.Scalar, (emit(aten.abs.default, (want,)), 1.0)), 1e-6))
        far = emit(aten.gt.Tensor, (error, limit))
        wrong.append(emit(aten.bitwise_and.Tensor, (far, pattern)) if pattern is not None else far)
    if not wrong:
        raise ValueError("rewrite: a site with a device check needs the source's mask terms (Decision.fallback); "
                         "the analyze stage sets them with spec.verified")
    failed = emit(aten.any.default, (wrong[0],))
    for w in wrong[1:]:
        failed = emit(aten.bitwise_or.Tensor, (failed, emit(aten.any.default, (w,))))
    return emit(aten.bitwise_not.default, (failed,), name="attnlower_verified")


def _size(emit: _Emitter, x: fx.Node, dim: int, size):
    """`size` as an argument: the int, or `x`'s dim read in the graph when it is symbolic."""
    return size if isinstance(size, int) else emit(aten.sym_size.int, (x, dim))


def _doc_ids(emit: _Emitter, mask) -> fx.Node:
    """The op's `doc_ids` [B|1, Tk]: the proven document ids D, its size-1 dims dropped, batch first
    (a 1-D D gets a batch of 1); integers kept, bools as int32 (the op compares them for equality only)."""
    ids, roles = mask.documents, list(mask.document_roles)
    if mask.documents_from_positions:
        # D = cumsum(diff(P, prepend=...) != 1): computed here from P, the runs the proof was about
        copies: dict[fx.Node, fx.Node] = {}
        for node in mask.documents_from_positions:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: copies.get(a, a))
            copies[node] = emit(node.target, args, kwargs)
        ids = copies[mask.documents]
    ones = [d for d, role in enumerate(roles) if role == "one"]
    if ones:
        ids = emit(aten.squeeze.dims, (ids, ones))
        roles = [role for role in roles if role != "one"]
    if roles == ["pos", "b"]:
        ids = emit(aten.permute.default, (ids, [1, 0]))
    elif roles == ["pos"]:
        ids = emit(aten.unsqueeze.default, (ids, 0))
    if value_of(ids).dtype not in (torch.int32, torch.int64):
        ids = emit(aten._to_copy.default, (ids,), {"dtype": torch.int32})
    return ids


def _sinks(emit: _Emitter, m: AttentionMatch) -> fx.Node:
    """The op's `sinks` [Hq]: the proven source of the per-head logits, flattened (score_chain proved its
    values run along the heads in the op's head order), times the scalars applied after it."""
    sinks = emit(aten.reshape.default, (m.sinks.source, [-1]), name="attnlower_sinks")
    if m.sinks.scale != 1.0:
        sinks = emit(aten.mul.Tensor, (sinks, m.sinks.scale))
    return sinks


def _alibi_slopes(gm: fx.GraphModule, decision: Decision, q: fx.Node, fake_mode) -> fx.Node:
    """The proven ALiBi slopes (fp32 [Hq]) as a constant of the graph, on q's device, read through
    `lift_fresh_copy` as the trace reads its own tensor literals (Inductor takes it as a constant then)."""
    slopes = decision.alibi.slopes.to(value_of(q).device)
    name, index = "_tensor_constant_attnlower_alibi", 0
    while hasattr(gm, f"{name}_{index}"):
        index += 1
    gm.register_buffer(f"{name}_{index}", slopes, persistent=False)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.get_attr(f"{name}_{index}")
    with gm.graph.inserting_after(node):
        lifted = gm.graph.call_function(aten.lift_fresh_copy.default, (node,))
    node.meta["val"] = lifted.meta["val"] = fake_mode.from_tensor(slopes) if fake_mode is not None else slopes
    return lifted


def _repoint_size_reads(m: AttentionMatch, fake_mode) -> None:
    """Make each size-only reader of a region node read the same sizes from a tensor outside the region
    (`vocabulary.size_sources` found one; score_chain checked there is one), so the region becomes dead code."""
    inside = set(m.region)
    for user, node in m.shape_reads:
        graph = user.graph
        emit = _Emitter(graph, user, fake_mode)
        sizes = []
        for src in size_sources(value_of(node).shape, user, inside):
            if isinstance(src, tuple):
                src = emit(aten.sym_size.int, src)
            sizes.append(src)
        uv = value_of(user)
        if user.target is aten.sym_size.int:
            new = sizes[user.args[1]]
        elif user.target is aten.expand_as.default:
            new = emit(aten.expand.default, (user.args[0], sizes))
        elif user.target is aten.full_like.default:
            new = emit(aten.full.default, (sizes, user.args[1]), {"dtype": uv.dtype, "device": uv.device})
        else:
            maker = {aten.zeros_like.default: aten.zeros.default, aten.ones_like.default: aten.ones.default,
                     aten.empty_like.default: aten.empty.memory_format}[user.target]
            new = emit(maker, (sizes,), {"dtype": uv.dtype, "device": uv.device})
        if not isinstance(new, fx.Node):
            raise ValueError(f"{user.name} reads a static size of {node.name}; the score_chain stage should have refused it")
        user.replace_all_uses_with(new)
        for term in m.terms:   # a term read through the size-only node (`mask.expand_as(scores)`) reads `new`
            if term.node is user:
                term.node = new


def _finish(emit: _Emitter, m: AttentionMatch, out: fx.Node) -> list[str]:
    """Bring the op's [B, Hq, Tq, Dv] result to the replaced node's shape and strides, reroute users."""
    out = _take_steps(emit, out, m.output_steps)
    out = _match_strides(emit, out, m.output)
    m.output.replace_all_uses_with(out)
    return [n.name for n in m.region]


def _match_strides(emit: _Emitter, out: fx.Node, replaced: fx.Node) -> fx.Node:
    """The graph after the site was traced with the replaced node's strides (SDPA returns q's
    dim order, and a later `.view` may rely on it): copy into that order when ours differs and
    something downstream can tell (HF's eager `(p @ v).transpose(1, 2).contiguous()` cannot: the op's
    q-ordered result makes that `.contiguous()` a no-op, which Inductor then drops)."""
    have, want = value_of(out), value_of(replaced)
    if have is None or want is None or not hasattr(want, "stride") or _same_strides(have, want):
        return out
    if not _strides_observed(replaced, have):
        return out
    order = sorted(range(want.dim()), key=lambda d: (-int(want.stride()[d]) if isinstance(want.stride()[d], int)
                                                     else -want.stride()[d].node.hint, d))
    inverse = [order.index(d) for d in range(want.dim())]
    x = emit(aten.permute.default, (out, order))
    x = emit(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
    return emit(aten.permute.default, (x, inverse))


# The size queries whose answer does not depend on the layout (a stride or storage offset does).
_LAYOUT_BLIND_QUERIES = SIZE_QUERIES - {"sym_stride", "stride", "sym_storage_offset"}


def _strides_observed(node: fx.Node, value) -> bool:
    """Whether giving `node` the strides of `value` (same sizes) could reach anything that depends on them.

    Walks the users with the new layout: a user is computed again on it (fake tensors) and, where its result has
    the strides it was traced with, nothing past it can tell; a contiguous copy (`.contiguous()`) and a size read
    never can. Anything else (a result laid out differently and read by an op that is not walked, a view the new
    strides do not allow, a graph output: the caller sees it) can."""
    for user in node.users:
        if user.op == "call_function" and op_name(user) in _LAYOUT_BLIND_QUERIES:
            continue
        if user.target is aten.clone.default and user.kwargs.get("memory_format") == torch.contiguous_format:
            continue
        traced = value_of(user)
        if user.op != "call_function" or not isinstance(traced, torch.Tensor) or len(user.users) == 0:
            return True
        args, kwargs = fx.node.map_arg((user.args, user.kwargs), lambda n: value if n is node else value_of(n))
        if not _static_call(args, kwargs):
            return True   # symbolic sizes: comparing them would add guards to the user's graph; keep the layout
        try:
            again = user.target(*args, **kwargs)
        except Exception:   # noqa: BLE001 - e.g. a `.view` the new strides do not allow: the layout matters
            return True
        if not isinstance(again, torch.Tensor) or again.shape != traced.shape:
            return True
        if _same_strides(again, traced):
            continue
        if user.target not in _STRIDE_FOLLOWING or _strides_observed(user, again):
            return True
    return False


# Ops whose result is a view following the input's strides, for any strides: the walk goes on through them.
_STRIDE_FOLLOWING = frozenset({
    aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.alias.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.reshape.default, aten.view.default, aten._unsafe_view.default})


def _static_call(args, kwargs) -> bool:
    """Every size, stride and integer argument of a call a plain int."""
    leaves: list = []
    fx.node.map_aggregate((args, kwargs), leaves.append)
    return not any(isinstance(a, torch.SymInt) or isinstance(a, torch.Tensor) and not all(
        type(x) is int for x in (*a.shape, *a.stride())) for a in leaves)


def _same_strides(a, b) -> bool:
    return all(bool(a.shape[d] == 1) or bool(a.stride()[d] == b.stride()[d]) for d in range(a.dim()))


def _rewrite_paged(emit: _Emitter, m: AttentionMatch, decision: Decision) -> list[str]:
    """paged_attention on the pools themselves: the gather and its repeats become dead code."""
    plan = decision.paged
    q = _query(emit, m)
    pools = []
    for ref in (plan.k, plan.v):
        pool = ref.pool
        if ref.pool_perm != (0, 1, 2, 3):
            pool = emit(aten.permute.default, (pool, list(ref.pool_perm)))
        if ref.head_dim is not None:   # the pool's first head_dim entries (a view: MLA's values inside its keys)
            pool = emit(aten.slice.Tensor, (pool, 3, 0, ref.head_dim))
        pools.append(pool)
    table = plan.k.table
    if value_of(table).dtype != torch.int32:
        table = emit(aten._to_copy.default, (table,), {"dtype": torch.int32})
    if plan.seq_lens is None:
        batch = emit(aten.sym_size.int, (table, 0))
        seq_lens = emit(aten.full.default, ([batch], plan.k.length), {"dtype": torch.int32,
                                                                       "device": value_of(table).device})
    else:
        seq_lens = plan.seq_lens
        if value_of(seq_lens).dtype != torch.int32:
            seq_lens = emit(aten._to_copy.default, (seq_lens,), {"dtype": torch.int32})
    s = decision.spec
    sinks = _sinks(emit, m) if m.sinks is not None else None
    extra = {"sinks": sinks} if sinks is not None else {}
    # empty_rows_nan, always passed: a chunk may be longer than its sequence (lengths are data), and its queries
    # before the sequence's first token, like every row of an empty sequence, take the source's value (0 / NaN)
    out = emit(torch.ops.attnlower.paged_attention.default, (q, pools[0], pools[1], table, seq_lens),
               dict(alibi_slopes=None, scale=float(s.scale), causal=s.causal, window=int(s.window),
                    softcap=float(s.softcap), **extra, empty_rows_nan=s.empty_rows_nan),
               name="attnlower_paged")
    return _finish(emit, m, out)
