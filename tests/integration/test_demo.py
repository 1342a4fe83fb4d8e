"""The README's first command: the demo runs to its end and leaves no namespace behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def test_demo_runs_and_cleans_up() -> None:
    before = set(Path("/run/netns").glob("nsdemo-*"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "netstack.demo"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "is unreachable from" in out and "expected unreachable" in out
    assert "everything it made has been removed" in out
    left = set(Path("/run/netns").glob(f"nsdemo-{proc.pid}*")) - before
    assert not left, f"the demo left namespaces: {sorted(map(str, left))}"
