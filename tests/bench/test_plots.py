"""bench/plots.py draws every chart from fake results on CPU (the benchmarks themselves need a GPU)."""
from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench import plots  # noqa: E402

IMPLS = ["attnlower", "sdpa-flash", "sdpa-cudnn", "flex"]
META = dict(device="FakeGPU", torch="0", triton="0")


def fake_flash():
    rows = []
    for d in (64, 128):
        for n in (512, 1024, 2048, 4096):
            for causal in (False, True):
                for mode in ("fwd", "fwd+bwd"):
                    for k, impl in enumerate(IMPLS):
                        rows.append(dict(D=d, N=n, causal=causal, mode=mode, impl=impl, ms=1.0,
                                         tflops=100.0 + 10 * k + n / 100))
                    rows.append(dict(D=d, N=n, causal=causal, mode=mode, impl="sdpa-efficient", error="refused"))
    return dict(META, rows=rows)


def fake_sliding():
    rows = [dict(N=n, W=256, mode=mode, impl=impl, useful_tflops=50.0 + k, ms=1.0)
            for n in (1024, 4096, 16384) for mode in ("fwd", "fwd+bwd") for k, impl in enumerate(IMPLS)]
    return dict(META, rows=rows)


def fake_paged():
    results = []
    for length in (1024, 8192):
        for batch in (1, 8, 64):
            gbs = {"attnlower": 1000.0 * batch ** 0.3, "attnlower-cudagraph": 1200.0, "sdpa-flash": None}
            results.append(dict(batch=batch, seq_len=length, kv_gb_per_s=gbs, ms={}))
    return dict(META, results=results)


def fake_paged_sweep():
    rows = []
    for batch in (1, 8):
        candidates = [dict(splits=1, reduce="-", pdl=False, block_n=n, stages=st, warps=8, ms=0.1 * batch)
                      for n in (64, 128) for st in (2, 3)]
        candidates += [dict(splits=s, reduce=r, pdl=pdl, block_n=n, stages=st, warps=8, ms=0.1 * batch / s + 0.001 * n)
                       for s in (2, 4) for r in ("fused", "separate") for pdl in (False, True) for n in (64, 128)
                       for st in (2, 3) if not (pdl and r == "fused")]
        candidates.append(dict(splits=8, reduce="separate", pdl=False, block_n=128, stages=5, warps=8,
                               error="OutOfResources: shared memory"))
        rows.append(dict(batch=batch, length=4096, candidates=candidates, cudnn_ms=0.01 * batch,
                         chosen=dict(splits=4, reduce="separate", ms=0.03 * batch), best=candidates[-2]))
    return dict(META, rows=rows)


def _png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    h, w = matplotlib.image.imread(path).shape[:2]
    return w, h


def test_every_chart_from_fake_results(tmp_path):
    for name, data in (("flash.json", fake_flash()), ("sliding.json", fake_sliding()), ("paged.json", fake_paged()),
                       ("paged_sweep.json", fake_paged_sweep())):
        (tmp_path / name).write_text(json.dumps(data))
    sys.path.insert(0, str(ROOT / "examples"))
    from _common import print_speed   # the examples' own `speed` line, which the parser reads

    buf = io.StringIO()
    with redirect_stdout(buf):
        print_speed("prefill B=2 T=1024", {"eager": 10.0, "inductor": 5.0, "attnlower": 4.0})
    (tmp_path / "example_gpt2.log").write_text("compiling...\n" + buf.getvalue() + "done\n")

    written = plots.plot_dir(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["flash_D128.png", "flash_D64.png", "paged.png", "paged_sweep.png", "sliding.png", "speedups.png"]
    for p in written:
        w, h = _png_size(p)
        assert w > 400 and h > 300, (p, w, h)
        assert p.parent == tmp_path          # next to the tables


def test_speedups_parse_the_examples_lines(tmp_path):
    log = tmp_path / "example_llama.log"
    log.write_text("speed decode [vs eager]: eager 8.000 ms (1.00x), attnlower 2.000 ms (4.00x)\nother line\n")
    assert plots.speedups_from_logs([log]) == [
        dict(model="llama", label="decode", impl="attnlower", speedup=4.0, base="eager")]


def test_plot_file_without_matplotlib_says_so(tmp_path, monkeypatch):
    path = tmp_path / "sliding.json"
    path.write_text(json.dumps(fake_sliding()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib -> ImportError
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert plots.plot_file(path) == []
    assert "pip install matplotlib" in buf.getvalue()
    assert not (tmp_path / "sliding.png").exists()
