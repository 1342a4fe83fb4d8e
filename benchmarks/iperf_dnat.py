#!/usr/bin/env python3
"""iperf3 throughput through a published port (DNAT) vs. straight to the sandbox address.

Topology, all in namespaces this script creates and removes:

    outside ns  nst-bench-<pid>-out   eth0 192.0.2.2/24, route SUBNET via 192.0.2.1
        | veth
    host ns     nst-bench-<pid>       benchup0 192.0.2.1/24; netstack network `bench`
        | netstack bridge                 (SUBNET, default 10.201.0.0/24)
    sandbox     nst-bench-<pid>-srv   `iperf3 -s -p 5201`, connected with -p HOSTPORT:5201

Paths, one short single-stream TCP test each per run, interleaved in a shuffled order:
* forward_dnat    outside -> 192.0.2.1:HOSTPORT  (prerouting DNAT through `pub4_any`, forwarded)
* forward_direct  outside -> SANDBOX_IP:5201     (routed by the host, no translation)
* forward_1rule   outside -> 192.0.2.1:HOSTPORT+1 through one hand-written nft DNAT rule in a
                  table of this script (`ip nstbench`), as the peer script sets it up: the
                  kernel's own DNAT cost on this path, to set netstack's maps against
* local_dnat      host    -> 192.0.2.1:HOSTPORT  (output-hook DNAT; the peer's "DNAT" path)
* local_direct    host    -> SANDBOX_IP:5201     (the peer's "direct" path)
* loopback        host    -> 127.0.0.1:HOSTPORT  (output DNAT + masquerade, route_localnet)

The goal is forward_dnat / forward_direct >= 0.9 (medians, same run). Nothing listens on the
host's port HOSTPORT, so a forward_dnat/local_dnat/loopback test that completes went through
the translation; conntrack's view is printed at the end as a second check.

    python3 benchmarks/iperf_dnat.py            # 7 runs x 3 s per path
    python3 benchmarks/iperf_dnat.py --quick    # smoke: 2 runs x 1 s per path (< 30 s)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    NETNS_DIR,
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

NETWORK = "bench"
HOST_ADDR = "192.0.2.1"
OUTSIDE_ADDR = "192.0.2.2"
UPLINK = "benchup0"  # not a netstack prefix (nsbr/nsv/nsp): reconciliation leaves it alone
SERVER_PORT = 5201
GOAL_RATIO = 0.9
PEER_NOTE = (
    "peer reference (shared/peers/README.md, iperf_dnat.sh, another run, same kind of "
    "machine): hand-written nft DNAT (one rule) host -> container 0.98 x the direct path; "
    "its forwarded-DNAT path is printed by the script but not quoted in the README"
)
PATHS = (
    "forward_dnat",
    "forward_direct",
    "forward_1rule",
    "local_dnat",
    "local_direct",
    "loopback",
)
RULE_TABLE = "ip nstbench"  # the one-rule reference DNAT (not netstack's table)


@dataclass
class Sample:
    gbits: float
    retransmits: int
    client_cpu: float  # iperf3's cpu_utilization_percent.host_total (client process)
    server_cpu: float  # remote_total (the server process in the sandbox)


@dataclass
class PathResult:
    name: str
    where: str
    target: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def gbits(self) -> list[float]:
        return [s.gbits for s in self.samples]

    def median(self) -> float:
        return Stats.of(self.gbits).median


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CommandFailed(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")


def in_netns(namespace: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net={NETNS_DIR / namespace}", *argv]


def listening(namespace: str, port: int) -> bool:
    proc = subprocess.run(
        in_netns(namespace, "ss", "-Hltn", f"sport = :{port}"),
        capture_output=True,
        text=True,
        check=False,
    )
    return "LISTEN" in proc.stdout


def iperf_once(client_ns: str, address: str, port: int, seconds: int) -> Sample:
    """One single-stream TCP test from CLIENT_NS; receiver-side Gbit/s."""
    argv = in_netns(client_ns, "iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-J")
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 20, check=False
        )
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"iperf3 {client_ns} -> {address}:{port} timed out") from None
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        doc = {"error": (proc.stdout + proc.stderr).strip()[:300]}
    if proc.returncode != 0 or "error" in doc:
        raise CommandFailed(
            f"iperf3 {client_ns} -> {address}:{port} failed (rc={proc.returncode}): "
            f"{doc.get('error', proc.stderr.strip()[:300])}"
        )
    end = doc["end"]
    cpu = end.get("cpu_utilization_percent", {})
    return Sample(
        gbits=end["sum_received"]["bits_per_second"] / 1e9,
        retransmits=int(end.get("sum_sent", {}).get("retransmits", 0)),
        client_cpu=float(cpu.get("host_total", float("nan"))),
        server_cpu=float(cpu.get("remote_total", float("nan"))),
    )


def conntrack_view(host: BenchHost, sandbox_ip: str, host_port: int) -> str:
    """How many tracked flows to HOST_ADDR:host_port were translated to the sandbox."""
    if shutil.which("conntrack") is None:
        return "conntrack tool not installed"
    proc = subprocess.run(
        host.argv("conntrack", "-L", "-p", "tcp", "--orig-port-dst", str(host_port)),
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if f"dport={host_port}" in line]
    to_host = [line for line in lines if f"dst={HOST_ADDR} " in line]
    translated = [line for line in to_host if f"src={sandbox_ip} " in line]
    loop = [line for line in lines if "dst=127.0.0.1 " in line and f"src={sandbox_ip} " in line]
    return (
        f"{len(translated)} of {len(to_host)} tracked flows to {HOST_ADDR}:{host_port} and "
        f"{len(loop)} to 127.0.0.1:{host_port} have the sandbox {sandbox_ip}:{SERVER_PORT} as "
        "their reply source (DNAT'd)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode (< 30 s)")
    parser.add_argument("-r", "--runs", type=int, help="runs per path (default 7, quick 2)")
    parser.add_argument("-t", "--time", type=int, help="seconds per test (default 3, quick 1)")
    parser.add_argument("--host-port", type=int, default=15201, help="published port (15201)")
    parser.add_argument("--subnet", default="10.201.0.0/24", help="the network's subnet")
    parser.add_argument(
        "--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}"
    )
    args = parser.parse_args()
    paths_wanted = [p for p in args.paths.split(",") if p]
    unknown = set(paths_wanted) - set(PATHS)
    if unknown or not {"forward_dnat", "forward_direct"} <= set(paths_wanted):
        parser.error(f"--paths: known {PATHS}; forward_dnat and forward_direct are required")

    need_root()
    if shutil.which("iperf3") is None or shutil.which("ss") is None:
        sys.exit("this benchmark needs iperf3 and ss (apt-get install iperf3 iproute2)")
    exit_on_signals()
    runs = args.runs or (2 if args.quick else 7)
    seconds = args.time or (1 if args.quick else 3)
    version = subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout
    conditions = RunConditions(
        "iperf_dnat: iperf3 through a published port (DNAT) vs straight to the sandbox",
        [
            f"{version.split()[1] if version else 'iperf3 ?'}: single TCP stream, {seconds} s "
            f"per test, {runs} runs per path, paths interleaved in shuffled order; "
            f"receiver-side Gbit/s{' (quick)' if args.quick else ''}",
            f"network {NETWORK} {args.subnet}; sandbox published with -p "
            f"{args.host_port}:{SERVER_PORT}; outside {OUTSIDE_ADDR} -> host {HOST_ADDR}",
        ],
    )
    server: subprocess.Popen[bytes] | None = None
    with BenchHost() as host, BenchHost(inside=host, suffix="out") as outside:
        try:
            sandbox = f"{host.name}-srv"
            say(f"# namespaces: host {host.name}, outside {outside.name}, sandbox {sandbox}")
            # the "outside" link: a veth between the host namespace and the client namespace
            veth = f"link add {UPLINK} type veth peer name eth0 netns {outside.name}"
            ip("-n", host.name, *veth.split())
            ip("-n", host.name, "addr", "add", f"{HOST_ADDR}/24", "dev", UPLINK)
            ip("-n", host.name, "link", "set", UPLINK, "up")
            ip("-n", outside.name, "addr", "add", f"{OUTSIDE_ADDR}/24", "dev", "eth0")
            ip("-n", outside.name, "link", "set", "eth0", "up")
            ip("-n", outside.name, "route", "add", args.subnet, "via", HOST_ADDR)

            host.netctl("network", "create", "--subnet", args.subnet, NETWORK)
            host.netctl("sandbox", "create", sandbox)
            host.netctl(
                "network", "connect", NETWORK, sandbox, "-p", f"{args.host_port}:{SERVER_PORT}"
            )
            (doc,) = json.loads(
                host.netctl("network", "inspect", NETWORK, "--format", "json").stdout
            )
            (endpoint,) = doc["Endpoints"]
            sandbox_ip = endpoint["IPv4Address"].split("/")[0]
            published = host.netctl("port", sandbox).stdout.strip().replace("\n", "; ")
            say(f"# sandbox address {sandbox_ip}; netctl port: {published}")
            rule_port = args.host_port + 1
            for port in (args.host_port, rule_port):
                if listening(host.name, port):
                    raise CommandFailed(f"something listens on the host's port {port}")
            if "forward_1rule" in paths_wanted:
                host.run(
                    "nft",
                    f"add table {RULE_TABLE}\n"
                    f"add chain {RULE_TABLE} prerouting {{ type nat hook prerouting "
                    "priority dstnat - 1; policy accept; }\n"
                    f"add rule {RULE_TABLE} prerouting fib daddr type local tcp dport "
                    f"{rule_port} dnat to {sandbox_ip}:{SERVER_PORT}",
                )

            # one iperf3 server for the whole run; killed by its pid (nsenter execs iperf3)
            server = subprocess.Popen(
                in_netns(sandbox, "iperf3", "-s", "-p", str(SERVER_PORT)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while not listening(sandbox, SERVER_PORT):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise CommandFailed("iperf3 -s did not start in the sandbox")
                time.sleep(0.05)

            results = {
                "forward_dnat": PathResult("forward_dnat", outside.name, HOST_ADDR),
                "forward_direct": PathResult("forward_direct", outside.name, sandbox_ip),
                "forward_1rule": PathResult("forward_1rule", outside.name, HOST_ADDR),
                "local_dnat": PathResult("local_dnat", host.name, HOST_ADDR),
                "local_direct": PathResult("local_direct", host.name, sandbox_ip),
                "loopback": PathResult("loopback", host.name, "127.0.0.1"),
            }
            results = {k: v for k, v in results.items() if k in paths_wanted}
            port_of = {k: SERVER_PORT if k.endswith("direct") else args.host_port for k in results}
            port_of["forward_1rule"] = rule_port
            # warm-up (ARP, page cache of iperf3), not counted
            for name in ("forward_dnat", "forward_direct"):
                iperf_once(results[name].where, results[name].target, port_of[name], 1)
            order = list(results)
            shuffle = random.Random(5201)
            for run in range(runs):
                shuffle.shuffle(order)
                cells = []
                for name in order:
                    path = results[name]
                    sample = iperf_once(path.where, path.target, port_of[name], seconds)
                    path.samples.append(sample)
                    cells.append(f"{name} {sample.gbits:.2f}")
                say(f"# run {run + 1}: " + ", ".join(cells) + " Gbit/s")
            check = conntrack_view(host, sandbox_ip, args.host_port)
        finally:
            if server is not None and server.poll() is None:
                server.terminate()
                try:
                    server.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
        return report(results, runs, check, conditions)


def report(results: dict[str, PathResult], runs: int, check: str, conditions: RunConditions) -> int:
    say()
    say(f"{'path':15} {'target':>12}  Gbit/s: median  min    max   | retr. | CPU% client server")
    for path in results.values():
        st = Stats.of(path.gbits)
        retr = Stats.of([float(s.retransmits) for s in path.samples]).median
        ccpu = Stats.of([s.client_cpu for s in path.samples]).median
        scpu = Stats.of([s.server_cpu for s in path.samples]).median
        say(
            f"{path.name:15} {path.target:>12}  {st.median:13.2f} {st.minimum:6.2f} "
            f"{st.maximum:6.2f} | {retr:5.0f} | {ccpu:10.0f} {scpu:6.0f}"
        )
    say(f"# {check}")
    say()

    def pair(a: str, b: str) -> tuple[float, float] | None:
        if a not in results or b not in results:
            return None
        of_medians = ratio(results[a].median(), results[b].median())
        per_run = Stats.of(
            [ratio(x, y) for x, y in zip(results[a].gbits, results[b].gbits, strict=True)]
        ).median
        return of_medians, per_run

    # (label, numerator, denominator, metric name)
    rows = (
        ("forward: DNAT / direct  (goal >= 0.9)", "forward_dnat", "forward_direct", "forward"),
        (
            "forward: one-rule DNAT / direct (kernel's own)",
            "forward_1rule",
            "forward_direct",
            "forward_1rule",
        ),
        ("forward: netstack maps / one-rule DNAT", "forward_dnat", "forward_1rule", "maps_1rule"),
        ("host-local: DNAT / direct (the peer's ratio)", "local_dnat", "local_direct", "local"),
        ("host 127.0.0.1 (DNAT+masq) / local direct", "loopback", "local_direct", "loopback"),
    )
    ratios: dict[str, tuple[float, float]] = {}
    say(f"{'ratio (same run)':46} {'of medians':>10} {'median of per-run':>18}")
    for label, a, b, key in rows:
        got = pair(a, b)
        if got is not None:
            ratios[key] = got
            say(f"{label:46} {got[0]:10.3f} {got[1]:18.3f}")
    main_ratio = ratios["forward"][0]
    say(
        f"goal forward DNAT/direct >= {GOAL_RATIO}: "
        f"{'met' if main_ratio >= GOAL_RATIO else 'MISSED'} ({main_ratio:.3f})"
    )
    say(f"# {PEER_NOTE}")
    if "local" in ratios:
        say(
            f"# netstack host-local DNAT/direct {ratios['local'][0]:.3f} vs the peer's 0.98 "
            "(cross-run, context only)"
        )
    conditions.end()
    for path in results.values():
        metric(f"netstack_iperf_{path.name}_median", path.median(), "Gbit/s")
    names = {
        "forward": "netstack_iperf_dnat_over_direct_forward",
        "forward_1rule": "netstack_iperf_1rule_dnat_over_direct_forward",
        "maps_1rule": "netstack_iperf_dnat_over_1rule_dnat_forward",
        "local": "netstack_iperf_dnat_over_direct_local",
        "loopback": "netstack_iperf_loopback_over_direct_local",
    }
    for key, (of_medians, _per_run) in ratios.items():
        metric(names[key], of_medians, "x")
    metric("netstack_iperf_runs_per_path", runs, "runs")
    return 0


if __name__ == "__main__":
    run_main("iperf_dnat", main)
