"""Rendering for netctl: Docker-like JSON documents and plain-text tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from netstack.model import Endpoint, Network, PortBinding, Sandbox


def ports_document(ports: Sequence[PortBinding]) -> list[dict[str, Any]]:
    """Published ports with the host port actually chosen."""
    return [
        {
            "HostIp": p.host_ip,
            "HostPort": p.host_port,
            "ContainerPort": p.container_port,
            "Protocol": p.protocol,
        }
        for p in ports
    ]


def port_lines(ports: Sequence[PortBinding]) -> list[str]:
    """`docker port` style: 80/tcp -> 0.0.0.0:8080 (a binding on all addresses: v4 and v6)."""
    lines = []
    for p in ports:
        hosts = ["0.0.0.0", "[::]"] if p.host_ip == "" else [p.host_ip]
        for host in hosts:
            shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
            lines.append(f"{p.container_port}/{p.protocol} -> {shown}:{p.host_port}")
    return lines


def _interface_fields(endpoint: Endpoint) -> dict[str, Any]:
    """What both inspect documents show of an endpoint's interface."""
    return {
        "Interface": endpoint.interface,
        "MacAddress": endpoint.mac,
        "IPv4Address": "" if endpoint.ipv4 is None else str(endpoint.ipv4),
        "IPv6Address": "" if endpoint.ipv6 is None else str(endpoint.ipv6),
        "Ports": ports_document(endpoint.ports),
    }


def network_document(network: Network, endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """`network inspect --format json` for one network (Docker's field names)."""
    config = []
    for pool in network.pools:
        item: dict[str, Any] = {"Subnet": str(pool.subnet)}
        if pool.gateway is not None:
            item["Gateway"] = str(pool.gateway)
        if pool.ip_range is not None:
            item["IPRange"] = str(pool.ip_range)
        if pool.aux_addresses:
            item["AuxiliaryAddresses"] = {k: str(v) for k, v in pool.aux_addresses.items()}
        config.append(item)
    return {
        "Name": network.name,
        "Id": network.id,
        "Created": network.created,
        "Scope": network.scope,
        "Driver": network.driver,
        "EnableIPv6": network.enable_ipv6,
        "Internal": network.internal,
        "IPAM": {"Driver": "default", "Config": config},
        "Options": dict(network.options),
        "Labels": dict(network.labels),
        "Endpoints": [
            {
                "EndpointID": e.id,
                "Name": e.name,
                "Sandbox": e.sandbox,
                **_interface_fields(e),
                "Aliases": list(e.aliases),
            }
            for e in endpoints
        ],
    }


def sandbox_document(sandbox: Sandbox, endpoints: Sequence[tuple[Endpoint, str]]) -> dict[str, Any]:
    """`sandbox inspect --format json`; endpoints come with their network's name."""
    return {
        "Name": sandbox.name,
        "Path": sandbox.path,
        "Created": sandbox.created,
        "Endpoints": [
            {"Network": network_name, "EndpointID": e.id, **_interface_fields(e)}
            for e, network_name in endpoints
        ],
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, like `docker network ls`."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)
