"""The loopback relay's UDP flow table (`FlowTable`, pure: the test passes the time)."""

from __future__ import annotations

import pytest

from netstack.daemon.relay import FlowTable


def test_get_add_remove() -> None:
    table: FlowTable[str, int] = FlowTable(idle_timeout=30, max_flows=4)
    assert table.get("a") is None
    assert table.add("a", 1, now=0) == []
    assert table.get("a") == 1 and len(table) == 1
    assert table.remove("a") == 1
    assert table.remove("a") is None
    assert len(table) == 0


def test_idle_flows_expire_and_activity_keeps_them() -> None:
    table: FlowTable[str, int] = FlowTable(idle_timeout=30, max_flows=10)
    table.add("a", 1, now=0)
    table.add("b", 2, now=10)
    table.add("c", 3, now=20)
    table.touch("a", now=25)  # a reply or a request: a is active again
    assert table.expire(now=30) == []  # nothing idle for more than 30 s
    assert table.expire(now=40.5) == [2]  # b: idle 30.5 s
    assert table.expire(now=55.5) == [3, 1]  # c (idle 35.5 s), then a (30.5 s)
    assert len(table) == 0


def test_cap_evicts_least_recently_active_first() -> None:
    table: FlowTable[str, int] = FlowTable(idle_timeout=30, max_flows=3)
    for number, key in enumerate("abc"):
        assert table.add(key, number, now=number) == []
    table.touch("a", now=5)
    assert table.add("d", 3, now=6) == [1]  # b is the least recently active
    assert table.add("e", 4, now=7) == [2]  # then c
    assert [table.get(key) for key in "abcde"] == [0, None, None, 3, 4]
    assert len(table) == 3


def test_touch_unknown_is_ignored_and_clear_returns_all() -> None:
    table: FlowTable[str, int] = FlowTable(idle_timeout=1, max_flows=2)
    table.touch("x", now=1)
    table.add("a", 1, now=0)
    table.add("b", 2, now=0)
    assert sorted(table.clear()) == [1, 2]
    assert len(table) == 0 and table.expire(now=100) == []


def test_re_adding_a_key_returns_the_old_value() -> None:
    table: FlowTable[str, int] = FlowTable(idle_timeout=1, max_flows=2)
    table.add("a", 1, now=0)
    assert table.add("a", 2, now=1) == [1]
    assert table.get("a") == 2 and len(table) == 1


def test_max_flows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_flows"):
        FlowTable(idle_timeout=1, max_flows=0)
