"""Outsider tests whose feature is specified but not built yet: each marked xfail(strict=True) by
tests/conftest.py with the reason here. Strict: the day the gap closes the test passes, the run fails, and
the entry must go. One place lists what the suite knows is missing; the issues say who builds it.

Keys are test node ids (file::test[params]) relative to the repository root; a key without parameters
covers every parametrization of the test.
"""

KNOWN_GAPS = {
    # ---- earlier issues
}
