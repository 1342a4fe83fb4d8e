"""DNS records of netstack's networks and the lookup that decides what a client may see.

Pure data, no I/O and no dnslib: `build_records` turns the store's networks and endpoints
into a `Records` table; `Records.lookup` answers one question for one client.

What a client sees (issue 4, Docker's user-defined networks):

- A client is a netstack endpoint, known by its address. Its *scope* is every network its
  sandbox is joined to (a sandbox on networks A and B resolves names on both, as in Docker).
  An address that is no endpoint's gets `Refused`: the resolver is never an open resolver.
- On each network, a sandbox's name and its endpoint's aliases resolve to that endpoint's
  addresses (A for IPv4, AAAA for IPv6). An alias exists only on the network it was given
  on. Several endpoints under one name give all their addresses, in connection order,
  rotated by one position per query (round robin).
- A network with the option ``dns.domain=D`` also answers ``name.D`` for each name on it.
- PTR: the reverse name of an endpoint address gives the sandbox name (``name.D`` when the
  network has a domain), if the client shares that network.
- Names are compared case-insensitively (ASCII only, RFC 4343), with or without the final dot.
- netstack's part of the name space: every single-label name, every name at or under the
  domain of one of the client's networks, every name another network defines (``name.D``
  included; other names under another network's domain D are forwarded: D may be a real
  domain that other sandboxes reach upstream), and the reverse names of every netstack
  subnet. A name there that does not exist for this client is `NxDomain` (names on
  networks the client does not share included); everything else is `NotOurs` and is
  forwarded upstream.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from netstack.model import Endpoint, EndpointRow, IPAddress, IPNetwork, Network
from netstack.network_options import DNS_DOMAIN

DOMAIN_OPTION = DNS_DOMAIN
"""The network option naming the network's DNS domain (``netctl network create --opt``)."""

Scope = tuple[str, ...]
"""The ids of the networks a client may resolve names on, in network order."""

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_HEX_DIGITS = frozenset("0123456789abcdef")
_V4_REVERSE = ".in-addr.arpa"
_V6_REVERSE = ".ip6.arpa"

T = TypeVar("T")


def fold(name: str) -> str:
    """A name's lookup key: without the final dot, ASCII letters in lower case."""
    return name.rstrip(".").translate(_ASCII_LOWER)


def reverse_name(address: IPAddress) -> str:
    """The PTR owner name of an address (``4.3.2.1.in-addr.arpa``, nibbles under ip6.arpa)."""
    return address.reverse_pointer


def parse_reverse_name(name: str) -> IPAddress | None:
    """The address a folded full-length reverse name stands for, or None if it is not one."""
    if name.endswith(_V4_REVERSE):
        octets = name[: -len(_V4_REVERSE)].split(".")
        if len(octets) != 4:
            return None
        try:
            return ipaddress.IPv4Address(".".join(reversed(octets)))
        except ValueError:
            return None
    if name.endswith(_V6_REVERSE):
        nibbles = name[: -len(_V6_REVERSE)].split(".")
        if len(nibbles) != 32 or not all(len(n) == 1 and n in _HEX_DIGITS for n in nibbles):
            return None
        return ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16))
    return None


def _client_address(client: str | IPAddress) -> IPAddress | None:
    """A client address as the kernel reports it, normalised (zone dropped, v4-mapped unwrapped)."""
    if isinstance(client, str):
        try:
            address: IPAddress = ipaddress.ip_address(client.partition("%")[0])
        except ValueError:
            return None
    else:
        address = client
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# lookup results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """The name exists for this client.

    `addresses` (A/AAAA) or `names` (PTR targets, without the final dot) hold the data of
    the asked type; both empty means the name exists without data of that type (NODATA).
    `rotations` is how many distinct orders round robin cycles this answer through
    (1 when there is nothing to rotate); `step` is the order this answer is in.
    """

    addresses: tuple[IPAddress, ...] = ()
    names: tuple[str, ...] = ()
    rotations: int = 1
    step: int = 0
    cursor: Iterator[int] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class NxDomain:
    """The name is in netstack's part of the name space but does not exist for this client."""


@dataclass(frozen=True, slots=True)
class NotOurs:
    """The name is outside netstack's part of the name space: forward it upstream."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The client is no netstack endpoint: it gets no service at all."""


LookupResult = Answer | NxDomain | NotOurs | Refused

NXDOMAIN = NxDomain()
NOT_OURS = NotOurs()
REFUSED = Refused()
NODATA = Answer()


@dataclass(frozen=True, slots=True)
class _Addresses:
    """The addresses one name has on one network."""

    v4: tuple[ipaddress.IPv4Address, ...] = ()
    v6: tuple[ipaddress.IPv6Address, ...] = ()


def _unique(items: Iterable[T]) -> tuple[T, ...]:
    if isinstance(items, list) and len(items) < 2:
        return tuple(items)  # nothing to drop (and no hashing: address hashes are dear)
    return tuple(dict.fromkeys(items))


def _rotate(items: tuple[T, ...], step: int) -> tuple[T, ...]:
    if len(items) < 2:
        return items
    k = step % len(items)
    return items[k:] + items[:k]


@dataclass(eq=False)
class Records:
    """Every DNS record netstack serves, and which clients may see which network.

    Built by `build_records`; the tables are not changed afterwards (build a new `Records`
    when the store changes; `generation` tells versions apart, and caches keyed on a
    `Records` drop everything when they are handed a different one). The only mutable
    part is the round-robin cursor used by `lookup(..., rotation=None)`.
    """

    generation: int
    network_order: tuple[str, ...]
    names: dict[str, dict[str, _Addresses]]
    pointers: Mapping[IPAddress, Sequence[tuple[str, str]]]  # (network id, name), in order
    subnets: tuple[IPNetwork, ...]
    domains: dict[str, str]  # network id -> its DNS domain (networks with dns.domain only)
    clients: dict[IPAddress, Scope]
    _client_text: dict[str, Scope] = field(default_factory=dict, repr=False)
    _cursors: dict[tuple[Scope, str, str], Iterator[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._client_text:  # the builder passes it ready-made
            self._client_text.update({str(a): scope for a, scope in self.clients.items()})

    def scope(self, client: str | IPAddress) -> Scope | None:
        """The networks the client at this address may resolve names on; None if unknown.

        The client is the endpoint owning the query's source address. Accepts the text the
        socket layer reports (``"10.0.0.2"``, ``"::ffff:10.0.0.2"``, ``"fe80::1%eth0"``).
        """
        if isinstance(client, str):
            scope = self._client_text.get(client)
            if scope is not None:
                return scope
        address = _client_address(client)
        return None if address is None else self.clients.get(address)

    def lookup(
        self,
        client: str | IPAddress | Scope,
        qname: str,
        qtype: str,
        *,
        rotation: int | None = None,
    ) -> LookupResult:
        """Answer one question (`qtype` "A", "AAAA", "PTR", "ANY" or any other type name).

        `client` is the client's address (or a scope from `scope`). Multi-address answers
        are rotated by `rotation` steps; with None, a cursor per (scope, name, type) advances
        by one on each call, so successive lookups rotate. Never raises.
        """
        scope = client if isinstance(client, tuple) else self.scope(client)
        if scope is None:
            return REFUSED
        name = fold(qname)
        if not name:
            return NOT_OURS
        address = parse_reverse_name(name)
        if address is not None:
            return self._lookup_pointer(scope, address, qtype)
        v4: list[ipaddress.IPv4Address] = []
        v6: list[ipaddress.IPv6Address] = []
        found = False
        for network_id in scope:
            entry = self.names.get(network_id, {}).get(name)
            if entry is not None:
                found = True
                v4.extend(entry.v4)
                v6.extend(entry.v6)
        if found:
            return self._answer(scope, name, qtype, _unique(v4), _unique(v6), rotation)
        # A name some other network defines is NXDOMAIN to this client (scoping). Beyond
        # that, only the domains of the client's own networks are netstack's for it: another
        # name under another network's domain (which may be a real one) is forwarded.
        if any(name in names for names in self.names.values()):
            return NXDOMAIN
        domains = [self.domains[n] for n in scope if n in self.domains]
        if name in domains:
            return NODATA
        if "." not in name or any(name.endswith("." + domain) for domain in domains):
            return NXDOMAIN
        return NOT_OURS

    def _lookup_pointer(self, scope: Scope, address: IPAddress, qtype: str) -> LookupResult:
        if not any(address in subnet for subnet in self.subnets):
            return NOT_OURS
        targets = _unique(
            target for network_id, target in self.pointers.get(address, ()) if network_id in scope
        )
        if not targets:
            return NXDOMAIN
        return Answer(names=targets) if qtype in ("PTR", "ANY") else NODATA

    def _answer(
        self,
        scope: Scope,
        name: str,
        qtype: str,
        v4: tuple[ipaddress.IPv4Address, ...],
        v6: tuple[ipaddress.IPv6Address, ...],
        rotation: int | None,
    ) -> Answer:
        addresses: tuple[IPAddress, ...]
        if qtype == "A":
            addresses = v4
        elif qtype == "AAAA":
            addresses = v6
        elif qtype == "ANY":
            return Answer(addresses=(*v4, *v6))  # not rotated: RFC 8482 lets ANY be minimal
        else:
            return NODATA
        count = len(addresses)
        if count < 2:
            return Answer(addresses=addresses)
        # One cursor per (scope, name, type), shared by every thread's reply cache and the
        # uncached path: next() on itertools.count is atomic under the GIL.
        key = (scope, name, qtype)
        cursor = self._cursors.get(key)
        if cursor is None:
            cursor = self._cursors.setdefault(key, itertools.count())
        if rotation is None:
            rotation = next(cursor)
        step = rotation % count
        return Answer(
            addresses=_rotate(addresses, step),
            rotations=count,
            step=step,
            cursor=cursor,
        )


def valid_name(name: str) -> bool:
    """Whether a folded name fits the DNS wire format (labels 1-63 bytes, 253 in all)."""
    encoded = name.encode("utf-8", "surrogateescape")
    return len(encoded) <= 253 and all(0 < len(label) <= 63 for label in encoded.split(b"."))


def network_domain(network: Network) -> str | None:
    """The network's DNS domain (option ``dns.domain``), folded; None when unset or invalid."""
    domain = fold(network.options.get(DOMAIN_OPTION, "").strip())
    return domain if domain and valid_name(domain) else None


@dataclass(frozen=True, slots=True)
class _EndpointNames:
    """What one endpoint puts in the records: worked out once per endpoint and domain."""

    network_id: str
    sandbox: str
    addresses: tuple[IPAddress, ...]  # IPv4 first
    texts: tuple[str, ...]  # the addresses as text (the socket layer's form of a client)
    v4: ipaddress.IPv4Address | None
    v6: ipaddress.IPv6Address | None
    labels: tuple[str, ...]  # the names it answers to on its network (domain forms too)
    target: str | None  # its PTR target; None when that name does not fit the wire format


def endpoint_row(endpoint: Endpoint) -> EndpointRow:
    """An endpoint in the store's row form (`Store.endpoint_name_rows`)."""
    return (
        endpoint.id,
        endpoint.network_id,
        endpoint.sandbox,
        None if endpoint.ipv4 is None else str(endpoint.ipv4),
        None if endpoint.ipv6 is None else str(endpoint.ipv6),
        json.dumps(endpoint.aliases),
    )


def _endpoint_names(row: EndpointRow, domain: str | None) -> _EndpointNames:
    _, network_id, sandbox, ipv4, ipv6, aliases = row
    v4 = None if ipv4 is None else ipaddress.IPv4Interface(ipv4).ip
    v6 = None if ipv6 is None else ipaddress.IPv6Interface(ipv6).ip
    addresses = tuple(a for a in (v4, v6) if a is not None)
    labels = _unique(fold(n) for n in (sandbox, *json.loads(aliases)))
    if domain is not None:
        labels = (*labels, *(f"{label}.{domain}" for label in labels))
    target = sandbox.rstrip(".")
    if domain is not None:
        target = f"{target}.{domain}"
    return _EndpointNames(
        network_id=network_id,
        sandbox=sandbox,
        addresses=addresses,
        texts=tuple(str(a) for a in addresses),
        v4=v4,
        v6=v6,
        labels=tuple(label for label in labels if valid_name(label)),  # others cannot be asked
        target=target if valid_name(fold(target)) else None,
    )


@dataclass
class _Tables:
    """The builder's own copy of a table set, changed in place between builds (every
    `Records` handed out gets copies: dict copies reuse the keys' hashes, and hashing
    addresses is what rebuilding mostly cost)."""

    names: dict[str, dict[str, _Addresses]] = field(default_factory=dict)
    pointers: dict[IPAddress, Sequence[tuple[str, str]]] = field(default_factory=dict)
    clients: dict[IPAddress, Scope] = field(default_factory=dict)
    client_text: dict[str, Scope] = field(default_factory=dict)
    # how many endpoints have each sandbox, (network, name) and address: a change is
    # applied in place only when every one it touches is its endpoint's alone
    sandboxes: dict[str, int] = field(default_factory=dict)
    labels: dict[tuple[str, str], int] = field(default_factory=dict)
    addresses: dict[IPAddress, int] = field(default_factory=dict)


class RecordsBuilder:
    """`build_records` with a memory, for a caller that rebuilds after every change
    (netstackd after each connect and disconnect).

    Each endpoint's part (its folded names, parsed addresses) is worked out once. A build
    whose only differences from the last one are endpoints added or removed whose sandbox,
    names and addresses are theirs alone (a container's first attachment, or its last one
    going) changes the tables in place: its cost does not grow with the endpoints already
    there. Anything else (networks changed, a shared name or address, a sandbox on several
    networks) rebuilds the tables from scratch. Either way the result is the table
    `build_records` gives. Not thread-safe: one caller at a time.
    """

    def __init__(self) -> None:
        self._entries: dict[EndpointRow, _EndpointNames] = {}
        self._networks: tuple[object, ...] | None = None
        self._tables = _Tables()

    def build(
        self, networks: Sequence[Network], endpoints: Sequence[Endpoint], *, generation: int = 0
    ) -> Records:
        """The same table `build_records` gives for these networks and endpoints."""
        return self.build_rows(networks, [endpoint_row(e) for e in endpoints], generation)

    def build_rows(
        self,
        networks: Sequence[Network],
        rows: Sequence[EndpointRow],
        generation: int = 0,
        changes: tuple[Sequence[EndpointRow], Sequence[EndpointRow]] | None = None,
    ) -> Records:
        """From the store's rows (`Store.endpoint_name_rows`, connection order).

        `changes`, when the caller knows them: the rows (removed, added) since the rows of
        this builder's last call, so they need not be found by comparing every row.
        """
        domains = {network.id: network_domain(network) for network in networks}
        shape = tuple((n.id, domains[n.id], *(p.subnet for p in n.pools)) for n in networks)
        if shape != self._networks:  # an endpoint's names depend on its network's domain
            self._entries.clear()
            self._rebuild(networks, domains, rows)
            self._networks = shape
        else:
            if changes is not None:
                applied = self._apply(*changes, domains)
            elif len(wanted := set(rows)) == len(rows):
                known = self._entries.keys()
                applied = self._apply(known - wanted, wanted - known, domains)
            else:  # the same row twice: only a rebuild gets that right
                applied = False
            if not applied:
                self._rebuild(networks, domains, rows)
        tables = self._tables
        return Records(
            generation=generation,
            network_order=tuple(domains),
            names={network_id: table.copy() for network_id, table in tables.names.items()},
            pointers=tables.pointers.copy(),
            subnets=_unique(pool.subnet for network in networks for pool in network.pools),
            domains={n: d for n, d in domains.items() if d is not None},
            clients=tables.clients.copy(),
            _client_text=tables.client_text.copy(),
        )

    def _entry(self, row: EndpointRow, domains: dict[str, str | None]) -> _EndpointNames:
        entry = self._entries.get(row)
        if entry is None:
            entry = self._entries[row] = _endpoint_names(row, domains.get(row[1]))
        return entry

    def _apply(
        self,
        gone_rows: Iterable[EndpointRow],
        new_rows: Iterable[EndpointRow],
        domains: dict[str, str | None],
    ) -> bool:
        """Remove `gone_rows` from the tables and add `new_rows`, in place; False when that
        needs a full rebuild (the tables may then be half-changed: the caller rebuilds)."""
        gone_rows, new_rows = set(gone_rows), set(new_rows)
        if gone_rows - self._entries.keys() or new_rows & (self._entries.keys() - gone_rows):
            return False  # not changes from the last rows
        gone = [self._entries.pop(row) for row in gone_rows]
        new = [self._entry(row, domains) for row in new_rows]
        for entry in gone:
            if not self._alone(entry, domains, present=True):
                return False
            self._remove(entry, domains)
        for entry in new:
            if not self._alone(entry, domains, present=False):
                return False
            self._add(entry, domains)
        return True

    def _alone(self, entry: _EndpointNames, domains: dict[str, str | None], present: bool) -> bool:
        """Whether the entry's sandbox, names and addresses are its own (present: counted
        once, the entry's own count; else: not counted at all)."""
        tables, most = self._tables, 1 if present else 0
        if tables.sandboxes.get(entry.sandbox, 0) != most:
            return False
        if any(tables.addresses.get(a, 0) != most for a in entry.addresses):
            return False
        return entry.network_id not in domains or all(
            tables.labels.get((entry.network_id, label), 0) == most for label in entry.labels
        )

    def _add(self, entry: _EndpointNames, domains: dict[str, str | None]) -> None:
        tables, scope = self._tables, (entry.network_id,)
        tables.sandboxes[entry.sandbox] = 1
        for address, text in zip(entry.addresses, entry.texts, strict=True):
            tables.addresses[address] = 1
            tables.clients[address] = scope
            tables.client_text[text] = scope
        if entry.network_id not in domains:
            return
        names = tables.names[entry.network_id]
        found = _Addresses(
            () if entry.v4 is None else (entry.v4,), () if entry.v6 is None else (entry.v6,)
        )
        for label in entry.labels:
            tables.labels[entry.network_id, label] = 1
            names[label] = found
        if entry.target is not None:
            for address in entry.addresses:
                tables.pointers[address] = ((entry.network_id, entry.target),)

    def _remove(self, entry: _EndpointNames, domains: dict[str, str | None]) -> None:
        tables = self._tables
        del tables.sandboxes[entry.sandbox]
        for address, text in zip(entry.addresses, entry.texts, strict=True):
            del tables.addresses[address]
            del tables.clients[address]
            del tables.client_text[text]
            tables.pointers.pop(address, None)
        if entry.network_id not in domains:
            return
        names = tables.names[entry.network_id]
        for label in entry.labels:
            del tables.labels[entry.network_id, label]
            del names[label]

    def _rebuild(
        self,
        networks: Sequence[Network],
        domains: dict[str, str | None],
        rows: Sequence[EndpointRow],
    ) -> None:
        entries = [self._entry(row, domains) for row in rows]
        self._entries = dict(zip(rows, entries, strict=True))  # only the current ones
        self._tables = _assemble(networks, entries)


def build_records(
    networks: Sequence[Network], endpoints: Sequence[Endpoint], *, generation: int = 0
) -> Records:
    """Build the record table from the store's networks and endpoints (connection order).

    Pure. Endpoints of networks not in `networks` still name their clients' scope but
    publish no names (the store keeps both consistent; this only matters mid-change).
    Names that do not fit the wire format (a label over 63 bytes) are left out.
    """
    return RecordsBuilder().build(networks, endpoints, generation=generation)


def _assemble(networks: Sequence[Network], entries: list[_EndpointNames]) -> _Tables:
    order = [network.id for network in networks]
    index = {network_id: i for i, network_id in enumerate(order)}
    tables = _Tables()

    def scope_of(network_ids: Iterable[str]) -> Scope:
        return tuple(sorted(set(network_ids), key=lambda n: (index.get(n, len(index)), n)))

    # Which networks each sandbox is on; a client's scope is every network of every sandbox
    # owning its address (nearly always one).
    sandbox_networks: dict[str, set[str]] = {}
    for entry in entries:
        sandbox_networks.setdefault(entry.sandbox, set()).add(entry.network_id)
        tables.sandboxes[entry.sandbox] = tables.sandboxes.get(entry.sandbox, 0) + 1
    scopes = {sandbox: scope_of(ids) for sandbox, ids in sandbox_networks.items()}
    for entry in entries:
        mine = scopes[entry.sandbox]
        for address, text in zip(entry.addresses, entry.texts, strict=True):
            tables.addresses[address] = tables.addresses.get(address, 0) + 1
            scope = tables.clients.setdefault(address, mine)
            if scope is not mine and scope != mine:  # one address, several sandboxes
                scope = tables.clients[address] = scope_of((*scope, *mine))
            tables.client_text[text] = scope

    # Names per network, pointers per address.
    v4_names: dict[str, dict[str, list[ipaddress.IPv4Address]]] = {n: {} for n in order}
    v6_names: dict[str, dict[str, list[ipaddress.IPv6Address]]] = {n: {} for n in order}
    pointers: dict[IPAddress, list[tuple[str, str]]] = {}
    for entry in entries:
        if entry.network_id not in index:
            continue
        table4 = v4_names[entry.network_id]
        table6 = v6_names[entry.network_id]
        for label in entry.labels:
            key = (entry.network_id, label)
            tables.labels[key] = tables.labels.get(key, 0) + 1
            v4_list = table4.setdefault(label, [])
            v6_list = table6.setdefault(label, [])
            if entry.v4 is not None:
                v4_list.append(entry.v4)
            if entry.v6 is not None:
                v6_list.append(entry.v6)
        if entry.target is not None:
            for address in entry.addresses:
                pointers.setdefault(address, []).append((entry.network_id, entry.target))

    tables.names = {
        network_id: {
            label: _Addresses(_unique(v4_names[network_id][label]), _unique(v6_list))
            for label, v6_list in v6_names[network_id].items()
        }
        for network_id in order
    }
    tables.pointers = {address: tuple(targets) for address, targets in pointers.items()}
    return tables
