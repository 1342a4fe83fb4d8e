"""Published-port specs, clashes and host-port choice (netstack.ports), without I/O."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from netstack.errors import Conflict, Exhausted, InvalidArgument
from netstack.model import PortBinding
from netstack.ports import EPHEMERAL_FIRST, PortRequest, assign, overlaps, parse_spec

HOST_ADDRESSES = ["192.0.2.1", "2001:db8::1"]


def parse(spec: str) -> PortRequest:
    return parse_spec(spec, lambda: HOST_ADDRESSES)


def nothing_bound(protocol: str, among: Sequence[int] | None) -> set[int]:
    return set()


@pytest.mark.parametrize(
    ("spec", "protocol", "host_ip", "container", "host"),
    [
        ("80", "tcp", "", (80,), None),
        ("80/udp", "udp", "", (80,), None),
        ("80/SCTP", "sctp", "", (80,), None),
        ("8080:80", "tcp", "", (80,), (8080,)),
        ("192.0.2.1:8080:80/udp", "udp", "192.0.2.1", (80,), (8080,)),
        ("127.0.0.1::80", "tcp", "127.0.0.1", (80,), None),
        ("0.0.0.0:8080:80", "tcp", "0.0.0.0", (80,), (8080,)),
        ("[::1]:8080:80", "tcp", "::1", (80,), (8080,)),
        ("[::]:8080:80", "tcp", "::", (80,), (8080,)),
        ("[2001:db8::1]:8080:80", "tcp", "2001:db8::1", (80,), (8080,)),
        ("8000-8002:9000-9002", "tcp", "", (9000, 9001, 9002), (8000, 8001, 8002)),
        ("8000-8010:80", "tcp", "", (80,), tuple(range(8000, 8011))),
        ("9000-9001", "tcp", "", (9000, 9001), None),
        ("1:65535", "tcp", "", (65535,), (1,)),
    ],
)
def test_valid_specs(
    spec: str,
    protocol: str,
    host_ip: str,
    container: tuple[int, ...],
    host: tuple[int, ...] | None,
) -> None:
    request = parse(spec)
    assert (request.protocol, request.host_ip, request.container_ports, request.host_ports) == (
        protocol,
        host_ip,
        container,
        host,
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0", "container port 0 in -p '0' is out of range"),
        ("8080:0", "container port 0"),
        ("0:80", "host port 0"),
        ("65536", "out of range: use 1-65535"),
        ("8080:99999", "container port 99999 in -p '8080:99999' is out of range"),
        ("80/icmp", "unknown protocol 'icmp'"),
        ("80/", "unknown protocol ''"),
        ("90-80", "is inverted"),
        ("8000-8002:80-81", "maps 3 host ports onto 2 container ports"),
        ("10.9.9.9:8080:80", "host IP 10.9.9.9 in -p '10.9.9.9:8080:80' is not an address"),
        ("nohost:8080:80", "invalid host IP 'nohost'"),
        ("[192.0.2.1]:8080:80", "brackets are for IPv6"),
        ("[::1]8080:80", "write an IPv6 host IP as [ADDR]:PORT:PORT"),
        ("::1:8080:80", "write IPv6 host addresses in brackets"),
        ("a:b", "invalid container port 'b'"),
        ("a:80", "invalid host port 'a'"),
        ("", "invalid container port ''"),
    ],
)
def test_invalid_specs(spec: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(spec)
    assert message in str(caught.value)


def test_host_addresses_read_only_when_a_host_ip_is_named() -> None:
    def boom() -> list[str]:
        raise AssertionError("host addresses should not be read")

    parse_spec("8080:80", boom)
    parse_spec("127.0.0.1:8080:80", boom)  # loopback needs no lookup


@pytest.mark.parametrize(
    ("a", "b", "clash"),
    [
        ("", "", True),
        ("", "127.0.0.1", True),
        ("", "::1", True),
        ("0.0.0.0", "192.0.2.1", True),
        ("0.0.0.0", "::", False),
        ("::", "::1", True),
        ("192.0.2.1", "192.0.2.1", True),
        ("192.0.2.1", "127.0.0.1", False),
        ("192.0.2.1", "::1", False),
        ("0.0.0.0", "::1", False),
    ],
)
def test_overlaps(a: str, b: str, clash: bool) -> None:
    assert overlaps(a, b) is clash
    assert overlaps(b, a) is clash


def test_assign_fixed_and_range() -> None:
    bindings = assign([parse("8080:80"), parse("8000-8001:9000-9001/udp")], [], nothing_bound)
    assert bindings == [
        PortBinding("tcp", "", 8080, 80),
        PortBinding("udp", "", 8000, 9000),
        PortBinding("udp", "", 8001, 9001),
    ]


def test_assign_ephemeral_skips_published_and_bound_ports() -> None:
    existing = [PortBinding("tcp", "", EPHEMERAL_FIRST, 80)]
    bound = {"tcp": {EPHEMERAL_FIRST + 1}}
    bindings = assign([parse("80"), parse("81")], existing, lambda p, among: bound.get(p, set()))
    assert [b.host_port for b in bindings] == [EPHEMERAL_FIRST + 2, EPHEMERAL_FIRST + 3]


def test_assign_host_range_with_one_container_port_picks_a_free_one() -> None:
    existing = [PortBinding("tcp", "", 8000, 80)]
    bindings = assign([parse("8000-8010:80")], existing, nothing_bound)
    assert bindings == [PortBinding("tcp", "", 8001, 80)]


def test_assign_range_without_room_is_exhausted() -> None:
    existing = [PortBinding("tcp", "", 8000, 80), PortBinding("tcp", "", 8001, 80)]
    with pytest.raises(Exhausted, match="no free host port for -p '8000-8001:80' in 8000-8001"):
        assign([parse("8000-8001:80")], existing, nothing_bound)


@pytest.mark.parametrize(
    ("existing", "spec"),
    [
        (PortBinding("tcp", "", 8080, 80), "8080:81"),
        (PortBinding("tcp", "", 8080, 80), "127.0.0.1:8080:80"),
        (PortBinding("tcp", "127.0.0.1", 8080, 80), "8080:80"),
        (PortBinding("tcp", "0.0.0.0", 8080, 80), "192.0.2.1:8080:80"),
        (PortBinding("tcp", "", 8005, 80), "8000-8010:80-90"),
        (PortBinding("udp", "::", 53, 53), "[::1]:53:53/udp"),
    ],
)
def test_assign_refuses_clashes(existing: PortBinding, spec: str) -> None:
    with pytest.raises(Conflict) as caught:
        assign([parse(spec)], [existing], nothing_bound)
    assert "is already published" in str(caught.value)
    assert str(existing) in str(caught.value)


@pytest.mark.parametrize(
    ("existing", "spec"),
    [
        (PortBinding("udp", "", 8080, 80), "8080:80/tcp"),
        (PortBinding("tcp", "0.0.0.0", 8080, 80), "[::1]:8080:80"),
        (PortBinding("tcp", "127.0.0.1", 8080, 80), "192.0.2.1:8080:80"),
    ],
)
def test_assign_allows_what_does_not_clash(existing: PortBinding, spec: str) -> None:
    assert len(assign([parse(spec)], [existing], nothing_bound)) == 1


def test_assign_refuses_clash_within_one_request_list() -> None:
    with pytest.raises(Conflict, match="already published"):
        assign([parse("8080:80"), parse("8080:81")], [], nothing_bound)


def test_assign_refuses_port_bound_on_host() -> None:
    with pytest.raises(Conflict, match="in use by a process on the host"):
        assign([parse("8080:80")], [], lambda p, among: {8080} if p == "tcp" else set())


def test_binding_text_and_families() -> None:
    assert str(PortBinding("tcp", "", 8080, 80)) == "*:8080->80/tcp"
    assert str(PortBinding("udp", "::1", 53, 53)) == "[::1]:53->53/udp"
    assert PortBinding("tcp", "", 1, 1).families == (4, 6)
    assert PortBinding("tcp", "::", 1, 1).families == (6,)
    assert PortBinding("tcp", "127.0.0.1", 1, 1).families == (4,)


def test_assign_asks_only_about_the_named_host_ports() -> None:
    """The host's sockets are asked about the named ports only (the kernel filters, so the
    cost does not grow with the listeners there); any port for an unnamed one."""
    asked: list[tuple[str, list[int] | None]] = []

    def busy(protocol: str, among: Sequence[int] | None) -> set[int]:
        asked.append((protocol, None if among is None else list(among)))
        return set()

    assign([parse("8081:80"), parse("8080:81"), parse("53:53/udp")], [], busy)
    assert sorted(asked, key=str) == [("tcp", [8080, 8081]), ("udp", [53])]
    asked.clear()
    assign([parse("8080:80"), parse("81")], [], busy)
    assert asked == [("tcp", None)]
