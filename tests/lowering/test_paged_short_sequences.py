"""paged_attention with `empty_rows_nan` (issue 22 class 5): a chunk of Tq queries longer than its sequence.

The queries are the last Tq tokens of each sequence: query i sits at position seq_len - Tq + i. With
`empty_rows_nan=None` (the default) a sequence with 0 < seq_len < Tq is an error; with False / True the call
computes it, and every row with no visible key (a causal query before the sequence's first token, every row of an
empty sequence) gives 0 / NaN, as the dense ops' empty_rows_nan; a finite sink keeps a row from being empty.

Checked against the float64 oracle of tests/lowering/attention_oracle.py (each sequence's keys gathered, the
dense oracle bottom-right aligned: off = seq_len - Tq), through the kernel (launcher, split-KV on and off,
workspaces NaN-poisoned and the output poisoned with a sentinel so that an unwritten row fails), the op on CPU
(the reference) and the op through the interpreter; the NaN pattern must be exactly the oracle's.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import attnlower.ops as public
from attnlower import PagedInputError
from attnlower.lowering import errors, launch_paged
from attnlower.lowering.launch_paged import paged_forward
from attnlower.lowering.params import AttentionParams
from attention_oracle import oracle
from test_paged_kernel import _poison_allocations, make_paged_inputs  # noqa: F401 (an autouse fixture)

SENTINEL = 12345.0   # what an output element the kernel never wrote holds


@pytest.fixture(autouse=True)
def _poison_output(monkeypatch):
    real = launch_paged.out_like
    monkeypatch.setattr(launch_paged, "out_like", lambda q, dv: real(q, dv).fill_(SENTINEL))
    yield
    errors.clear_errors()


def opted_in(scale, nan, causal=True):
    """The params of a causal paged call with `empty_rows_nan=nan` (what the op builds from the argument)."""
    return AttentionParams(scale, causal, empty_rows_nan=nan, short_sequences=True)


def paged_oracle(q, k_cache, v_cache, block_table, seq_lens, *, scale, causal, window, softcap=0.0, alibi=None,
                 sinks=None, empty_rows_nan=False):
    """Float64: each sequence's keys gathered, then the dense oracle with query i at key position L - Tq + i."""
    block_size = k_cache.shape[2]
    outs = []
    for b in range(q.shape[0]):
        length = int(seq_lens[b])
        t = torch.arange(length)
        blocks = block_table[b, t // block_size].long()
        k = k_cache[blocks, :, t % block_size].transpose(0, 1)[None]       # [1, Hkv, L, D]
        v = v_cache[blocks, :, t % block_size].transpose(0, 1)[None]
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        out, _ = oracle(q[b:b + 1], k, v, alibi=slopes, scale=scale, causal=causal, bottom_right=True,
                        softcap=softcap, window=window, empty_rows_nan=empty_rows_nan, sinks=sinks)
        outs.append(out)
    return torch.cat(outs)


def assert_matches(out, want, atol=1e-5, rtol=1e-5):
    assert not (out == SENTINEL).any(), "the kernel left output rows unwritten"
    assert torch.equal(torch.isnan(out), torch.isnan(want)), "NaN pattern differs from the oracle's"
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol, equal_nan=True)


LENS = [0, 1, 3, 5, 6, 19]   # Tq = 5: an empty sequence, shorter than the chunk (1, 3), as long, longer

# (block_size, Hq, Hkv, causal, window, softcap, alibi, sinks)
CASES = [
    pytest.param(8, 4, 4, True, 0, 0.0, None, None, id="causal-mha"),
    pytest.param(4, 8, 2, True, 0, 0.0, None, None, id="causal-gqa4-block4"),
    pytest.param(16, 4, 2, True, 2, 0.0, None, None, id="window2"),
    pytest.param(8, 4, 1, True, 7, 5.0, "heads", None, id="window7-softcap-alibi-mqa"),
    pytest.param(8, 4, 2, False, 0, 0.0, None, None, id="noncausal"),
    pytest.param(8, 4, 2, False, 3, 0.0, None, None, id="noncausal-window"),
    pytest.param(8, 4, 2, True, 0, 0.0, None, "finite", id="sinks"),
    pytest.param(4, 4, 2, True, 3, 0.0, None, "one-neginf", id="window-sinks-neginf"),
]


def _sinks(kind, q_heads):
    if kind is None:
        return None
    sinks = torch.randn(q_heads)
    if kind == "one-neginf":
        sinks[1] = float("-inf")    # that head's empty rows stay empty (0 / NaN), the others' give 0
    return sinks


@pytest.mark.parametrize("nan", [False, True], ids=["zero", "nan"])
@pytest.mark.parametrize("block_size, q_heads, kv_heads, causal, window, softcap, alibi, sinks", CASES)
def test_kernel_matches_oracle_split_and_not(block_size, q_heads, kv_heads, causal, window, softcap, alibi, sinks,
                                             nan):
    tq, head_dim = 5, 16
    q, k_cache, v_cache, table, lens, slopes = make_paged_inputs(LENS, q_heads, kv_heads, head_dim, tq, block_size,
                                                                 torch.float32, alibi=alibi)
    sink_t = _sinks(sinks, q_heads)
    scale = head_dim ** -0.5
    params = AttentionParams(scale, causal, window=window, softcap=softcap, empty_rows_nan=nan, short_sequences=True)
    want = paged_oracle(q, k_cache, v_cache, table, lens, scale=scale, causal=causal, window=window, softcap=softcap,
                        alibi=slopes, sinks=sink_t, empty_rows_nan=nan)
    for num_splits in (1, 3):
        out = paged_forward(q, k_cache, v_cache, table, lens, params, alibi_slopes=slopes, sinks=sink_t,
                            num_splits=num_splits)
        assert_matches(out, want)
    # the reference (CPU op), fp32 and fp64, against the same oracle
    kw = dict(alibi_slopes=slopes, scale=scale, causal=causal, window=window, softcap=softcap, sinks=sink_t,
              empty_rows_nan=nan)
    assert_matches(public.paged_attention(q, k_cache, v_cache, table, lens, **kw), want)
    # float64 runs the reference on CPU tensors only (the kernels refuse it): on a GPU run, CPU copies
    cpu = {name: (t.cpu() if isinstance(t, torch.Tensor) else t) for name, t in kw.items()}
    as64 = [t.double().cpu() for t in (q, k_cache, v_cache)]
    assert_matches(public.paged_attention(*as64, table.cpu(), lens.cpu(), **cpu), want.cpu(), atol=1e-12,
                   rtol=1e-12)


def test_rows_before_the_first_token_are_the_ones_empty():
    """Causal, Tq = 5 over a sequence of 3 tokens: queries 0 and 1 sit at positions -2 and -1 (no key), 2..4 at
    0..2; the empty sequence's rows are all empty. With sinks of -inf nothing changes; a finite sink gives 0."""
    q, k_cache, v_cache, table, lens, _ = make_paged_inputs([3, 0, 7], 2, 1, 16, 5, 4, torch.float32)
    out = paged_forward(q, k_cache, v_cache, table, lens, opted_in(0.25, True))
    empty = torch.isnan(out).all(-1)
    assert empty[0, :, :2].all() and not empty[0, :, 2:].any()
    assert empty[1].all() and not empty[2].any()
    zero = paged_forward(q, k_cache, v_cache, table, lens, opted_in(0.25, False))
    assert (zero[empty] == 0).all() and torch.equal(zero[~empty], out[~empty])
    finite = paged_forward(q, k_cache, v_cache, table, lens, opted_in(0.25, True),
                           sinks=torch.zeros(2), num_splits=2)
    assert not torch.isnan(finite).any() and (finite[empty] == 0).all()


@pytest.mark.parametrize("path", ["kernel", "op-kernel", "op-reference"])
def test_default_keeps_short_sequences_an_error(path, monkeypatch):
    """Callers that pass nothing keep today's contract: 0 < seq_len < Tq raises, and the message names the option."""
    errors.set_paged_checks(True, sync=True)
    try:
        inputs = make_paged_inputs([17, 2], 4, 2, 16, 3, 8, torch.float32)[:5]
        with pytest.raises(PagedInputError, match=r"sequence 1, a seq_len shorter than its Tq=3 queries.*"
                                                  r"empty_rows_nan=False / True"):
            if path == "kernel":
                paged_forward(*inputs, AttentionParams(0.25, True))
            else:
                if path == "op-kernel":
                    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
                public.paged_attention(*inputs)
        # opted in, the same call computes (and reports nothing)
        for nan in (False, True):
            if path == "kernel":
                out = paged_forward(*inputs, opted_in(0.25, nan))
            else:
                out = public.paged_attention(*inputs, scale=0.25, empty_rows_nan=nan)
            assert torch.isnan(out[1, :, 0]).all() == nan and torch.isfinite(out[0]).all()
        errors.check_errors()
    finally:
        errors.set_paged_checks(True)


def test_half_precision_short_rows():
    q, k_cache, v_cache, table, lens, _ = make_paged_inputs(LENS, 8, 2, 64, 5, 8, torch.bfloat16)
    want = paged_oracle(q, k_cache, v_cache, table, lens, scale=0.125, causal=True, window=0, empty_rows_nan=True)
    for num_splits in (1, 2):
        out = paged_forward(q, k_cache, v_cache, table, lens, opted_in(0.125, True),
                            num_splits=num_splits)
        assert_matches(out, want, atol=1e-2, rtol=1e-2)


def test_opcheck_empty_rows_nan():
    """opcheck compares outputs without equal_nan: NaN rows only where a finite sink makes none (True), short and
    empty sequences with 0 rows (False)."""
    q, k_cache, v_cache, table, lens = make_paged_inputs([0, 2, 9], 4, 2, 16, 4, 4, torch.float32)[:5]
    op = torch.ops.attnlower.paged_attention
    opcheck(op, (q, k_cache, v_cache, table, lens), dict(causal=True, empty_rows_nan=False))
    opcheck(op, (q, k_cache, v_cache, table, lens), dict(window=2, sinks=torch.randn(4), empty_rows_nan=True))
    opcheck(op, (q, k_cache, v_cache, table, lens), dict(causal=False, window=3, empty_rows_nan=False))
    assert "bool? empty_rows_nan=None" in str(op.default._schema)


def test_compiled_call_passes_the_option():
    """Through torch.compile (the op stays one opaque call): the option reaches the implementation."""
    q, k_cache, v_cache, table, lens = make_paged_inputs([0, 2, 9], 4, 2, 16, 4, 4, torch.float32)[:5]

    def fn(q, k_cache, v_cache, table, lens):
        return torch.ops.attnlower.paged_attention(q, k_cache, v_cache, table, lens, empty_rows_nan=True)

    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k_cache, v_cache, table, lens)
    want = paged_oracle(q, k_cache, v_cache, table, lens, scale=0.25, causal=True, window=0, empty_rows_nan=True)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and math.isclose(
        float((got.double() - want).nan_to_num().abs().max()), 0.0, abs_tol=1e-5)
