"""The attnlower torch.compile backend: the driver of one compile.

    torch.compile(model, backend="attnlower", options={"inner": "eager", "explain": True})

For each graph Dynamo hands over, top to bottom:
    options -> canonicalize (Dynamo's graph to pre-dispatch aten) -> the pass stages
    (`passes/pipeline.STAGES`, on the graph and every checkpoint body) -> the report -> inner compiler.
If a stage raises, the backend logs a warning with a repro file and compiles the unmodified graph
(`strict=True` re-raises). So does a failure to trace Dynamo's graph to aten: Dynamo's graph is then
compiled as it came.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
import time
import traceback
from typing import Sequence

import torch
import torch.fx as fx

from ..lowering.errors import batched_reports
from ..passes.canonicalize import checkpoint_bodies, fake_mode_for, to_aten
from ..passes.pipeline import run_stages
from ..passes.validate_first_call import FirstCallChecked, split_first_call_checks
from ..passes.site import Context
from ..report.records import CompileReport, keep, reports
from ..report.rows import site_rows
from ..report.words import describe_sites
from ..target import inductor_launches_kernels, target_for
from .graph_breaks import new_graph_breaks
from .options import Options

log = logging.getLogger("attnlower")

_graph_ids = itertools.count()
__all__ = ["attnlower_backend", "reports"]   # reports(): every CompileReport of this process (report/records.py)


def attnlower_backend(gm: fx.GraphModule, example_inputs: Sequence[object], options=None, **kwargs):
    """The torch.compile backend. `options` is the dict given to torch.compile(options=...); `mode`
    (torch.compile(mode=...), which torch passes as a keyword) selects the inner Inductor's mode."""
    if kwargs:
        options = {**(options or {}), **kwargs}
    opts = Options.from_mapping(options)
    graph_id = next(_graph_ids)
    target = target_for(_device_of(example_inputs))
    report = keep(CompileReport(graph_id=graph_id, target=target.describe(), inner=opts.inner,
                                graph_breaks=new_graph_breaks(), passes_enabled=opts.enable))

    try:
        aten_gm = to_aten(gm, example_inputs)
    except Exception as e:
        if opts.strict:
            raise
        return _compile_untraced(gm, example_inputs, opts, report, e)
    before_gm = aten_gm  # the stages work on a copy: this stays the graph they started from
    before_text = aten_gm.print_readable(print_output=False) if opts.dump_dir else None
    snapshots: list[tuple[str, str]] = []
    if opts.enable:
        aten_gm, snapshots = _run_passes(aten_gm, example_inputs, opts, target, report)
    # sites validated on the first call: their checks run in a copy of the graph, on that call only
    aten_gm, first_call = split_first_call_checks(aten_gm)
    describe_sites(report, before_gm, gm, target, explain=opts.explain)   # the user's names, why this op, savings
    if opts.explain:
        print(report.table())
    if opts.dump_dir:
        from ..report.dump import write_graph_dump

        write_graph_dump(opts.dump_dir, report, gm, before_text, snapshots, aten_gm,
                         before_gm=before_gm, mlir=opts.dump_mlir, dot=opts.dump_dot)
    if opts.inner == "eager":
        compiled = aten_gm
    else:
        from .inductor import compile_with_inductor

        with _checkpoint_remat_off(aten_gm):
            compiled = compile_with_inductor(aten_gm, example_inputs, opts.mode, dynamo_gm=gm)
    paged = _paged_calls(aten_gm)
    if len(paged) > 1 and _reports_lazily(paged, example_inputs):
        compiled = OneReportPerCall(compiled)
    if first_call is None:
        return compiled
    tracing = torch._guards.TracingContext.try_get()

    def recompile():   # a site failed its first-call check: the graph again, that site refused (validate)
        with torch._guards.tracing(tracing) if tracing is not None else contextlib.nullcontext():
            return attnlower_backend(gm, example_inputs, options)

    return FirstCallChecked(compiled, *first_call, report, strict=opts.strict, recompile=recompile)


def _reports_lazily(paged: list[fx.Node], example_inputs) -> bool:
    """Whether these paged ops report bad inputs lazily, through host copies: on CUDA (CPU raises at the call). Their
    device is their output's (the example input's where a node carries no value)."""
    devices = {n.meta["val"].device.type for n in paged if isinstance(n.meta.get("val"), torch.Tensor)}
    return "cuda" in devices if devices else _device_of(example_inputs).type == "cuda"


def _paged_calls(gm: fx.GraphModule) -> list[fx.Node]:
    # by name: a graph without attnlower's ops may reach the backend before they are registered
    return [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target.name() == "attnlower::paged_attention"]


class OneReportPerCall:
    """A compiled graph holding several paged ops (one per layer): the bounds reports of one call's paged launches
    are copied to the host once, when the call ends (lowering/errors.py, batched_reports), not once per launch."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args):   # unpacked, as Dynamo calls a backend's result (FirstCallChecked says why)
        with batched_reports():
            return self.compiled(*args)


def _run_passes(aten_gm: fx.GraphModule, example_inputs, opts: Options, target, report: CompileReport):
    """The pass stages on a copy of `aten_gm`: (the graph to compile, the dump's per-stage snapshots).

    Fills the report's sites and stage timings; when a stage raises, the unmodified `aten_gm` comes back
    and the report says why (strict=True re-raises)."""
    ctx = Context(target=target, fake_mode=fake_mode_for(example_inputs), allowed_ops=opts.ops,
                  validate=opts.validate, repro_dir=opts.repro_dir, check_stages=opts.check_stages)
    work = _copy(aten_gm)
    snapshots: list[tuple[str, str]] = []

    def on_stage(name: str, seconds: float, summary: str) -> None:
        report.passes.append({"name": name, "seconds": seconds, "summary": summary})
        if opts.dump_dir:   # a file name: "find_anchors_wrap_body_0" for a checkpoint body
            snapshots.append((name.replace(" [", "_").replace("]", "").replace(".", "_"),
                              work.print_readable(print_output=False)))

    started = time.perf_counter()
    result = work
    try:
        run_stages(work, ctx, on_stage)
    except Exception as e:
        if opts.strict:
            raise
        report.error = f"{type(e).__name__}: {e}"
        report.repro = _write_repro(aten_gm, example_inputs, e, opts)
        result = aten_gm
    finally:
        report.sites = site_rows(ctx.sites, target, kernel_plans=bool(opts.dump_dir),
                                 traced=bool(opts.dump_dir) and inductor_launches_kernels(target, opts.inner))
        report.seconds_in_passes = time.perf_counter() - started
    if report.error:
        for s in report.sites:
            s.op, s.reason = None, f"passes failed: {report.error}"
        log.warning("attnlower: a pass failed on graph %d (%s); compiling it unmodified. Repro: %s",
                    report.graph_id, report.error, report.repro)
    return result, snapshots


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
