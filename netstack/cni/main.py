"""The CNI plugin executable: fast start, then netstackd or in-process.

A runtime execs the plugin for every container, so its start-up is on the critical path.
This module imports only the standard library: when netstackd runs, the request
(the CNI_* environment and stdin) goes over its unix socket and the daemon, which has
everything loaded, does the work; otherwise `netstack.cni.plugin` (the controller,
pyroute2, libnftables) is imported and runs here. Both run the same `plugin.run`.
"""

from __future__ import annotations

import _socket  # not `socket`: that one imports enum and selectors (~5 ms at start-up)
import os
import sys

DEFAULT_RUN_DIR = "/run/netstack"
SOCKET_NAME = "netstackd.sock"
DAEMON_TIMEOUT = 300.0
_TRY_AGAIN_LATER = 11
# JSON string escapes, without importing json (~10 ms at start-up): quote, backslash and
# the control characters; everything else is valid inside a JSON string as it is.
_ESCAPES = {ord('"'): '\\"', ord("\\"): "\\\\"} | {i: f"\\u{i:04x}" for i in range(32)}


def _quote(text: str) -> str:
    return '"' + text.translate(_ESCAPES) + '"'


def _request(env: dict[str, str], stdin: str) -> bytes:
    """The daemon request ``{"op": "cni", "reply": "raw", "env": ..., "stdin": ...}``."""
    pairs = ",".join(f"{_quote(key)}:{_quote(value)}" for key, value in env.items())
    text = '{"op":"cni","reply":"raw","env":{' + pairs + '},"stdin":' + _quote(stdin) + "}\n"
    return text.encode()


def _via_daemon(env: dict[str, str], stdin: bytes) -> tuple[int, str] | None:
    """(exit status, stdout) from netstackd, or None when no daemon takes the request."""
    path = os.path.join(os.environ.get("NETSTACK_RUN_DIR", DEFAULT_RUN_DIR), SOCKET_NAME)
    try:
        text = stdin.decode()
        request = _request(env, text)
    except UnicodeError:
        return None  # not UTF-8: the in-process path reports the decode failure
    sent = False
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(DAEMON_TIMEOUT)
            sock.connect(path)
            sock.sendall(request)
            sent = True
            reply = b""
            while True:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                reply += chunk
                header, newline, body = reply.partition(b"\n")
                if newline and header[:1].isdigit() and len(body) >= int(header.split()[1]):
                    break
                if newline and header.startswith(b"{"):
                    return None  # a JSON error reply: an old daemon, or a bad request
        finally:
            sock.close()
        header, _newline, body = reply.partition(b"\n")
        code, length = (int(field) for field in header.split())
        if len(body) != length:
            raise OSError(f"short reply ({len(body)} of {length} bytes)")
    except (OSError, ValueError) as error:
        if not sent:
            return None  # no daemon: do it here
        # The daemon got the request and then went away: it may or may not have done it.
        details = "retry; DEL is idempotent and ADD is all or nothing"
        message = f"netstackd did not finish the request: {error}"
        fields = f'"code":{_TRY_AGAIN_LATER},"msg":{_quote(message)},"details":{_quote(details)}'
        return 1, '{"cniVersion":"1.1.0",' + fields + "}"
    return code, body.decode()


def _version(stdin: bytes) -> tuple[int, str]:
    import json

    from netstack.cni.versions import LATEST, SUPPORTED_VERSIONS, version_document

    try:
        requested = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        requested = None
    return 0, json.dumps(version_document(requested if requested in SUPPORTED_VERSIONS else LATEST))


def _in_process(stdin: bytes) -> tuple[int, str]:
    if sys.flags.no_site:  # started with -S (the installed executable): load site now
        import site

        site.main()
    from netstack.cni.plugin import run

    return run(dict(os.environ), stdin)


def main() -> int:
    stdin = sys.stdin.buffer.read()
    env = {key: value for key, value in os.environ.items() if key.startswith("CNI_")}
    reply = None
    if env.get("CNI_COMMAND") == "VERSION":
        reply = _version(stdin)
    elif not os.environ.get("NETSTACK_CNI_IN_PROCESS"):
        reply = _via_daemon(env, stdin)
    if reply is None:
        reply = _in_process(stdin)
    code, stdout = reply
    if stdout:
        sys.stdout.write(stdout)
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
