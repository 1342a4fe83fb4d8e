"""netstackd lifecycle: one per state directory, status, clean SIGTERM, restart after kill -9;
the settle op."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
from typing import TYPE_CHECKING

import pytest

from netstack.daemon.client import call
from netstack.errors import NetstackError

if TYPE_CHECKING:
    from conftest import Daemons, Host


@pytest.fixture
def daemons(host: Host) -> Daemons:
    return host.daemons


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


def test_settle_answers_once_a_change_is_read(host: Host, daemons: Daemons) -> None:
    sock = host.run_dir / "netstackd.sock"
    daemons.start()
    daemons.wait_running()
    before = call("settle", sock)["generation"]
    host.netctl("network", "create", "settle-net", "--subnet", "10.77.0.0/24")
    told = call("settle", sock)["generation"]
    # a write the daemon is not told about (another writer's commit): only its store watch
    # finds it, within 20 ms, and settle must not answer before it has been read
    with sqlite3.connect(host.state_dir / "state.db", isolation_level=None) as db:
        db.execute("UPDATE networks SET labels = '{\"by\": \"test\"}' WHERE name = 'settle-net'")
    assert before < told < call("settle", sock)["generation"]

    for bad in (0, "soon", 61):
        with pytest.raises(
            NetstackError, match=r"'max_wait' must be a number of seconds in \(0, 60\]"
        ):
            call("settle", sock, max_wait=bad)
    host.netctl("network", "rm", "settle-net")
