"""DNS records: names, aliases, scoping per network, round robin, PTR, domains, clients."""

from __future__ import annotations

import random
from ipaddress import ip_address, ip_interface

import pytest
from dns_builders import endpoint, network
from netstack.dns import records as records_module
from netstack.dns.records import (
    NODATA,
    Answer,
    NotOurs,
    NxDomain,
    Records,
    RecordsBuilder,
    Refused,
    build_records,
    fold,
    parse_reverse_name,
    reverse_name,
)

from netstack.model import Endpoint, EndpointRow

# Two networks:
#   front (10.1.0.0/24, fd00:1::/64, dns.domain=corp.test): web1, web2 (alias "web"), app
#   back  (10.2.0.0/24): db (alias "database"), app (alias "api")
# plus "lonely" (10.3.0.0/24) with one sandbox "solo" and nothing shared.


NETWORKS = [
    network("net-front", "front", "10.1.0.0/24", "fd00:1::/64", **{"dns.domain": "Corp.Test."}),
    network("net-back", "back", "10.2.0.0/24"),
    network("net-lonely", "lonely", "10.3.0.0/24"),
]
ENDPOINTS = [
    endpoint("e1", "net-front", "web1", "10.1.0.2/24", "fd00:1::2/64", aliases=("web",)),
    endpoint("e2", "net-front", "web2", "10.1.0.3/24", "fd00:1::3/64", aliases=("web",)),
    endpoint("e3", "net-back", "db", "10.2.0.2/24", aliases=("database",)),
    endpoint("e4", "net-front", "app", "10.1.0.4/24"),
    endpoint("e5", "net-back", "app", "10.2.0.4/24", aliases=("api",)),
    endpoint("e6", "net-lonely", "solo", "10.3.0.2/24"),
]

WEB1, WEB2, DB, APP_FRONT, APP_BACK, SOLO = (
    "10.1.0.2",
    "10.1.0.3",
    "10.2.0.2",
    "10.1.0.4",
    "10.2.0.4",
    "10.3.0.2",
)


@pytest.fixture
def records() -> Records:
    return build_records(NETWORKS, ENDPOINTS, generation=7)


def addresses(result: object) -> list[str]:
    assert isinstance(result, Answer), result
    return [str(a) for a in result.addresses]


# A / AAAA -----------------------------------------------------------------------------------


def test_sandbox_name_gives_its_address(records: Records) -> None:
    assert addresses(records.lookup(WEB2, "web1", "A")) == ["10.1.0.2"]


def test_aaaa_gives_the_ipv6_address(records: Records) -> None:
    assert addresses(records.lookup(WEB2, "web1", "AAAA")) == ["fd00:1::2"]


def test_name_without_ipv6_has_no_aaaa_but_exists(records: Records) -> None:
    assert records.lookup(APP_BACK, "db", "AAAA") == NODATA


def test_other_types_of_an_existing_name_are_nodata(records: Records) -> None:
    assert records.lookup(WEB2, "web1", "MX") == NODATA
    assert records.lookup(WEB2, "web1", "PTR") == NODATA


def test_any_gives_both_families(records: Records) -> None:
    assert addresses(records.lookup(WEB2, "web1", "ANY")) == ["10.1.0.2", "fd00:1::2"]


def test_alias_resolves_on_its_network(records: Records) -> None:
    assert addresses(records.lookup(APP_BACK, "database", "A")) == ["10.2.0.2"]


def test_own_name_resolves(records: Records) -> None:
    assert addresses(records.lookup(WEB1, "web1", "A")) == ["10.1.0.2"]


def test_names_are_case_insensitive_and_take_a_final_dot(records: Records) -> None:
    for spelling in ("WEB1", "Web1.", "wEb1"):
        assert addresses(records.lookup(WEB2, spelling, "A")) == ["10.1.0.2"]
    assert addresses(records.lookup(APP_BACK, "DataBase.", "A")) == ["10.2.0.2"]


def test_fold_lowers_ascii_only() -> None:
    assert fold("WeB.Corp.") == "web.corp"
    assert fold("ÉCOLE") == "École"  # non-ASCII is not case-folded (RFC 4343)


# scoping ------------------------------------------------------------------------------------


def test_alias_is_invisible_from_a_client_only_on_another_network(records: Records) -> None:
    # "api" is app's alias on back; web1 is on front only, although it shares front with app.
    assert isinstance(records.lookup(WEB1, "api", "A"), NxDomain)
    assert addresses(records.lookup(DB, "api", "A")) == ["10.2.0.4"]


def test_name_on_another_network_is_nxdomain(records: Records) -> None:
    assert isinstance(records.lookup(WEB1, "db", "A"), NxDomain)
    assert isinstance(records.lookup(WEB1, "database", "A"), NxDomain)
    assert isinstance(records.lookup(DB, "web1", "A"), NxDomain)
    assert isinstance(records.lookup(SOLO, "web1", "A"), NxDomain)


def test_a_sandbox_on_two_networks_is_seen_only_on_the_shared_one(records: Records) -> None:
    assert addresses(records.lookup(WEB1, "app", "A")) == ["10.1.0.4"]
    assert addresses(records.lookup(DB, "app", "A")) == ["10.2.0.4"]


def test_a_sandbox_on_two_networks_resolves_names_on_both(records: Records) -> None:
    # The client is the sandbox, whichever of its addresses the query came from.
    for client in (APP_FRONT, APP_BACK):
        assert addresses(records.lookup(client, "db", "A")) == ["10.2.0.2"]
        assert addresses(records.lookup(client, "web1", "A")) == ["10.1.0.2"]
        assert addresses(records.lookup(client, "app", "A", rotation=0)) == [
            "10.1.0.4",
            "10.2.0.4",
        ]


def test_scope_lists_the_sandbox_networks_in_network_order(records: Records) -> None:
    assert records.scope(APP_BACK) == ("net-front", "net-back")
    assert records.scope(WEB1) == ("net-front",)
    assert records.scope("fd00:1::2") == ("net-front",)


# clients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["10.9.9.9", "10.1.0.1", "127.0.0.1", "::1", "not an ip", ""])
def test_unknown_client_is_refused(records: Records, client: str) -> None:
    assert isinstance(records.lookup(client, "web1", "A"), Refused)
    assert isinstance(records.lookup(client, "example.com", "A"), Refused)
    assert records.scope(client) is None


def test_client_spellings_are_normalised(records: Records) -> None:
    assert records.scope("::ffff:10.1.0.2") == ("net-front",)
    assert records.scope("FD00:1:0::2") == ("net-front",)
    assert records.scope("fd00:1::2%eth0") == ("net-front",)
    assert records.scope(ip_address("10.1.0.2")) == ("net-front",)


def test_empty_records_refuse_everyone() -> None:
    empty = build_records([], [])
    assert isinstance(empty.lookup("10.1.0.2", "web1", "A"), Refused)


def test_scope_can_be_passed_directly(records: Records) -> None:
    assert addresses(records.lookup(("net-back",), "db", "A")) == ["10.2.0.2"]


# round robin ------------------------------------------------------------------------------


def test_shared_alias_gives_every_address_in_rotating_order(records: Records) -> None:
    orders = [addresses(records.lookup(APP_FRONT, "web", "A")) for _ in range(4)]
    assert orders == [
        ["10.1.0.2", "10.1.0.3"],
        ["10.1.0.3", "10.1.0.2"],
        ["10.1.0.2", "10.1.0.3"],
        ["10.1.0.3", "10.1.0.2"],
    ]


def test_rotation_is_counted_per_type(records: Records) -> None:
    first_a = addresses(records.lookup(APP_FRONT, "web", "A"))
    first_aaaa = addresses(records.lookup(APP_FRONT, "web", "AAAA"))
    assert first_a == ["10.1.0.2", "10.1.0.3"]
    assert first_aaaa == ["fd00:1::2", "fd00:1::3"]


def test_explicit_rotation_is_deterministic(records: Records) -> None:
    three = [
        endpoint(f"r{i}", "net-front", f"replica{i}", f"10.1.0.{10 + i}/24", aliases=("svc",))
        for i in range(3)
    ]
    table = build_records(NETWORKS, [*ENDPOINTS, *three])
    result = table.lookup(WEB1, "svc", "A", rotation=4)
    assert isinstance(result, Answer)
    assert result.rotations == 3
    assert addresses(result) == ["10.1.0.11", "10.1.0.12", "10.1.0.10"]
    assert addresses(table.lookup(WEB1, "svc", "A", rotation=4)) == addresses(result)


def test_single_address_has_one_rotation(records: Records) -> None:
    result = records.lookup(WEB2, "web1", "A")
    assert isinstance(result, Answer)
    assert result.rotations == 1


def test_duplicate_address_under_one_name_is_given_once() -> None:
    twice = endpoint("x", "net-back", "db", "10.2.0.2/24", aliases=("db",))
    table = build_records(NETWORKS, [twice])
    assert addresses(table.lookup(DB, "db", "A")) == ["10.2.0.2"]


# PTR ---------------------------------------------------------------------------------------


def test_ptr_v4_gives_the_sandbox_name(records: Records) -> None:
    result = records.lookup(APP_BACK, "2.0.2.10.in-addr.arpa", "PTR")
    assert result == Answer(names=("db",))


def test_ptr_v6_gives_the_sandbox_name_with_the_domain(records: Records) -> None:
    name = reverse_name(ip_address("fd00:1::2"))
    assert name.endswith(".ip6.arpa")
    assert records.lookup(WEB2, name, "PTR") == Answer(names=("web1.corp.test",))
    assert records.lookup(WEB2, name.upper() + ".", "PTR") == Answer(names=("web1.corp.test",))


def test_ptr_across_networks_is_nxdomain(records: Records) -> None:
    assert isinstance(records.lookup(WEB1, "2.0.2.10.in-addr.arpa", "PTR"), NxDomain)


def test_ptr_of_unused_address_in_our_subnet_is_nxdomain(records: Records) -> None:
    assert isinstance(records.lookup(WEB1, "99.0.1.10.in-addr.arpa", "PTR"), NxDomain)
    assert isinstance(records.lookup(WEB1, "1.0.1.10.in-addr.arpa", "PTR"), NxDomain)  # gateway


def test_ptr_outside_our_subnets_is_forwarded(records: Records) -> None:
    assert isinstance(records.lookup(WEB1, "8.8.8.8.in-addr.arpa", "PTR"), NotOurs)
    assert isinstance(records.lookup(WEB1, reverse_name(ip_address("2001:db8::1")), "PTR"), NotOurs)
    assert isinstance(records.lookup(WEB1, "1.10.in-addr.arpa", "SOA"), NotOurs)  # not an address


def test_reverse_name_of_an_endpoint_with_other_type_is_nodata(records: Records) -> None:
    assert records.lookup(WEB1, "3.0.1.10.in-addr.arpa", "A") == NODATA


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("4.3.2.1.in-addr.arpa", "1.2.3.4"),
        ("04.3.2.1.in-addr.arpa", None),
        ("256.3.2.1.in-addr.arpa", None),
        ("3.2.1.in-addr.arpa", None),
        ("x.3.2.1.in-addr.arpa", None),
        (reverse_name(ip_address("2001:db8::7")), "2001:db8::7"),
        ("0.ip6.arpa", None),
        ("example.com", None),
    ],
)
def test_parse_reverse_name(name: str, expected: str | None) -> None:
    parsed = parse_reverse_name(name)
    assert (str(parsed) if parsed is not None else None) == expected


# dns.domain --------------------------------------------------------------------------------


def test_domain_answers_name_dot_domain(records: Records) -> None:
    assert addresses(records.lookup(WEB2, "web1.corp.test", "A")) == ["10.1.0.2"]
    assert addresses(records.lookup(WEB2, "WEB1.CORP.TEST.", "AAAA")) == ["fd00:1::2"]
    assert addresses(records.lookup(APP_FRONT, "web.corp.test", "A", rotation=0)) == [
        "10.1.0.2",
        "10.1.0.3",
    ]


def test_domain_names_are_scoped_too(records: Records) -> None:
    # db is not on front: web1.corp.test is a name of front, so NXDOMAIN to db; but other
    # names under corp.test are not netstack's for db (a network's domain may be a real
    # one, e.g. the company's; other sandboxes must still reach it upstream).
    assert isinstance(records.lookup(DB, "web1.corp.test", "A"), NxDomain)
    assert isinstance(records.lookup(DB, "intranet.corp.test", "A"), NotOurs)
    # app is on front, but "api" is its alias on back, which has no domain.
    assert isinstance(records.lookup(APP_BACK, "api.corp.test", "A"), NxDomain)


def test_unknown_name_under_a_domain_is_nxdomain_and_the_apex_exists(records: Records) -> None:
    assert isinstance(records.lookup(WEB1, "nobody.corp.test", "A"), NxDomain)
    assert isinstance(records.lookup(WEB1, "a.b.corp.test", "A"), NxDomain)
    assert records.lookup(WEB1, "corp.test", "A") == NODATA


def test_network_without_domain_does_not_answer_dotted_names(records: Records) -> None:
    assert isinstance(records.lookup(APP_BACK, "db.corp.test", "A"), NxDomain)
    assert isinstance(records.lookup(APP_BACK, "db.back", "A"), NotOurs)


# what is not ours ----------------------------------------------------------------------------


def test_single_label_unknown_name_is_nxdomain(records: Records) -> None:
    assert isinstance(records.lookup(WEB1, "nosuchname", "A"), NxDomain)
    assert isinstance(records.lookup(WEB1, "nosuchname", "MX"), NxDomain)


@pytest.mark.parametrize("name", ["example.com", "www.example.com.", "corp.test.example.com"])
def test_external_names_are_not_ours(records: Records, name: str) -> None:
    assert isinstance(records.lookup(WEB1, name, "A"), NotOurs)


def test_root_is_not_ours(records: Records) -> None:
    assert isinstance(records.lookup(WEB1, ".", "NS"), NotOurs)
    assert isinstance(records.lookup(WEB1, "", "NS"), NotOurs)


def test_sandbox_name_with_a_dot_resolves() -> None:
    dotted = endpoint("d", "net-back", "web.1", "10.2.0.9/24")
    table = build_records(NETWORKS, [dotted])
    assert addresses(table.lookup("10.2.0.9", "Web.1", "A")) == ["10.2.0.9"]


def test_generation_is_kept(records: Records) -> None:
    assert records.generation == 7


def test_endpoint_of_unknown_network_publishes_nothing() -> None:
    stray = endpoint("s", "net-gone", "ghost", "10.8.0.2/24")
    table = build_records(NETWORKS, [*ENDPOINTS, stray])
    assert isinstance(table.lookup(WEB1, "ghost", "A"), NxDomain)
    assert table.scope("10.8.0.2") == ("net-gone",)
    assert isinstance(table.lookup("10.8.0.2", "web1", "A"), NxDomain)


def test_interface_addresses_use_the_ip_not_the_network() -> None:
    table = build_records(NETWORKS, ENDPOINTS)
    assert ip_interface("10.1.0.2/24").ip in table.clients


def test_names_that_do_not_fit_the_wire_format_are_left_out() -> None:
    long = endpoint("l", "net-back", "x" * 64, "10.2.0.9/24", aliases=("ok", "a..b"))
    table = build_records(NETWORKS, [long])
    assert addresses(table.lookup("10.2.0.9", "ok", "A")) == ["10.2.0.9"]
    assert isinstance(table.lookup("10.2.0.9", "x" * 64, "A"), NxDomain)
    assert isinstance(table.lookup("10.2.0.9", "9.0.2.10.in-addr.arpa", "PTR"), NxDomain)


def test_invalid_domain_is_ignored() -> None:
    odd = network("net-odd", "odd", "10.4.0.0/24", **{"dns.domain": "bad..domain"})
    table = build_records([odd], [endpoint("o", "net-odd", "web", "10.4.0.2/24")])
    assert table.domains == {}
    assert addresses(table.lookup("10.4.0.2", "web", "A")) == ["10.4.0.2"]


def _tables(table: Records) -> tuple[object, ...]:
    return (
        table.generation,
        table.network_order,
        table.names,
        {address: tuple(targets) for address, targets in table.pointers.items()},
        table.subnets,
        table.domains,
        table.clients,
        table._client_text,
        table.scope("::ffff:10.2.0.4"),
    )


def test_builder_follows_every_change_like_a_fresh_build() -> None:
    """The builder remembers endpoints between builds; each build must still equal a build
    from scratch, through adds, removals, renames, new aliases, moved addresses and a domain
    change (the remembered part of an endpoint depends on its network's domain)."""
    renamed = endpoint("e2", "net-front", "web-two", "10.1.0.3/24", "fd00:1::3/64")
    aliased = endpoint("e3", "net-back", "db", "10.2.0.2/24", aliases=("database", "pg"))
    moved = endpoint("e6", "net-lonely", "solo", "10.3.0.9/24")
    shared = endpoint("e7", "net-back", "twin", "10.1.0.2/24")  # web1's address, elsewhere
    plain_front = network("net-front", "front", "10.1.0.0/24", "fd00:1::/64")
    states = [
        (NETWORKS, ENDPOINTS),
        (NETWORKS, ENDPOINTS[:4]),
        (NETWORKS, ENDPOINTS),
        (NETWORKS, [ENDPOINTS[0], renamed, aliased, *ENDPOINTS[3:5], moved]),
        (NETWORKS, [*ENDPOINTS, shared]),
        ([plain_front, *NETWORKS[1:]], ENDPOINTS),
        (NETWORKS, ENDPOINTS),
        ([], []),
        (NETWORKS, list(reversed(ENDPOINTS))),
    ]
    builder = RecordsBuilder()
    for generation, (networks, endpoints) in enumerate(states):
        built = builder.build(networks, endpoints, generation=generation)
        fresh = build_records(networks, endpoints, generation=generation)
        assert _tables(built) == _tables(fresh), generation


def test_builder_works_out_only_the_endpoints_that_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worked_out: list[str] = []
    original = records_module._endpoint_names

    def counting(row: EndpointRow, domain: str | None) -> object:
        worked_out.append(row[2])
        return original(row, domain)

    monkeypatch.setattr(records_module, "_endpoint_names", counting)
    builder = RecordsBuilder()
    builder.build(NETWORKS, ENDPOINTS)
    assert len(worked_out) == len(ENDPOINTS)
    worked_out.clear()
    newcomer = endpoint("e8", "net-back", "cache", "10.2.0.8/24")
    table = builder.build(NETWORKS, [*ENDPOINTS, newcomer])
    assert worked_out == ["cache"]
    assert addresses(table.lookup(DB, "cache", "A")) == ["10.2.0.8"]
    worked_out.clear()
    builder.build(NETWORKS, ENDPOINTS)  # the newcomer leaves: nothing to work out
    assert worked_out == []
    builder.build(NETWORKS, [*ENDPOINTS, newcomer])  # and is forgotten once gone
    assert worked_out == ["cache"]


def test_builder_changes_tables_in_place_for_a_lone_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A container's first attachment, and its last one going, cost no rebuild; a change
    touching a shared name or a sandbox already there does."""
    rebuilds: list[int] = []
    original = records_module._assemble

    def counting(*args: object) -> object:
        rebuilds.append(1)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(records_module, "_assemble", counting)
    builder = RecordsBuilder()
    builder.build(NETWORKS, ENDPOINTS)
    assert len(rebuilds) == 1
    lone = endpoint("e8", "net-back", "cache", "10.2.0.8/24")
    builder.build(NETWORKS, [*ENDPOINTS, lone])
    builder.build(NETWORKS, ENDPOINTS)
    assert len(rebuilds) == 1
    web3 = endpoint("e9", "net-front", "web3", "10.1.0.9/24", aliases=("web",))
    table = builder.build(NETWORKS, [*ENDPOINTS, web3])  # "web" is shared: rebuilt
    assert len(rebuilds) == 2
    assert addresses(table.lookup(WEB1, "web", "A", rotation=0)) == [WEB1, WEB2, "10.1.0.9"]


def test_builder_matches_fresh_builds_through_random_changes() -> None:
    """Random attachments coming and going, with shared names, shared addresses, sandboxes
    on several networks and endpoints of unknown networks."""
    rng = random.Random(4)
    sandboxes = ["a", "b", "c", "d", "web", "WEB"]
    pool = [
        endpoint(
            f"x{i}",
            rng.choice(["net-front", "net-back", "net-lonely", "net-gone"]),
            rng.choice(sandboxes),
            f"10.{rng.randint(1, 3)}.0.{rng.randint(2, 12)}/24",
            rng.choice([None, f"fd00:1::{rng.randint(2, 12):x}/64"]),
            aliases=tuple(rng.sample(["web", "api", "db"], rng.randint(0, 2))),
        )
        for i in range(40)
    ]
    builder = RecordsBuilder()
    present: list[Endpoint] = []
    for step in range(300):
        if present and rng.random() < 0.45:
            present.remove(rng.choice(present))
        else:
            choice = rng.choice(pool)
            if choice not in present:
                present.append(choice)
        networks = NETWORKS if step % 50 else NETWORKS[::-1]
        built = builder.build(networks, present, generation=step)
        fresh = build_records(networks, present, generation=step)
        assert _tables(built) == _tables(fresh), step


def test_builder_given_the_changes_matches_fresh_builds() -> None:
    """Told the rows removed and added (netstackd's StoreMirror knows them), the builder
    skips comparing every row and still gives what a fresh build gives; changes that do not
    fit its last rows make it rebuild rather than go wrong."""
    rng = random.Random(5)
    pool = [
        endpoint(
            f"y{i}",
            rng.choice(["net-front", "net-back"]),
            rng.choice(["a", "b", "c", "web"]),
            f"10.{rng.randint(1, 2)}.0.{rng.randint(2, 9)}/24",
            aliases=tuple(rng.sample(["web", "api"], rng.randint(0, 1))),
        )
        for i in range(30)
    ]
    builder = RecordsBuilder()
    present: list[Endpoint] = []
    rows: list[EndpointRow] = []
    builder.build_rows(NETWORKS, rows)
    for step in range(200):
        if present and rng.random() < 0.45:
            present.remove(rng.choice(present))
        elif (choice := rng.choice(pool)) not in present:
            present.append(choice)
        new_rows = [records_module.endpoint_row(e) for e in present]
        removed = [row for row in rows if row not in new_rows]
        added = [row for row in new_rows if row not in rows]
        if step % 40 == 39:  # wrong: a row added twice
            added = [*added, new_rows[0]] if new_rows else added
        built = builder.build_rows(NETWORKS, new_rows, step, (removed, added))
        fresh = build_records(NETWORKS, present, generation=step)
        assert _tables(built) == _tables(fresh), step
        rows = new_rows
