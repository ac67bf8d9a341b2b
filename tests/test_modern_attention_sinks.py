"""Issue 21, part 2: attention sinks (GPT-OSS; StreamingLLM-style): a logit per head that joins the
softmax denominator and contributes no value.

Compiled with `backend="attnlower"` (strict) == eager, forward and gradients (the sinks' too), and the
report shows the attnlower op carrying the sinks (`Site.spec["sinks"]`), with the sliding window of
GPT-OSS's alternating layers kept (`sliding_window_attention`). Spellings: HF GPT-OSS eager (concat a
sink column, subtract the row max, softmax, slice the column off), the same hand-written, openai/gpt-oss's
torch reference (einsum, no batch dim, in-place mask add), the log-sum-exp form, and the sink applied
after the attention through its lse (GPT-OSS has no sdpa path in transformers 5.25, `_supports_sdpa =
False`, so HF is eager only). Negatives that must stay unfused. `attn_implementation="attnlower"`
with `s_aux`, dense and through the paged cache. Interface: docs/design/issue21.md.
"""
from __future__ import annotations

import pytest
import torch

import spellings_issue21 as S

B, HQ, HKV, T, D = 2, 4, 2, 37, 16


def _inputs(hkv=HKV, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, T, D, generator=g)
    k, v = torch.randn(B, hkv, T, D, generator=g), torch.randn(B, hkv, T, D, generator=g)
    sinks = torch.randn(HQ, generator=g) * 2
    return [x.requires_grad_(requires_grad) for x in (q, k, v, sinks)]


def _with_sinks(site, op: str, window: int = 0):
    assert site.op == op, f"expected {op}, got {site.op or 'unfused'}: {site.reason}"
    assert site.spec.get("sinks") is True, f"the spec does not carry the sinks: {site.spec}"
    assert site.spec["window"] == window and site.spec["bias_kind"] == "none", site.spec


@pytest.mark.parametrize("window", [0, 5], ids=["full", "window5"])
@pytest.mark.parametrize("inner", S.INNERS)
def test_hf_style_sinks(window, inner):
    q, k, v, sinks = _inputs()
    reports = S.check_compiled_matches_eager(S.sinks_hf_style(window), q, k, v, sinks, inner=inner,
                                             grad_of=dict(q=q, k=k, v=v, sinks=sinks))
    (site,) = S.fused_sites(reports, {"flash_attention", "sliding_window_attention"}, 1)
    _with_sinks(site, "sliding_window_attention" if window else "flash_attention", window)
    assert site.spec["causal"], site.spec


@pytest.mark.parametrize("window", [0, 6], ids=["full", "window6"])
def test_openai_reference_sinks(window):
    """openai/gpt-oss's reference: q [T, Hkv, q_mult, D], einsum 'qhmd,khmd->hmqk', sinks [Hkv * q_mult]."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, HKV, HQ // HKV, D, generator=g).requires_grad_()
    k, v = (torch.randn(T, HKV, D, generator=g).requires_grad_() for _ in range(2))
    sinks = (torch.randn(HQ, generator=g) * 2).requires_grad_()
    reports = S.check_compiled_matches_eager(S.sinks_openai_reference(window), q, k, v, sinks, 0.25,
                                             grad_of=dict(q=q, k=k, v=v, sinks=sinks))
    (site,) = S.fused_sites(reports, {"flash_attention", "sliding_window_attention"}, 1)
    _with_sinks(site, "sliding_window_attention" if window else "flash_attention", window)


def test_lse_form_sinks():
    q, k, v, sinks = _inputs(hkv=HQ)
    reports = S.check_compiled_matches_eager(S.sinks_lse_form, q, k, v, sinks, grad_of=dict(q=q, k=k, v=v, sinks=sinks))
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _with_sinks(site, "flash_attention")
    assert site.spec["causal"], site.spec


def test_rescale_form_sinks():
    """out = softmax(s) v * exp(lse - logaddexp(lse, sink)): the epilogue folds into the op's sinks."""
    q, k, v, sinks = _inputs(hkv=HQ)
    reports = S.check_compiled_matches_eager(S.sinks_rescale_form, q, k, v, sinks,
                                             grad_of=dict(q=q, k=k, v=v, sinks=sinks))
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _with_sinks(site, "flash_attention")


# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-OSS (layer 0 sliding window 5, layer 1 full; 4 query heads on 2 KV heads)

def _gpt_oss_inputs(pad: bool = False):
    g = torch.Generator().manual_seed(1)
    kwargs = dict(input_ids=torch.randint(3, 96, (B, 29), generator=g), use_cache=False)
    if pad:
        mask = torch.ones(B, 29, dtype=torch.long)
        mask[0, :5] = 0
        kwargs["attention_mask"] = mask
    return kwargs


@pytest.mark.parametrize("inner", S.INNERS)
def test_hf_gpt_oss(inner):
    model = S.gpt_oss("eager")
    reports = S.check_compiled_matches_eager(lambda **kw: model(**kw).logits, inner=inner, **_gpt_oss_inputs())
    sliding, full = S.fused_sites(reports, {"flash_attention", "sliding_window_attention"}, 2, where=S.in_attention)
    _with_sinks(sliding, "sliding_window_attention", 5)
    _with_sinks(full, "flash_attention")
    # the MoE router's softmax is not attention: seen, left alone, with a reason
    others = [s for s in S.all_sites(reports) if not S.in_attention(s)]
    assert all(s.op is None and s.reason for s in others), [(s.location, s.op, s.reason) for s in others]


def test_hf_gpt_oss_backward():
    """Training: the gradients of every attention weight, the learned sinks included."""
    model = S.gpt_oss("eager").train()
    params = {n: p for n, p in model.named_parameters() if "self_attn" in n}
    assert any(n.endswith("sinks") for n in params)
    reports = S.check_compiled_matches_eager(lambda **kw: model(**kw).logits, grad_of=params, **_gpt_oss_inputs())
    for site in S.fused_sites(reports, {"flash_attention", "sliding_window_attention"}, 2, where=S.in_attention):
        assert site.spec.get("sinks") is True, site.spec


def test_hf_gpt_oss_padded():
    """Left padding: the eager mask (finfo.min) joins the sinks; the sink keeps padded rows finite."""
    model = S.gpt_oss("eager")
    reports = S.check_compiled_matches_eager(lambda **kw: model(**kw).logits, **_gpt_oss_inputs(pad=True))
    for site in S.fused_sites(reports, {"flash_attention", "sliding_window_attention"}, 2, where=S.in_attention):
        assert site.spec.get("sinks") is True, site.spec


# ----------------------------------------------------------------------------------------------
# attn_implementation="attnlower" with s_aux

@pytest.fixture(scope="module")
def gpt_oss_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss")
    S.gpt_oss("eager").save_pretrained(path)
    return path


def _load(path, impl):
    import transformers

    return transformers.GptOssForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32)


@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "leftpad"])
def test_attn_implementation_attnlower_s_aux(gpt_oss_checkpoint, monkeypatch, pad):
    """GPT-OSS through `attn_implementation="attnlower"`: every layer's op gets the module's sinks
    (s_aux) as `sinks=`, the windowed layer its window; logits, loss and every gradient (sinks
    included) equal eager's."""
    kwargs = _gpt_oss_inputs(pad)
    labels = kwargs["input_ids"].clone()
    if pad:
        labels = labels.masked_fill(kwargs["attention_mask"] == 0, -100)
        labels[0, 5] = -100   # predicted from the last pad position, which eager and SDPA define differently
    results = {}
    for impl in ("eager", "attnlower"):
        model = _load(gpt_oss_checkpoint, impl).train()
        calls = S.record_calls(monkeypatch, "flash_attention", "sliding_window_attention") if impl == "attnlower" else []
        out = model(**kwargs, labels=labels)
        out.loss.backward()
        results[impl] = (out.logits.detach(), out.loss.detach(),
                         {n: p.grad for n, p in model.named_parameters() if "self_attn" in n})
        if impl == "attnlower":
            assert len(calls) == 2, [c[0] for c in calls]
            for layer, (name, args, kw) in zip(model.model.layers, calls):
                got = kw.get("sinks")
                assert got is not None and torch.equal(got.detach().float(), layer.self_attn.sinks.detach().float()), (
                    f"{name} did not get the module's sinks (s_aux): {kw}")
    keep = kwargs.get("attention_mask", torch.ones(B, 29)).bool()
    torch.testing.assert_close(results["attnlower"][0][keep], results["eager"][0][keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results["attnlower"][1], results["eager"][1], rtol=1e-5, atol=1e-6)
    for name, want in results["eager"][2].items():
        torch.testing.assert_close(results["attnlower"][2][name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_paged_cache_generate_with_sinks(gpt_oss_checkpoint, monkeypatch):
    """Decoding GPT-OSS from attnlower's PagedCache: paged_attention gets the sinks (and the window of
    the sliding layer) and generate() gives eager's tokens."""
    from attnlower.integrations import hf

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 96, (B, 10), generator=g)
    eager, ours = _load(gpt_oss_checkpoint, "eager").eval(), _load(gpt_oss_checkpoint, "attnlower").eval()
    calls = S.record_calls(monkeypatch, "paged_attention")
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = eager.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        got = ours.generate(ids, attention_mask=torch.ones_like(ids),
                            past_key_values=hf.PagedCache(ours.config, num_blocks=64, block_size=4), **kw)
    assert torch.equal(got, want), (got, want)
    assert calls and all(c[2].get("sinks") is not None for c in calls), "paged_attention ran without sinks"
    assert {c[2].get("window", 0) for c in calls} == {0, 5}, {c[2].get("window") for c in calls}


# ----------------------------------------------------------------------------------------------
# negatives: concatenated columns that are not sinks

def test_query_dependent_column_is_not_a_sink():
    q, k, v, _ = _inputs(hkv=HQ, requires_grad=False)
    k_null = torch.randn(B, HQ, 1, D)
    want = S.null_key_column(q, k, v, k_null)
    got, reports = S.compile_and_run(S.null_key_column, q, k, v, k_null)
    S.assert_close(got, want, S.RTOL[torch.float32])
    S.refused_sites(reports, r"(?i)sink|column|cat")


def test_dropping_another_column_is_not_a_sink():
    q, k, v, sinks = _inputs(hkv=HQ, requires_grad=False)
    want = S.sink_column_first_dropped_wrong(q, k, v, sinks)
    got, reports = S.compile_and_run(S.sink_column_first_dropped_wrong, q, k, v, sinks)
    S.assert_close(got, want, S.RTOL[torch.float32])
    S.refused_sites(reports, r"(?i)sink|column|cat|slice")
