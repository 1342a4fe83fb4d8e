"""The bridge driver: a Linux bridge per network, veth pairs, NAT and isolation in nftables."""

from netstack.drivers.bridge.driver import BridgeDriver
from netstack.drivers.bridge.options import BridgeOptions

__all__ = ["BridgeDriver", "BridgeOptions"]
