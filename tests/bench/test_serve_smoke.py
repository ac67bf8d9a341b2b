"""bench/serve.py keeps working on CPU (its --smoke mode: a tiny Llama, a few requests, fp32), so the GPU run it
exists for (issue 24: continuous batching with attnlower vs HF's sdpa and paged|eager) starts from a script
known to run: every implementation finishes, and attnlower's greedy tokens equal sdpa's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def test_serve_benchmark_smoke_runs_every_implementation(tmp_path):
    script = Path(__file__).resolve().parents[2] / "bench" / "serve.py"
    env = {**os.environ, "OUT": str(tmp_path)}
    r = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()
            if line.split() and line.split()[0] in ("attnlower", "sdpa", "paged|eager")}
    assert set(rows) == {"attnlower", "sdpa", "paged|eager"}, r.stdout[-2000:]
    # the same greedy tokens as sdpa (agree), and first tokens equal to a plain forward of each prompt (first ok)
    assert rows["attnlower"][-2:] == ["1.00", "1.00"], rows["attnlower"]
    assert all(row[-1] == "1.00" for row in rows.values()), rows
    saved = json.loads((tmp_path / "serve.json").read_text())
    attnlower = saved["results"]["attnlower"]
    assert attnlower["runs"]["6"]["generated_tokens"] == 6 * 8
    assert attnlower["attnlower_calls"]["in_place"] > 0
