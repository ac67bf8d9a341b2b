"""Hugging Face transformers without torch.compile: `attn_implementation="attnlower"` matches eager
attention (causal, padding, GQA, sliding window, softcap), and `PagedCache` decodes through
`paged_attention` with blocks taken as sequences grow, giving eager's tokens. Tiny random models on CPU,
as transformers' own model tests build them."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnlower  # noqa: E402
from attnlower.integrations import hf  # noqa: E402

# transformers 5.24 prefers generate(cache=...); 5.17 (the GPU machine) knows only past_key_values
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

VOCAB, T, B = 96, 24, 2
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
              bos_token_id=2)


def _configs():
    out = {"llama": transformers.LlamaConfig(**COMMON),
           "mistral": transformers.MistralConfig(sliding_window=7, **COMMON)}
    if hasattr(transformers, "Gemma2Config"):   # softcap + alternating sliding layers + query_pre_attn_scalar
        out["gemma2"] = transformers.Gemma2Config(sliding_window=6, attn_logit_softcapping=5.0,
                                                  query_pre_attn_scalar=12, final_logit_softcapping=None, **COMMON)
    return out


CONFIGS = _configs()
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each tiny random model saved once, loaded per implementation through from_pretrained."""
    paths = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = getattr(transformers, CLASSES[name])(cfg)
        paths[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(paths[name])
    return paths


def _load(checkpoints, name, impl):
    cls = getattr(transformers, CLASSES[name])
    return cls.from_pretrained(checkpoints[name], attn_implementation=impl, dtype=torch.float32).eval()


def _inputs(pad: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        mask[0, :5] = 0    # left padding, as generate() batches prompts
        ids[0, :5] = 0
    return ids, mask


def test_import_attnlower_registers_lazily():
    code = ("import sys, attnlower\n"
            "assert 'transformers' not in sys.modules and 'triton' not in sys.modules, 'imported too early'\n"
            "assert 'attnlower.lowering.ops' not in sys.modules\n"
            "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
            "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
            "assert ALL_ATTENTION_FUNCTIONS['attnlower'].__module__ == 'attnlower.integrations.hf'\n"
            "assert 'attnlower' in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping\n"
            "assert 'attnlower.lowering.ops' not in sys.modules   # nor did registering load the ops\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_eager(checkpoints, name, pad):
    ids, mask = _inputs(pad)
    eager = _load(checkpoints, name, "eager")
    ours = _load(checkpoints, name, "attnlower")
    assert ours.config._attn_implementation == "attnlower"
    calls = []
    real = attnlower.ops.flash_attention, attnlower.ops.sliding_window_attention
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask).logits
        attnlower.ops.flash_attention = lambda *a, **k: calls.append("flash") or real[0](*a, **k)
        attnlower.ops.sliding_window_attention = lambda *a, **k: calls.append("sliding") or real[1](*a, **k)
        try:
            out = ours(input_ids=ids, attention_mask=mask).logits
        finally:
            attnlower.ops.flash_attention, attnlower.ops.sliding_window_attention = real
    assert len(calls) == COMMON["num_hidden_layers"], calls   # every layer went through attnlower's ops
    keep = mask.bool()    # padded query rows are not compared (eager averages them, SDPA zeroes them)
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-4)


def test_backward_matches_eager(checkpoints):
    ids, mask = _inputs(pad=True)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 5] = -100   # predicted from the last pad position, whose output eager and SDPA define differently
    grads = {}
    for impl in ("eager", "attnlower"):
        model = _load(checkpoints, "llama", impl).train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if "self_attn" in n}
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["attnlower"][n], g, rtol=1e-4, atol=1e-5, msg=n)



def _enable_checkpointing(model) -> None:
    """Gradient checkpointing the way the installed transformers spells it (5.25 renamed the method)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_gradient_checkpointing_matches_eager(checkpoints, name):
    """attn_implementation="attnlower" under HF gradient checkpointing (the backward recomputes each
    layer): loss and every gradient equal eager attention's, and attnlower's ops ran in the
    forward and again in the recomputation."""
    ids, mask = _inputs(pad=True)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 5] = -100   # predicted from the last pad position, whose output eager and SDPA define differently
    results = {}
    for impl in ("eager", "attnlower"):
        model = _load(checkpoints, name, impl).train()
        _enable_checkpointing(model)
        assert model.is_gradient_checkpointing
        calls = []
        real = attnlower.ops.flash_attention, attnlower.ops.sliding_window_attention
        attnlower.ops.flash_attention = lambda *a, **k: calls.append(1) or real[0](*a, **k)
        attnlower.ops.sliding_window_attention = lambda *a, **k: calls.append(1) or real[1](*a, **k)
        try:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
        finally:
            attnlower.ops.flash_attention, attnlower.ops.sliding_window_attention = real
        results[impl] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)
    (want_loss, want, eager_calls), (got_loss, got, our_calls) = results["eager"], results["attnlower"]
    layers = COMMON["num_hidden_layers"]
    assert eager_calls == 0 and our_calls == 2 * layers, our_calls   # forward + recomputation
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-5, msg=n)

@pytest.mark.parametrize("name", list(CONFIGS))
def test_paged_cache_generate_matches_eager(checkpoints, name, monkeypatch):
    ids, mask = _inputs(pad=False)
    prompt, new = 10, 12
    eager = _load(checkpoints, name, "eager")
    ours = _load(checkpoints, name, "attnlower")
    block = 4
    cache = hf.PagedCache(ours.config, num_blocks=64, block_size=block)
    paged_calls = []
    real = attnlower.ops.paged_attention
    monkeypatch.setattr(attnlower.ops, "paged_attention", lambda *a, **k: paged_calls.append(a[0].shape[2]) or real(*a, **k))
    kw = dict(max_new_tokens=new, do_sample=False, min_new_tokens=new)
    with torch.no_grad():
        ref = eager.generate(ids[:, :prompt], attention_mask=mask[:, :prompt], **kw)
        out = ours.generate(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache, **kw)
    assert torch.equal(out, ref), (out, ref)
    layers = COMMON["num_hidden_layers"]
    # prefill (Tq = prompt) then one-token decode steps, every layer through paged_attention
    assert paged_calls[:layers] == [prompt] * layers and set(paged_calls[layers:]) == {1}, paged_calls
    length = prompt + new - 1      # the last token is sampled, never fed back
    layer = cache.layers[0]
    assert cache.get_seq_length() == length
    per_seq = -(-length // block)
    assert [len(layer.pool.blocks_of(s)) for s in layer.seq_ids] == [per_seq] * B
    assert layer.pool.num_free_blocks == 64 - B * per_seq


@pytest.mark.parametrize("name", list(CONFIGS))
def test_paged_cache_beam_search_matches_eager(checkpoints, name, monkeypatch):
    """generate(num_beams=3) reorders the cache's rows every step (reorder_cache): each row a pool sequence, a
    beam taken twice copied into blocks of its own. The tokens are eager beam search's, and no block leaks."""
    ids, mask = _inputs(pad=False)
    prompt, new, beams, block = 8, 6, 3, 4
    eager = _load(checkpoints, name, "eager")
    ours = _load(checkpoints, name, "attnlower")
    cache = hf.PagedCache(ours.config, num_blocks=64, block_size=block)
    reorders = []
    real = hf.PagedCache.reorder_cache
    monkeypatch.setattr(hf.PagedCache, "reorder_cache",
                        lambda self, idx: reorders.append(idx.tolist()) or real(self, idx))
    kw = dict(max_new_tokens=new, min_new_tokens=new, num_beams=beams, num_return_sequences=beams, do_sample=False)
    with torch.no_grad():
        want = eager.generate(ids[:, :prompt], attention_mask=mask[:, :prompt], **kw)
        got = ours.generate(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache, **kw)
    assert torch.equal(got, want), (got, want)
    assert reorders and any(len(set(r)) < len(r) for r in reorders), reorders   # some beam was taken twice
    length = cache.get_seq_length()
    per_seq = -(-length // block)
    for layer in cache.layers:
        assert len(layer.seq_ids) == B * beams and layer.pool.num_free_blocks == 64 - B * beams * per_seq


def test_paged_cache_assisted_decoding_crops_and_matches_greedy(checkpoints, monkeypatch):
    """Assisted decoding crops the rejected candidates off the cache each step (crop(-n)); the tokens are plain
    greedy decoding's. The assistant is another random model, so most candidates are rejected."""
    ids, mask = _inputs(pad=False)
    prompt, new = 8, 10
    eager = _load(checkpoints, "llama", "eager")
    ours = _load(checkpoints, "llama", "attnlower")
    torch.manual_seed(1)
    assistant = transformers.LlamaForCausalLM(CONFIGS["llama"]).eval()
    crops = []
    real = hf.PagedLayer.crop
    monkeypatch.setattr(hf.PagedLayer, "crop", lambda self, n: crops.append(n) or real(self, n))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    with torch.no_grad():
        want = eager.generate(ids[:1, :prompt], attention_mask=mask[:1, :prompt], **kw)
        got = ours.generate(ids[:1, :prompt], attention_mask=mask[:1, :prompt], assistant_model=assistant,
                            past_key_values=hf.PagedCache(ours.config, num_blocks=16, block_size=4), **kw)
    assert torch.equal(got, want), (got, want)
    assert any(n < 0 for n in crops), crops


def test_paged_cache_row_operations_match_dynamic_cache(checkpoints):
    """batch_repeat_interleave, batch_select_indices (index and bool), reorder_cache and crop leave each row's K/V
    as transformers' DynamicCache has them after the same calls."""
    ids, _ = _inputs(pad=False)
    ours = _load(checkpoints, "llama", "attnlower")
    paged = hf.PagedCache(ours.config, num_blocks=64, block_size=4)
    dynamic = transformers.DynamicCache(config=ours.config)
    with torch.no_grad():
        ours(ids[:, :9], past_key_values=paged)
        ours(ids[:, :9], past_key_values=dynamic)

    def same():
        for p, d in zip(paged.layers, dynamic.layers):
            keys, values = p.pool.gather(p.seq_ids)
            torch.testing.assert_close(keys, d.keys, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(values, d.values, rtol=1e-5, atol=1e-6)

    same()
    for cache in (paged, dynamic):
        cache.batch_repeat_interleave(3)                     # 6 rows
    same()
    for cache in (paged, dynamic):
        cache.batch_select_indices(torch.tensor([5, 0, 2, 3]))
    same()
    for cache in (paged, dynamic):
        cache.reorder_cache(torch.tensor([1, 1, 1, 0]))      # row 0's sequence freed, row 1's forked twice
    same()
    for cache in (paged, dynamic):
        cache.batch_select_indices(torch.tensor([True, False, True, True]))
    same()
    for cache in (paged, dynamic):
        cache.crop(-4)
    same()
    assert paged.get_seq_length() == 5
    layer = paged.layers[0]
    assert layer.pool.num_free_blocks == 64 - 3 * 2 and len(set(layer.seq_ids)) == 3
    for cache in (paged, dynamic):
        cache.batch_select_indices(torch.tensor([-1, 0]))   # negative indices count from the end
    same()
    for cache in (paged, dynamic):
        cache.crop(-9)                                      # more than the rows hold: empty, as DynamicCache
    assert paged.get_seq_length() == dynamic.get_seq_length() == 0
    with pytest.raises(IndexError, match="row indices"):
        paged.reorder_cache(torch.tensor([0, 3]))
    with pytest.raises(IndexError, match=r"bool mask of shape \[2\]"):
        paged.batch_select_indices(torch.tensor([True, False, True]))
    paged.batch_select_indices(torch.tensor([False, False]))
    assert paged.get_seq_length() == 0 and layer.pool.num_free_blocks == 64   # no rows, every block back


def test_paged_cache_reorder_too_big_for_the_pool_is_a_clear_error(checkpoints):
    from attnlower.cache import CacheFullError

    ids, _ = _inputs(pad=False)
    ours = _load(checkpoints, "llama", "attnlower")
    paged = hf.PagedCache(ours.config, num_blocks=6, block_size=4)
    with torch.no_grad():
        ours(ids[:, :9], past_key_values=paged)              # 2 rows x 3 blocks: the pool is full
    before = [list(layer.seq_ids) for layer in paged.layers]
    with pytest.raises(CacheFullError, match=r"need 6 more blocks per layer, 0 are free.*batch \* num_beams"):
        paged.batch_repeat_interleave(2)
    assert [list(layer.seq_ids) for layer in paged.layers] == before


def test_paged_cache_refuses_padding_and_other_implementations(checkpoints):
    ids, mask = _inputs(pad=True)
    eager = _load(checkpoints, "llama", "eager")
    with pytest.raises(ValueError, match="attn_implementation='attnlower'"):
        hf.PagedCache(eager.config, num_blocks=16)
    ours = _load(checkpoints, "llama", "attnlower")
    with torch.no_grad(), pytest.raises(ValueError, match="padding"):
        ours.generate(ids, attention_mask=mask, past_key_values=hf.PagedCache(ours.config, num_blocks=64),
                      max_new_tokens=2, do_sample=False)


def test_cache_full_is_a_clear_error(checkpoints):
    from attnlower.cache import CacheFullError

    ids, _ = _inputs(pad=False)
    ours = _load(checkpoints, "llama", "attnlower")
    # inside generate() nothing can be freed: the error gives the num_blocks to build (B=2 rows of 24 tokens)
    with torch.no_grad(), pytest.raises(CacheFullError, match=r"num_blocks >= batch .* e\.g\. num_blocks=12 for 24"):
        ours.generate(ids, past_key_values=hf.PagedCache(ours.config, num_blocks=3, block_size=4),
                      max_new_tokens=4, do_sample=False)


def _readme_block(heading: str) -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


@pytest.mark.skipif(tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 24),
                    reason="the README spells generate(cache=...), transformers >= 5.24")
def test_readme_hf_snippet_runs_as_written(checkpoints, recwarn):
    """The README's Hugging Face snippet, executed as written (a tiny local checkpoint as `name`): it
    decodes through paged_attention, gives eager's tokens, and warns about nothing deprecated."""
    code = _readme_block("### Hugging Face models without torch.compile")
    ids, _ = _inputs(pad=False)
    scope = {"name": str(checkpoints["llama"]), "input_ids": ids[:, :10]}
    calls = []
    real = attnlower.ops.paged_attention
    attnlower.ops.paged_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            exec(compile(code, "README.md", "exec"), scope)
    finally:
        attnlower.ops.paged_attention = real
    deprecated = [str(w.message) for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))
                  and "transformers" in str(w.filename)]
    assert not deprecated, deprecated
    assert calls, "the README snippet did not decode through paged_attention"
    eager = _load(checkpoints, "llama", "eager")
    with torch.no_grad():
        want = eager.generate(ids[:, :10], max_new_tokens=64, do_sample=False)
    assert torch.equal(scope["out"], want)


class _Module(torch.nn.Module):
    is_causal = True


def _eager(q, k, v, keep, scale, bias=None):
    """softmax(scale q kᵀ + bias, masked by keep) v, with K/V repeated to the query heads (HF's repeat_kv)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = scale * q @ k.transpose(-2, -1) + (0 if bias is None else bias)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def test_no_mask_with_a_window_runs_the_sliding_op(monkeypatch):
    """Where HF hands over no mask, a sliding_window kwarg (Mistral) means the band, as HF's flash path reads it."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 11, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    used = []
    real = attnlower.ops.sliding_window_attention
    monkeypatch.setattr(attnlower.ops, "sliding_window_attention", lambda *a, **kw: used.append(a[3]) or real(*a, **kw))
    out, weights = hf.attention_forward(_Module(), q, k, v, None, scaling=0.3, sliding_window=4)
    i = torch.arange(11)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 4)
    torch.testing.assert_close(out, _eager(q, k, v, band, 0.3).transpose(1, 2))
    assert used == [4] and weights is None


def test_position_bias_joins_the_mask():
    """T5-style: a learned [1, H, Tq, Tk] bias added to the scores, a bool keep-mask on top."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    bias = torch.randn(1, 4, 7, 7)
    keep = torch.rand(2, 1, 7, 7) > 0.3
    keep[..., 0] = True
    module = _Module()
    module.is_causal = False
    out, _ = hf.attention_forward(module, q, k, v, keep, scaling=1.0, position_bias=bias)
    torch.testing.assert_close(out, _eager(q, k, v, keep, 1.0, bias).transpose(1, 2))


def test_attention_sinks_are_passed_as_the_ops_sinks(monkeypatch):
    """s_aux becomes the ops' `sinks`, never dropped (GPT-OSS end to end: tests/test_modern_attention_sinks.py)."""
    passed = []
    real = attnlower.ops.flash_attention
    monkeypatch.setattr(attnlower.ops, "flash_attention", lambda *a, **kw: passed.append(kw.get("sinks")) or real(*a, **kw))
    q, sinks = torch.randn(1, 2, 3, 8), torch.zeros(2)
    hf.attention_forward(_Module(), q, q, q, None, s_aux=sinks)
    assert len(passed) == 1 and passed[0] is sinks


def test_packed_rows_build_no_mask_and_pass_documents():
    """Where HF's flash path builds no mask (no padding mask, Tq == Tk from position 0) the mask builder builds none,
    and the attention function splits the row into documents at the restarts of its position_ids; anything else
    gets sdpa's mask."""
    calls = []
    build = hf.mask_builder(lambda **kw: calls.append(kw) or "sdpa mask")
    assert build(batch_size=1, q_length=5, kv_length=5) is None and not calls
    assert build(batch_size=1, q_length=1, kv_length=5, q_offset=4) == "sdpa mask" and calls
    doc_ids = hf._documents({"position_ids": torch.tensor([[0, 1, 0, 1, 2]])}, 5)
    assert doc_ids is not None and doc_ids.tolist() == [[0, 0, 1, 1, 1]], doc_ids
