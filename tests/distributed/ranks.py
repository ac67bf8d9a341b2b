"""Run a scenario on N CPU ranks (gloo over 127.0.0.1), one fresh Python process per rank.

    results = run_ranks("tp_llama", tmp_path)          # from a test: one dict per rank
    python tests/distributed/ranks.py tp_llama 0 2 29500 out.json    # what each rank runs

Each rank imports `scenarios.py`, runs the named function with the process group up and writes what
it returns as JSON; the test asserts on those dicts. Processes, not threads: Dynamo, the process group
and the fake modes are per process, as under torchrun. A rank that raises exits non-zero and its
stderr becomes the test's failure message.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# NVLink multicast off in every process we start: the team's rule for the multi-GPU machines
# (their NVLS set-up fails), harmless on CPU. Gloo talks over loopback only.
DIST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "MASTER_ADDR": "127.0.0.1",
    "GLOO_SOCKET_IFNAME": "lo",
}


def free_port() -> int:
    """A TCP port nobody listens on now, on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, out_dir: Path, world_size: int = 2, timeout: float = 180.0) -> list[dict]:
    """Start `world_size` ranks running `scenarios.<scenario>`; return each rank's result dict, rank order."""
    port = free_port()
    env = {**os.environ, **DIST_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TRITON_INTERPRET", "1")   # as tests/conftest.py: no GPU here
    outs = [out_dir / f"{scenario}.rank{r}.json" for r in range(world_size)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "ranks.py"), scenario, str(r), str(world_size),
                               str(port), str(outs[r])], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world_size)]
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:   # only the processes started here
            p.kill()
        raise AssertionError(f"scenario {scenario!r} did not finish on {world_size} ranks within {timeout:.0f} s")
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        detail = "\n".join(f"--- rank {r} (exit {rc}) ---\n{logs[r][-6000:]}" for r, rc in failed)
        raise AssertionError(f"scenario {scenario!r} failed on rank(s) {[r for r, _ in failed]}:\n{detail}")
    return [json.loads(o.read_text()) for o in outs]


def _rank_main(scenario: str, rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(DIST_ENV)   # before torch is imported
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    import scenarios

    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        result = getattr(scenarios, scenario)()
    finally:
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    name, r, n, p, o = sys.argv[1:6]
    _rank_main(name, int(r), int(n), int(p), o)
