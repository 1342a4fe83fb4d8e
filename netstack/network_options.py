"""Network options that belong to netstack itself rather than to a driver.

`netctl network create --opt KEY=VALUE` mixes two kinds of keys: the driver's own
(``mtu``, ``icc``, ...) and netstack's, under ``dns.``:

* ``dns.domain=D``       the network's DNS domain: names on it also answer as ``name.D``,
* ``dns.servers=IP,IP``  upstream resolvers for names netstack does not serve, instead of
  the host's resolv.conf (``netctl network create --dns IP`` sets it).

The controller validates these here and hands the driver only its own keys, so every
driver accepts them without knowing about them.
"""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Mapping

from netstack.errors import InvalidArgument
from netstack.model import IPAddress

DNS_DOMAIN = "dns.domain"
DNS_SERVERS = "dns.servers"
NETWORK_KEYS = (DNS_DOMAIN, DNS_SERVERS)
_PREFIX = "dns."
_LABEL_CHARS = frozenset(string.ascii_letters + string.digits + "-_")


def split(options: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(netstack's keys, the driver's keys) of a network's options."""
    own = {k: v for k, v in options.items() if k.startswith(_PREFIX)}
    return own, {k: v for k, v in options.items() if not k.startswith(_PREFIX)}


def driver_options(options: Mapping[str, str]) -> dict[str, str]:
    """The options a driver sees: everything but netstack's own keys."""
    return split(options)[1]


def validate(options: Mapping[str, str]) -> dict[str, str]:
    """Check netstack's keys strictly and return them normalised (empty values dropped).

    Raises InvalidArgument for unknown ``dns.`` keys, a domain that is no DNS name, or a
    server that is no unicast IP address.
    """
    result: dict[str, str] = {}
    for key, value in options.items():
        if key not in NETWORK_KEYS:
            raise InvalidArgument(
                f"unknown network option {key!r}; known dns options: {', '.join(NETWORK_KEYS)}"
            )
        value = value.strip()
        if not value:
            continue
        if key == DNS_DOMAIN:
            result[key] = validate_domain(value)
        else:
            result[key] = ",".join(str(s) for s in parse_servers(value))
    return result


def validate_domain(text: str) -> str:
    """A DNS domain in lower case without the final dot; InvalidArgument if it is none."""
    domain = text.rstrip(".").lower()
    labels = domain.split(".")
    if (
        not domain
        or len(domain) > 200
        or any(not 0 < len(label) <= 63 for label in labels)
        or any(not set(label) <= _LABEL_CHARS for label in labels)
        or any(label.startswith("-") or label.endswith("-") for label in labels)
        or domain == "arpa"
        or domain.endswith(".arpa")
    ):
        raise InvalidArgument(
            f"dns.domain {text!r} is not a DNS domain; use dot-separated labels of letters, "
            "digits and '-' (each 1-63 characters, at most 200 in all, not under arpa), "
            "e.g. 'svc.local'"
        )
    return domain


def parse_servers(text: str) -> list[IPAddress]:
    """Comma-separated upstream server addresses; InvalidArgument for anything else."""
    servers: list[IPAddress] = []
    for item in (part.strip() for part in text.split(",")):
        try:
            address = ipaddress.ip_address(item)
        except ValueError:
            raise InvalidArgument(
                f"DNS server {item!r} is not an IP address; give IPv4 or IPv6 addresses "
                "(--dns 192.0.2.53)"
            ) from None
        if address.is_unspecified or address.is_multicast:
            raise InvalidArgument(f"DNS server {item!r} must be a unicast address")
        if address not in servers:
            servers.append(address)
    return servers


def dns_servers(options: Mapping[str, str]) -> list[IPAddress]:
    """A network's configured upstream servers (empty: use the host's)."""
    text = options.get(DNS_SERVERS, "")
    return parse_servers(text) if text.strip() else []
