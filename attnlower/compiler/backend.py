"""The attnlower torch.compile backend: canonicalize → passes → inner compiler.

    torch.compile(model, backend="attnlower", options={"inner": "eager", "explain": True})

The pipeline is a flat list of named passes (`PASSES`), each `(GraphModule, Context) -> str` (a
one-line summary for the report), each recording what it did in the graph's CompileReport. If any
pass raises, the backend logs a warning with a repro file and compiles the unmodified graph
(`strict=True` re-raises). So does a failure to trace Dynamo's graph to aten: Dynamo's graph is
then compiled as it came.
"""
from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.fx as fx

from ..passes.analyze import Refused, analyze_site
from ..passes.detect import AttentionMatch, Refusal, find_attention_sites
from ..passes.rewrite import NotConvex, check_convex, graph_digraph, rewrite_site
from ..passes.validate import validate_rewrite
from .canonicalize import checkpoint_bodies, fake_mode_for, subclass_attention_refusals, to_aten
from .dump import format_dims, kernel_plan, memory_estimate
from .graph_breaks import new_graph_breaks
from .hardware import Target, target_for
from .options import Options
from .report import CompileReport, Site, describe_sites

log = logging.getLogger("attnlower")

_graph_ids = itertools.count()
_REPORTS: list[CompileReport] = []


def reports() -> list[CompileReport]:
    """Every CompileReport made in this process, oldest first."""
    return list(_REPORTS)


@dataclass
class Context:
    """What the passes share for one graph."""

    options: Options
    target: Target
    report: CompileReport
    fake_mode: object
    found: list = field(default_factory=list)
    sites: list = field(default_factory=list)      # the report's sites for `found` (this graph's)
    in_checkpoint: bool = False                     # the graph is the body of a torch.utils.checkpoint call
    rewrites: list = field(default_factory=list)   # Rewrite records, for validation


@dataclass
class Rewrite:
    """One rewritten site: `old` is the replaced node (in the graph until DCE), `new` its replacement."""

    site: Site
    old: fx.Node
    new: fx.Node


# --------------------------------------------------------------------------------------------
# the passes

def detect(gm: fx.GraphModule, ctx: Context) -> str:
    """Find every softmax / SDPA anchored site; refusals are recorded with their reason."""
    ctx.found = find_attention_sites(gm) + subclass_attention_refusals(gm)  # + attention left to DTensor
    ctx.sites = []
    for f in ctx.found:
        site = Site(index=len(ctx.report.sites), location=f.location, spelling=f.spelling)
        if isinstance(f, Refusal):
            site.reason = f.reason
            site.region = [f.anchor.name]
        else:
            site.region = [n.name for n in f.region]
            # logical [B, H, T, D] whatever the source layout (BSHD, flattened B*H, repeated KV heads)
            site.shapes = {
                "q": format_dims((f.batch, f.q_heads, f.q_len, f.head_dim)),
                "k": format_dims((f.batch, f.kv_heads, f.k_len, f.head_dim)),
                "v": format_dims((f.batch, f.kv_heads, f.k_len, f.v_head_dim)),
            }
        ctx.report.sites.append(site)
        ctx.sites.append(site)
    n_ok = sum(isinstance(f, AttentionMatch) for f in ctx.found)
    return f"{len(ctx.found)} candidate(s), {n_ok} proven"


def analyze_and_rewrite(gm: fx.GraphModule, ctx: Context) -> str:
    """Classify masks, choose the op, check convexity, and rewrite each proven site."""
    dg = graph_digraph(gm)
    done = 0
    for f, site in zip(ctx.found, ctx.sites):
        if not isinstance(f, AttentionMatch):
            continue
        site.memory = memory_estimate(f)
        try:
            decision = analyze_site(f, ctx.target, ctx.options.ops)
            site.mask = f"{decision.mask.kind}"
            if ctx.in_checkpoint and decision.spec.dropout_p:
                # the checkpoint's recomputation would draw a new dropout mask for the op (no RNG replay)
                raise Refused("dropout inside torch.utils.checkpoint: the recomputation would not replay the mask")
            check_convex(dg, f.region, f.output)
        except (Refused, NotConvex) as e:
            site.reason = str(e)
            continue
        created: list[fx.Node] = []
        site.nodes = rewrite_site(gm, f, decision, ctx.fake_mode, created)
        inserted = set(created)
        # the replacement: the one inserted node that the replaced node's users now read
        (new,) = [n for n in created if any(u not in inserted for u in n.users)]
        ctx.rewrites.append(Rewrite(site, f.output, new))
        site.op = decision.spec.op
        site.spec = decision.spec.as_dict()
        site.reason = decision.reason
        if ctx.options.dump_dir:  # the kernel plan imports the launchers (triton): only for the dump
            site.kernel = kernel_plan(decision.spec, ctx.target, f.q_len)
        done += 1
    return f"{done} rewritten"


def validate(gm: fx.GraphModule, ctx: Context) -> str:
    """Translation validation: evaluate each rewrite against the region it replaced, in float64 on
    CPU on random boundary inputs; undo the rewrites that differ (passes/validate.py)."""
    if not ctx.options.validate:
        for r in ctx.rewrites:
            r.site.validated = "not checked: options validate=False"
        return "off (validate=False)"
    shape_env = getattr(ctx.fake_mode, "shape_env", None)
    refused = cached = unchecked = 0
    for r in ctx.rewrites:
        verdict = validate_rewrite(gm, r.old, r.new, shape_env=shape_env, repro_dir=ctx.options.repro_dir)
        r.site.validated = verdict.checked_on
        cached += verdict.cached
        unchecked += verdict.checked_on.startswith("not validated")
        if not verdict.ok:
            # undo: the old output is still in the graph; the inserted nodes die in DCE
            r.new.replace_all_uses_with(r.old)
            r.site.op, r.site.spec, r.site.kernel, r.site.nodes = None, None, None, []
            r.site.reason = verdict.reason
            r.site.validation_repro = verdict.repro
            refused += 1
            log.warning("attnlower: site %d (%s) refused: %s", r.site.index, r.site.location, verdict.reason)
    return (f"{len(ctx.rewrites)} checked ({cached} by an identical earlier site), {refused} refused, "
            f"{unchecked} too large to check")


def dead_code_eliminate(gm: fx.GraphModule, ctx: Context) -> str:
    """Drop the replaced regions and whatever only fed them (repeats, mask builders)."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return f"{before - len(gm.graph.nodes)} node(s) removed"


PASSES: list[tuple[str, Callable[[fx.GraphModule, Context], str]]] = [
    ("detect", detect),
    ("analyze+rewrite", analyze_and_rewrite),
    ("validate", validate),
    ("dead-code-eliminate", dead_code_eliminate),
]


# --------------------------------------------------------------------------------------------
# the backend

def attnlower_backend(gm: fx.GraphModule, example_inputs: Sequence[object], options=None, **kwargs):
    """The torch.compile backend. `options` is the dict given to torch.compile(options=...); `mode`
    (torch.compile(mode=...), which torch passes as a keyword) selects the inner Inductor's mode."""
    if kwargs:
        options = {**(options or {}), **kwargs}
    opts = Options.from_mapping(options)
    graph_id = next(_graph_ids)
    device = _device_of(example_inputs)
    target = target_for(device)
    report = CompileReport(graph_id=graph_id, target=target.describe(), inner=opts.inner,
                           graph_breaks=new_graph_breaks())
    _REPORTS.append(report)

    try:
        aten_gm = to_aten(gm, example_inputs)
    except Exception as e:
        if opts.strict:
            raise
        return _compile_untraced(gm, example_inputs, opts, report, e)
    before_gm = aten_gm  # the passes work on a copy: this stays the graph they started from
    before_text = aten_gm.print_readable(print_output=False) if opts.dump_dir else None
    snapshots: list[tuple[str, str]] = []
    if opts.enable:
        ctx = Context(opts, target, report, fake_mode_for(example_inputs))
        work = _copy(aten_gm)
        t0 = time.perf_counter()
        try:
            # the graph, then the body of every torch.utils.checkpoint call in it (private copies)
            for label, graph in [("", work)] + [(f" [{path}]", body) for path, body in checkpoint_bodies(work)]:
                ctx.in_checkpoint = bool(label)
                ctx.rewrites = []   # validation checks this graph's rewrites, in this graph
                for name, fn in PASSES:
                    t = time.perf_counter()
                    summary = fn(graph, ctx)
                    report.passes.append({"name": name + label, "seconds": time.perf_counter() - t,
                                          "summary": summary})
                    if opts.dump_dir:   # a file name: "detect_wrap_body_0" for a checkpoint body
                        snapshots.append((name + label.replace(" [", "_").replace("]", "").replace(".", "_"),
                                          work.print_readable(print_output=False)))
            aten_gm = work
        except Exception as e:
            if opts.strict:
                raise
            report.error = f"{type(e).__name__}: {e}"
            report.repro = _write_repro(aten_gm, example_inputs, e, opts)
            for s in report.sites:
                s.op, s.reason = None, f"passes failed: {report.error}"
            log.warning("attnlower: a pass failed on graph %d (%s); compiling it unmodified. Repro: %s",
                        graph_id, report.error, report.repro)
        report.seconds_in_passes = time.perf_counter() - t0
    describe_sites(report, before_gm, gm, target, explain=opts.explain)   # the user's names, why this op, savings
    if opts.explain:
        print(report.table())
    if opts.dump_dir:
        from .dump import write_graph_dump

        write_graph_dump(opts.dump_dir, report, gm, before_text, snapshots, aten_gm,
                         before_gm=before_gm, mlir=opts.dump_mlir, dot=opts.dump_dot)
    if opts.inner == "eager":
        return aten_gm
    from .inductor import compile_with_inductor

    with _checkpoint_remat_off(aten_gm):
        return compile_with_inductor(aten_gm, example_inputs, opts.mode, dynamo_gm=gm)


def _checkpoint_remat_off(gm: fx.GraphModule):
    """torch 2.13's AOTAutograd runs a rematerialization pass for forward-loss-backward graphs on
    inference graphs too, and it rejects ops tagged random (our ops are: they draw the dropout seed)
    inside a checkpoint body. Our graphs never hold a backward, so that pass has nothing to do: off
    while a graph with fused checkpoint bodies compiles. Absent on older torch: nothing to turn off."""
    import contextlib

    fused_in_body = any(n.op == "call_function" and str(n.target).startswith("attnlower.")
                        for _, body in checkpoint_bodies(gm, copy=False) for n in body.graph.nodes)
    config = torch._functorch.config
    if not fused_in_body or not hasattr(config, "remat_using_tags_for_fwd_loss_bwd_graph"):
        return contextlib.nullcontext()
    return config.patch(remat_using_tags_for_fwd_loss_bwd_graph=False)


def _compile_untraced(gm: fx.GraphModule, example_inputs, opts: Options, report: CompileReport, err: Exception):
    """Canonicalization failed: Dynamo's graph goes to the inner compiler as it came, no site rewritten.

    The passes need the aten graph, so none ran; the error (and a repro of Dynamo's graph) is in the report.
    """
    report.error = f"canonicalization to aten failed, {type(err).__name__}: {err}"
    report.repro = _write_repro(gm, example_inputs, err, opts)
    log.warning("attnlower: could not trace graph %d to aten (%s); compiling it unmodified. Repro: %s",
                report.graph_id, report.error, report.repro)
    if opts.explain:
        print(report.table())
    if opts.inner == "eager":
        return gm
    from .inductor import compile_with_inductor

    return compile_with_inductor(gm, example_inputs, opts.mode)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    import copy

    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    # deepcopy keeps node.meta (FakeTensors are shared, which is what we want)
    return new


def _device_of(example_inputs) -> torch.device:
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _write_repro(gm: fx.GraphModule, example_inputs, err: Exception, opts: Options) -> str:
    """A file holding the aten graph, the inputs' shapes and the traceback, to replay the failure."""
    folder = opts.repro_dir or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="attnlower_repro_", suffix=".py", dir=folder)
    shapes = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            shapes.append(f"torch.randn({list(x.shape)}, dtype={x.dtype}).to({str(x.device)!r})"
                          if x.is_floating_point() else f"torch.zeros({list(x.shape)}, dtype={x.dtype})")
        else:
            shapes.append(repr(int(x)) if isinstance(x, (int, torch.SymInt)) else repr(x))
    with os.fdopen(fd, "w") as f:
        f.write("# attnlower repro: the aten graph a pass failed on.\n")
        f.write("# Run: python this_file.py  (replays the passes with strict=True)\n")
        # each formatted chunk may hold several lines (frame + source line): comment every one
        f.write("".join("# " + ln + "\n" for chunk in traceback.format_exception(err)
                        for ln in chunk.rstrip("\n").splitlines()))
        f.write("import torch\nfrom torch import device\nfrom math import inf, nan  # printed graphs spell them bare\n"
                "import attnlower\n")
        f.write("from attnlower.compiler.backend import attnlower_backend\n\n")
        f.write(gm.print_readable(print_output=False).replace("class <lambda>", "class Repro"))
        f.write("\n\nif __name__ == '__main__':\n")
        f.write(f"    inputs = [{', '.join(shapes)}]\n")
        # through Dynamo, as the original graph came: static shapes and stack traces, as the passes saw them
        dynamic = any(isinstance(x, torch.SymInt) for x in example_inputs)
        f.write(f"    compiled = torch.compile(Repro(), backend=attnlower_backend, fullgraph=True, dynamic={dynamic},\n"
                "                             options={'strict': True, 'inner': 'eager', 'explain': True})\n")
        f.write("    compiled(*inputs)\n")
        f.write("    print('attnlower repro: the passes and the rewritten graph ran without error')\n")
    return path
