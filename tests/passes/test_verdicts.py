"""The verdicts kept per process by a site's structure (passes/verdicts.py): what a later identical site takes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from attnlower.passes import verdicts


@pytest.fixture(autouse=True)
def _fresh():
    verdicts.clear_cache()
    yield
    verdicts.clear_cache()


def test_a_remembered_verdict_is_what_a_later_site_of_that_structure_gets():
    assert verdicts.earlier("k") is None
    v = verdicts.remember("k", verdicts.Verdict(True, "float64 CPU"))
    assert verdicts.earlier("k") is v and verdicts.earlier("other") is None
    verdicts.clear_cache()
    assert verdicts.earlier("k") is None


def test_a_failed_first_call_check_refuses_its_structure():
    verdicts.remember("k", verdicts.Verdict(True, "first-call check pending: ..."))
    verdicts.refuse_by_structure("k", "translation validation failed on the first call: ...")
    v = verdicts.earlier("k")
    assert not v.ok and v.reason.startswith("translation validation failed on the first call")


@pytest.mark.parametrize("key,failed,result,kept", [
    ("k", "", "first call: float64 CPU on 16x64 sampled elements ...", True),
    ("k", "", "not validated: the first-call check could not run (...)", False),
    ("k", "translation validation failed ...", "first call: ...", False),
    ("", "", "first call: ...", False),
])
def test_only_a_first_call_check_that_ran_and_agreed_is_recorded(key, failed, result, kept):
    verdicts.record_first_call(SimpleNamespace(key=key, failed=failed, result=result))
    got = verdicts.earlier(key)
    assert (got is not None) == kept
    if kept:
        assert got.ok and got.checked_on == result
