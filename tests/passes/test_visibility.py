"""The ops' key geometry (passes/visibility.py) against its definition, written out key by key."""
from __future__ import annotations

import itertools

import pytest
import torch

from attnlower.passes.visibility import Visibility


def by_definition(kind: str, bottom_right: bool, window: int, tq: int, tk: int) -> torch.Tensor:
    """docs/INTERFACES.md section 1, one key at a time."""
    off = tk - tq if bottom_right else 0
    out = torch.zeros(tq, tk, dtype=torch.bool)
    for i in range(tq):
        for j in range(tk):
            out[i, j] = kind == "none" or (j <= i + off and (kind == "causal" or j > i + off - window))
    return out


@pytest.mark.parametrize("tq, tk", [(1, 1), (1, 9), (7, 7), (5, 13), (13, 5), (37, 41)])
def test_visible_keys_and_their_share_match_the_definition(tq, tk):
    for (kind, window), bottom_right in itertools.product([("none", 0), ("causal", 0), ("band", 1), ("band", 4),
                                                            ("band", 64)], (False, True)):
        pattern = Visibility(kind, bottom_right, window)
        want = by_definition(kind, bottom_right, window, tq, tk)
        assert torch.equal(pattern.visible(tq, tk), want), (kind, bottom_right, window, tq, tk)
        assert pattern.visible_fraction(tq, tk) == pytest.approx(want.sum().item() / (tq * tk), abs=0)


def test_a_window_is_always_causal():
    assert Visibility.of(causal=True, window=8) == Visibility("band", False, 8) and Visibility.of(True, True, 8).causal
    assert Visibility.of(causal=True).kind == "causal" and not Visibility.of(causal=False).causal
    with pytest.raises(ValueError, match="a window is always causal"):
        Visibility.of(causal=False, window=8)
