"""What a fused site saves: the bytes its unfused subgraph materializes, and roofline times on known GPUs."""
from __future__ import annotations

from typing import Any

import torch

from ..passes.visibility import Visibility
from ..passes.vocabulary import size_hint
from .records import Site, format_dims

# Ops whose result shares its input's storage in practice: they allocate no intermediate.
# (`_unsafe_view` and `reshape` of the contiguous scores are views; aten marks only true views is_view.)
_NO_COPY = {torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default}


def _tensor_bytes(val) -> int | None:
    if not isinstance(val, torch.Tensor):
        return None
    numel = 1
    for s in val.shape:
        h = size_hint(s)
        if h is None:
            return None
        numel *= h
    return numel * val.dtype.itemsize


def memory_estimate(match) -> dict[str, Any]:
    """Bytes the site's unfused subgraph materializes vs what the fused op writes.

    unfused: every tensor a node of the region (other than its output) allocates: the [B, H, Tq, Tk]
    scores, scaled / masked scores, probabilities, in their dtypes; views allocate nothing.
    fused: the op's output [B, Hq, Tq, Dv] plus, for the dense ops, its fp32 logsumexp [B, Hq, Tq].
    Sizes are the example inputs' (symbolic sizes at their hints). For an SDPA call the
    intermediates are inside aten's SDPA (its backend decides), so `unfused_bytes` is None.
    """
    out_val = match.output.meta.get("val") if match.output is not None else None
    out_bytes = _tensor_bytes(out_val)
    lse_bytes = None
    if match.paged is None:
        dims = [size_hint(d) for d in (match.batch, match.q_heads, match.q_len)]
        lse_bytes = None if None in dims else dims[0] * dims[1] * dims[2] * 4
    fused = None if out_bytes is None else out_bytes + (lse_bytes or 0)
    tensors, unfused, note = [], 0, ""
    for node in match.region:
        if node is match.output or node.op != "call_function":
            continue
        if getattr(node.target, "is_view", False) or node.target in _NO_COPY:
            continue
        val = node.meta.get("val")
        nbytes = _tensor_bytes(val)
        if nbytes is None:
            continue
        tensors.append({"node": node.name, "shape": format_dims(val.shape), "dtype": str(val.dtype).replace("torch.", ""),
                        "bytes": nbytes})
        unfused += nbytes
    if not tensors and match.spelling == "sdpa":
        unfused, note = None, "intermediates are inside aten's scaled_dot_product_attention (its backend decides)"
    return {"unfused_bytes": unfused, "fused_bytes": fused, "fused_output_bytes": out_bytes,
            "fused_lse_bytes": lse_bytes, "unfused_tensors": tensors, "note": note}


# Peak dense throughput (TFLOP/s) and memory bandwidth (TB/s), from NVIDIA's datasheets (SXM parts):
# H100 SXM 989 bf16/fp16 tensor, 67 fp32, 3.35 TB/s; H200 SXM same compute, 4.8 TB/s;
# A100 SXM 80GB 312 bf16/fp16, 19.5 fp32, 2.04 TB/s. fp32 attention runs exact ("ieee") dots, not TF32.
_ROOFLINES = {
    "H200": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0, "tb_s": 4.8},
    "H100": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0, "tb_s": 3.35},
    "A100": {"float16": 312.0, "bfloat16": 312.0, "float32": 19.5, "tb_s": 2.04},
}


def roofline(target) -> dict[str, float] | None:
    """The peaks of a CUDA target the table above knows (by device name), else None."""
    name = getattr(target, "name", "") if target is not None and getattr(target, "kind", "") == "cuda" else ""
    for key, peaks in _ROOFLINES.items():
        if key in name:
            return peaks
    return None


def _dims(text: str | None) -> list[int] | None:
    try:
        return [int(x) for x in str(text).strip("[]").split(",")]
    except ValueError:   # symbolic sizes
        return None


def _visible_fraction(spec: dict, tq: int, tk: int) -> float:
    """Share of the Tq x Tk scores the kernel computes (causal / band skip the rest)."""
    if not spec.get("causal"):
        return 1.0
    return Visibility.of(True, bool(spec.get("bottom_right")), spec.get("window") or 0).visible_fraction(tq, tk)


def savings(site: Site, target=None) -> str:
    """`5.0 MiB of scores / probabilities not materialized; roofline on H100: fused ≥ 3 µs, unfused ≥ 9 µs`."""
    mem = site.memory or {}
    parts = []
    unfused = mem.get("unfused_bytes")
    if site.rewritten and unfused:
        parts.append(f"{format_bytes(unfused)} of intermediates (scores, probabilities) not materialized")
    elif site.rewritten and mem.get("note"):
        parts.append(mem["note"])
    peaks = roofline(target)
    q, k, v = (_dims(site.shapes.get(n)) for n in ("q", "k", "v"))
    esize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}.get((site.spec or {}).get("dtype"), 4)
    if site.op == "paged_attention" and k and v:
        gathered = esize * (k[0] * k[1] * k[2] * k[3] + v[0] * v[1] * v[2] * v[3])
        parts.insert(0, f"the gathered K/V copy ({format_bytes(gathered)}) is not made: the op reads the pools in place")
    if site.rewritten and peaks and q and k and v and site.spec:
        b, hq, tq, d = q
        tk, dv = k[2], v[3]
        io = esize * (b * hq * tq * d + 2 * b * k[1] * tk * d + b * hq * tq * dv) + 4 * b * hq * tq
        full_flops = 2.0 * b * hq * tq * tk * (d + dv)
        flops = full_flops * _visible_fraction(site.spec, tq, tk)
        peak = peaks.get(site.spec.get("dtype"), peaks["float32"]) * 1e12
        bw = peaks["tb_s"] * 1e12
        fused_s = max(flops / peak, io / bw)
        # unfused: every intermediate is written once and read back once, and no block is skipped
        unfused_s = max(full_flops / peak, (io + 2 * (unfused or 0)) / bw)
        name = next(key for key in _ROOFLINES if key in target.name)
        parts.append(f"roofline on {name}: fused >= {fused_s * 1e6:.1f} us, "
                     + (f"unfused >= {unfused_s * 1e6:.1f} us" if unfused else "unfused: inside aten SDPA"))
    return "; ".join(parts)


def format_bytes(n: float | None) -> str:
    """`5.0 MiB`; "n/a" when unknown."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"
