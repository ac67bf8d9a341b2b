"""passes/vocabulary.py: the op families every stage shares, and the node readers (size-only reads,
size hints that never guard, ancestors)."""
from __future__ import annotations

import torch

from attnlower.passes import vocabulary as V
from helpers import aten_graphs

aten = torch.ops.aten


def test_families_are_disjoint_where_the_stages_rely_on_it():
    assert not (V.SOFTMAX_OPS & V.PRODUCTS) and not (V.MASKED_FILLS & V.WHERES)
    assert V.SOFTMAX_OPS <= V.SOFTMAX_FORMS and V.PRODUCTS <= V.MATRIX_PRODUCTS
    assert V.LAYOUT_OPS.isdisjoint(V.SOFTMAX_FORMS | V.PRODUCTS | V.COMPARISONS)


def test_size_reads_are_told_from_value_reads():
    def f(scores, mask):
        m = mask.expand_as(scores)            # reads scores' size only
        return scores.masked_fill(m, 0.0)

    (gm,) = aten_graphs(f, torch.randn(2, 4, 6), torch.rand(1, 1, 6) > 0.5)
    scores = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.meta["val"].dtype == torch.float32)
    (expand,) = [u for u in scores.users if u.target is aten.expand_as.default]
    (fill,) = [u for u in scores.users if "masked_fill" in str(u.target)]
    assert V.reads_only_size(expand, scores) and V.size_read_index(expand) == 1
    assert not V.reads_only_size(fill, scores) and V.size_read_index(fill) is None


def test_size_hint_reads_a_symbolic_size_without_a_guard():
    def f(x):
        return x * 2

    (gm,) = aten_graphs(f, torch.randn(37, 4), dynamic=True)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta["val"], torch.Tensor))
    size = x.meta["val"].shape[0]
    assert isinstance(size, torch.SymInt)
    env = size.node.shape_env
    before = len(env.guards)
    assert V.size_hint(size) == 37 and V.size_hint(5) == 5 and V.size_hint("n") is None
    assert len(env.guards) == before   # read without installing Eq(s, 37): no recompile per length


def test_ancestors_follow_every_input_or_the_chosen_ones():
    def f(a, b):
        return (a + 1) * b

    (gm,) = aten_graphs(f, torch.randn(3), torch.randn(3))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    names = {n.name for n in V.ancestors([out])}
    assert sum(1 for n in gm.graph.nodes if n.op == "placeholder" and n.name in names) == 2
    only_first = V.ancestors([out], inputs_of=lambda n: n.all_input_nodes[:1])
    assert len(only_first) < len(V.ancestors([out]))
