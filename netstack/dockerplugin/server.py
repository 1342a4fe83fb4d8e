"""The plugin's HTTP/1.1 server on a unix socket, on netstackd's asyncio loop.

HTTP parsing is httptools' (llhttp, the C parser of Node.js); a response is one status
line, two headers and a JSON body, written here. Each connection is an `asyncio.Protocol`:
a call without kernel work or waiting (`app.quick`) is answered as soon as its request is
parsed, the others run in a worker thread (the controller blocks on the kernel and
SQLite), and the calls of one connection are answered in order. Why not h11 and streams:
one plugin call cost ~0.5 ms of Python there (h11's state machine and validation, the
stream reader), ~0.12 ms here, and `docker network connect` makes five calls in a row.
Keep-alive connections are served call after call, as Docker's plugin client reuses them.
Malformed HTTP gets a 400, headers over `MAX_HEADERS` a 431, a body over `wire.MAX_BODY`
a 413, then the connection is closed; nothing stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import httptools

from netstack.dockerplugin import app, wire
from netstack.errors import Conflict

log = logging.getLogger(__name__)

DEFAULT_PLUGIN_DIR = "/run/docker/plugins"
DEFAULT_PLUGIN_NAME = "netstack"
MAX_HEADERS = 64 * 1024
MAX_QUEUED = 16  # requests parsed ahead of their turn on one connection: then stop reading


def plugin_dir() -> Path:
    """NETSTACK_DOCKER_PLUGIN_DIR, or Docker's /run/docker/plugins."""
    return Path(os.environ.get("NETSTACK_DOCKER_PLUGIN_DIR", DEFAULT_PLUGIN_DIR))


def plugin_socket(directory: Path, name: str) -> Path:
    """Where Docker looks for plugin NAME: DIR/NAME.sock."""
    return directory / f"{name}.sock"


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the unix socket `path`."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def response(status: int, document: wire.Document, close: bool = False) -> bytes:
    """One HTTP/1.1 response with a JSON body."""
    body = wire.encode(document)
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    connection = "Connection: close\r\n" if close else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {wire.CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n{connection}\r\n"
    )
    return head.encode("latin-1") + body


@dataclass(frozen=True)
class _Request:
    method: bytes
    path: str
    body: bytes
    keep_alive: bool


class _Refused(Exception):
    """A request this server answers with an error status, then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PluginServer:
    """Serves `app.handle` over HTTP on one unix socket."""

    def __init__(
        self,
        make_controller: app.ControllerFactory,
        on_change: Callable[[], None] | None = None,
        on_call: Callable[[], None] | None = None,
    ) -> None:
        self.make_controller = make_controller
        self.on_change = on_change  # after a call that changed the store
        self.on_call = on_call  # after any other call
        self._server: asyncio.AbstractServer | None = None
        self.path: Path | None = None
        self.calls_in_flight = 0

    async def start(self, path: Path) -> None:
        """Listen on `path`; a stale socket file there (its server gone) is replaced.

        Raises Conflict when another process serves `path`, OSError when it cannot listen.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        if _answers(path):
            raise Conflict(
                f"{path} is served by another process (another netstackd?); stop it or "
                "give this one another --docker-plugin name"
            )
        path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connection, path=str(path))
        os.chmod(path, 0o660)
        self.path = path
        log.info("docker plugin serving on %s", path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _connection(self) -> _Connection:
        return _Connection(self)

    async def call(self, request: _Request) -> app.Reply:
        """One call's reply: quick calls at once, the others in a worker thread."""
        if request.method != b"POST":
            return app.Reply(405, {"Err": "plugin methods are called with POST"})
        if app.quick(request.path, request.body):
            return app.handle(request.path, request.body, self.make_controller)
        self.calls_in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, app.handle, request.path, request.body, self.make_controller
            )
        finally:
            self.calls_in_flight -= 1

    def answered(self, reply: app.Reply) -> None:
        """After a reply was written: its follow-up work, then the change notification."""
        if reply.after is not None:  # e.g. make a veth while Docker prepares the Join
            asyncio.get_running_loop().run_in_executor(
                None, app.run_after, reply.after, self.make_controller
            )
        if reply.changed and self.on_change is not None:
            self.on_change()  # must not delay the next call on this connection
        elif not reply.changed and self.on_call is not None:
            self.on_call()


class _Connection(asyncio.Protocol):
    """One client's connection: its requests parsed as bytes arrive, answered in order."""

    def __init__(self, server: PluginServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = bytearray()
        self._body = bytearray()
        self._header_bytes = 0
        self._queue: deque[_Request] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._in_message = False  # part of a request read, not all of it
        self._eof = False  # the client half-closed: close once its requests are answered

    # asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.status, str(refused))
            else:  # a bug: answer it, never take the server down
                log.error("docker plugin connection failed", exc_info=refused)
                self._refuse(500, f"internal error: {refused!r}")
        except httptools.HttpParserUpgrade:
            self._refuse(400, "bad HTTP request: protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"bad HTTP request: {exc}")

    def eof_received(self) -> bool:
        """The client will send no more: answer what it sent, then close."""
        if self._in_message:
            self._refuse(400, "bad HTTP request: the connection ended in the middle of a request")
            return False
        if self._worker is None:
            self._close()
            return False
        self._eof = True  # the worker closes after the last reply
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._queue.clear()

    # httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self._url.clear()
        self._body.clear()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        lowered = name.lower()
        if lowered == b"content-length" and value.strip().isdigit():
            if int(value) > wire.MAX_BODY:
                raise _Refused(413, f"request body larger than {wire.MAX_BODY} bytes")
        elif lowered == b"expect" and value.strip().lower() == b"100-continue":
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > wire.MAX_BODY:
            raise _Refused(413, f"request body larger than {wire.MAX_BODY} bytes")

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._closed:
            return
        request = _Request(
            self.parser.get_method(),
            self._url.decode("ascii", "replace"),
            bytes(self._body),
            self.parser.should_keep_alive(),
        )
        if (
            self._worker is None
            and request.method == b"POST"
            and app.quick(request.path, request.body)
        ):  # the common case, answered here and now
            self._reply(
                request, app.handle(request.path, request.body, self.server.make_controller)
            )
            return
        self._queue.append(request)
        if len(self._queue) >= MAX_QUEUED and self.transport is not None:
            self.transport.pause_reading()
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    # --------------------------------------------------------------------------------------
    def _count_header_bytes(self, count: int) -> None:
        self._header_bytes += count
        if self._header_bytes > MAX_HEADERS:
            raise _Refused(431, f"request headers larger than {MAX_HEADERS} bytes")

    async def _work(self) -> None:
        """Answer the queued requests one after the other."""
        try:
            while self._queue and not self._closed:
                request = self._queue.popleft()
                reply = await self.server.call(request)
                self._reply(request, reply)
                if self.transport is not None and not self._closed:
                    self.transport.resume_reading()
        except Exception:  # a bug must not stop the server: log it, drop this connection
            log.exception("docker plugin connection failed")
            self._close()
        finally:
            self._worker = None
            if self._eof:
                self._close()

    def _reply(self, request: _Request, reply: app.Reply) -> None:
        if self._closed or self.transport is None:
            return
        self.transport.write(response(reply.status, reply.document, not request.keep_alive))
        self.server.answered(reply)
        if not request.keep_alive:
            self._close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot be served, and close (its framing is lost)."""
        if self._closed or self.transport is None:
            return
        self.transport.write(response(status, {"Err": message}, close=True))
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._queue.clear()
        if self.transport is not None:
            self.transport.close()
