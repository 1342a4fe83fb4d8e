"""End to end: Docker's engine (Debian 12's dockerd 20.10) runs containers on netstack.

Each module (per xdist worker) starts its own host namespace, netstackd serving the plugin
as `netstack-<host>` in /run/docker/plugins, and a private dockerd in that namespace (see
docker_engine.py). The namespace starts with IPv4 forwarding off, as on a fresh machine,
so dockerd turns it on and sets iptables' FORWARD policy to DROP: netstack traffic must
still flow (DOCKER-USER coexistence). Every test removes what it made, so the kernel
checks after `docker network rm` see only what that test left.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from docker_engine import IMAGE, PLUGIN_DIR, DockerEngine, skip_reason

from netstack.kernel.netns import run_in

if TYPE_CHECKING:
    from conftest import Host, Outside

_reason = skip_reason()
pytestmark = [pytest.mark.root, pytest.mark.skipif(bool(_reason), reason=_reason or "")]


@dataclass
class Engine:
    host: Host
    docker: DockerEngine
    outside: Outside
    base: Path

    @property
    def plugin(self) -> str:
        return self.docker.plugin

    def network(self, name: str, *args: str, ipam: bool = True) -> None:
        ipam_args = ["--ipam-driver", self.plugin] if ipam else []
        self.docker("network", "create", "-d", self.plugin, *ipam_args, *args, name)

    def run(self, name: str, network: str, *args: str, command: tuple[str, ...] = ()) -> None:
        self.docker(
            "run", "-d", "--name", name, "--network", network, *args, IMAGE,
            *(command or ("sleep", "600")),
        )  # fmt: skip

    def ping(self, container: str, target: str) -> bool:
        proc = self.docker.exec(container, "ping", "-c1", "-W2", target, check=False)
        return proc.returncode == 0

    def netstackd_env(self) -> dict[str, str]:
        return {
            "NETSTACK_DOCKER_PLUGIN": self.plugin,
            "NETSTACK_DOCKER_PLUGIN_DIR": str(PLUGIN_DIR),
        }

    def start_netstackd(self) -> None:
        self.host.daemons.start(extra_env=self.netstackd_env(), log=self.base / "netstackd.log")
        self.host.daemons.wait_running()
        sock = PLUGIN_DIR / f"{self.plugin}.sock"
        assert sock.exists(), f"netstackd did not make {sock}"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    import conftest

    base = tmp_path_factory.mktemp("docker")
    host = conftest._create_host(base / "host")
    docker = DockerEngine(host, base / "engine")
    try:
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=0")  # a fresh machine's setting
        outside = host.outside()
        engine = Engine(host, docker, outside, base)
        engine.start_netstackd()
        docker.start()
        docker.import_busybox()
        yield engine
    finally:
        docker.close()
        conftest._destroy_host(host)
        (PLUGIN_DIR / f"{docker.plugin}.sock").unlink(missing_ok=True)  # left by a killed one


@contextlib.contextmanager
def made(engine: Engine, containers: list[str], networks: list[str]) -> Iterator[None]:
    """Remove the named containers and networks afterwards, also when the test fails."""
    try:
        yield
    finally:
        if containers:
            engine.docker("rm", "-f", *containers, check=False)
        for network in networks:
            engine.docker("network", "rm", network, check=False)


def netstack_links(host: Host) -> list[str]:
    return [name for name in host.links() if name.startswith(("nsbr", "nsv", "nsp", "nsw", "nsy"))]


def netstack_elements(host: Host) -> dict[str, Any]:
    """Set and map elements in table inet netstack, by set name (non-empty ones only)."""
    ruleset = host.nft_ruleset()["nftables"]
    found: dict[str, Any] = {}
    for item in ruleset:
        for kind in ("set", "map"):
            body = item.get(kind)
            if body and body.get("table") == "netstack" and body.get("elem"):
                found[body["name"]] = body["elem"]
    return found


def docker_user_rules(host: Host) -> list[str]:
    return host.run("iptables", "-w", "-S", "DOCKER-USER").stdout.splitlines()


def assert_nothing_left(engine: Engine) -> None:
    # a veth may be deleted just after the reply (netstackd reaps them in the background)
    deadline = time.monotonic() + 10
    while netstack_links(engine.host) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert netstack_links(engine.host) == []
    assert netstack_elements(engine.host) == {}
    assert not [rule for rule in docker_user_rules(engine.host) if "netstack" in rule]
    assert engine.host.netctl_json("network", "ls") == []
    assert engine.host.netctl_json("sandbox", "ls") == []


def test_containers_talk_by_ip_and_name_networks_isolate(engine: Engine) -> None:
    docker, host = engine.docker, engine.host
    assert "-P FORWARD DROP" in host.run("iptables", "-w", "-S", "FORWARD").stdout
    with made(engine, ["a1", "a2", "b1"], ["e2e-a", "e2e-b"]):
        engine.network("e2e-a", "-o", "com.docker.network.driver.mtu=1400")
        engine.network("e2e-b", ipam=False)  # Docker's default IPAM
        engine.run("a1", "e2e-a")
        engine.run("a2", "e2e-a")
        engine.run("b1", "e2e-b")
        a2 = docker.container_ip("a2", "e2e-a")
        assert engine.ping("a1", a2)
        assert engine.ping("a1", "a2")  # Docker's embedded DNS
        assert not engine.ping("b1", a2)
        assert "mtu 1400" in docker.exec("a1", "ip", "link", "show", "eth0").stdout
        for name in ("a1", "a2"):  # a2's pair was made ahead (drivers/bridge/spares.py)
            networks = docker.inspect("container", name)["NetworkSettings"]["Networks"]
            eth0 = docker.exec(name, "cat", "/sys/class/net/eth0/address").stdout.strip()
            assert eth0 == networks["e2e-a"]["MacAddress"], name

        networks = {n["Id"]: n for n in host.netctl_json("network", "ls")}
        docker_a = docker.inspect("network", "e2e-a")
        assert networks[docker_a["Id"]]["Name"] == f"docker-{docker_a['Id'][:12]}"
        (inspected,) = host.netctl_json("network", "inspect", docker_a["Id"])
        addresses = {e["IPv4Address"].split("/")[0] for e in inspected["Endpoints"]}
        assert addresses == {docker.container_ip("a1", "e2e-a"), a2}

        docker("network", "connect", "e2e-a", "b1")
        assert engine.ping("b1", a2)
        assert "eth1" in docker.exec("b1", "ip", "link").stdout
        docker("network", "disconnect", "e2e-a", "b1")
        assert "eth1" not in docker.exec("b1", "ip", "link").stdout
        assert not engine.ping("b1", a2)
    assert_nothing_left(engine)


def http_get(netns: str, address: str, port: int) -> str:
    """One HTTP/1.0 GET from a socket made in netns; the raw reply."""
    sock = run_in(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.settimeout(10)
    with sock:
        sock.connect((address, port))
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode(errors="replace")


def test_published_port_serves_the_outside(engine: Engine) -> None:
    docker, host, outside = engine.docker, engine.host, engine.outside
    with made(engine, ["web"], ["e2e-web"]):
        engine.network("e2e-web")
        engine.run("web", "e2e-web", "-p", "8080:80",
                   command=("httpd", "-f", "-p", "80", "-h", "/www"))  # fmt: skip
        reply = http_get(f"/run/netns/{outside.name}", outside.host_addr4, 8080)
        assert reply.split("\r\n")[0].endswith("200 OK"), reply
        assert "served by a netstack container" in reply
        assert "pub4_any" in netstack_elements(host)
        key = docker.inspect("container", "web")["NetworkSettings"]["SandboxKey"]
        ports = host.netctl("port", f"docker/{Path(key).name}").stdout
        assert "80/tcp -> 0.0.0.0:8080" in ports
    assert_nothing_left(engine)


def test_overlap_and_default_pools(engine: Engine) -> None:
    docker, host = engine.docker, engine.host
    host.netctl("network", "create", "--subnet", "172.18.0.0/16", "e2e-netctl")
    try:
        with made(engine, [], ["e2e-clash", "e2e-clash2", "e2e-auto"]):
            clash = docker("network", "create", "-d", engine.plugin, "--ipam-driver",
                           engine.plugin, "--subnet", "172.18.5.0/24", "e2e-clash",
                           check=False)  # fmt: skip
            assert clash.returncode != 0
            assert "subnet 172.18.5.0/24 overlaps network 'e2e-netctl' (172.18.0.0/16); " \
                   "choose another --subnet" in clash.stderr  # fmt: skip
            # Docker's own IPAM does not know netstack's networks: netstack refuses it too
            clash2 = docker("network", "create", "-d", engine.plugin, "--subnet",
                            "172.18.9.0/24", "e2e-clash2", check=False)  # fmt: skip
            assert clash2.returncode != 0 and "overlaps network 'e2e-netctl'" in clash2.stderr
            assert docker("network", "ls", "-q", "--filter", "name=e2e-clash").stdout == ""

            engine.network("e2e-auto")
            subnet = ipaddress.ip_network(
                docker.inspect("network", "e2e-auto")["IPAM"]["Config"][0]["Subnet"]
            )
            taken = [ipaddress.ip_network("172.17.0.0/16"),  # docker0's route
                     ipaddress.ip_network("172.18.0.0/16"),  # the netctl network
                     ipaddress.ip_network("192.0.2.0/24")]  # the outside link  # fmt: skip
            assert not any(subnet.overlaps(other) for other in taken), subnet
            assert str(subnet) == "172.19.0.0/16"
    finally:
        host.netctl("network", "rm", "e2e-netctl")
    assert_nothing_left(engine)


def test_netstack_ipam_honours_subnet_gateway_range_aux_and_static_ips(engine: Engine) -> None:
    docker, host = engine.docker, engine.host
    with made(engine, ["s1", "s2"], ["e2e-ipam"]):
        engine.network(
            "e2e-ipam", "--subnet", "10.77.0.0/24", "--gateway", "10.77.0.254",
            "--ip-range", "10.77.0.128/25", "--aux-address", "router=10.77.0.5",
        )  # fmt: skip
        engine.run("s1", "e2e-ipam", "--ip", "10.77.0.50")
        engine.run("s2", "e2e-ipam")
        assert docker.container_ip("s1", "e2e-ipam") == "10.77.0.50"
        dynamic = ipaddress.ip_address(docker.container_ip("s2", "e2e-ipam"))
        assert dynamic in ipaddress.ip_network("10.77.0.128/25")
        assert "default via 10.77.0.254" in docker.exec("s2", "ip", "route").stdout
        assert engine.ping("s2", "10.77.0.50")
        network_id = docker.inspect("network", "e2e-ipam")["Id"]
        (inspected,) = host.netctl_json("network", "inspect", network_id)
        (pool,) = inspected["IPAM"]["Config"]
        assert (pool["Subnet"], pool["Gateway"]) == ("10.77.0.0/24", "10.77.0.254")
        # the aux address is held: netctl cannot take it on this network
        host.netctl("sandbox", "create", f"{host.name}-aux")
        taken = host.netctl(
            "network", "connect", network_id, f"{host.name}-aux", "--ip", "10.77.0.5",
            check=False,
        )  # fmt: skip
        assert taken.returncode != 0 and "already in use" in taken.stderr
        host.netctl("sandbox", "rm", f"{host.name}-aux")
    assert_nothing_left(engine)


def test_ipv6_and_internal_networks(engine: Engine) -> None:
    docker, host = engine.docker, engine.host
    with made(engine, ["v1", "v2", "i1"], ["e2e-v6", "e2e-internal"]):
        engine.network("e2e-v6", "--ipv6")
        engine.run("v1", "e2e-v6")
        engine.run("v2", "e2e-v6")
        settings = docker.inspect("container", "v2")["NetworkSettings"]["Networks"]["e2e-v6"]
        v2 = ipaddress.ip_address(settings["GlobalIPv6Address"])
        assert v2 in ipaddress.ip_network("fc00::/7")  # netstack's unique-local default pool
        assert docker.exec("v1", "ping6", "-c1", "-W2", str(v2), check=False).returncode == 0
        (network,) = host.netctl_json(
            "network", "inspect", docker.inspect("network", "e2e-v6")["Id"]
        )
        assert network["EnableIPv6"] is True

        engine.network("e2e-internal", "--internal")
        engine.run("i1", "e2e-internal")
        assert "default" not in docker.exec("i1", "ip", "route").stdout
        assert not engine.ping("i1", engine.outside.addr4)
        (internal,) = host.netctl_json(
            "network", "inspect", docker.inspect("network", "e2e-internal")["Id"]
        )
        assert internal["Internal"] is True
    assert_nothing_left(engine)


def test_netctl_networks_flow_while_dockerd_drops_forwarding(engine: Engine) -> None:
    host = engine.host
    assert "-P FORWARD DROP" in host.run("iptables", "-w", "-S", "FORWARD").stdout
    host.netctl("network", "create", "--subnet", "10.78.0.0/24", "e2e-plain")
    try:
        first, second = host.sandbox("p1"), host.sandbox("p2")
        host.netctl("network", "connect", "e2e-plain", first)
        host.netctl("network", "connect", "e2e-plain", second, "--ip", "10.78.0.20")
        assert host.in_sandbox(first, "ping", "-c1", "-W2", "10.78.0.20").returncode == 0
        (network,) = host.netctl_json("network", "inspect", "e2e-plain")
        bridge = network["Options"]["bridge.name"]
        assert f"-A DOCKER-USER -i {bridge} -m comment --comment netstack -j ACCEPT" in (
            docker_user_rules(host)
        )
        for sandbox in (first, second):
            host.netctl("sandbox", "rm", sandbox)
    finally:
        host.netctl("network", "rm", "--force", "e2e-plain")
    assert_nothing_left(engine)


def test_netstackd_restart_keeps_containers_and_later_calls_work(engine: Engine) -> None:
    docker, host = engine.docker, engine.host
    with made(engine, ["r1", "r2"], ["e2e-restart"]):
        engine.network("e2e-restart")
        engine.run("r1", "e2e-restart")
        engine.run("r2", "e2e-restart")
        for proc in host.daemons.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert engine.ping("r1", "r2")  # the kernel keeps forwarding without netstackd
        engine.start_netstackd()
        assert engine.ping("r1", "r2")
        docker("network", "disconnect", "e2e-restart", "r2")
        docker("rm", "-f", "r1", "r2")
        docker("network", "rm", "e2e-restart")
        info = json.loads(host.netctl("status", "--format", "json").stdout)
        assert info["running"] is True
    assert_nothing_left(engine)
