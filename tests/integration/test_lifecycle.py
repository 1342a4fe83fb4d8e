"""Everyday netctl features, checked in the kernel and in the output users read."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Host


def _endpoint(host: Host, network: str, sandbox: str) -> dict[str, Any]:
    doc = host.netctl_json("network", "inspect", network)[0]
    found = [e for e in doc["Endpoints"] if e["Sandbox"] == sandbox]
    assert len(found) == 1, doc["Endpoints"]
    return dict(found[0])


def _default_route(host: Host, sandbox: str) -> dict[str, Any] | None:
    routes = host.sandbox_ip_json(sandbox, "route", "show", "default")
    return routes[0] if routes else None


def test_options_reach_the_kernel(host: Host) -> None:
    """bridge.name and mtu are applied to the bridge, the veth and the sandbox's eth0; the
    bridge does not snoop multicast (links.create_bridge says why)."""
    host.netctl(
        "network",
        "create",
        "--subnet",
        "10.61.0.0/24",
        "-o",
        "bridge.name=br-life",
        "-o",
        "mtu=1400",
        "--label",
        "team=web",
        "opts",
    )
    sandbox = host.sandbox("a")
    host.netctl("network", "connect", "opts", sandbox, "--mac", "02:42:0a:3d:00:99")
    bridge = host.ip_json("-d", "link", "show", "dev", "br-life")[0]
    assert bridge["mtu"] == 1400
    assert bridge["linkinfo"]["info_data"]["mcast_snooping"] == 0
    eth0 = host.sandbox_ip_json(sandbox, "link", "show", "dev", "eth0")[0]
    assert eth0["mtu"] == 1400
    assert eth0["address"] == "02:42:0a:3d:00:99"
    ports = host.ip_json("link", "show", "master", "br-life")
    assert [p["mtu"] for p in ports] == [1400]
    doc = host.netctl_json("network", "inspect", "opts")[0]
    assert doc["Options"]["bridge.name"] == "br-life"
    assert doc["Options"]["mtu"] == "1400"
    assert doc["Labels"] == {"team": "web"}
    assert _endpoint(host, "opts", sandbox)["MacAddress"] == "02:42:0a:3d:00:99"


def test_ip_range_aux_address_and_serial_allocation(host: Host) -> None:
    """Dynamic addresses come from --ip-range only, skip aux addresses, and a freed address
    is not handed out again at once."""
    host.netctl(
        "network",
        "create",
        "--subnet",
        "10.62.0.0/24",
        "--ip-range",
        "10.62.0.128/30",
        "--aux-address",
        "router=10.62.0.129",
        "ranged",
    )
    a, b, c = host.sandbox("a"), host.sandbox("b"), host.sandbox("c")
    host.netctl("network", "connect", "ranged", a)
    host.netctl("network", "connect", "ranged", b)
    assert _endpoint(host, "ranged", a)["IPv4Address"] == "10.62.0.128/24"
    assert _endpoint(host, "ranged", b)["IPv4Address"] == "10.62.0.130/24"  # .129 is aux
    host.netctl("network", "disconnect", "ranged", a)
    host.netctl("network", "connect", "ranged", c)
    assert _endpoint(host, "ranged", c)["IPv4Address"] == "10.62.0.131/24"  # not .128 again
    host.netctl("network", "connect", "ranged", a)  # wraps around to the freed .128
    assert _endpoint(host, "ranged", a)["IPv4Address"] == "10.62.0.128/24"
    addresses = host.sandbox_ip_json(a, "-4", "addr", "show", "dev", "eth0")
    assert [i["local"] for i in addresses[0]["addr_info"]] == ["10.62.0.128"]
    doc = host.netctl_json("network", "inspect", "ranged")[0]
    assert doc["IPAM"]["Config"][0]["IPRange"] == "10.62.0.128/30"
    assert doc["IPAM"]["Config"][0]["AuxiliaryAddresses"] == {"router": "10.62.0.129"}


def test_default_route_moves_to_the_remaining_network(host: Host) -> None:
    """Disconnecting the network that gave the default route hands it to the next one."""
    host.netctl("network", "create", "--subnet", "10.63.1.0/24", "first")
    host.netctl("network", "create", "--subnet", "10.63.2.0/24", "second")
    host.netctl("network", "create", "--subnet", "10.63.3.0/24", "--internal", "closed")
    sandbox = host.sandbox("a")
    host.netctl("network", "connect", "closed", sandbox)
    assert _default_route(host, sandbox) is None  # internal networks give no way out
    host.netctl("network", "connect", "first", sandbox)
    host.netctl("network", "connect", "second", sandbox)
    route = _default_route(host, sandbox)
    assert route is not None and route["gateway"] == "10.63.1.1"
    host.netctl("network", "disconnect", "first", sandbox)
    route = _default_route(host, sandbox)
    assert route is not None and route["gateway"] == "10.63.2.1"
    host.netctl("network", "disconnect", "second", sandbox)
    assert _default_route(host, sandbox) is None


def test_ls_prune_and_rm_several(host: Host) -> None:
    """ls in both formats, prune removes only unused networks, rm goes on past a failure."""
    host.netctl("network", "create", "--subnet", "10.64.1.0/24", "used")
    host.netctl("network", "create", "--subnet", "10.64.2.0/24", "unused")
    host.netctl("network", "create", "--subnet", "10.64.3.0/24", "spare")
    sandbox = host.sandbox("a")
    host.netctl("network", "connect", "used", sandbox)
    table = host.netctl("network", "ls").stdout.splitlines()
    assert table[0].split()[:3] == ["NETWORK", "ID", "NAME"]
    assert sorted(line.split()[1] for line in table[1:]) == ["spare", "unused", "used"]
    listed = host.netctl_json("network", "ls")
    assert {n["Name"]: len(n["Endpoints"]) for n in listed} == {
        "used": 1,
        "unused": 0,
        "spare": 0,
    }
    proc = host.netctl("network", "rm", "nosuch", "spare", check=False)
    assert proc.returncode == 1
    assert proc.stdout.split() == ["spare"]
    assert "network 'nosuch' not found" in proc.stderr
    pruned = host.netctl_json("network", "prune")
    assert pruned == ["unused"]
    assert [n["Name"] for n in host.netctl_json("network", "ls")] == ["used"]
    bridges = [name for name in host.links() if name.startswith("nsbr")]
    assert len(bridges) == 1


def test_sandbox_commands(host: Host) -> None:
    """sandbox ls/inspect show endpoints; exec runs inside; rm removes the namespace."""
    host.netctl("network", "create", "--subnet", "10.65.0.0/24", "net")
    sandbox = host.sandbox("a")
    host.netctl("network", "connect", "net", sandbox, "--ip", "10.65.0.7", "--alias", "db")
    proc = host.netctl("sandbox", "exec", sandbox, "--", "ip", "-j", "-4", "addr", "show", "eth0")
    assert json.loads(proc.stdout)[0]["addr_info"][0]["local"] == "10.65.0.7"
    doc = host.netctl_json("sandbox", "inspect", sandbox)[0]
    assert doc["Path"] == f"/run/netns/{sandbox}"
    assert [(e["Network"], e["Interface"], e["IPv4Address"]) for e in doc["Endpoints"]] == [
        ("net", "eth0", "10.65.0.7/24")
    ]
    assert _endpoint(host, "net", sandbox)["Aliases"] == ["db"]
    assert [s["Name"] for s in host.netctl_json("sandbox", "ls")] == [sandbox]
    proc = host.netctl("sandbox", "exec", sandbox, "--", "false", check=False)
    assert proc.returncode == 1  # the command's own status
    host.netctl("sandbox", "rm", sandbox)
    assert host.netctl_json("sandbox", "ls") == []
    assert host.netctl_json("network", "inspect", "net")[0]["Endpoints"] == []
    assert not [name for name in host.links() if name.startswith("nsv")]
    proc = host.run("ip", "netns", "list")
    assert sandbox not in proc.stdout.split()


def test_ipv4_only_interfaces_send_no_ipv6(host: Host) -> None:
    """On an IPv4-only network neither end of the veth gets an IPv6 link-local address, so
    no sandbox sends DAD, router solicitations or MLD reports for the bridge to flood to
    every other sandbox; a dual-stack network's eth0 keeps its link-local address."""
    host.netctl("network", "create", "--subnet", "10.62.0.0/24", "v4only")
    host.netctl(
        "network", "create", "--ipv6", "--subnet", "10.63.0.0/24", "--subnet", "fd00:63::/64",
        "dual",
    )  # fmt: skip
    sandbox = host.sandbox("a")
    host.netctl("network", "connect", "v4only", sandbox)
    host.netctl("network", "connect", "dual", sandbox)
    v4_if = _endpoint(host, "v4only", sandbox)["Interface"]
    dual_if = _endpoint(host, "dual", sandbox)["Interface"]

    def ipv6_scopes(listing: list[dict[str, Any]]) -> set[str]:
        return {a["scope"] for link in listing for a in link.get("addr_info", [])}

    assert ipv6_scopes(host.sandbox_ip_json(sandbox, "-6", "addr", "show", "dev", v4_if)) == set()
    dual = host.sandbox_ip_json(sandbox, "-6", "addr", "show", "dev", dual_if)
    assert ipv6_scopes(dual) == {"global", "link"}, dual
    ports = host.ip_json("link", "show", "type", "veth")
    assert len(ports) == 2, ports
    assert ipv6_scopes(host.ip_json("-6", "addr", "show", "type", "veth")) == set()
