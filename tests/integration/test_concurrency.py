"""Integration: concurrent netctl processes against one store and one host namespace.

20 `network connect` processes started at once must hand out 20 distinct addresses and
leave the store and the kernel consistent; 20 concurrent disconnects must leave nothing;
5 concurrent `network create` without --subnet must get 5 non-overlapping default pools.
Racing for one subnet, one name or one --ip has exactly one winner; one sandbox joined to
(or left by) several networks at once ends with the right interfaces and default route.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from snapshot import global_addresses

if TYPE_CHECKING:
    from conftest import Host

pytestmark = pytest.mark.root

COUNT = 20
SUBNET = "10.80.0.0/24"
MULTI = 8  # networks of the one-sandbox tests


def netctl_argv(host: Host, *args: str) -> list[str]:
    netctl = shutil.which("netctl")
    command = [netctl] if netctl else [sys.executable, "-m", "netstack.cli"]
    return ["nsenter", f"--net=/run/netns/{host.name}", *command, *args]


def netctl_env(host: Host) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NETSTACK_FAULT", None)
    env["NETSTACK_STATE_DIR"] = str(host.state_dir)
    run_dir = getattr(host, "run_dir", None)
    if run_dir is not None:
        env["NETSTACK_RUN_DIR"] = str(run_dir)
    return env


def start_all(
    host: Host, commands: Sequence[Sequence[str]], timeout: float = 120
) -> list[subprocess.CompletedProcess[str]]:
    """Start every `netctl *args` process before waiting for any; return their results."""
    env = netctl_env(host)
    procs = [
        subprocess.Popen(
            netctl_argv(host, *args),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for args, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(list(args), proc.returncode, out, err))
    finally:
        for proc in procs:  # only after a timeout: never leave our own processes running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def run_all_at_once(host: Host, commands: Sequence[Sequence[str]]) -> None:
    """start_all, and every process must exit 0."""
    failures = [
        f"netctl {' '.join(r.args)}: rc={r.returncode}\n{r.stdout}{r.stderr}"
        for r in start_all(host, commands)
        if r.returncode != 0
    ]
    assert not failures, "\n".join(failures)


def one_winner(results: list[subprocess.CompletedProcess[str]], needle: str) -> int:
    """Exactly one process succeeded; every other failed with rc 1 and `needle`; its index."""
    winners = [i for i, r in enumerate(results) if r.returncode == 0]
    assert len(winners) == 1, [(r.returncode, r.stderr) for r in results]
    for i, result in enumerate(results):
        if i != winners[0]:
            assert result.returncode == 1, result
            assert result.stderr.startswith("netctl: error: "), result.stderr
            assert needle in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return winners[0]


def store_query(host: Host, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(Path(host.state_dir) / "state.db", timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def network_inspect(host: Host, name: str) -> dict[str, Any]:
    (info,) = host.netctl_json("network", "inspect", name)
    return dict(info)


def bridge_ports(host: Host, bridge: str) -> list[str]:
    return [link["ifname"] for link in host.ip_json("link", "show", "master", bridge)]


def sandbox_addresses(host: Host, sandbox: str, ifname: str) -> list[str]:
    """Sorted global addresses of one interface in a sandbox."""
    return global_addresses(host.sandbox_ip_json(sandbox, "addr", "show", "dev", ifname)).get(
        ifname, []
    )


def networks_and_sandbox(host: Host, second_octet: int) -> str:
    """net0..net7 (10.<second_octet>.<i>.0/24, created at once) and sandbox "multi"."""
    run_all_at_once(
        host,
        [
            ("network", "create", "--subnet", f"10.{second_octet}.{i}.0/24", f"net{i}")
            for i in range(MULTI)
        ],
    )
    return host.sandbox("multi")


def failed(results: list[subprocess.CompletedProcess[str]]) -> list[str]:
    """`args: stderr` of each process that exited non-zero."""
    return [f"{' '.join(r.args)}: {r.stderr.strip()}" for r in results if r.returncode != 0]


def connect_all(host: Host) -> tuple[list[str], dict[str, Any]]:
    """Network "many" (/24) and 20 sandboxes connected to it by 20 simultaneous processes."""
    host.netctl("network", "create", "--subnet", SUBNET, "many")
    # Created concurrently too (faster; teardown removes every <host>-* namespace).
    sandboxes = [f"{host.name}-s{i}" for i in range(COUNT)]
    run_all_at_once(host, [("sandbox", "create", sandbox) for sandbox in sandboxes])
    assert sorted(s["Name"] for s in host.netctl_json("sandbox", "ls")) == sorted(sandboxes)
    run_all_at_once(host, [("network", "connect", "many", sandbox) for sandbox in sandboxes])
    return sandboxes, network_inspect(host, "many")


def test_concurrent_connects(host: Host) -> None:
    """20 simultaneous connects: distinct addresses, consistent store, kernel matches."""
    sandboxes, network = connect_all(host)
    endpoints = {e["Sandbox"]: e for e in network["Endpoints"]}
    assert sorted(endpoints) == sorted(sandboxes)
    addresses = [e["IPv4Address"] for e in endpoints.values()]
    assert len(set(addresses)) == COUNT, sorted(addresses)
    gateway = ipaddress.ip_address(network["IPAM"]["Config"][0]["Gateway"])
    for address in addresses:
        iface = ipaddress.ip_interface(address)
        assert iface.network == ipaddress.ip_network(SUBNET), address
        assert iface.ip != gateway, address

    # Store: 20 endpoint rows; 20 addresses + the gateway, each owned by its endpoint.
    rows = store_query(host, "SELECT id, sandbox, ipv4 FROM endpoints")
    assert len(rows) == COUNT
    owned = {
        (str(ipaddress.ip_address(int.from_bytes(address, "big"))), owner)
        for address, owner in store_query(host, "SELECT address, owner FROM ipam_addresses")
    }
    assert len(owned) == COUNT + 1, sorted(owned)
    assert (str(gateway), "gateway") in owned
    for endpoint_id, sandbox, ipv4 in rows:
        assert ipv4 == endpoints[sandbox]["IPv4Address"]
        assert endpoint_id == endpoints[sandbox]["EndpointID"]
        assert (str(ipaddress.ip_interface(ipv4).ip), endpoint_id) in owned, (ipv4, endpoint_id)

    # Kernel: every sandbox has eth0 with exactly its address; 20 veths on the bridge.
    for sandbox in sandboxes:
        endpoint = endpoints[sandbox]
        assert endpoint["Interface"] == "eth0"
        assert sandbox_addresses(host, sandbox, "eth0") == [endpoint["IPv4Address"]], sandbox
        links = sorted(link["ifname"] for link in host.sandbox_ip_json(sandbox, "link"))
        assert links == ["eth0", "lo"], (sandbox, links)
    ports = bridge_ports(host, network["Options"]["bridge.name"])
    assert len(ports) == COUNT and all(p.startswith("nsv") for p in ports), ports
    veths = [name for name in host.links() if name.startswith(("nsv", "nsp"))]
    assert sorted(veths) == sorted(ports)


def test_concurrent_disconnects(host: Host) -> None:
    """20 simultaneous disconnects leave no veth, no endpoint row, only the gateway address."""
    sandboxes, network = connect_all(host)
    assert len(network["Endpoints"]) == COUNT

    run_all_at_once(host, [("network", "disconnect", "many", sandbox) for sandbox in sandboxes])

    assert network_inspect(host, "many")["Endpoints"] == []
    assert bridge_ports(host, network["Options"]["bridge.name"]) == []
    assert not [name for name in host.links() if name.startswith(("nsv", "nsp"))]
    for sandbox in sandboxes:
        links = [link["ifname"] for link in host.sandbox_ip_json(sandbox, "link")]
        assert links == ["lo"], (sandbox, links)
    assert store_query(host, "SELECT count(*) FROM endpoints") == [(0,)]
    assert store_query(host, "SELECT owner FROM ipam_addresses") == [("gateway",)]


def test_concurrent_network_creates_get_distinct_default_pools(host: Host) -> None:
    """5 simultaneous `network create` without --subnet: 5 non-overlapping default pools."""
    names = [f"auto{i}" for i in range(5)]
    run_all_at_once(host, [("network", "create", name) for name in names])

    networks = host.netctl_json("network", "inspect", *names)
    subnets = []
    for network in networks:
        (config,) = network["IPAM"]["Config"]
        subnets.append(ipaddress.ip_network(config["Subnet"]))
    defaults = [ipaddress.ip_network(f"172.{n}.0.0/16") for n in range(17, 32)]
    defaults += list(ipaddress.ip_network("192.168.0.0/16").subnets(new_prefix=20))
    assert all(subnet in defaults for subnet in subnets), subnets
    for i, subnet in enumerate(subnets):
        for other in subnets[i + 1 :]:
            assert not subnet.overlaps(other), (subnet, other)
    pools = store_query(host, "SELECT subnet FROM ipam_pools")
    assert sorted(str(s) for s in subnets) == sorted(row[0] for row in pools)

    bridges = {network["Options"]["bridge.name"] for network in networks}
    assert len(bridges) == 5
    links = host.links()
    assert bridges <= set(links), (bridges, links)
    host_addresses = {
        address
        for addresses in global_addresses(host.ip_json("addr", "show")).values()
        for address in addresses
    }
    for network in networks:
        (config,) = network["IPAM"]["Config"]
        prefix = ipaddress.ip_network(config["Subnet"]).prefixlen
        assert f"{config['Gateway']}/{prefix}" in host_addresses, (config, host_addresses)
    nft = host.nft_ruleset()
    bridge_set = next(
        item["set"]
        for item in nft["nftables"]
        if "set" in item and item["set"]["table"] == "netstack" and item["set"]["name"] == "bridges"
    )
    assert set(bridge_set.get("elem", [])) == bridges


def test_concurrent_creates_of_one_subnet_or_name_have_one_winner(host: Host) -> None:
    """Racing creates of one subnet (or one name): one wins, the rest are refused cleanly."""
    same_subnet = start_all(
        host, [("network", "create", "--subnet", "10.81.0.0/24", f"rival{i}") for i in range(5)]
    )
    winner = one_winner(same_subnet, "overlaps network 'rival")
    same_name = start_all(
        host, [("network", "create", "--subnet", f"10.82.{i}.0/24", "same") for i in range(5)]
    )
    one_winner(same_name, "network 'same' already exists")

    networks = host.netctl_json("network", "ls")
    assert sorted(n["Name"] for n in networks) == sorted([f"rival{winner}", "same"])
    assert len(store_query(host, "SELECT id FROM ipam_pools")) == 2
    assert len(store_query(host, "SELECT owner FROM ipam_addresses")) == 2  # the gateways
    bridges = sorted(name for name in host.links() if name.startswith("nsbr"))
    assert bridges == sorted(n["Options"]["bridge.name"] for n in networks)


def test_concurrent_connects_with_one_ip_have_one_winner(host: Host) -> None:
    """Five sandboxes racing for one --ip: one gets it, the others leave nothing behind."""
    host.netctl("network", "create", "--subnet", SUBNET, "many")
    sandboxes = [f"{host.name}-r{i}" for i in range(5)]
    run_all_at_once(host, [("sandbox", "create", sandbox) for sandbox in sandboxes])

    results = start_all(
        host, [("network", "connect", "--ip", "10.80.0.77", "many", s) for s in sandboxes]
    )

    winner = sandboxes[one_winner(results, "address 10.80.0.77 is already in use")]
    (endpoint,) = network_inspect(host, "many")["Endpoints"]
    assert (endpoint["Sandbox"], endpoint["IPv4Address"]) == (winner, "10.80.0.77/24")
    for sandbox in sandboxes:
        links = sorted(link["ifname"] for link in host.sandbox_ip_json(sandbox, "link"))
        assert links == (["eth0", "lo"] if sandbox == winner else ["lo"]), (sandbox, links)
    assert len([name for name in host.links() if name.startswith(("nsv", "nsp"))]) == 1
    assert len(store_query(host, "SELECT owner FROM ipam_addresses")) == 2


def test_concurrent_connects_of_one_sandbox(host: Host) -> None:
    """One sandbox joined to 8 networks at once gets eth0..eth7, each with its address."""
    sandbox = networks_and_sandbox(host, 83)

    results = start_all(host, [("network", "connect", f"net{i}", sandbox) for i in range(MULTI)])

    links = sorted(link["ifname"] for link in host.sandbox_ip_json(sandbox, "link"))
    assert not [name for name in links if name.startswith("nsp")], links  # no half-joined peer
    failures = failed(results)
    assert not failures, "\n".join(failures)
    (info,) = host.netctl_json("sandbox", "inspect", sandbox)
    interfaces = sorted(e["Interface"] for e in info["Endpoints"])
    assert interfaces == sorted(f"eth{i}" for i in range(MULTI)), info["Endpoints"]
    for endpoint in info["Endpoints"]:
        assert sandbox_addresses(host, sandbox, endpoint["Interface"]) == [
            endpoint["IPv4Address"]
        ], endpoint


def test_concurrent_disconnects_of_one_sandbox(host: Host) -> None:
    """One sandbox on 8 networks, 7 disconnected at once: all succeed, the 8th keeps routing."""
    sandbox = networks_and_sandbox(host, 84)
    for i in range(MULTI):  # one after another: concurrent joins are tested above
        host.netctl("network", "connect", f"net{i}", sandbox)

    last = MULTI - 1
    results = start_all(host, [("network", "disconnect", f"net{i}", sandbox) for i in range(last)])

    failures = failed(results)
    (info,) = host.netctl_json("sandbox", "inspect", sandbox)
    (endpoint,) = info["Endpoints"]
    assert (endpoint["Network"], endpoint["Interface"]) == ("net7", "eth7")
    links = sorted(link["ifname"] for link in host.sandbox_ip_json(sandbox, "link"))
    assert links == ["eth7", "lo"]
    routes = host.sandbox_ip_json(sandbox, "-4", "route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.84.7.1", "eth7")], routes
    # Checked last, so a failure here means the state is right but the exit status is not.
    assert not failures, "\n".join(failures)
