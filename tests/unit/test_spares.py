"""Veth pairs made ahead (drivers/bridge/spares.py), with the kernel calls faked."""

from __future__ import annotations

import time
from typing import Any

import pytest
from netstack.drivers.bridge import spares

from netstack.errors import Conflict, KernelError
from netstack.kernel import links

SHAPE = spares.SpareShape("nsbr1", 1500, isolated=False, hairpin=True)


class FakeKernel:
    def __init__(self) -> None:
        self.links: dict[str, dict[str, Any]] = {}
        self.deleted: list[str] = []
        self.fail_claim: Exception | None = None

    def create_veth(self, host: str, peer: str, master: str, mtu: int, **kw: Any) -> None:
        if master != "nsbr1":
            raise KernelError(f"bridge {master!r} is missing")
        self.links[host] = {"peer": peer, "master": master, "mtu": mtu, "up": kw["up"], **kw}

    def claim_veth(self, spare_host: str, host: str) -> None:
        if self.fail_claim is not None:
            raise self.fail_claim
        self.links[host] = {**self.links.pop(spare_host), "up": True}

    def delete_link(self, name: str, namespace: str | None = None) -> None:
        self.deleted.append(name)
        self.links.pop(name, None)

    def links_named(self, prefix: str) -> list[str]:
        return [name for name in self.links if name.startswith(prefix)]


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel()
    for name in ("create_veth", "claim_veth", "delete_link", "links_named"):
        monkeypatch.setattr(links, name, getattr(fake, name))
    return fake


def wait_for(condition: Any) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_miss_makes_a_spare_soon_and_the_next_claim_takes_it(kernel: FakeKernel) -> None:
    pool = spares.VethSpares(refill_delay=0.01)
    assert pool.claim(SHAPE, "nsvA") is None
    wait_for(lambda: kernel.links_named("nsw"))
    (made,) = kernel.links_named("nsw")
    assert kernel.links[made]["up"] is False and kernel.links[made]["mtu"] == 1500
    assert kernel.links[made]["peer"] == "nsy" + made[3:]
    assert pool.claim(SHAPE, "nsvB") == "nsy" + made[3:]
    assert kernel.links["nsvB"]["up"] is True
    assert (pool.claimed, pool.missed) == (1, 1)
    wait_for(lambda: kernel.links_named("nsw"))  # the next one
    pool.close()
    assert kernel.links_named("nsw") == []


def test_a_spare_of_other_settings_is_deleted_not_used(kernel: FakeKernel) -> None:
    pool = spares.VethSpares(refill_delay=60)
    pool.refill(SHAPE)
    (made,) = kernel.links_named("nsw")
    other = spares.SpareShape("nsbr1", 1400, isolated=False, hairpin=True)
    assert pool.claim(other, "nsvA") is None
    assert made in kernel.deleted
    pool.close()


@pytest.mark.parametrize("error", [Conflict("taken"), KernelError("refused")])
def test_a_failed_claim_deletes_the_spare_and_misses(kernel: FakeKernel, error: Exception) -> None:
    pool = spares.VethSpares(refill_delay=60)
    pool.refill(SHAPE)
    (made,) = kernel.links_named("nsw")
    kernel.fail_claim = error
    assert pool.claim(SHAPE, "nsvA") is None
    assert made in kernel.deleted and "nsvA" in kernel.deleted
    pool.close()


def test_drop_close_sweep_and_a_missing_bridge(kernel: FakeKernel) -> None:
    pool = spares.VethSpares(refill_delay=60)
    pool.refill(spares.SpareShape("gone", 1500, isolated=True, hairpin=False))
    assert kernel.links == {}  # the bridge is missing: no spare, no error
    pool.refill(SHAPE)
    pool.refill(SHAPE)  # one per bridge
    assert len(kernel.links_named("nsw")) == 1
    pool.drop("nsbr1")
    assert kernel.links_named("nsw") == []
    kernel.links["nsw0123456789ab"] = {}  # left by a killed daemon
    assert spares.VethSpares.sweep() == 1
    pool.close()
    pool.refill(SHAPE)  # closed: makes no more
    assert kernel.links_named("nsw") == []
