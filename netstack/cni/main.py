"""The CNI plugin executable: fast start, then netstackd or in-process.

A runtime execs the plugin for every container, so its start-up is on the critical path.
This module imports only the standard library: when netstackd runs, the request
(the CNI_* environment and stdin) goes over its unix socket and the daemon, which has
everything loaded, does the work; otherwise `netstack.cni.plugin` (the controller,
pyroute2, libnftables) is imported and runs here. Both run the same `plugin.run`.
"""

from __future__ import annotations

import json
import os
import socket
import sys

DEFAULT_RUN_DIR = "/run/netstack"
SOCKET_NAME = "netstackd.sock"
DAEMON_TIMEOUT = 300.0
_TRY_AGAIN_LATER = 11


def _via_daemon(env: dict[str, str], stdin: bytes) -> tuple[int, str] | None:
    """(exit status, stdout) from netstackd, or None when no daemon takes the request."""
    path = os.path.join(os.environ.get("NETSTACK_RUN_DIR", DEFAULT_RUN_DIR), SOCKET_NAME)
    request = {"op": "cni", "env": env, "stdin": stdin.decode("utf-8", "surrogateescape")}
    sent = False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(DAEMON_TIMEOUT)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            sent = True
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                reply += chunk
        answer = json.loads(reply)
    except (OSError, ValueError) as error:
        if not sent:
            return None  # no daemon: do it here
        # The daemon got the request and then went away: it may or may not have done it.
        return 1, json.dumps(
            {
                "cniVersion": "1.1.0",
                "code": _TRY_AGAIN_LATER,
                "msg": f"netstackd did not finish the request: {error}",
                "details": "retry; DEL is idempotent and ADD is all or nothing",
            }
        )
    if not answer.get("ok"):
        return None  # an old daemon without the op, or a request it could not read
    result = answer["result"]
    return int(result["code"]), str(result["stdout"])


def main() -> int:
    stdin = sys.stdin.buffer.read()
    env = {key: value for key, value in os.environ.items() if key.startswith("CNI_")}
    reply = None
    if env.get("CNI_COMMAND") != "VERSION" and not os.environ.get("NETSTACK_CNI_IN_PROCESS"):
        reply = _via_daemon(env, stdin)
    if reply is None:
        from netstack.cni.plugin import run

        reply = run(dict(os.environ), stdin)
    code, stdout = reply
    if stdout:
        sys.stdout.write(stdout)
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
