"""Translate netlink failures into netstack errors that say what to do."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import NetlinkError

from netstack.errors import Conflict, KernelError, NotFound


@contextmanager
def netlink_errors(action: str) -> Iterator[None]:
    """Re-raise a NetlinkError from `action` as Conflict, NotFound or KernelError."""
    try:
        yield
    except NetlinkError as exc:
        code = exc.code
        reason = errno.errorcode.get(code, str(code))
        message = f"{action} failed: {exc.args[1] if len(exc.args) > 1 else reason} ({reason})"
        if code == errno.EEXIST:
            raise Conflict(
                message + "; remove the existing object or choose another name"
            ) from None
        if code in (errno.ENODEV, errno.ENOENT):
            raise NotFound(message) from None
        raise KernelError(message) from None
    except OSError as exc:
        raise KernelError(f"{action} failed: {exc}") from None
