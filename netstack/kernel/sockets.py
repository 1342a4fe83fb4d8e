"""Host ports bound by processes in this network namespace (/proc/net follows the caller)."""

from __future__ import annotations

from pathlib import Path

_LISTEN = "0A"
_TABLES = {
    "tcp": (("tcp", True), ("tcp6", True)),
    "udp": (("udp", False), ("udp6", False)),
}


def bound_ports(protocol: str) -> set[int]:
    """Local ports with a listening TCP socket, or any bound UDP socket; SCTP: its endpoints."""
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
