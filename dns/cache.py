"""A cache of reply bytes: the resolver's hot path.

Measured here (DESIGN.md, section 2): building every reply with dnslib caps the server at
about 12k queries/s; returning cached reply bytes with only the 2-byte id patched is what
lets the I/O loop reach 160k+. So a hit here is one dict lookup for the client's scope, one
for the reply, and one bytes concatenation; no parsing.

Key: (client scope, transport, query bytes after the id). The scope (the networks the
client's sandbox is on) rather than the client address, because every client of one scope
gets the same answers, so one entry serves them all. The transport, because a UDP reply
may be truncated where the TCP one is not. Everything else a reply depends on (flags, the
question as spelled, the EDNS0 OPT record and its size) is in the query bytes; the reply
echoes the question byte for byte, so a hit is exactly what a miss would have built.

Invalidation: the whole cache is dropped as soon as it is handed a `Records` other than
the one its entries came from (each rebuild of the records is a new object with a new
`generation`), so a connect or disconnect is visible on the very next query.

Round robin: an entry for an answer with n addresses keeps the n rotated replies, built
lazily (step k is built the first time the cursor reaches it), and a cursor that advances
on each hit, so successive queries still cycle through every order at cache speed.
Excluding such names from the cache instead would put exactly the names that serve load
(several replicas behind one alias) on the slow path. Replies with more than
`MAX_STORED_ROTATIONS` orders keep only the cursor and are rebuilt per query: n stored
orders of n addresses grow as n², and such answers do not fit a UDP reply anyway.

Never cached: replies to strangers (REFUSED), FORMERR/NOTIMP/SERVFAIL, and forwarded
queries (their cost is the upstream round trip, not the parse). The cache holds at most
`max_entries` entries; the oldest goes first.

Not thread-safe: give each serving thread its own cache (they are cheap).
"""

from __future__ import annotations

from collections.abc import Iterator

from netstack.dns.records import Records, Scope
from netstack.dns.resolver import DEFAULT_MAX_UDP, Forward, Reply, resolve

MAX_STORED_ROTATIONS = 64

_Key = tuple[Scope, bool, bytes]


class _Rotating:
    """The replies of one multi-address answer, one per round-robin step, and the cursor."""

    __slots__ = ("cursor", "store", "variants")

    def __init__(
        self, first: bytes, step: int, count: int, store: bool, cursor: Iterator[int]
    ) -> None:
        self.variants: list[bytes | None] = [None] * count
        if store:
            self.variants[step] = first
        self.cursor = cursor  # the records' cursor for this name: shared by every cache
        self.store = store


class ReplyCache:
    """Reply bytes by (client scope, transport, question bytes), for one `Records` at a time."""

    def __init__(self, *, max_udp: int = DEFAULT_MAX_UDP, max_entries: int = 10_000) -> None:
        self.max_udp = max_udp
        self.max_entries = max(1, max_entries)
        self.hits = 0
        self.misses = 0
        self._records: Records | None = None
        self._entries: dict[_Key, bytes | _Rotating] = {}

    @property
    def generation(self) -> int | None:
        """The generation of the records the entries belong to (None before the first query)."""
        return None if self._records is None else self._records.generation

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry. Idempotent."""
        self._entries.clear()

    def answer(
        self, query: bytes, client_ip: str, records: Records, *, tcp: bool = False
    ) -> bytes | Forward | None:
        """What `resolver.answer` returns for this query, from the cache when possible.

        Handing in a `Records` other than the previous call's drops every entry first.
        Never raises.
        """
        if records is not self._records:
            self._entries.clear()
            self._records = records
        scope = records.scope(client_ip)
        if scope is None:  # strangers: refused or dropped, never cached
            return _wire(resolve(query, client_ip, records, max_udp=self.max_udp, tcp=tcp))
        key = (scope, tcp, query[2:])
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return self._miss(key, query, scope, records, tcp)
        self.hits += 1
        if isinstance(entry, bytes):
            return query[:2] + entry[2:]
        step = next(entry.cursor) % len(entry.variants)
        wire = entry.variants[step]
        if wire is None:
            result = resolve(query, scope, records, max_udp=self.max_udp, tcp=tcp, rotation=step)
            if not isinstance(result, Reply):
                return result
            wire = result.wire
            if entry.store:
                entry.variants[step] = wire
        return query[:2] + wire[2:]

    def _miss(
        self, key: _Key, query: bytes, scope: Scope, records: Records, tcp: bool
    ) -> bytes | Forward | None:
        # The records' own cursor picks the first order, so clients whose queries never
        # repeat byte for byte (a fresh EDNS cookie each time, as dig sends) still rotate.
        result = resolve(query, scope, records, max_udp=self.max_udp, tcp=tcp)
        if not isinstance(result, Reply) or not result.cacheable:
            return _wire(result)
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        if result.rotations > 1 and result.cursor is not None:
            store = result.rotations <= MAX_STORED_ROTATIONS
            self._entries[key] = _Rotating(
                result.wire, result.step, result.rotations, store, result.cursor
            )
        else:
            self._entries[key] = result.wire
        return result.wire


def _wire(result: Reply | Forward | None) -> bytes | Forward | None:
    return result.wire if isinstance(result, Reply) else result
