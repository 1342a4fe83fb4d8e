"""netstack: a container networking stack (CNM controller, bridge driver, IPAM, nftables)."""

__version__ = "0.1.0"
