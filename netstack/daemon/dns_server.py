"""The embedded DNS resolver's I/O: UDP and TCP port 53 on every bridge gateway address.

Where it listens: like aardvark-dns, on each network's gateway addresses in the host
namespace, which every sandbox on the network reaches directly (no NAT, no socket inside
each sandbox); a sandbox's resolv.conf names them.

The UDP hot path is a plain blocking loop, one thread per socket, answering from a
per-thread `ReplyCache`: no event loop per packet (DESIGN.md, section 2, measured 183k
queries/s for this shape against 34k on asyncio's loop). It takes every waiting query in
one ``recvmmsg`` and sends their replies in one ``sendmmsg`` (`mmsg.BatchSocket`), as the
two syscalls per query were nearly all of its cost; ``recvfrom``/``sendto`` where those
calls are not available. Only forwarded
queries leave the thread, handed to the asyncio loop. TCP is served on the loop: it
carries the rare truncated answers and is not the hot path.

The records are one immutable `Records` object, swapped whole when the store changes;
threads read the reference, caches notice the new object on their next query.

Sockets bind with IP_FREEBIND, so a gateway address that is not configured yet (a bridge
being created, an IPv6 address still in DAD) does not make the bind fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from netstack.daemon import mmsg
from netstack.daemon.forwarder import Forwarder, HostServers, UpstreamPolicy
from netstack.dns import Forward, Records, RecordsBuilder, ReplyCache, build_records
from netstack.model import EndpointRow, IPAddress, Network
from netstack.network_options import dns_servers

log = logging.getLogger(__name__)

DNS_PORT = 53
TCP_IDLE_TIMEOUT = 10.0
MAX_TCP_CLIENTS = 256
_IP_FREEBIND = 15
_UDP_BUFFER = 1 << 22
MAX_KNOWN_SENDERS = 4096
"""Client addresses remembered as text (for the scope lookup) per UDP thread."""
UDP_THREADS = min(2, os.cpu_count() or 1)
"""UDP sockets per address (SO_REUSEPORT): the kernel spreads clients across them, and as
nearly all of a query's cost is the sendto/recvfrom syscalls, which run without the GIL,
a second thread uses a second core."""


@dataclass(frozen=True, slots=True)
class Listener:
    """One address the resolver serves: its UDP thread and its TCP server."""

    address: IPAddress
    udp: tuple[UdpThread, ...]
    tcp: asyncio.Server


def _socket(address: IPAddress, kind: socket.SocketKind, port: int) -> socket.socket:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_BUFFER)
        sock.bind((str(address), port))
    except OSError:
        sock.close()
        raise
    return sock


class UdpThread(threading.Thread):
    """Serves one UDP socket: answers from the cache, hands forwarded queries to the loop."""

    def __init__(
        self,
        sock: socket.socket,
        records: Callable[[], Records],
        forward: Callable[[socket.socket, Any, Forward], None],
        batched: bool = True,
    ) -> None:
        super().__init__(name=f"dns-udp-{sock.getsockname()[0]}", daemon=True)
        self.sock = sock
        self.batched = batched
        self.records = records
        self.forward = forward
        self.stopping = False

    def run(self) -> None:
        if self.batched and mmsg.available():
            self._serve_batches(mmsg.BatchSocket(self.sock))
        else:
            self._serve_one_by_one()

    def _serve_batches(self, batch: mmsg.BatchSocket) -> None:
        """Every waiting query in one recvmmsg, their replies in one sendmmsg."""
        records = self.records
        cache = ReplyCache()
        senders: dict[bytes, tuple[str, int]] = {}
        while True:
            try:
                count = batch.recv()
            except OSError as exc:
                if self.stopping:
                    return
                log.debug("dns: udp receive failed: %s", exc)
                continue
            if self.stopping:  # woken by stop()
                return
            current = records()
            for i in range(count):
                query = batch.datagram(i)
                if not query:
                    continue
                raw = batch.address(i)
                client = senders.get(raw)
                if client is None:
                    if len(senders) >= MAX_KNOWN_SENDERS:
                        senders.clear()
                    client = senders[raw] = mmsg.sender(raw)
                reply = self._answer(cache, query, client, current)
                if reply is not None and not batch.reply(i, reply):
                    self._send(reply, client)
            batch.flush()

    def _serve_one_by_one(self) -> None:
        """recvfrom/sendto: where recvmmsg is not available."""
        recv, records = self.sock.recvfrom, self.records
        cache = ReplyCache()
        while True:
            try:
                query, client = recv(65535)
            except OSError as exc:
                if self.stopping:
                    return
                log.debug("dns: udp receive failed: %s", exc)
                continue
            if client is None:  # woken by stop()
                if self.stopping:
                    return
                continue
            reply = self._answer(cache, query, client, records())
            if reply is not None:
                self._send(reply, client)

    def _answer(
        self, cache: ReplyCache, query: bytes, client: Any, records: Records
    ) -> bytes | None:
        """The reply to send for `query`; None when it is dropped or handed to the loop to
        forward. Never raises: a bug costs one query, never the listener."""
        try:
            result = cache.answer(query, client[0], records)
            if result is None or result.__class__ is bytes:
                return result
            self.forward(self.sock, client, result)  # type: ignore[arg-type]
        except OSError as exc:
            log.debug("dns: udp send to %s failed: %s", client[0], exc)
        except Exception:
            log.exception("dns: failed to serve a query from %s", client[0])
        return None

    def _send(self, reply: bytes, client: Any) -> None:
        try:
            self.sock.sendto(reply, client)
        except OSError as exc:
            log.debug("dns: udp send to %s failed: %s", client[0], exc)

    def stop(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)  # wakes the blocked recvfrom
        self.join(timeout=5)
        self.sock.close()


class DnsServer:
    """The resolver: records, listeners on the gateway addresses, forwarding."""

    def __init__(
        self, host_servers: HostServers, port: int = DNS_PORT, udp_threads: int = UDP_THREADS
    ) -> None:
        self.port = port
        self.udp_threads = max(1, udp_threads)
        self.host_servers = host_servers
        self.records = build_records([], [])
        self.policy = UpstreamPolicy()
        self.forwarder = Forwarder()
        self.listeners: dict[IPAddress, Listener] = {}
        self._tcp_cache = ReplyCache()
        self._tcp_clients = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _records(self) -> Records:
        return self.records

    async def update(
        self, records: Records, policy: UpstreamPolicy, addresses: Iterable[IPAddress]
    ) -> None:
        """Serve `records` from now on, listening on exactly `addresses`."""
        self._loop = asyncio.get_running_loop()
        self.records = records
        self.policy = policy
        wanted = set(addresses)
        for address in [a for a in self.listeners if a not in wanted]:
            await self._close(self.listeners.pop(address))
        for address in sorted(wanted - set(self.listeners), key=str):
            try:
                self.listeners[address] = await self._open(address)
            except OSError as exc:
                log.warning("dns: cannot listen on %s port %d: %s", address, self.port, exc)

    async def close(self) -> None:
        for address in list(self.listeners):
            await self._close(self.listeners.pop(address))
        for task in list(self._tasks):
            task.cancel()

    def status(self) -> dict[str, Any]:
        return {
            "listening": sorted(str(a) for a in self.listeners),
            "port": self.port,
            "generation": self.records.generation,
            "forwarding": self.forwarder.in_flight,
        }

    async def _open(self, address: IPAddress) -> Listener:
        udp_socks: list[socket.socket] = []
        try:
            for _ in range(self.udp_threads):
                udp_socks.append(_socket(address, socket.SOCK_DGRAM, self.port))
            tcp_sock = _socket(address, socket.SOCK_STREAM, self.port)
            try:
                tcp = await asyncio.start_server(self._serve_tcp, sock=tcp_sock, backlog=128)
            except BaseException:
                tcp_sock.close()
                raise
        except BaseException:
            for sock in udp_socks:
                sock.close()
            raise
        threads = tuple(UdpThread(sock, self._records, self._forward_udp) for sock in udp_socks)
        for thread in threads:
            thread.start()
        log.info("dns: serving on %s port %d (udp, tcp)", address, self.port)
        return Listener(address, threads, tcp)

    async def _close(self, listener: Listener) -> None:
        listener.tcp.close()
        for thread in listener.udp:
            await asyncio.get_running_loop().run_in_executor(None, thread.stop)
        log.info("dns: stopped serving on %s", listener.address)

    # forwarding ----------------------------------------------------------------------------
    def _servers(self, client: str) -> list[IPAddress] | None:
        scope = self.records.scope(client) or ()
        return self.policy.servers(scope, self.host_servers.get())

    def _forward_udp(self, sock: socket.socket, client: Any, forward: Forward) -> None:
        """Called from a UDP thread: relay on the loop, reply from the same socket."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._start_forward, sock, client, forward)

    def _start_forward(self, sock: socket.socket, client: Any, forward: Forward) -> None:
        if self.forwarder.busy():
            self.forwarder.dropped += 1
            return
        task = asyncio.create_task(self._relay_udp(sock, client, forward))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay_udp(self, sock: socket.socket, client: Any, forward: Forward) -> None:
        reply = await self.forwarder.reply(forward, self._servers(client[0]))
        if reply is not None and sock.fileno() != -1:
            with contextlib.suppress(OSError):
                sock.sendto(reply, client)

    # tcp ---------------------------------------------------------------------------------
    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._tcp_clients >= MAX_TCP_CLIENTS or not peer:
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    length = int.from_bytes(await reader.readexactly(2), "big")
                    query = await reader.readexactly(length)
                result = self._tcp_cache.answer(query, peer[0], self.records, tcp=True)
                if isinstance(result, Forward):
                    if self.forwarder.busy():
                        return
                    result = await self.forwarder.reply(result, self._servers(peer[0]))
                if result is None:
                    return  # not a query we answer: close, as for garbage
                writer.write(len(result).to_bytes(2, "big") + result)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_clients -= 1
            writer.close()


def dns_config(
    networks: list[Network],
    endpoints: Sequence[EndpointRow],
    generation: int,
    builder: RecordsBuilder | None = None,
    changes: tuple[Sequence[EndpointRow], Sequence[EndpointRow]] | None = None,
) -> tuple[Records, UpstreamPolicy, list[IPAddress]]:
    """From the store's state (its networks and `Store.endpoint_name_rows`): the records,
    the upstream policy and the addresses to serve.

    Addresses: the gateways of bridge networks, which live on the bridge in the host
    namespace, where netstackd runs. `builder` (one per daemon) carries what it worked out
    from one call to the next; `changes` are the rows (removed, added) since its last call
    (`RecordsBuilder.build_rows`).
    """
    builder = builder or RecordsBuilder()
    records = builder.build_rows(networks, endpoints, generation, changes)
    policy = UpstreamPolicy(
        network_servers={n.id: dns_servers(n.options) for n in networks if dns_servers(n.options)},
        internal=frozenset(n.id for n in networks if n.internal),
    )
    addresses = [
        pool.gateway
        for network in networks
        if network.driver == "bridge"
        for pool in network.pools
        if pool.gateway is not None
    ]
    return records, policy, addresses
