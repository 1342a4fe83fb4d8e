"""Interface names: what the kernel accepts (shared by drivers and the controller)."""

from __future__ import annotations

import re

from netstack.errors import InvalidArgument

IFNAMSIZ_MAX = 15
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def validate_ifname(name: str, what: str) -> str:
    """Check an interface name: 1-15 bytes of letters, digits, '_', '.', '-'."""
    if len(name.encode()) > IFNAMSIZ_MAX:
        raise InvalidArgument(
            f"{what} {name!r} is {len(name.encode())} bytes; interface names are at most "
            f"{IFNAMSIZ_MAX} bytes, choose a shorter one"
        )
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"{what} {name!r} is not a valid interface name; use letters, digits, '_', '.', '-'"
        )
    return name
