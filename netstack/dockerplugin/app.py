"""Routes one plugin call to its handler and renders the answer; never raises.

`handle(path, body, make_controller)` is the whole plugin API, sans I/O: the HTTP server
(`server.py`) calls it in a worker thread with that thread's controller factory.
Errors are answered with a non-2xx status and the interface's error field: ``{"Err": ...}``
from the NetworkDriver (and Plugin.Activate), ``{"Error": ...}`` from the IpamDriver, which
also carries ``Err`` because moby's plugin client reads only ``Err`` from a non-2xx answer
(the IPAM protocol's ``Error`` is what its docs name). 404 is kept for unknown methods:
moby reads a 404 as "the plugin does not implement this" and ignores it for some calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netstack.controller import Controller
from netstack.dockerplugin import ipam, network, wire
from netstack.errors import NetstackError

log = logging.getLogger(__name__)

ControllerFactory = Callable[[], Controller]
Handler = Callable[[Controller, Any], "wire.Document | network.Answer"]


@dataclass(frozen=True)
class Method:
    interface: str  # "Plugin", "NetworkDriver" or "IpamDriver"
    parse: Callable[[wire.Document], Any]
    handler: Handler | None  # None: answered without the controller
    mutates: bool = False  # netstackd re-reads the store after a successful call
    quick: bool = False  # no kernel work, no waiting: answered on the server's event loop


@dataclass(frozen=True)
class Reply:
    status: int
    document: wire.Document
    changed: bool = False  # the store changed: netstackd's DNS and relay should follow
    after: network.Later | None = None  # work to run after the reply is sent (`run_after`)

    @property
    def body(self) -> bytes:
        return wire.encode(self.document)


def _same(doc: wire.Document) -> wire.Document:
    return doc


ACTIVATE = {"Implements": ["NetworkDriver", "IpamDriver"]}

METHODS: dict[str, Method] = {
    "Plugin.Activate": Method("Plugin", _same, None, quick=True),
    # NetworkDriver
    "NetworkDriver.GetCapabilities": Method(
        "NetworkDriver", _same, network.get_capabilities, quick=True
    ),
    "NetworkDriver.CreateNetwork": Method(
        "NetworkDriver", wire.CreateNetwork.parse, network.create_network, mutates=True
    ),
    "NetworkDriver.DeleteNetwork": Method(
        "NetworkDriver", wire.NetworkRef.parse, network.delete_network, mutates=True
    ),
    "NetworkDriver.AllocateNetwork": Method("NetworkDriver", _same, network.allocate_network),
    "NetworkDriver.FreeNetwork": Method("NetworkDriver", _same, network.nothing),
    "NetworkDriver.CreateEndpoint": Method(
        "NetworkDriver",
        wire.CreateEndpoint.parse,
        network.create_endpoint,
        mutates=True,
        quick=True,  # rows only: the veth is made after the reply, in a worker thread
    ),
    "NetworkDriver.EndpointOperInfo": Method(
        "NetworkDriver", wire.EndpointRef.parse, network.endpoint_oper_info, quick=True
    ),
    "NetworkDriver.DeleteEndpoint": Method(
        "NetworkDriver", wire.EndpointRef.parse, network.delete_endpoint, mutates=True
    ),
    "NetworkDriver.Join": Method("NetworkDriver", wire.Join.parse, network.join, mutates=True),
    "NetworkDriver.Leave": Method(
        "NetworkDriver", wire.EndpointRef.parse, network.leave, mutates=True
    ),
    "NetworkDriver.DiscoverNew": Method("NetworkDriver", _same, network.nothing),
    "NetworkDriver.DiscoverDelete": Method("NetworkDriver", _same, network.nothing),
    "NetworkDriver.ProgramExternalConnectivity": Method(
        "NetworkDriver",
        wire.ProgramExternalConnectivity.parse,
        network.program_external_connectivity,
        mutates=True,
    ),
    "NetworkDriver.RevokeExternalConnectivity": Method(
        "NetworkDriver",
        wire.EndpointRef.parse,
        network.revoke_external_connectivity,
        mutates=True,
    ),
    # IpamDriver
    "IpamDriver.GetCapabilities": Method("IpamDriver", _same, ipam.get_capabilities, quick=True),
    "IpamDriver.GetDefaultAddressSpaces": Method(
        "IpamDriver", _same, ipam.get_default_address_spaces, quick=True
    ),
    "IpamDriver.RequestPool": Method(
        "IpamDriver", wire.RequestPool.parse, ipam.request_pool, mutates=True
    ),
    "IpamDriver.ReleasePool": Method(
        "IpamDriver", wire.ReleasePool.parse, ipam.release_pool, mutates=True
    ),
    "IpamDriver.RequestAddress": Method(
        "IpamDriver", wire.RequestAddress.parse, ipam.request_address, mutates=True, quick=True
    ),
    "IpamDriver.ReleaseAddress": Method(
        "IpamDriver", wire.ReleaseAddress.parse, ipam.release_address, mutates=True
    ),
}


def error_document(interface: str, message: str) -> wire.Document:
    if interface == "IpamDriver":
        return {"Error": message, "Err": message}
    return {"Err": message}


def error_status(error: NetstackError) -> int:
    """The error's HTTP status, except that 404 is kept for unknown methods (see above)."""
    return 400 if error.http_status == 404 else error.http_status


def method_of(path: str) -> str:
    return path.split("?", 1)[0].lstrip("/")


def run_after(work: network.Later, make_controller: ControllerFactory) -> None:
    """Run a reply's follow-up work (in a worker thread); failures are logged, never raised:
    the call it follows has succeeded, and the next call redoes what is missing."""
    try:
        work(make_controller())
    except Exception:
        log.exception("work after a plugin call failed; the next call will redo it")


def quick(path: str, body: bytes = b"") -> bool:
    """Whether the call is answered on the server's event loop rather than in a worker
    thread: a few SQL statements at most. Docker's connect makes five calls in a row, each
    waiting for the last; a worker thread's handoff there and back cost ~0.35 ms a call.
    A Join is quick when its veth pair was made ahead (`network.ENDPOINT_LOCKS.prepared`)."""
    name = method_of(path)
    method = METHODS.get(name)
    if method is None or method.quick:
        return True
    if name == "NetworkDriver.Join":
        try:
            endpoint_id = wire.decode(body).get("EndpointID")
        except NetstackError:
            return True  # answered with an error at once
        return isinstance(endpoint_id, str) and network.ENDPOINT_LOCKS.is_prepared(endpoint_id)
    return False


def handle(path: str, body: bytes, make_controller: ControllerFactory) -> Reply:
    """One call: (path, body) -> reply. Never raises."""
    name = method_of(path)
    method = METHODS.get(name)
    if method is None:
        interface = name.partition(".")[0]
        return Reply(
            404,
            error_document(interface, f"unknown plugin method {name!r}; netstack implements "
                           "Plugin.Activate, NetworkDriver.* and IpamDriver.*"),
        )  # fmt: skip
    log.debug("%s %s", name, body[:4096].decode("utf-8", "replace"))
    try:
        request = method.parse(wire.decode(body))
        if method.handler is None:
            return Reply(200, ACTIVATE)
        started = time.perf_counter()
        result = method.handler(make_controller(), request)
        log.debug("%s ok in %.1f ms", name, (time.perf_counter() - started) * 1000)
        if isinstance(result, network.Answer):
            return Reply(200, result.document, method.mutates, result.after)
        return Reply(200, result, changed=method.mutates)
    except NetstackError as error:
        log.info("%s failed: %s", name, error)
        # a failed call may have changed the store half-way and undone it: re-read anyway
        return Reply(
            error_status(error), error_document(method.interface, str(error)), method.mutates
        )
    except Exception as error:  # a bug: answer it, never take the daemon down
        log.exception("%s failed", name)
        return Reply(500, error_document(method.interface, f"internal error: {error!r}"))
