"""Published ports: parse `-p` specs, detect clashes, choose host ports (pure, no I/O).

Spec grammar, as `docker run -p` takes it:
``[HOST_IP:][HOST_PORT[-END]]:PORT[-END][/tcp|/udp|/sctp]`` or ``PORT[-END][/PROTO]``;
an IPv6 host address is written in brackets: ``[::1]:8080:80``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from netstack.errors import Conflict, Exhausted, InvalidArgument
from netstack.model import PortBinding

PROTOCOLS = ("tcp", "udp", "sctp")
EPHEMERAL_FIRST = 49153
EPHEMERAL_LAST = 65535
_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


@dataclass(frozen=True)
class PortRequest:
    """One parsed `-p` spec: container ports and, if given, the host ports wanted.

    host_ports is None for "any free port"; a host range with a single container port
    means "one free port from this range" (Docker's rule).
    """

    spec: str
    protocol: str
    host_ip: str
    container_ports: tuple[int, ...]
    host_ports: tuple[int, ...] | None


def _port_range(text: str, what: str, spec: str) -> tuple[int, ...]:
    match = _PORTS.fullmatch(text)
    if not match:
        raise InvalidArgument(
            f"invalid {what} {text!r} in -p {spec!r}: "
            "give a port (1-65535) or a range like 8000-8010"
        )
    first = int(match.group(1))
    last = int(match.group(2) or first)
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"{what} {port} in -p {spec!r} is out of range: use 1-65535")
    if last < first:
        raise InvalidArgument(f"{what} range {text!r} in -p {spec!r} is inverted: write LOW-HIGH")
    return tuple(range(first, last + 1))


def _host_ip(text: str, spec: str, host_addresses: Callable[[], Sequence[str]]) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"invalid host IP {text!r} in -p {spec!r}") from None
    if address.is_unspecified:
        return str(address)
    if address.is_loopback:
        return str(address)
    if str(address) not in host_addresses():
        raise InvalidArgument(
            f"host IP {address} in -p {spec!r} is not an address of this host; "
            "use one of the host's addresses, or leave it out for all"
        )
    return str(address)


def parse_spec(spec: str, host_addresses: Callable[[], Sequence[str]]) -> PortRequest:
    """Parse one `-p` spec; raise InvalidArgument saying what is wrong with it.

    `host_addresses` is called only when the spec names a host IP.
    """
    rest, slash, protocol = spec.partition("/")
    protocol = protocol.lower() if slash else "tcp"
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"unknown protocol {protocol!r} in -p {spec!r}: use tcp, udp or sctp")
    host_ip = ""
    if rest.startswith("["):
        address, sep, rest = rest[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidArgument(f"invalid -p {spec!r}: write an IPv6 host IP as [ADDR]:PORT:PORT")
        host_ip = _host_ip(address, spec, host_addresses)
        if ":" not in host_ip:
            raise InvalidArgument(f"invalid -p {spec!r}: brackets are for IPv6 host addresses")
        rest = rest[1:]
        parts = ["", *rest.split(":")]
        if len(parts) != 3:
            raise InvalidArgument(f"invalid -p {spec!r}: expected [ADDR]:HOST_PORT:PORT")
    else:
        parts = rest.split(":")
        if len(parts) > 3:
            raise InvalidArgument(
                f"invalid -p {spec!r}: expected [HOST_IP:][HOST_PORT:]PORT[/PROTO] "
                "(write IPv6 host addresses in brackets)"
            )
        if len(parts) == 3:
            host_ip = _host_ip(parts[0], spec, host_addresses)
    container = _port_range(parts[-1], "container port", spec)
    host_text = parts[-2] if len(parts) >= 2 else ""
    host = _port_range(host_text, "host port", spec) if host_text else None
    if host is not None and len(container) > 1 and len(host) != len(container):
        raise InvalidArgument(
            f"-p {spec!r} maps {len(host)} host ports onto {len(container)} container ports; "
            "the ranges must have the same length"
        )
    return PortRequest(spec, protocol, host_ip, container, host)


def overlaps(a_ip: str, b_ip: str) -> bool:
    """Whether two host IPs of bindings on the same port and protocol clash."""
    if a_ip == b_ip or "" in (a_ip, b_ip):
        return True
    a_v6, b_v6 = ":" in a_ip, ":" in b_ip
    if a_v6 != b_v6:
        return False
    wildcard = "::" if a_v6 else "0.0.0.0"
    return wildcard in (a_ip, b_ip)


def clash(binding: PortBinding, existing: Iterable[PortBinding]) -> PortBinding | None:
    """The first existing binding that the new one collides with, if any."""
    for other in existing:
        if (
            other.protocol == binding.protocol
            and other.host_port == binding.host_port
            and overlaps(other.host_ip, binding.host_ip)
        ):
            return other
    return None


class _Published:
    """Bindings indexed by (protocol, host port), for constant-time clash checks."""

    def __init__(self, bindings: Iterable[PortBinding]) -> None:
        self._index: dict[tuple[str, int], list[PortBinding]] = {}
        for binding in bindings:
            self.add(binding)

    def add(self, binding: PortBinding) -> None:
        self._index.setdefault((binding.protocol, binding.host_port), []).append(binding)

    def clash(self, binding: PortBinding) -> PortBinding | None:
        return clash(binding, self._index.get((binding.protocol, binding.host_port), ()))


def named_host_ports(requests: Iterable[PortRequest]) -> list[int] | None:
    """Every host port these requests name, sorted; None when one of them asks for any
    free port (then every binding and every bound port may matter to the choice)."""
    requests = list(requests)
    if any(request.host_ports is None for request in requests):
        return None
    return sorted({port for request in requests for port in request.host_ports or ()})


def assign(
    requests: Sequence[PortRequest],
    existing: Iterable[PortBinding],
    busy_on_host: Callable[[str, Sequence[int] | None], set[int]],
) -> list[PortBinding]:
    """Turn requests into bindings, choosing host ports; refuse any clash.

    `existing` holds every binding already published (at least every one on the named
    host ports, when all are named); `busy_on_host(protocol, among)` returns the host ports
    bound by processes on the host, only those of `among` when it is given (every request
    of that protocol names its host ports). Raises Conflict naming the clash, Exhausted
    when no free host port is left.
    """
    published = _Published(existing)
    busy: dict[str, set[int]] = {}
    result: list[PortBinding] = []

    def busy_ports(protocol: str) -> set[int]:
        if protocol not in busy:
            among = named_host_ports(r for r in requests if r.protocol == protocol)
            busy[protocol] = busy_on_host(protocol, among)
        return busy[protocol]

    def free(request: PortRequest, port: int) -> bool:
        probe = PortBinding(request.protocol, request.host_ip, port, 0)
        return port not in busy_ports(request.protocol) and published.clash(probe) is None

    def take(request: PortRequest, host_port: int, container_port: int) -> None:
        binding = PortBinding(request.protocol, request.host_ip, host_port, container_port)
        other = published.clash(binding)
        if other is not None:
            raise Conflict(
                f"host port {host_port}/{request.protocol} of -p {request.spec!r} is already "
                f"published ({other}); choose another host port"
            )
        if host_port in busy_ports(request.protocol):
            raise Conflict(
                f"host port {host_port}/{request.protocol} of -p {request.spec!r} is in use by "
                "a process on the host; choose another host port"
            )
        published.add(binding)
        result.append(binding)

    for request in requests:
        wanted = request.host_ports
        if wanted is not None and len(wanted) == len(request.container_ports):
            for host_port, container_port in zip(wanted, request.container_ports, strict=True):
                take(request, host_port, container_port)
            continue
        pool = iter(wanted if wanted is not None else range(EPHEMERAL_FIRST, EPHEMERAL_LAST + 1))
        for container_port in request.container_ports:
            chosen = next((port for port in pool if free(request, port)), None)
            if chosen is None:
                where = (
                    f"{wanted[0]}-{wanted[-1]}" if wanted else f"{EPHEMERAL_FIRST}-{EPHEMERAL_LAST}"
                )
                raise Exhausted(
                    f"no free host port for -p {request.spec!r} in {where}; "
                    "unpublish ports or choose others"
                )
            take(request, chosen, container_port)
    return result
