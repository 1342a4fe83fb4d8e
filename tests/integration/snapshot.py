"""State snapshots for integration tests that check a failed command changed nothing.

A snapshot holds what netstack may touch: store rows; host links, global addresses,
routes, nftables set/map elements and the host's sandbox namespaces; each sandbox's
global addresses and routes. Take one before and one after, then `assert_unchanged`.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Host

STORE_TABLES = {
    "networks": "id, name, driver, options, pools",
    "endpoints": "id, network_id, sandbox, interface, mac, ipv4, ipv6",
    "sandboxes": "name, path",
    # The allocation cursor may legitimately move; the pool rows themselves may not.
    "ipam_pools": "id, network_id, subnet, version, first, last",
    "ipam_addresses": "pool_id, address, owner",
    "port_bindings": "endpoint_id, protocol, host_ip, host_port, container_port",
}
NETSTACK_LINK_PREFIXES = ("nsbr", "nsv", "nsp")


def store_rows(state_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of netstack's tables (sorted), or {} if the database does not exist yet."""
    path = state_dir / "state.db"
    if not path.exists():
        return {}
    conn = sqlite3.connect(path, timeout=30)
    try:
        return {
            table: sorted(conn.execute(f"SELECT {columns} FROM {table}").fetchall())
            for table, columns in STORE_TABLES.items()
        }
    finally:
        conn.close()


def store_counts(state_dir: Path) -> dict[str, int]:
    return {table: len(rows) for table, rows in store_rows(state_dir).items()}


def netstack_links(links: list[str]) -> list[str]:
    """The interfaces among links that netstack names (bridges, veths and their peers)."""
    return [name for name in links if name.startswith(NETSTACK_LINK_PREFIXES)]


def global_addresses(ip_addr_json: list[dict[str, Any]]) -> dict[str, list[str]]:
    """{ifname: sorted global addresses} from `ip -j addr` (link-local is the kernel's)."""
    return {
        link["ifname"]: sorted(
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if a.get("scope") == "global"
        )
        for link in ip_addr_json
    }


def routes(ip_route_json: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(dst, dev, gateway) of each route; IPv6 link-local and multicast are the kernel's."""
    return sorted(
        (r.get("dst", ""), r.get("dev", ""), r.get("gateway", ""))
        for r in ip_route_json
        if not r.get("dst", "").startswith(("fe80:", "ff00:"))
    )


def nft_elements(host: Host) -> dict[str, list[str]]:
    """Elements of every set and map; empty ones dropped (the first create adds the table)."""
    elements: dict[str, list[str]] = {}
    for item in host.nft_ruleset().get("nftables", []):
        for kind in ("set", "map"):
            if kind in item:
                obj = item[kind]
                elems = sorted(json.dumps(e, sort_keys=True) for e in obj.get("elem", []))
                if elems:
                    elements[f"{obj['family']} {obj['table']} {obj['name']}"] = elems
    return elements


def nft_rule_counts(host: Host) -> dict[str, int]:
    """{"family table chain": number of rules} of the host's ruleset."""
    counts: dict[str, int] = {}
    for item in host.nft_ruleset().get("nftables", []):
        if "rule" in item:
            rule = item["rule"]
            key = f"{rule['family']} {rule['table']} {rule['chain']}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def kernel_state(host: Host, sandboxes: list[str]) -> dict[str, Any]:
    """Host links, addresses, IPv4+IPv6 routes, nft elements and sandbox namespaces;
    each sandbox's addresses and IPv4+IPv6 routes."""
    state: dict[str, Any] = {
        "host links": sorted(host.links()),
        "host addresses": global_addresses(host.ip_json("addr", "show")),
        "host routes": routes(host.ip_json("-4", "route", "show"))
        + routes(host.ip_json("-6", "route", "show")),
        "nft elements": nft_elements(host),
        "namespaces": sorted(
            n
            for n in host.run("ip", "netns", "list").stdout.split()
            if n == host.name or n.startswith(f"{host.name}-")
        ),
    }
    for sandbox in sandboxes:
        state[f"{sandbox} addresses"] = global_addresses(
            host.sandbox_ip_json(sandbox, "addr", "show")
        )
        state[f"{sandbox} routes"] = routes(
            host.sandbox_ip_json(sandbox, "-4", "route", "show")
        ) + routes(host.sandbox_ip_json(sandbox, "-6", "route", "show"))
    return state


def snapshot(host: Host, sandboxes: list[str]) -> dict[str, Any]:
    """Store rows and `kernel_state`."""
    return {"store": store_rows(host.state_dir), **kernel_state(host, sandboxes)}


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before.keys() | after.keys():
        assert after.get(key) == before.get(key), (
            f"{key} changed:\nbefore: {before.get(key)}\nafter:  {after.get(key)}"
        )


def assert_error(proc: Any, rc: int, needle: str) -> None:
    """Exit status `rc`, exactly one stderr line starting `netctl: error:` containing needle."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == rc, (
        f"expected rc={rc}, got rc={proc.returncode}\nstdout:\n{proc.stdout}\n"
        f"stderr:\n{proc.stderr}"
    )
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("netctl: error: "), lines[0]
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
