"""resolv.conf text: the host's upstream servers (read) and a sandbox's file (written)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from netstack.model import Network, PoolConfig
from netstack.resolvconf import (
    HOST_RESOLV_CONF,
    MAX_NAMESERVERS,
    host_resolv_conf,
    sandbox_resolv_conf,
    upstream_servers,
)

# upstream_servers -------------------------------------------------------------------------


def addresses(*texts: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(t) for t in texts]


def test_upstream_servers_in_order_without_duplicates() -> None:
    text = "nameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver 192.0.2.53\n"
    assert upstream_servers(text) == addresses("192.0.2.53", "2001:db8::53")


def test_upstream_servers_skip_loopback_and_unspecified() -> None:
    text = (
        "nameserver 127.0.0.53\n"  # systemd-resolved's stub
        "nameserver 127.0.0.1\n"
        "nameserver 127.1.2.3\n"
        "nameserver ::1\n"
        "nameserver 0.0.0.0\n"
        "nameserver ::\n"
        "nameserver 198.51.100.1\n"
    )
    assert upstream_servers(text) == addresses("198.51.100.1")


def test_upstream_servers_skip_ipv6_link_local() -> None:
    text = "nameserver fe80::1%eth0\nnameserver fe80::2\nnameserver 2001:db8::1\n"
    assert upstream_servers(text) == addresses("2001:db8::1")


def test_upstream_servers_keep_ipv4_link_local_cloud_resolvers() -> None:
    """169.254.169.254 is the resolver resolv.conf names on Google Compute Engine (and
    169.254.169.253 Amazon's VPC resolver). Unlike an IPv6 link-local address it needs no
    zone, and netstackd forwards from the host's own namespace, which reaches it: dropping
    it leaves such a host with no upstream at all (every outside name SERVFAILs)."""
    text = "nameserver 169.254.169.254\nsearch c.project.internal google.internal\n"
    assert upstream_servers(text) == addresses("169.254.169.254")


def test_upstream_servers_ignore_everything_else() -> None:
    text = "\n".join(
        [
            "# nameserver 192.0.2.1",
            "; nameserver 192.0.2.2",
            "nameserver",
            "nameserver not-an-address",
            "nameserver 192.0.2.256",
            "nameserver 192.0.2.0/24",
            "nameserver2 192.0.2.3",
            "Nameserver 192.0.2.4",
            "search example.com",
            "domain example.com",
            "options ndots:5 edns0",
            "sortlist 130.155.160.0/255.255.240.0",
            "\x00\xff garbage",
            "nameserver    192.0.2.5   # trailing words are ignored",
            "nameserver\t2001:db8::5",
        ]
    )
    assert upstream_servers(text) == addresses("192.0.2.5", "2001:db8::5")
    assert upstream_servers("") == []


def test_host_resolv_conf_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NETSTACK_RESOLV_CONF", raising=False)
    assert host_resolv_conf() == HOST_RESOLV_CONF == Path("/etc/resolv.conf")
    monkeypatch.setenv("NETSTACK_RESOLV_CONF", str(tmp_path / "resolv.conf"))
    assert host_resolv_conf() == tmp_path / "resolv.conf"


# sandbox_resolv_conf ----------------------------------------------------------------------


def network(name: str, *pools: tuple[str, str | None], domain: str | None = None) -> Network:
    """A bridge network; pools as (subnet, gateway or None), in the given order."""
    return Network(
        id=f"id-{name}",
        name=name,
        driver="bridge",
        pools=[
            PoolConfig(ipaddress.ip_network(subnet), ipaddress.ip_address(gw) if gw else None)
            for subnet, gw in pools
        ],
        options={"dns.domain": domain} if domain else {},
    )


def parse(text: str) -> tuple[list[str], list[list[str]]]:
    """(nameserver addresses, the words of each search line)."""
    servers = [line.split()[1] for line in text.splitlines() if line.startswith("nameserver ")]
    search = [line.split()[1:] for line in text.splitlines() if line.startswith("search")]
    return servers, search


V4 = ("10.1.0.0/24", "10.1.0.1")
V6 = ("fd00:1::/64", "fd00:1::1")


def test_sandbox_resolv_conf_without_networks() -> None:
    text = sandbox_resolv_conf([])
    assert parse(text) == ([], [])
    assert text.endswith("\n")
    assert text.startswith("# Written by netstack")
    assert "connect the sandbox to a network" in text


def test_sandbox_resolv_conf_gateways_ipv4_first_then_connection_order() -> None:
    one = network("one", V6, V4)  # the IPv6 pool listed first: IPv4 still comes first
    two = network("two", ("10.2.0.0/24", "10.2.0.1"))
    servers, search = parse(sandbox_resolv_conf([one, two]))
    assert servers == ["10.1.0.1", "fd00:1::1", "10.2.0.1"]
    assert search == []
    servers, _ = parse(sandbox_resolv_conf([two, one]))
    assert servers == ["10.2.0.1", "10.1.0.1", "fd00:1::1"]


def test_sandbox_resolv_conf_at_most_three_nameservers() -> None:
    networks = [network(f"n{i}", (f"10.{i}.0.0/24", f"10.{i}.0.1")) for i in range(1, 6)]
    text = sandbox_resolv_conf(networks)
    servers, _ = parse(text)
    assert MAX_NAMESERVERS == 3
    assert servers == ["10.1.0.1", "10.2.0.1", "10.3.0.1"]
    assert "connect the sandbox" not in text


def test_sandbox_resolv_conf_skips_pools_without_gateway_and_duplicates() -> None:
    bare = network("bare", ("10.9.0.0/24", None))
    one = network("one", V4)
    again = network("again", ("10.1.0.0/25", "10.1.0.1"))  # the same gateway address
    servers, _ = parse(sandbox_resolv_conf([bare, one, again]))
    assert servers == ["10.1.0.1"]
    text = sandbox_resolv_conf([bare])
    assert parse(text) == ([], [])
    assert "connect the sandbox to a network" in text


def test_sandbox_resolv_conf_search_domains_in_order_once() -> None:
    one = network("one", V4, domain="svc.test")
    two = network("two", ("10.2.0.0/24", "10.2.0.1"))
    three = network("three", ("10.3.0.0/24", "10.3.0.1"), domain="corp.test")
    four = network("four", ("10.4.0.0/24", "10.4.0.1"), domain="svc.test")
    servers, search = parse(sandbox_resolv_conf([one, two, three, four]))
    assert search == [["svc.test", "corp.test"]]
    assert servers == ["10.1.0.1", "10.2.0.1", "10.3.0.1"]
    # A domain counts even when its network's gateway is past the third nameserver.
    five = network("five", ("10.5.0.0/24", "10.5.0.1"), domain="late.test")
    _, search = parse(sandbox_resolv_conf([one, two, three, four, five]))
    assert search == [["svc.test", "corp.test", "late.test"]]
