"""How validation evaluates a region: every value float64 on CPU, SDPA by its math definition, the attnlower
ops by their reference, and how two results compare.

The compile-time check (validate.py), the check at reduced sizes (validate_sizes.py) and the first-call
check (validate_first_call.py) all evaluate through this module; it imports none of them.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._pytree import tree_map

from .sdpa import sdpa_arguments
from .vocabulary import DROPOUTS, FLOAT_DTYPES

aten = torch.ops.aten

# max |source - rewrite| / max(1, max |source|). Both sides run in float64: over 66 comparisons
# of correct sites (tests/models.py's hand-written, SDPA and HF cases, 2026-12-01) the largest was
# 7.5e-16. 1e-6 leaves nine orders of magnitude for other orderings, and every deliberately broken
# rewrite in tests/passes/test_validate.py is still refused.
TOLERANCE = 1e-6


def is_attention_op(n: fx.Node) -> bool:
    """Whether `n` calls an attnlower op or an SDPA call the traced graphs hold (whole attention in one node)."""
    ns = getattr(n.target, "namespace", None)
    return ns == "attnlower" or n.target in (aten.scaled_dot_product_attention.default,
                                             aten._scaled_dot_product_flash_attention_for_cpu.default)


def score_shape(n: fx.Node, value) -> tuple | None:
    """The shape `[..., Tq, Tk]` of the scores attention call `n` makes inside (an SDPA-family call or
    an attnlower op, in a graph or a copy), from its arguments' values (`value(arg)`); else None."""
    if not (is_attention_op(n) or n.target is sdpa_reference):
        return None
    q, k = value(n.args[0]), value(n.args[1])
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() < 2:
        return None
    if "paged" in str(n.target):
        table = value(n.args[3])
        return (*q.shape[:-1], table.shape[-1] * k.shape[2]) if isinstance(table, torch.Tensor) else None
    return (*q.shape[:-1], k.shape[-2])


# --------------------------------------------------------------------------------------------
# a copy in float64 on CPU

def constants_to_float64_cpu(module: fx.GraphModule) -> None:
    """The float tensors a copy reads through get_attr (constants the trace lifted, e.g. BLOOM's ALiBi
    slopes) become float64 on CPU in the copy, as its casts do; the source module keeps its own
    (fx.GraphModule copies dotted attribute paths into fresh submodules, so nothing is shared)."""
    for n in module.graph.nodes:
        if n.op != "get_attr":
            continue
        *path, leaf = str(n.target).split(".")
        owner = module.get_submodule(".".join(path)) if path else module
        value = getattr(owner, leaf, None)
        if isinstance(value, torch.Tensor) and value.dtype in FLOAT_DTYPES and (
                value.dtype != torch.float64 or value.device.type != "cpu"):
            setattr(owner, leaf, value.detach().to("cpu", torch.float64))


def to_float64_cpu(n: fx.Node) -> None:
    """In a copied node: float casts and dtypes become float64, devices CPU, dropout p = 0."""
    def conv(a):
        if isinstance(a, torch.dtype) and a in FLOAT_DTYPES:
            return torch.float64
        if isinstance(a, torch.device):
            return torch.device("cpu")
        return a
    n.args, n.kwargs = tree_map(conv, n.args), tree_map(conv, n.kwargs)
    t = n.target
    if t in (aten._softmax.default, aten._log_softmax.default):
        n.args = (*n.args[:2], False)             # half_to_float: the input is float64 now
    elif t in DROPOUTS:
        n.args = (n.args[0], 0.0, *n.args[2:])
    elif t in _SDPA_OUTPUTS:
        _sdpa_to_reference(n)                     # torch's kernel is not trusted here (sdpa_reference)
    elif is_attention_op(n) and "dropout_p" in n.kwargs:
        n.kwargs = {**n.kwargs, "dropout_p": 0.0}


# --------------------------------------------------------------------------------------------
# one dtype the validator controls

def _as_float64(x):
    """A floating tensor as float64 on CPU (itself when it already is: in-place writes stay in place),
    inside lists, tuples and dicts too (by hand: pytree's tree_map cost 0.5 s of a 1 s GPT-2 check)."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and (x.dtype != torch.float64 or x.device.type != "cpu"):
            return x.to("cpu", torch.float64)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_as_float64(v) for v in x) if not hasattr(x, "_fields") else type(x)(*map(_as_float64, x))
    if isinstance(x, dict):
        return {k: _as_float64(v) for k, v in x.items()}
    return x


class _Float64Run(fx.Interpreter):
    """Runs a copy with every floating value in float64 on CPU: the arguments of each node and its results.

    The copies' casts and factory dtypes are rewritten to float64 (`to_float64_cpu`) and the default
    dtype is float64 while they run (`reference_ops`), so this converts nothing on a copy that is right;
    it is what makes that hold for every value, whatever an op does with dtypes it was not given (a
    `full` without a dtype, a constant, a module buffer): torch's CPU SDPA with float64 q/k/v and a
    float32 mask returns wrong numbers (`sdpa_reference`), and no op may see mixed precisions here."""

    def run_node(self, n: fx.Node):
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args, kwargs = _as_float64(args), op_contract_dtypes(n.target, _as_float64(kwargs))
            return _as_float64(getattr(self, n.op)(n.target, args, kwargs))


def op_contract_dtypes(target, kwargs: dict) -> dict:
    """`kwargs` of a call of `target` with the arguments whose dtype an attnlower op's contract fixes in
    that dtype: ALiBi slopes are float32 (docs/INTERFACES.md section 1), whatever the other inputs are. The
    rewrite passes them as a float32 constant, so float64 -> float32 gives back exactly its values."""
    if getattr(target, "namespace", None) == "attnlower" and isinstance(kwargs.get("alibi_slopes"), torch.Tensor):
        return {**kwargs, "alibi_slopes": kwargs["alibi_slopes"].to(torch.float32)}
    return kwargs


def run_float64(module: torch.nn.Module, inputs: list):
    """`module` (a Source / Rewrite copy, or a repro file's class of one) on `inputs`, every floating
    value float64 on CPU (`_Float64Run`)."""
    if not isinstance(module, fx.GraphModule):
        module = fx.symbolic_trace(module)
    with reference_ops(), unset_fake_temporarily(), torch.no_grad():
        return _Float64Run(module).run(*inputs)


def sdpa_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, outputs=0, query_positions=None):
    """torch's `scaled_dot_product_attention` by its documented math definition, in the inputs' dtype.

    The validator evaluates a source region's SDPA call with this, never with torch's kernel: on CPU
    (torch 2.13.0) the kernel gives wrong numbers for float64 q/k/v with a float32 mask:

        q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.float64) for _ in range(3))
        mask = torch.triu(torch.full((16, 16), float("-inf")), 1)              # float32
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                 # off by ~2.9
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask.double())        # right (~1e-16)

    Semantics (torch's docs and its math backend): scores `q·kᵀ * scale` (scale 1/sqrt(E) by default)
    plus the causal mask (top-left: key j hidden from query i when j > i) plus `attn_mask` (bool: False
    hides; float: added); `enable_gqa` repeats each KV head for its group of query heads; softmax over
    the keys, where a row whose scores are all -inf gives 0 (the math backend's `_safe_softmax`); then
    `· v`. `query_positions` (the first-call check's sampled rows) gives each query row's position for
    the causal mask. `outputs` > 0 returns an `outputs`-tuple (out, logsumexp, None, ...) for the op
    forms that return one (`_scaled_dot_product_flash_attention_for_cpu`, ...).
    """
    if dropout_p:
        raise ValueError(f"sdpa_reference runs without dropout, got dropout_p={dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention takes attn_mask or is_causal, not both")
    length, keys = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and query.dim() >= 3 and key.size(-3) != query.size(-3):
        group = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(group, -3), value.repeat_interleave(group, -3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        rows = torch.arange(length) if query_positions is None else query_positions
        scores = scores.masked_fill(torch.arange(keys)[None, :] > rows[:, None], float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill((scores == float("-inf")).all(dim=-1, keepdim=True), 0.0)
    out = probs @ value
    if not outputs:
        return out
    return (out, torch.logsumexp(scores, dim=-1)) + (None,) * (outputs - 2)


_SDPA_OUTPUTS = {  # how many results each op of the SDPA family returns (0: one tensor)
    aten.scaled_dot_product_attention.default: 0,
    aten._scaled_dot_product_flash_attention_for_cpu.default: 2,
    aten._scaled_dot_product_flash_attention.default: 9,
    aten._scaled_dot_product_efficient_attention.default: 4,
    aten._scaled_dot_product_cudnn_attention.default: 9,
}


def _sdpa_to_reference(n: fx.Node) -> None:
    """Make a copied SDPA-family call a call of `sdpa_reference` with the same arguments, dropout off."""
    a = sdpa_arguments(n)
    outputs = _SDPA_OUTPUTS[n.target]
    n.target = sdpa_reference
    n.args = (a.q, a.k, a.v)
    n.kwargs = {"attn_mask": a.mask, "is_causal": bool(a.is_causal), "scale": a.scale,
                "enable_gqa": bool(a.enable_gqa), "outputs": outputs}


@contextlib.contextmanager
def reference_ops():
    """The attnlower ops run their plain reference on CPU float64 (ATTNLOWER_CPU_KERNELS aside),
    on one CPU thread. On the busy 2-core dev box (2026-12-01) the default thread pool made a float64
    [2, 4, 32, 16] @ [2, 4, 16, 32] take 12.3 ms instead of 0.12 ms, and whole checks were slower
    at every size measured (0.96 s vs 0.36 s at 393k elements, 6.4 s vs 5.9 s at 8.4M). An idle
    many-core host might gain from threads at the largest sizes: unmeasured."""
    saved = os.environ.pop("ATTNLOWER_CPU_KERNELS", None)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)        # a factory op without a dtype makes float64 too
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        if saved is not None:
            os.environ["ATTNLOWER_CPU_KERNELS"] = saved


# --------------------------------------------------------------------------------------------
# comparing two results

def _max_error(want: torch.Tensor, got: torch.Tensor) -> tuple[str, float, float]:
    """What `compare` and `compare_scaled` measure: (why not, 0, 0) when the shapes or the NaN patterns differ (NaN
    must stand where and only where `want` is NaN), else ('', max |got - want|, max |want|) over the elements where
    `want` is not NaN: equal values count 0 (equal infinities included), the scale reads finite values only
    (1.0 when there are none); nothing to compare gives ('', 0.0, 1.0)."""
    if tuple(want.shape) != tuple(got.shape):
        return f"shape {list(got.shape)} where the source gives {list(want.shape)}", 0.0, 0.0
    a, b = want.double(), got.double()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return (f"NaN pattern differs: {int(nan_a.sum())} NaN element(s) in the source, "
                f"{int(nan_b.sum())} in the rewrite, {int((nan_a != nan_b).sum())} position(s) disagree"), 0.0, 0.0
    keep = ~nan_a
    a, b = a[keep], b[keep]
    if a.numel() == 0:
        return "", 0.0, 1.0
    err = float(torch.where(a == b, torch.zeros_like(a), (a - b).abs()).max())   # inf - inf is NaN: fails below
    finite = a[torch.isfinite(a)]
    return "", err, float(finite.abs().max()) if finite.numel() else 1.0


def compare_scaled(want: torch.Tensor, got: torch.Tensor, tolerance: float) -> str:
    """'' when max |got - want| <= tolerance * max |want| (finite values; NaN where and only where
    `want` is NaN), else why not: the first-call check's rule, where `got` is the op's low-precision output."""
    why, err, scale = _max_error(want, got)
    if not why and not err <= tolerance * max(scale, 1e-30):
        return f"max abs error {err:.3g} (tolerance {tolerance:g} x max |source| {scale:.3g})"
    return why


def compare(want: torch.Tensor, got: torch.Tensor) -> str:
    """'' when `got` equals `want` within TOLERANCE (NaN where and only where `want` is NaN), else why not."""
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        return f"the source gives {type(want).__name__}, the rewrite {type(got).__name__}"
    why, err, scale = _max_error(want, got)
    scale = max(1.0, scale)                        # absolute below |source| = 1, relative above
    if not why and not err <= TOLERANCE * scale:   # NaN-safe: inf - inf gives NaN, which fails too
        return f"max abs error {err:.3g} (tolerance {TOLERANCE * scale:.3g})"
    return why
