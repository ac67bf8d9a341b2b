"""Sharded models compiled with attnlower on 2 CPU ranks (gloo): DTensor tensor parallelism and FSDP2.

Each test starts two processes (`ranks.py`), which run a scenario of `scenarios.py` and hand back
their differences against the unsharded model and their CompileReports' sites. Tolerances: fp32
on CPU, where the sharded and the unsharded model sum in different orders (measured ~2.5e-6 at most
on these shapes); 1e-4 leaves room for that and fails on any wrong head, mask or scale (errors ~1e-1).

attnlower's inner compiler is "eager" here (the rewritten graph runs as is), which keeps each test
within ~15-45 s on 2 cores. `ATTNLOWER_TEST_INNER=inductor` runs the TP test through Inductor and
AOTAutograd's DTensor desugaring instead (passes, ~2 min on 2 busy cores).
"""
from __future__ import annotations

import sys

import pytest

import torch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform == "win32",
    reason="needs torch.distributed with gloo (not on Windows here)")

from ranks import run_ranks  # noqa: E402  (tests/distributed is on sys.path: pytest's rootdir import)

TOL = 1e-4


def _assert_parity(diffs: dict, rank: int) -> None:
    bad = {k: v for k, v in diffs.items() if k != "n_param_grads" and not v <= TOL}
    assert not bad, f"rank {rank}: compiled sharded model differs from the unsharded / eager one by {bad} (tol {TOL})"
    n = diffs["n_param_grads"]
    assert n == 19, f"rank {rank}: expected gradients for the model's 19 parameters, got {n}"


def _assert_rewritten(sites: list[dict], rank: int, q_heads: int, kv_heads: int) -> None:
    assert len(sites) == 2, f"rank {rank}: expected 2 attention sites (eager and SDPA layer), got {sites}"
    for s in sites:
        assert s["op"] == "flash_attention", f"rank {rank}: site left unfused: {s}"
        assert (s["q_heads"], s["kv_heads"]) == (q_heads, kv_heads), (
            f"rank {rank}: expected the rank's own {q_heads} query / {kv_heads} KV heads, got {s}")


@pytest.mark.parametrize("scenario", ["tp_llama", "tp_sp_llama"])
def test_tensor_parallel_llama_gqa(tmp_path, scenario):
    """Colwise q/k/v, rowwise o (torch's Llama TP plan, with and without sequence-parallel norms),
    4 query / 2 KV heads: 2 / 1 per rank."""
    for rank, r in enumerate(run_ranks(scenario, tmp_path)):
        _assert_rewritten(r["sites"], rank, q_heads=2, kv_heads=1)
        _assert_parity(r["diffs"], rank)


def test_fsdp2_llama(tmp_path):
    """fully_shard per layer and at the root; every rank its own batch, gradients averaged."""
    for rank, r in enumerate(run_ranks("fsdp_llama", tmp_path)):
        _assert_rewritten(r["sites"], rank, q_heads=4, kv_heads=2)
        _assert_parity(r["diffs"], rank)


def test_tensor_parallel_fallbacks(tmp_path):
    """A refused site, attention on DTensors, a failing pass, a failing canonicalization: the sharded
    model's results, and why."""
    for rank, r in enumerate(run_ranks("tp_fallbacks", tmp_path)):
        refused = r["refused"]
        assert [s["op"] for s in refused["sites"]] == [None], f"rank {rank}: {refused['sites']}"
        assert "used 2 times" in refused["sites"][0]["reason"], refused["sites"][0]
        assert refused["out_vs_unsharded"] <= TOL and refused["weights_vs_unsharded"] <= TOL, (rank, refused)

        on_dtensor = r["on_dtensor"]
        assert [s["op"] for s in on_dtensor["sites"]] == [None], f"rank {rank}: {on_dtensor['sites']}"
        assert on_dtensor["sites"][0]["reason"].startswith("attention on DTensor values"), on_dtensor["sites"][0]
        assert on_dtensor["out_vs_unsharded"] <= TOL, (rank, on_dtensor)

        failed = r["pass_failure"]
        assert failed["errors"] == ["RuntimeError: injected failure in the rewrite stage"], (rank, failed)
        assert [s["op"] for s in failed["sites"]] == [None], (rank, failed)
        assert failed["sites"][0]["reason"].startswith("passes failed"), (rank, failed)
        assert failed["out_vs_unsharded"] <= TOL, (rank, failed)

        untraced = r["canonicalize_failure"]
        assert untraced["errors"] == ["canonicalization to aten failed, RuntimeError: injected failure in to_aten"], (
            rank, untraced)
        assert untraced["out_vs_unsharded"] <= TOL, (rank, untraced)
