"""Outsider tests whose feature is specified but not built yet: each marked xfail(strict=True) by
tests/conftest.py with the reason here. Strict: the day the gap closes the test passes, the run fails, and
the entry must go. One place lists what the suite knows is missing; the issues say who builds it.

Keys are test node ids (file::test[params]) relative to the repository root; a key without parameters
covers every parametrization of the test.
"""

NEEDS_FILL_MODE = ("issue 22 class 2: a finite fill that is not provably -inf masking needs the op's fill "
                   "mode (masked scores take the fill: a fully masked row is a uniform average); refused today")
DATA_ALIAS_BLIND_SPOT = ("issue 22 class 1: a buffer written through .data (or a NumPy / DLPack alias) "
                         "changes neither its _version nor its identity, so the backend's guard does not see "
                         "it; closing it needs the op's device-side `verified` input (docs/design/issue22.md)")

KNOWN_GAPS = {
    # ---- earlier issues
    "tests/passes/test_spelling_class_buffer_masks.py::test_nanogpt_buffer_written_through_data_after_compiling":
        DATA_ALIAS_BLIND_SPOT,
    "tests/passes/test_spelling_class_finite_fills.py::test_annotated_decoder_causal_and_padding": NEEDS_FILL_MODE,
    "tests/passes/test_spelling_class_finite_fills.py::test_annotated_decoder_gradients": NEEDS_FILL_MODE,
}
