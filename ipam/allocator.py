"""Serial address allocation persisted in SQLite.

The allocator works on a connection the caller has already put inside a write transaction
(``BEGIN IMMEDIATE``), so concurrent processes never hand out one address twice. Addresses
are stored as fixed-width big-endian blobs, which SQLite orders like the integers they are.
Allocation is serial: the search starts after the last address handed out and wraps around,
so a just-released address is not reused at once (as Docker's IPAM does).
"""

from __future__ import annotations

import ipaddress
import sqlite3
from dataclasses import dataclass

from netstack.ipam.pools import PoolSpec, address_from_int, is_host_address

from netstack.errors import Conflict, Exhausted, InvalidArgument
from netstack.model import IPAddress, IPNetwork

SCHEMA = """
CREATE TABLE IF NOT EXISTS ipam_pools (
    id          INTEGER PRIMARY KEY,
    network_id  TEXT NOT NULL,
    subnet      TEXT NOT NULL,
    version     INTEGER NOT NULL,
    first       BLOB NOT NULL,
    last        BLOB NOT NULL,
    cursor      BLOB
);
CREATE INDEX IF NOT EXISTS ipam_pools_network ON ipam_pools(network_id);
CREATE TABLE IF NOT EXISTS ipam_addresses (
    pool_id  INTEGER NOT NULL REFERENCES ipam_pools(id) ON DELETE CASCADE,
    address  BLOB NOT NULL,
    owner    TEXT NOT NULL,
    PRIMARY KEY (pool_id, address)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ipam_addresses_owner ON ipam_addresses(owner);
"""

_BATCH = 512

# Owner of addresses, and network id of pools, handed out ahead of the network or endpoint
# that will use them (Docker's IPAM driver protocol asks for a pool and its addresses before
# it creates the network and its endpoints). The network or endpoint claims them later.
PENDING = "pending"


def _width(version: int) -> int:
    return 4 if version == 4 else 16


def _pack(value: int, version: int) -> bytes:
    return value.to_bytes(_width(version), "big")


def _unpack(blob: bytes) -> int:
    return int.from_bytes(blob, "big")


@dataclass(frozen=True)
class Pool:
    """A stored pool row."""

    id: int
    network_id: str
    subnet: IPNetwork
    first: int
    last: int


class AddressAllocator:
    """Pools and addresses on a SQLite connection; every call must run inside a transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # pools ----------------------------------------------------------------------------------
    def subnets_in_use(self) -> list[IPNetwork]:
        """Every subnet of every pool (for overlap checks and default-pool selection)."""
        rows = self.conn.execute("SELECT subnet FROM ipam_pools").fetchall()
        return [ipaddress.ip_network(row[0]) for row in rows]

    def network_of_subnet(self, subnet: IPNetwork) -> tuple[str, IPNetwork] | None:
        """(network id, subnet) of the first stored pool overlapping `subnet`, if any."""
        for network_id, text in self.conn.execute("SELECT network_id, subnet FROM ipam_pools"):
            other = ipaddress.ip_network(text)
            if other.version == subnet.version and other.overlaps(subnet):
                return network_id, other
        return None

    def add_pool(self, network_id: str, spec: PoolSpec) -> int:
        """Store a pool and reserve its gateway and aux addresses; return the pool id.

        Raises Conflict when the subnet overlaps a stored pool (the caller names the network).
        """
        version = spec.subnet.version
        cur = self.conn.execute(
            "INSERT INTO ipam_pools(network_id, subnet, version, first, last) VALUES (?,?,?,?,?)",
            (
                network_id,
                str(spec.subnet),
                version,
                _pack(spec.first, version),
                _pack(spec.last, version),
            ),
        )
        pool_id = cur.lastrowid
        assert pool_id is not None
        self.reserve(pool_id, spec.gateway, "gateway")
        for name, address in spec.aux_addresses.items():
            self.reserve(pool_id, address, f"aux:{name}")
        return pool_id

    def add_pending_pool(self, spec: PoolSpec) -> Pool:
        """Store a pool held for a network not created yet; nothing reserved in it.

        Raises Conflict when the subnet overlaps a stored pool (the caller checks first and
        names the owner).
        """
        clash = self.network_of_subnet(spec.subnet)
        if clash is not None:
            raise Conflict(f"subnet {spec.subnet} overlaps {clash[1]}, already in use")
        version = spec.subnet.version
        cur = self.conn.execute(
            "INSERT INTO ipam_pools(network_id, subnet, version, first, last) VALUES (?,?,?,?,?)",
            (PENDING, str(spec.subnet), version, _pack(spec.first, version),
             _pack(spec.last, version)),
        )  # fmt: skip
        assert cur.lastrowid is not None
        return Pool(cur.lastrowid, PENDING, spec.subnet, spec.first, spec.last)

    def pool_of_subnet(self, subnet: IPNetwork) -> Pool | None:
        """The stored pool of exactly this subnet, pending or a network's."""
        row = self.conn.execute(
            "SELECT id, network_id, subnet, first, last FROM ipam_pools WHERE subnet=?",
            (str(subnet),),
        ).fetchone()
        if row is None:
            return None
        return Pool(row[0], row[1], ipaddress.ip_network(row[2]), _unpack(row[3]), _unpack(row[4]))

    def claim_pool(self, subnet: IPNetwork, network_id: str) -> Pool | None:
        """Give the pending pool of exactly `subnet` to a network; None if there is none."""
        pool = self.pool_of_subnet(subnet)
        if pool is None or pool.network_id != PENDING:
            return None
        self.conn.execute("UPDATE ipam_pools SET network_id=? WHERE id=?", (network_id, pool.id))
        return Pool(pool.id, network_id, pool.subnet, pool.first, pool.last)

    def remove_pool(self, pool_id: int) -> None:
        """Forget one pool and its addresses. Idempotent."""
        self.conn.execute("DELETE FROM ipam_addresses WHERE pool_id=?", (pool_id,))
        self.conn.execute("DELETE FROM ipam_pools WHERE id=?", (pool_id,))

    def pools(self, network_id: str) -> list[Pool]:
        """The network's pools, IPv4 first."""
        rows = self.conn.execute(
            "SELECT id, network_id, subnet, first, last FROM ipam_pools "
            "WHERE network_id=? ORDER BY version, id",
            (network_id,),
        ).fetchall()
        return [
            Pool(row[0], row[1], ipaddress.ip_network(row[2]), _unpack(row[3]), _unpack(row[4]))
            for row in rows
        ]

    def remove_pools(self, network_id: str) -> None:
        """Forget the network's pools and every address in them. Idempotent."""
        self.conn.execute(
            "DELETE FROM ipam_addresses WHERE pool_id IN "
            "(SELECT id FROM ipam_pools WHERE network_id=?)",
            (network_id,),
        )
        self.conn.execute("DELETE FROM ipam_pools WHERE network_id=?", (network_id,))

    # addresses ------------------------------------------------------------------------------
    def reserve(self, pool_id: int, address: IPAddress, owner: str) -> None:
        """Mark one specific address as taken; raise Conflict if it already is."""
        try:
            self.conn.execute(
                "INSERT INTO ipam_addresses(pool_id, address, owner) VALUES (?,?,?)",
                (pool_id, _pack(int(address), address.version), owner),
            )
        except sqlite3.IntegrityError:
            holder = self.owner_of(pool_id, address)
            raise Conflict(
                f"address {address} is already in use ({holder}); choose another address"
            ) from None

    def owner_of(self, pool_id: int, address: IPAddress) -> str | None:
        row = self.conn.execute(
            "SELECT owner FROM ipam_addresses WHERE pool_id=? AND address=?",
            (pool_id, _pack(int(address), address.version)),
        ).fetchone()
        return None if row is None else str(row[0])

    def claim(self, pool_id: int, address: IPAddress, owner: str) -> None:
        """Make `owner` hold `address`: a PENDING address changes hands, a free one is
        reserved. Idempotent for the same owner; raises Conflict if someone else holds it."""
        holder = self.owner_of(pool_id, address)
        if holder == owner:
            return
        if holder == PENDING:
            self.conn.execute(
                "UPDATE ipam_addresses SET owner=? WHERE pool_id=? AND address=?",
                (owner, pool_id, _pack(int(address), address.version)),
            )
            return
        self.reserve(pool_id, address, owner)

    def request(
        self, pool: Pool, owner: str, preferred: IPAddress | None = None, claim: bool = False
    ) -> IPAddress:
        """Allocate an address of `pool` to `owner`: `preferred` if given, else the next free.

        With `claim`, a preferred address held PENDING (handed out ahead) is taken over.
        Raises InvalidArgument for a preferred address outside the subnet, Conflict when it is
        taken, Exhausted when the pool has no free address.
        """
        version = pool.subnet.version
        if preferred is not None:
            if not is_host_address(pool.subnet, preferred):
                raise InvalidArgument(
                    f"address {preferred} is not a usable address of subnet {pool.subnet}"
                )
            if claim:
                self.claim(pool.id, preferred, owner)
            else:
                self.reserve(pool.id, preferred, owner)
            return preferred
        row = self.conn.execute("SELECT cursor FROM ipam_pools WHERE id=?", (pool.id,)).fetchone()
        start = pool.first if row[0] is None else _unpack(row[0]) + 1
        if not pool.first <= start <= pool.last:
            start = pool.first
        value = self._first_free(pool, start, pool.last)
        if value is None and start > pool.first:
            value = self._first_free(pool, pool.first, start - 1)
        if value is None:
            raise Exhausted(
                f"no free address left in {pool.subnet} (range "
                f"{address_from_int(pool.first, version)}-{address_from_int(pool.last, version)}); "
                "disconnect endpoints or use a larger subnet"
            )
        packed = _pack(value, version)
        self.conn.execute(
            "INSERT INTO ipam_addresses(pool_id, address, owner) VALUES (?,?,?)",
            (pool.id, packed, owner),
        )
        self.conn.execute("UPDATE ipam_pools SET cursor=? WHERE id=?", (packed, pool.id))
        return address_from_int(value, version)

    def _first_free(self, pool: Pool, low: int, high: int) -> int | None:
        """Lowest free address in [low, high]: walk the taken run that starts at `low`."""
        version = pool.subnet.version
        expected = low
        while expected <= high:
            rows = self.conn.execute(
                "SELECT address FROM ipam_addresses WHERE pool_id=? AND address>=? "
                "AND address<=? ORDER BY address LIMIT ?",
                (pool.id, _pack(expected, version), _pack(high, version), _BATCH),
            ).fetchall()
            for (blob,) in rows:
                if _unpack(blob) != expected:
                    return expected
                expected += 1
            if len(rows) < _BATCH:
                break
        return expected if expected <= high else None

    def release(self, pool_id: int, address: IPAddress) -> None:
        """Free one address. Idempotent."""
        self.conn.execute(
            "DELETE FROM ipam_addresses WHERE pool_id=? AND address=?",
            (pool_id, _pack(int(address), address.version)),
        )

    def release_owner(self, owner: str) -> None:
        """Free every address held by `owner`. Idempotent."""
        self.conn.execute("DELETE FROM ipam_addresses WHERE owner=?", (owner,))
