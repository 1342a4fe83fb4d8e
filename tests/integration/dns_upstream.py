"""A test upstream DNS server (UDP and TCP) for netstackd's forwarding tests.

Run as a script inside a namespace (`start_upstream` does it in an `Outside` namespace):

    python dns_upstream.py ADDRESS LOG

It prints ``READY`` once both sockets listen, then answers every query:

- `BIG_NAME` (any case): over UDP an empty reply with TC set, over TCP `BIG_COUNT` A
  records, so a forwarder must retry over TCP to get them;
- names under `NX_DOMAIN`: NXDOMAIN;
- any other name: A `FORWARDED_V4`, AAAA `FORWARDED_V6`, other types no data.

Every query is logged to LOG (line-buffered) as ``PROTO CLIENT QNAME QTYPE``, before it is
answered, so a test holding the answer can read the line.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord

FORWARDED_V4 = "198.51.100.7"
FORWARDED_V6 = "2001:db8:7::7"
BIG_NAME = "big.example"
BIG_COUNT = 60
NX_DOMAIN = "nx.example"
READY_TIMEOUT = 10.0


def big_addresses() -> list[str]:
    """The A records of `BIG_NAME`, in order."""
    return [f"198.51.100.{100 + i}" for i in range(BIG_COUNT)]


def reply_to(query: DNSRecord, tcp: bool) -> DNSRecord:
    """The upstream's answer to one query (see the module docstring)."""
    reply = query.reply(ra=1, aa=0)  # a recursive resolver, not the zone's server
    question = query.q
    name = str(question.qname).rstrip(".").lower()
    if name == BIG_NAME:
        if tcp:
            for address in big_addresses():
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=60))
        else:
            reply.header.tc = 1
    elif name == NX_DOMAIN or name.endswith("." + NX_DOMAIN):
        reply.header.rcode = RCODE.NXDOMAIN
    elif question.qtype == QTYPE.A:
        reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(FORWARDED_V4), ttl=60))
    elif question.qtype == QTYPE.AAAA:
        reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(FORWARDED_V6), ttl=60))
    return reply


def _handle(data: bytes, client: str, tcp: bool, log: object) -> bytes | None:
    try:
        query = DNSRecord.parse(data)
    except Exception:
        return None
    proto = "tcp" if tcp else "udp"
    print(f"{proto} {client} {str(query.q.qname).rstrip('.')} {QTYPE[query.q.qtype]}", file=log)
    return bytes(reply_to(query, tcp).pack())


def _read_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def serve(address: str, log_path: str, port: int = 53) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((address, port))
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, port))
    tcp.listen(16)
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open until killed
    print("READY", flush=True)
    while True:
        ready, _, _ = select.select([udp, tcp], [], [])
        if udp in ready:
            data, peer = udp.recvfrom(65535)
            reply = _handle(data, peer[0], False, log)
            if reply is not None:
                udp.sendto(reply, peer)
        if tcp in ready:
            conn, peer = tcp.accept()
            conn.settimeout(2.0)
            try:
                length = int.from_bytes(_read_exactly(conn, 2), "big")
                reply = _handle(_read_exactly(conn, length), peer[0], True, log)
                if reply is not None:
                    conn.sendall(len(reply).to_bytes(2, "big") + reply)
            except OSError:
                pass
            finally:
                conn.close()


@dataclass
class Upstream:
    """A running test upstream server and its query log."""

    address: str
    proc: subprocess.Popen[str]
    log: Path

    def queries(self) -> list[tuple[str, str, str, str]]:
        """(proto, client, qname, qtype) of every query seen so far."""
        if not self.log.exists():
            return []
        rows = [line.split() for line in self.log.read_text().splitlines() if line]
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


def start_upstream(netns: str, address: str, log: Path) -> Upstream:
    """Start the server on port 53 of `address` in the named namespace; wait until READY.

    The caller stops it (`Upstream.stop`); a host's teardown kills it in any case.
    """
    argv = ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-I", __file__]
    proc = subprocess.Popen(
        [*argv, address, str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "READY":
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        raise AssertionError(f"test upstream did not start: {line!r}\n{err}")
    return Upstream(address, proc, log)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
