"""Options of the attnlower backend: one frozen dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
import os
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
    check_stages: lint the graph and check that every node keeps its example value between the pass
              stages (each stage's promise about its sites is checked always); for debugging a stage.
    mode:     the inner Inductor's mode, as torch.compile(mode=...) names it: "default", "reduce-overhead"
              (CUDA graphs), "max-autotune", "max-autotune-no-cudagraphs" (torch._inductor.list_mode_options()).
              torch.compile(model, backend="attnlower", mode=...) sets it; so does options={"mode": ...}
              (torch.compile takes mode or options, not both).
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
    mode: str = "default"
    check_stages: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.default)
        if self.inner not in ("inductor", "eager"):
            raise ValueError(f"attnlower option 'inner' must be 'inductor' or 'eager', got {self.inner!r}")
        modes = inductor_modes()
        if self.mode not in modes:
            raise ValueError(f"attnlower option 'mode' must be one of Inductor's modes {modes}, got {self.mode!r}")
        if self.mode != "default" and self.inner != "inductor":
            raise ValueError(f"attnlower option 'mode'={self.mode!r} sets the inner Inductor's mode, but inner="
                             f"{self.inner!r} runs the graph without Inductor; use inner='inductor' (the default) "
                             f"or leave mode unset")
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
        if isinstance(options.get("ops"), (list, set, frozenset)):
            options["ops"] = tuple(options["ops"])
        for name in ("dump_dir", "repro_dir"):   # a pathlib.Path is a folder too
            if isinstance(options.get(name), os.PathLike):
                options[name] = os.fspath(options[name])
        return cls(**options)


def check_options(options: Mapping[str, Any] | None = None, mode: str | None = None) -> Options:
    """Validate attnlower options before compiling; returns them as `Options`, raises ValueError saying
    which option, what came and what is allowed.

        attnlower.check_options({"explain": True, "ops": ["flash_attention"]})
        attnlower.check_options(mode="reduce-overhead")
    """
    options = dict(options or {})
    if mode is not None:
        if "mode" in options and options["mode"] != mode:
            raise ValueError(f"attnlower: mode given twice, {mode!r} and options['mode']={options['mode']!r}; "
                             f"give it once")
        options["mode"] = mode
    return Options.from_mapping(options)


def _check_type(name: str, value: Any, default: Any) -> None:
    """Each option has the type of its default (None: a string or None; ops: a sequence of op names)."""
    if name == "ops":
        if not isinstance(value, tuple) or not all(isinstance(op, str) for op in value):
            raise ValueError(f"attnlower option 'ops' must be a list or tuple of op names, got {value!r}; "
                             f"e.g. ['flash_attention', 'sliding_window_attention']")
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"attnlower option {name!r} must be True or False, got {value!r} "
                             f"({type(value).__name__})")
        return
    if default is None or isinstance(default, str):
        if not (isinstance(value, str) or (default is None and value is None)):
            allowed = "a string (a folder path) or None" if default is None else "a string"
            raise ValueError(f"attnlower option {name!r} must be {allowed}, got {value!r} ({type(value).__name__})")


def inductor_modes() -> list[str]:
    """The modes torch.compile accepts for Inductor on this torch ("default", "reduce-overhead", ...)."""
    from torch._inductor import list_mode_options

    return list(list_mode_options())
