"""Small models and functions that spell attention in every way we know, for the end-to-end suite.

Each factory returns a `Case(model, inputs, expected)`:
- `model`: an `nn.Module` in the right mode (eval unless the case is about training), fp32 unless
  the case is about bf16, random weights from a fixed seed, nothing downloaded.
- `inputs`: an `Inputs(args, kwargs)` to call it with.
- `expected`: an `Expected` saying how many sites must be rewritten, into which op(s), or, for the
  negative cases, that nothing is rewritten and what the refusal reason must mention.

The HF configurations mirror /work/shared/spellings/README.md: hidden 64, 2 layers, 4 heads,
head_dim 16, vocab 128, B=2, S=32; Llama and Mistral use GQA (4 query heads, 2 KV heads); Mistral's
sliding window (8) is smaller than the sequence. Modes: "nomask" (use_cache=False, no attention_mask),
"cache" (use_cache=True, no mask: the prefill of generation), "pad" (a 2-D attention_mask with 5
left-padded tokens in row 0).

The compared output of a call is `compared_tensors(result)`: logits or last_hidden_state of an HF
output, every tensor of a tuple, or the tensor itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

B, S, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 2, 32, 64, 4, 2, 16, 128, 2
WINDOW = 8          # Mistral's sliding window, smaller than S so the band matters
PAD = 5             # left-padded tokens in row 0 of the "pad" mode

FLASH = "flash_attention"
SLIDING = "sliding_window_attention"
PAGED = "paged_attention"

# Per-dtype tolerance on the max relative error (max |compiled - eager| / max |eager|).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Expected:
    """What the backend must do with a case.

    count:   rewritten sites over all graphs (one per attention layer).
    ops:     the op names a rewritten site may get (a set where the docs leave the choice open,
             e.g. a band mask combined with padding may run as sliding-window or flash with a bias).
    refused: for negative cases, a regex the refusal reason of at least one refused site must match
             ("" = any non-empty reason); None for positive cases, which must refuse nothing.
    rtol:    max relative error of compiled vs eager.
    """

    count: int
    ops: frozenset[str] = frozenset({FLASH})
    refused: str | None = None
    rtol: float = RTOL[torch.float32]


def expect(count: int, *ops: str, rtol: float = RTOL[torch.float32]) -> Expected:
    return Expected(count=count, ops=frozenset(ops or (FLASH,)), rtol=rtol)


def expect_refused(reason: str = "") -> Expected:
    return Expected(count=0, ops=frozenset(), refused=reason)


class Inputs(NamedTuple):
    args: tuple = ()
    kwargs: dict = {}


class Case(NamedTuple):
    model: nn.Module
    inputs: Inputs
    expected: Expected


def compared_tensors(result: Any) -> list[torch.Tensor]:
    """The tensors of a call's result that compiled and eager must agree on."""
    if isinstance(result, torch.Tensor):
        return [result]
    for name in ("logits", "last_hidden_state"):
        value = getattr(result, name, None)
        if isinstance(value, torch.Tensor):
            return [value]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in compared_tensors(r)]
    raise TypeError(f"expected a tensor, a tuple of tensors or an HF output, got {type(result).__name__}")


class Fn(nn.Module):
    """Wrap a plain function as a module, so every case is called the same way."""

    def __init__(self, fn: Callable, name: str | None = None):
        super().__init__()
        self.fn = fn
        self.name = name or fn.__name__

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return self.name


def qkv(hq: int = HEADS, hkv: int | None = None, t: int = S, d: int = HEAD_DIM, dtype=torch.float32, b: int = B):
    """Random q [b, hq, t, d], k and v [b, hkv, t, d]."""
    hkv = hq if hkv is None else hkv
    return (torch.randn(b, hq, t, d, dtype=dtype), torch.randn(b, hkv, t, d, dtype=dtype),
            torch.randn(b, hkv, t, d, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# Hugging Face models
# ----------------------------------------------------------------------------------------------

HF_MODELS = ("gpt2", "llama", "mistral", "bert")
HF_IMPLS = ("eager", "sdpa")
HF_MODES = ("nomask", "cache", "pad")


def hf_modes(model: str) -> tuple[str, ...]:
    """BERT is an encoder: no cache mode."""
    return ("nomask", "pad") if model == "bert" else HF_MODES


def _hf_config(model: str, attn_impl: str):
    import transformers

    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if model == "gpt2":
        cfg = transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, vocab_size=VOCAB,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0)
    elif model in ("llama", "mistral"):
        kw = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, **common)
        if model == "llama":
            cfg = transformers.LlamaConfig(**kw)
        else:
            cfg = transformers.MistralConfig(sliding_window=WINDOW, **kw)
    elif model == "bert":
        cfg = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      intermediate_size=2 * HIDDEN, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, **common)
    else:
        raise ValueError(f"expected one of {HF_MODELS}, got {model!r}")
    cfg._attn_implementation = attn_impl
    return cfg


def hf_model(model: str, attn_impl: str, mode: str, seed: int = 0, dtype=torch.float32) -> Case:
    """A tiny randomly initialised HF model (`model` in HF_MODELS) with `attn_impl` "eager" or "sdpa"."""
    import transformers

    if mode not in hf_modes(model):
        raise ValueError(f"mode for {model} must be one of {hf_modes(model)}, got {mode!r}")
    torch.manual_seed(seed)
    cfg = _hf_config(model, attn_impl)
    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
           "mistral": transformers.MistralForCausalLM, "bert": transformers.BertModel}[model]
    net = cls(cfg).to(dtype).eval()
    input_ids = torch.randint(0, VOCAB, (B, S))
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if model != "bert":
        kwargs["use_cache"] = mode == "cache"
    if mode == "pad":
        attention_mask = torch.ones(B, S, dtype=torch.long)
        attention_mask[0, :PAD] = 0
        kwargs["attention_mask"] = attention_mask
    # Mistral's band is a proven window only when nothing data-dependent joins it (the "cache" mode);
    # with padding, or the packed-sequence mask HF builds from position_ids without use_cache, the
    # mask may go in as a bias, and either op is exact.
    if model == "mistral":
        ops = (SLIDING,) if mode == "cache" else (SLIDING, FLASH)
    else:
        ops = (FLASH,)
    return Case(net, Inputs((), kwargs), expect(LAYERS, *ops, rtol=RTOL[dtype]))


# ----------------------------------------------------------------------------------------------
# nanoGPT
# ----------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """nanoGPT's attention (karpathy/nanoGPT model.py), manual path or `F.scaled_dot_product_attention`."""

    def __init__(self, n_embd: int = HIDDEN, n_head: int = HEADS, block_size: int = 64, flash: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout, self.flash = n_head, n_embd, dropout, flash
        if not flash:
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                               dropout_p=self.dropout if self.training else 0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int = HIDDEN):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """nanoGPT's transformer block: pre-LN attention and MLP with residuals."""

    def __init__(self, n_embd: int = HIDDEN, n_head: int = HEADS, flash: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, flash=flash)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def nanogpt(flash: bool, t: int = S, seed: int = 0) -> Case:
    """One nanoGPT CausalSelfAttention, manual (tril buffer + masked_fill) or flash (SDPA is_causal)."""
    torch.manual_seed(seed)
    model = CausalSelfAttention(flash=flash).eval()
    return Case(model, Inputs((torch.randn(B, t, HIDDEN),)), expect(1))


def nanogpt_block(flash: bool, seed: int = 0) -> Case:
    """A nanoGPT Block in training mode (dropout 0), for gradients."""
    torch.manual_seed(seed)
    model = Block(flash=flash).train()
    return Case(model, Inputs((torch.randn(B, S, HIDDEN, requires_grad=True),)), expect(1))


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------

class SelfMHA(nn.Module):
    """`nn.MultiheadAttention` used as self-attention; returns the weights too when `need_weights`."""

    def __init__(self, batch_first: bool, need_weights: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=batch_first)
        self.need_weights = need_weights

    def forward(self, x):
        out, weights = self.mha(x, x, x, need_weights=self.need_weights)
        return (out, weights) if self.need_weights else out


def mha(batch_first: bool, need_weights: bool, seed: int = 0) -> Case:
    """need_weights=False: rewritten. need_weights=True: the probabilities are an output, so not rewritten."""
    torch.manual_seed(seed)
    model = SelfMHA(batch_first, need_weights).eval()
    x = torch.randn(B, S, HIDDEN) if batch_first else torch.randn(S, B, HIDDEN)
    expected = expect_refused(PROBS_USED) if need_weights else expect(1)
    return Case(model, Inputs((x,)), expected)


# What a refusal because the softmax output is needed elsewhere must mention.
PROBS_USED = r"(?i)probabilit|weights|softmax output|escapes|other use|used (outside|elsewhere|by)"


# ----------------------------------------------------------------------------------------------
# Direct F.scaled_dot_product_attention calls
# ----------------------------------------------------------------------------------------------

def sdpa_supports_gqa() -> bool:
    """Whether this torch's SDPA takes `enable_gqa` (2.5+). Builtins have no inspect.signature, so fall back."""
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class SDPADropout(nn.Module):
    """SDPA with dropout in training, none in eval (the way models pass `dropout_p`)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)


def _keep_mask(t: int = S) -> torch.Tensor:
    """A random bool keep-mask [B, 1, t, t] that keeps the diagonal, so no row is empty."""
    keep = torch.rand(B, 1, t, t) > 0.5
    return keep | torch.eye(t, dtype=torch.bool)


SDPA_CASES = ("bool_mask", "float_mask", "is_causal", "scale", "enable_gqa", "dropout_eval", "plain")


def sdpa(kind: str, seed: int = 0) -> Case:
    """`F.scaled_dot_product_attention` called directly with one argument exercised."""
    torch.manual_seed(seed)
    q, k, v = qkv()
    if kind == "plain":
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        args = (q, k, v)
    elif kind == "bool_mask":
        fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
        args = (q, k, v, _keep_mask())
    elif kind == "float_mask":
        fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
        args = (q, k, v, torch.randn(B, 1, S, S))
    elif kind == "is_causal":
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        args = (q, k, v)
    elif kind == "scale":
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3)  # noqa: E731
        args = (q, k, v)
    elif kind == "enable_gqa":
        q, k, v = qkv(HEADS, KV_HEADS)
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        args = (q, k, v)
    elif kind == "dropout_eval":
        return Case(SDPADropout(0.3).eval(), Inputs((q, k, v)), expect(1))
    else:
        raise ValueError(f"expected one of {SDPA_CASES}, got {kind!r}")
    return Case(Fn(fn, f"sdpa_{kind}").eval(), Inputs(args), expect(1))


def sdpa_dropout_train(p: float = 0.3, seed: int = 0) -> Case:
    """SDPA with dropout_p > 0 in training mode: rewritten with the dropout kept (outputs are random)."""
    torch.manual_seed(seed)
    return Case(SDPADropout(p).train(), Inputs(qkv()), expect(1))


# ----------------------------------------------------------------------------------------------
# Hand-written spellings
# ----------------------------------------------------------------------------------------------

SOFTCAP = 1.0


def _div(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _mul(q, k, v):
    s = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    return F.softmax(s, dim=-1) @ v


def _q_scaled(q, k, v):
    # timm without fused attention: scale q before the matmul
    q = q * q.shape[-1] ** -0.5
    attn = q @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return attn @ v


def _sqrt_split(q, k, v):
    # the scale split evenly between q and k (d ** -0.25 on each)
    scale = q.size(-1) ** -0.25
    s = (q * scale) @ (k * scale).transpose(-2, -1)
    return s.softmax(-1) @ v


def _baddbmm(q, k, v):
    b, h, t, d = q.shape
    q3, k3, v3 = q.reshape(b * h, t, d), k.reshape(b * h, t, d), v.reshape(b * h, t, d)
    scores = torch.baddbmm(q3.new_zeros(b * h, t, t), q3, k3.transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(d))
    out = torch.bmm(torch.softmax(scores, dim=-1), v3)
    return out.view(b, h, t, d)


def _einsum(q, k, v):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * (1.0 / math.sqrt(q.size(-1)))
    p = s.softmax(dim=-1)
    return torch.einsum("bhij,bhjd->bhid", p, v)


def _bmm3d(q, k, v):
    # inputs already [B*H, T, D]
    s = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.size(-1))
    return torch.bmm(torch.softmax(s, dim=-1), v)


def _softcap(q, k, v):
    s = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    s = torch.tanh(s / SOFTCAP) * SOFTCAP
    return torch.softmax(s, dim=-1) @ v


def _gqa_repeat_interleave(q, k, v):
    n_rep = q.size(1) // k.size(1)
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return s.softmax(-1) @ v


def _bf16_fp32_softmax(q, k, v):
    s = torch.matmul(q, k.transpose(2, 3)) * q.size(-1) ** -0.5
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def _t5_bias(q, k, v, position_bias):
    # T5: no scale, a learned additive bias [1, H, T, T]
    s = torch.matmul(q, k.transpose(3, 2)) + position_bias
    return torch.matmul(F.softmax(s.float(), dim=-1).type_as(s), v)


def _causal_keep(t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] <= torch.arange(t)[:, None]


def _where_lifted_ninf(q, k, v):
    # the fill is a tensor the trace lifts into a graph constant (_tensor_constant0), not a python float
    s = torch.matmul(q, k.mT) * q.shape[-1] ** -0.5
    s = torch.where(_causal_keep(q.shape[-2]), s, torch.tensor(float("-inf")))
    return s.softmax(dim=3) @ v


def _where_lifted_finfo(q, k, v):
    s = torch.matmul(q, k.mT) * q.shape[-1] ** -0.5
    s = torch.where(_causal_keep(q.shape[-2]), s, torch.tensor(torch.finfo(s.dtype).min))
    return s.softmax(dim=3) @ v


HANDWRITTEN = ("div", "mul", "q_scaled", "sqrt_split", "baddbmm", "einsum", "bmm3d", "softcap",
               "gqa_repeat_interleave", "bf16_fp32_softmax", "t5_bias", "where_lifted_ninf",
               "where_lifted_finfo")


def handwritten(kind: str, seed: int = 0) -> Case:
    """matmul/softmax/matmul attention spelled by hand."""
    torch.manual_seed(seed)
    fns = {"div": _div, "mul": _mul, "q_scaled": _q_scaled, "sqrt_split": _sqrt_split, "baddbmm": _baddbmm,
           "einsum": _einsum, "bmm3d": _bmm3d, "softcap": _softcap, "gqa_repeat_interleave": _gqa_repeat_interleave,
           "bf16_fp32_softmax": _bf16_fp32_softmax, "t5_bias": _t5_bias,
           "where_lifted_ninf": _where_lifted_ninf, "where_lifted_finfo": _where_lifted_finfo}
    if kind not in fns:
        raise ValueError(f"expected one of {HANDWRITTEN}, got {kind!r}")
    rtol = RTOL[torch.float32]
    if kind == "bmm3d":
        args = tuple(x.reshape(B * HEADS, S, HEAD_DIM) for x in qkv())
    elif kind == "gqa_repeat_interleave":
        args = qkv(HEADS, KV_HEADS)
    elif kind == "bf16_fp32_softmax":
        args = qkv(dtype=torch.bfloat16)
        rtol = RTOL[torch.bfloat16]
    elif kind == "t5_bias":
        args = (*qkv(), torch.randn(1, HEADS, S, S))
    else:
        args = qkv()
    return Case(Fn(fns[kind], kind).eval(), Inputs(args), expect(1, rtol=rtol))


# ----------------------------------------------------------------------------------------------
# Negative cases: softmaxes that must not be rewritten
# ----------------------------------------------------------------------------------------------

def _softmax_other_dim(q, k, v):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return s.softmax(dim=-2) @ v


def _probs_returned(q, k, v):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    p = s.softmax(dim=-1)
    return p @ v, p


def _no_pv_matmul(q, k, v):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    p = s.softmax(dim=-1)
    return p.amax(dim=-1, keepdim=True) * v


def _cumsum_scores(q, k, v):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    s = s.cumsum(dim=-1)  # not elementwise along the keys: no kernel computes this
    return s.softmax(dim=-1) @ v


def _two_finite_fills(q, k, v):
    # two different finite fills (-1e9 above the diagonal, then -1e4 on the first key): the op's fill mode gives
    # every masked score one value, and neither fill is provably -inf masking (nothing bounds the scores)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    s = s.masked_fill(~_causal_keep(q.shape[-2]), -1e9)
    first = torch.zeros(q.shape[-2], k.shape[-2], dtype=torch.bool)
    first[:, 0] = True
    s = s.masked_fill(first, -1e4)
    return s.softmax(dim=-1) @ v


NEGATIVES = ("softmax_other_dim", "probs_returned", "no_pv_matmul", "cumsum_scores", "two_finite_fills")


def negative(kind: str, seed: int = 0) -> Case:
    """A softmax that looks like attention but must stay unfused, with the reason it must give."""
    torch.manual_seed(seed)
    table = {"softmax_other_dim": (_softmax_other_dim, ""), "probs_returned": (_probs_returned, PROBS_USED),
             "no_pv_matmul": (_no_pv_matmul, ""), "cumsum_scores": (_cumsum_scores, ""),
             "two_finite_fills": (_two_finite_fills, "2 different finite values")}
    if kind not in table:
        raise ValueError(f"expected one of {NEGATIVES}, got {kind!r}")
    fn, reason = table[kind]
    return Case(Fn(fn, kind).eval(), Inputs(qkv()), expect_refused(reason))


# ----------------------------------------------------------------------------------------------
# Dynamic shapes
# ----------------------------------------------------------------------------------------------

DYNAMIC_LENGTHS = (17, 24, 37)


def dynamic_inputs(kind: str, t: int) -> Inputs:
    """Inputs of sequence length `t` for the dynamic-shape cases ("nanogpt_manual", "nanogpt_flash", "mul")."""
    if kind.startswith("nanogpt"):
        return Inputs((torch.randn(B, t, HIDDEN),))
    return Inputs(qkv(t=t))


def dynamic_case(kind: str) -> Case:
    if kind == "nanogpt_manual":
        return nanogpt(flash=False, t=DYNAMIC_LENGTHS[0])
    if kind == "nanogpt_flash":
        return nanogpt(flash=True, t=DYNAMIC_LENGTHS[0])
    if kind == "mul":
        return Case(Fn(_mul, "mul").eval(), dynamic_inputs(kind, DYNAMIC_LENGTHS[0]), expect(1))
    raise ValueError(f"expected nanogpt_manual, nanogpt_flash or mul, got {kind!r}")
