"""Hand the rewritten graph to Inductor, with Inductor's own attention fusion off.

attnlower owns attention: every site it could fuse is already one `attnlower` op, and every softmax
left in the graph was left there on purpose (its probabilities are used elsewhere, the softmax is
over another dim, the scale is data, ...). Inductor's joint-graph pass `fuse_attention` ("sfdp")
pattern-matches softmax/matmul chains into `scaled_dot_product_attention`. Letting it run on what
we refused would undo the refusal, and it is wrong on at least one of them: torch 2.13's pattern
matches `softmax(q @ k.T, dim=-2) @ v` and returns SDPA's softmax over the last dim (max abs error
~1 on random inputs; `tests/test_spellings.py::test_negative[softmax_other_dim-inductor]`).

So while `compile_fx` runs on an attnlower graph, the sfdp entries are taken out of Inductor's
joint-graph pattern tables and put back afterwards. Every other pattern (pad_mm, misc) stays.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.fx as fx

_SFDP_MODULE = "torch._inductor.fx_passes.fuse_attention"


def _is_sfdp(entry) -> bool:
    """An entry registered by `fuse_attention`: its name (torch ≥ 2.12) or what its check closes over."""
    name = getattr(entry, "pattern_name", None)
    if isinstance(name, str) and name.startswith("_sfdp"):
        return True
    check = getattr(entry, "extra_check", None)
    if getattr(check, "__module__", None) == _SFDP_MODULE:
        return True
    for cell in getattr(check, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(content) and getattr(content, "__module__", None) == _SFDP_MODULE:
            return True
    return False


@contextlib.contextmanager
def without_sfdp() -> Iterator[None]:
    """Inductor's joint-graph passes run without the fuse_attention patterns inside this block.

    `joint_graph.lazy_init` registers the patterns the first time a graph (per device) reaches the
    joint-graph passes, so it is wrapped: after it runs, sfdp entries are removed. Whatever was removed
    is restored on exit, so plain `torch.compile(backend="inductor")` in the same process is unchanged.
    """
    from torch._inductor.fx_passes import joint_graph

    # `patterns` is also one of `pass_patterns`: each table once, by identity
    tables = list({id(t): t for t in (joint_graph.patterns, joint_graph.early_patterns,
                                      *getattr(joint_graph, "pass_patterns", []))}.values())
    saved: list[tuple[list, list]] = []   # (the table's entry list, its entries before stripping)

    def strip() -> None:
        for table in tables:
            for entries in table.patterns.values():
                kept = [e for e in entries if not _is_sfdp(e)]
                if len(kept) != len(entries):
                    saved.append((entries, list(entries)))
                    entries[:] = kept

    original_init = joint_graph.lazy_init

    def lazy_init(*args, **kwargs):
        result = original_init(*args, **kwargs)
        strip()
        return result

    joint_graph.lazy_init = lazy_init
    try:
        strip()
        yield
    finally:
        joint_graph.lazy_init = original_init
        for entries, before in reversed(saved):  # reversed: a list stripped twice ends at its first state
            entries[:] = before


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]):
    from torch._inductor.compile_fx import compile_fx

    with without_sfdp():
        return compile_fx(gm, example_inputs)
