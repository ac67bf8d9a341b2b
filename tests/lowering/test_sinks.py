"""Attention sinks (issue 21.2) beyond tests/lowering/test_features_issue21.py: the kernel paths that suite does not
reach (split-KV decode, Tk = 0, a -inf sink, sinks with the fill mode, sinks with dropout, fp16, the launchers'
dsinks), each against the float64 oracle of attention_oracle.py on fresh inputs with outputs poisoned (NaN).

Semantics: `sinks [Hq]` joins each row's softmax denominator as exp(sink_h), unscaled and unmasked, adding no
value; lse includes it; a row with no visible key gives out = 0 and lse = sink; dsinks[h] = -sum_{b,i}
exp(sink_h - lse) * rowsum(dO * O).
"""
from __future__ import annotations

import math

import pytest
import torch

import attnlower.ops  # noqa: F401  (registers torch.ops.attnlower.*)
from attnlower.lowering.launch import flash_backward, flash_forward
from attnlower.lowering.launch_paged import paged_forward
from attnlower.lowering.params import AttentionParams

from attention_oracle import oracle  # sibling helper; pytest puts tests/lowering on sys.path

OPS = torch.ops.attnlower
pytestmark = pytest.mark.usefixtures("poison_uninitialized")
F32_FWD, F32_BWD = dict(atol=2e-5, rtol=1e-5), dict(atol=5e-5, rtol=1e-5)


def _paged_dense(pool, table_row, length):
    block = pool.shape[2]
    t = torch.arange(length)
    return pool[table_row[t // block].long(), :, t % block].transpose(0, 1).unsqueeze(0)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("window", [0, 5])
def test_paged_sinks_split_and_unsplit(splits, window):
    """Split-KV partials never see the sink; the reduce adds it once (a sequence of length 0 gives 0, one
    shorter than a split's share leaves empty partials)."""
    pool_k, pool_v = torch.randn(16, 2, 4, 16), torch.randn(16, 2, 4, 16)
    table = torch.randperm(16)[:12].view(3, 4).to(torch.int32)
    lens = torch.tensor([13, 0, 3], dtype=torch.int32)
    q, sinks = torch.randn(3, 6, 2, 16), torch.randn(6) * 2
    q[1] = 0.0   # a padding slot: only its sink (out 0)
    params = AttentionParams(0.3, True, window=window)
    out = paged_forward(q[[0, 2]], pool_k, pool_v, table[[0, 2]], lens[[0, 2]], params, sinks=sinks,
                        num_splits=splits)
    for row, b in enumerate((0, 2)):
        length = int(lens[b])
        want, _ = oracle(q[b:b + 1], _paged_dense(pool_k, table[b], length), _paged_dense(pool_v, table[b], length),
                         scale=0.3, causal=True, bottom_right=True, window=window, sinks=sinks)
        torch.testing.assert_close(out[row:row + 1].double(), want, **F32_FWD)
    empty = paged_forward(q[1:2], pool_k, pool_v, table[1:2], lens[1:2], params, sinks=sinks, num_splits=splits)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_no_keys_with_sinks(path):
    """Tk = 0: every row sees only its sink: out 0, lse = sink, whatever empty_rows_nan says."""
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 0, 16), torch.randn(2, 2, 0, 16)
    sinks = torch.randn(4)
    out, lse, _ = OPS.flash_attention(q, k, v, empty_rows_nan=True, sinks=sinks)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, sinks.view(1, 4, 1).expand(2, 4, 3))


def test_minus_inf_sink_is_no_sink(path):
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    keep = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    keep[..., 4, :] = False
    with_sink = OPS.flash_attention(q, k, v, keep, sinks=torch.tensor([float("-inf"), 0.5]))
    without = OPS.flash_attention(q, k, v, keep)
    torch.testing.assert_close(with_sink[0][:, 0], without[0][:, 0], **F32_FWD)
    torch.testing.assert_close(with_sink[1][:, 0], without[1][:, 0], **F32_FWD)
    assert with_sink[1][0, 0, 4] == float("-inf") and with_sink[1][0, 1, 4] == 0.5


@pytest.mark.parametrize("fill", [-1e9, -3.0])
def test_sinks_with_fill_and_fully_masked_rows(path, fill):
    """Sinks and the fill mode together: fully masked rows average every key against the sink."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, h, t, 16, requires_grad=True) for h, t in ((4, 37), (2, 29), (2, 29)))
    sinks = (torch.randn(4) * 3).requires_grad_(True)
    out, lse, _ = OPS.flash_attention(q, k, v, causal=True, bottom_right=True, sinks=sinks, fill=fill)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, sinks)]
    want, want_lse = oracle(*leaves[:3], causal=True, bottom_right=True, sinks=leaves[3], fill=fill)
    torch.testing.assert_close(out.double(), want.detach(), **F32_FWD)
    torch.testing.assert_close(lse.double(), want_lse.detach(), **F32_FWD)
    w = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v, sinks))
    ref = torch.autograd.grad((want * w).sum(), leaves)
    for name, g, r in zip("q k v sinks".split(), got, ref):
        torch.testing.assert_close(g.double(), r, **F32_BWD, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinks_half_precision_gqa_bottom_right(path, dtype):
    torch.manual_seed(2)
    q = torch.randn(2, 6, 13, 40, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 40, dtype=dtype, requires_grad=True) for _ in range(2))
    sinks = torch.randn(6, dtype=torch.float32, requires_grad=True)
    out = OPS.flash_attention(q, k, v, causal=True, bottom_right=True, sinks=sinks)[0]
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, sinks)]
    want, _ = oracle(*leaves[:3], causal=True, bottom_right=True, sinks=leaves[3])
    fwd, bwd = ((5e-3, 1e-2), (2e-2, 2e-2)) if dtype == torch.float16 else ((2e-2, 2e-2), (8e-2, 5e-2))
    torch.testing.assert_close(out.double(), want.detach(), atol=fwd[0], rtol=fwd[1])
    w = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v, sinks))
    ref = torch.autograd.grad((want * w).sum(), leaves)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype or g.dtype in (dtype, torch.float32)
        torch.testing.assert_close(g.double(), r, atol=bwd[0], rtol=bwd[1])


def test_sinks_dropout_kernels():
    """With dropout, dsinks = -sum exp(sink - lse) * rowsum(dO * O) still holds (O the dropped-out output): the
    kernels' mask read back through v = identity, then forward and every gradient against the oracle."""
    torch.manual_seed(3)
    dropout_p = 0.2
    q, k = torch.randn(1, 2, 40, 32), torch.randn(1, 1, 32, 32)
    sinks = torch.tensor([0.7, -1.5])
    rng = torch.tensor([11, 1 << 12], dtype=torch.int64)
    params = AttentionParams(0.5, True, dropout_p=dropout_p)
    eye = torch.eye(32).expand(1, 1, 32, 32)
    probe, _ = flash_forward(q, k, eye, params, rng_state=rng, sinks=sinks)
    p, _ = oracle(q, k, eye, scale=0.5, causal=True, sinks=sinks)
    keep = probe != 0
    torch.testing.assert_close(probe[keep].double(), p[keep] / (1 - dropout_p), atol=1e-6, rtol=1e-5)
    v = torch.randn(1, 1, 32, 32)
    out, lse = flash_forward(q, k, v, params, rng_state=rng, sinks=sinks)
    leaves = [x.double().requires_grad_() for x in (q, k, v, sinks)]
    want, want_lse = oracle(*leaves[:3], scale=0.5, causal=True, sinks=leaves[3], keep=keep, dropout_p=dropout_p)
    torch.testing.assert_close(out.double(), want.detach(), **F32_FWD)
    torch.testing.assert_close(lse.double(), want_lse.detach(), **F32_FWD)
    grad_out = torch.randn_like(out)
    dq, dk, dv, dbias, dsinks = flash_backward(grad_out, q, k, v, out, lse, params, rng_state=rng, sinks=sinks,
                                               sinks_requires_grad=True)
    assert dbias is None and dsinks.shape == (2,) and dsinks.dtype == torch.float32
    want.backward(grad_out.double())
    for got, leaf in zip((dq, dk, dv, dsinks), leaves):
        torch.testing.assert_close(got.double(), leaf.grad, **F32_BWD)
    # no gradient asked: none computed
    assert flash_backward(grad_out, q, k, v, out, lse, params, rng_state=rng, sinks=sinks)[4] is None


def test_sinks_gradient_is_empty_unless_asked(path):
    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2)
    out = OPS.flash_attention(q, k, v, sinks=sinks)[0]
    out.sum().backward()
    assert sinks.grad is None and q.grad is not None and not q.grad.isnan().any()
    outs = OPS.flash_attention(q, k, v, sinks=sinks)
    grads = OPS.flash_attention_backward(torch.ones_like(outs[0]), q, k, v, None, None, *outs, None, False, False,
                                         0.0, 0.0, 0, False, False, sinks=sinks, sinks_requires_grad=False)
    assert len(grads) == 5 and grads[4].numel() == 0
    grads = OPS.flash_attention_backward(torch.ones_like(outs[0]), q, k, v, None, None, *outs, None, False, False,
                                         0.0, 0.0, 0, False, False, sinks=sinks, sinks_requires_grad=True)
    assert grads[4].shape == (2,) and math.isfinite(grads[4].sum().item())
