"""netstackd's copy of what its reload needs from the store, kept up to date by reading only
the endpoints written since the last read (the store's change log, `Store.changes_since`).

Why: reading every endpoint and published port on each reload cost ~2.5 ms of CPU at 500
endpoints with a port each here, and a reload runs after every burst of calls, beside the
next call. Reading the endpoints that changed costs the same at 1 or 500.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from netstack.model import EndpointRow, Network, RelayStoreRow
from netstack.store import Store


@dataclass(frozen=True)
class StoreView:
    """One reload's view of the store."""

    networks: list[Network]
    rows: list[EndpointRow]  # every endpoint (`Store.endpoint_name_rows`)
    published: list[RelayStoreRow]  # every published port (`Store.relay_rows`)
    changes: tuple[list[EndpointRow], list[EndpointRow]] | None  # rows (removed, added)
    # since the last view; None: everything read afresh
    published_changes: dict[str, list[RelayStoreRow]] | None
    # the rows now of every endpoint whose published ports changed since the last view
    # (empty: none left); None: everything read afresh

    @property
    def relay_changed(self) -> bool:
        """Whether `published` may differ from the last view's."""
        return self.published_changes is None or bool(self.published_changes)


class StoreMirror:
    """Reads the store for netstackd's reload: everything at first (and whenever the change
    log no longer reaches back), then the endpoints written since. Endpoints are in
    connection order as the store gives them on a full read; later ones are appended in
    the order their writes committed. One reader at a time."""

    def __init__(self) -> None:
        self._mark: int | None = None
        self._rows: dict[str, EndpointRow] = {}
        self._published: dict[str, list[RelayStoreRow]] = {}

    def forget(self) -> None:
        """Read everything next time (after a reload failed half-way)."""
        self._mark = None

    def read(self, store: Store) -> StoreView:
        with store.snapshot():
            networks = store.networks()
            changes = None if self._mark is None else store.changes_since(self._mark)
            if changes is None:
                mark, ids = store.change_mark(), None
                rows, published = store.endpoint_name_rows(), store.relay_rows()
            else:
                mark, ids = changes
                rows = store.endpoint_name_rows(ids) if ids else []
                published = store.relay_rows(ids) if ids else []
        self._mark = mark
        if ids is None:
            self._rows = {row[0]: row for row in rows}
            self._published = _by_endpoint(published)
            return StoreView(networks, rows, published, None, None)
        removed, added = self._apply_rows(ids, rows)
        ports_changed = self._apply_published(ids, published)  # before every_port is read
        every_port = list(itertools.chain.from_iterable(self._published.values()))
        return StoreView(
            networks, list(self._rows.values()), every_port, (removed, added), ports_changed
        )

    def _apply_rows(
        self, ids: set[str], rows: list[EndpointRow]
    ) -> tuple[list[EndpointRow], list[EndpointRow]]:
        """Take in the rows of the endpoints `ids` (those missing are gone); (removed, added)
        rows. A changed row keeps its place; new ones come last, in the store's order."""
        fresh = {row[0]: row for row in rows}
        known = self._rows
        removed = [known[i] for i in ids if i in known and known[i] != fresh.get(i)]
        added = [row for row in rows if known.get(row[0]) != row]
        for gone in ids - fresh.keys():
            known.pop(gone, None)
        known.update(fresh)
        return removed, added

    def _apply_published(
        self, ids: set[str], published: list[RelayStoreRow]
    ) -> dict[str, list[RelayStoreRow]]:
        """Take in the published ports of the endpoints `ids`; those whose ports changed,
        with their rows now."""
        fresh = _by_endpoint(published)
        changed: dict[str, list[RelayStoreRow]] = {}
        for endpoint_id in ids:
            new = fresh.get(endpoint_id)
            if new == self._published.get(endpoint_id):
                continue
            changed[endpoint_id] = new or []
            if new is None:
                del self._published[endpoint_id]
            else:
                self._published[endpoint_id] = new
        return changed


def _by_endpoint(published: list[RelayStoreRow]) -> dict[str, list[RelayStoreRow]]:
    grouped: dict[str, list[RelayStoreRow]] = {}
    for row in published:
        grouped.setdefault(row[0], []).append(row)
    return grouped
