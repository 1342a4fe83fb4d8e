"""The SQLite store: schema and version, round trips, lookups, transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import datetime
from ipaddress import IPv4Interface, IPv6Interface, ip_address, ip_network
from pathlib import Path

import pytest
from netstack.ipam import AddressAllocator, make_pool_spec

from netstack.model import Endpoint, Network, PoolConfig, PortBinding, Sandbox
from netstack.store import CHANGES_KEPT, SCHEMA_VERSION, Store, StoreError, now, state_dir

ID_A = "aaaa1111" + "0" * 56
ID_B = "aaaa2222" + "0" * 56
ID_C = "bbbb3333" + "0" * 56


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path)
    yield opened
    opened.close()


def make_network(network_id: str = ID_A, name: str = "front", created: str = "") -> Network:
    return Network(
        id=network_id,
        name=name,
        driver="bridge",
        pools=[
            PoolConfig(
                ip_network("10.20.0.0/24"),
                ip_address("10.20.0.1"),
                ip_network("10.20.0.128/25"),
                {"router": ip_address("10.20.0.5")},
            ),
            PoolConfig(ip_network("fd00:1::/64"), ip_address("fd00:1::1")),
        ],
        options={"bridge.name": "nsbraaaa111100", "mtu": "1500"},
        labels={"team": "web", "empty": ""},
        internal=True,
        enable_ipv6=True,
        created=created or "2026-01-02T03:04:05Z",
    )


def make_endpoint(
    endpoint_id: str, sandbox: str, network_id: str = ID_A, created: str = "2026-01-02T03:04:05Z"
) -> Endpoint:
    return Endpoint(
        id=endpoint_id,
        network_id=network_id,
        sandbox=sandbox,
        interface="eth0",
        mac="02:42:ac:11:00:02",
        ipv4=IPv4Interface("10.20.0.2/24"),
        ipv6=IPv6Interface("fd00:1::2/64"),
        aliases=["www", "api"],
        created=created,
    )


def insert_networks(store: Store, *networks: Network) -> None:
    with store.transaction() as conn:
        for network in networks:
            store.insert_network(conn, network)


# schema -----------------------------------------------------------------------------------


def test_schema_version_and_wal(store: Store, tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 3
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert (tmp_path / "state.db").is_file()
    tables = {
        row[0] for row in store.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert {
        "networks",
        "sandboxes",
        "endpoints",
        "ipam_pools",
        "ipam_addresses",
        "port_bindings",
    } <= tables


def test_reopen_keeps_data(tmp_path: Path) -> None:
    first = Store(tmp_path)
    insert_networks(first, make_network())
    first.close()
    again = Store(tmp_path)
    assert again.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [n.name for n in again.networks()] == ["front"]
    again.close()


def test_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    """A database written by schema 1 (no port_bindings) gains the table and keeps its rows."""
    first = Store(tmp_path)
    insert_networks(first, make_network())
    for trigger in ("inserted", "updated", "deleted"):
        first.conn.execute(f"DROP TRIGGER port_binding_{trigger}")
    first.conn.execute("DROP TABLE port_bindings")
    first.conn.execute("PRAGMA user_version=1")
    first.close()
    again = Store(tmp_path)
    assert again.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [n.name for n in again.networks()] == ["front"]
    assert again.all_ports() == []
    again.close()


def test_version_2_database_gains_the_change_log(tmp_path: Path) -> None:
    """Schema 2 had no endpoint change log: the upgrade adds it (triggers and all) and keeps
    the rows; writes after it are logged."""
    first = Store(tmp_path)
    insert_networks(first, make_network())
    first.conn.execute("DROP TABLE endpoint_changes")  # its triggers go with it
    first.conn.execute("PRAGMA user_version=2")
    first.close()
    again = Store(tmp_path)
    assert again.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert again.changes_since(0) == (0, set())
    with again.transaction() as conn:
        again.insert_endpoint(conn, make_endpoint("1" * 64, "web"))
    assert again.changes_since(0) == (1, {"1" * 64})
    again.close()


def test_creates_missing_directory(tmp_path: Path) -> None:
    Store(tmp_path / "a" / "b").close()
    assert (tmp_path / "a" / "b" / "state.db").is_file()


def test_newer_schema_asks_to_upgrade(tmp_path: Path) -> None:
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError) as caught:
        Store(tmp_path)
    message = str(caught.value)
    assert f"schema {SCHEMA_VERSION + 1} is newer than this netstack ({SCHEMA_VERSION})" in message
    assert "upgrade netstack" in message


def test_unopenable_directory_is_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open state database"):
        Store(blocker)


def test_state_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NETSTACK_STATE_DIR", raising=False)
    assert state_dir() == Path("/var/lib/netstack")
    monkeypatch.setenv("NETSTACK_STATE_DIR", str(tmp_path / "state"))
    assert state_dir() == tmp_path / "state"
    opened = Store()
    assert opened.directory == tmp_path / "state"
    assert (tmp_path / "state" / "state.db").is_file()
    opened.close()


def test_now_is_rfc3339_utc() -> None:
    stamp = now()
    assert stamp.endswith("Z")
    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).utcoffset() is not None


# networks ---------------------------------------------------------------------------------


def test_network_round_trip(store: Store) -> None:
    network = make_network()
    bare = Network(id=ID_C, name="bare", driver="bridge", pools=[], created="2026-01-03T00:00:00Z")
    insert_networks(store, network, bare)
    assert store.networks() == [network, bare]
    assert store.network_named("front") == network
    assert store.network_named("ghost") is None


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("front", "front"),  # exact name
        ("back", "back"),
        (ID_A, "front"),  # exact id
        ("aaaa1", "front"),  # unique id prefix
        ("aaaa2222", "back"),
        ("bbbb", "other"),
        ("aaaa", None),  # ambiguous prefix
        ("bbb", None),  # prefixes shorter than 4 are not used
        ("cccc", None),
        ("ghost", None),
    ],
)
def test_find_network(store: Store, query: str, expected: str | None) -> None:
    insert_networks(
        store,
        make_network(ID_A, "front"),
        make_network(ID_B, "back"),
        make_network(ID_C, "other"),
    )
    found = store.find_network(query)
    assert (None if found is None else found.name) == expected


def test_networks_ordered_by_creation(store: Store) -> None:
    insert_networks(
        store,
        make_network(ID_A, "zeta", created="2026-01-01T00:00:02Z"),
        make_network(ID_B, "beta", created="2026-01-01T00:00:01Z"),
        make_network(ID_C, "alpha", created="2026-01-01T00:00:02Z"),
    )
    assert [n.name for n in store.networks()] == ["beta", "alpha", "zeta"]


def test_duplicate_network_name_rejected(store: Store) -> None:
    insert_networks(store, make_network(ID_A, "front"))
    with pytest.raises(sqlite3.IntegrityError):
        insert_networks(store, make_network(ID_B, "front"))
    assert [n.id for n in store.networks()] == [ID_A]


def test_delete_network(store: Store) -> None:
    insert_networks(store, make_network(ID_A, "front"), make_network(ID_B, "back"))
    with store.transaction() as conn:
        store.delete_network(conn, ID_A)
        store.delete_network(conn, "missing")
    assert [n.name for n in store.networks()] == ["back"]


# sandboxes --------------------------------------------------------------------------------


def test_sandbox_round_trip(store: Store) -> None:
    web = Sandbox("web", "/run/netns/web", "2026-01-01T00:00:02Z")
    db = Sandbox("db", "/run/netns/db", "2026-01-01T00:00:01Z")
    with store.transaction() as conn:
        store.insert_sandbox(conn, web)
        store.insert_sandbox(conn, db)
    assert store.sandboxes() == [db, web]
    assert store.find_sandbox("web") == web
    assert store.find_sandbox("ghost") is None
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as conn:
        store.insert_sandbox(conn, Sandbox("web", "/elsewhere"))
    with store.transaction() as conn:
        store.delete_sandbox(conn, "web")
        store.delete_sandbox(conn, "web")
    assert store.sandboxes() == [db]


# endpoints --------------------------------------------------------------------------------


def test_endpoint_round_trip(store: Store) -> None:
    insert_networks(store, make_network(ID_A, "front"), make_network(ID_B, "back"))
    endpoint = make_endpoint("e" * 64, "web")
    bare = Endpoint(id="f" * 64, network_id=ID_B, sandbox="web", created="2026-01-02T03:04:06Z")
    with store.transaction() as conn:
        store.insert_endpoint(conn, endpoint)
        store.insert_endpoint(conn, bare)
    assert store.endpoints(network_id=ID_A) == [endpoint]
    assert store.find_endpoint(ID_A, "web") == endpoint
    assert store.find_endpoint(ID_B, "web") == bare
    assert store.find_endpoint(ID_A, "db") is None
    assert [e.network_id for e in store.endpoints(sandbox="web")] == [ID_A, ID_B]
    assert store.endpoints(network_id=ID_B, sandbox="db") == []
    with store.transaction() as conn:
        store.update_endpoint_interface(conn, endpoint.id, "eth3")
    found = store.find_endpoint(ID_A, "web")
    assert found is not None
    assert found.interface == "eth3"


def test_endpoints_in_creation_order(store: Store) -> None:
    insert_networks(store, make_network())
    same_second = "2026-01-01T00:00:05Z"
    rows = [
        make_endpoint("9" * 64, "late", created="2026-01-01T00:00:09Z"),
        make_endpoint("c" * 64, "first-of-second", created=same_second),
        make_endpoint("1" * 64, "second-of-second", created=same_second),
        make_endpoint("5" * 64, "early", created="2026-01-01T00:00:01Z"),
    ]
    with store.transaction() as conn:
        for endpoint in rows:
            store.insert_endpoint(conn, endpoint)
    assert [e.sandbox for e in store.endpoints()] == [
        "early",
        "first-of-second",
        "second-of-second",
        "late",
    ]


def test_lean_rows_for_netstackd(store: Store) -> None:
    """endpoint_name_rows, relay_rows and all_ports(host_ports): what the daemon's reload
    and a port mapping's clash check read instead of whole endpoints."""
    insert_networks(store, make_network())
    web = make_endpoint("1" * 64, "web")
    web.aliases = ["www"]
    db = make_endpoint("2" * 64, "db", created="2026-01-03T00:00:00Z")
    with store.transaction() as conn:
        store.insert_endpoint(conn, web)
        store.insert_endpoint(conn, db)
        store.insert_ports(
            conn, web.id, [PortBinding("tcp", "", 8080, 80), PortBinding("udp", "::1", 53, 53)]
        )
        store.insert_ports(conn, db.id, [PortBinding("tcp", "127.0.0.1", 5432, 5432)])
    v4, v6 = (None if a is None else str(a) for a in (web.ipv4, web.ipv6))
    rows = store.endpoint_name_rows()
    assert rows[0] == (web.id, ID_A, "web", v4, v6, '["www"]')
    assert [row[2] for row in rows] == ["web", "db"]
    relay = store.relay_rows()
    assert relay[:2] == [
        (web.id, "tcp", "", 8080, 80, v4, v6),
        (web.id, "udp", "::1", 53, 53, v4, v6),
    ]
    assert len(relay) == 3
    assert store.relay_rows([db.id, "0" * 64]) == relay[2:]
    assert store.endpoint_name_rows([db.id, "0" * 64]) == rows[1:]
    assert store.all_ports([5432, 9999]) == [PortBinding("tcp", "127.0.0.1", 5432, 5432)]
    assert store.all_ports([]) == []
    assert len(store.all_ports()) == 3
    assert store.all_ports(range(1, 1200)) == store.all_ports([53])  # chunked parameters


def test_changes_since_names_every_endpoint_written(store: Store) -> None:
    """Inserting, updating or deleting an endpoint or its port bindings logs the endpoint
    (netstackd then re-reads only those); a mark the log no longer reaches gives None."""
    insert_networks(store, make_network())
    assert store.change_mark() == 0
    assert store.changes_since(0) == (0, set())
    web, db = make_endpoint("1" * 64, "web"), make_endpoint("2" * 64, "db")
    with store.transaction() as conn:
        store.insert_endpoint(conn, web)
        store.insert_endpoint(conn, db)
    start = store.change_mark()
    assert store.changes_since(0) == (start, {web.id, db.id})
    assert store.changes_since(start) == (start, set())
    with store.transaction() as conn:
        store.insert_ports(conn, db.id, [PortBinding("tcp", "", 8080, 80)])
    mark, changed = store.changes_since(start) or (0, set())
    assert changed == {db.id}
    with store.transaction() as conn:
        store.update_endpoint_sandbox(conn, web.id, "web2")
    assert store.changes_since(mark) == (store.change_mark(), {web.id})
    mark = store.change_mark()
    with store.transaction() as conn:
        store.delete_endpoint(conn, db.id)  # its port binding too
    assert store.changes_since(mark) == (store.change_mark(), {db.id})
    assert store.changes_since(store.change_mark() + 1) is None  # ahead: another database
    with store.transaction() as conn:  # more writes than the log keeps
        for n in range(CHANGES_KEPT + 300):
            store.update_endpoint_sandbox(conn, web.id, f"web-{n}")
    assert store.changes_since(start) is None
    recent = store.change_mark() - 10
    assert store.changes_since(recent) == (store.change_mark(), {web.id})
    kept = store.conn.execute("SELECT COUNT(*) FROM endpoint_changes").fetchone()[0]
    assert CHANGES_KEPT <= kept <= CHANGES_KEPT + 256


def test_one_endpoint_per_network_and_sandbox(store: Store) -> None:
    insert_networks(store, make_network())
    with store.transaction() as conn:
        store.insert_endpoint(conn, make_endpoint("1" * 64, "web"))
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as conn:
        store.insert_endpoint(conn, make_endpoint("2" * 64, "web"))
    assert [e.id for e in store.endpoints()] == ["1" * 64]


def test_endpoint_needs_its_network(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as conn:
        store.insert_endpoint(conn, make_endpoint("1" * 64, "web", network_id=ID_C))


def test_delete_endpoint(store: Store) -> None:
    insert_networks(store, make_network())
    with store.transaction() as conn:
        store.insert_endpoint(conn, make_endpoint("1" * 64, "web"))
        store.insert_endpoint(conn, make_endpoint("2" * 64, "db"))
    with store.transaction() as conn:
        store.delete_endpoint(conn, "1" * 64)
        store.delete_endpoint(conn, "1" * 64)
    assert [e.sandbox for e in store.endpoints()] == ["db"]


# transactions -----------------------------------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_rollback_on_exception_leaves_nothing(store: Store, error: type[BaseException]) -> None:
    with pytest.raises(error), store.transaction() as conn:
        store.insert_network(conn, make_network())
        store.insert_sandbox(conn, Sandbox("web", "/run/netns/web"))
        store.insert_endpoint(conn, make_endpoint("1" * 64, "web"))
        AddressAllocator(conn).add_pool(ID_A, make_pool_spec(ip_network("10.20.0.0/24")))
        raise error
    assert store.networks() == []
    assert store.sandboxes() == []
    assert store.endpoints() == []
    assert store.conn.execute("SELECT count(*) FROM ipam_pools").fetchone()[0] == 0
    assert store.conn.execute("SELECT count(*) FROM ipam_addresses").fetchone()[0] == 0
    assert not store.conn.in_transaction
    insert_networks(store, make_network())  # the store is usable again
    assert [n.name for n in store.networks()] == ["front"]


def test_commit_is_visible_to_another_connection(store: Store, tmp_path: Path) -> None:
    insert_networks(store, make_network())
    other = Store(tmp_path)
    assert [n.name for n in other.networks()] == ["front"]
    other.close()


def test_transaction_is_immediate(store: Store, tmp_path: Path) -> None:
    """A second writer cannot start while a transaction is open (BEGIN IMMEDIATE)."""
    other = sqlite3.connect(tmp_path / "state.db", timeout=0, isolation_level=None)
    with store.transaction(), pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()


# product bugs (documented, strict: they fail loudly once fixed) ---------------------------


def test_find_network_prefix_is_literal(store: Store) -> None:
    insert_networks(store, make_network(ID_A, "front"))
    assert store.find_network("____") is None  # a valid name of a network that does not exist
    assert store.find_network("aa%") is None


def test_find_network_prefix_is_case_sensitive(store: Store) -> None:
    insert_networks(store, make_network(ID_A, "front"))
    assert store.find_network("AAAA1") is None


def test_corrupt_database_is_store_error(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not a database" * 200)
    with pytest.raises(StoreError):
        Store(tmp_path)
