"""Coexistence with dockerd's firewall: accept netstack bridges in Docker's DOCKER-USER chain.

dockerd (iptables-nft) may set the `filter` table's FORWARD policy to drop, and with
br_netfilter loaded even traffic bridged between two ports of one netstack bridge passes
through that chain. netstack's own table cannot override a drop in another table, so where
dockerd made its documented user chain (`ip filter DOCKER-USER`, and `ip6 filter
DOCKER-USER` with ip6tables), netstack keeps there one `iifname B accept` and one
`oifname B accept` rule per bridge, tagged with the comment "netstack" (iptables shows
them as `-m comment --comment netstack`). They only stop Docker's chains from dropping
netstack traffic; netstack's isolation and internal-network drops are in its own table and
still apply. Rules are plain iptables-compatible expressions (no sets), so `iptables -S`
keeps working; their number grows with networks, never with endpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from netstack.errors import KernelError
from netstack.kernel.nftables import Nftables

log = logging.getLogger(__name__)

COMMENT = "netstack"
CHAIN = "DOCKER-USER"
FAMILIES = ("ip", "ip6")
DIRECTIONS = ("iifname", "oifname")


def _ours(rule: dict[str, Any]) -> tuple[str, str] | None:
    """(direction, bridge) of a rule netstack wrote; None for anyone else's."""
    if rule.get("comment") != COMMENT:
        return None
    for expr in rule.get("expr", []):
        match = expr.get("match") if isinstance(expr, dict) else None
        if isinstance(match, dict):
            key = match.get("left", {}).get("meta", {}).get("key")
            if key in DIRECTIONS and isinstance(match.get("right"), str):
                return key, match["right"]
    return ("?", "?")  # tagged by us but unreadable: replaced like a stale one


def commands(family: str, chain: list[dict[str, Any]], bridges: Iterable[str]) -> list[str]:
    """The nft commands that make our rules in one listed DOCKER-USER chain accept exactly
    `bridges` (pure: `chain` is the `nftables` array of `list chain`)."""
    wanted = {(d, b) for b in bridges for d in DIRECTIONS}
    present: dict[tuple[str, str], list[int]] = {}
    for item in chain:
        rule = item.get("rule")
        if isinstance(rule, dict) and (key := _ours(rule)) is not None:
            present.setdefault(key, []).append(int(rule["handle"]))
    if set(present) == wanted and all(len(h) == 1 for h in present.values()):
        return []
    result = [
        f"delete rule {family} filter {CHAIN} handle {handle}"
        for handles in present.values()
        for handle in handles
    ]
    result += [
        f'insert rule {family} filter {CHAIN} {direction} "{bridge}" accept comment "{COMMENT}"'
        for direction, bridge in sorted(wanted)
    ]
    return result


def sync(bridges: Iterable[str], nft: Nftables | None = None) -> bool:
    """Make every existing DOCKER-USER chain accept exactly `bridges`; True if anything
    changed. A namespace without dockerd's chains is left alone. Raises KernelError."""
    nft = nft or Nftables()
    names = sorted(set(bridges))
    changed = False
    for family in FAMILIES:
        chain = nft.list_json(f"chain {family} filter {CHAIN}")
        if not any("chain" in item for item in chain):
            continue
        todo = commands(family, chain, names)
        if todo:
            nft.run("\n".join(todo))
            changed = True
            log.info("%s filter %s: accepting netstack bridges %s", family, CHAIN, names)
    return changed


def allow(bridge: str, nft: Nftables | None = None) -> None:
    """Add `bridge` to what DOCKER-USER accepts (where it exists). Best effort: logs."""
    _edit(bridge, add=True, nft=nft)


def revoke(bridge: str, nft: Nftables | None = None) -> None:
    """Remove `bridge`'s accept rules from DOCKER-USER. Idempotent, best effort."""
    _edit(bridge, add=False, nft=nft)


def _edit(bridge: str, add: bool, nft: Nftables | None) -> None:
    nft = nft or Nftables()
    try:
        for family in FAMILIES:
            chain = nft.list_json(f"chain {family} filter {CHAIN}")
            if not any("chain" in item for item in chain):
                continue
            present = {
                key[1]
                for item in chain
                if isinstance(item.get("rule"), dict)
                and (key := _ours(item["rule"])) is not None
                and key[1] != "?"
            }
            wanted = (present | {bridge}) if add else (present - {bridge})
            todo = commands(family, chain, wanted)
            if todo:
                nft.run("\n".join(todo))
    except KernelError as exc:  # dockerd rewriting its chains at this moment
        log.warning("bridge=%s DOCKER-USER not updated: %s", bridge, exc)
