"""netctl's argument parser (docs/contract.md), its usage errors, and its renderers."""

from __future__ import annotations

import json
import shlex
from ipaddress import IPv4Interface, IPv6Interface, ip_address, ip_network
from typing import Any

import pytest

from netstack.cli.app import build_parser, main
from netstack.cli.render import network_document, sandbox_document, table
from netstack.model import Endpoint, Network, PoolConfig, Sandbox

NETWORK_ID = "1a2b3c4d5e6f" + "0" * 52
ENDPOINT_ID = "e" * 64


def parse(argv: list[str]) -> dict[str, Any]:
    return vars(build_parser().parse_args(argv))


# every verb and flag of the contract ------------------------------------------------------

CREATE_DEFAULTS: dict[str, Any] = {
    "group": "network",
    "verb": "create",
    "verbose": False,
    "driver": "bridge",
    "subnet": [],
    "gateway": [],
    "ip_range": [],
    "aux_address": [],
    "ipv6": False,
    "internal": False,
    "opt": [],
    "label": [],
    "dns": [],
    "format": "table",
}


@pytest.mark.parametrize(
    ("argv", "changes"),
    [
        (["web"], {}),
        (["--driver", "bridge", "web"], {}),
        (["-d", "macvlan", "web"], {"driver": "macvlan"}),
        (["--subnet", "10.20.0.0/24", "web"], {"subnet": ["10.20.0.0/24"]}),
        (
            ["--subnet", "10.20.0.0/24", "--subnet=fd00:1::/64", "web"],
            {"subnet": ["10.20.0.0/24", "fd00:1::/64"]},
        ),
        (
            ["--gateway", "10.20.0.1", "--gateway", "fd00:1::1", "web"],
            {"gateway": ["10.20.0.1", "fd00:1::1"]},
        ),
        (["--ip-range", "10.20.0.128/25", "web"], {"ip_range": ["10.20.0.128/25"]}),
        (
            ["--aux-address", "router=10.20.0.5", "--aux-address", "dns=10.20.0.53", "web"],
            {"aux_address": ["router=10.20.0.5", "dns=10.20.0.53"]},
        ),
        (["--ipv6", "web"], {"ipv6": True}),
        (["--internal", "web"], {"internal": True}),
        (
            ["-o", "mtu=1400", "--opt", "bridge.name=br-web", "web"],
            {"opt": ["mtu=1400", "bridge.name=br-web"]},
        ),
        (["--label", "a=1", "--label", "b=2", "web"], {"label": ["a=1", "b=2"]}),
        (
            ["--dns", "192.0.2.53", "--dns", "2001:db8::53", "web"],
            {"dns": ["192.0.2.53", "2001:db8::53"]},
        ),
        (["web", "--format", "json"], {"format": "json"}),
    ],
)
def test_network_create(argv: list[str], changes: dict[str, Any]) -> None:
    assert parse(["network", "create", *argv]) == {**CREATE_DEFAULTS, "name": "web", **changes}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["network", "ls"], {"format": "table"}),
        (["network", "ls", "--format", "json"], {"format": "json"}),
        (["network", "inspect", "a"], {"names": ["a"], "format": "table"}),
        (
            ["network", "inspect", "a", "b", "--format", "json"],
            {"names": ["a", "b"], "format": "json"},
        ),
        (["network", "rm", "a"], {"names": ["a"], "force": False}),
        (["network", "rm", "--force", "a", "b"], {"names": ["a", "b"], "force": True}),
        (["network", "rm", "-f", "a"], {"names": ["a"], "force": True}),
        (
            ["network", "connect", "front", "web"],
            {
                "network": "front",
                "sandbox": "web",
                "ip": None,
                "ip6": None,
                "alias": [],
                "mac": None,
                "publish": [],
                "format": "table",
            },
        ),
        (
            shlex.split(
                "network connect --ip 10.20.0.9 --ip6 fd00:1::9 --alias www --alias api "
                "--mac 02:42:ac:11:00:02 -p 8080:80 --publish 127.0.0.1::53/udp front web"
            ),
            {
                "network": "front",
                "sandbox": "web",
                "ip": "10.20.0.9",
                "ip6": "fd00:1::9",
                "alias": ["www", "api"],
                "mac": "02:42:ac:11:00:02",
                "publish": ["8080:80", "127.0.0.1::53/udp"],
                "format": "table",
            },
        ),
        (["network", "disconnect", "front", "web"], {"network": "front", "sandbox": "web"}),
        (["network", "prune"], {"format": "table"}),
        (["sandbox", "create", "web"], {"name": "web"}),
        (["sandbox", "ls"], {"format": "table"}),
        (["sandbox", "ls", "--format", "json"], {"format": "json"}),
        (["sandbox", "inspect", "web", "db"], {"names": ["web", "db"], "format": "table"}),
        (["sandbox", "inspect", "web", "--format", "json"], {"names": ["web"], "format": "json"}),
        (["sandbox", "rm", "web", "db"], {"names": ["web", "db"]}),
        (
            ["sandbox", "exec", "web", "--", "ip", "-br", "a"],
            {"name": "web", "command": ["ip", "-br", "a"]},
        ),
        (
            ["sandbox", "exec", "web", "--", "ping", "-v", "--format", "x"],
            {"name": "web", "command": ["ping", "-v", "--format", "x"]},
        ),
        (["sandbox", "exec", "web", "hostname"], {"name": "web", "command": ["hostname"]}),
        (["sandbox", "exec", "web"], {"name": "web", "command": []}),
    ],
)
def test_verbs(argv: list[str], expected: dict[str, Any]) -> None:
    assert parse(argv) == {"group": argv[0], "verb": argv[1], "verbose": False, **expected}


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_is_global(flag: str) -> None:
    assert parse([flag, "network", "ls"])["verbose"] is True


# usage errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "detail"),
    [
        ([], "required: group"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["network"], "required: verb"),
        (["network", "bogus"], "invalid choice: 'bogus'"),
        (["sandbox"], "required: verb"),
        (["network", "create"], "required: name"),
        (["network", "create", "web", "--subnet"], "--subnet: expected one argument"),
        (["network", "create", "web", "--bogus"], "unrecognized arguments: --bogus"),
        (["network", "create", "a", "b"], "unrecognized arguments: b"),
        (["network", "ls", "--format", "xml"], "invalid choice: 'xml'"),
        (["network", "ls", "extra"], "unrecognized arguments: extra"),
        (["network", "inspect"], "required: NAME"),
        (["network", "rm"], "required: NAME"),
        (["network", "connect", "front"], "required: sandbox"),
        (["network", "disconnect"], "required: network, sandbox"),
        (["network", "disconnect", "front", "web", "--format", "json"], "unrecognized"),
        (["network", "prune", "--force"], "unrecognized arguments: --force"),
        (["sandbox", "create"], "required: name"),
        (["sandbox", "inspect"], "required: NAME"),
        (["sandbox", "rm"], "required: NAME"),
        (["sandbox", "rm", "--format", "json", "web"], "unrecognized"),
        (["sandbox", "exec"], "required: name"),
        (["network", "ls", "-v"], "unrecognized arguments: -v"),
    ],
)
def test_usage_error_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], detail: str
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert err.startswith("netctl: error: ")
    assert detail in err
    assert "--help`)" in err


@pytest.mark.parametrize("argv", [["--help"], ["network", "--help"], ["network", "create", "-h"]])
def test_help_exits_0_on_stdout(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: netctl")
    assert err == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["network", "create", "--opt", "mtu", "web"],
            "invalid --opt 'mtu': expected KEY=VALUE",
        ),
        (["network", "create", "--label", "=x", "web"], "invalid --label '=x': expected KEY=VALUE"),
        (["sandbox", "exec", "web"], "no command given; usage: netctl sandbox exec NAME -- CMD"),
    ],
)
def test_user_error_before_any_state_exits_1(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """Errors found while reading the arguments: exit 1, one line, nothing touched."""
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"netctl: error: {message}")
    assert err.count("\n") == 1


# render.network_document ------------------------------------------------------------------

TOP_KEYS = {
    "Name",
    "Id",
    "Created",
    "Scope",
    "Driver",
    "EnableIPv6",
    "Internal",
    "IPAM",
    "Options",
    "Labels",
    "Endpoints",
}
ENDPOINT_KEYS = {
    "EndpointID",
    "Name",
    "Sandbox",
    "Interface",
    "MacAddress",
    "IPv4Address",
    "IPv6Address",
    "Aliases",
    "Ports",
}


def make_network(**pool_extra: Any) -> Network:
    return Network(
        id=NETWORK_ID,
        name="frontend",
        driver="bridge",
        pools=[
            PoolConfig(ip_network("10.20.0.0/24"), ip_address("10.20.0.1"), **pool_extra),
            PoolConfig(ip_network("fd00:1::/64"), ip_address("fd00:1::1")),
        ],
        options={"bridge.name": "nsbr1a2b3c4d5e6", "mtu": "1500"},
        labels={"team": "web"},
        enable_ipv6=True,
        created="2026-01-02T03:04:05Z",
    )


def make_endpoint(ipv6: bool = True) -> Endpoint:
    return Endpoint(
        id=ENDPOINT_ID,
        network_id=NETWORK_ID,
        sandbox="web",
        interface="eth0",
        mac="02:42:ac:11:00:02",
        ipv4=IPv4Interface("10.20.0.2/24"),
        ipv6=IPv6Interface("fd00:1::2/64") if ipv6 else None,
        aliases=["www"],
    )


def test_network_document_shape() -> None:
    document = network_document(make_network(), [make_endpoint(), make_endpoint(ipv6=False)])
    assert set(document) == TOP_KEYS
    assert document["Name"] == "frontend"
    assert document["Id"] == NETWORK_ID
    assert document["Scope"] == "local"
    assert document["Driver"] == "bridge"
    assert document["EnableIPv6"] is True
    assert document["Internal"] is False
    assert document["Created"] == "2026-01-02T03:04:05Z"
    assert document["Options"]["bridge.name"] == "nsbr1a2b3c4d5e6"
    assert document["Labels"] == {"team": "web"}
    assert document["IPAM"] == {
        "Driver": "default",
        "Config": [
            {"Subnet": "10.20.0.0/24", "Gateway": "10.20.0.1"},
            {"Subnet": "fd00:1::/64", "Gateway": "fd00:1::1"},
        ],
    }
    first, second = document["Endpoints"]
    assert set(first) == ENDPOINT_KEYS
    assert first == {
        "EndpointID": ENDPOINT_ID,
        "Name": "web",
        "Sandbox": "web",
        "Interface": "eth0",
        "MacAddress": "02:42:ac:11:00:02",
        "IPv4Address": "10.20.0.2/24",
        "IPv6Address": "fd00:1::2/64",
        "Aliases": ["www"],
        "Ports": [],
    }
    assert second["IPv6Address"] == ""
    assert json.loads(json.dumps(document)) == document


def test_network_document_optional_pool_fields() -> None:
    document = network_document(
        make_network(
            ip_range=ip_network("10.20.0.128/25"), aux_addresses={"router": ip_address("10.20.0.5")}
        ),
        [],
    )
    assert document["IPAM"]["Config"][0] == {
        "Subnet": "10.20.0.0/24",
        "Gateway": "10.20.0.1",
        "IPRange": "10.20.0.128/25",
        "AuxiliaryAddresses": {"router": "10.20.0.5"},
    }
    assert set(document["IPAM"]["Config"][1]) == {"Subnet", "Gateway"}
    assert document["Endpoints"] == []


def test_network_document_does_not_share_mutable_state() -> None:
    network = make_network()
    endpoint = make_endpoint()
    document = network_document(network, [endpoint])
    document["Options"]["mtu"] = "9000"
    document["Labels"]["x"] = "y"
    document["Endpoints"][0]["Aliases"].append("more")
    assert network.options["mtu"] == "1500"
    assert "x" not in network.labels
    assert endpoint.aliases == ["www"]


def test_sandbox_document_shape() -> None:
    sandbox = Sandbox("web", "/run/netns/web", "2026-01-02T03:04:05Z")
    document = sandbox_document(sandbox, [(make_endpoint(ipv6=False), "frontend")])
    assert document == {
        "Name": "web",
        "Path": "/run/netns/web",
        "Created": "2026-01-02T03:04:05Z",
        "Endpoints": [
            {
                "Network": "frontend",
                "EndpointID": ENDPOINT_ID,
                "Interface": "eth0",
                "MacAddress": "02:42:ac:11:00:02",
                "IPv4Address": "10.20.0.2/24",
                "IPv6Address": "",
                "Ports": [],
            }
        ],
    }


# render.table -----------------------------------------------------------------------------


def test_table_alignment() -> None:
    text = table(
        ["NETWORK ID", "NAME", "DRIVER", ""],
        [["1a2b3c4d5e6f", "front", "bridge", "internal"], ["ffff", "a-much-longer-name", "x", ""]],
    )
    assert text.splitlines() == [
        "NETWORK ID    NAME                DRIVER",
        "1a2b3c4d5e6f  front               bridge  internal",
        "ffff          a-much-longer-name  x",
    ]


def test_table_columns_start_at_the_same_offset() -> None:
    headers = ["NAME", "NETWORKS", "ADDRESSES"]
    rows = [["web", "front:eth0, back:eth1", "10.20.0.2/24"], ["database-1", "", "10.30.0.2/24"]]
    lines = table(headers, rows).splitlines()
    starts = [lines[0].index("NETWORKS"), lines[0].index("ADDRESSES")]
    assert starts == [len("database-1") + 2, len("database-1") + 2 + len(rows[0][1]) + 2]
    assert lines[1][starts[0] :].startswith("front:eth0")
    assert lines[2][starts[1] :] == "10.30.0.2/24"
    assert all(line == line.rstrip() for line in lines)


def test_table_headers_only() -> None:
    assert table(["NAME", "NETWORKS"], []) == "NAME  NETWORKS"


def test_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError):
        table(["A", "B"], [["only-one"]])


# product bugs (documented, strict: they fail loudly once fixed) ---------------------------


def test_pool_without_gateway_has_no_gateway_string_none() -> None:
    network = Network(
        id=NETWORK_ID, name="n", driver="bridge", pools=[PoolConfig(ip_network("10.9.0.0/24"))]
    )
    assert network_document(network, [])["IPAM"]["Config"][0].get("Gateway") != "None"
