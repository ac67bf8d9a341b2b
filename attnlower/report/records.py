"""What the backend found, chose and refused, per compiled graph: the records and the process's list of them.

`CompileReport` (one per graph) holds its `Site` rows; `reports()` is every report made in this
process, oldest first (`attnlower.inspect` and `attnlower dump` read the ones their compile added).
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

# The site table's columns and the widest each may grow, in characters: a longer cell wraps at spaces, and a
# single word longer than its cap (a path, a shape) widens the column instead, so no cell is ever cut.
_COLUMNS = (("#", 4), ("location", 56), ("q / k / v [B, H, T, D]", 40), ("mask", 24), ("op", 26), ("why", 72))
_NOTE_WIDTH = 100   # the lines under a row (why this op, savings, validation) wrap here


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

    def validation_status(self) -> str:
        """What translation validation checked this site on, or why it did not check it (table and sites.md)."""
        if not self.validated:
            return "not checked: the site was not rewritten" if not self.rewritten else "not checked"
        if self.validated.startswith(("not ", "first-call check pending")):
            return self.validated   # "not checked: options validate=False", "not validated: ...", still to come
        return ("passed on " if self.rewritten else "failed on ") + self.validated


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
    passes_enabled: bool = True  # options enable: False means no site was looked for (not that none was found)

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

    def summary(self) -> str:
        """The table's first line: how many sites were found and rewritten, or that the passes were off."""
        if not self.passes_enabled:
            return (f"attnlower graph {self.graph_id} on {self.target}: passes off (options enable=False), "
                    "no attention site looked for; the graph was compiled as traced")
        return (f"attnlower graph {self.graph_id} on {self.target}: {len(self.sites)} attention site(s), "
                f"{len(self.rewritten)} rewritten")

    def table(self) -> str:
        """The site table: one row per site (long cells wrapped at spaces), then why this op, what it saves and
        what translation validation checked."""
        head = self.summary()
        if self.error:
            head += f"\n  passes failed, graph left unmodified: {self.error}" + (f" (repro: {self.repro})" if self.repro else "")
        if self.graph_breaks:
            head += (f"\n  Dynamo broke the code before this graph ({sum(b.count for b in self.graph_breaks)} "
                     "graph break(s)); attention past a break is not in this graph:")
            head += "".join(f"\n  - {b.describe()}" for b in self.graph_breaks)
        rows = [tuple(name for name, _ in _COLUMNS)]
        for s in self.sites:
            shapes = tuple(str(s.shapes.get(n, "?")) for n in ("q", "k", "v"))   # wraps between shapes only
            rows.append((str(s.index), s.location, shapes, s.mask, s.op or "(unfused)", s.reason))
        if len(rows) == 1:
            return head + ("\n" + "  " + self.kernels if self.kernels else "")
        limits = [_column_width([r[i] for r in rows], cap) for i, (_, cap) in enumerate(_COLUMNS)]
        wrapped = [[_wrap(c, w) for c, w in zip(r, limits)] for r in rows]
        widths = [max(len(line) for r in wrapped for line in r[i]) for i in range(len(_COLUMNS))]   # shrink to fit
        indent = " " * (4 + widths[0])
        lines = [head]
        for i, cells in enumerate(wrapped):
            for k in range(max(len(c) for c in cells)):
                parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths)]
                lines.append(("  " + "  ".join(parts)).rstrip())
            s = self.sites[i - 1] if i else None
            if s is None:
                continue
            for label, text in (("op", s.choice), ("saves", s.saves), ("validation", s.validation_status())):
                if text:
                    lines += textwrap.wrap(f"{label}: {text}", _NOTE_WIDTH, initial_indent=indent,
                                           subsequent_indent=indent + "  ", break_long_words=False,
                                           break_on_hyphens=False)
        if self.kernels:
            lines.append("  " + self.kernels)
        return "\n".join(lines)


def _units(cell: str | tuple[str, ...]) -> list[str]:
    """What a cell may be broken between: its words, or the items of a tuple cell (shapes stay whole)."""
    return cell.split() if isinstance(cell, str) else list(cell)


def _wrap(cell: str | tuple[str, ...], width: int) -> list[str]:
    """The cell in lines of at most `width` characters, broken between units only (a longer unit keeps a line)."""
    lines: list[str] = []
    for unit in _units(cell):
        if lines and len(lines[-1]) + 1 + len(unit) <= width:
            lines[-1] += " " + unit
        else:
            lines.append(unit)
    return lines or [""]


def _column_width(cells: list, cap: int) -> int:
    """The narrowest width that fits every cell of a column within `cap`, widened to its longest unit."""
    longest = max(len(" ".join(_units(c))) for c in cells)
    longest_unit = max((len(u) for c in cells for u in _units(c)), default=0)
    return min(longest, max(cap, longest_unit))


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
