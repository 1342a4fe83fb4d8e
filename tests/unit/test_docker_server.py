"""The plugin's HTTP server on a unix socket in a temp dir (no root): keep-alive, framing
errors, the body limit, change notifications and the socket takeover rules."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from netstack.drivers.bridge import BridgeDriver

from netstack.controller import Controller
from netstack.dockerplugin import wire
from netstack.dockerplugin.server import MAX_HEADERS, PluginServer, plugin_socket
from netstack.errors import Conflict
from netstack.store import Store


def request(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Type: {wire.CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


def serve(tmp_path: Path, scenario: object) -> list[str]:
    """Run `scenario(path)` against a server; the list of change notifications."""
    changes: list[str] = []
    store_dir = tmp_path / "state"
    per_thread = threading.local()  # as netstackd's: SQLite connections stay in their thread

    def make() -> Controller:
        controller: Controller | None = getattr(per_thread, "controller", None)
        if controller is None:
            controller = Controller(
                Store(store_dir), {"bridge": BridgeDriver()}, host_routes=lambda: []
            )
            per_thread.controller = controller
        return controller

    async def main() -> None:
        server = PluginServer(make, lambda: changes.append("changed"))
        path = plugin_socket(tmp_path / "plugins", "unit")
        await server.start(path)
        try:
            await scenario(path)  # type: ignore[operator]
        finally:
            await server.close()
        assert not path.exists()

    asyncio.run(main())
    return changes


def test_keep_alive_calls_and_change_notifications(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(request("/Plugin.Activate", b""))
        status, headers, body = await read_response(reader)
        assert (status, headers["content-type"]) == (200, wire.CONTENT_TYPE)
        assert json.loads(body) == {"Implements": ["NetworkDriver", "IpamDriver"]}
        writer.write(request("/IpamDriver.RequestPool", b'{"Pool": "10.4.0.0/24"}'))
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body)["PoolID"] == "netstack/10.4.0.0/24"
        writer.write(request("/IpamDriver.RequestPool", b'{"Pool": "10.4.0.0/25"}'))
        status, _, body = await read_response(reader)
        assert status == 409 and "overlaps" in json.loads(body)["Error"]
        # one more call on the connection: the notification of the last one is sent once
        # its reply is, so only a later reply proves it was made (no race with the close)
        writer.write(request("/NetworkDriver.GetCapabilities", b"null"))
        assert (await read_response(reader))[0] == 200
        writer.close()

    assert serve(tmp_path, scenario) == ["changed", "changed"]  # the failed one re-reads too


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (request("/Plugin.Activate", b"", "X-Big: " + "y" * (MAX_HEADERS + 1) + "\r\n"), 431),
        (request("/Plugin.Activate", b"x" * (wire.MAX_BODY + 1)), 413),
        (b"GET /Plugin.Activate HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (request("/Nope.Method", b"{}"), 404),
    ],
)
def test_bad_requests_are_answered(tmp_path: Path, raw: bytes, status: int) -> None:
    async def scenario(path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(raw)
        got, _, body = await read_response(reader)
        assert got == status and json.loads(body)["Err"]
        writer.close()
        # the server still serves new connections
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(request("/NetworkDriver.GetCapabilities", b"null"))
        assert (await read_response(reader))[0] == 200
        writer.close()

    serve(tmp_path, scenario)


def test_stale_socket_is_replaced_live_one_is_not(tmp_path: Path) -> None:
    path = plugin_socket(tmp_path / "plugins", "unit")
    path.parent.mkdir(parents=True)
    path.write_text("")  # left by a killed daemon: nobody answers there

    async def scenario(live: Path) -> None:
        assert live == path
        with pytest.raises(Conflict, match="served by another process"):
            await PluginServer(lambda: None).start(path)  # type: ignore[arg-type,return-value]
        assert path.exists()

    serve(tmp_path, scenario)


def test_pipelined_calls_are_answered_in_order(tmp_path: Path) -> None:
    """Requests sent back to back on one connection get their replies in order, also when
    a call run in a worker thread (RequestPool) comes before one answered at once."""

    async def scenario(path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(
            request("/IpamDriver.RequestPool", b'{"Pool": "10.5.0.0/24"}')
            + request("/NetworkDriver.GetCapabilities", b"null")
            + request("/IpamDriver.RequestPool", b'{"Pool": "10.5.0.0/25"}')
        )
        first, second, third = [json.loads((await read_response(reader))[2]) for _ in range(3)]
        assert first["PoolID"] == "netstack/10.5.0.0/24"
        assert second == {"Scope": "local", "ConnectivityScope": "local"}
        assert "overlaps" in third["Error"]
        writer.close()

    serve(tmp_path, scenario)


def test_http_details_clients_rely_on(tmp_path: Path) -> None:
    """A chunked body, Expect: 100-continue, Connection: close (replied, then closed), and
    the client's end of sending (what was sent in full is answered)."""

    async def scenario(path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        parts = (b'{"Pool": ', b'"10.6.0.0/24"}')
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
        writer.write(
            b"POST /IpamDriver.RequestPool HTTP/1.1\r\nHost: p\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        )
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body)["Pool"] == "10.6.0.0/24"
        writer.write(request("/Plugin.Activate", b"", "Expect: 100-continue\r\n"))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
        assert (await read_response(reader))[0] == 200
        writer.write(request("/Plugin.Activate", b"", "Connection: close\r\n"))
        status, headers, _ = await read_response(reader)
        assert (status, headers["connection"]) == (200, "close")
        assert await reader.read() == b""  # closed by the server
        writer.close()
        # a request cut short by the client's end of sending: 400, then closed
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(request("/Plugin.Activate", b"{}")[:-1])
        writer.write_eof()
        assert (await read_response(reader))[0] == 400
        assert await reader.read() == b""
        # requests followed by the end of sending are all answered
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(request("/IpamDriver.RequestPool", b'{"Pool": "10.7.0.0/24"}'))
        writer.write_eof()
        assert (await read_response(reader))[0] == 200
        assert await reader.read() == b""
        writer.close()

    serve(tmp_path, scenario)
