"""One-call probe of the Gluon Hopper forward (kernels/gluon_fwd.py) on an H100 / H200: right, then fast.

    PYTHONUNBUFFERED=1 python bench/gluon_probe.py      # ~3-4 minutes; writes $OUT/gluon_probe.{json,log}

What it runs (bf16 throughout):
  1. in parallel, one subprocess each (a hung kernel is killed at its timeout; the rest goes on):
     - `check <variant>` for every Gluon variant: correctness against a float64 oracle on small odd
       shapes (GQA, causal top-left and bottom-right, empty rows, many tiles per CTA, a repeat run for
       determinism), outputs poisoned with NaN first; then one launch at each timing shape, which
       compiles it into Triton's disk cache; compile errors are caught per configuration;
     - `warm <D> <causal>`: today's Triton kernel (launch.flash_forward) at the timing shapes, same reason;
  2. `time`: triton.testing.do_bench medians of SDPA cuDNN, SDPA flash (FA2), today's Triton kernel
     and each Gluon variant whose check passed, at D in {64, 128}, causal or not, N in {1024, 4096,
     16384} with B * N = 16384 tokens and H * D = 2048; Gluon variants last, so a hang loses only them.
Tables at the end: correctness, compiled kernels (registers, spills, shared memory), TFLOP/s and the
ratio to cuDNN. TFLOP/s counts 4 * B * H * N^2 * D (half when causal), as bench/flash.py does.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "lowering"))

TOKENS, MODEL_DIM = 16384, 2048
NS = (1024, 4096, 16384)
HEAD_DIMS = (64, 128)
# Gluon variants: name -> GluonFwdConfig fields (None: the launcher's default for the head dim)
VARIANTS = {
    "ws": None,                                                       # ping-pong, default stages
    "ws-nopp": dict(pingpong=False),                                  # the same without the turn barriers
    "ws-bn64": dict(block_n=64, num_stages=4),                        # narrower key tiles, deeper ring
}
# Whole call: the lead's device call has ~4 minutes; the phases share this budget (seconds).
BUDGET_S = float(os.environ.get("GLUON_PROBE_BUDGET_S", "225"))
CHECK_TIMEOUT_S = 110
BF16_MAX_REL_ERR = 2e-2    # max|err| / max|ref|: bf16 output rounding is ~4e-3 of max|ref|
BF16_NORM_REL_ERR = 1e-2   # ||err|| / ||ref||: 16-bit operands land between 1e-3 and 1e-2


def timing_shapes():
    """(D, N, B, H, causal) of every timed configuration."""
    return [(d, n, TOKENS // n, MODEL_DIM // d, causal) for d in HEAD_DIMS for causal in (False, True) for n in NS]


def emit(**record):
    """One JSON line on stdout: the parent collects these from its workers."""
    print("@@" + json.dumps(record, default=str), flush=True)


def gluon_config(variant: str, head_dim: int):
    from attnlower.lowering.launch_gluon import GluonFwdConfig, default_config
    base = default_config(head_dim)
    fields = VARIANTS[variant]
    return base if fields is None else GluonFwdConfig(**{**base.__dict__, **fields})


def kernel_info(compiled) -> dict:
    """Registers, spills and shared memory of a compiled kernel, where Triton exposes them."""
    if compiled is None:
        return {}
    info = {"shared": getattr(compiled.metadata, "shared", None), "num_warps": getattr(compiled.metadata, "num_warps", None)}
    for name in ("n_regs", "n_spills", "n_max_threads"):
        try:
            info[name] = getattr(compiled, name)
        except Exception as error:  # noqa: BLE001 - informational only
            info[name] = f"n/a ({type(error).__name__})"
    return info


# ----------------------------------------------------------------------------------------- workers


def worker_check(variant: str) -> None:
    """Correctness of one Gluon variant on small shapes, then one launch per timing shape (compiles)."""
    import torch

    from attention_oracle import oracle
    from attnlower.lowering.launch_gluon import gluon_flash_forward_with_kernel
    from attnlower.lowering.params import AttentionParams

    torch.manual_seed(1234)
    for d in HEAD_DIMS:
        config = gluon_config(variant, d)
        for causal in (False, True):
            # (B, Hq, Hkv, Tq, Tk, bottom_right, empty_rows_nan)
            cases = [(2, 4, 2, 1000, 1000, False, False), (1, 4, 2, 333, 517, causal, False),
                     (1, 2, 1, 517, 333, causal, causal), (4, 16, 4, 1024, 1024, False, False)]
            for b, hq, hkv, tq, tk, bottom_right, nan_rows in cases:
                label = dict(variant=variant, D=d, causal=causal, shape=f"{b}x{hq}/{hkv}x{tq}x{tk}",
                             bottom_right=bottom_right)
                emit(kind="start", **label)  # the last one without a result names the case a hang happened in
                try:
                    q = torch.randn(b, hq, tq, d, device="cuda", dtype=torch.bfloat16)
                    k = torch.randn(b, hkv, tk, d, device="cuda", dtype=torch.bfloat16)
                    v = torch.randn(b, hkv, tk, d, device="cuda", dtype=torch.bfloat16)
                    params = AttentionParams(d ** -0.5, causal, bottom_right, empty_rows_nan=nan_rows)
                    ref, ref_lse = oracle(q, k, v, scale=d ** -0.5, causal=causal, bottom_right=bottom_right,
                                          empty_rows_nan=nan_rows)
                    # poison: the launcher's torch.empty outputs start NaN, so unwritten elements show
                    torch.use_deterministic_algorithms(True, warn_only=True)
                    torch.utils.deterministic.fill_uninitialized_memory = True
                    out, lse, compiled = gluon_flash_forward_with_kernel(q, k, v, params, config=config)
                    torch.use_deterministic_algorithms(False)
                    torch.utils.deterministic.fill_uninitialized_memory = False
                    torch.cuda.synchronize()
                    emit(kind="check", **label, **error_stats(out, lse, ref, ref_lse),
                         kernel=kernel_info(compiled))
                    if b * hq >= 64:  # many tiles per CTA: a race shows as a result that changes between runs
                        again, again_lse, _ = gluon_flash_forward_with_kernel(q, k, v, params, config=config)
                        torch.cuda.synchronize()
                        emit(kind="determinism", **label, same=bool(torch.equal(again, out) and torch.equal(again_lse, lse)))
                    del q, k, v, ref, ref_lse, out, lse
                except Exception as error:  # noqa: BLE001 - reported per configuration, the worker goes on
                    torch.use_deterministic_algorithms(False)
                    emit(kind="check", **label, ok=False, error=f"{type(error).__name__}: {str(error)[:400]}")
    for d, n, b, h, causal in timing_shapes():  # compile the timing specializations into the disk cache
        try:
            q, k, v = rand(b, h, n, d)
            _, _, compiled = gluon_flash_forward_with_kernel(q, k, v, AttentionParams(d ** -0.5, causal),
                                                             config=gluon_config(variant, d))
            torch.cuda.synchronize()
            emit(kind="warm", impl=f"gluon:{variant}", D=d, N=n, causal=causal, ok=True, kernel=kernel_info(compiled))
        except Exception as error:  # noqa: BLE001
            emit(kind="warm", impl=f"gluon:{variant}", D=d, N=n, causal=causal, ok=False,
                 error=f"{type(error).__name__}: {str(error)[:400]}")


def error_stats(out, lse, ref, ref_lse) -> dict:
    """max|err|, max|err| / max|ref|, ||err|| / ||ref|| and NaN counts of out and lse against the oracle."""
    import torch
    out64, lse64 = out.double(), lse.double()
    finite = torch.isfinite(ref)
    nan_where_finite = int(torch.isnan(out64[finite]).sum())
    nan_rows_kept = bool(torch.isnan(out64[~finite]).all()) if (~finite).any() else True
    err = (out64[finite] - ref[finite]).abs()
    max_abs = float(err.max()) if err.numel() else 0.0
    max_rel = max_abs / max(float(ref[finite].abs().max()), 1e-30) if err.numel() else 0.0
    norm_rel = float(err.norm() / ref[finite].norm().clamp_min(1e-30)) if err.numel() else 0.0
    lse_finite = torch.isfinite(ref_lse)
    lse_err = float((lse64[lse_finite] - ref_lse[lse_finite]).abs().max()) if lse_finite.any() else 0.0
    lse_inf_ok = bool((lse64[~lse_finite] == float("-inf")).all())
    lse_nan = int(torch.isnan(lse64).sum())
    ok = (nan_where_finite == 0 and nan_rows_kept and lse_nan == 0 and lse_inf_ok and max_rel < BF16_MAX_REL_ERR
          and norm_rel < BF16_NORM_REL_ERR and lse_err < 2e-2 and not math.isnan(max_abs))
    return dict(ok=ok, max_abs=max_abs, max_rel=max_rel, norm_rel=norm_rel, nan=nan_where_finite,
                lse_max_abs=lse_err, lse_nan=lse_nan, empty_rows_ok=nan_rows_kept and lse_inf_ok)


def rand(b, h, n, d, seed=5):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]


def triton_forward(q, k, v, causal):
    from attnlower.lowering import launch
    from attnlower.lowering import plan as planning
    from attnlower.lowering.params import AttentionParams
    # this column is the Triton kernel: the launcher would route D=128 to the Gluon one (plan.choose_forward_kernel);
    # the Gluon columns call launch_gluon directly, which this switch does not touch
    planning.GLUON_ENABLED = False
    return launch.flash_forward(q, k, v, AttentionParams(q.shape[-1] ** -0.5, causal))[0]


def worker_warm(d: int, causal: bool) -> None:
    """Compile today's Triton kernel at the timing shapes (into the disk cache) and check it once."""
    import torch

    from attnlower.lowering.kernels import flash_fwd
    for dd, n, b, h, c in timing_shapes():
        if (dd, c) != (d, causal):
            continue
        try:
            q, k, v = rand(b, h, n, d)
            triton_forward(q, k, v, causal)
            torch.cuda.synchronize()
            emit(kind="warm", impl="triton", D=d, N=n, causal=causal, ok=True)
        except Exception as error:  # noqa: BLE001
            emit(kind="warm", impl="triton", D=d, N=n, causal=causal, ok=False,
                 error=f"{type(error).__name__}: {str(error)[:400]}")
    for compiled in _compiled_kernels(flash_fwd._flash_fwd_kernel):
        emit(kind="kernel", impl="triton", D=d, causal=causal, kernel=kernel_info(compiled))


def _compiled_kernels(jit_fn):
    """Every kernel a @triton.jit function has compiled in this process (its per-device caches)."""
    found = []
    for caches in getattr(jit_fn, "device_caches", {}).values():
        found += list(caches[0].values())
    return found


def worker_time(variants: list[str]) -> None:
    """do_bench medians: baselines first, then each Gluon variant (a hang then loses only those)."""
    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnlower.lowering.launch_gluon import gluon_flash_forward
    from attnlower.lowering.params import AttentionParams

    def sdpa(backend):
        def fn(q, k, v, causal):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn

    impls = [("cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)), ("flash", sdpa(SDPBackend.FLASH_ATTENTION)),
             ("triton", triton_forward)]
    for variant in variants:
        impls.append((f"gluon:{variant}", lambda q, k, v, causal, variant=variant: gluon_flash_forward(
            q, k, v, AttentionParams(q.shape[-1] ** -0.5, causal), config=gluon_config(variant, q.shape[-1]))[0]))
    for name, fn in impls:
        for d, n, b, h, causal in timing_shapes():
            flop = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
            try:
                q, k, v = rand(b, h, n, d)
                fn(q, k, v, causal)
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(lambda: fn(q, k, v, causal), warmup=25, rep=100, return_mode="median")
                emit(kind="time", impl=name, D=d, N=n, causal=causal, ms=ms, tflops=flop / ms / 1e9)
            except Exception as error:  # noqa: BLE001
                emit(kind="time", impl=name, D=d, N=n, causal=causal, ms=None,
                     error=f"{type(error).__name__}: {str(error)[:300]}")


# ----------------------------------------------------------------------------------------- parent


def spawn(args: list[str]) -> tuple[subprocess.Popen, Path]:
    """A worker subprocess writing to its own log file (a pipe could fill up and stall it)."""
    import tempfile

    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = Path(tempfile.mkstemp(prefix="gluon_probe_" + "_".join(args) + "_", suffix=".log")[1])
    with path.open("w") as sink:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", *args], stdout=sink, stderr=subprocess.STDOUT,
                                text=True, env=env)
    return proc, path


def collect(procs: dict, deadline: float, log: list) -> list[dict]:
    """Wait for the workers until `deadline` (time.time()), kill the late ones; their JSON records."""
    records = []
    for name, (proc, path) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
            status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = "KILLED at its timeout (a hung kernel?)"
            records.append(dict(kind="timeout", worker=name))
        text = path.read_text(errors="replace")
        log.append(f"===== worker {name}: {status}\n{text}")
        for line in text.splitlines():
            if line.startswith("@@"):
                records.append(json.loads(line[2:]))
        if status.startswith("exit") and proc.returncode != 0:
            records.append(dict(kind="crash", worker=name, status=status, tail=text[-1500:]))
    return records


def main() -> int:
    start = time.time()
    import torch
    import triton
    header = (f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'} "
              f"torch {torch.__version__} triton {triton.__version__}")
    print(header, flush=True)
    log: list[str] = [header]

    procs = {f"check {v}": spawn(["check", v]) for v in VARIANTS}
    procs.update({f"warm {d} {c}": spawn(["warm", str(d), str(int(c))]) for d in HEAD_DIMS for c in (False, True)})
    records = collect(procs, start + CHECK_TIMEOUT_S, log)
    print(f"phase 1 (checks + compiles) done at {time.time() - start:.0f}s", flush=True)

    passed = [v for v in VARIANTS
              if any(r["kind"] == "check" and r["variant"] == v for r in records)
              and all(r.get("ok", False) for r in records if r["kind"] == "check" and r["variant"] == v)
              and all(r.get("same", True) for r in records if r["kind"] == "determinism" and r["variant"] == v)
              and not any(r["kind"] == "timeout" and r["worker"] == f"check {v}" for r in records)]
    print(f"timing the Gluon variants that passed every check: {passed}", flush=True)
    records += collect({"time": spawn(["time", *passed])}, start + BUDGET_S, log)
    print(f"phase 2 (timing) done at {time.time() - start:.0f}s", flush=True)

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gluon_probe.json").write_text(json.dumps(dict(header=header, records=records),
                                                                          indent=1, default=str))
        Path(os.environ["OUT"], "gluon_probe.log").write_text("\n".join(log))
    report(records, passed, header)
    return 0


def report(records: list[dict], passed: list[str], header: str) -> None:
    """The short tables printed last (the device call returns the end of the output)."""
    print("\n=== problems (compile errors, crashes, hangs; each distinct one once; full text in $OUT/gluon_probe.log) ===")
    groups: dict = {}
    for r in records:
        if r["kind"] == "timeout" and r["worker"].startswith("check "):
            variant = r["worker"][6:]
            started = [x for x in records if x["kind"] == "start" and x["variant"] == variant]
            done = [x for x in records if x["kind"] == "check" and x["variant"] == variant]
            if len(started) > len(done):
                r = dict(r, hung_in={k: started[len(done)][k] for k in ("D", "causal", "shape", "bottom_right")})
            groups[json.dumps(r)] = [r, 1]
        elif r["kind"] in ("timeout", "crash"):
            groups[json.dumps({k: r[k] for k in r if k != "tail"})] = [r, 1]
        elif r.get("error"):
            key = (r["kind"], r.get("impl", r.get("variant")), r["error"][:150])
            if key in groups:
                groups[key][1] += 1
            else:
                groups[key] = [r, 1]
    for r, count in groups.values():
        where = {k: r[k] for k in ("kind", "impl", "variant", "worker", "D", "N", "causal", "shape", "hung_in", "status")
                 if k in r}
        print(f"{json.dumps(where)} x{count}: {r.get('error', '')[:300]}")
        if r.get("tail"):
            print("   ", r["tail"][-600:].replace("\n", "\n    "))
    if not groups:
        print("none")

    print("\n=== correctness, bf16 vs float64, worst over 4 shapes (GQA 1000^2, 333x517, 517x333 with empty rows "
          "when causal, 4x16/4 heads x 1024^2) ===")
    print("variant  D   causal  max|err|/max|ref|  ||err||/||ref||  lse max|err|  NaN  empty rows  repeat identical")
    for variant in VARIANTS:
        for d in HEAD_DIMS:
            for causal in (False, True):
                mine = [r for r in records if r["kind"] == "check" and r["variant"] == variant and r["D"] == d
                        and r["causal"] == causal]
                same = [r["same"] for r in records if r["kind"] == "determinism" and r["variant"] == variant
                        and r["D"] == d and r["causal"] == causal]
                if not mine:
                    print(f"{variant:8} {d:<3} {int(causal)}       no result")
                    continue
                good = [r for r in mine if "error" not in r]
                worst = lambda key: max((r[key] for r in good), default=float("nan"))  # noqa: E731
                ok = all(r.get("ok") for r in mine) and all(same) and len(mine) == 4
                print(f"{'ok  ' if ok else 'FAIL'} {variant:8} {d:<3} {int(causal)}  {worst('max_rel'):17.1e}  "
                      f"{worst('norm_rel'):15.1e}  {worst('lse_max_abs'):12.1e}  {sum(r['nan'] for r in good):3d}  "
                      f"{str(all(r['empty_rows_ok'] for r in good)):10}  {same[0] if same else '-'}")
                bad = [r for r in mine if not r.get("ok")]
                if bad:
                    r = bad[0]
                    detail = r.get("error") or {k: r[k] for k in ("max_rel", "norm_rel", "nan", "lse_max_abs",
                                                                  "lse_nan", "empty_rows_ok")}
                    print(f"       first failing: {r['shape']} bottom_right={r['bottom_right']}: {str(detail)[:200]}")

    print("\n=== compiled kernels (registers a thread at entry, spills, shared bytes) ===")
    seen = set()
    for r in records:
        if r.get("kernel") and r["kind"] in ("warm", "kernel"):
            key = (r.get("impl"), r["D"], r["causal"], json.dumps(r["kernel"], sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            kinfo = r["kernel"]
            print(f"{r.get('impl', ''):14} D={r['D']:<3} causal={int(r['causal'])} regs={kinfo.get('n_regs')} "
                  f"spills={kinfo.get('n_spills')} shared={kinfo.get('shared')} warps={kinfo.get('num_warps')}")

    times = {(r["impl"], r["D"], r["N"], r["causal"]): r.get("tflops") for r in records if r["kind"] == "time"}
    cols = ["cudnn", "flash", "triton"] + [f"gluon:{v}" for v in VARIANTS]
    print(f"\n=== forward TFLOP/s, bf16, B*N = {TOKENS}, H*D = {MODEL_DIM} ({header}) ===")
    print("(in parentheses: ratio to cuDNN; '-' not run or failed; only variants that passed every check are timed)")
    print(f"{'D':>3} {'N':>5} c " + " ".join(f"{c.replace('gluon:', ''):>13}" for c in cols) + "  best-gluon/cudnn")
    for d, n, _, _, causal in timing_shapes():
        base = times.get(("cudnn", d, n, causal))
        cells = []
        for c in cols:
            t = times.get((c, d, n, causal))
            cells.append(f"{t:6.0f} ({t / base:4.2f})" if t and base else (f"{t:6.0f}       " if t else f"{'-':>13}"))
        gluon = [times.get((f"gluon:{v}", d, n, causal)) or 0 for v in VARIANTS]
        best = f"{max(gluon) / base:.2f}x" if base and max(gluon) else "-"
        print(f"{d:>3} {n:>5} {'y' if causal else 'n'} " + " ".join(cells) + f"  {best}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        args = sys.argv[sys.argv.index("--worker") + 1:]
        if args[0] == "check":
            worker_check(args[1])
        elif args[0] == "warm":
            worker_warm(int(args[1]), bool(int(args[2])))
        elif args[0] == "time":
            worker_time(args[1:])
        sys.exit(0)
    sys.exit(main())
