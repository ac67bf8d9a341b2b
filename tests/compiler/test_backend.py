"""compiler/backend.py, the driver: what a user gets when something below it fails (the graph compiled
unmodified, the reason in the report, a repro file that runs), and graph breaks attributed to the graph
they preceded."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from attnlower.compiler import backend


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 5, 16, generator=g) for _ in range(3)]


def _compile(fn, *args, **options):
    torch._dynamo.reset()
    start = len(backend.reports())
    out = torch.compile(fn, backend="attnlower", options={"inner": "eager", **options})(*args)
    return out, backend.reports()[start:]


def test_a_graph_that_cannot_be_traced_to_aten_runs_unmodified_with_the_reason(monkeypatch, tmp_path, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("trace broken on purpose")

    monkeypatch.setattr(backend, "to_aten", broken)
    args = _qkv()
    out, (report,) = _compile(attention, *args, repro_dir=str(tmp_path))
    torch.testing.assert_close(out, attention(*args))
    assert report.error.startswith("canonicalization to aten failed, RuntimeError: trace broken on purpose")
    assert report.sites == [] and report.repro and report.repro.startswith(str(tmp_path))
    compile(open(report.repro).read(), report.repro, "exec")   # the repro is valid Python
    assert any("could not trace graph" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception, match="trace broken on purpose"):
        _compile(attention, *args, strict=True)


def test_the_repro_of_a_failed_stage_replays_the_stages(monkeypatch, tmp_path):
    """A stage that fails leaves the graph unmodified and a repro file; the file, run as a script, replays
    the real stages (strict) on the same aten graph: here, with the failure patched in only for the test,
    they run through."""
    import dataclasses

    from attnlower.passes import pipeline

    def failing(gm, ctx):
        raise RuntimeError("stage broken on purpose")

    stages = list(pipeline.STAGES)
    stages[1] = dataclasses.replace(stages[1], run=failing)
    monkeypatch.setattr(pipeline, "STAGES", type(pipeline.STAGES)(stages))
    args = _qkv()
    out, (report,) = _compile(attention, *args, repro_dir=str(tmp_path))
    torch.testing.assert_close(out, attention(*args))
    assert "stage broken on purpose" in report.error and all(s.op is None for s in report.sites)
    r = subprocess.run([sys.executable, report.repro], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ran without error" in r.stdout


def test_graph_breaks_belong_to_the_graph_after_them():
    def fn(q, k, v):
        x = attention(q, k, v)
        torch._dynamo.graph_break()
        return attention(x, k, v)

    _, reports = _compile(fn, *_qkv())
    assert len(reports) == 2
    assert [len(r.graph_breaks) for r in reports] == [1, 0]
    assert "graph break" in str(reports[0]) and [r.count() for r in reports] == [1, 1]


def test_a_cuda_graph_with_several_paged_calls_reports_once_per_call(monkeypatch):
    """A graph holding two paged ops (two layers) is wrapped so that one call's bounds reports are copied once
    (errors.batched_reports); one paged op, or a CPU graph, is returned as Inductor / eager compiled it."""
    from attnlower import ops
    from attnlower.lowering import errors

    def layers(q, k_cache, v_cache, table, lens, n: int):
        out = q
        for _ in range(n):
            out = ops.paged_attention(out, k_cache, v_cache, table, lens)
        return out

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 1, 16, generator=g), torch.randn(8, 2, 4, 16, generator=g),
            torch.randn(8, 2, 4, 16, generator=g), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
            torch.tensor([5, 8], dtype=torch.int32))
    returned, batched = [], []
    real = backend.attnlower_backend

    def spy(gm, example_inputs, options=None, **kwargs):
        fn = real(gm, example_inputs, options, **kwargs)
        returned.append(fn)
        return fn

    monkeypatch.setattr(backend, "_reports_lazily", lambda paged, inputs: True)   # as on CUDA
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")                  # the kernel and its flags, interpreted
    real_after = errors._DeviceFlags.after_launch
    monkeypatch.setattr(errors._DeviceFlags, "after_launch",
                        lambda self, q_shape=None: batched.append(getattr(errors._batch, "pending", None) is not None)
                        or real_after(self, q_shape))
    for n, wrapped in ((2, True), (1, False)):
        torch._dynamo.reset()
        returned.clear()
        compiled = torch.compile(lambda *a: layers(*a, n), backend=spy, options={"inner": "eager"})
        for _ in range(2):   # a first call may run the graph with its first-call checks instead
            batched.clear()
            out = compiled(*args)
        assert batched == [wrapped] * n
        torch.testing.assert_close(out, layers(*args, n))
        assert any(isinstance(fn, backend.OneReportPerCall) for fn in returned) == wrapped
    assert backend._paged_calls(torch.fx.symbolic_trace(lambda x: x)) == []


def test_paged_reports_are_lazy_where_the_paged_ops_run_on_cuda():
    """The batching wrapper is for CUDA paged ops: their device is read from the nodes' values (a CPU first input
    does not hide them), else from the example inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.aten.relu.default, (graph.placeholder("x"),))
    cpu_inputs = [torch.zeros(1)]
    assert not backend._reports_lazily([node], cpu_inputs)                  # no value: the inputs' device
    with FakeTensorMode():
        node.meta["val"] = torch.empty(2, device="cuda")
    assert backend._reports_lazily([node], cpu_inputs)
    node.meta["val"] = torch.empty(2)
    assert not backend._reports_lazily([node], cpu_inputs)
