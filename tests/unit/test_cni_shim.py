"""The compiled CNI front (netstack/cni/shim.c), built and run without root.

Its request must be byte for byte what the Python fast path sends (netstackd parses one
with json); its answers and failures must be what the Python plugin prints. A fake
netstackd (a unix socket in a temp dir) records requests and answers as told.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from netstack.cni import install, main

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="needs a C compiler (gcc; .ci/setup installs it)",
)


class FakeDaemon:
    """Accepts one connection at a time, records the request line, sends `reply`."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.requests: list[bytes] = []
        self.reply = reply
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                if self.reply is not None:
                    conn.sendall(self.reply)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def shim(tmp_path: Path) -> Path:
    target = tmp_path / "bin" / "netstack"
    env = {"NETSTACK_STATE_DIR": str(tmp_path / "state"), "NETSTACK_RUN_DIR": str(tmp_path)}
    root = str(Path(install.__file__).resolve().parents[2])
    assert install.compile_shim(target, sys.executable, env, root)
    return target


@pytest.fixture
def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(tmp_path / "netstackd.sock", getattr(request, "param", b"0 2\n{}"))
    try:
        yield fake
    finally:
        fake.close()


def run(shim: Path, env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    bare = {"PATH": "/usr/bin:/bin", **env}
    return subprocess.run([str(shim)], input=stdin, env=bare, capture_output=True, timeout=60)


TEXTS = ["", "plain", 'quote " and \\ backslash', "ctrl \x01\x1f\t\n\r", "é ü \u2028 \U0001f600"]


@pytest.mark.parametrize("text", TEXTS)
def test_request_is_the_python_one(shim: Path, daemon: FakeDaemon, text: str) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": text, "CNI_NETNS": "/x", "OTHER": "not sent"}
    proc = run(shim, env, text.encode())
    assert (proc.returncode, proc.stdout) == (0, b"{}")
    (request,) = daemon.requests
    cni_env = {k: v for k, v in env.items() if k.startswith("CNI_")}
    assert request == main._request(cni_env, text)
    assert json.loads(request)["env"] == cni_env


@pytest.mark.parametrize(
    ("daemon", "code", "needle"),
    [
        (b"", 11, "netstackd did not finish the request: no reply"),
        (b"0 50\nshort", 11, "short reply (5 of 50 bytes)"),
        (b"zero 5\nhello", 11, "malformed reply"),
    ],
    indirect=["daemon"],
)
def test_a_daemon_that_does_not_answer_fully_is_try_again_later(
    shim: Path, daemon: FakeDaemon, code: int, needle: str
) -> None:
    proc = run(shim, {"CNI_COMMAND": "DEL"}, b"{}")
    assert proc.returncode == 1
    error = json.loads(proc.stdout)
    assert error["code"] == code and needle in error["msg"], error
    assert len(daemon.requests) == 1  # and it did not redo the work in-process


@pytest.mark.parametrize("daemon", [b'7 8\n{"a": 1}'], indirect=True)
def test_exit_status_and_stdout_are_the_daemons(shim: Path, daemon: FakeDaemon) -> None:
    proc = run(shim, {"CNI_COMMAND": "CHECK"}, b"{}")
    assert (proc.returncode, proc.stdout) == (7, b'{"a": 1}')


@pytest.mark.parametrize(
    "daemon", [b'{"ok": false, "error": "unknown op \'cni\'"}\n', None], indirect=True
)
def test_falls_back_to_the_python_plugin(shim: Path, daemon: FakeDaemon, tmp_path: Path) -> None:
    """No daemon (nothing listens), a JSON error, VERSION, input that is not UTF-8: the
    Python plugin answers (here: VERSION, and a decode error for bad bytes)."""
    if daemon.reply is None:  # the socket file is gone: no daemon at all
        os.unlink(tmp_path / "netstackd.sock")
    version = run(shim, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert json.loads(version.stdout)["cniVersion"] == "0.4.0"
    assert daemon.requests == []  # VERSION never asks the daemon
    add_env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": str(tmp_path / "no-netns"),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
    }
    bad = run(shim, add_env, b'{"name": "\xff"}')
    assert bad.returncode == 1 and json.loads(bad.stdout)["code"] == 6
    assert daemon.requests == []  # not UTF-8: straight to Python, which reports it
    status = run(shim, {"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni"}, b"{")
    assert json.loads(status.stdout)["code"] == 6  # decoded by Python
    assert len(daemon.requests) == (0 if daemon.reply is None else 1)


def test_c_string_escapes_everything_but_path_characters() -> None:
    assert install.c_string("/usr/bin/python3") == '"/usr/bin/python3"'
    assert install.c_string('a"b\\c\n') == '"a\\042b\\134c\\012"'
    assert install.c_string("é") == '"\\303\\251"'


def test_install_compiles_where_a_compiler_is(tmp_path: Path) -> None:
    (binary,) = install.install(tmp_path / "bin", None, [])
    assert binary.read_bytes().startswith(b"\x7fELF")
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["netstack"]
