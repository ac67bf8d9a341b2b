"""bench/e2e.py's llama row on CPU: its StaticCache decode step, rewound before each call as the row times it,
stays the same step for more calls than the cache has free positions. Without the rewind transformers 5 writes
each call at the cache's own counter, and the 65th call of the row (counted over every mode, which share the
cache) wrote at max_cache_len: the H200's `index out of bounds: 0 <= tmp7 < 576`, blamed on attnlower's graph."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import assert_matches_eager  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT, STEPS = 16, 4   # the row's recipe (512 + 64 there) at a size CPU Inductor compiles in seconds


def _e2e():
    spec = importlib.util.spec_from_file_location("e2e", os.path.join(ROOT, "bench", "e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("batch", [1, 8])
def test_rewound_decode_repeats_one_step_past_the_cache_size(batch):
    torch._dynamo.reset()
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    decode, rewind = _e2e().static_cache_decode(model, batch, PROMPT, "cpu", torch.float32, steps=STEPS)
    rewind()
    want = decode()
    compiled = torch.compile(decode, backend="attnlower", options={"strict": True})
    for _ in range(2 * STEPS + 1):   # eager and compiled calls on one cache, as the row's modes share it
        rewind()
        assert_matches_eager(compiled(), want, rtol=1e-4)
        rewind()
        assert torch.equal(decode(), want)
