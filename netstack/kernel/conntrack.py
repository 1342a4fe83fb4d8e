"""Conntrack entries of published ports, removed through netlink (pyroute2).

One dump per address family and call, matched here against every port of the call: a
dump walks the whole conntrack hash (~10 ms), and the kernel's tuple filters miss IPv6
entries on this kernel, so filtering in the kernel per port is both slower and wrong.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

from pyroute2 import Conntrack, NetlinkError
from pyroute2.conntrack import ConntrackEntry

from netstack.errors import KernelError

log = logging.getLogger(__name__)

_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": socket.IPPROTO_SCTP}
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_COUNT = Path("/proc/sys/net/netfilter/nf_conntrack_count")


def _tracked() -> bool:
    """Whether this namespace tracks any flow at all (skips the dumps when it does not)."""
    try:
        return int(_COUNT.read_text()) > 0
    except (OSError, ValueError):
        return True


def _delete_where(versions: Iterable[int], doomed: Callable[[ConntrackEntry], bool]) -> int:
    """Delete every entry of the given IP versions for which `doomed(entry)` holds.

    The socket's family must be the entries' family (pyroute2 defaults to AF_INET).
    """
    removed = 0
    try:
        for version in sorted(set(versions)):
            with Conntrack(nfgen_family=_FAMILIES[version]) as ct:
                for entry in list(ct.dump_entries()):
                    if not doomed(entry):
                        continue
                    try:
                        ct.delete(entry)
                        removed += 1
                    except NetlinkError:  # expired meanwhile
                        continue
    except NetlinkError as exc:
        raise KernelError(f"conntrack cleanup failed: {exc}") from None
    return removed


STALE_PROTOCOLS = frozenset({"udp", "sctp"})
"""Protocols whose flows to a host port can outlive the mapping published for it.

A UDP (or SCTP) client keeps its source port, so a flow tracked before the mapping existed
(refused by the host, or translated to an earlier target) would capture every later
datagram of it. A TCP connection attempt to a port with no mapping is refused, and the
client's next connection comes from a new source port, so nothing stale can catch it; as
Docker does, TCP is left alone. This matters for speed: the only way to find the entries is
to dump the whole conntrack hash, which is shared by every namespace of the machine and
costs ~10 ms per family on a busy host (measured here: a CNI ADD with a TCP port mapping
took ~30 ms longer than one without, growing with the machine's conntrack table)."""


def forget_host_ports(ports: Iterable[tuple[str, int]]) -> int:
    """Drop flows addressed to these (protocol, host port)s, both families, for the
    protocols in `STALE_PROTOCOLS`. Best effort."""
    wanted = {
        (_PROTOCOLS[protocol], port) for protocol, port in ports if protocol in STALE_PROTOCOLS
    }
    if not wanted or not _tracked():
        return 0

    def doomed(entry: ConntrackEntry) -> bool:
        return (entry.tuple_orig.proto, entry.tuple_orig.dport) in wanted

    removed = _delete_where((4, 6), doomed)
    log.debug("conntrack: %d flow(s) to published host ports removed", removed)
    return removed


def forget_destinations(targets: Iterable[tuple[str, str, int]]) -> int:
    """Drop flows translated to these (protocol, address, port)s: removed mappings' targets."""
    wanted = {
        (_PROTOCOLS[protocol], ipaddress.ip_address(address), port)
        for protocol, address, port in targets
    }
    if not wanted or not _tracked():
        return 0

    def doomed(entry: ConntrackEntry) -> bool:
        reply = entry.tuple_reply
        if reply.saddr is None:
            return False
        return (reply.proto, ipaddress.ip_address(reply.saddr), reply.sport) in wanted

    removed = _delete_where((address.version for _p, address, _port in wanted), doomed)
    log.debug("conntrack: %d flow(s) to removed mappings' targets removed", removed)
    return removed
