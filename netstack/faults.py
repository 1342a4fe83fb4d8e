"""Named fault points, armed through the NETSTACK_FAULT environment variable.

Tests set ``NETSTACK_FAULT=connect:after-veth`` (for example) to make that step fail after
doing its work, and then check that nothing was left behind.
"""

from __future__ import annotations

import os

from netstack.errors import InjectedFault


def checkpoint(point: str) -> None:
    """Raise InjectedFault if `point` is the armed fault point; otherwise do nothing."""
    if os.environ.get("NETSTACK_FAULT") == point:
        raise InjectedFault(f"fault injected at {point} (NETSTACK_FAULT)")
