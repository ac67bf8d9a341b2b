"""The attnlower custom ops: opcheck, validation errors, autograd, dispatch, torch.compile."""
import math
import sys
import types

import pytest
import torch
from torch.library import opcheck

import attnlower.ops as public
from attnlower.lowering.reference import dropout_keep_mask, reference_flash_forward

from attention_oracle import oracle  # sibling helper; pytest puts tests/lowering on sys.path

OPS = torch.ops.attnlower
F32 = dict(atol=2e-5, rtol=1e-5)


def qkv(b=2, hq=4, hkv=2, tq=9, tk=11, d=16, requires_grad=False, dtype=torch.float32):
    return [torch.randn(b, h, t, d, dtype=dtype, requires_grad=requires_grad)
            for h, t in ((hq, tq), (hkv, tk), (hkv, tk))]


def paged_inputs(b=2, hq=4, hkv=2, tq=2, d=16, block_size=4, num_blocks=8):
    k_cache = torch.randn(num_blocks, hkv, block_size, d)
    v_cache = torch.randn(num_blocks, hkv, block_size, d)
    table = torch.tensor([[3, 0, 5], [6, 1, 0]], dtype=torch.int32)[:b]
    lens = torch.tensor([10, 6], dtype=torch.int32)[:b]
    return torch.randn(b, hq, tq, d), k_cache, v_cache, table, lens


# ------------------------------------------------------------------------------------ opcheck


def test_opcheck_flash_plain():
    q, k, v = qkv(requires_grad=True)
    opcheck(OPS.flash_attention, (q, k, v), dict(causal=True))


def test_opcheck_flash_bias_alibi():
    q, k, v = qkv(requires_grad=True)
    bias = torch.randn(1, 4, 9, 11, requires_grad=True)
    opcheck(OPS.flash_attention, (q, k, v, bias, torch.rand(4)),
            dict(scale=0.2, causal=True, bottom_right=True, softcap=3.0))


def test_opcheck_flash_bool_bias_empty_rows_nan():
    q, k, v = qkv(requires_grad=True)
    opcheck(OPS.flash_attention, (q, k, v, torch.rand(2, 1, 9, 11) > 0.5),
            dict(empty_rows_nan=True))


def test_opcheck_sliding():
    q, k, v = qkv(requires_grad=True)
    opcheck(OPS.sliding_window_attention, (q, k, v, 4), dict(bottom_right=True))
    opcheck(OPS.sliding_window_attention, (q, k, v, 3, torch.randn(11), torch.rand(2, 4)))


def test_opcheck_flash_dropout_schema_and_fake():
    # the output is random, so only the checks that do not compare two runs
    q, k, v = qkv(requires_grad=True)
    opcheck(OPS.flash_attention, (q, k, v), dict(dropout_p=0.2),
            test_utils=("test_schema", "test_faketensor"))


def test_opcheck_paged():
    q, k_cache, v_cache, table, lens = paged_inputs()
    opcheck(OPS.paged_attention, (q, k_cache, v_cache, table, lens))
    opcheck(OPS.paged_attention, (q, k_cache, v_cache, table, lens, torch.rand(4)),
            dict(scale=0.5, causal=False, window=3, softcap=2.0))


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_backward(with_bias):
    q, k, v = qkv()
    bias = torch.randn(2, 1, 9, 11) if with_bias else None
    alibi = torch.rand(4) if with_bias else None
    out, lse, rng_state = OPS.flash_attention(q, k, v, bias, alibi, None, True, True)
    args = (torch.randn(out.shape), q, k, v, bias, alibi, out, lse, rng_state, None, True, True,
            0.0, 0.0, 0, False, with_bias)
    opcheck(OPS.flash_attention_backward, args)


# --------------------------------------------------------------------------------- validation


def _flash(**overrides):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args.update(overrides)
    return lambda: public.flash_attention(**args)


VALIDATION = {
    "q_rank": (_flash(q=torch.randn(4, 9, 16)), r"expected q of rank 4 .*got shape \[4, 9, 16\]"),
    "heads": (_flash(k=torch.randn(2, 3, 11, 16), v=torch.randn(2, 3, 11, 16)),
              r"multiple of the KV head count.*Hq=4 and Hkv=3"),
    "batch": (_flash(k=torch.randn(1, 2, 11, 16), v=torch.randn(1, 2, 11, 16)), r"one batch size"),
    "kv_len": (_flash(v=torch.randn(2, 2, 12, 16)), r"k and v with the same heads and length"),
    "head_dim": (_flash(k=torch.randn(2, 2, 11, 8)), r"k's head_dim to equal q's \(16\)"),
    "dtype_mix": (_flash(k=torch.randn(2, 2, 11, 16, dtype=torch.float16)),
                  r"one dtype, got torch.float32, torch.float16"),
    "int_dtype": (_flash(q=torch.ones(2, 4, 9, 16, dtype=torch.int32)), r"expected q of dtype float16"),
    "device": (_flash(k=torch.randn(2, 2, 11, 16, device="meta")), r"one device, got q on cpu and k on meta"),
    "bias_shape": (_flash(bias=torch.randn(2, 4, 5, 11)), r"broadcastable to \[B, Hq, Tq, Tk\]=\[2, 4, 9, 11\], got shape \[2, 4, 5, 11\]"),
    "bias_rank": (_flash(bias=torch.randn(1, 2, 4, 9, 11)), r"broadcastable.*got shape \[1, 2, 4, 9, 11\]"),
    "bias_dtype": (_flash(bias=torch.ones(9, 11, dtype=torch.int64)), r"bias of dtype bool .*got torch.int64"),
    "alibi_shape": (_flash(alibi_slopes=torch.rand(2)), r"alibi_slopes of shape \[Hq\]=\[4\].*got \[2\]"),
    "alibi_dtype": (_flash(alibi_slopes=torch.rand(4, dtype=torch.float64)), r"alibi_slopes of dtype float32"),
    "dropout": (_flash(dropout_p=1.0), r"dropout_p in \[0, 1\), got 1.0"),
    "softcap": (_flash(softcap=-1.0), r"softcap >= 0"),
    "scale": (_flash(scale=math.inf), r"finite scale"),
    "window": (lambda: public.sliding_window_attention(*qkv(), 0), r"window > 0 .*got 0"),
}


@pytest.mark.parametrize("case", sorted(VALIDATION))
def test_validation_errors(case):
    call, message = VALIDATION[case]
    with pytest.raises(ValueError, match=message):
        call()


def _paged(**overrides):
    q, k_cache, v_cache, table, lens = paged_inputs()
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table, seq_lens=lens)
    args.update(overrides)
    return lambda: public.paged_attention(**args)


PAGED_VALIDATION = {
    "table_dtype": (_paged(block_table=torch.zeros(2, 3, dtype=torch.int64)), r"block_table int32 .*got torch.int64 \[2, 3\]"),
    "table_batch": (_paged(block_table=torch.zeros(3, 3, dtype=torch.int32)), r"block_table int32 \[B, max_blocks\] with B=2"),
    "lens_dtype": (_paged(seq_lens=torch.tensor([1, 2])), r"seq_lens int32 \[B\]=\[2\], got torch.int64"),
    "lens_shape": (_paged(seq_lens=torch.tensor([1, 2, 3], dtype=torch.int32)), r"seq_lens int32 \[B\]=\[2\], got torch.int32 \[3\]"),
    "cache_rank": (_paged(k_cache=torch.randn(8, 2, 4)), r"k_cache of rank 4 \[num_blocks, Hkv, block_size, D\]"),
    "cache_mismatch": (_paged(v_cache=torch.randn(8, 2, 2, 16)), r"k_cache and v_cache with the same"),
    "cache_head_dim": (_paged(k_cache=torch.randn(8, 2, 4, 8)), r"k_cache's head_dim to equal q's \(16\)"),
    "cache_heads": (_paged(k_cache=torch.randn(8, 3, 4, 16), v_cache=torch.randn(8, 3, 4, 16)), r"Hq=4 and Hkv=3"),
    "cache_dtype": (_paged(k_cache=torch.randn(8, 2, 4, 16).half(), v_cache=torch.randn(8, 2, 4, 16).half()), r"cast q to the cache's dtype"),
    "window": (_paged(window=-1), r"window >= 0"),
}


@pytest.mark.parametrize("case", sorted(PAGED_VALIDATION))
def test_paged_validation_errors(case):
    call, message = PAGED_VALIDATION[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_validation_runs_at_trace_time():
    q, k, v = qkv()
    bad_k = torch.randn(2, 3, 11, 16)
    compiled = torch.compile(lambda q, k, v: public.flash_attention(q, k, v), backend="eager",
                             fullgraph=True)
    with pytest.raises(Exception, match="Hq=4 and Hkv=3"):
        compiled(q, bad_k, bad_k)


# ----------------------------------------------------------------------------------- dispatch


@pytest.fixture
def fake_launchers(monkeypatch):
    """Stand-in launcher modules that record their calls (CPU tensors + ATTNLOWER_CPU_KERNELS)."""
    calls = []

    def flash_forward(q, k, v, *rest):
        calls.append(("flash_forward", rest))
        return reference_flash_forward(q, k, v, *rest)

    def paged_forward(q, *rest):
        calls.append(("paged_forward", rest))
        return torch.zeros(q.shape)

    launch = types.ModuleType("attnlower.lowering.launch")
    launch.flash_forward = flash_forward
    launch_paged = types.ModuleType("attnlower.lowering.launch_paged")
    launch_paged.paged_forward = paged_forward
    monkeypatch.setitem(sys.modules, "attnlower.lowering.launch", launch)
    monkeypatch.setitem(sys.modules, "attnlower.lowering.launch_paged", launch_paged)
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    return calls


def test_cpu_kernels_env_dispatches_to_launchers(fake_launchers):
    q, k, v = qkv()
    public.flash_attention(q, k, v, causal=True)
    public.paged_attention(*paged_inputs())
    (name, args), (paged_name, paged_args) = fake_launchers
    assert name == "flash_forward" and isinstance(args[2], float)
    assert args[2] == pytest.approx(1 / math.sqrt(16))  # scale resolved before the launcher
    assert paged_name == "paged_forward" and paged_args[5] == pytest.approx(0.25)


def test_missing_kernel_raises_not_implemented(fake_launchers, monkeypatch):
    monkeypatch.delattr(sys.modules["attnlower.lowering.launch"], "flash_forward")
    with pytest.raises(NotImplementedError, match=r"attnlower::flash_attention has no Triton kernel yet"):
        public.flash_attention(*qkv())


def test_missing_kernel_module_raises_not_implemented(fake_launchers, monkeypatch):
    # None in sys.modules makes `import attnlower.lowering.launch_paged` fail as if absent
    monkeypatch.setitem(sys.modules, "attnlower.lowering.launch_paged", None)
    with pytest.raises(NotImplementedError, match=r"attnlower::paged_attention has no Triton kernel"):
        public.paged_attention(*paged_inputs())


def test_kernels_refuse_float64(fake_launchers):
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"got float64; compute in float32"):
        public.flash_attention(q, k, v)
    assert fake_launchers == []


def test_unknown_cpu_kernels_value(monkeypatch):
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"ATTNLOWER_CPU_KERNELS: expected 'triton' .*got 'fast'"):
        public.flash_attention(*qkv())


# ----------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("op", ["flash", "sliding"])
def test_autograd_through_op_matches_oracle(op):
    q, k, v = qkv(hq=6, hkv=2, tq=13, tk=17, d=24, requires_grad=True)
    bias = torch.randn(1, 6, 1, 17, requires_grad=True)  # per-head key bias, broadcast over B, Tq
    alibi = torch.rand(6)
    kwargs = dict(alibi_slopes=alibi, softcap=4.0, bottom_right=True)
    if op == "flash":
        out = public.flash_attention(q, k, v, bias, causal=True, **kwargs)
        want, _ = oracle(q, k, v, bias=bias, alibi=alibi, softcap=4.0, causal=True, bottom_right=True)
    else:
        out = public.sliding_window_attention(q, k, v, 5, bias, **kwargs)
        want, _ = oracle(q, k, v, bias=bias, alibi=alibi, softcap=4.0, causal=True,
                         bottom_right=True, window=5)
    torch.testing.assert_close(out.double(), want, **F32)
    grad_out = torch.randn(out.shape)
    got = torch.autograd.grad(out, (q, k, v, bias), grad_out)
    expected = torch.autograd.grad(want, (q, k, v, bias), grad_out.double())
    for g, e, t in zip(got, expected, (q, k, v, bias)):
        assert g.shape == t.shape
        torch.testing.assert_close(g.double(), e.double(), atol=5e-5, rtol=1e-4)


def test_lse_is_not_differentiable_and_alibi_grad_refused():
    q, k, v = qkv(requires_grad=True)
    out, lse, rng_state = OPS.flash_attention(q, k, v)
    assert out.requires_grad and not lse.requires_grad and not rng_state.requires_grad
    slopes = torch.rand(4, requires_grad=True)
    out = public.flash_attention(q, k, v, alibi_slopes=slopes)
    with pytest.raises(NotImplementedError, match=r"alibi_slopes.detach\(\)"):
        out.sum().backward()


def test_dropout_through_op():
    q, k, v = qkv(requires_grad=True)
    torch.manual_seed(3)
    out, _, rng_state = OPS.flash_attention(q, k, v, None, None, None, True, False, 0.0, 0.25)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,) and rng_state.device.type == "cpu"
    torch.manual_seed(3)
    again, _, again_rng = OPS.flash_attention(q, k, v, None, None, None, True, False, 0.0, 0.25)
    assert torch.equal(rng_state, again_rng) and torch.equal(out, again)
    other, _, other_rng = OPS.flash_attention(q, k, v, None, None, None, True, False, 0.0, 0.25)
    assert not torch.equal(rng_state, other_rng) and not torch.equal(out, other)

    keep = dropout_keep_mask(rng_state, 0.25, (2, 4, 9, 11))
    want, _ = oracle(q, k, v, causal=True, keep=keep, dropout_p=0.25)
    torch.testing.assert_close(out.double(), want, **F32)
    grad_out = torch.randn(out.shape)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(want, (q, k, v), grad_out.double())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), atol=5e-5, rtol=1e-4)
    _, _, no_rng = OPS.flash_attention(q, k, v)
    assert no_rng.shape == (0,) and no_rng.dtype == torch.int64


def test_public_wrappers_return_out_only():
    q, k, v = qkv()
    out = public.flash_attention(q, k, v, causal=True)
    assert torch.equal(out, OPS.flash_attention(q, k, v, causal=True)[0])
    out = public.sliding_window_attention(q, k, v, 3)
    assert torch.equal(out, OPS.sliding_window_attention(q, k, v, 3)[0])
    paged = paged_inputs()
    assert torch.equal(public.paged_attention(*paged), OPS.paged_attention(*paged))


# ------------------------------------------------------------------------------ torch.compile


def test_compile_fullgraph_flash_forward_backward():
    q, k, v = qkv(requires_grad=True)
    bias = torch.randn(2, 1, 9, 11, requires_grad=True)

    def loss(q, k, v, bias):
        return (public.flash_attention(q, k, v, bias, causal=True, bottom_right=True) ** 2).sum()

    compiled = torch.compile(loss, backend="eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    expected = torch.autograd.grad(loss(q, k, v, bias), (q, k, v, bias))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **F32)


def test_compile_fullgraph_sliding_and_paged():
    q, k, v = qkv()
    sliding = torch.compile(lambda q, k, v: public.sliding_window_attention(q, k, v, 4),
                            backend="eager", fullgraph=True)
    torch.testing.assert_close(sliding(q, k, v), public.sliding_window_attention(q, k, v, 4))
    paged = paged_inputs()
    compiled = torch.compile(lambda *a: public.paged_attention(*a, window=3), backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(*paged), public.paged_attention(*paged, window=3))


def test_compile_aot_eager_dropout_matches_eager():
    # AOTAutograd must not recompute the seeded op in the backward: gradients match eager's
    q, k, v = qkv(requires_grad=True)

    def loss(q, k, v):
        return (public.flash_attention(q, k, v, causal=True, dropout_p=0.3) ** 2).sum()

    torch.manual_seed(1)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v)
    got = torch.autograd.grad(compiled, (q, k, v))
    torch.manual_seed(1)
    eager = loss(q, k, v)
    expected = torch.autograd.grad(eager, (q, k, v))
    torch.testing.assert_close(compiled, eager, **F32)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **F32)
