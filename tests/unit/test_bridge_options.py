"""Bridge driver options (parsed once, strictly) and the driver's pure naming helpers."""

from __future__ import annotations

import ipaddress
import re

import pytest
from netstack.drivers.bridge.driver import (
    bridge_mac,
    facts_of,
    host_veth_name,
    ip_interface,
)
from netstack.drivers.bridge.options import BridgeOptions, validate_ifname

from netstack.errors import InvalidArgument
from netstack.model import Network, PoolConfig

NETWORK_ID = "0123456789abcdef" * 4
MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def parse(raw: dict[str, str]) -> BridgeOptions:
    return BridgeOptions.parse(raw, NETWORK_ID)


# defaults ---------------------------------------------------------------------------------


def test_defaults() -> None:
    options = parse({})
    assert options == BridgeOptions(
        bridge_name="nsbr0123456789a", mtu=1500, masquerade=True, icc=True
    )


@pytest.mark.parametrize("network_id", [NETWORK_ID, "f" * 64, "a1b2c3d4e5f6a7b8" * 4])
def test_default_bridge_name_is_prefix_and_11_chars_of_id(network_id: str) -> None:
    name = BridgeOptions.parse({}, network_id).bridge_name
    assert name == "nsbr" + network_id[:11]
    assert len(name.encode()) == 15


# names and aliases ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"bridge.name": "br-web"}, {"bridge_name": "br-web"}),
        ({"com.docker.network.bridge.name": "br-web"}, {"bridge_name": "br-web"}),
        ({"mtu": "9000"}, {"mtu": 9000}),
        ({"com.docker.network.driver.mtu": "1400"}, {"mtu": 1400}),
        ({"masquerade": "false"}, {"masquerade": False}),
        ({"com.docker.network.bridge.enable_ip_masquerade": "false"}, {"masquerade": False}),
        ({"icc": "false"}, {"icc": False}),
        ({"com.docker.network.bridge.enable_icc": "false"}, {"icc": False}),
        (
            {"com.docker.network.bridge.name": "br0", "mtu": "1450", "icc": "no"},
            {"bridge_name": "br0", "mtu": 1450, "icc": False},
        ),
    ],
)
def test_options_and_docker_aliases(raw: dict[str, str], expected: dict[str, object]) -> None:
    options = parse(raw)
    defaults = parse({})
    for field in ("bridge_name", "mtu", "masquerade", "icc"):
        assert getattr(options, field) == expected.get(field, getattr(defaults, field)), field


@pytest.mark.parametrize(
    "key", ["bridge_name", "com.docker.network.bridge.host_binding_ipv4", "MTU", "vlan"]
)
def test_unknown_option_lists_known_options(key: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse({key: "x"})
    message = str(caught.value)
    assert f"unknown bridge option {key!r}" in message
    assert "known options: bridge.name, mtu, masquerade, icc, gateway, hairpin" in message


# mtu --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mtu", [68, 576, 1280, 1500, 9000, 65535])
def test_mtu_in_range(mtu: int) -> None:
    assert parse({"mtu": str(mtu)}).mtu == mtu


@pytest.mark.parametrize("mtu", ["67", "0", "-1500", "65536", "100000"])
def test_mtu_out_of_range(mtu: str) -> None:
    with pytest.raises(InvalidArgument, match=r"out of range; use 68\.\.65535"):
        parse({"mtu": mtu})


@pytest.mark.parametrize("mtu", ["abc", "", "1500.0", "0x5dc", "15 00"])
def test_mtu_not_a_number(mtu: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse({"mtu": mtu})
    assert str(caught.value) == f"option mtu={mtu!r} is not a number"


# booleans ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("TRUE", True),
        (" On ", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("off", False),
        ("False", False),
    ],
)
@pytest.mark.parametrize("key", ["masquerade", "icc"])
def test_bool_parsing(key: str, text: str, value: bool) -> None:
    assert getattr(parse({key: text}), key) is value


@pytest.mark.parametrize("text", ["", "maybe", "2", "enabled", "y"])
@pytest.mark.parametrize("key", ["masquerade", "icc"])
def test_bad_bool(key: str, text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse({key: text})
    assert str(caught.value) == f"option {key}={text!r} must be true or false"


# bridge name ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["b", "br0", "a" * 15, "br-web_1.0", "BR.X-y_z"])
def test_bridge_name_accepted(name: str) -> None:
    assert parse({"bridge.name": name}).bridge_name == name


@pytest.mark.parametrize(
    ("name", "length"),
    [("a" * 16, 16), ("mybridge-for-web", 16), ("é" * 8, 16), ("a" * 40, 40)],
)
def test_bridge_name_too_long(name: str, length: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse({"bridge.name": name})
    message = str(caught.value)
    assert f"bridge.name {name!r} is {length} bytes" in message
    assert "at most 15 bytes" in message


@pytest.mark.parametrize("name", ["br 0", "br/0", "br:0", "br@0", ".", "..", "brü", "br\t"])
def test_bridge_name_bad_characters(name: str) -> None:
    with pytest.raises(InvalidArgument, match="not a valid interface name"):
        parse({"bridge.name": name})


def test_validate_ifname_names_what() -> None:
    with pytest.raises(InvalidArgument, match=r"^veth name ''"):
        validate_ifname("", "veth name")
    assert validate_ifname("eth0", "veth name") == "eth0"


# round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"bridge.name": "br-x", "mtu": "9000", "masquerade": "off", "icc": "0"},
        {"com.docker.network.bridge.enable_icc": "false"},
    ],
)
def test_to_dict_round_trip(raw: dict[str, str]) -> None:
    options = parse(raw)
    stored = options.to_dict()
    assert set(stored) == {"bridge.name", "mtu", "masquerade", "icc", "gateway", "hairpin"}
    assert all(isinstance(v, str) for v in stored.values())
    assert parse(stored) == options
    assert parse(stored).to_dict() == stored


def test_to_dict_normalises() -> None:
    raw = {"com.docker.network.driver.mtu": "1400", "masquerade": "No", "icc": "YES"}
    assert parse(raw).to_dict() == {
        "bridge.name": "nsbr0123456789a",
        "mtu": "1400",
        "masquerade": "false",
        "icc": "true",
        "gateway": "true",
        "hairpin": "true",
    }


def test_gateway_and_hairpin_default_on_and_can_be_turned_off() -> None:
    assert parse({}).gateway and parse({}).hairpin
    options = parse({"gateway": "false", "hairpin": "off"})
    assert (options.gateway, options.hairpin) == (False, False)
    with pytest.raises(InvalidArgument, match="option hairpin='sometimes' must be true or false"):
        parse({"hairpin": "sometimes"})


# driver helpers ---------------------------------------------------------------------------


def test_veth_names_fit_ifnamsiz_and_carry_prefix() -> None:
    name = host_veth_name(NETWORK_ID)
    assert name == "nsv0123456789ab"
    assert len(name.encode()) == 15
    validate_ifname(name, "veth")


def test_bridge_mac_is_stable_unicast_locally_administered() -> None:
    mac = bridge_mac(NETWORK_ID)
    assert MAC.match(mac)
    first = int(mac[:2], 16)
    assert first & 0x01 == 0
    assert first & 0x02 == 0x02
    assert bridge_mac(NETWORK_ID) == mac
    assert bridge_mac("f" * 64) != mac


def test_facts_of_and_ip_interface() -> None:
    network = Network(
        id=NETWORK_ID,
        name="web",
        driver="bridge",
        pools=[
            PoolConfig(ipaddress.ip_network("10.20.0.0/24"), ipaddress.ip_address("10.20.0.1")),
            PoolConfig(ipaddress.ip_network("fd00:1::/64"), ipaddress.ip_address("fd00:1::1")),
        ],
        internal=True,
    )
    facts = facts_of(network, parse({"masquerade": "false"}))
    assert facts.bridge == "nsbr0123456789a"
    assert [str(s) for s in facts.subnets] == ["10.20.0.0/24", "fd00:1::/64"]
    assert facts.internal is True
    assert facts.masquerade is False
    assert ip_interface(ipaddress.ip_address("10.20.0.1"), 24) == ipaddress.ip_interface(
        "10.20.0.1/24"
    )


# product bugs (documented, strict: they fail loudly once fixed) ---------------------------


def test_bridge_name_with_trailing_newline_rejected() -> None:
    with pytest.raises(InvalidArgument):
        parse({"bridge.name": "br0\n"})
