"""Stage clean_up: drop the replaced regions and whatever only fed them (repeats, mask builders)."""
from __future__ import annotations

import torch.fx as fx

from .site import Context


def clean_up(gm: fx.GraphModule, ctx: Context) -> str:
    """Dead-code-eliminate `gm` (a rewritten region has no users left; an undone rewrite's inserted
    nodes neither), lint it and regenerate its code."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return f"{before - len(gm.graph.nodes)} node(s) removed"
