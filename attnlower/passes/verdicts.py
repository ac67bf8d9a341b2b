"""The verdicts of translation validation, kept per process by a site's structure.

Identical sites (the layers of one model) are checked once: the compile-time check (validate.py)
records each verdict under the pair's structural key, and the first-call check (validate_first_call.py)
records what the graph's first call found, so that sites of the same structure compiled later take it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Verdict:
    """What validation found for one site.

    ok False means the rewrite must be undone; `checked_on` goes to `Site.validated` either way.
    """

    ok: bool
    checked_on: str
    reason: str = ""          # on failure: "translation validation failed: ..."
    repro: str | None = None
    cached: bool = False      # the verdict of an identical site checked earlier in this process
    first_call: Any = None    # validate_first_call.Plan: checked on the graph's first call, pending


_CHECKED: dict[str, Verdict] = {}


def clear_cache() -> None:
    """Forget the verdicts of earlier sites (tests use it to force a fresh check)."""
    _CHECKED.clear()


def earlier(key: str) -> Verdict | None:
    """The verdict of a site of structure `key` checked earlier in this process, or None."""
    return _CHECKED.get(key)


def remember(key: str, verdict: Verdict) -> Verdict:
    """Sites of structure `key` compiled later take `verdict`; returns it."""
    _CHECKED[key] = verdict
    return verdict


def refuse_by_structure(key: str, reason: str) -> None:
    """Every later site of structure `key` is refused with `reason` (a failed first-call check)."""
    _CHECKED[key] = Verdict(False, "first call: the sampled elements differ", reason)


def record_first_call(plan) -> None:
    """A first-call check ran: identical sites compiled later take its verdict."""
    if plan.key and not plan.failed and plan.result.startswith("first call"):
        _CHECKED[plan.key] = Verdict(True, plan.result)
