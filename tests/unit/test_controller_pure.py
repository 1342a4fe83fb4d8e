"""The controller's pure helpers: pool request pairing, names, KEY=VALUE lists, MACs."""

from __future__ import annotations

import re
from ipaddress import ip_address, ip_network

import pytest

from netstack.controller import (
    NetworkRequest,
    parse_key_values,
    pool_requests,
    random_mac,
    validate_name,
)
from netstack.errors import InvalidArgument

MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def requested(**fields: list[str]) -> list[tuple[str, str | None, str | None, dict[str, str]]]:
    """pool_requests() of a NetworkRequest named 'n', as plain strings for comparison."""
    result = pool_requests(NetworkRequest(name="n", **fields))  # type: ignore[arg-type]
    return [
        (
            str(p.subnet),
            None if p.gateway is None else str(p.gateway),
            None if p.ip_range is None else str(p.ip_range),
            {k: str(v) for k, v in p.aux.items()},
        )
        for p in result
    ]


# pool_requests ----------------------------------------------------------------------------


def test_no_subnets_no_pools() -> None:
    assert requested() == []


def test_single_subnet() -> None:
    assert requested(subnets=["10.20.0.0/24"]) == [("10.20.0.0/24", None, None, {})]


def test_dual_stack_pairing_follows_containment_not_order() -> None:
    got = requested(
        subnets=["10.20.0.0/24", "fd00:1::/64"],
        gateways=["fd00:1::fe", "10.20.0.254"],
        ip_ranges=["fd00:1::100/120", "10.20.0.128/25"],
        aux_addresses=["router=10.20.0.5", "dns6=fd00:1::53", "dns=10.20.0.53"],
    )
    assert got == [
        (
            "10.20.0.0/24",
            "10.20.0.254",
            "10.20.0.128/25",
            {"router": "10.20.0.5", "dns": "10.20.0.53"},
        ),
        ("fd00:1::/64", "fd00:1::fe", "fd00:1::100/120", {"dns6": "fd00:1::53"}),
    ]


def test_pool_objects_are_typed() -> None:
    (pool,) = pool_requests(
        NetworkRequest(name="n", subnets=["10.20.0.0/24"], gateways=["10.20.0.9"])
    )
    assert pool.subnet == ip_network("10.20.0.0/24")
    assert pool.gateway == ip_address("10.20.0.9")


def test_order_of_subnets_is_kept() -> None:
    got = requested(subnets=["fd00:1::/64", "10.20.0.0/24"])
    assert [subnet for subnet, *_ in got] == ["fd00:1::/64", "10.20.0.0/24"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"subnets": ["10.20.0.0/24"], "gateways": ["10.21.0.1"]},
            "gateway 10.21.0.1 is outside every --subnet (10.20.0.0/24)",
        ),
        (
            {"gateways": ["10.21.0.1"]},
            "gateway 10.21.0.1 is outside every --subnet (none given)",
        ),
        (
            {"subnets": ["10.20.0.0/24"], "gateways": ["fd00::1"]},
            "gateway fd00::1 is outside every --subnet",
        ),
        (
            {"subnets": ["10.20.0.0/24"], "ip_ranges": ["10.20.1.0/25"]},
            "ip-range 10.20.1.0/25 is outside every --subnet (10.20.0.0/24)",
        ),
        (
            {"subnets": ["10.20.0.0/24"], "ip_ranges": ["10.20.0.0/23"]},
            "ip-range 10.20.0.0/23 is outside every --subnet",
        ),
        (
            {"ip_ranges": ["10.20.0.0/25"]},
            "ip-range 10.20.0.0/25 is outside every --subnet (none given)",
        ),
        (
            {"subnets": ["10.20.0.0/24"], "aux_addresses": ["router=10.9.9.9"]},
            "aux-address router=10.9.9.9 is outside every --subnet",
        ),
        (
            {"subnets": ["10.20.0.0/24", "10.30.0.0/24"]},
            "only one IPv4 --subnet per network is supported",
        ),
        (
            {"subnets": ["fd00:1::/64", "fd00:2::/64"]},
            "only one IPv6 --subnet per network is supported",
        ),
        (
            {"subnets": ["10.20.0.0/24"], "gateways": ["10.20.0.1", "10.20.0.2"]},
            "more than one --gateway for subnet 10.20.0.0/24",
        ),
        (
            {"subnets": ["10.20.0.0/24"], "ip_ranges": ["10.20.0.0/25", "10.20.0.128/25"]},
            "more than one --ip-range for subnet 10.20.0.0/24",
        ),
        ({"subnets": ["10.20.0.1/24"]}, "invalid subnet '10.20.0.1/24'"),
        ({"subnets": ["10.20.0.0/24"], "gateways": ["x"]}, "invalid gateway 'x'"),
        ({"subnets": ["10.20.0.0/24"], "ip_ranges": ["y"]}, "invalid ip-range 'y'"),
        (
            {"subnets": ["10.20.0.0/24"], "aux_addresses": ["router=z"]},
            "invalid aux-address router 'z'",
        ),
        (
            {"subnets": ["10.20.0.0/24"], "aux_addresses": ["10.20.0.5"]},
            "invalid aux-address '10.20.0.5': expected KEY=VALUE",
        ),
    ],
)
def test_pool_request_errors(fields: dict[str, list[str]], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        requested(**fields)
    assert message in str(caught.value)


# validate_name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "7", "web", "my-net_1.0", "Frontend", "a" * 63, "1.2.3.4", "a--b..c__"]
)
def test_valid_names(name: str) -> None:
    assert validate_name(name, "network") == name


@pytest.mark.parametrize(
    "name", ["", "-web", ".web", "_web", "a" * 64, "my net", "a/b", "a:b", "wéb", "web!"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_name(name, "sandbox")
    message = str(caught.value)
    assert message.startswith(f"invalid sandbox name {name!r}:")
    assert "1-63" in message


# parse_key_values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([], {}),
        (["a=1"], {"a": "1"}),
        (["a=1", "b=2"], {"a": "1", "b": "2"}),
        (["a="], {"a": ""}),
        (["a=b=c"], {"a": "b=c"}),
        (["com.docker.network.driver.mtu=1400"], {"com.docker.network.driver.mtu": "1400"}),
        (["a=1", "a=2"], {"a": "2"}),
        (["a = 1"], {"a ": " 1"}),
    ],
)
def test_parse_key_values(items: list[str], expected: dict[str, str]) -> None:
    assert parse_key_values(items, "--label") == expected


@pytest.mark.parametrize("item", ["a", "", "=1", "=", "mtu:1500"])
def test_parse_key_values_errors(item: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_key_values(["ok=1", item], "--opt")
    assert str(caught.value) == f"invalid --opt {item!r}: expected KEY=VALUE"


# random_mac -------------------------------------------------------------------------------


def test_random_mac_unicast_locally_administered() -> None:
    macs = [random_mac() for _ in range(500)]
    for mac in macs:
        assert MAC.match(mac), mac
        octets = mac.split(":")
        assert len(octets) == 6
        first = int(octets[0], 16)
        assert first & 0x01 == 0, f"{mac} is multicast"
        assert first & 0x02 == 0x02, f"{mac} is not locally administered"
    assert len(set(macs)) == len(macs)


# product bugs (documented, strict: they fail loudly once fixed) ---------------------------


def test_name_with_trailing_newline_rejected() -> None:
    with pytest.raises(InvalidArgument):
        validate_name("web\n", "network")
