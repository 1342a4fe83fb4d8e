"""IP address management: pool validation, default pools and serial address allocation."""

from netstack.ipam.allocator import AddressAllocator
from netstack.ipam.pools import PoolSpec, choose_default_pool, default_ipv6_pool, make_pool_spec

__all__ = [
    "AddressAllocator",
    "PoolSpec",
    "choose_default_pool",
    "default_ipv6_pool",
    "make_pool_spec",
]
