"""The bridge driver's nftables ruleset, built as nft command text (pure, no I/O).

One fixed set of rules serves every network; networks only add set elements, so the rule
count never grows with networks or endpoints:

* `bridges`      every netstack bridge; traffic between two of them is dropped (isolation),
* `same_bridge`  bridge . bridge pairs; routed traffic back into its own bridge is allowed,
* `internal`     bridges of --internal networks: nothing leaves or enters them,
* `nets4/nets6`  every netstack subnet (hairpin: translated traffic between sandboxes),
* `masq4/masq6`  subnets whose traffic is masqueraded when leaving through a non-netstack link,
* `pub4_any/pub6_any`  published ports on every host address: proto . port -> addr . port,
* `pub4_ip/pub6_ip`    published ports on one host address: addr . proto . port -> addr . port.

Published ports are DNAT in the kernel (prerouting for traffic arriving, output for the
host's own), only for destinations that are local addresses. Translated traffic is let
through the isolation rules, and masqueraded only where replies would otherwise bypass the
NAT: hairpin (a sandbox reaching a sibling through the host) and the host's 127.0.0.0/8.

The IPv6 loopback is the exception: Linux drops de-NATed replies addressed to ::1 that
arrive on a non-loopback interface, and IPv6 has no route_localnet. The host's own traffic
to ::1 is therefore never translated; it reaches netstackd's loopback relay
(netstack.daemon.relay), which listens on [::1]:HOST_PORT.

Inter-container traffic on one bridge (icc=false) is blocked with bridge port isolation, a
per-port kernel flag, because this kernel has no nft bridge meta expressions.
"""

from __future__ import annotations

from dataclasses import dataclass

from netstack.model import IPNetwork, PortBinding

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
add set {TABLE} nets4 {{ type ipv4_addr; flags interval; }}
add set {TABLE} nets6 {{ type ipv6_addr; flags interval; }}
add map {TABLE} pub4_any {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
add map {TABLE} pub6_any {{ type inet_proto . inet_service : ipv6_addr . inet_service; }}
add map {TABLE} pub4_ip {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }}
add map {TABLE} pub6_ip {{ type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service; }}
add chain {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}
add chain {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
add chain {TABLE} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
add chain {TABLE} output {{ type nat hook output priority -100; policy accept; }}
add chain {TABLE} publish
flush chain {TABLE} forward
flush chain {TABLE} postrouting
flush chain {TABLE} prerouting
flush chain {TABLE} output
flush chain {TABLE} publish
add rule {TABLE} forward iifname . oifname @same_bridge accept
add rule {TABLE} forward ct status dnat accept
add rule {TABLE} forward iifname @internal drop
add rule {TABLE} forward oifname @internal drop
add rule {TABLE} forward iifname @bridges oifname @bridges drop
add rule {TABLE} postrouting ip saddr @masq4 oifname != @bridges masquerade
add rule {TABLE} postrouting ip6 saddr @masq6 oifname != @bridges masquerade
add rule {TABLE} postrouting ct status dnat ip saddr @nets4 ip daddr @nets4 masquerade
add rule {TABLE} postrouting ct status dnat ip6 saddr @nets6 ip6 daddr @nets6 masquerade
add rule {TABLE} postrouting ct status dnat ip saddr 127.0.0.0/8 masquerade
add rule {TABLE} prerouting fib daddr type local jump publish
add rule {TABLE} output ip6 daddr ::1 accept
add rule {TABLE} output fib daddr type local jump publish
add rule {TABLE} publish dnat ip to ip daddr . meta l4proto . th dport map @pub4_ip
add rule {TABLE} publish dnat ip to meta l4proto . th dport map @pub4_any
add rule {TABLE} publish dnat ip6 to ip6 daddr . meta l4proto . th dport map @pub6_ip
add rule {TABLE} publish dnat ip6 to meta l4proto . th dport map @pub6_any
"""


def _elements(facts: NetworkFacts) -> list[tuple[str, str]]:
    bridge = f'"{facts.bridge}"'
    items = [("bridges", bridge), ("same_bridge", f"{bridge} . {bridge}")]
    items += [("nets4" if s.version == 4 else "nets6", str(s)) for s in facts.subnets]
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


def _publish_elements(
    binding: PortBinding, ipv4: str | None, ipv6: str | None
) -> list[tuple[str, str, str]]:
    """(map, key, value) for each map element of one published port."""
    proto_port = f"{binding.protocol} . {binding.host_port}"
    items = []
    for version, target in ((4, ipv4), (6, ipv6)):
        if target is None or version not in binding.families:
            continue
        value = f"{target} . {binding.container_port}"
        if binding.host_ip in ("", "0.0.0.0", "::"):
            items.append((f"pub{version}_any", proto_port, value))
        else:
            items.append((f"pub{version}_ip", f"{binding.host_ip} . {proto_port}", value))
    return items


def publish_commands(bindings: list[PortBinding], ipv4: str | None, ipv6: str | None) -> str:
    """Commands adding the map elements of an endpoint's published ports."""
    return "".join(
        f"add element {TABLE} {name} {{ {key} : {value} }}\n"
        for binding in bindings
        for name, key, value in _publish_elements(binding, ipv4, ipv6)
    )


def unpublish_commands(
    bindings: list[PortBinding], ipv4: str | None, ipv6: str | None
) -> list[str]:
    """One command per map element, so a missing element can be skipped alone."""
    return [
        f"delete element {TABLE} {name} {{ {key} }}"
        for binding in bindings
        for name, key, _value in _publish_elements(binding, ipv4, ipv6)
    ]
