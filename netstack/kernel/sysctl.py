"""Sysctls of the calling process's network namespace (/proc/sys/net follows it)."""

from __future__ import annotations

from pathlib import Path

from netstack.errors import KernelError


def write(key: str, value: str) -> None:
    """Set `key` (dotted, e.g. net.ipv4.ip_forward) if it differs. Idempotent."""
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except OSError as exc:
        raise KernelError(f"cannot set sysctl {key}={value}: {exc}") from None
