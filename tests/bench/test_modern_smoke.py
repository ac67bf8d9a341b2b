"""bench/modern.py (issue 21's GPU rows: MLA head dims and decode, sinks with and without a window, packed documents
against the dense bias and one by one) runs end to end on CPU (--smoke: the interpreter, tiny shapes), so its GPU
call starts from a script known to run; and its check is real: a wrong output is reported "wrong", never timed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench import modern  # noqa: E402


def test_modern_smoke_checks_every_group(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "TRITON_INTERPRET": "1", "ATTNLOWER_CPU_KERNELS": "triton"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "modern.py"), "--smoke"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "modern.json").read_text())
    rows = result["rows"]
    assert {row["group"] for row in rows} == set(modern.GROUPS), {row["group"] for row in rows}
    ours = [row for row in rows if row["impl"].startswith("attnlower")]
    assert ours and all("ms" in row and row["err"] for row in ours), [row for row in ours if "ms" not in row]
    # every group's attnlower row ran each mode the group promises, the gradients checked where there is a backward
    modes = {(row["group"], row["impl"], row["mode"]) for row in ours}
    for group in ("mla", "sinks", "packed"):
        assert (group, "attnlower", "fwd+bwd") in modes, group
    assert ("decode", "attnlower", "fwd") in modes
    assert all("dq" in row["err"] for row in ours if row["mode"] == "fwd+bwd")
    assert {"dsinks"} <= {name for row in ours if row["group"] == "sinks" for name in row["err"]}
    # the decode group's two MLA forms, the packed group's four attnlower ways and the two targets per mode
    assert {row["form"] for row in rows if row["group"] == "decode"} == {"absorbed", "expanded"}
    assert {row["impl"] for row in ours if row["group"] == "packed"} == {
        "attnlower", "attnlower-bias", "attnlower-bias-causal", "attnlower-one-by-one"}
    targets = {t["mode"]: t for t in result["packed_targets"]}
    assert set(targets) == {"fwd", "fwd graph", "fwd+bwd"}
    assert all("speedup_over_dense_bias" in t and "ratio_to_one_by_one" in t for t in targets.values())
    assert "packed targets" in r.stdout


def test_a_wrong_output_is_reported_not_timed():
    """The check every row goes through: an output off by a little more than the tolerance, or one gradient off,
    comes back "wrong" in every mode, with no time."""
    bench = modern.Bench(modern.SMOKE, smoke=True)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    grad_out = torch.randn(1, 2, 9, 8)

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(2, 3), dim=-1) @ v

    want = modern.expected(modern.autograd_runs(attend, [q, k, v], grad_out), ["dq", "dk", "dv"])
    both = ("fwd", "fwd+bwd")
    right = modern.measure(bench, modern.Candidate("same", lambda: modern.autograd_runs(attend, [q, k, v], grad_out),
                                                   both), want)
    assert all("ms" in r for r in right), right

    def nudged(q, k, v):          # one output element moved by 1% of the output's largest magnitude
        out = attend(q, k, v)
        return out + torch.zeros_like(out).index_put_((torch.tensor(0),) * 4, 0.01 * out.detach().abs().max())
    wrong_out = modern.measure(bench, modern.Candidate("nudged", lambda: modern.autograd_runs(
        nudged, [q, k, v], grad_out), both), want)
    assert [r["mode"] for r in wrong_out] == list(both)
    assert all("ms" not in r and r["error"].startswith("wrong") and "out" in r["error"] for r in wrong_out), wrong_out

    def wrong_dv(q, k, v):        # the right output, a gradient to v twice what it should be
        out = attend(q, k, v.detach())
        return out + (attend(q.detach(), k.detach(), v) - out.detach()) * 2
    wrong_grad = modern.measure(bench, modern.Candidate("wrong-dv", lambda: modern.autograd_runs(
        wrong_dv, [q, k, v], grad_out), both), want)
    fwd, fwd_bwd = wrong_grad
    assert "ms" in fwd and "ms" not in fwd_bwd and "dv" in fwd_bwd["error"], wrong_grad


def test_a_refusal_is_reported_with_why():
    bench = modern.Bench(modern.SMOKE, smoke=True)
    want = modern.Expected(torch.zeros(1), None, [])

    def refuse():
        import warnings

        warnings.warn("kernel not used because: head dim 576 > 256")
        raise RuntimeError("No available kernel.  Aborting execution.")
    (result,) = modern.measure(bench, modern.Candidate("refuses", refuse, ("fwd",)), want)
    assert result["error"].startswith("RuntimeError: No available kernel") and "576 > 256" in result["error"], result
