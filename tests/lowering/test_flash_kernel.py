"""The dense Triton kernels (kernels/flash_fwd.py, kernels/flash_bwd.py) through their launchers
(lowering/launch.py), on CPU under TRITON_INTERPRET=1, against a float64 full-matrix oracle of
docs/INTERFACES.md "Semantics (dense ops)". Sliding-window cases: test_sliding_kernel.py.

Every output buffer the launchers allocate starts as NaN (torch's fill_uninitialized_memory), so an
element a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import math

import pytest
import torch

from attnlower.lowering.configs import KernelConfig, flash_config
from attnlower.lowering.launch import flash_backward, flash_forward
from attnlower.lowering.params import AttentionParams

from attention_oracle import TOLERANCES  # sibling helper; pytest puts tests/lowering on sys.path

# (forward atol/rtol, backward atol/rtol) per dtype; fp32 dots run with input_precision="ieee"
NO_RNG = torch.empty(0, dtype=torch.int64)


@pytest.fixture(autouse=True)
def _poison_uninitialized():
    """torch.empty returns NaN-filled memory while this is on: unwritten outputs cannot pass."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # poisons on CUDA too
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


# ----------------------------------------------------------------------------------------- oracle


def oracle(q, k, v, bias=None, alibi_slopes=None, scale=None, causal=False, bottom_right=False,
           softcap=0.0, window=0, empty_rows_nan=False, dropout_p=0.0, keep=None):
    """Full-matrix float64 attention, step by step as INTERFACES.md says; differentiable.

    keep: the dropout mask [B, Hq, Tq, Tk] (bool) to apply with dropout_p. Returns (out, lse).
    """
    q, k, v = q.double(), k.double(), v.double()
    batch, q_heads, tq, head_dim = q.shape
    group = q_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    tk = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    s = scale * (q @ k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    off = tk - tq if bottom_right else 0
    i = torch.arange(tq)[:, None]
    j = torch.arange(tk)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.double()
        slopes = slopes.view(1, q_heads, 1, 1) if slopes.dim() == 1 else slopes.view(batch, q_heads, 1, 1)
        s = s + slopes * (j - (i + off)).double()
    if bias is not None:
        if bias.dtype == torch.bool:
            s = s.masked_fill(~bias, float("-inf"))
        else:
            s = s + bias.double()
    if causal or window > 0:
        s = s.masked_fill(j > i + off, float("-inf"))
    if window > 0:
        s = s.masked_fill(j <= i + off - window, float("-inf"))
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(s, dim=-1)
    # softmax of an all -inf row is NaN: compute it on zeros there and zero it (SDPA's _safe_softmax)
    p = torch.softmax(torch.where(empty, torch.zeros_like(s), s), dim=-1)
    p = torch.where(empty, torch.zeros_like(p), p)
    if keep is not None:
        p = p * keep.double() / (1.0 - dropout_p)
    out = p @ v
    if empty_rows_nan:
        out = torch.where(empty, torch.full_like(out, float("nan")), out)
    return out, lse


# ----------------------------------------------------------------------------------------- helpers


def make_inputs(batch, q_heads, kv_heads, tq, tk, head_dim, dtype, layout="bhsd"):
    """Random q, k, v [B, H, T, D]; layout "bshd" gives transposed views of [B, T, H, D] storage."""
    def one(heads, length):
        if layout == "bshd":
            return torch.randn(batch, length, heads, head_dim, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, heads, length, head_dim, dtype=dtype)
    return one(q_heads, tq), one(kv_heads, tk), one(kv_heads, tk)


def run_and_check(q, k, v, *, bias=None, alibi_slopes=None, scale=None, causal=False, bottom_right=False,
                  softcap=0.0, window=0, empty_rows_nan=False, bias_grad=False, config=None,
                  config_kv=None, config_q=None):
    """Forward + backward through the launchers against the oracle's values and autograd."""
    dtype = q.dtype
    (fwd_atol, fwd_rtol), (bwd_atol, bwd_rtol) = TOLERANCES[dtype]
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    params = AttentionParams(scale_value, causal, bottom_right, window, softcap, empty_rows_nan=empty_rows_nan)
    out, lse = flash_forward(q, k, v, params, bias=bias, alibi_slopes=alibi_slopes, config=config)

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    bias_leaf = None
    if bias is not None and bias_grad:
        bias_leaf = bias.detach().double().requires_grad_()
    ref_out, ref_lse = oracle(*leaves, bias=bias_leaf if bias_leaf is not None else bias,
                              alibi_slopes=alibi_slopes, scale=scale_value, causal=causal,
                              bottom_right=bottom_right, softcap=softcap, window=window,
                              empty_rows_nan=empty_rows_nan)
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert out.stride() == torch.empty_like(q).stride(), "out must follow q's layout (a BSHD view in: BSHD out)"
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=fwd_atol, rtol=fwd_rtol, equal_nan=True)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=fwd_atol, rtol=fwd_rtol)

    grad_out = torch.randn_like(out)
    dq, dk, dv, dbias, _ = flash_backward(grad_out, q, k, v, out, lse, params, bias=bias, alibi_slopes=alibi_slopes,
                                       bias_requires_grad=bias_grad, config_kv=config_kv, config_q=config_q)
    # NaN rows (empty_rows_nan) carry no gradient by contract: the oracle's own where() gives 0 there
    ref_out.backward(torch.nan_to_num(grad_out.double()) * torch.isfinite(ref_out))
    for name, got, leaf, like in (("dq", dq, leaves[0], q), ("dk", dk, leaves[1], k), ("dv", dv, leaves[2], v)):
        assert got.shape == leaf.shape and got.stride() == torch.empty_like(like).stride(), name
        torch.testing.assert_close(got.double(), leaf.grad, atol=bwd_atol, rtol=bwd_rtol, msg=lambda m: f"{name}: {m}")
    if bias_grad:
        assert dbias is not None and dbias.shape == bias.shape and dbias.dtype == bias.dtype
        torch.testing.assert_close(dbias.double(), bias_leaf.grad, atol=bwd_atol, rtol=bwd_rtol,
                                   msg=lambda m: f"dbias: {m}")
    else:
        assert dbias is None
    return out, lse, (dq, dk, dv, dbias)


def strided_bias(shape, dtype):
    """A bias with odd, non-contiguous strides: every other element of a larger tensor's last dim."""
    big = torch.randn(*shape[:-1], 2 * shape[-1] + 1, dtype=dtype)
    view = big[..., 1::2]
    assert view.shape == shape and not view.is_contiguous()
    return view


# ----------------------------------------------------------------------------------------- cases

B, TQ, TK = 2, 37, 53


@pytest.mark.parametrize("head_dim", [40, 80, 72, 16])
def test_plain_odd_shapes(head_dim):
    q, k, v = make_inputs(B, 2, 2, TQ, TK, head_dim, torch.float32)
    run_and_check(q, k, v)


@pytest.mark.parametrize("tq,tk,bottom_right", [(37, 53, False), (37, 53, True), (53, 37, False), (53, 37, True)])
def test_causal_alignments(tq, tk, bottom_right):
    # (53, 37, bottom_right): the first 16 query rows see no key -> empty rows, out 0, lse -inf
    q, k, v = make_inputs(1, 2, 2, tq, tk, 40, torch.float32)
    out, lse, _ = run_and_check(q, k, v, causal=True, bottom_right=bottom_right)
    if bottom_right and tq > tk:
        assert torch.all(out[:, :, : tq - tk] == 0) and torch.all(lse[:, :, : tq - tk] == float("-inf"))


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 2), (3, 1)], ids=["gqa", "mqa"])
def test_gqa_mqa(q_heads, kv_heads):
    q, k, v = make_inputs(1, q_heads, kv_heads, TQ, TK, 40, torch.float32)
    run_and_check(q, k, v, causal=True, bottom_right=True)


def test_bshd_views_and_scale():
    q, k, v = make_inputs(B, 2, 2, TQ, TK, 72, torch.float32, layout="bshd")
    assert not q.is_contiguous()
    run_and_check(q, k, v, scale=0.3)


@pytest.mark.parametrize("kind", ["bool_11qk", "float_b11k", "float_full_strided", "float_qk"])
def test_bias(kind):
    q, k, v = make_inputs(B, 2, 2, TQ, TK, 40, torch.float32)
    if kind == "bool_11qk":
        bias = torch.rand(1, 1, TQ, TK) > 0.3
        bias[..., 5, :] = False  # one empty row
        run_and_check(q, k, v, bias=bias)
    elif kind == "float_b11k":
        bias = torch.randn(B, 1, 1, TK)
        bias[0, ..., 3] = float("-inf")
        run_and_check(q, k, v, bias=bias, bias_grad=True)
    elif kind == "float_full_strided":
        bias = strided_bias((B, 2, TQ, TK), torch.float32)
        run_and_check(q, k, v, bias=bias, bias_grad=True, causal=True)
    else:
        # a rank-2 bias [Tq, Tk] broadcasts over batch and heads
        run_and_check(q, k, v, bias=torch.randn(TQ, TK), bias_grad=True)


def test_finfo_min_bias_is_not_empty():
    """A row masked only by finfo.min averages uniformly (as eager does); a -inf row is empty."""
    q, k, v = make_inputs(1, 1, 1, 16, 24, 16, torch.float32)
    bias = torch.zeros(1, 1, 16, 24)
    bias[..., 2, :] = torch.finfo(torch.float32).min
    bias[..., 3, :] = float("-inf")
    bias[..., 4, 5:] = torch.finfo(torch.float32).min
    out, lse = flash_forward(q, k, v, AttentionParams(0.25), bias=bias)
    ref, _ = oracle(q, k, v, bias=bias, scale=0.25)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 0, 2], v[0, 0].mean(0), atol=1e-5, rtol=1e-5)
    assert torch.all(out[0, 0, 3] == 0) and lse[0, 0, 3] == float("-inf")
    assert torch.isfinite(lse[0, 0, 2])  # -1e38-ish: the kernel floors finite biases at -1e38


@pytest.mark.parametrize("slopes_shape", ["h", "bh"])
def test_alibi_and_softcap(slopes_shape):
    q, k, v = make_inputs(B, 4, 2, TQ, TK, 40, torch.float32)
    slopes = torch.rand(4) if slopes_shape == "h" else torch.rand(B, 4)
    run_and_check(q * 3, k, v, alibi_slopes=slopes, softcap=5.0 if slopes_shape == "h" else 0.0,
                  causal=slopes_shape == "bh", bottom_right=True)


def test_everything_together_bshd():
    q, k, v = make_inputs(B, 4, 2, TQ, TK, 80, torch.float32, layout="bshd")
    bias = torch.randn(B, 1, TQ, TK)
    run_and_check(q * 2, k, v, bias=bias, bias_grad=True, alibi_slopes=torch.rand(4), softcap=3.0,
                  causal=True, bottom_right=True)


@pytest.mark.parametrize("empty_rows_nan", [False, True])
def test_empty_rows(empty_rows_nan):
    q, k, v = make_inputs(1, 2, 1, TQ, TK, 40, torch.float32)
    keep = torch.ones(1, 1, TQ, TK, dtype=torch.bool)
    keep[..., 7, :] = False
    keep[..., 30:, :] = False
    out, lse, (dq, _, _, _) = run_and_check(q, k, v, bias=keep, empty_rows_nan=empty_rows_nan)
    rows = out[:, :, [7, 30, 36]]
    assert torch.all(rows.isnan()) if empty_rows_nan else torch.all(rows == 0)
    assert torch.all(lse[:, :, [7, 30, 36]] == float("-inf"))
    assert torch.all(dq[:, :, [7, 30, 36]] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = make_inputs(B, 4, 2, TQ, TK, 72, dtype, layout="bshd")
    bias = torch.randn(1, 4, TQ, TK, dtype=dtype)
    run_and_check(q, k, v, bias=bias, bias_grad=True, causal=True, bottom_right=True)


def test_rectangular_tiles():
    """block_m != block_n exercises the block-range arithmetic on both sides."""
    q, k, v = make_inputs(1, 2, 1, TQ, TK, 40, torch.float32)
    run_and_check(q, k, v, causal=True, bottom_right=True, config=KernelConfig(32, 16, 1, 1),
                  config_kv=KernelConfig(16, 32, 1, 1), config_q=KernelConfig(32, 16, 1, 1))


def _hopper_forward_tiles():
    """Every distinct forward tile configs.flash_config picks on sm_90 for 16-bit inputs."""
    tiles = set()
    for head_dim in (64, 128):
        for seq_len in (None, 197, 577, 1024, 4096, 16384):
            for causal in (False, True):
                c = flash_config(90, head_dim, torch.bfloat16, causal, 0, "fwd", seq_len=seq_len)
                tiles.add((c.block_m, c.block_n))
    return sorted(tiles)


@pytest.mark.parametrize("block_m,block_n", _hopper_forward_tiles())
def test_hopper_forward_tiles(block_m, block_n):
    """The GPU's tile shapes, run here: lengths that end mid-tile and span more than one tile both ways,
    so the masked tail spans, the causal diagonal and the interior span of each shape are all visited."""
    q, k, v = make_inputs(1, 2, 1, block_m + 37, block_n * 2 + 11, 24, torch.float32)
    (atol, rtol), _ = TOLERANCES[torch.float32]
    for causal, bottom_right in ((False, False), (True, True)):
        # one warp in the interpreter; on a GPU the warps such tiles get there (with 1 warp per 128x64 fp32 tile
        # this test took 87 s on an H200, 2026-12-03, the slowest of the suite; unmeasured since)
        warps = 1 if not q.is_cuda else (8 if block_m * block_n >= 128 * 64 else 4)
        out, lse = flash_forward(q, k, v, AttentionParams(0.3, causal, bottom_right=bottom_right),
                                 config=KernelConfig(block_m, block_n, warps, 1))
        ref, ref_lse = oracle(q, k, v, scale=0.3, causal=causal, bottom_right=bottom_right)
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=rtol)


def test_causal_skips_invisible_key_blocks():
    """Keys no query can see are NaN: any load of their blocks would leak NaN into out or grads."""
    q, k, v = make_inputs(1, 1, 1, 16, 64, 16, torch.float32)
    k[:, :, 16:] = float("nan")
    v[:, :, 16:] = float("nan")
    tiles = KernelConfig(16, 16, 1, 1)  # skipping is per tile: a 64-key tile would hold visible keys too
    out, lse = flash_forward(q, k, v, AttentionParams(0.25, causal=True), config=tiles)
    ref, _ = oracle(q[..., :, :], k[:, :, :16], v[:, :, :16], scale=0.25, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    dq, dk, dv, *_ = flash_backward(torch.ones_like(out), q, k, v, out, lse, AttentionParams(0.25, causal=True),
                                   config_kv=tiles, config_q=tiles)
    assert torch.isfinite(dq).all() and torch.all(dk[:, :, 16:] == 0) and torch.all(dv[:, :, 16:] == 0)


def test_kernel_limits_raise():
    q, k, v = make_inputs(1, 1, 1, 16, 16, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="v's head dim <= 256"):   # Dv != D runs; Dv > 256 does not
        flash_forward(q, k, torch.randn(1, 1, 16, 264), AttentionParams(0.25))
    out, lse = flash_forward(q, k, v, AttentionParams(0.25))
    with pytest.raises(ValueError, match="float bias"):
        flash_backward(out, q, k, v, out, lse, AttentionParams(0.25), bias=torch.ones(16, 16, dtype=torch.bool),
                       bias_requires_grad=True)


# ----------------------------------------------------------------------------------------- dropout


def recover_keep(q, k, rng_state, dropout_p, causal=False):
    """The kernel's keep mask, read back through v = identity (needs Tk == D): out_ij = p_ij * keep_ij / (1 - p)."""
    batch, q_heads, tq, head_dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    assert tk == head_dim
    eye = torch.eye(tk, dtype=q.dtype).expand(batch, kv_heads, tk, tk)
    out, _ = flash_forward(q, k, eye, AttentionParams(0.5, causal, dropout_p=dropout_p), rng_state=rng_state)
    p, _ = oracle(q, k, eye, scale=0.5, causal=causal)
    keep = out != 0
    # where kept, the kernel scaled p by exactly 1 / (1 - dropout_p)
    torch.testing.assert_close(out[keep].double(), p[keep] / (1 - dropout_p), atol=1e-6, rtol=1e-5)
    return keep


def test_dropout_keep_rate_and_determinism():
    dropout_p = 0.3
    q, k, _ = make_inputs(2, 4, 2, 64, 32, 32, torch.float32)
    rng = torch.tensor([1234, 0], dtype=torch.int64)
    keep = recover_keep(q, k, rng, dropout_p)
    n = keep.numel()
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / n)
    assert abs(keep.double().mean().item() - (1 - dropout_p)) < 4 * sigma, keep.double().mean()
    # every query head of a GQA group draws its own mask (offsets unique per (b, h, i, j))
    assert not torch.equal(keep[:, 0], keep[:, 1])
    assert torch.equal(keep, recover_keep(q, k, rng, dropout_p))
    other_seed = recover_keep(q, k, torch.tensor([1235, 0], dtype=torch.int64), dropout_p)
    other_offset = recover_keep(q, k, torch.tensor([1234, 2**33 + 5], dtype=torch.int64), dropout_p)
    assert not torch.equal(keep, other_seed) and not torch.equal(keep, other_offset)


def test_dropout_forward_backward_consistent():
    """Forward and backward regenerate the same mask: both match the oracle run with the recovered mask."""
    dropout_p = 0.25
    q, k, v = make_inputs(1, 2, 1, 40, 32, 32, torch.float32)
    rng = torch.tensor([77, 1 << 20], dtype=torch.int64)
    keep = recover_keep(q, k, rng, dropout_p, causal=True)
    params = AttentionParams(0.5, True, dropout_p=dropout_p)
    out, lse = flash_forward(q, k, v, params, rng_state=rng)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = oracle(*leaves, scale=0.5, causal=True, dropout_p=dropout_p, keep=keep)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=2e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grads = flash_backward(grad_out, q, k, v, out, lse, params, rng_state=rng)
    ref.backward(grad_out.double())
    for got, leaf in zip(grads[:3], leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=5e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", [1024, 4096])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_real_sizes_bf16(seq_len, head_dim, causal):
    torch.use_deterministic_algorithms(False)  # the GPU oracle uses ops without deterministic kernels
    device = "cuda"
    q = torch.randn(1, 4, seq_len, head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 2, seq_len, head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, 2, seq_len, head_dim, device=device, dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    out, lse = flash_forward(q, k, v, AttentionParams(scale, causal))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = oracle_cuda(*leaves, scale=scale, causal=causal)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=2e-2, rtol=2e-2)
    grad_out = torch.randn_like(out)
    grads = flash_backward(grad_out, q, k, v, out, lse, AttentionParams(scale, causal))
    ref.backward(grad_out.double())
    for got, leaf in zip(grads[:3], leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=5e-2, rtol=5e-2)


def oracle_cuda(q, k, v, **kwargs):
    """The oracle with its index tensors on q's device."""
    with torch.device(q.device):
        return oracle(q, k, v, **kwargs)


def test_hopper_fp32_wide_head_backward_tiles():
    """fp32 with a head dim padded to 256: the dK/dV tiles the plan picks on sm_90 (32x32 since 2026-12-03: 32x64
    needed 262144 bytes of shared memory, tests/lowering/sm90_compile.py --fits) against the oracle, odd sizes."""
    kv_cfg = flash_config(90, 224, torch.float32, True, 0, "bwd_kv")
    q_cfg = flash_config(90, 224, torch.float32, True, 0, "bwd_q")
    assert (kv_cfg.block_m, kv_cfg.block_n) == (32, 32)
    warps = (lambda c: c.num_warps) if torch.empty(0).is_cuda else (lambda c: 1)
    q, k, v = make_inputs(1, 2, 1, 37, 45, 224, torch.float32)
    run_and_check(q, k, v, causal=True, bottom_right=True,
                  config_kv=KernelConfig(kv_cfg.block_m, kv_cfg.block_n, warps(kv_cfg), 1),
                  config_q=KernelConfig(q_cfg.block_m, q_cfg.block_n, warps(q_cfg), 1))
