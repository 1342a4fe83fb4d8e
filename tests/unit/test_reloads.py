"""netstackd's reload scheduling: one reload per burst, in a quiet moment, bounded wait."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from netstack.daemon.reloads import ReloadScheduler, wait_until_idle
from netstack.errors import Busy


def run(scenario: object) -> None:
    asyncio.run(scenario())  # type: ignore[operator]


def recording(times: list[float]) -> Callable[[], Awaitable[None]]:
    """A reload that notes when it ran (loop time)."""

    async def reload() -> None:
        times.append(asyncio.get_running_loop().time())

    return reload


async def settled(scheduler: ReloadScheduler) -> None:
    """Until no reload is waiting or running."""
    while scheduler.pending():
        await asyncio.sleep(0.01)


def test_a_burst_of_changes_reloads_once_after_it() -> None:
    reloads: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        scheduler = ReloadScheduler(recording(reloads), lambda: False, max_wait=10.0)
        for _ in range(5):  # calls 10 ms apart, each one a change
            scheduler.changed(0.05)
            last_change = loop.time()
            await asyncio.sleep(0.01)
        assert reloads == []  # never in the middle of the burst
        await settled(scheduler)
        assert len(reloads) == 1
        assert reloads[0] >= last_change + 0.05

    run(scenario)


def test_no_reload_while_a_call_is_in_flight_until_the_wait_runs_out() -> None:
    reloads: list[float] = []
    busy = [True]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        scheduler = ReloadScheduler(recording(reloads), lambda: busy[0], max_wait=0.3)
        start = loop.time()
        scheduler.changed(0.0)
        await asyncio.sleep(0.1)
        assert reloads == []  # a call is being served
        busy[0] = False
        await settled(scheduler)
        assert len(reloads) == 1 and reloads[0] < start + 0.3

        busy[0] = True  # a stream of calls that never pauses: the wait is bounded
        start = loop.time()
        scheduler.changed(0.0)
        await settled(scheduler)
        assert len(reloads) == 2 and reloads[1] >= start + 0.3

    run(scenario)


def test_a_change_during_a_reload_gets_a_reload_of_its_own() -> None:
    reloads: list[int] = []

    async def scenario() -> None:
        scheduler: ReloadScheduler

        async def reload() -> None:
            reloads.append(1)
            if len(reloads) == 1:
                scheduler.changed(0.0)  # a commit the running reload may have missed
            await asyncio.sleep(0.01)

        scheduler = ReloadScheduler(reload, lambda: False, max_wait=1.0)
        scheduler.changed(0.0)
        await settled(scheduler)
        assert len(reloads) == 2

    run(scenario)


def test_a_failed_reload_does_not_stop_later_ones() -> None:
    calls: list[int] = []

    async def scenario() -> None:
        async def reload() -> None:
            calls.append(1)
            raise RuntimeError("store locked")

        scheduler = ReloadScheduler(reload, lambda: False, max_wait=1.0)
        scheduler.changed(0.0)
        await settled(scheduler)
        scheduler.changed(0.0)
        await settled(scheduler)
        assert len(calls) == 2

    run(scenario)


def test_housekeeping_runs_after_a_quiet_reload_only() -> None:
    """Garbage collection waits for a quiet moment; a reload forced by a stream of calls
    that never pauses does not add it to the call being served."""
    reloads: list[float] = []
    kept: list[int] = []
    busy = [False]

    async def scenario() -> None:
        scheduler = ReloadScheduler(
            recording(reloads), lambda: busy[0], 0.1, lambda: kept.append(1)
        )
        scheduler.changed(0.0)
        await settled(scheduler)
        assert (len(reloads), len(kept)) == (1, 1)
        busy[0] = True
        scheduler.changed(0.0)
        await settled(scheduler)
        assert (len(reloads), len(kept)) == (2, 1)

    run(scenario)


def test_calls_that_change_nothing_postpone_a_waiting_reload() -> None:
    """dockerd's read-only calls (EndpointOperInfo) follow its Join within the quiet spell:
    the reload waits until they are done too."""
    reloads: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        scheduler = ReloadScheduler(recording(reloads), lambda: False, max_wait=10.0)
        scheduler.postpone()  # nothing pending: nothing happens
        assert not scheduler.pending()
        scheduler.changed(0.05)
        await asyncio.sleep(0.03)
        scheduler.postpone()
        last_call = loop.time()
        await settled(scheduler)
        assert len(reloads) == 1 and reloads[0] >= last_call + 0.05

    run(scenario)


def test_waiting_until_idle_returns_once_the_work_is_done() -> None:
    work = ["a reload", "a reload", "1 link(s) being deleted", ""]

    async def scenario() -> None:
        waited = await wait_until_idle(lambda: work.pop(0) if len(work) > 1 else work[0], 5.0)
        assert work == [""]  # asked until nothing was left, then no more
        assert 0 < waited < 1.0

    run(scenario)


def test_waiting_until_idle_gives_up_naming_the_work_left() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Busy, match=r"still busy after 0.05 s \(a reload\); try again"):
            await wait_until_idle(lambda: "a reload", 0.05)
        assert 0.05 <= loop.time() - started < 1.0

    run(scenario)


def test_waiting_until_idle_when_idle_does_not_wait() -> None:
    async def scenario() -> None:
        assert await wait_until_idle(lambda: "", 5.0) < 0.01

    run(scenario)
