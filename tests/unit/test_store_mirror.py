"""netstackd's StoreMirror: after random writes, each view equals a full read of the store,
and its (removed, added) rows are exactly what changed."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from test_store import ID_A, insert_networks, make_endpoint, make_network

from netstack.daemon.mirror import StoreMirror
from netstack.model import PortBinding, RelayStoreRow
from netstack.store import CHANGES_KEPT, Store


def _write_at_random(store: Store, rng: random.Random, step: int) -> None:
    """One transaction of random endpoint writes: connect, disconnect, rename, publish."""
    present = [row[0] for row in store.endpoint_name_rows()]
    with store.transaction() as conn:
        for turn in range(rng.randint(1, 3)):
            action = rng.random()
            if not present or action < 0.35:
                endpoint_id = f"{step:04d}{rng.randrange(10**6):06d}".ljust(64, "0")
                endpoint = make_endpoint(endpoint_id, f"box-{endpoint_id[:10]}")
                endpoint.created = f"2026-01-02T03:{step // 60:02d}:{step % 60:02d}Z"
                store.insert_endpoint(conn, endpoint)
                present.append(endpoint_id)
            elif action < 0.55:
                gone = present.pop(rng.randrange(len(present)))
                store.delete_endpoint(conn, gone)
            elif action < 0.75:
                renamed = rng.choice(present)
                store.update_endpoint_sandbox(conn, renamed, f"box-{step}-{renamed[:6]}")
            elif action < 0.9:
                port = 10000 + step * 4 + turn
                store.delete_ports(conn, rng.choice(present))
                store.insert_ports(conn, rng.choice(present), [PortBinding("tcp", "", port, 80)])
            else:
                store.delete_ports(conn, rng.choice(present))


def _ports_by_endpoint(rows: list[RelayStoreRow]) -> dict[str, list[RelayStoreRow]]:
    found: dict[str, list[RelayStoreRow]] = {}
    for row in rows:
        found.setdefault(row[0], []).append(row)
    return found


def test_every_view_equals_a_full_read(tmp_path: Path) -> None:
    store, other = Store(tmp_path), Store(tmp_path)  # netstackd reads, others write
    insert_networks(other, make_network())
    mirror = StoreMirror()
    rng = random.Random(7)
    last = mirror.read(store)
    assert last.changes is None and last.relay_changed  # the first read is a full one
    assert last.published_changes is None
    for step in range(200):
        _write_at_random(other, rng, step)
        view = mirror.read(store)
        assert view.rows == store.endpoint_name_rows(), step
        assert Counter(view.published) == Counter(store.relay_rows()), step
        assert view.changes is not None
        removed, added = view.changes
        assert Counter(last.rows) - Counter(view.rows) == Counter(removed), step
        assert Counter(view.rows) - Counter(last.rows) == Counter(added), step
        assert view.relay_changed == (Counter(view.published) != Counter(last.published))
        # published_changes: exactly the endpoints whose ports changed, with their rows now
        assert view.published_changes is not None
        assert view.relay_changed == bool(view.published_changes)
        now, before = _ports_by_endpoint(view.published), _ports_by_endpoint(last.published)
        changed = {e for e in now.keys() | before.keys() if now.get(e) != before.get(e)}
        assert view.published_changes.keys() == changed, step
        for endpoint_id, rows in view.published_changes.items():
            assert rows == now.get(endpoint_id, []), step
        assert [n.id for n in view.networks] == [ID_A]
        last = view
    store.close()
    other.close()


def test_reads_everything_when_the_log_is_left_behind(tmp_path: Path) -> None:
    store = Store(tmp_path)
    insert_networks(store, make_network())
    with store.transaction() as conn:
        store.insert_endpoint(conn, make_endpoint("1" * 64, "web"))
    mirror = StoreMirror()
    mirror.read(store)
    with store.transaction() as conn:
        for n in range(CHANGES_KEPT + 300):
            store.update_endpoint_sandbox(conn, "1" * 64, f"web-{n}")
    view = mirror.read(store)
    assert view.changes is None  # read afresh
    assert view.rows == store.endpoint_name_rows()
    assert mirror.read(store).changes == ([], [])
    mirror.forget()
    assert mirror.read(store).changes is None
    store.close()
