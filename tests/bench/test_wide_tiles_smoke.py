"""bench/wide_tiles.py runs end to end on CPU (--smoke: the interpreter, tiny shapes), so its one GPU call is not
spent finding a bug in the script: every candidate checked against SDPA's math backend, none wrong, none failing."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wide_tiles_smoke_checks_every_candidate():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "wide_tiles.py"), "--smoke"], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    timed = re.findall(r"^  D=\d+/\d+ B=1 T=40 (fwd|bwd dk/dv|bwd dq) \(.*\): [0-9.]+ ms$", r.stdout, re.M)
    assert len(timed) == 2 * 6, r.stdout   # two head-dim pairs x (2 forward + 2 dK/dV + 2 dQ tiles), all checked
    assert "wrong" not in r.stdout and "Error" not in r.stdout, r.stdout
