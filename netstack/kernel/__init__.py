"""Kernel adapters: the only code that talks to netlink (pyroute2) or nftables."""
