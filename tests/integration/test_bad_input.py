"""Integration: bad input is refused with one clear line on stderr, and changes nothing.

Every case runs against the same starting point: network "base" (10.50.0.0/24) with
sandbox "a" connected at 10.50.0.10, and sandbox "b" not connected. The failing command
must exit 1 (netstack error) or 2 (usage error), print exactly one line starting
`netctl: error:` that names the problem, and leave store rows, host links, addresses,
routes, nftables elements and the sandboxes' interfaces exactly as they were.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from snapshot import (
    assert_error,
    assert_unchanged,
    global_addresses,
    netstack_links,
    nft_elements,
    snapshot,
    store_counts,
)

if TYPE_CHECKING:
    from conftest import Host

pytestmark = pytest.mark.root


def network_inspect(host: Host, name: str) -> dict[str, Any]:
    (info,) = host.netctl_json("network", "inspect", name)
    return dict(info)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """argv may use {a} and {b} (the sandboxes' full names); needle likewise."""

    id: str
    argv: tuple[str, ...]
    needle: str
    rc: int = 1


NEW = ("network", "create")
CONNECT = ("network", "connect")

CASES = [
    # subnets, gateways, ranges
    Case("cidr-prefix-33", (*NEW, "--subnet", "10.0.0.0/33", "n"), "invalid subnet '10.0.0.0/33'"),
    Case("cidr-garbage", (*NEW, "--subnet", "foo", "n"), "invalid subnet 'foo'"),
    Case("cidr-host-bits", (*NEW, "--subnet", "10.0.0.1/24", "n"), "has host bits set"),
    Case("subnet-too-small", (*NEW, "--subnet", "10.0.0.0/31", "n"), "too small"),
    Case(
        "two-ipv4-subnets",
        (*NEW, "--subnet", "10.60.0.0/24", "--subnet", "10.61.0.0/24", "n"),
        "only one IPv4 --subnet per network",
    ),
    Case(
        "gateway-outside-subnet",
        (*NEW, "--subnet", "10.60.0.0/24", "--gateway", "10.61.0.1", "n"),
        "gateway 10.61.0.1 is outside every --subnet",
    ),
    Case(
        "gateway-is-broadcast",
        (*NEW, "--subnet", "10.60.0.0/24", "--gateway", "10.60.0.255", "n"),
        "gateway 10.60.0.255 is not a usable address",
    ),
    Case(
        "gateway-not-an-ip",
        (*NEW, "--subnet", "10.60.0.0/24", "--gateway", "10.60.0", "n"),
        "invalid gateway '10.60.0'",
    ),
    Case(
        "overlapping-subnet",
        (*NEW, "--subnet", "10.50.0.0/16", "n"),
        "subnet 10.50.0.0/16 overlaps network 'base' (10.50.0.0/24)",
    ),
    Case(
        "ip-range-outside-subnet",
        (*NEW, "--subnet", "10.60.0.0/24", "--ip-range", "10.61.0.0/25", "n"),
        "ip-range 10.61.0.0/25 is outside every --subnet",
    ),
    Case(
        "aux-address-outside-subnet",
        (*NEW, "--subnet", "10.60.0.0/24", "--aux-address", "r=10.61.0.5", "n"),
        "aux-address r=10.61.0.5 is outside every --subnet",
    ),
    Case(
        "aux-address-is-gateway",
        (*NEW, "--subnet", "10.60.0.0/24", "--aux-address", "r=10.60.0.1", "n"),
        "aux-address r=10.60.0.1 is the gateway address",
    ),
    Case(
        "aux-addresses-duplicate",
        (
            *NEW,
            "--subnet",
            "10.60.0.0/24",
            "--aux-address",
            "r=10.60.0.5",
            "--aux-address",
            "s=10.60.0.5",
            "n",
        ),
        "aux-addresses r and s are both 10.60.0.5",
    ),
    # names, drivers, options
    Case("duplicate-network-name", (*NEW, "--subnet", "10.60.0.0/24", "base"), "already exists"),
    Case("invalid-network-name", (*NEW, "bad name!"), "invalid network name 'bad name!'"),
    Case("network-name-newline", (*NEW, "n\n"), "invalid network name 'n\\n'"),
    Case("network-name-leading-underscore", (*NEW, "_x"), "invalid network name '_x'"),
    Case(
        "bridge-name-too-long",
        (*NEW, "-o", "bridge.name=abcdefghijklmnop", "n"),
        "interface names are at most 15 bytes",
    ),
    Case(
        "bridge-name-taken",
        (*NEW, "--subnet", "10.60.0.0/24", "-o", "bridge.name=nsbrbase", "n"),
        "bridge 'nsbrbase' is used by network 'base'",
    ),
    Case(
        # Refused by the kernel step, after the network row was written: the row must go.
        "bridge-name-is-existing-interface",
        (*NEW, "--subnet", "10.60.0.0/24", "-o", "bridge.name=lo", "n"),
        "interface 'lo' already exists",
    ),
    Case("bridge-name-empty", (*NEW, "-o", "bridge.name=", "n"), "not a valid interface name"),
    Case("bridge-name-slash", (*NEW, "-o", "bridge.name=br/0", "n"), "not a valid interface name"),
    Case("unknown-driver", (*NEW, "-d", "nosuch", "n"), "unknown driver 'nosuch'"),
    Case("unknown-option", (*NEW, "-o", "foo=bar", "n"), "unknown bridge option 'foo'"),
    Case("mtu-not-a-number", (*NEW, "-o", "mtu=abc", "n"), "mtu='abc' is not a number"),
    Case("mtu-underscore", (*NEW, "-o", "mtu=1_500", "n"), "mtu='1_500' is not a number"),
    Case("mtu-out-of-range", (*NEW, "-o", "mtu=10", "n"), "mtu=10 is out of range"),
    Case("icc-not-a-bool", (*NEW, "-o", "icc=maybe", "n"), "icc='maybe' must be true or false"),
    Case("opt-without-equals", (*NEW, "-o", "mtu", "n"), "invalid --opt 'mtu': expected KEY=VALUE"),
    Case("label-without-equals", (*NEW, "--label", "x", "n"), "invalid --label 'x'"),
    # connect / disconnect / rm
    Case(
        "connect-twice", (*CONNECT, "base", "{a}"), "'{a}' is already connected to network 'base'"
    ),
    Case("connect-unknown-network", (*CONNECT, "nosuch", "{b}"), "network 'nosuch' not found"),
    Case("connect-unknown-sandbox", (*CONNECT, "base", "nosuch"), "sandbox 'nosuch' not found"),
    Case(
        "connect-ip-outside-subnet",
        (*CONNECT, "--ip", "10.99.0.5", "base", "{b}"),
        "10.99.0.5 is not a usable address of subnet 10.50.0.0/24",
    ),
    Case(
        "connect-ip-broadcast",
        (*CONNECT, "--ip", "10.50.0.255", "base", "{b}"),
        "10.50.0.255 is not a usable address of subnet 10.50.0.0/24",
    ),
    Case(
        "connect-ip-in-use",
        (*CONNECT, "--ip", "10.50.0.10", "base", "{b}"),
        "address 10.50.0.10 is already in use",
    ),
    Case(
        "connect-ip-is-gateway",
        (*CONNECT, "--ip", "10.50.0.1", "base", "{b}"),
        "address 10.50.0.1 is already in use",
    ),
    Case("connect-ip-not-an-ip", (*CONNECT, "--ip", "10.50.0", "base", "{b}"), "invalid --ip"),
    Case(
        "connect-ip-is-ipv6",
        (*CONNECT, "--ip", "fd00::5", "base", "{b}"),
        "--ip fd00::5 is not an IPv4 address",
    ),
    Case(
        "connect-ip6-on-v4-network",
        (*CONNECT, "--ip6", "fd00::5", "base", "{b}"),
        "network 'base' has no IPv6 subnet",
    ),
    Case(
        "connect-invalid-mac",
        (*CONNECT, "--mac", "zz:42:ac:11:00:02", "base", "{b}"),
        "invalid --mac 'zz:42:ac:11:00:02'",
    ),
    Case(
        "connect-multicast-mac",
        (*CONNECT, "--mac", "01:00:5e:00:00:01", "base", "{b}"),
        "invalid --mac '01:00:5e:00:00:01'",
    ),
    Case(
        "connect-short-mac",
        (*CONNECT, "--mac", "02:42:ac:11:00", "base", "{b}"),
        "invalid --mac '02:42:ac:11:00'",
    ),
    Case("connect-invalid-alias", (*CONNECT, "--alias", "a b", "base", "{b}"), "invalid alias"),
    Case(
        "disconnect-not-connected",
        ("network", "disconnect", "base", "{b}"),
        "sandbox '{b}' is not connected to network 'base'",
    ),
    Case(
        "disconnect-unknown-network",
        ("network", "disconnect", "nosuch", "{a}"),
        "network 'nosuch' not found",
    ),
    Case("rm-with-endpoints", ("network", "rm", "base"), "disconnect them or use --force"),
    Case("rm-unknown-network", ("network", "rm", "nosuch"), "network 'nosuch' not found"),
    Case("inspect-unknown-network", ("network", "inspect", "nosuch"), "not found"),
    # sandboxes
    Case("sandbox-duplicate", ("sandbox", "create", "{a}"), "already exists"),
    Case("sandbox-invalid-name", ("sandbox", "create", "no/slash"), "invalid sandbox name"),
    Case("sandbox-rm-unknown", ("sandbox", "rm", "nosuch"), "sandbox 'nosuch' not found"),
    # usage errors (argparse): exit status 2
    Case("usage-missing-name", NEW, "the following arguments are required: name", rc=2),
    Case("usage-bad-format", ("network", "ls", "--format", "xml"), "invalid choice: 'xml'", rc=2),
    Case("usage-unknown-flag", (*NEW, "--bogus", "n"), "unrecognized arguments: --bogus", rc=2),
    Case("usage-unknown-verb", ("network", "frobnicate"), "invalid choice: 'frobnicate'", rc=2),
]


@pytest.fixture
def base(host: Host) -> dict[str, str]:
    """Network "base" 10.50.0.0/24 (bridge nsbrbase); sandbox a on it at .10, b unconnected."""
    host.netctl("network", "create", "--subnet", "10.50.0.0/24", "-o", "bridge.name=nsbrbase",
                "base")  # fmt: skip
    names = {"a": host.sandbox("a"), "b": host.sandbox("b")}
    host.netctl("network", "connect", "--ip", "10.50.0.10", "base", names["a"])
    return names


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(
    host: Host, base: dict[str, str], case: Case
) -> None:
    sandboxes = list(base.values())
    before = snapshot(host, sandboxes)

    proc = host.netctl(*(arg.format(**base) for arg in case.argv), check=False)

    assert_error(proc, case.rc, case.needle.format(**base))
    assert_unchanged(before, snapshot(host, sandboxes))


# --------------------------------------------------------------------------- stateful cases


def test_rm_force_removes_everything(host: Host) -> None:
    """`network rm` refuses a network with endpoints; `--force` removes every trace of it."""
    empty = snapshot(host, [])
    host.netctl("network", "create", "--subnet", "10.51.0.0/24", "-o", "bridge.name=nsbrforce",
                "doomed")  # fmt: skip
    host.netctl("network", "create", "--subnet", "10.52.0.0/24", "-o", "bridge.name=nsbrstay",
                "stays")  # fmt: skip
    one, two = host.sandbox("one"), host.sandbox("two")
    host.netctl("network", "connect", "doomed", one)
    host.netctl("network", "connect", "doomed", two)
    host.netctl("network", "connect", "stays", two)
    stays_ports = [link["ifname"] for link in host.ip_json("link", "show", "master", "nsbrstay")]
    doomed_ports = [link["ifname"] for link in host.ip_json("link", "show", "master", "nsbrforce")]
    assert len(doomed_ports) == 2 and len(stays_ports) == 1
    before = snapshot(host, [one, two])

    refused = host.netctl("network", "rm", "doomed", check=False)
    assert_error(refused, 1, "has 2 connected sandbox(es)")
    assert_unchanged(before, snapshot(host, [one, two]))

    host.netctl("network", "rm", "--force", "doomed")

    links = host.links()
    assert "nsbrforce" not in links
    assert not set(doomed_ports) & set(links), links
    assert "nsbrstay" in links and set(stays_ports) <= set(links)
    assert [n["Name"] for n in host.netctl_json("network", "ls")] == ["stays"]
    elements = json.dumps(nft_elements(host))
    assert "nsbrforce" not in elements and "10.51.0.0" not in elements, elements
    assert "nsbrstay" in elements
    # Only the "stays" network's rows remain: 1 network, 1 pool, gateway + one endpoint.
    assert store_counts(host.state_dir) == {
        "networks": 1,
        "endpoints": 1,
        "sandboxes": 2,
        "ipam_pools": 1,
        "ipam_addresses": 2,
        "port_bindings": 0,
    }
    assert [link["ifname"] for link in host.sandbox_ip_json(one, "link")] == ["lo"]
    assert sorted(link["ifname"] for link in host.sandbox_ip_json(two, "link")) == ["eth1", "lo"]
    assert host.sandbox_ip_json(one, "-4", "route", "show") == []

    assert_error(host.netctl("network", "rm", "stays", check=False), 1, "use --force")
    host.netctl("network", "rm", "-f", "stays")
    after = snapshot(host, [])
    assert after["nft elements"] == empty["nft elements"]
    assert not netstack_links(after["host links"])
    assert store_counts(host.state_dir) == {
        "networks": 0,
        "endpoints": 0,
        "sandboxes": 2,
        "ipam_pools": 0,
        "ipam_addresses": 0,
        "port_bindings": 0,
    }
    # The name, subnet and bridge name are free again.
    host.netctl("network", "create", "--subnet", "10.51.0.0/24", "-o", "bridge.name=nsbrforce",
                "doomed")  # fmt: skip


def test_exhausted_subnet(host: Host) -> None:
    """A /30 has one address besides the gateway; a second connect fails until it is freed."""
    host.netctl("network", "create", "--subnet", "10.9.0.0/30", "tiny")
    first, second = host.sandbox("first"), host.sandbox("second")
    host.netctl("network", "connect", "tiny", first)
    (endpoint,) = network_inspect(host, "tiny")["Endpoints"]
    assert endpoint["IPv4Address"] == "10.9.0.2/30"
    before = snapshot(host, [first, second])

    refused = host.netctl("network", "connect", "tiny", second, check=False)

    assert_error(refused, 1, "no free address left in 10.9.0.0/30")
    assert_unchanged(before, snapshot(host, [first, second]))
    # Also refused with an explicit address: the only one is taken.
    taken = host.netctl("network", "connect", "--ip", "10.9.0.2", "tiny", second, check=False)
    assert_error(taken, 1, "address 10.9.0.2 is already in use")
    assert_unchanged(before, snapshot(host, [first, second]))

    host.netctl("network", "disconnect", "tiny", first)
    host.netctl("network", "connect", "tiny", second)
    (endpoint,) = network_inspect(host, "tiny")["Endpoints"]
    assert endpoint["Sandbox"] == second
    assert endpoint["IPv4Address"] == "10.9.0.2/30"
    addresses = global_addresses(host.sandbox_ip_json(second, "addr", "show", "dev", "eth0"))
    assert addresses == {"eth0": ["10.9.0.2/30"]}
    assert [link["ifname"] for link in host.sandbox_ip_json(first, "link")] == ["lo"]


def test_sandbox_namespace_gone(host: Host, base: dict[str, str]) -> None:
    """A sandbox whose namespace vanished is refused for connect; rm --force still cleans up."""
    gone = host.sandbox("gone")
    host.netctl("network", "connect", "base", gone)
    veths = {name for name in netstack_links(host.links()) if name.startswith("nsv")}
    host.run("ip", "netns", "delete", gone)  # behind netstack's back; takes the veth with it
    # The kernel dismantles a deleted namespace asynchronously: wait until the veth is gone.
    deadline = time.monotonic() + 15
    while {n for n in netstack_links(host.links()) if n.startswith("nsv")} == veths:
        assert time.monotonic() < deadline, "the deleted sandbox's veth never went away"
        time.sleep(0.05)
    before = snapshot(host, list(base.values()))

    refused = host.netctl("network", "connect", "base", gone, check=False)

    assert_error(
        refused, 1, f"the network namespace of sandbox '{gone}' (/run/netns/{gone}) is gone"
    )
    assert_unchanged(before, snapshot(host, list(base.values())))
    host.netctl("network", "rm", "--force", "base")
    assert not netstack_links(host.links()), host.links()
    assert nft_elements(host) == {}
    counts = store_counts(host.state_dir)
    assert (counts["networks"], counts["endpoints"], counts["ipam_pools"]) == (0, 0, 0)
    assert counts["ipam_addresses"] == 0
    assert [link["ifname"] for link in host.sandbox_ip_json(base["a"], "link")] == ["lo"]
