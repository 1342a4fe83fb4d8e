"""The CNI commands, done with netstack's controller (in the plugin process or in netstackd).

`run(env, stdin)` is the whole plugin: one invocation in, (exit status, stdout) out, never
raising. The plugin executable calls it in-process, or netstackd calls it for the
executable (the fast path); both give identical results.

How CNI maps onto netstack:

* the configuration's ``name`` is a netstack network of that name, created by the first
  ADD from the configuration (``ipam`` subnets and gateways, ``bridge``, ``mtu``,
  ``ipMasq``), so ``netctl network inspect NAME`` shows the CNI attachments;
* one attachment (CNI_CONTAINERID, CNI_IFNAME) is one netstack sandbox named
  ``cni/<containerID>/<ifname>`` whose namespace is CNI_NETNS (adopted, never deleted by
  netstack) with one endpoint, named CNI_IFNAME inside it;
* routes are exactly the IPAM routes, plus a default route per family when
  ``isDefaultGateway`` is true (the reference bridge plugin's rule);
* ``runtimeConfig``: ``portMappings`` become netstack published ports (nftables DNAT),
  ``ips``/``mac`` static addresses, ``dns`` the result's DNS;
* an ``ipam.type`` other than ``netstack`` is executed from CNI_PATH (e.g. host-local), its
  addresses then given to netstack as static addresses.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from netstack.cni.spec import (
    CHECK_MISMATCH,
    INVALID_CONFIG,
    IO_FAILURE,
    LATEST,
    NOT_AVAILABLE,
    SUPPORTED_VERSIONS,
    UNKNOWN_CONTAINER,
    CniError,
    Config,
    Environment,
    Interface,
    IpConfig,
    Result,
    Route,
    check_env_args,
    parse_config,
    version_document,
)
from netstack.controller import ConnectRequest, Controller, NetworkRequest
from netstack.drivers.bridge import BridgeDriver
from netstack.drivers.bridge.driver import VETH_HOST_PREFIX, bridge_mac, host_veth_name
from netstack.errors import NetstackError
from netstack.kernel import links
from netstack.model import Endpoint, JoinOptions, Network
from netstack.model import Route as NetstackRoute
from netstack.store import Store, state_dir

log = logging.getLogger(__name__)

SANDBOX_PREFIX = "cni/"
LABEL = "netstack.cni"
IPAM_TIMEOUT = 60.0

ControllerFactory = Callable[[], Controller]


def default_controller() -> Controller:
    """The controller the plugin process uses: netctl's, notifying a running netstackd."""
    from netstack.daemon.client import notify_changed

    return Controller(Store(), {"bridge": BridgeDriver()}, on_change=notify_changed)


def attachment_name(container_id: str, ifname: str) -> str:
    """The sandbox name of one CNI attachment."""
    return f"{SANDBOX_PREFIX}{container_id}/{ifname}"


def parse_attachment_name(name: str) -> tuple[str, str] | None:
    """(containerID, ifname) of a CNI attachment's sandbox name; None for other sandboxes."""
    if not name.startswith(SANDBOX_PREFIX):
        return None
    container_id, sep, ifname = name[len(SANDBOX_PREFIX) :].rpartition("/")
    return (container_id, ifname) if sep and container_id and ifname else None


def run(
    env: Mapping[str, str], stdin: bytes | str, controller: ControllerFactory | None = None
) -> tuple[int, str]:
    """One plugin invocation: (exit status, stdout text). Never raises."""
    version = LATEST
    try:
        cni_env = Environment.parse(env)
        if cni_env.command == "VERSION":
            return 0, json.dumps(version_document(_requested_version(stdin)))
        config = parse_config(stdin, cni_env.command)
        version = config.version
        make = controller or default_controller
        handlers = {"ADD": add, "DEL": delete, "CHECK": check, "STATUS": status, "GC": gc}
        document = handlers[cni_env.command](cni_env, config, make)
        return 0, "" if document is None else json.dumps(document)
    except CniError as error:
        return 1, json.dumps(error.document(version))
    except NetstackError as error:
        return 1, json.dumps(CniError(error.cni_code, str(error)).document(version))
    except Exception as error:  # a bug: still the spec's error JSON, never a traceback
        log.exception("netstack CNI plugin failed")
        return 1, json.dumps(CniError(IO_FAILURE, f"internal error: {error!r}").document(version))


def _requested_version(stdin: bytes | str) -> str:
    try:
        raw = json.loads(stdin)
        version = raw.get("cniVersion") if isinstance(raw, dict) else None
    except (ValueError, UnicodeDecodeError):
        version = None
    return version if version in SUPPORTED_VERSIONS else LATEST


# --------------------------------------------------------------------------- ADD


def add(env: Environment, config: Config, make: ControllerFactory) -> dict[str, Any]:
    check_env_args(env.args)
    if not os.path.exists(env.netns):
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {env.netns} does not exist")
    controller = make()
    delegated = _delegate(env, config, "ADD") if config.ipam.delegated else None
    try:
        network, created = _ensure_network(controller, config, delegated)
        try:
            endpoint = _attach(controller, env, config, network, delegated)
        except BaseException:
            if created:
                with contextlib.suppress(NetstackError):
                    controller.remove_network(network.id)
            raise
    except BaseException:
        if delegated is not None:
            with contextlib.suppress(CniError):
                _delegate(env, config, "DEL")
        raise
    return _merge_prev(config, _result(config, env, network, endpoint, delegated)).document(
        config.version
    )


def _attach(
    controller: Controller,
    env: Environment,
    config: Config,
    network: Network,
    delegated: Result | None,
) -> Endpoint:
    name = attachment_name(env.container_id, env.ifname)
    if controller.store.find_endpoint(network.id, name) is not None:
        raise CniError(
            INVALID_CONFIG,
            f"container {env.container_id} already has {env.ifname} on network "
            f"{config.name}; DEL it first",
        )
    fresh = controller.store.find_sandbox(name) is None
    controller.adopt_sandbox(name, env.netns)
    if delegated is not None:
        addresses = [str(ipaddress.ip_interface(ip.address).ip) for ip in delegated.ips]
    else:
        addresses = config.requested_ips(env.args)
    ip4 = next((a for a in addresses if ipaddress.ip_address(a).version == 4), None)
    ip6 = next((a for a in addresses if ipaddress.ip_address(a).version == 6), None)
    request = ConnectRequest(
        ip=ip4,
        ip6=ip6,
        mac=config.requested_mac(env.args),
        ports=[mapping.spec() for mapping in config.port_mappings()],
        join=JoinOptions(ifname=env.ifname, routes=tuple(_routes(config, network, delegated))),
    )
    try:
        return controller.connect(network.id, name, request)
    except BaseException:
        if fresh:
            controller.forget_sandbox(name)
        raise


def _routes(config: Config, network: Network, delegated: Result | None) -> list[NetstackRoute]:
    routes = list(delegated.routes if delegated is not None else config.ipam.routes)
    if config.is_default_gateway:
        for pool in network.pools:
            default = ipaddress.ip_network("0.0.0.0/0" if pool.version == 4 else "::/0")
            if pool.gateway is not None and not any(r.dst == default for r in routes):
                routes.append(Route(default, pool.gateway))
    return [NetstackRoute(r.dst, r.gw) for r in routes]


@contextlib.contextmanager
def _network_lock() -> Iterator[None]:
    """Serialise find-or-create of CNI networks: 32 concurrent first ADDs make one network."""
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "cni-networks.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _ensure_network(
    controller: Controller, config: Config, delegated: Result | None
) -> tuple[Network, bool]:
    """The netstack network of this configuration, created on first use."""
    if delegated is not None:
        subnets = [str(ipaddress.ip_interface(ip.address).network) for ip in delegated.ips]
        gateways = [ip.gateway for ip in delegated.ips if ip.gateway]
    else:
        subnets, gateways = list(config.ipam.subnets), list(config.ipam.gateways)
    with _network_lock():
        existing = controller.store.network_named(config.name)
        if existing is not None:
            _check_same(existing, config, subnets)
            return existing, False
        options = {
            "masquerade": str(config.ip_masq).lower(),
            "icc": str(config.icc).lower(),
            # as the reference plugin: a default gateway must be the bridge's address
            "gateway": str(config.is_gateway or config.is_default_gateway).lower(),
            "hairpin": str(config.hairpin).lower(),
        }
        if config.bridge:
            options["bridge.name"] = config.bridge
        if config.mtu is not None:
            options["mtu"] = str(config.mtu)
        request = NetworkRequest(
            name=config.name,
            subnets=subnets,
            gateways=gateways,
            internal=config.internal,
            options=options,
            labels={LABEL: "true"},
        )
        return controller.create_network(request), True


def _check_same(network: Network, config: Config, subnets: list[str]) -> None:
    have = {str(pool.subnet) for pool in network.pools}
    missing = [s for s in subnets if s not in have]
    if missing:
        raise CniError(
            INVALID_CONFIG,
            f"network {config.name!r} exists with subnet(s) {', '.join(sorted(have))}, but "
            f"this configuration asks for {', '.join(missing)}",
            "use one subnet per network name, or remove the network (netctl network rm)",
        )
    bridge = network.options.get("bridge.name")
    if config.bridge and bridge != config.bridge:
        raise CniError(
            INVALID_CONFIG,
            f"network {config.name!r} exists on bridge {bridge}, not {config.bridge}",
        )


def _result(
    config: Config,
    env: Environment,
    network: Network,
    endpoint: Endpoint,
    delegated: Result | None,
) -> Result:
    bridge = BridgeDriver.options_of(network).bridge_name
    result = Result(
        interfaces=[
            Interface(bridge, bridge_mac(network.id)),
            Interface(host_veth_name(endpoint.id)),
            Interface(env.ifname, endpoint.mac, env.netns),
        ]
    )
    for interface in endpoint.interfaces():
        pool = network.pool(interface.version)
        gateway = None if pool is None or pool.gateway is None else str(pool.gateway)
        result.ips.append(IpConfig(str(interface), gateway, 2))
    for route in _routes(config, network, delegated):
        via = route.gateway or next(
            (p.gateway for p in network.pools if p.version == route.destination.version), None
        )
        result.routes.append(Route(route.destination, via))
    result.dns = _dns(config, delegated)
    return result


def _dns(config: Config, delegated: Result | None) -> dict[str, Any]:
    dns: dict[str, Any] = dict(delegated.dns) if delegated is not None else {}
    dns.update(config.dns)
    runtime = config.runtime.get("dns")
    if isinstance(runtime, dict):
        for ours, theirs in (
            ("nameservers", "servers"),
            ("search", "searches"),
            ("options", "options"),
        ):
            if runtime.get(theirs):
                dns[ours] = list(runtime[theirs])
    return dns


def _merge_prev(config: Config, result: Result) -> Result:
    """As a later plugin in a chain: keep what came before, ours appended after it."""
    prev = config.prev_result
    if not prev:
        return result
    merged = parse_result(prev)
    offset = len(merged.interfaces)
    merged.interfaces += result.interfaces
    merged.ips += [IpConfig(ip.address, ip.gateway, ip.interface + offset) for ip in result.ips]
    merged.routes += result.routes
    merged.dns = {**merged.dns, **result.dns}
    return merged


def parse_result(doc: Mapping[str, Any]) -> Result:
    """A result document (any supported version) as a `Result` (code 7 if malformed)."""
    try:
        result = Result(
            interfaces=[
                Interface(str(i["name"]), str(i.get("mac", "")), str(i.get("sandbox", "")))
                for i in doc.get("interfaces", [])
            ],
            ips=[
                IpConfig(
                    str(ipaddress.ip_interface(ip["address"])),
                    str(ip["gateway"]) if ip.get("gateway") else None,
                    int(ip.get("interface", -1)),
                )
                for ip in doc.get("ips", [])
            ],
            routes=[
                Route(
                    ipaddress.ip_network(r["dst"], strict=False),
                    ipaddress.ip_address(r["gw"]) if r.get("gw") else None,
                )
                for r in doc.get("routes", []) or []
            ],
            dns=dict(doc.get("dns") or {}),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CniError(INVALID_CONFIG, f"malformed CNI result: {error!r}") from None
    return result


# --------------------------------------------------------------------------- DEL


def delete(env: Environment, config: Config, make: ControllerFactory) -> None:
    """Remove the attachment; a missing network, namespace or attachment is success."""
    controller = make()
    name = attachment_name(env.container_id, env.ifname)
    network = controller.store.network_named(config.name)
    if network is not None and controller.store.find_endpoint(network.id, name) is not None:
        controller.disconnect(network.id, name)
    if controller.store.find_sandbox(name) is not None and not controller.store.endpoints(
        sandbox=name
    ):
        controller.forget_sandbox(name)
    if config.ipam.delegated:
        _delegate(env, config, "DEL")


# --------------------------------------------------------------------------- CHECK


def check(env: Environment, config: Config, make: ControllerFactory) -> None:
    """Compare the attachment in the kernel with the store and prevResult; say what differs."""
    if config.prev_result is None:
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult (the result of ADD)")
    controller = make()
    name = attachment_name(env.container_id, env.ifname)
    network = controller.store.network_named(config.name)
    endpoint = None if network is None else controller.store.find_endpoint(network.id, name)
    if network is None or endpoint is None:
        raise CniError(
            UNKNOWN_CONTAINER,
            f"container {env.container_id} has no attachment {env.ifname} on {config.name}",
        )
    if not os.path.exists(env.netns):
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {env.netns} does not exist")
    problems: list[str] = []
    report = links.interface_report(env.netns, env.ifname)
    if not report.exists:
        raise CniError(CHECK_MISMATCH, f"interface {env.ifname} is missing in {env.netns}")
    if not report.up:
        problems.append(f"{env.ifname} is down")
    if report.mac.lower() != endpoint.mac.lower():
        problems.append(f"{env.ifname} has MAC {report.mac}, expected {endpoint.mac}")
    for interface in endpoint.interfaces():
        if interface not in report.addresses:
            problems.append(f"address {interface} is missing on {env.ifname}")
    prev = parse_result(config.prev_result)
    expected = prev.routes if config.ipam.delegated else _routes(config, network, None)
    for route in expected:
        destination = route.dst if isinstance(route, Route) else route.destination
        via = (route.gw if isinstance(route, Route) else route.gateway) or next(
            (p.gateway for p in network.pools if p.version == destination.version), None
        )
        if (destination, via) not in report.routes:
            problems.append(f"route {destination} via {via} is missing")
    have = {str(i) for i in endpoint.interfaces()}
    for ip in prev.ips:
        if ip.address not in have:
            problems.append(f"prevResult address {ip.address} is not this attachment's")
    if problems:
        raise CniError(
            CHECK_MISMATCH,
            f"attachment {env.ifname} of {env.container_id} differs: {'; '.join(problems)}",
        )
    if config.ipam.delegated:
        _delegate(env, config, "CHECK")


# --------------------------------------------------------------------------- STATUS, GC


def status(env: Environment, config: Config, make: ControllerFactory) -> None:
    """Ready when the state database opens and nftables answers (code 50 otherwise)."""
    try:
        controller = make()
        controller.store.networks()
        BridgeDriver().nft.run("list tables")
    except (NetstackError, OSError) as error:
        raise CniError(NOT_AVAILABLE, f"netstack is not ready: {error}") from None


def gc(env: Environment, config: Config, make: ControllerFactory) -> None:
    """Remove every attachment of this network not in cni.dev/valid-attachments."""
    valid = set(config.valid_attachments or ())
    controller = make()
    network = controller.store.network_named(config.name)
    errors: list[str] = []
    if network is not None:
        for endpoint in controller.store.endpoints(network_id=network.id):
            key = parse_attachment_name(endpoint.sandbox)
            if key is None or key in valid:
                continue
            try:
                controller.disconnect(network.id, endpoint.sandbox)
            except NetstackError as error:
                errors.append(str(error))
        errors += _remove_orphan_veths(controller, network)
    for sandbox in controller.store.sandboxes():
        key = parse_attachment_name(sandbox.name)
        if (
            key is not None
            and key not in valid
            and not controller.store.endpoints(sandbox=sandbox.name)
        ):
            controller.forget_sandbox(sandbox.name)
    if config.ipam.delegated:
        _delegate(env, config, "GC")
    if errors:
        raise CniError(IO_FAILURE, "GC left some attachments", "; ".join(errors))


def _remove_orphan_veths(controller: Controller, network: Network) -> list[str]:
    """Delete netstack veths on the network's bridge that no endpoint owns (left by a
    process killed between making a veth and recording it); their errors."""
    ports = links.bridge_ports(BridgeDriver.options_of(network).bridge_name)
    # Rows are read after the ports: an endpoint's row is committed before its veth is
    # made, so a connect racing with this GC is never taken for an orphan.
    owned = {host_veth_name(e.id) for e in controller.store.endpoints(network_id=network.id)}
    errors = []
    for name in ports:
        if name.startswith(VETH_HOST_PREFIX) and name not in owned:
            try:
                links.delete_link(name)
            except NetstackError as error:
                errors.append(str(error))
    return errors


# --------------------------------------------------------------------------- delegated IPAM


def _delegate(env: Environment, config: Config, command: str) -> Result | None:
    """Run the configured IPAM plugin from CNI_PATH; its result for ADD."""
    plugin = _find_plugin(config.ipam.type, env.path)
    child_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    child_env.update(env.variables)
    child_env["CNI_COMMAND"] = command
    try:
        proc = subprocess.run(
            [str(plugin)],
            input=json.dumps(config.raw).encode(),
            env=child_env,
            capture_output=True,
            timeout=IPAM_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CniError(
            IO_FAILURE, f"ipam plugin {config.ipam.type} failed to run: {error}"
        ) from None
    if proc.returncode != 0:
        try:
            doc = json.loads(proc.stdout)
            code, msg = int(doc.get("code", IO_FAILURE)), str(doc.get("msg", ""))
            details = str(doc.get("details", ""))
        except (ValueError, AttributeError, TypeError):
            code, msg, details = IO_FAILURE, proc.stdout.decode(errors="replace")[:500], ""
        raise CniError(code, f"ipam plugin {config.ipam.type}: {msg}", details)
    if command != "ADD":
        return None
    try:
        return parse_result(json.loads(proc.stdout))
    except ValueError:
        raise CniError(
            IO_FAILURE, f"ipam plugin {config.ipam.type} printed no JSON result"
        ) from None


def _find_plugin(name: str, path: tuple[str, ...]) -> Path:
    if "/" in name or not name:
        raise CniError(INVALID_CONFIG, f"ipam type {name!r} is not a plugin name")
    for directory in path:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(
        INVALID_CONFIG,
        f"ipam plugin {name!r} not found in CNI_PATH ({':'.join(path) or 'empty'})",
    )
