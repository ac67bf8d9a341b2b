"""What the backend found, chose and refused, per compiled graph."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Site:
    """One attention site: where it is in the user's source, its shapes, and what became of it."""

    index: int
    location: str                       # "file.py:63 in forward: w = torch.matmul(q, k.transpose(2, 3))"
    spelling: str                       # "matmul-softmax-matmul", "sdpa", "bmm", "einsum", ...
    shapes: dict[str, Any] = field(default_factory=dict)   # q/k/v as logical [B, H, T, D] strings
    mask: str = "none"                  # what the mask classifier said
    op: str | None = None               # the attnlower op chosen, None when refused
    reason: str = ""                    # why this op (or why refused)
    spec: dict[str, Any] | None = None  # the AttentionSpec as a dict
    kernel: dict[str, Any] | None = None  # kernel config, where known at compile time
    nodes: list[str] = field(default_factory=list)  # the names of the nodes the rewrite replaced
    region: list[str] = field(default_factory=list)  # names of the site's nodes in the aten graph (before the passes)
    memory: dict[str, Any] | None = None  # dump.memory_estimate: bytes of the unfused intermediates vs the fused op
    choice: str = ""                    # why this op and not the others (describe_sites)
    saves: str = ""                     # bytes not materialized, roofline time fused vs unfused (describe_sites)
    validated: str = ""                 # what translation validation checked the rewrite on, or "not checked: why"
    validation_repro: str | None = None  # the repro file of a rewrite that failed validation

    @property
    def rewritten(self) -> bool:
        return self.op is not None


@dataclass(repr=False)
class CompileReport:
    """One graph's report: its sites, what each pass did, and any error that left it unmodified."""

    graph_id: int
    target: str = "cpu"
    sites: list[Site] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)  # {"name", "seconds", "summary"}
    error: str | None = None
    repro: str | None = None
    seconds_in_passes: float = 0.0
    inner: str = "inductor"
    kernels: str = ""          # with explain: which Triton kernels the first call compiles
    graph_breaks: list[Any] = field(default_factory=list)  # graph_breaks.GraphBreak taken before this graph

    @property
    def rewritten(self) -> list[Site]:
        return [s for s in self.sites if s.rewritten]

    @property
    def refused(self) -> list[Site]:
        return [s for s in self.sites if not s.rewritten]

    def count(self, op: str | None = None) -> int:
        """Number of rewritten sites (of one op, when given)."""
        return sum(1 for s in self.rewritten if op is None or s.op == op)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __repr__(self) -> str:
        return (f"<CompileReport graph {self.graph_id} on {self.target}: {len(self.sites)} site(s), "
                f"{len(self.rewritten)} rewritten{', passes failed' if self.error else ''}>")

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """The site table: one row per site, then what was proven, why this op, and what it saves."""
        head = (f"attnlower graph {self.graph_id} on {self.target}: {len(self.sites)} attention site(s), "
                f"{len(self.rewritten)} rewritten")
        if self.error:
            head += f"\n  passes failed, graph left unmodified: {self.error}" + (f" (repro: {self.repro})" if self.repro else "")
        if self.graph_breaks:
            head += (f"\n  Dynamo broke the code before this graph ({sum(b.count for b in self.graph_breaks)} "
                     "graph break(s)); attention past a break is not in this graph:")
            head += "".join(f"\n  - {b.describe()}" for b in self.graph_breaks)
        rows = [("#", "location", "q / k / v [B, H, T, D]", "mask", "op", "why")]
        for s in self.sites:
            shapes = " ".join(str(s.shapes.get(n, "?")) for n in ("q", "k", "v"))
            rows.append((str(s.index), s.location, shapes, s.mask, s.op or "(unfused)", s.reason))
        if len(rows) == 1:
            return head
        widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(rows[0]) - 1)]
        lines = [head]
        for i, r in enumerate(rows):
            cells = [c[:w].ljust(w) for c, w in zip(r[:-1], widths)]
            lines.append("  " + "  ".join(cells) + "  " + r[-1])
            s = self.sites[i - 1] if i else None
            indent = " " * (4 + widths[0])
            if s is not None and s.choice:
                lines.append(f"{indent}op: {s.choice}")
            if s is not None and s.saves:
                lines.append(f"{indent}saves: {s.saves}")
        if self.kernels:
            lines.append("  " + self.kernels)
        return "\n".join(lines)


class Reports(list):
    """The CompileReports `attnlower.inspect` returns: a list that prints as the site tables."""

    def __str__(self) -> str:
        return "\n\n".join(r.table() for r in self) if self else "attnlower: no graph was compiled"

    __repr__ = __str__


# --------------------------------------------------------------------------------------------
# the report in the user's words

def describe_sites(report: CompileReport, graph, dynamo_graph=None, target=None, explain: bool = False) -> None:
    """Finish each site's text for people: reasons naming what the user wrote (names.humanize, on the
    aten graph the passes read), no clause said twice, why this op and not the others, what it saves.

    `graph` is the aten graph before the passes (the reasons name its nodes), `dynamo_graph` the
    graph Dynamo handed the backend (its placeholders carry the user's argument names).
    """
    from . import names

    try:
        arguments = names.argument_names(graph, dynamo_graph) if graph is not None else {}
        for s in report.sites:
            if graph is not None:
                s.reason = names.humanize(s.reason, graph, arguments)
            s.reason = names.dedupe(s.reason)
            s.choice = op_choice(s)
            s.saves = savings(s, target)
    except Exception as e:  # noqa: BLE001 - the report's wording must never fail a compile
        logging.getLogger("attnlower").warning(
            "attnlower: could not word the report of graph %d (%s: %s); its reasons stay as the passes wrote them",
            report.graph_id, type(e).__name__, e)
    if explain:
        global _EXPLAINING
        _EXPLAINING = True
        report.kernels = kernels_to_compile(report, target)
        if getattr(target, "kind", "cpu") == "cuda" and report.rewritten:
            watch_triton_compiles()


# --------------------------------------------------------------------------------------------
# kernels compiled on first call (explain)

_EXPLAINING = False     # an explain=True compile happened in this process: report kernel compiles
KERNEL_COMPILES: list[dict[str, Any]] = []


def kernels_to_compile(report: CompileReport, target=None) -> str:
    """Which Triton kernels the graph's first call compiles (one per configuration), or why none."""
    from .dump import _OP_KERNELS

    if not report.rewritten:
        return ""
    kind = getattr(target, "kind", "cpu")
    if kind == "cpu":
        return ("kernels: none compiled; on CPU tensors the ops run the plain-PyTorch reference "
                "(ATTNLOWER_CPU_KERNELS=triton runs the Triton kernels through the interpreter)")
    by_kernel: dict[str, list[int]] = {}
    for s in report.rewritten:
        for _, names, when in _OP_KERNELS.get(s.op, ()):
            if when == "forward":
                for name in names:
                    by_kernel.setdefault(name, []).append(s.index)
    listed = "; ".join(f"{k} (site{'s' if len(v) > 1 else ''} {', '.join(map(str, v))})" for k, v in by_kernel.items())
    return (f"kernels: the first call compiles {listed} (one compile per configuration; the backward "
            "kernels on the first backward)" + ("; each compile is reported as it finishes" if kind == "cuda" else
                                                 "; the interpreter runs them without compiling"))


def watch_triton_compiles() -> bool:
    """Time every compile of an attnlower kernel through Triton's JIT hooks (`triton.knobs.runtime`:
    `jit_cache_hook` runs before a compile, `jit_post_compile_hook` after it) and report each with
    record_kernel_compile. Hooks someone else installed keep running. False where this Triton has no
    such hooks (before 3.4); the interpreter compiles nothing, so nothing is reported there."""
    global _WATCHING
    if _WATCHING:
        return True
    try:
        from triton import knobs
        runtime = knobs.runtime
        before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    except (ImportError, AttributeError):
        return False
    started: dict = {}

    def _ours(fn) -> bool:
        return str(getattr(fn, "module", "")).startswith("attnlower.")

    def cache_hook(*args, **kwargs):
        if _ours(kwargs.get("fn")):
            started[str(kwargs.get("key"))] = time.perf_counter()
        return before(*args, **kwargs) if before else None   # truthy would skip the compile: pass theirs on

    def post_compile_hook(*args, **kwargs):
        t0 = started.pop(str(kwargs.get("key")), None)
        if t0 is not None:
            compile_kw = kwargs.get("compile") or {}
            config = ", ".join(f"{k}={compile_kw[k]}" for k in ("num_warps", "num_stages") if k in compile_kw)
            record_kernel_compile(kwargs["fn"].name, config, time.perf_counter() - t0)
        return after(*args, **kwargs) if after else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = cache_hook, post_compile_hook
    _WATCHING = True
    return True


_WATCHING = False


def record_kernel_compile(kernel: str, config: str, seconds: float) -> None:
    """Hook for the launchers (lowering/launch*.py): call it after a launch that compiled `kernel` for a
    new configuration, with the time that first launch took. Kept in KERNEL_COMPILES; printed when a
    graph was compiled with explain=True in this process."""
    KERNEL_COMPILES.append({"kernel": kernel, "config": config, "seconds": seconds})
    if _EXPLAINING:
        print(f"attnlower: compiled Triton kernel {kernel} ({config}) in {seconds:.2f} s", flush=True)


def op_choice(site: Site) -> str:
    """Why this op and not the other two, from the site's spec: "flash; not sliding: no band ..."."""
    spec = site.spec
    if not site.rewritten or not spec:
        return ""
    not_paged = ("not paged: K/V are gathered from a block pool, but the paged op does not fit (see why)"
                 if "paged gather was seen" in site.reason else "not paged: K/V are not gathered from a block pool")
    if site.op == "paged_attention":
        return ("paged: K/V are gathered from a block pool, read in place; "
                "not flash / sliding: they would read the gathered copy")
    if site.op == "sliding_window_attention":
        return (f"sliding: only key blocks inside the {spec.get('window')}-key band are visited; "
                f"not flash: it would visit every key block left of the diagonal; {not_paged}")
    if spec.get("bias_kind", "none") != "none":
        return (f"flash with the mask as a {spec.get('bias_kind')} bias; not sliding: no band proven from "
                f"shapes alone (the mask reads data or is not a band); {not_paged}")
    if spec.get("causal"):
        return f"flash; not sliding: causal without a band (sliding needs a window); {not_paged}"
    return f"flash; not sliding: no mask, no band (sliding needs a window); {not_paged}"


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
    off = tk - tq if spec.get("bottom_right") else 0
    window = spec.get("window") or 0
    total = 0
    for i in range(tq):
        hi = min(i + off, tk - 1)
        lo = max(i + off - window + 1, 0) if window else 0
        total += max(hi - lo + 1, 0)
    return total / (tq * tk)


def savings(site: Site, target=None) -> str:
    """`5.0 MiB of scores / probabilities not materialized; roofline on H100: fused ≥ 3 µs, unfused ≥ 9 µs`."""
    mem = site.memory or {}
    parts = []
    unfused = mem.get("unfused_bytes")
    if site.rewritten and unfused:
        parts.append(f"{_bytes(unfused)} of intermediates (scores, probabilities) not materialized")
    elif site.rewritten and mem.get("note"):
        parts.append(mem["note"])
    peaks = roofline(target)
    q, k, v = (_dims(site.shapes.get(n)) for n in ("q", "k", "v"))
    esize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}.get((site.spec or {}).get("dtype"), 4)
    if site.op == "paged_attention" and k and v:
        gathered = esize * (k[0] * k[1] * k[2] * k[3] + v[0] * v[1] * v[2] * v[3])
        parts.insert(0, f"the gathered K/V copy ({_bytes(gathered)}) is not made: the op reads the pools in place")
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


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"
