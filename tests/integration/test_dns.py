"""Integration: netstackd's embedded DNS resolver, asked the way sandboxes ask it.

Two independent clients ask every question: Debian's ``dig``, run inside a sandbox with
``ip netns exec`` (so it reads the sandbox's /etc/netns resolv.conf, as any program there
would), and queries built with dnslib sent from a socket made inside the namespace with
`netns.run_in` (exact control of EDNS sizes, ids, raw bytes). Upstream servers are test
servers (`dns_upstream`) in the host's "outside" namespace, never the machine's resolver.

Set-up commands that are not under test run through netctl's own entry point, many in one
process (`netctl_many`): ~50 ms per command instead of ~300 ms for an exec each. The
commands a test is about (connect/disconnect while measuring, sandbox rm, netctl with no
daemon) run as the real `netctl` command.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import itertools
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from dns_upstream import (
    BIG_COUNT,
    BIG_NAME,
    FORWARDED_V4,
    FORWARDED_V6,
    NX_DOMAIN,
    Upstream,
    big_addresses,
    start_upstream,
)
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from netstack.kernel.netns import run_in

if TYPE_CHECKING:
    from conftest import Host

pytestmark = pytest.mark.root

REPO_ROOT = Path(__file__).resolve().parents[2]
ETC_NETNS = Path("/etc/netns")
# dig bounded: one try, 2 s (answers here take milliseconds).
DIG = ("dig", "+time=2", "+tries=1")
# Records must follow the store within 100 ms; asserted with head-room for loaded machines.
PROPAGATION_LIMIT = 0.5
SERVFAIL_LIMIT = 5.0
FUZZ_PACKETS = 10_000
FUZZ_SEED = 20240611


# --------------------------------------------------------------------------- set-up helpers

_BULK = r"""
import contextlib, io, json, logging, sys
from netstack.cli.app import main
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)  # log lines: the real stderr
results = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append({"argv": argv, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
    if rc != 0:
        break
json.dump(results, sys.stdout)
"""


def host_env(host: Host) -> dict[str, str]:
    """The environment netctl and netstackd get in this host (as `Host.netctl` builds it)."""
    env = dict(os.environ)
    env.update(
        NETSTACK_STATE_DIR=str(host.state_dir),
        NETSTACK_RUN_DIR=str(host.run_dir),
        NETSTACK_RESOLV_CONF=str(host.resolv_conf),
    )
    env.pop("NETSTACK_FAULT", None)
    return env


def netctl_many(host: Host, *commands: list[str]) -> list[Any]:
    """Run netctl commands in one process in the host namespace; each one's output.

    Output is parsed as JSON for commands with ``--format json``, else returned as text.
    Sandboxes created here are recorded on the host like `Host.sandbox` does.
    """
    proc = subprocess.run(
        ["nsenter", f"--net={host.netns_path}", sys.executable, "-c", _BULK],
        input=json.dumps([list(c) for c in commands]),
        capture_output=True,
        text=True,
        timeout=120,
        env=host_env(host),
        cwd=REPO_ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"netctl batch crashed:\n{proc.stderr}")
    results = json.loads(proc.stdout)
    for result in results:
        if result["rc"] != 0:
            raise AssertionError(
                f"netctl {' '.join(result['argv'])} failed (rc={result['rc']}):\n"
                f"{result['stdout']}{result['stderr']}{proc.stderr}"
            )
    outputs: list[Any] = []
    for argv, result in zip(commands, results, strict=True):
        if argv[:2] == ["sandbox", "create"]:
            host.sandboxes.append(argv[2])
        outputs.append(json.loads(result["stdout"]) if "json" in argv else result["stdout"])
    return outputs


@dataclass(frozen=True)
class Net:
    """A network's name and gateways, from its JSON document."""

    name: str
    gw4: str
    gw6: str | None

    @classmethod
    def of(cls, document: dict[str, Any]) -> Net:
        gateways = {
            ipaddress.ip_address(c["Gateway"]).version: c["Gateway"]
            for c in document["IPAM"]["Config"]
        }
        return cls(document["Name"], gateways[4], gateways.get(6))


@dataclass(frozen=True)
class Ep:
    """An endpoint's addresses (without prefix length), from connect's JSON document."""

    v4: str
    v6: str | None

    @classmethod
    def of(cls, document: dict[str, Any]) -> Ep:
        v6 = document["IPv6Address"].split("/")[0] or None
        return cls(document["IPv4Address"].split("/")[0], v6)


def create(name: str, *args: str) -> list[str]:
    return ["network", "create", name, *args, "--format", "json"]


def connect(network: str, sandbox: str, *args: str) -> list[str]:
    return ["network", "connect", network, sandbox, *args, "--format", "json"]


def start_daemon(host: Host, tmp_path: Path, *gateways: str) -> subprocess.Popen[str]:
    """Start netstackd (output to a log file) and wait until DNS serves every gateway."""
    proc = host.daemons.start(log=tmp_path / "netstackd.log")
    wait_listening(host, gateways, proc)
    return proc


def wait_listening(
    host: Host, gateways: tuple[str, ...], proc: subprocess.Popen[str], timeout: float = 15.0
) -> dict[str, Any]:
    """Poll `netctl status` until the resolver listens on every gateway; the status."""
    wanted = {str(ipaddress.ip_address(g)) for g in gateways}
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"netstackd exited with {proc.returncode}"
        result = host.netctl("status", "--format", "json", check=False)
        if result.returncode == 0:
            status = json.loads(result.stdout)
            if wanted <= set(status["dns"]["listening"]):
                return status
        time.sleep(0.05)
    raise AssertionError(f"resolver not listening on {sorted(wanted)}: {status}")


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------- clients


@dataclass
class Dig:
    """What dig printed, parsed."""

    rc: int
    status: str | None
    flags: frozenset[str]
    answers: list[tuple[str, str, str]]  # (owner name, type, data)
    transport: str | None
    elapsed: float
    text: str

    def data(self, rtype: str | None = None) -> list[str]:
        return [d for _name, t, d in self.answers if rtype is None or t == rtype]


_STATUS = re.compile(r"->>HEADER<<- opcode: \w+, status: (\w+)")
_FLAGS = re.compile(r";; flags:([^;]*);")
_SERVER = re.compile(r";; SERVER: \S+ \((UDP|TCP)\)")


def dig(host: Host, sandbox: str, *args: str, base: tuple[str, ...] = DIG) -> Dig:
    """Run dig inside the sandbox (its resolv.conf gives the server unless @server is given)."""
    start = time.monotonic()
    proc = host.in_sandbox(sandbox, *base, *args, check=False, timeout=30)
    elapsed = time.monotonic() - start
    text = proc.stdout + proc.stderr
    status = _STATUS.search(text)
    flags = _FLAGS.search(text)
    server = _SERVER.search(text)
    answers: list[tuple[str, str, str]] = []
    in_answer = False
    for line in proc.stdout.splitlines():
        if line.startswith(";; ANSWER SECTION:"):
            in_answer = True
        elif in_answer and not line.strip():
            in_answer = False
        elif in_answer:
            fields = line.split()
            answers.append((fields[0], fields[3], " ".join(fields[4:])))
    return Dig(
        rc=proc.returncode,
        status=status.group(1) if status else None,
        flags=frozenset(flags.group(1).split()) if flags else frozenset(),
        answers=answers,
        transport=server.group(1) if server else None,
        elapsed=elapsed,
        text=text,
    )


def rcode(reply: DNSRecord | None) -> str | None:
    return None if reply is None else RCODE.get(reply.header.rcode)


def rdata(reply: DNSRecord | None) -> list[str]:
    return [] if reply is None else [str(rr.rdata) for rr in reply.rr]


class DnsClient:
    """Sends queries to one server from sockets created inside a namespace."""

    def __init__(self, netns: str, server: str, port: int = 53) -> None:
        self.netns = netns
        self.server = server
        self.port = port
        self.family = socket.AF_INET6 if ":" in server else socket.AF_INET

    def socket(self, kind: socket.SocketKind = socket.SOCK_DGRAM) -> socket.socket:
        """A socket in the namespace (connected for UDP; caller connects TCP)."""
        sock = run_in(self.netns, lambda: socket.socket(self.family, kind))
        if kind == socket.SOCK_DGRAM:
            sock.connect((self.server, self.port))
        return sock

    @staticmethod
    def build(name: str, qtype: str = "A", edns: int | None = None) -> DNSRecord:
        query = DNSRecord.question(name, qtype)
        if edns is not None:
            query.add_ar(EDNS0(udp_len=edns))
        return query

    def udp(self, wire: bytes, timeout: float = 2.0) -> bytes | None:
        """Send raw bytes over UDP; the first reply with the same id, or None."""
        with self.socket() as sock:
            sock.send(wire)
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], remaining)
                if not ready:
                    return None
                try:
                    reply = sock.recv(65535)
                except ConnectionRefusedError:
                    return None
                if reply[:2] == wire[:2]:
                    return reply
        return None

    def tcp(self, wire: bytes, timeout: float = 2.0) -> bytes | None:
        """Send raw bytes as one length-prefixed TCP message; the reply, or None."""
        with self.socket(socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((self.server, self.port))
                sock.sendall(len(wire).to_bytes(2, "big") + wire)
                reply = read_message(sock)
            except OSError:
                return None
            assert reply is None or reply[:2] == wire[:2], "TCP reply with another id"
            return reply

    def query(
        self,
        name: str,
        qtype: str = "A",
        *,
        edns: int | None = None,
        tcp: bool = False,
        timeout: float = 2.0,
    ) -> DNSRecord | None:
        """Ask one question; the parsed reply or None (no answer in time)."""
        wire = bytes(self.build(name, qtype, edns).pack())
        reply = self.tcp(wire, timeout) if tcp else self.udp(wire, timeout)
        return None if reply is None else DNSRecord.parse(reply)


def read_message(sock: socket.socket) -> bytes | None:
    """One length-prefixed DNS message from a TCP socket, or None if it closes first."""
    data = b""
    while len(data) < 2:
        chunk = sock.recv(2 - len(data))
        if not chunk:
            return None
        data += chunk
    length = int.from_bytes(data, "big")
    message = b""
    while len(message) < length:
        chunk = sock.recv(length - len(message))
        if not chunk:
            return None
        message += chunk
    return message


def pack(query: DNSRecord) -> bytes:
    return bytes(query.pack())


def rotations(items: list[str]) -> set[tuple[str, ...]]:
    return {tuple(items[k:] + items[:k]) for k in range(len(items))}


# --------------------------------------------------------------------------- 1. records


def test_every_record_kind(host: Host, tmp_path: Path) -> None:
    """A, AAAA, aliases and their scope, PTR (v4/v6, with/without a domain),
    case-insensitive names and name.domain; names on unshared networks are NXDOMAIN."""
    a, b, c, d = (f"{host.name}-{s}" for s in "abcd")
    docs = netctl_many(
        host,
        create("n1", "--ipv6"),
        create("n2", "--ipv6", "--opt", "dns.domain=svc.test"),
        *(["sandbox", "create", s] for s in (a, b, c, d)),
        connect("n1", a, "--alias", "web"),
        connect("n1", b, "--alias", "web"),
        connect("n1", c, "--alias", "web"),
        connect("n2", a, "--alias", "api"),
        connect("n2", d, "--alias", "db"),
    )
    n1, n2 = Net.of(docs[0]), Net.of(docs[1])
    a1, b1, c1, a2, d2 = (Ep.of(doc) for doc in docs[6:])
    assert n1.gw6 and n2.gw6 and a1.v6 and a2.v6 and d2.v6
    start_daemon(host, tmp_path, n1.gw4, n1.gw6, n2.gw4, n2.gw6)

    # A and AAAA by sandbox name, as seen from each client's networks: b (on n1) sees a's
    # n1 addresses, d (on n2) a's n2 addresses, a itself (on both) all of them.
    result = dig(host, b, a)
    assert result.status == "NOERROR" and "aa" in result.flags, result.text
    assert result.data("A") == [a1.v4]
    assert dig(host, b, a, "AAAA").data("AAAA") == [a1.v6]
    assert dig(host, d, a).data("A") == [a2.v4]
    assert dig(host, d, a, "AAAA").data("AAAA") == [a2.v6]
    assert set(dig(host, a, a).data("A")) == {a1.v4, a2.v4}
    assert set(dig(host, a, a, "AAAA").data("AAAA")) == {a1.v6, a2.v6}
    assert dig(host, b, b).data("A") == [b1.v4]
    # Names on networks the client is not on do not exist for it.
    for name in (b, c, "web"):
        result = dig(host, d, name)
        assert result.status == "NXDOMAIN" and not result.answers, (name, result.text)
    # Aliases exist on their own network only: "api" (given to a on n2) is seen from d,
    # not from b, which shares n1 with a but not n2.
    assert dig(host, d, "api").data("A") == [a2.v4]
    assert dig(host, b, "api").status == "NXDOMAIN"
    assert dig(host, b, "db").status == "NXDOMAIN"
    assert set(dig(host, a, "api").data("A")) == {a2.v4}
    # The same with dnslib from a socket inside d, over the v6 gateway.
    client6 = DnsClient(d, n2.gw6)
    assert rdata(client6.query("api", "AAAA")) == [a2.v6]
    assert rcode(client6.query("web")) == "NXDOMAIN"
    # An existing name asked for a type it has no data of: NOERROR, no answers (NODATA).
    result = dig(host, b, "web", "TXT")
    assert result.status == "NOERROR" and not result.answers, result.text

    # Case-insensitive, with or without the final dot.
    assert dig(host, b, a.upper()).data("A") == [a1.v4]
    assert set(dig(host, b, "WeB.").data("A")) == {a1.v4, b1.v4, c1.v4}
    assert rdata(DnsClient(d, n2.gw4).query("DB.SVC.TEST")) == [d2.v4]

    # name.domain on the network with dns.domain only.
    assert dig(host, d, f"{a}.svc.test").data("A") == [a2.v4]
    assert dig(host, d, f"{a}.SVC.test", "AAAA").data("AAAA") == [a2.v6]
    assert dig(host, d, "api.svc.test").data("A") == [a2.v4]
    assert dig(host, d, f"{d}.svc.test").data("A") == [d2.v4]
    assert dig(host, d, "web.svc.test").status == "NXDOMAIN"
    assert dig(host, b, f"{d}.svc.test").status == "NXDOMAIN"  # b is not on n2

    # PTR: v4 and v6, plain name without a domain, name.domain with one.
    assert dig(host, b, "-x", b1.v4).data("PTR") == [f"{b}."]
    assert dig(host, b, "-x", a1.v6).data("PTR") == [f"{a}."]
    assert dig(host, d, "-x", a2.v4).data("PTR") == [f"{a}.svc.test."]
    assert dig(host, d, "-x", d2.v6).data("PTR") == [f"{d}.svc.test."]
    # ... only for clients sharing the network: d is not on n1.
    result = dig(host, d, "-x", b1.v4)
    assert result.status == "NXDOMAIN" and not result.answers, result.text
    reverse = ipaddress.ip_address(a1.v6).reverse_pointer
    assert rdata(DnsClient(b, n1.gw4).query(reverse.upper(), "PTR")) == [f"{a}."]


def test_round_robin_rotates_every_query(host: Host, tmp_path: Path) -> None:
    """Three endpoints share "web" (connected a, b, c): successive answers rotate, so the
    first address changes on every query and every rotation shows up, for A and AAAA."""
    a, b, c, q = (f"{host.name}-{s}" for s in "abcq")
    docs = netctl_many(
        host,
        create("n1", "--ipv6"),
        *(["sandbox", "create", s] for s in (a, b, c, q)),
        *(connect("n1", s, "--alias", "web") for s in (a, b, c)),
        connect("n1", q),
    )
    n1 = Net.of(docs[0])
    assert n1.gw6
    endpoints = [Ep.of(doc) for doc in docs[5:8]]
    start_daemon(host, tmp_path, n1.gw4, n1.gw6)

    # dig sends new bytes each time (a fresh cookie). The dnslib client sends the same
    # bytes but for the id, from a fresh socket (a new source port) each time, as glibc's
    # stub resolver does; more of those, as they cost ~2 ms each.
    for how, qtype, count, ask in (
        ("dig", "A", 12, lambda: dig(host, q, "web").data("A")),
        ("dig", "AAAA", 6, lambda: dig(host, q, "web", "AAAA").data("AAAA")),
        ("dnslib", "A", 30, lambda: rdata(DnsClient(q, n1.gw4).query("web"))),
        ("dnslib", "AAAA", 30, lambda: rdata(DnsClient(q, n1.gw6).query("web", "AAAA"))),
    ):
        order = [e.v4 if qtype == "A" else str(e.v6) for e in endpoints]
        seen = [ask() for _ in range(count)]
        assert all(sorted(s) == sorted(order) for s in seen), (how, qtype, seen)
        assert {tuple(s) for s in seen} == rotations(order), (how, qtype, seen)
        firsts = [s[0] for s in seen]
        assert all(x != y for x, y in itertools.pairwise(firsts)), (how, qtype, firsts)


# --------------------------------------------------------------------------- 2. TCP, size


def test_tcp_truncation_and_edns_size(host: Host, tmp_path: Path) -> None:
    """40 endpoints under one alias: over UDP without EDNS0 the answer does not fit 512
    bytes (TC, no answers); over TCP it comes whole; the client's EDNS0 size is honoured
    to the byte, and capped at 1232."""
    count = 40
    members = [f"{host.name}-m{i}" for i in range(count)]
    client = f"{host.name}-q"
    docs = netctl_many(
        host,
        create("n1", "--ipv6"),
        *(["sandbox", "create", s] for s in [client, *members]),
        *(connect("n1", s, "--alias", "many") for s in members),
        connect("n1", client),
    )
    n1 = Net.of(docs[0])
    assert n1.gw6
    v4 = {Ep.of(doc).v4 for doc in docs[-count - 1 : -1]}
    v6 = {Ep.of(doc).v6 for doc in docs[-count - 1 : -1]}
    start_daemon(host, tmp_path, n1.gw4, n1.gw6)

    # dig: UDP without EDNS0 -> TC, no answers (+ignore: do not retry over TCP).
    result = dig(host, client, "+noedns", "+ignore", "many")
    assert result.status == "NOERROR" and "tc" in result.flags, result.text
    assert result.transport == "UDP" and not result.answers
    # ... dig's own retry over TCP then gets everything.
    result = dig(host, client, "+noedns", "many")
    assert result.transport == "TCP" and set(result.data("A")) == v4, result.text
    assert "tc" not in result.flags
    # Plain +tcp queries, for A, AAAA and ANY.
    result = dig(host, client, "+tcp", "many", "AAAA")
    assert result.transport == "TCP" and set(result.data("AAAA")) == v6, result.text
    result = dig(host, client, "+tcp", "many", "ANY")
    assert set(result.data("A")) == v4 and set(result.data("AAAA")) == v6, result.text
    # With dig's default EDNS0 size (1232) the 40 A records (~670 bytes) fit over UDP.
    result = dig(host, client, "many")
    assert result.transport == "UDP" and set(result.data("A")) == v4, result.text

    # dnslib, exact sizes: the AAAA answer over TCP is S bytes; over UDP with EDNS0 size S
    # it comes whole, with S - 1 truncated.
    dns = DnsClient(client, n1.gw4)
    whole = dns.tcp(bytes(dns.build("many", "AAAA", edns=1232).pack()))
    assert whole is not None
    size = len(whole)
    assert 1000 < size <= 1232, size
    reply = dns.query("many", "AAAA", edns=size)
    assert reply is not None and not reply.header.tc and set(rdata(reply)) == v6
    reply = dns.query("many", "AAAA", edns=size - 1)
    assert reply is not None and reply.header.tc and not reply.rr
    # EDNS0 advertised: our OPT record says 1232.
    assert [rr.rclass for rr in reply.ar if rr.rtype == QTYPE.OPT] == [1232]
    # A client offering 4096 still gets at most 1232 over UDP: ANY (~1800 bytes) truncates.
    reply = dns.query("many", "ANY", edns=4096)
    assert reply is not None and reply.header.tc and not reply.rr
    result = dig(host, client, "+notcp", "+ignore", "+bufsize=4096", "many", "ANY")
    assert result.transport == "UDP" and "tc" in result.flags, result.text
    # ... and whole over TCP, where the size does not matter.
    reply = dns.query("many", "ANY", edns=512, tcp=True)
    assert reply is not None and not reply.header.tc and len(reply.rr) == 2 * count
    # EDNS0 sizes below 512 count as 512: without EDNS0 the A answer truncates, but a
    # query offering 700 bytes gets the whole ~670-byte answer.
    assert dns.query("many").header.tc  # type: ignore[union-attr]
    assert set(rdata(dns.query("many", edns=700))) == v4
    assert dns.query("many", edns=100).header.tc  # type: ignore[union-attr]
    # Over the v6 gateway, too.
    assert set(rdata(DnsClient(client, n1.gw6).query("many", "AAAA", tcp=True))) == v6
    # Several queries on one TCP connection, sent in one write (RFC 7766 pipelining).
    queries = [dns.build(name, qtype) for name, qtype in (("many", "A"), (client, "A"))]
    queries.append(dns.build("many", "AAAA"))
    with dns.socket(socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect((n1.gw4, 53))
        sock.sendall(b"".join(len(w).to_bytes(2, "big") + w for w in map(pack, queries)))
        replies = [DNSRecord.parse(read_message(sock) or b"") for _ in queries]
    assert [r.header.id for r in replies] == [q.header.id for q in queries]
    assert set(rdata(replies[0])) == v4 and set(rdata(replies[2])) == v6
    assert rdata(replies[1]) == [Ep.of(docs[-1]).v4]


# --------------------------------------------------------------------------- 3. forwarding


@pytest.fixture
def upstreams(host: Host) -> Iterator[list[Upstream]]:
    """Upstreams started by a test; stopped at teardown."""
    started: list[Upstream] = []
    yield started
    for upstream in started:
        upstream.stop()


def test_forwarding_to_upstreams(host: Host, tmp_path: Path, upstreams: list[Upstream]) -> None:
    """Names outside netstack's go to the network's --dns servers, else to the host
    resolv.conf's (loopback entries skipped); a truncated upstream UDP reply is asked again
    over TCP; clients on --internal networks only are refused."""
    out = host.outside()
    upstream4 = start_upstream(out.name, out.addr4, tmp_path / "up4.log")
    upstreams.append(upstream4)
    upstream6 = start_upstream(out.name, out.addr6, tmp_path / "up6.log")
    upstreams.append(upstream6)
    # A server on the host's loopback stub address, which must never be asked.
    stub = start_upstream(host.name, "127.0.0.53", tmp_path / "stub.log")
    upstreams.append(stub)
    host.resolv_conf.write_text(
        "# host resolv.conf\nnameserver 127.0.0.53\nnameserver fe80::1\nnameserver 192.0.2.2\n"
        "options edns0\n"
    )
    a, b, i = (f"{host.name}-{s}" for s in ("a", "b", "i"))
    docs = netctl_many(
        host,
        create("viadns", "--dns", out.addr6),
        create("viahost", "--ipv6"),
        create("inner", "--internal"),
        *(["sandbox", "create", s] for s in (a, b, i)),
        connect("viadns", a),
        connect("viahost", b),
        connect("inner", i),
    )
    viadns, viahost, inner = (Net.of(doc) for doc in docs[:3])
    assert viahost.gw6
    start_daemon(host, tmp_path, viadns.gw4, viahost.gw4, viahost.gw6, inner.gw4)

    # The network's --dns server (v6 upstream) for a; host resolv.conf (v4) for b.
    result = dig(host, a, "www.example.com")
    assert result.status == "NOERROR" and result.data("A") == [FORWARDED_V4], result.text
    assert "aa" not in result.flags  # upstream's flags relayed, not our own
    assert ("udp", out.host_addr6, "www.example.com", "A") in upstream6.queries()
    result = dig(host, b, "WWW.example.org", "AAAA")
    assert result.data("AAAA") == [FORWARDED_V6], result.text
    assert ("udp", out.host_addr4, "WWW.example.org", "AAAA") in upstream4.queries()
    assert not any(q[2] == "www.example.com" for q in upstream4.queries())
    # Relayed as they are: NXDOMAIN from upstream, and over TCP from the client.
    result = dig(host, b, f"gone.{NX_DOMAIN}")
    assert result.status == "NXDOMAIN" and not result.answers, result.text
    result = dig(host, a, "+tcp", "tcp.example.com")
    assert result.transport == "TCP" and result.data("A") == [FORWARDED_V4], result.text
    client = DnsClient(b, viahost.gw4)
    assert rdata(client.query("sock.example.net", "AAAA", tcp=True)) == [FORWARDED_V6]
    assert rdata(client.query("sock.example.net")) == [FORWARDED_V4]

    # Through the IPv6 listener, over UDP and TCP.
    client6 = DnsClient(b, viahost.gw6)
    assert rdata(client6.query("six.example.net", "AAAA")) == [FORWARDED_V6]
    assert rdata(client6.query("six.example.net", tcp=True)) == [FORWARDED_V4]

    # Truncated over UDP upstream: netstackd asks again over TCP and relays the whole
    # answer (60 A records, ~1000 bytes: fits dig's EDNS0 size).
    result = dig(host, b, BIG_NAME)
    assert result.transport == "UDP" and result.data("A") == big_addresses(), result.text
    big = [q[0] for q in upstream4.queries() if q[2] == BIG_NAME]
    assert big == ["udp", "tcp"], upstream4.queries()
    # A client without EDNS0 (512 bytes) gets TC, then the whole answer over TCP.
    result = dig(host, a, "+noedns", "+ignore", BIG_NAME)
    assert "tc" in result.flags and not result.answers, result.text
    result = dig(host, a, "+tcp", BIG_NAME)
    assert len(result.data("A")) == BIG_COUNT, result.text

    # netstack's own names are never forwarded: single labels and reverse names of its
    # subnets, even when they do not exist.
    assert dig(host, a, "nosuchsandbox").status == "NXDOMAIN"
    assert dig(host, a, a).status == "NOERROR"
    assert dig(host, a, "-x", viahost.gw4).status == "NXDOMAIN"
    asked = {q[2].lower() for q in upstream4.queries() + upstream6.queries()}
    assert "nosuchsandbox" not in asked and a.lower() not in asked
    assert not any(name.endswith(".arpa") for name in asked), asked

    # Internal-only clients: REFUSED for outside names, their own names still answer.
    result = dig(host, i, "www.example.com")
    assert result.status == "REFUSED" and not result.answers, result.text
    assert rcode(DnsClient(i, inner.gw4).query("x.example.com", tcp=True)) == "REFUSED"
    assert dig(host, i, i).status == "NOERROR"
    asked = {q[2] for q in upstream4.queries() + upstream6.queries()}
    assert "x.example.com" not in asked

    # The loopback server from the host's resolv.conf was never asked.
    assert stub.queries() == []

    # A new host resolv.conf is read on the next forwarded query.
    host.resolv_conf.write_text(f"nameserver {out.addr6}\n")
    result = dig(host, b, "later.example.com")
    assert result.data("A") == [FORWARDED_V4], result.text
    assert ("udp", out.host_addr6, "later.example.com", "A") in upstream6.queries()
    assert not any(q[2] == "later.example.com" for q in upstream4.queries())


def test_servfail_when_upstream_is_dead_or_blackholed(host: Host, tmp_path: Path) -> None:
    """SERVFAIL quickly when nothing listens upstream (port unreachable), and within the
    forwarder's bound (< 5 s, before a glibc client gives up) when packets vanish."""
    out = host.outside()
    a, h, n = (f"{host.name}-{s}" for s in "ahn")
    docs = netctl_many(
        host,
        create("dead", "--dns", out.addr4),
        create("hole", "--dns", out.addr4, "--dns", out.addr6, "--dns", "192.0.2.3"),
        create("none"),
        ["sandbox", "create", a],
        ["sandbox", "create", h],
        ["sandbox", "create", n],
        connect("dead", a),
        connect("hole", h),
        connect("none", n),
    )
    dead, hole, none = (Net.of(doc) for doc in docs[:3])
    out.run("ip", "addr", "add", "192.0.2.3/24", "dev", out.iface)
    start_daemon(host, tmp_path, dead.gw4, hole.gw4, none.gw4)
    slow = ("dig", "+time=8", "+tries=1")

    # No upstream configured at all (the host's resolv.conf names none): SERVFAIL at once.
    result = dig(host, n, "none.example.com", base=slow)
    assert result.status == "SERVFAIL" and not result.answers, result.text
    print(f"SERVFAIL, no upstream configured: {result.elapsed * 1000:.0f} ms")
    assert result.elapsed < 1.0

    # Nothing listens on 192.0.2.2:53: the upstream's port unreachable ends it at once.
    result = dig(host, a, "dead.example.com", base=slow)
    assert result.status == "SERVFAIL" and not result.answers, result.text
    print(f"SERVFAIL, dead upstream: {result.elapsed * 1000:.0f} ms")
    assert result.elapsed < 1.0
    reply_time = time.monotonic()
    reply = DnsClient(a, dead.gw4).query("dead2.example.com", tcp=True, timeout=8)
    assert rcode(reply) == "SERVFAIL"
    assert time.monotonic() - reply_time < 1.0

    # Packets to port 53 dropped in the outside namespace: three servers, all silent.
    # 1.5 s per server, 4 s in all: SERVFAIL at ~4 s, before glibc's 5 s timeout. The
    # same for a client over TCP, asking at the same time.
    table = "inet nstest_blackhole"
    out.run("nft", "add", "table", table)
    out.run("nft", "add chain", table, "input { type filter hook input priority 0 ; }")
    out.run("nft", "add rule", table, "input meta l4proto { udp, tcp } th dport 53 drop")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        over_udp = pool.submit(dig, host, h, "hole.example.com", base=slow)
        over_tcp = pool.submit(dig, host, h, "+tcp", "hole-tcp.example.com", base=slow)
        results = {"udp": over_udp.result(), "tcp": over_tcp.result()}
    for transport, result in results.items():
        assert result.status == "SERVFAIL" and not result.answers, result.text
        print(f"SERVFAIL, 3 blackholed upstreams, {transport}: {result.elapsed * 1000:.0f} ms")
        assert result.elapsed < SERVFAIL_LIMIT
    # The daemon is still fine, and its status shows nothing left in flight.
    status = json.loads(host.netctl("status", "--format", "json").stdout)
    assert status["dns"]["forwarding"] == 0


# --------------------------------------------------------------------------- 4. strangers


def test_strangers_get_no_answers(host: Host, tmp_path: Path) -> None:
    """Across networks: NXDOMAIN. From outside the host, or from the host itself (no
    endpoint's address): REFUSED without data, or nothing; garbage gets nothing."""
    out = host.outside()
    a, z = f"{host.name}-a", f"{host.name}-z"
    docs = netctl_many(
        host,
        create("n1", "--ipv6", "--subnet", "10.77.1.0/24", "--subnet", "fd77:1::/64"),
        create("n2"),
        ["sandbox", "create", a],
        ["sandbox", "create", z],
        connect("n1", a, "--alias", "svc"),
        connect("n2", z),
    )
    n1 = Net.of(docs[0])
    assert n1.gw6
    start_daemon(host, tmp_path, n1.gw4, n1.gw6)
    assert dig(host, a, "svc").data("A"), "set-up: the name resolves for a member"
    for name in ("svc", a):
        result = dig(host, z, name)
        assert result.status == "NXDOMAIN" and not result.answers, result.text

    # The outside gets routes to n1's subnets through the host.
    out.run("ip", "route", "add", "10.77.1.0/24", "via", out.host_addr4)
    out.run("ip", "-6", "route", "add", "fd77:1::/64", "via", out.host_addr6)
    strangers = [
        DnsClient(out.name, n1.gw4),
        DnsClient(out.name, n1.gw6),
        DnsClient(host.name, n1.gw4),
        DnsClient(host.name, n1.gw6),
    ]
    for client in strangers:
        for tcp in (False, True):
            reply = client.query("svc", tcp=tcp, timeout=0.5)
            assert reply is None or (rcode(reply) == "REFUSED" and not reply.rr), (
                client.netns,
                client.server,
                tcp,
                reply,
            )
            reply = client.query("www.example.com", tcp=tcp, timeout=0.5)
            assert reply is None or (rcode(reply) == "REFUSED" and not reply.rr)
        assert client.udp(b"\x12\x34garbage-not-dns", timeout=0.3) is None
        assert client.udp(b"\x12\x34", timeout=0.3) is None
    # The host's own query is refused outright (the gateway is no endpoint's address).
    assert rcode(DnsClient(host.name, n1.gw4).query("svc")) == "REFUSED"


# --------------------------------------------------------------------------- 5. propagation


def test_records_follow_connect_and_disconnect(host: Host, tmp_path: Path) -> None:
    """A connected sandbox's name and alias resolve within 100 ms of connect returning;
    after disconnect they are NXDOMAIN within 100 ms (asserted < 0.5 s, printed)."""
    q, t = f"{host.name}-q", f"{host.name}-t"
    docs = netctl_many(
        host,
        create("n1"),
        ["sandbox", "create", q],
        ["sandbox", "create", t],
        connect("n1", q),
    )
    n1 = Net.of(docs[0])
    start_daemon(host, tmp_path, n1.gw4)
    client = DnsClient(q, n1.gw4)
    assert rcode(client.query(t)) == "NXDOMAIN"

    def answered_with(expected: list[str]) -> Callable[[DNSRecord | None], bool]:
        return lambda reply: rdata(reply) == expected

    def latency(name: str, check: Callable[[DNSRecord | None], bool]) -> float:
        start = time.monotonic()
        deadline = start + 5.0
        while time.monotonic() < deadline:
            if check(client.query(name, timeout=0.05)):
                return time.monotonic() - start
            time.sleep(0.002)
        raise AssertionError(f"{name} did not change within 5 s")

    figures: list[str] = []
    for round_number in range(2):
        alias = f"late{round_number}"
        connected = host.netctl("network", "connect", "n1", t, "--alias", alias, "--format", "json")
        address = Ep.of(json.loads(connected.stdout)).v4
        up = latency(t, answered_with([address]))
        assert rdata(client.query(alias)) == [address]
        assert rdata(client.query(ipaddress.ip_address(address).reverse_pointer, "PTR")) == [
            f"{t}."
        ]
        host.netctl("network", "disconnect", "n1", t)
        down = latency(alias, lambda reply: rcode(reply) == "NXDOMAIN")
        assert rcode(client.query(t)) == "NXDOMAIN"
        figures.append(f"connect {up * 1000:.1f} ms, disconnect {down * 1000:.1f} ms")
        assert up < PROPAGATION_LIMIT and down < PROPAGATION_LIMIT, figures
    print("record propagation after netctl returned: " + "; ".join(figures))

    # A network created while the daemon runs gets listeners at once; removed, they go.
    n2 = Net.of(host.netctl_json("network", "create", "n2"))
    address = Ep.of(host.netctl_json("network", "connect", "n2", t)).v4
    own = DnsClient(t, n2.gw4)
    assert wait_until(lambda: rdata(own.query(t, timeout=0.05)) == [address], 2.0)
    assert rdata(own.query(t, tcp=True)) == [address]
    assert len(sockets_on(host, n2.gw4)) >= 2  # UDP and TCP (the helper sees them)
    host.netctl("network", "disconnect", "n2", t)
    host.netctl("network", "rm", "n2")
    assert wait_until(lambda: not sockets_on(host, n2.gw4), 2.0), sockets_on(host, n2.gw4)
    status = json.loads(host.netctl("status", "--format", "json").stdout)
    assert status["dns"]["listening"] == [n1.gw4]
    assert rdata(client.query(q)) == [Ep.of(docs[-1]).v4]


def sockets_on(host: Host, address: str) -> list[str]:
    """Lines of `ss` in the host namespace for sockets bound to address (UDP and TCP)."""
    lines = host.run("ss", "-Hanut").stdout.splitlines()
    return [line for line in lines if f" {address}:53 " in f" {line} "]


# --------------------------------------------------------------------------- 6. fuzz


def _valid_query(name: str) -> bytes:
    return bytes(DnsClient.build(name, "A", edns=1232).pack())


def _mutations(valid: bytes, rng: random.Random) -> Callable[[], bytes]:
    """A source of broken variants of a valid query."""
    qname_end = valid.index(b"\x00", 12)

    def bit_flips() -> bytes:
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)

    def truncated() -> bytes:
        return valid[: rng.randrange(len(valid))]

    def bad_label_length() -> bytes:
        data = bytearray(valid)
        data[12] = rng.choice([0x3F, 0x40, 0x7F, 0xBF, 0xFF, len(valid)])
        return bytes(data)

    def huge_counts() -> bytes:
        counts = [rng.choice([0, 1, 2, 0x7FFF, 0xFFFF]) for _ in range(4)]
        return valid[:4] + struct.pack("!4H", *counts) + valid[12:]

    def compression_loop() -> bytes:
        # The name is a pointer to itself, or two pointers pointing at each other.
        name = b"\xc0\x0c" if rng.random() < 0.5 else b"\x01x\xc0\x0e\xc0\x0c"
        return valid[:12] + name + valid[qname_end + 1 :]

    def long_name() -> bytes:
        labels = b"".join(bytes([63]) + b"a" * 63 for _ in range(rng.randint(4, 9)))
        return valid[:12] + labels + valid[qname_end:]

    def garbage_tail() -> bytes:
        return valid + rng.randbytes(rng.randint(1, 300))

    def flags() -> bytes:
        return valid[:2] + rng.randbytes(2) + valid[4:]

    choices = [
        bit_flips,
        truncated,
        bad_label_length,
        huge_counts,
        compression_loop,
        long_name,
        garbage_tail,
        flags,
    ]
    return lambda: rng.choice(choices)()


def fuzz_packets(count: int, valid: bytes, seed: int) -> list[bytes]:
    """Random bytes, scapy fuzz(DNS(...)) packets and mutations of `valid`, shuffled."""
    from scapy.layers.dns import DNS, DNSQR, DNSRROPT
    from scapy.packet import fuzz

    rng = random.Random(seed)
    random.seed(seed)  # scapy's fuzz draws from the random module
    mutate = _mutations(valid, rng)
    templates = [
        lambda: fuzz(DNS()),
        lambda: fuzz(DNS(qd=DNSQR(qname="web"))),
        lambda: DNS(qd=fuzz(DNSQR())),
        lambda: fuzz(DNS(qd=DNSQR(qname="x.example"), ar=DNSRROPT())),
    ]
    packets: list[bytes] = []
    for n in range(count):
        kind = n % 10
        if kind < 3:
            packets.append(rng.randbytes(rng.randint(0, 600)))
        elif kind < 5:
            packets.append(bytes(templates[n % len(templates)]())[:65000])
        else:
            packets.append(mutate())
    rng.shuffle(packets)
    return packets


def test_fuzz_udp_and_tcp(host: Host, tmp_path: Path) -> None:
    """10,000 broken or random datagrams from inside a sandbox, then garbage over TCP: the
    resolver keeps answering correctly and netctl status keeps working."""
    f, g = f"{host.name}-f", f"{host.name}-g"
    docs = netctl_many(
        host,
        create("n1"),
        ["sandbox", "create", f],
        ["sandbox", "create", g],
        connect("n1", f),
        connect("n1", g, "--alias", "web"),
    )
    n1, target = Net.of(docs[0]), Ep.of(docs[-1]).v4
    proc = start_daemon(host, tmp_path, n1.gw4)
    client = DnsClient(f, n1.gw4)
    assert rdata(client.query("web")) == [target]

    started = time.monotonic()
    packets = fuzz_packets(FUZZ_PACKETS, _valid_query("web"), FUZZ_SEED)
    generated = time.monotonic()
    replies = 0
    with client.socket() as sock:
        sock.setblocking(False)

        def drain() -> int:
            got = 0
            while True:
                try:
                    sock.recv(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    return got
                got += 1

        for n, packet in enumerate(packets):
            while True:
                try:
                    sock.send(packet)
                    break
                except BlockingIOError:
                    select.select([], [sock], [], 1.0)
                except ConnectionRefusedError:
                    pass  # an ICMP error for an earlier datagram: the daemon must be alive
            if n % 100 == 99:
                replies += drain()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            select.select([sock], [], [], 0.1)
            replies += drain()
    sent = time.monotonic()
    print(
        f"fuzz (seed {FUZZ_SEED}): {len(packets)} datagrams generated in "
        f"{generated - started:.2f} s, sent in {sent - generated:.2f} s, {replies} replies"
    )
    assert proc.poll() is None, "netstackd died"
    assert "Traceback" not in (tmp_path / "netstackd.log").read_text()
    assert wait_until(lambda: rdata(client.query("web", timeout=0.5)) == [target], 5.0)
    assert dig(host, f, "web").data("A") == [target]
    assert dig(host, f, "-x", target).data("PTR") == [f"{g}."]
    status = json.loads(host.netctl("status", "--format", "json").stdout)
    assert status["dns"]["listening"] == [n1.gw4]

    # TCP: random length prefixes and garbage, short reads, connections left hanging.
    rng = random.Random(FUZZ_SEED + 1)
    hanging: list[socket.socket] = []
    try:
        for n in range(300):
            sock = client.socket(socket.SOCK_STREAM)
            sock.settimeout(2.0)
            sock.connect((n1.gw4, 53))
            kind = n % 5
            if kind == 0:  # a length prefix promising more than comes, left open
                sock.sendall(rng.randbytes(2) + rng.randbytes(rng.randint(0, 50)))
                hanging.append(sock)
                if len(hanging) > 20:
                    hanging.pop(0).close()
                continue
            if kind == 1:
                payload = rng.randbytes(rng.randint(0, 600))
            elif kind == 2:
                message = packets[n]
                payload = len(message).to_bytes(2, "big") + message
            elif kind == 3:
                payload = b"\x00\x00" + rng.randbytes(rng.randint(0, 20))
            else:
                message = _valid_query("web")
                payload = len(message).to_bytes(2, "big") + message[: rng.randint(0, len(message))]
            with contextlib.suppress(OSError):
                sock.sendall(payload)
            if n % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        assert proc.poll() is None, "netstackd died"
        reply = client.query("web", tcp=True)
        assert rdata(reply) == [target], reply
        assert dig(host, f, "+tcp", "web").data("A") == [target]
        assert rdata(client.query("web")) == [target]
    finally:
        for sock in hanging:
            sock.close()
    host.netctl("status")
    assert "Traceback" not in (tmp_path / "netstackd.log").read_text()


# --------------------------------------------------------------------------- 7. restart


def test_restart_keeps_names(host: Host, tmp_path: Path) -> None:
    """Names answer after a SIGTERM and restart, and after kill -9 and restart (the new
    daemon binds port 53 again, even with a client's TCP connection cut by the kill)."""
    a, b = f"{host.name}-a", f"{host.name}-b"
    docs = netctl_many(
        host,
        create("n1", "--ipv6", "--opt", "dns.domain=svc.test"),
        ["sandbox", "create", a],
        ["sandbox", "create", b],
        connect("n1", a),
        connect("n1", b, "--alias", "web"),
    )
    n1, eb = Net.of(docs[0]), Ep.of(docs[-1])
    assert n1.gw6
    gateways = (n1.gw4, n1.gw6)
    client = DnsClient(a, n1.gw4)

    def answers() -> None:
        assert dig(host, a, "web").data("A") == [eb.v4]
        assert dig(host, a, "+tcp", f"{b}.svc.test", "AAAA").data("AAAA") == [eb.v6]
        assert rdata(DnsClient(a, n1.gw6).query("web", "AAAA")) == [eb.v6]

    first = start_daemon(host, tmp_path, *gateways)
    answers()
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=15) == 0
    result = dig(host, a, "web")
    assert result.rc != 0 and not result.answers and result.elapsed < 2.0, result.text

    second = start_daemon(host, tmp_path, *gateways)
    answers()
    # A client's TCP connection stays open while the daemon is killed.
    held = client.socket(socket.SOCK_STREAM)
    held.settimeout(2.0)
    held.connect((n1.gw4, 53))
    query = _valid_query("web")
    held.sendall(len(query).to_bytes(2, "big") + query)
    assert read_message(held) is not None
    second.kill()
    second.wait(timeout=10)
    held.close()

    third = start_daemon(host, tmp_path, *gateways)
    answers()
    log = (tmp_path / "netstackd.log").read_text()
    assert "cannot listen" not in log, log
    assert third.poll() is None


# --------------------------------------------------------------------------- 8, 9. resolv.conf


def nameservers(sandbox: str) -> tuple[list[str], list[str]]:
    """(nameserver lines' addresses, search domains) of a sandbox's resolv.conf."""
    servers: list[str] = []
    search: list[str] = []
    for line in (ETC_NETNS / sandbox / "resolv.conf").read_text().splitlines():
        fields = line.split()
        if fields[:1] == ["nameserver"]:
            servers.append(fields[1])
        elif fields[:1] == ["search"]:
            search.extend(fields[1:])
    return servers, search


def test_resolv_conf_and_netctl_without_daemon(host: Host) -> None:
    """/etc/netns/<sandbox>/resolv.conf follows the sandbox's networks (gateways in
    connection order, v4 first, at most 3; search domains); `sandbox rm` removes the
    directory. All of it with no netstackd running: netctl works, dig fails fast."""
    a, b = f"{host.name}-a", f"{host.name}-b"
    docs = netctl_many(
        host,
        create("n1", "--ipv6", "--opt", "dns.domain=svc.test"),
        create("n2", "--opt", "dns.domain=two.test"),
        create("n3"),
        ["sandbox", "create", a],
        ["sandbox", "create", b],
    )
    n1, n2, n3 = (Net.of(doc) for doc in docs[:3])
    assert host.netctl("status", check=False).returncode == 3  # no daemon
    assert nameservers(a) == ([], [])

    host.netctl("network", "connect", "n2", a)
    assert nameservers(a) == ([n2.gw4], ["two.test"])
    host.netctl("network", "connect", "n1", a)
    assert nameservers(a) == ([n2.gw4, n1.gw4, n1.gw6], ["two.test", "svc.test"])
    host.netctl("network", "connect", "n3", a)  # a fourth server: glibc reads three
    assert nameservers(a) == ([n2.gw4, n1.gw4, n1.gw6], ["two.test", "svc.test"])
    host.netctl("network", "disconnect", "n2", a)
    assert nameservers(a) == ([n1.gw4, n1.gw6, n3.gw4], ["svc.test"])
    host.netctl("network", "disconnect", "n1", a)
    assert nameservers(a) == ([n3.gw4], [])
    # dig reads it: no daemon, so every server refuses at once, no hang.
    host.netctl("network", "connect", "n1", b)
    result = dig(host, a, b, base=("dig",))
    assert result.rc != 0 and not result.answers, result.text
    assert "no servers could be reached" in result.text or "refused" in result.text
    print(f"dig without netstackd failed after {result.elapsed * 1000:.0f} ms")
    assert result.elapsed < 2.0
    result = dig(host, b, "+tcp", a, base=("dig",))
    assert result.rc != 0 and result.elapsed < 2.0, result.text

    host.netctl("sandbox", "rm", a)
    assert not (ETC_NETNS / a).exists()
    host.netctl("network", "disconnect", "n1", b)
    assert nameservers(b) == ([], [])
    host.netctl("sandbox", "rm", b)
    assert not (ETC_NETNS / b).exists()
