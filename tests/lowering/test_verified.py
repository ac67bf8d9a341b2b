"""The device-side `verified` flag (issue 22, class 1; docs/design/issue22.md): for a structure proven from a
buffer's value (nanoGPT's `tril` buffer, GPT-Neo's band, an ALiBi table), the op gets the proven structure
(causal / window / alibi_slopes), the source's mask as `bias`, and a one-element bool tensor computed on the
device each call. True: the structure, and the mask is never read; False: the mask alone over every key block.

Each case through the CPU reference and the Triton kernels under the interpreter (`path`), outputs poisoned
(NaN) before the launch, against the float64 oracle of attention_oracle.py; gradients against its autograd.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import attnlower.ops as public
from attnlower.lowering.launch import flash_backward, flash_forward
from attnlower.lowering.params import AttentionParams

from attention_oracle import TOLERANCES, oracle  # sibling helper; pytest puts tests/lowering on sys.path

OPS = torch.ops.attnlower
pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def _inputs(dtype=torch.float32, hq=6, hkv=2, tq=37, tk=37, d=16):
    return [torch.randn(2, h, t, d, dtype=dtype, requires_grad=True) for h, t in ((hq, tq), (hkv, tk), (hkv, tk))]


def _compare(out, want, inputs, leaves, dtype, extra=()):
    (fa, fr), (ba, br) = TOLERANCES[dtype]
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want.detach(), atol=fa, rtol=fr)
    w = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), list(inputs) + [g for g, _ in extra], retain_graph=True)
    ref = torch.autograd.grad((want * w).sum(), list(leaves) + [r for _, r in extra])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, atol=ba, rtol=br)


@pytest.mark.parametrize("flag", [True, False], ids=["verified", "fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_buffer_mask(path, flag, dtype):
    """nanoGPT: a tril keep-mask proven causal. Verified: causal, the mask unread (here it is NOT causal: its
    upper triangle is open, so reading it would give another result); fallback: the mask alone, every block."""
    q, k, v = _inputs(dtype)
    mask = torch.ones(37, 37, dtype=torch.bool).tril()
    mask[:, 30:] = True            # a mask that stopped being causal after the proof
    mask[3, :] = False             # and empties a row (0 out, as the op's convention)
    verified = torch.tensor(flag)
    out = public.flash_attention(q, k, v, mask, causal=True, verified=verified)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want, _ = oracle(*leaves, causal=True) if flag else oracle(*leaves, bias=mask)
    _compare(out, want, (q, k, v), leaves, dtype)


@pytest.mark.parametrize("flag", [True, False], ids=["verified", "fallback"])
def test_band_and_alibi_with_a_float_bias(path, flag):
    """GPT-Neo's band (sliding window) with an ALiBi-table bias proven to be slopes: verified runs the window and the
    slopes and never reads the bias (it is NaN there: any read would show); the fallback adds the bias alone."""
    q, k, v = _inputs(tq=21)
    slopes = torch.rand(6)
    bias = torch.randn(1, 6, 21, 37, requires_grad=True)
    bias_in = bias.detach().clone()
    if flag:
        bias_in.fill_(math.nan)
    bias_in.requires_grad_(True)
    out = public.sliding_window_attention(q, k, v, 9, bias_in, alibi_slopes=slopes, bottom_right=True,
                                          verified=torch.tensor([flag]))
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    bias_leaf = bias.detach().double().requires_grad_()
    if flag:
        want, _ = oracle(*leaves, alibi=slopes, causal=True, window=9, bottom_right=True)
        _compare(out, want, (q, k, v), leaves, torch.float32)
        out.sum().backward()
        assert torch.equal(bias_in.grad, torch.zeros_like(bias_in))   # the structure did not use the bias
    else:
        want, _ = oracle(*leaves, bias=bias_leaf, bottom_right=True)
        _compare(out, want, (q, k, v), leaves, torch.float32, extra=((bias_in, bias_leaf),))


def test_launchers_read_the_flag_on_the_device():
    """The kernels, called directly: one launch each way; dsinks and fill ride along."""
    q, k, v = (x.detach() for x in _inputs())
    keep = torch.rand(2, 1, 37, 37) > 0.3
    sinks = torch.randn(6)
    params = AttentionParams(0.25, True, mask_fill=-1e9)
    for flag in (True, False):
        out, lse = flash_forward(q, k, v, params, bias=keep, sinks=sinks, verified=torch.tensor(flag))
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        sink_leaf = sinks.double().requires_grad_()
        kw = dict(causal=True) if flag else dict(bias=keep)
        want, want_lse = oracle(*leaves, scale=0.25, sinks=sink_leaf, fill=-1e9, **kw)
        torch.testing.assert_close(out.double(), want.detach(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse.detach(), atol=2e-5, rtol=1e-5)
        grad_out = torch.randn_like(out)
        grads = flash_backward(grad_out, q, k, v, out, lse, params, bias=keep, sinks=sinks, sinks_requires_grad=True,
                               verified=torch.tensor(flag))
        want.backward(grad_out.double())
        for got, leaf in zip(grads[:3] + grads[4:], leaves + [sink_leaf]):
            torch.testing.assert_close(got.double(), leaf.grad, atol=5e-5, rtol=1e-5)


def test_verified_validation():
    q, k, v = (x.detach() for x in _inputs())
    with pytest.raises(ValueError, match="verified needs the source's mask as bias"):
        public.flash_attention(q, k, v, causal=True, verified=torch.tensor(True))
    with pytest.raises(ValueError, match="expected verified a one-element bool tensor"):
        public.flash_attention(q, k, v, torch.ones(37, 37, dtype=torch.bool), verified=torch.tensor([1.0]))


def test_opcheck_verified():
    q, k, v = _inputs(tq=9, tk=11)
    mask = torch.ones(9, 11, dtype=torch.bool).tril(2)
    for flag in (True, False):
        opcheck(OPS.flash_attention, (q, k, v, mask), dict(causal=True, bottom_right=True, verified=torch.tensor(flag)))
        opcheck(OPS.sliding_window_attention, (q, k, v, 3, mask), dict(verified=torch.tensor([flag])))


@pytest.mark.gpu
def test_cuda_graph_replays_the_flag():
    """A captured graph replays both ways as the flag (computed on the device) flips: no host read."""
    dev = "cuda"
    q, k, v = (torch.randn(2, h, 300, 64, device=dev, dtype=torch.bfloat16) for h in (8, 2, 2))
    mask = torch.ones(300, 300, dtype=torch.bool, device=dev).tril()
    flag = torch.ones((), dtype=torch.bool, device=dev)
    public.flash_attention(q, k, v, mask, causal=True, verified=flag)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = public.flash_attention(q, k, v, mask, causal=True, verified=flag)
    for value in (True, False):
        flag.fill_(value)
        mask[:, 250:] = not value     # the fallback must read the (changed) mask
        graph.replay()
        with torch.device(dev):
            want, _ = oracle(q, k, v, causal=True) if value else oracle(q, k, v, bias=mask)
        torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
