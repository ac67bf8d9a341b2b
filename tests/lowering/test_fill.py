"""The fill mode of the dense ops (issue 22, class 2): `fill=f` makes every masked score *take* the value f
(`masked_fill(~keep, f)`, as the Annotated Transformer's -1e9, BERT-era -10000.0 and DistilBERT's finfo.min
do), instead of removing it. A fully masked row is then the uniform average of all Tk keys, including the
key blocks a causal kernel never visits, and a row whose scores sit near the fill gives the filled keys
their weight.

Every numeric test runs through the CPU reference and through the Triton kernels under the interpreter
(`path`), on fresh random inputs with every output buffer poisoned (NaN) before the launch, against a
float64 oracle written here (independent of lowering/reference.py). Gradients against autograd of the
oracle: a filled score is a constant (dS = 0), its probability still feeds dV.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import attnlower.ops as ops
from attnlower.lowering.launch import flash_backward, flash_forward
from attnlower.lowering.params import AttentionParams

from attention_oracle import TOLERANCES  # sibling helper; pytest puts tests/lowering on sys.path

OPS = torch.ops.attnlower
pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def fill_oracle(q, k, v, fill, *, bias=None, scale=None, causal=False, bottom_right=False, window=0, softcap=0.0,
                keep=None, dropout_p=0.0):
    """float64 attention where every masked score is replaced by `fill` (masked_fill semantics); (out, lse).
    bias: bool keep-mask (False = masked -> fill) or float (added; its -inf entries stay -inf)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    tq, tk = q.shape[2], k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    masked = torch.zeros(s.shape, dtype=torch.bool)
    if bias is not None and bias.dtype == torch.bool:
        masked = masked | ~bias
    elif bias is not None:
        s = s + bias.double()
    off = tk - tq if bottom_right else 0
    i = torch.arange(tq).view(-1, 1) + off
    j = torch.arange(tk).view(1, -1)
    if causal or window:
        masked = masked | (j > i)
    if window:
        masked = masked | (j <= i - window)
    s = torch.where(masked, torch.full_like(s, fill), s)
    p = torch.softmax(s, -1)
    lse = torch.logsumexp(s, -1)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return p @ v, lse


def _check(run, inputs: dict, oracle_kwargs: dict, dtype=torch.float32, check_grads=True):
    """run(**inputs) -> (out, lse); compared with fill_oracle, and the gradients of every input needing one."""
    (fa, fr), (ba, br) = TOLERANCES[dtype]
    out, lse = run(**inputs)
    leaves = {n: t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
              for n, t in inputs.items()}
    want, want_lse = fill_oracle(leaves["q"], leaves["k"], leaves["v"], bias=leaves.get("bias"), **oracle_kwargs)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), want.detach(), atol=fa, rtol=fr)
    torch.testing.assert_close(lse.double(), want_lse.detach(), atol=fa, rtol=fr)
    trainable = [n for n, t in inputs.items() if t.requires_grad]
    if not check_grads or not trainable:
        return
    w = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * w).sum().backward()
    (want * w).sum().backward()
    for n in trainable:
        got = inputs[n].grad
        assert got is not None and not got.isnan().any(), n
        torch.testing.assert_close(got.double(), leaves[n].grad, atol=ba, rtol=br, msg=lambda m: f"d{n}: {m}")


def _qkv(b, hq, hkv, tq, tk, d, dtype=torch.float32, dv=None):
    dv = d if dv is None else dv
    return dict(q=torch.randn(b, hq, tq, d, dtype=dtype, requires_grad=True),
                k=torch.randn(b, hkv, tk, d, dtype=dtype, requires_grad=True),
                v=torch.randn(b, hkv, tk, dv, dtype=dtype, requires_grad=True))


FILLS = [-1e9, -10000.0, torch.finfo(torch.float32).min]


@pytest.mark.parametrize("fill", FILLS, ids=["1e9", "1e4", "finfo_min"])
@pytest.mark.parametrize("bottom_right", [False, True], ids=["top_left", "bottom_right"])
def test_causal_fill_fully_masked_rows_average_every_key(path, fill, bottom_right):
    """Tq > Tk bottom-right: the first rows see no key, so they average all Tk keys (blocks a causal kernel
    skips included); top-left: every row sees its prefix. GQA, odd sizes."""
    inputs = _qkv(2, 6, 2, 37, 29, 24)
    kw = dict(causal=True, bottom_right=bottom_right)
    _check(lambda q, k, v: OPS.flash_attention(q, k, v, fill=fill, **kw)[:2], inputs, dict(fill=fill, **kw))


@pytest.mark.parametrize("fill", [-1e9, -10000.0])
def test_keep_mask_fill_with_fully_masked_rows(path, fill):
    """A bool keep-mask (the Annotated Transformer's `masked_fill(mask == 0, -1e9)`): masked keys take the
    fill; a row with every key masked averages every key (eager's result), not 0 or NaN."""
    inputs = _qkv(2, 4, 4, 37, 37, 16)
    keep = torch.rand(2, 1, 37, 37) > 0.3
    keep[0, :, 5] = False
    keep[1, :, 30:] = False
    inputs["bias"] = keep
    _check(lambda q, k, v, bias: OPS.flash_attention(q, k, v, bias, causal=True, fill=fill, empty_rows_nan=True)[:2],
           inputs, dict(fill=fill, causal=True))


@pytest.mark.parametrize("gap", [0.0, 8.0, 40.0, 200.0])
def test_fill_near_the_scores_is_not_minus_inf(path, gap):
    """A fill `gap` below the scores: the filled keys (also those in skipped causal blocks) weigh in as
    exp(fill - s); 200 below (exp(-200) underflows fp32) the kernel's block skipping is exact again. (Moderate
    magnitudes: scores near -1e4 are quantized to 1e-3 in fp32, eager's included, so no fp32 result can match
    a float64 oracle there.)"""
    inputs = _qkv(1, 2, 1, 37, 37, 16)
    inputs["bias"] = torch.randn(1, 1, 37, 37, requires_grad=True)
    _check(lambda q, k, v, bias: OPS.flash_attention(q, k, v, bias, causal=True, fill=-gap)[:2],
           inputs, dict(fill=-gap, causal=True))


def test_sliding_window_fill(path):
    """Keys left of the window (skipped blocks below the window) and right of the diagonal take the fill."""
    inputs = _qkv(2, 4, 2, 37, 37, 16)
    fill = -6.0    # close to the scores: every skipped block weighs in
    _check(lambda q, k, v: OPS.sliding_window_attention(q, k, v, 5, fill=fill)[:2], inputs,
           dict(fill=fill, causal=True, window=5))
    _check(lambda q, k, v: OPS.sliding_window_attention(q, k, v, 7, bottom_right=True, fill=-1e9)[:2],
           _qkv(2, 4, 2, 13, 37, 16), dict(fill=-1e9, causal=True, window=7, bottom_right=True))


def test_fill_with_softcap_alibi_free_bias_and_odd_head_dim(path):
    """D = 80 (padded to 128), softcap, a float bias with a gradient; fill near the capped scores."""
    inputs = _qkv(1, 2, 2, 37, 37, 80)
    inputs["bias"] = torch.randn(1, 2, 37, 37, requires_grad=True)
    kw = dict(causal=True, softcap=3.0, scale=0.3)
    _check(lambda q, k, v, bias: OPS.flash_attention(q, k, v, bias, fill=-4.0, **kw)[:2], inputs,
           dict(fill=-4.0, **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fill_half_precision(path, dtype):
    inputs = _qkv(2, 4, 2, 37, 37, 16, dtype=dtype)
    keep = torch.rand(2, 1, 1, 37) > 0.2
    keep[1] = False
    inputs["bias"] = keep
    _check(lambda q, k, v, bias: OPS.flash_attention(q, k, v, bias, causal=True, fill=-65504.0)[:2], inputs,
           dict(fill=-65504.0, causal=True), dtype=dtype)


def test_fill_minus_inf_is_masking(path):
    """fill=-inf (or None) is the ordinary mask: empty rows stay empty."""
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    keep = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    keep[..., 3, :] = False
    a = OPS.flash_attention(q, k, v, keep, fill=float("-inf"))
    b = OPS.flash_attention(q, k, v, keep)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    assert a[1][..., 3].eq(float("-inf")).all()


def test_fill_dropout_kernels_forward_backward():
    """Dropout in fill mode (the kernels' Philox mask, read back through v = identity): the skipped blocks'
    filled keys are dropped with the same mask in the forward, the dV pass and the backward's dP."""
    torch.manual_seed(3)
    dropout_p, fill = 0.25, -2.0
    q, k = torch.randn(1, 2, 40, 32), torch.randn(1, 1, 32, 32)
    rng = torch.tensor([77, 1 << 20], dtype=torch.int64)
    params = AttentionParams(0.5, True, True, dropout_p=dropout_p, mask_fill=fill)
    eye = torch.eye(32).expand(1, 1, 32, 32)
    probe, _ = flash_forward(q, k, eye, params, rng_state=rng)
    p, _ = fill_oracle(q, k, eye, fill, scale=0.5, causal=True, bottom_right=True)
    keep = probe != 0
    torch.testing.assert_close(probe[keep].double(), p[keep] / (1 - dropout_p), atol=1e-6, rtol=1e-5)
    assert 0.6 < keep.double().mean() < 0.9
    v = torch.randn(1, 1, 32, 32)
    out, lse = flash_forward(q, k, v, params, rng_state=rng)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    want, want_lse = fill_oracle(*leaves, fill, scale=0.5, causal=True, bottom_right=True, keep=keep,
                                 dropout_p=dropout_p)
    torch.testing.assert_close(out.double(), want.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse.detach(), atol=2e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grads = flash_backward(grad_out, q, k, v, out, lse, params, rng_state=rng)
    want.backward(grad_out.double())
    for got, leaf in zip(grads[:3], leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=5e-5, rtol=1e-5)


def test_fill_public_wrappers_and_validation():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    keep = torch.rand(1, 1, 9, 9) > 0.5
    out = ops.flash_attention(q, k, v, keep, fill=-1e9)
    torch.testing.assert_close(out.double(), fill_oracle(q, k, v, -1e9, bias=keep)[0], atol=2e-5, rtol=1e-5)
    out = ops.sliding_window_attention(q, k, v, 3, fill=-1e9)
    torch.testing.assert_close(out.double(), fill_oracle(q, k, v, -1e9, causal=True, window=3)[0],
                               atol=2e-5, rtol=1e-5)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="expected fill a finite float"):
            ops.flash_attention(q, k, v, fill=bad)
    pool = torch.randn(4, 2, 4, 16)
    with pytest.raises(NotImplementedError, match="paged_attention: fill=.*empty sequence"):
        ops.paged_attention(torch.randn(1, 2, 1, 16), pool, pool, torch.zeros(1, 2, dtype=torch.int32),
                            torch.tensor([5], dtype=torch.int32), fill=-1e9)


def test_opcheck_fill():
    q, k, v = (torch.randn(2, h, t, 16, requires_grad=True) for h, t in ((4, 9), (2, 11), (2, 11)))
    keep = torch.rand(2, 1, 9, 11) > 0.4
    opcheck(OPS.flash_attention, (q, k, v, keep), dict(causal=True, bottom_right=True, fill=-1e9))
    opcheck(OPS.sliding_window_attention, (q, k, v, 3), dict(fill=-10000.0))
