#!/usr/bin/env python3
"""Does publishing a port cost more when 999 mappings exist than for the 1st one?

One bridge network `bench` (10.0.0.0/16) in a throwaway host namespace. A probe sandbox is
connected with one published port and disconnected again, REPS times, at each point
N in POINTS (default 1 and N=1000 mappings): the probe's mapping is the Nth, the other N-1
belong to N-1 other sandboxes (`-p 10000+i:80`, one each; `--per-sandbox K` puts K on each).
Each call is timed (wall and CPU) as users run it:
`nsenter --net=/run/netns/<host> netctl network connect bench <probe> -p 20080:80`.

The machine is shared, so a ratio of two points taken minutes apart mixes in load drift.
Each rep therefore times, interleaved in a shuffled order, four connect+disconnect pairs:
* `main -p`      the probe with `-p 20080:80` on the host with N-1 other mappings,
* `main plain`   the same probe without -p (same host): what the N-1 other *endpoints* cost,
* `fresh -p`     a probe with `-p 20080:80` in a second, empty host namespace with its own
                 state: the 1st mapping, measured at the same moment as the Nth,
* `fresh plain`  that probe without -p.
main -p / fresh -p is the same-time Nth/1st ratio; (main -p - main plain) against
(fresh -p - fresh plain) isolates what publishing itself costs with N-1 vs 0 mappings.

The nft rule count (`nft -j list ruleset`) with the probe published must be the same at
every point (exit status 1 if not); the DNAT map elements are counted and checked too.

In-process, at each point (helper processes in the main and the fresh host, alternated):
`Store.all_ports()`, `ports.assign()`, the controller's whole port reservation
(BEGIN IMMEDIATE; all_ports; assign with sockets.bound_ports; COMMIT),
`sockets.bound_ports()`, `conntrack.forget_host_ports()`, and one DNAT map element added and
deleted through libnftables (a new context per command, as a CLI process has, and a reused
one), to show where any growth comes from.

    python3 benchmarks/publish_scaling.py            # N=1000, REPS=15, points 1,1000
    python3 benchmarks/publish_scaling.py --quick    # smoke: N=10, REPS=2 (< 30 s)
    python3 benchmarks/publish_scaling.py --profile  # + cProfile of one connect/disconnect
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import random
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    BenchHost,
    CommandFailed,
    RunConditions,
    Stats,
    Timing,
    exit_on_signals,
    metric,
    need_root,
    ratio,
    run_main,
    say,
)

NETWORK = "bench"
FRESH = "fresh"
PROBE_PORT = 20080  # host port of the probe's mapping (the same in both hosts)
OTHERS_BASE_PORT = 10000  # the others publish 10001, 10002, ... (all below PROBE_PORT)
MICRO_PORT = 30999  # key of the element added/deleted by the in-process nft timing
MICRO_TARGET = "10.0.255.254"  # its (never used) value address
GOAL_RATIO = 1.2
MAPS = ("pub4_any", "pub6_any", "pub4_ip", "pub6_ip")
PEER_NOTE = (
    "peer reference (shared/peers/README.md, another run, same kind of machine): reference "
    "CNI bridge+portmap ADD 52.0 ms / DEL 182.6 ms (bridge alone 22.6 / 77.9); portmap adds "
    "iptables rules per mapping (cni_bridge_portmap_scaling.sh measures its growth)"
)
SERIES = (
    ("pub", "main -p"),
    ("plain", "main plain"),
    ("fresh_pub", "fresh -p"),
    ("fresh_plain", "fresh plain"),
)
MICRO_OPS = (
    ("all_ports", "Store.all_ports()"),
    ("assign", "ports.assign(1 request, existing)"),
    ("reserve", "reservation txn: all_ports(named)+assign+bound_ports(named)"),
    ("bound_ports", "sockets.bound_ports('tcp')"),
    ("conntrack", "conntrack.forget_host_ports (v4+v6 dumps)"),
    ("conntrack_dst", "conntrack.forget_destinations (1 dump)"),
    ("nft_add_new", "nft add element, new context (+close)"),
    ("nft_del_new", "nft delete element, new context (+close)"),
    ("nft_add", "nft add element, reused context"),
    ("nft_del", "nft delete element, reused context"),
)


@dataclass
class Point:
    mappings: int
    calls: dict[str, list[Timing]] = field(default_factory=dict)  # "pub:connect" -> timings
    micro_main: dict[str, list[float]] = field(default_factory=dict)  # op -> µs
    micro_fresh: dict[str, list[float]] = field(default_factory=dict)
    micro_existing: tuple[int, int] = (-1, -1)  # bindings seen by all_ports (main, fresh)
    nft_rules: int = -1
    nft_elements: int = -1
    map_elements: dict[str, int] = field(default_factory=dict)
    inspected_ports: int = -1
    profile: dict[str, Path] = field(default_factory=dict)

    def series(self, name: str, verb: str) -> list[Timing]:
        return self.calls.setdefault(f"{name}:{verb}", [])

    def median(self, name: str, verb: str, kind: str = "wall") -> float:
        return Stats.of([getattr(t, kind) for t in self.series(name, verb)]).median


# --------------------------------------------------------------------------- helper processes


def _cpu_ms() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # pyroute2 forks for netns work
    return (own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime) * 1000.0


def populate(prefix: str, first: int, last: int, per_sandbox: int) -> None:
    """(Runs inside the host namespace.) Sandboxes prefix-sbFIRST..LAST, each connected to
    NETWORK publishing `per_sandbox` ports. Prints {"create": [[wall, cpu]...], "connect": ...}.
    """
    from netstack.cli.commands import build_controller
    from netstack.controller import ConnectRequest

    controller = build_controller()
    create: list[tuple[float, float]] = []
    connect: list[tuple[float, float]] = []
    for i in range(first, last + 1):
        name = f"{prefix}-sb{i}"
        base = OTHERS_BASE_PORT + (i - 1) * per_sandbox
        specs = [f"{base + k + 1}:80" for k in range(per_sandbox)]
        t0, c0 = time.perf_counter(), _cpu_ms()
        controller.create_sandbox(name)
        t1, c1 = time.perf_counter(), _cpu_ms()
        controller.connect(NETWORK, name, ConnectRequest(ports=specs))
        t2, c2 = time.perf_counter(), _cpu_ms()
        create.append(((t1 - t0) * 1000, c1 - c0))
        connect.append(((t2 - t1) * 1000, c2 - c1))
        if (i - first + 1) % 200 == 0:
            print(f"#   ... {i} other sandboxes published", file=sys.stderr, flush=True)
    print(json.dumps({"create": create, "connect": connect}))


def micro(reps: int) -> None:
    """(Runs inside a host namespace.) In-process timings of the port-publishing steps, µs.

    Nothing is left behind: the reservation transaction writes nothing, and the nft element
    (tcp . MICRO_PORT) is deleted right after each add.
    """
    from netstack.drivers.bridge import firewall

    from netstack import ports
    from netstack.cli.commands import build_controller
    from netstack.kernel import conntrack, sockets
    from netstack.kernel.nftables import Nftables
    from netstack.model import PortBinding

    store = build_controller().store
    request = ports.parse_spec(f"{MICRO_PORT}:80", lambda: [])
    binding = PortBinding("tcp", "", MICRO_PORT, 80)
    add = firewall.publish_commands([binding], MICRO_TARGET, None)
    delete = "\n".join(firewall.unpublish_commands([binding], MICRO_TARGET, None))
    reused = Nftables()
    out: dict[str, list[float]] = {op: [] for op, _label in MICRO_OPS}
    clock = time.perf_counter

    def timed(op: str, func):  # type: ignore[no-untyped-def]
        t0 = clock()
        result = func()
        out[op].append((clock() - t0) * 1e6)
        return result

    def new_context(commands: str) -> None:
        nft = Nftables()
        try:
            nft.run(commands)
        finally:
            nft.close()

    def reserve() -> None:
        with store.transaction():
            # as the controller: only bindings on the named host ports can clash
            ports.assign(
                [request], store.all_ports(ports.named_host_ports([request])), sockets.bound_ports
            )

    existing = store.all_ports()
    for _ in range(reps):
        found = timed("all_ports", store.all_ports)
        timed("assign", lambda found=found: ports.assign([request], found, _nothing_bound))
        timed("reserve", reserve)
        timed("bound_ports", lambda: sockets.bound_ports("tcp"))
        timed("conntrack", lambda: conntrack.forget_host_ports([("tcp", MICRO_PORT)]))
        timed("conntrack_dst", lambda: conntrack.forget_destinations([("tcp", MICRO_TARGET, 80)]))
        timed("nft_add_new", lambda: new_context(add))
        timed("nft_del_new", lambda: new_context(delete))
        timed("nft_add", lambda: reused.run(add))
        timed("nft_del", lambda: reused.run(delete))
    reused.close()
    print(json.dumps({"existing": len(existing), "us": out}))


def _nothing_bound(protocol: str, among: object) -> set[int]:
    return set()


def _helper(host: BenchHost, *args: str, timeout: float = 3600) -> dict:  # type: ignore[type-arg]
    argv = host.argv(sys.executable, str(Path(__file__).resolve()), *args)
    proc = subprocess.run(
        argv,
        stdout=subprocess.PIPE,
        text=True,
        env={**host.env(), "NST_BENCH_HOST": host.name},
        cwd=host.tmp,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise CommandFailed(f"helper {' '.join(args)} in {host.name} failed (rc={proc.returncode})")
    result: dict = json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[type-arg]
    return result


def run_populate(
    host: BenchHost, first: int, last: int, per_sandbox: int
) -> dict[str, list[Timing]]:
    if last < first:
        return {"create": [], "connect": []}
    raw = _helper(host, "--populate", str(first), str(last), str(per_sandbox))
    return {key: [Timing(w, c) for w, c in raw[key]] for key in ("create", "connect")}


def run_micro(host: BenchHost, fresh: BenchHost, point: Point, rounds: int, reps: int) -> None:
    """ROUNDS helper runs in each host, alternated; REPS timings of each op per run."""
    existing = [-1, -1]
    for _ in range(rounds):
        for index, (where, into) in enumerate(
            ((host, point.micro_main), (fresh, point.micro_fresh))
        ):
            raw = _helper(where, "--micro", str(reps), timeout=600)
            existing[index] = raw["existing"]
            for op, values in raw["us"].items():
                into.setdefault(op, []).extend(values)
    point.micro_existing = (existing[0], existing[1])


# --------------------------------------------------------------------------- profiling

_PROFILE_ROWS = [
    # (label, file suffix, function name); cumulative time of each
    ("whole process (under cProfile)", None, None),
    ("  imports", "<frozen importlib._bootstrap>", "_find_and_load"),
    ("  Controller.connect", "netstack/controller.py", "connect"),
    ("    Store.all_ports", "netstack/store.py", "all_ports"),
    ("    ports.assign (incl. bound_ports)", "netstack/ports.py", "assign"),
    ("    sockets.bound_ports", "netstack/kernel/sockets.py", "bound_ports"),
    ("    BridgeDriver.create_endpoint", "drivers/bridge/driver.py", "create_endpoint"),
    ("    BridgeDriver.join", "drivers/bridge/driver.py", "join"),
    (
        "    program_external_connectivity",
        "drivers/bridge/driver.py",
        "program_external_connectivity",
    ),
    ("      conntrack.forget_host_ports", "netstack/kernel/conntrack.py", "forget_host_ports"),
    ("  Controller.disconnect", "netstack/controller.py", "disconnect"),
    (
        "    revoke_external_connectivity",
        "drivers/bridge/driver.py",
        "revoke_external_connectivity",
    ),
    ("      conntrack.forget_destinations", "netstack/kernel/conntrack.py", "forget_destinations"),
    ("    BridgeDriver.delete_endpoint", "drivers/bridge/driver.py", "delete_endpoint"),
    ("  Nftables.run (all calls)", "netstack/kernel/nftables.py", "run"),
    ("  pyroute2 netns socket (fork)", "pyroute2/netns/__init__.py", "create_socket"),
    ("  sqlite3 execute", "~", "<method 'execute' of 'sqlite3.Connection' objects>"),
]


def profile_once(host: BenchHost, probe: str, tag: str) -> dict[str, Path]:
    files = {}
    for verb, extra in (("connect", ["-p", f"{PROBE_PORT}:80"]), ("disconnect", [])):
        out = host.tmp / f"{tag}-{verb}.prof"
        cli = ["-m", "netstack.cli", "network", verb, NETWORK, probe, *extra]
        host.run(sys.executable, "-m", "cProfile", "-o", str(out), *cli)
        files[verb] = out
    return files


def _cumulative(path: Path) -> dict[str, float]:
    raw = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    total = max(ct for (_cc, _nc, _tt, ct, _callers) in raw.values())
    found: dict[str, float] = {}
    for label, suffix, func in _PROFILE_ROWS:
        if suffix is None:
            found[label] = total
            continue
        found[label] = sum(
            ct
            for (filename, _line, name), (_cc, _nc, _tt, ct, _callers) in raw.items()
            if name == func and filename.endswith(suffix)
        )
    return found


def print_profiles(first: Point, last: Point) -> None:
    for verb in ("connect", "disconnect"):
        if verb not in first.profile or verb not in last.profile:
            continue
        a, b = _cumulative(first.profile[verb]), _cumulative(last.profile[verb])
        say(f"## cProfile of one `netctl network {verb}` of the probe (cumulative ms; noisy)")
        say(f"{'':44} {f'{first.mappings} map':>9} {f'{last.mappings} maps':>10}")
        for label, _suffix, _func in _PROFILE_ROWS:
            if a[label] or b[label]:
                say(f"{label:44} {a[label] * 1000:9.1f} {b[label] * 1000:10.1f}")
    say()


# --------------------------------------------------------------------------- measurement


def map_elements(host: BenchHost) -> dict[str, int]:
    counts = dict.fromkeys(MAPS, 0)
    for item in host.nft_ruleset():
        if "map" in item and item["map"].get("table") == "netstack":
            name = item["map"]["name"]
            if name in counts:
                counts[name] = len(item["map"].get("elem", []))
    return counts


def measure_point(
    host: BenchHost, fresh: BenchHost, point: Point, probe: str, fresh_probe: str, reps: int
) -> None:
    publish = ("-p", f"{PROBE_PORT}:80")
    pairs = [
        ("pub", host, NETWORK, probe, publish),
        ("plain", host, NETWORK, probe, ()),
        ("fresh_pub", fresh, FRESH, fresh_probe, publish),
        ("fresh_plain", fresh, FRESH, fresh_probe, ()),
    ]
    order = random.Random(point.mappings)
    for rep in range(reps):
        order.shuffle(pairs)
        for name, where, network, sandbox, extra in pairs:
            timing = where.timed_netctl("network", "connect", network, sandbox, *extra)
            point.series(name, "connect").append(timing)
            if rep == 0 and name == "pub":
                point.nft_rules, point.nft_elements = host.nft_counts()
                point.map_elements = map_elements(host)
                inspect = host.netctl("network", "inspect", NETWORK, "--format", "json")
                (doc,) = json.loads(inspect.stdout)
                point.inspected_ports = sum(len(e["Ports"]) for e in doc["Endpoints"])
            timing = where.timed_netctl("network", "disconnect", network, sandbox)
            point.series(name, "disconnect").append(timing)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode (< 30 s)")
    parser.add_argument("-n", "--mappings", type=int, help="largest N (default 1000, quick 10)")
    parser.add_argument("-r", "--reps", type=int, help="CLI reps per point (default 15, quick 2)")
    parser.add_argument("--points", help="mapping counts to measure at, e.g. 1,500,1000")
    parser.add_argument(
        "--per-sandbox", type=int, default=1, help="published ports per other sandbox (1)"
    )
    parser.add_argument("--subnet", default="10.0.0.0/16", help="the network's subnet")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile one connect/disconnect at first/last point"
    )
    parser.add_argument(
        "--populate", nargs=3, metavar=("FIRST", "LAST", "K"), help=argparse.SUPPRESS
    )
    parser.add_argument("--micro", type=int, metavar="REPS", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.populate:
        first, last, per_sandbox = (int(x) for x in args.populate)
        populate(os.environ["NST_BENCH_HOST"], first, last, per_sandbox)
        return 0
    if args.micro:
        micro(args.micro)
        return 0

    need_root()
    exit_on_signals()
    n_max = args.mappings or (10 if args.quick else 1000)
    reps = args.reps or (2 if args.quick else 15)
    per = args.per_sandbox
    if per < 1:
        parser.error("--per-sandbox must be >= 1")
    points = sorted({int(p) for p in args.points.split(",")}) if args.points else [1, n_max]
    if points[0] < 1 or any((n - 1) % per for n in points):
        parser.error("points must be >= 1, each N-1 a multiple of --per-sandbox")
    if OTHERS_BASE_PORT + points[-1] >= PROBE_PORT:
        parser.error(f"at most {PROBE_PORT - OTHERS_BASE_PORT - 1} mappings")
    micro_rounds, micro_reps = (1, 10) if args.quick else (3, 40)

    import netstack

    conditions = RunConditions(
        "publish_scaling: netctl network connect -p / disconnect vs mappings on the host",
        [
            f"netstack from {Path(netstack.__file__).resolve().parent}",
            f"network {NETWORK} {args.subnet}; mapping counts {points}, {per} per other "
            f"sandbox; REPS={reps}; in-process: {micro_rounds} x {micro_reps} per host"
            f"{' (quick)' if args.quick else ''}",
        ],
    )
    results: list[Point] = []
    setup: dict[str, list[Timing]] = {"create": [], "connect": []}
    with BenchHost() as host, BenchHost(inside=host, suffix="fresh") as fresh:
        say(f"# host namespaces {host.name} and {fresh.name}; netctl: {' '.join(host.netctl_argv)}")
        probe, fresh_probe = f"{host.name}-probe", f"{fresh.name}-probe"
        host.netctl("network", "create", "--subnet", args.subnet, NETWORK)
        host.netctl("sandbox", "create", probe)
        fresh.netctl("network", "create", "--subnet", args.subnet, FRESH)
        fresh.netctl("sandbox", "create", fresh_probe)
        for _ in range(1 if args.quick else 2):  # warm-up: page cache, .pyc files
            for where, net, sb in ((host, NETWORK, probe), (fresh, FRESH, fresh_probe)):
                where.timed_netctl("network", "connect", net, sb, "-p", f"{PROBE_PORT}:80")
                where.timed_netctl("network", "disconnect", net, sb)
        sandboxes = 0  # other sandboxes set up so far
        for n in points:
            wanted = (n - 1) // per
            if wanted > sandboxes:
                say(
                    f"# publishing {(wanted - sandboxes) * per} more mappings in-process "
                    f"({wanted - sandboxes} sandboxes) ..."
                )
                t0 = time.perf_counter()
                got = run_populate(host, sandboxes + 1, wanted, per)
                for key in setup:
                    setup[key].extend(got[key])
                say(f"#   done in {time.perf_counter() - t0:.1f} s")
                sandboxes = wanted
            point = Point(sandboxes * per + 1)
            say(f"# measuring the {point.mappings}. mapping, {reps} reps ...")
            measure_point(host, fresh, point, probe, fresh_probe, reps)
            say("#   in-process step timings ...")
            run_micro(host, fresh, point, micro_rounds, micro_reps)
            if args.profile and n in (points[0], points[-1]):
                point.profile = profile_once(host, probe, f"map{n}")
            results.append(point)
        if args.profile:
            say()
            print_profiles(results[0], results[-1])
        return report(results, setup, reps, per, conditions)


# --------------------------------------------------------------------------- report


def _cell(values: list[Timing], kind: str) -> str:
    st = Stats.of([getattr(t, kind) for t in values])
    return f"{st.median:6.1f} [{st.minimum:5.1f}-{st.maximum:6.1f}]"


def report(
    results: list[Point],
    setup: dict[str, list[Timing]],
    reps: int,
    per: int,
    conditions: RunConditions,
) -> int:
    failed = False
    first, last = results[0], results[-1]
    n1, nn = first.mappings, last.mappings
    say()
    for verb in ("connect", "disconnect"):
        for kind, title in (("wall", "wall"), ("cpu", "CPU (user+sys of the process)")):
            say(f"netctl network {verb}, {title} ms: median [min-max] over {reps} reps")
            say(f"{'mapping':>8} | " + " | ".join(f"{t:^21}" for _s, t in SERIES))
            for p in results:
                cells = [_cell(p.series(s, verb), kind) for s, _t in SERIES]
                say(f"{p.mappings:>8} | " + " | ".join(cells))
            say()

    say(
        f"{'mapping':>8} | nft rules | set+map elements | "
        + " | ".join(MAPS)
        + " | ports in inspect"
    )
    for p in results:
        elements = " | ".join(f"{p.map_elements.get(m, -1):>{len(m)}}" for m in MAPS)
        say(
            f"{p.mappings:>8} | {p.nft_rules:>9} | {p.nft_elements:>16} | {elements} | "
            f"{p.inspected_ports:>16}"
        )
        if p.map_elements.get("pub4_any") != p.mappings or p.inspected_ports != p.mappings:
            say(f"#   WARNING: expected {p.mappings} pub4_any elements and published ports")
            failed = True
    rules_equal = len({p.nft_rules for p in results}) == 1
    say(
        f"nft rules with {n1} / {nn} mappings: {first.nft_rules} / {last.nft_rules} "
        f"({'equal' if rules_equal else 'DIFFERENT: the rule count grows with mappings'})"
    )
    failed = failed or not rules_equal
    say()

    verdict: dict[tuple[str, str, str], float] = {}
    say(f"Nth/1st mapping ratios (medians), N={nn}; goal <= {GOAL_RATIO}")
    say(f"{'':62} {'connect':>9} {'disconn.':>9}")
    rows = (
        (f"sequential: mapping {nn} vs {n1}, minutes apart (wall)", "seq", "wall"),
        ("  same, CPU time", "seq", "cpu"),
        (f"same time: mapping {nn} vs fresh host's 1st (wall)", "same", "wall"),
        ("  same, CPU time", "same", "cpu"),
        ("  of which endpoints: main plain / fresh plain (wall)", "endpoints", "wall"),
        ("  of which publishing: (main -p/plain) / (fresh -p/plain)", "publish", "wall"),
    )
    for label, how, kind in rows:
        values = []
        for verb in ("connect", "disconnect"):
            if how == "seq":
                value = ratio(last.median("pub", verb, kind), first.median("pub", verb, kind))
            elif how == "same":
                value = ratio(last.median("pub", verb, kind), last.median("fresh_pub", verb, kind))
            elif how == "endpoints":
                value = ratio(last.median("plain", verb), last.median("fresh_plain", verb))
            else:
                value = ratio(
                    ratio(last.median("pub", verb), last.median("plain", verb)),
                    ratio(last.median("fresh_pub", verb), last.median("fresh_plain", verb)),
                )
            verdict[(how, kind, verb)] = value
            values.append(value)
        say(f"{label:62} {values[0]:9.3f} {values[1]:9.3f}")
    say("what -p adds to one call (median -p minus median plain, wall ms):")
    for verb in ("connect", "disconnect"):
        extra_n = last.median("pub", verb) - last.median("plain", verb)
        extra_1 = last.median("fresh_pub", verb) - last.median("fresh_plain", verb)
        say(
            f"  {verb:10} with {nn - 1} other mappings {extra_n:6.1f} ms, "
            f"with none (fresh host, same time) {extra_1:6.1f} ms"
        )
    same_wall = max(verdict[("same", "wall", v)] for v in ("connect", "disconnect"))
    seq_wall = max(verdict[("seq", "wall", v)] for v in ("connect", "disconnect"))
    drift = [
        ratio(last.median("fresh_pub", v), first.median("fresh_pub", v))
        for v in ("connect", "disconnect")
    ]
    say(
        f"goal (<= {GOAL_RATIO}): same-time {'met' if same_wall <= GOAL_RATIO else 'MISSED'}, "
        f"sequential {'met' if seq_wall <= GOAL_RATIO else 'MISSED'} (sequential includes load "
        f"drift: the fresh host's own ratio is {drift[0]:.2f} / {drift[1]:.2f})"
    )
    say()

    say(
        f"in-process steps, µs: median, host with N-1 other mappings vs fresh host "
        f"(alternated helper runs; all_ports saw {last.micro_existing[0]} vs "
        f"{last.micro_existing[1]} bindings at N={nn})"
    )
    say(
        f"{'':48} " + " ".join(f"{f'N={p.mappings}':>9} {'fresh':>8} {'ratio':>6}" for p in results)
    )
    micro_ratio: dict[str, float] = {}
    for op, label in MICRO_OPS:
        row = []
        for p in results:
            a = Stats.of(p.micro_main.get(op, [])).median
            b = Stats.of(p.micro_fresh.get(op, [])).median
            row.append(f"{a:9.1f} {b:8.1f} {ratio(a, b):6.2f}")
        micro_ratio[op] = ratio(
            Stats.of(last.micro_main.get(op, [])).median,
            Stats.of(last.micro_fresh.get(op, [])).median,
        )
        say(f"{label:48} " + " ".join(row))
    say()

    for key, what in (("connect", "connect -p"), ("create", "sandbox create")):
        timings = setup[key]
        window = min(50, len(timings) // 4)
        if window >= 3:
            head, tail = timings[:window], timings[-window:]
            wall_a = Stats.of([t.wall for t in head]).median
            wall_b = Stats.of([t.wall for t in tail]).median
            cpu_a = Stats.of([t.cpu for t in head]).median
            cpu_b = Stats.of([t.cpu for t in tail]).median
            say(
                f"in-process set-up ({len(timings)} sandboxes, Controller), {what}: wall "
                f"{wall_a:.1f} -> {wall_b:.1f} ms (x{ratio(wall_b, wall_a):.2f}), CPU "
                f"{cpu_a:.1f} -> {cpu_b:.1f} ms (x{ratio(cpu_b, cpu_a):.2f}); first/last "
                f"{window} (sequential: includes load drift)"
            )
    say(f"# {PEER_NOTE}")
    say(
        f"# netstack connect -p in a fresh host / portmap ADD 52.0 ms (cross-run, context "
        f"only): x{ratio(last.median('fresh_pub', 'connect'), 52.0):.2f}; disconnect / portmap "
        f"DEL 182.6 ms: x{ratio(last.median('fresh_pub', 'disconnect'), 182.6):.2f}"
    )
    conditions.end()

    for p in (first, last) if len(results) > 1 else (first,):
        tag = f"map{p.mappings}"
        metric(f"netstack_publish_connect_{tag}_median", p.median("pub", "connect"), "ms")
        metric(f"netstack_publish_disconnect_{tag}_median", p.median("pub", "disconnect"), "ms")
        metric(f"netstack_publish_nft_rules_{tag}", p.nft_rules, "rules")
        metric(f"netstack_publish_map_elements_{tag}", sum(p.map_elements.values()), "elements")
    metric("netstack_publish_connect_fresh_host_median", last.median("fresh_pub", "connect"), "ms")
    metric(
        "netstack_publish_disconnect_fresh_host_median",
        last.median("fresh_pub", "disconnect"),
        "ms",
    )
    for verb in ("connect", "disconnect"):
        metric(f"netstack_publish_{verb}_ratio_{nn}_{n1}", verdict[("seq", "wall", verb)], "x")
        metric(
            f"netstack_publish_{verb}_ratio_{nn}_{n1}_same_time",
            verdict[("same", "wall", verb)],
            "x",
        )
        metric(
            f"netstack_publish_{verb}_cpu_ratio_{nn}_{n1}_same_time",
            verdict[("same", "cpu", verb)],
            "x",
        )
    for op in ("all_ports", "assign", "reserve", "nft_add_new", "nft_del_new"):
        metric(f"netstack_publish_inproc_{op}_ratio_{nn}_fresh", micro_ratio[op], "x")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main("publish_scaling", main)
