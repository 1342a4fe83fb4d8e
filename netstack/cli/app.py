"""netctl: Docker-like verbs for networks and sandboxes.

Exit status: 0 success, 1 a netstack error (one line on stderr), 2 a usage error;
`netctl status` exits 3 when netstackd is not running.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from netstack.errors import NetstackError

log = logging.getLogger("netctl")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"netctl: error: {message} (see `{self.prog} --help`)\n")


def _add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=("table", "json"), default="table", help="output format"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="netctl", description="netstack container networking")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    top = parser.add_subparsers(dest="group", required=True, parser_class=_Parser)

    network = top.add_parser("network", help="manage networks")
    verbs = network.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    create = verbs.add_parser("create", help="create a network")
    create.add_argument("name")
    create.add_argument("-d", "--driver", default="bridge")
    create.add_argument("--subnet", action="append", default=[], metavar="CIDR")
    create.add_argument("--gateway", action="append", default=[], metavar="IP")
    create.add_argument("--ip-range", action="append", default=[], metavar="CIDR")
    create.add_argument("--aux-address", action="append", default=[], metavar="NAME=IP")
    create.add_argument("--ipv6", action="store_true", help="enable IPv6 (dual stack)")
    create.add_argument("--internal", action="store_true", help="no external connectivity")
    create.add_argument("-o", "--opt", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument(
        "--dns", action="append", default=[], metavar="IP", help="upstream DNS server"
    )
    _add_format(create)
    _add_format(verbs.add_parser("ls", help="list networks"))
    inspect = verbs.add_parser("inspect", help="show networks in detail (JSON)")
    inspect.add_argument("names", nargs="+", metavar="NAME")
    _add_format(inspect)
    rm = verbs.add_parser("rm", help="remove networks")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("-f", "--force", action="store_true", help="disconnect endpoints first")
    connect = verbs.add_parser("connect", help="connect a sandbox to a network")
    connect.add_argument("network")
    connect.add_argument("sandbox")
    connect.add_argument("--ip", metavar="IPV4")
    connect.add_argument("--ip6", metavar="IPV6")
    connect.add_argument("--alias", action="append", default=[], metavar="NAME")
    connect.add_argument("--mac", metavar="MAC")
    connect.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[IP:][HOST_PORT:]PORT[/PROTO]",
        help="publish a port on the host (repeatable)",
    )
    _add_format(connect)
    disconnect = verbs.add_parser("disconnect", help="disconnect a sandbox from a network")
    disconnect.add_argument("network")
    disconnect.add_argument("sandbox")
    _add_format(verbs.add_parser("prune", help="remove networks without endpoints"))

    _add_format(top.add_parser("status", help="say whether netstackd runs"))

    port = top.add_parser("port", help="list a sandbox's published ports")
    port.add_argument("sandbox")
    _add_format(port)

    cni = top.add_parser("cni", help="netstack as a CNI plugin")
    cverbs = cni.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    cinstall = cverbs.add_parser("install", help="install the plugin executable")
    cinstall.add_argument("--bin-dir", default="/opt/cni/bin", help="CNI plugin directory")
    cinstall.add_argument("--conf-dir", help="write example .conflist files here")
    cinstall.add_argument(
        "--network", action="append", default=[], metavar="NAME", help="a conflist for NAME"
    )
    cinstall.add_argument(
        "--no-compile",
        action="store_true",
        help="write the Python plugin even when a C compiler could build the fast one",
    )

    sandbox = top.add_parser("sandbox", help="manage sandboxes (network namespaces)")
    sverbs = sandbox.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    screate = sverbs.add_parser("create", help="create a sandbox")
    screate.add_argument("name")
    _add_format(sverbs.add_parser("ls", help="list sandboxes"))
    sinspect = sverbs.add_parser("inspect", help="show sandboxes in detail (JSON)")
    sinspect.add_argument("names", nargs="+", metavar="NAME")
    _add_format(sinspect)
    srm = sverbs.add_parser("rm", help="remove sandboxes (disconnects them first)")
    srm.add_argument("names", nargs="+", metavar="NAME")
    sexec = sverbs.add_parser("exec", help="run a command in a sandbox")
    sexec.add_argument("name")
    sexec.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    return parser


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def run(args: argparse.Namespace) -> int:
    """Execute parsed arguments; raises NetstackError on failure."""
    # Imported here so `--help` and usage errors stay fast.
    from netstack.cli import commands

    name = args.group if args.group in ("port", "status") else f"{args.group}_{args.verb}"
    handler = getattr(commands, name)
    result: int = handler(args)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run(args)
    except NetstackError as exc:
        print(f"netctl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
