"""netstackd's API: newline-delimited JSON requests on a unix socket.

Request ``{"op": "status", ...}`` -> reply ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. A malformed request gets an error reply; it never stops
the daemon.

A request with ``"reply": "raw"`` whose handler returns ``{"code": int, "stdout": str}``
(the CNI op) is answered ``b"<code> <length>\n"`` + the stdout bytes instead: the CNI
plugin's fast path then needs no JSON decoder (importing json costs it ~10 ms).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from netstack.errors import NetstackError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 1 << 20


class Api:
    """Dispatches requests to handlers registered by name."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def register(self, op: str, handler: Handler) -> None:
        self.handlers[op] = handler

    async def handle(self, raw: bytes) -> dict[str, Any] | bytes:
        """One request line in, one reply object (or raw reply bytes) out (never raises)."""
        try:
            request = json.loads(raw)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError("expected a JSON object with a string 'op'")
        except ValueError as exc:
            return {"ok": False, "error": f"malformed request: {exc}"}
        handler = self.handlers.get(request["op"])
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown op {request['op']!r}; known: {known}"}
        try:
            result = await handler(request)
            if request.get("reply") == "raw" and isinstance(result, dict):
                stdout = str(result.get("stdout", "")).encode("utf-8", "surrogateescape")
                return b"%d %d\n" % (int(result.get("code", 1)), len(stdout)) + stdout
            return {"ok": True, "result": result}
        except NetstackError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not stop the daemon: log it, answer it
            log.exception("op=%s failed", request["op"])
            return {"ok": False, "error": f"internal error: {exc}"}

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    writer.write(b'{"ok": false, "error": "request too large"}\n')
                    return
                reply = await self.handle(line)
                if isinstance(reply, bytes):
                    writer.write(reply)
                else:
                    writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()
