"""What an attention op computes besides its tensors: one frozen object, built once at the op schema.

The ops' schemas (`lowering/ops.py`) keep their flat, named arguments (graphs and users spell them);
everything below the schema (validation, the launch plan, the launchers, the reference) takes an
`AttentionParams` and the tensors. Optional tensors travel as keywords of the launchers
(`bias=`, `alibi_slopes=`, `rng_state=`), so a new input is a new keyword, not a new position.

How the op features land here:
  - a fill value for masked scores (issue 22, class 2): the field `mask_fill` (-inf = masking); the plan
    turns it into the constexpr HAS_FILL and the kernels take it as a runtime scalar;
  - attention sinks, document ids (issue 21): tensors, so `sinks=` / `doc_ids=` keywords of the launchers
    and the reference; the plan reads their presence (HAS_SINKS, HAS_DOCS), as it does for alibi;
  - a V head dim different from Q/K's (issue 21): nothing here: the plan reads Dv from v's shape.
"""
from __future__ import annotations

import math
from typing import NamedTuple


class AttentionParams(NamedTuple):
    """The scalar semantics of one attention call (docs/INTERFACES.md section 1).

    scale:          softmax scale, already resolved (`1 / sqrt(D)` when the op got None).
    causal:         query i sees keys j <= i (+ Tk - Tq with bottom_right; paged: j <= position).
    bottom_right:   align the causal diagonal to the last query / key (dense ops only).
    window:         > 0: also only keys j > i - window (the sliding op; paged: the window option).
    softcap:        > 0: scores become softcap * tanh(scores / softcap) before bias / alibi.
    dropout_p:      attention dropout probability (dense ops, training).
    empty_rows_nan: rows with no visible key give NaN (eager softmax) instead of 0.
    mask_fill:      the score every masked position takes (a finite replace-fill: `masked_fill(~keep, f)`,
                    so a fully masked row averages every key); -inf (the default) masks them out.
    short_sequences: paged only: a sequence shorter than its Tq queries (0 < seq_len < Tq) is computed, its queries
                    before the first token empty rows (0 / NaN by empty_rows_nan), instead of an error; the paged op
                    sets it when its `empty_rows_nan` is given (False / True), not for its default None.

    Immutable and hashable: it is part of the key of the launch-plan cache (`lowering/plan.py`). A
    NamedTuple rather than a frozen dataclass: its hash and equality run in C, and every op call
    hashes it (a dataclass's generated __hash__ cost more than the rest of the cache lookup).
    """

    scale: float
    causal: bool = False
    bottom_right: bool = False
    window: int = 0
    softcap: float = 0.0
    dropout_p: float = 0.0
    empty_rows_nan: bool = False
    mask_fill: float = float("-inf")
    short_sequences: bool = False

    @property
    def has_fill(self) -> bool:
        """Whether masked scores take a finite value (the fill mode) instead of -inf."""
        return self.mask_fill != float("-inf")

    @property
    def is_causal(self) -> bool:
        """Whether any causal mask applies (a window is always causal)."""
        return self.causal or self.window > 0

    @classmethod
    def resolve(cls, head_dim: int, scale: float | None, **fields) -> "AttentionParams":
        """Params with `scale=None` resolved to the default `1 / sqrt(head_dim)`."""
        return cls(scale=default_scale(head_dim) if scale is None else float(scale), **fields)


def default_scale(head_dim: int) -> float:
    """The softmax scale used when `scale=None`: 1 / sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)
