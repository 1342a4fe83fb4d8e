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
_PROTOCOLS = {"tcp": (socket.IPPROTO_TCP, 1 << TCP_LISTEN), "udp": (socket.IPPROTO_UDP, ALL_STATES)}


class DiagUnavailable(OSError):
    """The kernel cannot answer sock_diag for this family and protocol."""


def bound_ports(protocol: str) -> set[int]:
    """Local ports with a listening TCP socket, or any bound UDP socket; SCTP: its endpoints."""
    if protocol in _PROTOCOLS:
        try:
            return _diag_ports(protocol)
        except OSError:
            pass  # no sock_diag here: read /proc/net
    return _proc_ports(protocol)


def _diag_ports(protocol: str) -> set[int]:
    number, states = _PROTOCOLS[protocol]
    ports: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            body = _REQUEST.pack(family, number, 0, 0, states)
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
