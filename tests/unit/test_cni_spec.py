"""The CNI protocol without I/O: netstack.cni.spec, the installer's texts, the wire format.

Environment and configuration parsing with the spec's error codes, the capability
sources (portMappings, ips, mac), CNI_ARGS checking, result documents per version, and
`netctl cni install`'s plugin script and example conflist.
"""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from netstack.cni import install, main, plugin
from netstack.cni.spec import (
    COMMANDS,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENVIRONMENT,
    LATEST,
    SUPPORTED_VERSIONS,
    UNSUPPORTED_FIELD,
    CniError,
    Config,
    Environment,
    Interface,
    IpConfig,
    PortMapping,
    Result,
    Route,
    check_env_args,
    parse_cni_args,
    parse_config,
    version_document,
)
from netstack.errors import InvalidArgument

ADD_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c0ffee",
    "CNI_NETNS": "/var/run/netns/c0ffee",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
}


def config(**fields: Any) -> dict[str, Any]:
    """A valid netstack plugin configuration with `fields` set (None: key removed)."""
    doc: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "cninet",
        "type": "netstack",
        "ipam": {"type": "netstack", "subnet": "10.22.0.0/16"},
    }
    for key, value in fields.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def parse(doc: Any, command: str = "ADD") -> Config:
    text = doc if isinstance(doc, (str, bytes)) else json.dumps(doc)
    return parse_config(text, command)


def error_of(call: Any, *args: Any) -> CniError:
    with pytest.raises(CniError) as caught:
        call(*args)
    return caught.value


# --------------------------------------------------------------------------- environment


def test_environment_add_parses_every_variable() -> None:
    env = Environment.parse(
        {**ADD_ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web", "HOME": "/root"}
    )
    assert (env.command, env.container_id, env.netns, env.ifname) == (
        "ADD",
        "c0ffee",
        "/var/run/netns/c0ffee",
        "eth0",
    )
    assert env.args == {"IgnoreUnknown": "1", "K8S_POD_NAME": "web"}
    assert env.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert "HOME" not in env.variables
    assert env.variables["CNI_ARGS"] == "IgnoreUnknown=1;K8S_POD_NAME=web"


@pytest.mark.parametrize(
    ("command", "required"),
    [
        ("ADD", ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")),
        ("CHECK", ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")),
        ("DEL", ("CNI_CONTAINERID", "CNI_IFNAME")),
    ],
)
def test_environment_requires_the_commands_variables(
    command: str, required: tuple[str, ...]
) -> None:
    base = {**ADD_ENV, "CNI_COMMAND": command}
    assert Environment.parse(base).command == command
    for name in required:
        for value in (None, ""):
            env = {k: v for k, v in base.items() if k != name}
            if value is not None:
                env[name] = value
            error = error_of(Environment.parse, env)
            assert error.code == INVALID_ENVIRONMENT
            assert name in error.msg and command in error.msg


def test_del_needs_no_netns() -> None:
    env = {k: v for k, v in ADD_ENV.items() if k != "CNI_NETNS"}
    assert Environment.parse({**env, "CNI_COMMAND": "DEL"}).netns == ""


@pytest.mark.parametrize("command", ["VERSION", "STATUS", "GC"])
def test_version_status_gc_need_only_the_command(command: str) -> None:
    env = Environment.parse({"CNI_COMMAND": command})
    assert (env.command, env.container_id, env.ifname, env.path) == (command, "", "", ())


@pytest.mark.parametrize("command", [None, "", "add", "FOO", "ADD "])
def test_environment_refuses_a_bad_command(command: str | None) -> None:
    env = dict(ADD_ENV)
    if command is None:
        del env["CNI_COMMAND"]
    else:
        env["CNI_COMMAND"] = command
    error = error_of(Environment.parse, env)
    assert error.code == INVALID_ENVIRONMENT
    assert "CNI_COMMAND" in error.msg
    assert all(name in error.msg for name in COMMANDS)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CNI_CONTAINERID", "-leading-dash"),
        ("CNI_CONTAINERID", "has space"),
        ("CNI_CONTAINERID", "a/b"),
        ("CNI_IFNAME", "x" * 16),
        ("CNI_IFNAME", "eth/0"),
        ("CNI_IFNAME", "eth 0"),
        ("CNI_IFNAME", "é" * 8),  # 8 characters, 16 bytes
        ("CNI_NETNS", "run/netns/x"),
    ],
)
def test_environment_refuses_bad_values(name: str, value: str) -> None:
    error = error_of(Environment.parse, {**ADD_ENV, name: value})
    assert error.code == INVALID_ENVIRONMENT
    assert name in error.msg


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CNI_CONTAINERID", "a"),
        ("CNI_CONTAINERID", "0123abc_.-x" * 6),
        ("CNI_IFNAME", "x" * 15),
        ("CNI_IFNAME", "net1"),
        ("CNI_IFNAME", "eth0.100"),
        ("CNI_NETNS", "/proc/1234/ns/net"),
    ],
)
def test_environment_accepts_good_values(name: str, value: str) -> None:
    env = Environment.parse({**ADD_ENV, name: value})
    assert env.variables[name] == value


def test_environment_bad_cni_args_is_invalid_environment() -> None:
    error = error_of(Environment.parse, {**ADD_ENV, "CNI_ARGS": "IP=10.0.0.2;garbage"})
    assert error.code == INVALID_ENVIRONMENT
    assert "garbage" in error.msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("IP=10.1.0.5", {"IP": "10.1.0.5"}),
        ("A=1;B=2", {"A": "1", "B": "2"}),
        (";A=1;;B=;", {"A": "1", "B": ""}),
        ("K=v=w", {"K": "v=w"}),
        ("K=1;K=2", {"K": "2"}),
    ],
)
def test_parse_cni_args(text: str, expected: dict[str, str]) -> None:
    assert parse_cni_args(text) == expected


@pytest.mark.parametrize("text", ["A", "A=1;B", "=value", "A=1;=2"])
def test_parse_cni_args_refuses_items_without_key_and_value(text: str) -> None:
    assert error_of(parse_cni_args, text).code == INVALID_ENVIRONMENT


# --------------------------------------------------------------------------- configuration


def test_parse_config_defaults() -> None:
    cfg = parse(config())
    assert (cfg.version, cfg.name, cfg.type, cfg.driver) == (
        "1.0.0",
        "cninet",
        "netstack",
        "bridge",
    )
    assert (cfg.is_gateway, cfg.is_default_gateway, cfg.ip_masq, cfg.hairpin) == (
        True,
        False,
        False,
        True,
    )
    assert (cfg.mtu, cfg.bridge, cfg.internal, cfg.icc) == (None, "", False, True)
    assert cfg.ipam.type == "netstack" and not cfg.ipam.delegated
    assert cfg.ipam.subnets == ("10.22.0.0/16",) and cfg.ipam.gateways == ()
    assert cfg.prev_result is None and cfg.valid_attachments is None
    assert cfg.raw == config()


def test_parse_config_reads_every_bridge_key() -> None:
    cfg = parse(
        config(
            bridge="cni0",
            isGateway=False,
            isDefaultGateway=True,
            ipMasq=True,
            hairpinMode=False,
            mtu=1400,
            internal=True,
            icc=False,
            forceAddress=False,
            dns={"nameservers": ["10.22.0.1"]},
            args={"cni": {"ips": ["10.22.0.9"]}},
            runtimeConfig={"mac": "02:00:00:00:00:09"},
            capabilities={"mac": True},
            prevResult={"cniVersion": "1.0.0", "interfaces": []},
        )
    )
    assert cfg.bridge == "cni0" and cfg.mtu == 1400
    assert (cfg.is_gateway, cfg.is_default_gateway, cfg.ip_masq, cfg.hairpin) == (
        False,
        True,
        True,
        False,
    )
    assert (cfg.internal, cfg.icc) == (True, False)
    assert cfg.dns == {"nameservers": ["10.22.0.1"]}
    assert cfg.prev_result == {"cniVersion": "1.0.0", "interfaces": []}
    assert cfg.runtime == {"mac": "02:00:00:00:00:09"}


@pytest.mark.parametrize(
    "stdin", [b"", b"{", b"not json", b"\xff\xfe{}", b'{"cniVersion": "1.0.0",}']
)
def test_undecodable_config_is_decode_failure(stdin: bytes) -> None:
    assert error_of(parse_config, stdin, "ADD").code == 6


@pytest.mark.parametrize("doc", [[], ["cniVersion"], "1.0.0", 42, None, True])
def test_non_object_config_is_decode_failure(doc: Any) -> None:
    error = error_of(parse_config, json.dumps(doc), "ADD")
    assert error.code == 6
    assert "object" in error.msg


@pytest.mark.parametrize("version", [None, "", 1.0, ["1.0.0"]])
def test_missing_cni_version_is_invalid_config(version: Any) -> None:
    error = error_of(parse, config(cniVersion=version))
    assert error.code == INVALID_CONFIG
    assert "cniVersion" in error.msg


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.3", "1.2.0", "2.0.0", "v1.0.0"])
def test_unsupported_version_is_incompatible(version: str) -> None:
    error = error_of(parse, config(cniVersion=version))
    assert error.code == INCOMPATIBLE_VERSION
    assert version in error.msg
    assert all(v in error.details for v in SUPPORTED_VERSIONS)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_supported_version_parses(version: str) -> None:
    assert parse(config(cniVersion=version)).version == version


def test_version_command_needs_only_a_version() -> None:
    cfg = parse({"cniVersion": "0.4.0"}, "VERSION")
    assert cfg.version == "0.4.0"
    assert error_of(parse, {"cniVersion": "0.2.0"}, "VERSION").code == INCOMPATIBLE_VERSION


@pytest.mark.parametrize("name", [None, "", "-net", "a b", "net/1", "x" * 64, 7, ".hidden"])
def test_bad_network_name_is_invalid_config(name: Any) -> None:
    doc = config() if name is None else config(name=name)
    if name is None:
        del doc["name"]
    error = error_of(parse, doc)
    assert error.code == INVALID_CONFIG
    assert "network name" in error.msg


def test_longest_network_name() -> None:
    assert parse(config(name="n" * 63)).name == "n" * 63


@pytest.mark.parametrize("key", ["isDefaultGatway", "promiscMode", "vlan", "ipam2"])
def test_unknown_top_level_key_is_unsupported_field(key: str) -> None:
    error = error_of(parse, config(**{key: True}))
    assert error.code == UNSUPPORTED_FIELD
    assert key in error.msg
    assert "isDefaultGateway" in error.details


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_needs_0_4_0(version: str) -> None:
    error = error_of(parse, config(cniVersion=version), "CHECK")
    assert error.code == INCOMPATIBLE_VERSION
    assert "CHECK" in error.msg
    for later in ("0.4.0", "1.0.0", "1.1.0"):
        assert parse(config(cniVersion=later), "CHECK").version == later


@pytest.mark.parametrize("command", ["STATUS", "GC"])
@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
def test_status_and_gc_need_1_1_0(command: str, version: str) -> None:
    error = error_of(parse, config(cniVersion=version), command)
    assert error.code == INCOMPATIBLE_VERSION
    assert command in error.msg and "1.1.0" in error.msg
    assert parse(config(cniVersion="1.1.0"), command).version == "1.1.0"


@pytest.mark.parametrize(
    ("ipam", "needle"),
    [
        ({"subnet": "10.22.0.0/33"}, "ipam.subnet"),
        ({"subnet": "banana"}, "ipam.subnet"),
        ({"subnet": "10.22.0.0/16", "gateway": "10.22.0.300"}, "ipam.gateway"),
        ({"subnet": "10.22.0.0/16", "gateway": "10.22.0.0/16"}, "ipam.gateway"),
        ({"ranges": [[{"gateway": "10.22.0.1"}]]}, "needs a subnet"),
        ({"ranges": [[{"subnet": "nope"}]]}, "range subnet"),
        ({"ranges": [[{"subnet": "10.22.0.0/16", "gateway": "x"}]]}, "range gateway"),
        ({"ranges": {"subnet": "10.22.0.0/16"}}, "ipam.ranges"),
        ({"ranges": [{"subnet": "10.22.0.0/16"}]}, "ipam.ranges[]"),
        ({"subnet": "10.22.0.0/16", "routes": {"dst": "0.0.0.0/0"}}, "ipam.routes"),
        ({"subnet": "10.22.0.0/16", "routes": [{"gw": "10.22.0.1"}]}, "needs a 'dst'"),
        ({"subnet": "10.22.0.0/16", "routes": ["0.0.0.0/0"]}, "needs a 'dst'"),
        ({"subnet": "10.22.0.0/16", "routes": [{"dst": "300.0.0.0/8"}]}, "route"),
        ({"subnet": "10.22.0.0/16", "routes": [{"dst": "10.0.0.0/8", "gw": "x"}]}, "route"),
        ({"subnet": "10.22.0.0/16", "routes": [{"dst": "::/0", "gw": "10.22.0.1"}]}, "mixes"),
    ],
)
def test_bad_ipam_is_invalid_config(ipam: dict[str, Any], needle: str) -> None:
    error = error_of(parse, config(ipam={"type": "netstack", **ipam}))
    assert error.code == INVALID_CONFIG, error.msg
    assert needle in error.msg


def test_ipam_must_be_an_object() -> None:
    assert error_of(parse, config(ipam=["netstack"])).code == INVALID_CONFIG


@pytest.mark.parametrize(
    ("ipam", "needle"),
    [
        ({"subnet": "10.22.0.0/16", "rangeStart": "10.22.0.10"}, "rangeStart"),
        ({"subnet": "10.22.0.0/16", "dataDir": "/tmp/x"}, "dataDir"),
        ({"ranges": [[{"subnet": "10.22.0.0/16", "rangeStart": "10.22.0.10"}]]}, "rangeStart"),
        ({"ranges": [[{"subnet": "10.22.0.0/16", "rangeEnd": "10.22.0.20"}]]}, "rangeEnd"),
    ],
)
def test_unsupported_ipam_keys_are_unsupported_field(ipam: dict[str, Any], needle: str) -> None:
    error = error_of(parse, config(ipam={"type": "netstack", **ipam}))
    assert error.code == UNSUPPORTED_FIELD
    assert needle in error.msg


def test_ipam_ranges_routes_and_gateways() -> None:
    cfg = parse(
        config(
            ipam={
                "ranges": [
                    [{"subnet": "10.22.0.0/16", "gateway": "10.22.0.254"}],
                    [{"subnet": "fd00:22::/64"}],
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.0.2.0/24", "gw": "10.22.0.9"}],
            }
        )
    )
    assert cfg.ipam.type == "netstack"  # the default type
    assert cfg.ipam.subnets == ("10.22.0.0/16", "fd00:22::/64")
    assert cfg.ipam.gateways == ("10.22.0.254",)
    assert cfg.ipam.routes == (
        Route(ipaddress.ip_network("0.0.0.0/0")),
        Route(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_address("10.22.0.9")),
    )


def test_ipam_subnet_with_host_bits_is_normalised() -> None:
    cfg = parse(config(ipam={"subnet": "10.22.3.4/16", "gateway": "10.22.0.1"}))
    assert cfg.ipam.subnets == ("10.22.0.0/16",)
    assert cfg.ipam.gateways == ("10.22.0.1",)


def test_no_ipam_section_means_netstack_ipam() -> None:
    cfg = parse(config(ipam=None))
    assert cfg.ipam.type == "netstack" and cfg.ipam.subnets == ()


def test_delegated_ipam_is_passed_through_unchecked() -> None:
    section = {"type": "host-local", "rangeStart": "10.22.0.10", "dataDir": "/tmp/x"}
    cfg = parse(config(ipam=section))
    assert cfg.ipam.delegated
    assert cfg.ipam.type == "host-local"
    assert cfg.ipam.raw == section
    assert cfg.ipam.subnets == () and cfg.ipam.routes == ()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mtu", "1500"),
        ("mtu", 1500.0),
        ("mtu", True),
        ("bridge", 0),
        ("isGateway", "yes"),
        ("isDefaultGateway", 1),
        ("ipMasq", "true"),
        ("hairpinMode", None),
        ("internal", "no"),
        ("prevResult", []),
        ("dns", ["10.0.0.1"]),
        ("runtimeConfig", []),
        ("args", "K=V"),
    ],
)
def test_bad_value_types_are_invalid_config(key: str, value: Any) -> None:
    doc = config()
    doc[key] = value
    error = error_of(parse, doc)
    assert error.code == INVALID_CONFIG
    assert key in error.msg or "prevResult" in error.msg


@pytest.mark.parametrize("driver", ["macvlan", "overlay", "", None, 1])
def test_driver_other_than_bridge_is_invalid_config(driver: Any) -> None:
    doc = config()
    doc["driver"] = driver
    error = error_of(parse, doc)
    assert error.code == INVALID_CONFIG
    assert "driver" in error.msg


def test_valid_attachments_and_the_older_key() -> None:
    entries = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        cfg = parse(config(cniVersion="1.1.0", **{key: entries}), "GC")
        assert cfg.valid_attachments == (("a", "eth0"), ("b", "net1"))
    cfg = parse(config(cniVersion="1.1.0", **{"cni.dev/valid-attachments": []}), "GC")
    assert cfg.valid_attachments == ()


def test_valid_attachments_key_wins_over_the_older_one() -> None:
    cfg = parse(
        config(
            cniVersion="1.1.0",
            **{
                "cni.dev/valid-attachments": [{"containerID": "new", "ifname": "eth0"}],
                "cni.dev/attachments": [{"containerID": "old", "ifname": "eth0"}],
            },
        ),
        "GC",
    )
    assert cfg.valid_attachments == (("new", "eth0"),)


@pytest.mark.parametrize(
    "attachments",
    [
        {"containerID": "a", "ifname": "eth0"},
        [{"containerID": "a"}],
        [{"ifname": "eth0"}],
        [{"containerID": 1, "ifname": "eth0"}],
        ["a/eth0"],
    ],
)
def test_malformed_valid_attachments_are_invalid_config(attachments: Any) -> None:
    doc = config(cniVersion="1.1.0", **{"cni.dev/valid-attachments": attachments})
    assert error_of(parse, doc, "GC").code == INVALID_CONFIG


# --------------------------------------------------------------------------- capabilities


def test_port_mappings() -> None:
    cfg = parse(
        config(
            runtimeConfig={
                "portMappings": [
                    {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                    {"hostPort": "53", "containerPort": "5353", "protocol": "UDP"},
                    {"hostPort": 8443, "containerPort": 443, "hostIP": "192.0.2.1"},
                    {"hostPort": 9000, "containerPort": 90, "hostIP": "2001:db8::1"},
                ]
            }
        )
    )
    mappings = cfg.port_mappings()
    assert mappings == [
        PortMapping(8080, 80, "tcp", ""),
        PortMapping(53, 5353, "udp", ""),
        PortMapping(8443, 443, "tcp", "192.0.2.1"),
        PortMapping(9000, 90, "tcp", "2001:db8::1"),
    ]
    assert [m.spec() for m in mappings] == [
        "8080:80/tcp",
        "53:5353/udp",
        "192.0.2.1:8443:443/tcp",
        "[2001:db8::1]:9000:90/tcp",
    ]
    assert parse(config()).port_mappings() == []


@pytest.mark.parametrize(
    "mappings",
    [
        {"hostPort": 80, "containerPort": 80},
        ["80:80"],
        [{"hostPort": 80}],
        [{"containerPort": 80}],
        [{"hostPort": "eighty", "containerPort": 80}],
        [{"hostPort": None, "containerPort": 80}],
    ],
)
def test_malformed_port_mappings_are_invalid_config(mappings: Any) -> None:
    cfg = parse(config(runtimeConfig={"portMappings": mappings}))
    assert error_of(cfg.port_mappings).code == INVALID_CONFIG


def test_requested_ips_sources_in_order() -> None:
    runtime = {"ips": ["10.22.0.5/16"]}
    args = {"cni": {"ips": ["10.22.0.6"]}}
    env_args = {"IP": "10.22.0.7,fd00:22::7"}
    assert parse(config(runtimeConfig=runtime, args=args)).requested_ips(env_args) == ["10.22.0.5"]
    assert parse(config(args=args)).requested_ips(env_args) == ["10.22.0.6"]
    assert parse(config()).requested_ips(env_args) == ["10.22.0.7", "fd00:22::7"]
    assert parse(config()).requested_ips({}) == []
    assert parse(config(runtimeConfig={"ips": []})).requested_ips({"IP": "10.22.0.7"}) == [
        "10.22.0.7"
    ]


def test_requested_ips_must_be_a_list() -> None:
    cfg = parse(config(runtimeConfig={"ips": "10.22.0.5"}))
    assert error_of(cfg.requested_ips, {}).code == INVALID_CONFIG
    cfg = parse(config(args={"cni": "ips"}))
    assert error_of(cfg.requested_ips, {}).code == INVALID_CONFIG


def test_requested_mac_sources_in_order() -> None:
    runtime = {"mac": "02:00:00:00:00:01"}
    args = {"cni": {"mac": "02:00:00:00:00:02"}}
    env_args = {"MAC": "02:00:00:00:00:03"}
    assert parse(config(runtimeConfig=runtime, args=args)).requested_mac(env_args) == (
        "02:00:00:00:00:01"
    )
    assert parse(config(args=args)).requested_mac(env_args) == "02:00:00:00:00:02"
    assert parse(config()).requested_mac(env_args) == "02:00:00:00:00:03"
    assert parse(config()).requested_mac({}) is None


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"IP": "10.22.0.5"},
        {"MAC": "02:00:00:00:00:01", "IP": "10.22.0.5"},
        {"IgnoreUnknown": "1", "K8S_POD_NAME": "web", "K8S_POD_NAMESPACE": "default"},
        {"IgnoreUnknown": "true", "FOO": "bar"},
        {"IgnoreUnknown": "TRUE", "FOO": "bar"},
    ],
)
def test_check_env_args_accepts(args: dict[str, str]) -> None:
    check_env_args(args)


@pytest.mark.parametrize(
    "args",
    [
        {"K8S_POD_NAME": "web"},
        {"IgnoreUnknown": "0", "FOO": "bar"},
        {"IgnoreUnknown": "", "FOO": "bar"},
        {"IgnoreUnknown": "yes", "FOO": "bar"},
        {"ip": "10.22.0.5"},
    ],
)
def test_check_env_args_refuses_unknown_keys(args: dict[str, str]) -> None:
    error = error_of(check_env_args, args)
    assert error.code == UNSUPPORTED_FIELD
    assert "IgnoreUnknown" in error.msg
    assert next(k for k in args if k not in ("IgnoreUnknown",)) in error.msg


# --------------------------------------------------------------------------- results


def sample_result() -> Result:
    return Result(
        interfaces=[
            Interface("nsbr0", "02:00:00:00:00:aa"),
            Interface("nsv0"),
            Interface("eth0", "02:00:00:00:00:01", "/var/run/netns/c0ffee"),
        ],
        ips=[
            IpConfig("10.22.0.2/16", "10.22.0.1", 2),
            IpConfig("fd00:22::2/64", None, 2),
        ],
        routes=[
            Route(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("10.22.0.1")),
            Route(ipaddress.ip_network("192.0.2.0/24")),
        ],
        dns={"nameservers": ["10.22.0.1"]},
    )


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_result_document_per_version(version: str) -> None:
    doc = sample_result().document(version)
    assert doc["cniVersion"] == version
    assert doc["interfaces"] == [
        {"name": "nsbr0", "mac": "02:00:00:00:00:aa"},
        {"name": "nsv0"},
        {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/c0ffee"},
    ]
    v4 = {"address": "10.22.0.2/16", "interface": 2, "gateway": "10.22.0.1"}
    v6 = {"address": "fd00:22::2/64", "interface": 2}
    if version.startswith("0."):
        assert doc["ips"] == [{"version": "4", **v4}, {"version": "6", **v6}]
    else:
        assert doc["ips"] == [v4, v6]
        assert all("version" not in ip for ip in doc["ips"])
    assert doc["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.22.0.1"}, {"dst": "192.0.2.0/24"}]
    assert doc["dns"] == {"nameservers": ["10.22.0.1"]}
    json.dumps(doc)  # serialisable as it is


def test_result_document_without_routes_or_dns() -> None:
    doc = Result(interfaces=[Interface("eth0")]).document("1.0.0")
    assert doc == {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [], "dns": {}}


def test_result_dns_is_a_copy() -> None:
    result = sample_result()
    doc = result.document("1.1.0")
    doc["dns"]["search"] = ["example"]
    assert "search" not in result.dns


def test_version_document() -> None:
    for version in SUPPORTED_VERSIONS:
        assert version_document(version) == {
            "cniVersion": version,
            "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
        }
    assert LATEST == "1.1.0"


def test_error_document() -> None:
    assert CniError(7, "bad", "").document("0.3.1") == {
        "cniVersion": "0.3.1",
        "code": 7,
        "msg": "bad",
    }
    assert CniError(2, "bad", "try x").document("1.1.0") == {
        "cniVersion": "1.1.0",
        "code": 2,
        "msg": "bad",
        "details": "try x",
    }


# --------------------------------------------------------------------------- installer


def test_plugin_script_text() -> None:
    env = {"NETSTACK_STATE_DIR": "/var/lib/x", "NETSTACK_RUN_DIR": "/run/x", "HOME": "/root"}
    text = install.plugin_script("/usr/bin/python3", env, "/srv/net'stack")
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/python3 -S"
    assert 'sys.path.insert(0, "/srv/net\'stack")' in lines
    assert "os.environ.setdefault('NETSTACK_STATE_DIR', '/var/lib/x')" in lines
    assert "os.environ.setdefault('NETSTACK_RUN_DIR', '/run/x')" in lines
    assert "HOME" not in text
    assert lines[-1] == "raise SystemExit(main())"
    assert text.endswith("\n")
    compile(text, "netstack", "exec")  # valid Python


def test_plugin_script_without_directories_has_no_defaults() -> None:
    text = install.plugin_script("/usr/bin/python3", {}, "/srv/netstack")
    assert "setdefault" not in text
    compile(text, "netstack", "exec")


def test_example_conflist_is_a_valid_configuration() -> None:
    conflist = install.example_conflist("podnet")
    assert conflist["cniVersion"] == "1.0.0"  # what podman 4.3 and containerd 1.6 read
    assert conflist["name"] == "podnet"
    (plugin,) = conflist["plugins"]
    assert plugin["type"] == "netstack"
    assert plugin["capabilities"] == {"portMappings": True, "ips": True, "mac": True, "dns": True}
    # A runtime hands each plugin the list's cniVersion and name.
    cfg = parse({"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin})
    assert (cfg.name, cfg.driver, cfg.is_default_gateway, cfg.ip_masq) == (
        "podnet",
        "bridge",
        True,
        True,
    )
    json.dumps(conflist)


def test_install_writes_the_plugin_and_conflists(tmp_path: Path) -> None:
    written = install.install(tmp_path / "bin", tmp_path / "net.d", ["one", "two"], compile=False)
    assert written == [
        tmp_path / "bin" / "netstack",
        tmp_path / "net.d" / "10-one.conflist",
        tmp_path / "net.d" / "10-two.conflist",
    ]
    assert stat.S_IMODE(written[0].stat().st_mode) == 0o755
    assert written[0].read_text().startswith("#!")
    for path, name in zip(written[1:], ("one", "two"), strict=True):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert json.loads(path.read_text()) == install.example_conflist(name)
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["netstack"]  # no temp left


def test_install_refuses_bad_names_and_networks_without_conf_dir(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="network name"):
        install.install(tmp_path / "bin", tmp_path / "net.d", ["bad name"])
    with pytest.raises(InvalidArgument, match="--conf-dir"):
        install.install(tmp_path / "bin", None, ["good"])
    assert not (tmp_path / "bin").exists()  # refused before writing anything


# --------------------------------------------------------------------------- fast-path wire


@pytest.mark.parametrize(
    "text",
    ["", "plain", 'quote " and \\ backslash', "ctrl \x00\x01\x1f\t\n\r", "é ü \u2028 \U0001f600"],
)
def test_daemon_request_is_json(text: str) -> None:
    """The plugin builds its request without the json module; json must read it back."""
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": text, text or "K": text}
    request = main._request(env, text)
    assert request.endswith(b"\n") and request.count(b"\n") == 1
    assert json.loads(request) == {"op": "cni", "reply": "raw", "env": env, "stdin": text}


# --------------------------------------------------------------------------- plugin.run, pure


def never_called() -> Any:
    raise AssertionError("the controller must not be built for this request")


def run(env: dict[str, str], stdin: str | bytes) -> tuple[int, dict[str, Any]]:
    code, stdout = plugin.run(env, stdin, never_called)
    return code, json.loads(stdout)


@pytest.mark.parametrize(("requested", "answered"), [("0.4.0", "0.4.0"), ("0.2.0", LATEST)])
def test_run_version(requested: str, answered: str) -> None:
    code, doc = run({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": requested}))
    assert code == 0
    assert doc == version_document(answered)


@pytest.mark.parametrize(
    ("env", "stdin", "code", "version"),
    [
        ({}, json.dumps(config()), INVALID_ENVIRONMENT, LATEST),
        (ADD_ENV, b"\xff", 6, LATEST),
        (ADD_ENV, json.dumps(config(cniVersion="0.2.0")), INCOMPATIBLE_VERSION, LATEST),
        (ADD_ENV, json.dumps(config(cniVersion="0.4.0", foo=1)), UNSUPPORTED_FIELD, LATEST),
        (
            {**ADD_ENV, "CNI_ARGS": "FOO=bar"},
            json.dumps(config(cniVersion="0.4.0")),
            UNSUPPORTED_FIELD,
            "0.4.0",
        ),
        (
            {**ADD_ENV, "CNI_COMMAND": "CHECK"},
            json.dumps(config(cniVersion="0.4.0")),
            INVALID_CONFIG,  # CHECK without prevResult
            "0.4.0",
        ),
    ],
)
def test_run_errors_are_error_documents(
    env: dict[str, str], stdin: str | bytes, code: int, version: str
) -> None:
    status, doc = run(env, stdin)
    assert status == 1
    assert doc["code"] == code and doc["cniVersion"] == version
    assert isinstance(doc["msg"], str) and doc["msg"]
    assert set(doc) <= {"cniVersion", "code", "msg", "details"}


def test_run_add_in_a_missing_namespace_is_unknown_container() -> None:
    env = {**ADD_ENV, "CNI_NETNS": "/nonexistent/netns/c0ffee"}
    status, doc = run(env, json.dumps(config()))
    assert (status, doc["code"], doc["cniVersion"]) == (1, 3, "1.0.0")
    assert "/nonexistent/netns/c0ffee" in doc["msg"]


@pytest.mark.parametrize(("container", "ifname"), [("c0ffee", "eth0"), ("a.b-c_d", "net1")])
def test_attachment_names_round_trip(container: str, ifname: str) -> None:
    name = plugin.attachment_name(container, ifname)
    assert name == f"cni/{container}/{ifname}"
    assert plugin.parse_attachment_name(name) == (container, ifname)


@pytest.mark.parametrize("name", ["web", "cni/", "cni/x", "cni//eth0", "cni/x/", "cnix/a/b"])
def test_other_sandbox_names_are_not_attachments(name: str) -> None:
    assert plugin.parse_attachment_name(name) is None
