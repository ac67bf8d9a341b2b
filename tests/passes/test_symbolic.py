"""passes/symbolic.py: mask nodes read as formulas over their indices."""
from __future__ import annotations

import sympy
import torch

from attnlower.passes.symbolic import INDEX, LENGTH, IndexInterpreter, NotSymbolic, resolve_tables
from helpers import aten_graphs


def _graph(fn, *args):
    (gm,) = aten_graphs(fn, *args)
    return gm


def _reader(gm, tables=None):
    data = {n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}
    return IndexInterpreter(lambda s: sympy.sympify(int(s)), lambda a, b: int(a) == int(b),
                            lambda n: n in data and n not in (tables or {}), tables)


def _output(gm):
    return next(n for n in gm.graph.nodes if n.op == "output").args[0][0]


def test_positions_against_lengths():
    gm = _graph(lambda lens: torch.arange(6)[None, :] < lens[:, None], torch.tensor([2, 5]))
    reader = _reader(gm)
    read = reader.read(_output(gm))
    assert read.kind == "bool" and read.value == sympy.Lt(INDEX[1], LENGTH(INDEX[0]))
    assert reader.lengths.op == "placeholder"


def test_chunk_positions_are_linear():
    def chunk(lens):
        pos = lens[:, None] - 3 + torch.arange(3)[None, :]
        return torch.arange(8)[None, None, :] <= pos[:, :, None]

    gm = _graph(chunk, torch.tensor([4, 7]))
    read = _reader(gm).read(_output(gm))
    assert read.value == sympy.Le(INDEX[2], LENGTH(INDEX[0]) - 3 + INDEX[1])


def test_a_reshape_across_dims_or_a_float_is_not_read():
    gm = _graph(lambda lens: (torch.arange(6).view(2, 3) < lens[:, None]).reshape(6), torch.tensor([1, 2]))
    try:
        _reader(gm).read(_output(gm))
    except NotSymbolic as e:
        assert "moving elements across dims" in str(e)
    else:
        raise AssertionError("a reshape that merges dims was read")


def test_a_table_constant_along_its_diagonals_becomes_a_bound():
    table = torch.tril(torch.ones(8, 8))
    gm = _graph(lambda t, n: t[:n.shape[0], :n.shape[0]] == 0, table, torch.zeros(5))
    (placeholder,) = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta["val"].shape == (8, 8)]
    reader = _reader(gm, {placeholder: table})
    formula = resolve_tables(reader, reader.read(_output(gm)).value)
    assert sympy.simplify(formula.xreplace({INDEX[0]: 2, INDEX[1]: 3})) is sympy.true      # above the diagonal
    assert sympy.simplify(formula.xreplace({INDEX[0]: 3, INDEX[1]: 3})) is sympy.false


def test_a_table_that_is_not_constant_along_a_diagonal_is_refused():
    table = torch.tril(torch.ones(8, 8))
    table[5, 2] = 0
    gm = _graph(lambda t: t == 0, table)
    (placeholder,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    reader = _reader(gm, {placeholder: table})
    try:
        resolve_tables(reader, reader.read(_output(gm)).value)
    except NotSymbolic as e:
        assert "diagonal -3" in str(e)
    else:
        raise AssertionError("a table with a hole was read as a pattern")
