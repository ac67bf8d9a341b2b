"""Shared by the tests of tests/passes: compile a function with attnlower, compare with eager."""
from __future__ import annotations

import torch

from attnlower.compiler import backend


def compiled_sites(fn, *args, dynamic=False, inner="eager", **options):
    """(compiled result, every site of the graphs compiled) for `fn(*args)` through the backend, strict."""
    torch._dynamo.reset()
    start = len(backend.reports())
    out = torch.compile(fn, backend="attnlower", dynamic=dynamic,
                        options={"inner": inner, "strict": True, **options})(*args)
    reports = backend.reports()[start:]
    errors = [r.error for r in reports if r.error]
    assert not errors, f"passes failed: {errors}"
    return out, [s for r in reports for s in r.sites]


def assert_matches_eager(got, want, rtol=1e-5):
    """Equal to eager: NaN exactly where eager has NaN, elsewhere within `rtol` of the largest value."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN pattern differs from eager"
    if (~nan).any():
        w, g = want[~nan].double(), got[~nan].double()
        err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
        assert err < rtol, f"max relative error {err:.3g} >= {rtol:g}"


def check_fused(fn, *args, op="flash_attention", rtol=1e-5, dynamic=False, inner="eager"):
    """`fn` compiled equals eager and its one site became `op`; returns the site."""
    want = fn(*args)
    got, sites = compiled_sites(fn, *args, dynamic=dynamic, inner=inner)
    assert_matches_eager(got, want, rtol)
    assert len(sites) == 1, [(s.op, s.reason) for s in sites]
    assert sites[0].op == op, f"not rewritten into {op}: {sites[0].op} ({sites[0].reason})"
    return sites[0]


def check_unfused(fn, *args, reason="", dynamic=False):
    """`fn` compiled equals eager and no site was rewritten; a refused site's reason matches `reason`."""
    import re

    want = fn(*args)
    got, sites = compiled_sites(fn, *args, dynamic=dynamic)
    assert_matches_eager(got, want)
    assert all(s.op is None for s in sites), [(s.op, s.reason) for s in sites]
    if reason:
        assert any(re.search(reason, s.reason) for s in sites), [s.reason for s in sites]
    return sites
