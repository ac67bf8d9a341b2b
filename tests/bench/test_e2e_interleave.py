"""bench/e2e.py's rows time their modes interleaved by default: every mode compiled and warmed first, then one call of
each in turn, with no recompile on the way (Dynamo keeps one cache entry per backend); `--sequential` times one mode
after the other. Run on CPU with a wall-clock stand-in for the CUDA-event timer."""
from __future__ import annotations

import importlib.util
import os
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _e2e(monkeypatch, order: list):
    spec = importlib.util.spec_from_file_location("e2e_interleave", os.path.join(ROOT, "bench", "e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def wall_ms(fn, iters, rewind=None, warmup=3):
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            (rewind or (lambda: None))()
            order.append(fn.mode)
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters

    compiled = module.compiled

    def tagged(fn, mode, reset=True):
        out = compiled(fn, mode, reset)

        def call():
            return out()
        call.mode = mode
        return call

    monkeypatch.setattr(module, "cuda_ms", wall_ms)
    monkeypatch.setattr(module, "compiled", tagged)
    monkeypatch.setattr(module, "SELECTED_MODES", ["eager", "inductor", "attnlower"])
    return module


def _make():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(32, 96), torch.randn(2, 16, 32)

    def make():
        def step():
            q, k, v = layer(x).view(2, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return step
    return make


def test_modes_go_round_one_call_each_and_nothing_recompiles(monkeypatch):
    order: list = []
    e2e = _e2e(monkeypatch, order)
    results: list = []
    torch._dynamo.utils.counters.clear()
    e2e.run_row("tiny", _make(), 4, results, warmup=2)
    (row,) = results
    assert all(isinstance(row[m], float) and row[m] > 0 for m in ("eager", "inductor", "attnlower")), row
    assert order == ["eager", "inductor", "attnlower"] * 4      # one call each, in turn
    # two compiled graphs (Inductor's, attnlower's), none after the warm-up
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_sequential_times_each_mode_after_the_previous_one(monkeypatch):
    order: list = []
    e2e = _e2e(monkeypatch, order)
    monkeypatch.setattr(e2e, "SEQUENTIAL", True)
    results: list = []
    e2e.run_row("tiny", _make(), 3, results, warmup=1)
    assert order == ["eager"] * 3 + ["inductor"] * 3 + ["attnlower"] * 3
    assert all(isinstance(results[0][m], float) for m in ("eager", "inductor", "attnlower"))


def test_in_turn_alternates_when_asked_and_drops_a_failing_call(monkeypatch):
    order: list = []
    e2e = _e2e(monkeypatch, order)

    def named(name, fail=False):
        def call():
            if fail:
                raise RuntimeError("boom")
        call.mode = name
        return call
    times = e2e.in_turn({"a": named("a"), "b": named("b")}, 3, alternate=True)
    assert order == ["a", "b", "b", "a", "a", "b"] and [len(t) for t in times.values()] == [3, 3]
    failed = []
    times = e2e.in_turn({"a": named("a"), "bad": named("bad", fail=True)}, 2,
                        on_error=lambda name, error: failed.append((name, str(error))))
    assert list(times) == ["a"] and len(times["a"]) == 2 and failed == [("bad", "boom")]
