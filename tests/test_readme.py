"""The README's set-up promises, run as a newcomer runs them: `attnlower demo` (the first command's last
step) and the README's Python snippets that need no model download."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_has_exactly_two_setup_commands():
    setup = README[README.index("## Set up"):README.index("## Using it")]
    commands = [block for block in setup.split("```bash\n")[1:]]
    assert len(commands) == 2, commands
    assert "attnlower demo" in commands[0] and "pytest" in commands[1]


def test_demo_runs_and_says_what_ran():
    exe = shutil.which("attnlower") or None
    cmd = [exe, "demo"] if exe else [sys.executable, "-m", "attnlower.cli", "demo"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "rewritten 2 attention site(s)" in out and out.rstrip().endswith("OK"), out[-2000:]
    # on CPU the ops run the reference, and the demo says so (issue 24, item 5)
    assert "plain-PyTorch reference" in out and "TRITON_INTERPRET=1" in out, out[-2000:]
