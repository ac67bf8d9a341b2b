"""The plain-PyTorch reference against the naive float64 oracle of attention_oracle.py."""
import math

import pytest
import torch
from attention_oracle import oracle  # sibling helper; pytest puts tests/lowering on sys.path

from attnlower.lowering import reference
from attnlower.lowering.params import AttentionParams
from attnlower.lowering.reference import (
    dropout_keep_mask,
    reference_flash_backward,
    reference_flash_forward,
    out_like,
    reference_paged_forward,
)

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float64: dict(atol=1e-10, rtol=1e-10)}
NO_RNG = torch.empty(0, dtype=torch.int64)


def make_qkv(b=2, hq=4, hkv=2, tq=37, tk=37, d=80, dv=None, dtype=torch.float32, requires_grad=False):
    dv = d if dv is None else dv
    q = torch.randn(b, hq, tq, d, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, dtype=dtype)
    v = torch.randn(b, hkv, tk, dv, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Run each test once with the default chunk size and once with ~5-row chunks."""
    if request.param == "chunked":
        # a few rows of [2, 8, *, 64] fp32 scores: forces several chunks at these shapes
        monkeypatch.setattr(reference, "SCORE_CHUNK_BYTES", 5 * 2 * 8 * 64 * 4)
    return request.param


def run_forward(q, k, v, bias=None, alibi=None, scale=None, causal=False, bottom_right=False,
                softcap=0.0, window=0, empty_rows_nan=False, dropout_p=0.0, rng_state=NO_RNG):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    params = AttentionParams(scale, causal, bottom_right, window, softcap, dropout_p, empty_rows_nan)
    return reference_flash_forward(q, k, v, params, bias=bias, alibi_slopes=alibi, rng_state=rng_state)


B, HQ, HKV, TQ, TK = 2, 4, 2, 37, 37


def _case_bias(shape, kind="float"):
    if kind == "bool":
        return torch.rand(shape) > 0.3
    return torch.randn(shape)


CASES = {
    "plain": lambda: dict(),
    "causal": lambda: dict(causal=True),
    "causal_bottom_right_short_q": lambda: dict(causal=True, bottom_right=True, tq=11),
    "causal_top_left_short_q": lambda: dict(causal=True, tq=11),
    "causal_bottom_right_long_q": lambda: dict(causal=True, bottom_right=True, tq=37, tk=20),
    "window": lambda: dict(causal=True, window=7),
    "window_bottom_right": lambda: dict(causal=True, window=5, bottom_right=True, tq=9),
    "mqa": lambda: dict(hkv=1, causal=True),
    "no_gqa": lambda: dict(hkv=4),
    "alibi_per_head": lambda: dict(alibi=torch.rand(HQ), causal=True),
    "alibi_per_batch": lambda: dict(alibi=torch.rand(B, HQ)),
    "softcap": lambda: dict(softcap=2.0, scale=1.3),
    "bias_full": lambda: dict(bias=_case_bias((B, HQ, TQ, TK))),
    "bias_shared": lambda: dict(bias=_case_bias((1, 1, TQ, TK)), causal=True),
    "bias_rank1": lambda: dict(bias=_case_bias((TK,))),
    "bias_padding": lambda: dict(bias=_case_bias((B, 1, 1, TK))),
    "bias_neg_inf": lambda: dict(bias=torch.randn(B, 1, TQ, TK).masked_fill(torch.rand(B, 1, TQ, TK) > 0.5, -math.inf)),
    "bias_finfo_min": lambda: dict(bias=torch.full((B, HQ, TQ, TK), torch.finfo(torch.float32).min).tril()),
    "bool_bias": lambda: dict(bias=_case_bias((B, 1, TQ, TK), "bool")),
    "bool_bias_strided": lambda: dict(bias=_case_bias((B, TQ, TK, HQ), "bool").permute(0, 3, 1, 2)),
    "dv_differs": lambda: dict(dv=48, causal=True),
    "everything": lambda: dict(hq=6, hkv=3, alibi=torch.rand(6), softcap=5.0, causal=True, window=9,
                               bottom_right=True, tq=13, bias=torch.randn(1, 6, 13, TK)),
}


def _build(case):
    spec = dict(CASES[case]())
    shape = {name: spec.pop(name) for name in ("hq", "hkv", "tq", "tk", "dv") if name in spec}
    hq = shape.get("hq", HQ)
    q, k, v = make_qkv(B, hq, shape.get("hkv", HKV), shape.get("tq", TQ), shape.get("tk", TK), 80,
                       shape.get("dv"))
    return q, k, v, spec


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_oracle(case, chunking):
    q, k, v, spec = _build(case)
    out, lse = run_forward(q, k, v, **spec)
    want_out, want_lse = oracle(q, k, v, **spec)
    assert out.dtype == q.dtype and out.stride() == out_like(q, v.shape[-1]).stride()  # q's layout (stride order)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want_out, **TOL[torch.float32])
    torch.testing.assert_close(lse.double(), want_lse, **TOL[torch.float32])


def test_chunked_fixture_really_chunks(chunking):
    chunks = list(reference._query_chunks(2, 8, 37, 37, torch.float32))
    assert [c.stop - c.start for c in chunks][0] == (37 if chunking == "whole" else 8)
    assert chunks[-1].stop == 37


def test_default_chunk_bounds_scores():
    # 32 heads x 32k keys fp32 is 4 MB a row: a chunk must stay under the budget yet not be one row
    rows = list(reference._query_chunks(1, 32, 32768, 32768, torch.float32))[0]
    assert (rows.stop - rows.start) * 32 * 32768 * 4 <= reference.SCORE_CHUNK_BYTES
    assert rows.stop - rows.start == 64


@pytest.mark.parametrize("empty_rows_nan", [False, True])
def test_empty_rows(empty_rows_nan, chunking):
    q, k, v = make_qkv(tq=10, tk=6)
    bias = torch.ones(B, 1, 10, 6, dtype=torch.bool)
    bias[:, :, 3] = False  # row 3 fully masked by the bias
    # bottom-right causal with Tq > Tk: the first Tq - Tk = 4 rows see no key
    out, lse = run_forward(q, k, v, bias=bias, causal=True, bottom_right=True,
                           empty_rows_nan=empty_rows_nan)
    want, want_lse = oracle(q, k, v, bias=bias, causal=True, bottom_right=True,
                            empty_rows_nan=empty_rows_nan)
    empty = torch.zeros(10, dtype=torch.bool)
    empty[[0, 1, 2, 3]] = True
    assert torch.equal(lse[:, :, empty], torch.full_like(lse[:, :, empty], -math.inf))
    if empty_rows_nan:
        assert out[:, :, empty].isnan().all()
    else:
        assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert not out[:, :, ~empty].isnan().any()
    torch.testing.assert_close(out.double(), want, equal_nan=True, **TOL[torch.float32])
    torch.testing.assert_close(lse.double(), want_lse, **TOL[torch.float32])


def test_no_keys_at_all():
    q, k, v = make_qkv(tq=3, tk=0)
    out, lse = run_forward(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and (lse == -math.inf).all()
    out, _ = run_forward(q, k, v, empty_rows_nan=True)
    assert out.isnan().all()


def test_nan_input_propagates():
    q, k, v = make_qkv(tq=4, tk=4)
    q[0, 0, 1, 0] = math.nan
    out, _ = run_forward(q, k, v)
    assert out[0, 0, 1].isnan().all() and not out[0, 0, [0, 2, 3]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["causal", "everything", "bias_padding"])
def test_forward_dtypes(dtype, case):
    q, k, v, spec = _build(case)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if spec.get("bias") is not None and spec["bias"].is_floating_point():
        spec["bias"] = spec["bias"].to(dtype)
    out, lse = run_forward(q, k, v, **spec)
    want, want_lse = oracle(q, k, v, **spec)  # the oracle sees the same rounded inputs
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    # lse is fp32 for every input dtype, computed from the same rounded inputs as the oracle's
    torch.testing.assert_close(lse.double(), want_lse, **TOL[torch.float32])


BACKWARD_CASES = ["plain", "causal", "causal_bottom_right_long_q", "window_bottom_right", "mqa",
                  "alibi_per_head", "softcap", "bias_full", "bias_shared", "bias_rank1",
                  "bias_padding", "bias_neg_inf", "bool_bias", "dv_differs", "everything"]


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward_matches_autograd(case, chunking):
    q, k, v, spec = _build(case)
    bias = spec.get("bias")
    bias_grad = bias is not None and bias.is_floating_point()
    for t in (q, k, v):
        t.requires_grad_(True)
    if bias_grad:
        bias.requires_grad_(True)
    want_out, _ = oracle(q, k, v, **spec)
    grad_out = torch.randn(want_out.shape)
    want_out.backward(grad_out.double())

    with torch.no_grad():
        out, lse = run_forward(q, k, v, **spec)
        scale = spec.get("scale", 1 / math.sqrt(q.shape[-1]))
        params = AttentionParams(scale, spec.get("causal", False), spec.get("bottom_right", False),
                                 spec.get("window", 0), spec.get("softcap", 0.0))
        dq, dk, dv, dbias, _ = reference_flash_backward(grad_out, q, k, v, out, lse, params, bias=bias,
                                                     alibi_slopes=spec.get("alibi"), bias_requires_grad=bias_grad)
    tol = dict(atol=5e-5, rtol=1e-4)
    for got, t in ((dq, q), (dk, k), (dv, v)):
        assert got.shape == t.shape and got.dtype == t.dtype
        torch.testing.assert_close(got.double(), t.grad.double(), **tol)
    if bias_grad:
        assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
        torch.testing.assert_close(dbias.double(), bias.grad.double(), **tol)
    else:
        assert dbias is None


@pytest.mark.parametrize("empty_rows_nan", [False, True])
def test_backward_empty_rows_get_zero_grad(empty_rows_nan):
    q, k, v = make_qkv(tq=10, tk=6)
    out, lse = run_forward(q, k, v, scale=0.1, causal=True, bottom_right=True,
                           empty_rows_nan=empty_rows_nan)
    grad_out = torch.randn(out.shape)
    dq, dk, dv, *_ = reference_flash_backward(
        grad_out, q, k, v, out, lse, AttentionParams(0.1, True, True, empty_rows_nan=empty_rows_nan))
    assert torch.equal(dq[:, :, :4], torch.zeros_like(dq[:, :, :4]))
    for g in (dq, dk, dv):
        assert not g.isnan().any()
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    oracle(q2, k2, v2, scale=0.1, causal=True, bottom_right=True)[0].backward(grad_out.double())
    for got, t in ((dq, q2), (dk, k2), (dv, v2)):
        torch.testing.assert_close(got.double(), t.grad.double(), atol=5e-5, rtol=1e-4)


def test_backward_half_precision():
    q, k, v = make_qkv(tq=17, tk=23, d=64, dtype=torch.float16, requires_grad=True)
    out_want, _ = oracle(q, k, v, causal=True, bottom_right=True)
    grad_out = torch.randn(out_want.shape, dtype=torch.float16)
    out_want.backward(grad_out.double())
    with torch.no_grad():
        out, lse = run_forward(q, k, v, causal=True, bottom_right=True)
        grads = reference_flash_backward(grad_out, q, k, v, out, lse, AttentionParams(0.125, True, True))
    for got, t in zip(grads[:3], (q, k, v)):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.double(), t.grad.double(), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------ dropout


def test_dropout_keep_rate_and_seeds():
    shape = (2, 4, 128, 128)
    for p in (0.1, 0.5):
        keep = dropout_keep_mask(torch.tensor([1234, 0]), p, shape)
        n = keep.numel()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
        # no structure along rows or columns
        assert (keep.float().mean(dim=(0, 1, 2)) - (1 - p)).abs().max() < 0.15
    a = dropout_keep_mask(torch.tensor([1, 0]), 0.5, shape)
    b = dropout_keep_mask(torch.tensor([2, 0]), 0.5, shape)
    c = dropout_keep_mask(torch.tensor([1, 7]), 0.5, shape)
    assert 0.4 < (a != b).float().mean() < 0.6 and 0.4 < (a != c).float().mean() < 0.6
    assert torch.equal(a, dropout_keep_mask(torch.tensor([1, 0]), 0.5, shape))


def test_dropout_forward_backward_consistent(chunking):
    q, k, v = make_qkv(tq=21, tk=19, requires_grad=True)
    bias = torch.randn(1, HQ, 21, 19, requires_grad=True)
    rng_state, p = torch.tensor([987654, 3]), 0.3
    keep = dropout_keep_mask(rng_state, p, (B, HQ, 21, 19))
    want, _ = oracle(q, k, v, bias=bias, causal=True, bottom_right=True, keep=keep, dropout_p=p)
    grad_out = torch.randn(want.shape)
    want.backward(grad_out.double())
    with torch.no_grad():
        out, lse = run_forward(q, k, v, bias=bias, causal=True, bottom_right=True, dropout_p=p,
                               rng_state=rng_state)
        grads = reference_flash_backward(grad_out, q, k, v, out, lse,
                                         AttentionParams(1 / math.sqrt(80), True, True, dropout_p=p),
                                         bias=bias, rng_state=rng_state, bias_requires_grad=True)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    for got, t in zip(grads, (q, k, v, bias)):
        torch.testing.assert_close(got.double(), t.grad.double(), atol=5e-5, rtol=1e-4)


def test_dropout_changes_output_and_is_unbiased():
    q, k, v = make_qkv(b=1, hq=2, hkv=2, tq=64, tk=64, d=16)
    plain, _ = run_forward(q, k, v)
    dropped, _ = run_forward(q, k, v, dropout_p=0.5, rng_state=torch.tensor([5, 0]))
    assert not torch.allclose(plain, dropped)
    # averaging many masks approaches the undropped output (inverted dropout is unbiased)
    mean = sum(run_forward(q, k, v, dropout_p=0.5, rng_state=torch.tensor([s, 0]))[0]
               for s in range(200)) / 200
    assert (mean - plain).abs().mean() < 0.25 * (dropped - plain).abs().mean()


# ------------------------------------------------------------------------------------- paged


def paged_oracle(q, keys, values, lens, causal, window, alibi=None, softcap=0.0, scale=None):
    """Per-sequence dense oracle: the queries are the last Tq tokens of each sequence."""
    outs = []
    tq = q.shape[2]
    for b, length in enumerate(lens):
        kb, vb = keys[b:b + 1, :, :length], values[b:b + 1, :, :length]
        bias = torch.zeros(1, 1, tq, length)
        i = torch.arange(tq).view(-1, 1) + length - tq
        j = torch.arange(length).view(1, -1)
        visible = torch.ones(tq, length, dtype=torch.bool)
        if causal:
            visible &= j <= i
        if window:
            visible &= j > i - window
        bias = bias.masked_fill(~visible, -math.inf)
        # bottom-right alignment puts query i at position length - tq + i, as paging does
        out, _ = oracle(q[b:b + 1], kb, vb, bias=bias, alibi=alibi, softcap=softcap, scale=scale,
                        bottom_right=True)
        outs.append(out)
    return torch.cat(outs)


@pytest.mark.parametrize("causal,window,tq", [(True, 0, 1), (True, 0, 3), (False, 0, 2),
                                              (True, 5, 4), (False, 6, 1)])
def test_paged_matches_oracle(causal, window, tq, chunking):
    block_size, num_blocks, hq, hkv, d = 4, 20, 4, 2, 16
    lens = [13, 1 if tq == 1 else tq, 8, 0]  # 0 < seq_len < Tq is an error (test_paged_kernel.py BAD_CASES); 0 a padding slot
    keys = torch.randn(len(lens), hkv, max(lens), d)
    values = torch.randn(len(lens), hkv, max(lens), d)
    k_cache = torch.full((num_blocks, hkv, block_size, d), math.nan)  # unused slots are poison
    v_cache = torch.full((num_blocks, hkv, block_size, d), math.nan)
    order = torch.randperm(num_blocks).tolist()  # blocks deliberately out of order
    table = torch.full((len(lens), 5), 99, dtype=torch.int32)  # padding need not be a real block
    for b, length in enumerate(lens):
        for blk in range(-(-length // block_size)):
            phys = order.pop()
            table[b, blk] = phys
            n = min(block_size, length - blk * block_size)
            k_cache[phys, :, :n] = keys[b, :, blk * block_size: blk * block_size + n]
            v_cache[phys, :, :n] = values[b, :, blk * block_size: blk * block_size + n]
    q = torch.randn(len(lens), hq, tq, d)
    alibi = torch.rand(hq)
    out = reference_paged_forward(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32),
                                  AttentionParams(0.3, causal, window=window, softcap=1.5), alibi_slopes=alibi)
    want = paged_oracle(q, keys, values, lens, causal, window, alibi=alibi, softcap=1.5, scale=0.3)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    if tq == 1:
        assert torch.equal(out[3], torch.zeros_like(out[3]))  # empty sequence -> 0


def test_paged_rejects_table_entry_outside_cache():
    k_cache = torch.zeros(3, 1, 4, 8)
    table = torch.tensor([[0, 7]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"num_blocks=3.*block_table\[0, 1\] = 7"):
        reference_paged_forward(torch.randn(1, 1, 1, 8), k_cache, k_cache, table,
                                torch.tensor([6], dtype=torch.int32), AttentionParams(1.0, True))


def test_paged_reference_every_sequence_empty():
    """A batch whose sequences are all empty (seq_lens all 0) gives zero rows, not a reshape error."""
    import attnlower

    q = torch.randn(2, 4, 1, 16, dtype=torch.float64, device="cpu")
    pools = [torch.randn(8, 2, 4, 16, dtype=torch.float64, device="cpu") for _ in range(2)]
    table = torch.zeros(2, 2, dtype=torch.int32, device="cpu")
    lens = torch.zeros(2, dtype=torch.int32, device="cpu")
    out = attnlower.ops.paged_attention(q, *pools, table, lens)
    assert out.shape == (2, 4, 1, 16) and torch.equal(out, torch.zeros_like(out))
