"""`attnlower.inspect`, the public entry of the report, as a user calls it in a process that has other
compiled code: it reports every time and leaves the caller's compiled functions alone."""
from __future__ import annotations

import torch

import attnlower


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v


def test_inspect_leaves_the_callers_compiled_functions_alone():
    compiles = []

    def users_backend(gm, example_inputs):
        compiles.append(gm)
        return gm

    q = torch.randn(2, 4, 8, 16)
    users = torch.compile(_attention, backend=users_backend)
    users(q, q, q)
    assert len(compiles) == 1
    for _ in range(10):   # more than Dynamo's default recompile limit (8) of one code object
        reports = attnlower.inspect(_attention, q, q, q, options={"inner": "eager"})
        assert [r.count("flash_attention") for r in reports] == [1], str(reports)
    users(q, q, q)
    assert len(compiles) == 1, "inspect() made the caller's compiled function recompile"


def test_inspect_reports_a_first_compile_whatever_shapes_came_before():
    """Earlier compiles of the same code with other shapes would make Dynamo mark sizes dynamic; inspect
    reports what a first compile does (static shapes) unless asked for dynamic=True."""
    for t in (8, 12, 20):
        q = torch.randn(2, 4, t, 16)
        (report,) = attnlower.inspect(_attention, q, q, q, options={"inner": "eager"})
        assert report.sites[0].shapes["q"] == f"[2, 4, {t}, 16]", report.table()


def test_inspect_checks_its_options_before_running():
    ran = []

    def fn(x):
        ran.append(1)
        return x * 2

    try:
        attnlower.inspect(fn, torch.ones(2), options={"explian": True})
    except ValueError as e:
        assert "explian" in str(e) and "explain" in str(e)
    else:
        raise AssertionError("a misspelled option was accepted")
    assert not ran
