"""Shared by the issue-21 suites (value head dim != query/key head dim, attention sinks, packed
sequences): the attention spellings real projects use, tiny random Hugging Face models, a float64
oracle, and the compile / compare helpers.

The tests are written against the interface proposed in docs/design/issue21.md:

    attnlower.ops.flash_attention(q, k, v, bias=None, *, ..., sinks=None, doc_ids=None)
    attnlower.ops.sliding_window_attention(q, k, v, window, bias=None, *, ..., sinks=None, doc_ids=None)
    attnlower.ops.paged_attention(q, k_cache, v_cache, block_table, seq_lens, *, ..., sinks=None)

- `v` / `v_cache` may have a head dim `Dv` different from q/k's `Dqk`; `out` is `[..., Dv]`.
- `sinks`: float `[Hq]`, one logit per query head that joins the softmax denominator and adds no value.
- `doc_ids`: int32 / int64 `[B|1, Tk]`; query `i` (key position `i + off`) sees key `j` only when
  `doc_ids[b, i + off] == doc_ids[b, j]` (on top of causal / window / bias).
- the report: `Site.spec["v_head_dim"]`, `Site.spec["sinks"]`, `Site.spec["documents"]`, and
  `"document"` in `Site.mask` for a mask proven causal-within-documents.

Nothing is downloaded: every HF model is built from a tiny config with random weights.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnlower
import models as M

RTOL = M.RTOL                     # compiled vs eager: max |c - e| / max |e|, per dtype
GRAD_RTOL = 1e-4                  # gradients, fp32 (tests/test_spellings.py's bound)
# op vs the float64 oracle: (atol, rtol) per dtype, forward and backward (tests/lowering/test_flash_kernel.py)
OP_TOL = {
    torch.float32: ((2e-5, 1e-5), (5e-5, 1e-5)),
    torch.float16: ((5e-3, 1e-2), (2e-2, 2e-2)),
    torch.bfloat16: ((2e-2, 2e-2), (8e-2, 5e-2)),
}
INNERS = ("eager", "inductor")


# ----------------------------------------------------------------------------------------------
# the float64 oracle (independent of attnlower/lowering/reference.py)

def oracle(q, k, v, *, scale=None, softcap=0.0, causal=False, bottom_right=False, window=0, bias=None,
           sinks=None, doc_ids=None, empty_rows_nan=False):
    """Full-matrix float64 attention with every issue-21 rule spelled out; returns (out, lse).

    q [B, Hq, Tq, Dqk], k [B, Hkv, Tk, Dqk], v [B, Hkv, Tk, Dv] (GQA by repeating K/V).
    Scores scale * q.k, then softcap * tanh(. / softcap) when softcap > 0.
    Query i sits at key position i + off (off = Tk - Tq with bottom_right). Visible: the bias (bool
    keep or float added), causal (j <= i + off), window (j > i + off - window), documents
    (doc_ids[b, i + off] == doc_ids[b, j]). sinks [Hq]: an extra logit per head in the denominator
    (never scaled, never masked), contributing no value; lse includes it. A row with no visible key
    and no sink gives 0 (NaN with empty_rows_nan) and lse -inf. Differentiable in q, k, v, sinks, bias.
    """
    q, k, v = q.double(), k.double(), v.double()
    batch, q_heads, tq, head_dim = q.shape
    group = q_heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    tk = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    s = scale * (q @ k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    off = tk - tq if bottom_right else 0
    i = torch.arange(tq, device=q.device).view(-1, 1) + off
    j = torch.arange(tk, device=q.device).view(1, -1)
    visible = torch.ones(batch, q_heads, tq, tk, dtype=torch.bool, device=q.device)
    if bias is not None and bias.dtype == torch.bool:
        visible = visible & bias
    elif bias is not None:
        s = s + bias.double()
    if causal or window:
        visible = visible & (j <= i)
    if window:
        visible = visible & (j > i - window)
    if doc_ids is not None:
        docs = doc_ids.long().expand(batch, tk)
        q_docs = docs[:, off:off + tq]
        visible = visible & (q_docs[:, None, :, None] == docs[:, None, None, :])
    visible = visible & (s != -math.inf)
    s = torch.where(visible, s, -1e300)   # finite: autograd through masked entries stays NaN-free
    if sinks is not None:
        column = sinks.double().view(1, q_heads, 1, 1).expand(batch, q_heads, tq, 1)
        s = torch.cat([s, column], dim=-1)
        visible = torch.cat([visible, torch.ones_like(visible[..., :1])], dim=-1)
    has_any = visible.any(-1, keepdim=True)
    p = torch.where(visible & has_any, torch.softmax(s, -1), 0.0)
    lse = torch.where(has_any, torch.logsumexp(s, -1, keepdim=True), -math.inf).squeeze(-1)
    if sinks is not None:
        p = p[..., :-1]
    out = p @ v
    if empty_rows_nan:
        out = torch.where(has_any, out, math.nan)
    return out, lse


def assert_op_close(got: torch.Tensor, want: torch.Tensor, dtype, what: str, backward: bool = False):
    """`got` (the op's, in its dtype) equals the float64 oracle's within OP_TOL[dtype]."""
    atol, rtol = OP_TOL[dtype][1 if backward else 0]
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------
# documents: lengths -> ids / positions / offsets

def doc_ids_from_lengths(rows: list[list[int]]) -> torch.Tensor:
    """int32 [B, T]: token t of row b belongs to document doc_ids[b, t] (0, 1, 2, ... per row)."""
    out = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]
    return torch.stack(out).to(torch.int32)


def position_ids_from_lengths(rows: list[list[int]]) -> torch.Tensor:
    """int64 [B, T]: positions restarting at 0 at each document (HF's DataCollatorWithFlattening)."""
    return torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])


def cu_seqlens_from_lengths(lengths: list[int]) -> torch.Tensor:
    """int32 [n_docs + 1]: document offsets as flash-attn's varlen API takes them."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# compile, run, compare

def compile_and_run(fn: Callable, *args, inner: str = "eager", dynamic=None, **kwargs):
    """Compile `fn` with attnlower (strict) through `attnlower.inspect`, run it once: (result, reports).
    The result is the compiled call's, so a backward through it runs the compiled backward."""
    torch._dynamo.reset()
    results = []

    def call(*a, **kw):
        out = fn(*a, **kw)
        results.append(out)
        return out

    reports = attnlower.inspect(call, *args, options={"inner": inner, "strict": True}, dynamic=dynamic, **kwargs)
    assert results, "attnlower.inspect did not run the compiled function"
    errors = [r.error for r in reports if r.error]
    assert not errors, f"passes failed: {errors}\n{tables(reports)}"
    return results[-1], reports


def tables(reports) -> str:
    return "\n".join(r.table() for r in reports) or "(no reports)"


def all_sites(reports) -> list:
    return [s for r in reports for s in r.sites]


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "output"):
    """compiled == eager: same shape and dtype, no NaN, max relative error below rtol."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs eager {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs eager {want.dtype}"
    assert not torch.isnan(want).any(), f"{what}: the eager reference has NaN (a broken case)"
    assert not torch.isnan(got).any(), f"{what}: compiled result has NaN where eager has none"
    err = max_rel_err(got, want)
    assert err < rtol, f"{what}: max relative error {err:.3g} >= {rtol:g}"


def assert_grads_close(got: dict, want: dict, rtol: float = GRAD_RTOL):
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name, w in want.items():
        if w is None:
            assert got[name] is None, f"grad of {name}: eager has none, compiled has one"
            continue
        assert got[name] is not None, f"grad of {name}: compiled gave no gradient"
        assert_close(got[name], w, rtol, what=f"grad of {name}")


def grads(output: torch.Tensor, tensors: dict[str, torch.Tensor], weight: torch.Tensor | None = None) -> dict:
    """d(sum(output * weight)) / d(each tensor), then the .grad fields are cleared."""
    if weight is None:
        g = torch.Generator().manual_seed(7)
        weight = torch.randn(output.shape, generator=g, dtype=output.dtype)
    (output * weight).sum().backward()
    out = {}
    for name, t in tensors.items():
        out[name] = None if t.grad is None else t.grad.clone()
        t.grad = None
    return out


def module_tensors(module: nn.Module, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter of `module` plus the named input tensors (for `grads`)."""
    return {**dict(module.named_parameters()), **inputs}


def check_compiled_matches_eager(fn: Callable, *args, inner: str = "eager", rtol: float = RTOL[torch.float32],
                                 grad_of: dict[str, torch.Tensor] | None = None, dynamic=None, **kwargs):
    """fn compiled == fn eager (forward and, with `grad_of`, the gradients of those tensors); returns the reports."""
    want = fn(*args, **kwargs)
    want_out = M.compared_tensors(want)[0]
    want_grads = grads(want_out, grad_of) if grad_of else None
    got, reports = compile_and_run(fn, *args, inner=inner, dynamic=dynamic, **kwargs)
    got_out = M.compared_tensors(got)[0]
    assert_close(got_out, want_out, rtol)
    if grad_of:
        assert_grads_close(grads(got_out, grad_of), want_grads)
    return reports


def fused_sites(reports, ops: set[str] | str, count: int, where: Callable = lambda s: True) -> list:
    """The sites `where` selects: exactly `count`, every one rewritten into one of `ops`. Returns them."""
    ops = {ops} if isinstance(ops, str) else set(ops)
    chosen = [s for s in all_sites(reports) if where(s)]
    assert len(chosen) == count, f"expected {count} attention site(s), found {len(chosen)}\n{tables(reports)}"
    for s in chosen:
        assert s.op in ops, (f"site {s.index} at {s.location}: expected one of {sorted(ops)}, got "
                             f"{s.op or 'unfused'} ({s.reason})\n{tables(reports)}")
        assert s.spec is not None, f"site {s.index} has no spec\n{tables(reports)}"
    return chosen


def refused_sites(reports, reason: str, where: Callable = lambda s: True) -> list:
    """Nothing `where` selects is rewritten; at least one such site was seen and refused with `reason`."""
    chosen = [s for s in all_sites(reports) if where(s)]
    assert chosen, f"no attention site seen at all\n{tables(reports)}"
    rewritten = [s for s in chosen if s.op is not None]
    assert not rewritten, f"must not be rewritten: {[(s.location, s.op, s.reason) for s in rewritten]}"
    assert any(re.search(reason, s.reason) for s in chosen), (
        f"no refusal reason matches {reason!r}: {[s.reason for s in chosen]}")
    return chosen


def in_attention(site) -> bool:
    """HF sites of the attention functions (GPT-OSS also has a router softmax, which is not attention)."""
    return "attention_forward" in site.location


# ----------------------------------------------------------------------------------------------
# 1. value head dim != query/key head dim (MLA)

class MLABlock(nn.Module):
    """A DeepSeek-style multi-head latent attention block, training form (the "naive" path of
    DeepSeek-V3's reference and HF's DeepseekV3Attention): per-head keys are a no-position part
    expanded from a low-rank latent plus one rotary part shared by every head, q/k head dim
    nope + rope, v head dim `v_dim`; causal; softmax in fp32."""

    def __init__(self, hidden=64, heads=4, kv_rank=32, nope=16, rope=8, v_dim=16):
        super().__init__()
        self.heads, self.nope, self.rope, self.v_dim, self.kv_rank = heads, nope, rope, v_dim, kv_rank
        self.q_proj = nn.Linear(hidden, heads * (nope + rope), bias=False)
        self.kv_a = nn.Linear(hidden, kv_rank + rope, bias=False)
        self.kv_norm = nn.LayerNorm(kv_rank)
        self.kv_b = nn.Linear(kv_rank, heads * (nope + v_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_dim, hidden, bias=False)
        self.scale = (nope + rope) ** -0.5

    @staticmethod
    def _rotate(x):
        t, d = x.shape[-2], x.shape[-1]
        freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
        angle = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * freq[None, :]
        cos, sin = torch.cat([angle.cos(), angle.cos()], -1), torch.cat([angle.sin(), angle.sin()], -1)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.nope, self.rope], dim=-1)
        latent, k_pe = torch.split(self.kv_a(x), [self.kv_rank, self.rope], dim=-1)
        k_pe = k_pe.view(b, 1, t, self.rope)
        q_pe, k_pe = self._rotate(q_pe), self._rotate(k_pe)
        kv = self.kv_b(self.kv_norm(latent)).view(b, t, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, self.heads, -1, -1)], dim=-1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.heads * self.v_dim)
        return self.o_proj(out)


def deepseek_reference_naive(q, k, v, scale):
    """DeepSeek-V3's reference inference code, "naive" attention: [B, S, H, D] tensors, scores laid
    out [b, s, h, t] by einsum, an additive triu(-inf) mask added in place, fp32 softmax."""
    s = q.shape[1]
    scores = torch.einsum("bshd,bthd->bsht", q, k) * scale
    mask = torch.full((s, s), float("-inf"), device=q.device).triu_(1)
    scores += mask.unsqueeze(1)
    scores = scores.softmax(dim=-1, dtype=torch.float32).type_as(q)
    return torch.einsum("bsht,bthd->bshd", scores, v)


def deepseek_reference_absorbed(q_latent, q_pe, kv_cache, pe_cache, scale):
    """DeepSeek-V3's reference "absorb" attention: queries already multiplied into the latent space
    (q_latent [B, S, H, R]), one latent cache shared by every head (kv_cache [B, T, R], pe_cache
    [B, T, P]: multi-query, no head dim). The score is the sum of two products (latent part + rotary
    part), so Dqk = R + P; the output is in the latent space, Dv = R."""
    scores = (torch.einsum("bshc,btc->bsht", q_latent, kv_cache)
              + torch.einsum("bshr,btr->bsht", q_pe, pe_cache)) * scale
    s, t = q_latent.shape[1], kv_cache.shape[1]
    mask = torch.full((s, t), float("-inf"), device=q_latent.device).triu_(t - s + 1)
    scores += mask.unsqueeze(1)
    scores = scores.softmax(dim=-1, dtype=torch.float32).type_as(q_latent)
    return torch.einsum("bsht,btc->bshc", scores, kv_cache)


def mla_paged_decode(kv_rank: int, scale: float):
    """Absorbed MLA decode over a paged latent cache, the vLLM / FlashMLA layout: one pool
    [num_blocks, 1, block, R + P] holding the latent and the rotary key side by side; keys are the
    whole row, values its first R dims (the same memory). Query [B, H, 1, R + P]."""
    from attnlower.cache import gather_blocks, length_mask

    def decode(q, latent_pool, block_table, seq_lens):
        kv = gather_blocks(latent_pool, block_table)                       # [B, 1, L, R + P]
        heads = q.shape[1]
        k = kv.expand(-1, heads, -1, -1)
        v = kv[..., :kv_rank].expand(-1, heads, -1, -1)
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        s = s.masked_fill(~length_mask(seq_lens, kv.shape[2]), float("-inf"))
        return torch.matmul(s.softmax(-1, dtype=torch.float32).to(q.dtype), v)

    return decode


def sdpa_value_dim(q, k, v):
    """SDPA takes a value head dim of its own (DeepSeek-V3's sdpa path)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def deepseek_v3_config(attn_impl: str):
    """Tiny DeepSeek-V3: q/k head dim 16 + 8 = 24, v head dim 16, kv_lora_rank 32, no MoE layer."""
    import transformers

    cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=2, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    cfg._attn_implementation = attn_impl
    return cfg


def deepseek_v3(attn_impl: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.DeepseekV3ForCausalLM(deepseek_v3_config(attn_impl)).eval()


# ----------------------------------------------------------------------------------------------
# 2. attention sinks

def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF's repeat_kv: [B, Hkv, T, D] -> [B, Hkv * n_rep, T, D] through expand + reshape."""
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def sinks_hf_style(window: int = 0):
    """HF GPT-OSS's eager attention: scores + additive mask, a sink column per head concatenated,
    the row max subtracted, softmax, the sink column sliced off, GQA by repeat_kv."""

    def attend(q, k, v, sinks):
        rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        t = q.shape[-2]
        scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        i = torch.arange(t, device=q.device)
        visible = i[None, :] <= i[:, None]
        if window:
            visible = visible & (i[None, :] > i[:, None] - window)
        mask = torch.zeros(t, t, dtype=q.dtype, device=q.device).masked_fill(~visible, torch.finfo(q.dtype).min)
        scores = scores + mask
        column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, t, -1)
        logits = torch.cat([scores, column], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
        return torch.matmul(probs.to(v.dtype), v)

    return attend


def sinks_openai_reference(window: int = 0):
    """openai/gpt-oss's torch reference `sdpa`: no batch dim, q [T, Hkv, q_mult, D], k / v [T, Hkv, D]
    expanded over q_mult, einsum scores [Hkv, q_mult, Tq, Tk] scaled and masked in place (triu -inf,
    plus tril -inf below the window), the sinks [Hkv * q_mult] concatenated, softmax, sliced off."""

    def attend(q, k, v, sinks, scale):
        n_tokens, n_heads, q_mult, _ = q.shape
        k = k[:, :, None, :].expand(-1, -1, q_mult, -1)
        v = v[:, :, None, :].expand(-1, -1, q_mult, -1)
        s = sinks.reshape(n_heads, q_mult, 1, 1).expand(-1, -1, n_tokens, -1)
        mask = torch.triu(q.new_full((n_tokens, n_tokens), -float("inf")), diagonal=1)
        if window > 0:
            mask += torch.tril(mask.new_full((n_tokens, n_tokens), -float("inf")), diagonal=-window)
        qk = torch.einsum("qhmd,khmd->hmqk", q, k)
        qk *= scale
        qk += mask[None, None, :, :]
        qk = torch.cat([qk, s], dim=-1)
        w = torch.softmax(qk, dim=-1)[..., :-1]
        attn = torch.einsum("hmqk,khmd->qhmd", w, v)
        return attn.reshape(n_tokens, -1)

    return attend


def sinks_lse_form(q, k, v, sinks):
    """The log-sum-exp form (sparse-attention references, StreamingLLM-style): the denominator is
    logaddexp(logsumexp over the keys, sink); probabilities exp(s - denominator); causal."""
    t = q.shape[-2]
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    denominator = torch.logaddexp(lse, sinks.view(1, -1, 1, 1))
    return torch.matmul(torch.exp(s - denominator), v)


def sinks_rescale_form(q, k, v, sinks):
    """The sink applied after the attention through its lse (vLLM / FlashMLA's attention-sink merge):
    out = softmax(s) v * exp(lse - logaddexp(lse, sink)); no mask, so no row is empty."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.softmax(s, dim=-1), v)
    weight = torch.exp(lse - torch.logaddexp(lse, sinks.view(1, -1, 1)))
    return out * weight.unsqueeze(-1)


def null_key_column(q, k, v, k_null):
    """Negative: the extra column is a *query-dependent* score (q . k_null, a "null key"), not a
    per-head constant; it must not become `sinks`."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    extra = torch.matmul(q, k_null.transpose(-1, -2)) * q.shape[-1] ** -0.5   # [B, H, T, 1]
    probs = torch.softmax(torch.cat([s, extra], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs, v)


def sink_column_first_dropped_wrong(q, k, v, sinks):
    """Negative: the sink column is appended last but the *first* column is dropped."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    probs = torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., 1:]
    return torch.matmul(probs, v)


def gpt_oss_config(attn_impl: str):
    """Tiny GPT-OSS: 2 layers (sliding window 5, then full), 4 query heads on 2 KV heads, head dim 16,
    a learned sink per head, 4 experts."""
    import transformers

    cfg = transformers.GptOssConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=5, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = attn_impl
    return cfg


def gpt_oss(attn_impl: str, seed: int = 0):
    """Tiny random GPT-OSS whose sinks are O(1) (HF initializes them with std 0.02: barely a sink)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(gpt_oss_config(attn_impl)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn_like(layer.self_attn.sinks) * 2)
    return model


# ----------------------------------------------------------------------------------------------
# 3. packed sequences

PACKED_LENGTHS = [[5, 9, 3, 12], [11, 1, 17]]        # two rows of 29 tokens, mixed lengths


def flex_document_causal(q, k, v, document_id):
    """FlexAttention's document-masking example spelled densely for SDPA: a 1-D document_id [T]
    shared by the batch, `document_id[q] == document_id[kv]` and `q >= kv`."""
    t = q.shape[-2]
    idx = torch.arange(t, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    document = document_id[:, None] == document_id[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal & document)


def restarting_positions(q, k, v, position_ids):
    """Hand-written: documents from position_ids that restart at 0 ([B, T]), a tril causal mask,
    masked_fill(-inf), manual softmax."""
    doc = (position_ids == 0).cumsum(-1)
    t = q.shape[-2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    same = doc[:, None, :, None] == doc[:, None, None, :]
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~(same & causal), float("-inf"))
    return torch.matmul(s.softmax(-1), v)


def cu_seqlens_offsets(q, k, v, cu_seqlens):
    """Documents given as flash-attn varlen offsets (cu_seqlens [n_docs + 1], one packed row shared
    by the batch), turned into ids on the device with bucketize; causal within each document."""
    t = q.shape[-2]
    pos = torch.arange(t, device=q.device)
    doc = torch.bucketize(pos, cu_seqlens[1:], right=True)
    mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def packed_encoder(q, k, v, doc_ids):
    """A packed bidirectional encoder (BERT-style packing): each token sees its whole document only."""
    same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same)


def packed_sliding(window: int):
    """Documents and a sliding window (Mistral trained on packed rows), hand-written band."""

    def attend(q, k, v, doc_ids):
        t = q.shape[-2]
        i = torch.arange(t, device=q.device)
        band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band & same)

    return attend


def cross_documents_only(q, k, v, doc_ids):
    """Negative: attend *across* documents (plus the diagonal): an inequality, not document mode."""
    t = q.shape[-2]
    other = doc_ids[:, None, :, None] != doc_ids[:, None, None, :]
    keep = other | torch.eye(t, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def packed_hf_batch(lengths=(5, 9, 3, 12), vocab: int = 96, seed: int = 1) -> dict[str, torch.Tensor]:
    """One packed row from transformers' DataCollatorWithFlattening: input_ids, labels, position_ids."""
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(seed)
    features = [{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in lengths]
    return DataCollatorWithFlattening()(features)


def hf_causal_lm(name: str, attn_impl: str, seed: int = 0):
    """Tiny Llama / Mistral (window 7) with GQA, for packed batches."""
    import transformers

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    cfg = (transformers.LlamaConfig(**common) if name == "llama"
           else transformers.MistralConfig(sliding_window=7, **common))
    cfg._attn_implementation = attn_impl
    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if name == "llama" else transformers.MistralForCausalLM
    return cls(cfg).eval()


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two id tensors [B, T] split every row into the same documents (labels may differ)."""
    a, b = a.long(), b.long()
    return torch.equal(a[:, :, None] == a[:, None, :], b[:, :, None] == b[:, None, :])


def record_calls(monkeypatch, *names: str) -> list[tuple[str, tuple, dict]]:
    """Record every call of `attnlower.ops.<name>` (then run it): [(name, args, kwargs)]."""
    calls: list[tuple[str, tuple, dict[str, Any]]] = []
    for name in names:
        real = getattr(attnlower.ops, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(attnlower.ops, name, wrapper)
    return calls
