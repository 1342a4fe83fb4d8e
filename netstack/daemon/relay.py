"""The loopback relay: [::1]:HOST_PORT to a sandbox, for published ports (asyncio).

Published ports are DNAT in the kernel, which cannot serve the IPv6 loopback: Linux drops
de-NATed replies addressed to ::1 that arrive on a non-loopback interface, and IPv6 has no
route_localnet. The bridge driver's ruleset therefore leaves the host's traffic to ::1
alone, and netstackd relays it in userland, as Docker's docker-proxy does:

* which ports: every published TCP or UDP binding that answers on the IPv6 loopback (host
  IP "", "::" or "::1"); one listener on [::1]:HOST_PORT per binding (a published range is
  stored as one binding per port, so it gets one listener per port);
* where to: the endpoint's IPv6 address if it has one, else its IPv4 address, at the
  container port. The sandbox sees the host's address on the bridge (the gateway) as the
  client, as it does for the host's 127.0.0.1 (masqueraded in the kernel);
* SCTP is not relayed (this kernel has no SCTP sockets).

`relay_targets` (pure) derives the listeners from the store's endpoints and `FlowTable`
(pure) keeps the UDP flows; `LoopbackRelay` owns the sockets. A port that cannot be bound
on ::1 (taken by another process, or no ::1 because `lo` is down or IPv6 is disabled) is
logged and skipped, and tried again on the next `sync`; the other ports keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from netstack.model import Endpoint, IPInterface, PortBinding, RelayStoreRow

log = logging.getLogger(__name__)

RELAY_ADDRESS = "::1"
PROTOCOLS = ("tcp", "udp")
LISTEN_BACKLOG = 128
CONNECT_TIMEOUT = 10.0
TCP_CHUNK = 1 << 16
UDP_IDLE_TIMEOUT = 30.0
UDP_MAX_FLOWS = 1024
# How often ports that could not be bound are tried again (without waiting for a `sync`).
RETRY_INTERVAL = 10.0
MAX_DATAGRAM = 65535
# Datagrams read per readiness callback, so one busy socket cannot starve the others.
UDP_BATCH = 64

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, order=True)
class RelayTarget:
    """One relayed port: [::1]:host_port/protocol -> target_ip:target_port."""

    protocol: str
    host_port: int
    target_ip: str
    target_port: int

    @property
    def destination(self) -> str:
        """target_ip:target_port, an IPv6 address in brackets."""
        address = f"[{self.target_ip}]" if ":" in self.target_ip else self.target_ip
        return f"{address}:{self.target_port}"

    def __str__(self) -> str:
        return f"[{RELAY_ADDRESS}]:{self.host_port}/{self.protocol} -> {self.destination}"


def _answers_on_ipv6_loopback(host_ip: str) -> bool:
    """Whether a binding's host IP covers ::1: every address (""), every IPv6 one, or ::1."""
    if host_ip == "":
        return True
    try:
        address = ipaddress.ip_address(host_ip)
    except ValueError:
        return False
    return address.version == 6 and (address.is_unspecified or address.is_loopback)


def _target(binding: PortBinding, address: IPInterface | None) -> RelayTarget | None:
    """The listener one binding of an endpoint with this address needs, if any."""
    if (
        address is None
        or binding.protocol not in PROTOCOLS
        or 6 not in binding.families
        or not _answers_on_ipv6_loopback(binding.host_ip)
    ):
        return None
    return RelayTarget(binding.protocol, binding.host_port, str(address.ip), binding.container_port)


def relay_targets(endpoints: Iterable[Endpoint]) -> list[RelayTarget]:
    """The relay's listeners for these endpoints' published ports, sorted (pure, no I/O).

    An endpoint without any address, and SCTP bindings, give none.
    """
    targets: set[RelayTarget] = set()
    for endpoint in endpoints:
        address = endpoint.ipv6 if endpoint.ipv6 is not None else endpoint.ipv4
        for binding in endpoint.ports:
            target = _target(binding, address)
            if target is not None:
                targets.add(target)
    return sorted(targets)


RelayRow = RelayStoreRow
"""A published port as `Store.relay_rows` gives it: endpoint id, protocol, host IP, host
port, container port, and its endpoint's IPv4 and IPv6 interface."""


@dataclass(frozen=True)
class RelayChange:
    """What `LoopbackRelay.apply` brings the listeners to: exactly the targets `full`, or,
    when `full` is None, the last ones less `removed` plus `added`."""

    full: list[RelayTarget] | None = None
    removed: list[RelayTarget] = field(default_factory=list)
    added: list[RelayTarget] = field(default_factory=list)


def _row_target(row: RelayRow) -> RelayTarget | None:
    _, protocol, host_ip, host_port, container_port, ipv4, ipv6 = row
    text = ipv6 if ipv6 is not None else ipv4
    address = None if text is None else ipaddress.ip_interface(text)
    return _target(PortBinding(protocol, host_ip, host_port, container_port), address)


def _endpoint_targets(rows: Iterable[RelayRow]) -> list[RelayTarget]:
    """One endpoint's targets, in row order, without duplicates."""
    return list(dict.fromkeys(t for row in rows if (t := _row_target(row)) is not None))


class RelayPlanner:
    """The relay's targets from the store's rows (`Store.relay_rows`), kept per endpoint:
    every row's after a full read of the store (`full`), then only those of the endpoints
    whose published ports changed (`change`). Working out every row's target on each
    reload cost 0.28 ms at 500 published ports and 0.5 ms at 1000 on a quiet machine here,
    and ~3x that inside netstackd at work; a change costs the same at 1 or 1000. One caller
    at a time; after a failed reload, start again with `full`."""

    def __init__(self) -> None:
        self._by_endpoint: dict[str, list[RelayTarget]] = {}

    def full(self, rows: Iterable[RelayRow]) -> RelayChange:
        """Every row's target, in row order, without duplicates."""
        grouped: dict[str, list[RelayRow]] = {}
        for row in rows:
            grouped.setdefault(row[0], []).append(row)
        self._by_endpoint = {}
        for endpoint_id, endpoint_rows in grouped.items():
            if targets := _endpoint_targets(endpoint_rows):
                self._by_endpoint[endpoint_id] = targets
        every = itertools.chain.from_iterable(self._by_endpoint.values())
        return RelayChange(full=list(dict.fromkeys(every)))

    def change(self, published: Mapping[str, Sequence[RelayRow]]) -> RelayChange:
        """The targets removed and added, given the rows now of every endpoint whose
        published ports changed (none: unpublished or gone). A target an endpoint keeps is
        in neither list, so its listener and connections stay."""
        removed: list[RelayTarget] = []
        added: list[RelayTarget] = []
        for endpoint_id, rows in published.items():
            old = self._by_endpoint.pop(endpoint_id, [])
            new = _endpoint_targets(rows)
            if new:
                self._by_endpoint[endpoint_id] = new
            removed += [target for target in old if target not in new]
            added += [target for target in new if target not in old]
        return RelayChange(removed=removed, added=added)


class FlowTable(Generic[K, V]):
    """UDP flows by client address, least recently active first (pure: callers pass `now`).

    At most `max_flows` flows: adding one more evicts the least recently active. A flow is
    active when a datagram passes in either direction (`touch`).
    """

    def __init__(self, idle_timeout: float, max_flows: int) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self._flows: OrderedDict[K, tuple[V, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def get(self, key: K) -> V | None:
        entry = self._flows.get(key)
        return None if entry is None else entry[0]

    def touch(self, key: K, now: float) -> None:
        """Mark the flow active now. Ignores unknown keys."""
        entry = self._flows.get(key)
        if entry is not None:
            self._flows[key] = (entry[0], now)
            self._flows.move_to_end(key)

    def add(self, key: K, value: V, now: float) -> list[V]:
        """Add a flow (replacing one with the same key); the flows evicted to make room."""
        evicted = []
        old = self._flows.pop(key, None)
        if old is not None:
            evicted.append(old[0])
        while len(self._flows) >= self.max_flows:
            evicted.append(self._flows.popitem(last=False)[1][0])
        self._flows[key] = (value, now)
        return evicted

    def remove(self, key: K) -> V | None:
        entry = self._flows.pop(key, None)
        return None if entry is None else entry[0]

    def expire(self, now: float) -> list[V]:
        """Remove and return the flows idle for longer than `idle_timeout`."""
        expired = []
        while self._flows:
            key, (value, last) = next(iter(self._flows.items()))
            if now - last <= self.idle_timeout:
                break
            del self._flows[key]
            expired.append(value)
        return expired

    def clear(self) -> list[V]:
        """Remove and return every flow."""
        values = [value for value, _ in self._flows.values()]
        self._flows.clear()
        return values


def _listening_socket(kind: socket.SocketKind, port: int) -> socket.socket:
    """A non-blocking socket bound on [::1]:port (listening, for TCP). Raises OSError."""
    sock = socket.socket(socket.AF_INET6, kind)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((RELAY_ADDRESS, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


# TCP ---------------------------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then half-close the writer. At most one chunk in memory
    beyond the transports' own buffers: each write waits for the writer to drain."""
    while data := await reader.read(TCP_CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


_LINGER_RESET = struct.pack("ii", 1, 0)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once with a reset (not a FIN), so the peer sees the connection failed."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class _TcpListener:
    """[::1]:host_port accepting connections, each relayed to the target."""

    def __init__(self, target: RelayTarget) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        """Bind and serve. Raises OSError when [::1]:host_port cannot be bound."""
        sock = _listening_socket(socket.SOCK_STREAM, self.target.host_port)
        try:
            self.server = await asyncio.start_server(self._serve, sock=sock, limit=TCP_CHUNK)
        except BaseException:
            sock.close()
            raise

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        if self._closing:  # accepted just before close(), started just after it
            _abort(client)
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._relay(client_reader, client)
        except asyncio.CancelledError:
            # Cancelled by close(): end quietly (asyncio 3.11 logs a cancelled connection
            # handler as an error). Any other cancellation goes on.
            if not self._closing:
                raise
        finally:
            self._connections.discard(task)

    async def _relay(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        peer = client.get_extra_info("peername")
        target = self.target
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                upstream_reader, upstream = await asyncio.open_connection(
                    target.target_ip, target.target_port, limit=TCP_CHUNK
                )
        except (OSError, TimeoutError) as exc:
            log.debug("loopback relay %s: client=%s: cannot connect: %s", target, peer, exc)
            _abort(client)  # a reset, as the sandbox itself would answer a closed port
            return
        except BaseException:
            _abort(client)
            raise
        pipes = [
            asyncio.create_task(_pipe(client_reader, upstream)),
            asyncio.create_task(_pipe(upstream_reader, client)),
        ]
        clean = False
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            failed = [p for p in pipes if p.done() and not p.cancelled() and p.exception()]
            if failed:
                log.debug("loopback relay %s: client=%s: %s", target, peer, failed[0].exception())
            clean = not failed
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for writer in (client, upstream):
                if clean:
                    writer.close()
                else:  # an error or a cancellation: reset both sides at once
                    _abort(writer)

    async def close(self) -> None:
        """Stop listening (new connections are refused) and reset the relayed connections."""
        self._closing = True
        if self.server is not None:
            self.server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.server.wait_closed()


# UDP ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _UdpFlow:
    """One client's flow: a connected upstream socket; its replies go back to `client`."""

    client: tuple[object, ...]
    upstream: socket.socket


class _UdpListener:
    """[::1]:host_port receiving datagrams, one upstream socket per client address."""

    def __init__(self, target: RelayTarget, idle_timeout: float, max_flows: int) -> None:
        self.target = target
        self.flows: FlowTable[tuple[object, ...], _UdpFlow] = FlowTable(idle_timeout, max_flows)
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Bind and serve. Raises OSError when [::1]:host_port cannot be bound."""
        self.sock = _listening_socket(socket.SOCK_DGRAM, self.target.host_port)
        self.loop.add_reader(self.sock.fileno(), self._from_clients)

    def _from_clients(self) -> None:
        assert self.sock is not None
        for _ in range(UDP_BATCH):
            try:
                data, client = self.sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:  # an ICMP error queued on the socket: nothing to relay
                log.debug("loopback relay %s: %s", self.target, exc)
                continue
            flow = self.flows.get(client)
            if flow is None:
                flow = self._open_flow(client)
                if flow is None:
                    continue
            else:
                self.flows.touch(client, self.loop.time())
            try:
                flow.upstream.send(data)
            except OSError as exc:  # a full buffer, or an ICMP error from an earlier datagram
                log.debug("loopback relay %s: client=%s: send: %s", self.target, client, exc)

    def _open_flow(self, client: tuple[object, ...]) -> _UdpFlow | None:
        target = self.target
        try:
            upstream = socket.socket(_family(target.target_ip), socket.SOCK_DGRAM)
        except OSError as exc:
            log.debug("loopback relay %s: client=%s: socket: %s", target, client, exc)
            return None
        try:
            upstream.setblocking(False)
            upstream.connect((target.target_ip, target.target_port))
        except OSError as exc:
            log.debug("loopback relay %s: client=%s: connect: %s", target, client, exc)
            upstream.close()
            return None
        flow = _UdpFlow(client, upstream)
        for evicted in self.flows.add(client, flow, self.loop.time()):
            log.debug("loopback relay %s: flow limit, dropping client=%s", target, evicted.client)
            self._close_flow(evicted)
        self.loop.add_reader(upstream.fileno(), self._from_upstream, flow)
        if self._sweeper is None:
            self._schedule_sweep()
        return flow

    def _from_upstream(self, flow: _UdpFlow) -> None:
        assert self.sock is not None
        for _ in range(UDP_BATCH):
            try:
                data = flow.upstream.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. port unreachable in the sandbox: the flow idles out
                log.debug("loopback relay %s: client=%s: %s", self.target, flow.client, exc)
                return
            self.flows.touch(flow.client, self.loop.time())
            try:
                self.sock.sendto(data, flow.client)
            except OSError as exc:  # the client's buffer is full, or it is gone
                log.debug("loopback relay %s: client=%s: reply: %s", self.target, flow.client, exc)

    def _close_flow(self, flow: _UdpFlow) -> None:
        self.loop.remove_reader(flow.upstream.fileno())
        flow.upstream.close()

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(self.flows.idle_timeout / 4, self._sweep)

    def _sweep(self) -> None:
        for flow in self.flows.expire(self.loop.time()):
            self._close_flow(flow)
        self._sweeper = None
        if len(self.flows):
            self._schedule_sweep()

    async def close(self) -> None:
        """Stop receiving and close every flow."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for flow in self.flows.clear():
            self._close_flow(flow)
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None


# the relay ---------------------------------------------------------------------------------

_Listener = _TcpListener | _UdpListener


class LoopbackRelay:
    """Listeners on [::1] for published ports, kept equal to the targets given to `sync`.

    Lives on one event loop; sockets are made in the calling thread's network namespace
    (netstackd's: the host's). Ports that cannot be bound are tried again every
    `retry_interval` seconds and by every `sync`, until they are bound or no longer wanted.
    """

    def __init__(
        self,
        udp_idle_timeout: float = UDP_IDLE_TIMEOUT,
        udp_max_flows: int = UDP_MAX_FLOWS,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        self.udp_idle_timeout = udp_idle_timeout
        self.udp_max_flows = udp_max_flows
        self.retry_interval = retry_interval
        self._listeners: dict[tuple[str, int], _Listener] = {}
        self.ports: frozenset[tuple[str, int]] = frozenset()
        """(protocol, host port) of every listener, for other threads (`own_ports`): a
        port is in it from before its socket is bound until after it is closed."""
        self._wanted: dict[tuple[str, int], list[RelayTarget]] = {}
        """Every target wanted, per port, in the order given: the first is served."""
        self._failed: dict[RelayTarget, str] = {}
        self._lock = asyncio.Lock()
        self._retrying: asyncio.Task[None] | None = None

    def own_ports(self, protocol: str, among: Iterable[int] | None = None) -> set[int]:
        """The host ports this relay listens on for `protocol` (only those of `among` when
        given: a port clash check asks about a few, and every listener is ~0.4 µs here);
        safe from any thread.

        A port clash check in netstackd must not take these for a process on the host: a
        port unpublished a moment ago keeps its listener until the next reload, and the
        store says whether a port is published (measured: a CNI DEL then ADD of the same
        port through netstackd failed "in use by a process on the host" when the ADD came
        before the reload that follows the DEL)."""
        ports = self.ports
        if among is not None:
            return {port for port in among if (protocol, port) in ports}
        return {port for proto, port in ports if proto == protocol}

    def listening(self) -> list[RelayTarget]:
        """The targets being served now, sorted."""
        return sorted(listener.target for listener in self._listeners.values())

    def udp_flows(self) -> int:
        """The number of open UDP flows, over every port."""
        return sum(
            len(listener.flows)
            for listener in self._listeners.values()
            if isinstance(listener, _UdpListener)
        )

    async def sync(self, targets: Iterable[RelayTarget]) -> None:
        """Make the listeners equal to `targets`: start new ones, stop removed ones (and
        reset their connections and flows), leave unchanged ones alone. Idempotent.

        Never raises for a port: one that cannot be bound is logged and skipped (and tried
        again later); an SCTP target is logged and skipped; of several targets for one
        port, the first is served and the others are logged (one takes over if the first
        goes, through `update`).
        """
        async with self._lock:
            wanted: dict[tuple[str, int], list[RelayTarget]] = {}
            for target in dict.fromkeys(targets):
                if self._relayable(target):
                    wanted.setdefault((target.protocol, target.host_port), []).append(target)
            keys = self._wanted.keys() | wanted.keys() | self._listeners.keys()
            self._wanted = wanted
            await self._settle(keys)

    async def update(self, removed: Iterable[RelayTarget], added: Iterable[RelayTarget]) -> None:
        """Stop relaying `removed` and start relaying `added`, as `sync` would with the last
        targets less `removed` plus `added`; only those ports are looked at."""
        async with self._lock:
            keys: set[tuple[str, int]] = set()
            for target in removed:
                key = (target.protocol, target.host_port)
                candidates = self._wanted.get(key, [])
                if target in candidates:
                    candidates.remove(target)
                    keys.add(key)
                    if not candidates:
                        del self._wanted[key]
            for target in added:
                if self._relayable(target):
                    key = (target.protocol, target.host_port)
                    candidates = self._wanted.setdefault(key, [])
                    if target not in candidates:
                        candidates.append(target)
                        keys.add(key)
            await self._settle(keys)

    async def apply(self, change: RelayChange) -> None:
        """`sync` to `change.full`, or `update` by its removed and added targets."""
        if change.full is not None:
            await self.sync(change.full)
        else:
            await self.update(change.removed, change.added)

    @staticmethod
    def _relayable(target: RelayTarget) -> bool:
        if target.protocol in PROTOCOLS:
            return True
        log.warning("loopback relay: %s: protocol not relayed; skipped", target)
        return False

    async def _settle(self, keys: Iterable[tuple[str, int]]) -> None:
        """Bring the listeners of these ports in line with `_wanted` (under the lock): each
        serves its port's first wanted target. Stops come before starts, so a port handed
        from one target to another is free when the new listener binds it."""
        serve: dict[tuple[str, int], RelayTarget] = {}
        for key in keys:
            candidates = self._wanted.get(key)
            if candidates:
                serve[key] = candidates[0]
                for other in candidates[1:]:
                    log.warning(
                        "loopback relay: %s: port already relayed to %s; skipped",
                        other,
                        candidates[0],
                    )
            listener = self._listeners.get(key)
            if listener is not None and listener.target != serve.get(key):
                del self._listeners[key]
                await listener.close()
                self.ports = frozenset(self._listeners)  # once its socket is gone
                log.info("loopback relay: stopped %s", listener.target)
        for target in list(self._failed):
            key = (target.protocol, target.host_port)
            if key in keys and serve.get(key) != target:
                del self._failed[target]
        for key, target in serve.items():
            if key not in self._listeners:
                await self._start(key, target)
        if self._failed and self._retrying is None:
            self._retrying = asyncio.create_task(self._retry())

    async def _retry(self) -> None:
        """Try the ports that failed again, every `retry_interval`, until none is left."""
        try:
            while self._failed:
                await asyncio.sleep(self.retry_interval)
                async with self._lock:
                    for target in list(self._failed):
                        key = (target.protocol, target.host_port)
                        if key not in self._listeners:
                            await self._start(key, target)
        finally:
            self._retrying = None

    async def _start(self, key: tuple[str, int], target: RelayTarget) -> None:
        listener: _Listener
        if target.protocol == "tcp":
            listener = _TcpListener(target)
        else:
            listener = _UdpListener(target, self.udp_idle_timeout, self.udp_max_flows)
        self.ports = self.ports | {key}  # before its socket exists, never after
        try:
            await listener.start()
        except OSError as exc:
            self.ports = frozenset(self._listeners)
            reason = exc.strerror or str(exc)
            # Warn once per target and reason; a retry failing the same way is no news.
            level = logging.DEBUG if self._failed.get(target) == reason else logging.WARNING
            log.log(
                level,
                "loopback relay: cannot listen on [%s]:%d/%s: %s; not relaying it to %s",
                RELAY_ADDRESS,
                target.host_port,
                target.protocol,
                reason,
                target.destination,
            )
            self._failed[target] = reason
            return
        self._failed.pop(target, None)
        self._listeners[key] = listener
        self.ports = frozenset(self._listeners)
        log.info("loopback relay: serving %s", target)

    async def close(self) -> None:
        """Stop every listener. Idempotent; `sync` may start them again."""
        await self.sync([])
        retrying = self._retrying
        if retrying is not None:
            retrying.cancel()
            await asyncio.wait([retrying])
