"""When netstackd re-reads the store: once per burst of changes, in a quiet moment.

A reload is CPU work in netstackd's own process (it competes for the GIL and the CPU with
the calls being served). Runtimes make calls back to back: kubelet starting pods, the
benchmarks' ADD after ADD, Docker's RequestAddress, CreateEndpoint and Join a few ms
apart. A reload started right after each reply ran during the next call and delayed it.
So a change asks for a reload `quiet` seconds after the last change, with no call in
flight; under a steady stream of calls, `max_wait` after the first change at the latest
(records must follow a connect within 100 ms).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from netstack.errors import Busy

log = logging.getLogger(__name__)

POLL = 0.002  # how often a busy daemon is checked again for a quiet moment


async def wait_until_idle(busy: Callable[[], str], max_wait: float, poll: float = POLL) -> float:
    """Wait until `busy()` names no work left (an empty string); the seconds waited.

    Raises Busy, naming what is still going on, when that takes longer than `max_wait`.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    while work := busy():
        if loop.time() - started >= max_wait:
            raise Busy(f"netstackd is still busy after {max_wait:g} s ({work}); try again")
        await asyncio.sleep(poll)
    return loop.time() - started


class ReloadScheduler:
    """Runs `reload` once for a burst of `changed()` calls (on the event loop)."""

    def __init__(
        self,
        reload: Callable[[], Awaitable[None]],
        busy: Callable[[], bool],
        max_wait: float,
        when_quiet: Callable[[], None] | None = None,
    ) -> None:
        self._reload = reload
        self._busy = busy
        self._when_quiet = when_quiet  # housekeeping for a quiet moment (not a forced one)
        self.max_wait = max_wait
        self._wanted = False
        self._quiet = 0.0
        self._last_change = 0.0
        self._task: asyncio.Task[None] | None = None

    def changed(self, quiet: float) -> None:
        """The store changed: reload after `quiet` seconds without changes or calls."""
        loop = asyncio.get_running_loop()
        self._wanted = True
        self._last_change = loop.time()
        if self.pending():
            self._quiet = max(self._quiet, quiet)
        else:
            self._quiet = quiet
            self._task = loop.create_task(self._run())

    def postpone(self) -> None:
        """A call that changed nothing came in: a reload waiting for quiet waits on (Docker's
        read-only calls follow its changing ones within the quiet spell)."""
        if self.pending():
            self._last_change = asyncio.get_running_loop().time()

    def pending(self) -> bool:
        """Whether a reload is waiting or running."""
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._wanted:
            deadline = loop.time() + self.max_wait
            quiet = False
            while (now := loop.time()) < deadline:
                wait = self._last_change + self._quiet - now
                if wait <= 0 and not self._busy():
                    quiet = True
                    break
                await asyncio.sleep(min(max(wait, POLL), deadline - now))
            self._wanted = False
            try:
                await self._reload()
                if quiet and self._when_quiet is not None and not self._busy():
                    self._when_quiet()
            except Exception:  # the store watcher retries; never lose the task silently
                log.exception("reload failed")
