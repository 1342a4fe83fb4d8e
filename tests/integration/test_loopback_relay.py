"""Integration: the loopback relay ([::1]:HOST_PORT -> sandbox) with real traffic.

The relay runs in-process on an event loop of its own, in a thread that has entered the
test's host namespace (`netns.run_in`), so its sockets live there as netstackd's would; the
test thread never changes namespace and drives it with `RelayThread.call`. Its targets come
from the test host's store, as netstackd derives them. Clients are sockets made in the host
namespace; the servers in the sandboxes are test_ports' echo-the-peer servers (which
answer with the client address they saw), plus a bulk echo server for half-close.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import test_ports
from test_ports import (
    Reply,
    StartServer,
    connect,
    gateway_of,
    ns_socket,
    reach,
    tcp_ask,
    udp_ask,
    udp_exchange,
)

from netstack.daemon.relay import LoopbackRelay, RelayTarget, relay_targets
from netstack.kernel.netns import run_in
from netstack.store import Store

if TYPE_CHECKING:
    from conftest import Host

pytestmark = pytest.mark.root

T = TypeVar("T")
CALL_TIMEOUT = 10.0

# test_ports' echo-the-peer servers in sandboxes, as a fixture of this module too.
start_server = test_ports.start_server

# Reads until end of stream, then sends everything back and closes: the reply only comes if
# the relay passed the client's half-close on, and ends only if it passes the server's on.
BULK_ECHO = r"""
import socket, sys
sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("::", int(sys.argv[1])))
sock.listen(8)
print("READY", flush=True)
while True:
    conn, _ = sock.accept()
    data = bytearray()
    while chunk := conn.recv(1 << 16):
        data += chunk
    conn.sendall(data)
    conn.close()
"""


class RelayThread:
    """A LoopbackRelay on its own event loop, in a thread inside the host namespace."""

    def __init__(self, netns: str, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.relay = LoopbackRelay(**options)
        self._thread = threading.Thread(target=run_in, args=(netns, self._serve), daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self.relay.close())
        finally:
            self.loop.close()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the relay's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(CALL_TIMEOUT)

    def run(self, function: Callable[[], T]) -> T:
        """Run a plain function on the relay's loop (to read its state safely)."""

        async def wrapped() -> T:
            return function()

        return self.call(wrapped())

    def sync(self, targets: list[RelayTarget]) -> None:
        self.call(self.relay.sync(targets))

    def update(self, removed: list[RelayTarget], added: list[RelayTarget]) -> None:
        self.call(self.relay.update(removed, added))

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CALL_TIMEOUT)


@pytest.fixture
def relays(host: Host) -> Iterator[Callable[..., RelayThread]]:
    """Start relays in the host namespace; each is closed at teardown."""
    started: list[RelayThread] = []

    def start(**options: Any) -> RelayThread:
        started.append(RelayThread(host.name, **options))
        return started[-1]

    try:
        yield start
    finally:
        for relay in started:
            relay.stop()


@pytest.fixture
def bulk_echo(tmp_path: Path) -> Iterator[Callable[[str, int], None]]:
    """Start BULK_ECHO in a sandbox on a TCP port; killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(sandbox: str, port: int) -> None:
        argv = ["ip", "netns", "exec", sandbox, sys.executable, "-I", "-S", "-c", BULK_ECHO]
        proc = subprocess.Popen(
            [*argv, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready and proc.stdout.readline().strip() == "READY", proc.stderr

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)


def store_targets(host: Host) -> list[RelayTarget]:
    """relay_targets of the host's store, as netstackd computes them."""
    store = Store(host.state_dir)
    try:
        return relay_targets(store.endpoints())
    finally:
        store.close()


def dual_stack(host: Host, name: str, number: int) -> None:
    host.netctl(
        "network", "create", "--ipv6", "--subnet", f"10.{number}.0.0/24",
        "--subnet", f"fd00:{number}::/64", name,
    )  # fmt: skip


def assert_refused(host: Host, kind: str, port: int) -> None:
    """[::1]:port refuses at once: nothing listens, and the kernel did not translate it.

    UDP: a connected socket gets the ICMP port unreachable as ECONNREFUSED.
    """
    stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    sock = ns_socket(host.name, socket.AF_INET6, stype)
    sock.settimeout(2.0)
    with sock:
        try:
            sock.connect(("::1", port))
            if kind == "udp":
                sock.send(b"hello")
                sock.recv(4096)
        except ConnectionRefusedError:
            return
    raise AssertionError(f"[::1]:{port}/{kind} did not refuse")


def read_all(sock: socket.socket) -> bytes:
    received = bytearray()
    while chunk := sock.recv(1 << 16):
        received += chunk
    return bytes(received)


def tcp_exchange(host: Host, port: int, payload: bytes) -> bytes:
    """Connect to [::1]:port, send payload, half-close, read until end of stream."""
    sock = ns_socket(host.name, socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(CALL_TIMEOUT)
    with sock:
        sock.connect(("::1", port))
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(1)))
        sender.start()  # send and receive at once: neither direction may wait for the other
        received = read_all(sock)
        sender.join(CALL_TIMEOUT)
    return received


@contextlib.contextmanager
def held_exchange(host: Host, port: int, first: bytes) -> Iterator[Callable[[bytes], bytes]]:
    """A TCP connection to [::1]:port that has sent `first` and stays open across the body;
    the body's `finish(rest)` sends `rest`, half-closes and returns all that came back."""
    sock = ns_socket(host.name, socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(CALL_TIMEOUT)
    with sock:
        sock.connect(("::1", port))
        sock.sendall(first)

        def finish(rest: bytes) -> bytes:
            sock.sendall(rest)
            sock.shutdown(socket.SHUT_WR)
            return read_all(sock)

        yield finish


# --------------------------------------------------------------------------- tests


def test_tcp_and_udp_reach_the_sandbox(
    host: Host, start_server: StartServer, relays: Callable[..., RelayThread]
) -> None:
    """[::1]:P reaches the sandbox's IPv6 address (its IPv4 one on an IPv4-only network);
    the sandbox sees the host's gateway address; bindings not on ::1 are not relayed."""
    dual_stack(host, "pub", 71)
    host.netctl("network", "create", "--subnet", "10.72.0.0/24", "pub4")
    web = host.sandbox("web")
    legacy = host.sandbox("v4")
    connect(
        host, "pub", web, "8080:80", "5353:53/udp", "[::1]:8443:443", "0.0.0.0:8081:81", "8082:82"
    )
    connect(host, "pub4", legacy, "9090:80", "9053:53/udp")
    start_server(web, "web", "tcp:80", "udp:53", "tcp:443", "tcp:81")
    start_server(legacy, "v4", "tcp:80", "udp:53")
    gateway6, gateway4 = gateway_of(host, "pub", 6), gateway_of(host, "pub4", 4)

    # The kernel leaves the host's traffic to ::1 alone: refused, not translated.
    assert_refused(host, "tcp", 8080)
    assert_refused(host, "udp", 5353)

    targets = store_targets(host)
    relay = relays()
    relay.sync(targets)
    assert relay.run(relay.relay.listening) == targets
    assert {(t.protocol, t.host_port) for t in targets} == {
        ("tcp", 8080), ("udp", 5353), ("tcp", 8443), ("tcp", 8082), ("tcp", 9090), ("udp", 9053),
    }  # fmt: skip

    assert tcp_ask(host.name, "::1", 8080, 2.0) == Reply("web", "tcp", 80, gateway6)
    assert udp_ask(host.name, "::1", 5353, 2.0) == Reply("web", "udp", 53, gateway6)
    assert tcp_ask(host.name, "::1", 8443, 2.0) == Reply("web", "tcp", 443, gateway6)
    assert tcp_ask(host.name, "::1", 9090, 2.0) == Reply("v4", "tcp", 80, gateway4)
    assert udp_ask(host.name, "::1", 9053, 2.0) == Reply("v4", "udp", 53, gateway4)
    assert_refused(host, "tcp", 8081)  # 0.0.0.0 only: not on ::1
    # Nothing listens on the sandbox's port 82: the relay resets the client's connection.
    sock = ns_socket(host.name, socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(CALL_TIMEOUT)
    with sock, pytest.raises(ConnectionResetError):
        sock.connect(("::1", 8082))
        sock.recv(100)
    # The kernel's own paths are untouched by the relay.
    assert reach("tcp", host.name, "127.0.0.1", 8080).tag == "web"
    assert reach("tcp", host.name, "127.0.0.1", 8081).port == 81


def test_tcp_half_close_and_bulk_both_ways(
    host: Host, bulk_echo: Callable[[str, int], None], relays: Callable[..., RelayThread]
) -> None:
    """4 MiB up, then a half-close; the server only answers after the end of stream, and
    the client only stops reading at the server's end of stream."""
    dual_stack(host, "pub", 73)
    web = host.sandbox("web")
    connect(host, "pub", web, "7000:7000")
    bulk_echo(web, 7000)
    relay = relays()
    relay.sync(store_targets(host))
    payload = os.urandom(4 << 20)
    echoed = tcp_exchange(host, 7000, payload)
    assert len(echoed) == len(payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert tcp_exchange(host, 7000, b"") == b""  # an empty stream: just the two half-closes


def test_sync_starts_stops_and_leaves_unchanged_listeners_alone(
    host: Host,
    start_server: StartServer,
    bulk_echo: Callable[[str, int], None],
    relays: Callable[..., RelayThread],
) -> None:
    dual_stack(host, "pub", 74)
    web = host.sandbox("web")
    connect(host, "pub", web, "8080:80", "5353:53/udp", "7000:7000")
    start_server(web, "web", "tcp:80", "udp:53")
    bulk_echo(web, 7000)
    targets = store_targets(host)
    relay = relays()
    relay.sync(targets)
    assert tcp_ask(host.name, "::1", 8080, 2.0) is not None
    # what netstackd's port clash check leaves out (not "a process on the host")
    assert relay.relay.own_ports("tcp") == {8080, 7000}
    assert relay.relay.own_ports("udp") == {5353}
    assert relay.relay.own_ports("tcp", [8080, 5353, 9999]) == {8080}
    assert relay.relay.own_ports("udp", [5353]) == {5353}
    assert relay.relay.own_ports("tcp", []) == set()

    # A connection in progress through 7000 survives a sync that keeps 7000.
    with held_exchange(host, 7000, b"first half ") as finish:
        relay.sync(targets)
        relay.sync(list(reversed(targets)))
        assert finish(b"second half") == b"first half second half"

    # Removing 8080 and 5353: refused at once; 7000 still relayed.
    kept = [t for t in targets if t.host_port == 7000]
    relay.sync(kept)
    assert relay.run(relay.relay.listening) == kept
    assert (relay.relay.own_ports("tcp"), relay.relay.own_ports("udp")) == ({7000}, set())
    assert_refused(host, "tcp", 8080)
    assert_refused(host, "udp", 5353)
    assert tcp_exchange(host, 7000, b"still here") == b"still here"

    # A connection in progress through a removed port is reset, not left half alive.
    held = ns_socket(host.name, socket.AF_INET6, socket.SOCK_STREAM)
    held.settimeout(CALL_TIMEOUT)
    with held:
        held.connect(("::1", 7000))
        held.sendall(b"never finished")
        time.sleep(0.2)  # the relay has connected upstream
        relay.sync([])
        with pytest.raises(ConnectionResetError):
            held.recv(100)
    assert relay.run(relay.relay.listening) == []
    assert_refused(host, "tcp", 7000)

    # Adding them back listens again on the same ports.
    relay.sync(targets)
    assert tcp_ask(host.name, "::1", 8080, 2.0) is not None
    assert udp_ask(host.name, "::1", 5353, 2.0) is not None


def test_port_taken_on_loopback_is_skipped_with_a_warning(
    host: Host,
    start_server: StartServer,
    relays: Callable[..., RelayThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A process holding [::1]:8080/tcp and [::1]:5353/udp keeps them; the relay warns
    once, serves the other port, and takes the two by itself once they are free."""
    caplog.set_level(logging.DEBUG, logger="netstack.daemon.relay")
    dual_stack(host, "pub", 75)
    web = host.sandbox("web")
    connect(host, "pub", web, "8080:80", "5353:53/udp", "8081:81")
    start_server(web, "web", "tcp:80", "udp:53", "tcp:81")
    tcp_holder = ns_socket(host.name, socket.AF_INET6, socket.SOCK_STREAM)
    udp_holder = ns_socket(host.name, socket.AF_INET6, socket.SOCK_DGRAM)
    tcp_holder.bind(("::1", 8080))
    tcp_holder.listen(4)
    udp_holder.bind(("::1", 5353))
    targets = store_targets(host)
    relay = relays(retry_interval=0.2)
    try:
        relay.sync(targets)
        relay.sync(targets)  # tried again, not warned again
        time.sleep(0.5)  # and retried in the background, quietly too
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2, warnings
        assert any("[::1]:8080/tcp: Address already in use" in w for w in warnings), warnings
        assert any("[::1]:5353/udp: Address already in use" in w for w in warnings), warnings
        assert [t.host_port for t in relay.run(relay.relay.listening)] == [8081]
        assert tcp_ask(host.name, "::1", 8081, 2.0) == Reply(
            "web", "tcp", 81, gateway_of(host, "pub", 6)
        )

        # The holders still own their ports.
        client = ns_socket(host.name, socket.AF_INET6, socket.SOCK_STREAM)
        client.settimeout(2.0)
        client.connect(("::1", 8080))
        tcp_holder.settimeout(2.0)
        accepted, _ = tcp_holder.accept()
        client.close()  # the client closes first: no TIME_WAIT on [::1]:8080's side
        accepted.settimeout(2.0)
        assert accepted.recv(100) == b""
        accepted.close()
        client = ns_socket(host.name, socket.AF_INET6, socket.SOCK_DGRAM)
        with client:
            client.sendto(b"mine", ("::1", 5353))
            udp_holder.settimeout(2.0)
            assert udp_holder.recv(100) == b"mine"
    finally:
        tcp_holder.close()
        udp_holder.close()

    # Freed: the relay takes them without another sync.
    deadline = time.monotonic() + 5
    while relay.run(relay.relay.listening) != targets:
        assert time.monotonic() < deadline, relay.run(relay.relay.listening)
        time.sleep(0.1)
    assert tcp_ask(host.name, "::1", 8080, 2.0) == Reply(
        "web", "tcp", 80, gateway_of(host, "pub", 6)
    )
    assert udp_ask(host.name, "::1", 5353, 2.0) is not None


def test_no_ipv6_loopback_is_skipped(
    host: Host, start_server: StartServer, relays: Callable[..., RelayThread],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """With lo down there is no ::1: sync warns and raises nothing; once lo is up, it works."""
    dual_stack(host, "pub", 76)
    web = host.sandbox("web")
    connect(host, "pub", web, "8080:80", "5353:53/udp")
    start_server(web, "web", "tcp:80", "udp:53")
    relay = relays()
    host.run("ip", "link", "set", "lo", "down")
    relay.sync(store_targets(host))
    assert relay.run(relay.relay.listening) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all("Cannot assign requested address" in w for w in warnings), warnings
    host.run("ip", "link", "set", "lo", "up")
    relay.sync(store_targets(host))
    assert reach("tcp", host.name, "::1", 8080).tag == "web"
    assert reach("udp", host.name, "::1", 5353).tag == "web"


def test_udp_flows_per_client_idle_out_and_are_capped(
    host: Host, start_server: StartServer, relays: Callable[..., RelayThread]
) -> None:
    dual_stack(host, "pub", 77)
    web = host.sandbox("web")
    connect(host, "pub", web, "5353:53/udp")
    server = start_server(web, "web", "udp:53")
    relay = relays(udp_idle_timeout=0.5, udp_max_flows=2)
    relay.sync(store_targets(host))
    expected = Reply("web", "udp", 53, gateway_of(host, "pub", 6))

    clients = [ns_socket(host.name, socket.AF_INET6, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        # Each client gets its own reply (replies go back to the flow's client).
        for client in clients[:2]:
            assert udp_exchange(client, "::1", 5353, 2.0) == expected
        assert relay.run(relay.relay.udp_flows) == 2
        # Two more datagrams on the first flow: still two flows.
        assert udp_exchange(clients[0], "::1", 5353, 2.0) == expected
        assert relay.run(relay.relay.udp_flows) == 2
        # A third client: the least recently active flow (client 1) makes room.
        assert udp_exchange(clients[2], "::1", 5353, 2.0) == expected
        assert relay.run(relay.relay.udp_flows) == 2
        # ...and client 1 is served again with a new flow.
        assert udp_exchange(clients[1], "::1", 5353, 2.0) == expected
        assert len(server.seen()) == 5
        # Idle for more than 0.5 s: every flow is gone.
        deadline = time.monotonic() + 5
        while relay.run(relay.relay.udp_flows) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert relay.run(relay.relay.udp_flows) == 0
        assert udp_exchange(clients[0], "::1", 5353, 2.0) == expected
    finally:
        for client in clients:
            client.close()


def test_update_touches_only_the_ports_it_names(
    host: Host,
    start_server: StartServer,
    bulk_echo: Callable[[str, int], None],
    relays: Callable[..., RelayThread],
) -> None:
    """`update` (netstackd after a change) stops and starts the ports it is given and no
    other: a connection through another port goes on. Of two targets for one port the first
    is served, and the second takes over when the first goes."""
    dual_stack(host, "pub", 76)
    web, db = host.sandbox("web"), host.sandbox("db")
    connect(host, "pub", web, "8080:80", "7000:7000")
    connect(host, "pub", db, "5432:80")
    start_server(web, "web", "tcp:80")
    start_server(db, "db", "tcp:80")
    bulk_echo(web, 7000)
    gateway6 = gateway_of(host, "pub", 6)
    by_port = {target.host_port: target for target in store_targets(host)}
    relay = relays()
    relay.sync([by_port[8080], by_port[7000]])
    with held_exchange(host, 7000, b"before ") as finish:
        relay.update([by_port[8080]], [by_port[5432]])
        assert_refused(host, "tcp", 8080)
        assert tcp_ask(host.name, "::1", 5432, 2.0) == Reply("db", "tcp", 80, gateway6)
        assert finish(b"after") == b"before after"

    to_web = RelayTarget("tcp", 9000, by_port[8080].target_ip, 80)
    to_db = RelayTarget("tcp", 9000, by_port[5432].target_ip, 80)
    relay.update([], [to_web, to_db])
    assert tcp_ask(host.name, "::1", 9000, 2.0) == Reply("web", "tcp", 80, gateway6)
    relay.update([to_web], [])
    assert tcp_ask(host.name, "::1", 9000, 2.0) == Reply("db", "tcp", 80, gateway6)
    assert relay.run(relay.relay.listening) == sorted([by_port[5432], by_port[7000], to_db])
    assert relay.relay.own_ports("tcp") == {5432, 7000, 9000}
