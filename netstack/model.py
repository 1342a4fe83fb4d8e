"""The CNM model: networks, endpoints and sandboxes, as plain dataclasses."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
EndpointRow = tuple[str, str, str, str | None, str | None, str]
"""An endpoint as its DNS names need it, as the store holds it: (id, network id, sandbox,
IPv4 interface text, IPv6 interface text, aliases as a JSON list)."""
RelayStoreRow = tuple[str, str, str, int, int, str | None, str | None]
"""A published port as `Store.relay_rows` reads it: (endpoint id, protocol, host IP, host
port, container port, the endpoint's IPv4 and IPv6 interface text)."""


@dataclass(frozen=True)
class PoolConfig:
    """One address pool of a network (one subnet, IPv4 or IPv6)."""

    subnet: IPNetwork
    gateway: IPAddress | None = None
    ip_range: IPNetwork | None = None
    aux_addresses: dict[str, IPAddress] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.subnet.version


@dataclass
class Network:
    """A named L2/L3 domain built by one driver."""

    id: str
    name: str
    driver: str
    pools: list[PoolConfig]
    options: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    internal: bool = False
    enable_ipv6: bool = False
    scope: str = "local"
    created: str = ""

    def pool(self, version: int) -> PoolConfig | None:
        """The first pool of the given IP version, if any."""
        return next((p for p in self.pools if p.version == version), None)


@dataclass(frozen=True)
class PortBinding:
    """One published port: host_ip:host_port/protocol -> the endpoint's container_port.

    `host_ip` is "" for every host address (IPv4 and IPv6), "0.0.0.0" or "::" for every
    address of one family, or one specific host address.
    """

    protocol: str
    host_ip: str
    host_port: int
    container_port: int

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions this binding answers on."""
        if self.host_ip == "":
            return (4, 6)
        return (6,) if ":" in self.host_ip else (4,)

    def __str__(self) -> str:
        host = self.host_ip or "*"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.host_port}->{self.container_port}/{self.protocol}"


@dataclass
class Endpoint:
    """One interface of one sandbox on one network."""

    id: str
    network_id: str
    sandbox: str
    interface: str = ""
    mac: str = ""
    ipv4: ipaddress.IPv4Interface | None = None
    ipv6: ipaddress.IPv6Interface | None = None
    aliases: list[str] = field(default_factory=list)
    created: str = ""
    ports: list[PortBinding] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.sandbox

    def interfaces(self) -> list[IPInterface]:
        """The endpoint's addresses with their prefix length, IPv4 first."""
        return [a for a in (self.ipv4, self.ipv6) if a is not None]


@dataclass
class Sandbox:
    """An isolated network stack: a network namespace, named (``netctl sandbox create``)
    or given by path (a CNI runtime's container, ``external``: netstack did not make it and
    never deletes it)."""

    name: str
    path: str
    created: str = ""

    @property
    def external(self) -> bool:
        return self.path != f"/run/netns/{self.name}"


@dataclass(frozen=True)
class Route:
    """A route to install in a sandbox; `gateway` None means the network's gateway."""

    destination: IPNetwork
    gateway: IPAddress | None = None


@dataclass(frozen=True)
class JoinOptions:
    """How an endpoint joins its sandbox, when the caller (CNI) decides instead of netstack.

    `ifname`: the interface name in the sandbox (default: the lowest free ethN).
    `routes`: exactly these routes (default, None: a default route per family via the
    network's gateway, if the sandbox has none yet; Docker's behaviour).
    `peer_in_host`: the caller moves the interface into the sandbox itself and configures
    it (Docker's engine does): both ends stay in the host namespace, the sandbox end
    unaddressed and down; join returns its name there. `ifname` and `routes` are ignored.
    `prepared`: with `peer_in_host`, the name of the peer of a pair the caller made already
    in this process (Controller.prepare_join) that nothing has touched since: join only
    names it.
    """

    ifname: str | None = None
    routes: tuple[Route, ...] | None = None
    peer_in_host: bool = False
    prepared: str | None = None
