"""resolv.conf text (pure): reading the host's upstream servers, writing a sandbox's.

A sandbox's resolver is netstackd, listening on each of its networks' gateway addresses;
its resolv.conf (``/etc/netns/NAME/resolv.conf``, which ``ip netns exec`` mounts over
/etc/resolv.conf) names those gateways in connection order. glibc reads at most three
nameserver lines (MAXNS), so only the first three are written.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from netstack.model import IPAddress, Network
from netstack.network_options import DNS_DOMAIN

MAX_NAMESERVERS = 3
HOST_RESOLV_CONF = Path("/etc/resolv.conf")


def host_resolv_conf() -> Path:
    """The host resolv.conf whose servers netstackd forwards to (NETSTACK_RESOLV_CONF overrides)."""
    return Path(os.environ.get("NETSTACK_RESOLV_CONF", str(HOST_RESOLV_CONF)))


def upstream_servers(text: str) -> list[IPAddress]:
    """The ``nameserver`` addresses of resolv.conf text, minus loopback ones, in order.

    Loopback servers (127.0.0.53 of systemd-resolved, a local dnsmasq) are left out as
    Docker does: what the host's own stub resolver serves is not meant for containers.
    IPv6 link-local servers (``fe80::1%eth0``) are left out too: they need their zone.
    IPv4 link-local ones stay: clouds' resolvers live there (169.254.169.254 on Google
    Compute Engine, 169.254.169.253 on AWS), and netstackd reaches them from the host.
    """
    servers: list[IPAddress] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(fields[1])
        except ValueError:
            continue
        if address.is_loopback or address.is_unspecified:
            continue
        if address.version == 6 and address.is_link_local:
            continue
        if address not in servers:
            servers.append(address)
    return servers


def sandbox_resolv_conf(networks: Sequence[Network]) -> str:
    """A sandbox's resolv.conf for the networks it is on, in connection order.

    Nameservers: each network's gateways (IPv4 first), at most `MAX_NAMESERVERS`. Search:
    the networks' DNS domains, so ``name`` also finds ``name.domain``.
    """
    nameservers: list[str] = []
    domains: list[str] = []
    for network in networks:
        gateways = sorted(
            (pool.gateway for pool in network.pools if pool.gateway is not None),
            key=lambda address: address.version,
        )
        nameservers.extend(str(g) for g in gateways if str(g) not in nameservers)
        domain = network.options.get(DNS_DOMAIN)
        if domain and domain not in domains:
            domains.append(domain)
    lines = ["# Written by netstack: the resolver is netstackd on the networks' gateways."]
    lines += [f"nameserver {server}" for server in nameservers[:MAX_NAMESERVERS]]
    if domains:
        lines.append(f"search {' '.join(domains)}")
    if not nameservers:
        lines.append("# No network yet: connect the sandbox to a network to get a resolver.")
    return "\n".join(lines) + "\n"
