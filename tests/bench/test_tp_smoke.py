"""bench/tp.py keeps working on CPU (its --smoke mode: 2 gloo ranks, tiny model), so the two-GPU run it
exists for (issue 25) starts from a script known to run: the shared model, the TP plan, every site fused."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_tp_benchmark_smoke_runs_and_fuses_every_layer():
    script = Path(__file__).resolve().parents[2] / "bench" / "tp.py"
    r = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("attnlower"))
    assert "'found': 4, 'rewritten': 4" in line and "'refused': []" in line, r.stdout[-2000:]
