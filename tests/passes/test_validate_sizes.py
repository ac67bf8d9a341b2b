"""Translation validation of static sites too large to evaluate: checked at reduced sizes
(passes/validate_sizes.py), or said not to be, with the reason.

Sites at real sizes (T = 2048: 8M scores per head pair, over validate.MAX_ELEMENTS) must be validated
at reduced sizes, and a broken rewrite at that size must still be refused: by the reduced check, and
with the reduced sizes kept above every constant the masks compare positions with.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import attnlower
from attnlower.passes import validate as V
from attnlower.passes import validate_sizes as VS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models as M  # noqa: E402
from test_validate import (_assert_refused, _break_decision, _compile, _fresh_cache, _max_rel,  # noqa: E402,F401
                           _seeded_qkv, _sites)

T = 2048          # 1 x 2 x 2048 x 2048 scores: 4x validate.MAX_ELEMENTS


def _qkv(t: int = T, **dims):
    return _seeded_qkv(t, **dims)


def causal_tril(q, k, v):
    t = q.size(-2)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def band(q, k, v, window: int = 8):
    i = torch.arange(q.size(-2), device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def _case(fn, *inputs):
    return M.Case(M.Fn(fn, fn.__name__), M.Inputs(inputs), M.expect(1, M.FLASH, M.SLIDING))


@pytest.mark.parametrize("fn", [causal_tril, sdpa_causal, band], ids=["tril", "sdpa-is-causal", "arange-band"])
def test_a_large_static_site_is_validated_at_reduced_sizes(fn):
    reports, got, want = _compile(_case(fn, *_qkv()))
    (site,) = _sites(reports)
    assert site.rewritten, site.reason
    assert site.validated.startswith("float64 CPU, 3 input draws"), site.validated
    assert f"at reduced sizes {T}->{VS.REDUCED_FLOOR}" in site.validated, site.validated
    assert f"f64[1,2,{VS.REDUCED_FLOOR},16]" in site.validated, "drawn at the reduced sizes"
    assert _max_rel(got, want) < 1e-5


@pytest.mark.parametrize("fn", [causal_tril, sdpa_causal], ids=["tril", "sdpa-is-causal"])
def test_a_broken_rewrite_at_a_large_size_is_refused(monkeypatch, tmp_path, fn):
    """The causal flag dropped: refused by the reduced check, the reason naming the reduced sizes."""
    _break_decision(monkeypatch, causal=False)
    reports, got, want = _compile(_case(fn, *_qkv()), repro_dir=str(tmp_path))
    (site,) = _assert_refused(reports, got, want, tmp_path)
    assert f"reduced sizes {T}->{VS.REDUCED_FLOOR}" in site.reason, site.reason


def test_a_window_wider_than_the_floor_keeps_the_reduced_size_above_it(monkeypatch, tmp_path):
    """A band of 8 rewritten with a window of 30: at 24 keys both are plain causal, so the op's window is
    a constant the reduced sizes must exceed (2 * 30 + 2 = 62), where the two differ."""
    _break_decision(monkeypatch, window=30)
    reports, got, want = _compile(_case(band, *_qkv()), repro_dir=str(tmp_path))
    (site,) = _assert_refused(reports, got, want, tmp_path)
    assert f"reduced sizes {T}->62" in site.reason, site.reason


def test_a_mask_constant_raises_the_reduced_size():
    """A band of 40 keys: the comparison constant 40 keeps every reduced size at 2 * 40 + 2 or above."""
    reports, got, want = _compile(_case(lambda q, k, v: band(q, k, v, window=40), *_qkv()))
    (site,) = _sites(reports)
    assert site.rewritten and f"at reduced sizes {T}->82" in site.validated, (site.reason, site.validated)
    assert _max_rel(got, want) < 1e-5


def test_a_site_that_cannot_be_reduced_under_budget_says_why(monkeypatch):
    """With a window of 100 no reduced size below 202 shows the band as a band; at that size the check
    is over a (lowered) budget: checked on the first call instead, and the report says why."""
    monkeypatch.setattr(V, "MAX_ELEMENTS", 2 ** 16)
    reports, got, want = _compile(_case(lambda q, k, v: band(q, k, v, window=100), *_qkv(t=512)))
    (site,) = _sites(reports)
    assert site.rewritten, site.reason
    assert site.validated.startswith("first call:") and "still makes a tensor of" in site.validated, site.validated
    assert _max_rel(got, want) < 1e-5


def test_hf_llama_gqa_at_a_real_length_is_validated_at_reduced_sizes():
    """Llama (GQA, repeat_kv, rotary embeddings, the causal mask HF builds) at 1536 tokens."""
    import transformers

    torch.manual_seed(0)
    cfg = M._hf_config("llama", "eager")
    cfg.max_position_embeddings = 2048
    net = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, M.VOCAB, (1, 1536))

    def run(ids):
        return net(input_ids=ids, use_cache=False).logits

    want = run(ids)
    torch._dynamo.reset()
    reports = attnlower.inspect(run, ids, options={"inner": "eager"})
    sites = _sites(reports)
    assert len(sites) == M.LAYERS and all(s.rewritten for s in sites), [(s.op, s.reason) for s in sites]
    assert "at reduced sizes 1536->24" in sites[0].validated, sites[0].validated
    torch._dynamo.reset()
    got = torch.compile(run, backend="attnlower", options={"inner": "eager"})(ids)
    assert _max_rel(got, want) < 1e-5


# ---- the parts ------------------------------------------------------------------------------------

class _Traced:
    """A captured pair at its traced sizes (the validate stage may have switched it to reduced ones)."""

    def __init__(self, pair, graphs, inputs):
        self.pure, self._graphs, self.inputs = pair.pure, graphs, inputs

    def graphs(self):
        return self._graphs


def _traced_pair_of(fn, *inputs):
    pairs = []
    init = V._Pair.__init__

    def capture(self, *args, **kwargs):
        init(self, *args, **kwargs)
        pairs.append(_Traced(self, self.graphs(), list(self.inputs)))

    try:
        V._Pair.__init__ = capture
        attnlower.inspect(fn, *inputs, options={"inner": "eager"})
    finally:
        V._Pair.__init__ = init
    (pair,) = pairs
    return pair


def test_the_generalized_pair_at_the_traced_sizes_is_the_pair():
    """Soundness fact 1: every literal was replaced by an expression equal to it at the traced sizes."""
    pair = _traced_pair_of(causal_tril, *_qkv())
    old_gm, new_gm = pair.graphs()
    reduction = VS.reduce_pair(pair, V.MAX_ELEMENTS)
    assert reduction.note == f"reduced sizes {T}->{VS.REDUCED_FLOOR}"
    gen = VS._Generalizer([T], VS.REDUCED_FLOOR, set())
    fakes = [gen.fake_input(i) for i in pair.inputs]
    gen.run(old_gm, fakes)
    gen.run(new_gm, fakes)
    identity = {gen.symbol(T).node.expr: T}
    generalized = 0
    for gm in (old_gm, new_gm):
        again = gen.instantiate(gm, identity)
        for a, b in zip(gm.graph.nodes, again.graph.nodes):
            assert a.name == b.name and str(a.args) == str(b.args) and str(a.kwargs) == str(b.kwargs), (a, b)
        generalized += sum(any(isinstance(x, torch.SymInt) for x in torch.utils._pytree.tree_leaves(args))
                           for (gid, _), (args, _) in gen.literals.items() if gid == id(gm))
    assert generalized >= 1, "the mask's sizes (ones([T, T])) were generalized"


def test_assign_keeps_order_small_gaps_and_no_new_equalities():
    reduced = VS._assign([1024, 1025, 2048, 4096], floor=24, static={16, 25, 64})
    assert reduced == {1024: 24, 1025: 26, 2048: 50, 4096: 74}, reduced   # 25 is a static dim: skipped
    values = sorted(reduced)
    assert [reduced[v] for v in values] == sorted(reduced.values())


def test_a_view_split_with_two_readings_is_not_reduced():
    """[2T] viewed as [2, T] is one split; [T*T'] viewed as [T', T] with T and T' of one size is
    unambiguous too (one symbol); a factor that could be either of two sizes is refused."""
    gen = VS._Generalizer([4096, 2048], 24, set())
    s, t = gen.symbol(4096).node.expr, gen.symbol(2048).node.expr
    assert gen._split(2 * s, [2, 4096], "v") == [2, s]
    with pytest.raises(VS.CannotReduce, match="cannot tell"):
        gen._split(2 * s * t, [4096, 4096], "v")      # 2*T' or T?


def test_thresholds_read_the_mask_constants_and_the_window():
    pair = _traced_pair_of(band, *_qkv())
    old_gm, new_gm = pair.graphs()
    found = VS._thresholds(old_gm, new_gm, {n.name for n in pair.pure})
    assert {c for c, _ in found} == {8}, found


def _shifted(q, k, v):
    t = q.size(-2)
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool), diagonal=30)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def test_a_kept_position_is_a_constant_the_reduced_sizes_exceed():
    """`tril(ones(T, T), 30)` at T=2048: the diagonal 30 is not a size; at 24 (or 31) keys the mask would
    hide nothing (a rewrite dropping it would pass), so the reduced sizes go to 2 * 30 + 2."""
    pair = _traced_pair_of(_shifted, *_qkv())
    assert VS.reduce_pair(pair, V.MAX_ELEMENTS).note == f"reduced sizes {T}->62"


def test_a_rewrite_that_drops_a_shifted_mask_is_refused_at_reduced_sizes(monkeypatch, tmp_path):
    def drop_mask(m):
        m.terms = []
    from test_validate import _break_match

    _break_match(monkeypatch, drop_mask)
    reports, got, want = _compile(_case(_shifted, *_qkv()), repro_dir=str(tmp_path))
    (site,) = _assert_refused(reports, got, want, tmp_path)
    assert f"reduced sizes {T}->62" in site.reason, site.reason


def test_hf_gpt2_qkv_split_at_its_real_width_is_fused():
    """HF GPT-2 (sdpa) at its real width, B=8, T=128: the region's largest tensor is c_attn's [8, 128, 2304] output,
    split in three by `split(768)`. Generalized, the split's chunk count `(s + 767) // 768 == 3` reads a size the
    reduction does not set: that must not fail the passes (it did, on an H200 run, 2026-12-03: the graph compiled
    unmodified); the site is checked on its first call instead."""
    import transformers

    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 100, (8, 128))
    torch._dynamo.reset()
    with torch.no_grad():
        reports = attnlower.inspect(net, ids, options={"inner": "eager"})
    sites = _sites(reports)
    assert len(sites) == 1 and sites[0].rewritten, [(s.op, s.reason) for s in sites]
    validated = sites[0].validated
    assert validated.startswith(("passed", "first call")) and "reads a size the reduction does not set" in validated, \
        validated


def test_an_error_inside_the_reduction_falls_back_to_the_first_call_check(monkeypatch):
    """A case the reduction does not know raises inside it: the site is still fused and checked on its first call,
    its validation line names the error; the graph's other work is not lost."""
    def broken(pair, budget):
        raise TypeError("cannot determine truth value of Relational")

    monkeypatch.setattr(V, "reduce_pair", broken)
    reports, got, want = _compile(_case(causal_tril, *_qkv()))
    (site,) = _sites(reports)
    assert site.rewritten, site.reason
    assert site.validated.startswith("first call:"), site.validated
    assert "the reduction failed: TypeError: cannot determine truth value" in site.validated, site.validated
    assert _max_rel(got, want) < 1e-5
