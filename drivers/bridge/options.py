"""Bridge driver options, parsed once into a typed object (strict about unknown keys)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from netstack.errors import InvalidArgument
from netstack.names import validate_ifname

BRIDGE_PREFIX = "nsbr"

# Docker's option names (docker network create -o ...) mapped onto ours.
_ALIASES = {
    "com.docker.network.bridge.name": "bridge.name",
    "com.docker.network.driver.mtu": "mtu",
    "com.docker.network.bridge.enable_ip_masquerade": "masquerade",
    "com.docker.network.bridge.enable_icc": "icc",
}
_KNOWN = ("bridge.name", "mtu", "masquerade", "icc", "gateway", "hairpin")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidArgument(f"option {key}={value!r} must be true or false")


@dataclass(frozen=True)
class BridgeOptions:
    """The bridge driver's options for one network."""

    bridge_name: str
    mtu: int = 1500
    masquerade: bool = True
    icc: bool = True
    gateway: bool = True  # the bridge holds the gateway addresses (CNI's isGateway)
    hairpin: bool = True  # bridge ports send frames back where they came (hairpinMode)

    @classmethod
    def parse(cls, raw: Mapping[str, str], network_id: str) -> BridgeOptions:
        """Validate user options (Docker's long names accepted); fill defaults."""
        values: dict[str, str] = {}
        for key, value in raw.items():
            name = _ALIASES.get(key, key)
            if name not in _KNOWN:
                raise InvalidArgument(
                    f"unknown bridge option {key!r}; known options: {', '.join(_KNOWN)}"
                )
            values[name] = value
        bridge_name = values.get("bridge.name", f"{BRIDGE_PREFIX}{network_id[:11]}")
        validate_ifname(bridge_name, "bridge.name")
        mtu_text = values.get("mtu", "1500")
        if not re.fullmatch(r"-?[0-9]+", mtu_text):
            raise InvalidArgument(f"option mtu={mtu_text!r} is not a number")
        mtu = int(mtu_text)
        if not 68 <= mtu <= 65535:
            raise InvalidArgument(f"option mtu={mtu} is out of range; use 68..65535")
        return cls(
            bridge_name=bridge_name,
            mtu=mtu,
            masquerade=_parse_bool("masquerade", values.get("masquerade", "true")),
            icc=_parse_bool("icc", values.get("icc", "true")),
            gateway=_parse_bool("gateway", values.get("gateway", "true")),
            hairpin=_parse_bool("hairpin", values.get("hairpin", "true")),
        )

    def to_dict(self) -> dict[str, str]:
        """The normalised form stored with the network and shown by inspect."""
        return {
            "bridge.name": self.bridge_name,
            "mtu": str(self.mtu),
            "masquerade": str(self.masquerade).lower(),
            "icc": str(self.icc).lower(),
            "gateway": str(self.gateway).lower(),
            "hairpin": str(self.hairpin).lower(),
        }
