"""The graph dump (report/dump.py, written by `attnlower dump`): every file it promises exists and parses,
the counts agree, and a failed pass leaves a repro that runs.

The script dumped is tests/report/dump_script.py: one compiled function with a hand-written causal
site (-> flash_attention), an SDPA band-mask site (-> sliding_window_attention) and a softmax that
is not attention (refused).
"""
from __future__ import annotations

import importlib.util
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnlower.passes import pipeline
from attnlower import cli
from attnlower.report import dump

SCRIPT = str(Path(__file__).with_name("dump_script.py"))
SEQ_LEN = 11      # passed through to the script: the dumped shapes must show it
EXPECTED = {"sites": 3, "rewritten": 2, "refused": 1,
            "by_op": {"flash_attention": 1, "sliding_window_attention": 1}}


def _graph_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("graph_"))


def _pass_files() -> list[str]:
    return [f"{i + 2:02d}_{stage.name}.txt" for i, stage in enumerate(pipeline.STAGES)]


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """One in-process run with every option available here; (exit code, stdout, the graph's folder)."""
    out = tmp_path_factory.mktemp("dump")
    flags = ["--dot"] + (["--mlir"] if dump.torch_mlir_available() else [])
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["dump", SCRIPT, "--seq-len", str(SEQ_LEN), "--out", str(out), *flags])
    (graph,) = _graph_dirs(out)
    return rc, buf.getvalue(), graph


def test_dump_writes_every_graph_file(dumped):
    rc, stdout, graph = dumped
    assert rc == 0, stdout
    for name in ["00_dynamo.txt", "01_aten.txt", *_pass_files(), "final.txt", "sites.md", "report.json"]:
        assert (graph / name).is_file(), f"{name} missing; have {sorted(os.listdir(graph))}"
    assert "aten.softmax" in (graph / "01_aten.txt").read_text()
    final = (graph / "final.txt").read_text()
    assert "attnlower.flash_attention" in final and "attnlower.sliding_window_attention" in final
    assert "1 graph(s) compiled, 2 attention site(s) rewritten, 1 left unfused" in stdout
    assert str(graph) in stdout


def test_report_json_counts_match(dumped):
    _, _, graph = dumped
    report = json.loads((graph / "report.json").read_text())
    assert report["counts"] == EXPECTED
    sites = report["sites"]
    assert len(sites) == EXPECTED["sites"]
    assert sum(s["op"] is not None for s in sites) == EXPECTED["rewritten"]
    assert report["dump_errors"] == []
    assert sorted(report["files"]) == sorted(p.relative_to(graph).as_posix() for p in graph.rglob("*") if p.is_file())
    assert sites[0]["shapes"]["q"] == f"[2, 3, {SEQ_LEN}, 8]"   # the script got its own argument
    assert sites[0]["region"] and sites[2]["region"]
    mem = sites[0]["memory"]
    scores = 2 * 3 * SEQ_LEN * SEQ_LEN * 4                     # one fp32 [B, H, Tq, Tk] tensor
    assert mem["unfused_bytes"] == 4 * scores                  # matmul, div, masked_fill, softmax
    assert mem["fused_bytes"] == 2 * 3 * SEQ_LEN * 8 * 4 + 2 * 3 * SEQ_LEN * 4   # out + fp32 lse
    assert sites[1]["memory"]["unfused_bytes"] is None         # SDPA: inside aten


def test_sites_md_has_one_row_per_site(dumped):
    _, _, graph = dumped
    text = (graph / "sites.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    assert len(rows) == EXPECTED["sites"]
    assert "dump_script.py:" in rows[0] and "flash_attention" in rows[0] and "_flash_fwd_kernel" in rows[0]
    assert "sliding_window_attention" in rows[1]
    assert "(unfused)" in rows[2] and "not a matmul" in rows[2]
    assert "KiB vs" in rows[0]
    assert "not sliding" in rows[0] and "not flash" in rows[1] and "not materialized" in rows[0]
    assert "| validation |" in text
    assert rows[0].rstrip(" |").split("| ")[-1].startswith("passed on float64 CPU, 3 input draws"), rows[0]


def test_kernel_sources_load_and_name_their_constexprs(dumped):
    _, _, graph = dumped
    files = sorted((graph / "kernels").glob("*.py"))
    assert [f.name for f in files] == ["site00_flash_attention.py", "site01_sliding_window_attention.py"]
    for f in files:
        text = f.read_text()
        assert "@triton.jit" in text and "HEAD_DIM = 8" in text and "BLOCK_M =" in text
        for helper in ("def _fwd_inner(", "def _scores(", "def _load_tile(", "LOG2E"):   # callees come along
            assert helper in text, f"{f.name} lacks {helper}"
        module = _load_module(f)                     # self-contained: every helper and constant included
        # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1
        assert module._flash_fwd_kernel.fn.__name__ == "_flash_fwd_kernel"
    assert "HAS_WINDOW = True" in files[1].read_text()
    assert "HAS_WINDOW = False" in files[0].read_text()


def test_dot_regions_parse(dumped):
    pytest.importorskip("pydot", reason="pydot is in the test extra: pip install -e '.[test]'")
    import networkx as nx

    _, _, graph = dumped
    report = json.loads((graph / "report.json").read_text())
    for site in report["sites"]:
        g = nx.nx_pydot.read_dot(graph / "regions" / f"site{site['index']:02d}.dot")
        names = {n.strip('"') for n in g.nodes}
        assert set(site["region"]) <= names
        if shutil.which("dot"):
            assert (graph / "regions" / f"site{site['index']:02d}.svg").is_file()


def test_mlir_parses_with_attnlower_ops_as_torch_operator(dumped):
    if not dump.torch_mlir_available():
        pytest.skip("torch-mlir is not installed (extra attnlower[mlir]); --mlir fails with a message naming it")
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_dialect

    _, _, graph = dumped
    ctx = ir.Context()
    torch_dialect.register_dialect(ctx)
    module = ir.Module.parse((graph / "final.mlir").read_text(), ctx)
    assert module.operation.verify()
    (func,) = module.body.operations
    operators = [str(op.attributes["name"]).strip('"') for op in func.regions[0].blocks[0].operations
                 if op.operation.name == "torch.operator"]
    assert operators == ["torch.attnlower.flash_attention", "torch.attnlower.sliding_window_attention"]


def test_failed_pass_writes_a_repro_that_runs(monkeypatch, tmp_path):
    def explode(gm, ctx):
        raise RuntimeError("injected failure")

    first, *rest = pipeline.STAGES
    monkeypatch.setattr(pipeline, "STAGES", (first, pipeline.Stage("explode", explode, first.promise), *rest))
    assert cli.main(["dump", SCRIPT, "--out", str(tmp_path)]) == 1      # a failed pass is a failed dump
    (graph,) = _graph_dirs(tmp_path)
    report = json.loads((graph / "report.json").read_text())
    assert "injected failure" in report["error"] and report["counts"]["rewritten"] == 0
    repro = Path(report["repro"])
    assert repro.parent == tmp_path and "injected failure" in repro.read_text()
    monkeypatch.undo()   # the repro replays the real passes, which succeed on this graph
    run = subprocess.run([sys.executable, str(repro)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 rewritten" in run.stdout and "ran without error" in run.stdout


def test_progress_per_graph_and_no_graphviz_note(monkeypatch, tmp_path, capsys):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "dot" else real_which(name, *a, **k))
    monkeypatch.setattr(dump, "_SAID", set())
    rc = cli.main(["dump", SCRIPT, "--out", str(tmp_path), "--dot"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("Graphviz's `dot` is not on PATH") == 1, err      # said once, not once per graph
    (graph,) = _graph_dirs(tmp_path)
    n = int(graph.name.split("_")[1])
    assert re.search(rf"attnlower dump: graph {n}: 3 site\(s\), 2 rewritten, passes [\d.]+ s, \d+ file\(s\) -> ", err), err
    assert not list(graph.glob("regions/*.svg")) and len(list(graph.glob("regions/*.dot"))) == 3


def test_region_dot_has_a_legend_and_marks_the_proven_mask(dumped):
    _, _, graph = dumped
    causal = (graph / "regions" / "site00.dot").read_text()
    band = (graph / "regions" / "site01.dot").read_text()
    refused = (graph / "regions" / "site02.dot").read_text()
    for text in (causal, band, refused):
        assert "subgraph cluster_legend" in text and "fillcolor=orange" in text   # the legend's mask entry
    # the tril mask feeding masked_fill, and SDPA's attn_mask, are drawn as the mask with what was proven
    assert "mask, proven: causal" in causal and "dropped: the kernel applies it itself" in causal
    assert "mask, proven: band" in band
    assert "mask, proven" not in refused.split("subgraph cluster_legend")[0]    # the gate has no mask
