"""Host ports bound by processes in this network namespace (the caller thread's).

Asked of the kernel through sock_diag (netlink, NETLINK_SOCK_DIAG): listening TCP sockets
only, so the kernel walks its listening hash alone. Reading /proc/net/tcp and tcp6 instead
walks every established-socket bucket of the machine: ~10 ms here, a third of a port
mapping's ADD. /proc/net is the fallback where sock_diag is missing (a kernel without the
tcp_diag/udp_diag modules), and serves SCTP.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

_LISTEN = "0A"
_TABLES = {
    "tcp": (("tcp", True), ("tcp6", True)),
    "udp": (("udp", False), ("udp6", False)),
}

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBBBI48x")  # inet_diag_req_v2, with a zero inet_diag_sockid
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_EQ = 11
_RTATTR = struct.Struct("=HH")  # rtattr: length, type
_BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes (jump), no (jump)
_TEST_SIZE = 2 * _BC_OP.size  # a port test: the op, then an op holding the port
_PROTOCOLS = {"tcp": (socket.IPPROTO_TCP, 1 << TCP_LISTEN), "udp": (socket.IPPROTO_UDP, ALL_STATES)}


class DiagUnavailable(OSError):
    """The kernel cannot answer sock_diag for this family and protocol."""


MAX_FILTERED = 64  # ports asked about by one kernel-side filter; more: every port


def bound_ports(protocol: str, among: Sequence[int] | None = None) -> set[int]:
    """Local ports with a listening TCP socket, or any bound UDP socket; SCTP: its endpoints.

    With `among`, only those of these ports (fewer than MAX_FILTERED: the kernel filters,
    so the answer does not grow with the sockets of the namespace, netstackd's relay
    listeners included).
    """
    if protocol in _PROTOCOLS:
        try:
            return _diag_ports(protocol, among)
        except OSError:
            pass  # no sock_diag here: read /proc/net
    ports = _proc_ports(protocol)
    return ports if among is None else ports & set(among)


def _port_filter(ports: Sequence[int]) -> bytes:
    """An inet_diag bytecode program accepting a socket whose source port is one of `ports`.

    Per port: a test (INET_DIAG_BC_S_EQ, then an op holding the port) and a jump. A match
    goes on to the jump, which leaves for the end (accept); a miss skips the jump to the
    next test, the last miss past the end (reject). The kernel's audit wants every jump
    target on the chain of `yes` steps, hence a jump op per test rather than jumping
    straight to the end from the test.
    """
    program = b""
    step = _TEST_SIZE + _BC_OP.size
    for i, port in enumerate(ports):
        left = step * (len(ports) - i)  # bytes from this test to the end
        miss = step if i < len(ports) - 1 else left + 4
        program += _BC_OP.pack(INET_DIAG_BC_S_EQ, _TEST_SIZE, miss) + _BC_OP.pack(0, 0, port)
        program += _BC_OP.pack(INET_DIAG_BC_JMP, _BC_OP.size, left - _TEST_SIZE)
    return _RTATTR.pack(_RTATTR.size + len(program), INET_DIAG_REQ_BYTECODE) + program


def _diag_ports(protocol: str, among: Sequence[int] | None = None) -> set[int]:
    number, states = _PROTOCOLS[protocol]
    wanted = None if among is None else sorted(set(among))
    if wanted is not None and not wanted:
        return set()
    if wanted is not None and len(wanted) > MAX_FILTERED:
        return _diag_ports(protocol) & set(wanted)
    extra = b"" if wanted is None else _port_filter(wanted)
    ports: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            body = _REQUEST.pack(family, number, 0, 0, states) + extra
            header = _HEADER.pack(
                _HEADER.size + len(body),
                SOCK_DIAG_BY_FAMILY,
                NLM_F_REQUEST | NLM_F_DUMP,
                sequence,
                0,
            )
            sock.send(header + body)
            ports |= _read_dump(sock, sequence)
    return ports


def _read_dump(sock: socket.socket, sequence: int) -> set[int]:
    """The source ports of one dump's inet_diag_msg replies, until NLMSG_DONE."""
    ports: set[int] = set()
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _, seq, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                raise DiagUnavailable(errno.EPROTO, "malformed sock_diag reply")
            if seq == sequence:
                if kind == NLMSG_DONE:
                    return ports
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                    raise DiagUnavailable(-code, "sock_diag refused the request")
                if kind == SOCK_DIAG_BY_FAMILY:  # inet_diag_msg: id.sport at byte 4
                    (port,) = struct.unpack_from("!H", data, offset + _HEADER.size + 4)
                    if port:
                        ports.add(port)
            offset += (length + 3) & ~3
        if not data:
            raise DiagUnavailable(errno.EPROTO, "sock_diag dump ended early")


def _proc_ports(protocol: str) -> set[int]:
    ports: set[int] = set()
    if protocol == "sctp":
        eps = Path("/proc/net/sctp/eps")
        if eps.exists():
            for line in eps.read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 5 and fields[5].isdigit():
                    ports.add(int(fields[5]))
        return ports
    for name, listen_only in _TABLES[protocol]:
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4 or (listen_only and fields[3] != _LISTEN):
                continue
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port:
                ports.add(port)
    return ports
