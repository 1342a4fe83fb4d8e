"""SQLite state store: networks, endpoints, sandboxes (and IPAM's tables), WAL mode.

Every change happens inside `Store.transaction()`, a ``BEGIN IMMEDIATE`` transaction, so
concurrent netctl/CNI processes serialise their writes and never see half an operation.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import sqlite3
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from netstack.errors import NetstackError
from netstack.ipam.allocator import SCHEMA as IPAM_SCHEMA
from netstack.model import (
    Endpoint,
    EndpointRow,
    Network,
    PoolConfig,
    PortBinding,
    RelayStoreRow,
    Sandbox,
)
from netstack.ports import PROTOCOLS

DEFAULT_STATE_DIR = "/var/lib/netstack"
SCHEMA_VERSION = 3
CHANGES_KEPT = 4096
"""Entries of the endpoint change log kept (`Store.changes_since`): a reader further behind
reads everything again."""
_PROTOCOL_MARKS = ",".join("?" * len(PROTOCOLS))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS networks (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    driver      TEXT NOT NULL,
    scope       TEXT NOT NULL,
    internal    INTEGER NOT NULL,
    enable_ipv6 INTEGER NOT NULL,
    pools       TEXT NOT NULL,
    options     TEXT NOT NULL,
    labels      TEXT NOT NULL,
    created     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    name     TEXT PRIMARY KEY,
    path     TEXT NOT NULL,
    created  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    id          TEXT PRIMARY KEY,
    network_id  TEXT NOT NULL REFERENCES networks(id),
    sandbox     TEXT NOT NULL,
    interface   TEXT NOT NULL,
    mac         TEXT NOT NULL,
    ipv4        TEXT,
    ipv6        TEXT,
    aliases     TEXT NOT NULL,
    created     TEXT NOT NULL,
    UNIQUE (network_id, sandbox)
);
CREATE INDEX IF NOT EXISTS endpoints_sandbox ON endpoints(sandbox);
"""

# Each entry upgrades the schema from version N-1 to N (index 0 creates version 1).
_PORTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS port_bindings (
    endpoint_id     TEXT NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    protocol        TEXT NOT NULL,
    host_ip         TEXT NOT NULL,
    host_port       INTEGER NOT NULL,
    container_port  INTEGER NOT NULL,
    PRIMARY KEY (protocol, host_port, host_ip)
);
CREATE INDEX IF NOT EXISTS port_bindings_endpoint ON port_bindings(endpoint_id);
"""

# Every write to an endpoint or its port bindings logs the endpoint's id, by trigger, so no
# writer can forget to: netstackd re-reads only what changed (`Store.changes_since`).
_CHANGES_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS endpoint_changes (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id  TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS endpoint_inserted AFTER INSERT ON endpoints
BEGIN INSERT INTO endpoint_changes(endpoint_id) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS endpoint_updated AFTER UPDATE ON endpoints
BEGIN INSERT INTO endpoint_changes(endpoint_id) VALUES (OLD.id), (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS endpoint_deleted AFTER DELETE ON endpoints
BEGIN INSERT INTO endpoint_changes(endpoint_id) VALUES (OLD.id); END;
CREATE TRIGGER IF NOT EXISTS port_binding_inserted AFTER INSERT ON port_bindings
BEGIN INSERT INTO endpoint_changes(endpoint_id) VALUES (NEW.endpoint_id); END;
CREATE TRIGGER IF NOT EXISTS port_binding_updated AFTER UPDATE ON port_bindings
BEGIN INSERT INTO endpoint_changes(endpoint_id) VALUES (OLD.endpoint_id), (NEW.endpoint_id); END;
CREATE TRIGGER IF NOT EXISTS port_binding_deleted AFTER DELETE ON port_bindings
BEGIN INSERT INTO endpoint_changes(endpoint_id) VALUES (OLD.endpoint_id); END;
CREATE TRIGGER IF NOT EXISTS endpoint_changes_pruned AFTER INSERT ON endpoint_changes
WHEN NEW.seq % 256 = 0
BEGIN DELETE FROM endpoint_changes WHERE seq <= NEW.seq - {CHANGES_KEPT}; END;
"""


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of a script (a trigger's body holds semicolons of its own)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def state_dir() -> Path:
    """The state directory: NETSTACK_STATE_DIR or /var/lib/netstack."""
    return Path(os.environ.get("NETSTACK_STATE_DIR", DEFAULT_STATE_DIR))


def now() -> str:
    """Current UTC time in RFC 3339 form."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=1 << 16)
def _ipv4_interface(text: str) -> ipaddress.IPv4Interface:
    """Parsed once per address text: interface objects are immutable, and parsing them was
    most of the cost of reading every endpoint (netstackd does after each change)."""
    return ipaddress.IPv4Interface(text)


@functools.lru_cache(maxsize=1 << 16)
def _ipv6_interface(text: str) -> ipaddress.IPv6Interface:
    return ipaddress.IPv6Interface(text)


@functools.lru_cache(maxsize=1 << 14)
def _aliases(text: str) -> tuple[str, ...]:
    """An endpoint's aliases column, decoded once per distinct text (nearly always "[]")."""
    return tuple(json.loads(text))


class StoreError(NetstackError):
    """The state database cannot be opened or has an unknown schema."""


def _pools_to_json(pools: list[PoolConfig]) -> str:
    return json.dumps(
        [
            {
                "subnet": str(p.subnet),
                "gateway": None if p.gateway is None else str(p.gateway),
                "ip_range": None if p.ip_range is None else str(p.ip_range),
                "aux": {k: str(v) for k, v in p.aux_addresses.items()},
            }
            for p in pools
        ]
    )


def _pools_from_json(text: str) -> list[PoolConfig]:
    return [
        PoolConfig(
            subnet=ipaddress.ip_network(item["subnet"]),
            gateway=None if item["gateway"] is None else ipaddress.ip_address(item["gateway"]),
            ip_range=None if item["ip_range"] is None else ipaddress.ip_network(item["ip_range"]),
            aux_addresses={k: ipaddress.ip_address(v) for k, v in item["aux"].items()},
        )
        for item in json.loads(text)
    ]


class Store:
    """The state database. One instance per process; not shared between threads."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or state_dir()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(
                self.directory / "state.db", timeout=60, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open state database in {self.directory}: {exc}; "
                "check NETSTACK_STATE_DIR and permissions"
            ) from None
        try:
            self.conn.execute("PRAGMA busy_timeout=60000")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise StoreError(
                f"state database {self.directory / 'state.db'} is unusable ({exc}); "
                "restore it from a backup or move it away to start empty"
            ) from None

    def close(self) -> None:
        self.conn.close()

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state database schema {version} is newer than this netstack "
                f"({SCHEMA_VERSION}); upgrade netstack"
            )
        migrations = [_SCHEMA + IPAM_SCHEMA, _PORTS_SCHEMA, _CHANGES_SCHEMA]
        with self.transaction() as conn:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            for script in migrations[current:]:
                for statement in _statements(script):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): committed on success, rolled back on error."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A consistent view across several reads (a read transaction)."""
        self.conn.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def data_version(self) -> int:
        """A number that changes whenever another connection commits (a cheap change probe)."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    # networks -------------------------------------------------------------------------------
    def insert_network(self, conn: sqlite3.Connection, network: Network) -> None:
        conn.execute(
            "INSERT INTO networks(id, name, driver, scope, internal, enable_ipv6, pools, "
            "options, labels, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                network.id,
                network.name,
                network.driver,
                network.scope,
                int(network.internal),
                int(network.enable_ipv6),
                _pools_to_json(network.pools),
                json.dumps(network.options),
                json.dumps(network.labels),
                network.created,
            ),
        )

    def delete_network(self, conn: sqlite3.Connection, network_id: str) -> None:
        conn.execute("DELETE FROM networks WHERE id=?", (network_id,))

    @staticmethod
    def _network(row: sqlite3.Row | tuple[object, ...]) -> Network:
        return Network(
            id=str(row[0]),
            name=str(row[1]),
            driver=str(row[2]),
            scope=str(row[3]),
            internal=bool(row[4]),
            enable_ipv6=bool(row[5]),
            pools=_pools_from_json(str(row[6])),
            options=json.loads(str(row[7])),
            labels=json.loads(str(row[8])),
            created=str(row[9]),
        )

    _NETWORK_COLUMNS = (
        "id, name, driver, scope, internal, enable_ipv6, pools, options, labels, created"
    )

    def networks(self) -> list[Network]:
        rows = self.conn.execute(
            f"SELECT {self._NETWORK_COLUMNS} FROM networks ORDER BY created, name"
        ).fetchall()
        return [self._network(row) for row in rows]

    def network_named(self, name: str) -> Network | None:
        row = self.conn.execute(
            f"SELECT {self._NETWORK_COLUMNS} FROM networks WHERE name=?", (name,)
        ).fetchone()
        return None if row is None else self._network(row)

    def find_network(self, name_or_id: str) -> Network | None:
        """A network by exact name, exact id, or unique id prefix."""
        row = self.conn.execute(
            f"SELECT {self._NETWORK_COLUMNS} FROM networks WHERE name=? OR id=?",
            (name_or_id, name_or_id),
        ).fetchone()
        if row is None and len(name_or_id) >= 4:
            rows = self.conn.execute(
                f"SELECT {self._NETWORK_COLUMNS} FROM networks WHERE substr(id, 1, ?) = ?",
                (len(name_or_id), name_or_id),
            ).fetchall()
            row = rows[0] if len(rows) == 1 else None
        return None if row is None else self._network(row)

    # sandboxes ------------------------------------------------------------------------------
    def insert_sandbox(self, conn: sqlite3.Connection, sandbox: Sandbox) -> None:
        conn.execute(
            "INSERT INTO sandboxes(name, path, created) VALUES (?,?,?)",
            (sandbox.name, sandbox.path, sandbox.created),
        )

    def delete_sandbox(self, conn: sqlite3.Connection, name: str) -> None:
        conn.execute("DELETE FROM sandboxes WHERE name=?", (name,))

    def sandboxes(self) -> list[Sandbox]:
        rows = self.conn.execute(
            "SELECT name, path, created FROM sandboxes ORDER BY created, name"
        ).fetchall()
        return [Sandbox(*row) for row in rows]

    def find_sandbox(self, name: str) -> Sandbox | None:
        row = self.conn.execute(
            "SELECT name, path, created FROM sandboxes WHERE name=?", (name,)
        ).fetchone()
        return None if row is None else Sandbox(*row)

    # endpoints ------------------------------------------------------------------------------
    _ENDPOINT_COLUMNS = "id, network_id, sandbox, interface, mac, ipv4, ipv6, aliases, created"

    @staticmethod
    def _endpoint(row: tuple[object, ...]) -> Endpoint:
        return Endpoint(
            id=str(row[0]),
            network_id=str(row[1]),
            sandbox=str(row[2]),
            interface=str(row[3]),
            mac=str(row[4]),
            ipv4=None if row[5] is None else _ipv4_interface(str(row[5])),
            ipv6=None if row[6] is None else _ipv6_interface(str(row[6])),
            aliases=list(_aliases(str(row[7]))),
            created=str(row[8]),
        )

    def insert_endpoint(self, conn: sqlite3.Connection, endpoint: Endpoint) -> None:
        """Insert an endpoint row; raises sqlite3.IntegrityError if the pair already exists."""
        conn.execute(
            f"INSERT INTO endpoints({self._ENDPOINT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                endpoint.id,
                endpoint.network_id,
                endpoint.sandbox,
                endpoint.interface,
                endpoint.mac,
                None if endpoint.ipv4 is None else str(endpoint.ipv4),
                None if endpoint.ipv6 is None else str(endpoint.ipv6),
                json.dumps(endpoint.aliases),
                endpoint.created,
            ),
        )

    def update_endpoint_interface(
        self, conn: sqlite3.Connection, endpoint_id: str, interface: str
    ) -> None:
        conn.execute("UPDATE endpoints SET interface=? WHERE id=?", (interface, endpoint_id))

    def update_endpoint_sandbox(
        self, conn: sqlite3.Connection, endpoint_id: str, sandbox: str
    ) -> None:
        conn.execute("UPDATE endpoints SET sandbox=? WHERE id=?", (sandbox, endpoint_id))

    def endpoint_by_id(self, endpoint_id: str) -> Endpoint | None:
        row = self.conn.execute(
            f"SELECT {self._ENDPOINT_COLUMNS} FROM endpoints WHERE id=?", (endpoint_id,)
        ).fetchone()
        if row is None:
            return None
        endpoint = self._endpoint(row)
        endpoint.ports = self.ports_of(endpoint_id)
        return endpoint

    def delete_ports(self, conn: sqlite3.Connection, endpoint_id: str) -> None:
        conn.execute("DELETE FROM port_bindings WHERE endpoint_id=?", (endpoint_id,))

    def delete_endpoint(self, conn: sqlite3.Connection, endpoint_id: str) -> None:
        """Forget an endpoint and its published ports. Idempotent."""
        conn.execute("DELETE FROM port_bindings WHERE endpoint_id=?", (endpoint_id,))
        conn.execute("DELETE FROM endpoints WHERE id=?", (endpoint_id,))

    def endpoint_name_rows(self, ids: Collection[str] | None = None) -> list[EndpointRow]:
        """Every endpoint (or those of `ids`) as the DNS records need it, in connection
        order: raw rows (id, network id, sandbox, IPv4 interface, IPv6 interface, aliases
        as JSON), which cost netstackd's reload far less than `endpoints()` and hash
        cheaply."""
        query = "SELECT id, network_id, sandbox, ipv4, ipv6, aliases FROM endpoints"
        order = " ORDER BY created, rowid"
        if ids is None:
            return self.conn.execute(query + order).fetchall()
        return self._rows_of(query + " WHERE id IN ({})" + order, ids)

    def relay_rows(self, ids: Collection[str] | None = None) -> list[RelayStoreRow]:
        """Every published port (or those of the endpoints `ids`) with its endpoint's
        addresses, in publishing order: raw rows (endpoint id, protocol, host IP, host port,
        container port, IPv4 and IPv6 interface) for netstackd's loopback relay."""
        query = (
            "SELECT p.endpoint_id, p.protocol, p.host_ip, p.host_port, p.container_port, "
            "e.ipv4, e.ipv6 FROM port_bindings p JOIN endpoints e ON e.id = p.endpoint_id"
        )
        if ids is None:
            return self.conn.execute(query + " ORDER BY p.rowid").fetchall()
        return self._rows_of(query + " WHERE p.endpoint_id IN ({}) ORDER BY p.rowid", ids)

    def _rows_of(self, query: str, ids: Collection[str]) -> list[Any]:
        """`query` with its ``IN ({})`` filled for `ids`, a chunk at a time (SQLite's limit
        on parameters); rows in the query's order within each chunk."""
        wanted, found = sorted(set(ids)), []
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            found += self.conn.execute(query.format(",".join("?" * len(chunk))), chunk).fetchall()
        return found

    def change_mark(self) -> int:
        """The endpoint change log's newest entry (0 when empty): `changes_since` from here
        gives what changed after this moment."""
        return int(
            self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM endpoint_changes").fetchone()[0]
        )

    def changes_since(self, mark: int) -> tuple[int, set[str]] | None:
        """(the newest mark, ids of the endpoints written since `mark`: their rows or port
        bindings inserted, updated or deleted); None when the log no longer reaches back to
        `mark` (more than `CHANGES_KEPT` writes since, or another database): read everything
        then. Use inside `snapshot()` with the reads that follow."""
        oldest, newest = self.conn.execute(  # one aggregate per SELECT: an index lookup each
            "SELECT (SELECT MIN(seq) FROM endpoint_changes), "
            "(SELECT MAX(seq) FROM endpoint_changes)"
        ).fetchone()
        if newest is None:
            return (0, set()) if mark == 0 else None
        if mark > newest or oldest > mark + 1:
            return None
        rows = self.conn.execute(
            "SELECT DISTINCT endpoint_id FROM endpoint_changes WHERE seq > ?", (mark,)
        ).fetchall()
        return int(newest), {str(row[0]) for row in rows}

    def endpoints(
        self, network_id: str | None = None, sandbox: str | None = None
    ) -> list[Endpoint]:
        """Endpoints, optionally of one network and/or one sandbox, in connection order."""
        clauses, args = [], []
        if network_id is not None:
            clauses.append("network_id=?")
            args.append(network_id)
        if sandbox is not None:
            clauses.append("sandbox=?")
            args.append(sandbox)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.conn.execute(
            f"SELECT {self._ENDPOINT_COLUMNS} FROM endpoints{where} ORDER BY created, rowid",
            args,
        ).fetchall()
        endpoints = [self._endpoint(row) for row in rows]
        by_id = {e.id: e for e in endpoints}
        port_rows = self.conn.execute(
            "SELECT endpoint_id, protocol, host_ip, host_port, container_port FROM port_bindings "
            f"WHERE endpoint_id IN (SELECT id FROM endpoints{where}) ORDER BY rowid",
            args,
        ).fetchall()
        for endpoint_id, *binding in port_rows:
            by_id[endpoint_id].ports.append(PortBinding(*binding))
        return endpoints

    # port bindings --------------------------------------------------------------------------
    def insert_ports(
        self, conn: sqlite3.Connection, endpoint_id: str, ports: list[PortBinding]
    ) -> None:
        conn.executemany(
            "INSERT INTO port_bindings(endpoint_id, protocol, host_ip, host_port, "
            "container_port) VALUES (?,?,?,?,?)",
            [(endpoint_id, p.protocol, p.host_ip, p.host_port, p.container_port) for p in ports],
        )

    def all_ports(self, host_ports: Iterable[int] | None = None) -> list[PortBinding]:
        """Every published port of every endpoint; only those on `host_ports` when given
        (a clash check for known host ports then reads a few rows, not every binding)."""
        query = "SELECT protocol, host_ip, host_port, container_port FROM port_bindings"
        if host_ports is None:
            return [PortBinding(*row) for row in self.conn.execute(query).fetchall()]
        ports = sorted(set(host_ports))
        found: list[PortBinding] = []
        for start in range(0, len(ports), 500):  # within SQLite's limit on parameters
            chunk = ports[start : start + 500]
            marks = ",".join("?" * len(chunk))
            # naming the protocols lets SQLite look the ports up in the primary key
            # (protocol, host_port, host_ip) rather than read every binding
            where = f"protocol IN ({_PROTOCOL_MARKS}) AND host_port IN ({marks})"
            rows = self.conn.execute(f"{query} WHERE {where}", [*PROTOCOLS, *chunk]).fetchall()
            found += [PortBinding(*row) for row in rows]
        return found

    def ports_of(self, endpoint_id: str) -> list[PortBinding]:
        rows = self.conn.execute(
            "SELECT protocol, host_ip, host_port, container_port FROM port_bindings "
            "WHERE endpoint_id=? ORDER BY rowid",
            (endpoint_id,),
        ).fetchall()
        return [PortBinding(*row) for row in rows]

    def find_endpoint(self, network_id: str, sandbox: str) -> Endpoint | None:
        found = self.endpoints(network_id=network_id, sandbox=sandbox)
        return found[0] if found else None
