"""Links, addresses and routes through pyroute2, in this namespace or a named sandbox."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute, NetlinkError

from netstack.errors import Conflict, KernelError, NotFound
from netstack.kernel.errors import netlink_errors
from netstack.kernel.netns import netlink_socket, path_of
from netstack.model import IPAddress, IPInterface, IPNetwork

IFA_F_NODAD = 0x02
IN6_ADDR_GEN_MODE_NONE = 1
_NO_AUTOCONF = {
    "attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE)]})]
}


_this_namespace = threading.local()


@contextmanager
def _ipr(namespace: str | None = None) -> Iterator[IPRoute]:
    """A netlink socket in this namespace, or in the named one.

    The socket of this namespace is kept per thread and reused: opening one costs ~1.5 ms
    of a ~9 ms veth creation, and a long-lived process (netstackd's workers) makes several
    per call. Threads never change namespace after using it (they are short-lived where
    they do, see netns.run_in). After an error the socket is dropped, so no half-read
    reply is ever left for the next call.
    """
    if namespace is None:
        cached: IPRoute | None = getattr(_this_namespace, "ipr", None)
        if cached is None:
            with netlink_errors("opening netlink in host namespace"):
                cached = IPRoute()
            _this_namespace.ipr = cached
        try:
            yield cached
        except BaseException:
            _this_namespace.ipr = None
            cached.close()
            raise
        return
    with netlink_errors(f"opening netlink in {namespace}"):
        ipr = IPRoute(use_socket=netlink_socket(namespace))
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _here_index(ifname: str) -> int | None:
    """The index of a link in this thread's namespace (the one `_ipr()` talks to).

    An ioctl (~10 µs) where pyroute2's lookup costs ~0.8 ms; it matters on the veth path.
    """
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def _add_addresses(ipr: IPRoute, index: int, addresses: Sequence[IPInterface]) -> None:
    for iface in addresses:
        ipr.addr(
            "add",
            index=index,
            address=str(iface.ip),
            prefixlen=iface.network.prefixlen,
            flags=IFA_F_NODAD if iface.version == 6 else 0,
        )


def _no_ipv6_autoconf(ipr: IPRoute, index: int) -> None:
    """No kernel-made IPv6 link-local address on this (still down) link, hence none of the
    traffic that comes with one: DAD, router solicitations, MLD reports.

    Why: a sandbox's eth0 sends those to multicast groups, which its bridge floods to every
    port. Measured here with 300 sandboxes on one bridge: each sandbox's eth0 received ~1500
    such frames (5 per later sandbox), and adding a port grew 1.5x slower from the 1st to
    the 300th; with no link-local addresses, 9 frames and no growth. Statically assigned
    IPv6 addresses still work. Best effort: a kernel without IPv6 refuses, and that is fine.
    """
    try:
        ipr.link("set", index=index, IFLA_AF_SPEC=_NO_AUTOCONF)
    except NetlinkError as exc:
        if exc.code not in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _configure_port(ipr: IPRoute, index: int, hairpin: bool, isolated: bool) -> None:
    """A bridge port's flags (hairpin, isolation) and no IPv6 autoconfiguration (a port
    needs no address of its own: `_no_ipv6_autoconf`), in one netlink call: a RTM_NEWLINK
    for an existing link applies bridge-port attributes (IFLA_INFO_SLAVE_DATA) and
    IFLA_AF_SPEC together. Two calls cost 1.43 ms here, one 0.78 ms, and each change of
    the host end makes the kernel build a notification that looks up the peer's namespace
    id among every sandbox's (linear in the sandboxes). A kernel without IPv6 refuses the
    whole message before applying any of it: then each is set on its own, as before."""
    port = {
        "attrs": [
            ("IFLA_INFO_SLAVE_KIND", "bridge"),
            (
                "IFLA_INFO_SLAVE_DATA",
                {
                    "attrs": [
                        ("IFLA_BRPORT_MODE", int(hairpin)),
                        ("IFLA_BRPORT_ISOLATED", int(isolated)),
                    ]
                },
            ),
        ]
    }
    try:
        ipr.link("set", index=index, IFLA_LINKINFO=port, IFLA_AF_SPEC=_NO_AUTOCONF)
    except NetlinkError as exc:
        if exc.code not in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        ipr.brport("set", index=index, mode=int(hairpin), isolated=int(isolated))
        _no_ipv6_autoconf(ipr, index)


def bring_up_loopback(namespace: str) -> None:
    with _ipr(namespace) as ipr, netlink_errors(f"bringing up lo in {namespace}"):
        ipr.link("set", index=_index(ipr, "lo"), state="up")


def create_bridge(name: str, mac: str, mtu: int, addresses: Sequence[IPInterface]) -> None:
    """Create a bridge with a fixed MAC and gateway addresses, and bring it up.

    Multicast snooping is off. Why: with it on, every port added (and every port whose
    carrier comes up) makes the kernel re-arm the multicast timers of *every* port of the
    bridge (`br_port_state_selection`), so attaching a container grew ~2 ms slower from the
    1st to the 500th port here (perf: a quarter of `ip link add` at 1000 ports); off, it
    stays flat. Nothing is lost: a container bridge has no multicast querier, and without
    one the bridge floods multicast to every port whether it snoops or not.

    Raises Conflict if a link of that name exists. Undo with `delete_link(name)`.
    """
    with _ipr() as ipr:
        if _index(ipr, name) is not None:
            raise Conflict(
                f"interface {name!r} already exists on the host; choose another bridge.name"
            )
        with netlink_errors(f"creating bridge {name}"):
            ipr.link("add", ifname=name, kind="bridge", address=mac, mtu=mtu, br_mcast_snooping=0)
        with netlink_errors(f"configuring bridge {name}"):
            index = _index(ipr, name)
            assert index is not None
            _add_addresses(ipr, index, addresses)
            ipr.link("set", index=index, state="up")


def delete_link(name: str, namespace: str | None = None) -> None:
    """Delete a link (a veth takes its peer with it). Idempotent."""
    with _ipr(namespace) as ipr:
        index = _index(ipr, name)
        if index is None:
            return
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                with netlink_errors(f"deleting link {name}"):
                    raise


def create_veth(
    host_name: str,
    peer_name: str,
    master: str,
    mtu: int,
    peer_mac: str,
    isolated: bool,
    hairpin: bool = True,
    peer_namespace: str | None = None,
    up: bool = True,
) -> None:
    """A veth pair whose host end is a port of `master` (up, unless `up` is false); the
    peer is created in `peer_namespace` (a name or path; default: this namespace), down and
    unaddressed.

    `isolated` sets bridge port isolation: isolated ports reach the bridge (the gateway) but
    not each other; `hairpin` lets a frame leave by the port it came in (a sandbox reaching
    its own published port through the host). Raises Conflict when `peer_name` is taken
    there (nothing is created then). Undo with `delete_link(host_name)`.
    """
    with _ipr() as ipr:
        master_index = _here_index(master)
        if master_index is None:
            raise KernelError(f"bridge {master!r} is missing; recreate the network")
        peer: dict[str, object] = {"ifname": peer_name, "address": peer_mac, "mtu": mtu}
        with contextlib.ExitStack() as stack:
            if peer_namespace is not None:
                try:
                    fd = os.open(path_of(peer_namespace), os.O_RDONLY)
                except OSError as exc:
                    raise NotFound(
                        f"network namespace {peer_namespace} is gone: {exc.strerror}"
                    ) from None
                stack.callback(os.close, fd)
                peer["net_ns_fd"] = fd
            # Up at once: no frame can pass before the port settings below, as the peer is
            # down (no carrier), and without carrier IPv6 makes no link-local address yet.
            with netlink_errors(f"creating veth {host_name} (peer {peer_name})"):
                ipr.link(
                    "add",
                    ifname=host_name,
                    kind="veth",
                    mtu=mtu,
                    master=master_index,
                    state="up" if up else "down",
                    peer=peer,
                )
        with netlink_errors(f"configuring veth {host_name}"):
            index = _here_index(host_name)
            if index is None:
                raise KernelError(f"veth {host_name} vanished while being created; try again")
            _configure_port(ipr, index, hairpin=hairpin, isolated=isolated)


def claim_veth(spare_host: str, host: str) -> None:
    """Give the host end of a pair made ahead by `create_veth(..., up=False)` its final
    name and bring it up: one netlink call.

    The peer is left as it is, name and MAC: its user (dockerd) moves it, renames it and
    sets the endpoint's MAC itself, and each of those calls costs ~0.7-1 ms here (a rename
    re-registers the link's sysctl tables). Raises NotFound when the spare is gone,
    Conflict when `host` is taken, KernelError otherwise; on failure the caller deletes
    the pair.
    """
    index = _here_index(spare_host)
    if index is None:
        raise NotFound(f"spare veth {spare_host} is gone")
    with _ipr() as ipr, netlink_errors(f"claiming spare veth {spare_host} as {host}"):
        ipr.link("set", index=index, ifname=host, state="up")  # renamed, then up


def links_named(prefix: str) -> list[str]:
    """Names of the links in this namespace that start with `prefix`."""
    with _ipr() as ipr, netlink_errors("listing links"):
        names = (str(link.get("IFLA_IFNAME")) for link in ipr.get_links())
        return [name for name in names if name.startswith(prefix)]


_ETH = re.compile(r"eth(\d+)$")


def next_eth_name(namespace: str) -> str:
    """The lowest free ethN name in the sandbox."""
    with _ipr(namespace) as ipr:
        used = set()
        for msg in ipr.get_links():
            match = _ETH.match(str(msg.get("IFLA_IFNAME")))
            if match:
                used.add(int(match.group(1)))
    n = 0
    while n in used:
        n += 1
    return f"eth{n}"


def configure_sandbox_interface(
    namespace: str,
    ifname: str,
    addresses: Sequence[IPInterface],
    gateways: Sequence[IPAddress],
    routes: Sequence[tuple[IPNetwork, IPAddress | None]] | None = None,
) -> None:
    """Inside the sandbox: addresses on `ifname`, link up, and a default route per gateway.

    A default route is only added for a family that has none yet (the first network wins).
    `routes` (destination, next hop or None for on-link) are added as given. An interface
    with no IPv6 address gets no IPv6 link-local address either (as Docker does for
    IPv4-only networks), so it sends no IPv6 multicast for the bridge to flood.
    """
    with _ipr(namespace) as ipr, netlink_errors(f"configuring {ifname} in {namespace}"):
        index = _index(ipr, ifname)
        assert index is not None
        if not any(iface.version == 6 for iface in addresses):
            _no_ipv6_autoconf(ipr, index)
        _add_addresses(ipr, index, addresses)
        ipr.link("set", index=index, state="up")
        _ensure_default_routes(ipr, index, gateways)
        for destination, via in routes or ():
            family = 2 if destination.version == 4 else 10
            extra = {"gateway": str(via)} if via is not None else {}
            ipr.route(
                "add",
                dst=str(destination.network_address),
                dst_len=destination.prefixlen,
                oif=index,
                family=family,
                **extra,
            )


def _ensure_default_routes(ipr: IPRoute, index: int, gateways: Sequence[IPAddress]) -> None:
    for gateway in gateways:
        family = 2 if gateway.version == 4 else 10
        routes = ipr.get_routes(family=family, table=254)
        if any(r["dst_len"] == 0 for r in routes):
            continue
        try:
            ipr.route("add", dst="default", gateway=str(gateway), oif=index, family=family)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # EEXIST: a concurrent connect added one first
                raise


def ensure_default_routes(namespace: str, ifname: str, gateways: Sequence[IPAddress]) -> None:
    """Inside the sandbox: a default route via each gateway whose family has none. Idempotent."""
    with _ipr(namespace) as ipr, netlink_errors(f"routing via {ifname} in {namespace}"):
        index = _index(ipr, ifname)
        if index is not None:
            _ensure_default_routes(ipr, index, gateways)


def host_routes() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Destinations of the IPv4 routes in this namespace (for default-pool selection)."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    with _ipr() as ipr, netlink_errors("listing routes"):
        for route in ipr.get_routes(family=2, table=254):
            dst = route.get("RTA_DST")
            if dst and route["dst_len"] > 0:
                nets.append(ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False))
    return nets


def host_addresses() -> list[str]:
    """Every address configured in this namespace (to validate a published port's host IP)."""
    with _ipr() as ipr, netlink_errors("listing addresses"):
        return [str(msg.get("IFA_ADDRESS")) for msg in ipr.get_addr()]


@dataclass(frozen=True)
class InterfaceReport:
    """What one interface inside a sandbox looks like (for CNI CHECK)."""

    exists: bool
    up: bool = False
    mac: str = ""
    addresses: tuple[IPInterface, ...] = ()
    routes: tuple[tuple[IPNetwork, IPAddress | None], ...] = ()


def interface_report(namespace: str, ifname: str) -> InterfaceReport:
    """The interface's state, addresses and main-table routes through it."""
    with _ipr(namespace) as ipr, netlink_errors(f"inspecting {ifname} in {namespace}"):
        index = _index(ipr, ifname)
        if index is None:
            return InterfaceReport(exists=False)
        link = ipr.get_links(index)[0]
        addresses = tuple(
            ipaddress.ip_interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
            for msg in ipr.get_addr(index=index)
            if msg.get("scope") == 0  # global: not the kernel's link-local fe80::
        )
        routes: list[tuple[IPNetwork, IPAddress | None]] = []
        for family, any_address in ((2, "0.0.0.0"), (10, "::")):
            for route in ipr.get_routes(family=family, table=254, oif=index):
                dst = route.get("RTA_DST") or any_address
                gateway = route.get("RTA_GATEWAY")
                routes.append(
                    (
                        ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False),
                        ipaddress.ip_address(gateway) if gateway else None,
                    )
                )
        return InterfaceReport(
            exists=True,
            up=bool(link["flags"] & 1),
            mac=str(link.get("IFLA_ADDRESS", "")),
            addresses=addresses,
            routes=tuple(routes),
        )


def veth_on_bridge(host_name: str, peer_name: str, master: str) -> bool:
    """Whether the veth `host_name` is a port of `master` and its peer `peer_name` is in this
    namespace (a pair made earlier, e.g. ahead of a join)."""
    with _ipr() as ipr, netlink_errors(f"inspecting veth {host_name}"):
        master_index, host_index = _index(ipr, master), _index(ipr, host_name)
        if master_index is None or host_index is None or _index(ipr, peer_name) is None:
            return False
        (link,) = ipr.get_links(host_index)
        return bool(link.get("IFLA_MASTER") == master_index)


def bridge_ports(bridge: str) -> list[str]:
    """Names of the links enslaved to `bridge` in this namespace (empty if it is gone)."""
    with _ipr() as ipr, netlink_errors(f"listing ports of {bridge}"):
        index = _index(ipr, bridge)
        if index is None:
            return []
        return [
            str(link.get("IFLA_IFNAME"))
            for link in ipr.get_links()
            if link.get("IFLA_MASTER") == index
        ]
