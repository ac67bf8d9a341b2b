"""Charts of the benchmark results, written as PNGs next to the tables.

    python bench/plots.py $OUT          # every chart the files in $OUT allow

  flash.json   -> flash_D{64,128}.png   TFLOP/s against sequence length, attnlower vs SDPA backends and
                                        flex; forward and forward+backward, causal and not
  sliding.json -> sliding.png           useful TFLOP/s (in-window pairs) against sequence length
  paged.json   -> paged.png             decode K/V bandwidth (GB/s) against batch, one panel per length
  paged_sweep.json -> paged_sweep.png   ms against split count per tile, one panel per batch, cuDNN and the plan marked
  example_*.log -> speedups.png         end-to-end speed-up over eager, from the examples' `speed` lines

The bench scripts call `plot_file(json_path)` after writing their JSON. matplotlib is imported only
when a chart is drawn (pip install matplotlib, part of the test extra); without it the functions
raise ImportError naming the package, and the scripts print that instead of failing.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# one colour per implementation, the same in every chart
_STYLE = {"attnlower": dict(color="tab:red", linewidth=2.2, marker="o"),
          "attnlower-cudagraph": dict(color="tab:red", linestyle="--", marker="o"),
          "attnlower-nosplit": dict(color="tab:red", linestyle=":", marker="o")}


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("bench/plots.py draws with matplotlib: pip install matplotlib "
                          "(or pip install -e '.[test]')") from e
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _title(data: dict, what: str) -> str:
    return f"{what} — {data.get('device', '?')}, torch {data.get('torch', '?')}, triton {data.get('triton', '?')}"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_flash(data: dict, out_dir: str | Path) -> list[Path]:
    """flash.json -> one PNG per head dim: rows causal / not, columns forward / forward+backward."""
    plt = _pyplot()
    rows = [r for r in data["rows"] if "tflops" in r]
    written = []
    for head_dim in sorted({r["D"] for r in rows}):
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True, squeeze=False)
        for i, causal in enumerate((False, True)):
            for j, mode in enumerate(("fwd", "fwd+bwd")):
                ax = axes[i][j]
                sel = [r for r in rows if r["D"] == head_dim and r["causal"] == causal and r["mode"] == mode]
                for impl in _impls(sel):
                    pts = sorted((r["N"], r["tflops"]) for r in sel if r["impl"] == impl)
                    ax.plot(*zip(*pts), label=impl, **_STYLE.get(impl, dict(marker=".")))
                ax.set_xscale("log", base=2)
                ax.set_title(f"{'causal' if causal else 'full'}, {mode}")
                ax.set_ylabel("TFLOP/s")
                ax.grid(alpha=0.3)
        for ax in axes[-1]:
            ax.set_xlabel("sequence length N (B*N fixed)")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(_title(data, f"dense attention, bf16, D={head_dim}"), fontsize=10)
        written.append(_save(fig, Path(out_dir) / f"flash_D{head_dim}.png"))
    return written


def plot_sliding(data: dict, out_dir: str | Path) -> list[Path]:
    """sliding.json -> sliding.png: useful TFLOP/s against N, forward and forward+backward."""
    plt = _pyplot()
    rows = [r for r in data["rows"] if "useful_tflops" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for j, mode in enumerate(("fwd", "fwd+bwd")):
        ax = axes[0][j]
        sel = [r for r in rows if r["mode"] == mode]
        for impl in _impls(sel):
            pts = sorted((r["N"], r["useful_tflops"]) for r in sel if r["impl"] == impl)
            ax.plot(*zip(*pts), label=impl, **_STYLE.get(impl, dict(marker=".")))
        windows = sorted({r["W"] for r in sel})
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode} (window {', '.join(map(str, windows))})")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("useful TFLOP/s (in-window pairs)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(data, "sliding-window attention, bf16"), fontsize=10)
    return [_save(fig, Path(out_dir) / "sliding.png")]


def plot_paged(data: dict, out_dir: str | Path) -> list[Path]:
    """paged.json -> paged.png: K/V bandwidth against batch, one panel per sequence length."""
    plt = _pyplot()
    results = data["results"]
    lengths = sorted({r["seq_len"] for r in results})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 4), squeeze=False, sharey=True)
    for j, length in enumerate(lengths):
        ax = axes[0][j]
        sel = sorted((r for r in results if r["seq_len"] == length), key=lambda r: r["batch"])
        impls = sorted({k for r in sel for k, v in r["kv_gb_per_s"].items() if v}, key=_impl_order)
        for impl in impls:
            pts = [(r["batch"], r["kv_gb_per_s"][impl]) for r in sel if r["kv_gb_per_s"].get(impl)]
            ax.plot(*zip(*pts), label=impl, **_STYLE.get(impl, dict(marker=".")))
        ax.set_xscale("log", base=2)
        ax.set_title(f"context {length}")
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("K+V GB/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(data, "paged decode, bf16"), fontsize=10)
    return [_save(fig, Path(out_dir) / "paged.png")]


_SPEED = re.compile(r"^speed (?P<label>.+?) \[vs (?P<base>[^\]]+)\]: (?P<cells>.+)$")
_CELL = re.compile(r"(?P<name>[\w+\-.]+) (?P<ms>[\d.]+) ms \((?P<x>[\d.]+)x\)")


def speedups_from_logs(paths) -> list[dict]:
    """The examples' `speed <label> [vs eager]: eager 3.1 ms (1.00x), attnlower 1.2 ms (2.58x)` lines."""
    found = []
    for path in paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            m = _SPEED.match(line.strip())
            if not m:
                continue
            for cell in _CELL.finditer(m.group("cells")):
                if cell.group("name") != m.group("base"):
                    found.append({"model": Path(path).stem.removeprefix("example_"), "label": m.group("label"),
                                  "impl": cell.group("name"), "speedup": float(cell.group("x")),
                                  "base": m.group("base")})
    return found


def plot_speedups(rows: list[dict], out_dir: str | Path, title: str = "end to end") -> list[Path]:
    """Bars of each example's speed-up over its baseline (1.0 = as fast as eager)."""
    plt = _pyplot()
    if not rows:
        return []
    labels = [f"{r['model']}\n{r['label']}" for r in rows]
    impls = sorted({r["impl"] for r in rows}, key=_impl_order)
    groups = list(dict.fromkeys(labels))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) + 2), 4))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for g, group in enumerate(groups):
            vals = [r["speedup"] for r, lab in zip(rows, labels) if lab == group and r["impl"] == impl]
            if vals:
                xs.append(g + (k - (len(impls) - 1) / 2) * width)
                ys.append(vals[0])
        bars = ax.bar(xs, ys, width, label=impl, color=_STYLE.get(impl, {}).get("color"))
        ax.bar_label(bars, fmt="%.2fx", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(f"speed-up over {rows[0]['base']}")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return [_save(fig, Path(out_dir) / "speedups.png")]


_PLOTTERS = {"flash.json": plot_flash, "sliding.json": plot_sliding, "paged.json": plot_paged}


def plot_gluon_probe(data: dict, out_dir: str | Path) -> list[Path]:
    """gluon_probe.json (bench/gluon_probe.py) -> one PNG per head dim, forward TFLOP/s against N, full and
    causal side by side: cuDNN, FA2, today's Triton kernel and each Gluon variant."""
    plt = _pyplot()
    device, _, rest = data.get("header", "").partition(" torch ")
    torch_version, _, triton_version = rest.partition(" triton ")
    meta = dict(device=device or "?", torch=torch_version or "?", triton=triton_version or "?")
    rows = [r for r in data["records"] if r.get("kind") == "time" and r.get("tflops")]
    written = []
    for head_dim in sorted({r["D"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, squeeze=False)
        for j, causal in enumerate((False, True)):
            ax = axes[0][j]
            sel = [r for r in rows if r["D"] == head_dim and r["causal"] == causal]
            for impl in _impls(sel):
                pts = sorted((r["N"], r["tflops"]) for r in sel if r["impl"] == impl)
                ax.plot(*zip(*pts), label=impl, **_STYLE.get(impl, dict(marker=".")))
            ax.set_xscale("log", base=2)
            ax.set_title("causal" if causal else "full")
            ax.set_xlabel("sequence length N (B*N = 16384)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("forward TFLOP/s")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(_title(meta, f"dense forward, bf16, D={head_dim}"), fontsize=10)
        written.append(_save(fig, Path(out_dir) / f"gluon_probe_D{head_dim}.png"))
    return written


_PLOTTERS["gluon_probe.json"] = plot_gluon_probe


def plot_paged_sweep(data: dict, out_dir: str | Path) -> list[Path]:
    """paged_sweep.json -> paged_sweep.png: ms against the split count, one line per tile (keys x stages, PDL or not),
    one panel per batch size, with cuDNN on a contiguous cache and the plan's own choice marked."""
    plt = _pyplot()
    rows = data["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.4 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        lines: dict[tuple, list] = {}
        for c in row["candidates"]:
            if c.get("ms"):
                tile = (c["block_n"], c["stages"], c["warps"])
                # one line per tile and way of combining: the unsplit point (reduce "-") starts each of them
                for reduce in ([c["reduce"]] if c["reduce"] != "-" else [None]):
                    lines.setdefault((tile, reduce, bool(c.get("pdl"))), []).append((c["splits"], c["ms"]))
        unsplit = {key[0]: pts for key, pts in lines.items() if key[1] is None}
        tiles = sorted({key[0] for key in lines})
        colours = plt.get_cmap("tab20")
        for (tile, reduce, pdl), pts in sorted(lines.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
            if reduce is None:
                continue
            pts = sorted(pts + unsplit.get(tile, []))
            label = f"{tile[0]} keys x {tile[1]} st x {tile[2]} w, {reduce}" + (", pdl" if pdl else "")
            ax.plot(*zip(*pts), marker=".", label=label, color=colours(tiles.index(tile) % 20),
                    linestyle={("separate", False): "-", ("separate", True): "--"}.get((reduce, pdl), ":"))
        if row.get("cudnn_ms"):
            ax.axhline(row["cudnn_ms"], color="black", linewidth=1, label="cuDNN, contiguous cache")
        chosen = row.get("chosen") or {}
        if chosen.get("ms"):
            ax.plot([chosen["splits"]], [chosen["ms"]], marker="*", markersize=14, color="tab:red", linestyle="",
                    label="the plan's choice")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"B={row['batch']}, L={row['length']}")
        ax.set_xlabel("splits")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ms (CUDA graph replay)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(_title(data, "paged decode split-KV sweep, bf16, Hq 32, Hkv 8, D 128"), fontsize=10)
    return [_save(fig, Path(out_dir) / "paged_sweep.png")]


_PLOTTERS["paged_sweep.json"] = plot_paged_sweep


def plot_file(path: str | Path) -> list[Path]:
    """Draw the chart(s) of one bench JSON next to it. What the bench scripts call after writing it;
    prints (instead of raising) when matplotlib is missing, so a benchmark never fails on its picture."""
    path = Path(path)
    try:
        written = _PLOTTERS[path.name](json.loads(path.read_text()), path.parent)
    except ImportError as e:
        print(f"no chart for {path.name}: {e}")
        return []
    for p in written:
        print(f"wrote {p}")
    return written


def plot_dir(folder: str | Path) -> list[Path]:
    """Every chart the files in `folder` allow (bench JSONs, example logs)."""
    folder = Path(folder)
    written = []
    for name in _PLOTTERS:
        if (folder / name).is_file():
            written += plot_file(folder / name)
    logs = sorted(folder.glob("example_*.log"))
    rows = speedups_from_logs(logs)
    if rows:
        written += plot_speedups(rows, folder)
    return written


def _impls(rows) -> list[str]:
    return sorted({r["impl"] for r in rows}, key=_impl_order)


def _impl_order(name: str):
    return (not name.startswith("attnlower"), name)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/plots.py DIR   (DIR holds flash.json, sliding.json, paged.json, example_*.log)")
    out = plot_dir(sys.argv[1])
    print(f"{len(out)} chart(s) written" if out else f"no bench results found in {sys.argv[1]}")
