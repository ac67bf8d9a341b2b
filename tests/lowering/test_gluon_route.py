"""Routing the dense forward to the Gluon Hopper kernel (plan.choose_forward_kernel, launch.flash_forward).

  - CPU: the decision over a grid (head dims 64 / 128 / 80, dtypes, each optional feature, causal -> config,
    sm_80 vs sm_90, Triton versions, ATTNLOWER_GLUON=0, tracing, lengths); the names kernel_plan and the
    report's seam give; that the eager launcher on CPU never takes Gluon; and the launcher's wiring with a
    pretend sm_90 target and a stand-in Gluon forward (out in q's layout, the layout fallback, a refusal
    logged and answered by the Triton kernel, the call left uncached, the backward on the routed out / lse).
  - GPU (`ATTNLOWER_TEST_DEVICE=cuda pytest -m "gpu or not gpu" tests/lowering/test_gluon_route.py`, an H100 /
    H200 with triton 3.6): routed D=128 calls (causal and not, GQA, a BSHD view) against the float64 oracle,
    forward and backward, with a check that the Gluon kernel is what ran.
"""
from __future__ import annotations

import logging

import pytest
import torch

from attention_oracle import oracle
from attnlower.lowering import fastpath, launch, launch_gluon
from attnlower.lowering import plan as planning
from attnlower.lowering.params import AttentionParams
from attnlower.lowering.plan import Meta, Target, choose_forward_kernel

H200 = Target("cuda", 90, 132, False, 232448, "NVIDIA H200", "3.6.0")
A100 = Target("cuda", 80, 108, False, 166912, "NVIDIA A100", "3.6.0")
LONG = 4096


@pytest.fixture(autouse=True)
def _fresh_decisions():
    choose_forward_kernel.cache_clear()   # tests change module constants the cached decision reads
    yield
    choose_forward_kernel.cache_clear()


def choose(d=128, dv=None, dtype=torch.bfloat16, causal=False, tq=LONG, tk=LONG, target=H200, hq=16, hkv=16,
           bias=None, alibi=False, sinks=False, docs=False, verified=False, enabled=True, tracing=False, **params):
    q = Meta((2, hq, tq, d), dtype)
    k = Meta((2, hkv, tk, d), dtype)
    v = Meta((2, hkv, tk, d if dv is None else dv), dtype)
    return choose_forward_kernel(AttentionParams(d ** -0.5, causal=causal, **params), q, k, v, bias, alibi, target,
                                 sinks, docs, verified, enabled, tracing)


# ----------------------------------------------------------------------------------------- the decision


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 80])
def test_head_dim_dtype_and_causal_choose_kernel_and_config(d, dtype, causal):
    choice = choose(d=d, dtype=dtype, causal=causal)
    if d == 128 and dtype != torch.float32:
        # measured (bench/RESULTS.md, 2026-12-03 evening): ping-pong non-causal, no ping-pong causal
        assert choice.kernel == planning.GLUON_FORWARD
        assert choice.gluon == launch_gluon.GluonFwdConfig(block_n=128, num_stages=2, pingpong=not causal)
    else:
        assert choice.gluon is None and choice.kernel == planning.TRITON_FORWARD
        assert ("fp16 / bf16" in choice.reason) if dtype == torch.float32 else ("D = Dv = 128" in choice.reason)


# feature -> (choose()'s arguments, the words the reason names it by)
FEATURES = {"bool bias": (dict(bias=Meta((1,), torch.bool)), "a bias"),
            "float bias": (dict(bias=Meta((1,), torch.bfloat16)), "a bias"),
            "alibi": (dict(alibi=True), "ALiBi"), "softcap": (dict(softcap=30.0), "soft-capping"),
            "dropout": (dict(dropout_p=0.1), "dropout"), "window": (dict(window=128, causal=True), "a window"),
            "sinks": (dict(sinks=True), "sinks"), "doc_ids": (dict(docs=True), "doc_ids"),
            "fill": (dict(mask_fill=-1e4), "a fill"), "verified": (dict(verified=True), "a verified flag")}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_optional_feature_keeps_triton_and_is_named(feature):
    kwargs, words = FEATURES[feature]
    choice = choose(**kwargs)
    assert choice.gluon is None and f"takes no {words}" in choice.reason


@pytest.mark.parametrize("target, words", [
    (A100, "sm_90 GPU, this target is sm_80"),
    # an AMD gfx90a reads as capability 9.0 through torch.cuda: arch 90, yet no Hopper
    (Target("cuda", 90, 104, False, 65536, "AMD Instinct MI210", "3.6.0", rocm=True), "this target is an AMD GPU"),
    (Target("interpret", 0, 4, False, 0, "interpret"), "this target is interpret"),
    (Target("cpu"), "this target is cpu"),
    (H200._replace(triton="3.9.0"), "triton 3.6.x, installed: triton 3.9.0"),
    (H200._replace(triton="3.7.0"), "installed: triton 3.7.0"),
    (H200._replace(triton="3.60.0"), "installed: triton 3.60.0"),
    (H200._replace(triton=""), "installed: triton (unknown)"),
])
def test_other_targets_and_triton_versions_keep_triton(target, words):
    choice = choose(target=target)
    assert choice.gluon is None and words in choice.reason


def test_any_triton_3_6_patch_release_routes():
    assert choose(target=H200._replace(triton="3.6.1")).gluon is not None


def test_switch_off_and_tracing_keep_triton():
    assert choose(enabled=False).reason == "ATTNLOWER_GLUON=0"
    assert "wrap_triton" in choose(tracing=True).reason and choose(tracing=True).gluon is None


def test_environment_switch(monkeypatch):
    monkeypatch.setenv("ATTNLOWER_GLUON", "0")
    assert planning._gluon_from_env() is False
    monkeypatch.setenv("ATTNLOWER_GLUON", "1")
    assert planning._gluon_from_env() is True
    monkeypatch.delenv("ATTNLOWER_GLUON")
    assert planning._gluon_from_env() is True
    monkeypatch.setenv("ATTNLOWER_GLUON", "yes")
    with pytest.raises(ValueError, match="ATTNLOWER_GLUON: expected 1 .* or 0"):
        planning._gluon_from_env()


def test_lengths_value_dim_gqa_alignment_and_empty_rows():
    assert "Tq, Tk >= 1024" in choose(tq=1023).reason and "Tq, Tk >= 1024" in choose(tk=1, tq=LONG).reason
    assert choose(tq=1024, tk=1024).gluon is not None        # the shortest length measured
    assert choose(tq=1, tk=LONG).gluon is None                # a decode step: unmeasured, Triton's 16-row tiles
    assert "Dv = 64" in choose(dv=64).reason
    assert choose(hq=16, hkv=4).gluon is not None             # GQA
    assert choose(hq=16, hkv=1, causal=True, bottom_right=True, tq=2048, tk=LONG).gluon is not None
    assert choose(empty_rows_nan=True).gluon is not None


# ----------------------------------------------------------------------------------------- what the dump shows


def test_kernel_plan_names_the_kernel_an_eager_call_launches():
    def plan(causal=False, head_dim=128, target=H200, **kw):
        return planning.kernel_plan("flash_attention", AttentionParams(head_dim ** -0.5, causal=causal), batch=2,
                                    q_heads=16, kv_heads=4, tq=LONG, tk=LONG, head_dim=head_dim,
                                    dtype=torch.bfloat16, target=target, **kw)

    for causal in (False, True):
        shown = plan(causal)
        (gluon,) = shown["launches"]
        assert shown["kernels"] == [planning.GLUON_FORWARD] and gluon["kernel"] == planning.GLUON_FORWARD
        assert gluon["constexprs"]["PINGPONG"] is (not causal) and gluon["constexprs"]["IS_CAUSAL"] is causal
        assert gluon["grid"] == [132] and (gluon["block_m"], gluon["block_n"]) == (128, 128)
        # truthful about what the plan cannot know: the layout is checked at run time, and what runs otherwise
        assert "TMA-readable" in shown["note"] and "else _flash_fwd_kernel with BLOCK_M=" in shown["note"]
    for shown in (plan(traced=True), plan(head_dim=64), plan(target=A100), plan(bias="bool"),
                  plan(direction="backward")):
        assert planning.GLUON_FORWARD not in shown["kernels"]
        assert all(launch["kernel"] != planning.GLUON_FORWARD for launch in shown["launches"])
    assert plan(traced=True)["kernels"] == ["_flash_fwd_kernel"]


def test_kernel_plan_follows_the_switch(monkeypatch):
    monkeypatch.setattr(planning, "GLUON_ENABLED", False)
    shown = planning.kernel_plan("flash_attention", AttentionParams(0.1), batch=1, q_heads=8, kv_heads=8, tq=LONG,
                                 tk=LONG, head_dim=128, dtype=torch.float16, target=H200)
    assert shown["kernels"] == ["_flash_fwd_kernel"]


def test_the_report_seam_names_the_gluon_forward_and_the_compiled_graphs_triton():
    from attnlower.passes.site import AttentionSpec
    from attnlower.target import inductor_launches_kernels, kernel_plan

    spec = AttentionSpec(op="flash_attention", q_heads=16, kv_heads=4, head_dim=128, dtype="bfloat16", causal=True,
                         window=0, bias_kind="none", scale=128 ** -0.5)
    eager = kernel_plan(spec, H200, q_len=LONG, k_len=LONG)
    assert eager["runs"].startswith("gluon forward") and eager["kernels"][0] == planning.GLUON_FORWARD
    assert eager["kernels"][1:] == ["_flash_bwd_preprocess_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel"]
    assert eager["constexprs"]["PINGPONG"] is False and "TMA-readable" in eager["note"]
    compiled = kernel_plan(spec, H200, q_len=LONG, k_len=LONG, traced=True)
    assert compiled["runs"] == "triton" and compiled["kernels"][0] == "_flash_fwd_kernel"
    assert kernel_plan(spec, H200, q_len=512, k_len=512)["runs"] == "triton"    # shorter than measured
    assert inductor_launches_kernels(H200, "inductor") is True    # the default: ATTNLOWER_INDUCTOR_KERNELS=1
    assert inductor_launches_kernels(H200, "eager") is False
    assert inductor_launches_kernels(Target("cpu"), "inductor") is False


# ----------------------------------------------------------------------------------------- the eager launcher


def _qkv(tq=32, tk=32, d=128, hq=4, hkv=2, dtype=torch.float16, layout="bhsd"):
    def one(heads, length):
        if layout == "bshd":
            return torch.randn(1, length, heads, d, dtype=dtype).transpose(1, 2)
        return torch.randn(1, heads, length, d, dtype=dtype)
    return one(hq, tq), one(hkv, tk), one(hkv, tk)


@pytest.fixture
def short_routes(monkeypatch):
    """Small shapes qualify for Gluon (the interpreter cannot run 1024-long calls in a test's time)."""
    monkeypatch.setattr(planning, "GLUON_MIN_LENGTH", 16)
    monkeypatch.setattr(planning, "GLUON_ENABLED", True)


class StandInGluon:
    """Stands for launch_gluon.gluon_flash_forward: records each call, fills out and lse from the reference."""

    def __init__(self, refuse: str | None = None):
        self.calls, self.refuse = [], refuse

    def __call__(self, q, k, v, params, *, config=None, out=None, **_):
        self.calls.append(dict(config=config, out_stride=out.stride(), q_stride=q.stride()))
        if self.refuse:
            raise NotImplementedError(self.refuse)
        from attnlower.lowering.reference import reference_flash_forward

        ref_out, ref_lse = reference_flash_forward(q, k, v, params)
        out.copy_(ref_out)
        return out, ref_lse.float().contiguous()


@pytest.mark.skipif(torch.empty(0).is_cuda, reason="the CPU half of the routing; the GPU tests are below")
def test_the_eager_launcher_on_cpu_never_takes_gluon(short_routes, monkeypatch):
    stand_in = StandInGluon()
    monkeypatch.setattr(launch_gluon, "gluon_flash_forward", stand_in)
    q, k, v = _qkv()
    params = AttentionParams(128 ** -0.5, causal=True)
    out, _ = launch.flash_forward(q, k, v, params)
    ref, _ = oracle(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=5e-3, rtol=1e-2)
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    import attnlower.ops as public

    public.flash_attention(q, k, v, causal=True)
    assert stand_in.calls == []


@pytest.fixture
def pretend_h200(short_routes, monkeypatch):
    """The launcher plans for an H200 with triton 3.6 (CPU tensors; the Triton fallback runs interpreted)."""
    real = planning.target_of
    monkeypatch.setattr(planning, "target_of", lambda device: H200 if device.type == "cpu" else real(device))
    planning.dense_plan.cache_clear()
    yield
    planning.dense_plan.cache_clear()


@pytest.mark.skipif(torch.empty(0).is_cuda, reason="a pretend sm_90 target over CPU tensors")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_a_routed_call_takes_gluon_with_out_in_q_layout(pretend_h200, monkeypatch, causal, layout):
    stand_in = StandInGluon()
    monkeypatch.setattr(launch_gluon, "gluon_flash_forward", stand_in)
    q, k, v = _qkv(layout=layout)
    records: list = []
    with fastpath.recording(records):
        out, lse = launch.flash_forward(q, k, v, AttentionParams(128 ** -0.5, causal=causal))
    (call,) = stand_in.calls
    assert call["config"].pingpong is (not causal)
    assert out.stride() == q.stride() and call["out_stride"] == q.stride()   # q's layout, as the Triton kernel's
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3] and lse.is_contiguous()
    ref, ref_lse = oracle(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), ref, atol=5e-3, rtol=1e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    # the Gluon launch is never replayed by the cached path (its descriptors hold this call's addresses)
    assert records and records[0][0] == "uncacheable"
    assert fastpath.CachedCall.build(records, (q, k, v), (out, lse)) is None


@pytest.mark.skipif(torch.empty(0).is_cuda, reason="a pretend sm_90 target over CPU tensors")
def test_a_layout_tma_cannot_read_and_a_config_override_take_triton(pretend_h200, monkeypatch):
    stand_in = StandInGluon()
    monkeypatch.setattr(launch_gluon, "gluon_flash_forward", stand_in)
    q, k, v = _qkv()
    k_strided = torch.randn(1, 2, 128, 32, dtype=torch.float16).transpose(2, 3)   # last dim not contiguous
    out, _ = launch.flash_forward(q, k_strided, v, AttentionParams(128 ** -0.5))
    torch.testing.assert_close(out.double(), oracle(q, k_strided, v)[0], atol=5e-3, rtol=1e-2)
    from attnlower.lowering.configs import KernelConfig

    launch.flash_forward(q, k, v, AttentionParams(128 ** -0.5), config=KernelConfig(16, 16, 1, 1))
    assert stand_in.calls == []


@pytest.mark.skipif(torch.empty(0).is_cuda, reason="a pretend sm_90 target over CPU tensors")
def test_a_refusal_after_routing_is_logged_and_triton_runs(pretend_h200, monkeypatch, caplog):
    stand_in = StandInGluon(refuse="gluon_flash_forward: triton 3.6.0 has no usable Gluon (test)")
    monkeypatch.setattr(launch_gluon, "gluon_flash_forward", stand_in)
    monkeypatch.setattr(launch, "_warned", set())
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="attnlower.lowering.launch"):
        out, _ = launch.flash_forward(q, k, v, AttentionParams(128 ** -0.5, causal=True))
        launch.flash_forward(q, k, v, AttentionParams(128 ** -0.5, causal=True))
    assert len(stand_in.calls) == 2
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1   # once
    assert "no usable Gluon (test)" in caplog.records[0].message and "ATTNLOWER_GLUON=0" in caplog.records[0].message
    torch.testing.assert_close(out.double(), oracle(q, k, v, causal=True)[0], atol=5e-3, rtol=1e-2)


@pytest.mark.skipif(torch.empty(0).is_cuda, reason="a pretend sm_90 target over CPU tensors")
def test_the_switch_and_tracing_reach_the_launcher(pretend_h200, monkeypatch):
    stand_in = StandInGluon()
    monkeypatch.setattr(launch_gluon, "gluon_flash_forward", stand_in)
    seen = []
    real = planning.choose_forward_kernel

    def spy(*args):
        seen.append(args[-2:])   # (enabled, tracing)
        return real(*args)

    monkeypatch.setattr(planning, "choose_forward_kernel", spy)
    monkeypatch.setattr(planning, "GLUON_ENABLED", False)
    q, k, v = _qkv()
    launch.flash_forward(q, k, v, AttentionParams(128 ** -0.5))
    monkeypatch.setattr(planning, "GLUON_ENABLED", True)
    monkeypatch.setattr(launch, "tracing", lambda: True)
    launch.flash_forward(q, k, v, AttentionParams(128 ** -0.5))
    assert seen == [(False, False), (True, True)] and stand_in.calls == []


@pytest.mark.skipif(torch.empty(0).is_cuda, reason="a pretend sm_90 target over CPU tensors")
def test_the_backward_reads_the_routed_forwards_out_and_lse(pretend_h200, monkeypatch):
    """Through the op and its autograd: the forward routed (stand-in), the backward the Triton kernels."""
    stand_in = StandInGluon()
    monkeypatch.setattr(launch_gluon, "gluon_flash_forward", stand_in)
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    import attnlower.ops as public

    q, k, v = (t.requires_grad_() for t in _qkv(layout="bshd"))
    out = public.flash_attention(q, k, v, causal=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert len(stand_in.calls) == 1
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = oracle(qd, kd, vd, causal=True)
    ref.backward(grad.double())
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------- GPU


def _needs_routing_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    target = planning.target_of(torch.device("cuda"))
    if target.arch != planning.GLUON_ARCH or not target.triton.startswith(planning.GLUON_TRITON + "."):
        pytest.skip(f"routing to Gluon needs sm_90 and triton {planning.GLUON_TRITON}.x, got {target.describe()} "
                    f"with triton {target.triton}")
    if not planning.GLUON_ENABLED:
        pytest.skip("ATTNLOWER_GLUON=0")


@pytest.mark.gpu
@pytest.mark.parametrize("causal, bottom_right", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gpu_routed_d128_matches_the_oracle_forward_and_backward(monkeypatch, causal, bottom_right, layout):
    _needs_routing_gpu()
    import attnlower.ops as public

    ran = []
    real = launch_gluon.gluon_flash_forward

    def counting(*args, **kwargs):
        ran.append(kwargs.get("config"))
        return real(*args, **kwargs)

    monkeypatch.setattr(launch_gluon, "gluon_flash_forward", counting)
    batch, hq, hkv, tq, tk, d = 2, 4, 2, 1100, 1300 if bottom_right else 1100, 128   # GQA, odd lengths

    def one(heads, length):
        if layout == "bshd":
            return torch.randn(batch, length, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16)

    q, k, v = (t.requires_grad_() for t in (one(hq, tq), one(hkv, tk), one(hkv, tk)))
    out = public.flash_attention(q, k, v, causal=causal, bottom_right=bottom_right)
    assert len(ran) == 1 and ran[0].pingpong is (not causal), "the routed call did not take the Gluon kernel"
    assert out.stride() == q.stride()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = oracle(qd, kd, vd, causal=causal, bottom_right=bottom_right)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)   # bf16 forward, as test_flash_kernel.py
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=8e-2, rtol=5e-2)   # bf16 backward, same table
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 2e-2, f"||grad - ref|| / ||ref|| = {rel:.2e}"


@pytest.mark.gpu
def test_gpu_d64_and_a_bias_stay_on_triton(monkeypatch):
    _needs_routing_gpu()
    import attnlower.ops as public

    def must_not_run(*args, **kwargs):
        raise AssertionError("routed to Gluon")

    monkeypatch.setattr(launch_gluon, "gluon_flash_forward", must_not_run)
    q = torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16)
    public.flash_attention(q, q, q, causal=True)
    q = torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16)
    public.flash_attention(q, q, q, torch.zeros(1024, 1024, device="cuda", dtype=torch.bfloat16))
