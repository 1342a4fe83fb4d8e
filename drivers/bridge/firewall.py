"""The bridge driver's nftables ruleset, built as nft command text (pure, no I/O).

One fixed set of rules serves every network; networks only add set elements, so the rule
count never grows with networks or endpoints:

* `bridges`      every netstack bridge; traffic between two of them is dropped (isolation),
* `same_bridge`  bridge . bridge pairs; routed traffic back into its own bridge is allowed,
* `internal`     bridges of --internal networks: nothing leaves or enters them,
* `masq4/masq6`  subnets whose traffic is masqueraded when leaving through a non-netstack link.

Inter-container traffic on one bridge (icc=false) is blocked with bridge port isolation, a
per-port kernel flag, because this kernel has no nft bridge meta expressions.
"""

from __future__ import annotations

from dataclasses import dataclass

from netstack.model import IPNetwork

TABLE = "inet netstack"


@dataclass(frozen=True)
class NetworkFacts:
    """What the ruleset needs to know about one bridge network."""

    bridge: str
    subnets: tuple[IPNetwork, ...]
    internal: bool
    masquerade: bool


def base_ruleset() -> str:
    """Idempotent commands creating the table, sets and chains and (re)writing the rules.

    Re-running it keeps every set element; the chains are flushed and refilled in the same
    transaction, so concurrent callers converge on one copy of each rule.
    """
    return f"""add table {TABLE}
add set {TABLE} bridges {{ type ifname; }}
add set {TABLE} internal {{ type ifname; }}
add set {TABLE} same_bridge {{ type ifname . ifname; }}
add set {TABLE} masq4 {{ type ipv4_addr; flags interval; }}
add set {TABLE} masq6 {{ type ipv6_addr; flags interval; }}
add chain {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}
add chain {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
flush chain {TABLE} forward
flush chain {TABLE} postrouting
add rule {TABLE} forward iifname . oifname @same_bridge accept
add rule {TABLE} forward iifname @internal drop
add rule {TABLE} forward oifname @internal drop
add rule {TABLE} forward iifname @bridges oifname @bridges drop
add rule {TABLE} postrouting ip saddr @masq4 oifname != @bridges masquerade
add rule {TABLE} postrouting ip6 saddr @masq6 oifname != @bridges masquerade
"""


def _elements(facts: NetworkFacts) -> list[tuple[str, str]]:
    bridge = f'"{facts.bridge}"'
    items = [("bridges", bridge), ("same_bridge", f"{bridge} . {bridge}")]
    if facts.internal:
        items.append(("internal", bridge))
    elif facts.masquerade:
        for subnet in facts.subnets:
            items.append(("masq4" if subnet.version == 4 else "masq6", str(subnet)))
    return items


def add_network(facts: NetworkFacts) -> str:
    """Commands adding one network's set elements."""
    return "".join(
        f"add element {TABLE} {name} {{ {value} }}\n" for name, value in _elements(facts)
    )


def delete_network_commands(facts: NetworkFacts) -> list[str]:
    """One command per element of the network, so a missing element can be skipped alone."""
    return [f"delete element {TABLE} {name} {{ {value} }}" for name, value in _elements(facts)]
