"""What the tests share: inputs of the usual shapes, compiling with attnlower and comparing with eager,
and running the first pass stages on the aten graphs a function makes."""
from __future__ import annotations

import re

import torch

from attnlower.compiler import backend

B, H, T, D = 2, 4, 8, 16     # the default attention shapes: batch, heads, length, head dim


def qkv(t: int = T, tk: int | None = None, *, b: int = B, hq: int = H, hkv: int | None = None, d: int = D,
        dtype=torch.float32) -> list[torch.Tensor]:
    """q [b, hq, t, d], k and v [b, hkv, tk, d] (hkv = hq, tk = t by default), from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    tk = t if tk is None else tk
    hkv = hq if hkv is None else hkv
    return [torch.randn(b, hq, t, d, generator=g, dtype=dtype), torch.randn(b, hkv, tk, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, tk, d, generator=g, dtype=dtype)]


def rand(*shape) -> torch.Tensor:
    """A float tensor of `shape` from another fixed seed (a bias, a mask's source)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def causal(t: int = T) -> torch.Tensor:
    """The [t, t] bool keep-mask of causal attention."""
    return torch.tril(torch.ones(t, t, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# compiled with attnlower vs eager

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


def check_fused_model(fn, *args, ops: list[str]):
    """A model's forward `fn` compiled (inner eager, strict) equals eager, its sites becoming `ops` in order."""
    want = fn(*args)
    got, sites = compiled_sites(fn, *args)
    assert [s.op for s in sites] == ops, [(s.op, s.reason) for s in sites]
    assert_matches_eager(got, want)


def check_unfused(fn, *args, reason="", dynamic=False):
    """`fn` compiled equals eager and no site was rewritten; a refused site's reason matches `reason`."""
    want = fn(*args)
    got, sites = compiled_sites(fn, *args, dynamic=dynamic)
    assert_matches_eager(got, want)
    assert all(s.op is None for s in sites), [(s.op, s.reason) for s in sites]
    if reason:
        assert any(re.search(reason, s.reason) for s in sites), [s.reason for s in sites]
    return sites


# --------------------------------------------------------------------------------------------
# the pass stages on the aten graphs of a function

def aten_graphs(fn, *args, dynamic=False) -> list[torch.fx.GraphModule]:
    """The pre-dispatch aten graphs (what the stages see) of `fn(*args)` under torch.compile."""
    from attnlower.passes.canonicalize import to_aten

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(to_aten(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, dynamic=dynamic)(*args)
    return graphs


def run_stages_until(gm, last: str, **context):
    """The sites of `gm` after the stages of the pipeline up to and including the one named `last`
    (`passes.pipeline.STAGES`), each checked as between stages; `context` sets Context fields."""
    from attnlower.passes.pipeline import STAGES, check_stage
    from attnlower.passes.site import Context
    from attnlower.target import Target

    names = [s.name for s in STAGES]
    assert last in names, f"no stage {last!r}; the stages are {names}"
    from attnlower.passes.canonicalize import fake_mode_for

    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    fields = {"target": Target("cpu"), "fake_mode": fake_mode_for(inputs),
              "allowed_ops": ("flash_attention", "sliding_window_attention", "paged_attention"), **context}
    ctx = Context(**fields)
    for stage in STAGES[:names.index(last) + 1]:
        stage.run(gm, ctx)
        check_stage(stage, gm, ctx, full=True)
    return ctx.sites


def found_sites(fn, *args, dynamic=False, last="resolve_kv"):
    """Every site of `fn`'s graphs after the stages up to `last` (by default: the match of each, or its refusal)."""
    return [s for g in aten_graphs(fn, *args, dynamic=dynamic) for s in run_stages_until(g, last)]
