"""Helpers for the end-to-end CNI tests: a conflist runner, podman, a busybox image.

Everything runs inside the test's host namespace (`nsenter --net=...`): CNI plugins,
podman, conmon and runc, so veths, bridges, iptables/nftables rules and qdiscs land
there and vanish with it. Plugins and runtimes get a bare environment (PATH and the
CNI_* variables, as runtimes give them): the netstack plugin must find its state and run
directories from the defaults `netctl cni install` baked into it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netstack.kernel.netns import run_in

if TYPE_CHECKING:
    from conftest import Host

REFERENCE_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
BARE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PLUGIN_TIMEOUT = 60.0
PODMAN_TIMEOUT = 120.0
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
BUSYBOX_APPLETS = (
    "sh", "cat", "echo", "ip", "ping", "ping6", "httpd", "sleep", "mkdir", "printf", "chmod",
    "hostname", "ls", "nc", "sysctl", "nslookup",
)  # fmt: skip
IMAGE = "localhost/netstack-e2e-busybox:latest"


# --------------------------------------------------------------------------- skips


def missing_tools(*names: str) -> list[str]:
    """The commands among `names` that are not on PATH."""
    return [name for name in names if shutil.which(name) is None]


def missing_reference_plugins(*types: str) -> list[str]:
    return [t for t in types if not os.access(REFERENCE_DIR / t, os.X_OK)]


def iptables_kind() -> str:
    """'nf_tables' or 'legacy': which backend the `iptables` command (portmap's) uses."""
    proc = subprocess.run(["iptables", "--version"], capture_output=True, text=True, check=False)
    return "nf_tables" if "nf_tables" in proc.stdout else "legacy"


# --------------------------------------------------------------------------- netstack plugin


def install_plugin(
    host: Host,
    bin_dir: Path,
    conf_dir: Path | None = None,
    networks: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Path:
    """`netctl cni install` with the host's state/run dirs (or `env`'s) baked in; the
    plugin's path."""
    args = ["cni", "install", "--bin-dir", str(bin_dir)]
    if conf_dir is not None:
        args += ["--conf-dir", str(conf_dir)]
    for network in networks:
        args += ["--network", network]
    host.netctl(*args, env=env)
    plugin = bin_dir / "netstack"
    assert os.access(plugin, os.X_OK), f"netctl cni install wrote no executable {plugin}"
    return plugin


# --------------------------------------------------------------------------- conflist runner


@dataclass
class Attachment:
    """One container's attachment as a runtime describes it to the plugins."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    capability_args: dict[str, Any] = field(default_factory=dict)  # runtimeConfig values
    cni_args: str = ""


@dataclass
class Call:
    command: str
    type: str
    stdin: dict[str, Any]
    code: int
    stdout: str
    stderr: str

    def document(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None


class PluginFailed(AssertionError):
    def __init__(self, call: Call) -> None:
        super().__init__(
            f"{call.command} {call.type} failed (rc={call.code})\nstdin: "
            f"{json.dumps(call.stdin)}\nstdout: {call.stdout}\nstderr: {call.stderr}"
        )
        self.call = call


class ConflistRunner:
    """Runs a conflist the way libcni (podman's, containerd's) does.

    ADD: each plugin in order, with the list's `name` and `cniVersion`, `runtimeConfig`
    holding only the capabilities the plugin declares, and `prevResult` the previous
    plugin's result; the last result is the list's. CHECK and DEL: `prevResult` is that
    cached final result for every plugin, DEL in reverse order. Plugins are found in
    CNI_PATH order and executed in the host namespace with a bare environment.
    """

    def __init__(self, host: Host, conflist: dict[str, Any], plugin_dirs: Sequence[Path]):
        self.host = host
        self.conflist = conflist
        self.plugin_dirs = list(plugin_dirs)
        self.calls: list[Call] = []

    def find(self, plugin_type: str) -> Path:
        for directory in self.plugin_dirs:
            candidate = directory / plugin_type
            if os.access(candidate, os.X_OK):
                return candidate
        raise AssertionError(f"plugin {plugin_type!r} not found in {self.plugin_dirs}")

    def plugin_config(
        self, plugin: dict[str, Any], attachment: Attachment, prev: dict[str, Any] | None
    ) -> dict[str, Any]:
        config = dict(plugin)
        config["name"] = self.conflist["name"]
        config["cniVersion"] = self.conflist["cniVersion"]
        runtime = {
            capability: attachment.capability_args[capability]
            for capability, declared in plugin.get("capabilities", {}).items()
            if declared and capability in attachment.capability_args
        }
        if runtime:
            config["runtimeConfig"] = runtime
        if prev is not None:
            config["prevResult"] = prev
        return config

    def exec(
        self,
        command: str,
        plugin: dict[str, Any],
        attachment: Attachment,
        prev: dict[str, Any] | None,
    ) -> Call:
        stdin = self.plugin_config(plugin, attachment, prev)
        env = {
            "PATH": BARE_PATH,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": attachment.container_id,
            "CNI_NETNS": attachment.netns,
            "CNI_IFNAME": attachment.ifname,
            "CNI_PATH": ":".join(str(d) for d in self.plugin_dirs),
        }
        if attachment.cni_args:
            env["CNI_ARGS"] = attachment.cni_args
        proc = subprocess.run(
            ["nsenter", f"--net={self.host.netns_path}", str(self.find(plugin["type"]))],
            input=json.dumps(stdin),
            env=env,
            capture_output=True,
            text=True,
            timeout=PLUGIN_TIMEOUT,
            check=False,
        )
        call = Call(command, plugin["type"], stdin, proc.returncode, proc.stdout, proc.stderr)
        self.calls.append(call)
        if call.code != 0:
            raise PluginFailed(call)
        return call

    def add(self, attachment: Attachment) -> dict[str, Any]:
        """ADD through the chain; the final result (a failed plugin raises PluginFailed)."""
        prev: dict[str, Any] | None = None
        for plugin in self.conflist["plugins"]:
            document = self.exec("ADD", plugin, attachment, prev).document()
            assert isinstance(document, dict), f"{plugin['type']} ADD printed no result"
            prev = document
        assert prev is not None
        return prev

    def check(self, attachment: Attachment, cached: dict[str, Any]) -> None:
        for plugin in self.conflist["plugins"]:
            self.exec("CHECK", plugin, attachment, cached)

    def delete(self, attachment: Attachment, cached: dict[str, Any] | None) -> None:
        for plugin in reversed(self.conflist["plugins"]):
            self.exec("DEL", plugin, attachment, cached)

    def sequence(self) -> list[tuple[str, str]]:
        return [(call.command, call.type) for call in self.calls]


# --------------------------------------------------------------------------- kernel views


def add_netns(name: str) -> str:
    """Create the named network namespace (a runtime's container namespace); its path."""
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    return f"/run/netns/{name}"


def ns_run(netns: str, *argv: str, check: bool = True, timeout: float = 60) -> str:
    """Run a command with only its network namespace switched (nsenter); its stdout."""
    proc = subprocess.run(
        ["nsenter", f"--net={netns}", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} in {netns} failed: {proc.stdout}{proc.stderr}")
    return proc.stdout


def ns_json(netns: str, *argv: str) -> Any:
    out = ns_run(netns, *argv)
    return json.loads(out) if out.strip() else []


def link_names(netns: str) -> list[str]:
    return [link["ifname"] for link in ns_json(netns, "ip", "-j", "link", "show")]


def ipv4_addresses(netns: str, ifname: str) -> list[str]:
    """Global IPv4 addresses (CIDR) of ifname in netns; [] when it does not exist."""
    proc = subprocess.run(
        ["nsenter", f"--net={netns}", "ip", "-j", "-4", "addr", "show", "dev", ifname],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return [
        f"{a['local']}/{a['prefixlen']}"
        for link in json.loads(proc.stdout)
        for a in link.get("addr_info", [])
        if a.get("scope") == "global"
    ]


def nat_rules(netns: str) -> list[str]:
    """`iptables -t nat -S` in netns: the rules portmap writes (nft- or legacy-backed)."""
    return ns_run(netns, "iptables", "-w", "-t", "nat", "-S").splitlines()


def qdiscs(netns: str) -> list[dict[str, Any]]:
    return list(ns_json(netns, "tc", "-j", "qdisc", "show"))


# --------------------------------------------------------------------------- traffic


def tcp_exchange(
    netns: str, address: str, port: int, payload: bytes, timeout: float
) -> bytes | None:
    """One TCP connection from a socket made in netns: send payload, read to EOF; None if
    refused, reset, unreachable or timed out."""
    sock = run_in(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
        if payload:
            sock.sendall(payload)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        return None
    finally:
        sock.close()
    return data


def poll_tcp(
    netns: str, address: str, port: int, payload: bytes = b"", deadline: float = 10.0
) -> bytes:
    """Retry until address:port answers from netns (bridge ports settle); the answer."""
    end = time.monotonic() + deadline
    while True:
        data = tcp_exchange(netns, address, port, payload, 1.0)
        if data:
            return data
        if time.monotonic() > end:
            raise AssertionError(f"tcp {address}:{port} never answered from {netns}")
        time.sleep(0.2)


def http_get(netns: str, address: str, port: int, path: str, deadline: float = 10.0) -> str:
    """The body of GET path from address:port (HTTP/1.0, from a socket in netns)."""
    request = f"GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode()
    raw = poll_tcp(netns, address, port, request, deadline).decode(errors="replace")
    head, _, body = raw.partition("\r\n\r\n")
    assert head.split(" ", 2)[1:2] == ["200"], f"GET {path}: {raw!r}"
    return body


def peer_reply(body: str) -> tuple[str, str]:
    """(hostname, client address) from the busybox CGI `peer`; httpd listens on [::], so
    an IPv4 client shows as [::ffff:a.b.c.d]."""
    name, client = body.split()
    client = client.strip("[]")
    return name, client.removeprefix("::ffff:")


PEER_SERVER = r"""
import socket, sys
tag, port = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("0.0.0.0", port))
sock.listen(16)
print("READY", flush=True)
while True:
    conn, peer = sock.accept()
    with conn:
        conn.sendall(f"{tag} {port} {peer[0]}\n".encode())
"""


@contextlib.contextmanager
def peer_server(netns: str, tag: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """A TCP server in netns answering every connection with '<tag> <port> <client ip>'."""
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns}", sys.executable, "-I", "-S", "-c", PEER_SERVER, tag,
         str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "READY":
            proc.kill()
            raise AssertionError(f"server in {netns} did not start: {proc.communicate()}")
        yield proc
    finally:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)


# --------------------------------------------------------------------------- podman


def busybox_tarball(directory: Path) -> Path:
    """A root filesystem tarball: Debian's static busybox and applet symlinks, a page and a
    CGI script for httpd (podman and dockerd import it)."""
    rootfs = directory / "rootfs"
    for sub in ("bin", "etc", "proc", "sys", "dev", "tmp", "www/cgi-bin"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    # A CGI script answering with the client address the container saw.
    peer = rootfs / "www" / "cgi-bin" / "peer"
    peer.write_text(
        '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\n'
        'echo "$(hostname) $REMOTE_ADDR"\n'
    )
    peer.chmod(0o755)
    (rootfs / "www" / "index.html").write_text("served by a netstack container\n")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    tarball = directory / "busybox.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True, timeout=60)
    shutil.rmtree(rootfs)
    return tarball


def mounts_under(root: Path) -> list[str]:
    """Mount points below `root` (a container engine's storage), as findmnt lists them."""
    proc = subprocess.run(
        ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True, check=False
    )
    return [m for m in proc.stdout.splitlines() if m.startswith(str(root) + "/")]


class Podman:
    """podman with private storage, run dirs and CNI config, run in the host namespace.

    containers.conf selects the CNI network backend (`network_backend = "cni"`), the
    plugin directories (`cni_plugin_dirs`: netstack's bin dir first, then Debian's
    reference plugins) and the conflist directory (`network_config_dir`); storage.conf a
    vfs graphroot/runroot under `root`. runc, not crun: crun refuses this machine's
    hybrid cgroup layout ("cgroups in hybrid mode not supported"). The ulimits are lowered
    because the default (1048576 open files) is above this machine's hard limit. File locks
    (under tmp_dir), not the shared memory segment every rootful podman shares: a fresh
    podman's first start frees all locks in it, under other tests' containers.
    Beyond `root`, podman as root still uses libcni's cache (/var/lib/cni/results: one
    file per attachment, removed by DEL), runc's state (/run/runc/<id>), the container's
    namespace (/run/netns/netns-<uuid>) and /var/lib/containers/cache.
    """

    def __init__(self, host: Host, root: Path, plugin_dirs: Sequence[Path], config_dir: Path):
        self.host = host
        self.root = root
        self.config_dir = config_dir
        root.mkdir(parents=True, exist_ok=True)
        (root / "home").mkdir(exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        dirs = ", ".join(json.dumps(str(d)) for d in plugin_dirs)
        (root / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            'log_driver = "k8s-file"\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f"cni_plugin_dirs = [{dirs}]\n"
            f"network_config_dir = {json.dumps(str(config_dir))}\n"
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "none"\n'
            'lock_type = "file"\n'  # under tmp_dir: no machine-wide /dev/shm/libpod_lock
            f"tmp_dir = {json.dumps(str(root / 'libpod-tmp'))}\n"
            f"static_dir = {json.dumps(str(root / 'storage' / 'libpod'))}\n"
            f"volume_path = {json.dumps(str(root / 'storage' / 'volumes'))}\n"
        )
        (root / "storage.conf").write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f"graphroot = {json.dumps(str(root / 'storage'))}\n"
            f"runroot = {json.dumps(str(root / 'runroot'))}\n"
        )
        (root / "registries.conf").write_text("unqualified-search-registries = []\n")

    def env(self) -> dict[str, str]:
        # No NETSTACK_* here: the plugin must run from the defaults baked into it.
        return {
            "PATH": BARE_PATH,
            "HOME": str(self.root / "home"),
            "TMPDIR": str(self.root / "tmp"),
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.root / "registries.conf"),
        }

    def __call__(
        self, *args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", f"--net={self.host.netns_path}", "podman", *args]
        proc = subprocess.run(
            argv, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} failed (rc={proc.returncode})\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def inspect(self, container: str) -> dict[str, Any]:
        (info,) = json.loads(self("inspect", container).stdout)
        return dict(info)

    def import_busybox(self) -> str:
        self("import", str(busybox_tarball(self.root)), IMAGE)
        return IMAGE

    def mounts(self) -> list[str]:
        """Mount points under the podman root (shm of live containers)."""
        return mounts_under(self.root)

    def close(self) -> None:
        """Remove every container (their CNI DEL runs), then the storage; best effort."""
        try:
            self("rm", "--all", "--force", "--time", "0", check=False)
        finally:
            for mount in sorted(self.mounts(), key=len, reverse=True):
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def podman_runtime(
    host: Host, root: Path, plugin_dirs: Sequence[Path], config_dir: Path
) -> Iterator[Podman]:
    podman = Podman(host, root, plugin_dirs, config_dir)
    try:
        yield podman
    finally:
        podman.close()


def podman_skip_reason() -> str | None:
    missing = missing_tools("podman", "runc", "conmon", "tar", "findmnt")
    if missing:
        return f"needs {', '.join(missing)} (Debian packages podman, runc; .ci/setup --test)"
    if not BUSYBOX.is_file():
        return "needs /bin/busybox from Debian's busybox-static (.ci/setup --test)"
    return None
