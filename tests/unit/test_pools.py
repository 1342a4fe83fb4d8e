"""Pure pool logic: pool validation, the dynamic range, default pools, CIDR parsing."""

from __future__ import annotations

import ipaddress
from ipaddress import ip_address, ip_network

import pytest
from netstack.ipam.pools import (
    choose_default_pool,
    default_ipv4_pools,
    default_ipv6_pool,
    make_pool_spec,
    overlapping,
    parse_address,
    parse_network,
)

from netstack.errors import Conflict, InvalidArgument
from netstack.model import IPAddress, IPNetwork

NETWORK_ID = "3f2a" + "0" * 60


def net(text: str) -> IPNetwork:
    return ip_network(text)


def addr(text: str) -> IPAddress:
    return ip_address(text)


# make_pool_spec: gateway -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "gateway"),
    [
        ("10.20.0.0/24", "10.20.0.1"),
        ("10.20.0.0/30", "10.20.0.1"),
        ("172.17.0.0/16", "172.17.0.1"),
        ("fd00:1::/64", "fd00:1::1"),
        ("fd00:1::/126", "fd00:1::1"),
    ],
)
def test_default_gateway_is_first_host(subnet: str, gateway: str) -> None:
    spec = make_pool_spec(net(subnet))
    assert spec.gateway == addr(gateway)
    assert spec.gateway.version == spec.subnet.version


@pytest.mark.parametrize(
    ("subnet", "gateway"),
    [
        ("10.20.0.0/24", "10.20.0.254"),  # last host
        ("10.20.0.0/24", "10.20.0.77"),
        ("fd00:1::/64", "fd00:1::ffff:ffff:ffff:ffff"),  # IPv6 has no broadcast address
    ],
)
def test_explicit_gateway_accepted(subnet: str, gateway: str) -> None:
    assert make_pool_spec(net(subnet), addr(gateway)).gateway == addr(gateway)


@pytest.mark.parametrize(
    ("subnet", "gateway"),
    [
        ("10.20.0.0/24", "10.21.0.1"),  # outside
        ("10.20.0.0/24", "10.20.0.0"),  # network address
        ("10.20.0.0/24", "10.20.0.255"),  # broadcast address
        ("10.20.0.0/24", "fd00::1"),  # other family
        ("fd00:1::/64", "fd00:1::"),  # IPv6 subnet-router anycast (the network address)
        ("fd00:1::/64", "fd00:2::1"),
        ("fd00:1::/64", "10.20.0.1"),
    ],
)
def test_bad_gateway_rejected(subnet: str, gateway: str) -> None:
    with pytest.raises(InvalidArgument, match="gateway") as caught:
        make_pool_spec(net(subnet), addr(gateway))
    assert gateway in str(caught.value)
    assert subnet in str(caught.value)


# make_pool_spec: ip-range ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "ip_range"),
    [
        ("10.20.0.0/24", "10.21.0.0/25"),  # elsewhere
        ("10.20.0.0/24", "10.20.0.0/23"),  # larger than the subnet
        ("10.20.0.0/24", "fd00::/120"),  # other family
        ("fd00:1::/64", "fd00:2::/120"),
        ("fd00:1::/64", "10.20.0.0/25"),
    ],
)
def test_ip_range_outside_subnet_rejected(subnet: str, ip_range: str) -> None:
    with pytest.raises(InvalidArgument, match="is not inside subnet") as caught:
        make_pool_spec(net(subnet), ip_range=net(ip_range))
    assert ip_range in str(caught.value)


def test_ip_range_equal_to_subnet_accepted() -> None:
    spec = make_pool_spec(net("10.20.0.0/24"), ip_range=net("10.20.0.0/24"))
    assert (spec.first, spec.last) == (int(addr("10.20.0.1")), int(addr("10.20.0.254")))


@pytest.mark.parametrize("ip_range", ["10.20.0.0/32", "10.20.0.255/32"])
def test_ip_range_without_allocatable_address_rejected(ip_range: str) -> None:
    with pytest.raises(InvalidArgument, match="leaves no address"):
        make_pool_spec(net("10.20.0.0/24"), ip_range=net(ip_range))


# make_pool_spec: aux addresses -----------------------------------------------------------


def test_aux_addresses_kept() -> None:
    aux = {"router": addr("10.20.0.5"), "printer": addr("10.20.0.200")}
    spec = make_pool_spec(net("10.20.0.0/24"), aux_addresses=aux)
    assert spec.aux_addresses == aux


@pytest.mark.parametrize(
    ("subnet", "gateway", "aux", "message"),
    [
        ("10.20.0.0/24", None, "10.21.0.5", "not a usable address"),
        ("10.20.0.0/24", None, "10.20.0.0", "not a usable address"),
        ("10.20.0.0/24", None, "10.20.0.255", "not a usable address"),
        ("10.20.0.0/24", None, "fd00::5", "not a usable address"),
        ("10.20.0.0/24", None, "10.20.0.1", "is the gateway"),  # the default gateway
        ("10.20.0.0/24", "10.20.0.9", "10.20.0.9", "is the gateway"),
        ("fd00:1::/64", None, "fd00:1::", "not a usable address"),
        ("fd00:1::/64", None, "fd00:1::1", "is the gateway"),
    ],
)
def test_bad_aux_address_rejected(subnet: str, gateway: str | None, aux: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        make_pool_spec(
            net(subnet),
            None if gateway is None else addr(gateway),
            aux_addresses={"router": addr(aux)},
        )
    assert f"router={aux}" in str(caught.value)


# make_pool_spec: subnet size -------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "advice"),
    [
        ("10.20.0.0/31", "/30"),
        ("10.20.0.1/32", "/30"),
        ("fd00:1::/127", "/126"),
        ("fd00:1::1/128", "/126"),
    ],
)
def test_too_small_subnet_rejected(subnet: str, advice: str) -> None:
    with pytest.raises(InvalidArgument, match="too small") as caught:
        make_pool_spec(net(subnet))
    assert advice in str(caught.value)
    assert subnet in str(caught.value)


@pytest.mark.parametrize("subnet", ["10.20.0.0/30", "fd00:1::/126"])
def test_smallest_subnet_accepted(subnet: str) -> None:
    assert make_pool_spec(net(subnet)).subnet == net(subnet)


# the dynamic range ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "ip_range", "first", "last"),
    [
        ("10.20.0.0/24", None, "10.20.0.1", "10.20.0.254"),
        ("10.20.0.0/30", None, "10.20.0.1", "10.20.0.2"),
        ("10.20.0.0/16", None, "10.20.0.1", "10.20.255.254"),
        ("10.20.0.0/24", "10.20.0.128/25", "10.20.0.128", "10.20.0.254"),  # no broadcast
        ("10.20.0.0/24", "10.20.0.0/25", "10.20.0.1", "10.20.0.127"),  # no network address
        ("10.20.0.0/24", "10.20.0.64/26", "10.20.0.64", "10.20.0.127"),
        ("10.20.0.0/24", "10.20.0.7/32", "10.20.0.7", "10.20.0.7"),
        ("fd00:1::/64", None, "fd00:1::1", "fd00:1::ffff:ffff:ffff:ffff"),
        ("fd00:1::/126", None, "fd00:1::1", "fd00:1::3"),
        ("fd00:1::/64", "fd00:1::100/120", "fd00:1::100", "fd00:1::1ff"),
        ("fd00:1::/64", "fd00:1::/120", "fd00:1::1", "fd00:1::ff"),
        (
            "fd00:1::/64",
            "fd00:1::ffff:ffff:ffff:ff00/120",
            "fd00:1::ffff:ffff:ffff:ff00",
            "fd00:1::ffff:ffff:ffff:ffff",
        ),
    ],
)
def test_first_and_last_of_dynamic_range(
    subnet: str, ip_range: str | None, first: str, last: str
) -> None:
    spec = make_pool_spec(net(subnet), ip_range=None if ip_range is None else net(ip_range))
    assert spec.first == int(addr(first))
    assert spec.last == int(addr(last))


@pytest.mark.parametrize(
    ("address", "usable"),
    [
        ("10.20.0.0", False),
        ("10.20.0.1", True),
        ("10.20.0.254", True),
        ("10.20.0.255", False),
        ("10.21.0.1", False),
        ("fd00::1", False),
    ],
)
def test_usable_v4(address: str, usable: bool) -> None:
    assert make_pool_spec(net("10.20.0.0/24")).usable(addr(address)) is usable


# choose_default_pool ----------------------------------------------------------------------

DOCKER_ORDER = [f"172.{second}.0.0/16" for second in range(17, 32)] + [
    f"192.168.{third}.0/20" for third in range(0, 256, 16)
]


def test_default_ipv4_pools_follow_docker_order() -> None:
    assert [str(p) for p in default_ipv4_pools()] == DOCKER_ORDER


@pytest.mark.parametrize(
    ("in_use", "expected"),
    [
        ([], "172.17.0.0/16"),
        (["172.17.0.0/16"], "172.18.0.0/16"),
        (["172.17.5.0/24"], "172.18.0.0/16"),  # a host route inside the first pool
        (["172.17.0.0/16", "172.19.0.0/16"], "172.18.0.0/16"),  # a hole is reused
        (["172.16.0.0/12"], "192.168.0.0/20"),  # every 172 pool overlaps
        (["172.0.0.0/8", "192.168.0.0/17"], "192.168.128.0/20"),
        (["172.16.0.0/12", "192.168.0.0/20"], "192.168.16.0/20"),
        (["172.16.0.0/12", "192.168.3.0/24"], "192.168.16.0/20"),
        (["10.0.0.0/8", "192.168.1.0/24"], "172.17.0.0/16"),  # no overlap at all
        (["fd00::/8", "::/0"], "172.17.0.0/16"),  # IPv6 never blocks an IPv4 pool
    ],
)
def test_choose_default_pool(in_use: list[str], expected: str) -> None:
    assert choose_default_pool([net(n) for n in in_use]) == net(expected)


def test_choose_default_pool_hands_out_every_pool_in_order_then_conflict() -> None:
    in_use: list[IPNetwork] = []
    for _ in DOCKER_ORDER:
        in_use.append(choose_default_pool(in_use))
    assert [str(n) for n in in_use] == DOCKER_ORDER
    with pytest.raises(Conflict, match="all default address pools are in use"):
        choose_default_pool(in_use)


@pytest.mark.parametrize(
    "in_use",
    [["172.16.0.0/12", "192.168.0.0/16"], ["128.0.0.0/1"], ["0.0.0.0/0"]],
)
def test_choose_default_pool_exhausted(in_use: list[str]) -> None:
    with pytest.raises(Conflict, match="--subnet"):
        choose_default_pool([net(n) for n in in_use])


def test_overlapping_returns_first_clash() -> None:
    existing = [net("10.0.0.0/8"), net("fd00::/8"), net("10.1.0.0/16")]
    assert overlapping(net("10.1.2.0/24"), existing) == net("10.0.0.0/8")
    assert overlapping(net("fd00:1::/64"), existing) == net("fd00::/8")
    assert overlapping(net("192.168.0.0/16"), existing) is None


# default_ipv6_pool ------------------------------------------------------------------------


def test_default_ipv6_pool_is_unique_local_slash_64() -> None:
    pool = default_ipv6_pool(NETWORK_ID, [])
    assert pool.prefixlen == 64
    assert pool.subnet_of(ipaddress.IPv6Network("fd00::/8"))


def test_default_ipv6_pool_is_deterministic_per_network_id() -> None:
    assert default_ipv6_pool(NETWORK_ID, []) == default_ipv6_pool(NETWORK_ID, [])
    others = {default_ipv6_pool(f"{n:064x}", []) for n in range(50)}
    assert len(others) == 50


def test_default_ipv6_pool_avoids_in_use() -> None:
    first = default_ipv6_pool(NETWORK_ID, [])
    second = default_ipv6_pool(NETWORK_ID, [first])
    assert second != first
    assert second.prefixlen == 64
    assert not second.overlaps(first)
    third = default_ipv6_pool(NETWORK_ID, [first, second])
    assert third not in (first, second)
    # An in-use supernet of the first choice is avoided too, IPv4 entries are ignored.
    supernet = first.supernet(new_prefix=48)
    assert not default_ipv6_pool(NETWORK_ID, [supernet, net("0.0.0.0/0")]).overlaps(supernet)


def test_default_ipv6_pool_exhausted() -> None:
    with pytest.raises(Conflict, match="IPv6 --subnet"):
        default_ipv6_pool(NETWORK_ID, [net("fd00::/8")])


# parse_network / parse_address ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.20.0.0/24", "10.20.0.0/24"), ("fd00:1::/64", "fd00:1::/64"), ("10.0.0.7", "10.0.0.7/32")],
)
def test_parse_network(text: str, expected: str) -> None:
    assert parse_network(text, "subnet") == net(expected)


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("10.20.0.1/24", "host bits set"),
        ("10.20.0.0/33", ""),
        ("banana", ""),
        ("", ""),
        ("10.20.0.0/24 ", ""),
        ("fd00:1::1/64", "host bits set"),
        ("fd00:1::/129", ""),
    ],
)
def test_parse_network_errors_name_the_value(text: str, detail: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_network(text, "ip-range")
    message = str(caught.value)
    assert message.startswith(f"invalid ip-range {text!r}")
    assert detail in message
    assert "CIDR" in message


@pytest.mark.parametrize(("text", "version"), [("10.20.0.1", 4), ("fd00:1::1", 6)])
def test_parse_address(text: str, version: int) -> None:
    assert parse_address(text, "gateway").version == version


@pytest.mark.parametrize("text", ["10.20.0.256", "10.20.0.1/24", "fd00::1::2", "gw", ""])
def test_parse_address_errors_name_the_value(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_address(text, "gateway")
    assert str(caught.value) == f"invalid gateway {text!r}: not an IPv4 or IPv6 address"


# product bugs (documented, strict: they fail loudly once fixed) ---------------------------


def test_default_gateway_of_low_ipv6_subnet_is_ipv6() -> None:
    spec = make_pool_spec(net("::/120"))
    assert spec.gateway == ipaddress.IPv6Address("::1")
