"""The `attnlower` command (attnlower/cli.py): its flags, its exit codes, the installed console script.

What `attnlower dump` writes is tested in tests/report/test_dump.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from attnlower import cli
from attnlower.report import dump

SCRIPT = str(Path(__file__).parent / "report" / "dump_script.py")
EXPECTED = {"sites": 3, "rewritten": 2, "refused": 1,
            "by_op": {"flash_attention": 1, "sliding_window_attention": 1}}


def _graph_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("graph_"))


def test_help_mentions_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["dump", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--mlir", "--dot", "attnlower[mlir]", "SCRIPT", "sites.md", "report.json", "repro", " -- "):
        assert flag in text, f"`attnlower dump --help` does not mention {flag}"


def test_own_flags_are_taken_from_the_script_arguments_until_double_dash():
    assert cli._split_dump_args(["--steps", "2", "--out", "d", "--dot"]) == (["--out", "d", "--dot"], ["--steps", "2"])
    assert cli._split_dump_args(["--out=d", "--", "--out", "ckpt"]) == (["--out=d"], ["--out", "ckpt"])


def test_mlir_without_torch_mlir_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(dump, "torch_mlir_available", lambda: False)
    assert cli.main(["dump", SCRIPT, "--mlir", "--out", str(tmp_path)]) == 2
    assert "attnlower[mlir]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())          # nothing run, nothing faked


def test_console_script(tmp_path):
    exe = Path(sys.executable).with_name("attnlower")
    if not exe.exists():
        pytest.skip(f"the attnlower console script is not installed next to {sys.executable}")
    if "from attnlower.cli import main" not in exe.read_text():
        pytest.fail(f"{exe} was installed for another entry point than pyproject.toml's attnlower.cli:main; "
                    "reinstall the package (pip install -e .) to regenerate it")
    run = subprocess.run([str(exe), "dump", SCRIPT, "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 attention site(s) rewritten, 1 left unfused" in run.stdout
    (graph,) = _graph_dirs(tmp_path)
    assert json.loads((graph / "report.json").read_text())["counts"] == EXPECTED
