"""transformers' continuous batching (`model.generate_batch`, `init_continuous_batching`) with
attn_implementation="attnlower": greedy tokens equal to HF's own `sdpa` implementation on a mixed-length batch of
requests whose forwards mix chunked prefills and decodes, every layer reading HF's PagedAttentionCache in place
through `attnlower.ops.paged_attention` (the cache tensor's own storage, no `index_select` of it), a sliding-window
family (Mistral) and Gemma-2's alternating sliding / full layers with softcap. Tiny random models on CPU."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnlower  # noqa: E402
from attnlower.integrations import continuous_batching as cb  # noqa: E402
from attnlower.integrations import hf  # noqa: E402

if not cb.enable():
    pytest.skip(f"attnlower's continuous batching is written against transformers {cb.WRITTEN_AGAINST}",
                allow_module_level=True)

from transformers import ContinuousBatchingConfig, GenerationConfig  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
              bos_token_id=2)
# page_size 4 and 16 tokens per forward: prompts are cut into chunks, and a forward holds new prompts,
# continued chunks and decodes
CB_CONFIG = dict(page_size=4, num_blocks=96, max_batch_tokens=16)
PROMPT_LENGTHS = (3, 17, 9, 30, 1, 12, 5)


def _model(family: str):
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**COMMON), transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=7, **COMMON), transformers.MistralForCausalLM
    else:
        cfg = transformers.Gemma2Config(sliding_window=8, attn_logit_softcapping=5.0, query_pre_attn_scalar=12,
                                        final_logit_softcapping=None, **COMMON)
        cls = transformers.Gemma2ForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval()


def _prompts(lengths=PROMPT_LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


class _Spy:
    """What one generate_batch did: every forward's requests (new tokens, first position), the cache tensor,
    the pools paged_attention read and the index_select calls made on the cache."""

    def __init__(self, model, monkeypatch):
        self.forwards, self.tokens, self.caches, self.pools, self.cache_gathers = [], [], [], [], 0
        model.register_forward_pre_hook(self._forward, with_kwargs=True)
        real_paged, real_select = attnlower.ops.paged_attention, torch.index_select

        def paged(q, k_cache, v_cache, *args, **kwargs):
            self.pools.append((k_cache.untyped_storage().data_ptr(), v_cache.untyped_storage().data_ptr()))
            return real_paged(q, k_cache, v_cache, *args, **kwargs)

        def index_select(x, *args, **kwargs):
            if any(x.untyped_storage().data_ptr() == c.untyped_storage().data_ptr() for c in self.caches):
                self.cache_gathers += 1
            return real_select(x, *args, **kwargs)
        monkeypatch.setattr(attnlower.ops, "paged_attention", paged)
        monkeypatch.setattr(torch, "index_select", index_select)

    def _forward(self, module, args, kwargs):
        cu = kwargs["cu_seq_lens_q"].tolist()
        positions = kwargs["position_ids"][0].tolist()
        self.forwards.append([(b - a, positions[a]) for a, b in zip(cu, cu[1:]) if b > a])
        self.tokens.append(kwargs["input_ids"].shape[1])
        if all(kwargs["cache"].cache_tensor is not c for c in self.caches):
            self.caches.append(kwargs["cache"].cache_tensor)


def _generate(model, impl, prompts, max_new_tokens=10, spy=None, **config):
    model.set_attn_implementation(impl)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(prompts, generation_config=gen,
                               continuous_batching_config=ContinuousBatchingConfig(**{**CB_CONFIG, **config}))
    errors = {k: v.error for k, v in out.items() if v.error}
    assert not errors, errors
    return [v.generated_tokens for v in out.values()]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_batch_matches_sdpa_and_reads_the_cache_in_place(family, monkeypatch):
    model, prompts = _model(family), _prompts()
    want = _generate(model, "sdpa", prompts)
    spy = _Spy(model, monkeypatch)
    before = dict(cb.stats)
    got = _generate(model, "attnlower", prompts, spy=spy)
    assert got == want
    assert all(len(tokens) == 10 for tokens in got)
    # forwards mixed a continued prompt chunk (Tq > 1 after earlier tokens) with decodes (Tq = 1)
    mixed = [f for f in spy.forwards if any(n > 1 and start > 0 for n, start in f) and any(n == 1 for n, _ in f)]
    assert mixed, spy.forwards
    layers, (cache,) = COMMON["num_hidden_layers"], spy.caches
    assert len(spy.pools) == layers * len(spy.forwards)   # every layer of every forward through paged_attention
    in_place = [p for p in spy.pools if p == (cache.untyped_storage().data_ptr(),) * 2]
    copies, new_kv = (cb.stats[k] - before[k] for k in ("window_copies", "new_kv"))
    assert cb.stats["in_place"] - before["in_place"] == len(in_place)
    if family == "llama":
        assert len(in_place) == len(spy.pools) and copies == new_kv == 0 and spy.cache_gathers == 0
    else:   # prompt chunks longer than the 7-token window read a copy of the window (module docstring)
        assert copies > 0 and len(in_place) > 0 and len(in_place) + copies + new_kv == len(spy.pools)
        assert spy.cache_gathers == 2 * copies   # K and V of each copy; none for the other calls


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_batch_through_the_triton_kernels_matches_sdpa(family, monkeypatch):
    """The same through the paged Triton kernel (interpreted on CPU) instead of the reference."""
    from attnlower.lowering import launch_paged

    model, prompts = _model(family), _prompts((3, 17, 9, 5))
    want = _generate(model, "sdpa", prompts, max_new_tokens=6)
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    launches = []
    real = launch_paged.paged_forward
    monkeypatch.setattr(launch_paged, "paged_forward", lambda *a, **k: launches.append(1) or real(*a, **k))
    before = cb.stats["in_place"] + cb.stats["window_copies"] + cb.stats["new_kv"]
    assert _generate(model, "attnlower", prompts, max_new_tokens=6) == want
    assert len(launches) == cb.stats["in_place"] + cb.stats["window_copies"] + cb.stats["new_kv"] - before > 0


def test_sdpa_gathers_the_cache_that_attnlower_reads_in_place(monkeypatch):
    """The contrast the in-place claim rests on: HF's own sdpa path index_selects K and V out of the cache."""
    model = _model("llama")
    spy = _Spy(model, monkeypatch)
    _generate(model, "sdpa", _prompts())
    assert spy.cache_gathers > 0 and not spy.pools


def test_sliding_window_layers_read_the_ring_in_place_when_no_chunk_crosses_the_window(monkeypatch):
    """Short prompts, generation well past the 7-token window: the ring wraps during decoding, every call in place."""
    model, prompts = _model("mistral"), _prompts((3, 5, 2, 6, 4))
    want = _generate(model, "sdpa", prompts, max_new_tokens=14)
    spy = _Spy(model, monkeypatch)
    before = dict(cb.stats)
    assert _generate(model, "attnlower", prompts, max_new_tokens=14) == want
    assert cb.stats["window_copies"] == before["window_copies"] and cb.stats["new_kv"] == before["new_kv"]
    assert spy.cache_gathers == 0
    assert cb.stats["in_place"] - before["in_place"] == len(spy.pools) > 0


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_static_shapes_of_cuda_graphs_give_the_same_tokens(family, monkeypatch):
    """With CUDA graphs (or a compile config) transformers pads every batch to static shapes: the token count
    to a multiple of q_padding_interval_size, empty padding requests, max_length_k rounded up, max_length_q set
    to the token count. A compile config with Dynamo disabled makes it pad on CPU and run eagerly."""
    from transformers.generation.configuration_utils import CompileConfig

    model, prompts = _model(family), _prompts()
    want = _generate(model, "sdpa", prompts)
    spy = _Spy(model, monkeypatch)
    compile_config = CompileConfig(backend="eager", fullgraph=False, dynamic=True)
    before = dict(cb.stats)
    with torch._dynamo.config.patch(disable=True):
        got = _generate(model, "attnlower", prompts, q_padding_interval_size=16, kv_padding_interval_size=64,
                        varlen_compile_config=compile_config, decode_compile_config=compile_config)
    assert got == want
    if family == "llama":   # decode-only forwards padded to a power of two of requests, through their page table
        assert cb.stats["decode_fast_path"] > before["decode_fast_path"]
    # prefill forwards padded to multiples of 16 tokens (decode-only ones to powers of two, at most 7 requests)
    assert all(n % 16 == 0 for n, f in zip(spy.tokens, spy.forwards) if any(t > 1 for t, _ in f))
    assert any(n > sum(t for t, _ in f) for n, f in zip(spy.tokens, spy.forwards))   # padding tokens


def test_gemma2_alternating_sliding_and_full_layers_with_softcap_match_paged_eager():
    """Gemma-2: a sliding ring and full pages in one cache, softcap; HF's sdpa refuses softcap, so paged|eager."""
    model, prompts = _model("gemma2"), _prompts()
    assert _generate(model, "attnlower", prompts) == _generate(model, "paged|eager", prompts)


def test_gpt_oss_sinks_and_alternating_window_match_paged_eager(monkeypatch):
    """GPT-OSS: a learned sink per head (`s_aux`, O(1) here) on sliding and full layers, read in place through
    paged_attention(sinks=...); HF's own paged|eager adds the sink as a concatenated column."""
    from spellings_issue21 import gpt_oss

    model, prompts = gpt_oss("eager"), _prompts()
    want = _generate(model, "paged|eager", prompts)
    seen = []
    real = attnlower.ops.paged_attention
    monkeypatch.setattr(attnlower.ops, "paged_attention",
                        lambda *a, **k: seen.append(k.get("sinks")) or real(*a, **k))
    assert _generate(model, "attnlower", prompts) == want
    assert seen and all(s is not None for s in seen)       # every layer's call took its sinks
    assert {s.data_ptr() for s in seen} == {layer.self_attn.sinks.data_ptr() for layer in model.model.layers}


def test_one_token_per_row_and_one_row_per_request_give_the_same_tokens(monkeypatch):
    """The query regrouping is a layout only: forcing any segment length changes no token."""
    model, prompts = _model("llama"), _prompts()
    want = _generate(model, "attnlower", prompts)
    for segment in (1, 64):
        monkeypatch.setattr(cb, "QUERY_SEGMENT", segment)
        assert _generate(model, "attnlower", prompts) == want


def test_manager_api_keeps_attnlower_and_streams_results():
    """init_continuous_batching: the implementation stays "attnlower" (not switched to paged|eager / flash), and
    requests added one by one come back with sdpa's tokens."""
    model, prompts = _model("llama"), _prompts()
    want = _generate(model, "sdpa", prompts, max_new_tokens=6)
    model.set_attn_implementation("attnlower")
    gen = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen,
                                             continuous_batching_config=ContinuousBatchingConfig(**CB_CONFIG))
    assert model.config._attn_implementation == "attnlower"
    manager.start()
    try:
        ids = [manager.add_request(p, max_new_tokens=6) for p in prompts]
        results = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=30)
            assert result is not None, "no result within 30 s"
            results[result.request_id] = result.generated_tokens
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()
    assert [results[i] for i in ids] == want


def test_mla_cache_is_refused_with_the_fix():
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2,
        max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    model.set_attn_implementation("attnlower")
    gen = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(_prompts((4, 3)), generation_config=gen,
                               continuous_batching_config=ContinuousBatchingConfig(**CB_CONFIG))
    (error,) = {v.error for v in out.values()}
    assert "MLACacheAllocator" in error and "attn_implementation='sdpa'" in error, error


def test_continuous_batching_kwargs_without_attnlowers_update_are_refused():
    """A forward from continuous batching whose cache update was not attnlower's (so key/value are HF's dense
    copy) is refused with the fix, not silently computed on the copy."""
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(RuntimeError, match=r"continuous_batching\.enable\(\)"):
        hf.attention_forward(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=torch.tensor([0, 3]),
                             read_index=[torch.arange(3)])


def test_enable_refuses_a_transformers_whose_signatures_differ(monkeypatch):
    """Written against transformers 5.25: a method with other parameters is not patched over, and says why."""
    from transformers.generation.continuous_batching import continuous_api

    monkeypatch.setattr(cb, "_enabled", False)
    monkeypatch.setattr(continuous_api.ContinuousBatchingManager, "switch_to_cb_friendly_attn",
                        lambda self, model: None)
    with pytest.warns(UserWarning, match=r"expected ContinuousBatchingManager\.switch_to_cb_friendly_attn\(self, "
                                         r"model, auto_switch_to_flash\) as in transformers 5\.25, got \['self', 'model'\]"):
        assert cb.enable() is False
