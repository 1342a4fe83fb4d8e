"""The controller: the one place that composes store, IPAM, drivers and namespaces.

create network = validate -> IPAM pools -> store -> driver.create_network
connect        = IPAM address + endpoint row -> driver.create_endpoint -> driver.join -> store
Each step registers its undo on an ExitStack; any failure unwinds all of them. Teardown is
best effort: every step is tried, failures are collected and reported together.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from netstack import faults, network_options, ports
from netstack.drivers.api import NetworkDriver
from netstack.errors import Conflict, InUse, InvalidArgument, KernelError, NetstackError, NotFound
from netstack.ipam import AddressAllocator, choose_default_pool, default_ipv6_pool, make_pool_spec
from netstack.ipam.allocator import PENDING
from netstack.ipam.pools import parse_address, parse_network
from netstack.kernel import links, netns, sockets
from netstack.model import Endpoint, IPAddress, IPNetwork, JoinOptions, Network, PoolConfig, Sandbox
from netstack.names import validate_ifname
from netstack.resolvconf import sandbox_resolv_conf
from netstack.store import Store, now

log = logging.getLogger(__name__)

# 63: a name is also a DNS label (sandbox names and aliases are resolvable).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_ID = re.compile(r"^[0-9a-f]{64}$")


def validate_name(name: str, what: str) -> str:
    """Names: 1-63 characters, starting alphanumeric, then letters, digits, '_', '.', '-'."""
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use 1-63 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def parse_key_values(items: Sequence[str], what: str) -> dict[str, str]:
    """['k=v', ...] -> {'k': 'v'}; raise InvalidArgument for an item without '='."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"invalid {what} {item!r}: expected KEY=VALUE")
        result[key] = value
    return result


def random_mac() -> str:
    """A random unicast, locally administered MAC address."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


@dataclass
class NetworkRequest:
    """What `network create` asks for, as the user typed it."""

    name: str
    driver: str = "bridge"
    subnets: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    ip_ranges: list[str] = field(default_factory=list)
    aux_addresses: list[str] = field(default_factory=list)
    ipv6: bool = False
    internal: bool = False
    options: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    id: str | None = None  # the caller's id for the network (Docker's); default: a new one
    claim_pools: bool = False  # take over pending pools of these subnets (IPAM asked ahead)


@dataclass
class ConnectRequest:
    """What `network connect` asks for."""

    ip: str | None = None
    ip6: str | None = None
    aliases: list[str] = field(default_factory=list)
    mac: str | None = None
    ports: list[str] = field(default_factory=list)
    join: JoinOptions | None = None  # interface name and routes, when the caller decides


@dataclass(frozen=True)
class _PoolRequest:
    subnet: IPNetwork
    gateway: IPAddress | None = None
    ip_range: IPNetwork | None = None
    aux: dict[str, IPAddress] = field(default_factory=dict)


def _containing(value: IPAddress | IPNetwork, subnets: list[IPNetwork], label: str) -> IPNetwork:
    """The --subnet that contains `value`; InvalidArgument naming `label` if none does."""
    for subnet in subnets:
        if value.version != subnet.version:
            continue
        if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            if value.subnet_of(subnet):  # type: ignore[arg-type]
                return subnet
        elif value in subnet:
            return subnet
    given = ", ".join(map(str, subnets)) or "none given"
    raise InvalidArgument(
        f"{label} is outside every --subnet ({given}); choose one inside a subnet"
    )


def _one_per_subnet(
    values: list[IPAddress] | list[IPNetwork], subnets: list[IPNetwork], what: str
) -> dict[IPNetwork, Any]:
    """Map each value to its subnet; at most one value per subnet."""
    result: dict[IPNetwork, Any] = {}
    for value in values:
        subnet = _containing(value, subnets, f"{what} {value}")
        if subnet in result:
            raise InvalidArgument(f"more than one --{what} for subnet {subnet}")
        result[subnet] = value
    return result


def pool_requests(request: NetworkRequest) -> list[_PoolRequest]:
    """Pair --gateway, --ip-range and --aux-address with the --subnet that contains each."""
    subnets = [parse_network(s, "subnet") for s in request.subnets]
    for version in (4, 6):
        if sum(1 for s in subnets if s.version == version) > 1:
            raise InvalidArgument(f"only one IPv{version} --subnet per network is supported")
    gateways = _one_per_subnet(
        [parse_address(text, "gateway") for text in request.gateways], subnets, "gateway"
    )
    ranges = _one_per_subnet(
        [parse_network(text, "ip-range") for text in request.ip_ranges], subnets, "ip-range"
    )
    aux: dict[IPNetwork, dict[str, IPAddress]] = {s: {} for s in subnets}
    for name, text in parse_key_values(request.aux_addresses, "aux-address").items():
        address = parse_address(text, f"aux-address {name}")
        aux[_containing(address, subnets, f"aux-address {name}={address}")][name] = address
    return [_PoolRequest(s, gateways.get(s), ranges.get(s), aux[s]) for s in subnets]


class Controller:
    """Networks, endpoints and sandboxes, built from the store, IPAM and drivers."""

    def __init__(
        self,
        store: Store,
        drivers: Mapping[str, NetworkDriver],
        host_routes: Callable[[], list[IPNetwork]] = links.host_routes,
        on_change: Callable[[], None] | None = None,
        busy_on_host: Callable[[str, Sequence[int] | None], set[int]] = sockets.bound_ports,
    ) -> None:
        self.store = store
        self.drivers = dict(drivers)
        self._host_routes = host_routes
        self._on_change = on_change
        self._busy_on_host = busy_on_host  # host ports taken by processes (`ports.assign`)

    def _changed(self) -> None:
        """Tell whoever follows the store (netstackd) that it changed, before returning.

        netstackd also notices on its own within 20 ms; this makes a disconnect's released
        [::1] relay port and a connect's DNS name effective before the call returns.
        """
        if self._on_change is not None:
            self._on_change()

    def host_routes(self) -> list[IPNetwork]:
        """Destinations routed in the host namespace (default pools avoid them)."""
        return self._host_routes()

    # lookups --------------------------------------------------------------------------------
    def network(self, name_or_id: str) -> Network:
        network = self.store.find_network(name_or_id)
        if network is None:
            raise NotFound(
                f"network {name_or_id!r} not found; list networks with `netctl network ls`"
            )
        return network

    def sandbox(self, name: str) -> Sandbox:
        sandbox = self.store.find_sandbox(name)
        if sandbox is None:
            raise NotFound(
                f"sandbox {name!r} not found; create it with `netctl sandbox create {name}`"
            )
        return sandbox

    def driver(self, name: str) -> NetworkDriver:
        try:
            return self.drivers[name]
        except KeyError:
            raise InvalidArgument(
                f"unknown driver {name!r}; available drivers: {', '.join(sorted(self.drivers))}"
            ) from None

    # networks -------------------------------------------------------------------------------
    def create_network(self, request: NetworkRequest) -> Network:
        """Validate, reserve pools, build the dataplane. All or nothing."""
        validate_name(request.name, "network")
        driver = self.driver(request.driver)
        network_id = request.id or secrets.token_hex(32)
        if not _ID.fullmatch(network_id):
            raise InvalidArgument(f"invalid network id {network_id!r}: give 64 hex digits")
        if self.store.find_network(network_id) is not None:
            raise Conflict(f"network id {network_id[:12]} already exists")
        own, driver_keys = network_options.split(request.options)
        options = {
            **driver.validate_options(driver_keys, network_id),
            **network_options.validate(own),
        }
        requested = pool_requests(request)
        enable_ipv6 = request.ipv6 or any(p.subnet.version == 6 for p in requested)
        with ExitStack() as undo:
            with self.store.transaction() as conn:
                network = self._reserve_network(
                    conn, request, network_id, requested, options, enable_ipv6
                )
            undo.callback(self._forget_network, network.id)
            driver.create_network(network)
            undo.callback(driver.delete_network, network)
            faults.checkpoint("network-create:before-store")
            undo.pop_all()
        self._changed()
        log.info("network=%s name=%s created", network.id[:12], network.name)
        return network

    def _reserve_network(
        self,
        conn: sqlite3.Connection,
        request: NetworkRequest,
        network_id: str,
        requested: list[_PoolRequest],
        options: dict[str, str],
        enable_ipv6: bool,
    ) -> Network:
        """Inside one write transaction: name and subnet checks, pools, the network row."""
        if self.store.network_named(request.name) is not None:
            raise Conflict(
                f"network {request.name!r} already exists; choose another name "
                "or remove it first (netctl network rm)"
            )
        bridge = options.get("bridge.name")
        for other in self.store.networks():
            if bridge and other.options.get("bridge.name") == bridge:
                raise Conflict(
                    f"bridge {bridge!r} is used by network {other.name!r}; "
                    "choose another bridge.name"
                )
        allocator = AddressAllocator(conn)
        if not any(p.subnet.version == 4 for p in requested):
            in_use = allocator.subnets_in_use() + self._host_routes()
            requested.insert(0, _PoolRequest(choose_default_pool(in_use)))
        if enable_ipv6 and not any(p.subnet.version == 6 for p in requested):
            requested.append(
                _PoolRequest(default_ipv6_pool(network_id, allocator.subnets_in_use()))
            )
        network = Network(
            id=network_id,
            name=request.name,
            driver=request.driver,
            pools=[],
            options=options,
            labels=dict(request.labels),
            internal=request.internal,
            enable_ipv6=enable_ipv6,
            created=now(),
        )
        specs = []
        for pool in requested:
            spec = make_pool_spec(pool.subnet, pool.gateway, pool.ip_range, pool.aux)
            network.pools.append(
                PoolConfig(spec.subnet, spec.gateway, spec.ip_range, dict(spec.aux_addresses))
            )
            claimed = allocator.claim_pool(pool.subnet, network_id) if request.claim_pools else None
            if claimed is not None:  # handed out ahead: its addresses change hands
                allocator.claim(claimed.id, spec.gateway, "gateway")
                for name, address in spec.aux_addresses.items():
                    allocator.claim(claimed.id, address, f"aux:{name}")
                continue
            clash = allocator.network_of_subnet(pool.subnet)
            if clash is not None:
                raise Conflict(
                    f"subnet {pool.subnet} overlaps {self.describe_pool_holder(clash[0])} "
                    f"({clash[1]}); choose another --subnet"
                )
            specs.append(spec)
        self.store.insert_network(conn, network)
        for spec in specs:
            allocator.add_pool(network_id, spec)
        return network

    def describe_pool_holder(self, network_id: str) -> str:
        """How an overlap message names a pool's holder."""
        if network_id == PENDING:
            return "an address pool handed out to Docker (IpamDriver.RequestPool)"
        owner = next((n.name for n in self.store.networks() if n.id == network_id), "?")
        return f"network {owner!r}"

    def _forget_network(self, network_id: str) -> None:
        with self.store.transaction() as conn:
            AddressAllocator(conn).remove_pools(network_id)
            self.store.delete_network(conn, network_id)

    def remove_network(self, name_or_id: str, force: bool = False) -> Network:
        """Remove a network; with `force`, disconnect its endpoints first."""
        network = self.network(name_or_id)
        endpoints = self.store.endpoints(network_id=network.id)
        if endpoints and not force:
            names = ", ".join(e.sandbox for e in endpoints[:5])
            more = f" and {len(endpoints) - 5} more" if len(endpoints) > 5 else ""
            raise InUse(
                f"network {network.name!r} has {len(endpoints)} connected sandbox(es) "
                f"({names}{more}); disconnect them or use --force"
            )
        errors: list[str] = []
        for endpoint in endpoints:
            try:
                self._disconnect(network, endpoint)
            except NetstackError as exc:
                errors.append(str(exc))
        driver = self.driver(network.driver)
        try:
            driver.delete_network(network)
        except NetstackError as exc:
            errors.append(str(exc))
        self._forget_network(network.id)
        self._changed()
        if errors:
            raise KernelError(f"network {network.name!r} removed with errors: {'; '.join(errors)}")
        log.info("network=%s name=%s removed", network.id[:12], network.name)
        return network

    def prune(self) -> list[str]:
        """Remove every network without endpoints; return their names."""
        removed = []
        for network in self.store.networks():
            if not self.store.endpoints(network_id=network.id):
                self.remove_network(network.id)
                removed.append(network.name)
        return removed

    # endpoints ------------------------------------------------------------------------------
    def connect(self, network_name: str, sandbox_name: str, request: ConnectRequest) -> Endpoint:
        """Attach a sandbox to a network. All or nothing."""
        network = self.network(network_name)
        sandbox = self.sandbox(sandbox_name)
        if not netns.exists(sandbox.path):
            raise NotFound(
                f"the network namespace of sandbox {sandbox.name!r} ({sandbox.path}) is gone; "
                f"remove the sandbox (netctl sandbox rm {sandbox.name}) and create it again"
            )
        if request.join is not None and request.join.ifname is not None:
            validate_ifname(request.join.ifname, "interface name")
        endpoint, ip, ip6 = self._new_endpoint(network, sandbox.name, request)
        port_requests = self._port_requests(network, request.ports)
        driver = self.driver(network.driver)
        with ExitStack() as undo:
            with self.store.transaction() as conn:
                self._reserve_endpoint(conn, network, endpoint, ip, ip6)
                self._reserve_ports(conn, endpoint, port_requests)
            undo.callback(self._forget_endpoint, endpoint.id)
            faults.checkpoint("connect:after-address")
            driver.create_endpoint(network, endpoint)
            undo.callback(driver.delete_endpoint, network, endpoint)
            faults.checkpoint("connect:after-veth")
            endpoint.interface = driver.join(network, endpoint, sandbox, request.join)
            faults.checkpoint("connect:after-join")
            driver.program_external_connectivity(network, endpoint)
            undo.callback(driver.revoke_external_connectivity, network, endpoint)
            faults.checkpoint("connect:after-ports")
            with self.store.transaction() as conn:
                self.store.update_endpoint_interface(conn, endpoint.id, endpoint.interface)
            faults.checkpoint("connect:before-store")
            undo.pop_all()
        self._write_resolv_conf(sandbox.name)
        self._changed()
        log.info(
            "network=%s sandbox=%s endpoint=%s connected as %s",
            network.id[:12],
            sandbox.name,
            endpoint.id[:12],
            endpoint.interface,
        )
        return endpoint

    def _new_endpoint(
        self, network: Network, sandbox: str, request: ConnectRequest, endpoint_id: str = ""
    ) -> tuple[Endpoint, IPAddress | None, IPAddress | None]:
        """Validate a connect request: the endpoint (no addresses yet) and the wanted ones."""
        ip = parse_address(request.ip, "--ip") if request.ip else None
        ip6 = parse_address(request.ip6, "--ip6") if request.ip6 else None
        if ip is not None and ip.version != 4:
            raise InvalidArgument(f"--ip {ip} is not an IPv4 address; use --ip6 for IPv6")
        if ip6 is not None and ip6.version != 6:
            raise InvalidArgument(f"--ip6 {ip6} is not an IPv6 address; use --ip for IPv4")
        mac = random_mac()
        if request.mac is not None:
            mac = request.mac.lower()
            if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1:
                raise InvalidArgument(
                    f"invalid --mac {request.mac!r}: give a unicast MAC like 02:42:ac:11:00:02"
                )
        for alias in request.aliases:
            validate_name(alias, "alias")
        if endpoint_id and not _ID.fullmatch(endpoint_id):
            raise InvalidArgument(f"invalid endpoint id {endpoint_id!r}: give 64 hex digits")
        endpoint = Endpoint(
            id=endpoint_id or secrets.token_hex(32),
            network_id=network.id,
            sandbox=sandbox,
            mac=mac,
            aliases=list(dict.fromkeys(request.aliases)),
            created=now(),
        )
        return endpoint, ip, ip6

    def _port_requests(self, network: Network, specs: list[str]) -> list[ports.PortRequest]:
        """Parse `-p` specs and check the network can publish them."""
        if not specs:
            return []
        if network.internal:
            raise InvalidArgument(
                f"network {network.name!r} is internal: it has no external connectivity, so "
                "it cannot publish ports; use a non-internal network for -p"
            )
        requests = [ports.parse_spec(spec, links.host_addresses) for spec in specs]
        versions = {p.subnet.version for p in network.pools}
        for req in requests:
            if req.host_ip and ":" in req.host_ip and 6 not in versions:
                raise InvalidArgument(
                    f"-p {req.spec!r} publishes on IPv6 but network {network.name!r} has no "
                    "IPv6 subnet; create it with --ipv6"
                )
            if req.host_ip and ":" not in req.host_ip and 4 not in versions:
                raise InvalidArgument(
                    f"-p {req.spec!r} publishes on IPv4 but network {network.name!r} has no "
                    "IPv4 subnet"
                )
        return requests

    def _reserve_endpoint(
        self,
        conn: sqlite3.Connection,
        network: Network,
        endpoint: Endpoint,
        ip: IPAddress | None,
        ip6: IPAddress | None,
        claim: bool = False,
    ) -> None:
        """Inside one write transaction: the duplicate check, addresses, the endpoint row.

        With `claim`, wanted addresses handed out ahead (PENDING) are taken over."""
        if self.store.find_endpoint(network.id, endpoint.sandbox) is not None:
            raise Conflict(
                f"sandbox {endpoint.sandbox!r} is already connected to network {network.name!r}"
            )
        if self.store.endpoint_by_id(endpoint.id) is not None:
            raise Conflict(f"endpoint {endpoint.id[:12]} already exists")
        allocator = AddressAllocator(conn)
        pools = {p.subnet.version: p for p in allocator.pools(network.id)}
        if ip6 is not None and 6 not in pools:
            raise InvalidArgument(
                f"network {network.name!r} has no IPv6 subnet; --ip6 needs a network "
                "created with --ipv6"
            )
        for pool, wanted in ((pools.get(4), ip), (pools.get(6), ip6)):
            holder = None if pool is None or wanted is None else allocator.owner_of(pool.id, wanted)
            if holder is not None and not (claim and holder == PENDING):
                raise Conflict(
                    f"address {wanted} is already in use by {self._describe_owner(holder)}; "
                    "choose another address"
                )
        if 4 in pools:
            address = allocator.request(pools[4], endpoint.id, ip, claim)
            endpoint.ipv4 = ipaddress.IPv4Interface(f"{address}/{pools[4].subnet.prefixlen}")
        if 6 in pools:
            address = allocator.request(pools[6], endpoint.id, ip6, claim)
            endpoint.ipv6 = ipaddress.IPv6Interface(f"{address}/{pools[6].subnet.prefixlen}")
        self.store.insert_endpoint(conn, endpoint)

    def _describe_owner(self, owner: str) -> str:
        if owner == "gateway":
            return "the network's gateway"
        if owner.startswith("aux:"):
            return f"aux-address {owner[4:]!r}"
        row = self.store.conn.execute(
            "SELECT sandbox FROM endpoints WHERE id=?", (owner,)
        ).fetchone()
        return f"sandbox {row[0]!r}" if row else f"endpoint {owner[:12]}"

    def _forget_endpoint(self, endpoint_id: str) -> None:
        with self.store.transaction() as conn:
            AddressAllocator(conn).release_owner(endpoint_id)
            self.store.delete_endpoint(conn, endpoint_id)

    def disconnect(self, network_name: str, sandbox_name: str) -> Endpoint:
        network = self.network(network_name)
        endpoint = self.store.find_endpoint(network.id, sandbox_name)
        if endpoint is None:
            raise NotFound(f"sandbox {sandbox_name!r} is not connected to network {network.name!r}")
        try:
            self._disconnect(network, endpoint)
        finally:
            self._changed()
        return endpoint

    def _disconnect(self, network: Network, endpoint: Endpoint) -> None:
        """Kernel objects first (idempotent), then the row and addresses."""
        driver = self.driver(network.driver)
        failures: list[NetstackError] = []
        for step in (driver.revoke_external_connectivity, driver.delete_endpoint):
            try:
                step(network, endpoint)
            except NetstackError as exc:  # best effort: try every step, report the first
                failures.append(exc)
        self._forget_endpoint(endpoint.id)
        self._repair_default_routes(endpoint.sandbox)
        self._write_resolv_conf(endpoint.sandbox)
        if failures:
            raise failures[0]
        log.info(
            "network=%s sandbox=%s endpoint=%s disconnected",
            network.id[:12],
            endpoint.sandbox,
            endpoint.id[:12],
        )

    # endpoints step by step (Docker: CreateEndpoint, Join, Program..., Leave, DeleteEndpoint)
    def endpoint(self, endpoint_id: str) -> Endpoint:
        endpoint = self.store.endpoint_by_id(endpoint_id)
        if endpoint is None:
            raise NotFound(f"endpoint {endpoint_id[:12]} not found; it was never made or is gone")
        return endpoint

    def create_endpoint(
        self,
        network_name: str,
        endpoint_id: str,
        sandbox_name: str,
        request: ConnectRequest,
        claim: bool = False,
    ) -> Endpoint:
        """Reserve an endpoint's addresses and record it under `sandbox_name` (a placeholder
        until `join_endpoint`); nothing in the kernel yet. With `claim`, addresses handed out
        ahead (PENDING) are taken over. All or nothing; undo: delete_endpoint."""
        network = self.network(network_name)
        endpoint, ip, ip6 = self._new_endpoint(network, sandbox_name, request, endpoint_id)
        self.driver(network.driver).create_endpoint(network, endpoint)
        with self.store.transaction() as conn:
            self._reserve_endpoint(conn, network, endpoint, ip, ip6, claim)
        log.info("network=%s endpoint=%s created", network.id[:12], endpoint.id[:12])
        return endpoint

    def join_endpoint(
        self, endpoint_id: str, sandbox_name: str, sandbox_path: str, options: JoinOptions
    ) -> Endpoint:
        """Adopt the namespace at `sandbox_path` as sandbox `sandbox_name` (never deleted by
        netstack) and join the endpoint to it as `options` say. All or nothing."""
        endpoint = self.endpoint(endpoint_id)
        network = self.network(endpoint.network_id)
        driver = self.driver(network.driver)
        other = self.store.find_endpoint(network.id, sandbox_name)
        if other is not None and other.id != endpoint.id:
            raise Conflict(
                f"sandbox {sandbox_name!r} is already connected to network {network.name!r} "
                f"(endpoint {other.id[:12]})"
            )
        sandbox = self.store.find_sandbox(sandbox_name)
        if sandbox is None:
            sandbox = Sandbox(name=sandbox_name, path=sandbox_path, created=now())
        else:
            self._check_adoption(sandbox, sandbox_path)
        with ExitStack() as undo:
            endpoint.interface = driver.join(network, endpoint, sandbox, options)
            undo.callback(driver.delete_endpoint, network, endpoint)
            # One transaction for the adopted sandbox and the endpoint: each costs a commit
            # (~0.2 ms inside netstackd while dockerd works), and Docker waits on its Join.
            with self.store.transaction() as conn:
                recorded = self.store.find_sandbox(sandbox_name)  # a concurrent adoption?
                if recorded is None:
                    self.store.insert_sandbox(conn, sandbox)
                else:
                    self._check_adoption(recorded, sandbox_path)
                self.store.update_endpoint_sandbox(conn, endpoint.id, sandbox_name)
                self.store.update_endpoint_interface(conn, endpoint.id, endpoint.interface)
            undo.pop_all()
        endpoint.sandbox = sandbox_name
        self._changed()
        log.info(
            "network=%s sandbox=%s endpoint=%s joined as %s",
            network.id[:12],
            sandbox_name,
            endpoint.id[:12],
            endpoint.interface,
        )
        return endpoint

    def prepare_join(self, endpoint_id: str, options: JoinOptions) -> str | None:
        """Make the endpoint's interface ahead of join_endpoint when both of its ends stay
        in the host namespace (`options.peer_in_host`: no sandbox is involved yet); a later
        join with `prepared` set to the returned peer name then only names it. None when
        there was nothing to do: an endpoint deleted meanwhile, or another mode. Undo:
        delete_endpoint."""
        endpoint = self.store.endpoint_by_id(endpoint_id)
        if endpoint is None or not options.peer_in_host:
            return None
        network = self.network(endpoint.network_id)
        unjoined = Sandbox(name=endpoint.sandbox, path="")  # not touched in this mode
        return self.driver(network.driver).join(network, endpoint, unjoined, options)

    def leave_endpoint(self, endpoint_id: str, placeholder: str) -> None:
        """Record the endpoint as no longer in its sandbox (named `placeholder` again); forget
        the sandbox when it has no endpoint left. The kernel is left to delete_endpoint."""
        endpoint = self.endpoint(endpoint_id)
        with self.store.transaction() as conn:
            self.store.update_endpoint_sandbox(conn, endpoint.id, placeholder)
        self._forget_empty_sandbox(endpoint.sandbox)
        self._changed()

    def delete_endpoint(self, endpoint_id: str) -> None:
        """Unpublish, delete the interface, free the addresses, forget the endpoint (and its
        sandbox when it was the last one). Idempotent: an unknown endpoint is nothing to do."""
        endpoint = self.store.endpoint_by_id(endpoint_id)
        if endpoint is None:
            return
        try:
            self._disconnect(self.network(endpoint.network_id), endpoint)
        finally:
            self._forget_empty_sandbox(endpoint.sandbox)
            self._changed()

    def _forget_empty_sandbox(self, name: str) -> None:
        """Forget an adopted sandbox that has no endpoints left (its namespace stays)."""
        sandbox = self.store.find_sandbox(name)
        if sandbox is not None and sandbox.external and not self.store.endpoints(sandbox=name):
            with self.store.transaction() as conn:
                self.store.delete_sandbox(conn, name)

    def publish(self, endpoint_id: str, specs: list[str]) -> Endpoint:
        """Publish `-p` specs for a joined endpoint, replacing what it published before.
        Host ports are chosen as for connect; the endpoint comes back with its bindings.
        All or nothing; undo: unpublish."""
        endpoint = self.endpoint(endpoint_id)
        network = self.network(endpoint.network_id)
        requests = self._port_requests(network, specs)
        self.unpublish(endpoint_id)
        endpoint.ports = []
        if not requests:
            return endpoint
        driver = self.driver(network.driver)
        with ExitStack() as undo:
            with self.store.transaction() as conn:
                self._reserve_ports(conn, endpoint, requests)
            undo.callback(self._forget_ports, endpoint.id)
            driver.program_external_connectivity(network, endpoint)
            undo.pop_all()
        self._changed()
        return endpoint

    def _reserve_ports(
        self, conn: sqlite3.Connection, endpoint: Endpoint, requests: list[ports.PortRequest]
    ) -> None:
        """Inside one write transaction: choose the host ports and record the bindings.
        When every request names its host ports, only bindings on those can clash."""
        existing = self.store.all_ports(ports.named_host_ports(requests))
        endpoint.ports = ports.assign(requests, existing, self._busy_on_host)
        self.store.insert_ports(conn, endpoint.id, endpoint.ports)

    def unpublish(self, endpoint_id: str) -> None:
        """Remove every published port of the endpoint. Idempotent."""
        endpoint = self.store.endpoint_by_id(endpoint_id)
        if endpoint is None or not endpoint.ports:
            return
        network = self.network(endpoint.network_id)
        try:
            self.driver(network.driver).revoke_external_connectivity(network, endpoint)
        finally:
            self._forget_ports(endpoint.id)
            self._changed()

    def _forget_ports(self, endpoint_id: str) -> None:
        with self.store.transaction() as conn:
            self.store.delete_ports(conn, endpoint_id)

    def _repair_default_routes(self, sandbox_name: str) -> None:
        """After a disconnect, let the next network (in connection order) provide the default
        route the removed one provided, as Docker does."""
        if not netns.exists(sandbox_name):
            return
        for endpoint in self.store.endpoints(sandbox=sandbox_name):
            network = self.store.find_network(endpoint.network_id)
            if network is None or network.internal or not endpoint.interface:
                continue
            gateways = [p.gateway for p in network.pools if p.gateway is not None]
            try:
                links.ensure_default_routes(sandbox_name, endpoint.interface, gateways)
            except NetstackError as exc:  # best effort: a concurrent disconnect may race us
                log.warning("sandbox=%s default route not repaired: %s", sandbox_name, exc)

    def _write_resolv_conf(self, sandbox_name: str) -> None:
        """Point the sandbox's resolv.conf at its networks' gateways, where netstackd answers.

        Best effort (a warning, not a failure: connectivity does not depend on it). Rewrites
        are serialised and read the store inside the lock, so the last one to run sees
        every committed connect and disconnect.
        """
        if not netns.exists(sandbox_name) or self.store.find_sandbox(sandbox_name) is None:
            return
        try:
            with netns.locked_etc(sandbox_name):
                networks = [
                    network
                    for endpoint in self.store.endpoints(sandbox=sandbox_name)
                    if (network := self.store.find_network(endpoint.network_id)) is not None
                ]
                netns.write_etc_file(sandbox_name, "resolv.conf", sandbox_resolv_conf(networks))
        except NetstackError as exc:
            log.warning("sandbox=%s resolv.conf not written: %s", sandbox_name, exc)

    # sandboxes ------------------------------------------------------------------------------
    def create_sandbox(self, name: str) -> Sandbox:
        validate_name(name, "sandbox")
        if self.store.find_sandbox(name) is not None:
            raise Conflict(f"sandbox {name!r} already exists; choose another name")
        with ExitStack() as undo:
            path = netns.create(name)
            undo.callback(netns.remove, name)
            sandbox = Sandbox(name=name, path=path, created=now())
            try:
                with self.store.transaction() as conn:
                    self.store.insert_sandbox(conn, sandbox)
            except sqlite3.IntegrityError:
                raise Conflict(f"sandbox {name!r} already exists; choose another name") from None
            undo.pop_all()
        self._write_resolv_conf(name)
        return sandbox

    def adopt_sandbox(self, name: str, path: str) -> Sandbox:
        """Record a namespace someone else made (a CNI runtime's container) as a sandbox.

        Idempotent for the same path; netstack never deletes an adopted namespace.
        """
        existing = self.store.find_sandbox(name)
        if existing is not None:
            self._check_adoption(existing, path)
            return existing
        sandbox = Sandbox(name=name, path=path, created=now())
        try:
            with self.store.transaction() as conn:
                self.store.insert_sandbox(conn, sandbox)
        except sqlite3.IntegrityError:  # a concurrent adoption of the same name
            return self.sandbox(name)
        return sandbox

    @staticmethod
    def _check_adoption(recorded: Sandbox, path: str) -> None:
        """An adopted sandbox's name stands for one namespace path."""
        if recorded.path != path:
            raise Conflict(
                f"sandbox {recorded.name!r} is already recorded with namespace "
                f"{recorded.path}; remove that attachment first"
            )

    def forget_sandbox(self, name: str) -> None:
        """Disconnect an adopted sandbox's endpoints and forget it; its namespace stays.

        Idempotent: an unknown name is nothing to do. Endpoints are cleaned up even when
        the namespace is already gone (their veth went with it).
        """
        sandbox = self.store.find_sandbox(name)
        if sandbox is None:
            return
        errors: list[str] = []
        for endpoint in self.store.endpoints(sandbox=name):
            try:
                self._disconnect(self.network(endpoint.network_id), endpoint)
            except NetstackError as exc:
                errors.append(str(exc))
        with self.store.transaction() as conn:
            self.store.delete_sandbox(conn, name)
        self._changed()
        if errors:
            raise KernelError(f"sandbox {name!r} forgotten with errors: {'; '.join(errors)}")

    def remove_sandbox(self, name: str) -> None:
        """Disconnect every endpoint, delete the namespace, forget the sandbox."""
        sandbox = self.sandbox(name)
        errors: list[str] = []
        for endpoint in self.store.endpoints(sandbox=sandbox.name):
            try:
                self._disconnect(self.network(endpoint.network_id), endpoint)
            except NetstackError as exc:
                errors.append(str(exc))
        try:
            netns.remove(sandbox.name)
        except NetstackError as exc:
            errors.append(str(exc))
        netns.remove_etc(sandbox.name)
        with self.store.transaction() as conn:
            self.store.delete_sandbox(conn, sandbox.name)
        self._changed()
        if errors:
            raise KernelError(f"sandbox {name!r} removed with errors: {'; '.join(errors)}")
