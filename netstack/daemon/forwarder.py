"""Forwarding queries for names netstack does not serve to upstream resolvers (asyncio).

Each forwarded query goes to the upstream servers in order, over UDP from a fresh socket
(a random source port) with a random message id; a truncated reply is asked again over
TCP. The first good reply is relayed with the client's id restored. When no server
answers in time the client gets SERVFAIL, always within `TOTAL_TIMEOUT`, before a
glibc client's own 5-second timeout gives up on us.

Which servers: a network's ``dns.servers`` option, else the host's resolv.conf without
loopback addresses (`UpstreamPolicy`). Clients on nothing but ``--internal`` networks get
REFUSED: an internal network has no way out, and DNS must not become one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from netstack.dns import Forward, Scope, error_reply, truncate
from netstack.dns.resolver import REFUSED, SERVFAIL
from netstack.model import IPAddress
from netstack.resolvconf import upstream_servers

log = logging.getLogger(__name__)

DNS_PORT = 53
ATTEMPT_TIMEOUT = 1.5
TOTAL_TIMEOUT = 4.0
MAX_IN_FLIGHT = 1024
_TC = 0x02  # in the third header byte


@dataclass(frozen=True)
class UpstreamPolicy:
    """Which upstream servers serve a client scope (pure)."""

    network_servers: Mapping[str, Sequence[IPAddress]] = field(default_factory=dict)
    internal: frozenset[str] = frozenset()

    def servers(self, scope: Scope, host_servers: Sequence[IPAddress]) -> list[IPAddress] | None:
        """The servers to ask, in order; None when the scope may not forward at all."""
        if scope and all(network_id in self.internal for network_id in scope):
            return None
        for network_id in scope:
            configured = self.network_servers.get(network_id)
            if configured:
                return list(configured)
        return list(host_servers)


class HostServers:
    """The host resolv.conf's servers, re-read when the file changes (checked lazily)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._servers: list[IPAddress] = []

    def get(self) -> list[IPAddress]:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_ino)
            if stamp != self._stamp:
                self._servers = upstream_servers(self.path.read_text(errors="replace"))
                self._stamp = stamp
        except OSError:
            self._servers, self._stamp = [], None
        return self._servers


class Forwarder:
    """Relays queries upstream; at most `MAX_IN_FLIGHT` at a time (more are dropped)."""

    def __init__(self, port: int = DNS_PORT) -> None:
        self.port = port
        self.in_flight = 0
        self.dropped = 0

    def busy(self) -> bool:
        return self.in_flight >= MAX_IN_FLIGHT

    async def reply(self, forward: Forward, servers: list[IPAddress] | None) -> bytes | None:
        """The reply to send the client: upstream's answer, SERVFAIL or REFUSED."""
        if servers is None:
            return error_reply(forward.query, REFUSED)
        self.in_flight += 1
        try:
            return await self._ask(forward, servers)
        finally:
            self.in_flight -= 1

    async def _ask(self, forward: Forward, servers: list[IPAddress]) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TOTAL_TIMEOUT
        upstream_id = secrets.randbits(16)
        message = struct.pack("!H", upstream_id) + forward.query[2:]
        question = _question(message)
        for server in servers:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(min(ATTEMPT_TIMEOUT, remaining)):
                    reply = await self._udp(server, message, question)
                if reply[2] & _TC:
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        reply = await self._tcp(server, message, question)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                log.debug("dns: upstream %s failed for %s: %r", server, forward.qname, exc)
                continue
            return truncate(forward.query[:2] + reply[2:], forward.udp_size)
        log.debug(  # not info: any sandbox could flood the host's log with failing names
            "dns: no upstream answered %s %s (tried %s)",
            forward.qname,
            forward.qtype,
            ", ".join(map(str, servers)) or "none configured",
        )
        return error_reply(forward.query, SERVFAIL)

    async def _udp(self, server: IPAddress, message: bytes, question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET if server.version == 4 else socket.AF_INET6
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, (str(server), self.port))
            await loop.sock_sendall(sock, message)
            while True:  # ignore stray datagrams that are not the reply to this query
                reply = await loop.sock_recv(sock, 65535)
                if _matches(reply, message, question):
                    return reply

    async def _tcp(self, server: IPAddress, message: bytes, question: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(str(server), self.port)
        try:
            writer.write(len(message).to_bytes(2, "big") + message)
            await writer.drain()
            length = int.from_bytes(await reader.readexactly(2), "big")
            reply = await reader.readexactly(length)
        finally:
            writer.close()
        if not _matches(reply, message, question):
            raise ValueError("upstream TCP reply does not match the query")
        return reply


def _question(message: bytes) -> bytes:
    """The question section of a one-question message, lower-cased (for matching replies)."""
    offset = 12
    while offset < len(message) and message[offset]:
        offset += 1 + message[offset]
    return message[12 : offset + 5].lower()


def _matches(reply: bytes, message: bytes, question: bytes) -> bool:
    return (
        len(reply) >= 12
        and reply[:2] == message[:2]
        and bool(reply[2] & 0x80)
        and reply[12 : 12 + len(question)].lower() == question
    )
