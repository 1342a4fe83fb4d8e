"""The plugin's HTTP/1.1 server on a unix socket, on netstackd's asyncio loop.

HTTP framing is h11's (a sans-IO HTTP/1.1 state machine): this module only moves bytes
between the socket and h11, and runs each call (`app.handle`) in a worker thread, since
the controller blocks on the kernel and SQLite. Keep-alive connections are served call
after call, as Docker's plugin client reuses them. Malformed HTTP gets a 400, a body over
`wire.MAX_BODY` a 413, then the connection is closed; nothing stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import h11

from netstack.dockerplugin import app, wire
from netstack.errors import Conflict

log = logging.getLogger(__name__)

DEFAULT_PLUGIN_DIR = "/run/docker/plugins"
DEFAULT_PLUGIN_NAME = "netstack"
MAX_HEADERS = 64 * 1024
READ_SIZE = 64 * 1024


def plugin_dir() -> Path:
    """NETSTACK_DOCKER_PLUGIN_DIR, or Docker's /run/docker/plugins."""
    return Path(os.environ.get("NETSTACK_DOCKER_PLUGIN_DIR", DEFAULT_PLUGIN_DIR))


def plugin_socket(directory: Path, name: str) -> Path:
    """Where Docker looks for plugin NAME: DIR/NAME.sock."""
    return directory / f"{name}.sock"


class _TooLarge(Exception):
    pass


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
        self._server = await asyncio.start_unix_server(self.serve_connection, path=str(path))
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

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        try:
            while True:
                try:
                    received = await self._read_request(conn, reader)
                except _TooLarge:
                    message = f"request body larger than {wire.MAX_BODY} bytes"
                    await self._send(conn, writer, 413, {"Err": message}, close=True)
                    return
                if received is None:
                    return
                request, body = received
                reply = await self._call(request, body)
                await self._send(conn, writer, reply.status, reply.document)
                if reply.after is not None:  # e.g. make a veth while Docker prepares the Join
                    asyncio.get_running_loop().run_in_executor(
                        None, app.run_after, reply.after, self.make_controller
                    )
                if reply.changed and self.on_change is not None:
                    self.on_change()  # must not delay the next call on this connection
                elif not reply.changed and self.on_call is not None:
                    self.on_call()
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                document = {"Err": f"bad HTTP request: {exc}"}
                with contextlib.suppress(Exception):  # the client may be gone already
                    await self._send(conn, writer, exc.error_status_hint, document, close=True)
        except (ConnectionError, h11.LocalProtocolError) as exc:
            log.debug("docker plugin connection ended: %s", exc)
        except Exception:  # a bug must not stop the server: log it, drop this connection
            log.exception("docker plugin connection failed")
        finally:
            writer.close()

    async def _call(self, request: h11.Request, body: bytes) -> app.Reply:
        if request.method != b"POST":
            return app.Reply(405, {"Err": "plugin methods are called with POST"})
        path = request.target.decode("ascii", "replace")
        loop = asyncio.get_running_loop()
        if app.quick(path, body):
            return app.handle(path, body, self.make_controller)
        self.calls_in_flight += 1
        try:
            return await loop.run_in_executor(None, app.handle, path, body, self.make_controller)
        finally:
            self.calls_in_flight -= 1

    @staticmethod
    async def _read_request(
        conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request, bytes] | None:
        """The next request and its body; None when the client closed between requests."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(READ_SIZE))
            elif isinstance(event, h11.Request):
                request = event
                for name, value in event.headers:
                    if name == b"content-length" and int(value) > wire.MAX_BODY:
                        raise _TooLarge
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > wire.MAX_BODY:
                    raise _TooLarge
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # PAUSED cannot happen before EndOfMessage
                return None

    @staticmethod
    async def _send(
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        document: wire.Document,
        close: bool = False,
    ) -> None:
        body = wire.encode(document)
        headers = [
            ("Content-Type", wire.CONTENT_TYPE),
            ("Content-Length", str(len(body))),
        ]
        if close:
            headers.append(("Connection", "close"))
        data = conn.send(h11.Response(status_code=status, headers=headers))
        data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
        writer.write(data)
        await writer.drain()
