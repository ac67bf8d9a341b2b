"""Outsider tests whose feature is specified but not built yet: each marked xfail(strict=True) by
tests/conftest.py with the reason here. Strict: the day the gap closes the test passes, the run fails, and
the entry must go. One place lists what the suite knows is missing; the issues say who builds it.

Keys are test node ids (file::test[params]) relative to the repository root; a key without parameters
covers every parametrization of the test.
"""

DATA_ALIAS_BLIND_SPOT = ("issue 22 class 1: a buffer written through .data (or a NumPy / DLPack alias) "
                         "changes neither its _version nor its identity, so the backend's guard does not see "
                         "it; the ops take a device-side `verified` flag now (opsfeat), but the pass side does not "
                         "emit it yet: the rewrite must pass the buffer mask as `bias` with `verified = (slice == "
                         "proven pattern).all()` computed in the graph (docs/design/issue22.md, class 1 point 5)")

KNOWN_GAPS = {
    # ---- earlier issues
    "tests/passes/test_spelling_class_buffer_masks.py::test_nanogpt_buffer_written_through_data_after_compiling":
        DATA_ALIAS_BLIND_SPOT,
}
