"""Pure pool logic: validate a pool request, pick a default pool, detect overlaps."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from netstack.errors import Conflict, InvalidArgument
from netstack.model import IPAddress, IPNetwork


@dataclass(frozen=True)
class PoolSpec:
    """A validated pool: the subnet, its gateway and reserved addresses, the dynamic range."""

    subnet: IPNetwork
    gateway: IPAddress
    ip_range: IPNetwork | None
    aux_addresses: dict[str, IPAddress] = field(default_factory=dict)

    @property
    def first(self) -> int:
        """Lowest address handed out dynamically."""
        low = host_bounds(self.subnet)[0]
        if self.ip_range is not None:
            low = max(low, int(self.ip_range.network_address))
        return low

    @property
    def last(self) -> int:
        """Highest address handed out dynamically."""
        high = host_bounds(self.subnet)[1]
        if self.ip_range is not None:
            high = min(high, int(self.ip_range.broadcast_address))
        return high

    def usable(self, address: IPAddress) -> bool:
        """Whether `address` is a host address of the subnet (see is_host_address)."""
        return is_host_address(self.subnet, address)


def host_bounds(subnet: IPNetwork) -> tuple[int, int]:
    """Lowest and highest host address: not the network address, nor IPv4's broadcast."""
    high = int(subnet.broadcast_address) - (1 if subnet.version == 4 else 0)
    return int(subnet.network_address) + 1, high


def is_host_address(subnet: IPNetwork, address: IPAddress) -> bool:
    """Whether `address` may be given to an endpoint of `subnet` (reservations aside)."""
    low, high = host_bounds(subnet)
    return address.version == subnet.version and low <= int(address) <= high


def address_from_int(value: int, version: int) -> IPAddress:
    """The address `value` of the given IP version (ip_address(int) guesses v4 for small ints)."""
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def parse_network(text: str, what: str) -> IPNetwork:
    """Parse a CIDR strictly (host bits must be zero); raise InvalidArgument naming `what`."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidArgument(
            f"invalid {what} {text!r}: {exc}; give a CIDR such as 10.20.0.0/24 or fd00:1::/64"
        ) from None


def parse_address(text: str, what: str) -> IPAddress:
    """Parse one IP address; raise InvalidArgument naming `what`."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"invalid {what} {text!r}: not an IPv4 or IPv6 address") from None


def make_pool_spec(
    subnet: IPNetwork,
    gateway: IPAddress | None = None,
    ip_range: IPNetwork | None = None,
    aux_addresses: Mapping[str, IPAddress] | None = None,
) -> PoolSpec:
    """Validate one pool request and fill in the default gateway (the first host address)."""
    aux = dict(aux_addresses or {})
    if subnet.version == 4 and subnet.prefixlen > 30:
        raise InvalidArgument(f"subnet {subnet} is too small: use a /30 or larger IPv4 subnet")
    if subnet.version == 6 and subnet.prefixlen > 126:
        raise InvalidArgument(f"subnet {subnet} is too small: use a /126 or larger IPv6 subnet")
    if gateway is None:
        gateway = address_from_int(int(subnet.network_address) + 1, subnet.version)
    elif not is_host_address(subnet, gateway):
        raise InvalidArgument(
            f"gateway {gateway} is not a usable address of subnet {subnet}; "
            "choose a --gateway inside the subnet"
        )
    if ip_range is not None and (
        ip_range.version != subnet.version or not ip_range.subnet_of(subnet)  # type: ignore[arg-type]
    ):
        raise InvalidArgument(
            f"ip-range {ip_range} is not inside subnet {subnet}; choose an --ip-range within it"
        )
    seen: dict[IPAddress, str] = {}
    for name, address in aux.items():
        if address in seen:
            raise InvalidArgument(
                f"aux-addresses {seen[address]} and {name} are both {address}; give each its own"
            )
        seen[address] = name
        if not is_host_address(subnet, address):
            raise InvalidArgument(
                f"aux-address {name}={address} is not a usable address of subnet {subnet}"
            )
        if address == gateway:
            raise InvalidArgument(f"aux-address {name}={address} is the gateway address")
    spec = PoolSpec(subnet, gateway, ip_range, aux)
    if spec.first > spec.last:
        raise InvalidArgument(f"ip-range {ip_range} leaves no address to allocate in {subnet}")
    return spec


def overlapping(subnet: IPNetwork, existing: Iterable[IPNetwork]) -> IPNetwork | None:
    """The first of `existing` that overlaps `subnet`, or None."""
    for other in existing:
        if other.version == subnet.version and subnet.overlaps(other):
            return other
    return None


def default_ipv4_pools() -> Iterator[ipaddress.IPv4Network]:
    """Docker's default local pools, in its order: 172.17-31.0.0/16, then 192.168.0.0/16 in /20s."""
    for second in range(17, 32):
        yield ipaddress.IPv4Network(f"172.{second}.0.0/16")
    yield from ipaddress.IPv4Network("192.168.0.0/16").subnets(new_prefix=20)


def choose_default_pool(in_use: Iterable[IPNetwork]) -> ipaddress.IPv4Network:
    """The first default IPv4 pool that overlaps nothing in `in_use`; raise Conflict if none."""
    used = [n for n in in_use if n.version == 4]
    for candidate in default_ipv4_pools():
        if overlapping(candidate, used) is None:
            return candidate
    raise Conflict(
        "all default address pools are in use; remove unused networks "
        "(netctl network prune) or give --subnet"
    )


def default_ipv6_pool(network_id: str, in_use: Iterable[IPNetwork]) -> ipaddress.IPv6Network:
    """A unique-local /64 derived from the network id (RFC 4193 style), avoiding `in_use`."""
    used = [n for n in in_use if n.version == 6]
    for salt in range(64):
        digest = hashlib.sha256(f"{network_id}:{salt}".encode()).digest()
        global_id = int.from_bytes(digest[:5], "big")
        subnet_id = int.from_bytes(digest[5:7], "big")
        value = (0xFD << 120) | (global_id << 80) | (subnet_id << 64)
        candidate = ipaddress.IPv6Network((value, 64))
        if overlapping(candidate, used) is None:
            return candidate
    raise Conflict("no free IPv6 unique-local pool found; give an IPv6 --subnet")
