"""netstackd serving Docker's plugin API on a unix socket, driven with raw HTTP as dockerd
drives it: the IPAM hand-over, endpoints moved into "containers" the way Docker moves them,
published ports, a netstackd restart in the middle, teardown to nothing, malformed input."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Host

NID = "c0ffee" + "0" * 58
EIDS = ["a1" * 32, "b2" * 32]
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(self.path))


class Client:
    """One keep-alive connection, as moby's plugin client keeps one."""

    def __init__(self, path: Path) -> None:
        self.conn = UnixHTTPConnection(path)

    def raw(self, method: str, body: bytes) -> tuple[int, dict[str, Any], str]:
        self.conn.request("POST", f"/{method}", body=body, headers={"Accept": CONTENT_TYPE})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, json.loads(data), response.getheader("Content-Type") or ""

    def call(self, method: str, document: Any = None, status: int = 200) -> dict[str, Any]:
        got, reply, _ = self.raw(method, json.dumps(document).encode())
        assert got == status, (method, reply)
        return reply


@pytest.fixture
def plugin(host: Host, tmp_path: Path) -> tuple[Path, str]:
    """netstackd with the plugin on; (socket path, plugin name)."""
    directory = tmp_path / "plugins"
    name = f"netstack-{host.name}"
    host.daemons.start(
        extra_env={"NETSTACK_DOCKER_PLUGIN": name, "NETSTACK_DOCKER_PLUGIN_DIR": str(directory)},
        log=tmp_path / "netstackd.log",
    )
    return wait_socket(host, directory / f"{name}.sock"), name


def wait_socket(host: Host, path: Path) -> Path:
    info = host.daemons.wait_running()
    assert info["docker_plugin"] == str(path)
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path


def container(host: Host, suffix: str) -> str:
    """A namespace standing for a container's (Docker's SandboxKey); removed at teardown."""
    name = f"{host.name}-{suffix}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
    return f"/run/netns/{name}"


def move_in(
    host: Host, joined: dict[str, Any], netns: str, address: str, mac: str | None = None
) -> None:
    """What dockerd does after Join: move SrcName into the sandbox as eth0, set the MAC it
    knows for the endpoint, address it, up, default route via the Gateway."""
    src = joined["InterfaceName"]["SrcName"]
    assert joined["InterfaceName"]["DstPrefix"] == "eth"
    host.run("ip", "link", "set", src, "netns", netns)
    inside = ["nsenter", f"--net={netns}", "ip"]
    if mac is not None:
        subprocess.run([*inside, "link", "set", src, "address", mac], check=True, timeout=30)
    for argv in (
        ["link", "set", src, "name", "eth0"],
        ["addr", "add", address, "dev", "eth0"],
        ["link", "set", "eth0", "up"],
        ["route", "add", "default", "via", joined["Gateway"]],
    ):
        subprocess.run([*inside, *argv], check=True, timeout=30)


def ping(netns: str, address: str) -> bool:
    proc = subprocess.run(
        ["nsenter", f"--net={netns}", "ping", "-c1", "-W2", address],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return proc.returncode == 0


def veths(host: Host) -> list[str]:
    return [link for link in host.links() if link.startswith(("nsv", "nsp"))]


def spares(host: Host) -> list[str]:
    """Veth pairs netstackd made ahead (drivers/bridge/spares.py)."""
    return [link for link in host.links() if link.startswith(("nsw", "nsy"))]


def publish_elements(host: Host) -> str:
    return host.run("nft", "list", "map", "inet", "netstack", "pub4_any", check=False).stdout


def create_network(client: Client) -> tuple[dict[str, Any], str]:
    """What dockerd asks for `docker network create -d netstack --ipam-driver netstack -o
    mtu=1400` without a subnet: a default pool, its gateway, the network NID. (The pool's
    answer, the bridge's name.)"""
    pool = client.call("IpamDriver.RequestPool", {"AddressSpace": "netstack-local", "Pool": ""})
    gateway = client.call(
        "IpamDriver.RequestAddress",
        {"PoolID": pool["PoolID"], "Options": {"RequestAddressType": "com.docker.network.gateway"}},
    )
    client.call(
        "NetworkDriver.CreateNetwork",
        {"NetworkID": NID, "Options": {"com.docker.network.generic": {"mtu": "1400"}},
         "IPv4Data": [{"Pool": pool["Pool"], "Gateway": gateway["Address"]}]},
    )  # fmt: skip
    return pool, f"nsbr{NID[:11]}"


def test_docker_calls_build_and_remove_everything(
    host: Host, plugin: tuple[Path, str], tmp_path: Path
) -> None:
    path, name = plugin
    client = Client(path)
    status, activated, content_type = client.raw("Plugin.Activate", b"")
    assert (status, content_type) == (200, CONTENT_TYPE)
    assert activated == {"Implements": ["NetworkDriver", "IpamDriver"]}

    pool, bridge = create_network(client)
    assert pool["Pool"] == "172.17.0.0/16"
    assert bridge in host.links()
    (listed,) = host.netctl_json("network", "ls")
    assert listed["Name"] == f"docker-{NID[:12]}"

    sandboxes, addresses = [], []
    for number, endpoint_id in enumerate(EIDS):
        address = client.call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
        created = client.call(
            "NetworkDriver.CreateEndpoint",
            {"NetworkID": NID, "EndpointID": endpoint_id, "Interface": {"Address": address},
             "Options": {}},
        )  # fmt: skip
        assert set(created["Interface"]) == {"MacAddress"}
        netns = container(host, f"c{number}")
        joined = client.call(
            "NetworkDriver.Join",
            {"NetworkID": NID, "EndpointID": endpoint_id, "SandboxKey": netns, "Options": {}},
        )
        assert joined["Gateway"] == "172.17.0.1"
        assert f"nsp{endpoint_id[:12]}" in host.links()  # both ends in the host namespace
        move_in(host, joined, netns, address)
        sandboxes.append(netns)
        addresses.append(address.split("/")[0])
    client.call(
        "NetworkDriver.ProgramExternalConnectivity",
        {"NetworkID": NID, "EndpointID": EIDS[1], "Options": {"com.docker.network.portmap": [
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 18080,
             "HostPortEnd": 18080}]}},
    )  # fmt: skip
    assert "18080" in publish_elements(host)
    assert ping(sandboxes[0], addresses[1])
    (inspected,) = host.netctl_json("network", "inspect", NID)
    assert sorted(e["Name"] for e in inspected["Endpoints"]) == sorted(
        f"docker/{Path(n).name}" for n in sandboxes
    )

    # restart netstackd while the containers run: traffic flows on, later calls succeed
    for proc in host.daemons.procs:
        proc.kill()
        proc.wait(timeout=10)
    assert ping(sandboxes[0], addresses[1])
    host.daemons.start(
        extra_env={
            "NETSTACK_DOCKER_PLUGIN": name,
            "NETSTACK_DOCKER_PLUGIN_DIR": str(path.parent),
        },
        log=tmp_path / "netstackd.log",
    )
    wait_socket(host, path)
    client = Client(path)
    info = client.call("NetworkDriver.EndpointOperInfo", {"NetworkID": NID, "EndpointID": EIDS[1]})
    assert info["Value"]["com.docker.network.portmap"][0]["HostPort"] == 18080

    for endpoint_id, address in zip(EIDS, addresses, strict=True):
        ref = {"NetworkID": NID, "EndpointID": endpoint_id}
        client.call("NetworkDriver.RevokeExternalConnectivity", ref)
        client.call("NetworkDriver.Leave", ref)
        client.call("NetworkDriver.DeleteEndpoint", ref)
        client.call("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": address})
    assert "18080" not in publish_elements(host)
    # a veth may be deleted just after the reply (netstackd reaps them in the background)
    deadline = time.monotonic() + 10
    while veths(host) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert veths(host) == []
    client.call("NetworkDriver.DeleteNetwork", {"NetworkID": NID})
    client.call("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "172.17.0.1"})
    client.call("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})
    assert bridge not in host.links()
    assert spares(host) == []  # the killed daemon's were swept, the new one's dropped
    assert host.netctl_json("network", "ls") == []
    assert host.netctl_json("sandbox", "ls") == []
    for netns in sandboxes:
        assert Path(netns).exists()  # the containers' namespaces are Docker's, never deleted


def test_joins_take_pairs_made_ahead(host: Host, plugin: tuple[Path, str]) -> None:
    """After a first Join, netstackd makes a spare pair on the bridge; the next Join takes
    it over: final names, the network's MTU, the endpoint's MAC, a working link. Deleting
    the network deletes the spare made after that."""
    path, _name = plugin
    client = Client(path)
    pool, bridge = create_network(client)
    sandboxes, addresses = [], []
    for number, endpoint_id in enumerate(EIDS):
        address = client.call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
        if number == 1:  # made after the first Join, waiting on the bridge, down
            deadline = time.monotonic() + 10
            while len(spares(host)) < 2:
                assert time.monotonic() < deadline, "no spare pair was made"
                time.sleep(0.05)
            made = spares(host)
            for link in host.ip_json("link", "show", "master", bridge):
                if link["ifname"] in made:
                    assert "UP" not in link["flags"], link
                    assert link["mtu"] == 1400, link
        created = client.call(
            "NetworkDriver.CreateEndpoint",
            {"NetworkID": NID, "EndpointID": endpoint_id, "Interface": {"Address": address},
             "Options": {}},
        )  # fmt: skip
        netns = container(host, f"s{number}")
        joined = client.call(
            "NetworkDriver.Join",
            {"NetworkID": NID, "EndpointID": endpoint_id, "SandboxKey": netns, "Options": {}},
        )
        peer_name = joined["InterfaceName"]["SrcName"]
        if number == 1:  # the spare's host end was renamed; its peer keeps its name
            spare_peer = next(name for name in made if name.startswith("nsy"))
            assert peer_name == spare_peer
            spare_host = next(name for name in made if name.startswith("nsw"))
            assert spare_host not in host.links(), "the spare was not taken"
        else:
            assert peer_name == f"nsp{endpoint_id[:12]}"
        (host_end,) = host.ip_json("link", "show", f"nsv{endpoint_id[:12]}")
        assert host_end["master"] == bridge and host_end["mtu"] == 1400, host_end
        assert "UP" in host_end["flags"], host_end
        (peer,) = host.ip_json("link", "show", peer_name)
        assert peer["mtu"] == 1400, peer
        mac = created["Interface"]["MacAddress"]
        move_in(host, joined, netns, address, mac)
        eth0 = json.loads(
            subprocess.run(
                ["nsenter", f"--net={netns}", "ip", "-j", "link", "show", "eth0"],
                capture_output=True, check=True, timeout=30, text=True,
            ).stdout
        )[0]  # fmt: skip
        assert eth0["address"] == mac and eth0["mtu"] == 1400, eth0
        sandboxes.append(netns)
        addresses.append(address.split("/")[0])
    assert ping(sandboxes[0], addresses[1])
    assert ping(sandboxes[1], addresses[0])

    for endpoint_id in EIDS:
        ref = {"NetworkID": NID, "EndpointID": endpoint_id}
        client.call("NetworkDriver.Leave", ref)
        client.call("NetworkDriver.DeleteEndpoint", ref)
    deadline = time.monotonic() + 10
    while not spares(host):  # the one made after the second Join
        assert time.monotonic() < deadline, "no spare pair after the second Join"
        time.sleep(0.05)
    client.call("NetworkDriver.DeleteNetwork", {"NetworkID": NID})
    assert spares(host) == []
    assert bridge not in host.links()


def test_malformed_http_never_stops_the_plugin(host: Host, plugin: tuple[Path, str]) -> None:
    path, _ = plugin
    client = Client(path)
    status, reply, _ = client.raw("NetworkDriver.CreateNetwork", b"{nope")
    assert status == 400 and "not JSON" in reply["Err"]
    status, reply, _ = client.raw("IpamDriver.RequestPool", b'{"Pool": 7}')
    assert status == 400 and "'Pool' must be a string" in reply["Error"]
    status, reply, _ = client.raw("NetworkDriver.Bogus", b"{}")
    assert status == 404 and "unknown plugin method" in reply["Err"]

    def exchange(data: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(path))
            # the server may answer and close before reading everything
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # nothing more will come
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    answer += chunk
            return answer

    assert exchange(b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge = b"x" * (2 << 20)
    header = b"POST /NetworkDriver.CreateNetwork HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    assert exchange(header % len(huge) + huge).startswith(b"HTTP/1.1 413")
    chunked = (
        b"POST /NetworkDriver.CreateNetwork HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"100000\r\n" + b"y" * 0x100000 + b"\r\n"
        b"100000\r\n" + b"y" * 0x100000 + b"\r\n0\r\n\r\n"
    )
    assert exchange(chunked).startswith(b"HTTP/1.1 413")
    get = exchange(b"GET /Plugin.Activate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert get.startswith(b"HTTP/1.1 405")
    cut_short = exchange(b"POST /Plugin.Activate HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{")
    assert cut_short.startswith(b"HTTP/1.1 400")
    # still serving, on the old keep-alive connection too
    assert Client(path).call("Plugin.Activate")["Implements"] == ["NetworkDriver", "IpamDriver"]
    assert client.call("NetworkDriver.GetCapabilities")["Scope"] == "local"
    assert host.daemons.wait_running()["running"] is True


def test_a_second_daemon_does_not_steal_the_plugin_socket(
    host: Host, plugin: tuple[Path, str], tmp_path: Path
) -> None:
    path, name = plugin
    other = host.daemons.start(
        extra_env={
            "NETSTACK_DOCKER_PLUGIN": name,
            "NETSTACK_DOCKER_PLUGIN_DIR": str(path.parent),
            "NETSTACK_STATE_DIR": str(tmp_path / "other-state"),
            "NETSTACK_RUN_DIR": str(tmp_path / "other-run"),
        }
    )
    _out, err = other.communicate(timeout=30)
    assert other.returncode == 1
    assert f"{path} is served by another process" in err
    assert Client(path).call("Plugin.Activate")["Implements"] == ["NetworkDriver", "IpamDriver"]
