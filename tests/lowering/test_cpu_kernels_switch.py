"""ATTNLOWER_CPU_KERNELS=triton in a process whose kernels were not decorated under Triton's interpreter: a
ValueError that names TRITON_INTERPRET and what to do, not a crash inside Triton ("0 active drivers")."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import torch, attnlower.ops as ops
q = torch.randn(1, 2, 8, 16)
try:
    ops.flash_attention(q, q, q, causal=True)
except ValueError as e:
    print("VALUEERROR", e)
"""


def test_the_switch_without_the_interpreter_says_what_to_do():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ATTNLOWER_CPU_KERNELS="triton", PYTHONPATH=str(ROOT), ATTNLOWER_TEST_DEVICE="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "VALUEERROR" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    message = proc.stdout.split("VALUEERROR", 1)[1]
    assert "TRITON_INTERPRET" in message and "interpreter" in message and "GPU" in message, message
