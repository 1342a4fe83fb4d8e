"""Networks and endpoints built tersely for the DNS unit tests."""

from __future__ import annotations

import ipaddress

from netstack.model import Endpoint, Network, PoolConfig


def network(network_id: str, name: str, *subnets: str, **options: str) -> Network:
    """A bridge network with one pool per subnet (no gateway needed for DNS)."""
    pools = [PoolConfig(ipaddress.ip_network(subnet)) for subnet in subnets]
    return Network(network_id, name, "bridge", pools, options=dict(options))


def endpoint(
    endpoint_id: str,
    network_id: str,
    sandbox: str,
    ipv4: str | None = None,
    ipv6: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Endpoint:
    """An endpoint with optional v4/v6 interface addresses ("10.1.0.2/24") and aliases."""
    return Endpoint(
        endpoint_id,
        network_id,
        sandbox,
        ipv4=ipaddress.IPv4Interface(ipv4) if ipv4 else None,
        ipv6=ipaddress.IPv6Interface(ipv6) if ipv6 else None,
        aliases=list(aliases),
    )
