"""The pass pipeline: the named stages in the order they run, and the checks between them.

Each stage is a module of this package with one entry function `(graph, ctx) -> summary` (a line for
the report). Stages talk through the one record per site (`site.AttentionSite`): a stage reads what
the stages before it proved, adds its own fact or refuses the site, and leaves the graph valid.
`run_stages` runs them on a graph, then on the body of every torch.utils.checkpoint call in it.

Between stages the sites are checked against what the stage promises (`Stage.promise`: cheap, always);
with options={"check_stages": True} or ATTNLOWER_CHECK_STAGES=1 (the test suite sets it) the graph is also linted and every node the
stages kept or made is checked to be alive and to carry its example value. A broken promise is a bug
of the stage: it raises `StageInvariantError`, and the backend compiles the graph unmodified.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from .analyze import analyze
from .anchors import find_anchors
from .canonicalize import checkpoint_bodies
from .cleanup import clean_up
from .functionalize import functionalize
from .kv import resolve_kv
from .masks import classify_masks
from .rewrite import rewrite
from .score_chain import score_chain
from .site import AttentionSite, Context
from .validate import validate


class StageInvariantError(RuntimeError):
    """A stage left a site or the graph in a state it promises never to leave (a bug of attnlower)."""


@dataclass(frozen=True)
class Stage:
    """A named stage: `run(graph, ctx) -> summary`, and what it promises about each site of the graph
    afterwards (`promise(site, alive) -> ""` when kept, else what is wrong; `alive` is the set of the
    graph's nodes in the full check, None in the cheap one)."""

    name: str
    run: Callable[[fx.GraphModule, Context], str]
    promise: Callable[[AttentionSite, set | None], str]


def _nothing(site: AttentionSite, alive) -> str:
    return ""


def _chain_proven(site: AttentionSite, alive) -> str:
    if site.open and site.chain is None:
        return "open without a chain"
    if site.open and alive is not None and not set(site.chain.region) <= alive:
        return "its region holds nodes no longer in the graph"
    return ""


def _operands_resolved(site: AttentionSite, alive) -> str:
    if site.open and site.match is None:
        return "open without a match"
    if site.open and alive is not None and not {site.match.q.source, site.match.k.source, site.match.v.source} <= alive:
        return "q, k or v is read from a node no longer in the graph"
    return ""


def _mask_classified(site: AttentionSite, alive) -> str:
    if site.open and len(site.match.terms) == 1 and site.mask is None:
        return "open with one mask term and no classification"
    return ""


def _op_chosen(site: AttentionSite, alive) -> str:
    if site.open and site.decision is None:
        return "open without a decision"
    return ""


def _rewritten(site: AttentionSite, alive) -> str:
    if site.open and site.replacement is None:
        return "open but not rewritten"
    if site.rewritten and site.match.output.users:
        return "rewritten, but the replaced output still has users"
    if site.rewritten and alive is not None and site.replacement not in alive:
        return "rewritten into a node no longer in the graph"
    return ""


def _validated(site: AttentionSite, alive) -> str:
    if site.rewritten and not site.validated:
        return "rewritten without a validation verdict"
    if site.replacement is not None and not site.rewritten and site.replacement.users:
        return "refused after its rewrite, but the replacement still has users"
    return ""


def _cleaned(site: AttentionSite, alive) -> str:
    if alive is not None and site.rewritten and site.match.output in alive:
        return "rewritten, but the replaced output is still in the graph"
    return ""


# The pipeline, top to bottom.
STAGES: tuple[Stage, ...] = (
    Stage("functionalize", functionalize, _nothing),          # in-place score ops made out-of-place
    Stage("find_anchors", find_anchors, _nothing),            # a site per softmax / SDPA call
    Stage("score_chain", score_chain, _chain_proven),          # up to Q·Kᵀ, down to P·V: terms, scale, region
    Stage("resolve_kv", resolve_kv, _operands_resolved),       # q / k / v to their sources: GQA, paged pools
    Stage("classify_masks", classify_masks, _mask_classified),  # what the mask computes: causal, band, padding
    Stage("analyze", analyze, _op_chosen),                     # the op and its AttentionSpec
    Stage("rewrite", rewrite, _rewritten),                     # one op call replaces each region
    Stage("validate", validate, _validated),                   # each rewrite against the region it replaced
    Stage("clean_up", clean_up, _cleaned),                     # the replaced regions dropped
)


def run_stages(gm: fx.GraphModule, ctx: Context,
               on_stage: Callable[[str, float, str], None] | None = None) -> None:
    """Run STAGES on `gm`, then on the body of every torch.utils.checkpoint call in it, outermost first.

    The bodies are first replaced by private copies (`checkpoint_bodies`), so the graph `gm` was copied
    from keeps the originals. `on_stage(name, seconds, summary)` is called after each stage, the name
    suffixed with ` [body path]` inside a body.
    """
    graphs = [("", gm)] + [(f" [{path}]", body) for path, body in checkpoint_bodies(gm)]
    for label, graph in graphs:
        ctx.in_checkpoint = bool(label)
        for stage in STAGES:
            started = time.perf_counter()
            summary = stage.run(graph, ctx)
            seconds = time.perf_counter() - started
            check_stage(stage, graph, ctx, full=ctx.check_stages or checks_enabled())
            if on_stage is not None:
                on_stage(stage.name + label, seconds, summary)


def checks_enabled() -> bool:
    """Whether the full checks between stages run for every graph of the process (ATTNLOWER_CHECK_STAGES=1,
    which the test suite sets); one compile asks for them with options={"check_stages": True}."""
    return os.environ.get("ATTNLOWER_CHECK_STAGES", "") == "1"


def check_stage(stage: Stage, gm: fx.GraphModule, ctx: Context, full: bool) -> None:
    """Raise StageInvariantError when `stage` broke its promise on a site of `gm`, or (full) left the
    graph invalid: not linting, or a node without its example value."""
    alive = None
    if full:
        try:
            gm.graph.lint()
        except RuntimeError as e:
            raise StageInvariantError(f"after stage {stage.name}: the graph does not lint: {e}") from e
        alive = set(gm.graph.nodes)
        for node in gm.graph.nodes:
            if node.op == "call_function" and "val" not in node.meta and "fake_error" not in node.meta:
                raise StageInvariantError(f"after stage {stage.name}: {node.format_node()} has no example "
                                          "value (meta['val']); every stage keeps it for the next")
    for site in ctx.sites_in(gm):
        problem = "refused without a reason" if site.refusal == "" else stage.promise(site, alive)
        if problem:
            raise StageInvariantError(f"after stage {stage.name}: site {site.index} ({site.location}): {problem}; "
                                      "expected every stage to keep its promise (pipeline.STAGES)")
