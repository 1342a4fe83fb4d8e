"""The sans-IO resolver and its reply cache: wire format in, wire format (or a decision) out.

Queries are built with dnslib (and scapy for the fuzz loop); replies are parsed back with
dnslib, an implementation independent of the reply builder's code paths.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import struct
from collections.abc import Iterator

import pytest
from dns_builders import endpoint as make_endpoint
from dns_builders import network
from dnslib import EDNS0, QTYPE, RCODE, DNSQuestion, DNSRecord
from netstack.dns import cache as cache_module
from netstack.dns.cache import ReplyCache
from netstack.dns.records import Records, build_records, reverse_name
from netstack.dns.resolver import (
    BADVERS,
    DEFAULT_MAX_UDP,
    FORMERR,
    MAX_TCP,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    TTL,
    Forward,
    answer,
    error_reply,
    resolve,
    truncate,
)

WEB1, WEB2, DB, APP = "10.1.0.2", "10.1.0.3", "10.2.0.2", "10.1.0.4"
STRANGER = "192.0.2.1"
MANY = 60  # endpoints behind the alias "many": about 1000 bytes of A records


NETWORKS = [
    network("front", "front", "10.1.0.0/24", "fd00:1::/64", **{"dns.domain": "corp.test"}),
    network("back", "back", "10.2.0.0/24"),
]
BASE_ENDPOINTS = [
    make_endpoint("e1", "front", "web1", "10.1.0.2/24", "fd00:1::2/64", aliases=("web",)),
    make_endpoint("e2", "front", "web2", "10.1.0.3/24", aliases=("web",)),
    make_endpoint("e3", "back", "db", "10.2.0.2/24", aliases=("database",)),
    make_endpoint("e4", "front", "app", "10.1.0.4/24"),
]
REPLICAS = [
    make_endpoint(f"m{i}", "front", f"replica{i}", f"10.1.0.{100 + i}/24", aliases=("many",))
    for i in range(MANY)
]
ENDPOINTS = BASE_ENDPOINTS + REPLICAS


@pytest.fixture
def records() -> Records:
    return build_records(NETWORKS, ENDPOINTS, generation=1)


def query(
    name: str,
    qtype: str = "A",
    *,
    query_id: int = 0x1234,
    edns: int | None = None,
    version: int = 0,
    do: bool = False,
    rd: bool = True,
    qclass: str = "IN",
) -> bytes:
    message = DNSRecord.question(name, qtype, qclass)
    message.header.id = query_id
    message.header.rd = int(rd)
    if edns is not None:
        message.add_ar(EDNS0(udp_len=edns, version=version, flags="do" if do else ""))
    return bytes(message.pack())


def ask(
    records: Records,
    name: str,
    qtype: str = "A",
    client: str = WEB1,
    *,
    tcp: bool = False,
    max_udp: int = DEFAULT_MAX_UDP,
    **options: int | bool | str | None,
) -> DNSRecord:
    reply = answer(
        query(name, qtype, **options),  # type: ignore[arg-type]
        client,
        records,
        tcp=tcp,
        max_udp=max_udp,
    )
    assert isinstance(reply, bytes), reply
    return DNSRecord.parse(reply)


def data(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr]


def rcode(reply: DNSRecord) -> int:
    options = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    extended = (options[0].ttl >> 24) << 4 if options else 0
    return int(reply.header.rcode) | extended


# answers -----------------------------------------------------------------------------------


def test_a_record(records: Records) -> None:
    reply = ask(records, "web2")
    assert rcode(reply) == NOERROR
    assert data(reply) == ["10.1.0.3"]
    assert [rr.rtype for rr in reply.rr] == [QTYPE.A]
    assert [rr.ttl for rr in reply.rr] == [TTL]


def test_aaaa_record(records: Records) -> None:
    reply = ask(records, "web1", "AAAA", client=WEB2)
    assert data(reply) == ["fd00:1::2"]
    assert [rr.rtype for rr in reply.rr] == [QTYPE.AAAA]


def test_ptr_v4_and_v6(records: Records) -> None:
    v4 = ask(records, "2.0.2.10.in-addr.arpa", "PTR", client=DB)
    assert data(v4) == ["db."]
    v6 = ask(records, reverse_name(ipaddress.ip_address("fd00:1::2")), "PTR", client=WEB2)
    assert data(v6) == ["web1.corp.test."]
    assert [rr.rtype for rr in v6.rr] == [QTYPE.PTR]


@pytest.mark.parametrize("sandbox", ["my_app", "Web-1", "x" * 63])
def test_ptr_targets_with_unusual_characters(sandbox: str) -> None:
    table = build_records(NETWORKS, [make_endpoint("u", "back", sandbox, "10.2.0.9/24")])
    reply = ask(table, "9.0.2.10.in-addr.arpa", "PTR", client="10.2.0.9")
    assert [bytes(label) for label in reply.rr[0].rdata.label.label] == [sandbox.encode()]
    assert data(ask(table, sandbox.upper(), client="10.2.0.9")) == ["10.2.0.9"]


def test_alias_and_domain(records: Records) -> None:
    assert data(ask(records, "database", client=DB)) == ["10.2.0.2"]
    assert data(ask(records, "Web2.Corp.Test")) == ["10.1.0.3"]


def test_nodata_is_noerror_without_answers(records: Records) -> None:
    reply = ask(records, "web2", "AAAA")
    assert rcode(reply) == NOERROR
    assert reply.rr == []
    assert reply.header.aa == 1


def test_reply_header_echoes_the_query(records: Records) -> None:
    reply = ask(records, "WeB2", query_id=0xBEEF, rd=False)
    assert reply.header.id == 0xBEEF
    assert reply.header.qr == 1
    assert reply.header.aa == 1
    assert reply.header.ra == 1
    assert reply.header.rd == 0
    assert reply.header.tc == 0
    assert [bytes(label) for label in reply.q.qname.label] == [b"WeB2"]  # case kept (0x20)
    assert (reply.q.qtype, reply.q.qclass) == (QTYPE.A, 1)
    assert ask(records, "web2", rd=True).header.rd == 1


def test_case_insensitive(records: Records) -> None:
    assert data(ask(records, "WEB2.")) == ["10.1.0.3"]


def test_round_robin_rotates_between_queries(records: Records) -> None:
    orders = [data(ask(records, "web", client=APP)) for _ in range(3)]
    assert orders == [
        ["10.1.0.2", "10.1.0.3"],
        ["10.1.0.3", "10.1.0.2"],
        ["10.1.0.2", "10.1.0.3"],
    ]


# NXDOMAIN, REFUSED, forwarding -------------------------------------------------------------


def test_name_on_a_network_not_shared_is_nxdomain(records: Records) -> None:
    reply = ask(records, "db", client=WEB1)
    assert rcode(reply) == NXDOMAIN
    assert reply.rr == []
    assert reply.auth == []  # no SOA: clients do not cache the negative answer
    assert data(ask(records, "db", client=DB)) == ["10.2.0.2"]


def test_alias_scoping_on_the_wire(records: Records) -> None:
    assert rcode(ask(records, "database", client=WEB1)) == NXDOMAIN
    assert rcode(ask(records, "web", client=DB)) == NXDOMAIN


def test_ptr_across_networks_is_nxdomain(records: Records) -> None:
    assert rcode(ask(records, "2.0.2.10.in-addr.arpa", "PTR", client=WEB1)) == NXDOMAIN


def test_unknown_client_is_refused(records: Records) -> None:
    for name in ("web1", "example.com"):
        reply = ask(records, name, client=STRANGER)
        assert rcode(reply) == REFUSED
        assert reply.rr == []
        assert str(reply.q.qname) == name + "."


def test_stranger_sending_garbage_gets_nothing(records: Records) -> None:
    assert answer(b"\x12\x34" + b"\x01\x00" + b"\x00\x01" + b"\xff" * 20, STRANGER, records) is None


@pytest.mark.parametrize("name", ["example.com", "www.example.org.", "8.8.8.8.in-addr.arpa"])
def test_external_names_are_forwarded(records: Records, name: str) -> None:
    wire = query(name, "PTR" if "arpa" in name else "A")
    result = answer(wire, WEB1, records)
    assert isinstance(result, Forward)
    assert result.query == wire
    assert result.qname == name.rstrip(".")
    assert result.udp_size == 512


def test_forward_carries_the_client_size(records: Records) -> None:
    result = answer(query("example.com", "MX", edns=4096), WEB1, records)
    assert isinstance(result, Forward)
    assert (result.qtype, result.udp_size) == ("TYPE15", DEFAULT_MAX_UDP)
    tcp = answer(query("example.com"), WEB1, records, tcp=True)
    assert isinstance(tcp, Forward)
    assert tcp.udp_size == MAX_TCP


def test_label_containing_a_dot_is_not_ours(records: Records) -> None:
    message = DNSRecord(q=DNSQuestion("x"))
    message.q.qname.label = (b"web1.corp", b"test")
    assert isinstance(answer(bytes(message.pack()), WEB1, records), Forward)


def test_other_classes_are_refused(records: Records) -> None:
    assert rcode(ask(records, "version.bind", "TXT", qclass="CH")) == REFUSED


# EDNS0 and truncation ----------------------------------------------------------------------


def test_without_edns_a_large_answer_is_truncated(records: Records) -> None:
    reply = answer(query("many"), WEB1, records)
    assert isinstance(reply, bytes)
    assert len(reply) <= 512
    parsed = DNSRecord.parse(reply)
    assert parsed.header.tc == 1
    assert parsed.rr == []
    assert str(parsed.q.qname) == "many."
    assert parsed.ar == []


def test_edns_size_is_honoured(records: Records) -> None:
    reply = answer(query("many", edns=4096), WEB1, records)
    assert isinstance(reply, bytes)
    assert 512 < len(reply) <= DEFAULT_MAX_UDP
    parsed = DNSRecord.parse(reply)
    assert parsed.header.tc == 0
    assert len(parsed.rr) == MANY
    (option,) = parsed.ar
    assert option.rtype == QTYPE.OPT
    assert option.rclass == DEFAULT_MAX_UDP  # what we advertise


def test_edns_size_too_small_for_the_answer_truncates(records: Records) -> None:
    parsed = ask(records, "many", edns=800)
    assert parsed.header.tc == 1
    assert parsed.rr == []
    assert [rr.rtype for rr in parsed.ar] == [QTYPE.OPT]


def test_edns_size_below_512_counts_as_512(records: Records) -> None:
    assert ask(records, "web", edns=100).header.tc == 0
    assert ask(records, "many", edns=100).header.tc == 1


def test_server_cap_bounds_the_client_size(records: Records) -> None:
    parsed = ask(records, "many", edns=4096, max_udp=700)
    assert parsed.header.tc == 1
    assert parsed.ar[0].rclass == 700


def test_tcp_is_never_truncated_at_udp_sizes(records: Records) -> None:
    parsed = ask(records, "many", tcp=True)
    assert parsed.header.tc == 0
    assert len(parsed.rr) == MANY


def test_do_bit_is_copied(records: Records) -> None:
    parsed = ask(records, "web1", edns=1232, do=True)
    assert parsed.ar[0].ttl & 0x8000
    assert not ask(records, "web1", edns=1232).ar[0].ttl & 0x8000


def test_unknown_edns_version_is_badvers(records: Records) -> None:
    parsed = ask(records, "web1", edns=1232, version=1)
    assert rcode(parsed) == BADVERS
    assert parsed.rr == []


# malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize("wire", [b"", b"\x00", b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00"])
def test_shorter_than_a_header_is_dropped(records: Records, wire: bytes) -> None:
    assert answer(wire, WEB1, records) is None


def test_responses_are_never_answered(records: Records) -> None:
    reply = answer(query("web1"), WEB1, records)
    assert isinstance(reply, bytes)
    assert answer(reply, WEB1, records) is None


def test_unparseable_question_is_formerr_with_the_id(records: Records) -> None:
    wire = struct.pack("!HHHHHH", 0xABCD, 0x0100, 1, 0, 0, 0) + b"\x05ab"  # label cut short
    reply = answer(wire, WEB1, records)
    assert isinstance(reply, bytes)
    parsed = DNSRecord.parse(reply)
    assert parsed.header.id == 0xABCD
    assert parsed.header.qr == 1
    assert parsed.header.rd == 1
    assert rcode(parsed) == FORMERR


def test_no_question_is_formerr(records: Records) -> None:
    wire = struct.pack("!HHHHHH", 7, 0x0100, 0, 0, 0, 0)
    assert rcode(DNSRecord.parse(answer(wire, WEB1, records))) == FORMERR  # type: ignore[arg-type]


def test_two_questions_are_formerr(records: Records) -> None:
    message = DNSRecord.question("web1")
    message.add_question(DNSQuestion("web2"))
    reply = answer(bytes(message.pack()), WEB1, records)
    assert isinstance(reply, bytes)
    assert rcode(DNSRecord.parse(reply)) == FORMERR


def test_two_opt_records_are_formerr(records: Records) -> None:
    message = DNSRecord.question("web1")
    message.add_ar(EDNS0(udp_len=1232))
    message.add_ar(EDNS0(udp_len=1232))
    reply = answer(bytes(message.pack()), WEB1, records)
    assert isinstance(reply, bytes)
    assert rcode(DNSRecord.parse(reply)) == FORMERR


def test_label_too_long_to_echo_is_formerr(records: Records) -> None:
    wire = struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\x40" + b"a" * 64 + b"\0\0\1\0\1"
    reply = answer(wire, WEB1, records)
    assert isinstance(reply, bytes)
    assert rcode(DNSRecord.parse(reply)) == FORMERR


@pytest.mark.parametrize("opcode", [1, 2, 4, 5])
def test_other_opcodes_are_notimp(records: Records, opcode: int) -> None:
    message = DNSRecord.question("web1")
    message.header.opcode = opcode
    reply = answer(bytes(message.pack()), WEB1, records)
    assert isinstance(reply, bytes)
    parsed = DNSRecord.parse(reply)
    assert rcode(parsed) == NOTIMP
    assert parsed.header.opcode == opcode


def mutations(rng: random.Random, seeds: list[bytes]) -> Iterator[bytes]:
    """Random bytes, then valid queries with flipped bits, cut, spliced or with wrong counts."""
    for _ in range(500):
        yield rng.randbytes(rng.randrange(0, 600))
    for _ in range(1000):
        packet = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 6)):
            kind = rng.randrange(5)
            position = rng.randrange(len(packet)) if packet else 0
            if kind == 0 and packet:
                packet[position] ^= 1 << rng.randrange(8)
            elif kind == 1 and packet:
                packet[position] = rng.randrange(256)
            elif kind == 2:
                del packet[position:]
            elif kind == 3:
                packet[position:position] = rng.randbytes(rng.randrange(1, 20))
            elif len(packet) >= 12:
                offset = 4 + 2 * rng.randrange(4)
                packet[offset : offset + 2] = struct.pack("!H", rng.choice([0, 1, 2, 255, 65535]))
        if len(packet) > 2:
            packet[2] &= 0x7F  # mostly queries, so the parser gets past the QR check
        yield bytes(packet)


def scapy_packets(rng: random.Random, count: int) -> Iterator[bytes]:
    from scapy.layers.dns import DNS, DNSQR
    from scapy.packet import fuzz

    produced = 0
    while produced < count:
        try:
            packet = bytes(fuzz(DNS(qd=DNSQR(qname=rng.choice([b"web1", b"example.com"])))))
        except Exception:
            continue  # scapy sometimes cannot serialise what it fuzzed
        produced += 1
        yield packet


def test_fuzz_never_raises_and_keeps_serving(
    records: Records, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(20240604)
    seeds = [
        query("web1"),
        query("many", edns=4096),
        query("example.com", "MX", edns=1232, do=True),
        query("2.0.1.10.in-addr.arpa", "PTR"),
        query(reverse_name(ipaddress.ip_address("fd00:1::2")), "PTR"),
    ]
    packets = [*mutations(rng, seeds), *scapy_packets(rng, 500)]
    assert len(packets) == 2000
    cache = ReplyCache()
    replies = 0
    with caplog.at_level(logging.ERROR, logger="netstack.dns"):
        for packet in packets:
            for client in (WEB1, STRANGER):
                for tcp in (False, True):
                    for result in (
                        answer(packet, client, records, tcp=tcp),
                        cache.answer(packet, client, records, tcp=tcp),
                    ):
                        if isinstance(result, bytes):
                            replies += 1
                            assert result[:2] == packet[:2]
                            assert result[2] & 0x80  # QR
                            assert tcp or len(result) <= DEFAULT_MAX_UDP
                            DNSRecord.parse(result)  # what we send is well-formed
                        else:
                            assert result is None or isinstance(result, Forward)
    assert replies > 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no internal errors
    assert data(ask(records, "web2")) == ["10.1.0.3"]
    hit = cache.answer(query("web2"), WEB1, records)
    assert isinstance(hit, bytes)
    assert data(DNSRecord.parse(hit)) == ["10.1.0.3"]


# helpers for the daemon's forwarding path --------------------------------------------------


def test_error_reply_echoes_the_question() -> None:
    reply = error_reply(query("example.com", query_id=77, edns=1232), SERVFAIL)
    assert reply is not None
    parsed = DNSRecord.parse(reply)
    assert (parsed.header.id, rcode(parsed)) == (77, SERVFAIL)
    assert str(parsed.q.qname) == "example.com."
    assert RCODE[parsed.header.rcode] == "SERVFAIL"


def test_error_reply_on_garbage() -> None:
    assert error_reply(b"\x00\x01") is None
    reply = error_reply(b"\x00\x07\x01\x00\x00\x01" + b"\xff" * 10)
    assert reply is not None
    assert DNSRecord.parse(reply).header.id == 7


def test_truncate(records: Records) -> None:
    big = answer(query("many", edns=4096), WEB1, records)
    assert isinstance(big, bytes)
    assert truncate(big, 4096) == big
    cut = truncate(big, 512)
    parsed = DNSRecord.parse(cut)
    assert len(cut) <= 512
    assert parsed.header.tc == 1
    assert parsed.rr == []
    assert parsed.header.id == 0x1234
    assert truncate(b"\x00\x01\x81\x80" + b"\xff" * 600, 512)[:2] == b"\x00\x01"


# reply cache -------------------------------------------------------------------------------


def test_cache_hit_is_the_same_bytes_but_the_id(records: Records) -> None:
    cache = ReplyCache()
    first = cache.answer(query("web2", query_id=1), WEB1, records)
    second = cache.answer(query("web2", query_id=2), WEB1, records)
    assert isinstance(first, bytes)
    assert isinstance(second, bytes)
    assert (cache.misses, cache.hits) == (1, 1)
    assert first[:2] == b"\x00\x01"
    assert second[:2] == b"\x00\x02"
    assert first[2:] == second[2:]
    fresh = answer(query("web2", query_id=2), WEB1, build_records(NETWORKS, ENDPOINTS))
    assert second == fresh


def test_cache_is_shared_by_clients_of_one_scope_only(records: Records) -> None:
    cache = ReplyCache()
    cache.answer(query("web1"), WEB2, records)
    reply = cache.answer(query("web1"), APP, records)
    assert cache.hits == 1
    assert isinstance(reply, bytes)
    assert data(DNSRecord.parse(reply)) == ["10.1.0.2"]
    other = cache.answer(query("web1"), DB, records)
    assert isinstance(other, bytes)
    assert rcode(DNSRecord.parse(other)) == NXDOMAIN
    assert cache.hits == 1


def test_cache_is_dropped_when_records_change(records: Records) -> None:
    cache = ReplyCache()
    cache.answer(query("web2"), WEB1, records)
    cache.answer(query("web2"), WEB1, records)
    assert (cache.hits, cache.generation, len(cache)) == (1, 1, 1)
    moved = [e for e in ENDPOINTS if e.sandbox != "web2"]
    moved.append(make_endpoint("e2b", "front", "web2", "10.1.0.30/24"))
    changed = build_records(NETWORKS, moved, generation=2)
    reply = cache.answer(query("web2"), WEB1, changed)
    assert isinstance(reply, bytes)
    assert data(DNSRecord.parse(reply)) == ["10.1.0.30"]
    assert (cache.hits, cache.generation) == (1, 2)
    gone = build_records(NETWORKS, [e for e in moved if e.sandbox != "web2"], generation=3)
    reply = cache.answer(query("web2"), WEB1, gone)
    assert isinstance(reply, bytes)
    assert rcode(DNSRecord.parse(reply)) == NXDOMAIN


def test_cache_keeps_round_robin(records: Records) -> None:
    cache = ReplyCache()
    orders = []
    for query_id in range(5):
        reply = cache.answer(query("web", query_id=query_id), APP, records)
        assert isinstance(reply, bytes)
        assert reply[:2] == struct.pack("!H", query_id)
        orders.append(data(DNSRecord.parse(reply)))
    assert orders == [["10.1.0.2", "10.1.0.3"], ["10.1.0.3", "10.1.0.2"]] * 2 + [
        ["10.1.0.2", "10.1.0.3"]
    ]
    assert (cache.misses, cache.hits, len(cache)) == (1, 4, 1)


def test_cache_rotates_answers_it_does_not_store(
    records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "MAX_STORED_ROTATIONS", 1)
    cache = ReplyCache()
    orders = []
    for _ in range(3):
        reply = cache.answer(query("web"), APP, records)
        assert isinstance(reply, bytes)
        orders.append(data(DNSRecord.parse(reply)))
    assert orders[0] != orders[1]
    assert orders[0] == orders[2]


def test_cache_separates_udp_and_tcp(records: Records) -> None:
    cache = ReplyCache()
    udp = cache.answer(query("many"), WEB1, records)
    tcp = cache.answer(query("many"), WEB1, records, tcp=True)
    assert isinstance(udp, bytes)
    assert isinstance(tcp, bytes)
    assert DNSRecord.parse(udp).header.tc == 1
    assert len(DNSRecord.parse(tcp).rr) == MANY


def test_cache_does_not_keep_refusals_forwards_or_errors(records: Records) -> None:
    cache = ReplyCache()
    assert isinstance(cache.answer(query("web1"), STRANGER, records), bytes)
    assert isinstance(cache.answer(query("example.com"), WEB1, records), Forward)
    assert isinstance(
        cache.answer(struct.pack("!HHHHHH", 7, 0x100, 0, 0, 0, 0), WEB1, records), bytes
    )
    assert len(cache) == 0


def test_cache_is_bounded(records: Records) -> None:
    cache = ReplyCache(max_entries=2)
    for name in ("web1", "web2", "app"):
        cache.answer(query(name), WEB1, records)
    assert len(cache) == 2
    cache.answer(query("web1"), WEB1, records)
    assert cache.hits == 0  # the oldest entry went first


def test_resolve_reports_cache_metadata(records: Records) -> None:
    from netstack.dns.resolver import Reply

    rotating = resolve(query("web"), APP, records, rotation=0)
    assert isinstance(rotating, Reply)
    assert (rotating.rotations, rotating.cacheable) == (2, True)
    truncated = resolve(query("many"), WEB1, records, rotation=0)
    assert isinstance(truncated, Reply)
    assert truncated.rotations == 1  # nothing left to rotate in a TC reply
    refused = resolve(query("web"), STRANGER, records)
    assert isinstance(refused, Reply)
    assert not refused.cacheable
