#!/usr/bin/env python3
"""CNI ADD/DEL latency: netstack's plugin vs the reference bridge + host-local (+ portmap).

Each series is one CNI network in its own throwaway host namespace, with N container
namespaces made up front. Plugins are executed as a runtime executes them: the plugin
binary with the CNI_* environment (and PATH, nothing else) and the configuration on stdin,
from the host namespace; a chain (conflist) runs plugin after plugin, each getting the
previous result as ``prevResult`` (and ``runtimeConfig`` for the capabilities it declares);
DEL runs the chain in reverse, every plugin getting the ADD result as ``prevResult``. The
wall time of each exec (summed over a chain) is one ADD or DEL.

Series (all with the same network settings: bridge, isGateway, isDefaultGateway, ipMasq,
hairpinMode, one /16 subnet, cniVersion 1.0.0):

* ``ref``: /usr/lib/cni/bridge with host-local IPAM;
* ``ref_pm``: the conflist bridge -> portmap, one tcp port mapping per container;
* ``ns``: netstack's installed ``netstack`` executable (``netctl cni install``), with
  netstackd running in the host namespace (the fast path);
* ``ns_pm``: the same with one port mapping per container (``runtimeConfig.portMappings``
  on netstack itself, which declares the ``portMappings`` capability);
* ``ns_solo`` / ``ns_solo_pm``: the executable with no netstackd (in-process). Timed for the
  first and the last bucket of containers only: in between, a netstackd is started for the
  host so the N containers are set up in a reasonable time (same store, same kernel
  objects; those fill steps are not reported).

Interleaving: ADD of container i runs for every series before container i+1, in a shuffled
order per step, so load drift on this shared 2-core machine hits all series alike; then the
containers are deleted in the same order (DEL of the 1st runs with N attached, as in
shared/peers/cni_scaling_impl.sh). Each series starts with two ADD+DEL cycles of a warm-up
container (bridge, network, rules; page cache): the first one's ADD is the "cold" ADD.

One netstackd per series: after each exec of a netstack series, the harness waits (untimed)
until that series' netstackd has done the work that follows a call (its ``settle`` op: the
store read again for DNS and the relay, links queued for deletion deleted). On a real host
one netstackd serves every network; here each series has its own, and without the wait one
daemon's reload ran during the next series' exec. Measured: ADDs that overlapped another
daemon's reload were 0.7-1.2 ms slower, such overlaps went from 6 to 12-19 of the 25 ADDs
of the ns series from the first bucket to the last (reloads last longer at 500 endpoints,
ADDs a little longer too), and the growth read for ns swung 1.01-1.19x from run to run.

Controls: during the first and last bucket, a probe container is added and deleted at each
step on an empty network in two more hosts (``ref_fresh``, ``ns_fresh``): the 1st
container's cost measured at the same moment as the Nth, so growth can be read with the
load drift taken out: "corrected" divides the growth by the control's own last/first
(medians of each bucket); "paired" takes each step's ADD over the probe ADD of the same
step and compares the median of those ratios in the last bucket with the first (the two
run seconds apart, so a drift within the run cancels step by step). Raw and paired growth
carry a 90% bootstrap interval ([90%: lo-hi], both buckets resampled): the scatter one run
has from the next from the noise inside the buckets alone (about +-0.05 at N=500 here).

Start-up: VERSION exec of netstack vs the reference bridge, and /bin/true (the harness).

Goals (the issue; reported, not enforced): with netstackd, ADD <= 0.8x and DEL <= 0.3x the
reference; netstack's ADD growth 1st -> Nth container <= 1.1x, with and without a port
mapping.

    python3 benchmarks/cni_latency.py            # N=300 containers per series (~6-8 min)
    python3 benchmarks/cni_latency.py --quick    # smoke: N=20, < 60 s
    python3 benchmarks/cni_latency.py -n 500 --series ref,ns,ns_pm,ref_pm
    python3 benchmarks/cni_latency.py --profile DIR   # py-spy record netstackd (ns, ns_pm)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    BenchHost,
    CommandFailed,
    RunConditions,
    Stats,
    exit_on_signals,
    median_ratio_interval,
    metric,
    need_root,
    ratio,
    run_main,
    say,
)

from netstack.daemon.client import call
from netstack.daemon.paths import SOCKET_NAME
from netstack.errors import NetstackError

CNI_VERSION = "1.0.0"
REF_BIN = Path("/usr/lib/cni")
SUBNET = "10.88.0.0/16"
IFNAME = "eth0"
PLAIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
HOST_PORT_BASE = 20000
CONTAINER_PORT = 80
SERIES = ("ref", "ref_pm", "ns", "ns_pm", "ns_solo", "ns_solo_pm")
CONTROLS = ("ref_fresh", "ns_fresh")
LABELS = {
    "ref": "reference bridge+host-local",
    "ref_pm": "reference bridge+host-local -> portmap",
    "ns": "netstack, netstackd running",
    "ns_pm": "netstack + port mapping, netstackd",
    "ns_solo": "netstack standalone (no daemon)",
    "ns_solo_pm": "netstack + port mapping, standalone",
    "ref_fresh": "control: reference, empty network",
    "ns_fresh": "control: netstack (daemon), empty network",
}
# (netstack series, its reference, goal for ADD, goal for DEL)
COMPARISONS = (
    ("ns", "ref", 0.8, 0.3),
    ("ns_pm", "ref_pm", 0.8, 0.3),
    ("ns_solo", "ref", None, None),
    ("ns_solo_pm", "ref_pm", None, None),
)
GOAL_GROWTH = 1.1
PEER_NOTE = (
    "issue's figures (this kind of machine, other runs): reference ADD ~21 ms for the 1st "
    "container, ~45 ms at the 500th, DEL ~80 ms; with portmap ADD 51 -> 200 ms; "
    "shared/peers/README.md: ADD 22.6 (500th 46.4), DEL 77.9; +portmap 52.0 / 182.6 ms"
)
CLONE_NEWNET = 0x40000000


# --------------------------------------------------------------------------- namespaces


class Netns:
    """Switch this (single-threaded) process between network namespaces, by setns(2).

    A plugin must run in the host namespace, as a runtime's does; entering it around the
    exec (outside the timed region) keeps nsenter's own exec out of the figures.
    """

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._root = os.open("/proc/self/ns/net", os.O_RDONLY)
        self._fds: dict[str, int] = {}

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns: {os.strerror(errno)}")

    @contextlib.contextmanager
    def inside(self, path: str) -> Iterator[None]:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        self._setns(fd)
        try:
            if (
                os.stat(f"/proc/{os.getpid()}/task/{os.getpid()}/ns/net").st_ino
                != os.fstat(fd).st_ino
            ):
                raise OSError(f"setns into {path} did not take effect")
            yield
        finally:
            self._setns(self._root)

    def close(self) -> None:
        for fd in [*self._fds.values(), self._root]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def add_netns(names: list[str]) -> None:
    script = "".join(f"netns add {name}\n" for name in names)
    proc = subprocess.run(
        ["ip", "-batch", "-"], input=script, text=True, capture_output=True, timeout=900
    )
    if proc.returncode != 0:
        raise CommandFailed(f"ip netns add failed: {proc.stderr.strip()[:500]}")


# --------------------------------------------------------------------------- plugin execs


@dataclass(frozen=True)
class Exec:
    ms: float
    code: int
    stdout: bytes
    stderr: bytes


def exec_timed(argv: list[str], env: dict[str, str], stdin: bytes) -> Exec:
    """One process as a runtime runs a plugin: env + stdin, stdout read; wall ms around it."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd="/",
    )
    out, err = proc.communicate(stdin, timeout=600)
    return Exec((time.perf_counter() - t0) * 1000.0, proc.returncode, out, err)


@dataclass
class Plugin:
    binary: str
    conf: dict[str, Any]  # the conflist entry (no cniVersion, name, prevResult)


@dataclass
class Step:
    ms: float
    parts: list[float]


@dataclass
class Series:
    key: str
    host: BenchHost
    chain: list[Plugin]
    cni_path: str
    network: str
    port_mapping: bool
    daemon: Daemon | None = None
    solo: bool = False
    containers: list[str] = field(default_factory=list)  # namespace names
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # container id -> ADD
    add: dict[int, Step] = field(default_factory=dict)  # index (1-based) -> timing
    delete: dict[int, Step] = field(default_factory=dict)
    filled: set[int] = field(default_factory=set)  # steps done via netstackd (solo fill)
    del_filled: set[int] = field(default_factory=set)
    cold_add: float = float("nan")
    cold_del: float = float("nan")
    probe_add: dict[str, list[float]] = field(default_factory=dict)  # bucket -> ms
    probe_at: dict[int, float] = field(default_factory=dict)  # step -> probe ADD ms
    probe_del: dict[str, list[float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABELS[self.key]

    def settle(self) -> None:
        """Untimed: let this series' netstackd finish what follows its last call."""
        if self.daemon is not None:
            self.daemon.settle()

    def container_id(self, index: int | str) -> str:
        return f"{self.key.replace('_', '-')}-{index}"

    def _conf(self, plugin: Plugin, index: int | str, prev: dict[str, Any] | None) -> bytes:
        conf = {"cniVersion": CNI_VERSION, "name": self.network, **plugin.conf}
        if self.port_mapping and plugin.conf.get("capabilities", {}).get("portMappings"):
            host_port = HOST_PORT_BASE + (index if isinstance(index, int) else 0)
            conf["runtimeConfig"] = {
                "portMappings": [
                    {"hostPort": host_port, "containerPort": CONTAINER_PORT, "protocol": "tcp"}
                ]
            }
        if prev is not None:
            conf["prevResult"] = prev
        return json.dumps(conf).encode()

    def _env(self, command: str, cid: str, netns_path: str) -> dict[str, str]:
        return {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": netns_path,
            "CNI_IFNAME": IFNAME,
            "CNI_PATH": self.cni_path,
            "PATH": PLAIN_PATH,
        }

    def run_add(self, ns: Netns, index: int | str, netns_name: str) -> Step:
        cid = self.container_id(index)
        env = self._env("ADD", cid, f"/run/netns/{netns_name}")
        prev: dict[str, Any] | None = None
        parts: list[float] = []
        with ns.inside(self.host.path):
            for plugin in self.chain:
                done = exec_timed([plugin.binary], env, self._conf(plugin, index, prev))
                _check(self, plugin, "ADD", cid, done)
                parts.append(done.ms)
                prev = json.loads(done.stdout)
        assert prev is not None
        self.results[cid] = prev
        return Step(sum(parts), parts)

    def run_del(self, ns: Netns, index: int | str, netns_name: str) -> Step:
        cid = self.container_id(index)
        env = self._env("DEL", cid, f"/run/netns/{netns_name}")
        prev = self.results.pop(cid)
        parts: list[float] = []
        with ns.inside(self.host.path):
            for plugin in reversed(self.chain):
                done = exec_timed([plugin.binary], env, self._conf(plugin, index, prev))
                _check(self, plugin, "DEL", cid, done)
                parts.append(done.ms)
        return Step(sum(parts), parts[::-1])


def _check(series: Series, plugin: Plugin, command: str, cid: str, done: Exec) -> None:
    if done.code != 0:
        text = (done.stdout or done.stderr).decode(errors="replace").strip()[:800]
        raise CommandFailed(
            f"{series.key}: {Path(plugin.binary).name} {command} {cid} failed "
            f"(rc={done.code}): {text}"
        )


# --------------------------------------------------------------------------- netstackd


def netstackd_command() -> list[str]:
    beside = Path(sys.executable).with_name("netstackd")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("netstackd")
    return [found] if found else [sys.executable, "-m", "netstack.daemon"]


@dataclass
class Daemon:
    host: BenchHost
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    starts: int = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """netstackd in the host namespace with its state dir; wait until it answers."""
        if self.running:
            return
        self.starts += 1
        self.log = self.host.tmp / f"netstackd-{self.starts}.log"
        resolv = self.host.tmp / "resolv.conf"
        resolv.write_text("# cni_latency: no upstream\n")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.host.argv(*netstackd_command()),
                env={**self.host.env(), "NETSTACK_RESOLV_CONF": str(resolv)},
                cwd=self.host.tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        status = self.host.argv(*self.host.netctl_argv, "status")
        while subprocess.run(status, env=self.host.env(), capture_output=True).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
                self.stop()
                raise CommandFailed(f"netstackd did not come up: {' | '.join(tail)}")
            time.sleep(0.05)

    def settle(self) -> None:
        """Wait until this netstackd has done the work that follows its last call (its
        `settle` op)."""
        if not self.running:
            return
        try:
            call("settle", self.host.run_dir / SOCKET_NAME, timeout=60.0)
        except NetstackError as exc:
            raise CommandFailed(f"netstackd settle: {exc}") from None

    def stop(self) -> None:
        """Stop the netstackd this script started (by its pid; nsenter exec'd it)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------- set-up


def bridge_conf(name: str, ipam: dict[str, Any]) -> dict[str, Any]:
    return {
        "bridge": name,
        "isGateway": True,
        "isDefaultGateway": True,
        "ipMasq": True,
        "hairpinMode": True,
        "ipam": ipam,
    }


def make_series(key: str, hosts: dict[str, BenchHost], netstack_bin: dict[str, str]) -> Series:
    host = hosts[key]
    port_mapping = key.endswith("_pm")
    if key.startswith("ref"):
        ipam = {
            "type": "host-local",
            "ranges": [[{"subnet": SUBNET}]],
            "dataDir": str(host.tmp / "host-local"),
        }
        chain = [Plugin(str(REF_BIN / "bridge"), {"type": "bridge", **bridge_conf("cnibr0", ipam)})]
        if port_mapping:
            chain.append(
                Plugin(
                    str(REF_BIN / "portmap"),
                    {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
                )
            )
        return Series(key, host, chain, str(REF_BIN), "refnet", port_mapping)
    conf: dict[str, Any] = {
        "type": "netstack",
        **bridge_conf("nsbr0", {"type": "netstack", "subnet": SUBNET}),
    }
    if port_mapping:
        conf["capabilities"] = {"portMappings": True}
    binary = netstack_bin[key]
    return Series(
        key,
        host,
        [Plugin(binary, conf)],
        f"{Path(binary).parent}:{REF_BIN}",
        "nsnet",
        port_mapping,
        solo=key.startswith("ns_solo"),
    )


def install_plugin(host: BenchHost) -> str:
    """`netctl cni install --bin-dir` with the host's env (its state and run dirs baked in)."""
    bin_dir = host.tmp / "bin"
    host.netctl("cni", "install", "--bin-dir", str(bin_dir))
    binary = bin_dir / "netstack"
    if not os.access(binary, os.X_OK):
        raise CommandFailed(f"netctl cni install wrote no executable {binary}")
    return str(binary)


# --------------------------------------------------------------------------- measurement


def buckets(n: int, size: int) -> tuple[range, range]:
    return range(1, size + 1), range(n - size + 1, n + 1)


def start_profilers(out: Path, series: list[Series]) -> list[subprocess.Popen[bytes]]:
    """py-spy record (raw collapsed stacks) of the netstackd of ns and ns_pm, until SIGINT."""
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for s in series:
        if s.key in ("ns", "ns_pm") and s.daemon is not None and s.daemon.proc is not None:
            argv = [
                "py-spy",
                "record",
                "-p",
                str(s.daemon.proc.pid),
                "-r",
                "200",
                "--idle",
                "-f",
                "raw",
            ]
            argv += ["-o", str(out / f"netstackd-{s.key}.txt")]
            procs.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
    return procs


def set_solo_daemons(series: list[Series], on: bool) -> None:
    for s in series:
        if s.solo and s.daemon is not None:
            if on:
                s.daemon.start()
            else:
                s.daemon.stop()


def measure(
    ns: Netns,
    series: list[Series],
    controls: list[Series],
    n: int,
    bucket: int,
    seed: int,
) -> None:
    order = random.Random(seed)
    first, last = buckets(n, bucket)
    in_bucket = set(first) | set(last)
    say("# warm-up: two ADD+DEL cycles of a warm-up container per series (1st ADD = cold)")
    set_solo_daemons(series, on=False)
    for s in [*series, *controls]:
        for cycle in range(2):
            a = s.run_add(ns, "w", s.containers[0])
            s.settle()
            d = s.run_del(ns, "w", s.containers[0])
            s.settle()
            if cycle == 0:
                s.cold_add, s.cold_del = a.ms, d.ms
    for phase in ("ADD", "DEL"):
        say(f"# {phase} of containers 1..{n}, every series per step, shuffled order ...")
        t0 = time.perf_counter()
        solo_on = False
        for i in range(1, n + 1):
            want_on = i not in in_bucket
            if want_on != solo_on:
                set_solo_daemons(series, on=want_on)
                solo_on = want_on
            todo: list[tuple[Series, str]] = [(s, "main") for s in series]
            if i in in_bucket and phase == "ADD":
                todo += [(c, "probe") for c in controls]
            order.shuffle(todo)
            for s, kind in todo:
                if kind == "probe":
                    tag = "first" if i in first else "last"
                    s.probe_at[i] = s.run_add(ns, i, s.containers[0]).ms
                    s.probe_add.setdefault(tag, []).append(s.probe_at[i])
                    s.settle()
                    s.probe_del.setdefault(tag, []).append(s.run_del(ns, i, s.containers[0]).ms)
                elif phase == "ADD":
                    s.add[i] = s.run_add(ns, i, s.containers[i])
                    if s.solo and want_on:
                        s.filled.add(i)
                else:
                    s.delete[i] = s.run_del(ns, i, s.containers[i])
                    if s.solo and want_on:
                        s.del_filled.add(i)
                s.settle()
            if i % 50 == 0 or i == n:
                say(f"#   {phase} {i}/{n} ({time.perf_counter() - t0:.0f} s)")
        set_solo_daemons(series, on=False)


def measure_startup(
    ns: Netns, host: BenchHost, netstack: str, reps: int, fast: Series | None
) -> dict[str, list[float]]:
    """Start-up cost, interleaved: VERSION execs of netstack and the reference bridge, the
    interpreter alone (`python -S -c pass`, what the installed script starts), /bin/true
    (the harness), and with netstackd: a DEL of an unknown container on the fast path
    (exec, forward, the daemon's lookups and reply: the floor of every fast-path call)."""
    version_stdin = json.dumps({"cniVersion": CNI_VERSION}).encode()
    version_env = {"CNI_COMMAND": "VERSION", "PATH": PLAIN_PATH}
    runs: dict[str, tuple[list[str], dict[str, str], bytes]] = {
        "netstack VERSION": ([netstack], version_env, version_stdin),
        "bridge VERSION": ([str(REF_BIN / "bridge")], version_env, version_stdin),
        "python -S -c pass": ([sys.executable, "-S", "-c", "pass"], version_env, b""),
        "/bin/true (harness)": (["/bin/true"], version_env, b""),
    }
    where = host.path
    if fast is not None:
        plugin = fast.chain[0]
        env = fast._env("DEL", "startup-probe", f"/run/netns/{fast.containers[0]}")
        runs["netstack DEL, unknown (fast path)"] = (
            [plugin.binary],
            env,
            fast._conf(plugin, 0, None),
        )
        where = fast.host.path
    times: dict[str, list[float]] = {k: [] for k in runs}
    order = random.Random(7)
    keys = list(runs)
    with ns.inside(where):
        for rep in range(reps + 2):
            order.shuffle(keys)
            for key in keys:
                argv, env, stdin = runs[key]
                done = exec_timed(argv, env, stdin)
                if done.code != 0:
                    raise CommandFailed(
                        f"{key} failed: {done.stdout[:300]!r} {done.stderr[:300]!r}"
                    )
                if rep >= 2:  # two warm-up rounds
                    times[key].append(done.ms)
    return times


# --------------------------------------------------------------------------- report


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def bucket_values(s: Series, which: str, idx: range) -> list[float]:
    table = s.add if which == "add" else s.delete
    return [table[i].ms for i in idx if i in table]


def bucket_ms(s: Series, which: str, idx: range) -> float:
    return med(bucket_values(s, which, idx))


def measured(s: Series, which: str) -> list[float]:
    table, skip = (s.add, s.filled) if which == "add" else (s.delete, s.del_filled)
    return [step.ms for i, step in sorted(table.items()) if i not in skip]


def same_step_ratios(a: Series, b: Series, which: str) -> list[float]:
    ta, tb = (a.add, b.add) if which == "add" else (a.delete, b.delete)
    skip = a.filled | b.filled if which == "add" else a.del_filled | b.del_filled
    return [ta[i].ms / tb[i].ms for i in ta if i in tb and i not in skip and tb[i].ms > 0]


def paired_ratios(s: Series, control: Series, steps: range) -> list[float]:
    """Each ADD of `steps` over the control's probe ADD of the same step (run next to it,
    in the same shuffled step). Paired growth: the median of the last bucket's ratios over
    the first's, which takes the drift out step by step."""
    return [
        s.add[i].ms / control.probe_at[i]
        for i in steps
        if i in s.add and control.probe_at.get(i, 0) > 0
    ]


def interval(before: list[float], after: list[float]) -> str:
    """The 90% bootstrap interval of median(after) / median(before), for a report line."""
    low, high = median_ratio_interval(before, after)
    return "" if low != low else f" [90%: {low:4.2f}-{high:4.2f}]"


def report(
    series: list[Series],
    controls: list[Series],
    startup: dict[str, list[float]],
    n: int,
    bucket: int,
) -> None:
    first, last = buckets(n, bucket)
    fb = f"{first[0]}-{first[-1]}"
    lb = f"{last[0]}-{last[-1]}"
    say()
    say("## plugin start-up: exec of the VERSION command (ms)")
    for key, values in startup.items():
        say(f"  {key:22} {Stats.of(values).line(2)}")
    ns_v, br_v = med(startup["netstack VERSION"]), med(startup["bridge VERSION"])
    say(f"  netstack / bridge: {ratio(ns_v, br_v):.2f}x")
    metric("cni_startup_netstack_version_ms", ns_v, "ms")
    metric("cni_startup_bridge_version_ms", br_v, "ms")
    metric("cni_startup_true_ms", med(startup["/bin/true (harness)"]), "ms")
    metric("cni_startup_netstack_vs_bridge", ratio(ns_v, br_v), "x")

    say()
    say(
        f"## ADD / DEL wall time per container (ms, medians), N={n} per series, buckets of {bucket}"
    )
    head = (
        f"{'series':42} {'cold ADD':>8} {f'ADD {fb}':>11} {f'ADD {lb}':>13} {'growth':>7} "
        f"{'ADD all':>8} {f'DEL {fb}':>11} {f'DEL {lb}':>13} {'DEL all':>8}"
    )
    say(head)
    for s in series:
        a1, a2 = bucket_ms(s, "add", first), bucket_ms(s, "add", last)
        d1, d2 = bucket_ms(s, "del", first), bucket_ms(s, "del", last)
        all_add, all_del = med(measured(s, "add")), med(measured(s, "del"))
        say(
            f"{s.label:42} {fmt(s.cold_add):>8} {fmt(a1):>11} {fmt(a2):>13} "
            f"{fmt(ratio(a2, a1), 2):>7} {fmt(all_add):>8} {fmt(d1):>11} {fmt(d2):>13} "
            f"{fmt(all_del):>8}"
        )
        metric(f"cni_{s.key}_cold_add_ms", s.cold_add, "ms")
        metric(f"cni_{s.key}_add_first_ms", a1, "ms")
        metric(f"cni_{s.key}_add_last_ms", a2, "ms")
        metric(f"cni_{s.key}_add_growth", ratio(a2, a1), "x")
        metric(f"cni_{s.key}_add_median_ms", all_add, "ms")
        metric(f"cni_{s.key}_del_first_ms", d1, "ms")
        metric(f"cni_{s.key}_del_last_ms", d2, "ms")
        metric(f"cni_{s.key}_del_median_ms", all_del, "ms")
    for c in controls:
        a1, a2 = med(c.probe_add.get("first", [])), med(c.probe_add.get("last", []))
        d1, d2 = med(c.probe_del.get("first", [])), med(c.probe_del.get("last", []))
        say(
            f"{c.label:42} {fmt(c.cold_add):>8} {fmt(a1):>11} {fmt(a2):>13} "
            f"{fmt(ratio(a2, a1), 2):>7} {'':>8} {fmt(d1):>11} {fmt(d2):>13}"
        )
        metric(f"cni_{c.key}_add_first_ms", a1, "ms")
        metric(f"cni_{c.key}_add_last_ms", a2, "ms")
        metric(f"cni_{c.key}_del_first_ms", d1, "ms")
        metric(f"cni_{c.key}_del_last_ms", d2, "ms")
    solo = [s for s in series if s.solo]
    if solo and n > 2 * bucket:
        say(
            f"  (standalone rows: only buckets {fb} and {lb} ran without netstackd; containers "
            "in between were set up through a netstackd and are not in 'all')"
        )
    pm = [s for s in series if s.key == "ref_pm"]
    for s in pm:
        bridge = med([st.parts[0] for i, st in s.add.items()])
        portmap = med([st.parts[1] for i, st in s.add.items()])
        dbridge = med([st.parts[0] for i, st in s.delete.items()])
        dportmap = med([st.parts[1] for i, st in s.delete.items()])
        say(
            f"  ref_pm parts (medians over all): ADD bridge {bridge:.1f} + portmap "
            f"{portmap:.1f} ms; DEL portmap {dportmap:.1f} + bridge {dbridge:.1f} ms"
        )

    say()
    say("## growth of ADD, 1st bucket -> last bucket (same network, ms medians)")
    by_key = {s.key: s for s in [*series, *controls]}
    for s in series:
        control = by_key.get("ref_fresh" if s.key.startswith("ref") else "ns_fresh")
        v1, v2 = bucket_values(s, "add", first), bucket_values(s, "add", last)
        a1, a2 = med(v1), med(v2)
        growth = ratio(a2, a1)
        spread = interval(v1, v2)
        line = f"  {s.label:42} {growth:5.2f}x{spread}"
        corrected = paired = float("nan")
        if control is not None and control.probe_add.get("last"):
            drift = ratio(med(control.probe_add["last"]), med(control.probe_add["first"]))
            corrected = growth / drift
            line += f"   control drift {drift:4.2f}x -> corrected {corrected:4.2f}x"
            metric(f"cni_{s.key}_add_growth_corrected", corrected, "x")
            before, after = paired_ratios(s, control, first), paired_ratios(s, control, last)
            paired = ratio(med(after), med(before))
            line += f"; paired step by step {paired:4.2f}x{interval(before, after)}"
            metric(f"cni_{s.key}_add_growth_paired", paired, "x")
            if s.key in ("ref", "ns"):  # the control is the same configuration on an empty host
                same_time = ratio(a2, med(control.probe_add["last"]))
                line += f"; same-time Nth/1st (vs empty network) {same_time:4.2f}x"
                metric(f"cni_{s.key}_add_growth_same_time", same_time, "x")
        if s.key in ("ns", "ns_pm"):
            verdicts = [f"raw {'meets' if growth <= GOAL_GROWTH else 'misses'}"]
            if corrected == corrected:
                verdicts.append(f"corrected {'meets' if corrected <= GOAL_GROWTH else 'misses'}")
            if paired == paired:
                verdicts.append(f"paired {'meets' if paired <= GOAL_GROWTH else 'misses'}")
            line += f"   goal <= {GOAL_GROWTH}: {', '.join(verdicts)}"
        say(line)

    say()
    say("## netstack / reference, same run (ratio of medians over all measured containers;")
    say("##   median of the same-step ratios; first and last bucket)")
    for ours, theirs, goal_add, goal_del in COMPARISONS:
        if ours not in by_key or theirs not in by_key:
            continue
        a, b = by_key[ours], by_key[theirs]
        for which, goal in (("add", goal_add), ("del", goal_del)):
            if a.solo:  # only the buckets were standalone: compare over the same steps
                steps = [i for i in (*first, *last) if i in (a.add if which == "add" else a.delete)]
                table_a = a.add if which == "add" else a.delete
                table_b = b.add if which == "add" else b.delete
                r_all = ratio(
                    med([table_a[i].ms for i in steps]), med([table_b[i].ms for i in steps])
                )
            else:
                r_all = ratio(med(measured(a, which)), med(measured(b, which)))
            r_step = med(same_step_ratios(a, b, which))
            r1 = ratio(bucket_ms(a, which, first), bucket_ms(b, which, first))
            r2 = ratio(bucket_ms(a, which, last), bucket_ms(b, which, last))
            text = (
                f"  {which.upper():3} {ours:10} / {theirs:6}: {r_all:5.2f}x  (same-step "
                f"{r_step:4.2f}x; {fb}: {r1:4.2f}x, {lb}: {r2:4.2f}x)"
            )
            if goal is not None:
                text += f"   goal <= {goal}: {'meets' if r_all <= goal else 'misses'}"
            say(text)
            metric(f"cni_{ours}_vs_{theirs}_{which}", r_all, "x")
            metric(f"cni_{ours}_vs_{theirs}_{which}_same_step", r_step, "x")


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: N=20 (< 60 s)")
    parser.add_argument(
        "-n", "--containers", type=int, help="containers per series (default 300, quick 20)"
    )
    parser.add_argument("--bucket", type=int, help="containers per first/last bucket (10)")
    parser.add_argument(
        "--series", default=",".join(SERIES), help=f"comma-separated subset of {','.join(SERIES)}"
    )
    parser.add_argument("--no-controls", action="store_true", help="skip the empty-network probes")
    parser.add_argument("--startup-reps", type=int, help="VERSION execs per binary (30, quick 10)")
    parser.add_argument("--seed", type=int, default=1, help="shuffle seed")
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy record netstackd of ns and ns_pm into DIR"
    )
    args = parser.parse_args()
    keys = [k for k in args.series.split(",") if k]
    unknown = sorted(set(keys) - set(SERIES))
    if unknown or not keys:
        parser.error(f"unknown series {unknown}; choose from {','.join(SERIES)}")
    n = args.containers or (20 if args.quick else 300)
    bucket = args.bucket or min(10, max(1, n // 2))
    if n < 2 or bucket * 2 > n:
        parser.error("need N >= 2 and 2 x bucket <= N")
    need_root()
    for name in ("bridge", "host-local", "portmap"):
        if not os.access(REF_BIN / name, os.X_OK):
            print(
                f"cni_latency: error: {REF_BIN / name} missing "
                "(Debian package containernetworking-plugins)",
                file=sys.stderr,
            )
            return 2
    if args.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy")
    exit_on_signals()
    controls_keys = (
        []
        if args.no_controls
        else [
            c
            for c in CONTROLS
            if (c == "ref_fresh" and any(k.startswith("ref") for k in keys))
            or (c == "ns_fresh" and any(k.startswith("ns") for k in keys))
        ]
    )
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "containernetworking-plugins"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    import netstack

    conditions = RunConditions(
        "cni_latency: CNI ADD/DEL latency, netstack vs reference bridge+host-local (+portmap)",
        [
            f"netstack from {Path(netstack.__file__).resolve().parent}; reference plugins "
            f"{REF_BIN} (containernetworking-plugins {version or '?'})",
            f"N={n} containers per series, buckets of {bucket}; series {','.join(keys)}; "
            f"controls {','.join(controls_keys) or 'none'}; cniVersion {CNI_VERSION}, "
            f"subnet {SUBNET}{' (quick)' if args.quick else ''}",
            PEER_NOTE,
        ],
    )
    daemons: list[Daemon] = []
    profilers: list[subprocess.Popen[bytes]] = []

    def stop_all() -> None:  # before the namespaces go: the daemons run in them
        for proc in profilers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for d in daemons:
            d.stop()

    with contextlib.ExitStack() as stack:
        main_host = stack.enter_context(BenchHost())
        hosts: dict[str, BenchHost] = {}
        for key in [*keys, *controls_keys]:
            hosts[key] = stack.enter_context(
                BenchHost(inside=main_host, suffix=key.replace("_", ""))
            )
        ns = Netns()
        stack.callback(ns.close)
        stack.callback(stop_all)
        say(f"# host namespaces {main_host.name}-<series>; containers <host>-<series>-cN")
        netstack_bin = {key: install_plugin(hosts[key]) for key in hosts if key.startswith("ns")}
        series = [make_series(k, hosts, netstack_bin) for k in keys]
        controls = [make_series(k, hosts, netstack_bin) for k in controls_keys]
        t0 = time.perf_counter()
        names: list[str] = []
        for s in [*series, *controls]:
            count = 1 if s in controls else n + 1  # [0] = warm-up / probe container
            tag = s.key.replace("_", "")
            s.containers = [f"{main_host.name}-{tag}-c{i}" for i in range(count)]
            names += s.containers
        add_netns(names)
        say(f"# {len(names)} container namespaces made in {time.perf_counter() - t0:.1f} s")
        for s in [*series, *controls]:
            if s.key.startswith("ns"):
                s.daemon = Daemon(s.host)
                daemons.append(s.daemon)
                if not s.solo:
                    s.daemon.start()
        if args.profile:
            profilers += start_profilers(Path(args.profile), series)
        any_netstack = next(iter(netstack_bin.values()), None) or install_plugin(main_host)
        fast = next((s for s in series if s.key == "ns"), None)
        startup = measure_startup(
            ns, main_host, any_netstack, args.startup_reps or (10 if args.quick else 30), fast
        )
        measure(ns, series, controls, n, bucket, args.seed)
        for proc in profilers:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        report(series, controls, startup, n, bucket)
        leftovers = (
            [p for p in Path("/etc/netns").glob("cni*")] if Path("/etc/netns").is_dir() else []
        )
        if leftovers:
            say(f"# note: /etc/netns entries named cni*: {[str(p) for p in leftovers]}")
    conditions.end()
    return 0


if __name__ == "__main__":
    run_main("cni_latency", main)
