"""Issue 21, part 1: a value head dim different from the query/key head dim (DeepSeek MLA: q/k 192 =
nope 128 + rope 64, v 128; the absorbed decode form: q/k kv_lora_rank + rope, v kv_lora_rank).

Compiled with `backend="attnlower"` (strict) == eager, forward and gradients, and the report shows the
attnlower op with both head dims (`Site.spec["head_dim"]` = Dqk, `Site.spec["v_head_dim"]` = Dv), not a
refusal. Spellings: a hand-written MLA block, SDPA, DeepSeek-V3's reference code (einsum over
[B, S, H, D], naive and absorbed), an absorbed decode over a paged latent cache, HF DeepSeek-V3
(eager and sdpa), and `attn_implementation="attnlower"` on DeepSeek-V3. Tiny sizes, CPU, nothing
downloaded. Interface: docs/design/issue21.md.
"""
from __future__ import annotations

import pytest
import torch

import spellings_issue21 as S

B, H, T = 2, 4, 37


def _value_dims(site, dqk: int, dv: int):
    assert site.spec.get("head_dim") == dqk and site.spec.get("v_head_dim") == dv, (
        f"expected the spec to carry head_dim={dqk} and v_head_dim={dv}, got {site.spec}")


@pytest.mark.parametrize("inner", S.INNERS)
def test_mla_block(inner):
    """The training form: q/k 16 + 8 = 24, v 16, causal (a triu mask), fp32 softmax; gradients of every weight."""
    torch.manual_seed(0)
    block = S.MLABlock().train()
    x = torch.randn(B, T, 64, requires_grad=True)
    reports = S.check_compiled_matches_eager(block, x, inner=inner, grad_of=S.module_tensors(block, x=x))
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _value_dims(site, 24, 16)
    assert site.spec["causal"] and site.spec["bias_kind"] == "none", site.spec


def test_sdpa_value_head_dim():
    q, k = torch.randn(B, H, T, 24, requires_grad=True), torch.randn(B, H, T, 24, requires_grad=True)
    v = torch.randn(B, H, T, 16, requires_grad=True)
    reports = S.check_compiled_matches_eager(S.sdpa_value_dim, q, k, v, grad_of=dict(q=q, k=k, v=v))
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _value_dims(site, 24, 16)


def test_deepseek_reference_naive():
    """DeepSeek-V3's reference: [B, S, H, D] tensors, einsum scores [b, s, h, t], `scores += mask`."""
    q, k = torch.randn(B, T, H, 24, requires_grad=True), torch.randn(B, T, H, 24, requires_grad=True)
    v = torch.randn(B, T, H, 16, requires_grad=True)
    reports = S.check_compiled_matches_eager(S.deepseek_reference_naive, q, k, v, 24 ** -0.5,
                                             grad_of=dict(q=q, k=k, v=v))
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _value_dims(site, 24, 16)
    assert site.spec["causal"], site.spec


@pytest.mark.parametrize("s,t", [(13, 13), (1, 37), (5, 37)], ids=["prefill", "decode", "chunk"])
def test_deepseek_reference_absorbed(s, t):
    """The absorbed form: two products summed (latent part over kv_cache [B, T, R], rotary part over
    pe_cache [B, T, P]), one latent head for all query heads; Dqk = R + P = 26, Dv = R = 20."""
    rank, rope = 20, 6
    q_latent, q_pe = torch.randn(B, s, H, rank), torch.randn(B, s, H, rope)
    kv_cache, pe_cache = torch.randn(B, t, rank), torch.randn(B, t, rope)
    reports = S.check_compiled_matches_eager(S.deepseek_reference_absorbed, q_latent, q_pe, kv_cache, pe_cache,
                                             (16 + rope) ** -0.5)
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _value_dims(site, rank + rope, rank)
    assert site.spec["kv_heads"] == 1 and site.spec["q_heads"] == H, site.spec


def test_mla_paged_decode():
    """Absorbed decode over a paged latent pool [num_blocks, 1, block, R + P]: keys the whole row,
    values its first R dims (the same memory) -> paged_attention reading the pool in place."""
    rank, rope, block, heads = 20, 6, 8, 8
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(24, 1, block, rank + rope, generator=g)
    table = torch.randperm(24, generator=g)[:15].view(3, 5).to(torch.int32)
    lens = torch.tensor([37, 9, 40], dtype=torch.int32)
    q = torch.randn(3, heads, 1, rank + rope, generator=g)
    reports = S.check_compiled_matches_eager(S.mla_paged_decode(rank, 22 ** -0.5), q, pool, table, lens)
    (site,) = S.fused_sites(reports, "paged_attention", 1)
    _value_dims(site, rank + rope, rank)
    assert site.spec["kv_heads"] == 1, site.spec


# ----------------------------------------------------------------------------------------------
# Hugging Face DeepSeek-V3 (q/k 16 + 8 = 24, v 16)

def _deepseek_inputs(mode: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (B, 29), generator=g)
    kwargs = dict(input_ids=ids, use_cache=False)
    if mode == "pad":
        mask = torch.ones(B, 29, dtype=torch.long)
        mask[0, :5] = 0
        kwargs["attention_mask"] = mask
    return kwargs


def _hf_cases():
    for impl in ("eager", "sdpa"):
        for mode in ("nomask", "pad"):
            yield pytest.param(impl, mode, "eager", id=f"{impl}-{mode}-eager")
    yield pytest.param("eager", "nomask", "inductor", id="eager-nomask-inductor")


@pytest.mark.parametrize("impl,mode,inner", list(_hf_cases()))
def test_hf_deepseek_v3(impl, mode, inner):
    model = S.deepseek_v3(impl)
    kwargs = _deepseek_inputs(mode)
    reports = S.check_compiled_matches_eager(lambda **kw: model(**kw).logits, inner=inner, **kwargs)
    sites = S.fused_sites(reports, "flash_attention", 2)
    for site in sites:
        _value_dims(site, 24, 16)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_deepseek_v3_backward(impl):
    """Training: gradients of every attention weight (q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj)."""
    model = S.deepseek_v3(impl).train()
    kwargs = _deepseek_inputs("nomask")
    params = {n: p for n, p in model.named_parameters() if "self_attn" in n}
    reports = S.check_compiled_matches_eager(lambda **kw: model(**kw).logits, grad_of=params, **kwargs)
    for site in S.fused_sites(reports, "flash_attention", 2):
        _value_dims(site, 24, 16)


def test_hf_deepseek_v3_attn_implementation_attnlower(tmp_path, monkeypatch):
    """`attn_implementation="attnlower"`: DeepSeek-V3's [B, H, T, 24] q/k and [B, H, T, 16] v go to
    flash_attention as they are (no padding of v), logits and gradients equal eager's."""
    S.deepseek_v3("eager").save_pretrained(tmp_path)
    import transformers

    results = {}
    for impl in ("eager", "attnlower"):
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation=impl,
                                                                   dtype=torch.float32).train()
        calls = S.record_calls(monkeypatch, "flash_attention") if impl == "attnlower" else []
        kwargs = _deepseek_inputs("pad")
        labels = kwargs["input_ids"].masked_fill(kwargs["attention_mask"] == 0, -100)
        labels[0, 5] = -100   # predicted from the last pad position, which eager and SDPA define differently
        out = model(**kwargs, labels=labels)
        out.loss.backward()
        results[impl] = out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if "self_attn" in n}
        if impl == "attnlower":
            assert len(calls) == 2, calls
            for _, args, _ in calls:
                assert args[1].shape[-1] == 24 and args[2].shape[-1] == 16, [a.shape for a in args[:3]]
    keep = kwargs["attention_mask"].bool()
    torch.testing.assert_close(results["attnlower"][0][keep], results["eager"][0][keep], rtol=1e-4, atol=1e-4)
    for name, want in results["eager"][1].items():
        torch.testing.assert_close(results["attnlower"][1][name], want, rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# negative

def test_value_head_dim_over_the_limit_is_refused():
    """Dv 272 > 256: no kernel keeps that accumulator; refused, and the reason names the limit."""
    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.2, dim=-1) @ v

    q, k, v = torch.randn(1, 2, 9, 24), torch.randn(1, 2, 9, 24), torch.randn(1, 2, 9, 272)
    want = fn(q, k, v)
    got, reports = S.compile_and_run(fn, q, k, v)
    S.assert_close(got, want, S.RTOL[torch.float32])
    S.refused_sites(reports, r"(?i)\b256\b")
