#!/usr/bin/env python3
"""dnsperf against netstack's resolver, aardvark-dns and dnsmasq: queries/s and latency.

Topology, all in namespaces this script creates and removes:

    host ns   nst-bench-<pid>     netstack bridge network `bench` (10.77.0.0/16)
                                  netstackd: resolver on the gateway 10.77.0.1:53
                                  aardvark-dns on 10.77.255.253:53 (extra address on the bridge)
                                  dnsmasq      on 10.77.255.252:53 (extra address on the bridge)
        | netstack bridge
    sandboxes nst-bench-<pid>-d01..d50, each connected to `bench` with --alias nameNN;
              dnsperf runs in nst-bench-<pid>-d01 (netstack's resolver and aardvark-dns only
              answer clients that are their own endpoints / containers)

The three servers serve the same names (name01..name50, the aliases) with the same
addresses (the ones netstack gave the endpoints), are reached over the same bridge from the
same client namespace on UDP port 53, and run in the same run. Each is checked to answer
every name correctly before timing. The two extra addresses are reserved as the network's
aux addresses, so IPAM never hands them out.

Throughput: dnsperf -c CLIENTS -T THREADS -q OUTSTANDING against each server for SECONDS in
all, split into ROUNDS runs; the order of the servers rotates by one each round so load
drift does not favour one. Latency: the average latency of those runs (at saturation it is
mostly queueing: outstanding / qps) and of a paced run at a fixed offered load (-Q PACED,
-q 10), the server's own latency at light load. The CPU used by dnsperf (wait4 rusage) and
by each server (/proc/<pid>/stat) during the runs is shown: the 2 CPUs are shared by
dnsperf and the server, so a server that burns less CPU per query leaves more to dnsperf.

Goal (the issue): netstack >= dnsmasq in queries/s. Reported, not enforced. Exit status 1
if a server answers a name wrongly or dnsperf sees a response code other than NOERROR;
2 if a tool is missing (dnsperf, aardvark-dns, dnsmasq, netstackd).

    python3 benchmarks/dns_qps.py            # 30 s per server (6 rounds x 5 s), 50 names
    python3 benchmarks/dns_qps.py --quick    # smoke: 3 s per server, 1 round (~20 s)
    python3 benchmarks/dns_qps.py --servers aardvark-dns,dnsmasq   # peers only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    NETNS_DIR,
    BenchHost,
    CommandFailed,
    RunConditions,
    exit_on_signals,
    metric,
    need_root,
    ratio,
    run_main,
    say,
)

NETWORK = "bench"
SUBNET = "10.77.0.0/16"
GATEWAY = "10.77.0.1"
AARDVARK_ADDR = "10.77.255.253"
DNSMASQ_ADDR = "10.77.255.252"
PORT = 53
SERVERS = ("netstack", "aardvark-dns", "dnsmasq")
AARDVARK_PATHS = ("/usr/lib/podman/aardvark-dns", "/usr/libexec/podman/aardvark-dns")
PEER_NOTE = (
    "issue's figures (dnsperf, this kind of machine, another run): aardvark-dns ~91k q/s, "
    "Docker's embedded DNS ~88k, dnsmasq ~189k; shared/peers/README.md: 99.6k / 92.5k / 205.6k"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- tools


def netstackd_command() -> list[str]:
    """netstackd beside this interpreter (a venv's own first), else on PATH, else -m."""
    beside = Path(sys.executable).with_name("netstackd")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("netstackd")
    return [found] if found else [sys.executable, "-m", "netstack.daemon"]


def aardvark_command() -> str | None:
    """aardvark-dns: $AARDVARK, podman's libexec dirs (Debian's package), or PATH."""
    candidates = [os.environ.get("AARDVARK", ""), *AARDVARK_PATHS]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    return shutil.which("aardvark-dns")


def find_tools(servers: list[str]) -> dict[str, str]:
    """Paths of the tools the run needs; exit 2 naming every missing one."""
    found: dict[str, str] = {}
    missing: list[str] = []
    wanted = {"dnsperf": ("dnsperf", "dnsperf")}
    if "aardvark-dns" in servers:
        wanted["aardvark-dns"] = ("aardvark-dns", "aardvark-dns")
    if "dnsmasq" in servers:
        wanted["dnsmasq"] = ("dnsmasq", "dnsmasq-base")
    for key, (command, package) in wanted.items():
        path = aardvark_command() if key == "aardvark-dns" else shutil.which(command)
        if path is None:
            missing.append(f"{command} (Debian package {package})")
        else:
            found[key] = path
    if "netstack" in servers:
        try:
            import netstack.daemon  # noqa: F401
        except ImportError:
            missing.append("netstack's netstackd (pip install -e .)")
    if missing:
        print(
            "dns_qps: error: missing " + ", ".join(missing) + "; `sudo .ci/setup --test` "
            "installs them (apt-get install dnsperf aardvark-dns dnsmasq-base)",
            file=sys.stderr,
        )
        sys.exit(2)
    return found


def version_of(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    lines = (proc.stdout + proc.stderr).splitlines()
    for line in lines:
        if re.search(r"\d+\.\d+", line) and "syslog" not in line:
            return line.strip()
    return "?"


# --------------------------------------------------------------------------- helper modes


def populate(network: str, prefix: str, count: int) -> None:
    """(Runs in the host namespace.) Sandboxes PREFIX-d01.., each connected with alias nameNN."""
    from netstack.cli.commands import build_controller
    from netstack.controller import ConnectRequest

    controller = build_controller()
    for i in range(1, count + 1):
        sandbox = f"{prefix}-d{i:02d}"
        controller.create_sandbox(sandbox)
        controller.connect(network, sandbox, ConnectRequest(aliases=[f"name{i:02d}"]))


def check(spec_file: str) -> None:
    """(Runs in the client sandbox.) Ask every server for every name; print what is wrong.

    spec: {"servers": {label: address}, "names": {name: address}, "timeout": seconds}.
    Retries a server until it answers all names right or the timeout passes (records
    appear shortly after a connect; a daemon needs a moment to bind). Prints
    {label: [problems]} as JSON.
    """
    from dnslib import QTYPE, RCODE, DNSRecord  # type: ignore[import-untyped]

    spec = json.loads(Path(spec_file).read_text())
    problems: dict[str, list[str]] = {}
    for label, server in spec["servers"].items():
        deadline = time.monotonic() + spec["timeout"]
        while True:
            wrong: list[str] = []
            for name, expected in spec["names"].items():
                try:
                    raw = DNSRecord.question(name, "A").send(server, PORT, timeout=1.0)
                    reply = DNSRecord.parse(raw)
                except OSError as exc:  # includes socket.timeout
                    wrong.append(f"{name}: no answer ({exc or 'timeout'})")
                    continue
                got = sorted(str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A)
                if reply.header.rcode != RCODE.NOERROR or got != [expected]:
                    rcode = RCODE.get(reply.header.rcode)
                    wrong.append(f"{name}: {rcode} {got}, expected [{expected}]")
            if not wrong or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        problems[label] = wrong
    print(json.dumps(problems))


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    label: str
    address: str
    pid: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    runs: list[Run] = field(default_factory=list)
    paced: list[Run] = field(default_factory=list)


@dataclass
class Run:
    qps: float
    completed: int
    sent: int
    lost: int
    seconds: float
    avg_latency_us: float
    max_latency_us: float
    noerror: int
    dnsperf_cpu_s: float
    server_cpu_s: float


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_for_udp(host: BenchHost, server: Server) -> None:
    """Wait until the server's UDP socket is bound (15 s at most)."""
    deadline = time.monotonic() + 15
    where = f"{server.address}:{PORT}"
    while not host.run("ss", "-Hlnu", f"src {where}").stdout.strip():
        if server.proc is not None and server.proc.poll() is not None:
            raise CommandFailed(
                f"{server.label} exited (rc={server.proc.returncode}): {tail(server.log)}"
            )
        if time.monotonic() > deadline:
            hint = " (does this netstackd serve DNS?)" if server.label == "netstack" else ""
            raise CommandFailed(f"{server.label}: nothing listens on {where} after 15 s{hint}")
        time.sleep(0.05)


def start_netstackd(host: BenchHost) -> Server:
    log_file = host.tmp / "netstackd.log"
    server = Server("netstack", GATEWAY, log=log_file)
    # no upstream servers: nothing is forwarded (every name asked is netstack's anyway)
    resolv = host.tmp / "resolv.conf"
    resolv.write_text("# dns_qps: no upstream\n")
    with open(log_file, "wb") as log:
        server.proc = subprocess.Popen(
            host.argv(*netstackd_command()),
            env={**host.env(), "NETSTACK_RESOLV_CONF": str(resolv)},
            cwd=host.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server.pid = server.proc.pid  # nsenter execs netstackd in the same process
    deadline = time.monotonic() + 20
    status = host.argv(*host.netctl_argv, "status")
    while subprocess.run(status, env=host.env(), capture_output=True, check=False).returncode:
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise CommandFailed(f"netstackd did not come up: {tail(server.log)}")
        time.sleep(0.1)
    return server


def start_aardvark(host: BenchHost, path: str, names: dict[str, str]) -> Server:
    """aardvark-dns as netavark starts it: a config dir with one file per network.

    aardvark-dns 1.4 file format: first line the listen address(es), comma-separated
    (an optional second column: upstream servers); then one line per container:
    `<id> <ipv4s> <ipv6s> <names>` (single spaces, comma-separated lists, empty v6 field).
    It only answers clients whose source address is a container in its config. `run`
    forks into the background and writes config/aardvark.pid.
    """
    config = host.tmp / "aardvark"
    config.mkdir()
    lines = [AARDVARK_ADDR]
    for i, (name, address) in enumerate(names.items(), 1):
        lines.append(f"{i:064x} {address}  {name}")
    (config / NETWORK).write_text("\n".join(lines) + "\n")
    log_file = host.tmp / "aardvark.log"
    server = Server("aardvark-dns", AARDVARK_ADDR, log=log_file)
    with open(log_file, "wb") as log:
        proc = subprocess.run(
            host.argv(path, "--config", str(config), "-p", str(PORT), "run"),
            env=host.env(),
            cwd=host.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=30,
            check=False,
        )
    pid_file = config / "aardvark.pid"
    if proc.returncode != 0 or not pid_file.exists():
        raise CommandFailed(
            f"aardvark-dns did not start (rc={proc.returncode}): {tail(server.log)}"
        )
    server.pid = int(pid_file.read_text().strip())
    return server


def start_dnsmasq(host: BenchHost, path: str, names: dict[str, str]) -> Server:
    """dnsmasq from the command line only: no config file, no upstream, no /etc/hosts."""
    log_file = host.tmp / "dnsmasq.log"
    server = Server("dnsmasq", DNSMASQ_ADDR, log=log_file)
    argv = [
        path,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        f"--listen-address={DNSMASQ_ADDR}",
        "--bind-interfaces",
        f"--port={PORT}",
        f"--pid-file={host.tmp / 'dnsmasq.pid'}",  # also marks it as ours (sweep_leftovers)
        "--log-facility=-",
        *(f"--host-record={name},{address}" for name, address in names.items()),
    ]
    with open(log_file, "wb") as log:
        server.proc = subprocess.Popen(
            host.argv(*argv), env=host.env(), cwd=host.tmp, stdout=log, stderr=subprocess.STDOUT
        )
    server.pid = server.proc.pid
    return server


def sweep_leftovers() -> None:
    """Remove what a killed run left that BenchHost's own sweep does not know about.

    * the servers: every process whose working directory or command line is in a
      ``nst-bench-<pid>-*`` temp dir of a pid that no longer runs (netstackd runs there;
      aardvark-dns forks itself away, its --config is there; dnsmasq's --pid-file is there);
    Runs before BenchHost's sweep, which deletes those temp dirs (and /etc/netns entries).
    """
    temp = re.escape(tempfile.gettempdir().rstrip("/"))
    pattern = re.compile(temp + r"/nst-bench-(\d+)-[^/\0]+")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            where = (
                os.readlink(proc / "cwd") + "\0" + (proc / "cmdline").read_text(errors="replace")
            )
        except OSError:
            continue
        match = pattern.search(where)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            name = (proc / "cmdline").read_text(errors="replace").split("\0")[0]
            say(f"# stopping {Path(name).name} (pid {proc.name}) left by a killed run")
            stop(Server("leftover", "", pid=int(proc.name)))


def stop(server: Server) -> None:
    """Stop a server this script started, by its pid."""
    if server.proc is not None:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        return
    if server.pid:  # aardvark-dns forked itself: not our child
        try:
            os.kill(server.pid, 15)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while Path(f"/proc/{server.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{server.pid}").exists():
            os.kill(server.pid, 9)


def tail(path: Path | None, lines: int = 5) -> str:
    if path is None or not path.exists():
        return ""
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


# --------------------------------------------------------------------------- dnsperf

_FIELDS = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "seconds": re.compile(r"Run time \(s\):\s+([\d.]+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "avg": re.compile(r"Average Latency \(s\):\s+([\d.]+)\s+\(min [\d.]+, max ([\d.]+)\)"),
    "noerror": re.compile(r"NOERROR (\d+)"),
}


@dataclass(frozen=True)
class Dnsperf:
    """dnsperf runs from the client namespace with one query file; output kept in LOGS."""

    path: str
    client: str
    queries: Path
    logs: Path

    def run(self, server: Server, seconds: float, options: list[str], tag: str) -> Run:
        """One run; dnsperf's CPU time from wait4 (nsenter execs it), the server's from /proc."""
        argv = [
            "nsenter",
            f"--net={NETNS_DIR / self.client}",
            self.path,
            *("-s", server.address, "-p", str(PORT), "-d", str(self.queries)),
            *("-l", f"{seconds:g}", "-t", "2", *options),
        ]
        server_cpu0 = cpu_seconds(server.pid)
        with open(self.logs / f"{tag}.txt", "w+") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            try:
                _pid, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            text = out.read()
        server_cpu = cpu_seconds(server.pid) - server_cpu0
        found = {key: rx.search(text) for key, rx in _FIELDS.items()}
        if proc.returncode != 0 or any(
            found[k] is None for k in ("sent", "completed", "qps", "avg")
        ):
            raise CommandFailed(
                f"dnsperf against {server.label} failed (rc={proc.returncode}): "
                + " | ".join(text.strip().splitlines()[-5:])
            )

        def num(key: str, group: int = 1) -> float:
            match = found[key]
            return float(match.group(group)) if match else 0.0

        return Run(
            qps=num("qps"),
            completed=int(num("completed")),
            sent=int(num("sent")),
            lost=int(num("lost")),
            seconds=num("seconds"),
            avg_latency_us=num("avg") * 1e6,
            max_latency_us=num("avg", 2) * 1e6,
            noerror=int(num("noerror")),
            dnsperf_cpu_s=usage.ru_utime + usage.ru_stime,
            server_cpu_s=server_cpu,
        )


@dataclass(frozen=True)
class Totals:
    qps: float
    avg_latency_us: float
    completed: int
    sent: int
    lost: int
    noerror: int
    dnsperf_cpu: float  # % of one CPU over the runs' time
    server_cpu: float
    server_us_per_query: float


def totals(runs: list[Run]) -> Totals:
    """All runs as one: completed / run time, latency weighted by completed queries."""
    seconds = sum(r.seconds for r in runs)
    completed = sum(r.completed for r in runs)
    latency = sum(r.avg_latency_us * r.completed for r in runs)
    return Totals(
        qps=completed / seconds if seconds else float("nan"),
        avg_latency_us=latency / completed if completed else float("nan"),
        completed=completed,
        sent=sum(r.sent for r in runs),
        lost=sum(r.lost for r in runs),
        noerror=sum(r.noerror for r in runs),
        dnsperf_cpu=100.0 * sum(r.dnsperf_cpu_s for r in runs) / seconds if seconds else 0.0,
        server_cpu=100.0 * sum(r.server_cpu_s for r in runs) / seconds if seconds else 0.0,
        server_us_per_query=(
            1e6 * sum(r.server_cpu_s for r in runs) / completed if completed else float("nan")
        ),
    )


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode (< 60 s)")
    parser.add_argument("-n", "--names", type=int, help="names = sandboxes (default 50)")
    parser.add_argument(
        "-t", "--seconds", type=float, help="dnsperf seconds per server (default 30, quick 3)"
    )
    parser.add_argument("--rounds", type=int, help="split into rounds (default 6, quick 1)")
    parser.add_argument("-c", "--clients", type=int, default=1, help="dnsperf -c (default 1)")
    parser.add_argument("-T", "--threads", type=int, default=1, help="dnsperf -T (default 1)")
    parser.add_argument(
        "-q", "--outstanding", type=int, default=100, help="dnsperf -q (default 100)"
    )
    parser.add_argument(
        "--paced", type=int, default=1000, help="offered q/s of the latency run (0: none)"
    )
    parser.add_argument(
        "--paced-seconds",
        type=float,
        help="paced seconds per server, split over the rounds (default 12, quick 1)",
    )
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"comma-separated subset of {SERVERS}"
    )
    parser.add_argument(
        "--populate", nargs=3, metavar=("NET", "PREFIX", "N"), help=argparse.SUPPRESS
    )
    parser.add_argument("--check", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--logs", type=Path, help="keep dnsperf's output in this directory")
    args = parser.parse_args()

    if args.populate:
        network, prefix, count = args.populate
        populate(network, prefix, int(count))
        return 0
    if args.check:
        check(args.check)
        return 0

    servers_wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(servers_wanted) - set(SERVERS))
    if unknown or not servers_wanted:
        parser.error(f"--servers: unknown {unknown}; choose from {SERVERS}")
    need_root()
    tools = find_tools(servers_wanted)
    exit_on_signals()
    count = args.names or 50
    if not 1 <= count <= 99:
        parser.error("--names must be 1..99")
    seconds = args.seconds or (3.0 if args.quick else 30.0)
    rounds = args.rounds or (1 if args.quick else 6)
    per_run = seconds / rounds
    paced_seconds = (args.paced_seconds or (1.0 if args.quick else 12.0)) / rounds
    options = ["-c", str(args.clients), "-T", str(args.threads), "-q", str(args.outstanding)]

    import netstack

    versions = [version_of([tools["dnsperf"], "-h"]).split("Version")[-1].strip() or "?"]
    if "aardvark-dns" in tools:
        versions.append(version_of([tools["aardvark-dns"], "--version"]))
    if "dnsmasq" in tools:
        versions.append(version_of([tools["dnsmasq"], "--version"]).split("  ")[0])
    conditions = RunConditions(
        "dns_qps: dnsperf against netstack's resolver, aardvark-dns and dnsmasq",
        [
            f"netstack from {Path(netstack.__file__).resolve().parent}; dnsperf "
            + "; ".join(versions),
            f"servers {servers_wanted}; {count} names (A), UDP port {PORT}, one client "
            f"namespace; dnsperf {' '.join(options)}, {seconds:g} s per server in {rounds} "
            f"round(s) of {per_run:g} s, order rotated per round; paced latency run "
            f"-Q {args.paced} -q 10 for {paced_seconds:g} s per server per round"
            f"{' (quick)' if args.quick else ''}",
            "dnsmasq: default cache (150), names as --host-record; aardvark-dns: its config "
            "dir, port via -p",
        ],
    )
    servers: dict[str, Server] = {}
    sweep_leftovers()
    with BenchHost() as host:
        try:
            say(f"# host namespace {host.name}; netctl: {' '.join(host.netctl_argv)}")
            host.netctl(
                "network",
                "create",
                "--subnet",
                SUBNET,
                "--aux-address",
                f"aardvark={AARDVARK_ADDR}",
                "--aux-address",
                f"dnsmasq={DNSMASQ_ADDR}",
                NETWORK,
            )
            if "netstack" in servers_wanted:
                t0 = time.perf_counter()
                servers["netstack"] = start_netstackd(host)
                say(
                    f"# netstackd pid {servers['netstack'].pid} up in "
                    f"{time.perf_counter() - t0:.1f} s"
                )
            names, client = set_up_endpoints(host, count)
            bridge = bridge_of(host, GATEWAY)
            for address in (AARDVARK_ADDR, DNSMASQ_ADDR):
                host.run("ip", "addr", "add", f"{address}/32", "dev", bridge)
            if "aardvark-dns" in servers_wanted:
                servers["aardvark-dns"] = start_aardvark(host, tools["aardvark-dns"], names)
            if "dnsmasq" in servers_wanted:
                servers["dnsmasq"] = start_dnsmasq(host, tools["dnsmasq"], names)
            for server in servers.values():
                wait_for_udp(host, server)
            check_answers(host, client, servers, names)

            queries = host.tmp / "queries.txt"
            queries.write_text("".join(f"{name} A\n" for name in names))
            logs = args.logs or host.tmp / "dnsperf"
            logs.mkdir(parents=True, exist_ok=True)
            perf = Dnsperf(tools["dnsperf"], client, queries, logs)
            if not args.quick:  # warm-up (ARP, caches, dnsperf's page cache); not counted
                for server in servers.values():
                    perf.run(server, 1, options, "warm-up")
            order = list(servers)
            for rnd in range(rounds):
                rotated = order[rnd % len(order) :] + order[: rnd % len(order)]
                cells = []
                for label in rotated:
                    server = servers[label]
                    run = perf.run(server, per_run, options, f"{label}-{rnd + 1}")
                    server.runs.append(run)
                    cells.append(f"{label} {run.qps / 1000:.1f}k")
                    if args.paced:
                        paced = ["-c", "1", "-T", "1", "-q", "10", "-Q", str(args.paced)]
                        server.paced.append(
                            perf.run(server, paced_seconds, paced, f"{label}-{rnd + 1}-paced")
                        )
                say(f"# round {rnd + 1}: " + ", ".join(cells) + " q/s")
        finally:
            for server in servers.values():
                stop(server)
        return 1 if report(servers, conditions) else 0


def set_up_endpoints(host: BenchHost, count: int) -> tuple[dict[str, str], str]:
    """COUNT sandboxes with aliases name01.. on the network, made in one helper process.

    Returns ({alias: IPv4 address}, the sandbox of name01: the client).
    """
    t0 = time.perf_counter()
    argv = [sys.executable, str(Path(__file__).resolve()), "--populate", NETWORK, host.name]
    proc = subprocess.run(
        host.argv(*argv, str(count)),
        env=host.env(),
        cwd=host.tmp,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise CommandFailed(f"setting up {count} sandboxes failed: {proc.stderr.strip()[-2000:]}")
    (doc,) = json.loads(host.netctl("network", "inspect", NETWORK, "--format", "json").stdout)
    names: dict[str, str] = {}
    client = ""
    for endpoint in doc["Endpoints"]:
        (alias,) = endpoint["Aliases"]
        names[alias] = endpoint["IPv4Address"].split("/")[0]
        if alias == "name01":
            client = endpoint["Sandbox"]
    if len(names) != count or not client:
        raise CommandFailed(f"expected {count} endpoints, inspect shows {len(names)}")
    say(
        f"# {count} sandboxes connected in {time.perf_counter() - t0:.1f} s (in-process); "
        f"client {client} ({names['name01']})"
    )
    return dict(sorted(names.items())), client


def check_answers(
    host: BenchHost, client: str, servers: dict[str, Server], names: dict[str, str]
) -> None:
    """Every server answers every name right, asked from the client sandbox (`--check`)."""
    spec = host.tmp / "check.json"
    addresses = {s.label: s.address for s in servers.values()}
    spec.write_text(json.dumps({"servers": addresses, "names": names, "timeout": 5.0}))
    argv = [sys.executable, str(Path(__file__).resolve()), "--check", str(spec)]
    proc = subprocess.run(
        ["nsenter", f"--net={NETNS_DIR / client}", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise CommandFailed(f"the answer check failed: {proc.stderr.strip()[-2000:]}")
    problems: dict[str, list[str]] = json.loads(proc.stdout)
    for label, wrong in problems.items():
        if wrong:
            shown = "; ".join(wrong[:5])
            say(f"# {label} answers {len(wrong)} of {len(names)} names wrongly: {shown}")
            say(f"#   {label} log: {tail(servers[label].log)}")
        else:
            say(f"# {label} ({servers[label].address}) answers all {len(names)} names right")
    if any(problems.values()):
        raise CommandFailed("a server does not answer the names right (see above)")


def bridge_of(host: BenchHost, address: str) -> str:
    """The interface holding ADDRESS in the host namespace (the network's bridge)."""
    for link in json.loads(host.run("ip", "-j", "-4", "addr", "show").stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("local") == address:
                return str(link["ifname"])
    raise CommandFailed(f"no interface holds {address} in the host namespace")


def report(servers: dict[str, Server], conditions: RunConditions) -> bool:
    """Print the table, ratios and METRIC lines; True if a server gave a non-NOERROR code."""
    failed = False
    say()
    say(
        f"{'server':13} {'q/s':>8} {'rounds min-max':>15} {'lat us':>7} {'paced us':>8} "
        f"{'lost':>5} {'NOERROR':>8} {'server CPU':>10} {'CPU us/q':>8} {'dnsperf CPU':>11}"
    )
    summary: dict[str, Totals] = {}
    paced: dict[str, Totals] = {}
    for label, server in servers.items():
        if not server.runs:
            continue
        t = summary[label] = totals(server.runs)
        if server.paced:
            paced[label] = totals(server.paced)
        paced_us = paced[label].avg_latency_us if label in paced else float("nan")
        lo, hi = min(r.qps for r in server.runs), max(r.qps for r in server.runs)
        noerror = 100.0 * t.noerror / t.completed if t.completed else 0.0
        say(
            f"{label:13} {t.qps:8.0f} {f'{lo / 1000:.1f}k-{hi / 1000:.1f}k':>15} "
            f"{t.avg_latency_us:7.0f} {paced_us:8.0f} "
            f"{t.lost:5d} {noerror:7.2f}% {t.server_cpu:9.0f}% {t.server_us_per_query:8.2f} "
            f"{t.dnsperf_cpu:10.0f}%"
        )
        if any(r.noerror != r.completed for r in server.runs + server.paced):
            say(f"#   WARNING: {label} gave response codes other than NOERROR")
            failed = True
    say(
        "# q/s: completed queries / dnsperf run time over all rounds (min-max: single rounds); "
        "lat: dnsperf's average latency in those saturated runs (mostly queueing: "
        "outstanding / q/s); paced: average latency at the fixed offered load; server CPU: "
        "% of one CPU during the saturated runs, and CPU us per answered query"
    )
    say(f"# {PEER_NOTE}")
    ratios: dict[str, float] = {}
    if "netstack" in summary:
        for peer in ("dnsmasq", "aardvark-dns"):
            if peer not in summary:
                continue
            ratios[peer] = ratio(summary["netstack"].qps, summary[peer].qps)
            per_round = [
                ratio(a.qps, b.qps)
                for a, b in zip(servers["netstack"].runs, servers[peer].runs, strict=True)
            ]
            shown = ", ".join(f"{r:.2f}" for r in per_round)
            cpu = ratio(summary["netstack"].server_us_per_query, summary[peer].server_us_per_query)
            say(
                f"netstack / {peer} q/s: {ratios[peer]:.3f}; per round {shown} (median "
                f"{statistics.median(per_round):.2f}); server CPU per query: {cpu:.2f}"
            )
        if "dnsmasq" in ratios:
            met = ratios["dnsmasq"] >= 1.0
            say(f"goal (netstack >= dnsmasq q/s): {'met' if met else 'MISSED'}")
    if "dnsmasq" in summary and "aardvark-dns" in summary:
        aardvark = ratio(summary["aardvark-dns"].qps, summary["dnsmasq"].qps)
        say(f"aardvark-dns / dnsmasq q/s: {aardvark:.3f} (the issue's figures: 0.48)")
    conditions.end()
    for label, t in summary.items():
        key = label.replace("-", "_")
        metric(f"dns_{key}_qps", t.qps, "qps")
        metric(f"dns_{key}_avg_latency", t.avg_latency_us, "us")
        if label in paced:
            metric(f"dns_{key}_paced_avg_latency", paced[label].avg_latency_us, "us")
        metric(f"dns_{key}_lost", t.lost, "queries")
        metric(f"dns_{key}_server_cpu", t.server_cpu, "%")
        metric(f"dns_{key}_server_cpu_per_query", t.server_us_per_query, "us")
        metric(f"dns_{key}_dnsperf_cpu", t.dnsperf_cpu, "%")
    for peer, value in ratios.items():
        metric(f"dns_netstack_{peer.replace('-', '_')}_qps_ratio", value, "x")
    return failed


if __name__ == "__main__":
    run_main("dns_qps", main)
