"""Integration: published ports (`netctl network connect -p SPEC`) with real traffic.

A tiny echo-the-peer server runs inside each sandbox (TCP and UDP, on the container
ports asked for): every connection or datagram is answered with the server's tag, the
container port it arrived on and the client address it saw, and logged to a file. Clients
are sockets made inside the test's namespaces (outside, host, sibling sandboxes) with
`netns.run_in`, so the test process never leaves its own namespace.

Refusals are checked as netctl's contract wants them: exit 1, one `netctl: error:` line
naming the problem, and nothing changed (store rows including port_bindings, nft set and
map elements, links, addresses, routes).
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from snapshot import assert_error, assert_unchanged, nft_elements, nft_rule_counts, snapshot

from netstack.kernel.netns import run_in

if TYPE_CHECKING:
    from conftest import Host

pytestmark = pytest.mark.root

READY_TIMEOUT = 10.0
# A positive check retries until this deadline (bridge port and neighbour set-up).
REACH_TIMEOUT = 5.0
# A negative check waits this long for an answer that must not come.
ABSENCE_TIMEOUT = 1.0

SERVER = r"""
import ipaddress, select, socket, sys
tag, log_path, *specs = sys.argv[1:]

def listen(kind, port):
    stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    try:
        sock = socket.socket(socket.AF_INET6, stype)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = "::"
    except OSError:
        sock = socket.socket(socket.AF_INET, stype)
        address = "0.0.0.0"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    if kind == "tcp":
        sock.listen(64)
    return sock

def peer_ip(peer):
    address = ipaddress.ip_address(peer[0].split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)

socks = {}
for spec in specs:
    kind, port = spec.split(":")
    socks[listen(kind, int(port))] = (kind, int(port))
log = open(log_path, "a", buffering=1)
print("READY", flush=True)
while True:
    ready, _, _ = select.select(list(socks), [], [])
    for sock in ready:
        kind, port = socks[sock]
        # Recorded (line-buffered) before answering: a client holding the answer can
        # read the record.
        if kind == "tcp":
            conn, peer = sock.accept()
            line = f"{tag} tcp {port} {peer_ip(peer)}"
            log.write(line + "\n")
            try:
                conn.sendall(line.encode() + b"\n")
            except OSError:
                pass
            conn.close()
        else:
            data, peer = sock.recvfrom(4096)
            line = f"{tag} udp {port} {peer_ip(peer)}"
            log.write(line + "\n")
            sock.sendto(line.encode() + b"\n", peer)
"""


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Reply:
    """What a server answered: which server, on which container port, seeing which client."""

    tag: str
    kind: str
    port: int
    client: str

    @classmethod
    def parse(cls, text: str) -> Reply:
        tag, kind, port, client = text.split()
        return cls(tag, kind, int(port), client)


@dataclass
class Server:
    tag: str
    proc: subprocess.Popen[str]
    log: Path

    def seen(self) -> list[Reply]:
        """Every connection/datagram the server recorded so far."""
        if not self.log.exists():
            return []
        return [Reply.parse(line) for line in self.log.read_text().splitlines() if line]


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start echo-the-peer servers inside sandboxes; every one is killed at teardown."""
    started: list[Server] = []

    def start(sandbox: str, tag: str, *specs: str) -> Server:
        """specs: "tcp:80", "udp:80"... (protocol:container port)."""
        log = tmp_path / f"server-{tag}.log"
        argv = ["ip", "netns", "exec", sandbox, sys.executable, "-I", "-S", "-c", SERVER]
        proc = subprocess.Popen(
            [*argv, tag, str(log), *specs],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        server = Server(tag, proc, log)
        started.append(server)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "READY":
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise AssertionError(f"server {tag} in {sandbox} did not start: {line!r} {err}")
        return server

    try:
        yield start
    finally:
        for server in started:
            server.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.communicate(timeout=5)


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def ns_socket(netns: str, family: socket.AddressFamily, kind: int) -> socket.socket:
    """A socket living in the named namespace (made by a short-lived thread there)."""
    return run_in(netns, lambda: socket.socket(family, kind))


def tcp_ask(netns: str, address: str, port: int, timeout: float) -> Reply | None:
    """One TCP connection from netns to address:port; the server's reply, or None."""
    sock = ns_socket(netns, _family(address), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:  # refused, reset, unreachable or timed out
        return None
    finally:
        sock.close()
    return Reply.parse(data.decode()) if data.strip() else None


def udp_exchange(sock: socket.socket, address: str, port: int, timeout: float) -> Reply | None:
    """One datagram from sock to address:port; the reply, or None (nothing, or refused).

    Late replies to earlier datagrams are drained first, so the reply is to this one.
    """
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass
    sock.settimeout(timeout)
    try:
        sock.sendto(b"hello", (address, port))
        data, _ = sock.recvfrom(4096)
    except OSError:
        return None
    return Reply.parse(data.decode())


def udp_ask(netns: str, address: str, port: int, timeout: float) -> Reply | None:
    """One datagram from a fresh socket in netns; the reply, or None."""
    sock = ns_socket(netns, _family(address), socket.SOCK_DGRAM)
    try:
        return udp_exchange(sock, address, port, timeout)
    finally:
        sock.close()


def ask(kind: str, netns: str, address: str, port: int, timeout: float) -> Reply | None:
    return (tcp_ask if kind == "tcp" else udp_ask)(netns, address, port, timeout)


def reach(kind: str, netns: str, address: str, port: int) -> Reply:
    """Poll until address:port answers from netns (bounded); the reply."""
    deadline = time.monotonic() + REACH_TIMEOUT
    while True:
        reply = ask(kind, netns, address, port, 0.5)
        if reply is not None:
            return reply
        if time.monotonic() > deadline:
            raise AssertionError(f"{kind} {address}:{port} never answered from {netns}")
        time.sleep(0.1)


def unreachable(kind: str, netns: str, address: str, port: int) -> None:
    reply = ask(kind, netns, address, port, ABSENCE_TIMEOUT)
    assert reply is None, f"{kind} {address}:{port} from {netns} answered: {reply}"


def port_rows(host: Host) -> list[tuple[Any, ...]]:
    """Every port_bindings row (sorted); the shared snapshot does not read this table."""
    path = host.state_dir / "state.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=30)
    try:
        return sorted(conn.execute("SELECT * FROM port_bindings").fetchall())
    finally:
        conn.close()


def full_snapshot(host: Host, sandboxes: list[str]) -> dict[str, Any]:
    return {**snapshot(host, sandboxes), "port_bindings": port_rows(host)}


def pub_elements(host: Host) -> dict[str, list[str]]:
    """The published-port map elements, by map name."""
    return {
        name.rsplit(" ", 1)[1]: elems
        for name, elems in nft_elements(host).items()
        if name.rsplit(" ", 1)[1].startswith("pub")
    }


def endpoint_of(host: Host, sandbox: str, network: str) -> dict[str, Any]:
    (info,) = host.netctl_json("sandbox", "inspect", sandbox)
    (endpoint,) = [e for e in info["Endpoints"] if e["Network"] == network]
    return dict(endpoint)


def address_of(host: Host, sandbox: str, network: str, version: int = 4) -> str:
    endpoint = endpoint_of(host, sandbox, network)
    key = "IPv4Address" if version == 4 else "IPv6Address"
    return str(endpoint[key]).split("/")[0]


def gateway_of(host: Host, network: str, version: int = 4) -> str:
    (info,) = host.netctl_json("network", "inspect", network)
    for config in info["IPAM"]["Config"]:
        if ipaddress.ip_network(config["Subnet"]).version == version:
            return str(config["Gateway"])
    raise AssertionError(f"network {network} has no IPv{version} gateway")


def ports_of(host: Host, sandbox: str) -> list[dict[str, Any]]:
    return list(host.netctl_json("port", sandbox))


def connect(host: Host, network: str, sandbox: str, *specs: str) -> dict[str, Any]:
    """`netctl network connect` with a -p per spec; the endpoint as inspect shows it."""
    args = [arg for spec in specs for arg in ("-p", spec)]
    host.netctl("network", "connect", *args, network, sandbox)
    return endpoint_of(host, sandbox, network)


def binding(host_ip: str, host_port: int, container_port: int, proto: str) -> dict[str, Any]:
    return {
        "HostIp": host_ip,
        "HostPort": host_port,
        "ContainerPort": container_port,
        "Protocol": proto,
    }


# --------------------------------------------------------------------------- 1. traffic


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_traffic_outside_host_loopback_hairpin_self(
    host: Host, start_server: StartServer, kind: str
) -> None:
    """Outside keeps its address; host (uplink and 127.0.0.1), sibling and self all reach it."""
    out = host.outside()
    host.netctl("network", "create", "--subnet", "10.81.0.0/24", "pub")
    web = host.sandbox("web")
    sibling = host.sandbox("sib")
    endpoint = connect(host, "pub", web, f"8080:80/{kind}")
    assert endpoint["Ports"] == [binding("", 8080, 80, kind)]
    connect(host, "pub", sibling)
    gateway = gateway_of(host, "pub")
    server = start_server(web, "web", f"{kind}:80")

    from_outside = reach(kind, out.name, out.host_addr4, 8080)
    assert from_outside == Reply("web", kind, 80, out.addr4)  # real client: no SNAT

    from_host = reach(kind, host.name, out.host_addr4, 8080)
    assert from_host.tag == "web" and from_host.port == 80
    assert from_host.client == out.host_addr4

    from_loopback = reach(kind, host.name, "127.0.0.1", 8080)
    assert from_loopback.tag == "web" and from_loopback.port == 80
    assert from_loopback.client == gateway  # masqueraded: 127.0.0.1 cannot leave the host

    hairpin = reach(kind, sibling, out.host_addr4, 8080)
    assert hairpin.tag == "web" and hairpin.port == 80
    assert hairpin.client == gateway  # masqueraded, so the reply goes back through the NAT

    itself = reach(kind, web, out.host_addr4, 8080)
    assert itself.tag == "web" and itself.port == 80
    assert itself.client == gateway

    # The server recorded every client address it saw.
    assert {r.client for r in server.seen()} == {out.addr4, out.host_addr4, gateway}


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_loopback_binding_not_on_other_addresses(
    host: Host, start_server: StartServer, kind: str
) -> None:
    """`-p 127.0.0.1:P:C` answers on the host's 127.0.0.1 only, not on 192.0.2.1."""
    out = host.outside()
    host.netctl("network", "create", "--subnet", "10.82.0.0/24", "pub")
    web = host.sandbox("web")
    endpoint = connect(host, "pub", web, f"127.0.0.1:8080:80/{kind}")
    assert endpoint["Ports"] == [binding("127.0.0.1", 8080, 80, kind)]
    server = start_server(web, "web", f"{kind}:80")

    reply = reach(kind, host.name, "127.0.0.1", 8080)
    assert reply.tag == "web" and reply.port == 80

    unreachable(kind, out.name, out.host_addr4, 8080)
    unreachable(kind, host.name, out.host_addr4, 8080)
    # Only the loopback client (masqueraded to the gateway) ever reached the server.
    assert {r.client for r in server.seen()} == {gateway_of(host, "pub")}


# --------------------------------------------------------------------------- 2. ranges, IPv6


def test_range_maps_each_port_to_its_own(host: Host, start_server: StartServer) -> None:
    """`-p 8000-8002:9000-9002`: host port 800N reaches container port 900N."""
    out = host.outside()
    host.netctl("network", "create", "--subnet", "10.83.0.0/24", "pub")
    web = host.sandbox("web")
    endpoint = connect(host, "pub", web, "8000-8002:9000-9002")
    assert endpoint["Ports"] == [binding("", 8000 + i, 9000 + i, "tcp") for i in range(3)]
    start_server(web, "web", "tcp:9000", "tcp:9001", "tcp:9002")
    for i in range(3):
        assert reach("tcp", out.name, out.host_addr4, 8000 + i) == Reply(
            "web", "tcp", 9000 + i, out.addr4
        )
    unreachable("tcp", out.name, out.host_addr4, 8003)


def test_host_range_single_container_port_picks_one(host: Host, start_server: StartServer) -> None:
    """`-p 8100-8105:80` takes one free port of the range; the next connect takes another."""
    out = host.outside()
    host.netctl("network", "create", "--subnet", "10.84.0.0/24", "pub")
    first = host.sandbox("first")
    second = host.sandbox("second")
    (chosen,) = connect(host, "pub", first, "8100-8105:80")["Ports"]
    assert 8100 <= chosen["HostPort"] <= 8105
    assert chosen == binding("", chosen["HostPort"], 80, "tcp")
    assert ports_of(host, first) == [chosen]
    (other,) = connect(host, "pub", second, "8100-8105:80")["Ports"]
    assert 8100 <= other["HostPort"] <= 8105 and other["HostPort"] != chosen["HostPort"]
    start_server(first, "first", "tcp:80")
    start_server(second, "second", "tcp:80")
    assert reach("tcp", out.name, out.host_addr4, chosen["HostPort"]).tag == "first"
    assert reach("tcp", out.name, out.host_addr4, other["HostPort"]).tag == "second"


def test_no_host_port_gets_ephemeral_ports(host: Host, start_server: StartServer) -> None:
    """`-p 9000-9002`: three distinct host ports from 49153 up, one per container port."""
    out = host.outside()
    host.netctl("network", "create", "--subnet", "10.85.0.0/24", "pub")
    web = host.sandbox("web")
    chosen = connect(host, "pub", web, "9000-9002/udp")["Ports"]
    assert [p["ContainerPort"] for p in chosen] == [9000, 9001, 9002]
    assert all(p["Protocol"] == "udp" and p["HostIp"] == "" for p in chosen), chosen
    host_ports = [p["HostPort"] for p in chosen]
    assert len(set(host_ports)) == 3 and all(49153 <= p <= 65535 for p in host_ports), chosen
    assert ports_of(host, web) == chosen
    start_server(web, "web", "udp:9000", "udp:9001", "udp:9002")
    for p in chosen:
        reply = reach("udp", out.name, out.host_addr4, p["HostPort"])
        assert reply == Reply("web", "udp", p["ContainerPort"], out.addr4)


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_ipv6_outside_client_keeps_address(
    host: Host, start_server: StartServer, kind: str
) -> None:
    """Dual-stack: [2001:db8:99::1]:P reaches the sandbox, which sees 2001:db8:99::2."""
    out = host.outside()
    host.netctl(
        "network", "create", "--ipv6", "--subnet", "10.86.0.0/24", "--subnet", "fd00:86::/64",
        "pub",
    )  # fmt: skip
    web = host.sandbox("web")
    connect(host, "pub", web, f"8080:80/{kind}")
    start_server(web, "web", f"{kind}:80")
    assert reach(kind, out.name, out.host_addr6, 8080) == Reply("web", kind, 80, out.addr6)
    assert reach(kind, out.name, out.host_addr4, 8080) == Reply("web", kind, 80, out.addr4)
    elements = pub_elements(host)
    assert len(elements.get("pub4_any", [])) == 1 and len(elements.get("pub6_any", [])) == 1


def test_family_wildcard_and_ipv6_specific(host: Host, start_server: StartServer) -> None:
    """`0.0.0.0:P:C` answers on IPv4 only; `[2001:db8:99::1]:P:C` on that address only."""
    out = host.outside()
    host.netctl(
        "network", "create", "--ipv6", "--subnet", "10.89.0.0/24", "--subnet", "fd00:89::/64",
        "pub",
    )  # fmt: skip
    web = host.sandbox("web")
    endpoint = connect(host, "pub", web, "0.0.0.0:8080:80", f"[{out.host_addr6}]:9090:80")
    assert endpoint["Ports"] == [
        binding("0.0.0.0", 8080, 80, "tcp"),
        binding(out.host_addr6, 9090, 80, "tcp"),
    ]
    assert host.netctl("port", web).stdout.strip().splitlines() == [
        "80/tcp -> 0.0.0.0:8080",
        f"80/tcp -> [{out.host_addr6}]:9090",
    ]
    assert {k: len(v) for k, v in pub_elements(host).items()} == {"pub4_any": 1, "pub6_ip": 1}
    server = start_server(web, "web", "tcp:80")
    assert reach("tcp", out.name, out.host_addr4, 8080) == Reply("web", "tcp", 80, out.addr4)
    assert reach("tcp", out.name, out.host_addr6, 9090) == Reply("web", "tcp", 80, out.addr6)
    unreachable("tcp", out.name, out.host_addr6, 8080)
    unreachable("tcp", out.name, out.host_addr4, 9090)
    assert {r.client for r in server.seen()} == {out.addr4, out.addr6}


def test_ipv6_loopback_reaches_sandbox(host: Host, start_server: StartServer) -> None:
    """[::1]:P from the host reaches the sandbox through netstackd's relay (TCP and UDP).

    The kernel cannot serve ::1 (de-NATed replies to ::1 are dropped), so netstackd
    listens there. netctl notifies the daemon before returning, so the port is relayed as
    soon as connect returns and released as soon as disconnect returns: publishing the
    same port again at once works.
    """
    host.daemons.start()
    host.daemons.wait_running()
    host.netctl(
        "network", "create", "--ipv6", "--subnet", "10.87.0.0/24", "--subnet", "fd00:87::/64",
        "pub",
    )  # fmt: skip
    web = host.sandbox("web")
    connect(host, "pub", web, "8080:80", "8080:53/udp")
    start_server(web, "web", "tcp:80", "udp:53")
    assert reach("tcp", host.name, address_of(host, web, "pub", 6), 80).tag == "web"
    tcp = tcp_ask(host.name, "::1", 8080, 2.0)
    assert tcp is not None and tcp.tag == "web", tcp
    assert tcp.client == gateway_of(host, "pub", 6)  # the relay's side of the bridge
    udp = udp_ask(host.name, "::1", 8080, 2.0)
    assert udp is not None and udp.tag == "web", udp
    status = host.netctl_json("status")
    assert "[::1]:8080/tcp -> [fd00:87::2]:80" in status["relay"]

    host.netctl("network", "disconnect", "pub", web)
    assert tcp_ask(host.name, "::1", 8080, 1.0) is None
    other = host.sandbox("other")
    connect(host, "pub", other, "8080:80")  # the port is free again at once
    start_server(other, "other", "tcp:80")
    assert reach("tcp", host.name, "::1", 8080).tag == "other"


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_specific_host_ip_not_on_other_address(
    host: Host, start_server: StartServer, kind: str
) -> None:
    """`-p 192.0.2.3:8080:80` answers on 192.0.2.3 only, not on the uplink's 192.0.2.1."""
    out = host.outside()
    host.run("ip", "addr", "add", "192.0.2.3/24", "dev", out.host_iface)
    host.netctl("network", "create", "--subnet", "10.88.0.0/24", "pub")
    web = host.sandbox("web")
    endpoint = connect(host, "pub", web, f"192.0.2.3:8080:80/{kind}")
    assert endpoint["Ports"] == [binding("192.0.2.3", 8080, 80, kind)]
    assert ports_of(host, web) == endpoint["Ports"]
    text = host.netctl("port", web).stdout.strip().splitlines()
    assert text == [f"80/{kind} -> 192.0.2.3:8080"]
    server = start_server(web, "web", f"{kind}:80")
    assert reach(kind, out.name, "192.0.2.3", 8080) == Reply("web", kind, 80, out.addr4)
    unreachable(kind, out.name, out.host_addr4, 8080)
    unreachable(kind, out.name, out.host_addr6, 8080)
    assert {r.client for r in server.seen()} == {out.addr4}


# --------------------------------------------------------------------------- 4. refusals

BAD_SPECS = [
    ("0:80", "host port 0"),
    ("8080:0", "container port 0"),
    ("70000:80", "host port 70000"),
    ("8080:65536", "container port 65536"),
    ("8080:80/icmp", "unknown protocol 'icmp'"),
    ("8080:80/", "unknown protocol"),
    ("8010-8000:80", "inverted"),
    ("8080:90-80", "inverted"),
    ("8000-8002:80-81", "same length"),
    ("198.51.100.7:8080:80", "not an address of this host"),
    ("300.1.1.1:8080:80", "invalid host IP"),
    ("[2001:db8:99::1]:8080:80", "no IPv6 subnet"),
    ("http", "invalid container port"),
    ("1:2:3:4", "invalid -p"),
]


@pytest.fixture
def published(host: Host) -> dict[str, Any]:
    """Network "pub" with sandbox "a" publishing some ports, and an idle sandbox "b"."""
    out = host.outside()
    host.netctl("network", "create", "--subnet", "10.90.0.0/24", "pub")
    host.netctl("network", "create", "--internal", "--subnet", "10.91.0.0/24", "inner")
    a = host.sandbox("a")
    b = host.sandbox("b")
    connect(
        host, "pub", a,
        "8080:80", "8000-8010:80-90", "127.0.0.1:9090:80", "5353:53/udp", "192.0.2.1:7000:70",
    )  # fmt: skip
    return {"out": out, "a": a, "b": b}


def assert_refused(host: Host, sandboxes: list[str], args: list[str], needle: str) -> None:
    """The command fails (exit 1, one error line with needle) and changes nothing."""
    before = full_snapshot(host, sandboxes)
    links_before = [link["ifname"] for s in sandboxes for link in host.sandbox_ip_json(s, "link")]
    proc = host.netctl(*args, check=False)
    assert_error(proc, 1, needle)
    assert_unchanged(before, full_snapshot(host, sandboxes))
    links_after = [link["ifname"] for s in sandboxes for link in host.sandbox_ip_json(s, "link")]
    assert links_after == links_before


@pytest.mark.parametrize(("spec", "needle"), BAD_SPECS, ids=[s for s, _ in BAD_SPECS])
def test_bad_spec_refused(host: Host, published: dict[str, Any], spec: str, needle: str) -> None:
    b = published["b"]
    assert_refused(host, [published["a"], b], ["network", "connect", "-p", spec, "pub", b], needle)
    assert endpoint_count(host, b) == 0


CONFLICTS = [
    # same host IP + port + protocol as a's
    (["8080:80"], "8080/tcp"),
    (["127.0.0.1:9090:81"], "9090/tcp"),
    (["5353:53/udp"], "5353/udp"),
    (["192.0.2.1:7000:70"], "7000/tcp"),
    # a single port inside a's range, and a range overlapping a's single port
    (["8005:80"], "8005/tcp"),
    (["8075-8085:80-90"], "8080/tcp"),
    # wildcard vs specific, both directions
    (["127.0.0.1:8080:80"], "8080/tcp"),
    (["192.0.2.1:8003:80"], "8003/tcp"),
    (["9090:80"], "9090/tcp"),
    (["0.0.0.0:7000:80"], "7000/tcp"),
    # two -p of one connect clash with each other
    (["6000:80", "6000:81"], "6000/tcp"),
    # the first -p is fine, the second clashes: the first must not stay behind
    (["6001:80", "8080:80"], "8080/tcp"),
]


@pytest.mark.parametrize(
    ("specs", "port"), CONFLICTS, ids=["+".join(specs) for specs, _ in CONFLICTS]
)
def test_conflict_refused(
    host: Host, published: dict[str, Any], specs: list[str], port: str
) -> None:
    b = published["b"]
    args = ["network", "connect", *[a for s in specs for a in ("-p", s)], "pub", b]
    assert_refused(host, [published["a"], b], args, f"host port {port}")
    assert endpoint_count(host, b) == 0


def endpoint_count(host: Host, sandbox: str) -> int:
    (info,) = host.netctl_json("sandbox", "inspect", sandbox)
    return len(info["Endpoints"])


def test_same_port_other_protocol_or_address_is_fine(host: Host, published: dict[str, Any]) -> None:
    """tcp vs udp on one port, and two different specific addresses, do not clash."""
    b = published["b"]
    endpoint = connect(
        host, "pub", b, "8080:80/udp", "8080:80/sctp", "5353:53", "192.0.2.1:9090:80"
    )
    assert endpoint["Ports"] == [
        binding("", 8080, 80, "udp"),
        binding("", 8080, 80, "sctp"),
        binding("", 5353, 53, "tcp"),
        binding("192.0.2.1", 9090, 80, "tcp"),
    ]


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_port_bound_on_host_refused(host: Host, published: dict[str, Any], kind: str) -> None:
    """A host port a process holds (TCP listening, UDP bound) cannot be published."""
    b = published["b"]
    stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    holder = ns_socket(host.name, socket.AF_INET, stype)
    try:
        holder.bind(("0.0.0.0", 7171))
        if kind == "tcp":
            holder.listen(1)
        assert_refused(
            host, [published["a"], b],
            ["network", "connect", "-p", f"7171:80/{kind}", "pub", b],
            f"host port 7171/{kind} of -p '7171:80/{kind}' is in use by a process",
        )  # fmt: skip
    finally:
        holder.close()
    # Released: now it can be published.
    assert connect(host, "pub", b, f"7171:80/{kind}")["Ports"] == [binding("", 7171, 80, kind)]


def test_internal_network_refuses_publish(host: Host, published: dict[str, Any]) -> None:
    b = published["b"]
    assert_refused(
        host, [published["a"], b], ["network", "connect", "-p", "8181:80", "inner", b], "internal"
    )
    host.netctl("network", "connect", "inner", b)  # without -p it is fine


def test_reverse_specific_then_wildcard(host: Host) -> None:
    """Specific first, wildcard second (the other direction of the fixture's cases)."""
    host.netctl("network", "create", "--subnet", "10.92.0.0/24", "pub")
    a = host.sandbox("a")
    b = host.sandbox("b")
    connect(host, "pub", a, "127.0.0.1:8080:80", "8005:80")
    for spec, port in (("8080:80", 8080), ("8000-8010:80-90", 8005), ("0.0.0.0:8080:80", 8080)):
        assert_refused(
            host, [a, b], ["network", "connect", "-p", spec, "pub", b], f"host port {port}/tcp"
        )


# --------------------------------------------------------------------------- 5. conntrack


def exchange_until(sock: socket.socket, address: str, port: int) -> Reply:
    """Send from one socket until a reply comes (bounded): the first reply."""
    deadline = time.monotonic() + REACH_TIMEOUT
    while (reply := udp_exchange(sock, address, port, 0.5)) is None:
        assert time.monotonic() < deadline, f"udp {address}:{port} never answered"
    return reply


def settle(server: Server, sock: socket.socket, quiet: float = 0.6) -> list[Reply]:
    """Wait until retried datagrams still in flight have reached the server, and drop their
    replies from the client socket; return what the server saw (bounded wait)."""
    deadline = time.monotonic() + REACH_TIMEOUT
    seen = server.seen()
    while True:
        time.sleep(quiet)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # empty (or an ICMP error): drained
            while sock.recv(65536):
                pass
        now = server.seen()
        if now == seen or time.monotonic() > deadline:
            return now
        seen = now


@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("how", ["disconnect", "sandbox-rm"])
def test_stale_conntrack_follows_new_mapping(
    host: Host, start_server: StartServer, how: str, version: int
) -> None:
    """One client socket keeps its source port; after A is unpublished and B published on
    the same host port, its next datagram reaches B, not A."""
    out = host.outside()
    v6 = ("--ipv6", "--subnet", "fd00:93::/64") if version == 6 else ()
    host.netctl("network", "create", "--subnet", "10.93.0.0/24", *v6, "pub")
    a = host.sandbox("a")
    b = host.sandbox("b")
    endpoint_a = connect(host, "pub", a, "7000:7001/udp")
    assert endpoint_a["Ports"] == [binding("", 7000, 7001, "udp")]
    assert ports_of(host, a) == endpoint_a["Ports"]
    assert "7001/udp -> 0.0.0.0:7000" in host.netctl("port", a).stdout
    server_a = start_server(a, "a", "udp:7001")
    server_b = start_server(b, "b", "udp:7001")
    client_addr, target = (
        (out.addr4, out.host_addr4) if version == 4 else (out.addr6, out.host_addr6)
    )

    client = ns_socket(out.name, _family(target), socket.SOCK_DGRAM)
    try:
        client.bind((client_addr, 40123))
        assert exchange_until(client, target, 7000) == Reply("a", "udp", 7001, client_addr)
        seen_by_a = settle(server_a, client)

        if how == "disconnect":
            host.netctl("network", "disconnect", "pub", a)
            assert ports_of(host, a) == []
            assert host.netctl("port", a).stdout.strip() == ""
        else:
            host.netctl("sandbox", "rm", a)
            host.sandboxes.remove(a)
        assert pub_elements(host) == {}
        assert port_rows(host) == []
        (info,) = host.netctl_json("network", "inspect", "pub")
        assert info["Endpoints"] == []

        # A datagram while nothing is published: the host itself refuses it (a flow
        # without DNAT that must not outlive the new mapping either).
        assert udp_exchange(client, target, 7000, 0.3) is None

        endpoint_b = connect(host, "pub", b, "7000:7001/udp")
        assert endpoint_b["Ports"] == [binding("", 7000, 7001, "udp")]
        assert ports_of(host, b) == endpoint_b["Ports"]
        b_address = address_of(host, b, "pub", version)
        assert any(b_address in e for e in pub_elements(host)[f"pub{version}_any"])

        assert exchange_until(client, target, 7000) == Reply("b", "udp", 7001, client_addr)
    finally:
        client.close()
    assert {r.client for r in server_b.seen()} == {client_addr}
    assert server_a.seen() == seen_by_a  # nothing reached A after it was unpublished


@pytest.mark.parametrize("how", ["disconnect", "sandbox-rm"])
def test_unpublish_dual_stack_endpoint(host: Host, how: str) -> None:
    """Disconnecting (or removing) a dual-stack sandbox with published ports succeeds and
    leaves no map element, port_bindings row, endpoint row or link behind."""
    host.netctl(
        "network", "create", "--ipv6", "--subnet", "10.97.0.0/24", "--subnet", "fd00:97::/64",
        "pub",
    )  # fmt: skip
    a = host.sandbox("a")
    links_before = sorted(host.links())
    connect(host, "pub", a, "8080:80", "5353:53/udp")
    assert {k: len(v) for k, v in pub_elements(host).items()} == {"pub4_any": 2, "pub6_any": 2}
    if how == "disconnect":
        proc = host.netctl("network", "disconnect", "pub", a, check=False)
    else:
        proc = host.netctl("sandbox", "rm", a, check=False)
        if proc.returncode == 0:
            host.sandboxes.remove(a)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert pub_elements(host) == {}
    assert port_rows(host) == []
    (info,) = host.netctl_json("network", "inspect", "pub")
    assert info["Endpoints"] == []
    assert sorted(host.links()) == links_before


# --------------------------------------------------------------------------- 6. rule count


def test_rule_count_does_not_grow_with_mappings(host: Host) -> None:
    """1 mapping and 20 mappings (three sandboxes, tcp and udp): the same nft rules."""
    host.netctl(
        "network", "create", "--ipv6", "--subnet", "10.94.0.0/24", "--subnet", "fd00:94::/64",
        "pub",
    )  # fmt: skip
    connect(host, "pub", host.sandbox("one"), "8080:80")
    rules_one = nft_rule_counts(host)
    elements_one = pub_elements(host)
    assert {k: len(v) for k, v in elements_one.items()} == {"pub4_any": 1, "pub6_any": 1}

    connect(host, "pub", host.sandbox("two"), "8000-8009:80-89")
    connect(host, "pub", host.sandbox("three"), "9000-9007:90-97/udp", "127.0.0.1:9100:80")
    assert sum(len(p) for p in port_rows_by_endpoint(host).values()) == 20
    assert nft_rule_counts(host) == rules_one
    assert sum(rules_one.values()) == sum(nft_rule_counts(host).values())
    counts = {k: len(v) for k, v in pub_elements(host).items()}
    assert counts == {"pub4_any": 19, "pub6_any": 19, "pub4_ip": 1}, counts


def port_rows_by_endpoint(host: Host) -> dict[str, list[tuple[Any, ...]]]:
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for row in port_rows(host):
        rows.setdefault(row[0], []).append(row)
    return rows
