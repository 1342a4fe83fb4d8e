"""Deleting links off the caller's path.

Deleting a veth makes the kernel wait for an RCU grace period (16-20 ms measured here),
the largest part of a CNI DEL or a disconnect. A long-lived process (netstackd) can reply
first and let a background thread do the deletion: `LinkReaper.delete` queues the link and
returns at once. A link is queued under a group (the sandbox it belonged to), and
`flush(group)` waits until that group's links are gone: a sandbox that is joined again
(a runtime retrying ADD for the same container and interface) must not meet the old
interface's name still in place.

`delete_now` is the same interface, synchronous: what short-lived processes (netctl, the
in-process CNI plugin) use.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from typing import Protocol

from netstack.errors import NetstackError
from netstack.kernel import links

log = logging.getLogger(__name__)


class Reaper(Protocol):
    def delete(self, name: str, group: str) -> None:
        """Delete the host link `name` (idempotent), now or soon."""
        ...

    def flush(self, group: str) -> None:
        """Return once every link queued under `group` is gone."""
        ...


class ImmediateReaper:
    """Deletes at once, in the caller's thread."""

    def delete(self, name: str, group: str) -> None:
        links.delete_link(name)

    def flush(self, group: str) -> None:
        return None


class LinkReaper:
    """Deletes links on one background thread, in the order they were queued.

    The thread only deletes links of the namespace it was started in (it never changes
    namespace). A failure is logged, never raised: the link is then an orphan that the
    next reconciliation (CNI GC) removes. `close` deletes everything still queued.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._pending: Counter[str] = Counter()
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="link-reaper", daemon=True)
        self._thread.start()

    def delete(self, name: str, group: str) -> None:
        with self._done:
            self._pending[group] += 1
        self._queue.put((name, group))

    def flush(self, group: str, timeout: float = 30.0) -> None:
        with self._done:
            if not self._done.wait_for(lambda: self._pending[group] <= 0, timeout):
                log.warning("group=%s links still queued for deletion after %ss", group, timeout)

    def pending(self) -> int:
        """How many links are queued or being deleted."""
        with self._done:
            return sum(self._pending.values())

    def close(self) -> None:
        """Delete what is queued, then stop the thread. Idempotent."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            name, group = item
            try:
                links.delete_link(name)
            except NetstackError as exc:
                log.warning("group=%s link=%s not deleted: %s", group, name, exc)
            except Exception:  # never lose the thread: later deletions still run
                log.exception("group=%s link=%s not deleted", group, name)
            with self._done:
                self._pending[group] -= 1
                if self._pending[group] <= 0:
                    del self._pending[group]
                self._done.notify_all()
