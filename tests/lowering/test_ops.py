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


def qkv(b=2, hq=4, hkv=2, tq=9, tk=11, d=16, requires_grad=False, dtype=torch.float32, device=None):
    return [torch.randn(b, h, t, d, dtype=dtype, device=device, requires_grad=requires_grad)
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
    "device": (_flash(k=torch.randn(2, 2, 11, 16, device="meta")), r"one device, got q on \w+(:0)? and k on meta"),
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

    def flash_forward(q, k, v, params, **tensors):
        calls.append(("flash_forward", params))
        return reference_flash_forward(q, k, v, params, **tensors)

    def paged_forward(q, k_cache, v_cache, block_table, seq_lens, params, **tensors):
        calls.append(("paged_forward", params))
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
    (name, params), (paged_name, paged_params) = fake_launchers
    assert name == "flash_forward" and isinstance(params.scale, float) and params.causal
    assert params.scale == pytest.approx(1 / math.sqrt(16))  # scale resolved before the launcher
    assert paged_name == "paged_forward" and paged_params.scale == pytest.approx(0.25)


def test_missing_kernel_raises_not_implemented(fake_launchers, monkeypatch):
    monkeypatch.delattr(sys.modules["attnlower.lowering.launch"], "flash_forward")
    with pytest.raises(NotImplementedError, match=r"attnlower::flash_attention has no Triton kernel yet"):
        public.flash_attention(*qkv())


def test_missing_kernel_module_raises_not_implemented(fake_launchers, monkeypatch):
    # None in sys.modules makes `import attnlower.lowering.launch_paged` fail as if absent
    monkeypatch.setitem(sys.modules, "attnlower.lowering.launch_paged", None)
    with pytest.raises(NotImplementedError, match=r"attnlower::paged_attention has no Triton kernel"):
        public.paged_attention(*paged_inputs())


def test_float64_on_cpu_runs_the_reference_whatever_the_env(fake_launchers):
    # the invariant the translation validator relies on: CPU float64 is the reference's
    q, k, v = qkv(dtype=torch.float64, device="cpu")
    out = public.flash_attention(q, k, v, causal=True)
    paged = [t.double() if t.is_floating_point() else t for t in paged_inputs()]
    public.paged_attention(*[t.cpu() for t in paged])
    assert fake_launchers == []
    want, _ = oracle(q, k, v, causal=True)
    torch.testing.assert_close(out, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_refuse_float64_on_cuda():
    with pytest.raises(ValueError, match=r"got float64; compute in float32"):
        public.flash_attention(*qkv(dtype=torch.float64, device="cuda"))


def test_unknown_cpu_kernels_value(monkeypatch):
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"ATTNLOWER_CPU_KERNELS: expected 'triton' .*got 'fast'"):
        public.flash_attention(*qkv(device="cpu"))


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
    # on CPU (whatever ATTNLOWER_TEST_DEVICE says): the reference's dropout stream is what
    # dropout_keep_mask reproduces
    with torch.device("cpu"):
        _dropout_through_op()


def _dropout_through_op():
    q, k, v = qkv(requires_grad=True, device="cpu")
    torch.manual_seed(3)
    out, _, rng_state = OPS.flash_attention(q, k, v, None, None, None, True, False, 0.0, 0.25)
    # on the device of q: the kernels read it there, no host sync (and CUDA graphs capture the draw)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,) and rng_state.device == q.device
    torch.manual_seed(3)
    again, _, again_rng = OPS.flash_attention(q, k, v, None, None, None, True, False, 0.0, 0.25)
    assert torch.equal(rng_state, again_rng) and torch.equal(out, again)
    other, _, other_rng = OPS.flash_attention(q, k, v, None, None, None, True, False, 0.0, 0.25)
    assert not torch.equal(rng_state, other_rng) and not torch.equal(out, other)

    keep = dropout_keep_mask(rng_state, 0.25, (2, 4, 9, 11))
    want, _ = oracle(q, k, v, causal=True, keep=keep, dropout_p=0.25)
    torch.testing.assert_close(out.double(), want, **F32)
    grad_out = torch.randn(out.shape, device="cpu")
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


# ------------------------------------------------------------------- the public API, as documented


README_SPELLINGS = r"""
import torch
import attnlower                                    # the README: attnlower.ops.flash_attention(...)
q, k, v = (torch.randn(2, 4, 9, 16, requires_grad=True) for _ in range(3))
out = attnlower.ops.flash_attention(q, k, v)        # every default
out.sum().backward()                                # the backward of a call with defaults
assert q.grad is not None and k.grad is not None and v.grad is not None
from attnlower import ops                           # the other spelling
assert ops is attnlower.ops
cache = attnlower.PagedKVCache(num_blocks=4, block_size=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
print("ok")
"""


def test_readme_spellings_in_a_fresh_process():
    # a fresh interpreter: in this one attnlower.ops is already imported, so the package's lazy
    # attribute (the RecursionError of issue 9, item 6) would not be exercised
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("ATTNLOWER_TEST_DEVICE", None)
    proc = subprocess.run([sys.executable, "-c", README_SPELLINGS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("wrapper", ["flash", "sliding"])
@pytest.mark.parametrize("grads", ["qkv", "q only", "k and bias"])
def test_public_wrappers_defaults_and_backward(wrapper, grads):
    """Each wrapper with only its required arguments, then backward, for any subset needing grad."""
    q, k, v = qkv()
    bias = torch.randn(1, 1, 9, 11)
    wants = {"qkv": (q, k, v), "q only": (q,), "k and bias": (k, bias)}[grads]
    for t in wants:
        t.requires_grad_()
    if wrapper == "flash":
        out = public.flash_attention(q, k, v, bias) if bias.requires_grad else public.flash_attention(q, k, v)
        want, _ = oracle(q, k, v, bias=bias if bias.requires_grad else None)
    else:
        out = (public.sliding_window_attention(q, k, v, 4, bias) if bias.requires_grad
               else public.sliding_window_attention(q, k, v, 4))
        want, _ = oracle(q, k, v, bias=bias if bias.requires_grad else None, causal=True, window=4)
    torch.testing.assert_close(out.double(), want, **F32)
    grad_out = torch.randn(out.shape)
    got = torch.autograd.grad(out, wants, grad_out)
    expected = torch.autograd.grad(want, wants, grad_out.double())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), atol=5e-5, rtol=1e-4)


def test_public_paged_defaults():
    q, k_cache, v_cache, table, lens = paged_inputs()
    out = public.paged_attention(q, k_cache, v_cache, table, lens)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("window", [2.5, True, torch.tensor(3)])
def test_window_must_be_an_int(window):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"expected window as an int .*pass int\(window\)"):
        public.sliding_window_attention(q, k, v, window)
    with pytest.raises(ValueError, match=r"expected window as an int"):
        public.paged_attention(*paged_inputs(), window=window)


# -------------------------------------------------------------------- the host-cost caches


def test_validation_and_plan_are_cached_per_signature(monkeypatch):
    """The launchers' path (the cached launch off: on CUDA it answers repeat calls before these caches, see
    test_fastpath.py); CPU tensors run the kernels through the interpreter, CUDA tensors compiled."""
    from attnlower.lowering import fastpath
    from attnlower.lowering import ops as lowering_ops
    from attnlower.lowering import plan as planning

    monkeypatch.setattr(fastpath, "ENABLED", False)
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    lowering_ops._validate_dense.cache_clear()
    planning.dense_plan.cache_clear()
    q, k, v = qkv()
    for _ in range(3):
        public.flash_attention(q, k, v, causal=True)
    validation, plans = lowering_ops._validate_dense.cache_info(), planning.dense_plan.cache_info()
    assert (validation.misses, validation.hits) == (1, 2)
    assert (plans.misses, plans.hits) == (1, 2)
    # new strides of the same shapes: same signature (Triton specializes strides itself)
    public.flash_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, causal=True)
    assert planning.dense_plan.cache_info().misses == 1
    # a new length or new flags: a new entry each
    public.flash_attention(*qkv(tq=5), causal=True)
    public.flash_attention(q, k, v, causal=False)
    assert planning.dense_plan.cache_info().misses == 3 and lowering_ops._validate_dense.cache_info().misses == 2
    # bounded: a process that sees many shapes does not grow without end
    assert planning.dense_plan.cache_info().maxsize == planning.PLAN_CACHE_SIZE


def test_failed_validation_is_not_cached():
    from attnlower.lowering import ops as lowering_ops

    lowering_ops._validate_dense.cache_clear()
    bad_k = torch.randn(2, 3, 11, 16)
    for _ in range(2):
        with pytest.raises(ValueError, match="Hq=4 and Hkv=3"):
            public.flash_attention(qkv()[0], bad_k, bad_k)
    assert lowering_ops._validate_dense.cache_info().currsize == 0


# ------------------------------------------------------------ what Inductor receives (triton_op)


TRACE_BODY = """
args = tuple(torch.randn(1, 2, 20, 16) for _ in range(3))

def fn(q, k, v):
    return public.flash_attention(q, k, v, causal=True)
"""


@pytest.mark.parametrize("mode", ["kernels", "reference"])
def test_graph_inductor_receives_holds_the_kernels(mode):
    """AOTAutograd decomposes the op into its Triton launches where it runs kernels, and keeps the
    reference opaque. Checked on CPU: the kernels are compiled (not interpreted) kernels traced on CPU
    tensors (TRACE_CPU_KERNELS); the graph is captured, never run. On a GPU, tests/lowering/test_cuda.py
    checks Inductor's output code itself."""
    from traced_launches import aot_targets   # sibling helper (tests/lowering is on sys.path)

    targets = aot_targets(TRACE_BODY, kernels=mode == "kernels")
    if mode == "kernels":
        assert "triton_kernel_wrapper_functional:_flash_fwd_kernel" in targets, targets
        assert not any(t.startswith("attnlower.") for t in targets), targets
    else:
        assert "attnlower.flash_attention.default" in targets, targets
        assert not any("triton_kernel_wrapper" in t for t in targets), targets


# ------------------------------------------------------------ layouts and graph-safe outputs (issue 18)


def _bshd(b, t, h, d, requires_grad=False):
    return torch.randn(b, t, h, d).transpose(1, 2).requires_grad_(requires_grad)


@pytest.mark.parametrize("op", ["flash", "sliding"])
def test_outputs_follow_q_layout_in_the_real_and_the_fake_op(op):
    """Inductor plans its buffers from the fake's strides: they must be the real op's, and follow q's layout
    (a BSHD view in gives BSHD memory out: the consumer's transpose + reshape is then a view, no copy)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _bshd(2, 9, 4, 16), _bshd(2, 11, 2, 16), _bshd(2, 11, 2, 16)
    call = (lambda *t: OPS.flash_attention(*t, causal=True)) if op == "flash" else \
        (lambda *t: OPS.sliding_window_attention(*t, 3))
    real = call(q, k, v)
    with FakeTensorMode() as mode:
        fake = call(*(mode.from_tensor(t) for t in (q, k, v)))
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype
    assert real[0].stride() == q.stride()
    merged = real[0].transpose(1, 2).reshape(2, 9, 64)
    assert merged.data_ptr() == real[0].data_ptr() and merged._base is not None

    out, lse, rng = real
    grads = OPS.flash_attention_backward(torch.randn_like(out), q, k, v, None, None, out, lse, rng, None, True,
                                         False, 0.0, 0.0, 0, False, False)
    with FakeTensorMode() as mode:
        fq, fk, fv, fo, fl, fr = (mode.from_tensor(t) for t in (q, k, v, out, lse, rng))
        fake_grads = OPS.flash_attention_backward(torch.empty_like(fo), fq, fk, fv, None, None, fo, fl, fr, None, True,
                                                  False, 0.0, 0.0, 0, False, False)
    for g, fg, like in zip(grads[:3], fake_grads[:3], (q, k, v)):
        assert g.stride() == fg.stride() == like.stride()


def test_no_output_aliases_an_input_or_another_output():
    """Graph-safe outputs (CUDA graphs, functionalization): every output owns fresh storage, the empty
    rng_state / dbias placeholders included."""
    q, k, v = qkv(requires_grad=True)
    bias = torch.randn(1, 4, 9, 11, requires_grad=True)
    outs = OPS.flash_attention(q, k, v, bias, causal=True)
    grads = OPS.flash_attention_backward(torch.randn_like(outs[0]), q, k, v, bias, None, *outs, None, True, False,
                                         0.0, 0.0, 0, False, False)
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, bias)}
    for group in (outs, grads):
        ptrs = [t.untyped_storage().data_ptr() for t in group if t.numel() > 0]
        assert len(set(ptrs)) == len(ptrs) and not set(ptrs) & inputs
        assert all(t.untyped_storage() is not s.untyped_storage() for t in group for s in (q, k, v, bias))


@pytest.mark.parametrize("value", [True, 1.0])
def test_a_flag_where_bias_goes_says_what_goes_there(value):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"expected bias a Tensor or None .* got (bool True|float 1\.0)"):
        public.flash_attention(q, k, v, value)
    if value is True:
        with pytest.raises(ValueError, match=r"pass it by keyword, flash_attention\(q, k, v, causal=True\)"):
            public.flash_attention(q, k, v, value)


def test_registry_derives_the_schemas_and_kernel_names():
    from attnlower.lowering import registry

    for name, op in registry.OPS.items():
        parsed = torch._C.parse_schema(f"attnlower::{name}{op.schema}")
        registered = getattr(OPS, name).default._schema
        assert [(a.name, str(a.type), a.default_value) for a in parsed.arguments] == \
            [(a.name, str(a.type), a.default_value) for a in registered.arguments]
    assert registry.kernel_names("sliding_window_attention", "forward") == ("_flash_fwd_kernel",)
    assert registry.kernel_names("paged_attention") == ("_paged_attn_kernel", "_paged_reduce_kernel")
    assert "_flash_bwd_dq_kernel" in registry.kernel_names("flash_attention", "backward")


def test_kernel_plan_uses_the_real_lengths():
    from attnlower.lowering import plan as planning
    from attnlower.lowering.params import AttentionParams
    from attnlower.lowering.target import Target

    h200 = Target("cuda", 90, 132, False, 232448, "NVIDIA H200")
    params = AttentionParams(0.125, causal=False)
    short = planning.kernel_plan("flash_attention", params, batch=2, q_heads=8, kv_heads=8, tq=1, tk=4096,
                                 head_dim=128, dtype=torch.bfloat16, target=h200)
    long_q = planning.kernel_plan("flash_attention", params, batch=2, q_heads=8, kv_heads=8, tq=197, tk=197,
                                  head_dim=128, dtype=torch.bfloat16, target=h200)
    # the forward's key tiles follow Tk (configs._FLASH_FWD_BY_LEN): Tk=4096 non-causal and Tk=197 differ; its
    # row tile is no taller than Tq needs (16, tl.dot's minimum, for a decode step: plan._rows_for)
    assert (short["launches"][0]["block_m"], short["launches"][0]["block_n"]) == (16, 128)
    assert (long_q["launches"][0]["block_m"], long_q["launches"][0]["block_n"]) == (128, 32)
    assert short["launches"][0]["grid"] == [1, 16, 1] and short["kernels"] == ["_flash_fwd_kernel"]
    paged = planning.kernel_plan("paged_attention", AttentionParams(0.125, True), batch=1, q_heads=32, kv_heads=8,
                                 tq=1, tk=4096, head_dim=128, dtype=torch.bfloat16, target=h200, block_size=16)
    # split, then the separate reduce (configs.PAGED_REDUCE: timed faster than the fused combine on the H200)
    assert [launch["kernel"] for launch in paged["launches"]] == ["_paged_attn_kernel", "_paged_reduce_kernel"]
    # 8 programs on 132 SMs: as many splits as the length allows (configs._PAGED_MIN_TOKENS_PER_SPLIT keys each)
    from attnlower.lowering import configs

    splits = 4096 // configs._PAGED_MIN_TOKENS_PER_SPLIT
    assert paged["launches"][0]["grid"] == [8, 1, splits] and not paged["launches"][0]["constexprs"]["FUSED_REDUCE"]
    assert f"split-KV into {splits}" in paged["note"]


def test_registry_kernel_table_is_what_the_seam_lists():
    """attnlower/target.py (the pass side's seam) lists the kernels itself until it reads the registry
    (`kernels_of` -> `registry.kernel_table()`); until then they must agree."""
    from attnlower import target as seam
    from attnlower.lowering import registry

    for op, groups in registry.kernel_table().items():
        assert [tuple(g) for g in seam.kernels_of(op)] == groups, op


@pytest.mark.parametrize("op", ["flash", "sliding"])
def test_eager_autograd_path_matches_the_registered_autograd(op):
    """A plain eager call that needs a gradient runs the registry's autograd glue as an autograd.Function over
    the implementations (no dispatcher, no custom_op layers); gradients equal the registered op's."""
    q, k, v = qkv(requires_grad=True)
    bias = torch.randn(1, 4, 9, 11, requires_grad=True)
    if op == "flash":
        out = public.flash_attention(q, k, v, bias, causal=True, softcap=2.0)
        ref = OPS.flash_attention(q, k, v, bias, None, None, True, False, 2.0)[0]
    else:
        out = public.sliding_window_attention(q, k, v, 4, bias, softcap=2.0)
        ref = OPS.sliding_window_attention(q, k, v, 4, bias, None, None, False, 2.0)[0]
    assert "eager" in out.grad_fn.name() and "eager" not in ref.grad_fn.name()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), grad)
    want = torch.autograd.grad(ref, (q, k, v, bias), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="alibi_slopes is not implemented"):
        public.flash_attention(q, k, v, alibi_slopes=torch.rand(4, requires_grad=True)).sum().backward()


def test_paged_output_follows_q_layout_in_the_real_and_the_fake_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k_cache, v_cache, table, lens = paged_inputs(tq=2)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)   # a [B, T, H, D] view, as models hand it over
    real = OPS.paged_attention(q, k_cache, v_cache, table, lens)
    with FakeTensorMode() as mode:
        fake = OPS.paged_attention(*(mode.from_tensor(t) for t in (q, k_cache, v_cache, table, lens)))
    assert real.stride() == fake.stride() == q.stride()
