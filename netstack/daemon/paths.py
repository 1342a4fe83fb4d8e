"""Where netstackd keeps its runtime files."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RUN_DIR = "/run/netstack"
SOCKET_NAME = "netstackd.sock"
LOCK_NAME = "netstackd.lock"


def run_dir() -> Path:
    """NETSTACK_RUN_DIR, or /run/netstack."""
    return Path(os.environ.get("NETSTACK_RUN_DIR", DEFAULT_RUN_DIR))


def socket_path() -> Path:
    return run_dir() / SOCKET_NAME
