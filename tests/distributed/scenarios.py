"""What each rank runs (through `ranks.py`): a sharded model compiled with attnlower, checked on the rank.

Each scenario builds an unsharded model and a sharded copy with the same weights, runs eager and
compiled, and returns the largest differences and the CompileReports' sites as plain data; the
tests in this folder assert on them. The model and its tensor-parallel plans are `llama.py`'s (transformers'
Llama decoder, torch's Llama TP example), which `bench/tp.py` shards the same way on GPUs.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn


# --------------------------------------------------------------------------------------------
# the models: llama.py (shared with bench/tp.py), and timm's bidirectional attention

from llama import Attention, Llama, sequence_parallel, tensor_parallel  # noqa: E402


class BidirectionalAttention(nn.Module):
    """timm's ViT attention (no mask, `q @ k.transpose(-2, -1) * scale`, softmax, `@ v`)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.o_proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class FullOutput(nn.Module):
    """`model(x)` as one plain tensor (a DTensor output gathered), the same parameter names for both models."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        from torch.distributed.tensor import DTensor

        y = self.model(x)
        return y.full_tensor() if isinstance(y, DTensor) else y


# --------------------------------------------------------------------------------------------
# helpers

def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def _full(t):
    """A gradient as one plain tensor: DTensor shards gathered."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _max_diff(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _sites(start: int) -> list[dict]:
    from attnlower.compiler.backend import reports

    out = []
    for r in reports()[start:]:
        for s in r.sites:
            out.append({"graph": r.graph_id, "op": s.op, "reason": s.reason, "shapes": s.shapes,
                        "q_heads": (s.spec or {}).get("q_heads"), "kv_heads": (s.spec or {}).get("kv_heads"),
                        "graph_error": r.error})
    return out


def _n_reports() -> int:
    from attnlower.compiler.backend import reports

    return len(reports())


def _train_step_diffs(ref: nn.Module, sharded: nn.Module, compiled, xs_ref: list, x: torch.Tensor) -> dict:
    """Forward + backward of the unsharded model on every rank's input (`xs_ref`, gradients averaged
    as FSDP and DDP do) against the sharded eager and compiled models on this rank's `x`."""
    rank = dist.get_rank()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    xs_leaf = [xr.clone().requires_grad_() for xr in xs_ref]
    for xl in xs_leaf:
        (ref(xl) * g).sum().backward()
    ref_grads = {n: p.grad / len(xs_ref) for n, p in ref.named_parameters()}
    with torch.no_grad():
        out_ref = ref(xs_ref[rank])

    x_eager = x.clone().requires_grad_()
    out_eager = sharded(x_eager)
    (out_eager * g).sum().backward()
    eager_grads = {n: _full(p.grad).clone() for n, p in sharded.named_parameters()}
    sharded.zero_grad(set_to_none=True)

    x_comp = x.clone().requires_grad_()
    out_comp = compiled(x_comp)
    (out_comp * g).sum().backward()
    missing = [n for n, p in sharded.named_parameters() if p.grad is None]
    if missing:
        raise AssertionError(f"the compiled model's backward gave no gradient to {missing}")
    comp_grads = {n: _full(p.grad) for n, p in sharded.named_parameters()}
    return {
        "out_vs_unsharded": _max_diff(out_comp, out_ref),
        "out_vs_eager": _max_diff(out_comp, out_eager),
        "input_grad_vs_unsharded": _max_diff(x_comp.grad, xs_leaf[rank].grad),
        "param_grad_vs_unsharded": max(_max_diff(comp_grads[n], ref_grads[n]) for n in comp_grads),
        "param_grad_vs_eager": max(_max_diff(comp_grads[n], eager_grads[n]) for n in comp_grads),
        "n_param_grads": len(comp_grads),
    }


# --------------------------------------------------------------------------------------------
# the scenarios

def tp_llama() -> dict:
    """TP=2 over two Llama layers (4 query heads, 2 KV heads: 2 and 1 per rank), forward and backward."""
    return _tp_llama(tensor_parallel, seq=7)


def tp_sp_llama() -> dict:
    """As tp_llama, with sequence-parallel norms (the sequence must divide by the TP degree)."""
    return _tp_llama(sequence_parallel, seq=8)


def _tp_llama(parallelize, seq: int) -> dict:
    mesh = _mesh()
    torch.manual_seed(0)
    ref = FullOutput(Llama())
    sharded = FullOutput(parallelize(copy.deepcopy(ref.model), mesh))
    x = torch.randn(2, seq, 48)   # the same on every rank: TP ranks see the same batch
    start = _n_reports()
    inner = os.environ.get("ATTNLOWER_TEST_INNER", "eager")   # test_sharded.py says why eager
    compiled = torch.compile(sharded, backend="attnlower", options={"inner": inner})
    diffs = _train_step_diffs(ref, sharded, compiled, [x] * dist.get_world_size(), x)
    return {"diffs": diffs, "sites": _sites(start)}


def fsdp_llama() -> dict:
    """FSDP2 (`fully_shard` per layer and at the root) over two Llama layers, a different batch per rank."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh()
    torch.manual_seed(0)
    ref = Llama()
    sharded = copy.deepcopy(ref)
    for layer in sharded.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    xs = [torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(100 + r)) for r in range(dist.get_world_size())]
    start = _n_reports()
    compiled = torch.compile(sharded, backend="attnlower", options={"inner": "eager"})
    diffs = _train_step_diffs(ref, sharded, compiled, xs, xs[dist.get_rank()])
    return {"diffs": diffs, "sites": _sites(start)}


def tp_fallbacks() -> dict:
    """Inside a TP graph: a site attnlower must refuse, attention on DTensors, a failing pass, a failing
    canonicalization.

    Each must give the sharded model's own results (the refused site's probabilities are checked
    against the unsharded model's, restricted to this rank's heads) and say why in the report.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import dataclasses

    from attnlower.compiler import backend
    from attnlower.passes import pipeline

    mesh, rank = _mesh(), dist.get_rank()
    plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
            "o_proj": RowwiseParallel()}
    torch.manual_seed(0)
    x = torch.randn(2, 7, 48)
    head_dim = 12
    emb = torch.zeros(1, 7, head_dim)   # rotary at angle 0: cos 1, sin 0
    cos, sin = emb.cos(), emb.sin()
    result = {}

    # 1. attention whose probabilities are returned (HF output_attentions): must stay unfused
    ref = Attention(48, heads=4, kv_heads=2, sdpa=False, return_weights=True)
    sharded = parallelize_module(copy.deepcopy(ref), mesh, plan)
    start = _n_reports()
    out, weights = torch.compile(sharded, backend="attnlower", options={"inner": "eager"})(x, cos, sin)
    ref_out, ref_weights = ref(x, cos, sin)
    local_heads = slice(rank * 2, rank * 2 + 2)   # colwise q: this rank holds query heads 2r, 2r+1
    result["refused"] = {"sites": _sites(start), "out_vs_unsharded": _max_diff(out, ref_out),
                         "weights_vs_unsharded": _max_diff(weights, ref_weights[:, local_heads])}

    # 2. attention computed on DTensors (q/k/v colwise with use_local_output=False, as a ViT's
    # unmasked attention): DTensor runs it, the report says why it is not fused
    ref = BidirectionalAttention(48, heads=4)
    dtensor_plan = {**{n: ColwiseParallel(use_local_output=False) for n in ("q_proj", "k_proj", "v_proj")},
                    "o_proj": RowwiseParallel()}
    sharded = parallelize_module(copy.deepcopy(ref), mesh, dtensor_plan)
    torch._dynamo.reset()
    start = _n_reports()
    out = torch.compile(sharded, backend="attnlower", options={"inner": "eager"})(x)
    result["on_dtensor"] = {"sites": _sites(start), "out_vs_unsharded": _max_diff(out, ref(x))}

    # 3. a pass that raises (here: the rewrite), and 4. a canonicalization that raises
    def broken_rewrite(gm, ctx):
        raise RuntimeError("injected failure in the rewrite stage")

    def broken_to_aten(gm, example_inputs):
        raise RuntimeError("injected failure in to_aten")

    ref = Attention(48, heads=4, kv_heads=2, sdpa=False)
    sharded = parallelize_module(copy.deepcopy(ref), mesh, plan)
    ref_out = ref(x, cos, sin)
    saved_stages, saved_to_aten = pipeline.STAGES, backend.to_aten
    for case in ("pass_failure", "canonicalize_failure"):
        torch._dynamo.reset()
        if case == "pass_failure":
            pipeline.STAGES = tuple(dataclasses.replace(s, run=broken_rewrite) if s.name == "rewrite" else s
                                    for s in saved_stages)
        else:
            backend.to_aten = broken_to_aten
        try:
            start = _n_reports()
            out = torch.compile(sharded, backend="attnlower", options={"inner": "eager"})(x, cos, sin)
        finally:
            pipeline.STAGES, backend.to_aten = saved_stages, saved_to_aten
        result[case] = {"sites": _sites(start), "out_vs_unsharded": _max_diff(out, ref_out),
                        "errors": [r.error for r in backend.reports()[start:]]}
    return result
