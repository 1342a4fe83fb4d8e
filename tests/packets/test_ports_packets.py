"""Packet-level tests of published ports: SCTP through the DNAT maps.

This kernel has no SCTP sockets, so an SCTP association cannot be opened; instead an
SCTP INIT is crafted with scapy in the outside namespace, sent to the host's published
port, and sniffed on the sandbox's interface: it must arrive translated (sandbox address,
container port) with the client's own source address. A TCP SYN to the same published
port number is the negative control: only the SCTP mapping exists.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any

import pytest
from netns_scapy import PacketSocket
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.layers.sctp import SCTP, SCTPChunkInit, crc32c
from scapy.packet import Packet

if TYPE_CHECKING:
    from conftest import Host, Outside

pytestmark = pytest.mark.root

ARRIVAL_TIMEOUT = 3.0
ABSENCE_WINDOW = 1.0
CLIENT_PORT = 40868


def outside_mac(out: Outside) -> str:
    links = json.loads(out.run("ip", "-j", "link", "show", "dev", out.iface).stdout)
    return str(links[0]["address"])


def sandbox_endpoint(host: Host, sandbox: str) -> dict[str, Any]:
    (info,) = host.netctl_json("sandbox", "inspect", sandbox)
    (endpoint,) = info["Endpoints"]
    return dict(endpoint)


def sctp_init(out: Outside, host_mac: str, dport: int, tag: int) -> Packet:
    return (
        Ether(src=outside_mac(out), dst=host_mac)
        / IP(src=out.addr4, dst=out.host_addr4)
        / SCTP(sport=CLIENT_PORT, dport=dport, tag=0)
        / SCTPChunkInit(init_tag=tag, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1)
    )


def is_init(tag: int, dst: str, dport: int) -> Any:
    """Match the crafted INIT (by its init tag) as it should arrive in the sandbox."""

    def match(packet: Packet) -> bool:
        return bool(
            packet.haslayer(SCTPChunkInit)
            and packet[SCTPChunkInit].init_tag == tag
            and packet[IP].dst == dst
            and packet[SCTP].dport == dport
        )

    return match


def test_sctp_init_arrives_translated(host: Host) -> None:
    """INIT to 192.0.2.1:13868/sctp arrives at SANDBOX_IP:3868 from 192.0.2.2."""
    out = host.outside()
    host.netctl("network", "create", "--subnet", "10.95.0.0/24", "pub")
    web = host.sandbox("web")
    host.netctl("network", "connect", "-p", "13868:3868/sctp", "pub", web)
    endpoint = sandbox_endpoint(host, web)
    assert endpoint["Ports"] == [
        {"HostIp": "", "HostPort": 13868, "ContainerPort": 3868, "Protocol": "sctp"}
    ]
    address = endpoint["IPv4Address"].split("/")[0]
    host_mac = host.link_mac(out.host_iface)

    tag = secrets.randbelow(0xFFFFFFFE) + 1
    with PacketSocket(web, endpoint["Interface"]) as sniff, PacketSocket(out.name, out.iface) as tx:
        found = None
        for _ in range(3):  # the first one may wait for the host to resolve the sandbox's MAC
            tx.send(sctp_init(out, host_mac, 13868, tag))
            found = sniff.wait_for(is_init(tag, address, 3868), ARRIVAL_TIMEOUT / 3)
            if found is not None:
                break
    assert found is not None, "the SCTP INIT never reached the sandbox"
    assert found[IP].src == out.addr4  # the client's address is kept
    assert found[SCTP].sport == CLIENT_PORT
    # The checksum covers the ports: NAT must have recomputed it (CRC32c).
    raw = bytearray(bytes(found[SCTP]))
    claimed = int.from_bytes(raw[8:12], "big")
    raw[8:12] = b"\0\0\0\0"
    assert crc32c(bytes(raw)) == claimed, "SCTP checksum not updated after translation"


def test_sctp_mapping_does_not_translate_tcp(host: Host) -> None:
    """A TCP SYN to the SCTP-published port number is not forwarded to the sandbox."""
    out = host.outside()
    host.netctl("network", "create", "--subnet", "10.96.0.0/24", "pub")
    web = host.sandbox("web")
    host.netctl("network", "connect", "-p", "13868:3868/sctp", "pub", web)
    endpoint = sandbox_endpoint(host, web)
    address = endpoint["IPv4Address"].split("/")[0]
    host_mac = host.link_mac(out.host_iface)
    tag = secrets.randbelow(0xFFFFFFFE) + 1
    syn = (
        Ether(src=outside_mac(out), dst=host_mac)
        / IP(src=out.addr4, dst=out.host_addr4)
        / TCP(sport=CLIENT_PORT, dport=13868, flags="S", seq=tag)
    )

    def is_syn(packet: Packet) -> bool:
        return bool(packet.haslayer(TCP) and packet[TCP].seq == tag)

    with PacketSocket(web, endpoint["Interface"]) as sniff, PacketSocket(out.name, out.iface) as tx:
        # Positive control first: the SCTP INIT does arrive by this path.
        tx.send(sctp_init(out, host_mac, 13868, tag))
        assert sniff.wait_for(is_init(tag, address, 3868), ARRIVAL_TIMEOUT) is not None
        tx.send(syn)
        assert sniff.collect(is_syn, ABSENCE_WINDOW) == []
