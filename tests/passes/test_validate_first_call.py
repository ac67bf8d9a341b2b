"""Translation validation on the first call (passes/validate_first_call.py): a static site too large to
check at compile time and not reducible is checked on its first call, on sampled rows of the real output.

- the restricted evaluation of a source region equals the full evaluation at the sampled elements, on
  every spelling the suite knows (products, masks made from positions, SDPA, GQA, HF models);
- a correct site passes and says what it was checked on; a broken rewrite at a real size is caught on
  the first call: eager's numbers come back, the report says why, later calls run the unfused region
  (strict=True raises instead); validate=False turns the check off.
"""
from __future__ import annotations

import logging
import math
import os
import sys

import pytest
import torch

import attnlower
from attnlower.compiler import backend
from attnlower.passes import evaluate as E
from attnlower.passes import validate as V
from attnlower.passes import validate_first_call as VF
from attnlower.passes import validate_sizes as VS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models as M  # noqa: E402
from test_validate import _break_decision, _fresh_cache, _max_rel, _seeded_qkv, _sites  # noqa: E402,F401

T, WINDOW = 2048, 1500     # a band wider than any size it can be reduced to (2 * 1500 + 2 > T)


def _qkv(t: int = T, **dims):
    return _seeded_qkv(t, **dims)


def wide_band(q, k, v):
    i = torch.arange(q.size(-2), device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - WINDOW)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def _run(fn, *inputs, calls: int = 2, **options):
    """(the process's new reports, the compiled outputs of `calls` calls, eager's output)."""
    want = fn(*inputs)
    start = len(backend.reports())
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="attnlower", options={"inner": "eager", **options})
    outs = [compiled(*inputs) for _ in range(calls)]
    return backend.reports()[start:], outs, want


def test_a_large_site_that_cannot_be_reduced_is_checked_on_its_first_call():
    reports, outs, want = _run(wide_band, *_qkv())
    (site,) = _sites(reports)
    assert site.rewritten and site.op == "sliding_window_attention", site.reason
    assert site.validated.startswith("first call: float64 CPU on 1x2x16x16 sampled elements of the output "
                                     f"[1, 2, {T}, 16]"), site.validated
    assert f"smaller sizes not possible (no size can go below {2 * WINDOW + 2} (the region compares positions " \
           f"with {WINDOW}" in site.validated, site.validated
    summary = next(p["summary"] for p in reports[0].passes if p["name"] == "validate")
    assert "1 checked on the first call" in summary, summary
    for out in outs:
        assert _max_rel(out, want) < 1e-5


def test_the_report_says_pending_until_the_first_call_checks(monkeypatch):
    start = len(backend.reports())
    seen = []
    run = VF.Plan.run

    def spy(self, *args):
        seen.extend(s.validated for r in backend.reports()[start:] for s in r.sites)
        return run(self, *args)

    monkeypatch.setattr(VF.Plan, "run", spy)
    _run(wide_band, *_qkv(), calls=1)
    (site,) = [s for r in backend.reports()[start:] for s in r.sites]
    assert site.validated.startswith("first call:"), site.validated
    assert len(seen) == 1 and seen[0].startswith("first-call check pending: the region makes a tensor"), seen


def test_a_broken_rewrite_at_a_large_size_is_refused_on_the_first_call(monkeypatch, caplog):
    """The op's window shrunk by 700 keys: the first call returns eager's numbers (the unfused region),
    warns, the report refuses the site, and the graph compiled again runs unfused from then on."""
    _break_decision(monkeypatch, window=WINDOW - 700)
    with caplog.at_level(logging.WARNING, logger="attnlower"):
        reports, outs, want = _run(wide_band, *_qkv(), calls=3)
    for out in outs:
        assert _max_rel(out, want) < 1e-6, "the broken op's numbers never come back"
    first, again = reports
    (site,) = first.sites
    assert not site.rewritten and site.reason.startswith("translation validation failed on the first call: "
                                                         "max abs error"), site.reason
    assert "the unfused region ran instead" in site.reason
    (later,) = again.sites
    assert not later.rewritten and later.reason == site.reason, later.reason
    assert any("refused: translation validation failed on the first call" in r.message for r in caplog.records)


def test_strict_raises_on_a_failed_first_call_check(monkeypatch):
    _break_decision(monkeypatch, window=WINDOW - 700)
    with pytest.raises(VF.FirstCallCheckFailed, match=r"site 0 \(.*\): translation validation failed on the "
                                                      r"first call: max abs error .*strict=True raises"):
        _run(wide_band, *_qkv(), calls=1, strict=True)


def test_validate_false_turns_the_first_call_check_off(monkeypatch):
    _break_decision(monkeypatch, window=WINDOW - 700)
    reports, outs, want = _run(wide_band, *_qkv(), calls=1, validate=False)
    (site,) = _sites(reports)
    assert site.rewritten and site.validated == "not checked: options validate=False"
    assert _max_rel(outs[0], want) > 1e-3, "the broken op ran: nothing checked it"


def test_the_check_evaluates_a_small_part_of_the_source():
    """16 of 2048 query rows: the check creates ~1% of the elements the region does."""
    plans = []
    plan_for = VF.plan_for

    def keep(*args, **kwargs):
        plans.append(plan_for(*args, **kwargs))
        return plans[-1]

    V.plan_for, saved = keep, V.plan_for
    try:
        _run(wide_band, *_qkv(), calls=1)
    finally:
        V.plan_for = saved
    (plan,) = plans
    made = sum(math.prod(v.shape) for n in plan.source.graph.nodes if n.op == "call_function"
               for v in [n.meta.get("val")] if isinstance(v, torch.Tensor))
    assert plan.elements < 0.02 * made, (plan.elements, made)
    assert plan.seconds > 0 and plan.result.startswith("first call")


def test_identical_layers_are_checked_once_on_the_first_call(monkeypatch):
    """GPT-2's two layers, forced onto the first-call path: one check, both rows told its verdict."""
    monkeypatch.setattr(V, "MAX_ELEMENTS", 1000)

    def no_reduction(pair, budget):
        raise VS.CannotReduce("forced by the test")

    monkeypatch.setattr(V, "reduce_pair", no_reduction)
    runs = []
    run = VF.Plan.run

    def counting(self, *args):
        runs.append(self.index)
        return run(self, *args)

    monkeypatch.setattr(VF.Plan, "run", counting)
    c = M.hf_model("gpt2", "eager", "nomask")
    reports = attnlower.inspect(c.model, *c.inputs.args, options={"inner": "eager"}, **c.inputs.kwargs)
    sites = _sites(reports)
    assert len(sites) == M.LAYERS and all(s.rewritten for s in sites), [(s.op, s.reason) for s in sites]
    assert runs == [sites[0].index], runs
    assert sites[0].validated.startswith("first call:"), sites[0].validated
    assert sites[1].validated.startswith("first call:") and f"same structure as site {sites[0].index}" in \
        sites[1].validated, sites[1].validated


# ---- the restricted evaluation is the full one at the sampled elements ----------------------------

def _plans_of(case: M.Case):
    """(pair, its first-call plan) of each site of `case`, planned while the graph still holds the region."""
    pairs = []
    init = V._Pair.__init__

    def capture(self, *args, **kwargs):
        init(self, *args, **kwargs)
        pairs.append((self, VF.plan_for(self, "site", 0)))

    V._Pair.__init__ = capture
    try:
        torch._dynamo.reset()
        attnlower.inspect(case.model, *case.inputs.args, options={"inner": "eager"}, **case.inputs.kwargs)
    finally:
        V._Pair.__init__ = init
    return pairs


def _sdpa_causal_tq_lt_tk():
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    fn = M.Fn(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), "sdpa")
    return M.Case(fn, M.Inputs((q, k, v)), M.expect(1))


def _triu_float_mask():
    def f(q, k, v):
        t = q.size(-2)
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        return torch.softmax(q @ k.transpose(-1, -2) / 4 + mask, dim=-1) @ v
    return M.Case(M.Fn(f, "triu_float_mask"), M.Inputs(M.qkv()), M.expect(1))


@pytest.mark.parametrize("case", [
    pytest.param(lambda: M.handwritten("div"), id="div"),
    pytest.param(lambda: M.handwritten("baddbmm"), id="baddbmm-flat-heads"),
    pytest.param(lambda: M.handwritten("einsum"), id="einsum"),
    pytest.param(lambda: M.handwritten("bmm3d"), id="bmm3d"),
    pytest.param(lambda: M.handwritten("softcap"), id="softcap"),
    pytest.param(lambda: M.handwritten("gqa_repeat_interleave"), id="gqa-repeat-interleave"),
    pytest.param(lambda: M.handwritten("t5_bias"), id="t5-bias"),
    pytest.param(lambda: M.sdpa("bool_mask"), id="sdpa-bool-mask"),
    pytest.param(lambda: M.sdpa("float_mask"), id="sdpa-float-mask"),
    pytest.param(_sdpa_causal_tq_lt_tk, id="sdpa-is-causal-tq-lt-tk"),
    pytest.param(_triu_float_mask, id="triu-float-mask"),
    pytest.param(lambda: M.nanogpt(flash=False), id="nanogpt-tril-buffer"),
    pytest.param(lambda: M.hf_model("llama", "eager", "pad"), id="hf-llama-eager-pad"),
    pytest.param(lambda: M.hf_model("llama", "sdpa", "nomask"), id="hf-llama-sdpa"),
    pytest.param(lambda: M.hf_model("gpt2", "eager", "nomask"), id="hf-gpt2"),
    pytest.param(lambda: M.hf_model("mistral", "sdpa", "cache"), id="hf-mistral-sliding"),
    pytest.param(lambda: M.hf_model("bert", "sdpa", "pad"), id="hf-bert-pad"),
])
def test_restricted_evaluation_is_the_full_one_at_the_sampled_elements(case):
    pairs = _plans_of(case())
    assert pairs
    pair, plan = pairs[0]
    assert plan.restriction, "some dim of the output is sampled"
    g = torch.Generator().manual_seed(1)
    inputs = [V._draw(i, 0, g) for i in pair.inputs]
    full = E.run_float64(plan.source, [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
    with E.reference_ops(), torch.no_grad():
        sampled = VF._RestrictedRun(plan).run(inputs)
    want = VF._restrict(full, plan.restriction, {})
    assert E.compare(want, sampled) == "", E.compare(want, sampled)
    assert plan.elements < sum(math.prod(v.shape) for n in plan.source.graph.nodes
                               for v in [n.meta.get("val")] if isinstance(v, torch.Tensor)) or \
        plan.restriction, "the check does less than the region"


def test_positional_triangle_is_tril_at_the_sampled_positions():
    x = torch.randn(7, 9, dtype=torch.float64)
    rows, cols = torch.tensor([0, 3, 6]), torch.tensor([1, 2, 8])
    for lower, op in ((True, torch.tril), (False, torch.triu)):
        for diagonal in (-2, 0, 1, 3):
            want = op(x, diagonal)[rows][:, cols]
            got = VF._positional_triangle(x[rows][:, cols], diagonal, {0: rows, 1: cols}, [7, 9], lower=lower)
            assert torch.equal(got, want), (lower, diagonal)


def test_sampled_indices_cover_both_ends():
    picked = VF._sample([2, 4, 300, 64])
    assert set(picked) == {1, 2}, "batch of 2 whole, heads and rows sampled, the last dim whole"
    assert picked[2][0] == 0 and picked[2][-1] == 299 and len(picked[2]) == VF.ROWS
    assert picked[1].tolist() == [0, 3]


def test_under_inductor_a_failed_first_call_check_returns_eager_numbers_and_recompiles(monkeypatch):
    _break_decision(monkeypatch, window=WINDOW - 700)
    reports, outs, want = _run(wide_band, *_qkv(), calls=2, inner="inductor")
    for out in outs:
        assert _max_rel(out, want) < 1e-5
    assert [s.rewritten for r in reports for s in r.sites] == [False, False]


def test_under_inductor_a_passing_first_call_check_keeps_the_fused_graph():
    reports, outs, want = _run(wide_band, *_qkv(), calls=2, inner="inductor")
    (site,) = _sites(reports)
    assert site.rewritten and site.validated.startswith("first call:"), site.validated
    for out in outs:
        assert _max_rel(out, want) < 1e-5
