"""The examples run as a user runs them (`python examples/x.py`, small CPU defaults), exit 0 and name their op.

Each takes 5-20 s on a 2-core CPU. Below them, the helpers the examples share are checked to fail
what must fail: a parity failure has to turn into a non-zero exit status.
"""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

# example -> the op every one of its sites must be rewritten to
CASES = {
    "gpt2.py": "flash_attention",
    "llama.py": "flash_attention",
    "mistral.py": "sliding_window_attention",
    "bert.py": "flash_attention",
    "vit.py": "flash_attention",
}


@pytest.mark.parametrize("script", list(CASES))
def test_example_runs_and_passes(script):
    run = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"{script} exited {run.returncode}:\n{out[-6000:]}"
    assert "PASSED" in run.stdout, out[-6000:]
    assert f"rewritten to {CASES[script]}" in run.stdout and "FAIL" not in run.stdout, out[-6000:]
    assert "passes failed" not in out, out[-6000:]


def test_paged_decode_example():
    """Decode steps read the block pool in place (paged_attention), one graph per phase, same tokens as eager."""
    run = subprocess.run([sys.executable, os.path.join(EXAMPLES, "paged_decode.py"), "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"paged_decode.py exited {run.returncode}:\n{out[-6000:]}"
    assert "generated ids equal eager: True" in run.stdout, out[-6000:]
    assert "2 rewritten" in run.stdout and "paged_attention  K/V gathered from a block pool" in run.stdout, out[-6000:]
    assert "graphs compiled: 2 " in run.stdout, out[-6000:]
    assert "passes failed" not in out, out[-6000:]


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, EXAMPLES)
    try:
        import _common
    finally:
        sys.path.remove(EXAMPLES)
    return _common


def test_check_close_fails_on_difference_and_nan(common):
    ref = torch.ones(4)
    assert common.check_close("same", ref.clone(), ref, 1e-5)
    assert not common.check_close("off", ref + 1e-3, ref, 1e-5)
    assert not common.check_close("nan", torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref, 1e-5)


def test_finish_exits_nonzero_on_any_failure(common):
    assert common.finish([True, True]) == 0
    assert common.finish([True, False]) == 1


def test_check_generation(common):
    def gen(ids, scores):
        return SimpleNamespace(sequences=torch.tensor(ids), scores=tuple(torch.tensor(s) for s in scores))

    prompt = [[7, 7]]
    ref = gen([prompt[0] + [1, 2]], [[[0.0, 5.0, 1.0]], [[0.0, 1.0, 5.0]]])
    assert common.check_generation("same", ref, ref, 2, 1e-5, require_equal_ids=True)
    # the scores agree until the tokens part (step 1), then a different token is picked
    other = gen([prompt[0] + [1, 0]], [[[0.0, 5.0, 1.0]], [[5.0, 1.0, 1.0]]])
    assert not common.check_generation("other token, fp32", other, ref, 2, 1e-5, require_equal_ids=True)
    # in 16-bit another token is allowed only when the scores agreed at the step that picked it
    assert not common.check_generation("other token, bf16", other, ref, 2, 3e-2, require_equal_ids=False)
    tie = gen([prompt[0] + [1, 1]], [[[0.0, 5.0, 1.0]], [[0.0, 5.0, 5.0]]])
    near = gen([prompt[0] + [1, 2]], [[[0.0, 5.0, 1.0]], [[0.0, 5.0, 5.0001]]])
    assert common.check_generation("near-tie, bf16", tie, near, 2, 3e-2, require_equal_ids=False)
    # one stopped early at an end-of-sequence token
    short = gen([prompt[0] + [1]], [[[0.0, 5.0, 1.0]]])
    assert not common.check_generation("shorter", short, ref, 2, 3e-2, require_equal_ids=False)


def test_check_sites_fails_on_refusal_and_fallback(common):
    from attnlower.report.records import CompileReport, Site

    good = CompileReport(graph_id=0, sites=[Site(0, "x.py:1", "sdpa", op="flash_attention")])
    refused = CompileReport(graph_id=1, sites=[Site(0, "x.py:1", "sdpa", op=None, reason="no")])
    failed = CompileReport(graph_id=2, error="RuntimeError: boom")
    assert common.check_sites([good], "flash_attention", at_least=1)
    assert not common.check_sites([good], "sliding_window_attention", at_least=1)
    assert not common.check_sites([good, refused], "flash_attention", at_least=1)
    assert not common.check_sites([good, failed], "flash_attention", at_least=1)
