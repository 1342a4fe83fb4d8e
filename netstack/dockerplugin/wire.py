"""The Docker plugin protocol's wire format: request shapes in, response documents out.

Docker's engine (libnetwork's remote driver and remote IPAM) POSTs one JSON object per call
to ``/<Interface>.<Method>`` and reads one JSON object back. Field names are the protocol's
own (``NetworkID``, ``IPv4Data``, ``PoolID``...). Parsing is strict about what netstack uses
(types, addresses, required fields) and ignores fields it does not use, as Docker's own
decoder does; every problem is an InvalidArgument that names the field.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

from netstack.errors import InvalidArgument
from netstack.model import IPAddress, IPInterface, IPNetwork, PortBinding

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
MAX_BODY = 1 << 20  # Docker's largest requests (CreateNetwork with options) are a few KiB

# Option keys libnetwork puts in CreateNetwork's and ProgramExternalConnectivity's Options.
GENERIC = "com.docker.network.generic"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
INTERNAL = "com.docker.network.internal"
PORT_MAP = "com.docker.network.portmap"
MAC_ADDRESS = "com.docker.network.endpoint.macaddress"
GATEWAY_REQUEST = "com.docker.network.gateway"  # RequestAddress Options RequestAddressType
REQUEST_ADDRESS_TYPE = "RequestAddressType"

# IANA protocol numbers, as libnetwork's types.Protocol encodes them.
PROTOCOL_NUMBERS = {6: "tcp", 17: "udp", 132: "sctp"}
PROTOCOL_OF_NAME = {name: number for number, name in PROTOCOL_NUMBERS.items()}

Document = dict[str, Any]


def decode(body: bytes) -> Document:
    """The request body as a JSON object; an empty body or ``null`` (Docker sends that
    for calls without arguments) is ``{}``."""
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"request body is not JSON: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise InvalidArgument(f"request body must be a JSON object, not {type(document).__name__}")
    return document


def encode(document: Document) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- field readers


def _text(doc: Document, key: str, required: bool = True) -> str:
    value = doc.get(key)
    if value is None or value == "":
        if required:
            raise InvalidArgument(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"field {key!r} must be a string, not {type(value).__name__}")
    return value


def _object(doc: Document, key: str) -> Document:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"field {key!r} must be an object, not {type(value).__name__}")
    return value


def _list(doc: Document, key: str) -> list[Any]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"field {key!r} must be a list, not {type(value).__name__}")
    return value


def _flag(doc: Document, key: str) -> bool:
    """A boolean option; libnetwork sends JSON booleans, people may send strings."""
    value = doc.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", ""):
        return value.lower() in ("true", "1")
    raise InvalidArgument(f"option {key!r} must be true or false, not {value!r}")


def _integer(doc: Document, key: str) -> int:
    value = doc.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"field {key!r} must be an integer, not {value!r}")
    return value


_HEX_ID = re.compile(r"[0-9a-f]{64}")


def _id(doc: Document, key: str) -> str:
    value = _text(doc, key)
    if _HEX_ID.fullmatch(value) is None:
        raise InvalidArgument(f"field {key!r} must be a 64 hex digit id, not {value!r}")
    return value


def _interface(text: str, key: str) -> IPInterface:
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise InvalidArgument(f"field {key!r}: {text!r} is not an address/prefix") from None


def _network(text: str, key: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        raise InvalidArgument(f"field {key!r}: {text!r} is not a CIDR subnet") from None


def _address(text: str, key: str) -> IPAddress:
    """An address, with or without a /prefix (Docker sends both forms)."""
    try:
        return ipaddress.ip_interface(text).ip
    except ValueError:
        raise InvalidArgument(f"field {key!r}: {text!r} is not an IP address") from None


# --------------------------------------------------------------------------- NetworkDriver


@dataclass(frozen=True)
class IpamData:
    """One pool of a network as Docker's IPAM gave it (IPv4Data/IPv6Data items)."""

    pool: IPNetwork
    gateway: IPAddress | None
    aux_addresses: dict[str, IPAddress] = field(default_factory=dict)

    @classmethod
    def parse(cls, doc: Any, key: str) -> IpamData:
        if not isinstance(doc, dict):
            raise InvalidArgument(f"items of {key!r} must be objects")
        pool = _network(_text(doc, "Pool"), f"{key}.Pool")
        gateway_text = _text(doc, "Gateway", required=False)
        gateway = _address(gateway_text, f"{key}.Gateway") if gateway_text else None
        aux: dict[str, IPAddress] = {}
        for name, value in _object(doc, "AuxAddresses").items():
            if not isinstance(value, str):
                raise InvalidArgument(f"{key}.AuxAddresses[{name!r}] must be a string")
            aux[name] = _address(value, f"{key}.AuxAddresses[{name!r}]")
        return cls(pool, gateway, aux)


@dataclass(frozen=True)
class CreateNetwork:
    network_id: str
    generic: dict[str, str]  # `docker network create -o KEY=VALUE`
    enable_ipv6: bool
    internal: bool
    ipv4: list[IpamData]
    ipv6: list[IpamData]

    @classmethod
    def parse(cls, doc: Document) -> CreateNetwork:
        options = _object(doc, "Options")
        generic = _object(options, GENERIC)
        for key, value in generic.items():
            if not isinstance(value, str):
                raise InvalidArgument(f"option {key!r} must be a string, not {value!r}")
        return cls(
            network_id=_id(doc, "NetworkID"),
            generic=dict(generic),
            enable_ipv6=_flag(options, ENABLE_IPV6),
            internal=_flag(options, INTERNAL),
            ipv4=[IpamData.parse(item, "IPv4Data") for item in _list(doc, "IPv4Data")],
            ipv6=[IpamData.parse(item, "IPv6Data") for item in _list(doc, "IPv6Data")],
        )


@dataclass(frozen=True)
class NetworkRef:
    network_id: str

    @classmethod
    def parse(cls, doc: Document) -> NetworkRef:
        return cls(_id(doc, "NetworkID"))


@dataclass(frozen=True)
class EndpointRef:
    network_id: str
    endpoint_id: str

    @classmethod
    def parse(cls, doc: Document) -> EndpointRef:
        return cls(_id(doc, "NetworkID"), _id(doc, "EndpointID"))


@dataclass(frozen=True)
class CreateEndpoint:
    network_id: str
    endpoint_id: str
    address: IPInterface | None
    address_ipv6: IPInterface | None
    mac: str | None

    @classmethod
    def parse(cls, doc: Document) -> CreateEndpoint:
        interface = _object(doc, "Interface")
        v4 = _text(interface, "Address", required=False)
        v6 = _text(interface, "AddressIPv6", required=False)
        address = _interface(v4, "Interface.Address") if v4 else None
        address_ipv6 = _interface(v6, "Interface.AddressIPv6") if v6 else None
        if address is not None and address.version != 4:
            raise InvalidArgument(f"Interface.Address {v4!r} is not an IPv4 address")
        if address_ipv6 is not None and address_ipv6.version != 6:
            raise InvalidArgument(f"Interface.AddressIPv6 {v6!r} is not an IPv6 address")
        mac = _text(interface, "MacAddress", required=False) or None
        return cls(
            network_id=_id(doc, "NetworkID"),
            endpoint_id=_id(doc, "EndpointID"),
            address=address,
            address_ipv6=address_ipv6,
            mac=mac,
        )


@dataclass(frozen=True)
class Join:
    network_id: str
    endpoint_id: str
    sandbox_key: str

    @classmethod
    def parse(cls, doc: Document) -> Join:
        key = _text(doc, "SandboxKey")
        if not key.startswith("/"):
            raise InvalidArgument(f"SandboxKey {key!r} must be an absolute path")
        return cls(_id(doc, "NetworkID"), _id(doc, "EndpointID"), key)


@dataclass(frozen=True)
class PortMapping:
    """One libnetwork PortBinding: ``{"Proto": 6, "IP": "", "Port": 80, "HostIP": "",
    "HostPort": 8080, "HostPortEnd": 8080}``; HostPort 0 means any free port."""

    protocol: str
    port: int
    host_ip: str
    host_port: int
    host_port_end: int

    @classmethod
    def parse(cls, doc: Any) -> PortMapping:
        if not isinstance(doc, dict):
            raise InvalidArgument(f"items of {PORT_MAP!r} must be objects")
        number = _integer(doc, "Proto")
        if number not in PROTOCOL_NUMBERS:
            raise InvalidArgument(
                f"{PORT_MAP} Proto {number} is not supported: use 6 (tcp), 17 (udp) or 132 (sctp)"
            )
        host_ip = _text(doc, "HostIP", required=False)
        if host_ip:
            host_ip = str(_address(host_ip, "HostIP"))
        return cls(
            protocol=PROTOCOL_NUMBERS[number],
            port=_integer(doc, "Port"),
            host_ip=host_ip,
            host_port=_integer(doc, "HostPort"),
            host_port_end=_integer(doc, "HostPortEnd"),
        )

    def spec(self) -> str:
        """The same mapping as a `-p` spec (netstack's port syntax)."""
        host_ports = ""
        if self.host_port:
            host_ports = str(self.host_port)
            if self.host_port_end > self.host_port:
                host_ports += f"-{self.host_port_end}"
        host = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        if host:
            return f"{host}:{host_ports}:{self.port}/{self.protocol}"
        if host_ports:
            return f"{host_ports}:{self.port}/{self.protocol}"
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True)
class ProgramExternalConnectivity:
    network_id: str
    endpoint_id: str
    port_mappings: list[PortMapping]

    @classmethod
    def parse(cls, doc: Document) -> ProgramExternalConnectivity:
        options = _object(doc, "Options")
        return cls(
            network_id=_id(doc, "NetworkID"),
            endpoint_id=_id(doc, "EndpointID"),
            port_mappings=[PortMapping.parse(item) for item in _list(options, PORT_MAP)],
        )


def port_binding_document(binding: PortBinding, container_ip: str) -> Document:
    """A published port in libnetwork's PortBinding shape (EndpointOperInfo)."""
    return {
        "Proto": PROTOCOL_OF_NAME[binding.protocol],
        "IP": container_ip,
        "Port": binding.container_port,
        "HostIP": binding.host_ip,
        "HostPort": binding.host_port,
        "HostPortEnd": binding.host_port,
    }


# --------------------------------------------------------------------------- IpamDriver


@dataclass(frozen=True)
class RequestPool:
    address_space: str
    pool: IPNetwork | None
    sub_pool: IPNetwork | None
    v6: bool

    @classmethod
    def parse(cls, doc: Document) -> RequestPool:
        pool_text = _text(doc, "Pool", required=False)
        sub_text = _text(doc, "SubPool", required=False)
        v6 = doc.get("V6", False)
        if not isinstance(v6, bool):
            raise InvalidArgument(f"field 'V6' must be true or false, not {v6!r}")
        pool = _network(pool_text, "Pool") if pool_text else None
        sub_pool = _network(sub_text, "SubPool") if sub_text else None
        if sub_pool is not None and pool is None:
            raise InvalidArgument("SubPool (--ip-range) needs a Pool (--subnet)")
        if pool is not None and pool.version != (6 if v6 else 4):
            raise InvalidArgument(f"Pool {pool} is IPv{pool.version} but V6 is {str(v6).lower()}")
        return cls(_text(doc, "AddressSpace", required=False), pool, sub_pool, v6)


@dataclass(frozen=True)
class RequestAddress:
    pool_id: str
    address: IPAddress | None
    gateway: bool  # Docker asks for the network's gateway

    @classmethod
    def parse(cls, doc: Document) -> RequestAddress:
        text = _text(doc, "Address", required=False)
        options = _object(doc, "Options")
        return cls(
            pool_id=_text(doc, "PoolID"),
            address=_address(text, "Address") if text else None,
            gateway=options.get(REQUEST_ADDRESS_TYPE) == GATEWAY_REQUEST,
        )


@dataclass(frozen=True)
class ReleaseAddress:
    pool_id: str
    address: IPAddress

    @classmethod
    def parse(cls, doc: Document) -> ReleaseAddress:
        return cls(_text(doc, "PoolID"), _address(_text(doc, "Address"), "Address"))


@dataclass(frozen=True)
class ReleasePool:
    pool_id: str

    @classmethod
    def parse(cls, doc: Document) -> ReleasePool:
        return cls(_text(doc, "PoolID"))
