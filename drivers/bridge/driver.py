"""The bridge driver: composes kernel adapters into networks and endpoints."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Mapping
from contextlib import ExitStack, suppress

from netstack.drivers.bridge import firewall
from netstack.drivers.bridge.options import BridgeOptions
from netstack.drivers.bridge.spares import SpareShape, VethSpares

from netstack import faults
from netstack.errors import Conflict, KernelError
from netstack.kernel import coexist, conntrack, links, sysctl
from netstack.kernel.nftables import Nftables
from netstack.kernel.reaper import ImmediateReaper, Reaper
from netstack.model import (
    Endpoint,
    IPAddress,
    IPInterface,
    JoinOptions,
    Network,
    Route,
    Sandbox,
)
from netstack.network_options import driver_options

log = logging.getLogger(__name__)

VETH_HOST_PREFIX = "nsv"
VETH_PEER_PREFIX = "nsp"


def host_veth_name(endpoint_id: str) -> str:
    """The host end of an endpoint's veth pair (15 bytes, findable by prefix)."""
    return f"{VETH_HOST_PREFIX}{endpoint_id[:12]}"


def peer_veth_name(endpoint_id: str) -> str:
    """The sandbox end's name while it is in the host namespace (JoinOptions.peer_in_host)."""
    return f"{VETH_PEER_PREFIX}{endpoint_id[:12]}"


def bridge_mac(network_id: str) -> str:
    """A stable, locally administered MAC for the bridge (the gateway's MAC)."""
    digest = hashlib.sha256(f"bridge:{network_id}".encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def facts_of(network: Network, options: BridgeOptions) -> firewall.NetworkFacts:
    return firewall.NetworkFacts(
        bridge=options.bridge_name,
        subnets=tuple(p.subnet for p in network.pools),
        internal=network.internal,
        masquerade=options.masquerade,
    )


class BridgeDriver:
    """One Linux bridge per network; one veth pair per endpoint."""

    name = "bridge"

    def __init__(self, reaper: Reaper | None = None, spares: VethSpares | None = None) -> None:
        self._nft: Nftables | None = None
        # how veths are deleted: at once, or (netstackd) by a background thread
        self._reaper: Reaper = reaper or ImmediateReaper()
        # pairs made ahead for joins with the peer in the host namespace (netstackd)
        self._spares = spares

    @property
    def nft(self) -> Nftables:
        if self._nft is None:
            self._nft = Nftables()
        return self._nft

    def validate_options(self, options: Mapping[str, str], network_id: str) -> dict[str, str]:
        return BridgeOptions.parse(options, network_id).to_dict()

    @staticmethod
    def options_of(network: Network) -> BridgeOptions:
        return BridgeOptions.parse(driver_options(network.options), network.id)

    def create_network(self, network: Network) -> None:
        """Bridge with gateway addresses, forwarding on, set elements in nftables.

        All or nothing: a failure removes what this call made. Raises Conflict when the bridge
        name is taken, KernelError when the kernel refuses.
        """
        options = self.options_of(network)
        gateways: list[IPInterface] = []
        for pool in network.pools if options.gateway else ():
            if pool.gateway is not None:
                gateways.append(ip_interface(pool.gateway, pool.subnet.prefixlen))
        with ExitStack() as undo:
            sysctl.write("net.ipv4.ip_forward", "1")
            if network.enable_ipv6:
                sysctl.write("net.ipv6.conf.all.forwarding", "1")
            links.create_bridge(options.bridge_name, bridge_mac(network.id), options.mtu, gateways)
            undo.callback(links.delete_link, options.bridge_name)
            # lets the host's own 127.0.0.1 reach published ports (DNAT'd, then masqueraded)
            sysctl.write(f"net.ipv4.conf.{options.bridge_name}.route_localnet", "1")
            faults.checkpoint("network-create:after-bridge")
            facts = facts_of(network, options)
            self.nft.run(firewall.base_ruleset() + firewall.add_network(facts))
            undo.callback(self._delete_elements, facts)
            faults.checkpoint("network-create:after-firewall")
            undo.pop_all()
        coexist.allow(options.bridge_name, self.nft)  # where dockerd's FORWARD may drop
        log.info("network=%s bridge=%s created", network.id[:12], options.bridge_name)

    def _delete_elements(self, facts: firewall.NetworkFacts) -> None:
        self._run_each(firewall.delete_network_commands(facts))

    def _run_each(self, commands: list[str]) -> None:
        """Run deletions in one transaction, or one by one if some target is already gone."""
        if not commands:
            return
        try:
            self.nft.run("\n".join(commands))
        except KernelError:
            for command in commands:  # some were already gone: remove the rest one by one
                with suppress(KernelError):
                    self.nft.run(command)

    def delete_network(self, network: Network) -> None:
        options = self.options_of(network)
        if self._spares is not None:
            self._spares.drop(options.bridge_name)
        self._delete_elements(facts_of(network, options))
        coexist.revoke(options.bridge_name, self.nft)
        links.delete_link(options.bridge_name)
        log.info("network=%s bridge=%s deleted", network.id[:12], options.bridge_name)

    def create_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        """Nothing in the kernel yet: the veth pair is made at `join`, its sandbox end
        created directly inside the sandbox. Moving a link between namespaces costs the
        kernel ~20 ms (an RCU synchronisation), creating it there ~2 ms."""
        self.options_of(network)

    def join(
        self,
        network: Network,
        endpoint: Endpoint,
        sandbox: Sandbox,
        options: JoinOptions | None = None,
    ) -> str:
        """Create the veth pair with its peer inside the sandbox as `options.ifname` or the
        lowest free ethN, address it, route it (`options.routes`, or a default route per
        family). With `options.peer_in_host` (Docker), both ends stay in the host namespace
        and the peer, unconfigured, is the caller's to move. Undo: delete_endpoint."""
        options = options or JoinOptions()
        bridge = self.options_of(network)
        # the sandbox's previous interface (a retried ADD) must be gone before its name is
        # taken again
        self._reaper.flush(endpoint.sandbox)
        gateways = [p.gateway for p in network.pools if p.gateway]
        where = sandbox.path
        if options.peer_in_host:
            if options.prepared:
                return options.prepared
            return self._join_peer_in_host(endpoint, bridge, self._spares)

        def create(ifname: str) -> None:
            links.create_veth(
                host_veth_name(endpoint.id),
                ifname,
                master=bridge.bridge_name,
                mtu=bridge.mtu,
                peer_mac=endpoint.mac,
                isolated=not bridge.icc,
                hairpin=bridge.hairpin,
                peer_namespace=where,
            )

        if options.ifname is not None:
            ifname = options.ifname
            create(ifname)  # Conflict names the taken name
        else:
            for _attempt in range(16):
                ifname = links.next_eth_name(where)
                try:
                    create(ifname)
                    break
                except Conflict:  # a concurrent connect took that name: pick the next one
                    continue
            else:
                raise KernelError(f"no free interface name in sandbox {sandbox.name}; try again")
        if options.routes is None:
            routes = None
            default_via = gateways if bridge.gateway and not network.internal else []
        else:
            routes = [
                (r.destination, r.gateway or _gateway_for(r, gateways)) for r in options.routes
            ]
            default_via = []
        links.configure_sandbox_interface(
            where, ifname, endpoint.interfaces(), default_via, routes=routes
        )
        return ifname

    @staticmethod
    def _join_peer_in_host(
        endpoint: Endpoint, bridge: BridgeOptions, spares: VethSpares | None
    ) -> str:
        """Both ends in the host namespace (JoinOptions.peer_in_host); the peer's name.
        A spare pair made ahead is used when there is one."""
        host, peer = host_veth_name(endpoint.id), peer_veth_name(endpoint.id)
        shape = SpareShape(bridge.bridge_name, bridge.mtu, not bridge.icc, bridge.hairpin)
        if spares is not None and (spare_peer := spares.claim(shape, host)):
            return spare_peer  # dockerd sets the endpoint's MAC on it

        def create() -> None:
            links.create_veth(
                host,
                peer,
                master=bridge.bridge_name,
                mtu=bridge.mtu,
                peer_mac=endpoint.mac,
                isolated=not bridge.icc,
                hairpin=bridge.hairpin,
            )

        try:
            create()
        except Conflict:
            if links.veth_on_bridge(host, peer, bridge.bridge_name):
                return peer  # made ahead (Controller.prepare_join): nothing more to do
            links.delete_link(host)  # a half-made pair: start afresh
            links.delete_link(peer)
            create()
        return peer

    def delete_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        """Delete the veth pair (now, or soon with a background reaper). Idempotent."""
        self._reaper.delete(host_veth_name(endpoint.id), endpoint.sandbox)

    def program_external_connectivity(self, network: Network, endpoint: Endpoint) -> None:
        """Publish the endpoint's ports: DNAT map elements, in one nft transaction.

        UDP and SCTP flows already tracked towards those host ports are dropped, so their
        next packet is translated (conntrack.STALE_PROTOCOLS says why not TCP's). Undo:
        revoke_external_connectivity.
        """
        if not endpoint.ports:
            return
        ipv4, ipv6 = _addresses(endpoint)
        self.nft.run(firewall.publish_commands(endpoint.ports, ipv4, ipv6))
        conntrack.forget_host_ports((b.protocol, b.host_port) for b in endpoint.ports)

    def revoke_external_connectivity(self, network: Network, endpoint: Endpoint) -> None:
        """Unpublish the endpoint's ports and drop the flows translated to them. Idempotent."""
        if not endpoint.ports:
            return
        ipv4, ipv6 = _addresses(endpoint)
        self._run_each(firewall.unpublish_commands(endpoint.ports, ipv4, ipv6))
        conntrack.forget_destinations(
            (binding.protocol, address, binding.container_port)
            for binding in endpoint.ports
            for address in (ipv4, ipv6)
            if address is not None
        )


def _gateway_for(route: Route, gateways: list[IPAddress]) -> IPAddress | None:
    """The network's gateway of the route's family (None: an on-link route)."""
    return next((g for g in gateways if g.version == route.destination.version), None)


def _addresses(endpoint: Endpoint) -> tuple[str | None, str | None]:
    return (
        None if endpoint.ipv4 is None else str(endpoint.ipv4.ip),
        None if endpoint.ipv6 is None else str(endpoint.ipv6.ip),
    )


def ip_interface(address: object, prefixlen: int) -> IPInterface:
    """`address/prefixlen` as an interface address."""
    return ipaddress.ip_interface(f"{address}/{prefixlen}")
