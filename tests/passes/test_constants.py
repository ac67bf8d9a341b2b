"""passes/constants.py: the numbers a graph holds (scales, fill values, alpha), read from aten graphs as
models write them: python scalars, `math.sqrt(d)`, `torch.tensor(-inf)` lifted by the trace,
`torch.finfo(dtype).min`, casts of constants (rounded to the cast's dtype), and what is not a constant."""
from __future__ import annotations

import math

import torch

from attnlower.passes.constants import constant_value, scalar_value
from helpers import aten_graphs

aten = torch.ops.aten


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_python_numbers_and_what_is_not_one():
    assert scalar_value(0.125) == 0.125 and scalar_value(3) == 3.0
    assert scalar_value(True) is None     # a bool is a flag, not a scale
    assert scalar_value("0.5") is None and constant_value(None) is None


def test_a_scale_written_with_math_sqrt_is_read():
    def f(q, k):
        return (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))

    (gm,) = aten_graphs(f, torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16))
    (div,) = _nodes(gm, aten.div.Tensor) or _nodes(gm, aten.div.Scalar)
    assert constant_value(div.args[1]) == 4.0


def test_a_lifted_tensor_constant_is_read_and_a_buffer_is_not():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("fill", torch.tensor(-1e4))

        def forward(self, s, keep):
            a = s.masked_fill(~keep, torch.tensor(float("-inf")))
            return a, s.masked_fill(~keep, self.fill)

    (gm,) = aten_graphs(Masked(), torch.randn(2, 5, 5), torch.rand(2, 5, 5) > 0.5)
    fills = [n.args[2] for n in gm.graph.nodes if n.op == "call_function" and "masked_fill" in str(n.target)]
    values = [constant_value(x) for x in fills]
    assert values[0] == float("-inf")
    assert values[1] is None   # a buffer may be written between calls: data, not a constant


def test_a_cast_constant_is_rounded_to_the_cast_dtype():
    def f(s):
        return s + torch.tensor(torch.finfo(torch.float32).min).to(torch.bfloat16)

    (gm,) = aten_graphs(f, torch.randn(3, dtype=torch.bfloat16))
    (add,) = _nodes(gm, aten.add.Tensor)
    want = torch.tensor(torch.finfo(torch.float32).min).to(torch.bfloat16).item()
    assert constant_value(add.args[1]) == want and want != torch.finfo(torch.float32).min


def test_full_and_scalar_tensor_of_one_element():
    def f(s):
        return s * torch.full((), 0.5) + torch.scalar_tensor(2.0)

    (gm,) = aten_graphs(f, torch.randn(4))
    (mul,) = _nodes(gm, aten.mul.Tensor)
    (add,) = _nodes(gm, aten.add.Tensor)
    assert constant_value(mul.args[1]) == 0.5 and constant_value(add.args[1]) == 2.0


def test_a_symbolic_scale_under_dynamic_shapes_is_specialized():
    def f(q, k):
        return (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5

    graphs = aten_graphs(f, torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16), dynamic=True)
    (mul,) = [n for gm in graphs for n in _nodes(gm, aten.mul.Tensor) + _nodes(gm, aten.mul.Scalar)]
    assert constant_value(mul.args[1]) == 0.25
