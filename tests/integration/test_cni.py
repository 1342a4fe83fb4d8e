"""Integration: the `netstack` CNI plugin driven the way a container runtime drives it.

Each test installs the plugin with `netctl cni install --bin-dir <tmp>` (run with the
host's environment, so the state and run directories are baked into the executable) and
execs `<tmp>/netstack` in the host namespace (`nsenter --net`) with a bare environment:
the CNI_* variables, PATH, and the configuration on stdin. Containers are namespaces the
test makes (`<host>-<suffix>`, removed by the host fixture).

Checked: results per cniVersion (0.3.0 to 1.1.0), the kernel and `netctl` views of each
attachment, CNI_ARGS, capabilities (portMappings with real traffic, ips, mac, dns),
delegated IPAM (the reference host-local), CHECK finding what is wrong, GC, idempotent
DEL, the spec's error codes with nothing left behind, concurrency, and the netstackd fast
path giving what the in-process path gives.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import select
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from snapshot import assert_unchanged, global_addresses, nft_elements, snapshot

from netstack.kernel.netns import run_in

if TYPE_CHECKING:
    from conftest import Host

pytestmark = pytest.mark.root

VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CNI_PATH = "/usr/lib/cni"
HOST_LOCAL = Path(CNI_PATH) / "host-local"
BARE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 180.0  # one plugin call; the machine is shared with other test runs
READY_TIMEOUT = 15.0
REACH_TIMEOUT = 10.0
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}
CONCURRENT = 32

SERVER = r"""
import socket, sys
port, tag = int(sys.argv[1]), sys.argv[2]
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("0.0.0.0", port))
sock.listen(16)
print("READY", flush=True)
while True:
    conn, peer = sock.accept()
    conn.sendall(f"{tag} {peer[0]}\n".encode())
    conn.close()
"""


# --------------------------------------------------------------------------- the runtime


@dataclass
class Reply:
    """One plugin invocation's exit status and output."""

    rc: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    def doc(self) -> Any:
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"stdout is not JSON ({exc}): {self!r}") from None

    def __str__(self) -> str:
        return f"rc={self.rc}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def conf(
    name: str, subnet: str | None = "10.90.0.0/24", version: str = "1.0.0", **fields: Any
) -> dict[str, Any]:
    """A netstack plugin configuration (netstack ipam on `subnet` unless ipam is given)."""
    doc: dict[str, Any] = {"cniVersion": version, "name": name, "type": "netstack"}
    if subnet is not None:
        doc["ipam"] = {"type": "netstack", "subnet": subnet}
    doc.update(fields)
    return doc


def gateway_of(subnet: str) -> str:
    return str(next(ipaddress.ip_network(subnet).hosts()))


@dataclass
class Runtime:
    """What a container runtime does: make containers, exec the plugin."""

    host: Host
    tmp: Path
    binary: Path
    containers: list[str] = field(default_factory=list)

    def container(self, suffix: str) -> str:
        """A fresh container namespace `<host>-<suffix>`; its path."""
        name = f"{self.host.name}-{suffix}"
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=60)
        self.containers.append(name)
        return f"/run/netns/{name}"

    def env(
        self,
        command: str | None,
        container: str = "",
        netns: str = "",
        ifname: str = "eth0",
        args: str = "",
        path: str = CNI_PATH,
        extra: dict[str, str] | None = None,
    ) -> dict[str, str]:
        env = {"PATH": BARE_PATH, "CNI_PATH": path}
        if command is not None:
            env["CNI_COMMAND"] = command
        for key, value in (
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
            ("CNI_ARGS", args),
        ):
            if value:
                env[key] = value
        env.update(extra or {})
        return env

    def start(self, env: dict[str, str], stdin: bytes) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["nsenter", f"--net={self.host.netns_path}", str(self.binary)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        return proc

    def call(
        self,
        command: str | None,
        config: dict[str, Any] | str | bytes,
        container: str = "",
        netns: str = "",
        ifname: str = "eth0",
        args: str = "",
        path: str = CNI_PATH,
        extra: dict[str, str] | None = None,
    ) -> Reply:
        """Exec the plugin once; its reply (never raises on a failing call)."""
        stdin = config if isinstance(config, bytes) else _text(config).encode()
        env = self.env(command, container, netns, ifname, args, path, extra)
        started = time.monotonic()
        proc = self.start(env, stdin)
        try:
            out, err = proc.communicate(stdin, timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return Reply(proc.returncode, out.decode(), err.decode(), time.monotonic() - started)

    def ok(self, command: str, config: dict[str, Any], **kw: Any) -> Reply:
        reply = self.call(command, config, **kw)
        assert reply.rc == 0, f"{command} failed:\n{reply}"
        return reply

    def add(self, config: dict[str, Any], container: str, netns: str, **kw: Any) -> dict[str, Any]:
        """ADD that must succeed; the result document."""
        result = self.ok("ADD", config, container=container, netns=netns, **kw).doc()
        assert isinstance(result, dict)
        return result

    def delete(self, config: dict[str, Any], container: str, netns: str = "", **kw: Any) -> None:
        reply = self.ok("DEL", config, container=container, netns=netns, **kw)
        assert reply.stdout == "", reply

    def check(
        self, config: dict[str, Any], result: dict[str, Any], container: str, netns: str, **kw: Any
    ) -> Reply:
        return self.call(
            "CHECK", {**config, "prevResult": result}, container=container, netns=netns, **kw
        )


def _text(config: dict[str, Any] | str) -> str:
    return config if isinstance(config, str) else json.dumps(config)


def install_plugin(host: Host, bin_dir: Path, compiled: bool = True) -> Path:
    """`netctl cni install --bin-dir` with the host's environment; the executable: the
    compiled front (CI has a C compiler), or with `compiled` False the Python script."""
    extra = () if compiled else ("--no-compile",)
    proc = host.netctl("cni", "install", "--bin-dir", str(bin_dir), *extra)
    binary = bin_dir / "netstack"
    assert proc.stdout.split() == [str(binary)]
    assert os.access(binary, os.X_OK)
    data = binary.read_bytes()
    assert data.startswith(b"\x7fELF") == compiled, data[:200]
    if compiled:  # the defaults are string literals of the binary
        assert str(host.state_dir).encode() in data
        assert str(host.run_dir).encode() in data
    else:
        text = data.decode()
        assert f"'NETSTACK_STATE_DIR', '{host.state_dir}'" in text, text
        assert f"'NETSTACK_RUN_DIR', '{host.run_dir}'" in text, text
    return binary


@pytest.fixture
def runtime(host: Host, tmp_path: Path, request: pytest.FixtureRequest) -> Runtime:
    """The installed plugin; `compiled` (default) or `script` by indirect parametrisation."""
    kind = getattr(request, "param", "compiled")
    return Runtime(host, tmp_path, install_plugin(host, tmp_path / "bin", kind == "compiled"))


BOTH_PLUGINS = pytest.mark.parametrize("runtime", ["compiled", "script"], indirect=True)


# --------------------------------------------------------------------------- observations


def assert_cni_error(reply: Reply, code: int, needle: str = "", version: str | None = None) -> Any:
    """Exit status non-zero and stdout a spec error document with `code`; the document."""
    assert reply.rc != 0, f"expected error code {code}, got success:\n{reply}"
    doc = reply.doc()
    assert isinstance(doc, dict), reply
    assert set(doc) <= ERROR_KEYS and {"cniVersion", "code", "msg"} <= set(doc), doc
    assert doc["code"] == code, f"expected code {code}:\n{reply}"
    assert isinstance(doc["msg"], str) and doc["msg"], doc
    assert isinstance(doc.get("details", ""), str), doc
    assert doc["cniVersion"] in VERSIONS, doc
    if version is not None:
        assert doc["cniVersion"] == version, doc
    if needle:
        text = f"{doc['msg']} {doc.get('details', '')}"
        assert needle in text, f"{needle!r} not in {text!r}"
    assert "Traceback" not in reply.stderr, reply.stderr
    return doc


def state(host: Host, runtime: Runtime) -> dict[str, Any]:
    """Store rows, host links/addresses/routes, nft elements, every container's view."""
    return snapshot(host, runtime.containers)


def store_query(host: Host, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(host.state_dir / "state.db", timeout=60)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def owned_addresses(host: Host) -> list[str]:
    """Every address the store has handed out (gateways included), as text."""
    return sorted(
        str(ipaddress.ip_address(int.from_bytes(address, "big")))
        for (address,) in store_query(host, "SELECT address FROM ipam_addresses")
    )


def inspect(host: Host, network: str) -> dict[str, Any]:
    (info,) = host.netctl_json("network", "inspect", network)
    return dict(info)


def endpoints(host: Host, network: str) -> dict[str, dict[str, Any]]:
    """The network's endpoints by sandbox name (``cni/<containerID>/<ifname>``)."""
    return {e["Sandbox"]: e for e in inspect(host, network)["Endpoints"]}


def veths(host: Host) -> list[str]:
    return sorted(name for name in host.links() if name.startswith(("nsv", "nsp")))


def bridges(host: Host) -> list[str]:
    return sorted(name for name in host.links() if name.startswith("nsbr"))


def ns_name(netns: str) -> str:
    return Path(netns).name


def container_links(netns: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-j", "-n", ns_name(netns), "addr", "show"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def container_addresses(netns: str, ifname: str) -> list[str]:
    links = list(container_links(netns).values())
    return global_addresses(links).get(ifname, [])


def container_routes(netns: str, *args: str) -> list[tuple[str, str, str]]:
    """(dst, gateway, dev) of the container's main-table routes (IPv4 unless args say)."""
    out = subprocess.run(
        ["ip", "-j", "-n", ns_name(netns), *args, "route", "show"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return sorted(
        (r.get("dst", ""), r.get("gateway", ""), r.get("dev", "")) for r in json.loads(out or "[]")
    )


def pub_elements(host: Host) -> list[str]:
    """Every element of netstack's published-port maps."""
    return [
        element
        for name, elements in nft_elements(host).items()
        if name.rsplit(" ", 1)[1].startswith("pub")
        for element in elements
    ]


def lease_files(data_dir: Path, network: str) -> dict[str, str]:
    """host-local's leases: {address: "containerID\\nifname"}."""
    directory = data_dir / network
    if not directory.is_dir():
        return {}
    return {
        path.name: path.read_text().strip()
        for path in directory.iterdir()
        if re.fullmatch(r"[0-9a-f.:]+", path.name)
    }


def assert_result(
    result: dict[str, Any],
    version: str,
    netns: str,
    ifname: str = "eth0",
    subnet: str = "10.90.0.0/24",
) -> dict[str, Any]:
    """The result's shape for `version`: bridge, host veth, container interface; one IPv4
    address on interface 2 with the subnet's gateway. Returns the address entry."""
    assert result["cniVersion"] == version
    assert set(result) <= {"cniVersion", "interfaces", "ips", "routes", "dns"}, result
    bridge, veth, inner = result["interfaces"]
    assert bridge["name"].startswith("nsbr") and re.fullmatch(
        r"([0-9a-f]{2}:){5}[0-9a-f]{2}", bridge["mac"]
    )
    assert "sandbox" not in bridge
    assert veth["name"].startswith("nsv") and "sandbox" not in veth
    assert inner["name"] == ifname and inner["sandbox"] == netns
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", inner["mac"]), inner
    (ip,) = result["ips"]
    expected_keys = {"address", "gateway", "interface"} | ({"version"} if version < "1" else set())
    assert set(ip) == expected_keys, ip
    if version < "1":
        assert ip["version"] == "4"
    assert ip["interface"] == 2
    assert ipaddress.ip_interface(ip["address"]).network == ipaddress.ip_network(subnet)
    assert ip["gateway"] == gateway_of(subnet)
    assert isinstance(result["dns"], dict)
    return dict(ip)


def assert_attached(host: Host, result: dict[str, Any], netns: str) -> None:
    """The kernel matches the result: the container's interface (MAC, address, up) and
    the host veth on the bridge."""
    bridge, veth, inner = result["interfaces"]
    link = container_links(netns)[inner["name"]]
    assert link["address"] == inner["mac"]
    assert "UP" in link["flags"], link
    addresses = [ip["address"] for ip in result["ips"]]
    assert container_addresses(netns, inner["name"]) == sorted(addresses)
    ports = [link["ifname"] for link in host.ip_json("link", "show", "master", bridge["name"])]
    assert veth["name"] in ports
    assert host.link_mac(bridge["name"]) == bridge["mac"]


# --------------------------------------------------------------------------- 1. lifecycle


@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_per_version(host: Host, runtime: Runtime, version: str) -> None:
    """ADD gives the version's result shape and the kernel matches it; CHECK (0.4.0+)
    passes; `netctl network inspect` shows the attachment; DEL twice leaves nothing;
    VERSION answers in the version asked; STATUS (1.1.0) reports ready."""
    config = conf("cninet", version=version, isDefaultGateway=True)
    netns = runtime.container("c1")
    before = state(host, runtime)

    result = runtime.add(config, "c1", netns)

    ip = assert_result(result, version, netns)
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.90.0.1"}]
    assert result["dns"] == {}
    assert_attached(host, result, netns)
    assert ("default", "10.90.0.1", "eth0") in container_routes(netns)
    (endpoint,) = inspect(host, "cninet")["Endpoints"]
    assert endpoint["Sandbox"] == endpoint["Name"] == "cni/c1/eth0"
    assert endpoint["Interface"] == "eth0"
    assert endpoint["IPv4Address"] == ip["address"]
    assert endpoint["MacAddress"] == result["interfaces"][2]["mac"]
    assert inspect(host, "cninet")["Labels"] == {"netstack.cni": "true"}
    (sandbox,) = host.netctl_json("sandbox", "ls")
    assert sandbox["Name"] == "cni/c1/eth0"

    if version in ("0.3.0", "0.3.1"):
        assert_cni_error(runtime.check(config, result, "c1", netns), 1, "CHECK")
    else:
        reply = runtime.check(config, result, "c1", netns)
        assert (reply.rc, reply.stdout) == (0, ""), reply

    version_reply = runtime.ok("VERSION", {"cniVersion": version})
    assert version_reply.doc() == {"cniVersion": version, "supportedVersions": list(VERSIONS)}
    if version == "1.1.0":
        reply = runtime.ok("STATUS", config)
        assert reply.stdout == ""
    else:
        assert_cni_error(runtime.call("STATUS", config), 1, "STATUS")

    for _ in range(2):  # DEL is idempotent
        runtime.delete({**config, "prevResult": result}, "c1", netns)
        assert inspect(host, "cninet")["Endpoints"] == []
        assert host.netctl_json("sandbox", "ls") == []
        assert veths(host) == []
        assert owned_addresses(host) == ["10.90.0.1"]
        assert list(container_links(netns)) == ["lo"]
    # The network stays (as a bridge plugin's bridge does); nothing else changed.
    after = state(host, runtime)
    for key in ("host links", "host addresses", "host routes", "nft elements", "store"):
        before.pop(key, None)
        after.pop(key, None)
    assert_unchanged(before, after)


def test_version_without_config_and_old_version(runtime: Runtime) -> None:
    """VERSION answers the latest for an empty or unknown cniVersion (it needs no config)."""
    latest = {"cniVersion": "1.1.0", "supportedVersions": list(VERSIONS)}
    assert runtime.ok("VERSION", {}).doc() == latest
    assert runtime.ok("VERSION", b"").doc() == latest
    assert runtime.ok("VERSION", {"cniVersion": "0.2.0"}).doc() == latest


# --------------------------------------------------------------------------- 2. CNI_ARGS


def test_cni_args_ip_mac_and_ignore_unknown(host: Host, runtime: Runtime) -> None:
    """IP= and MAC= are used, K8S_* keys are ignored with IgnoreUnknown=1 and refused
    (code 2, nothing made) without it; without isDefaultGateway there is no default route."""
    config = conf("argsnet", subnet="10.91.0.0/24")
    web = runtime.container("web")
    other = runtime.container("other")
    args = (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;"
        "K8S_POD_INFRA_CONTAINER_ID=web;IP=10.91.0.50;MAC=02:aa:bb:cc:dd:01"
    )

    result = runtime.add(config, "web", web, args=args)

    ip = assert_result(result, "1.0.0", web, subnet="10.91.0.0/24")
    assert ip["address"] == "10.91.0.50/24"
    assert result["interfaces"][2]["mac"] == "02:aa:bb:cc:dd:01"
    assert "routes" not in result
    assert_attached(host, result, web)
    assert container_routes(web) == [("10.91.0.0/24", "", "eth0")]  # no default route

    before = state(host, runtime)
    for bad_args in ("K8S_POD_NAME=other", "IgnoreUnknown=0;FOO=bar"):
        reply = runtime.call("ADD", config, container="other", netns=other, args=bad_args)
        assert_cni_error(reply, 2, "IgnoreUnknown")
    reply = runtime.call("ADD", config, container="other", netns=other, args="IP=10.91.0.50")
    assert_cni_error(reply, 7, "10.91.0.50")  # taken by web
    reply = runtime.call(
        "ADD", config, container="other", netns=other, args="MAC=01:00:5e:00:00:01"
    )
    assert_cni_error(reply, 7, "MAC")  # multicast
    reply = runtime.call("ADD", config, container="other", netns=other, args="IP=10.99.0.5")
    assert_cni_error(reply, 7, "10.99.0.5")  # not in the subnet
    assert_unchanged(before, state(host, runtime))

    runtime.delete(config, "web", web, args="IgnoreUnknown=1;K8S_POD_NAME=web")
    assert owned_addresses(host) == ["10.91.0.1"]


# --------------------------------------------------------------------------- 3. interfaces


def test_two_networks_eth0_and_net1(host: Host, runtime: Runtime) -> None:
    """One container on two networks (eth0 and net1): each interface with its address and
    routes (the default route only from the isDefaultGateway network, the ipam routes of
    the other via its gateway); inspect shows both; DEL of net1 keeps eth0 working."""
    front = conf("front", subnet="10.92.0.0/24", isDefaultGateway=True)
    back = conf(
        "back",
        subnet=None,
        ipam={
            "type": "netstack",
            "ranges": [[{"subnet": "10.93.0.0/24", "gateway": "10.93.0.254"}]],
            "routes": [{"dst": "10.200.0.0/16"}, {"dst": "192.0.2.128/25", "gw": "10.93.0.9"}],
        },
    )
    netns = runtime.container("pod")

    eth0 = runtime.add(front, "pod", netns)
    net1 = runtime.add(back, "pod", netns, ifname="net1")

    assert_result(eth0, "1.0.0", netns, "eth0", "10.92.0.0/24")
    (ip1,) = net1["ips"]
    assert ipaddress.ip_interface(ip1["address"]).network == ipaddress.ip_network("10.93.0.0/24")
    assert ip1["gateway"] == "10.93.0.254"
    assert net1["interfaces"][2] == {
        "name": "net1",
        "mac": net1["interfaces"][2]["mac"],
        "sandbox": netns,
    }
    assert net1["routes"] == [
        {"dst": "10.200.0.0/16", "gw": "10.93.0.254"},
        {"dst": "192.0.2.128/25", "gw": "10.93.0.9"},
    ]
    assert eth0["interfaces"][0]["name"] != net1["interfaces"][0]["name"]  # two bridges
    assert_attached(host, eth0, netns)
    assert_attached(host, net1, netns)
    assert sorted(container_links(netns)) == ["eth0", "lo", "net1"]
    assert container_routes(netns) == [
        ("10.200.0.0/16", "10.93.0.254", "net1"),
        ("10.92.0.0/24", "", "eth0"),
        ("10.93.0.0/24", "", "net1"),
        ("192.0.2.128/25", "10.93.0.9", "net1"),
        ("default", "10.92.0.1", "eth0"),
    ]
    assert endpoints(host, "front")["cni/pod/eth0"]["Interface"] == "eth0"
    assert endpoints(host, "back")["cni/pod/net1"]["Interface"] == "net1"
    for config, result, ifname in ((front, eth0, "eth0"), (back, net1, "net1")):
        reply = runtime.check(config, result, "pod", netns, ifname=ifname)
        assert reply.rc == 0, reply

    runtime.delete(back, "pod", netns, ifname="net1")

    assert sorted(container_links(netns)) == ["eth0", "lo"]
    assert container_routes(netns) == [
        ("10.92.0.0/24", "", "eth0"),
        ("default", "10.92.0.1", "eth0"),
    ]
    assert endpoints(host, "back") == {}
    assert list(endpoints(host, "front")) == ["cni/pod/eth0"]
    assert runtime.check(front, eth0, "pod", netns).rc == 0
    runtime.delete(front, "pod", netns)
    assert veths(host) == []


# --------------------------------------------------------------------------- 4. DEL


def test_del_after_the_namespace_is_gone(host: Host, runtime: Runtime) -> None:
    """The runtime removed the container first: DEL still frees the address, the veth,
    the published port and the rows; ADD into the gone namespace is code 3; a new
    container gets the same static address back."""
    config = conf(
        "gone",
        subnet="10.94.0.0/24",
        runtimeConfig={"portMappings": [{"hostPort": 8081, "containerPort": 80}]},
    )
    netns = runtime.container("dead")
    result = runtime.add(config, "dead", netns, args="IP=10.94.0.40")
    assert result["ips"][0]["address"] == "10.94.0.40/24"
    assert pub_elements(host)

    subprocess.run(["ip", "netns", "del", ns_name(netns)], check=True, timeout=60)
    runtime.containers.remove(ns_name(netns))

    runtime.delete(config, "dead", netns)
    assert endpoints(host, "gone") == {}
    assert host.netctl_json("sandbox", "ls") == []
    assert owned_addresses(host) == ["10.94.0.1"]
    assert pub_elements(host) == []
    assert store_query(host, "SELECT count(*) FROM port_bindings") == [(0,)]
    deadline = time.monotonic() + 10  # the kernel destroys a namespace asynchronously
    while veths(host) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert veths(host) == []
    runtime.delete(config, "dead", netns)  # again: still success
    runtime.delete(config, "dead")  # without CNI_NETNS, as the spec allows

    before = state(host, runtime)
    reply = runtime.call("ADD", config, container="dead", netns=netns, args="IP=10.94.0.40")
    assert_cni_error(reply, 3, netns)
    assert_unchanged(before, state(host, runtime))

    fresh = runtime.container("fresh")
    again = runtime.add(config, "fresh", fresh, args="IP=10.94.0.40")
    assert again["ips"][0]["address"] == "10.94.0.40/24"
    assert_attached(host, again, fresh)


def test_del_of_unknown_attachments_and_networks_is_success(host: Host, runtime: Runtime) -> None:
    """DEL of an attachment never added, on a network that does not exist, in a
    namespace that does not exist: success, and nothing is created."""
    netns = runtime.container("never")
    host.netctl("network", "ls")  # the store exists
    before = state(host, runtime)
    for config in (conf("nosuchnet"), conf("nosuchnet", version="0.3.0")):
        runtime.delete(config, "never", netns)
        runtime.delete(config, "never", "/run/netns/does-not-exist")
        runtime.delete(config, "never", netns, ifname="net7")
    assert_unchanged(before, state(host, runtime))
    assert host.netctl_json("network", "ls") == []


# --------------------------------------------------------------------------- 5. CHECK


def test_check_reports_what_is_wrong(host: Host, runtime: Runtime) -> None:
    """CHECK passes on a fresh attachment and names a removed route, a removed address, a
    changed MAC, a down or missing interface (code 100); CHECK of an attachment that was
    never added, or of a gone namespace, is code 3."""
    config = conf(
        "checked",
        subnet=None,
        isDefaultGateway=True,
        ipam={"subnet": "10.95.0.0/24", "routes": [{"dst": "10.201.0.0/16"}]},
    )
    netns = runtime.container("chk")
    result = runtime.add(config, "chk", netns)
    address = result["ips"][0]["address"]
    name = ns_name(netns)

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", name, *args], check=True, timeout=60)

    def expect_mismatch(*needles: str) -> None:
        doc = assert_cni_error(runtime.check(config, result, "chk", netns), 100)
        for needle in needles:
            assert needle in doc["msg"], doc

    assert runtime.check(config, result, "chk", netns).rc == 0

    ip("route", "del", "10.201.0.0/16")
    expect_mismatch("route 10.201.0.0/16 via 10.95.0.1 is missing")
    ip("route", "add", "10.201.0.0/16", "via", "10.95.0.1", "dev", "eth0")
    assert runtime.check(config, result, "chk", netns).rc == 0

    ip("route", "del", "default")
    expect_mismatch("route 0.0.0.0/0 via 10.95.0.1 is missing")
    ip("route", "add", "default", "via", "10.95.0.1", "dev", "eth0")
    assert runtime.check(config, result, "chk", netns).rc == 0

    ip("addr", "del", address, "dev", "eth0")
    expect_mismatch(f"address {address} is missing on eth0")
    ip("addr", "add", address, "dev", "eth0")
    ip("route", "replace", "10.201.0.0/16", "via", "10.95.0.1", "dev", "eth0")
    ip("route", "replace", "default", "via", "10.95.0.1", "dev", "eth0")
    assert runtime.check(config, result, "chk", netns).rc == 0, "repaired"

    mac = result["interfaces"][2]["mac"]
    ip("link", "set", "eth0", "address", "02:00:00:00:99:99")
    expect_mismatch("has MAC 02:00:00:00:99:99", mac)
    ip("link", "set", "eth0", "address", mac)

    ip("link", "set", "eth0", "down")
    expect_mismatch("eth0 is down")
    ip("link", "set", "eth0", "up")
    ip("route", "replace", "10.201.0.0/16", "via", "10.95.0.1", "dev", "eth0")
    ip("route", "replace", "default", "via", "10.95.0.1", "dev", "eth0")
    assert runtime.check(config, result, "chk", netns).rc == 0, "repaired"

    ip("link", "set", "eth0", "name", "renamed")
    expect_mismatch("interface eth0 is missing")
    ip("link", "set", "renamed", "name", "eth0")

    wrong = json.loads(json.dumps(result))
    wrong["ips"][0]["address"] = "10.95.0.200/24"
    doc = assert_cni_error(runtime.check(config, wrong, "chk", netns), 100)
    assert "10.95.0.200/24" in doc["msg"]

    unknown = runtime.check(config, result, "stranger", netns)
    assert_cni_error(unknown, 3, "stranger")
    unknown = runtime.check(config, result, "chk", netns, ifname="net1")
    assert_cni_error(unknown, 3, "net1")
    unknown = runtime.check(conf("othernet"), result, "chk", netns)
    assert_cni_error(unknown, 3, "othernet")
    no_prev = runtime.call("CHECK", config, container="chk", netns=netns)
    assert_cni_error(no_prev, 7, "prevResult")

    subprocess.run(["ip", "netns", "del", name], check=True, timeout=60)
    runtime.containers.remove(name)
    assert_cni_error(runtime.check(config, result, "chk", netns), 3, netns)


# --------------------------------------------------------------------------- 6. GC


def test_gc_keeps_valid_attachments_and_removes_the_rest(host: Host, runtime: Runtime) -> None:
    """GC with cni.dev/valid-attachments keeps the listed attachment and removes the
    others (addresses, veths, published ports, rows); the older key cni.dev/attachments
    works too; other networks' attachments are not touched."""
    ports = {"b": 8082, "c": 8083, "d": 8084}
    config = conf("gcnet", subnet="10.96.0.0/24", version="1.1.0")
    other = conf("gcother", subnet="10.97.0.0/24", version="1.1.0")
    results = {}
    for cid in ("a", "b", "c", "d"):
        netns = runtime.container(cid)
        mappings = [{"hostPort": ports[cid], "containerPort": 80}] if cid in ports else []
        results[cid] = runtime.add(
            {**config, "runtimeConfig": {"portMappings": mappings}}, cid, netns
        )
    results["o"] = runtime.add(other, "o", runtime.container("o"))
    assert len(pub_elements(host)) == 3
    keep_veths = {results[cid]["interfaces"][1]["name"] for cid in ("a", "o")}

    def address(cid: str) -> str:
        return str(ipaddress.ip_interface(results[cid]["ips"][0]["address"]).ip)

    valid = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net9"}]
    reply = runtime.ok("GC", {**config, "cni.dev/valid-attachments": valid})
    assert reply.stdout == ""

    assert sorted(endpoints(host, "gcnet")) == ["cni/a/eth0"]  # b's ifname differs
    assert sorted(endpoints(host, "gcother")) == ["cni/o/eth0"]
    assert owned_addresses(host) == sorted(["10.96.0.1", "10.97.0.1", address("a"), address("o")])
    assert set(veths(host)) == keep_veths
    assert pub_elements(host) == []
    assert store_query(host, "SELECT count(*) FROM port_bindings") == [(0,)]
    assert sorted(s["Name"] for s in host.netctl_json("sandbox", "ls")) == [
        "cni/a/eth0",
        "cni/o/eth0",
    ]
    for cid in ("b", "c", "d"):
        assert list(container_links(f"/run/netns/{host.name}-{cid}")) == ["lo"], cid
    assert runtime.check(config, results["a"], "a", f"/run/netns/{host.name}-a").rc == 0

    # The older key; and a re-added attachment is collected again.
    results["d"] = runtime.add(config, "d", f"/run/netns/{host.name}-d")
    runtime.ok("GC", {**config, "cni.dev/attachments": [{"containerID": "a", "ifname": "eth0"}]})
    assert sorted(endpoints(host, "gcnet")) == ["cni/a/eth0"]
    assert address("d") not in owned_addresses(host)
    assert set(veths(host)) == keep_veths

    # An empty list removes every attachment of the network, and GC is idempotent.
    for _ in range(2):
        runtime.ok("GC", {**config, "cni.dev/valid-attachments": []})
        assert endpoints(host, "gcnet") == {}
        assert owned_addresses(host) == sorted(["10.96.0.1", "10.97.0.1", address("o")])
    assert sorted(endpoints(host, "gcother")) == ["cni/o/eth0"]


# --------------------------------------------------------------------------- 7. host-local


def host_local_conf(data_dir: Path, version: str = "1.0.0", **fields: Any) -> dict[str, Any]:
    return conf(
        "hlnet",
        subnet=None,
        version=version,
        ipam={
            "type": "host-local",
            "ranges": [[{"subnet": "10.98.0.0/24", "rangeStart": "10.98.0.100"}]],
            "routes": [{"dst": "10.202.0.0/16"}],
            "dataDir": str(data_dir),
        },
        **fields,
    )


@pytest.mark.skipif(not HOST_LOCAL.exists(), reason="needs the reference host-local plugin")
def test_host_local_ipam(host: Host, runtime: Runtime) -> None:
    """ipam host-local from CNI_PATH: its address, gateway and routes are the attachment's;
    CHECK passes; a failing ADD (port conflict) releases host-local's address too; DEL
    releases the lease."""
    data_dir = runtime.tmp / "host-local"
    config = host_local_conf(
        data_dir, runtimeConfig={"portMappings": [{"hostPort": 8085, "containerPort": 80}]}
    )
    first = runtime.container("hl1")
    second = runtime.container("hl2")

    result = runtime.add(config, "hl1", first)

    assert_result(result, "1.0.0", first, subnet="10.98.0.0/24")
    assert result["ips"][0]["address"] == "10.98.0.100/24"
    assert result["routes"] == [{"dst": "10.202.0.0/16", "gw": "10.98.0.1"}]
    assert_attached(host, result, first)
    assert ("10.202.0.0/16", "10.98.0.1", "eth0") in container_routes(first)
    assert lease_files(data_dir, "hlnet") == {"10.98.0.100": "hl1\neth0"}
    assert endpoints(host, "hlnet")["cni/hl1/eth0"]["IPv4Address"] == "10.98.0.100/24"
    assert runtime.check(config, result, "hl1", first).rc == 0

    before = state(host, runtime)
    reply = runtime.call("ADD", config, container="hl2", netns=second)
    assert_cni_error(reply, 7, "8085")
    assert_unchanged(before, state(host, runtime))
    assert lease_files(data_dir, "hlnet") == {"10.98.0.100": "hl1\neth0"}

    plain = {k: v for k, v in config.items() if k != "runtimeConfig"}
    result2 = runtime.add(plain, "hl2", second)
    assert result2["ips"][0]["address"] == "10.98.0.102/24"  # host-local is serial too
    assert sorted(lease_files(data_dir, "hlnet")) == ["10.98.0.100", "10.98.0.102"]

    runtime.delete(config, "hl1", first)
    assert lease_files(data_dir, "hlnet") == {"10.98.0.102": "hl2\neth0"}
    assert list(endpoints(host, "hlnet")) == ["cni/hl2/eth0"]
    runtime.delete(config, "hl1", first)  # again: host-local's DEL is idempotent too
    runtime.delete(plain, "hl2", second)
    assert lease_files(data_dir, "hlnet") == {}
    assert endpoints(host, "hlnet") == {}
    assert owned_addresses(host) == ["10.98.0.1"]


# --------------------------------------------------------------------------- 8. capabilities


@contextlib.contextmanager
def server_in(netns: str, port: int, tag: str) -> Iterator[None]:
    """A TCP server in the container answering "<tag> <peer address>"."""
    argv = ["ip", "netns", "exec", ns_name(netns), sys.executable, "-I", "-S", "-c", SERVER]
    proc = subprocess.Popen(
        [*argv, str(port), tag],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "READY", f"server did not start: {line!r}"
        yield
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def tcp_ask(netns_name: str, address: str, port: int, timeout: float) -> str | None:
    sock = run_in(netns_name, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        return None
    finally:
        sock.close()
    return data.decode().strip() or None


def reach(netns_name: str, address: str, port: int) -> str:
    deadline = time.monotonic() + REACH_TIMEOUT
    while True:
        answer = tcp_ask(netns_name, address, port, 1.0)
        if answer is not None:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{address}:{port} never answered from {netns_name}")
        time.sleep(0.1)


def test_capabilities_port_mappings_ips_mac_dns(host: Host, runtime: Runtime) -> None:
    """runtimeConfig: portMappings (real TCP from outside through the mapped host port,
    the client's address kept), ips (a static address), mac, and dns in the result; DEL
    unpublishes the port."""
    outside = host.outside()
    config = conf(
        "capnet",
        subnet="10.99.0.0/24",
        isDefaultGateway=True,
        dns={"domain": "example.test", "nameservers": ["192.0.2.53"]},
        capabilities={"portMappings": True, "ips": True, "mac": True, "dns": True},
        runtimeConfig={
            "portMappings": [
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
            ],
            "ips": ["10.99.0.77/24"],
            "mac": "02:42:0a:63:00:4d",
            "dns": {
                "servers": ["10.99.0.1"],
                "searches": ["svc.cluster.local", "cluster.local"],
                "options": ["ndots:5"],
            },
        },
    )
    netns = runtime.container("cap")

    result = runtime.add(config, "cap", netns)

    assert result["ips"][0]["address"] == "10.99.0.77/24"
    assert result["interfaces"][2]["mac"] == "02:42:0a:63:00:4d"
    assert result["dns"] == {
        "domain": "example.test",
        "nameservers": ["10.99.0.1"],
        "search": ["svc.cluster.local", "cluster.local"],
        "options": ["ndots:5"],
    }
    assert_attached(host, result, netns)
    (endpoint,) = inspect(host, "capnet")["Endpoints"]
    assert sorted(
        (p["HostPort"], p["ContainerPort"], p["Protocol"]) for p in endpoint["Ports"]
    ) == [
        (5353, 53, "udp"),
        (8080, 80, "tcp"),
    ]
    elements = pub_elements(host)
    assert any("8080" in e and "10.99.0.77" in e for e in elements), elements
    assert any("5353" in e and "10.99.0.77" in e for e in elements), elements

    with server_in(netns, 80, "cap"):
        assert reach(outside.name, outside.host_addr4, 8080) == f"cap {outside.addr4}"

    runtime.delete(config, "cap", netns)
    assert pub_elements(host) == []
    assert tcp_ask(outside.name, outside.host_addr4, 8080, 1.0) is None


def test_mtu_bridge_name_and_ipam_routes(host: Host, runtime: Runtime) -> None:
    """bridge and mtu configure the bridge and the veth; a second config for the same
    network with another subnet or bridge is refused (code 7) and changes nothing."""
    config = conf("mtunet", subnet="10.100.0.0/24", bridge="cnimtu0", mtu=1400)
    netns = runtime.container("mtu")
    result = runtime.add(config, "mtu", netns)
    assert result["interfaces"][0]["name"] == "cnimtu0"
    assert container_links(netns)["eth0"]["mtu"] == 1400
    (bridge,) = host.ip_json("link", "show", "dev", "cnimtu0")
    assert bridge["mtu"] == 1400
    assert inspect(host, "mtunet")["Options"]["bridge.name"] == "cnimtu0"

    other = runtime.container("mtu2")
    before = state(host, runtime)
    for changed, needle in (
        ({**config, "ipam": {"subnet": "10.101.0.0/24"}}, "10.101.0.0/24"),
        ({**config, "bridge": "cniother0"}, "cniother0"),
    ):
        reply = runtime.call("ADD", changed, container="mtu2", netns=other)
        assert_cni_error(reply, 7, needle)
    assert_unchanged(before, state(host, runtime))


def test_is_gateway_false_and_hairpin_off(host: Host, runtime: Runtime) -> None:
    """isGateway false: the bridge carries no gateway address (reference bridge plugin);
    hairpinMode false: the veth's bridge port has hairpin off."""
    config = conf("nogw", subnet="10.102.0.0/24", isGateway=False, hairpinMode=False)
    netns = runtime.container("nogw")
    result = runtime.add(config, "nogw", netns)
    bridge, veth, _ = result["interfaces"]
    (details,) = host.ip_json("-d", "link", "show", "dev", veth["name"])
    assert details["linkinfo"]["info_slave_data"]["hairpin"] is False
    assert global_addresses(host.ip_json("addr", "show", "dev", bridge["name"])) == {
        bridge["name"]: []
    }


# --------------------------------------------------------------------------- 9. errors


def test_errors_refused_before_any_work(host: Host, runtime: Runtime) -> None:
    """Every refusal is a spec error document on stdout with the right code and a
    non-zero exit status, and leaves the store and the kernel as they were."""
    existing = conf("errnet", subnet="10.103.0.0/24")
    netns = runtime.container("err")
    runtime.add(existing, "ok", runtime.container("ok"))
    before = state(host, runtime)
    fresh = conf("errfresh", subnet="10.104.0.0/24")
    add = {"container": "err", "netns": netns}
    cases: list[tuple[str, int, str | None, Any, dict[str, Any], str]] = [
        # (what, code, command, stdin, call keywords, needle)
        ("not JSON", 6, "ADD", b"{not json", add, "decode"),
        ("not UTF-8", 6, "ADD", b'{"cniVersion": "1.0.0", "name": "\xff"}', add, "decode"),
        ("an array", 6, "ADD", b"[]", add, "object"),
        ("empty stdin", 6, "ADD", b"", add, "decode"),
        (
            "no cniVersion",
            7,
            "ADD",
            {k: v for k, v in fresh.items() if k != "cniVersion"},
            add,
            "cniVersion",
        ),
        ("bad name", 7, "ADD", {**fresh, "name": "bad name"}, add, "bad name"),
        ("driver", 7, "ADD", {**fresh, "driver": "macvlan"}, add, "macvlan"),
        ("bad subnet", 7, "ADD", conf("errfresh", subnet="10.104.0.0/40"), add, "10.104.0.0/40"),
        ("bad mtu", 7, "ADD", {**fresh, "mtu": "1400"}, add, "mtu"),
        (
            "bad route",
            7,
            "ADD",
            {**fresh, "ipam": {"subnet": "10.104.0.0/24", "routes": [{"gw": "10.104.0.1"}]}},
            add,
            "dst",
        ),
        (
            "ipam not found",
            7,
            "ADD",
            {**fresh, "ipam": {"type": "no-such-ipam"}},
            add,
            "no-such-ipam",
        ),
        (
            "empty CNI_PATH",
            7,
            "ADD",
            {**fresh, "ipam": {"type": "host-local"}},
            {**add, "path": ""},
            "CNI_PATH",
        ),
        ("version 0.2.0", 1, "ADD", {**fresh, "cniVersion": "0.2.0"}, add, "0.2.0"),
        (
            "version 2.0.0",
            1,
            "DEL",
            {**existing, "cniVersion": "2.0.0"},
            {"container": "ok"},
            "2.0.0",
        ),
        (
            "CHECK 0.3.1",
            1,
            "CHECK",
            {**existing, "cniVersion": "0.3.1", "prevResult": {}},
            {"container": "ok", "netns": netns},
            "CHECK",
        ),
        ("GC 1.0.0", 1, "GC", {**existing, "cni.dev/valid-attachments": []}, {}, "GC"),
        ("STATUS 0.4.0", 1, "STATUS", {**existing, "cniVersion": "0.4.0"}, {}, "STATUS"),
        ("unknown key", 2, "ADD", {**fresh, "isDefaultGatway": True}, add, "isDefaultGatway"),
        ("unknown key on DEL", 2, "DEL", {**existing, "vlan": 5}, {"container": "ok"}, "vlan"),
        (
            "rangeStart",
            2,
            "ADD",
            {**fresh, "ipam": {"subnet": "10.104.0.0/24", "rangeStart": "10.104.0.9"}},
            add,
            "rangeStart",
        ),
        ("unknown CNI_ARGS", 2, "ADD", fresh, {**add, "args": "K8S_POD_NAME=x"}, "K8S_POD_NAME"),
        ("no netns", 3, "ADD", fresh, {**add, "netns": f"{netns}-missing"}, "does not exist"),
        ("no CNI_COMMAND", 4, None, fresh, add, "CNI_COMMAND"),
        ("bad CNI_COMMAND", 4, "INSPECT", fresh, add, "INSPECT"),
        ("no CNI_CONTAINERID", 4, "ADD", fresh, {"netns": netns}, "CNI_CONTAINERID"),
        ("no CNI_NETNS", 4, "ADD", fresh, {"container": "err"}, "CNI_NETNS"),
        ("no CNI_IFNAME", 4, "ADD", fresh, {**add, "ifname": ""}, "CNI_IFNAME"),
        (
            "CNI_IFNAME too long",
            4,
            "ADD",
            fresh,
            {**add, "ifname": "eth0123456789012"},
            "CNI_IFNAME",
        ),
        ("relative CNI_NETNS", 4, "ADD", fresh, {**add, "netns": "run/netns/x"}, "CNI_NETNS"),
        ("bad CNI_ARGS", 4, "ADD", fresh, {**add, "args": "IP=10.104.0.5;junk"}, "junk"),
        ("bad CNI_CONTAINERID", 4, "DEL", existing, {"container": "../ok"}, "CNI_CONTAINERID"),
    ]
    failures = []
    for what, code, command, stdin, keywords, needle in cases:
        reply = runtime.call(command, stdin, **keywords)
        try:
            assert_cni_error(reply, code, needle)
        except AssertionError as exc:
            failures.append(f"{what}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert_unchanged(before, state(host, runtime))
    assert [n["Name"] for n in host.netctl_json("network", "ls")] == ["errnet"]


def test_failing_adds_leave_nothing(host: Host, runtime: Runtime) -> None:
    """ADDs that fail after work began (a new network, an address, a veth, a port) undo
    all of it: a bad static address on a fresh network, a taken interface name, a port
    already published, an exhausted pool (code 11), a duplicate ADD."""
    small = conf("small", subnet="10.105.0.0/30", version="0.4.0")  # one usable address
    taken = runtime.container("taken")
    held = runtime.add(
        {**small, "runtimeConfig": {"portMappings": [{"hostPort": 8086, "containerPort": 80}]}},
        "taken",
        taken,
    )
    netns = runtime.container("victim")
    before = state(host, runtime)
    fresh = conf("freshnet", subnet="10.106.0.0/24")
    cases: list[tuple[str, int, dict[str, Any], dict[str, Any], str]] = [
        ("static IP outside a new network", 7, fresh, {"args": "IP=10.1.2.3"}, "10.1.2.3"),
        ("bad MAC on a new network", 7, {**fresh, "runtimeConfig": {"mac": "zz"}}, {}, "zz"),
        ("ifname taken (lo)", 7, fresh, {"ifname": "lo"}, "lo"),
        (
            "port already published",
            7,
            {**fresh, "runtimeConfig": {"portMappings": [{"hostPort": 8086, "containerPort": 80}]}},
            {},
            "8086",
        ),
        (
            "port on a bad host IP",
            7,
            {
                **fresh,
                "runtimeConfig": {
                    "portMappings": [
                        {"hostPort": 8087, "containerPort": 80, "hostIP": "192.0.2.99"}
                    ]
                },
            },
            {},
            "192.0.2.99",
        ),
        ("pool exhausted", 11, small, {}, "10.105.0.0/30"),
        ("duplicate ADD", 7, small, {"container": "taken", "netns": taken}, "DEL it first"),
    ]
    failures = []
    for what, code, config, keywords, needle in cases:
        keywords = {"container": "victim", "netns": netns, **keywords}
        reply = runtime.call("ADD", config, **keywords)
        try:
            assert_cni_error(reply, code, needle, config["cniVersion"])
            assert_unchanged(before, state(host, runtime))
        except AssertionError as exc:
            failures.append(f"{what}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert runtime.check(small, held, "taken", taken).rc == 0


def fake_ipam(directory: Path, name: str, body: str) -> None:
    """An IPAM plugin `name` in `directory` running the shell `body`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\ncat >/dev/null\n{body}\n")
    path.chmod(0o755)


def test_failing_ipam_plugins(host: Host, runtime: Runtime) -> None:
    """A delegated IPAM plugin that crashes, is killed, prints garbage or no result is
    code 5; its own error code is passed on (11 here); one that is not executable is not
    found (code 7). Nothing is left behind, no network is made."""
    plugins = runtime.tmp / "plugins"
    fake_ipam(plugins, "crashes", "echo 'panic: runtime error' >&2; exit 2")
    fake_ipam(plugins, "killed", "kill -9 $$")
    fake_ipam(plugins, "garbage", "echo 'not json'; exit 1")
    fake_ipam(plugins, "silent", "exit 0")
    fake_ipam(
        plugins,
        "busy",
        'echo \'{"cniVersion":"1.0.0","code":11,"msg":"pool busy","details":"later"}\'; exit 1',
    )
    fake_ipam(plugins, "noexec", "exit 0")
    (plugins / "noexec").chmod(0o644)
    netns = runtime.container("ipam")
    host.netctl("network", "ls")
    before = state(host, runtime)
    cases = [
        ("crashes", 5, "crashes"),
        ("killed", 5, "killed"),
        ("garbage", 5, "not json"),
        ("silent", 5, "no JSON result"),
        ("busy", 11, "pool busy"),
        ("noexec", 7, "not found"),
    ]
    failures = []
    for ipam, code, needle in cases:
        config = conf("ipamnet", subnet=None, ipam={"type": ipam})
        reply = runtime.call(
            "ADD", config, container="ipam", netns=netns, path=f"{plugins}:{CNI_PATH}"
        )
        try:
            assert_cni_error(reply, code, needle)
        except AssertionError as exc:
            failures.append(f"{ipam}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert_unchanged(before, state(host, runtime))
    assert host.netctl_json("network", "ls") == []


# --------------------------------------------------------------------------- 10. concurrency


def start_daemon(host: Host) -> None:
    host.daemons.start()
    host.daemons.wait_running(timeout=60)


def run_concurrently(
    runtime: Runtime, calls: Sequence[tuple[dict[str, str], bytes]]
) -> list[Reply]:
    """Start every plugin process before waiting for any."""
    procs = [runtime.start(env, stdin) for env, stdin in calls]
    replies = []
    try:
        for proc, (_env, stdin) in zip(procs, calls, strict=True):
            out, err = proc.communicate(stdin, timeout=TIMEOUT)
            replies.append(Reply(proc.returncode, out.decode(), err.decode()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return replies


@pytest.mark.parametrize("mode", ["standalone", "netstackd"])
def test_concurrent_adds_and_dels(host: Host, runtime: Runtime, mode: str) -> None:
    """32 ADDs at once into a network none of them finds (they race to create it): one
    network, 32 distinct addresses, each container configured; then 32 DELs at once leave
    no endpoint, veth, address, port or sandbox. With netstackd every call goes through it
    (the plugin is pointed at an empty state directory the daemon never reads)."""
    extra: dict[str, str] = {}
    bogus = runtime.tmp / "unused-state"
    if mode == "netstackd":
        start_daemon(host)
        extra = {"NETSTACK_STATE_DIR": str(bogus)}
    config = conf("racenet", subnet="10.107.0.0/24")
    names = [f"k{i}" for i in range(CONCURRENT)]
    netns = {name: runtime.container(name) for name in names}

    def stdin_of(i: int) -> bytes:
        mappings = [{"hostPort": 20000 + i, "containerPort": 80}]
        return json.dumps({**config, "runtimeConfig": {"portMappings": mappings}}).encode()

    adds = run_concurrently(
        runtime,
        [
            (runtime.env("ADD", name, netns[name], extra=extra), stdin_of(i))
            for i, name in enumerate(names)
        ],
    )
    failures = [f"{name}: {reply}" for name, reply in zip(names, adds, strict=True) if reply.rc]
    assert not failures, "\n".join(failures)

    results = {name: reply.doc() for name, reply in zip(names, adds, strict=True)}
    addresses = {name: result["ips"][0]["address"] for name, result in results.items()}
    assert len(set(addresses.values())) == CONCURRENT, sorted(addresses.values())
    assert [n["Name"] for n in host.netctl_json("network", "ls")] == ["racenet"]
    assert len(bridges(host)) == 1
    assert {r["interfaces"][0]["name"] for r in results.values()} == set(bridges(host))
    found = endpoints(host, "racenet")
    assert sorted(found) == sorted(f"cni/{name}/eth0" for name in names)
    for name in names:
        assert found[f"cni/{name}/eth0"]["IPv4Address"] == addresses[name]
        assert container_addresses(netns[name], "eth0") == [addresses[name]], name
    assert len(veths(host)) == CONCURRENT
    assert len(pub_elements(host)) == CONCURRENT
    if mode == "netstackd":
        assert not bogus.exists(), "a plugin ran in-process"

    dels = run_concurrently(
        runtime,
        [
            (runtime.env("DEL", name, netns[name], extra=extra), stdin_of(i))
            for i, name in enumerate(names)
        ],
    )
    failures = [f"{name}: {reply}" for name, reply in zip(names, dels, strict=True) if reply.rc]
    assert not failures, "\n".join(failures)
    assert all(reply.stdout == "" for reply in dels)

    assert endpoints(host, "racenet") == {}
    assert host.netctl_json("sandbox", "ls") == []
    if mode == "netstackd":  # it deletes the veths right after replying, off DEL's path
        deadline = time.monotonic() + 15
        while veths(host) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert veths(host) == []
    assert owned_addresses(host) == ["10.107.0.1"]
    assert pub_elements(host) == []
    assert store_query(host, "SELECT count(*) FROM port_bindings") == [(0,)]
    for name in names:
        assert list(container_links(netns[name])) == ["lo"], name
    if mode == "netstackd":
        assert not bogus.exists(), "a plugin ran in-process"


# --------------------------------------------------------------------------- 11. fast path


def normalised(result: dict[str, Any], container: str) -> dict[str, Any]:
    """A result with the generated parts (veth name, container MAC, address) and the
    container's name replaced."""
    doc = json.loads(json.dumps(result).replace(container, "<cid>"))
    doc["interfaces"][1]["name"] = "<veth>"
    doc["interfaces"][2]["mac"] = "<mac>"
    for ip in doc["ips"]:
        ip["address"] = "<address>/" + ip["address"].split("/")[1]
    return dict(doc)


@BOTH_PLUGINS
def test_fast_path_gives_the_in_process_results(host: Host, runtime: Runtime) -> None:
    """The same calls with and without netstackd: identical results (modulo generated
    names, MACs, addresses), identical errors, identical kernel state. With netstackd
    running the calls go through it: the plugin's own state directory is never used."""
    bogus = runtime.tmp / "unused-state"
    via_daemon = {"NETSTACK_STATE_DIR": str(bogus)}
    config = conf(
        "fastnet",
        subnet="10.108.0.0/24",
        isDefaultGateway=True,
        dns={"nameservers": ["10.108.0.1"]},
        runtimeConfig={"portMappings": [{"hostPort": 8088, "containerPort": 80}]},
    )
    netns = {mode: runtime.container(mode) for mode in ("local", "daemon")}

    def scenario(mode: str, extra: dict[str, str]) -> dict[str, Any]:
        """ADD, CHECK, the kernel's view, error replies, DEL; what each gave."""
        path = netns[mode]
        seen: dict[str, Any] = {}
        for version in ("0.3.1", "1.1.0"):
            cfg = {**config, "cniVersion": version}
            result = runtime.add(cfg, mode, path, extra=extra)
            seen[f"add {version}"] = normalised(result, mode)
            if version == "1.1.0":
                check = runtime.check(cfg, result, mode, path, extra=extra)
                seen["check"] = (check.rc, check.stdout)
                status = runtime.call("STATUS", cfg, extra=extra)
                seen["status"] = (status.rc, status.stdout)
            seen[f"routes {version}"] = container_routes(path)
            seen[f"links {version}"] = sorted(container_links(path))
            seen[f"pub {version}"] = len(pub_elements(host))
            for what, call in (
                ("duplicate", {"container": mode, "netns": path}),
                ("no netns", {"container": mode, "netns": f"{path}-missing"}),
                ("bad args", {"container": "x", "netns": path, "args": "FOO=1"}),
            ):
                reply = runtime.call("ADD", cfg, extra=extra, **call)
                seen[f"{what} {version}"] = (reply.rc, reply.stdout.replace(mode, "<cid>"))
            bad = runtime.call("ADD", b"{", container=mode, netns=path, extra=extra)
            seen[f"decode {version}"] = (bad.rc, bad.stdout)
            runtime.delete(cfg, mode, path, extra=extra)
            runtime.delete(cfg, mode, path, extra=extra)
            seen[f"after del {version}"] = (len(veths(host)), owned_addresses(host))
        gc = runtime.call("GC", {**config, "cniVersion": "1.1.0"}, extra=extra)
        seen["gc"] = (gc.rc, gc.stdout)
        return seen

    local = scenario("local", {"NETSTACK_CNI_IN_PROCESS": "1"})
    start_daemon(host)
    daemon = scenario("daemon", via_daemon)

    assert not bogus.exists(), "the plugin worked in-process while netstackd ran"
    assert daemon == local
    assert local["add 1.1.0"]["dns"] == {"nameservers": ["10.108.0.1"]}
    assert local["check"] == (0, "")
    assert json.loads(local["duplicate 1.1.0"][1])["code"] == 7
    assert json.loads(local["no netns 0.3.1"][1])["code"] == 3
    assert json.loads(local["bad args 0.3.1"][1])["code"] == 2
    assert json.loads(local["decode 0.3.1"][1])["code"] == 6

    # NETSTACK_CNI_IN_PROCESS makes the plugin skip a running daemon: its own state
    # directory is used then (another network, so the two stores do not compete).
    inproc = conf("inproc", subnet="10.110.0.0/24")
    result = runtime.add(
        inproc, "local", netns["local"], extra={"NETSTACK_CNI_IN_PROCESS": "1", **via_daemon}
    )
    assert (bogus / "state.db").exists()
    assert result["ips"][0]["address"] == "10.110.0.2/24"
    assert "inproc" not in [n["Name"] for n in host.netctl_json("network", "ls")]


class FakeDaemon:
    """A unix socket at the daemon's path that reads one request and answers `reply`
    (None: closes without answering, like a daemon dying mid-request)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []  # every request, "reload" ones too
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(30)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                request = json.loads(data)
                self.requests.append(request)
                if request.get("op") != "cni":  # netctl's "reload" notifications
                    conn.sendall(b'{"ok": true, "result": {}}\n')
                elif self.reply is not None:
                    conn.sendall(self.reply)

    def cni_requests(self) -> list[dict[str, Any]]:
        return [request for request in self.requests if request.get("op") == "cni"]

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.sock.close()


@contextlib.contextmanager
def fake_daemon(host: Host, reply: bytes | None) -> Iterator[FakeDaemon]:
    host.run_dir.mkdir(parents=True, exist_ok=True)
    path = host.run_dir / "netstackd.sock"
    daemon = FakeDaemon(path, reply)
    try:
        yield daemon
    finally:
        daemon.close()
        path.unlink(missing_ok=True)


@BOTH_PLUGINS
def test_daemon_going_away_is_try_again_later(host: Host, runtime: Runtime) -> None:
    """netstackd took the request and closed without answering: code 11, and the plugin
    does not redo the work in-process. A daemon answering with a JSON error (an old one
    without the cni op) makes the plugin fall back to in-process. VERSION never asks it."""
    config = conf("fakenet", subnet="10.109.0.0/24")
    netns = runtime.container("fake")
    host.netctl("network", "ls")
    before = state(host, runtime)

    with fake_daemon(host, None) as daemon:
        reply = runtime.call("ADD", config, container="fake", netns=netns, args="IgnoreUnknown=1")
        assert_cni_error(reply, 11, "netstackd did not finish")
        (request,) = daemon.cni_requests()
        assert request["op"] == "cni" and request["reply"] == "raw"
        assert json.loads(request["stdin"]) == config
        assert request["env"]["CNI_COMMAND"] == "ADD"
        assert request["env"]["CNI_ARGS"] == "IgnoreUnknown=1"
        assert all(key.startswith("CNI_") for key in request["env"])
        assert runtime.ok("VERSION", {"cniVersion": "1.0.0"}).doc()["cniVersion"] == "1.0.0"
        assert len(daemon.cni_requests()) == 1
    assert_unchanged(before, state(host, runtime))

    with fake_daemon(host, b'{"ok": false, "error": "unknown op \'cni\'"}\n') as daemon:
        result = runtime.add(config, "fake", netns)
        assert len(daemon.cni_requests()) == 1
        assert {"op": "reload"} in daemon.requests  # the in-process plugin notified it
    assert_result(result, "1.0.0", netns, subnet="10.109.0.0/24")
    assert list(endpoints(host, "fakenet")) == ["cni/fake/eth0"]

    with fake_daemon(host, b"0 50\nshort") as daemon:  # a reply cut short is not a result
        reply = runtime.call("DEL", config, container="fake", netns=netns)
        assert_cni_error(reply, 11, "short reply")
    assert list(endpoints(host, "fakenet")) == ["cni/fake/eth0"]
