"""The pipeline (passes/pipeline.py): the stages in their order, and the checks between them that catch a
stage breaking its promise or leaving the graph invalid."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from attnlower.passes import pipeline
from attnlower.passes.pipeline import STAGES, StageInvariantError, check_stage, run_stages
from attnlower.passes.site import Context
from attnlower.target import Target
from helpers import aten_graphs, qkv


def gpt2_eager(q, k, v):
    # transformers' GPT-2 eager attention: scores / sqrt(d), a causal tril, softmax, @ v
    t = q.size(-2)
    w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(v.size(-1))
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool)).view(1, 1, t, t)
    w = torch.where(causal, w, torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype))
    return torch.matmul(F.softmax(w, dim=-1), v)


def _context(gm) -> Context:
    from attnlower.passes.canonicalize import fake_mode_for

    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    return Context(target=Target("cpu"), fake_mode=fake_mode_for(inputs),
                   allowed_ops=("flash_attention", "sliding_window_attention", "paged_attention"))


def test_the_stages_run_in_the_documented_order():
    assert [s.name for s in STAGES] == ["functionalize", "find_anchors", "score_chain", "resolve_kv", "classify_masks",
                                        "analyze", "rewrite", "validate", "clean_up"]


def test_each_stage_reports_once_and_the_site_is_fused():
    (gm,) = aten_graphs(gpt2_eager, *qkv(t=7))
    ctx, seen = _context(gm), []
    run_stages(gm, ctx, lambda name, seconds, summary: seen.append((name, summary)))
    assert [name for name, _ in seen] == [s.name for s in STAGES]
    assert dict(seen)["rewrite"] == "1 rewritten"
    (site,) = ctx.sites
    assert site.rewritten and site.decision.spec.op == "flash_attention" and site.decision.spec.causal


def test_a_stage_that_leaves_sites_open_without_its_fact_is_caught(monkeypatch):
    # an analyze stage that decides nothing: the next stage would rewrite without a decision
    idle = [dataclasses.replace(s, run=lambda gm, ctx: "did nothing") if s.name == "analyze" else s for s in STAGES]
    monkeypatch.setattr(pipeline, "STAGES", tuple(idle))
    (gm,) = aten_graphs(gpt2_eager, *qkv(t=7))
    with pytest.raises(StageInvariantError, match="after stage analyze: site 0 .*open without a decision"):
        run_stages(gm, _context(gm))


def test_a_refusal_needs_a_reason():
    (gm,) = aten_graphs(gpt2_eager, *qkv(t=7))
    ctx = _context(gm)
    STAGES[1].run(gm, ctx)            # find_anchors
    ctx.sites[0].refuse("")
    with pytest.raises(StageInvariantError, match="refused without a reason"):
        check_stage(STAGES[1], gm, ctx, full=False)


def test_the_full_check_wants_every_node_to_keep_its_example_value():
    (gm,) = aten_graphs(gpt2_eager, *qkv(t=7))
    ctx = _context(gm)
    check_stage(STAGES[0], gm, ctx, full=True)
    softmax = next(n for n in gm.graph.nodes if "softmax" in str(n.target))
    del softmax.meta["val"]           # what a stage inserting nodes without faking them would leave
    check_stage(STAGES[0], gm, ctx, full=False)       # the cheap check does not look at nodes
    with pytest.raises(StageInvariantError, match="has no example value"):
        check_stage(STAGES[0], gm, ctx, full=True)


def test_checkpoint_bodies_get_every_stage_after_the_graph():
    from torch.utils.checkpoint import checkpoint

    def layer(q, k, v):
        return checkpoint(gpt2_eager, q, k, v, use_reentrant=False)

    (gm,) = aten_graphs(layer, *qkv(t=7))
    ctx, names = _context(gm), []
    run_stages(gm, ctx, lambda name, seconds, summary: names.append(name))
    bodies = [n for n in names if " [" in n]
    assert names[:len(STAGES)] == [s.name for s in STAGES]
    assert [n.split(" [")[0] for n in bodies] == [s.name for s in STAGES]
    (site,) = ctx.sites
    assert site.rewritten, site.refusal


def test_check_stages_option_turns_the_full_checks_on(monkeypatch):
    """options={"check_stages": True} lints between stages even without ATTNLOWER_CHECK_STAGES: a stage
    that leaves a node without its example value is caught, naming the stage."""
    import dataclasses

    from attnlower.compiler import backend
    from attnlower.passes import pipeline
    from attnlower.passes.pipeline import StageInvariantError

    monkeypatch.delenv("ATTNLOWER_CHECK_STAGES", raising=False)

    def drops_a_value(gm, ctx):
        for node in gm.graph.nodes:
            if node.op == "call_function":
                node.meta.pop("val", None)
                break
        return "dropped one example value"

    stages = list(pipeline.STAGES)
    stages[0] = dataclasses.replace(stages[0], run=drops_a_value)
    monkeypatch.setattr(pipeline, "STAGES", tuple(stages))

    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    q = torch.randn(2, 3, 5, 8)
    torch._dynamo.reset()
    torch.compile(attention, backend="attnlower", options={"inner": "eager"})(q, q, q)   # unchecked: runs
    torch._dynamo.reset()
    with pytest.raises(Exception, match="after stage functionalize: .* has no example value"):
        torch.compile(attention, backend="attnlower",
                      options={"inner": "eager", "strict": True, "check_stages": True})(q, q, q)
