"""Cached direct launches (lowering/fastpath.py), on CPU with a stub compiled kernel.

The first call of a signature goes through the launcher and Triton's JIT (here: the interpreter, so the
output is real); the stub stands for the CompiledKernel Triton returns and records what a later call hands
to `CompiledKernel.run`. What must hold: a repeat call launches with exactly the arguments Triton's binder
built, the pointers of this call's tensors in the tensor slots; anything that changes Triton's
specialization (a pointer's 16-byte alignment, a stride, a shape, a dtype, a scalar) gets its own entry.
"""
import pytest
import torch

import attnlower.ops as public
from attnlower.lowering import fastpath, launch
from attnlower.lowering.params import AttentionParams


@pytest.fixture(autouse=True)
def _fast_launch_on(monkeypatch):
    """The cached launch (on by default since its H200 check, bench/RESULTS.md 2026-12-03 night): its mechanism."""
    monkeypatch.setattr(fastpath, "ENABLED", True)


class _StubCompiled:
    """What JITFunction.run returns on a GPU: `.run(grid..., stream, function, metadata, hooks..., *args)`."""

    function = "cu-function"
    packed_metadata = "packed"

    def __init__(self, bound_args):
        self.bound_args = bound_args
        self.runs = []

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *args):
        assert (function, packed, launch_metadata, enter, exit_) == ("cu-function", "packed", None, None, None)
        self.runs.append(((g0, g1, g2), stream, args))


class _StubJIT:
    """The real (interpreted) kernel, returning a stub CompiledKernel that remembers the bound arguments."""

    def __init__(self, fn):
        self.fn = fn
        self.arg_names = list(fn.arg_names)
        self.compiled = []

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.fn[grid](*args, **kwargs)
            names = self.arg_names
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k not in fastpath.LAUNCH_OPTIONS})
            compiled = _StubCompiled([bound[n] for n in names])
            self.compiled.append((grid, compiled))
            return compiled
        return launch_


@pytest.fixture
def stub(monkeypatch):
    from attnlower.lowering.kernels import flash_fwd

    jit = _StubJIT(flash_fwd._flash_fwd_kernel)
    real_kernel = launch.kernel
    monkeypatch.setattr(launch, "kernel", lambda module, name: jit if name == "_flash_fwd_kernel"
                        else real_kernel(module, name))
    _path_on_the_test_device(monkeypatch)
    yield jit
    fastpath.clear()


def _path_on_the_test_device(monkeypatch):
    """The cached launch on the tensors' device: CPU here (the interpreter runs the first call), CUDA under
    ATTNLOWER_TEST_DEVICE=cuda (the real JIT compiles the first call; the stub still stands for its result)."""
    monkeypatch.setattr(fastpath, "DEVICE_TYPE", torch.empty(0).device.type)
    monkeypatch.setattr(fastpath, "_RULE_OK", True)
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    fastpath.clear()


def _stream():
    return torch.cuda.current_stream().cuda_stream if torch.empty(0).is_cuda else 0


def _qkv(tq=9, tk=11, d=16, dtype=torch.float32):
    return (torch.randn(2, 4, tq, d, dtype=dtype), torch.randn(2, 2, tk, d, dtype=dtype),
            torch.randn(2, 2, tk, d, dtype=dtype))


def _pointers(args):
    return [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]


def test_repeat_call_launches_the_compiled_kernel_with_the_bound_arguments(stub):
    q, k, v = _qkv()
    bias = torch.randn(1, 4, 9, 11)
    first = public.flash_attention(q, k, v, bias, causal=True, softcap=2.0)
    assert len(stub.compiled) == 1 and stub.compiled[0][1].runs == []
    grid, compiled = stub.compiled[0]
    out = public.flash_attention(q, k, v, bias, causal=True, softcap=2.0)
    assert len(stub.compiled) == 1, "the repeat call went through the JIT again"
    ((run_grid, stream, args),) = compiled.runs
    assert run_grid == tuple(grid) and stream == _stream()
    want = _pointers(compiled.bound_args)
    # the tensor slots: this call's q, k, v, bias and its own fresh out / lse (not the first call's)
    names = stub.arg_names
    for name, got_ptr in zip(names, args):
        if name in ("Out", "Lse"):
            continue
        assert got_ptr == want[names.index(name)], name
    assert args[names.index("Out")] == out.data_ptr() != first.data_ptr()
    assert out.shape == first.shape and out.stride() == first.stride()


@pytest.mark.parametrize("change", ["misaligned q", "odd stride", "shape", "dtype", "scalar", "bias dtype"])
def test_what_changes_triton_specialization_gets_its_own_entry(stub, change):
    q, k, v = _qkv()
    public.flash_attention(q, k, v, causal=True)
    public.flash_attention(q, k, v, causal=True)
    assert len(stub.compiled) == 1 and len(stub.compiled[0][1].runs) == 1
    bias = None
    if change == "misaligned q":    # 4 bytes past a 16-byte boundary: Triton drops the pointer's divisibility
        storage = torch.randn(q.numel() + 1)
        q = storage[1:].view(q.shape)
        assert q.data_ptr() % 16 != 0
    elif change == "odd stride":    # same shape, a transposed (BSHD) layout
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    elif change == "shape":
        q, k, v = _qkv(tq=7)
    elif change == "dtype":
        q, k, v = (t.half() for t in (q, k, v))
    elif change == "bias dtype":
        bias = torch.zeros(9, 11, dtype=torch.bool)
    public.flash_attention(q, k, v, bias, causal=change != "scalar")
    assert len(stub.compiled) == 2, f"{change}: launched a kernel specialized for another signature"


def test_output_follows_q_layout_and_bshd_consumers_need_no_copy(stub):
    b, t, h, d = 2, 9, 4, 16
    q = torch.randn(b, t, h, d).transpose(1, 2)
    k = torch.randn(b, t, 2, d).transpose(1, 2)
    v = torch.randn(b, t, 2, d).transpose(1, 2)
    for _ in range(2):   # the JIT path, then the cached one
        out = public.flash_attention(q, k, v, causal=True)
        assert out.stride() == q.stride()
        merged = out.transpose(1, 2).reshape(b, t, h * d)
        assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # a view, no copy


def test_no_fast_path_while_a_launch_hook_is_set(stub, monkeypatch):
    monkeypatch.setattr(fastpath, "hooks_active", lambda: True)
    q, k, v = _qkv()
    for _ in range(2):
        public.flash_attention(q, k, v)
    assert len(stub.compiled) == 2 and all(c.runs == [] for _, c in stub.compiled)


def test_pointer_rule_is_read_from_the_installed_triton():
    # a Triton whose native_specialize_impl keys pointers differently turns the path off (checked, not assumed)
    # triton 3.6 (the H200's) and 3.9 (this venv's) both specialize pointers on 16-byte alignment only
    assert fastpath._check_pointer_rule() is True



@pytest.fixture
def paged_stub(monkeypatch):
    from attnlower.lowering import launch_paged

    jits = {name: _StubJIT(getattr(launch_paged, name)) for name in ("_paged_attn_kernel", "_paged_reduce_kernel")}
    for name, jit in jits.items():
        monkeypatch.setattr(launch_paged, name, jit)
    _path_on_the_test_device(monkeypatch)
    yield jits
    fastpath.clear()


@pytest.fixture
def choose_reduce(monkeypatch):
    """Sets the plan's default way to combine split partials (configs.PAGED_REDUCE) for the public op's calls."""
    from attnlower.lowering import plan

    def choose(reduce):
        monkeypatch.setattr(plan, "PAGED_REDUCE", reduce)
        plan.paged_plan.cache_clear()
    yield choose
    plan.paged_plan.cache_clear()   # before monkeypatch restores the default: no plan made with the test's


def _split_call():
    k_cache = torch.randn(80, 1, 8, 16)
    table = torch.arange(80, dtype=torch.int32).view(1, 80)   # 640 keys wide, one program: the plan splits KV
    lens = torch.tensor([150], dtype=torch.int32)
    q = torch.randn(1, 4, 1, 16)
    return q, k_cache, table, lens


def test_paged_repeat_call_reuses_the_split_launches_and_fresh_workspaces(paged_stub, choose_reduce):
    from attnlower.lowering import errors

    choose_reduce("separate")
    q, k_cache, table, lens = _split_call()
    first = public.paged_attention(q, k_cache, k_cache, table, lens)
    attn, reduce = paged_stub["_paged_attn_kernel"], paged_stub["_paged_reduce_kernel"]
    assert len(attn.compiled) == 1 and len(reduce.compiled) == 1, "expected a split-KV launch pair"
    out = public.paged_attention(q, k_cache, k_cache, table, lens)
    assert len(attn.compiled) == 1 and len(reduce.compiled) == 1, "the repeat call went through the JIT again"
    ((_, _, attn_args),), ((_, _, reduce_args),) = attn.compiled[0][1].runs, reduce.compiled[0][1].runs
    names = attn.arg_names
    assert attn_args[names.index("q_ptr")] == q.data_ptr()
    assert attn_args[names.index("out_ptr")] == out.data_ptr() != first.data_ptr()
    assert attn_args[names.index("err_ptr")] == errors.device_flags(q.device).flags.data_ptr()
    # the reduce reads the workspace this call's attention kernel wrote (a fresh one, the same across both)
    assert attn_args[names.index("ws_ptr")] == reduce_args[reduce.arg_names.index("ws_ptr")] != 0
    assert reduce_args[reduce.arg_names.index("out_ptr")] == out.data_ptr()
    want = _pointers(attn.compiled[0][1].bound_args)
    for name, got in zip(names, attn_args):
        if not name.endswith("_ptr"):
            assert got == want[names.index(name)], name
    # another checks mode is another kernel (CHECK_BOUNDS) and another host side
    errors.set_paged_checks(False)
    try:
        public.paged_attention(q, k_cache, k_cache, table, lens)
    finally:
        errors.set_paged_checks(True)
    assert len(attn.compiled) == 2


def test_paged_cached_fused_call_is_one_launch_and_replays_right(paged_stub, choose_reduce, monkeypatch):
    """A repeat of a fused split call (the plan's default): one cached launch with the device's split counters
    baked in by address (they are persistent: fastpath.persistent), fresh workspaces and out; replayed through the
    interpreter with exactly the arguments the cached path passed, it writes the right output, twice in a row (the
    counters come back to zero)."""
    from attnlower.lowering import errors, launch_paged

    choose_reduce("fused")
    allocated = []
    real_alloc = fastpath.alloc

    def alloc(*args):   # the cached path's fresh tensors, to map its pointers back to tensors for the replay
        allocated.append(real_alloc(*args))
        return allocated[-1]

    monkeypatch.setattr(fastpath, "alloc", alloc)
    q, k_cache, table, lens = _split_call()
    first = public.paged_attention(q, k_cache, k_cache, table, lens)
    attn, reduce = paged_stub["_paged_attn_kernel"], paged_stub["_paged_reduce_kernel"]
    assert len(attn.compiled) == 1 and reduce.compiled == [], "expected one fused split launch"
    grid, compiled = attn.compiled[0]
    names = attn.arg_names
    bound = dict(zip(names, compiled.bound_args))
    assert bound["FUSED_REDUCE"] is True and grid[2] > 1
    counters = launch_paged.split_counters(q.device)
    assert bound["counters_ptr"] is counters and not counters.any()
    for replay in range(2):
        allocated.clear()
        out = public.paged_attention(q, k_cache, k_cache, table, lens)
        assert len(attn.compiled) == 1 and reduce.compiled == [], "the repeat call went through the JIT again"
        run_grid, _, args = compiled.runs[-1]
        assert args[names.index("counters_ptr")] == counters.data_ptr()
        assert args[names.index("out_ptr")] == out.data_ptr() != first.data_ptr()
        by_pointer = {t.data_ptr(): t for t in (q, k_cache, table, lens, counters, *allocated,
                                                 errors.device_flags(q.device).flags)}
        tensors = [by_pointer[a] if name.endswith("_ptr") and a else a for name, a in zip(names, args)]
        assert [name for name, a in zip(names, tensors) if name.endswith("_ptr") and isinstance(a, int) and a] == []
        out.fill_(float("nan"))
        attn.fn[run_grid](*tensors)
        # bit for bit in the interpreter; on a GPU the JIT's own compile of the kernel may contract its fp32 sums
        # differently from the cached launch's (6e-8 apart on the H200, 2026-12-04)
        exact = out.device.type == "cpu"
        torch.testing.assert_close(out, first, atol=0 if exact else 1e-6, rtol=0 if exact else 1e-5)
        assert not counters.any(), f"replay {replay}: the last split left its counter set"


def test_paged_empty_rows_nan_is_part_of_the_key(paged_stub):
    """None (short sequences an error), False and True are three kernels (SHORT_SEQUENCES, EMPTY_ROWS_NAN); a
    repeat call of each reuses its own launch."""
    k_cache = torch.randn(6, 2, 4, 16)
    table = torch.arange(6, dtype=torch.int32).view(2, 3)
    lens = torch.tensor([2, 9], dtype=torch.int32)     # Tq = 4: sequence 0 is shorter than the chunk
    q = torch.randn(2, 4, 4, 16)
    attn = paged_stub["_paged_attn_kernel"]
    outs = {}
    for option in (False, True, False, True):
        outs[option] = public.paged_attention(q, k_cache, k_cache, table, lens, empty_rows_nan=option)
    assert len(attn.compiled) == 2 and all(len(c.runs) == 1 for _, c in attn.compiled)
    constexprs = [dict(zip(attn.arg_names, c.bound_args)) for _, c in attn.compiled]
    assert [(c["SHORT_SEQUENCES"], c["EMPTY_ROWS_NAN"]) for c in constexprs] == [(True, False), (True, True)]
    lens_ok = torch.tensor([4, 9], dtype=torch.int32)
    public.paged_attention(q, k_cache, k_cache, table, lens_ok)
    assert len(attn.compiled) == 3 and dict(zip(attn.arg_names, attn.compiled[2][1].bound_args))[
        "SHORT_SEQUENCES"] is False


def _backward_stubs(monkeypatch) -> tuple[tuple, dict]:
    """The three backward kernels behind stub JITs, the fast path on the test device: (names, {name: stub})."""
    from attnlower.lowering.kernels import flash_bwd

    names = ("_flash_bwd_preprocess_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel")
    jits = {name: _StubJIT(getattr(flash_bwd, name)) for name in names}
    real_kernel = launch.kernel
    monkeypatch.setattr(launch, "kernel", lambda module, name: jits.get(name) or real_kernel(module, name))
    _path_on_the_test_device(monkeypatch)
    return names, jits


def test_backward_repeat_call_reuses_its_three_launches(monkeypatch):
    names, jits = _backward_stubs(monkeypatch)
    q, k, v = _qkv()
    bias = torch.randn(1, 4, 9, 11)
    out, lse, rng = torch.ops.attnlower.flash_attention(q, k, v, bias, causal=True)

    def backward(bias_grad):
        return torch.ops.attnlower.flash_attention_backward(torch.ones_like(out), q, k, v, bias, None, out, lse, rng,
                                                            None, True, False, 0.0, 0.0, 0, False, bias_grad)

    first = backward(False)
    again = backward(False)
    assert all(len(jit.compiled) == 1 for jit in jits.values()), "the repeat backward went through the JIT again"
    pre, dkdv, dq = (jits[n].compiled[0][1].runs[0][2] for n in names)
    delta = pre[jits[names[0]].arg_names.index("Delta")]
    # the preprocess writes delta into a fresh buffer that both gradient kernels then read
    assert delta == dkdv[jits[names[1]].arg_names.index("Delta")] == dq[jits[names[2]].arg_names.index("Delta")]
    assert dq[jits[names[2]].arg_names.index("DQ")] == again[0].data_ptr() != first[0].data_ptr()
    assert again[3].numel() == 0 and again[0].stride() == q.stride()
    backward(True)   # a bias gradient: its zero-filled dS buffer is the launcher's, never cached
    backward(True)
    assert all(len(jit.compiled) == 3 for jit in jits.values())
    fastpath.clear()


def test_backward_with_trained_sinks_is_cached_and_sums_the_rows_each_call(monkeypatch):
    """GPT-OSS trains its sinks: that backward was never cached (the sinks' gradient is a sum after the kernels), and
    the uncached launcher path cost ~1 ms of host time per call on the H200 (bench/modern.py, sinks window 128:
    1.36 ms timed for 0.37 ms of kernels, 2026-12-04). Now the dQ kernel's per-row terms are a 4th cached output,
    summed after the cached launches as the launcher sums them."""
    from attnlower.lowering import reference
    names, jits = _backward_stubs(monkeypatch)
    q, k, v = _qkv()
    sinks = torch.randn(q.shape[1])
    out, lse, rng = torch.ops.attnlower.flash_attention(q, k, v, causal=True, sinks=sinks)
    grad_out = torch.randn_like(out)

    def backward():
        return torch.ops.attnlower.flash_attention_backward(grad_out, q, k, v, None, None, out, lse, rng, None, True,
                                                            False, 0.0, 0.0, 0, False, False, sinks, None, True)

    first = backward()
    want = reference.reference_flash_backward(grad_out, q, k, v, out, lse, AttentionParams(q.shape[-1] ** -0.5, True),
                                              sinks=sinks, sinks_requires_grad=True)
    torch.testing.assert_close(first[4], want[4], atol=1e-5, rtol=1e-5)    # the first call: the launcher's sum
    again = backward()
    assert all(len(jit.compiled) == 1 for jit in jits.values()), "the repeat backward went through the JIT again"
    dq_names = jits[names[2]].arg_names
    (_, compiled), = jits[names[2]].compiled
    rows_ptr = compiled.runs[0][2][dq_names.index("DSinks")]
    first_rows = compiled.bound_args[dq_names.index("DSinks")]
    assert first_rows.shape == (q.shape[0], q.shape[1], q.shape[2]) and first_rows.dtype == torch.float32
    assert rows_ptr != first_rows.data_ptr()            # a fresh rows buffer for the cached call, written by its dQ
    assert again[4].shape == sinks.shape and again[4].dtype == sinks.dtype
    fastpath.clear()


def test_launch_options_are_not_kernel_arguments(monkeypatch):
    """A launch with `launch_pdl` (the paged reduce by programmatic dependent launch) is cached like any other: the
    option is the compiled kernel's (its launcher holds it), not an argument to bind."""
    import types

    _path_on_the_test_device(monkeypatch)
    fn = types.SimpleNamespace(arg_names=["x_ptr", "n", "BLOCK"])
    x = torch.empty(4)
    compiled = _StubCompiled([x, 4, 16])
    kwargs = {"BLOCK": 16, "num_warps": 4, "num_stages": 1, "launch_pdl": True}
    call = fastpath.CachedCall.build([(fn, (2,), (x, 4), kwargs, compiled)], (x,), ())
    assert call is not None, "a launch option made the launch uncacheable"
    assert call([x.data_ptr()], x.device) == []
    assert compiled.runs == [((2, 1, 1), 0, (x.data_ptr(), 4, 16))]


def test_the_cache_is_bounded_and_keeps_the_newest(stub, monkeypatch):
    monkeypatch.setattr(fastpath, "CACHE_SIZE", 2)
    shapes = [_qkv(tq=t) for t in (5, 6, 7)]
    for q, k, v in shapes:
        public.flash_attention(q, k, v)
    assert len(fastpath._CALLS) == 2
    public.flash_attention(*shapes[-1])          # the newest is still cached: no new JIT launch
    assert len(stub.compiled) == 3
    public.flash_attention(*shapes[0])           # the oldest was evicted: through the JIT again
    assert len(stub.compiled) == 4
