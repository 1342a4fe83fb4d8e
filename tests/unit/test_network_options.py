"""netstack's own network options (``dns.domain``, ``dns.servers``): split, validation,
and how netctl reports a bad one (exit 1, one line, nothing stored)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from netstack.cli.app import main
from netstack.errors import InvalidArgument
from netstack.network_options import (
    DNS_DOMAIN,
    DNS_SERVERS,
    dns_servers,
    driver_options,
    parse_servers,
    split,
    validate,
    validate_domain,
)
from netstack.store import Store

# split ------------------------------------------------------------------------------------


def test_split_separates_dns_keys_from_driver_keys() -> None:
    options = {"mtu": "1400", DNS_DOMAIN: "svc.test", "icc": "false", DNS_SERVERS: "192.0.2.1"}
    own, driver = split(options)
    assert own == {DNS_DOMAIN: "svc.test", DNS_SERVERS: "192.0.2.1"}
    assert driver == {"mtu": "1400", "icc": "false"}
    assert driver_options(options) == driver
    assert split({}) == ({}, {})


def test_split_sends_every_dns_prefixed_key_to_validation() -> None:
    """Unknown dns.* keys are netstack's (and rejected there), never the driver's."""
    own, driver = split({"dns.nope": "1", "dnsx": "2"})
    assert own == {"dns.nope": "1"}
    assert driver == {"dnsx": "2"}


# validate ---------------------------------------------------------------------------------


def test_validate_normalises() -> None:
    result = validate(
        {DNS_DOMAIN: " SVC.Test. ", DNS_SERVERS: " 192.0.2.1 , 2001:DB8::0053,192.0.2.1"}
    )
    assert result == {DNS_DOMAIN: "svc.test", DNS_SERVERS: "192.0.2.1,2001:db8::53"}


def test_validate_drops_empty_values() -> None:
    assert validate({DNS_DOMAIN: "", DNS_SERVERS: "  "}) == {}
    assert validate({}) == {}


@pytest.mark.parametrize("key", ["dns.search", "dns.Domain", "dns.", "dns.servers.extra"])
def test_validate_rejects_unknown_dns_keys(key: str) -> None:
    with pytest.raises(InvalidArgument, match=f"unknown network option '{key}'") as info:
        validate({key: "x"})
    assert "known dns options: dns.domain, dns.servers" in str(info.value)


# domains ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("svc.local", "svc.local"),
        ("SVC.Local.", "svc.local"),
        ("test", "test"),
        ("a_b.c-d.test", "a_b.c-d.test"),
        ("x" * 63 + ".test", "x" * 63 + ".test"),
        ("0.example", "0.example"),
        (".".join(["abcdefghi"] * 20), ".".join(["abcdefghi"] * 20)),  # 199 characters
    ],
)
def test_good_domains(text: str, expected: str) -> None:
    assert validate_domain(text) == expected
    assert validate({DNS_DOMAIN: text}) == {DNS_DOMAIN: expected}


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "..",
        "a..b",
        ".svc.test",
        "-svc.test",
        "svc-.test",
        "svc.-test",
        "svc test",
        "svc/test",
        "svc.test/24",
        "svc:test",
        "svc*.test",
        "ünï.test",
        "x" * 64 + ".test",
        "x" * 64,
        ".".join(["abcdefghij"] * 19),  # 208 characters
        "a\x00b",
    ],
)
def test_bad_domains(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_domain(text)
    message = str(info.value)
    assert message.startswith(f"dns.domain {text!r} is not a DNS domain")
    assert "e.g. 'svc.local'" in message
    with pytest.raises(InvalidArgument):
        validate({DNS_DOMAIN: text or "."})


# servers ----------------------------------------------------------------------------------


def test_parse_servers_in_order_without_duplicates() -> None:
    servers = parse_servers("192.0.2.53, 2001:db8::53,192.0.2.53 ,198.51.100.1")
    assert servers == [
        ipaddress.ip_address("192.0.2.53"),
        ipaddress.ip_address("2001:db8::53"),
        ipaddress.ip_address("198.51.100.1"),
    ]


@pytest.mark.parametrize(
    "text",
    ["bad", "", "192.0.2.1,", ",192.0.2.1", "192.0.2", "192.0.2.256", "10.0.0.0/8", "dns.google",
     "192.0.2.1:53", "[2001:db8::1]", "192.0.2.1 192.0.2.2"],
)  # fmt: skip
def test_bad_servers_are_no_ip_address(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"is not an IP address; give IPv4 or IPv6"):
        parse_servers(text)


@pytest.mark.parametrize("text", ["0.0.0.0", "::", "224.0.0.251", "ff02::fb"])
def test_servers_must_be_unicast(text: str) -> None:
    with pytest.raises(InvalidArgument, match=f"DNS server '{text}' must be a unicast address"):
        parse_servers(text)


def test_dns_servers_of_options() -> None:
    assert dns_servers({}) == []
    assert dns_servers({DNS_SERVERS: " "}) == []
    assert dns_servers({DNS_SERVERS: "2001:db8::1,192.0.2.1", DNS_DOMAIN: "x"}) == [
        ipaddress.ip_address("2001:db8::1"),
        ipaddress.ip_address("192.0.2.1"),
    ]
    with pytest.raises(InvalidArgument):
        dns_servers({DNS_SERVERS: "nope"})


# netctl network create --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--dns", "bad"],
            "DNS server 'bad' is not an IP address; give IPv4 or IPv6 addresses (--dns 192.0.2.53)",
        ),
        (["--dns", "192.0.2.1", "--dns", "224.0.0.1"], "DNS server '224.0.0.1' must be a unicast"),
        (
            ["--dns", "192.0.2.1", "--opt", "dns.servers=192.0.2.2"],
            "give DNS servers with --dns or --opt dns.servers, not both",
        ),
        (["--opt", "dns.domain=-bad"], "dns.domain '-bad' is not a DNS domain"),
        (["--opt", "dns.servers=192.0.2.1;x"], "DNS server '192.0.2.1;x' is not an IP address"),
        (["--opt", "dns.search=x"], "unknown network option 'dns.search'"),
    ],
)
def test_netctl_rejects_bad_dns_options(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    """Exit 1 with one `netctl: error:` line, before any state or kernel object exists."""
    monkeypatch.setenv("NETSTACK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NETSTACK_RUN_DIR", str(tmp_path / "run"))
    assert main(["network", "create", *args, "web"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"netctl: error: {message}"), err
    assert err.count("\n") == 1
    state = tmp_path / "state"
    if state.exists():
        store = Store(state)
        try:
            assert store.networks() == []
        finally:
            store.close()
