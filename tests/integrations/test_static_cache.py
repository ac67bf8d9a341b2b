"""Hugging Face decode with a StaticCache under torch.compile(backend="attnlower"): a tiny Llama (GQA, sdpa
attention) prefilled eagerly, then decoded step by step compiled, through Inductor (whose generated code checks
every indirect index: the cache write and the mask's), gives eager's logits at every step, for B=1 and B=8 and
a prompt that is not a multiple of any tile. The shape of bench/e2e.py's llama row (there: 512 + 64 positions)."""
from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnlower.compiler import backend  # noqa: E402
from helpers import assert_matches_eager  # noqa: E402

# transformers 5.24 prefers cache=; 5.17 (the GPU machine) knows only past_key_values
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

VOCAB, PROMPT, STEPS = 100, 37, 3
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attn_implementation="sdpa")


def _prefilled_cache(model, prompt):
    """A StaticCache of PROMPT + 64 positions holding `prompt` (prefilled eagerly, as generate() does)."""
    accepted = inspect.signature(transformers.StaticCache.__init__).parameters
    sizing = {k: v for k, v in dict(max_batch_size=prompt.shape[0], dtype=torch.float32).items() if k in accepted}
    cache = transformers.StaticCache(config=model.config, max_cache_len=PROMPT + 64, **sizing)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("batch", [1, 8])
def test_static_cache_decode_matches_eager(batch):
    torch._dynamo.reset()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    prompt = torch.randint(0, VOCAB, (batch, PROMPT))
    tokens = torch.randint(0, VOCAB, (STEPS, batch, 1))
    eager_cache, compiled_cache = _prefilled_cache(model, prompt), _prefilled_cache(model, prompt)
    start = len(backend.reports())
    compiled = torch.compile(model, backend="attnlower", options={"strict": True})
    with torch.no_grad():
        for step in range(STEPS):   # the position advances each step: the cache's own counter, in both
            position = torch.tensor([PROMPT + step])
            want = model(input_ids=tokens[step], past_key_values=eager_cache, cache_position=position,
                         use_cache=True).logits
            got = compiled(input_ids=tokens[step], past_key_values=compiled_cache, cache_position=position,
                           use_cache=True).logits
            assert_matches_eager(got, want, rtol=1e-4)
    reports = backend.reports()[start:]
    assert len(reports) == 1 and not reports[0].error, [r.error for r in reports]   # one graph, every step
    sites = reports[0].sites
    assert [s.op for s in sites] == ["flash_attention"] * CONFIG["num_hidden_layers"], [(s.op, s.reason) for s in sites]
