"""The sans-IO resolver: one query's bytes in, the reply's bytes (or a decision) out.

`answer(query, client_ip, records)` returns

- reply bytes, for everything netstack answers itself: A/AAAA/PTR data, NODATA, NXDOMAIN
  for names in netstack's part of the name space that this client may not see, REFUSED for
  clients that are no netstack endpoint, FORMERR/NOTIMP/BADVERS for queries it cannot serve;
- `Forward` for names outside netstack's part of the name space (the daemon relays them);
- None when the packet must be dropped (shorter than a header, a response rather than a
  query, or unparseable bytes from a stranger).

It never raises and does no I/O. Over TCP the daemon strips and adds the 2-byte length
prefix; `query` is the DNS message itself.

Choices:

- TTL `TTL` = 10 s. Docker answers with 600 s, which lets a caching client (nscd, a JVM,
  nginx's resolver) hold an address for ten minutes after the container went away or came
  back with a new address, and pins one order of a round-robin answer. Records here change
  within 100 ms of connect/disconnect, the server is local and cheap to ask, so a short TTL
  costs little; 10 s still lets a burst of lookups from one caching client cost one query.
- Negative answers (NXDOMAIN, NODATA) carry no SOA, so by RFC 2308 clients do not cache
  them: a name connected a moment later resolves at once.
- UDP size: 512 bytes without EDNS0 (RFC 1035); with an OPT record the client's size,
  clamped to [512, `max_udp`]. `max_udp` defaults to 1232, the DNS Flag Day 2020 value that
  avoids IP fragmentation, and is what our OPT record advertises. A reply that does not fit
  is sent with TC set and the question only (what Unbound and BIND do), so the client
  retries over TCP, where the limit is 65535.
- AA is set on netstack's own answers, RA on every reply (other names are forwarded), RD
  and CD are copied from the query, the question is echoed as sent (case preserved, which
  DNS 0x20 clients check), and the DO bit is copied into our OPT (RFC 3225).
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dnslib import (  # type: ignore[import-untyped]
    AAAA,
    EDNS0,
    PTR,
    QTYPE,
    RR,
    A,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSRecord,
)
from dnslib.label import DNSLabelError  # type: ignore[import-untyped]
from netstack.dns.records import (
    Answer,
    NotOurs,
    NxDomain,
    Records,
    Refused,
    Scope,
)

log = logging.getLogger(__name__)

TTL = 10
MIN_UDP = 512
DEFAULT_MAX_UDP = 1232
MAX_TCP = 65535

# rcodes (RFC 1035, 6891)
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16

_QR, _AA, _TC, _RD, _RA, _CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0010
_OPCODE_MASK = 0x7800
_DO = 0x8000
_HEADER = struct.Struct("!HHHHHH")
_TYPE_NAMES = {1: "A", 28: "AAAA", 12: "PTR", 255: "ANY"}
_CLASS_IN, _CLASS_ANY = 1, 255
_OPT = 41


@dataclass(frozen=True, slots=True)
class Forward:
    """The query is not netstack's: send `query` upstream and relay the reply.

    `query` is the client's message unchanged (the daemon may rewrite the id towards the
    upstream and must restore it). `udp_size` is what the client can take: relay a larger
    upstream reply through `truncate`. For a TCP client it is 65535.
    """

    query: bytes
    qname: str
    qtype: str
    udp_size: int


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply netstack built itself, with what a reply cache needs to know about it.

    `rotations` is the number of round-robin orders of this answer (the `rotation` values
    0..rotations-1 give different bytes) and `step` the one these bytes are in;
    `cacheable` is False for replies that depend on
    more than (client scope, query bytes after the id, records), or that strangers could
    use to fill a cache.
    """

    wire: bytes
    rotations: int = 1
    cacheable: bool = False
    step: int = 0
    cursor: Iterator[int] | None = field(default=None, compare=False, repr=False)


def type_name(qtype: int) -> str:
    """A query type's name as `Records.lookup` takes it ("A", "AAAA", "PTR", "ANY", "TYPE15")."""
    return _TYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def answer(
    query: bytes,
    client_ip: str,
    records: Records,
    *,
    max_udp: int = DEFAULT_MAX_UDP,
    tcp: bool = False,
    rotation: int | None = None,
) -> bytes | Forward | None:
    """Answer one query from `client_ip` (see the module docstring). Never raises.

    `rotation` picks the round-robin step; None advances the records' own cursor, so
    successive calls for a multi-address name rotate the order.
    """
    result = resolve(query, client_ip, records, max_udp=max_udp, tcp=tcp, rotation=rotation)
    return result.wire if isinstance(result, Reply) else result


def resolve(
    query: bytes,
    client: str | Scope,
    records: Records,
    *,
    max_udp: int = DEFAULT_MAX_UDP,
    tcp: bool = False,
    rotation: int | None = None,
) -> Reply | Forward | None:
    """`answer`, with the reply's cache metadata; `client` is an address or a known scope."""
    try:
        return _resolve(query, client, records, max_udp, tcp, rotation)
    except (DNSError, DNSLabelError, BufferError, ValueError) as error:
        # Parsed, but cannot be echoed back (e.g. a label over 63 bytes): the query's fault.
        log.debug("dns: cannot echo a query of %d bytes: %s", len(query), error)
        return _header_reply(query, FORMERR)
    except Exception:  # a bug must cost one query, never the server
        log.exception("dns: failed to answer a query of %d bytes", len(query))
        return _header_reply(query, SERVFAIL)


def _resolve(
    query: bytes,
    client: str | Scope,
    records: Records,
    max_udp: int,
    tcp: bool,
    rotation: int | None,
) -> Reply | Forward | None:
    if len(query) < _HEADER.size or query[2] & 0x80:
        return None  # no header, or a response: never answer those (no reply loops)
    scope = client if isinstance(client, tuple) else records.scope(client)
    try:
        message = DNSRecord.parse(query)
    except Exception:
        # Unparseable: a netstack client learns so; a stranger gets nothing.
        return None if scope is None else _header_reply(query, FORMERR)
    if scope is None:
        return Reply(_build(message, REFUSED, max_udp=max_udp, udp_size=MIN_UDP, tcp=tcp))
    header = message.header
    if header.opcode != 0:
        return Reply(_build(message, NOTIMP, max_udp=max_udp, udp_size=MIN_UDP, tcp=tcp))
    options = [rr for rr in message.ar if rr.rtype == _OPT]
    if len(message.questions) != 1 or len(options) > 1:
        return Reply(_build(message, FORMERR, max_udp=max_udp, udp_size=MIN_UDP, tcp=tcp))
    udp_size = MIN_UDP
    if options:
        if (options[0].ttl >> 16) & 0xFF != 0:  # EDNS version other than 0
            return Reply(
                _build(message, BADVERS, max_udp=max_udp, udp_size=MIN_UDP, tcp=tcp),
                cacheable=True,
            )
        udp_size = min(max(options[0].rclass, MIN_UDP), max(max_udp, MIN_UDP))
    question = message.questions[0]
    if question.qclass not in (_CLASS_IN, _CLASS_ANY):
        return Reply(
            _build(message, REFUSED, max_udp=max_udp, udp_size=udp_size, tcp=tcp),
            cacheable=True,
        )
    labels: tuple[bytes, ...] = tuple(question.qname.label)
    qtype = type_name(question.qtype)
    if any(b"." in label for label in labels):
        result: Answer | NxDomain | NotOurs | Refused = NotOurs()
    else:
        qname = b".".join(labels).decode("utf-8", "surrogateescape")
        result = records.lookup(scope, qname, qtype, rotation=rotation)
    if isinstance(result, NotOurs):
        name = str(question.qname).rstrip(".")
        return Forward(query, name, qtype, MAX_TCP if tcp else udp_size)
    if isinstance(result, Refused):
        return Reply(_build(message, REFUSED, max_udp=max_udp, udp_size=udp_size, tcp=tcp))
    if isinstance(result, NxDomain):
        wire = _build(message, NXDOMAIN, max_udp=max_udp, udp_size=udp_size, tcp=tcp, aa=True)
        return Reply(wire, cacheable=True)
    answers = _resource_records(question.qname, result)
    wire = _build(
        message,
        NOERROR,
        max_udp=max_udp,
        udp_size=udp_size,
        tcp=tcp,
        aa=True,
        answers=answers,
    )
    truncated = bool(wire[2] & (_TC >> 8))  # no answers left to rotate
    if truncated:
        return Reply(wire, cacheable=True)
    return Reply(
        wire,
        rotations=result.rotations,
        cacheable=True,
        step=result.step,
        cursor=result.cursor,
    )


def _resource_records(qname: Any, result: Answer) -> list[Any]:
    records: list[Any] = []
    for address in result.addresses:
        if isinstance(address, ipaddress.IPv4Address):
            records.append(RR(qname, QTYPE.A, rdata=A(str(address)), ttl=TTL))
        else:
            records.append(RR(qname, QTYPE.AAAA, rdata=AAAA(str(address)), ttl=TTL))
    for target in result.names:
        # Raw UTF-8 labels, the same bytes `Records.lookup` matches (no IDNA round trip).
        label = DNSLabel([part.encode("utf-8", "surrogateescape") for part in target.split(".")])
        records.append(RR(qname, QTYPE.PTR, rdata=PTR(label), ttl=TTL))
    return records


def _build(
    message: Any,
    rcode: int,
    *,
    max_udp: int,
    udp_size: int,
    tcp: bool,
    aa: bool = False,
    answers: list[Any] | None = None,
) -> bytes:
    """The reply to a parsed query: header, echoed question(s), answers, our OPT if asked."""
    query_header = message.header
    flags = _QR | _RA | (query_header.bitmap & (_RD | _CD | _OPCODE_MASK)) | (rcode & 0xF)
    if aa:
        flags |= _AA
    additional: list[Any] = []
    options = [rr for rr in message.ar if rr.rtype == _OPT]
    if options:
        do = "do" if options[0].ttl & _DO else ""
        additional.append(EDNS0(udp_len=max(max_udp, MIN_UDP), ext_rcode=rcode >> 4, flags=do))
    questions = message.questions if rcode != FORMERR else message.questions[:1]
    reply = DNSRecord(
        DNSHeader(id=query_header.id, bitmap=flags),
        questions=list(questions),
        rr=answers or [],
        ar=additional,
    )
    wire = bytes(reply.pack())
    limit = MAX_TCP if tcp else udp_size
    if len(wire) > limit:
        reply = DNSRecord(
            DNSHeader(id=query_header.id, bitmap=flags | _TC),
            questions=list(questions),
            ar=additional,
        )
        wire = bytes(reply.pack())
    return wire


def _header_reply(query: bytes, rcode: int) -> Reply | None:
    """A header-only reply (no sections) to a query whose header at least is readable."""
    if len(query) < _HEADER.size:
        return None
    query_id, flags = struct.unpack_from("!HH", query)
    flags = _QR | _RA | (flags & (_RD | _CD | _OPCODE_MASK)) | (rcode & 0xF)
    return Reply(_HEADER.pack(query_id, flags, 0, 0, 0, 0))


def error_reply(query: bytes, rcode: int = SERVFAIL) -> bytes | None:
    """A reply with `rcode` (e.g. SERVFAIL when every upstream failed) echoing the question.

    For the daemon's forwarding path. Falls back to a header-only reply when the query does
    not parse; None when it has no header or is itself a response. Never raises.
    """
    if len(query) < _HEADER.size or query[2] & 0x80:
        return None
    try:
        message = DNSRecord.parse(query)
        return _build(message, rcode, max_udp=DEFAULT_MAX_UDP, udp_size=MAX_TCP, tcp=True)
    except Exception:
        reply = _header_reply(query, rcode)
        return None if reply is None else reply.wire


def truncate(reply: bytes, limit: int) -> bytes:
    """`reply` if it fits in `limit` bytes, else its header and question with TC set.

    For relaying an upstream reply to a UDP client (`Forward.udp_size`). An OPT record is
    kept; a reply that does not parse is cut to its header. Never raises.
    """
    if len(reply) <= limit:
        return reply
    try:
        message = DNSRecord.parse(reply)
        message.header.tc = 1
        message.rr, message.auth = [], []
        message.ar = [rr for rr in message.ar if rr.rtype == _OPT]
        wire = bytes(message.pack())
        if len(wire) <= limit:
            return wire
    except Exception:
        pass
    if len(reply) < _HEADER.size:
        return reply[:limit]
    query_id, flags = struct.unpack_from("!HH", reply)
    return _HEADER.pack(query_id, flags | _TC, 0, 0, 0, 0)


__all__ = [
    "BADVERS",
    "DEFAULT_MAX_UDP",
    "FORMERR",
    "MAX_TCP",
    "MIN_UDP",
    "NOERROR",
    "NOTIMP",
    "NXDOMAIN",
    "REFUSED",
    "SERVFAIL",
    "TTL",
    "Forward",
    "Reply",
    "answer",
    "error_reply",
    "resolve",
    "truncate",
    "type_name",
]
