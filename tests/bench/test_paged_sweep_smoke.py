"""bench/paged_sweep.py runs end to end on CPU (--smoke: the interpreter, tiny shapes), so its GPU call (issue 20
item 4: the split count and tiles the paged decode kernel should take) starts from a script known to run, and every
candidate it times is first checked against SDPA."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_paged_sweep_smoke_checks_and_reports_every_candidate(tmp_path):
    script = Path(__file__).resolve().parents[2] / "bench" / "paged_sweep.py"
    env = {**os.environ, "OUT": str(tmp_path), "TRITON_INTERPRET": "1", "ATTNLOWER_CPU_KERNELS": "triton"}
    r = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (row,) = json.loads((tmp_path / "paged_sweep.json").read_text())["rows"]
    assert row["candidates"] and all("ms" in c for c in row["candidates"]), row
    assert row["best"] is not None and row["chosen"]["splits"] >= 1
    # split candidates both ways: the combine in the attention kernel and the separate reduce launch
    assert {(c["splits"], c["reduce"]) for c in row["candidates"]} == {(1, "-"), (2, "fused"), (2, "separate")}
    # its chart (bench/plots.py), or the line saying why there is none
    assert (tmp_path / "paged_sweep.png").is_file() or "no chart for paged_sweep.json" in r.stdout, r.stdout[-2000:]
