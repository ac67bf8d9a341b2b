"""What the backend found, chose and refused, per compiled graph: the records and the process's list of them.

`CompileReport` (one per graph) holds its `Site` rows; `reports()` is every report made in this
process, oldest first (`attnlower.inspect` and `attnlower dump` read the ones their compile added).
"""
from __future__ import annotations

import json
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
    memory: dict[str, Any] | None = None  # costs.memory_estimate: bytes of the unfused intermediates vs the fused op
    choice: str = ""                    # why this op and not the others (describe_sites)
    saves: str = ""                     # bytes not materialized, roofline time fused vs unfused (describe_sites)
    validated: str = ""                 # what translation validation checked the rewrite on, or "not checked: why"
    validation_repro: str | None = None  # the repro file of a rewrite that failed validation

    @property
    def rewritten(self) -> bool:
        """Replaced by a fused op."""
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
        """The sites replaced by a fused op."""
        return [s for s in self.sites if s.rewritten]

    @property
    def refused(self) -> list[Site]:
        """The sites left unfused."""
        return [s for s in self.sites if not s.rewritten]

    def count(self, op: str | None = None) -> int:
        """Number of rewritten sites (of one op, when given)."""
        return sum(1 for s in self.rewritten if op is None or s.op == op)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain dicts and lists (report.json)."""
        d = asdict(self)
        return d

    def to_json(self) -> str:
        """The report as JSON text."""
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


_REPORTS: list[CompileReport] = []


def reports() -> list[CompileReport]:
    """Every CompileReport made in this process, oldest first."""
    return list(_REPORTS)


def keep(report: CompileReport) -> CompileReport:
    """Add a graph's report to the process's list (the backend, once per graph it is handed)."""
    _REPORTS.append(report)
    return report


def format_dims(sizes) -> str:
    """`[2, 4, s0, 64]`: sizes (ints or SymInts) as the site table and dumps print them."""
    return "[" + ", ".join(str(s) for s in sizes) + "]"
