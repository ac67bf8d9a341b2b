"""The target the kernels are chosen for: device kind, SM architecture and what it offers."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    """What the analyzer and the configs need to know about where the graph will run.

    kind: "cuda" (compiled Triton kernels), "interpret" (Triton's interpreter on CPU, tests),
    or "cpu" (the plain-PyTorch reference implementation).
    """

    kind: str
    arch: int = 0               # SM version as major*10+minor (90 = Hopper); 0 off-GPU
    sm_count: int = 0
    shared_memory_per_block: int = 0
    name: str = "cpu"

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


def target_for(device: torch.device) -> Target:
    """The Target of a device: CUDA properties where there is a GPU, else cpu / interpret."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Target(
            kind="cuda",
            arch=props.major * 10 + props.minor,
            sm_count=props.multi_processor_count,
            shared_memory_per_block=getattr(props, "shared_memory_per_block_optin", 0),
            name=props.name,
        )
    if os.environ.get("ATTNLOWER_CPU_KERNELS") == "triton":
        return Target(kind="interpret")
    return Target(kind="cpu")
