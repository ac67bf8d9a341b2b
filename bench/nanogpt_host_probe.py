"""Why does nanoGPT's buffer-mask training step take longer on the wall than is_causal's with the same GPU busy
(issue 22; bench/RESULTS.md, 2026-12-04 late)? GPU only.

    python bench/nanogpt_host_probe.py                  # is_causal first, then the buffer mask (e2e.py's order)
    python bench/nanogpt_host_probe.py --buffer-first   # the other order

Per model, compiled by attnlower, after 6 warm-up steps: per-step host time (until backward() returns) and wall time
over 20 steps, the busiest OS threads of the process meanwhile, Dynamo's compile counters, any synchronizing call
(torch.cuda.set_sync_debug_mode), CUDA runtime calls per step (torch.profiler) and the host's top functions (cProfile).
"""
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import DTYPE, NanoGPT, attnlower_backend, host_profile  # noqa: E402

idx = torch.randint(0, 50304, (8, 1024), device="cuda")
targets = torch.randint(0, 50304, (8, 1024), device="cuda")


def tasks():
    """(thread id, name, cpu ticks) of every OS thread of this process."""
    out = {}
    for t in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            text = open(f"/proc/{os.getpid()}/task/{t}/stat").read()
            name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            out[t] = (name, int(fields[11]) + int(fields[12]))   # utime, stime (fields 14, 15 of stat)
        except OSError:
            pass
    return out


order = (False, True) if "--buffer-first" in sys.argv else (True, False)
for flash in order:
    name = "is_causal" if flash else "buffer mask"
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = NanoGPT(flash=flash).to("cuda", DTYPE)
    cm = torch.compile(model, backend=attnlower_backend)

    def step():
        loss = cm(idx, targets)
        loss.backward()
        return loss

    for _ in range(6):
        step()
    torch.cuda.synchronize()
    frames = dict(torch._dynamo.utils.counters["stats"])
    host, wall = [], []
    before = tasks()
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        end.synchronize()
        wall.append(start.elapsed_time(end))
    print(f"[{name}] wall ms median {statistics.median(wall):.3f} min {min(wall):.3f} max {max(wall):.3f} | "
          f"host (until step() returns) median {statistics.median(host):.3f} min {min(host):.3f} max {max(host):.3f}",
          flush=True)
    after = tasks()
    busy = sorted(((after[t][1] - before.get(t, ("", 0))[1], after[t][0]) for t in after), reverse=True)[:5]
    print(f"[{name}] {len(after)} OS threads; busiest during the 20 steps (cpu ticks, name): {busy}", flush=True)
    print(f"[{name}] walls: {' '.join(f'{w:.1f}' for w in wall)}", flush=True)
    print(f"[{name}] dynamo stats after warm-up {frames} -> now {dict(torch._dynamo.utils.counters['stats'])}",
          flush=True)
    # syncs
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message=".*synchroniz.*")
        try:
            step()
            print(f"[{name}] sync debug: no synchronizing call in a step", flush=True)
        except Exception:  # noqa: BLE001
            print(f"[{name}] sync debug: a synchronizing call:\n{traceback.format_exc()[-3000:]}", flush=True)
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    # CUDA runtime calls per step
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    counts = {}
    for e in prof.events():
        if e.name.startswith("cu"):   # the CUDA runtime's (cuda*) and driver's (cu*) calls
            c = counts.setdefault(e.name, [0, 0.0])
            c[0] += 1
            c[1] += e.cpu_time_total
    print(f"[{name}] CUDA runtime calls per step (count, host us): " + ", ".join(
        f"{k} {v[0] / 3:.0f} {v[1] / 3:.0f}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1][1])[:12]),
        flush=True)
    # host functions (e2e.host_profile: after one warm-up step, per step)
    print(f"[{name}] cProfile, 5 steps, by own time, per step:\n    " + "\n    ".join(host_profile(step, calls=5, top=18)),
          flush=True)
    del cm, model
    torch.cuda.empty_cache()
