"""Options of the attnlower backend: one frozen dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Options:
    """What `torch.compile(model, backend="attnlower", options={...})` accepts.

    inner:    "inductor" hands the rewritten graph to Inductor's compile_fx; "eager" runs it as is.
    explain:  print the site table of every compiled graph.
    strict:   re-raise when a pass fails instead of compiling the unmodified graph.
    enable:   run the attention passes at all (False: canonicalize and hand over, for comparisons).
    ops:      which fused ops the analyzer may choose; a site that needs another stays unfused.
    dump_dir: write each graph's before/after text, site table and report JSON there.
    dump_mlir: with dump_dir, also write the rewritten graph in MLIR's torch dialect (needs attnlower[mlir]).
    dump_dot:  with dump_dir, also write a Graphviz DOT file (and an SVG, where `dot` is installed) per site.
    validate: check every rewritten site against the region it replaced (float64 CPU, random inputs)
              and undo the rewrites that differ; False skips the check (passes/validate.py).
    repro_dir: where repro files go (a failed pass, a site that failed validation); default: the temp dir.
    """

    inner: str = "inductor"
    explain: bool = False
    strict: bool = False
    enable: bool = True
    ops: tuple[str, ...] = ("flash_attention", "sliding_window_attention", "paged_attention")
    dump_dir: str | None = None
    repro_dir: str | None = None
    dump_mlir: bool = False
    dump_dot: bool = False
    validate: bool = True

    def __post_init__(self) -> None:
        if self.inner not in ("inductor", "eager"):
            raise ValueError(f"attnlower option 'inner' must be 'inductor' or 'eager', got {self.inner!r}")
        if not isinstance(self.validate, bool):
            raise ValueError(f"attnlower option 'validate' must be True or False, got {self.validate!r}")
        known = {"flash_attention", "sliding_window_attention", "paged_attention"}
        unknown = set(self.ops) - known
        if unknown:
            raise ValueError(f"attnlower option 'ops' got unknown op(s) {sorted(unknown)}; valid: {sorted(known)}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "Options":
        """Build Options from the dict given to torch.compile; unknown keys raise ValueError naming the valid ones."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown attnlower option(s) {unknown}; valid options are {valid}")
        if "ops" in options:
            options["ops"] = tuple(options["ops"])
        return cls(**options)
