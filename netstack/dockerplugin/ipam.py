"""IpamDriver: pools and addresses handed to Docker ahead of its networks and endpoints.

Docker asks its IPAM driver for a pool (RequestPool), the pool's gateway and aux addresses
(RequestAddress) and only then creates the network (NetworkDriver.CreateNetwork); each
container's address is requested before its endpoint is created. netstack stores such a
pool at once, held PENDING (not yet a network's), so every netstack user (netctl, CNI, other
Docker networks) sees the subnet taken; addresses requested from it are held PENDING too.
CreateNetwork and CreateEndpoint claim them (`claim_pools`, `claim`): the same rows change
owner, nothing is allocated twice. ReleaseAddress frees only what is still PENDING (or
belongs to a pool no network has claimed); an endpoint's address is freed by DeleteEndpoint.
ReleasePool forgets a pool no network holds; after DeleteNetwork the pool is gone already.

PoolID is ``netstack/<subnet>``: stored pools never overlap, so a subnet names one pool.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets

from netstack.controller import Controller
from netstack.dockerplugin import wire
from netstack.errors import Conflict, InvalidArgument, NotFound
from netstack.ipam import AddressAllocator, choose_default_pool, default_ipv6_pool, make_pool_spec
from netstack.ipam.allocator import PENDING, Pool
from netstack.ipam.pools import host_bounds

log = logging.getLogger(__name__)

POOL_PREFIX = "netstack/"
LOCAL_ADDRESS_SPACE = "netstack-local"
GLOBAL_ADDRESS_SPACE = "netstack-global"


def pool_id_of(pool: Pool) -> str:
    return f"{POOL_PREFIX}{pool.subnet}"


def _subnet_of(pool_id: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = pool_id.removeprefix(POOL_PREFIX)
    if text == pool_id:
        raise InvalidArgument(f"PoolID {pool_id!r} was not handed out by netstack")
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        raise InvalidArgument(f"PoolID {pool_id!r} was not handed out by netstack") from None


def _pool(allocator: AddressAllocator, pool_id: str) -> Pool:
    pool = allocator.pool_of_subnet(_subnet_of(pool_id))
    if pool is None:
        raise NotFound(f"pool {pool_id} is not known (released, or netstack's state was reset)")
    return pool


def get_capabilities(controller: Controller, request: wire.Document) -> wire.Document:
    return {"RequiresMACAddress": False, "RequiresRequestReplay": False}


def get_default_address_spaces(controller: Controller, request: wire.Document) -> wire.Document:
    return {
        "LocalDefaultAddressSpace": LOCAL_ADDRESS_SPACE,
        "GlobalDefaultAddressSpace": GLOBAL_ADDRESS_SPACE,
    }


def request_pool(controller: Controller, request: wire.RequestPool) -> wire.Document:
    """Hold the asked subnet, or the first default pool that overlaps no stored pool and no
    host route. Raises Conflict naming what the subnet overlaps."""
    with controller.store.transaction() as conn:
        allocator = AddressAllocator(conn)
        subnet = request.pool
        if subnet is None:
            in_use = allocator.subnets_in_use()
            if request.v6:
                subnet = default_ipv6_pool(secrets.token_hex(8), in_use)
            else:
                subnet = choose_default_pool(in_use + controller.host_routes())
        clash = allocator.network_of_subnet(subnet)
        if clash is not None:
            raise Conflict(
                f"subnet {subnet} overlaps {controller.describe_pool_holder(clash[0])} "
                f"({clash[1]}); choose another --subnet"
            )
        pool = allocator.add_pending_pool(make_pool_spec(subnet, None, request.sub_pool))
    log.info("docker ipam: pool %s held", subnet)
    return {"PoolID": pool_id_of(pool), "Pool": str(subnet), "Data": {}}


def release_pool(controller: Controller, request: wire.ReleasePool) -> wire.Document:
    """Forget a pool no network holds. Idempotent; Conflict while a network uses it."""
    with controller.store.transaction() as conn:
        allocator = AddressAllocator(conn)
        pool = allocator.pool_of_subnet(_subnet_of(request.pool_id))
        if pool is None:
            return {}
        if pool.network_id != PENDING:
            holder = controller.describe_pool_holder(pool.network_id)
            raise Conflict(f"pool {request.pool_id} is used by {holder}; remove the network first")
        allocator.remove_pool(pool.id)
    log.info("docker ipam: pool %s released", pool.subnet)
    return {}


def request_address(controller: Controller, request: wire.RequestAddress) -> wire.Document:
    """The gateway (asked address, else the subnet's first host address) or an endpoint's
    address (asked, else the next free one), held until claimed or released."""
    with controller.store.transaction() as conn:
        allocator = AddressAllocator(conn)
        pool = _pool(allocator, request.pool_id)
        if request.gateway:
            gateway = request.address
            if gateway is None:
                gateway = ipaddress.ip_address(host_bounds(pool.subnet)[0])
            allocator.request(pool, "gateway", gateway)
            address = gateway
        else:
            address = allocator.request(pool, PENDING, request.address)
    return {"Address": f"{address}/{pool.subnet.prefixlen}", "Data": {}}


def release_address(controller: Controller, request: wire.ReleaseAddress) -> wire.Document:
    """Free an address still held for Docker. Idempotent: an address an endpoint claimed is
    freed with the endpoint, and a gateway with its network."""
    with controller.store.transaction() as conn:
        allocator = AddressAllocator(conn)
        pool = allocator.pool_of_subnet(_subnet_of(request.pool_id))
        if pool is None:
            return {}
        owner = allocator.owner_of(pool.id, request.address)
        if owner == PENDING or (owner is not None and pool.network_id == PENDING):
            allocator.release(pool.id, request.address)
    return {}
