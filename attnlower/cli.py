"""The `attnlower` command: `attnlower demo`, `attnlower dump SCRIPT [args] --out DIR [--mlir] [--dot]`."""
from __future__ import annotations

import argparse
import os
import runpy
import shutil
import sys
import traceback

DUMP_DESCRIPTION = """\
Run SCRIPT with every torch.compile in it routed through attnlower (whatever backend it names),
and write, for each compiled graph, under OUT/graph_NNN/:

  00_dynamo.txt            the graph Dynamo captured
  01_aten.txt              that graph as pre-dispatch aten (what the passes see)
  02_<stage>.txt, ...      the graph after each attnlower pass stage; final.txt: what the inner compiler gets
  sites.md                 every attention site: source location, shapes, mask, op, kernel config,
                           memory of the fused op vs the unfused subgraph, and why (or why not)
  kernels/siteNN_<op>.py   the @triton.jit sources the chosen op launches, with the constexprs fixed
  report.json              the report (sites, passes, counts, files written)
  final.mlir               with --mlir
  regions/siteNN.dot       with --dot: each site's region, the mask it applies, a legend;
  regions/siteNN.svg       rendered only where Graphviz's `dot` is installed (the tool says when not)

One line per graph is printed to stderr as it is written (a large model makes many graphs).

Arguments after SCRIPT go to the script, except --out/--mlir/--dot, which attnlower takes
wherever they appear; put the script's own arguments of those names after `--`:
  attnlower dump train.py --steps 2 --out dump/            (the script gets --steps 2)
  attnlower dump --out dump/ train.py -- --out ckpt/       (the script gets --out ckpt/)

If a pass fails on a graph, that graph is compiled unmodified and a repro script replaying it is
written to OUT (its path is printed). Exit status: 0 when every graph was dumped and no pass failed,
1 otherwise, 2 for a usage error (e.g. --mlir without torch-mlir)."""

_OWN_FLAGS = {"--out": True, "--mlir": False, "--dot": False}   # flag -> takes a value


def _split_dump_args(rest: list[str]) -> tuple[list[str], list[str]]:
    """Split what follows SCRIPT into (attnlower's flags, the script's arguments); `--` ends ours."""
    own, script = [], []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            script += rest[i + 1:]
            break
        name = arg.split("=", 1)[0]
        if name in _OWN_FLAGS:
            own.append(arg)
            if _OWN_FLAGS[name] and "=" not in arg and i + 1 < len(rest):
                own.append(rest[i + 1])
                i += 1
        else:
            script.append(arg)
        i += 1
    return own, script


def _forced_compile(real_compile, options: dict):
    """torch.compile with backend="attnlower" and the dump options, whatever the script asked for."""
    def compile_through_attnlower(model=None, *args, **kw):
        backend = kw.get("backend", "inductor")
        opts = dict(kw.get("options") or {}) if backend == "attnlower" else {}
        if backend != "attnlower":
            print(f"attnlower dump: torch.compile(backend={backend!r}) routed through attnlower"
                  + ("; its options are dropped" if kw.get("options") else ""), file=sys.stderr)
        opts.update(options)
        kw.update(backend="attnlower", options=opts)
        kw.pop("mode", None)   # mode and options are exclusive, and mode is Inductor's
        return real_compile(model, *args, **kw) if model is not None else real_compile(*args, **kw)

    return compile_through_attnlower


def _dump(args) -> int:
    import json

    import torch

    import attnlower  # noqa: F401  (torch.compile finds backend="attnlower" through its entry point)
    from attnlower.report.records import reports as all_reports
    from attnlower.report.dump import MLIR_EXTRA_HINT, torch_mlir_available

    if args.mlir and not torch_mlir_available():
        print(f"attnlower dump: {MLIR_EXTRA_HINT}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.script):
        print(f"attnlower dump: expected a Python script, got {args.script!r} (no such file)", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.dot and shutil.which("dot") is None:
        from attnlower.report.dump import _say_once

        _say_once("no_graphviz", "attnlower dump: Graphviz's `dot` is not on PATH: --dot writes regions/siteNN.dot "
                                 "only, no SVG (install Graphviz, e.g. apt-get install graphviz, for the SVGs)")
    print(f"attnlower dump: running {args.script}; one line per compiled graph as it is written", file=sys.stderr)

    torch._dynamo.reset()   # compile every graph afresh, so each one is dumped
    real_compile = torch.compile
    torch.compile = _forced_compile(real_compile, dict(dump_dir=out, repro_dir=out, dump_mlir=args.mlir,
                                                       dump_dot=args.dot))
    start = len(all_reports())
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [args.script] + list(args.script_args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    script_failed = False
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            script_failed = True
            print(f"attnlower dump: {args.script} exited with {e.code}", file=sys.stderr)
    except Exception:  # noqa: BLE001 - the script's error is shown, and what was dumped is still summarized
        script_failed = True
        traceback.print_exc()
        print(f"attnlower dump: {args.script} raised; graphs compiled before that were still dumped",
              file=sys.stderr)
    finally:
        torch.compile = real_compile
        sys.argv, sys.path[:] = saved_argv, saved_path
    reports = all_reports()[start:]
    return _summarize(reports, out, script_failed, json)


def _summarize(reports, out: str, script_failed: bool, json) -> int:
    """Print one line per graph and where its files are; the exit status of `attnlower dump`."""
    rewritten = sum(r.count() for r in reports)
    refused = sum(len(r.refused) for r in reports)
    print(f"attnlower dump: {len(reports)} graph(s) compiled, {rewritten} attention site(s) rewritten, "
          f"{refused} left unfused")
    problems = script_failed or not reports
    for r in reports:
        folder = os.path.join(out, f"graph_{r.graph_id:03d}")
        ops = ", ".join(f"{s.index}: {s.op or 'unfused'}" for s in r.sites) or "no attention"
        print(f"  graph {r.graph_id}: {len(r.sites)} site(s), {r.count()} rewritten ({ops}) -> {folder}")
        if r.error:
            problems = True
            print(f"    passes failed, graph compiled unmodified: {r.error}\n    repro: {r.repro}")
        try:
            with open(os.path.join(folder, "report.json")) as f:
                errors = json.load(f).get("dump_errors") or []
        except OSError as e:
            errors = [f"report.json not written: {e}"]
        for e in errors:
            problems = True
            print(f"    not written: {e}")
    if not reports:
        print("  (the script compiled nothing: did it call torch.compile and run the compiled model?)")
    print(f"written under {out}/graph_NNN/: 00_dynamo.txt, 01_aten.txt, one file per pass, final.txt, "
          "sites.md, kernels/, report.json (+ final.mlir with --mlir, regions/ with --dot)")
    return 1 if problems else 0


def main(argv=None) -> int:
    """Entry point of the `attnlower` console script."""
    parser = argparse.ArgumentParser(prog="attnlower", description="attnlower: attention lowering for torch.compile")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="compile a small GPT-style model on CPU and show what attnlower did")
    demo.add_argument("--inner", choices=["inductor", "eager"], default="inductor",
                      help="compiler for the rest of the graph (default: inductor)")
    demo.add_argument("--seq-len", type=int, default=48)
    dump = sub.add_parser("dump", help="run a script with every torch.compile going through attnlower, "
                                       "and write what each compiled graph became",
                          description=DUMP_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    dump.add_argument("script", help="the Python script to run (as __main__)")
    dump.add_argument("script_args", nargs=argparse.REMAINDER,
                      help="arguments passed to the script (see above for --out/--mlir/--dot among them)")
    dump.add_argument("--out", default="attnlower_dump", metavar="DIR",
                      help="output folder; each compiled graph gets DIR/graph_NNN/ (default: ./attnlower_dump)")
    dump.add_argument("--mlir", action="store_true",
                      help="also write final.mlir: the rewritten graph in MLIR's torch dialect through torch-mlir's "
                           "FX importer (attnlower ops appear as torch.operator); needs the extra attnlower[mlir]")
    dump.add_argument("--dot", action="store_true",
                      help="also write regions/siteNN.dot, a Graphviz graph of each site's region (its nodes, "
                           "inputs and users), and regions/siteNN.svg when Graphviz's `dot` is on PATH")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from attnlower.demo import main as demo_main

        return demo_main(inner=args.inner, seq_len=args.seq_len)
    if args.cmd == "dump":
        own, script_args = _split_dump_args(args.script_args)
        if own:   # flags given after SCRIPT: parse them onto the same namespace
            dump.parse_args([*own, args.script], namespace=args)
        args.script_args = script_args
        return _dump(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
