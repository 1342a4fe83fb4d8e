"""Packet-level tests of the bridge driver: ARP, ICMP, isolation, icc, internal, NAT.

Frames are crafted with scapy and sent from inside sandboxes through AF_PACKET
sockets (see netns_scapy); what must be dropped is sent and shown not to arrive,
next to a positive control that does arrive by the same path.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from netns_scapy import (
    PacketSocket,
    arp_request,
    echo_request,
    is_arp_reply,
    is_echo,
    new_token,
    send_and_receive,
    send_and_sniff,
)
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

if TYPE_CHECKING:
    from conftest import Host, Outside

pytestmark = pytest.mark.root

# How long a frame that must NOT arrive is waited for. Delivery on veth/bridge is
# sub-millisecond; a second also covers an ARP resolution by the forwarding host.
ABSENCE_WINDOW = 1.0


@dataclass(frozen=True)
class Attached:
    """One sandbox endpoint, as `netctl sandbox inspect` reports it."""

    sandbox: str
    network: str
    iface: str
    mac: str
    ip4: str
    ip6: str

    @property
    def at(self) -> tuple[str, str]:
        """(namespace, interface), where its frames are sent and sniffed."""
        return self.sandbox, self.iface


@dataclass(frozen=True)
class Net:
    """A network's facts needed to craft frames: bridge, gateway and its MAC."""

    name: str
    bridge: str
    bridge_mac: str
    gateway4: str
    gateway6: str


def create_network(host: Host, name: str, *args: str) -> Net:
    """`netctl network create *args NAME`, then read back bridge and gateways."""
    host.netctl("network", "create", *args, name)
    (info,) = host.netctl_json("network", "inspect", name)
    bridge = info["Options"]["bridge.name"]
    gateways = {4: "", 6: ""}
    for config in info["IPAM"]["Config"]:
        gateways[6 if ":" in config["Subnet"] else 4] = config.get("Gateway", "")
    return Net(name, bridge, host.link_mac(bridge).lower(), gateways[4], gateways[6])


def attach(host: Host, net: Net, suffix: str) -> Attached:
    """Create sandbox <host>-<suffix>, connect it to net, return its endpoint facts."""
    sandbox = host.sandbox(suffix)
    host.netctl("network", "connect", net.name, sandbox)
    (info,) = host.netctl_json("sandbox", "inspect", sandbox)
    (endpoint,) = [e for e in info["Endpoints"] if e["Network"] == net.name]
    attached = Attached(
        sandbox=sandbox,
        network=net.name,
        iface=endpoint["Interface"],
        mac=endpoint["MacAddress"].lower(),
        ip4=endpoint["IPv4Address"].split("/")[0],
        ip6=(endpoint.get("IPv6Address") or "").split("/")[0],
    )
    wait_ready(host, net, attached)
    return attached


def bridge_ports(host: Host, bridge: str) -> list[dict[str, Any]]:
    """The ports of a bridge in the host namespace, with their STP state."""
    out = host.run("bridge", "-j", "link", "show").stdout
    return [
        port for port in (json.loads(out) if out.strip() else []) if port.get("master") == bridge
    ]


def wait_ready(host: Host, net: Net, attached: Attached, timeout: float = 10.0) -> None:
    """Wait until the bridge's ports forward and the sandbox's global addresses left DAD."""
    deadline = time.monotonic() + timeout
    while True:
        ports = bridge_ports(host, net.bridge)
        addrs = host.sandbox_ip_json(attached.sandbox, "addr", "show", "dev", attached.iface)
        tentative = [
            a
            for link in addrs
            for a in link.get("addr_info", [])
            if a.get("scope") == "global" and (a.get("tentative") or a.get("dadfailed"))
        ]
        if ports and all(p.get("state") == "forwarding" for p in ports) and not tentative:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready: ports={ports} tentative={tentative}")
        time.sleep(0.05)


def sandbox_mac(host: Host, attached: Attached) -> str:
    """The MAC the kernel reports for the sandbox interface."""
    out = host.in_sandbox(attached.sandbox, "ip", "-j", "link", "show", "dev", attached.iface)
    return str(json.loads(out.stdout)[0]["address"]).lower()


def _ping_once(host: Host, attached: Attached, target: str) -> bool:
    argv = ["ping", "-n", "-c1", "-W1", *(["-6"] if ":" in target else []), target]
    return host.in_sandbox(attached.sandbox, *argv, check=False).returncode == 0


def reachable(host: Host, attached: Attached, target: str, timeout: float = 10.0) -> bool:
    """Ping target from the sandbox until it answers (bounded poll); True if it did."""
    deadline = time.monotonic() + timeout
    while not _ping_once(host, attached, target):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def unreachable(host: Host, attached: Attached, target: str) -> bool:
    """One ping with a 1 s deadline from the sandbox; True if it went unanswered."""
    return not _ping_once(host, attached, target)


def arp_reply(sender: Attached, target_ip: str) -> Packet | None:
    """ARP who-has target_ip from sender; the is-at it gets back, or None."""
    return send_and_receive(
        sender.sandbox,
        sender.iface,
        arp_request(sender.mac, sender.ip4, target_ip),
        is_arp_reply(target_ip, sender.mac),
    )


def echo_reply(
    sender: Attached, dst_mac: str, dst_ip: str, src: str | None = None, dst: str | None = None
) -> Packet | None:
    """A fresh echo request from sender to (dst_mac, dst_ip); the reply it gets back
    (from src, to dst where given), or None."""
    ident, payload = new_token()
    request = echo_request(sender.mac, dst_mac, sender.ip4, dst_ip, ident, payload)
    return send_and_receive(
        sender.sandbox, sender.iface, request, is_echo(ident, payload, reply=True, src=src, dst=dst)
    )


def probe(
    sender: Attached,
    dst_mac: str,
    dst_ip: str,
    sniffer: tuple[str, str],
    src: str | None = None,
    dst: str | None = None,
    absent: bool = False,
) -> list[Packet]:
    """A fresh echo request from sender to (dst_mac, dst_ip); what sniffer sees of it.

    Matched by payload (and src, dst where given). Waits up to 3 s for the first match;
    with absent, listens for the whole ABSENCE_WINDOW (showing it does not arrive).
    """
    ident, payload = new_token()
    return send_and_sniff(
        sender.at,
        echo_request(sender.mac, dst_mac, sender.ip4, dst_ip, ident, payload),
        sniffer,
        is_echo(ident, payload, reply=False, src=src, dst=dst),
        duration=ABSENCE_WINDOW if absent else 3.0,
        stop_at_first=not absent,
    )


def egress_echo(
    outside: Outside, net: Net, sender: Attached, v6: bool, want_reply: bool
) -> tuple[Packet | None, Packet | None]:
    """An echo request from sender to the outside through the gateway.

    (The request as the outside saw it, or None; the reply back at sender, or None, waited
    for only if want_reply and the request arrived.)
    """
    src, dst = (sender.ip6, outside.addr6) if v6 else (sender.ip4, outside.addr4)
    ident, payload = new_token()
    request = echo_request(sender.mac, net.bridge_mac, src, dst, ident, payload)
    with (
        PacketSocket(outside.name, outside.iface) as at_outside,
        PacketSocket(*sender.at) as at_sandbox,
    ):
        at_sandbox.send(request)
        seen = at_outside.wait_for(is_echo(ident, payload, reply=False, dst=dst), 3.0)
        if seen is None or not want_reply:
            return seen, None
        return seen, at_sandbox.wait_for(is_echo(ident, payload, reply=True, src=dst, dst=src), 3.0)


# --------------------------------------------------------------------------- ARP / ICMP


def test_arp_gateway_and_peer(host: Host) -> None:
    """ARP for the gateway answers with the bridge MAC; for a peer, with its inspect MAC."""
    net = create_network(host, "arpnet", "--subnet", "10.10.0.0/24")
    a = attach(host, net, "a")
    b = attach(host, net, "b")
    assert sandbox_mac(host, a) == a.mac, "inspect MacAddress differs from the kernel's"
    assert sandbox_mac(host, b) == b.mac, "inspect MacAddress differs from the kernel's"

    reply = arp_reply(a, net.gateway4)
    assert reply is not None, f"no ARP reply for gateway {net.gateway4}"
    assert reply.hwsrc.lower() == net.bridge_mac
    assert reply.src.lower() == net.bridge_mac

    reply = arp_reply(a, b.ip4)
    assert reply is not None, f"no ARP reply for peer {b.ip4}"
    assert reply.hwsrc.lower() == b.mac
    assert reply.src.lower() == b.mac


def test_icmp_echo_peer_and_gateway(host: Host) -> None:
    """A crafted echo request to a peer and to the gateway each get their reply."""
    net = create_network(host, "icmpnet", "--subnet", "10.11.0.0/24")
    a = attach(host, net, "a")
    b = attach(host, net, "b")

    reply = echo_reply(a, b.mac, b.ip4, src=b.ip4, dst=a.ip4)
    assert reply is not None, f"no echo reply from peer {b.ip4}"
    assert reply.src.lower() == b.mac

    reply = echo_reply(a, net.bridge_mac, net.gateway4, src=net.gateway4)
    assert reply is not None, f"no echo reply from gateway {net.gateway4}"
    assert reply.src.lower() == net.bridge_mac

    # And the other direction, with the kernel's own ping.
    assert reachable(host, b, a.ip4)


# --------------------------------------------------------------------------- isolation


def test_networks_are_isolated(host: Host) -> None:
    """A → B (two bridges on one host) is dropped by the host; A → A arrives by the same path."""
    net_a = create_network(host, "neta", "--subnet", "10.20.0.0/24")
    net_b = create_network(host, "netb", "--subnet", "10.21.0.0/24")
    a1 = attach(host, net_a, "a1")
    a2 = attach(host, net_a, "a2")
    b1 = attach(host, net_b, "b1")
    # Let the host know b1's MAC, so a forwarded frame would not even wait for ARP.
    host.run("ping", "-n", "-c1", "-W1", b1.ip4, check=False)

    # Routed through the gateway towards B: reaches the host, never reaches b1.
    ident, payload = new_token()
    request = echo_request(a1.mac, net_a.bridge_mac, a1.ip4, b1.ip4, ident, payload)
    match = is_echo(ident, payload, reply=False, src=a1.ip4, dst=b1.ip4)
    with (
        PacketSocket(host.name, net_a.bridge) as at_host,
        PacketSocket(*b1.at) as at_b1,
        PacketSocket(*a1.at) as sender,
    ):
        sender.send(request)
        assert at_host.wait_for(match, 3.0) is not None, "probe never reached the host"
        leaked = at_b1.collect(match, ABSENCE_WINDOW)
    assert leaked == [], f"packet from network A was delivered on network B: {leaked[0]!r}"

    # Positive control, same routed shape inside A: delivered.
    got = probe(a1, net_a.bridge_mac, a2.ip4, a2.at, src=a1.ip4, dst=a2.ip4)
    assert got, "control: routed packet to a peer on the same network did not arrive"

    # Positive control, direct L2 to the peer: delivered.
    got = probe(a1, a2.mac, a2.ip4, a2.at, src=a1.ip4, dst=a2.ip4)
    assert got, "control: packet to a peer on the same network did not arrive"

    # The reverse direction is dropped too, as the kernel's own ping shows.
    assert unreachable(host, b1, a1.ip4), "b1 on network B can ping a1 on network A"


def test_icc_false_blocks_peers_not_gateway(host: Host) -> None:
    """With icc=false peers cannot reach each other, while the gateway still answers."""
    net = create_network(host, "noicc", "--subnet", "10.30.0.0/24", "--opt", "icc=false")
    s1 = attach(host, net, "s1")
    s2 = attach(host, net, "s2")

    got = probe(s1, s2.mac, s2.ip4, s2.at, src=s1.ip4, absent=True)
    assert got == [], "icc=false: a frame from s1 was delivered to s2"
    assert unreachable(host, s1, s2.ip4), "icc=false: s1 can ping s2"

    reply = echo_reply(s1, net.bridge_mac, net.gateway4, src=net.gateway4)
    assert reply is not None, "icc=false: the gateway does not answer"
    assert reachable(host, s2, net.gateway4)


# --------------------------------------------------------------------------- egress / NAT


def test_internal_network_has_no_egress(host: Host) -> None:
    """From an --internal network nothing reaches the outside; from a normal one it does."""
    outside = host.outside()
    internal = create_network(host, "private", "--internal", "--subnet", "10.40.0.0/24")
    normal = create_network(host, "public", "--subnet", "10.41.0.0/24")
    i1 = attach(host, internal, "i1")
    n1 = attach(host, normal, "n1")

    at_outside = (outside.name, outside.iface)
    got = probe(i1, internal.bridge_mac, outside.addr4, at_outside, dst=outside.addr4, absent=True)
    assert got == [], f"--internal: packet left the host: {got[0]!r}"
    assert unreachable(host, i1, outside.addr4)

    got = probe(n1, normal.bridge_mac, outside.addr4, at_outside, dst=outside.addr4)
    assert got, "control: a normal network's packet did not reach the outside"
    assert reachable(host, n1, outside.addr4)


@pytest.mark.parametrize("masquerade", [True, False], ids=["masquerade", "no-masquerade"])
def test_masquerade_source_address(host: Host, masquerade: bool) -> None:
    """Egress is masqueraded to the host's address (192.0.2.1) unless masquerade=false."""
    outside = host.outside()
    opts = [] if masquerade else ["--opt", "masquerade=false"]
    net = create_network(host, "egress", "--subnet", "10.50.0.0/24", *opts)
    s1 = attach(host, net, "s1")

    seen, reply = egress_echo(outside, net, s1, v6=False, want_reply=masquerade)
    assert seen is not None, "echo request never reached the outside"
    expected_source = outside.host_addr4 if masquerade else s1.ip4
    assert seen[IP].src == expected_source
    if masquerade:
        # The reply is translated back to the sandbox.
        assert reply is not None, "masqueraded echo reply not delivered back to the sandbox"
    # The outside has no route to sandbox subnets: only masquerading makes ping work.
    if masquerade:
        assert reachable(host, s1, outside.addr4)
    else:
        assert unreachable(host, s1, outside.addr4)


def test_masquerade_ipv6(host: Host) -> None:
    """IPv6 egress from a dual-stack network leaves with the host's address 2001:db8:99::1."""
    outside = host.outside()
    net = create_network(
        host, "egress6", "--ipv6", "--subnet", "10.52.0.0/24", "--subnet", "fd00:52::/64"
    )
    s1 = attach(host, net, "s1")
    assert s1.ip6, "dual-stack endpoint has no IPv6 address"

    seen, reply = egress_echo(outside, net, s1, v6=True, want_reply=True)
    assert seen is not None, "IPv6 echo request never reached the outside"
    assert seen[IPv6].src == outside.host_addr6
    assert reply is not None, "masqueraded IPv6 echo reply not delivered back to the sandbox"
