"""Integration: every fault point of `network create` and `network connect` rolls back fully.

Each test arms one fault point (NETSTACK_FAULT), runs the command, and checks that the
command failed with one line on stderr and that nothing is left behind: no link or address
in the host namespace, no interface in the sandbox, no nftables set element, no store row.
Then the same command without the fault succeeds, which proves nothing stale blocks it.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from typing import TYPE_CHECKING, Any

import pytest
from snapshot import (
    assert_error,
    assert_unchanged,
    global_addresses,
    kernel_state,
    netstack_links,
    nft_elements,
    nft_rule_counts,
    store_counts,
    store_rows,
)

if TYPE_CHECKING:
    from conftest import Host

pytestmark = pytest.mark.root

CREATE_FAULTS = [
    "network-create:after-bridge",
    "network-create:after-firewall",
    "network-create:before-store",
]
CONNECT_FAULTS = [
    "connect:after-address",
    "connect:after-veth",
    "connect:after-join",
    "connect:after-ports",
    "connect:before-store",
]


def assert_rules_not_grown(before: dict[str, int], after: dict[str, int]) -> None:
    """Chains that existed keep their rule count (new chains: the table was created)."""
    assert {chain: after.get(chain) for chain in before} == before, (before, after)


def leftovers(links: list[str], before: list[str]) -> list[str]:
    return netstack_links(sorted(set(links) - set(before)))


def network_inspect(host: Host, name: str) -> dict[str, Any]:
    (info,) = host.netctl_json("network", "inspect", name)
    return dict(info)


# --------------------------------------------------------------------------- tests

CREATE_SETUPS = ["first-ever", "with-existing", "dual-stack"]


@pytest.mark.parametrize("setup", CREATE_SETUPS)
@pytest.mark.parametrize("point", CREATE_FAULTS)
def test_network_create_fault_rolls_back(host: Host, point: str, setup: str) -> None:
    """A fault at any step of `network create` leaves no bridge, element, pool or row."""
    sandboxes: list[str] = []
    if setup != "first-ever":
        # An existing network with an endpoint: its elements and rows must survive the undo.
        host.netctl("network", "create", "--subnet", "10.70.0.0/24", "keep")
        sandboxes.append(host.sandbox("keep"))
        host.netctl("network", "connect", "keep", sandboxes[0])
    command = [
        "network", "create", "--subnet", "10.71.0.0/24", "--gateway", "10.71.0.254",
        "-o", "bridge.name=nsbrfault", "faulty",
    ]  # fmt: skip
    bridge_addresses = ["10.71.0.254/24"]
    if setup == "dual-stack":
        command[2:2] = ["--ipv6", "--subnet", "fd00:71::/64"]
        bridge_addresses.append("fd00:71::1/64")
    kernel_before = kernel_state(host, sandboxes)
    rules_before = nft_rule_counts(host)
    store_before = store_rows(host.state_dir)

    failed = host.netctl(*command, env={"NETSTACK_FAULT": point}, check=False)

    assert_error(failed, 1, point)
    kernel_after = kernel_state(host, sandboxes)
    assert not leftovers(kernel_after["host links"], kernel_before["host links"])
    assert "nsbrfault" not in kernel_after["host links"]
    assert_unchanged(kernel_before, kernel_after)
    assert_rules_not_grown(rules_before, nft_rule_counts(host))
    rows_after = store_rows(host.state_dir)
    if store_before:
        assert rows_after == store_before
    else:  # the database was created by the failed command: it must be empty
        assert all(not rows for rows in rows_after.values()), rows_after
    names = [n["Name"] for n in host.netctl_json("network", "ls")]
    assert "faulty" not in names

    # Same name, subnets, gateway and bridge name: nothing stale blocks them.
    host.netctl(*command)
    info = network_inspect(host, "faulty")
    assert info["Options"]["bridge.name"] == "nsbrfault"
    subnets = {config["Subnet"] for config in info["IPAM"]["Config"]}
    assert subnets == {str(ipaddress.ip_interface(a).network) for a in bridge_addresses}
    assert "nsbrfault" in host.links()
    bridge_addrs = global_addresses(host.ip_json("addr", "show", "dev", "nsbrfault"))
    assert bridge_addrs == {"nsbrfault": sorted(bridge_addresses)}
    elements = nft_elements(host)
    assert any("nsbrfault" in e for e in elements.get("inet netstack bridges", [])), elements


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4", "dual-stack"])
@pytest.mark.parametrize("point", CONNECT_FAULTS)
def test_connect_fault_rolls_back(host: Host, point: str, dual_stack: bool) -> None:
    """A fault at any step of `network connect` leaves no veth, address, element or row."""
    v6 = ("--ipv6", "--subnet", "fd00:73::/64") if dual_stack else ()
    host.netctl("network", "create", "--subnet", "10.72.0.0/24", "first")
    host.netctl("network", "create", "--subnet", "10.73.0.0/24", *v6, "second")
    target = host.sandbox("target")
    other = host.sandbox("other")
    # Earlier successful connects: target already has eth0, "second" already has a port.
    host.netctl("network", "connect", "first", target)
    host.netctl("network", "connect", "second", other)
    bridge = network_inspect(host, "second")["Options"]["bridge.name"]
    sandboxes = [target, other]
    kernel_before = kernel_state(host, sandboxes)
    rules_before = nft_rule_counts(host)
    store_before = store_rows(host.state_dir)
    target_links_before = [link["ifname"] for link in host.sandbox_ip_json(target, "link")]
    assert sorted(target_links_before) == ["eth0", "lo"]
    command = ["network", "connect", "--ip", "10.73.0.50", "second", target]
    expected = ["10.73.0.50/24"]
    if dual_stack:
        command[2:2] = ["--ip6", "fd00:73::50"]
        expected.append("fd00:73::50/64")

    failed = host.netctl(*command, env={"NETSTACK_FAULT": point}, check=False)

    assert_error(failed, 1, point)
    kernel_after = kernel_state(host, sandboxes)
    assert not leftovers(kernel_after["host links"], kernel_before["host links"])
    target_links = [link["ifname"] for link in host.sandbox_ip_json(target, "link")]
    assert sorted(target_links) == ["eth0", "lo"], target_links
    assert_unchanged(kernel_before, kernel_after)
    assert_rules_not_grown(rules_before, nft_rule_counts(host))
    assert store_rows(host.state_dir) == store_before
    assert [e["Sandbox"] for e in network_inspect(host, "second")["Endpoints"]] == [other]

    # The same command, same --ip (and --ip6), now succeeds: the addresses were released.
    host.netctl(*command)
    (endpoint,) = [
        e for e in network_inspect(host, "second")["Endpoints"] if e["Sandbox"] == target
    ]
    assert endpoint["IPv4Address"] == expected[0]
    assert endpoint["IPv6Address"] == (expected[1] if dual_stack else "")
    assert endpoint["Interface"] == "eth1"
    addresses = global_addresses(host.sandbox_ip_json(target, "addr", "show", "dev", "eth1"))
    assert addresses == {"eth1": sorted(expected)}
    ports = [link["ifname"] for link in host.ip_json("link", "show", "master", bridge)]
    assert len(ports) == 2 and all(p.startswith("nsv") for p in ports), ports
    counts = store_counts(host.state_dir)
    assert counts["endpoints"] == 3
    # Gateways (2, or 3 with IPv6) + 3 endpoint addresses (+ 2 IPv6 on "second").
    assert counts["ipam_addresses"] == (8 if dual_stack else 5)


def port_binding_rows(host: Host) -> list[tuple[Any, ...]]:
    """Every port_bindings row (the shared snapshot's store rows do not include them)."""
    conn = sqlite3.connect(host.state_dir / "state.db", timeout=30)
    try:
        return sorted(conn.execute("SELECT * FROM port_bindings").fetchall())
    finally:
        conn.close()


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4", "dual-stack"])
@pytest.mark.parametrize("point", ["connect:after-ports", "connect:before-store"])
def test_connect_with_ports_fault_rolls_back(host: Host, point: str, dual_stack: bool) -> None:
    """A fault after the ports are published (`-p 8080:80`) leaves no map element, no
    port_bindings row, no endpoint row and no link; an existing mapping survives."""
    v6 = ("--ipv6", "--subnet", "fd00:74::/64") if dual_stack else ()
    host.netctl("network", "create", "--subnet", "10.74.0.0/24", *v6, "pub")
    keep = host.sandbox("keep")
    target = host.sandbox("target")
    host.netctl("network", "connect", "-p", "9090:90/udp", "pub", keep)
    sandboxes = [keep, target]
    kernel_before = kernel_state(host, sandboxes)
    rules_before = nft_rule_counts(host)
    store_before = store_rows(host.state_dir)
    ports_before = port_binding_rows(host)
    assert len(ports_before) == 1
    maps_before = {k: v for k, v in kernel_before["nft elements"].items() if " pub" in k}
    assert maps_before, kernel_before["nft elements"]
    command = ["network", "connect", "-p", "8080:80", "-p", "7000-7001:70-71/udp", "pub", target]

    failed = host.netctl(*command, env={"NETSTACK_FAULT": point}, check=False)

    assert_error(failed, 1, point)
    kernel_after = kernel_state(host, sandboxes)
    assert not leftovers(kernel_after["host links"], kernel_before["host links"])
    assert [link["ifname"] for link in host.sandbox_ip_json(target, "link")] == ["lo"]
    assert_unchanged(kernel_before, kernel_after)  # nft map elements included
    assert_rules_not_grown(rules_before, nft_rule_counts(host))
    assert store_rows(host.state_dir) == store_before
    assert port_binding_rows(host) == ports_before
    assert host.netctl_json("port", target) == []

    # The same host ports are free again: the command now succeeds.
    host.netctl(*command)
    assert [(p["HostPort"], p["Protocol"]) for p in host.netctl_json("port", target)] == [
        (8080, "tcp"),
        (7000, "udp"),
        (7001, "udp"),
    ]
    assert len(port_binding_rows(host)) == 4
    pub = {k: len(v) for k, v in nft_elements(host).items() if " pub" in k}
    expected = {"inet netstack pub4_any": 4}
    if dual_stack:
        expected["inet netstack pub6_any"] = 4
    assert pub == expected
