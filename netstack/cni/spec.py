"""The CNI protocol, pure: environment, network configuration, errors and results.

Follows the CNI specification (containernetworking/cni SPEC.md) for versions 0.3.0 to
1.1.0. Nothing here touches the kernel or the store; `netstack.cni.plugin` does the work.
Standard library only (the plugin's fast path imports this before anything heavy).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from netstack.cni.versions import LATEST as LATEST
from netstack.cni.versions import SUPPORTED_VERSIONS as SUPPORTED_VERSIONS
from netstack.cni.versions import version_document as version_document

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

# Well-known error codes (SPEC.md, "Error codes").
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
# Plugin-specific (100+): CHECK found the attachment different from its result.
CHECK_MISMATCH = 100

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

# Top-level keys of a netstack plugin configuration. Unknown keys are refused (code 2) so
# a typo ("isDefaultGatway") is an error rather than silently ignored.
STANDARD_KEYS = frozenset(
    {
        "cniVersion",
        "name",
        "type",
        "args",
        "ipMasq",
        "ipam",
        "dns",
        "runtimeConfig",
        "capabilities",
        "prevResult",
        "cniVersions",
        "disableCheck",
        "disableGC",
        "cni.dev/valid-attachments",
        "cni.dev/attachments",
    }
)
NETSTACK_KEYS = frozenset(
    {
        "driver",
        "bridge",
        "isGateway",
        "isDefaultGateway",
        "forceAddress",
        "hairpinMode",
        "mtu",
        "internal",
        "icc",
    }
)
IPAM_KEYS = frozenset({"type", "subnet", "gateway", "ranges", "routes"})
RANGE_KEYS = frozenset({"subnet", "gateway"})


class CniError(Exception):
    """A failure reported as the spec's error JSON on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def document(self, version: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return doc


# --------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class Environment:
    """The CNI_* variables of one invocation."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: tuple[str, ...] = ()
    variables: dict[str, str] = field(default_factory=dict)  # every CNI_* as given

    @classmethod
    def parse(cls, env: Mapping[str, str]) -> Environment:
        """Validate the variables the command needs (code 4 when one is missing or bad)."""
        command = env.get("CNI_COMMAND", "")
        if command not in COMMANDS:
            raise CniError(
                INVALID_ENVIRONMENT,
                f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}",
            )
        required = {
            "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
            "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
            "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
        }.get(command, ())
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise CniError(INVALID_ENVIRONMENT, f"{command} needs {', '.join(missing)}")
        container_id = env.get("CNI_CONTAINERID", "")
        if container_id and not _CONTAINER_ID.fullmatch(container_id):
            raise CniError(
                INVALID_ENVIRONMENT,
                f"CNI_CONTAINERID {container_id!r} must start with a letter or digit and "
                "hold only letters, digits, '_', '.', '-'",
            )
        ifname = env.get("CNI_IFNAME", "")
        if ifname and (len(ifname.encode()) > 15 or not re.fullmatch(r"[A-Za-z0-9_.\-]+", ifname)):
            raise CniError(
                INVALID_ENVIRONMENT,
                f"CNI_IFNAME {ifname!r} is not a valid interface name (1-15 letters, digits, "
                "'_', '.', '-')",
            )
        netns = env.get("CNI_NETNS", "")
        if netns and not netns.startswith("/"):
            raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS {netns!r} must be an absolute path")
        return cls(
            command=command,
            container_id=container_id,
            netns=netns,
            ifname=ifname,
            args=parse_cni_args(env.get("CNI_ARGS", "")),
            path=tuple(p for p in env.get("CNI_PATH", "").split(":") if p),
            variables={k: v for k, v in env.items() if k.startswith("CNI_")},
        )


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS ``K=V;K2=V2`` (code 4 for an item without '=')."""
    args: dict[str, str] = {}
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS item {item!r} is not KEY=VALUE")
        args[key] = value
    return args


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gw: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    def document(self) -> dict[str, str]:
        doc = {"dst": str(self.dst)}
        if self.gw is not None:
            doc["gw"] = str(self.gw)
        return doc


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def spec(self) -> str:
        """The mapping as a netctl ``-p`` spec."""
        host = self.host_ip
        if host and ":" in host:
            host = f"[{host}]"
        prefix = f"{host}:" if host else ""
        return f"{prefix}{self.host_port}:{self.container_port}/{self.protocol}"


@dataclass(frozen=True)
class Ipam:
    """The ``ipam`` section: netstack's own (subnets, gateways) or a delegated plugin."""

    type: str = "netstack"
    subnets: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def delegated(self) -> bool:
        return self.type != "netstack"


@dataclass(frozen=True)
class Config:
    """One plugin configuration as a runtime hands it over on stdin."""

    version: str
    name: str
    type: str
    driver: str = "bridge"
    bridge: str = ""
    is_gateway: bool = True
    is_default_gateway: bool = False
    ip_masq: bool = False
    hairpin: bool = True
    mtu: int | None = None
    internal: bool = False
    icc: bool = True
    ipam: Ipam = field(default_factory=Ipam)
    dns: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    prev_result: dict[str, Any] | None = None
    valid_attachments: tuple[tuple[str, str], ...] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def port_mappings(self) -> list[PortMapping]:
        """``runtimeConfig.portMappings`` (code 7 for a malformed entry)."""
        mappings = []
        for item in _list(self.runtime.get("portMappings", []), "runtimeConfig.portMappings"):
            if not isinstance(item, dict):
                raise CniError(INVALID_CONFIG, f"portMappings entry {item!r} is not an object")
            try:
                host_port = int(item["hostPort"])
                container_port = int(item["containerPort"])
            except (KeyError, TypeError, ValueError):
                raise CniError(
                    INVALID_CONFIG,
                    f"portMappings entry {item!r} needs integer hostPort and containerPort",
                ) from None
            protocol = str(item.get("protocol") or "tcp").lower()
            mappings.append(
                PortMapping(host_port, container_port, protocol, str(item.get("hostIP") or ""))
            )
        return mappings

    def requested_ips(self, env_args: Mapping[str, str]) -> list[str]:
        """Static addresses: runtimeConfig.ips, args.cni.ips, or CNI_ARGS IP=a,b."""
        sources: list[Any] = [
            self.runtime.get("ips"),
            _dict(self.args.get("cni"), "args.cni").get("ips"),
        ]
        if env_args.get("IP"):
            sources.append(env_args["IP"].split(","))
        for source in sources:
            if source:
                return [str(ip).split("/")[0] for ip in _list(source, "ips")]
        return []

    def requested_mac(self, env_args: Mapping[str, str]) -> str | None:
        mac = (
            self.runtime.get("mac")
            or _dict(self.args.get("cni"), "args.cni").get("mac")
            or env_args.get("MAC")
        )
        return str(mac) if mac else None


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise CniError(INVALID_CONFIG, f"{what} must be a list, got {type(value).__name__}")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CniError(INVALID_CONFIG, f"{what} must be an object, got {type(value).__name__}")
    return value


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise CniError(INVALID_CONFIG, f"{key} must be true or false, got {value!r}")
    return value


def _route(item: Any) -> Route:
    if not isinstance(item, dict) or "dst" not in item:
        raise CniError(INVALID_CONFIG, f"route {item!r} needs a 'dst' CIDR")
    try:
        dst = ipaddress.ip_network(str(item["dst"]), strict=False)
        gw = ipaddress.ip_address(str(item["gw"])) if item.get("gw") else None
    except ValueError as exc:
        raise CniError(INVALID_CONFIG, f"route {item!r}: {exc}") from None
    if gw is not None and gw.version != dst.version:
        raise CniError(INVALID_CONFIG, f"route {item!r} mixes IPv4 and IPv6")
    return Route(dst, gw)


def _cidr(text: Any, what: str) -> str:
    try:
        return str(ipaddress.ip_network(str(text), strict=False))
    except ValueError:
        raise CniError(
            INVALID_CONFIG, f"{what} {text!r} is not a CIDR (e.g. 10.22.0.0/16)"
        ) from None


def _address(text: Any, what: str) -> str:
    try:
        return str(ipaddress.ip_address(str(text)))
    except ValueError:
        raise CniError(INVALID_CONFIG, f"{what} {text!r} is not an IP address") from None


def parse_ipam(raw: Any) -> Ipam:
    section = _dict(raw, "ipam")
    ipam_type = str(section.get("type") or "netstack")
    if ipam_type != "netstack":
        return Ipam(type=ipam_type, raw=section)
    unknown = sorted(set(section) - IPAM_KEYS)
    if unknown:
        raise CniError(
            UNSUPPORTED_FIELD,
            f"unsupported ipam field(s) {', '.join(unknown)}; netstack's ipam takes "
            f"{', '.join(sorted(IPAM_KEYS))}",
        )
    subnets: list[str] = []
    gateways: list[str] = []
    if section.get("subnet"):
        subnets.append(_cidr(section["subnet"], "ipam.subnet"))
    if section.get("gateway"):
        gateways.append(_address(section["gateway"], "ipam.gateway"))
    for range_set in _list(section.get("ranges", []), "ipam.ranges"):
        for item in _list(range_set, "ipam.ranges[]")[:1]:  # one subnet per range set
            entry = _dict(item, "ipam.ranges[][]")
            unknown = sorted(set(entry) - RANGE_KEYS)
            if unknown:
                raise CniError(
                    UNSUPPORTED_FIELD,
                    f"unsupported range field(s) {', '.join(unknown)}: netstack allocates from "
                    "the whole subnet; give subnet and gateway",
                )
            if "subnet" not in entry:
                raise CniError(INVALID_CONFIG, f"ipam range {entry!r} needs a subnet")
            subnets.append(_cidr(entry["subnet"], "ipam range subnet"))
            if entry.get("gateway"):
                gateways.append(_address(entry["gateway"], "ipam range gateway"))
    routes = tuple(_route(r) for r in _list(section.get("routes", []), "ipam.routes"))
    return Ipam(
        type="netstack",
        subnets=tuple(subnets),
        gateways=tuple(gateways),
        routes=routes,
        raw=section,
    )


def parse_config(stdin: bytes | str, command: str) -> Config:
    """Decode and validate the configuration (codes 6, 7, 1 and 2)."""
    try:
        raw = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(DECODE_FAILURE, f"cannot decode the network configuration: {exc}") from None
    if not isinstance(raw, dict):
        raise CniError(DECODE_FAILURE, "the network configuration must be a JSON object")
    version = raw.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "the network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if command == "VERSION":
        return Config(version=version, name="", type="", raw=raw)
    name = raw.get("name")
    if not isinstance(name, str) or not NETWORK_NAME.fullmatch(name) or len(name) > 63:
        raise CniError(
            INVALID_CONFIG,
            f"network name {name!r} is invalid: 1-63 letters, digits, '_', '.', '-', "
            "starting with a letter or digit",
        )
    unknown = sorted(set(raw) - STANDARD_KEYS - NETSTACK_KEYS)
    if unknown:
        raise CniError(
            UNSUPPORTED_FIELD,
            f"unsupported field(s) {', '.join(unknown)} in network configuration {name!r}",
            f"netstack accepts: {', '.join(sorted(NETSTACK_KEYS))} and the standard keys",
        )
    if command == "CHECK" and version in ("0.3.0", "0.3.1"):
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK is not defined for cniVersion {version}")
    if command in ("STATUS", "GC") and version != "1.1.0":
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0, not {version}")
    mtu = raw.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int)):
        raise CniError(INVALID_CONFIG, f"mtu must be an integer, got {mtu!r}")
    bridge = raw.get("bridge", "")
    if not isinstance(bridge, str):
        raise CniError(INVALID_CONFIG, f"bridge must be a string, got {bridge!r}")
    driver = raw.get("driver", "bridge")
    if driver != "bridge":
        raise CniError(
            INVALID_CONFIG, f'driver {driver!r} is not available; use "driver": "bridge"'
        )
    prev = raw.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "prevResult must be an object")
    attachments = raw.get("cni.dev/valid-attachments", raw.get("cni.dev/attachments"))
    valid: tuple[tuple[str, str], ...] | None = None
    if attachments is not None:
        items = []
        for item in _list(attachments, "cni.dev/valid-attachments"):
            entry = _dict(item, "attachment")
            if not isinstance(entry.get("containerID"), str) or not isinstance(
                entry.get("ifname"), str
            ):
                raise CniError(INVALID_CONFIG, f"attachment {item!r} needs containerID and ifname")
            items.append((entry["containerID"], entry["ifname"]))
        valid = tuple(items)
    return Config(
        version=version,
        name=name,
        type=str(raw.get("type", "")),
        driver=driver,
        bridge=bridge,
        is_gateway=_bool(raw, "isGateway", True),
        is_default_gateway=_bool(raw, "isDefaultGateway", False),
        ip_masq=_bool(raw, "ipMasq", False),
        hairpin=_bool(raw, "hairpinMode", True),
        mtu=mtu,
        internal=_bool(raw, "internal", False),
        icc=_bool(raw, "icc", True),
        ipam=parse_ipam(raw.get("ipam")),
        dns=_dict(raw.get("dns"), "dns"),
        runtime=_dict(raw.get("runtimeConfig"), "runtimeConfig"),
        args=_dict(raw.get("args"), "args"),
        prev_result=prev,
        valid_attachments=valid,
        raw=raw,
    )


def check_env_args(args: Mapping[str, str]) -> None:
    """CNI_ARGS keys netstack understands (IP, MAC); others need IgnoreUnknown=1 (code 2)."""
    known = {"IP", "MAC", "IgnoreUnknown"}
    unknown = sorted(set(args) - known)
    ignore = args.get("IgnoreUnknown", "").lower() in ("1", "true")
    if unknown and not ignore:
        raise CniError(
            UNSUPPORTED_FIELD,
            f"unknown CNI_ARGS key(s) {', '.join(unknown)}; pass IgnoreUnknown=1 to ignore them",
        )


# --------------------------------------------------------------------------- results


@dataclass
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""

    def document(self) -> dict[str, str]:
        doc = {"name": self.name}
        if self.mac:
            doc["mac"] = self.mac
        if self.sandbox:
            doc["sandbox"] = self.sandbox
        return doc


@dataclass
class IpConfig:
    address: str  # CIDR: the address and its subnet's prefix length
    gateway: str | None
    interface: int

    @property
    def version(self) -> int:
        return ipaddress.ip_interface(self.address).version


@dataclass
class Result:
    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IpConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    dns: dict[str, Any] = field(default_factory=dict)

    def document(self, version: str) -> dict[str, Any]:
        """The result in the shape of `version` (0.3.x/0.4.0 have an ips[].version)."""
        ips = []
        for ip in self.ips:
            entry: dict[str, Any] = {"address": ip.address, "interface": ip.interface}
            if ip.gateway:
                entry["gateway"] = ip.gateway
            if version.startswith("0."):
                entry = {"version": str(ip.version), **entry}
            ips.append(entry)
        doc: dict[str, Any] = {
            "cniVersion": version,
            "interfaces": [i.document() for i in self.interfaces],
            "ips": ips,
        }
        if self.routes:
            doc["routes"] = [r.document() for r in self.routes]
        doc["dns"] = dict(self.dns)
        return doc
