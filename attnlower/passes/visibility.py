"""Which keys a query sees under the fused ops' semantics: the pass side's one statement of it.

Key j is visible from query i iff the pattern is "none", or j <= i + off and, for a band, also
j > i + off - window; off = Tk - Tq when the diagonal is aligned bottom-right, else 0
(docs/INTERFACES.md section 1). A window is always causal: a band is bounded by the diagonal on one
side. The mask classifier proves a mask equals one of these patterns, the analyzer drops the mask for
the op's own causal / window arguments, and the report counts the scores a pattern leaves to compute.
(The kernels and the reference state the same rule in lowering/, which this side does not import.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# A fill or additive bias at or below this masks a key exactly as -inf does: exp of (it - the row max)
# underflows to 0 in fp32. HF masks with finfo(dtype).min; -1e30 covers the fp32 / bf16 / fp64 mins and
# the common "large negative" constants (fp16's -65504 is read per dtype by the mask classifier).
MASKED = -1e30


def masking_threshold(dtypes) -> float:
    """The largest value an additive mask still hides a key with: MASKED, or finfo(dtype).min when a dtype on
    its way to the scores is coarser (fp16's min is -65504, the value HF fills fp16 masks with)."""
    threshold = MASKED
    for dtype in dtypes:
        if dtype is not None and dtype.is_floating_point:
            threshold = max(threshold, torch.finfo(dtype).min)
    return threshold


@dataclass(frozen=True)
class Visibility:
    """A pattern the kernels implement: kind "none" (every key), "causal", or "band" (causal, `window` keys)."""

    kind: str
    bottom_right: bool = False
    window: int = 0

    @classmethod
    def of(cls, causal: bool, bottom_right: bool = False, window: int = 0) -> "Visibility":
        """The pattern of an op's arguments: `window` > 0 is a band, which is causal by definition."""
        if window and not causal:
            raise ValueError(f"a window of {window} keys without causal: a window is always causal "
                             "(pass causal=True, or window=0 for no band)")
        return cls("band" if window else "causal" if causal else "none", bool(bottom_right), int(window or 0))

    @property
    def causal(self) -> bool:
        """Keys after the diagonal are hidden: every pattern but "none" (a band included)."""
        return self.kind != "none"

    def _spans(self, tq: int, tk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query row i, the first and last visible key index (the last may be past Tk - 1)."""
        rows = torch.arange(tq)
        off = tk - tq if self.bottom_right else 0
        last = rows + off
        first = (last - self.window + 1).clamp(min=0) if self.kind == "band" else torch.zeros_like(rows)
        return first, last

    def visible(self, tq: int, tk: int) -> torch.Tensor:
        """The [tq, tk] bool matrix: key j visible from query i."""
        if not self.causal:
            return torch.ones(tq, tk, dtype=torch.bool)
        first, last = self._spans(tq, tk)
        keys = torch.arange(tk).unsqueeze(0)
        return (keys >= first.unsqueeze(1)) & (keys <= last.unsqueeze(1))

    def visible_fraction(self, tq: int, tk: int) -> float:
        """The share of the tq x tk scores that are visible (what a kernel that skips the rest computes)."""
        if not self.causal:
            return 1.0
        first, last = self._spans(tq, tk)
        count = (last.clamp(max=tk - 1) - first + 1).clamp(min=0).sum()
        return int(count) / (tq * tk)

    def describe(self) -> str:
        """"every key visible", "causal (top-left)", "causal band of width 4 (bottom-right)"."""
        align = "bottom-right" if self.bottom_right else "top-left"
        if self.kind == "none":
            return "every key visible"
        if self.kind == "causal":
            return f"causal ({align})"
        return f"causal band of width {self.window} ({align})"
