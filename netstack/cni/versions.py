"""The CNI specification versions netstack speaks.

A module of its own, standard library only and without imports: the plugin answers
VERSION from it alone, without loading the protocol module (`spec` costs ~40 ms to import).
"""

from __future__ import annotations

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"


def version_document(version: str) -> dict[str, object]:
    """The VERSION result for a requested (supported) version."""
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
