"""Read the numbers of a graph: a scale, a fill value, baddbmm's alpha / beta.

`scalar_value` reads a number that is not a tensor (a python scalar, or a symbolic one under
dynamic=True); `constant_value` also reads the tensors that hold one constant (`scalar_tensor`,
`full([], c)`, a lifted `_tensor_constant`, and casts / copies of those). A symbolic number is
specialized: float() guards on the symbols it reads, and Dynamo recompiles if they change, so a
scale read here is never silently wrong.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .vocabulary import CONSTANT_PRESERVING, shape_of, sizes_equal

aten = torch.ops.aten


def scalar_value(c) -> float | None:
    """A python number, or a symbolic one (`d ** -0.5` under dynamic=True), as a float; else None."""
    if isinstance(c, bool):
        return None
    if isinstance(c, (int, float)):
        return float(c)
    if isinstance(c, fx.Node) and isinstance(c.meta.get("val"), (torch.SymInt, torch.SymFloat)):
        # `q.size(-1) ** -0.5` under dynamic=True: the op takes a float, so specialize (a guard)
        return float(c.meta["val"])
    return None


def real_float(make) -> float:
    """float(make().item()), computed on real tensors even if a fake mode is active."""
    with unset_fake_temporarily():
        return float(make().item())


def constant_value(x) -> float | None:
    """A number (`scalar_value`), or a node that is a scalar constant (`scalar_tensor`, `full([], c)`, ...)."""
    number = scalar_value(x)
    if number is not None or not isinstance(x, fx.Node):
        return number
    if x.op == "call_function":
        t = x.target
        if t is aten.scalar_tensor.default:
            return float(x.args[0])
        if t is aten.full.default and all(sizes_equal(s, 1) for s in shape_of(x)):
            return float(x.args[1])
        if t in CONSTANT_PRESERVING:
            value = constant_value(x.args[0])
            out = x.meta.get("val")
            if value is not None and isinstance(out, torch.Tensor):
                value = real_float(lambda: torch.tensor(value, dtype=out.dtype))  # a cast rounds the constant
            return value
        if t is aten.zeros.default and all(sizes_equal(s, 1) for s in shape_of(x)):
            return 0.0
    if x.op == "get_attr":
        # A tensor the trace lifted out of the code (`torch.tensor(float("-inf"))`, finfo.min) is a
        # constant of the graph. Any other attribute (a buffer) may be written between calls: data.
        value = getattr(x.graph.owning_module, str(x.target), None)
        if (str(x.target).startswith("_tensor_constant") and isinstance(value, torch.Tensor)
                and value.numel() == 1 and value.device.type != "meta"):
            return real_float(lambda: value.reshape(()))
    return None
