"""AddressAllocator on a real SQLite store: serial allocation, reservations, concurrency."""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import queue
import time
from collections.abc import Iterator, Mapping
from ipaddress import ip_address, ip_network
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from netstack.ipam import AddressAllocator, make_pool_spec
from netstack.ipam.allocator import Pool

from netstack.errors import Conflict, Exhausted, InvalidArgument
from netstack.model import IPAddress
from netstack.store import Store

NET = "net-a"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path)
    yield opened
    opened.close()


def add_pool(
    store: Store,
    subnet: str,
    network_id: str = NET,
    gateway: str | None = None,
    ip_range: str | None = None,
    aux: Mapping[str, str] | None = None,
) -> Pool:
    """Store one pool in its own transaction and return the stored row."""
    spec = make_pool_spec(
        ip_network(subnet),
        None if gateway is None else ip_address(gateway),
        None if ip_range is None else ip_network(ip_range),
        {name: ip_address(text) for name, text in (aux or {}).items()},
    )
    with store.transaction() as conn:
        allocator = AddressAllocator(conn)
        pool_id = allocator.add_pool(network_id, spec)
        return next(p for p in allocator.pools(network_id) if p.id == pool_id)


def request(store: Store, pool: Pool, owner: str, preferred: str | None = None) -> str:
    """One allocation in its own transaction, as the controller does it."""
    with store.transaction() as conn:
        wanted = None if preferred is None else ip_address(preferred)
        return str(AddressAllocator(conn).request(pool, owner, wanted))


def release(store: Store, pool: Pool, address: str) -> None:
    with store.transaction() as conn:
        AddressAllocator(conn).release(pool.id, ip_address(address))


def owner_of(store: Store, pool: Pool, address: str) -> str | None:
    with store.transaction() as conn:
        return AddressAllocator(conn).owner_of(pool.id, ip_address(address))


def taken(store: Store) -> list[tuple[int, str]]:
    """(pool id, owner) of every stored address."""
    rows: list[tuple[int, str]] = store.conn.execute(
        "SELECT pool_id, owner FROM ipam_addresses ORDER BY pool_id, address"
    ).fetchall()
    return rows


# serial allocation ------------------------------------------------------------------------


def test_first_allocations_follow_the_gateway(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/24")
    assert [request(store, pool, f"ep{n}") for n in range(3)] == [
        "10.20.0.2",
        "10.20.0.3",
        "10.20.0.4",
    ]
    assert owner_of(store, pool, "10.20.0.1") == "gateway"
    assert owner_of(store, pool, "10.20.0.3") == "ep1"


def test_released_address_is_not_reused_at_once(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/24")
    first = request(store, pool, "a")
    request(store, pool, "b")
    release(store, pool, first)
    assert first == "10.20.0.2"
    assert request(store, pool, "c") == "10.20.0.4"


def test_next_after_last_even_when_last_was_released(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/24")
    request(store, pool, "a")
    last = request(store, pool, "b")
    release(store, pool, last)
    assert request(store, pool, "c") == "10.20.0.4"


def test_wraps_around_to_the_start(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/29")  # .1 gateway, .2-.6 dynamic
    got = [request(store, pool, f"ep{n}") for n in range(5)]
    assert got == [f"10.20.0.{n}" for n in range(2, 7)]
    release(store, pool, "10.20.0.4")
    release(store, pool, "10.20.0.3")
    assert request(store, pool, "x") == "10.20.0.3"  # lowest free after wrapping
    assert request(store, pool, "y") == "10.20.0.4"
    with pytest.raises(Exhausted):
        request(store, pool, "z")


def test_cursor_past_the_end_wraps(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/29")
    for n in range(5):
        request(store, pool, f"ep{n}")
    release(store, pool, "10.20.0.6")
    release(store, pool, "10.20.0.2")
    assert request(store, pool, "x") == "10.20.0.2"


def test_skips_gateway_aux_and_static_reservations(store: Store) -> None:
    pool = add_pool(
        store,
        "10.20.0.0/28",
        gateway="10.20.0.5",
        aux={"router": "10.20.0.2", "printer": "10.20.0.3"},
    )
    assert request(store, pool, "static", preferred="10.20.0.7") == "10.20.0.7"
    got = [request(store, pool, f"ep{n}") for n in range(4)]
    assert got == ["10.20.0.1", "10.20.0.4", "10.20.0.6", "10.20.0.8"]
    assert owner_of(store, pool, "10.20.0.2") == "aux:router"
    assert owner_of(store, pool, "10.20.0.3") == "aux:printer"
    assert owner_of(store, pool, "10.20.0.5") == "gateway"


def test_ip_range_bounds_respected(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/24", ip_range="10.20.0.16/30")
    got = [request(store, pool, f"ep{n}") for n in range(4)]
    assert got == ["10.20.0.16", "10.20.0.17", "10.20.0.18", "10.20.0.19"]
    with pytest.raises(Exhausted) as caught:
        request(store, pool, "one-too-many")
    assert "10.20.0.16-10.20.0.19" in str(caught.value)


def test_ip_range_at_the_top_excludes_broadcast(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/24", ip_range="10.20.0.252/30")
    got = [request(store, pool, f"ep{n}") for n in range(3)]
    assert got == ["10.20.0.252", "10.20.0.253", "10.20.0.254"]
    with pytest.raises(Exhausted):
        request(store, pool, "x")


def test_long_taken_run_longer_than_one_batch(store: Store) -> None:
    """More than one query batch (512) of consecutive taken addresses before a free one."""
    pool = add_pool(store, "10.20.0.0/22")
    with store.transaction() as conn:
        allocator = AddressAllocator(conn)
        for n in range(2, 702):
            allocator.reserve(pool.id, ip_address(int(ip_address("10.20.0.0")) + n), f"s{n}")
    assert request(store, pool, "x") == str(ip_address(int(ip_address("10.20.0.0")) + 702))


# preferred addresses ----------------------------------------------------------------------


def test_preferred_inside_subnet_outside_ip_range_is_allowed(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/24", ip_range="10.20.0.128/25")
    assert request(store, pool, "static", preferred="10.20.0.10") == "10.20.0.10"
    # A static address does not move the dynamic cursor.
    assert request(store, pool, "dyn") == "10.20.0.128"


@pytest.mark.parametrize(
    "preferred",
    ["10.21.0.10", "10.20.0.0", "10.20.0.255", "fd00::10"],
)
def test_preferred_outside_subnet_is_invalid(store: Store, preferred: str) -> None:
    pool = add_pool(store, "10.20.0.0/24")
    with pytest.raises(InvalidArgument, match=r"not a usable address of subnet 10\.20\.0\.0/24"):
        request(store, pool, "ep", preferred=preferred)
    assert taken(store) == [(pool.id, "gateway")]


@pytest.mark.parametrize(
    ("preferred", "holder"),
    [("10.20.0.1", "gateway"), ("10.20.0.9", "aux:router"), ("10.20.0.50", "ep-first")],
)
def test_preferred_taken_is_conflict_naming_holder(
    store: Store, preferred: str, holder: str
) -> None:
    pool = add_pool(store, "10.20.0.0/24", aux={"router": "10.20.0.9"})
    request(store, pool, "ep-first", preferred="10.20.0.50")
    with pytest.raises(Conflict) as caught:
        request(store, pool, "ep-second", preferred=preferred)
    assert str(caught.value) == (
        f"address {preferred} is already in use ({holder}); choose another address"
    )
    assert owner_of(store, pool, preferred) == holder


# exhaustion -------------------------------------------------------------------------------


def test_exhausted_with_clear_message(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/30")  # .1 gateway, .2 the only free address
    assert request(store, pool, "a") == "10.20.0.2"
    with pytest.raises(Exhausted) as caught:
        request(store, pool, "b")
    assert str(caught.value) == (
        "no free address left in 10.20.0.0/30 (range 10.20.0.1-10.20.0.2); "
        "disconnect endpoints or use a larger subnet"
    )
    release(store, pool, "10.20.0.2")
    assert request(store, pool, "c") == "10.20.0.2"


def test_failed_request_leaves_nothing(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/30")
    request(store, pool, "a")
    before = taken(store)
    with pytest.raises(Exhausted):
        request(store, pool, "b")
    assert taken(store) == before


# release ----------------------------------------------------------------------------------


def test_release_is_idempotent(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/24")
    address = request(store, pool, "a")
    release(store, pool, address)
    release(store, pool, address)
    release(store, pool, "10.20.0.200")  # never allocated
    assert owner_of(store, pool, address) is None
    assert taken(store) == [(pool.id, "gateway")]


def test_release_owner_frees_every_address_of_owner_only(store: Store) -> None:
    pool4 = add_pool(store, "10.20.0.0/24")
    pool6 = add_pool(store, "fd00:1::/64")
    request(store, pool4, "a")
    request(store, pool6, "a")
    kept = request(store, pool4, "b")
    for _ in range(2):
        with store.transaction() as conn:
            AddressAllocator(conn).release_owner("a")
    assert sorted(owner for _, owner in taken(store)) == ["b", "gateway", "gateway"]
    assert owner_of(store, pool4, kept) == "b"
    with store.transaction() as conn:
        AddressAllocator(conn).release_owner("nobody")


# IPv6 -------------------------------------------------------------------------------------


def test_ipv6_allocation(store: Store) -> None:
    pool = add_pool(store, "fd00:1::/64")
    assert [request(store, pool, f"ep{n}") for n in range(2)] == ["fd00:1::2", "fd00:1::3"]
    widths = store.conn.execute(
        "SELECT DISTINCT length(address) FROM ipam_addresses WHERE pool_id=?", (pool.id,)
    ).fetchall()
    assert widths == [(16,)]
    bounds = store.conn.execute(
        "SELECT length(first), length(last) FROM ipam_pools WHERE id=?", (pool.id,)
    ).fetchone()
    assert bounds == (16, 16)


def test_ipv4_blobs_are_4_bytes(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/24")
    request(store, pool, "ep")
    widths = store.conn.execute("SELECT DISTINCT length(address) FROM ipam_addresses").fetchall()
    assert widths == [(4,)]


def test_ipv6_range_at_the_top_includes_last_address(store: Store) -> None:
    pool = add_pool(store, "fd00:1::/64", ip_range="fd00:1::ffff:ffff:ffff:fffe/127")
    got = [request(store, pool, f"ep{n}") for n in range(2)]
    assert got == ["fd00:1::ffff:ffff:ffff:fffe", "fd00:1::ffff:ffff:ffff:ffff"]
    with pytest.raises(Exhausted, match="fd00:1::/64"):
        request(store, pool, "x")


def test_ipv6_preferred_and_wrap(store: Store) -> None:
    pool = add_pool(store, "fd00:1::/124")  # ::1 gateway, ::2-::f dynamic
    assert request(store, pool, "static", preferred="fd00:1::f") == "fd00:1::f"
    got = [request(store, pool, f"ep{n}") for n in range(13)]
    assert got == [f"fd00:1::{n:x}" for n in range(2, 15)]
    release(store, pool, "fd00:1::5")
    assert request(store, pool, "again") == "fd00:1::5"
    with pytest.raises(InvalidArgument):
        request(store, pool, "bad", preferred="10.20.0.1")


# pools ------------------------------------------------------------------------------------


def test_pools_ipv4_first_and_subnets_in_use(store: Store) -> None:
    add_pool(store, "fd00:1::/64")
    add_pool(store, "10.20.0.0/24")
    add_pool(store, "10.30.0.0/24", network_id="net-b")
    with store.transaction() as conn:
        allocator = AddressAllocator(conn)
        assert [str(p.subnet) for p in allocator.pools(NET)] == ["10.20.0.0/24", "fd00:1::/64"]
        assert {str(s) for s in allocator.subnets_in_use()} == {
            "fd00:1::/64",
            "10.20.0.0/24",
            "10.30.0.0/24",
        }
        assert allocator.pools("unknown") == []


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("10.1.2.0/24", ("net-a", "10.1.0.0/16")),  # inside
        ("10.0.0.0/8", ("net-a", "10.1.0.0/16")),  # around
        ("10.1.0.0/16", ("net-a", "10.1.0.0/16")),  # equal
        ("10.2.0.0/16", None),
        ("fd00:1:0:1::/64", None),
        ("fd00:1::/48", ("net-b", "fd00:1::/64")),
    ],
)
def test_network_of_subnet_detects_overlap(
    store: Store, query: str, expected: tuple[str, str] | None
) -> None:
    add_pool(store, "10.1.0.0/16", network_id="net-a")
    add_pool(store, "fd00:1::/64", network_id="net-b")
    with store.transaction() as conn:
        found = AddressAllocator(conn).network_of_subnet(ip_network(query))
    assert (None if found is None else (found[0], str(found[1]))) == expected


def test_remove_pools(store: Store) -> None:
    pool = add_pool(store, "10.20.0.0/24")
    add_pool(store, "fd00:1::/64")
    other = add_pool(store, "10.30.0.0/24", network_id="net-b")
    request(store, pool, "ep")
    request(store, other, "ep-b")
    for _ in range(2):  # idempotent
        with store.transaction() as conn:
            AddressAllocator(conn).remove_pools(NET)
    with store.transaction() as conn:
        allocator = AddressAllocator(conn)
        assert allocator.pools(NET) == []
        assert allocator.network_of_subnet(ip_network("10.20.0.0/24")) is None
        assert [p.subnet for p in allocator.pools("net-b")] == [ip_network("10.30.0.0/24")]
    assert {owner for _, owner in taken(store)} == {"gateway", "ep-b"}
    # The subnet can be used again, and allocation starts from the beginning.
    again = add_pool(store, "10.20.0.0/24", network_id="net-c")
    assert request(store, again, "ep") == "10.20.0.2"


# concurrency ------------------------------------------------------------------------------

WORKERS = 8
PER_WORKER = 50


def _allocate_in_child(
    directory: str, worker: int, barrier: Barrier, results: multiprocessing.queues.Queue[list[str]]
) -> None:
    """Child process: open the store, then allocate one address per transaction."""
    child_store = Store(Path(directory))
    barrier.wait(timeout=60)
    got: list[str] = []
    for n in range(PER_WORKER):
        with child_store.transaction() as conn:
            allocator = AddressAllocator(conn)
            pool = allocator.pools(NET)[0]
            address: IPAddress = allocator.request(pool, f"w{worker}-{n}")
            got.append(str(address))
        time.sleep(0.002)  # let the other workers in between transactions
    child_store.close()
    results.put(got)


def test_concurrent_processes_never_share_an_address(store: Store, tmp_path: Path) -> None:
    pool = add_pool(store, "10.20.0.0/22")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    results: multiprocessing.queues.Queue[list[str]] = context.Queue()
    processes = [
        context.Process(target=_allocate_in_child, args=(str(tmp_path), n, barrier, results))
        for n in range(WORKERS)
    ]
    for process in processes:
        process.start()
    collected: list[list[str]] = []
    try:
        for _ in processes:
            collected.append(results.get(timeout=60))
    except queue.Empty:
        pytest.fail(f"only {len(collected)} of {WORKERS} workers reported")
    finally:
        for process in processes:
            process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * WORKERS
    addresses = [a for chunk in collected for a in chunk]
    assert len(addresses) == WORKERS * PER_WORKER
    assert len(set(addresses)) == WORKERS * PER_WORKER
    subnet = ip_network("10.20.0.0/22")
    assert all(ip_address(a) in subnet for a in addresses)
    # Serial allocation without releases hands out one contiguous run after the gateway.
    start = int(ip_address("10.20.0.2"))
    expected = list(range(start, start + WORKERS * PER_WORKER))
    assert sorted(int(ip_address(a)) for a in addresses) == expected
    count = store.conn.execute(
        "SELECT count(*) FROM ipam_addresses WHERE pool_id=?", (pool.id,)
    ).fetchone()[0]
    assert count == WORKERS * PER_WORKER + 1  # and the gateway
