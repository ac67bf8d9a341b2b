"""The warp-specialized Hopper forward in Gluon (kernels/gluon_fwd.py) through its launcher
(lowering/launch_gluon.py).

  - CPU: the launcher's refusals (NotImplementedError naming the feature, so callers fall back) and
    its TMA layout checks; and the kernel compiled for sm_90 by Triton 3.6 without a GPU (a subprocess
    running this file as a script: `TRITON_INTERPRET=0 python tests/lowering/test_gluon_fwd.py
    --compile-sm90`), skipped with the reason when the installed Triton is not 3.6 or has no Gluon.
  - GPU (`ATTNLOWER_TEST_DEVICE=cuda pytest -m gpu tests/lowering/test_gluon_fwd.py`, an H100 / H200):
    each case against the float64 oracle (tests/lowering/attention_oracle.py) on fresh random inputs,
    with the launcher's outputs poisoned (NaN) so an element the kernel never writes fails.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_oracle import oracle  # noqa: E402
from attnlower.lowering import launch_gluon  # noqa: E402
from attnlower.lowering.launch_gluon import GluonFwdConfig, gluon_flash_forward, plan_gluon_forward  # noqa: E402
from attnlower.lowering.params import AttentionParams  # noqa: E402

# forward (atol, rtol) per dtype: the ones tests/lowering/test_flash_kernel.py holds the Triton kernel to
TOLERANCES = {torch.float16: (5e-3, 1e-2), torch.bfloat16: (2e-2, 2e-2)}
# ||out - ref|| / ||ref||: 16-bit operands land between 1e-3 and 1e-2 (METHOD.md)
REL_NORM = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _gluon_unavailable_reason() -> str | None:
    """Why the Gluon kernel cannot be compiled here (None when it can): it is written for Triton 3.6."""
    try:
        import triton
    except ImportError as error:
        return f"triton is not installed ({error})"
    if not triton.__version__.startswith(launch_gluon.SUPPORTED_TRITON + "."):
        return (f"the Gluon kernel is written for triton {launch_gluon.SUPPORTED_TRITON}.x (Gluon's API changes "
                f"between releases), installed: triton {triton.__version__}")
    if importlib.util.find_spec("triton.experimental.gluon") is None:
        return f"triton {triton.__version__} ships no triton.experimental.gluon"
    return None


# ----------------------------------------------------------------------------------------- CPU: refusals


def _cpu_qkv(tq=64, tk=64, d=64, dtype=torch.bfloat16, hq=2, hkv=2):
    # on CPU whatever the default device (ATTNLOWER_TEST_DEVICE=cuda sets it to the GPU)
    return (torch.randn(1, hq, tq, d, dtype=dtype, device="cpu"), torch.randn(1, hkv, tk, d, dtype=dtype, device="cpu"),
            torch.randn(1, hkv, tk, d, dtype=dtype, device="cpu"))


@pytest.mark.parametrize("kind", ["bias", "alibi", "softcap", "dropout", "window", "head_dim", "fp32"])
def test_unsupported_features_raise_not_implemented(kind):
    q, k, v = _cpu_qkv()
    params = AttentionParams(0.125)
    extra = {}
    if kind == "bias":
        extra["bias"] = torch.zeros(64, 64)
    elif kind == "alibi":
        extra["alibi_slopes"] = torch.ones(2)
    elif kind == "softcap":
        params = params._replace(softcap=30.0)
    elif kind == "dropout":
        params = params._replace(dropout_p=0.1)
    elif kind == "window":
        params = params._replace(causal=True, window=16)
    elif kind == "head_dim":
        q, k, v = _cpu_qkv(d=80)
    else:
        q, k, v = _cpu_qkv(dtype=torch.float32)
    words = {"bias": "bias", "alibi": "ALiBi", "softcap": "soft-cap", "dropout": "dropout", "window": "window",
             "head_dim": "head dims", "fp32": "fp16 or bf16"}[kind]
    with pytest.raises(NotImplementedError, match=words) as info:
        plan_gluon_forward(q, k, v, params, **extra)
    assert "launch.flash_forward" in str(info.value)  # says where to fall back


def test_cpu_tensors_are_refused_by_the_launcher():
    q, k, v = _cpu_qkv()
    with pytest.raises(NotImplementedError, match="CUDA"):
        gluon_flash_forward(q, k, v, AttentionParams(0.125))


def test_tma_layout_checks():
    ok = torch.randn(1, 2, 33, 64, dtype=torch.bfloat16)
    launch_gluon.check_tma_layout("q", ok)
    launch_gluon.check_tma_layout("q", torch.randn(1, 33, 2, 64, dtype=torch.bfloat16).transpose(1, 2))  # BSHD
    with pytest.raises(NotImplementedError, match="contiguous last dim"):
        launch_gluon.check_tma_layout("q", torch.randn(1, 2, 64, 33, dtype=torch.bfloat16).transpose(2, 3))
    odd_rows = torch.randn(1, 2, 33, 72, dtype=torch.bfloat16)[..., :64]  # row stride 72 * 2 = 144 bytes: ok
    launch_gluon.check_tma_layout("k", odd_rows)
    with pytest.raises(NotImplementedError, match="multiple of 16 bytes"):
        launch_gluon.check_tma_layout("k", torch.randn(1, 2, 33, 68, dtype=torch.bfloat16)[..., :64])
    # a size-1 dim's stride is never used: torch may leave any value there (here 1 element = 2 bytes)
    launch_gluon.check_tma_layout("q", torch.randn(1, 2, 64, dtype=torch.bfloat16).unsqueeze(2).as_strided(
        (1, 2, 1, 64), (128, 64, 1, 1)))
    assert launch_gluon.tma_strides(torch.empty(1, 2, 1, 64).as_strided((1, 2, 1, 64), (3, 64, 1, 1))) == [128, 64, 64, 1]
    with pytest.raises(NotImplementedError, match="16-byte aligned"):
        launch_gluon.check_tma_layout("v", torch.randn(1 * 2 * 33 * 64 + 1, dtype=torch.bfloat16)[1:].view(1, 2, 33, 64))


def test_plan_grid_and_scalars():
    q, k, v = _cpu_qkv(tq=300, tk=37, d=128, hq=4, hkv=2)
    plan = plan_gluon_forward(q, k, v, AttentionParams(0.1, causal=True, bottom_right=True), sm_count=5)
    assert plan.scalars["num_m_blocks"] == 3 and plan.scalars["num_tiles"] == 12 and plan.grid == (5,)
    assert plan.scalars["diag_offset"] == 37 - 300 and plan.scalars["GROUP"] == 2
    assert math.isclose(plan.scalars["qk_scale"], 0.1 * math.log2(math.e))
    assert plan.constexprs["IS_CAUSAL"] and plan.constexprs["HEAD_DIM"] == 128
    assert plan_gluon_forward(*_cpu_qkv(tk=0), AttentionParams(0.1)) is None  # no keys: filled on the host


# ----------------------------------------------------------------------------------------- CPU: sm_90 compile

# (dtype, head_dim, causal, config): the launcher's defaults for every dtype / D / causal, plus the
# variants bench/gluon_probe.py times
COMPILE_GRID = [(dtype, d, causal, None) for dtype in ("bf16", "fp16") for d in (64, 128) for causal in (False, True)] + [
    ("bf16", d, True, GluonFwdConfig(block_n=128, num_stages=2, pingpong=False)) for d in (64, 128)] + [
    ("bf16", 64, False, GluonFwdConfig(block_n=64, num_stages=4)), ("bf16", 128, False, GluonFwdConfig(num_stages=1))]


def compile_sm90(dtype_name: str, head_dim: int, causal: bool, config: GluonFwdConfig | None,
                 empty_rows_nan: bool = False):
    """Compile what the launcher plans for one call on an sm_90 GPU, on CPU tensors, without a GPU.

    Returns (compiled kernel, its plan). Triton ships ptxas, so this runs the whole pipeline to a cubin.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    q = torch.empty(2, 4, 300, head_dim, dtype=dtype)
    k = v = torch.empty(2, 2, 333, head_dim, dtype=dtype)
    params = AttentionParams(head_dim ** -0.5, causal, bottom_right=causal, empty_rows_nan=empty_rows_nan)
    plan = plan_gluon_forward(q, k, v, params, config=config)
    out = torch.empty_like(q)
    lse = torch.empty(2, 4, 300)
    fn = launch_gluon.kernel_function()
    descs = launch_gluon.make_descriptors(q, k, v, out, plan.config)
    args = dict(zip(("q_desc", "k_desc", "v_desc", "o_desc", "Lse"), (*descs, lse)), **plan.scalars)
    signature = {name: "constexpr" if name in plan.constexprs else mangle_type(args[name]) for name in fn.arg_names}
    constexprs = {(fn.arg_names.index(name),): value for name, value in plan.constexprs.items()}
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=plan.options), plan


def ptxas_report(ptx: str) -> str:
    """ptxas -v on the kernel's PTX for sm_90a: registers, spills, stack (Triton's own run hides them)."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        proc = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(path), "-o", str(path) + ".cubin"],
                              capture_output=True, text=True)
    lines = [line.split("info    :")[-1].strip() for line in proc.stderr.splitlines()
             if "Used" in line or "spill" in line or "warning" in line.lower()]
    return "; ".join(lines) if proc.returncode == 0 else f"ptxas failed: {proc.stderr[-500:]}"


def softmax_overlap(cubin: bytes) -> list[int]:
    """For each steady-state loop in the SASS: how many MUFU.EX2 run between the wait for S_j
    (WARPGROUP.DEPBAR.LE gsb0, 0x1) and the wait for PV_{j-1} (... 0x0), i.e. while PV is in flight."""
    import re
    import tempfile

    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-sass", str(path)], capture_output=True,
                              text=True, check=True).stdout
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s*([^;]*);", sass)]
    counts = []
    for i, op in enumerate(ops):
        if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in op:
            n = 0
            for later in ops[i + 1:]:
                if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in later:
                    break
                n += "MUFU.EX2" in later
            counts.append(n)
    return counts


def _compile_main() -> int:
    """Script mode: compile COMPILE_GRID for sm_90, one line per kernel, exit 1 if any fails."""
    import traceback

    failed = 0
    for dtype_name, head_dim, causal, config in COMPILE_GRID:
        label = f"{dtype_name} D={head_dim} causal={causal} {config or 'default'}"
        try:
            compiled, plan = compile_sm90(dtype_name, head_dim, causal, config)
            if compiled.metadata.shared > launch_gluon.SM90_SHARED_BYTES:
                raise RuntimeError(f"needs {compiled.metadata.shared} bytes of shared memory, an sm_90 block gets "
                                   f"at most {launch_gluon.SM90_SHARED_BYTES}")
            ptx = compiled.asm["ptx"]
            if "wgmma.mma_async" not in ptx or "cp.async.bulk.tensor" not in ptx or "setmaxnreg" not in ptx:
                raise RuntimeError("expected wgmma, TMA copies and setmaxnreg in the PTX")
            # each thread's share of a [64, BLOCK_N] tile's exp2 must run while PV is in flight
            overlap = softmax_overlap(compiled.asm["cubin"])
            if not overlap or min(overlap) < plan.config.block_n // 2:
                raise RuntimeError(f"softmax not overlapped with the PV wgmma: exp2 between the S and PV waits "
                                   f"{overlap}, expected >= {plan.config.block_n // 2} per loop (kernel comment "
                                   f"at the q_empty arrive)")
            print(f"ok  shared={compiled.metadata.shared} exp2 under PV={overlap} {ptxas_report(ptx)}  {label}",
                  flush=True)
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the script fails
            failed += 1
            print(f"FAILED {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}  {label}",
                  flush=True)
            traceback.print_exc(file=sys.stderr)
    print(f"{len(COMPILE_GRID)} kernels, {failed} failed")
    return 1 if failed else 0


def test_gluon_kernel_compiles_for_sm90():
    reason = _gluon_unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--compile-sm90"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"Gluon kernel failed to compile for sm_90:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    assert f"{len(COMPILE_GRID)} kernels, 0 failed" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------------------- GPU


def _needs_hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"needs an sm_90 GPU, got {torch.cuda.get_device_name()}")
    reason = _gluon_unavailable_reason()
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def poisoned_empty():
    """Within: torch.empty returns NaN-filled memory, so an output element never written stays NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def run_and_check(batch, q_heads, kv_heads, tq, tk, head_dim, *, dtype=torch.bfloat16, causal=False,
                  bottom_right=False, empty_rows_nan=False, scale=None, layout="bhsd", config=None):
    """One launch on fresh random inputs against the float64 oracle; returns (out, lse, inputs)."""
    def one(heads, length):
        if layout == "bshd":
            return torch.randn(batch, length, heads, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
        return torch.randn(batch, heads, length, head_dim, device="cuda", dtype=dtype)

    q, k, v = one(q_heads, tq), one(kv_heads, tk), one(kv_heads, tk)
    scale = head_dim ** -0.5 if scale is None else scale
    params = AttentionParams(scale, causal, bottom_right, empty_rows_nan=empty_rows_nan)
    ref, ref_lse = oracle(q, k, v, scale=scale, causal=causal, bottom_right=bottom_right,
                          empty_rows_nan=empty_rows_nan)
    with poisoned_empty():
        out, lse = gluon_flash_forward(q, k, v, params, config=config)
    torch.cuda.synchronize()
    atol, rtol = TOLERANCES[dtype]
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    # NaN passes only where the oracle has NaN (empty rows with empty_rows_nan)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=rtol)
    finite = torch.isfinite(ref)
    rel = (out.double()[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-30)
    assert rel < REL_NORM[dtype], f"||out - ref|| / ||ref|| = {rel:.2e}"
    return out, lse, (q, k, v)


SHAPES = [(256, 256), (197, 197), (37, 300), (300, 37), (1, 577), (1000, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("tq,tk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mask", ["none", "causal", "causal_bottom_right"])
def test_gpu_matches_oracle_bf16_gqa(tq, tk, head_dim, mask):
    _needs_hopper()
    run_and_check(2, 4, 2, tq, tk, head_dim, causal=mask != "none", bottom_right=mask == "causal_bottom_right")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_fp16(head_dim, causal):
    _needs_hopper()
    run_and_check(1, 4, 4, 333, 333, head_dim, dtype=torch.float16, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("empty_rows_nan", [False, True])
def test_gpu_empty_rows(empty_rows_nan):
    # bottom-right causal with Tq > Tk: the first Tq - Tk query rows see no key (a whole 128-row
    # block of them: that tile visits no key block at all)
    _needs_hopper()
    out, lse, _ = run_and_check(1, 2, 1, 400, 100, 64, causal=True, bottom_right=True, empty_rows_nan=empty_rows_nan)
    head = out[:, :, :300]
    assert (torch.isnan(head).all() if empty_rows_nan else (head == 0).all())
    assert (lse[:, :, :300] == float("-inf")).all()


@pytest.mark.gpu
def test_gpu_mqa_bshd_views_and_scale():
    _needs_hopper()
    run_and_check(2, 3, 1, 257, 129, 128, causal=True, layout="bshd", scale=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [GluonFwdConfig(pingpong=False), GluonFwdConfig(num_stages=1),
                                    GluonFwdConfig(block_n=64, num_stages=4)],
                         ids=["no_pingpong", "one_stage", "block_n_64"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_configs(config, head_dim):
    _needs_hopper()
    run_and_check(1, 2, 2, 777, 777, head_dim, causal=True, config=config)
    run_and_check(1, 2, 2, 300, 513, head_dim, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_persistent_many_tiles_and_deterministic(causal):
    # 8 query blocks x 64 heads = 512 tiles: each CTA walks several, crossing ring and phase wraps
    _needs_hopper()
    out, lse, (q, k, v) = run_and_check(4, 16, 4, 1024, 1024, 128, causal=causal)
    params = AttentionParams(128 ** -0.5, causal)
    for _ in range(3):  # a race shows as a result that changes between runs on identical inputs
        again, again_lse = gluon_flash_forward(q, k, v, params)
        assert torch.equal(again, out) and torch.equal(again_lse, lse)


if __name__ == "__main__":
    if "--compile-sm90" in sys.argv:
        sys.exit(_compile_main())
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
