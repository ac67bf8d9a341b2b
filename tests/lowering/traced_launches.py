"""What AOTAutograd hands Inductor for an attnlower call, on CPU: `aot_targets(body)` runs `body` (it defines `fn`
and its `args`) in a fresh interpreter with the kernels compiled rather than interpreted (TRITON_INTERPRET=0) and
traced on CPU tensors (`lowering.ops.TRACE_CPU_KERNELS`), captures the forward graph (nothing runs: there is no GPU)
and returns its call targets, a Triton launch as `triton_kernel_wrapper_functional:<kernel>`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
import attnlower.ops as public
import attnlower.lowering.ops as lowering_ops

lowering_ops.TRACE_CPU_KERNELS = {kernels}
graphs = []

def capture(gm, example_inputs):
    graphs.append(gm)
    raise RuntimeError("captured")          # nothing runs: the kernels are compiled ones, there is no GPU

def backend(gm, example_inputs):
    return aot_module_simplified(gm, example_inputs, fw_compiler=capture)

{body}

try:
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
except Exception as error:
    assert "captured" in str(error), error
(gm,) = graphs
for node in gm.graph.nodes:
    if node.op == "call_function":
        name = str(node.target)
        if "triton_kernel_wrapper" in name:
            name += ":" + kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
        print(name)
"""


def aot_targets(body: str, kernels: bool = True) -> list[str]:
    """The forward graph's call targets for `body`'s `fn(*args)`; kernels=False: the op runs its reference (opaque)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="0", ATTNLOWER_CPU_KERNELS="triton",
               PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("ATTNLOWER_TEST_DEVICE", None)
    script = _SCRIPT.format(kernels=kernels, body=body)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.split()
