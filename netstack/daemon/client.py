"""A small blocking client for netstackd's API socket (JSON lines), used by netctl."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

from netstack.daemon.paths import socket_path
from netstack.errors import NetstackError

log = logging.getLogger(__name__)


class DaemonUnavailable(NetstackError):
    """netstackd is not running (or not answering) for this run directory."""

    cni_code = 11  # try again later
    http_status = 503


def call(op: str, path: Path | None = None, timeout: float = 5.0, **args: Any) -> Any:
    """Send one request and return its result; raises DaemonUnavailable or NetstackError."""
    where = path or socket_path()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(where))
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        raise DaemonUnavailable(f"no netstackd answers on {where}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(reply)
    except ValueError:
        raise DaemonUnavailable(f"netstackd at {where} sent an unreadable reply") from None
    if not answer.get("ok"):
        raise NetstackError(str(answer.get("error", "netstackd refused the request")))
    return answer.get("result")


def notify_changed(path: Path | None = None) -> None:
    """Ask a running netstackd to re-read the store now; silent when none runs."""
    where = path or socket_path()
    if not where.exists():
        return
    try:
        call("reload", where, timeout=5.0)
    except NetstackError as exc:  # best effort: the daemon's own watch catches up
        log.debug("netstackd not notified: %s", exc)
