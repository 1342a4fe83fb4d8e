"""The Docker plugin wire format: request parsing with clear errors, port specs, replies."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from netstack.dockerplugin import wire
from netstack.errors import InvalidArgument
from netstack.model import PortBinding

NID = "a" * 64
EID = "b" * 64


def test_decode_accepts_objects_empty_and_null() -> None:
    assert wire.decode(b'{"A": 1}') == {"A": 1}
    assert wire.decode(b"") == {}
    assert wire.decode(b"null") == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "request body is not JSON"),
        (b"\xff\xfe", "request body is not JSON"),
        (b"[1, 2]", "must be a JSON object, not list"),
        (b'"text"', "must be a JSON object, not str"),
    ],
)
def test_decode_rejects(body: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        wire.decode(body)


def test_create_network_as_docker_sends_it() -> None:
    request = wire.CreateNetwork.parse(
        {
            "NetworkID": NID,
            "Options": {
                "com.docker.network.enable_ipv6": True,
                "com.docker.network.internal": True,
                "com.docker.network.generic": {"mtu": "1400", "icc": "false"},
            },
            "IPv4Data": [
                {
                    "AddressSpace": "netstack-local",
                    "Gateway": "172.18.0.1/16",
                    "Pool": "172.18.0.0/16",
                    "AuxAddresses": {"router": "172.18.0.5/16"},
                }
            ],
            "IPv6Data": [{"Pool": "fd00:1::/64", "Gateway": "fd00:1::1/64"}],
        }
    )
    assert request.network_id == NID
    assert request.generic == {"mtu": "1400", "icc": "false"}
    assert request.enable_ipv6 and request.internal
    (v4,) = request.ipv4
    assert v4.pool == ipaddress.ip_network("172.18.0.0/16")
    assert v4.gateway == ipaddress.ip_address("172.18.0.1")
    assert v4.aux_addresses == {"router": ipaddress.ip_address("172.18.0.5")}
    assert request.ipv6[0].gateway == ipaddress.ip_address("fd00:1::1")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "missing field 'NetworkID'"),
        ({"NetworkID": 5}, "'NetworkID' must be a string, not int"),
        ({"NetworkID": "abc"}, "must be a 64 hex digit id"),
        ({"NetworkID": NID, "Options": []}, "'Options' must be an object, not list"),
        ({"NetworkID": NID, "IPv4Data": {}}, "'IPv4Data' must be a list"),
        ({"NetworkID": NID, "IPv4Data": [{"Pool": "10.0.0.0/33"}]}, "not a CIDR"),
        ({"NetworkID": NID, "IPv4Data": [{}]}, "missing field 'Pool'"),
        ({"NetworkID": NID, "IPv4Data": [7]}, "items of 'IPv4Data' must be objects"),
        (
            {"NetworkID": NID, "Options": {"com.docker.network.generic": {"mtu": 1400}}},
            "option 'mtu' must be a string",
        ),
        (
            {"NetworkID": NID, "Options": {"com.docker.network.enable_ipv6": "maybe"}},
            "must be true or false",
        ),
    ],
)
def test_create_network_errors_name_the_field(document: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        wire.CreateNetwork.parse(document)


def test_create_endpoint() -> None:
    request = wire.CreateEndpoint.parse(
        {
            "NetworkID": NID,
            "EndpointID": EID,
            "Interface": {"Address": "172.18.0.2/16", "AddressIPv6": "", "MacAddress": ""},
            "Options": {"com.docker.network.portmap": []},
        }
    )
    assert request.address == ipaddress.ip_interface("172.18.0.2/16")
    assert request.address_ipv6 is None and request.mac is None
    bare = wire.CreateEndpoint.parse({"NetworkID": NID, "EndpointID": EID})
    assert bare.address is None
    with pytest.raises(InvalidArgument, match="is not an IPv4 address"):
        wire.CreateEndpoint.parse(
            {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": "fd00::2/64"}}
        )


def test_join_needs_an_absolute_sandbox_key() -> None:
    request = wire.Join.parse(
        {"NetworkID": NID, "EndpointID": EID, "SandboxKey": "/var/run/docker/netns/abc"}
    )
    assert request.sandbox_key == "/var/run/docker/netns/abc"
    with pytest.raises(InvalidArgument, match="missing field 'SandboxKey'"):
        wire.Join.parse({"NetworkID": NID, "EndpointID": EID})
    with pytest.raises(InvalidArgument, match="absolute path"):
        wire.Join.parse({"NetworkID": NID, "EndpointID": EID, "SandboxKey": "netns/abc"})


@pytest.mark.parametrize(
    ("binding", "spec"),
    [
        ({"Proto": 6, "Port": 80, "HostPort": 8080, "HostPortEnd": 8080}, "8080:80/tcp"),
        ({"Proto": 17, "Port": 53, "HostPort": 0, "HostPortEnd": 0}, "53/udp"),
        ({"Proto": 132, "Port": 9, "HostPort": 9000, "HostPortEnd": 9010}, "9000-9010:9/sctp"),
        ({"Proto": 6, "Port": 80, "HostIP": "0.0.0.0", "HostPort": 8080}, "0.0.0.0:8080:80/tcp"),
        ({"Proto": 6, "Port": 80, "HostIP": "::1", "HostPort": 8080}, "[::1]:8080:80/tcp"),
        ({"Proto": 6, "Port": 80, "HostIP": "127.0.0.1"}, "127.0.0.1::80/tcp"),
    ],
)
def test_port_mappings_become_publish_specs(binding: dict[str, Any], spec: str) -> None:
    assert wire.PortMapping.parse(binding).spec() == spec


def test_program_external_connectivity_reads_the_portmap() -> None:
    request = wire.ProgramExternalConnectivity.parse(
        {
            "NetworkID": NID,
            "EndpointID": EID,
            "Options": {
                "com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 80}],
                "com.docker.network.portmap": [
                    {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080}
                ],
            },
        }
    )
    assert [m.spec() for m in request.port_mappings] == ["8080:80/tcp"]
    with pytest.raises(InvalidArgument, match="Proto 1 is not supported"):
        wire.PortMapping.parse({"Proto": 1, "Port": 80})
    with pytest.raises(InvalidArgument, match="'Port' must be an integer"):
        wire.PortMapping.parse({"Proto": 6, "Port": "80"})


def test_port_binding_document_is_libnetworks_shape() -> None:
    binding = PortBinding("udp", "", 5353, 53)
    assert wire.port_binding_document(binding, "10.0.0.2") == {
        "Proto": 17,
        "IP": "10.0.0.2",
        "Port": 53,
        "HostIP": "",
        "HostPort": 5353,
        "HostPortEnd": 5353,
    }


def test_ipam_requests() -> None:
    pool = wire.RequestPool.parse(
        {"AddressSpace": "netstack-local", "Pool": "10.9.0.0/24", "SubPool": "10.9.0.128/25",
         "Options": {}, "V6": False}
    )  # fmt: skip
    assert pool.pool == ipaddress.ip_network("10.9.0.0/24")
    assert pool.sub_pool == ipaddress.ip_network("10.9.0.128/25")
    default = wire.RequestPool.parse({"AddressSpace": "x", "Pool": "", "V6": True})
    assert default.pool is None and default.v6
    gateway = wire.RequestAddress.parse(
        {"PoolID": "netstack/10.9.0.0/24", "Address": "",
         "Options": {"RequestAddressType": "com.docker.network.gateway"}}
    )  # fmt: skip
    assert gateway.gateway and gateway.address is None
    plain = wire.RequestAddress.parse({"PoolID": "p", "Address": "10.9.0.7", "Options": None})
    assert not plain.gateway and plain.address == ipaddress.ip_address("10.9.0.7")
    release = wire.ReleaseAddress.parse({"PoolID": "p", "Address": "10.9.0.7"})
    assert release.address == ipaddress.ip_address("10.9.0.7")


@pytest.mark.parametrize(
    ("parse", "document", "message"),
    [
        (wire.RequestPool.parse, {"Pool": "10.0.0.0/24", "V6": True}, "is IPv4 but V6 is true"),
        (wire.RequestPool.parse, {"V6": "yes"}, "'V6' must be true or false"),
        (wire.RequestPool.parse, {"SubPool": "10.0.0.0/25"}, "SubPool .* needs a Pool"),
        (wire.RequestPool.parse, {"Pool": "10.0.0.1/24"}, "not a CIDR subnet"),
        (wire.RequestAddress.parse, {"Address": "10.0.0.1"}, "missing field 'PoolID'"),
        (wire.RequestAddress.parse, {"PoolID": "p", "Address": "x"}, "not an IP address"),
        (wire.ReleaseAddress.parse, {"PoolID": "p"}, "missing field 'Address'"),
        (wire.ReleasePool.parse, {"PoolID": ["p"]}, "'PoolID' must be a string"),
    ],
)
def test_ipam_request_errors(parse: Any, document: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse(document)
