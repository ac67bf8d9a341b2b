"""What each rank runs (through `ranks.py`): a sharded model compiled with attnlower, checked on the rank.

Each scenario builds an unsharded model and a sharded copy with the same weights, runs eager and
compiled, and returns the largest differences and the CompileReports' sites as plain data; the
tests in this folder assert on them. The model is a Llama decoder block as HF transformers writes
it (RMSNorm, rotary embeddings, GQA through `repeat_kv`, softmax in fp32, SwiGLU MLP); the tensor-
parallel plan is the one of torch's Llama TP example (q/k/v and gate/up colwise, o and down rowwise).
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# the model (transformers' modeling_llama.py, eager and sdpa attention, trimmed to the block)

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, sdpa: bool, return_weights: bool = False):
        super().__init__()
        self.head_dim = dim // heads
        self.num_key_value_groups = heads // kv_heads   # a ratio: the same on every TP rank
        self.scaling = self.head_dim ** -0.5
        self.sdpa, self.return_weights = sdpa, return_weights
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, hidden_states, cos, sin):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)   # -1: the local head count under TP
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        weights = None
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
        else:
            t = q.shape[2]
            causal_mask = torch.full((t, t), torch.finfo(q.dtype).min, device=q.device).triu(1)
            weights = torch.matmul(q, k.transpose(2, 3)) * self.scaling + causal_mask
            weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(weights, v)
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        out = self.o_proj(out)
        return (out, weights) if self.return_weights else out


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


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim, heads, kv_heads, ffn, sdpa):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Attention(dim, heads, kv_heads, sdpa)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = MLP(dim, ffn)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Decoder layers on hidden states (no embedding / head): layer 0 eager attention, layer 1 SDPA."""

    def __init__(self, dim=48, heads=4, kv_heads=2, ffn=64, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, kv_heads, ffn, sdpa=i % 2 == 1) for i in range(layers))
        self.norm = RMSNorm(dim)
        head_dim = dim // heads
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        cos, sin = emb.cos(), emb.sin()
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


LLAMA_TP_PLAN = {   # torch's examples/distributed/tensor_parallelism/fsdp_tp_example.py, HF names
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}


def tensor_parallel(model: Llama, mesh) -> Llama:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    style = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in model.layers:
        parallelize_module(layer, mesh, {name: style[s]() for name, s in LLAMA_TP_PLAN.items()})
    return model


def sequence_parallel(model: Llama, mesh) -> nn.Module:
    """TP with sequence-parallel norms: torch's fsdp_tp_example.py plan (the residual stream is
    sharded over the sequence; attention all-gathers it, then runs colwise / rowwise as above)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    for layer in model.layers:
        parallelize_module(layer, mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    # the example's embedding hands the first layer its sequence shard; the final norm's output is gathered
    parallelize_module(model, mesh, {
        "layers.0": PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                       desired_input_layouts=(Shard(1), None, None), use_local_output=True),
        "norm": SequenceParallel(use_local_output=False)})
    return model


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
