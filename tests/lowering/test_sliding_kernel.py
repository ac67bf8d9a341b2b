"""The dense Triton kernels with a sliding window (window > 0, always causal), through the launchers,
on CPU under TRITON_INTERPRET=1, against the float64 oracle of test_flash_kernel.py.

Windows narrower than a block, wider than Tk, and not a multiple of the block sizes; both causal
alignments with Tq != Tk; block skipping checked by poisoning the keys no query may see with NaN.
"""
from __future__ import annotations

import math

import pytest
import torch

from attnlower.lowering.configs import KernelConfig
from attnlower.lowering.launch import flash_backward, flash_forward
from attnlower.lowering.params import AttentionParams
from tests.lowering.test_flash_kernel import (  # noqa: F401  (the fixture poisons fresh outputs here too)
    _poison_uninitialized,
    make_inputs,
    oracle,
    run_and_check,
)


@pytest.mark.parametrize("tq,tk,window,bottom_right", [
    (37, 53, 5, True),      # narrower than a 16-block: every visited block is an edge block
    (37, 53, 23, False),    # not a multiple of the block size; top-left alignment
    (53, 37, 16, True),     # exactly one block wide; Tq > Tk bottom-right: the first 16 rows are empty
    (37, 53, 1000, True),   # wider than Tk: plain causal
    (53, 53, 1, False),     # the diagonal only
])
def test_windows(tq, tk, window, bottom_right):
    q, k, v = make_inputs(1, 2, 2, tq, tk, 40, torch.float32)
    out, lse, _ = run_and_check(q, k, v, causal=True, window=window, bottom_right=bottom_right)
    if window == 1 and not bottom_right:
        # each row sees only its own key: out_i = v_i exactly up to rounding
        torch.testing.assert_close(out, v, atol=1e-6, rtol=1e-6)


def test_window_rectangular_tiles():
    q, k, v = make_inputs(1, 2, 1, 37, 53, 72, torch.float32)
    run_and_check(q, k, v, causal=True, window=21, bottom_right=True, config=KernelConfig(32, 16, 1, 1),
                  config_kv=KernelConfig(16, 32, 1, 1), config_q=KernelConfig(32, 16, 1, 1))


def test_window_with_everything_bshd():
    q, k, v = make_inputs(2, 4, 2, 37, 53, 80, torch.float32, layout="bshd")
    bias = torch.randn(2, 1, 1, 53)
    run_and_check(q * 2, k, v, bias=bias, bias_grad=True, alibi_slopes=torch.rand(2, 4), softcap=4.0,
                  causal=True, window=19, bottom_right=True)


@pytest.mark.parametrize("empty_rows_nan", [False, True])
def test_window_empty_rows(empty_rows_nan):
    q, k, v = make_inputs(1, 2, 1, 37, 53, 40, torch.float32)
    keep = torch.ones(37, 53, dtype=torch.bool)
    keep[10, :] = False
    out, lse, _ = run_and_check(q, k, v, bias=keep, causal=True, window=9, bottom_right=True,
                                empty_rows_nan=empty_rows_nan)
    assert bool(out[:, :, 10].isnan().all()) == empty_rows_nan
    assert torch.all(lse[:, :, 10] == float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_half_precision(dtype):
    q, k, v = make_inputs(1, 4, 1, 37, 53, 72, dtype)
    run_and_check(q, k, v, causal=True, window=13, bottom_right=True,
                  bias=torch.randn(1, 4, 37, 53, dtype=dtype), bias_grad=True)


@pytest.mark.parametrize("window", [8, 17])  # first visible key: 73, 64
def test_window_skips_invisible_key_blocks(window):
    """16 queries at positions 80..95 of 96 keys: keys below 64 are NaN and must never be loaded."""
    q, k, v = make_inputs(1, 1, 1, 16, 96, 16, torch.float32)
    k[:, :, :64] = float("nan")
    v[:, :, :64] = float("nan")
    params = AttentionParams(0.25, True, True, window)
    tiles = KernelConfig(16, 16, 1, 1)  # skipping is per tile: a 64-key tile would hold visible keys too
    out, lse = flash_forward(q, k, v, params, config=tiles)
    ref, _ = oracle(q, k[:, :, 64:], v[:, :, 64:], scale=0.25, causal=True, bottom_right=True, window=window)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    dq, dk, dv, *_ = flash_backward(torch.ones_like(out), q, k, v, out, lse, params, config_kv=tiles, config_q=tiles)
    assert torch.isfinite(dq).all() and torch.isfinite(dk[:, :, 64:]).all()
    assert torch.all(dk[:, :, :64] == 0) and torch.all(dv[:, :, :64] == 0)


def test_window_dropout_forward_backward_consistent():
    """The mask, read back through v = identity (Tk == D), reproduces forward and backward."""
    dropout_p = 0.2
    q, k, v = make_inputs(1, 2, 1, 40, 32, 32, torch.float32)
    rng = torch.tensor([4242, 7], dtype=torch.int64)
    eye = torch.eye(32).expand(1, 1, 32, 32)
    params = AttentionParams(0.5, True, True, 11, dropout_p=dropout_p)
    probe, _ = flash_forward(q, k, eye, params, rng_state=rng)
    keep = probe != 0  # outside the window p is 0 anyway, so keep there does not matter
    out, lse = flash_forward(q, k, v, params, rng_state=rng)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref, _ = oracle(*leaves, scale=0.5, causal=True, bottom_right=True, window=11, dropout_p=dropout_p, keep=keep)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grads = flash_backward(grad_out, q, k, v, out, lse, params, rng_state=rng)
    ref.backward(grad_out.double())
    for got, leaf in zip(grads[:3], leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=5e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len,window", [(1024, 256), (4096, 1000)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_sliding_real_sizes_bf16(seq_len, window, head_dim):
    torch.use_deterministic_algorithms(False)
    q = torch.randn(1, 4, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 2, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = flash_forward(q, k, v, AttentionParams(scale, True, window=window))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    with torch.device("cuda"):
        ref, ref_lse = oracle(*leaves, scale=scale, causal=True, window=window)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=2e-2, rtol=2e-2)
    grad_out = torch.randn_like(out)
    grads = flash_backward(grad_out, q, k, v, out, lse, AttentionParams(scale, True, window=window))
    ref.backward(grad_out.double())
    for got, leaf in zip(grads[:3], leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=5e-2, rtol=5e-2)
