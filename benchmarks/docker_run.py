#!/usr/bin/env python3
"""`docker run -d` and `docker network connect` on a netstack network vs Docker's own bridge.

A throwaway host namespace gets netstackd (serving the Docker plugin as
`netstack-bench-<pid>`) and a private dockerd (own data root, exec root, socket, vfs
storage), started with `nsenter --net=`. Two user-defined networks: `ns` (`-d` and
`--ipam-driver` netstack) and `br` (Docker's built-in `bridge` driver, same subnet size).
Each rep times, interleaved and in alternating order, the `docker` CLI process for:

* `run`: `docker run -d --network NET busybox sleep 600` (container create + start, the
  network's CreateEndpoint/Join/... inside), then removes it untimed;
* `connect`: `docker network connect NET C` for a running container C (on a third,
  built-in bridge network), then disconnects it untimed.

Medians and ns/br ratios are printed (goal: <= 1.1). The image is Debian's static busybox
imported from a tarball; nothing is pulled.

    python3 benchmarks/docker_run.py            # REPS=15
    python3 benchmarks/docker_run.py --quick    # smoke: REPS=3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    BenchHost,
    CommandFailed,
    RunConditions,
    Stats,
    exit_on_signals,
    metric,
    need_root,
    ratio,
    run_main,
    say,
)

PLUGIN_DIR = Path("/run/docker/plugins")
BUSYBOX = Path("/bin/busybox")
IMAGE = "netstack-bench-busybox:latest"


def docker_cli() -> str:
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"  # Debian's, the engine's own version
    return shutil.which("docker") or "docker"


def missing() -> list[str]:
    tools = [t for t in ("dockerd", "containerd", "runc", "tar") if shutil.which(t) is None]
    return tools + ([] if BUSYBOX.is_file() else ["/bin/busybox (busybox-static)"])


class Engine:
    """dockerd in the bench host namespace, stopped and removed by `close`."""

    def __init__(self, host: BenchHost, root: Path) -> None:
        self.host = host
        self.root = root
        self.cli = docker_cli()
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = f"unix://{self.root / 'docker.sock'}"
        env["DOCKER_CONFIG"] = str(self.root / "cli")
        return env

    def start(self) -> None:
        argv = self.host.argv(
            "dockerd", "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
            "-H", f"unix://{self.root / 'docker.sock'}", "--storage-driver", "vfs",
            "--containerd-namespace", f"moby-{self.host.name}",
            "--containerd-plugins-namespace", f"plugins-{self.host.name}", "--log-level", "warn",
        )  # fmt: skip
        with open(self.root / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )
        deadline = time.monotonic() + 60
        while self.run("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise CommandFailed("dockerd did not start; see its log in " + str(self.root))
            time.sleep(0.1)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.cli, *args], env=self.env(), capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise CommandFailed(f"docker {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def timed(self, *args: str) -> float:
        """Wall milliseconds of one docker CLI call."""
        t0 = time.perf_counter()
        self.run(*args)
        return (time.perf_counter() - t0) * 1000.0

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                ids = self.run("ps", "-aq", check=False).stdout.split()
                if ids:
                    self.run("rm", "-f", *ids, check=False)
                for network in ("ns", "br", "base"):
                    self.run("network", "rm", network, check=False)
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            marker = str(self.root)
            for entry in Path("/proc").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    if marker in cmdline and ("containerd" in cmdline or "dockerd" in cmdline):
                        os.kill(int(entry.name), signal.SIGKILL)
            mounts = subprocess.run(
                ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True, check=False
            ).stdout.splitlines()
            for mount in sorted((m for m in mounts if m.startswith(marker + "/")), reverse=True):
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
            shutil.rmtree(self.root, ignore_errors=True)


def busybox_tarball(directory: Path) -> Path:
    rootfs = directory / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for sub in ("etc", "proc", "sys", "dev", "tmp"):
        (rootfs / sub).mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in ("sh", "sleep", "ip", "ping"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    tarball = directory / "busybox.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True, timeout=60)
    shutil.rmtree(rootfs)
    return tarball


@contextlib.contextmanager
def netstackd(host: BenchHost, plugin: str) -> Iterator[None]:
    beside = Path(sys.executable).with_name("netstackd")
    argv = [str(beside)] if beside.exists() else [sys.executable, "-m", "netstack.daemon"]
    env = host.env()
    env.update(NETSTACK_DOCKER_PLUGIN=plugin, NETSTACK_DOCKER_PLUGIN_DIR=str(PLUGIN_DIR))
    env["NETSTACK_RESOLV_CONF"] = str(host.tmp / "resolv.conf")
    (host.tmp / "resolv.conf").write_text("")
    with open(host.tmp / "netstackd.log", "ab") as log:
        proc = subprocess.Popen(host.argv(*argv), env=env, stdout=log, stderr=subprocess.STDOUT)
    sock = PLUGIN_DIR / f"{plugin}.sock"
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CommandFailed(f"netstackd did not serve {sock}")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)


def measure(engine: Engine, reps: int) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {"run": {}, "connect": {}}
    for kind in times:
        for network in ("ns", "br"):
            times[kind][network] = []
    engine.run("network", "create", "-d", "bridge", "base")
    engine.run("run", "-d", "--name", "probe", "--network", "base", IMAGE, "sleep", "3600")
    for rep in range(reps + 1):  # rep 0 warms up (image, caches) and is not counted
        order = ("ns", "br") if rep % 2 == 0 else ("br", "ns")
        for network in order:
            name = f"c-{network}-{rep}"
            took = engine.timed("run", "-d", "--name", name, "--network", network, IMAGE,
                                "sleep", "600")  # fmt: skip
            engine.run("rm", "-f", name)
            if rep:
                times["run"][network].append(took)
        for network in order:
            took = engine.timed("network", "connect", network, "probe")
            engine.run("network", "disconnect", network, "probe")
            if rep:
                times["connect"][network].append(took)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: 3 reps")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 15)
    need_root()
    if missing():
        say(f"# docker_run: skipped, needs {', '.join(missing())} (.ci/setup --test)")
        return 0
    exit_on_signals()
    conditions = RunConditions(
        "docker_run: docker run -d / network connect, netstack plugin vs built-in bridge",
        [f"reps={reps}, interleaved, order alternating; docker CLI wall time (ms)"],
    )
    with BenchHost() as host:
        plugin = f"netstack-{host.name}"
        root = Path(tempfile.mkdtemp(prefix=f"{host.name}-docker-"))
        engine = Engine(host, root)
        with netstackd(host, plugin):
            try:
                engine.start()
                engine.run("import", str(busybox_tarball(root)), IMAGE)
                engine.run("network", "create", "-d", plugin, "--ipam-driver", plugin, "ns")
                engine.run("network", "create", "-d", "bridge", "br")
                subnets = {
                    net: json.loads(engine.run("network", "inspect", net).stdout)[0]["IPAM"][
                        "Config"
                    ][0]["Subnet"]
                    for net in ("ns", "br")
                }
                say(f"# networks: ns {subnets['ns']} (netstack), br {subnets['br']} (bridge)")
                times = measure(engine, reps)
            finally:
                engine.close()
    for kind, label in (("run", "docker run -d"), ("connect", "docker network connect")):
        ns, br = Stats.of(times[kind]["ns"]), Stats.of(times[kind]["br"])
        say(f"{label:24} netstack {ns.line()}")
        say(f"{'':24} bridge   {br.line()}")
        say(f"{'':24} ratio netstack/bridge (medians) {ratio(ns.median, br.median):.2f}")
        metric(f"docker_{kind}_netstack_median", ns.median, "ms")
        metric(f"docker_{kind}_bridge_median", br.median, "ms")
        metric(f"docker_{kind}_ratio", ratio(ns.median, br.median), "x")
    conditions.end()
    return 0


if __name__ == "__main__":
    run_main("docker_run", main)
