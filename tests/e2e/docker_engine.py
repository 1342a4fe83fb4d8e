"""A private dockerd inside a test host namespace, using netstackd as its network plugin.

`DockerEngine` starts dockerd with `nsenter --net=/run/netns/HOST` (not `ip netns exec`:
that remounts /sys and hides the cgroup mounts runc needs), its own data root, exec root
(its containerd runs there), pid file and API socket under one directory, the vfs storage
driver, and containerd namespaces named after the test host. dockerd looks for plugins
only in /run/docker/plugins (and /etc/docker/plugins, /usr/lib/docker/plugins), so
netstackd serves the plugin there under a name unique to the host namespace
(`netstack-<host>`): parallel tests never see each other's plugin. The image is Debian's
static busybox with applet links, imported from a tarball (nothing is pulled).

Teardown removes every container (so their namespaces and shims go), stops dockerd by its
pid (it stops its own containerd), unmounts what is left under the root and deletes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cni_runtime import BUSYBOX, busybox_tarball, mounts_under

if TYPE_CHECKING:
    from conftest import Host

IMAGE = "netstack-e2e-busybox:latest"
PLUGIN_DIR = Path("/run/docker/plugins")
TIMEOUT = 120.0


def docker_cli() -> str | None:
    """Debian's docker CLI (the engine's own version) first, else any on PATH."""
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"
    return shutil.which("docker")


def skip_reason() -> str | None:
    missing = [tool for tool in ("dockerd", "containerd", "runc", "tar", "findmnt")
               if shutil.which(tool) is None]  # fmt: skip
    if docker_cli() is None:
        missing.append("docker")
    if missing:
        return f"needs {', '.join(missing)} (Debian packages docker.io, runc; .ci/setup --test)"
    if not BUSYBOX.is_file():
        return "needs /bin/busybox from Debian's busybox-static (.ci/setup --test)"
    return None


def plugin_name(host: Host) -> str:
    return f"netstack-{host.name}"


class DockerEngine:
    def __init__(self, host: Host, root: Path) -> None:
        self.host = host
        self.root = root
        self.cli = docker_cli() or "docker"
        self.proc: subprocess.Popen[bytes] | None = None
        self.plugin = plugin_name(host)

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = f"unix://{self.socket}"
        env["DOCKER_CONFIG"] = str(self.root / "cli")
        return env

    def start(self) -> None:
        """Start dockerd in the host namespace and wait until its API answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [
            "nsenter", f"--net={self.host.netns_path}", "dockerd",
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "docker.pid"),
            "-H", f"unix://{self.socket}",
            "--storage-driver", "vfs",
            "--containerd-namespace", f"moby-{self.host.name}",
            "--containerd-plugins-namespace", f"plugins-{self.host.name}",
            "--log-level", "warn",
        ]  # fmt: skip
        with open(self.root / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )
        deadline = time.monotonic() + 60
        while self("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        try:
            return (self.root / "dockerd.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __call__(
        self, *args: str, check: bool = True, timeout: float = TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.cli, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} failed (rc={proc.returncode})\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def inspect(self, kind: str, name: str) -> dict[str, Any]:
        (info,) = json.loads(self(kind, "inspect", name).stdout)
        return dict(info)

    def container_ip(self, container: str, network: str) -> str:
        networks = self.inspect("container", container)["NetworkSettings"]["Networks"]
        return str(networks[network]["IPAddress"])

    def exec(
        self, container: str, *argv: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self("exec", container, *argv, check=check)

    def import_busybox(self) -> str:
        self("import", str(busybox_tarball(self.root)), IMAGE)
        return IMAGE

    def mounts(self) -> list[str]:
        return mounts_under(self.root)

    def close(self) -> None:
        """Remove containers and networks, stop dockerd by pid, unmount, delete. Best effort."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                ids = self("ps", "-aq", check=False).stdout.split()
                if ids:
                    self("rm", "-f", *ids, check=False)
                for network in self("network", "ls", "-q", "--filter", f"driver={self.plugin}",
                                    check=False).stdout.split():  # fmt: skip
                    self("network", "rm", network, check=False)
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            self._kill_leftovers()
            for mount in sorted(self.mounts(), key=len, reverse=True):
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """containerd and shims started for this engine (their command line names our exec
        root or containerd namespace), should dockerd have died without stopping them."""
        marker = str(self.root)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if marker in cmdline and ("containerd" in cmdline or "dockerd" in cmdline):
                    os.kill(int(entry.name), signal.SIGKILL)
