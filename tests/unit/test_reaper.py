"""The background link reaper: order, per-group flush, close, failures (links faked)."""

from __future__ import annotations

import threading

import pytest

from netstack.errors import KernelError
from netstack.kernel import links, reaper


@pytest.fixture
def deleted(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], threading.Event]:
    """Records deletions; each blocks until the returned event is set."""
    done: list[str] = []
    gate = threading.Event()

    def fake_delete(name: str, namespace: str | None = None) -> None:
        gate.wait(10)
        if name.startswith("bad"):
            raise KernelError(f"deleting link {name}: refused")
        done.append(name)

    monkeypatch.setattr(links, "delete_link", fake_delete)
    return done, gate


def test_delete_returns_at_once_and_flush_waits_for_the_group(
    deleted: tuple[list[str], threading.Event],
) -> None:
    done, gate = deleted
    reap = reaper.LinkReaper()
    reap.delete("nsv1", "a")
    reap.delete("nsv2", "b")
    assert done == [] and reap.pending() == 2  # queued, the caller did not wait
    flushed = threading.Event()
    waiter = threading.Thread(target=lambda: (reap.flush("b"), flushed.set()))
    waiter.start()
    assert not flushed.wait(0.1)  # b's link is not gone yet
    gate.set()
    assert flushed.wait(10)
    waiter.join()
    assert done == ["nsv1", "nsv2"]  # in queue order
    reap.flush("unknown")  # nothing queued: returns at once
    reap.close()
    assert reap.pending() == 0


def test_a_failure_is_logged_and_later_deletions_still_run(
    deleted: tuple[list[str], threading.Event], caplog: pytest.LogCaptureFixture
) -> None:
    done, gate = deleted
    gate.set()
    reap = reaper.LinkReaper()
    reap.delete("bad0", "a")
    reap.delete("nsv3", "a")
    reap.flush("a")
    assert done == ["nsv3"]
    assert "link=bad0 not deleted" in caplog.text
    reap.close()
    reap.close()  # idempotent


def test_close_deletes_what_is_queued(deleted: tuple[list[str], threading.Event]) -> None:
    done, gate = deleted
    reap = reaper.LinkReaper()
    for n in range(5):
        reap.delete(f"nsv{n}", "a")
    gate.set()
    reap.close()
    assert done == [f"nsv{n}" for n in range(5)]


def test_immediate_reaper_deletes_in_the_call(
    deleted: tuple[list[str], threading.Event],
) -> None:
    done, gate = deleted
    gate.set()
    reaper.ImmediateReaper().delete("nsv9", "a")
    assert done == ["nsv9"]
