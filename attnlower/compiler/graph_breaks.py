"""Graph breaks Dynamo took before handing a graph to attnlower, and what each means for attention.

Code past a graph break runs outside any compiled graph, so attnlower never sees the attention in it:
a report that said only "0 attention site(s)" would leave the user guessing. Dynamo counts every break
it takes in `torch._dynamo.utils.counters["graph_break"]` (reason text -> count) before it compiles the
partial graph, so the breaks that are new when a graph reaches the backend belong to that graph.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# Dynamo's switch that lets a side effect inside torch.utils.checkpoint stay in the graph (not
# replayed by the backward's recomputation). Named in the advice only where this torch has it.
CHECKPOINT_SIDE_EFFECTS_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


@dataclass(frozen=True)
class GraphBreak:
    """One kind of graph break: Dynamo's reason (first line), how often, what it means, what to do."""

    reason: str
    count: int
    meaning: str
    advice: str

    def describe(self) -> str:
        times = f" ({self.count}x)" if self.count > 1 else ""
        return f"{self.reason}{times}: {self.meaning}; what to do: {self.advice}"


_seen: Counter = Counter()


def new_graph_breaks() -> list[GraphBreak]:
    """The graph breaks Dynamo counted since the previous call (i.e. since the previous graph reached
    attnlower), worded for the report. Counters cleared by `torch._dynamo.reset()` start over."""
    import torch._dynamo.utils as dynamo_utils

    global _seen
    current = Counter(dynamo_utils.counters.get("graph_break", {}))
    new = {reason: n - _seen.get(reason, 0) for reason, n in current.items() if n > _seen.get(reason, 0)}
    _seen = current
    return [explain(reason, n) for reason, n in new.items()]


def explain(reason: str, count: int = 1) -> GraphBreak:
    """Word one of Dynamo's graph-break reasons for someone who wants their attention fused."""
    first = reason.strip().splitlines()[0] if reason.strip() else "graph break"
    if _is_checkpoint_side_effect(reason):
        return GraphBreak(
            first, count,
            "a side effect inside torch.utils.checkpoint (a variable or attribute from outside the "
            "checkpointed function is changed there; transformers >= 5.25 with the `kernels` package "
            "wraps attention modules this way) made Dynamo run the checkpointed region outside the "
            "compiled graph, so its attention was not seen",
            _checkpoint_advice())
    return GraphBreak(
        first, count,
        "the code after the break runs outside this graph; attention there is compiled in a later "
        "graph if Dynamo resumes tracing, otherwise it runs eagerly and unfused",
        "remove the cause of the break (TORCH_LOGS=graph_breaks shows where), or compile with "
        "fullgraph=True to make it an error")


def _is_checkpoint_side_effect(reason: str) -> bool:
    text = reason.lower()
    return text.startswith("hop:") and "side effect" in text and (
        "checkpoint" in text or "higher-order op" in text or "higher order op" in text)


def _checkpoint_advice() -> str:
    import torch

    flag = f"torch._dynamo.config.{CHECKPOINT_SIDE_EFFECTS_FLAG} = True"
    where = "" if hasattr(torch._dynamo.config, CHECKPOINT_SIDE_EFFECTS_FLAG) else \
        " (needs a newer torch than this one)"
    return (f"set `{flag}` before compiling{where} if the side effect need not be replayed when the "
            "backward recomputes the region (then the region is compiled and its attention fused); for "
            "a Hugging Face model, `attn_implementation=\"attnlower\"` runs attnlower's kernels under "
            "gradient checkpointing without torch.compile")
