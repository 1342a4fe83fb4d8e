"""netstackd lifecycle: one per state directory, status, clean SIGTERM, restart after kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Host


def _netstackd_argv() -> list[str]:
    beside = Path(sys.executable).with_name("netstackd")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "netstack.daemon"]


class Daemons:
    """Starts netstackd processes in a host namespace and always stops them."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.procs: list[subprocess.Popen[str]] = []

    def start(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["nsenter", f"--net={self.host.netns_path}", *_netstackd_argv()],
            env=self.host._env(None),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def wait_running(self, timeout: float = 15.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.host.netctl("status", "--format", "json", check=False)
            if proc.returncode == 0:
                return dict(json.loads(proc.stdout))
            time.sleep(0.1)
        raise AssertionError("netstackd did not come up")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def daemons(host: Host) -> Iterator[Daemons]:
    started = Daemons(host)
    try:
        yield started
    finally:
        started.stop_all()


def test_status_start_lock_and_clean_stop(host: Host, daemons: Daemons) -> None:
    proc = host.netctl("status", check=False)
    assert proc.returncode == 3
    assert proc.stdout.startswith("netstackd: not running")

    first = daemons.start()
    info = daemons.wait_running()
    assert info["running"] is True
    assert info["pid"] != os.getpid()
    assert info["state_dir"] == str(host.state_dir)
    assert (host.run_dir / "netstackd.sock").exists()

    second = daemons.start()
    _out, err = second.communicate(timeout=30)
    assert second.returncode == 1
    assert "netstackd already runs for state directory" in err

    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=15) == 0
    assert not (host.run_dir / "netstackd.sock").exists()
    assert host.netctl("status", check=False).returncode == 3


def test_malformed_requests_do_not_stop_it(host: Host, daemons: Daemons) -> None:
    daemons.start()
    daemons.wait_running()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(host.run_dir / "netstackd.sock"))
        sock.sendall(b"\xff\xfe not json\n[1, 2]\n" + b'{"op": "nope"}\n')
        replies = b""
        while replies.count(b"\n") < 3:
            replies += sock.recv(65536)
    answers = [json.loads(line) for line in replies.splitlines()]
    assert [a["ok"] for a in answers] == [False, False, False]
    assert "malformed request" in answers[0]["error"]
    assert "unknown op 'nope'" in answers[2]["error"]
    assert daemons.wait_running()["running"] is True


def test_restart_after_kill_9(host: Host, daemons: Daemons) -> None:
    first = daemons.start()
    daemons.wait_running()
    first.kill()
    first.wait(timeout=10)
    assert (host.run_dir / "netstackd.sock").exists()  # left behind by the killed daemon
    assert host.netctl("status", check=False).returncode == 3
    daemons.start()
    info = daemons.wait_running()
    assert info["running"] is True
