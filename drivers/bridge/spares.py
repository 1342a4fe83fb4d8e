"""Veth pairs made ahead, one per bridge, for joins that leave the peer in the host
namespace (Docker's Join: dockerd moves the peer into the container itself).

Why: `docker network connect` waits on the Join, and the Join on the veth pair. Creating
a pair costs three netlink calls and the kernel's device registration (~2.6 ms on a quiet
machine, 5-6 ms while dockerd works beside it); claiming one made ahead costs one call
that renames the host end and brings it up (the peer keeps its spare name and MAC: Docker
moves it, renames it and sets the endpoint's MAC itself). A spare is made in the
background a little after each claim (`REFILL_DELAY`, so its work does not compete with
the connect that just took one), and the first time a bridge is asked for one.

A spare has the port settings of its network (MTU, isolation, hairpin): a claim for other
settings (the network was recreated with other options) deletes it and misses. Spares are
named `nsw<token>` / `nsy<token>`, so nothing else takes them for an endpoint's pair;
`sweep` deletes those a killed process left behind, `drop` a bridge's own before the bridge
goes, `close` every one. Only for a long-lived process in one namespace (netstackd).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass

from netstack.errors import NetstackError
from netstack.kernel import links

log = logging.getLogger(__name__)

SPARE_HOST_PREFIX = "nsw"
SPARE_PEER_PREFIX = "nsy"
REFILL_DELAY = 0.2
"""Seconds between a claim and the making of the next spare."""


@dataclass(frozen=True)
class SpareShape:
    """What a spare pair must match to serve an endpoint of a network."""

    bridge: str
    mtu: int
    isolated: bool
    hairpin: bool


@dataclass(frozen=True)
class _Spare:
    shape: SpareShape
    host: str
    peer: str


class VethSpares:
    """At most one ready pair per bridge; thread-safe."""

    def __init__(self, refill_delay: float = REFILL_DELAY) -> None:
        self.refill_delay = refill_delay
        self._lock = threading.Lock()
        self._ready: dict[str, _Spare] = {}
        self._making: set[str] = set()
        self._queue: queue.SimpleQueue[tuple[float, SpareShape] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.claimed = 0
        self.missed = 0

    def claim(self, shape: SpareShape, host: str) -> str | None:
        """Turn this bridge's spare into the pair whose host end is `host` (up; the peer down
        in this namespace, its MAC left for the caller to set); the peer's name. None when
        there is none (or it does not fit, or the kernel refused): make the pair the usual
        way then. Either way a new spare is made soon."""
        with self._lock:
            spare = self._ready.pop(shape.bridge, None)
        self._refill_later(shape)
        if spare is None:
            self.missed += 1
            return None
        if spare.shape != shape:
            self._delete(spare)
            self.missed += 1
            return None
        try:
            links.claim_veth(spare.host, host)
        except NetstackError as exc:
            log.info("spare veth %s not usable (%s); making %s afresh", spare.host, exc, host)
            self._delete(spare)
            links.delete_link(host)  # the rename may have gone through, bringing it up not
            self.missed += 1
            return None
        self.claimed += 1
        return spare.peer

    def refill(self, shape: SpareShape) -> None:
        """Make this bridge's spare now, unless it has one (or one is being made)."""
        with self._lock:
            if self._closed or shape.bridge in self._ready or shape.bridge in self._making:
                return
            self._making.add(shape.bridge)
        token = secrets.token_hex(6)
        spare = _Spare(shape, SPARE_HOST_PREFIX + token, SPARE_PEER_PREFIX + token)
        try:
            links.create_veth(
                spare.host,
                spare.peer,
                master=shape.bridge,
                mtu=shape.mtu,
                peer_mac="02:00:00:00:00:01",  # replaced by the endpoint's at claim
                isolated=shape.isolated,
                hairpin=shape.hairpin,
                up=False,
            )
        except NetstackError as exc:  # the bridge went away meanwhile, or a busy kernel
            log.debug("no spare veth for %s: %s", shape.bridge, exc)
            return
        finally:
            with self._lock:
                self._making.discard(shape.bridge)
        with self._lock:
            keep = not self._closed and shape.bridge not in self._ready
            if keep:
                self._ready[shape.bridge] = spare
        if not keep:
            self._delete(spare)

    def drop(self, bridge: str) -> None:
        """Delete the bridge's spare (before the bridge is deleted)."""
        with self._lock:
            spare = self._ready.pop(bridge, None)
        if spare is not None:
            self._delete(spare)

    def close(self) -> None:
        """Delete every spare; make no more."""
        with self._lock:
            self._closed = True
            spares = list(self._ready.values())
            self._ready.clear()
            worker = self._worker
        self._stop.set()
        self._queue.put(None)
        if worker is not None:
            worker.join(timeout=10)
        for spare in spares:
            self._delete(spare)

    @staticmethod
    def sweep() -> int:
        """Delete spares left in this namespace by a process that did not close (killed)."""
        names = links.links_named(SPARE_HOST_PREFIX)
        for name in names:
            try:
                links.delete_link(name)
            except NetstackError as exc:
                log.warning("cannot delete leftover spare veth %s: %s", name, exc)
        return len(names)

    def _refill_later(self, shape: SpareShape) -> None:
        """Queue a refill for `REFILL_DELAY` from now, for the one refill thread (started at
        the first need: starting a thread per claim would make the claim wait for it)."""
        with self._lock:
            if self._closed:
                return
            if self._worker is None:
                self._worker = threading.Thread(target=self._refills, name="veth-spares")
                self._worker.daemon = True
                self._worker.start()
        self._queue.put((time.monotonic() + self.refill_delay, shape))

    def _refills(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            due, shape = item
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            try:
                self.refill(shape)
            except Exception:  # never lose the thread
                log.exception("making a spare veth for %s failed", shape.bridge)

    @staticmethod
    def _delete(spare: _Spare) -> None:
        try:
            links.delete_link(spare.host)
        except NetstackError as exc:
            log.warning("cannot delete spare veth %s: %s", spare.host, exc)
