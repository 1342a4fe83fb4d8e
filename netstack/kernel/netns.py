"""Named network namespaces (/run/netns/NAME), as `ip netns` manages them."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from pyroute2 import netns as _netns

from netstack.errors import Conflict, KernelError, NotFound

NETNS_RUN_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000


def path_of(name: str) -> str:
    return str(NETNS_RUN_DIR / name)


def exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def create(name: str) -> str:
    """Create the named namespace with `lo` up; return its path. Raises Conflict if it exists."""
    if exists(name):
        raise Conflict(f"network namespace {name!r} already exists; choose another sandbox name")
    try:
        _netns.create(name)
    except OSError as exc:
        raise KernelError(f"cannot create network namespace {name!r}: {exc}") from None
    from netstack.kernel.links import bring_up_loopback

    bring_up_loopback(name)
    return path_of(name)


def remove(name: str) -> None:
    """Delete the named namespace (and every interface in it). Idempotent."""
    if not exists(name):
        return
    try:
        _netns.remove(name)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise KernelError(f"cannot remove network namespace {name!r}: {exc}") from None


def exec_in(name: str, argv: list[str]) -> None:
    """Replace this process with `argv` running in the named namespace (never returns)."""
    if not exists(name):
        raise NotFound(f"network namespace {name!r} does not exist")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path_of(name), os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise KernelError(f"cannot enter network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise NotFound(f"cannot run {argv[0]!r}: {exc.strerror}") from None
