"""NetworkDriver: Docker networks and endpoints as netstack networks and endpoints.

* A Docker network is a netstack bridge network with Docker's NetworkID as its id, named
  ``docker-<first 12 hex of the id>`` (Docker does not send its own name) unless
  ``-o netstack.name=NAME`` chooses one; labelled ``netstack.origin=docker``. ``-o`` options
  are the bridge driver's (Docker's long names are accepted) and netstack's ``dns.*``.
* An endpoint is recorded at CreateEndpoint under the placeholder sandbox
  ``docker/endpoint-<12 hex>``, holding the addresses Docker's IPAM gave it (claimed from
  netstack's IPAM when it handed them out). Join adopts the container's namespace
  (SandboxKey) as sandbox ``docker/<its file name>``, never deleted by netstack, and makes
  the veth pair with both ends in the host namespace: Docker moves the ``nsp…`` end into
  the container, names it ethN and configures addresses, MAC and routes itself.
* Published ports (ProgramExternalConnectivity) go through netstack's nftables publishing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from netstack.controller import ConnectRequest, Controller, NetworkRequest
from netstack.dockerplugin import wire
from netstack.model import JoinOptions

log = logging.getLogger(__name__)

SANDBOX_PREFIX = "docker/"
NAME_OPTION = "netstack.name"
ORIGIN_LABEL = "netstack.origin"
DRIVER = "bridge"


Later = Callable[[Controller], None]
HOST_PEER = JoinOptions(peer_in_host=True)


@dataclass(frozen=True)
class Answer:
    """A reply document and work to run after it is sent."""

    document: wire.Document
    after: Later | None = None


class _EndpointLocks:
    """One lock per endpoint id, process-wide: work ahead of a Join (after CreateEndpoint),
    the Join itself and DeleteEndpoint never run at once on one endpoint's interface.
    `prepared` holds the endpoints whose veth pair this process made ahead of their Join,
    with the name of the pair's peer."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self.prepared: dict[str, str] = {}

    @contextmanager
    def hold(self, endpoint_id: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(endpoint_id, threading.Lock())
        with lock:
            yield

    def is_prepared(self, endpoint_id: str) -> bool:
        """Whether the endpoint's pair was made ahead (its Join then only names it)."""
        with self._guard:
            return endpoint_id in self.prepared

    def forget(self, endpoint_id: str) -> None:
        with self._guard:
            self._locks.pop(endpoint_id, None)
            self.prepared.pop(endpoint_id, None)


ENDPOINT_LOCKS = _EndpointLocks()


def network_name(network_id: str) -> str:
    return f"docker-{network_id[:12]}"


def unjoined_sandbox(endpoint_id: str) -> str:
    """The sandbox name an endpoint is recorded under before Join and after Leave."""
    return f"{SANDBOX_PREFIX}endpoint-{endpoint_id[:12]}"


def sandbox_name(sandbox_key: str) -> str:
    """The sandbox name of a container's namespace (Docker's SandboxKey path)."""
    return f"{SANDBOX_PREFIX}{os.path.basename(sandbox_key.rstrip('/'))}"


def get_capabilities(controller: Controller, request: wire.Document) -> wire.Document:
    return {"Scope": "local", "ConnectivityScope": "local"}


def create_network(controller: Controller, request: wire.CreateNetwork) -> wire.Document:
    """Idempotent for an id that exists already (a replayed call)."""
    if controller.store.find_network(request.network_id) is not None:
        return {}
    options = dict(request.generic)
    name = options.pop(NAME_OPTION, "") or network_name(request.network_id)
    pools = request.ipv4 + request.ipv6
    controller.create_network(
        NetworkRequest(
            name=name,
            driver=DRIVER,
            subnets=[str(p.pool) for p in pools],
            gateways=[str(p.gateway) for p in pools if p.gateway is not None],
            aux_addresses=[f"{k}={v}" for p in pools for k, v in p.aux_addresses.items()],
            ipv6=request.enable_ipv6,
            internal=request.internal,
            options=options,
            labels={ORIGIN_LABEL: "docker"},
            id=request.network_id,
            claim_pools=True,
        )
    )
    return {}


def delete_network(controller: Controller, request: wire.NetworkRef) -> wire.Document:
    """Idempotent; endpoints Docker did not delete go with the network (and their adopted
    sandboxes, when it was their last endpoint)."""
    if controller.store.find_network(request.network_id) is not None:
        for endpoint in controller.store.endpoints(network_id=request.network_id):
            controller.delete_endpoint(endpoint.id)
        controller.remove_network(request.network_id, force=True)
    return {}


def allocate_network(controller: Controller, request: wire.Document) -> wire.Document:
    return {"Options": {}}  # swarm only: nothing to allocate for a local driver


def nothing(controller: Controller, request: wire.Document) -> wire.Document:
    """FreeNetwork, DiscoverNew, DiscoverDelete: nothing to do for a local driver."""
    return {}


def create_endpoint(controller: Controller, request: wire.CreateEndpoint) -> Answer:
    """Record the endpoint with Docker's addresses; answer the MAC (and addresses) netstack
    chose where Docker sent none (Docker refuses changes to what it sent). After the reply,
    the veth pair is made while Docker gets the container's sandbox ready for the Join."""
    endpoint = controller.store.endpoint_by_id(request.endpoint_id)
    if endpoint is None:
        endpoint = controller.create_endpoint(
            request.network_id,
            request.endpoint_id,
            unjoined_sandbox(request.endpoint_id),
            ConnectRequest(
                ip=None if request.address is None else str(request.address.ip),
                ip6=None if request.address_ipv6 is None else str(request.address_ipv6.ip),
                mac=request.mac,
            ),
            claim=True,
        )
    interface: wire.Document = {}
    if request.mac is None:
        interface["MacAddress"] = endpoint.mac
    if request.address is None and endpoint.ipv4 is not None:
        interface["Address"] = str(endpoint.ipv4)
    if request.address_ipv6 is None and endpoint.ipv6 is not None:
        interface["AddressIPv6"] = str(endpoint.ipv6)
    return Answer({"Interface": interface}, after=_preparer(request.endpoint_id))


def _preparer(endpoint_id: str) -> Later:
    def prepare(controller: Controller) -> None:
        with ENDPOINT_LOCKS.hold(endpoint_id):
            peer = controller.prepare_join(endpoint_id, HOST_PEER)
            if peer is not None:
                ENDPOINT_LOCKS.prepared[endpoint_id] = peer

    return prepare


def delete_endpoint(controller: Controller, request: wire.EndpointRef) -> wire.Document:
    with ENDPOINT_LOCKS.hold(request.endpoint_id):
        controller.delete_endpoint(request.endpoint_id)
    ENDPOINT_LOCKS.forget(request.endpoint_id)
    return {}


def endpoint_oper_info(controller: Controller, request: wire.EndpointRef) -> wire.Document:
    endpoint = controller.store.endpoint_by_id(request.endpoint_id)
    if endpoint is None:
        return {"Value": {}}
    container_ip = "" if endpoint.ipv4 is None else str(endpoint.ipv4.ip)
    return {
        "Value": {
            wire.MAC_ADDRESS: endpoint.mac,
            wire.PORT_MAP: [wire.port_binding_document(b, container_ip) for b in endpoint.ports],
        }
    }


def join(controller: Controller, request: wire.Join) -> wire.Document:
    with ENDPOINT_LOCKS.hold(request.endpoint_id):  # waits for a veth being made ahead
        # a retried Join checks again
        prepared = ENDPOINT_LOCKS.prepared.pop(request.endpoint_id, None)
        endpoint = controller.join_endpoint(
            request.endpoint_id,
            sandbox_name(request.sandbox_key),
            request.sandbox_key,
            HOST_PEER if prepared is None else JoinOptions(peer_in_host=True, prepared=prepared),
        )
    network = controller.network(endpoint.network_id)
    reply: wire.Document = {
        "InterfaceName": {"SrcName": endpoint.interface, "DstPrefix": "eth"},
        "StaticRoutes": [],
        "DisableGatewayService": True,
    }
    if not network.internal:
        for pool in network.pools:
            if pool.gateway is None:
                continue
            if pool.version == 4 and endpoint.ipv4 is not None:
                reply["Gateway"] = str(pool.gateway)
            if pool.version == 6 and endpoint.ipv6 is not None:
                reply["GatewayIPv6"] = str(pool.gateway)
    return reply


def leave(controller: Controller, request: wire.EndpointRef) -> wire.Document:
    """Idempotent: an endpoint netstack does not know has left already."""
    if controller.store.endpoint_by_id(request.endpoint_id) is not None:
        controller.leave_endpoint(request.endpoint_id, unjoined_sandbox(request.endpoint_id))
    return {}


def program_external_connectivity(
    controller: Controller, request: wire.ProgramExternalConnectivity
) -> wire.Document:
    specs = [mapping.spec() for mapping in request.port_mappings]
    controller.publish(request.endpoint_id, specs)
    return {}


def revoke_external_connectivity(
    controller: Controller, request: wire.EndpointRef
) -> wire.Document:
    controller.unpublish(request.endpoint_id)
    return {}
