"""End to end: podman (Debian 12's 4.3, CNI network backend) runs containers on netstack.

Set up as a user would: `netctl cni install --bin-dir DIR --conf-dir DIR --network NAME`
writes the plugin and the network's conflist; podman is pointed at them through its
containers.conf (`network_backend = "cni"`, `cni_plugin_dirs`, `network_config_dir`) and
runs busybox containers with `--network NAME`. Everything podman does happens inside the
test's host namespace, with private storage, and the plugin gets podman's bare
environment (the state and run directories come from what `cni install` baked in).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cni_runtime import (
    REFERENCE_DIR,
    Podman,
    http_get,
    install_plugin,
    ipv4_addresses,
    link_names,
    peer_reply,
    podman_runtime,
    podman_skip_reason,
    tcp_exchange,
)

if TYPE_CHECKING:
    from conftest import Host

_reason = podman_skip_reason()
pytestmark = [pytest.mark.root, pytest.mark.skipif(bool(_reason), reason=_reason or "")]

NETWORK = "podnet"
HOST_PORT = 18081
CONTAINER_PORT = 8080
# Debian 12's podman 4.3 vendors libcni 1.1: it reads results up to cniVersion 1.0.0.
RUNTIME_VERSION = "1.0.0"


def network_info(host: Host) -> dict[str, Any]:
    (info,) = host.netctl_json("network", "inspect", NETWORK)
    return dict(info)


def attachments(host: Host) -> dict[str, dict[str, Any]]:
    """netstack's endpoints on the network by sandbox name (cni/<container id>/<ifname>)."""
    return {e["Name"]: e for e in network_info(host)["Endpoints"]}


def host_veths(host: Host) -> list[str]:
    return [name for name in link_names(host.netns_path) if name.startswith("nsv")]


def cni_cache(container_id: str) -> list[Path]:
    """libcni's cached results of a container (podman as root keeps them here)."""
    return list(Path("/var/lib/cni/results").glob(f"{NETWORK}-{container_id}-*"))


def run_container(
    podman: Podman, image: str, name: str, *argv: str, publish: str = ""
) -> dict[str, Any]:
    """`podman run --detach` on the netstack network; the container's inspect document."""
    args = ["run", "--detach", "--name", name, "--hostname", name, "--network", NETWORK]
    if publish:
        args += ["--publish", publish]
    podman(*args, image, *argv)
    return podman.inspect(name)


@pytest.mark.parametrize("mode", ["in-process", "netstackd"])
def test_podman_runs_containers_on_a_netstack_network(
    host: Host, tmp_path: Path, mode: str
) -> None:
    """Addresses, gateway, container to container, a published port from outside; rm
    runs DEL: each attachment disappears with its container."""
    out = host.outside()
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bake = None
    if mode == "netstackd":
        host.daemons.start(log=tmp_path / "netstackd.log")
        host.daemons.wait_running()
        # A state directory the plugin process cannot use: every call must go to netstackd
        # (the fast path) for anything to work, so the test shows it did.
        (tmp_path / "not-a-directory").write_text("")
        bake = {"NETSTACK_STATE_DIR": str(tmp_path / "not-a-directory" / "state")}
    install_plugin(host, bin_dir, conf_dir, [NETWORK], env=bake)
    conflist_path = conf_dir / f"10-{NETWORK}.conflist"
    conflist = json.loads(conflist_path.read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["netstack"]
    # As the proposed fix writes it (see test_installed_conflist_runs_unchanged_under_podman):
    # a version podman 4.3 reads, and the list of versions for newer runtimes.
    conflist["cniVersion"] = RUNTIME_VERSION
    conflist["cniVersions"] = [RUNTIME_VERSION, "1.1.0"]
    conflist_path.write_text(json.dumps(conflist))

    with podman_runtime(host, tmp_path / "podman", [bin_dir, REFERENCE_DIR], conf_dir) as podman:
        listed = podman("network", "ls", "--format", "{{.Name}} {{.Driver}}").stdout.split("\n")
        assert f"{NETWORK} netstack" in listed
        image = podman.import_busybox()
        web = run_container(
            podman, image, "web", "httpd", "-f", "-p", str(CONTAINER_PORT), "-h", "/www",
            publish=f"{HOST_PORT}:{CONTAINER_PORT}/tcp",
        )  # fmt: skip
        client = run_container(podman, image, "client", "sleep", "600")

        (pool,) = network_info(host)["IPAM"]["Config"]
        subnet, gateway = ipaddress.ip_network(pool["Subnet"]), pool["Gateway"]
        found = attachments(host)
        addresses = {}
        for info in (web, client):
            settings = info["NetworkSettings"]
            address = f"{settings['Networks'][NETWORK]['IPAddress']}/{subnet.prefixlen}"
            assert ipaddress.ip_interface(address).network == subnet
            assert settings["Networks"][NETWORK]["Gateway"] == gateway
            endpoint = found[f"cni/{info['Id']}/eth0"]
            assert endpoint["IPv4Address"] == address
            assert endpoint["Interface"] == "eth0"
            # What the container itself sees, through podman and through its namespace.
            shown = podman("exec", info["Name"], "ip", "-o", "-4", "addr", "show", "eth0").stdout
            assert f"inet {address} " in shown, shown
            assert ipv4_addresses(settings["SandboxKey"], "eth0") == [address]
            addresses[info["Name"]] = address.split("/")[0]
        assert len(found) == 2 and len(host_veths(host)) == 2
        (binding,) = found[f"cni/{web['Id']}/eth0"]["Ports"]  # portMappings went to netstack
        assert (binding["HostPort"], binding["ContainerPort"], binding["Protocol"]) == (
            HOST_PORT,
            CONTAINER_PORT,
            "tcp",
        )
        assert found[f"cni/{client['Id']}/eth0"]["Ports"] == []

        route = podman("exec", "client", "ip", "route", "show", "default").stdout
        assert f"default via {gateway} dev eth0" in route, route
        podman("exec", "client", "ping", "-c", "1", "-W", "5", gateway)
        # busybox nc, not wget: Debian's static busybox wget crashes (SIGSEGV) in this
        # minimal root filesystem, even for an address literal.
        request = r"printf 'GET /cgi-bin/peer HTTP/1.0\r\n\r\n' | nc -w 10 {} {}"
        raw = podman(
            "exec", "client", "sh", "-c", request.format(addresses["web"], CONTAINER_PORT)
        ).stdout  # fmt: skip
        head, _, body = raw.partition("\n\n")  # text mode: CRLF arrives as LF
        assert head.startswith("HTTP/1.") and " 200 " in head.splitlines()[0], raw
        assert peer_reply(body) == ("web", addresses["client"])
        reply = http_get(out.name, out.host_addr4, HOST_PORT, "/cgi-bin/peer")
        assert peer_reply(reply) == ("web", out.addr4)  # netstack's DNAT keeps the client

        podman("rm", "--force", "--time", "0", "web")

        assert list(attachments(host)) == [f"cni/{client['Id']}/eth0"]
        assert len(host_veths(host)) == 1
        assert not Path(web["NetworkSettings"]["SandboxKey"]).exists()
        assert tcp_exchange(out.name, out.host_addr4, HOST_PORT, b"", 1.0) is None
        assert cni_cache(web["Id"]) == []
        podman("exec", "client", "ping", "-c", "1", "-W", "5", gateway)  # unaffected

        podman("rm", "--force", "--time", "0", "client")

        assert attachments(host) == {}
        assert host_veths(host) == []
        assert not [s for s in host.netctl_json("sandbox", "ls") if s["Name"].startswith("cni/")]
        assert cni_cache(client["Id"]) == []


def test_installed_conflist_runs_unchanged_under_podman(host: Host, tmp_path: Path) -> None:
    """The conflist `netctl cni install --network` writes works with Debian's podman as is.

    It says cniVersion 1.0.0: podman 4.3's libcni 1.1 cannot read a 1.1.0 result
    ('unsupported CNI result version "1.1.0"'), so a 1.1.0 conflist would not start.
    """
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    install_plugin(host, bin_dir, conf_dir, [NETWORK])
    with podman_runtime(host, tmp_path / "podman", [bin_dir, REFERENCE_DIR], conf_dir) as podman:
        image = podman.import_busybox()
        proc = podman(
            "run", "--rm", "--network", NETWORK, image, "ip", "-o", "-4", "addr", "show", "eth0",
            check=False,
        )  # fmt: skip
        # Either way podman undid the attachment (DEL after a failed ADD, or at --rm).
        assert attachments(host) == {}
        assert host_veths(host) == []
        assert proc.returncode == 0, proc.stderr
        assert " inet " in proc.stdout, proc.stdout
