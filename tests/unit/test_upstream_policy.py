"""Which upstream servers a forwarded query goes to (`UpstreamPolicy`, pure), and the host
resolv.conf's servers as the daemon reads them (`HostServers`)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from netstack.daemon.dns_server import dns_config
from netstack.daemon.forwarder import HostServers, UpstreamPolicy
from netstack.model import Network, PoolConfig

S1, S2, S3 = (ipaddress.ip_address(a) for a in ("192.0.2.1", "192.0.2.2", "2001:db8::3"))
HOST = [ipaddress.ip_address("198.51.100.53"), ipaddress.ip_address("2001:db8:53::53")]


def test_no_configured_servers_uses_the_host_servers() -> None:
    policy = UpstreamPolicy()
    assert policy.servers(("n1",), HOST) == HOST
    assert policy.servers(("n1", "n2"), []) == []


def test_result_is_a_fresh_list() -> None:
    policy = UpstreamPolicy(network_servers={"n1": [S1]})
    got = policy.servers(("n1",), HOST)
    assert got is not None
    got.append(S2)
    assert policy.servers(("n1",), HOST) == [S1]
    fallback = policy.servers(("n2",), HOST)
    assert fallback == HOST and fallback is not HOST


def test_a_networks_servers_replace_the_host_servers() -> None:
    policy = UpstreamPolicy(network_servers={"n1": [S1, S3]})
    assert policy.servers(("n1",), HOST) == [S1, S3]
    assert policy.servers(("n2",), HOST) == HOST  # other networks keep the host's


def test_first_configured_network_in_scope_order_wins() -> None:
    """A sandbox on several networks: the servers of the first network (in the scope's
    order, i.e. network order) that has any; they are not merged."""
    policy = UpstreamPolicy(network_servers={"n2": [S2], "n3": [S3]})
    assert policy.servers(("n1", "n2", "n3"), HOST) == [S2]
    assert policy.servers(("n3", "n2"), HOST) == [S3]
    assert policy.servers(("n1", "n3"), HOST) == [S3]


def test_empty_configured_list_falls_through() -> None:
    policy = UpstreamPolicy(network_servers={"n1": [], "n2": [S2]})
    assert policy.servers(("n1", "n2"), HOST) == [S2]
    assert policy.servers(("n1",), HOST) == HOST


def test_internal_only_scope_may_not_forward() -> None:
    policy = UpstreamPolicy(network_servers={"i1": [S1]}, internal=frozenset({"i1", "i2"}))
    assert policy.servers(("i1",), HOST) is None
    assert policy.servers(("i1", "i2"), HOST) is None
    assert policy.servers(("i2",), []) is None


def test_one_non_internal_network_lets_the_sandbox_forward() -> None:
    policy = UpstreamPolicy(network_servers={"n1": [S1]}, internal=frozenset({"i1"}))
    assert policy.servers(("i1", "n1"), HOST) == [S1]
    assert policy.servers(("i1", "n2"), HOST) == HOST


def test_empty_scope_uses_the_host_servers() -> None:
    """No scope is a client netstack does not know; the resolver refuses those before
    forwarding, so only the policy's own answer is checked here."""
    assert UpstreamPolicy(internal=frozenset({"i1"})).servers((), HOST) == HOST


def test_dns_config_builds_the_policy_from_network_options() -> None:
    def network(network_id: str, internal: bool = False, **options: str) -> Network:
        return Network(
            network_id,
            network_id,
            "bridge",
            [PoolConfig(ipaddress.ip_network("10.9.0.0/24"), ipaddress.ip_address("10.9.0.1"))],
            options=dict(options),
            internal=internal,
        )

    networks = [
        network("n1", **{"dns.servers": "192.0.2.1,2001:db8::3"}),
        network("n2"),
        network("i1", internal=True, **{"dns.servers": "192.0.2.2"}),
    ]
    _records, policy, addresses = dns_config(networks, [], generation=1)
    assert policy.network_servers == {"n1": [S1, S3], "i1": [S2]}
    assert policy.internal == frozenset({"i1"})
    assert addresses == [ipaddress.ip_address("10.9.0.1")] * 3
    assert policy.servers(("n2",), HOST) == HOST
    assert policy.servers(("i1",), HOST) is None


# HostServers ------------------------------------------------------------------------------


def test_host_servers_follow_the_file(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    servers = HostServers(path)
    assert servers.get() == []  # no file: no servers
    path.write_text("nameserver 127.0.0.53\nnameserver 192.0.2.1\n")
    assert servers.get() == [S1]
    path.write_text("nameserver 192.0.2.2\nnameserver 2001:db8::3\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a later write
    assert servers.get() == [S2, S3]
    path.unlink()
    assert servers.get() == []
    path.write_text("nameserver 192.0.2.1\n")
    assert servers.get() == [S1]


def test_host_servers_follow_a_replaced_file(tmp_path: Path) -> None:
    """resolvconf and NetworkManager replace the file (a rename): a new inode."""
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.1\n")
    servers = HostServers(path)
    assert servers.get() == [S1]
    stat = path.stat()
    fresh = tmp_path / "resolv.conf.new"
    fresh.write_text("nameserver 192.0.2.2\n")
    os.utime(fresh, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the same mtime
    fresh.replace(path)
    assert servers.get() == [S2]
