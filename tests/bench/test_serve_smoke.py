"""bench/serve.py keeps working on CPU (its --smoke mode: a tiny Llama, a few requests, fp32), so the GPU run it
exists for (issue 24: continuous batching with attnlower vs HF's sdpa and paged|eager) starts from a script
known to run: every implementation finishes, attnlower's greedy tokens equal sdpa's, and every implementation's
tokens are greedy under an fp32 eager forward of each sequence."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def test_serve_benchmark_smoke_runs_every_implementation(tmp_path):
    script = Path(__file__).resolve().parents[2] / "bench" / "serve.py"
    env = {**os.environ, "OUT": str(tmp_path)}
    r = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()
            if line.split() and line.split()[0] in ("attnlower", "sdpa", "paged|eager")}
    assert set(rows) == {"attnlower", "sdpa", "paged|eager"}, r.stdout[-2000:]
    # the same greedy tokens as sdpa (agree), and every token the argmax of an fp32 eager forward (greedy ok)
    assert rows["attnlower"][-3:-1] == ["1.00", "1.00"], rows["attnlower"]
    assert all(row[-2] == "1.00" and float(row[-1]) < 1e-3 for row in rows.values()), rows
    saved = json.loads((tmp_path / "serve.json").read_text())
    attnlower = saved["results"]["attnlower"]
    assert attnlower["runs"]["6"]["generated_tokens"] == 6 * 8
    assert attnlower["attnlower_calls"]["in_place"] > 0


def test_greedy_gaps_are_zero_for_greedy_tokens_and_flag_a_changed_one():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("serve", Path(__file__).resolve().parents[2] / "bench" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    model = serve.build_model(serve.parse_args(["--smoke"]), torch.device("cpu"), torch.float32)
    reference = serve.reference_model(model)
    prompt = [5, 9, 13, 40]
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=-1,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    assert serve.greedy_gaps(reference, [(prompt, 6)], [generated]) == [0.0]
    wrong = generated[:3] + [(generated[3] + 1) % 96] + generated[4:]   # one token the model would not pick
    assert serve.greedy_gaps(reference, [(prompt, 6)], [wrong])[0] > 1e-3
    assert serve.greedy_gaps(reference, [(prompt, 6)], [[]]) == [float("inf")]
