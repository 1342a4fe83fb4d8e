"""netctl command handlers: parse arguments into requests, call the controller, render."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netstack.cli.render import (
    network_document,
    port_lines,
    ports_document,
    sandbox_document,
    table,
)
from netstack.controller import ConnectRequest, Controller, NetworkRequest, parse_key_values
from netstack.daemon.client import notify_changed
from netstack.drivers.bridge import BridgeDriver
from netstack.errors import InvalidArgument, NetstackError
from netstack.kernel import netns
from netstack.network_options import DNS_SERVERS
from netstack.store import Store


def build_controller() -> Controller:
    """The object graph, built in one place."""
    return Controller(Store(), {"bridge": BridgeDriver()}, on_change=notify_changed)


def _emit(args: argparse.Namespace, document: Any, text: str) -> None:
    if getattr(args, "format", "table") == "json":
        print(json.dumps(document, indent=2))
    elif text:
        print(text)


def _network_options(args: argparse.Namespace) -> dict[str, str]:
    """--opt pairs, with --dns servers joined into the dns.servers option."""
    options = parse_key_values(args.opt, "--opt")
    if args.dns:
        if DNS_SERVERS in options:
            raise InvalidArgument(f"give DNS servers with --dns or --opt {DNS_SERVERS}, not both")
        options[DNS_SERVERS] = ",".join(args.dns)
    return options


def network_create(args: argparse.Namespace) -> int:
    request = NetworkRequest(
        name=args.name,
        driver=args.driver,
        subnets=args.subnet,
        gateways=args.gateway,
        ip_ranges=args.ip_range,
        aux_addresses=args.aux_address,
        ipv6=args.ipv6,
        internal=args.internal,
        options=_network_options(args),
        labels=parse_key_values(args.label, "--label"),
    )
    controller = build_controller()
    network = controller.create_network(request)
    _emit(args, network_document(network, []), network.id)
    return 0


def network_ls(args: argparse.Namespace) -> int:
    controller = build_controller()
    networks = controller.store.networks()
    docs = [network_document(n, controller.store.endpoints(network_id=n.id)) for n in networks]
    rows = [
        [
            d["Id"][:12],
            d["Name"],
            d["Driver"],
            ", ".join(c["Subnet"] for c in d["IPAM"]["Config"]),
            str(len(d["Endpoints"])),
            "internal" if d["Internal"] else "",
        ]
        for d in docs
    ]
    _emit(args, docs, table(["NETWORK ID", "NAME", "DRIVER", "SUBNETS", "ENDPOINTS", ""], rows))
    return 0


def network_inspect(args: argparse.Namespace) -> int:
    controller = build_controller()
    docs = []
    for name in args.names:
        network = controller.network(name)
        docs.append(network_document(network, controller.store.endpoints(network_id=network.id)))
    print(json.dumps(docs, indent=2))
    return 0


def _remove_each(names: list[str], remove: Callable[[str], object]) -> int:
    """Remove every named object, as `docker ... rm a b` does: report each failure, go on."""
    failed = 0
    for name in names:
        try:
            remove(name)
        except NetstackError as exc:
            print(f"netctl: error: {exc}", file=sys.stderr)
            failed += 1
        else:
            print(name)
    return 1 if failed else 0


def network_rm(args: argparse.Namespace) -> int:
    controller = build_controller()
    return _remove_each(args.names, lambda name: controller.remove_network(name, args.force))


def network_connect(args: argparse.Namespace) -> int:
    controller = build_controller()
    endpoint = controller.connect(
        args.network,
        args.sandbox,
        ConnectRequest(
            ip=args.ip, ip6=args.ip6, aliases=args.alias, mac=args.mac, ports=args.publish
        ),
    )
    network = controller.network(args.network)
    document = sandbox_document(controller.sandbox(args.sandbox), [(endpoint, network.name)])
    _emit(args, document["Endpoints"][0], "")
    return 0


def network_disconnect(args: argparse.Namespace) -> int:
    build_controller().disconnect(args.network, args.sandbox)
    return 0


def network_prune(args: argparse.Namespace) -> int:
    removed = build_controller().prune()
    _emit(args, removed, "\n".join(removed))
    return 0


def _sandbox_doc(controller: Controller, name: str) -> dict[str, Any]:
    sandbox = controller.sandbox(name)
    names = {n.id: n.name for n in controller.store.networks()}
    endpoints = controller.store.endpoints(sandbox=sandbox.name)
    return sandbox_document(sandbox, [(e, names.get(e.network_id, "?")) for e in endpoints])


def sandbox_create(args: argparse.Namespace) -> int:
    sandbox = build_controller().create_sandbox(args.name)
    print(sandbox.name)
    return 0


def sandbox_ls(args: argparse.Namespace) -> int:
    controller = build_controller()
    docs = [_sandbox_doc(controller, s.name) for s in controller.store.sandboxes()]
    rows = [
        [
            d["Name"],
            ", ".join(f"{e['Network']}:{e['Interface']}" for e in d["Endpoints"]),
            ", ".join(a for e in d["Endpoints"] for a in (e["IPv4Address"], e["IPv6Address"]) if a),
        ]
        for d in docs
    ]
    _emit(args, docs, table(["NAME", "NETWORKS", "ADDRESSES"], rows))
    return 0


def sandbox_inspect(args: argparse.Namespace) -> int:
    controller = build_controller()
    print(json.dumps([_sandbox_doc(controller, name) for name in args.names], indent=2))
    return 0


def cni_install(args: argparse.Namespace) -> int:
    from netstack.cni.install import install

    conf_dir = Path(args.conf_dir) if args.conf_dir else None
    for path in install(
        Path(args.bin_dir), conf_dir, list(args.network), compile=not args.no_compile
    ):
        print(path)
    return 0


def sandbox_rm(args: argparse.Namespace) -> int:
    controller = build_controller()
    return _remove_each(args.names, controller.remove_sandbox)


def sandbox_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise InvalidArgument("no command given; usage: netctl sandbox exec NAME -- CMD [ARG...]")
    controller = build_controller()
    sandbox = controller.sandbox(args.name)
    netns.exec_in(sandbox.name, command)
    return 0  # not reached: exec_in replaces the process


def port(args: argparse.Namespace) -> int:
    """Every port the sandbox publishes, over all its networks."""
    controller = build_controller()
    sandbox = controller.sandbox(args.sandbox)
    bindings = [p for e in controller.store.endpoints(sandbox=sandbox.name) for p in e.ports]
    _emit(args, ports_document(bindings), "\n".join(port_lines(bindings)))
    return 0


def status(args: argparse.Namespace) -> int:
    """Whether netstackd runs for this run directory (exit 3 when it does not)."""
    from netstack.daemon.client import DaemonUnavailable, call

    try:
        info = call("status")
    except DaemonUnavailable as exc:
        _emit(args, {"running": False, "reason": str(exc)}, f"netstackd: not running; {exc}")
        return 3
    document = {"running": True, **info}
    _emit(
        args,
        document,
        f"netstackd: running (pid {info['pid']}, version {info['version']}, "
        f"up {info['uptime']:.0f}s, state {info['state_dir']}, run {info['run_dir']})",
    )
    return 0
