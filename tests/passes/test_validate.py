"""Translation validation (passes/validate.py): a rewrite that changes results is undone.

The detector is broken on purpose (a dropped scale, a flipped mask, a dropped bias, the wrong
causal alignment, the wrong empty-row convention): the validator must refuse the site, name the
measured error, write a repro that reproduces it, and the compiled model must then give eager's
numbers. Correct sites in the spellings other projects use must pass untouched.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import attnlower
from attnlower.passes import evaluate as E
from attnlower.passes import validate as V
from attnlower.passes import verdicts
from attnlower.passes import analyze as analyze_stage
from attnlower.passes import kv

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models as M  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _fresh_cache():
    # verdicts are cached per process by structure: each test checks its own sites
    verdicts.clear_cache()
    yield
    verdicts.clear_cache()


def _seeded_qkv(t: int, b: int = 1, h: int = 2, d: int = 16):
    """q, k, v of [b, h, t, d], the same values every call (the large-site tests compare runs)."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, h, t, d, generator=g) for _ in range(3))


def _break_match(monkeypatch, edit):
    """Make the detector's matches wrong: `edit(match)` runs on every proven match."""
    resolve = kv.resolve_match

    def broken(chain):
        match = resolve(chain)
        edit(match)
        return match

    monkeypatch.setattr(kv, "resolve_match", broken)


def _break_decision(monkeypatch, **spec_changes):
    """Make the analyzer's specs wrong: every decision's spec gets `spec_changes`."""
    analyze = analyze_stage.analyze_site

    def broken(m, target, ops, *classified):
        d = analyze(m, target, ops, *classified)
        d.spec = dataclasses.replace(d.spec, **spec_changes)
        return d

    monkeypatch.setattr(analyze_stage, "analyze_site", broken)


def _compile(case: M.Case, **options):
    """(reports, compiled output, eager output) of `case` under attnlower with inner="eager"."""
    options = {"inner": "eager", **options}
    model = case.model
    want = model(*case.inputs.args, **case.inputs.kwargs)
    out = []

    def call(*args, **kwargs):
        out.append(model(*args, **kwargs))
        return out[-1]

    reports = attnlower.inspect(call, *case.inputs.args, options=options, **case.inputs.kwargs)
    return reports, out[-1], want


def _sites(reports):
    return [s for r in reports for s in r.sites]


def _max_rel(got, want):
    got, want = M.compared_tensors(got), M.compared_tensors(want)
    return max(float(((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).detach()) for g, w in zip(got, want))


def _assert_refused(reports, got, want, tmp_path, what=r"max abs error"):
    sites = _sites(reports)
    assert sites and all(not s.rewritten for s in sites), [(s.op, s.reason) for s in sites]
    for s in sites:
        assert s.reason.startswith("translation validation failed"), s.reason
        assert what in s.reason, s.reason
        assert s.validation_repro and s.validation_repro.startswith(str(tmp_path)), s.validation_repro
        assert f"repro: {s.validation_repro}" in s.reason
    # undone: the graph computes what eager computes
    assert _max_rel(got, want) < 1e-6
    for r in reports:
        assert "refused" in next(p["summary"] for p in r.passes if p["name"] == "validate")
    return sites


def _run_repro(path) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, path], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ---- a broken detector is caught ----------------------------------------------------------------

def test_dropped_scale_is_refused_with_the_error_and_a_repro(monkeypatch, tmp_path):
    def drop_scale(m):
        m.scale = 1.0
    _break_match(monkeypatch, drop_scale)
    reports, got, want = _compile(M.handwritten("div"), repro_dir=str(tmp_path))
    (site,) = _assert_refused(reports, got, want, tmp_path)
    assert "(tolerance " in site.reason
    assert "f64[2,4,32,16]" in site.reason, "the reason names the shapes it was checked on"
    shown = _run_repro(site.validation_repro)
    assert shown.startswith("max abs error"), shown


def test_flipped_mask_polarity_is_refused(monkeypatch, tmp_path):
    def flip(m):
        m.terms = [dataclasses.replace(t, kind={"keep": "fill", "fill": "keep"}.get(t.kind, t.kind)) for t in m.terms]
    _break_match(monkeypatch, flip)
    (site,) = _assert_refused(*_compile(M.sdpa("bool_mask"), repro_dir=str(tmp_path)), tmp_path, what="")
    shown = _run_repro(site.validation_repro)      # the source's SDPA runs as evaluate.sdpa_reference there
    assert shown and "the two agree" not in shown, shown


def test_flipped_causal_mask_polarity_in_a_real_model_is_refused(monkeypatch, tmp_path):
    """nanoGPT's `masked_fill(bias == 0, -inf)` read as a keep-mask: every layer refused."""
    def flip(m):
        m.terms = [dataclasses.replace(t, kind={"keep": "fill", "fill": "keep"}.get(t.kind, t.kind)) for t in m.terms]
    _break_match(monkeypatch, flip)
    _assert_refused(*_compile(M.nanogpt(flash=False), repro_dir=str(tmp_path)), tmp_path, what="")


def test_dropped_bias_term_is_refused(monkeypatch, tmp_path):
    """T5's learned position bias dropped from the fused op."""
    def drop_bias(m):
        m.terms = [t for t in m.terms if t.kind != "bias"]
    _break_match(monkeypatch, drop_bias)
    _assert_refused(*_compile(M.handwritten("t5_bias"), repro_dir=str(tmp_path)), tmp_path)


def test_wrong_causal_alignment_is_refused(monkeypatch, tmp_path):
    """SDPA's is_causal is top-left; with Tq < Tk bottom-right shows every query more keys."""
    _break_decision(monkeypatch, bottom_right=True)
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    fn = M.Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), "sdpa_causal_tq_lt_tk")
    _assert_refused(*_compile(M.Case(fn, M.Inputs((q, k, v)), M.expect(1)), repro_dir=str(tmp_path)), tmp_path)


def test_nan_pattern_mismatch_is_caught(monkeypatch, tmp_path):
    """Eager softmax gives NaN for a row with every key masked; a rewrite giving 0 there is wrong,
    and only the all-False rows of the boundary draws show it."""
    _break_decision(monkeypatch, empty_rows_nan=False)

    def masked(q, k, v, keep):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        s = s.masked_fill(~keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ v

    q, k, v = M.qkv()
    keep = torch.rand(M.B, 1, M.S, M.S) > 0.3
    keep[..., 0] = True              # the real input has no empty row: only the validator's draws do
    case = M.Case(M.Fn(masked, "masked_fill_keep"), M.Inputs((q, k, v, keep)), M.expect(1))
    reports, got, want = _compile(case, repro_dir=str(tmp_path))
    (site,) = _assert_refused(reports, got, want, tmp_path, what="NaN pattern differs")
    assert "draw" in site.reason


def _ones_then_filled(q, k, v):
    t = q.shape[-2]
    keep = torch.ones(t, t, dtype=torch.bool)
    keep[:, t - 3:] = False          # written in place after it was built: the last 3 keys hidden
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def test_in_place_writes_into_a_mask_are_replayed():
    """The mask's value is its in-place writes, not its producer: the check replays them, so the
    correct rewrite passes..."""
    reports, got, want = _compile(M.Case(M.Fn(_ones_then_filled, "ones_then_filled"), M.Inputs(M.qkv()),
                                         M.expect(1)))
    (site,) = _sites(reports)
    assert site.rewritten and site.validated.startswith("float64 CPU"), (site.reason, site.validated)
    assert _max_rel(got, want) < 1e-5


def test_a_rewrite_that_ignores_an_in_place_write_is_refused(monkeypatch, tmp_path):
    """...and a detector that reads the mask as its all-True producer is caught."""
    def drop_mask(m):
        m.terms = []
    _break_match(monkeypatch, drop_mask)
    case = M.Case(M.Fn(_ones_then_filled, "ones_then_filled"), M.Inputs(M.qkv()), M.expect(1))
    _assert_refused(*_compile(case, repro_dir=str(tmp_path)), tmp_path)


# ---- the issue-9 spellings: whatever the detector makes of them, the compiled result is eager's ----

def _alpha(q, k, v, mask):
    s = torch.add(mask, torch.matmul(q, k.transpose(-1, -2)), alpha=1 / math.sqrt(q.size(-1)))
    return torch.softmax(s, dim=-1) @ v


def _bool_as_number(q, k, v, keep):
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1)) + keep     # True adds 1.0
    return torch.softmax(s, dim=-1) @ v


def _int_mask(q, k, v, mask):
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1)) + mask     # an int32 bias
    return torch.softmax(s, dim=-1) @ v


def _mbart(q, k, v, mask):
    """fairseq / HF mBART: scores by bmm on [B*H, T, D], the mask added in a 4-D view."""
    bh, t, _ = q.shape
    w = torch.bmm(q, k.transpose(1, 2))
    w = (w.view(M.B, bh // M.B, t, t) + mask).view(bh, t, t)
    return torch.bmm(F.softmax(w, dim=-1), v)


@pytest.mark.parametrize("fn, extra", [
    (_alpha, lambda: torch.randn(M.B, 1, M.S, M.S)),
    (_bool_as_number, lambda: torch.rand(M.B, 1, M.S, M.S) > 0.5),
    (_int_mask, lambda: torch.randint(-3, 3, (M.B, 1, M.S, M.S), dtype=torch.int32)),
    (_mbart, lambda: torch.randn(M.B, 1, M.S, M.S)),
], ids=["add-alpha", "bool-as-number", "int32-bias", "mbart-bmm-4d-mask"])
def test_issue_9_spellings_give_eager_results(fn, extra):
    """On 2026-12-01 the detector got the first three wrong (alpha dropped, bool read as a keep-mask,
    int bias rejected by the op at run time): the validator refused them. Fixed detectors fuse them,
    and the check passes; either way the compiled result is eager's."""
    q, k, v = M.qkv()
    if fn is _mbart:
        q, k, v = (x.reshape(M.B * M.HEADS, M.S, M.HEAD_DIM) for x in (q, k, v))
    case = M.Case(M.Fn(fn, fn.__name__), M.Inputs((q, k, v, extra())), M.expect(1))
    reports, got, want = _compile(case)
    assert _max_rel(got, want) < 1e-5
    for s in _sites(reports):
        if s.rewritten:
            assert s.validated.startswith("float64 CPU"), s.validated
        else:
            assert s.reason, "a site left unfused says why"


# ---- correct sites pass, in other projects' spellings ---------------------------------------------

@pytest.mark.parametrize("case", [
    pytest.param(lambda: M.hf_model("llama", "eager", "pad"), id="hf-llama-eager-finfo-min-padding"),
    pytest.param(lambda: M.hf_model("bert", "sdpa", "pad"), id="hf-bert-sdpa-bool-padding"),
    pytest.param(lambda: M.sdpa("bool_mask"), id="sdpa-bool-mask"),
    pytest.param(lambda: M.sdpa("float_mask"), id="sdpa-float-mask"),
    pytest.param(lambda: M.nanogpt(flash=False), id="nanogpt-tril-buffer"),
    pytest.param(lambda: M.hf_model("llama", "eager", "nomask"), id="hf-llama-gqa-repeat-kv"),
    pytest.param(lambda: M.hf_model("mistral", "sdpa", "cache"), id="hf-mistral-sliding"),
    pytest.param(lambda: M.handwritten("bf16_fp32_softmax"), id="bf16-with-fp32-softmax"),
    pytest.param(lambda: M.handwritten("baddbmm"), id="baddbmm-flattened-heads"),
])
def test_correct_sites_pass(case):
    c = case()
    reports, got, want = _compile(c)
    sites = _sites(reports)
    assert sites and all(s.rewritten for s in sites), [(s.op, s.reason) for s in sites]
    for s in sites:
        assert s.validated.startswith("float64 CPU, 3 input draws"), s.validated
        assert "dropout off" in s.validated
    assert _max_rel(got, want) < c.expected.rtol


def test_training_dropout_is_checked_with_dropout_off():
    c = M.sdpa_dropout_train()
    reports, got, want = _compile(c)
    (site,) = _sites(reports)
    assert site.rewritten and site.spec["dropout_p"] == 0.3, (site.reason, site.spec)
    assert site.validated.startswith("float64 CPU") and site.validated.endswith("dropout off"), site.validated


def test_bool_draws_have_all_false_and_all_true_rows():
    """The draws for a bool mask include a row with every key masked and one with none."""
    node = torch.fx.Graph().placeholder("keep")
    spec = V._Input(node, "bool", (2, 1, 5, 7), (35, 35, 7, 1), torch.bool)
    g = torch.Generator().manual_seed(0)
    for style in range(3):
        rows = V._draw(spec, style, g).reshape(-1, 7)
        assert not rows.any(-1).all(), f"draw {style} has no all-False row"
        assert rows.all(-1).any(), f"draw {style} has no all-True row"


def test_all_false_mask_rows_agree_with_eager_nan():
    """A correct rewrite of a -inf masked_fill keeps eager's NaN rows: the draws with all-False
    rows (checked above) pass, and so does a real input with an empty row."""
    def masked(q, k, v, keep):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v

    q, k, v = M.qkv()
    keep = torch.rand(M.B, 1, M.S, M.S) > 0.3
    keep[0, 0, 3] = False
    reports, got, want = _compile(M.Case(M.Fn(masked, "masked"), M.Inputs((q, k, v, keep)), M.expect(1)))
    (site,) = _sites(reports)
    assert site.rewritten and site.validated.startswith("float64 CPU"), (site.reason, site.validated)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want[0, :, 3]).all()
    assert torch.allclose(got.nan_to_num(), want.nan_to_num(), atol=1e-5)


def _padding_fill(q, k, v, keep):
    """The Annotated Transformer's encoder mask: `masked_fill(keep == 0, -1e9)` over a [B, 1, 1, Tk] keep-mask."""
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return torch.softmax(s.masked_fill(keep == 0, -1e9), dim=-1) @ v


def _padding_keep():
    keep = torch.rand(M.B, 1, 1, M.S) > 0.3
    keep[1] = False                              # sequence 1 all padding: eager averages every key
    return keep


def test_fill_mode_is_checked_on_fully_masked_rows():
    """A finite fill: the rewrite passes the fill to the op, and validation checks it where fill and -inf masking
    differ most, on draws whose keep-mask hides every key of a row (the bool draws' all-False rows)."""
    q, k, v = M.qkv()
    keep = _padding_keep()
    reports, got, want = _compile(M.Case(M.Fn(_padding_fill, "padding_fill"), M.Inputs((q, k, v, keep)), M.expect(1)))
    (site,) = _sites(reports)
    assert site.rewritten and site.spec["fill"] == -1e9 and site.validated.startswith("float64 CPU"), site.reason
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(want[1], v[1].mean(-2, keepdim=True).expand_as(want[1]),
                                                                    atol=1e-5)


def test_fill_mode_dropped_is_refused(monkeypatch, tmp_path):
    """A rewrite that treats the finite fill as -inf masking gives 0 (or NaN) where eager averages: refused."""
    _break_decision(monkeypatch, fill=None)
    case = M.Case(M.Fn(_padding_fill, "padding_fill"), M.Inputs((*M.qkv(), _padding_keep())), M.expect_refused())
    _assert_refused(*_compile(case, repro_dir=str(tmp_path)), tmp_path)


def test_dynamic_graph_is_checked_at_the_size_hints():
    c = M.handwritten("div")
    reports = attnlower.inspect(c.model, *c.inputs.args, options={"inner": "eager"}, dynamic=True)
    (site,) = _sites(reports)
    assert site.rewritten, site.reason
    assert "size hints" in site.validated and "=32" in site.validated, site.validated


def test_a_python_float_scale_under_dynamic_is_checked_at_its_guarded_value():
    """dynamic=True passes a python float argument as a 0-dim tensor; the detector reads it with
    `.item()` and Dynamo guards on its value, so the check uses that value, not a random one."""
    def scaled(q, k, v, scale):
        return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v

    q, k, v = M.qkv()
    reports = attnlower.inspect(scaled, q, k, v, M.HEAD_DIM ** -0.5, options={"inner": "eager"}, dynamic=True)
    (site,) = _sites(reports)
    assert site.rewritten, site.reason
    assert "=0.25 (guarded)" in site.validated, site.validated


def test_dynamic_graph_over_budget_is_checked_at_smaller_sizes(monkeypatch):
    monkeypatch.setattr(V, "MAX_ELEMENTS", 2 * 4 * 16 * 16)
    c = M.handwritten("div")
    reports = attnlower.inspect(c.model, *c.inputs.args, options={"inner": "eager"}, dynamic=True)
    (site,) = _sites(reports)
    assert site.rewritten, site.reason
    assert "reduced sizes" in site.validated and f"={V.REDUCED_SIZE}" in site.validated, site.validated


def test_dynamic_graph_with_a_broken_detector_is_refused(monkeypatch, tmp_path):
    def drop_scale(m):
        m.scale = 1.0
    _break_match(monkeypatch, drop_scale)
    c = M.handwritten("mul")
    want = c.model(*c.inputs.args)
    reports = attnlower.inspect(c.model, *c.inputs.args, options={"inner": "eager", "repro_dir": str(tmp_path)},
                                dynamic=True)
    (site,) = _sites(reports)
    assert not site.rewritten and "translation validation failed" in site.reason, site.reason
    assert "size hints" in site.reason
    torch._dynamo.reset()
    got = torch.compile(c.model, backend="attnlower", options={"inner": "eager"}, dynamic=True)(*c.inputs.args)
    assert torch.allclose(got, want, atol=1e-6)


def test_static_site_over_budget_that_cannot_be_reduced_is_checked_on_the_first_call(monkeypatch):
    monkeypatch.setattr(V, "MAX_ELEMENTS", 1000)      # even the smallest reduced sizes are over it
    reports, got, want = _compile(M.handwritten("div"))
    (site,) = _sites(reports)
    assert site.rewritten and site.validated.startswith("first call: float64 CPU on"), site.validated
    assert "not at compile time: the region makes a tensor of 8192 elements" in site.validated, site.validated
    assert _max_rel(got, want) < 1e-5


def test_static_site_over_every_budget_stays_fused_and_says_not_validated(monkeypatch):
    from attnlower.passes import validate_first_call as VF

    monkeypatch.setattr(V, "MAX_ELEMENTS", 1000)
    monkeypatch.setattr(VF, "BUDGET", 100)
    reports, got, want = _compile(M.handwritten("div"))
    (site,) = _sites(reports)
    assert site.rewritten and site.validated.startswith("not validated: the region makes a tensor of"), site.validated
    assert "no first-call check either: evaluating sampled rows would create" in site.validated, site.validated
    assert _max_rel(got, want) < 1e-5


# ---- the option, the cache ------------------------------------------------------------------------

def test_option_off_skips_validation(monkeypatch):
    """validate=False: nothing is checked, so the broken rewrite goes through (and is wrong)."""
    def drop_scale(m):
        m.scale = 1.0
    _break_match(monkeypatch, drop_scale)
    reports, got, want = _compile(M.handwritten("div"), validate=False)
    (site,) = _sites(reports)
    assert site.rewritten and site.validated == "not checked: options validate=False"
    assert next(p["summary"] for p in reports[0].passes if p["name"] == "validate").startswith("off")
    assert _max_rel(got, want) > 1e-2, "the broken rewrite ran: the option really turned the check off"


def test_identical_layers_are_checked_once(monkeypatch):
    calls = []
    check = V._Pair.check

    def counting(self, *args, **kwargs):
        calls.append(self.old.name)
        return check(self, *args, **kwargs)

    monkeypatch.setattr(V._Pair, "check", counting)
    reports, got, want = _compile(M.hf_model("gpt2", "eager", "nomask"))
    sites = _sites(reports)
    assert len(sites) == M.LAYERS and all(s.rewritten for s in sites)
    assert len(calls) == 1, f"expected one evaluation for {M.LAYERS} identical layers, got {calls}"
    assert [("not re-run" in s.validated) for s in sites] == [False] + [True] * (M.LAYERS - 1)
    summary = next(p["summary"] for p in reports[0].passes if p["name"] == "validate")
    assert f"({M.LAYERS - 1} by an identical earlier site)" in summary, summary


def test_a_cached_failure_refuses_every_identical_layer(monkeypatch, tmp_path):
    def drop_scale(m):
        m.scale = 1.0
    _break_match(monkeypatch, drop_scale)
    reports, got, want = _compile(M.hf_model("gpt2", "eager", "nomask"), repro_dir=str(tmp_path))
    sites = _assert_refused(reports, got, want, tmp_path)
    assert len(sites) == M.LAYERS


# ---- one dtype the validator controls (issue 19.3) --------------------------------------------------

class _MhaWithCausalFloatMask(torch.nn.Module):
    """`nn.MultiheadAttention` with the float causal mask `nn.Transformer` builds (float32 -inf above the
    diagonal, made inside forward by `torch.full` without a dtype)."""

    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(M.HIDDEN, M.HEADS, batch_first=True)

    def forward(self, x):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


def test_mha_float_causal_mask_is_fused_with_parity(monkeypatch):
    """Refused on 2026-12-03 ("max abs error 5.03"): the float64 copy of the region kept the mask in
    float32 (its `full` has no dtype), and torch's CPU SDPA returns wrong numbers for float64 q/k/v with
    a float32 mask. Reproducer of that torch behaviour (torch 2.13.0, CPU):

        q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.float64) for _ in range(3))
        mask = torch.triu(torch.full((16, 16), float("-inf")), 1)          # float32
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)             # off by ~2.9 from the math
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask.double())    # right

    Now every floating value of a copy is float64 (checked below on every node the copies run) and the
    source's SDPA is evaluated by its math definition (`evaluate.sdpa_reference`)."""
    torch.manual_seed(0)
    model = _MhaWithCausalFloatMask().eval()
    x = torch.randn(M.B, M.S, M.HIDDEN)
    seen = []
    run_node = E._Float64Run.run_node

    def recording(self, n):
        out = run_node(self, n)
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                seen.append((n.name, t.dtype))
        return out

    monkeypatch.setattr(E._Float64Run, "run_node", recording)
    reports, got, want = _compile(M.Case(model, M.Inputs((x,)), M.expect(1)))
    (site,) = _sites(reports)
    assert site.rewritten, site.reason
    assert site.validated.startswith("float64 CPU"), site.validated
    assert _max_rel(got, want) < 1e-5
    assert seen and all(dtype == torch.float64 for _, dtype in seen), [s for s in seen if s[1] != torch.float64]
    assert any(name.startswith("full") for name, _ in seen), "the mask's full() ran in the copy, in float64"


# ---- boundary inputs drawn from what makes them (issue 19.3) -----------------------------------------

class _LuongAttention(torch.nn.Module):
    """Luong-style attention of a seq2seq decoder: the encoder's outputs, seq-first `[Tk, B, H]` as an
    RNN encoder returns them, are the keys and the values, transposed to batch-first before the matmuls."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.query = torch.nn.Linear(hidden, hidden, bias=False)
        self.encoder = torch.nn.Linear(hidden, hidden)

    def forward(self, dec, src):
        enc = self.encoder(src)                   # [Tk, B, H]
        memory = enc.transpose(0, 1)              # [B, Tk, H]: V (and K) transposed before the matmul
        scores = self.query(dec) @ memory.transpose(1, 2)
        return torch.softmax(scores, dim=-1) @ memory


def _read_k_through_memory(monkeypatch, v_steps=None):
    """The rewrite reads K through `memory` (the transposed view) while V is read through the encoder
    output before its transpose, then permuted (what resolve_kv picks): two views of one tensor.
    `v_steps` replaces V's steps (a view that is *not* V) when given."""
    resolve = kv.resolve_match

    def views(chain):
        m = resolve(chain)
        memory = chain.k_operand.node.args[0]
        m.k = kv.OperandRef(memory, (("unsqueeze", 1),), 1, 1.0)
        if v_steps is not None:
            m.v = dataclasses.replace(m.v, steps=v_steps)
        return m

    monkeypatch.setattr(kv, "resolve_match", views)


def test_views_of_one_tensor_are_drawn_as_one(monkeypatch):
    """Refused on 2026-12-03 ("max abs error 2.47"): the two views were boundary inputs filled with
    independent random numbers. Now the cut moves up to the encoder output both are views of, and both
    views are recomputed from one draw."""
    _read_k_through_memory(monkeypatch)
    torch.manual_seed(0)
    model = _LuongAttention().eval()
    dec, src = torch.randn(2, 5, 16), torch.randn(9, 2, 16)
    reports, got, want = _compile(M.Case(model, M.Inputs((dec, src)), M.expect(1)))
    (site,) = _sites(reports)
    assert site.rewritten, site.reason
    assert site.validated.startswith("float64 CPU"), site.validated
    assert "f64[9,2,16] f64[2,5,16] at" in site.validated, "drawn at the encoder output and the query projection"
    assert _max_rel(got, want) < 1e-5


def test_a_view_that_is_not_v_is_still_refused(monkeypatch, tmp_path):
    """With Tk = B the encoder output read without its transpose has V's shape but not its values."""
    _read_k_through_memory(monkeypatch, v_steps=(("unsqueeze", 1),))
    torch.manual_seed(0)
    model = _LuongAttention().eval()
    dec, src = torch.randn(4, 5, 16), torch.randn(4, 4, 16)
    _assert_refused(*_compile(M.Case(model, M.Inputs((dec, src)), M.expect(1)), repro_dir=str(tmp_path)),
                    tmp_path)


def _bloom(layers: int = 2):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=layers, n_head=4, hidden_dropout=0.0,
                                   attention_dropout=0.0)
    cfg._attn_implementation = "eager"
    return transformers.BloomForCausalLM(cfg).eval()


def test_hf_bloom_alibi_is_drawn_from_what_its_producer_can_give(monkeypatch):
    """BLOOM (transformers 5.25, eager): the ALiBi bias, slopes x token distances built from the
    attention_mask, was drawn as a free float with finfo.min entries (values BLOOM cannot make) and the
    site was refused. Now the bias and the padding mask are computed from the attention_mask they are
    made of (an int input): both layers fused, eager's logits, and the bias every draw put into the
    source's baddbmm is finite and bounded by max |slope| x Tk."""
    net = _bloom()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    biases = []
    run_node = E._Float64Run.run_node

    def recording(self, n):
        if n.target is torch.ops.aten.baddbmm.default:
            biases.append(self.env[n.args[0]].clone())
        return run_node(self, n)

    monkeypatch.setattr(E._Float64Run, "run_node", recording)

    def run(ids, mask):
        return net(input_ids=ids, attention_mask=mask, use_cache=False).logits

    want = run(ids, mask)
    torch._dynamo.reset()
    reports = attnlower.inspect(run, ids, mask, options={"inner": "eager"})
    sites = _sites(reports)
    assert [s.op for s in sites] == ["flash_attention"] * 2, [(s.op, s.reason) for s in sites]
    assert all(s.validated.startswith("float64 CPU, 3 input draws") for s in sites), sites[0].validated
    assert "i64[2,12]" in sites[0].validated, "the attention_mask is drawn, the bias computed from it"
    torch._dynamo.reset()
    got = torch.compile(run, backend="attnlower", options={"inner": "eager"})(ids, mask)
    assert _max_rel(got, want) < 1e-5
    # BLOOM's bias is slope * (cumsum(mask) - 1) * mask with slopes <= 1: with int draws in [-2, 3]
    # over 12 tokens, |bias| <= 3 * (3 * 12 + 1); a free float draw would hold finfo.min
    assert len(biases) == 3, "one source evaluation per draw"
    for bias in biases:
        assert torch.isfinite(bias).all() and bias.abs().max() <= 3 * (3 * 12 + 1), float(bias.abs().max())


def test_int_draws_have_an_all_zero_row():
    """An int source (an attention_mask) gets a row of zeros in the edge draws: a fully padded sequence."""
    node = torch.fx.Graph().placeholder("attention_mask")
    spec = V._Input(node, "int", (3, 7), (7, 1), torch.int64, -2, 3)
    g = torch.Generator().manual_seed(0)
    for style in (1, 2):
        rows = V._draw(spec, style, g)
        assert not rows.any(-1).all(), f"draw {style} has no all-zero row"


def test_paged_length_draws_hold_a_sequence_shorter_than_the_chunk():
    """Lengths read by paged_attention with Tq queries: every draw after the first holds a length in [1, Tq) (a
    chunk longer than its sequence, whose first queries see no key), besides the edge draw's 0 and capacity."""
    node = torch.fx.Graph().placeholder("seq_lens")
    spec = V._Input(node, "length", (3,), (1,), torch.int32, 0, 40, queries=5)
    g = torch.Generator().manual_seed(0)
    draws = [V._draw(spec, style, g) for style in range(3)]
    for style in (1, 2):
        assert ((draws[style] >= 1) & (draws[style] < 5)).any(), (style, draws[style])
    assert draws[1][0] == 0, "the edge draw keeps an empty sequence"
    decode = V._Input(node, "length", (3,), (1,), torch.int32, 0, 40, queries=1)
    assert (V._draw(decode, 2, g) == 40).all(), "Tq = 1: no length is shorter than the chunk"


def test_paged_chunk_rewrite_that_refuses_short_sequences_is_refused(monkeypatch, tmp_path):
    """A chunked-prefill rewrite without empty_rows_nan (the op then raises for 0 < seq_len < Tq) is wrong where
    the source computes: the lengths are data. The real lengths (29, 37) are all >= Tq = 4: only the validator's
    short draws show it."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import spellings_issue22 as S

    _break_decision(monkeypatch, empty_rows_nan=None)
    args = S.paged_inputs(4, layout="flashinfer")
    case = M.Case(M.Fn(S.flashinfer_chunked_prefill, "flashinfer_chunked_prefill"), M.Inputs(args), M.expect(1))
    reports, got, want = _compile(case, repro_dir=str(tmp_path))
    (site,) = _sites(reports)
    assert not site.rewritten and site.reason.startswith("translation validation failed"), site.reason
    assert "shorter than its Tq=4 queries" in site.reason, site.reason
    assert _max_rel(got, want) < 1e-6


# ---- a structure proven from a module buffer: the op's dense fallback is checked too (issue 22, class 1) ------

def _buffer_case(name: str) -> M.Case:
    """Buffer masks as projects write them (tests/spellings_issue22.py), as validation cases."""
    import spellings_issue22 as S

    torch.manual_seed(0)
    model, args = {
        "nanogpt": lambda: (S.NanoGPTAttention(), (S.randn(S.B, S.T, S.HIDDEN),)),
        "gpt2-legacy": lambda: (S.GPT2LegacyAttention(), (S.randn(S.B, S.T, S.HIDDEN),)),
        "gpt2-v4-fill": lambda: (S.GPT2V4Attention(), (S.randn(S.B, S.T, S.HIDDEN),)),
        "gpt-neo-local": lambda: (S.GPTNeoSelfAttention(local=True), (S.randn(S.B, S.T, S.HIDDEN),)),
        "xtransformers-alibi": lambda: (S.XTransformersAlibi(), tuple(S.randn(S.B, S.H, S.T, S.D, seed=i)
                                                                      for i in range(3))),
    }[name]()
    return M.Case(model.eval(), M.Inputs(args), M.expect(1))


FALLBACK_CHECKED = "the op's dense fallback (`verified` False) once more"


@pytest.mark.parametrize("name", ["nanogpt", "gpt2-legacy", "gpt2-v4-fill", "gpt-neo-local", "xtransformers-alibi"])
def test_a_buffer_site_has_its_fallback_checked(name):
    """Each site whose op checks a buffer on the device passes the draws at the buffer's real value (the structured
    path) and one more evaluation with the buffer changed and `verified` False (the dense fallback)."""
    c = _buffer_case(name)
    reports, got, want = _compile(c)
    (site,) = _sites(reports)
    assert site.rewritten and site.spec["verified"], (site.op, site.reason)
    assert FALLBACK_CHECKED in site.validated, site.validated
    assert _max_rel(got, want) < c.expected.rtol


def test_a_site_without_a_device_check_has_no_fallback_check():
    reports, _, _ = _compile(M.handwritten("div"))
    (site,) = _sites(reports)
    assert site.rewritten and not site.spec["verified"] and FALLBACK_CHECKED not in site.validated, site.validated


def _break_fallback(monkeypatch, edit):
    """Make the analyzer's fallback bias wrong (the bias the op applies densely when its device check fails);
    the structure, the check and everything at the buffer's real value stay right."""
    fallback_bias = analyze_stage._fallback_bias

    def broken(terms, finite, fill):
        plan, fill = fallback_bias(terms, finite, fill)
        return (edit(plan) if plan is not None else None), fill

    monkeypatch.setattr(analyze_stage, "_fallback_bias", broken)


def test_a_fallback_that_masks_with_a_finite_value_is_refused(monkeypatch, tmp_path):
    """nanoGPT's `masked_fill(bias == 0, -inf)` as a fallback bias of -1 where masked: identical at the buffer's
    real value (the check passes, the fallback never runs there), wrong once the buffer changes. Refused, and the
    reason says it was the fallback."""
    _break_fallback(monkeypatch, lambda plan: analyze_stage.BiasPlan(
        kind="float", terms=[dataclasses.replace(t, value=-1.0) for t in plan.terms]))
    reports, got, want = _compile(_buffer_case("nanogpt"), repro_dir=str(tmp_path))
    (site,) = _assert_refused(reports, got, want, tmp_path, what="the op's dense fallback")
    # (`model.bias`: the buffer as `_compile`'s closure reads it)
    assert "device check finds `model.bias` changed (`verified` False)" in site.reason, site.reason
    assert "its entries shuffled" in site.reason, site.reason
    shown = _run_repro(site.validation_repro)      # the repro holds the changed buffer and the forced flag
    assert shown.startswith(("max abs error", "NaN pattern differs")), shown


def test_a_fallback_that_turns_a_finite_mask_into_minus_inf_is_refused(monkeypatch, tmp_path):
    """GPT-2 4.2x's `where(bias, w, finfo.min)` as a bool keep-mask fallback: equal wherever a row keeps a key,
    NaN where eager averages a row with every key hidden, which only a changed buffer gives (its emptied row)."""
    _break_fallback(monkeypatch, lambda plan: dataclasses.replace(plan, kind="bool"))
    reports, got, want = _compile(_buffer_case("gpt2-legacy"), repro_dir=str(tmp_path))
    (site,) = _assert_refused(reports, got, want, tmp_path, what="the op's dense fallback")
    assert "NaN pattern differs" in site.reason, site.reason
