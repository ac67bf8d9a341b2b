"""Stage clean_up: drop the replaced regions and whatever only fed them (repeats, mask builders)."""
from __future__ import annotations

import torch.fx as fx

from .buffers import thaw
from .site import Context


def clean_up(gm: fx.GraphModule, ctx: Context) -> str:
    """Dead-code-eliminate `gm` (a rewritten region has no users left; an undone rewrite's inserted
    nodes neither), read the guarded buffers something still reads each call from their inputs again
    (`buffers.thaw`), lint it and regenerate its code."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    thawed = thaw(gm)
    gm.graph.lint()
    gm.recompile()
    return f"{before - len(gm.graph.nodes)} node(s) removed" + (f", {thawed} buffer(s) read as inputs again" if thawed else "")
