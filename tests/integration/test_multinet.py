"""Integration: dual-stack networks, sandboxes on several networks, sandbox removal."""

from __future__ import annotations

import ipaddress
import json
import time
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Host

pytestmark = pytest.mark.root

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def network_inspect(host: Host, name: str) -> dict[str, Any]:
    (info,) = host.netctl_json("network", "inspect", name)
    return dict(info)


def sandbox_inspect(host: Host, name: str) -> dict[str, Any]:
    (info,) = host.netctl_json("sandbox", "inspect", name)
    return dict(info)


def gateways(network: dict[str, Any]) -> dict[int, str]:
    """{4: gw4, 6: gw6} from a network's IPAM config."""
    found: dict[int, str] = {}
    for config in network["IPAM"]["Config"]:
        found[ipaddress.ip_network(config["Subnet"]).version] = config["Gateway"]
    return found


def endpoint_on(sandbox: dict[str, Any], network: str) -> dict[str, Any]:
    (endpoint,) = [e for e in sandbox["Endpoints"] if e["Network"] == network]
    return dict(endpoint)


def bare(address: str) -> str:
    """'10.0.0.2/24' -> '10.0.0.2'."""
    return address.split("/")[0]


def ip_json(host: Host, sandbox: str, *args: str) -> list[dict[str, Any]]:
    """`ip -j *args` inside a sandbox, parsed."""
    out = host.in_sandbox(sandbox, "ip", "-j", *args).stdout
    return list(json.loads(out)) if out.strip() else []


def in_subnet(address: str, subnet: str) -> bool:
    """True if 'ADDR/LEN' lies in subnet with exactly that prefix length."""
    return ipaddress.ip_interface(address).network == ipaddress.ip_network(subnet)


def kernel_addresses(host: Host, sandbox: str, iface: str) -> set[IPInterface]:
    """Global addresses (with prefix length) on a sandbox interface."""
    return {
        ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
        for link in ip_json(host, sandbox, "addr", "show", "dev", iface)
        for a in link.get("addr_info", [])
        if a.get("scope") == "global"
    }


def pings(host: Host, sandbox: str, target: str, timeout: float = 10.0) -> bool:
    """Ping target from sandbox until it answers or timeout passes (bounded poll).

    Polling covers a fresh link's first moments (IPv6 DAD and neighbour discovery).
    """
    argv = ["ping", "-n", "-c1", "-W1", *(["-6"] if ":" in target else []), target]
    deadline = time.monotonic() + timeout
    while True:
        if host.in_sandbox(sandbox, *argv, check=False).returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def default_routes(host: Host, sandbox: str, family: str) -> list[dict[str, Any]]:
    return ip_json(host, sandbox, family, "route", "show", "default")


def test_dual_stack(host: Host) -> None:
    """Two sandboxes on a --ipv6 network get v4+v6 addresses, default routes, and ping."""
    host.netctl(
        "network", "create", "--ipv6", "--subnet", "10.60.0.0/24", "--subnet", "fd00:60::/64",
        "dual",
    )  # fmt: skip
    net = network_inspect(host, "dual")
    assert net["EnableIPv6"] is True
    gw = gateways(net)
    assert set(gw) == {4, 6}, net["IPAM"]

    s1, s2 = host.sandbox("s1"), host.sandbox("s2")
    for sandbox in (s1, s2):
        host.netctl("network", "connect", "dual", sandbox)
    ep1 = endpoint_on(sandbox_inspect(host, s1), "dual")
    ep2 = endpoint_on(sandbox_inspect(host, s2), "dual")

    for sandbox, endpoint in ((s1, ep1), (s2, ep2)):
        assert in_subnet(endpoint["IPv4Address"], "10.60.0.0/24"), endpoint
        assert in_subnet(endpoint["IPv6Address"], "fd00:60::/64"), endpoint
        assert kernel_addresses(host, sandbox, endpoint["Interface"]) == {
            ipaddress.ip_interface(endpoint["IPv4Address"]),
            ipaddress.ip_interface(endpoint["IPv6Address"]),
        }
        (route4,) = default_routes(host, sandbox, "-4")
        assert route4["gateway"] == gw[4]
        assert route4["dev"] == endpoint["Interface"]
        (route6,) = default_routes(host, sandbox, "-6")
        assert route6["gateway"] == gw[6]
        assert route6["dev"] == endpoint["Interface"]

    assert pings(host, s1, bare(ep2["IPv4Address"])), "v4 s1 -> s2"
    assert pings(host, s2, bare(ep1["IPv4Address"])), "v4 s2 -> s1"
    assert pings(host, s1, bare(ep2["IPv6Address"])), "v6 s1 -> s2"
    assert pings(host, s2, bare(ep1["IPv6Address"])), "v6 s2 -> s1"
    assert pings(host, s1, gw[6]), "v6 s1 -> gateway"


def test_sandbox_on_two_networks(host: Host) -> None:
    """A sandbox joined to two networks has eth0 then eth1, right addresses and routes."""
    host.netctl("network", "create", "--subnet", "10.61.0.0/24", "first")
    host.netctl("network", "create", "--subnet", "10.62.0.0/24", "second")
    multi = host.sandbox("multi")
    peer1, peer2 = host.sandbox("peer1"), host.sandbox("peer2")
    host.netctl("network", "connect", "first", multi)
    host.netctl("network", "connect", "second", multi)
    host.netctl("network", "connect", "first", peer1)
    host.netctl("network", "connect", "second", peer2)

    info = sandbox_inspect(host, multi)
    ep1, ep2 = endpoint_on(info, "first"), endpoint_on(info, "second")
    assert (ep1["Interface"], ep2["Interface"]) == ("eth0", "eth1")
    assert in_subnet(ep1["IPv4Address"], "10.61.0.0/24"), ep1
    assert in_subnet(ep2["IPv4Address"], "10.62.0.0/24"), ep2

    links = {link["ifname"]: link for link in ip_json(host, multi, "link", "show")}
    for endpoint in (ep1, ep2):
        iface = endpoint["Interface"]
        assert iface in links, f"{iface} missing in sandbox: {sorted(links)}"
        assert links[iface]["address"].lower() == endpoint["MacAddress"].lower()
        assert kernel_addresses(host, multi, iface) == {
            ipaddress.ip_interface(endpoint["IPv4Address"])
        }

    routes = ip_json(host, multi, "-4", "route", "show")
    connected = {(r["dst"], r["dev"]) for r in routes if r["dst"] != "default"}
    assert ("10.61.0.0/24", "eth0") in connected, routes
    assert ("10.62.0.0/24", "eth1") in connected, routes
    defaults = [r for r in routes if r["dst"] == "default"]
    # One default route, through the gateway of one of the networks on its interface.
    assert len(defaults) == 1, routes
    allowed = {
        (gateways(network_inspect(host, "first"))[4], "eth0"),
        (gateways(network_inspect(host, "second"))[4], "eth1"),
    }
    assert (defaults[0]["gateway"], defaults[0]["dev"]) in allowed, routes

    peer1_ip = bare(endpoint_on(sandbox_inspect(host, peer1), "first")["IPv4Address"])
    peer2_ip = bare(endpoint_on(sandbox_inspect(host, peer2), "second")["IPv4Address"])
    assert pings(host, multi, peer1_ip), "multi -> peer on first"
    assert pings(host, multi, peer2_ip), "multi -> peer on second"
    assert pings(host, peer1, bare(ep1["IPv4Address"])), "peer on first -> multi"
    assert pings(host, peer2, bare(ep2["IPv4Address"])), "peer on second -> multi"


def test_sandbox_rm_disconnects_and_frees_addresses(host: Host) -> None:
    """`sandbox rm` removes endpoints, veths and the namespace; its address is reusable."""
    host.netctl("network", "create", "--subnet", "10.63.0.0/24", "one")
    host.netctl("network", "create", "--subnet", "10.64.0.0/24", "two")
    links_before = set(host.links())
    doomed = host.sandbox("doomed")
    host.netctl("network", "connect", "one", doomed)
    host.netctl("network", "connect", "two", doomed)
    info = sandbox_inspect(host, doomed)
    address_one = bare(endpoint_on(info, "one")["IPv4Address"])
    address_two = bare(endpoint_on(info, "two")["IPv4Address"])
    assert len(set(host.links()) - links_before) == 2, "expected one host-side veth per endpoint"

    host.netctl("sandbox", "rm", doomed)

    assert doomed not in host.run("ip", "netns", "list").stdout.split()
    assert doomed not in [s["Name"] for s in host.netctl_json("sandbox", "ls")]
    for network in ("one", "two"):
        assert network_inspect(host, network)["Endpoints"] == []
    assert set(host.links()) == links_before, "host-side veths left behind"
    missing = host.netctl("sandbox", "inspect", doomed, check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("netctl: error: ")

    # The freed addresses can be requested explicitly right away.
    again = host.sandbox("again")
    host.netctl("network", "connect", "--ip", address_one, "one", again)
    host.netctl("network", "connect", "--ip", address_two, "two", again)
    info = sandbox_inspect(host, again)
    assert bare(endpoint_on(info, "one")["IPv4Address"]) == address_one
    assert bare(endpoint_on(info, "two")["IPv4Address"]) == address_two
