"""The kernels compile for Hopper (sm_90) with the real Triton compiler, not only in the interpreter.

Runs tests/lowering/sm90_compile.py in subprocesses (the kernels in this process were decorated under
TRITON_INTERPRET=1). No GPU is needed: Triton ships ptxas.

  --quick --inductor: the launchers' feature grid, plus every kernel typed as Inductor types the kernels it
      launches itself (floats fp64, ints equal to 1 constexprs, debug=True: the typing that failed in tl.dot on
      an H200 before the kernels cast their float scalars to fp32), plus torch 2.11's TTIR mutation analysis
      (every scalar a constant) and the installed torch's own analysis (only the outputs are written).
  --fits: every configuration the launch plan can choose fits sm_90's 232448 bytes of shared memory.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile.py")


def _run(*flags):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0 and "FAILED" not in proc.stdout:
        pytest.fail(f"sm90_compile.py did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, f"kernels failed to compile for sm_90:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return proc.stdout.strip().splitlines()


def test_kernels_compile_for_sm90_with_triton_and_inductor_typing():
    lines = _run("--quick", "--inductor", "--jobs", str(min(2, os.cpu_count() or 1)))
    summary = lines[-1]
    assert " 0 failed" in summary and int(summary.split()[0]) >= 30, summary
    inductor = [line for line in lines if "[inductor]" in line]
    # 7 kernels x 2 dtypes compiled with fp64 scalars, and their TTIR with constant scalars: the dense forward,
    # preprocess, dK/dV and dQ; the paged attention kernel split with its combine fused, split without it, and the
    # separate reduce; plus the document bounds' kernel once (it reads only the int ids: one compile for both dtypes)
    assert sum("TTIR" in line for line in inductor) == 15 and sum("shared=" in line for line in inductor) == 15
    # the paged reduce by programmatic dependent launch compiled both sides (their PTX holds griddepcontrol)
    assert any("'LAUNCH_DEPENDENTS': True" in line for line in lines), "no PDL attention kernel compiled"
    assert any("'WAIT_PRIOR': True" in line for line in lines), "no PDL reduce kernel compiled"


def test_every_planned_config_fits_sm90_shared_memory():
    lines = _run("--fits", "--jobs", str(min(2, os.cpu_count() or 1)))
    assert lines[0].startswith("plan space:") and int(lines[0].split()[2]) > 100_000, lines[0]
    assert " 0 failed" in lines[-1], lines[-1]
