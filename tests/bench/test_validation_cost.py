"""bench/validation_cost.py reads the first-call check's seconds from the verdict the report shows."""
from __future__ import annotations

import importlib.util
import os

import torch

import attnlower
from attnlower.passes import validate as V
from attnlower.passes import verdicts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location("validation_cost", os.path.join(ROOT, "bench", "validation_cost.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_call_seconds_are_read_from_a_real_verdict(monkeypatch):
    monkeypatch.setattr(V, "MAX_ELEMENTS", 100)      # over budget, and not reducible under it: the first call
    verdicts.clear_cache()

    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    (report,) = attnlower.inspect(attention, q, k, v, options={"inner": "eager"})
    (site,) = report.sites
    assert site.validated.startswith("first call:"), site.validated
    seconds = _load()._first_call_seconds(site.validated)
    assert 0 < seconds < 10, (seconds, site.validated)
    verdicts.clear_cache()
