"""The graph dump: what attnlower did to each compiled graph, as files a person can read (option dump_dir,
or the `attnlower dump` command).

Per graph, under `DIR/graph_NNN/`:

    00_dynamo.txt          the graph Dynamo handed the backend
    01_aten.txt            the same graph traced to pre-dispatch aten (what the passes see)
    02_<stage>.txt, ...    the graph after each stage of passes/pipeline.STAGES
    final.txt              the graph handed to the inner compiler
    sites.md               one row per site: source location, shapes, mask, op, kernel config,
                           memory of the fused op vs the unfused subgraph, why (or why not),
                           why this op and not the others, what it saves
    kernels/siteNN_<op>.py the @triton.jit sources the chosen op launches, headed by the
                           constexprs the site's AttentionSpec fixes and the tile config
    report.json            the CompileReport, with counts and the list of files written
    final.mlir             (dump_mlir) the rewritten graph in MLIR's torch dialect, via torch-mlir's
                           FX importer: attnlower ops appear as `torch.operator "attnlower.<op>"`
    regions/siteNN.dot     (dump_dot) the site's region in the aten graph, the mask it applies (with
                           what was proven about it), its inputs and users, and a legend;
    regions/siteNN.svg     rendered when Graphviz's `dot` is on PATH (the dump says once when it is not)

Each graph written prints one progress line to stderr (`attnlower dump: graph 3: ...`).

It reads what the compile recorded (the report's sites, their `memory` and `kernel` plans) and the
graphs; nothing here changes a graph, and nothing on the compile path imports it except the backend's
one call when `dump_dir` is set.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from typing import Any

import torch
import torch.fx as fx

from ..passes.vocabulary import size_hint
from ..target import kernels_of
from .costs import format_bytes
from .records import CompileReport, Site, format_dims

log = logging.getLogger("attnlower")

MLIR_EXTRA_HINT = ("--mlir needs torch-mlir, the optional extra attnlower[mlir]: "
                   "pip install 'attnlower[mlir]' (or pip install torch-mlir)")

# Ops whose result shares its input's storage in practice: they allocate no intermediate.
# (`_unsafe_view` and `reshape` of the contiguous scores are views; aten marks only true views is_view.)
_NO_COPY = {torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default}


# --------------------------------------------------------------------------------------------
# Triton sources

def _jit_closure(kernels: list) -> list:
    """The kernels and every @triton.jit function / module constexpr they reach, callees first."""
    order: list = []
    seen: set[int] = set()

    def visit(obj, name):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if _is_jit(obj):
            g = obj.fn.__globals__
            for dep in obj.fn.__code__.co_names:
                if dep in g and (_is_jit(g[dep]) or _is_constexpr(g[dep])):
                    visit(g[dep], dep)
            order.append((name, obj))
        else:
            order.append((name, obj))

    for k in kernels:
        visit(k, k.fn.__name__)
    return order


def _is_jit(x) -> bool:
    """A @triton.jit function: JITFunction, or InterpretedFunction under TRITON_INTERPRET=1."""
    return type(x).__module__.startswith("triton.") and inspect.isfunction(getattr(x, "fn", None))


def _is_constexpr(x) -> bool:
    import triton.language as tl

    return isinstance(x, tl.constexpr)


def _constexpr_source(name: str, value, modules) -> str:
    """The module line defining a constexpr (`LOG2E: tl.constexpr = ...`), else one rebuilt from its value."""
    for mod in modules:
        for line in inspect.getsource(mod).splitlines():
            s = line.split("#")[0]
            if s.startswith((f"{name}:", f"{name} =", f"{name}=")):
                return line
    return f"{name} = tl.constexpr({value.value!r})"


def triton_source(site: Site, graph_id: int, grad: bool) -> str:
    """A Python file holding the @triton.jit sources `site.op` launches, headed by what the spec fixes."""
    import importlib

    plan = site.kernel or {}
    lines = [f'"""Triton kernels of attnlower::{site.op} for site {site.index} of graph {graph_id}.',
             "",
             f"Site: {site.location}",
             f"Runs: {plan.get('runs', '?')}",
             f"Tiles (lowering/configs.py): BLOCK_M={plan.get('block_m')}, BLOCK_N={plan.get('block_n')}, "
             f"num_warps={plan.get('num_warps')}, num_stages={plan.get('num_stages')}",
             "",
             "Constexprs the site's AttentionSpec fixes (the kernel is compiled for these values):"]
    lines += [f"    {k} = {v!r}" for k, v in (plan.get("constexprs") or {}).items()]
    if plan.get("note"):
        lines += ["", f"Note: {plan['note']}"]
    lines += ["", "Everything else (pointers, strides, sizes, scale, softcap, window, seeds) is a runtime argument.",
              "Sources copied from the modules named above each function; these are all @triton.jit functions",
              "(grid, strides and config choice live in the launchers, lowering/launch*.py).", '"""',
              "import triton", "import triton.language as tl", ""]
    for module_name, names, when in kernels_of(site.op):
        if when == "backward" and not grad:
            lines += [f"# {when} kernels ({', '.join(names)}, {module_name}) are launched only when gradients",
                      "# are needed; this graph's inputs do not require grad.", ""]
            continue
        mod = importlib.import_module(module_name)
        lines += [f"# ---- {when}: {', '.join(names)} ({module_name}) " + "-" * 20, ""]
        written = set()
        for name, obj in _jit_closure([getattr(mod, n) for n in names]):
            if name in written:
                continue
            written.add(name)
            if _is_constexpr(obj):
                lines += [_constexpr_source(name, obj, [mod, sys.modules.get("attnlower.lowering.kernels.flash_fwd")]),
                          ""]
            else:
                lines += [f"# from {obj.fn.__module__}", inspect.getsource(obj.fn).rstrip(), "", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# DOT

def _dot_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_MASK_ARG = {"masked_fill": 1, "where": 0, "add": None, "scaled_dot_product_attention": 3}
_STYLES = {"region": "shape=box, style=filled, fillcolor=lightblue",
           "mask": "shape=box, style=filled, fillcolor=orange",
           "input": "shape=ellipse, style=dashed", "user": "shape=ellipse, style=dotted"}


def _mask_inputs(n: fx.Node, inside: set) -> list[fx.Node]:
    """The mask / bias a region node applies to the scores: masked_fill's mask, where's condition,
    the addend of an add that comes from outside the region, SDPA's attn_mask."""
    op = getattr(n.target, "__name__", str(n.target)).split(".")[0]
    if op not in _MASK_ARG or n.op != "call_function":
        return []
    if op == "scaled_dot_product_attention":
        m = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
        return [m] if isinstance(m, fx.Node) else []
    if op == "add":
        return [a for a in n.args if isinstance(a, fx.Node) and a not in inside and _is_mask_like(a)]
    i = _MASK_ARG[op]
    m = n.args[i] if len(n.args) > i else None
    return [m] if isinstance(m, fx.Node) and m not in inside else []


def _is_mask_like(n: fx.Node) -> bool:
    """A bool tensor, or a float one broadcast over some score dims (a bias, not a second score tensor)."""
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    return val.dtype == torch.bool or any(size_hint(s) == 1 for s in val.shape)


def region_dot(gm: fx.GraphModule, site: Site) -> str:
    """DOT text of the site's region: its nodes (filled), the mask it applies (orange, labelled with what
    the classifier proved), the nodes feeding it, the users of its output, and a legend."""
    by_name = {n.name: n for n in gm.graph.nodes}
    region = [by_name[n] for n in site.region if n in by_name]
    inside = set(region)
    masks = {m for n in region for m in _mask_inputs(n, inside)}
    proven = site.mask if site.mask and site.mask != "none" else "not classified"
    fate = ("dropped: the kernel applies it itself" if site.rewritten and site.spec and site.spec.get("bias_kind") == "none"
            else "passed to the op as its bias" if site.rewritten else "left in the graph (site unfused)")
    title = f"site {site.index}: {site.op or '(unfused)'} at {site.location}"
    lines = [f"digraph site{site.index} {{",
             f"  label={_dot_quote(title)};",
             "  labelloc=t; rankdir=TB; node [fontname=monospace, fontsize=10];"]
    drawn: set[str] = set()

    def node_line(n: fx.Node, role: str) -> str:
        val = n.meta.get("val")
        shape = f"\n{str(val.dtype).replace('torch.', '')}{format_dims(val.shape)}" if isinstance(val, torch.Tensor) else ""
        target = n.target if n.op != "call_function" else getattr(n.target, "__name__", str(n.target))
        label = f"{n.name}: {target}{shape}"
        if role == "mask":
            label += f"\nmask, proven: {proven}\n({fate})"
        return f"  {_dot_quote(n.name)} [label={_dot_quote(label)}, {_STYLES[role]}];"

    for n in region:
        lines.append(node_line(n, "region"))
        drawn.add(n.name)
    for m in masks:
        lines.append(node_line(m, "mask"))
        drawn.add(m.name)
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside and a.name not in drawn:
                lines.append(node_line(a, "input"))
                drawn.add(a.name)
            lines.append(f"  {_dot_quote(a.name)} -> {_dot_quote(n.name)};")
        for u in n.users:
            if u not in inside:
                if u.name not in drawn:
                    lines.append(node_line(u, "user"))
                    drawn.add(u.name)
                lines.append(f"  {_dot_quote(n.name)} -> {_dot_quote(u.name)};")
    legend = [("legend_region", "the site's region (replaced by the op)" if site.rewritten else "the site's region",
               "region"),
              ("legend_mask", f"the mask it applies (proven: {proven})", "mask"),
              ("legend_input", "a value feeding the region", "input"),
              ("legend_user", "a user of the region's output", "user")]
    lines += ["  subgraph cluster_legend {", '    label="legend"; fontsize=10; style=rounded;']
    lines += [f"    {_dot_quote(name)} [label={_dot_quote(text)}, {_STYLES[role]}];" for name, text, role in legend]
    lines += ["    " + " -> ".join(_dot_quote(name) for name, _, _ in legend) + " [style=invis];", "  }", "}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# MLIR

def torch_mlir_available() -> bool:
    """Whether torch-mlir (the extra attnlower[mlir]) can be imported."""
    try:
        import torch_mlir.fx  # noqa: F401
    except ImportError:
        return False
    return True


def graph_mlir(gm: fx.GraphModule) -> str:
    """The graph in MLIR's torch dialect (torch-mlir's FX importer, no lowering): custom ops such
    as attnlower::flash_attention become `torch.operator "attnlower.flash_attention"`."""
    try:
        from torch_mlir import fx as torch_mlir_fx
    except ImportError as e:
        raise RuntimeError(f"{MLIR_EXTRA_HINT} ({e})") from e
    module = torch_mlir_fx.stateless_fx_import(gm, output_type="raw", model_name="attnlower_graph")
    return str(module)


# --------------------------------------------------------------------------------------------
# the site table and the writer

def _kernel_str(plan: dict | None) -> str:
    if not plan:
        return "-"
    head = f"{plan['kernels'][0]} {plan.get('block_m')}x{plan.get('block_n')}, " \
           f"{plan.get('num_warps')} warps, {plan.get('num_stages')} stages" if plan.get("kernels") else ""
    return head + ("; runs the reference on CPU" if plan.get("runs", "").startswith("reference") else "")


def _memory_str(mem: dict | None) -> str:
    if not mem:
        return "-"
    s = f"{format_bytes(mem['fused_bytes'])} vs {format_bytes(mem['unfused_bytes'])}"
    return s + (f" ({mem['note']})" if mem.get("note") else "")


def site_table_markdown(report: CompileReport) -> str:
    """sites.md: one row per site (location, shapes, mask, op, kernel, memory, why, validation)."""
    lines = [f"# graph {report.graph_id} ({report.target}, inner={report.inner})", ""]
    if not report.passes_enabled:
        return "\n".join(lines + ["Passes off (options enable=False): no attention site was looked for; "
                                   "the graph was compiled as traced.", ""])
    lines += [f"{len(report.sites)} site(s), {report.count()} rewritten, {len(report.refused)} left unfused.", ""]
    if report.error:
        lines += [f"**passes failed, graph compiled unmodified:** {report.error}", f"repro: `{report.repro}`", ""]
    lines += ["memory: bytes the fused op writes (output + lse) vs the intermediates of the unfused subgraph "
              "(scores, probabilities) at the example sizes.", "",
              "| # | location | q | k | v | spelling | mask | op | kernel | memory fused vs unfused | why | "
              "why this op | saves | validation |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in report.sites:
        cells = [str(s.index), s.location, s.shapes.get("q", "?"), s.shapes.get("k", "?"), s.shapes.get("v", "?"),
                 s.spelling, s.mask, s.op or "(unfused)", _kernel_str(s.kernel), _memory_str(s.memory), s.reason,
                 s.choice or "-", s.saves or "-", s.validation_status()]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def report_counts(report: CompileReport) -> dict[str, Any]:
    """Sites, rewritten, refused and rewritten per op, for report.json."""
    by_op: dict[str, int] = {}
    for s in report.rewritten:
        by_op[s.op] = by_op.get(s.op, 0) + 1
    return {"sites": len(report.sites), "rewritten": report.count(), "refused": len(report.refused), "by_op": by_op}


def _needs_grad(gm: fx.GraphModule | None) -> bool:
    if gm is None or not torch.is_grad_enabled():
        return False
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op in ("placeholder", "get_attr") and isinstance(val, torch.Tensor) and val.requires_grad:
            return True
    return False


def write_graph_dump(folder: str, report: CompileReport, dynamo_gm: fx.GraphModule, aten_before: str | None,
                     snapshots: list[tuple[str, str]], final_gm: fx.GraphModule, *,
                     before_gm: fx.GraphModule | None = None, mlir: bool = False, dot: bool = False) -> str:
    """Write one graph's files under `folder/graph_<id>/` and return that path.

    A part that cannot be written (a kernel source, the MLIR import, `dot`) is reported in
    `dump_errors.txt` and in the log, and the rest is still written; `attnlower dump` exits non-zero.
    """
    out = os.path.join(folder, f"graph_{report.graph_id:03d}")
    os.makedirs(out, exist_ok=True)
    files: list[str] = []
    errors: list[str] = []

    def write(name: str, text: str) -> None:
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        files.append(name)

    write("00_dynamo.txt", dynamo_gm.print_readable(print_output=False))
    if aten_before is not None:
        write("01_aten.txt", aten_before)
    for i, (name, text) in enumerate(snapshots):
        write(f"{i + 2:02d}_{name.replace('+', '_').replace('-', '_')}.txt", text)
    write("final.txt", final_gm.print_readable(print_output=False))
    write("sites.md", site_table_markdown(report))

    grad = _needs_grad(before_gm)
    for s in report.rewritten:
        try:
            write(f"kernels/site{s.index:02d}_{s.op}.py", triton_source(s, report.graph_id, grad))
        except (ImportError, OSError, KeyError) as e:
            errors.append(f"kernel source of site {s.index} ({s.op}): {type(e).__name__}: {e}")
    if dot:
        if before_gm is None:
            errors.append("--dot: the aten graph before the passes was not passed to the dump")
        else:
            dot_bin = shutil.which("dot")
            if dot_bin is None:
                _say_once("no_graphviz", "attnlower dump: Graphviz's `dot` is not on PATH: writing regions/siteNN.dot "
                                         "only, no SVG (install Graphviz, e.g. apt-get install graphviz, for the SVGs)")
            for s in report.sites:
                name = f"regions/site{s.index:02d}.dot"
                write(name, region_dot(before_gm, s))
                if dot_bin:
                    svg = os.path.join(out, f"regions/site{s.index:02d}.svg")
                    r = subprocess.run([dot_bin, "-Tsvg", os.path.join(out, name), "-o", svg],
                                       capture_output=True, text=True)
                    if r.returncode == 0:
                        files.append(os.path.relpath(svg, out))
                    else:
                        errors.append(f"dot -Tsvg {name}: {r.stderr.strip()}")
    if mlir:
        try:
            write("final.mlir", graph_mlir(final_gm))
        except Exception as e:  # noqa: BLE001 - any importer failure is reported, the rest still written
            errors.append(f"--mlir: torch-mlir could not import the rewritten graph: {type(e).__name__}: {e}")
    if errors:
        write("dump_errors.txt", "\n".join(errors) + "\n")
        for e in errors:
            log.warning("attnlower dump (graph %d): %s", report.graph_id, e)
    files.append("report.json")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({**report.to_dict(), "counts": report_counts(report), "files": sorted(files),
                   "dump_errors": errors}, f, indent=2, default=str)
    # progress: a large model makes many graphs, and each one takes its compile time
    print(f"attnlower dump: graph {report.graph_id}: {len(report.sites)} site(s), {report.count()} rewritten, "
          f"passes {report.seconds_in_passes:.2f} s, {len(files)} file(s) -> {out}"
          + (f" ({len(errors)} not written)" if errors else ""), file=sys.stderr, flush=True)
    return out


_SAID: set[str] = set()


def _say_once(key: str, text: str) -> None:
    """Print a note to stderr once per process (not once per graph)."""
    if key not in _SAID:
        _SAID.add(key)
        print(text, file=sys.stderr, flush=True)
