"""Where the kernels run: one `Target` for the analyzer, the launch plan, the report and the dump.

A NamedTuple (not a dataclass): the launch plan hashes it on every call (its cache key), in C.
Positional order is kept from the launch plan's former Target (kind, arch, sm_count, allow_tf32), so
`Target("cuda", 90, 132, False)` still means what it did.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch


class Target(NamedTuple):
    """What the analyzer, the configs and the launch plan need to know about where a graph runs.

    kind: "cuda" (compiled Triton kernels), "interpret" (Triton's interpreter on CPU tensors, tests) or
        "cpu" (the plain-PyTorch reference).
    arch: SM version as major*10+minor (90 = Hopper); 0 off-GPU.
    sm_count: SMs (the paged split-KV heuristic); the interpreter's target uses a small count (4) so that
        the split decision stays meaningful in tests without launching many interpreted programs.
    allow_tf32: torch.backends.cuda.matmul.allow_tf32 (fp32 dots may use TF32 when True).
    shared_memory_per_block: the most shared memory one block may use (bytes; 232448 on H100 / H200).
    name: the device's name, as `describe()` prints it.
    triton: the installed Triton's version on a CUDA target ("" elsewhere): the Gluon forward is written for
        one Triton release (plan.choose_forward_kernel reads it).
    rocm: a "cuda" device of a ROCm build of torch (an AMD GPU): its `arch` is the gfx version read the CUDA way
        (gfx90a is 90, gfx942 is 94), so an NVIDIA-only feature asks `nvidia_arch`, never `arch`.
    """

    kind: str
    arch: int = 0
    sm_count: int = 0
    allow_tf32: bool = False
    shared_memory_per_block: int = 0
    name: str = "cpu"
    triton: str = ""
    rocm: bool = False

    @property
    def nvidia_arch(self) -> int:
        """The SM version of an NVIDIA GPU (90 = Hopper); 0 for AMD GPUs and off-GPU targets."""
        return self.arch if self.kind == "cuda" and not self.rocm else 0

    @property
    def tensor_core_dtypes(self) -> tuple[torch.dtype, ...]:
        if self.kind != "cuda":
            return ()
        if self.arch >= 80:
            return (torch.float16, torch.bfloat16, torch.float32)
        return (torch.float16,)

    def describe(self) -> str:
        if self.kind == "cuda":
            return f"{self.name} (sm_{self.arch}, {self.sm_count} SMs)"
        return self.kind


INTERPRET = Target("interpret", 0, 4, False, 0, "interpret")


@functools.lru_cache(maxsize=64)  # one entry per (device, TF32 flag): bounded by the device count
def _cuda_target(device: torch.device, allow_tf32: bool) -> Target:
    props = torch.cuda.get_device_properties(device)
    return Target("cuda", props.major * 10 + props.minor, props.multi_processor_count, allow_tf32,
                  getattr(props, "shared_memory_per_block_optin", 0), props.name, _triton_version(),
                  torch.version.hip is not None)


def _triton_version() -> str:
    """The installed Triton's version ("" without Triton: then no kernel runs at all)."""
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def target_of(device: torch.device) -> Target:
    """The Target the launchers plan for tensors on `device`: the GPU's, or the interpreter's for CPU
    tensors (launchers only run there under ATTNLOWER_CPU_KERNELS=triton). Cached; the TF32 flag is read
    per call (it may change)."""
    if device.type == "cuda":
        return _cuda_target(device, torch.backends.cuda.matmul.allow_tf32)
    return INTERPRET


def target_for(device: torch.device) -> Target:
    """The Target the compiler analyzes a graph for: the GPU's; on CPU, "interpret" when the ops run the
    Triton kernels through the interpreter (ATTNLOWER_CPU_KERNELS=triton), else "cpu" (the reference)."""
    if device.type == "cuda":
        return target_of(device)
    if os.environ.get("ATTNLOWER_CPU_KERNELS") == "triton":
        return INTERPRET
    return Target("cpu")
