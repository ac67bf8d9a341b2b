"""A Llama decoder as transformers' modeling_llama.py writes it, and torch's tensor-parallel plans for it.

Shared by the distributed tests (`scenarios.py`, two gloo ranks on CPU) and the GPU benchmark
(`bench/tp.py`, NCCL), so both shard the same model the same way: RMSNorm, rotary embeddings, GQA through
`repeat_kv`, softmax in fp32, SwiGLU MLP; the plan of torch's Llama TP example (q/k/v and gate/up colwise,
o and down rowwise), with and without sequence-parallel norms.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    """Decoder layers on hidden states (no embedding / head).

    attention: "alternate" (layer 0 eager matmul-softmax-matmul, layer 1 SDPA, ...: both spellings in one
    model, what the tests use), "sdpa" or "eager" (every layer: transformers' attn_implementation).
    rope_base: 10000 (Llama 2), 500000 (Llama 3).
    """

    def __init__(self, dim=48, heads=4, kv_heads=2, ffn=64, layers=2, attention="alternate", rope_base=10000.0):
        super().__init__()
        if attention not in ("alternate", "sdpa", "eager"):
            raise ValueError(f"Llama: attention must be 'alternate', 'sdpa' or 'eager', got {attention!r}")
        sdpa = [i % 2 == 1 if attention == "alternate" else attention == "sdpa" for i in range(layers)]
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, kv_heads, ffn, sdpa=s) for s in sdpa)
        self.norm = RMSNorm(dim)
        head_dim = dim // heads
        self.register_buffer("inv_freq", 1.0 / (rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim)))

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
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


