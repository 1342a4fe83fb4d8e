"""One error hierarchy for netstack; each class knows how front-ends should render it.

`cni_code` follows the CNI specification's well-known error codes, `http_status` is what the
Docker plugin API answers. Messages say what was wrong and what to do.
"""

from __future__ import annotations


class NetstackError(Exception):
    """Base of every error netstack reports to a user."""

    cni_code = 999
    http_status = 500


class InvalidArgument(NetstackError):
    """The request itself is wrong (bad CIDR, unknown option, name too long...)."""

    cni_code = 7  # invalid network config
    http_status = 400


class NotFound(NetstackError):
    """A named network, sandbox or endpoint does not exist."""

    cni_code = 3  # unknown container
    http_status = 404


class Conflict(NetstackError):
    """The request clashes with existing state (duplicate name, overlapping subnet...)."""

    cni_code = 7
    http_status = 409


class InUse(Conflict):
    """An object cannot be removed because something still uses it."""


class Exhausted(NetstackError):
    """An address pool has no free address left."""

    cni_code = 11  # try again later
    http_status = 409


class Busy(NetstackError):
    """netstackd is still working on something and did not finish in time."""

    cni_code = 11  # try again later
    http_status = 503


class KernelError(NetstackError):
    """The kernel refused an operation (netlink or nftables)."""

    cni_code = 5  # I/O failure
    http_status = 500


class InjectedFault(NetstackError):
    """Raised at a named step when NETSTACK_FAULT selects it (tests prove rollback with it)."""
