"""bench/e2e.py's `--cprofile MODE`: the host profile names the functions a call spends its time in, per call."""
from __future__ import annotations

import importlib.util
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _e2e():
    spec = importlib.util.spec_from_file_location("e2e", os.path.join(ROOT, "bench", "e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slow_part():
    time.sleep(0.002)


def test_the_host_profile_puts_the_slow_function_first_with_its_time_per_call():
    rewinds = []
    lines = _e2e().host_profile(_slow_part, calls=5, rewind=lambda: rewinds.append(1))
    assert len(rewinds) == 6                        # once before the warm-up call, once before each profiled call
    own, cum, ncalls = (float(x) for x in lines[1].split()[:3])
    assert "sleep" in lines[1] and ncalls == 1.0    # time.sleep is where the time goes, once per call
    assert 1500 < own < 50_000                      # ~2000 µs per call, not per 5 calls
    slow = next(line for line in lines if "_slow_part" in line)
    assert float(slow.split()[1]) >= own            # its cumulative time includes the sleep
