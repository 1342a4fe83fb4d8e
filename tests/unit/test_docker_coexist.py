"""DOCKER-USER rules (kernel/coexist.commands, pure): exactly one iifname and one oifname
accept per netstack bridge, tagged "netstack"; other rules in the chain are never touched."""

from __future__ import annotations

from typing import Any

from netstack.kernel import coexist


def rule(handle: int, key: str, name: str, comment: str | None = "netstack") -> dict[str, Any]:
    body: dict[str, Any] = {
        "family": "ip",
        "table": "filter",
        "chain": "DOCKER-USER",
        "handle": handle,
        "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": name}},
            {"accept": None},
        ],
    }
    if comment is not None:
        body["comment"] = comment
    return {"rule": body}


CHAIN = {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 14}}
RETURN = {"rule": {"handle": 15, "expr": [{"counter": {}}, {"return": None}]}}


def test_empty_chain_gets_two_rules_per_bridge() -> None:
    assert coexist.commands("ip", [CHAIN, RETURN], ["nsbra", "nsbrb"]) == [
        'insert rule ip filter DOCKER-USER iifname "nsbra" accept comment "netstack"',
        'insert rule ip filter DOCKER-USER iifname "nsbrb" accept comment "netstack"',
        'insert rule ip filter DOCKER-USER oifname "nsbra" accept comment "netstack"',
        'insert rule ip filter DOCKER-USER oifname "nsbrb" accept comment "netstack"',
    ]


def test_in_sync_means_no_commands() -> None:
    chain = [CHAIN, rule(20, "iifname", "nsbra"), rule(21, "oifname", "nsbra"), RETURN]
    assert coexist.commands("ip", chain, ["nsbra"]) == []


def test_stale_and_duplicate_rules_are_replaced_others_kept() -> None:
    chain = [
        CHAIN,
        rule(20, "iifname", "nsbrgone"),
        rule(21, "oifname", "nsbrgone"),
        rule(22, "iifname", "nsbra"),
        rule(23, "iifname", "nsbra"),
        rule(24, "iifname", "users-own", comment=None),
        RETURN,
    ]
    got = coexist.commands("ip6", chain, ["nsbra"])
    assert got == [
        "delete rule ip6 filter DOCKER-USER handle 20",
        "delete rule ip6 filter DOCKER-USER handle 21",
        "delete rule ip6 filter DOCKER-USER handle 22",
        "delete rule ip6 filter DOCKER-USER handle 23",
        'insert rule ip6 filter DOCKER-USER iifname "nsbra" accept comment "netstack"',
        'insert rule ip6 filter DOCKER-USER oifname "nsbra" accept comment "netstack"',
    ]
    assert coexist.commands("ip", [CHAIN, rule(24, "iifname", "x", comment=None)], []) == []
