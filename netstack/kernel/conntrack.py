"""Conntrack entries of published ports, removed through netlink (pyroute2)."""

from __future__ import annotations

import logging
import socket

from pyroute2 import Conntrack, NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

log = logging.getLogger(__name__)

_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": socket.IPPROTO_SCTP}


def _delete_matching(orig: NFCTAttrTuple | None, reply: NFCTAttrTuple | None) -> int:
    removed = 0
    with Conntrack() as ct:
        for entry in list(ct.dump_entries(tuple_orig=orig, tuple_reply=reply)):
            try:
                ct.delete(entry)
                removed += 1
            except NetlinkError:  # expired meanwhile
                continue
    return removed


def forget_host_port(protocol: str, host_port: int) -> int:
    """Drop flows addressed to a host port (before it is (re)published). Best effort."""
    removed = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        orig = NFCTAttrTuple(family=family, proto=_PROTOCOLS[protocol], dport=host_port)
        removed += _delete_matching(orig, None)
    log.debug("conntrack: %d flow(s) to host port %s/%d removed", removed, protocol, host_port)
    return removed


def forget_destination(protocol: str, address: str, port: int) -> int:
    """Drop flows translated to address:port (a removed mapping's target). Best effort."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    reply = NFCTAttrTuple(family=family, proto=_PROTOCOLS[protocol], saddr=address, sport=port)
    removed = _delete_matching(None, reply)
    log.debug("conntrack: %d flow(s) to %s:%d/%s removed", removed, address, port, protocol)
    return removed
