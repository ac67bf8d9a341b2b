"""What the backend found, chose and refused, per compiled graph."""
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
    memory: dict[str, Any] | None = None  # dump.memory_estimate: bytes of the unfused intermediates vs the fused op
    validated: str = ""                 # what translation validation checked the rewrite on, or "not checked: why"
    validation_repro: str | None = None  # the repro file of a rewrite that failed validation

    @property
    def rewritten(self) -> bool:
        return self.op is not None


@dataclass
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

    def table(self) -> str:
        """A plain-text table of the sites, one row each."""
        head = f"attnlower graph {self.graph_id} on {self.target}: {len(self.sites)} attention site(s), {len(self.rewritten)} rewritten"
        if self.error:
            head += f"\n  passes failed, graph left unmodified: {self.error}" + (f" (repro: {self.repro})" if self.repro else "")
        rows = [("#", "location", "q / k / v [B, H, T, D]", "mask", "op", "why")]
        for s in self.sites:
            shapes = " ".join(str(s.shapes.get(n, "?")) for n in ("q", "k", "v"))
            rows.append((str(s.index), s.location, shapes, s.mask, s.op or "(unfused)", s.reason))
        if len(rows) == 1:
            return head
        widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(rows[0]) - 1)]
        lines = [head]
        for r in rows:
            cells = [c[:w].ljust(w) for c, w in zip(r[:-1], widths)]
            lines.append("  " + "  ".join(cells) + "  " + r[-1])
        return "\n".join(lines)
