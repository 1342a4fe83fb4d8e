"""Scapy helpers that send and sniff inside named network namespaces.

Sockets are made the way STYLE.md asks, with ``netstack.kernel.netns.run_in``: a
short-lived thread enters the namespace (``setns`` on ``/run/netns/NAME``), creates and
binds an ``AF_PACKET`` socket, and exits; the socket stays bound to that namespace while
the test process never leaves its own. Scapy is used only to build and parse frames
(bytes in, bytes out): its own interface lookup reads the test process's namespace, so
it is never asked to resolve an interface or fill in a MAC address. Always give explicit
Ethernet addresses.
"""

from __future__ import annotations

import secrets
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from netstack.kernel.netns import run_in

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"

Match = Callable[[Packet], bool]


@dataclass
class Frame:
    """One captured frame: parsed packet, raw bytes and whether we sent it."""

    packet: Packet
    raw: bytes
    outgoing: bool


class PacketSocket:
    """An AF_PACKET socket bound to one interface inside a network namespace.

    Everything seen on the interface from the moment it is opened is captured,
    so open the sniffing side before sending.
    """

    def __init__(self, netns: str, iface: str) -> None:
        self.netns = netns
        self.iface = iface

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            try:
                sock.bind((iface, ETH_P_ALL))
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            return sock

        self.sock: socket.socket = run_in(netns, make)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> PacketSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, packet: Packet) -> None:
        """Send one complete Ethernet frame out of the interface."""
        self.sock.send(bytes(packet))

    def frames(self, duration: float) -> Iterator[Frame]:
        """Yield frames seen on the interface until duration seconds have passed."""
        deadline = time.monotonic() + duration
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                return
            while True:
                try:
                    data, address = self.sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if address[0] != self.iface:
                    continue
                yield Frame(Ether(data), data, address[2] == PACKET_OUTGOING)

    def wait_for(self, match: Match, timeout: float = 3.0) -> Packet | None:
        """The first incoming frame satisfying match within timeout, else None."""
        for frame in self.frames(timeout):
            if not frame.outgoing and match(frame.packet):
                return frame.packet
        return None

    def collect(self, match: Match, duration: float = 1.0) -> list[Packet]:
        """Every incoming frame satisfying match during the whole duration."""
        return [f.packet for f in self.frames(duration) if not f.outgoing and match(f.packet)]


def send_and_sniff(
    sender: tuple[str, str],
    packet: Packet,
    sniffer: tuple[str, str],
    match: Match,
    duration: float = 1.0,
    stop_at_first: bool = True,
) -> list[Packet]:
    """Send packet from (netns, iface) while sniffing on (netns, iface); return matches.

    The sniffer is opened first. With stop_at_first the wait ends at the first match
    (positive checks); otherwise it lasts the whole duration (showing absence).
    """
    with PacketSocket(*sniffer) as sniff, PacketSocket(*sender) as send:
        send.send(packet)
        if stop_at_first:
            found = sniff.wait_for(match, duration)
            return [found] if found is not None else []
        return sniff.collect(match, duration)


def send_and_receive(
    netns: str, iface: str, packet: Packet, match: Match, timeout: float = 3.0
) -> Packet | None:
    """Send packet from (netns, iface) and return the first incoming frame matching."""
    with PacketSocket(netns, iface) as sock:
        sock.send(packet)
        return sock.wait_for(match, timeout)


# --------------------------------------------------------------------------- packets


def new_token() -> tuple[int, bytes]:
    """A random ICMP id and a unique payload, to recognise one probe among others."""
    return secrets.randbelow(0xFFFE) + 1, b"netstack-probe-" + secrets.token_hex(8).encode()


def arp_request(src_mac: str, src_ip: str, target_ip: str) -> Packet:
    """A broadcast ARP who-has target_ip from (src_mac, src_ip)."""
    return Ether(src=src_mac, dst=BROADCAST_MAC) / ARP(
        op="who-has", hwsrc=src_mac, psrc=src_ip, hwdst="00:00:00:00:00:00", pdst=target_ip
    )


def is_arp_reply(target_ip: str, to_mac: str) -> Match:
    """Match an ARP is-at for target_ip addressed to to_mac."""

    def match(packet: Packet) -> bool:
        return bool(
            packet.haslayer(ARP)
            and packet[ARP].op == 2
            and packet[ARP].psrc == target_ip
            and packet[ARP].hwdst.lower() == to_mac.lower()
        )

    return match


def echo_request(
    src_mac: str,
    dst_mac: str,
    src_ip: str,
    dst_ip: str,
    ident: int,
    payload: bytes,
    seq: int = 1,
) -> Packet:
    """An ICMP (or ICMPv6, by address family) echo request in an Ethernet frame."""
    ether = Ether(src=src_mac, dst=dst_mac)
    if ":" in dst_ip:
        return (
            ether
            / IPv6(src=src_ip, dst=dst_ip)
            / ICMPv6EchoRequest(id=ident, seq=seq, data=payload)
        )
    return ether / IP(src=src_ip, dst=dst_ip) / ICMP(type=8, id=ident, seq=seq) / Raw(payload)


def _icmp_fields(packet: Packet, want_reply: bool) -> tuple[str, str, int, bytes] | None:
    """(src, dst, id, payload) of an ICMP(v6) echo request/reply, else None."""
    if packet.haslayer(IP) and packet.haslayer(ICMP):
        icmp: Any = packet[ICMP]
        if icmp.type != (0 if want_reply else 8):
            return None
        payload = bytes(icmp.payload)
        return packet[IP].src, packet[IP].dst, int(icmp.id), payload
    layer = ICMPv6EchoReply if want_reply else ICMPv6EchoRequest
    if packet.haslayer(IPv6) and packet.haslayer(layer):
        echo: Any = packet[layer]
        return packet[IPv6].src, packet[IPv6].dst, int(echo.id), bytes(echo.data)
    return None


def is_echo(
    ident: int,
    payload: bytes,
    reply: bool,
    src: str | None = None,
    dst: str | None = None,
) -> Match:
    """Match an echo request (reply=False) or echo reply carrying payload.

    The payload is the key: NAT may rewrite a request's ICMP id on its way out. The
    id is checked for replies, which are seen back at the sender after un-NAT.
    """

    def match(packet: Packet) -> bool:
        fields = _icmp_fields(packet, reply)
        if fields is None:
            return False
        got_src, got_dst, got_id, got_payload = fields
        if payload not in got_payload:
            return False
        if reply and got_id != ident:
            return False
        if src is not None and got_src != src:
            return False
        return dst is None or got_dst == dst

    return match
