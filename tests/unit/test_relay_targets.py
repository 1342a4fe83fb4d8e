"""The loopback relay's listeners derived from endpoints (`relay_targets`, pure)."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv6Interface

import pytest

from netstack.daemon.relay import RelayPlanner, RelayRow, RelayTarget, relay_targets
from netstack.model import Endpoint, PortBinding

V4 = IPv4Interface("10.20.0.2/24")
V6 = IPv6Interface("fd00:1::2/64")


def endpoint(
    *ports: PortBinding,
    ipv4: IPv4Interface | None = V4,
    ipv6: IPv6Interface | None = V6,
    sandbox: str = "web",
) -> Endpoint:
    return Endpoint(
        id=f"{sandbox}-id", network_id="net", sandbox=sandbox, ipv4=ipv4, ipv6=ipv6,
        ports=list(ports),
    )  # fmt: skip


@pytest.mark.parametrize("host_ip", ["", "::", "::1", "0::1", "0:0::"])
def test_bindings_on_the_ipv6_loopback_are_relayed(host_ip: str) -> None:
    found = relay_targets([endpoint(PortBinding("tcp", host_ip, 8080, 80))])
    assert found == [RelayTarget("tcp", 8080, "fd00:1::2", 80)]


@pytest.mark.parametrize(
    "host_ip", ["0.0.0.0", "127.0.0.1", "192.0.2.1", "2001:db8::1", "fe80::1", "nonsense"]
)
def test_bindings_not_on_the_ipv6_loopback_are_not(host_ip: str) -> None:
    assert relay_targets([endpoint(PortBinding("tcp", host_ip, 8080, 80))]) == []


def test_ipv4_only_endpoint_is_relayed_to_its_ipv4_address() -> None:
    found = relay_targets([endpoint(PortBinding("udp", "", 5353, 53), ipv6=None)])
    assert found == [RelayTarget("udp", 5353, "10.20.0.2", 53)]


def test_ipv6_only_endpoint() -> None:
    found = relay_targets([endpoint(PortBinding("tcp", "::", 8080, 80), ipv4=None)])
    assert found == [RelayTarget("tcp", 8080, "fd00:1::2", 80)]


def test_endpoint_without_address_gives_nothing() -> None:
    assert relay_targets([endpoint(PortBinding("tcp", "", 8080, 80), ipv4=None, ipv6=None)]) == []


def test_sctp_is_not_relayed() -> None:
    assert relay_targets([endpoint(PortBinding("sctp", "", 8080, 80))]) == []


def test_range_gives_one_target_per_port() -> None:
    """A published range is stored as one binding per port: host 800N -> container 900N."""
    bindings = [PortBinding("tcp", "", 8000 + i, 9000 + i) for i in range(3)]
    assert relay_targets([endpoint(*bindings)]) == [
        RelayTarget("tcp", 8000 + i, "fd00:1::2", 9000 + i) for i in range(3)
    ]


def test_several_endpoints_sorted_without_duplicates() -> None:
    web = endpoint(
        PortBinding("udp", "", 5353, 53),
        PortBinding("tcp", "", 8080, 80),
        PortBinding("tcp", "0.0.0.0", 8081, 81),
        PortBinding("tcp", "::1", 8443, 443),
    )
    db = endpoint(
        PortBinding("tcp", "", 5432, 5432), sandbox="db", ipv4=IPv4Interface("10.20.0.3/24"),
        ipv6=None,
    )  # fmt: skip
    found = relay_targets([web, db, web])
    assert found == [
        RelayTarget("tcp", 5432, "10.20.0.3", 5432),
        RelayTarget("tcp", 8080, "fd00:1::2", 80),
        RelayTarget("tcp", 8443, "fd00:1::2", 443),
        RelayTarget("udp", 5353, "fd00:1::2", 53),
    ]


def test_no_endpoints() -> None:
    assert relay_targets([]) == []
    assert relay_targets([endpoint()]) == []


def test_target_text() -> None:
    assert str(RelayTarget("tcp", 8080, "fd00:1::2", 80)) == "[::1]:8080/tcp -> [fd00:1::2]:80"
    assert str(RelayTarget("udp", 53, "10.0.0.2", 5353)) == "[::1]:53/udp -> 10.0.0.2:5353"


def rows_of(*endpoints: Endpoint) -> list[RelayRow]:
    """What Store.relay_rows gives for these endpoints."""
    return [
        (
            e.id,
            b.protocol,
            b.host_ip,
            b.host_port,
            b.container_port,
            None if e.ipv4 is None else str(e.ipv4),
            None if e.ipv6 is None else str(e.ipv6),
        )
        for e in endpoints
        for b in e.ports
    ]


def test_planner_gives_what_relay_targets_gives() -> None:
    web = endpoint(
        PortBinding("tcp", "", 8080, 80),
        PortBinding("udp", "::1", 5353, 53),
        PortBinding("tcp", "0.0.0.0", 8081, 81),  # IPv4 only: not relayed
        PortBinding("sctp", "", 9000, 9000),
    )
    v4_only = endpoint(PortBinding("tcp", "::", 8443, 443), ipv6=None, sandbox="v4")
    bare = endpoint(PortBinding("tcp", "", 7000, 70), ipv4=None, ipv6=None, sandbox="bare")
    planner = RelayPlanner()
    for endpoints in ([web, v4_only, bare], [web], [web, web], [], [v4_only]):
        planned = planner.full(rows_of(*endpoints))
        assert planned.full is not None and not planned.removed and not planned.added
        assert sorted(planned.full) == relay_targets(endpoints)
        assert len(set(planned.full)) == len(planned.full)


def _by_endpoint(*endpoints: Endpoint) -> dict[str, list[RelayRow]]:
    rows: dict[str, list[RelayRow]] = {e.id: [] for e in endpoints}
    for row in rows_of(*endpoints):
        rows[row[0]].append(row)
    return rows


def test_planner_changes_add_up_to_the_full_plan() -> None:
    """Applying each change's removed and added targets to the last ones gives what a full
    plan of the endpoints now gives; a target an endpoint keeps is in neither list."""
    web = endpoint(PortBinding("tcp", "", 8080, 80), PortBinding("udp", "", 5353, 53))
    db = endpoint(PortBinding("tcp", "", 5432, 5432), sandbox="db", ipv6=None)
    planner = RelayPlanner()
    start = planner.full(rows_of(web)).full
    assert start is not None
    served = list(start)
    moved_web = endpoint(PortBinding("tcp", "", 8080, 80), PortBinding("tcp", "", 9090, 90))
    steps = [
        ({"db-id": rows_of(db)}, [web, db]),  # db publishes
        ({"web-id": rows_of(moved_web)}, [moved_web, db]),  # web: 5353 out, 9090 in
        ({"db-id": []}, [moved_web]),  # db unpublishes (or is gone)
        ({"web-id": [], "db-id": rows_of(db)}, [db]),
    ]
    for published, endpoints in steps:
        change = planner.change(published)
        assert change.full is None
        for target in change.removed:
            served.remove(target)
        served += change.added
        assert sorted(served) == relay_targets(endpoints)
    change = planner.change({"web-id": rows_of(moved_web)})
    again = planner.change({"web-id": rows_of(moved_web)})  # the same rows: nothing to do
    assert change.added and not change.removed and not again.added and not again.removed
    kept = planner.change(_by_endpoint(endpoint(PortBinding("tcp", "", 8080, 80))))
    assert kept.added == [] and kept.removed == [RelayTarget("tcp", 9090, "fd00:1::2", 90)]
