"""Where the graph will run, and what the lowering launches there: the one seam to `lowering/`.

The compile path, the report and the dump ask the lowering about hardware and kernels only through
this module:

    Target, target_for(device)       the device the kernels are chosen for (the only place a Target is built)
    kernels_of(op, when)             the @triton.jit entry points an op launches (forward / backward)
    kernel_plan(spec, target, q_len) the kernels, tiles and constexprs a site's spec launches with

The lowering is growing its own versions of these (an op registry from which the kernel names derive,
one `Target`, and `kernel_plan` computed with the real Tq / Tk, issue 18). Switching to them changes
this file only: `Target` / `target_for` become the lowering's, `kernels_of` reads the registry, and
`kernel_plan` calls the lowering's (today it builds the planner's own target and plans Tk = Tq).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .passes.vocabulary import size_hint


@dataclass(frozen=True)
class Target:
    """What the analyzer and the configs need to know about where the graph will run.

    kind: "cuda" (compiled Triton kernels), "interpret" (Triton's interpreter on CPU, tests),
    or "cpu" (the plain-PyTorch reference implementation).
    """

    kind: str
    arch: int = 0               # SM version as major*10+minor (90 = Hopper); 0 off-GPU
    sm_count: int = 0
    name: str = "cpu"

    def describe(self) -> str:
        """`NVIDIA H200 (sm_90, 132 SMs)`, or the kind off-GPU."""
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
            name=props.name,
        )
    if os.environ.get("ATTNLOWER_CPU_KERNELS") == "triton":
        return Target(kind="interpret")
    return Target(kind="cpu")


# The @triton.jit entry points each op launches: (module, kernel names, when).
_OP_KERNELS = {
    "flash_attention": [
        ("attnlower.lowering.kernels.flash_fwd", ("_flash_fwd_kernel",), "forward"),
        ("attnlower.lowering.kernels.flash_bwd",
         ("_flash_bwd_preprocess_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel"), "backward"),
    ],
    "paged_attention": [
        ("attnlower.lowering.kernels.paged_decode", ("_paged_attn_kernel", "_paged_reduce_kernel"), "forward"),
    ],
}
_OP_KERNELS["sliding_window_attention"] = _OP_KERNELS["flash_attention"]


def kernels_of(op: str, when: str | None = None) -> list[tuple[str, tuple[str, ...], str]]:
    """(module, kernel names, "forward" | "backward") of each group of kernels `op` launches (of one
    direction when `when` is given); [] for an op with no kernels."""
    return [group for group in _OP_KERNELS.get(op, ()) if when is None or group[2] == when]


def _runs(target: Target) -> str:
    if target.kind == "cuda":
        return "triton"
    if target.kind == "interpret":
        return "triton (interpreter, ATTNLOWER_CPU_KERNELS=triton)"
    return ("reference (plain PyTorch on CPU); the Triton kernels below run on CUDA tensors, "
            "or on CPU with ATTNLOWER_CPU_KERNELS=triton")


def kernel_plan(spec, target: Target, q_len=None) -> dict[str, Any]:
    """The kernels `spec.op` (an AttentionSpec) launches on `target`, their tile config and the constexprs
    the spec fixes.

    Computed by the launchers' own planner (lowering/plan.py: `dense_plan`, `paged_plan`), for one
    sequence of `q_len` queries (1 when unknown); the grid shown is for batch 1. What depends on
    runtime values the spec does not hold (the paged split count) is named, not valued.
    """
    from attnlower.lowering import plan as planning
    from attnlower.lowering.params import AttentionParams

    dtype = getattr(torch, spec.dtype)
    plan: dict[str, Any] = {"runs": _runs(target),
                            "kernels": [k for _, names, _ in kernels_of(spec.op) for k in names]}
    head_dim = size_hint(spec.head_dim)
    heads = (size_hint(spec.q_heads), size_hint(spec.kv_heads))
    if head_dim is None or None in heads:
        plan["constexprs"] = {}
        plan["note"] = "symbolic head_dim or head counts: constexprs are fixed at launch"
        return plan
    where = planning.Target("cuda" if target.kind == "cuda" else "interpret", target.arch,
                            target.sm_count or 4, False)
    tq = (size_hint(q_len) if q_len is not None else None) or 1
    q = planning.Meta((1, heads[0], tq, head_dim), dtype)
    params = AttentionParams(spec.scale, causal=spec.causal, bottom_right=spec.bottom_right, window=spec.window,
                             softcap=spec.softcap, dropout_p=spec.dropout_p, empty_rows_nan=spec.empty_rows_nan)
    try:
        if spec.op in ("flash_attention", "sliding_window_attention"):
            kv = planning.Meta((1, heads[1], tq, head_dim), dtype)
            bias = {"none": None, "bool": planning.Meta((1,), torch.bool), "float": planning.Meta((1,), dtype)}
            launches = planning.dense_plan(params, "fwd", q, kv, kv, bias[spec.bias_kind], False, where).launches
        else:
            block_size = spec.paged_block_size or 16
            pool = planning.Meta((1, heads[1], block_size, head_dim), dtype)
            table = planning.Meta((1, 1), torch.int32)
            launches = planning.paged_plan(params, q, pool, table, False, where, True, 1).launches
            if q_len is None or size_hint(q_len) is None:
                plan["note"] = "Tq unknown: BLOCK_M shown for Tq=1"
    except (NotImplementedError, ValueError) as e:  # a limit of the kernels: no plan to show
        plan["constexprs"] = {}
        plan["note"] = f"no launch plan: {e}"
        return plan
    first = launches[0]
    constexprs = dict(first.constexprs)
    if spec.op == "paged_attention":
        constexprs["SPLIT"] = "chosen at launch (paged_num_splits: SM count, table width)"
    cfg = first.config
    plan.update(block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                grid_for_batch_1=list(first.grid), constexprs=constexprs)
    return plan
