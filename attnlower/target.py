"""Where the graph will run, and what the lowering launches there: the one seam to `lowering/`.

The compile path, the report and the dump ask the lowering about hardware and kernels only through
this module:

    Target, target_for(device)       the device the kernels are chosen for (lowering/target.py's one Target)
    kernels_of(op, when)             the @triton.jit entry points an op launches (from the op registry)
    inductor_launches_kernels(target, inner)
                                     whether a compiled graph's dense ops become Inductor's own Triton launches
    kernel_plan(spec, target, q_len, k_len, traced)
                                     the kernels, tiles and constexprs a site's spec launches with, planned
                                     by the launchers' own planner on the site's real Tq and Tk (the dense
                                     forward: the Gluon kernel or the Triton one, plan.choose_forward_kernel)
"""
from __future__ import annotations

from typing import Any

import torch

from .lowering.target import INTERPRET, Target, target_for  # noqa: F401  (re-exported: the seam)
from .passes.vocabulary import size_hint


def kernels_of(op: str, when: str | None = None) -> list[tuple[str, tuple[str, ...], str]]:
    """(module, kernel names, "forward" | "backward") of each group of kernels `op` launches (of one
    direction when `when` is given); [] for an op with no kernels."""
    from .lowering.registry import kernel_table

    return [group for group in kernel_table().get(op, ()) if when is None or group[2] == when]


def inductor_launches_kernels(target: Target, inner: str) -> bool:
    """Whether a graph compiled with the inner compiler `inner` on `target` has its dense ops decomposed into
    Triton kernel launches Inductor makes itself (lowering/ops.py, ATTNLOWER_INDUCTOR_KERNELS): its forward is
    then always the Triton kernel (kernel_plan's `traced`)."""
    if inner != "inductor" or target.kind != "cuda":
        return False
    from .lowering import ops

    return ops.INDUCTOR_KERNELS


def _runs(target: Target) -> str:
    if target.kind == "cuda":
        return "triton"
    if target.kind == "interpret":
        return "triton (interpreter, ATTNLOWER_CPU_KERNELS=triton)"
    return ("reference (plain PyTorch on CPU); the Triton kernels below run on CUDA tensors, "
            "or on CPU with ATTNLOWER_CPU_KERNELS=triton")


def kernel_plan(spec, target: Target, q_len=None, k_len=None, traced: bool = False) -> dict[str, Any]:
    """The kernels `spec.op` (an AttentionSpec) launches on `target`, their tile config and the constexprs
    the spec fixes, from the launchers' own planner (`lowering.plan.kernel_plan`) on the site's Tq and Tk
    (for the paged op Tk is the gathered width: the block table's width in tokens), for batch 1. What
    depends on runtime values the spec does not hold (the paged split count; whether the tensors are
    TMA-readable, which the Gluon forward needs) is named, not valued.

    traced: the op runs inside a graph Inductor compiles with the dense kernels decomposed (the default for CUDA
    graphs, ATTNLOWER_INDUCTOR_KERNELS=1): Inductor launches the Triton forward then. False: the call runs eagerly
    (inner="eager", ATTNLOWER_INDUCTOR_KERNELS=0, a direct call), which takes the Gluon forward where
    `plan.choose_forward_kernel` picks it (sm_90, triton 3.6, D = Dv = 128, ...).
    """
    from .lowering import plan as planning
    from .lowering.params import AttentionParams

    dtype = getattr(torch, spec.dtype)
    plan: dict[str, Any] = {"runs": _runs(target),
                            "kernels": [k for _, names, _ in kernels_of(spec.op) for k in names]}
    head_dim = size_hint(spec.head_dim)
    heads = (size_hint(spec.q_heads), size_hint(spec.kv_heads))
    if head_dim is None or None in heads:
        plan["constexprs"] = {}
        plan["note"] = "symbolic head_dim or head counts: constexprs are fixed at launch"
        return plan
    tq = (size_hint(q_len) if q_len is not None else None) or 1
    tk = (size_hint(k_len) if k_len is not None else None) or tq
    notes = []
    if q_len is None or size_hint(q_len) is None:
        notes.append("Tq unknown: planned for Tq=1")
    if k_len is None or size_hint(k_len) is None:
        notes.append(f"Tk unknown: planned for Tk={tk}")
    params = AttentionParams(spec.scale, causal=spec.causal, bottom_right=spec.bottom_right, window=spec.window,
                             softcap=spec.softcap, dropout_p=spec.dropout_p, empty_rows_nan=spec.empty_rows_nan,
                             short_sequences=spec.op == "paged_attention")   # the paged rewrite passes empty_rows_nan
    where = target if target.kind == "cuda" else INTERPRET
    try:
        planned = planning.kernel_plan(spec.op, params, batch=1, q_heads=heads[0], kv_heads=heads[1], tq=tq, tk=tk,
                                       head_dim=head_dim, dtype=dtype, target=where, bias=spec.bias_kind,
                                       block_size=spec.paged_block_size or 16, traced=traced)
    except (NotImplementedError, ValueError) as e:  # a limit of the kernels: no plan to show
        plan["constexprs"] = {}
        plan["note"] = f"no launch plan: {e}"
        return plan
    if planned["note"]:
        notes.append(planned["note"])
    if not planned["launches"]:
        plan["constexprs"] = {}
        plan["note"] = "; ".join(notes)
        return plan
    first = planned["launches"][0]
    if first["kernel"] == planning.GLUON_FORWARD:   # the forward is the Gluon kernel; the backward stays Triton's
        plan["runs"] = "gluon forward (Hopper, warp-specialized), triton backward"
        plan["kernels"] = [first["kernel"]] + [k for _, names, _ in kernels_of(spec.op, "backward") for k in names]
    constexprs = dict(first["constexprs"])
    if spec.op == "paged_attention":
        constexprs["SPLIT"] = "chosen at launch (paged_num_splits: SM count, table width)"
        fused = planning.PAGED_REDUCE == "fused"
        constexprs["FUSED_REDUCE"] = ("split: the last split combines (plan.PAGED_REDUCE), else False" if fused else
                                      "False: a second launch combines the splits (plan.PAGED_REDUCE)")
        constexprs["SPLITS_PAD"] = "with FUSED_REDUCE: the split count's power of two, else 1"
    plan.update(block_m=first["block_m"], block_n=first["block_n"], num_warps=first["num_warps"],
                num_stages=first["num_stages"], grid_for_batch_1=list(first["grid"]), constexprs=constexprs)
    if notes:
        plan["note"] = "; ".join(notes)
    return plan
