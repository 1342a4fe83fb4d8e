#!/usr/bin/env python3
"""Does `netctl network connect`/`disconnect` cost grow with the endpoints already on a network?

One bridge network `bench` (10.0.0.0/16) in a throwaway host namespace. A probe sandbox is
connected and disconnected REPS times with N-1 other sandboxes connected, for each N in
POINTS (default 1, N/2, N=500); each call is timed (wall and CPU) as the CLI process users run:
`nsenter --net=/run/netns/<host> netctl network connect bench <probe>`.

The machine is shared, so a ratio of two points taken minutes apart mixes in load drift.
Each rep therefore also times, interleaved with the main pair:
* `control`: the same probe on a second network of the same host that has no other
  endpoints (same links, namespaces and store as the main one, but an empty network);
* `fresh`: a probe on a 10.0.0.0/16 network in a second, empty host namespace with its own
  state: the "1st endpoint" case, measured at the same moment as the Nth.
main/fresh at the last point is the same-time Nth/1st ratio; control/fresh isolates growth
with the host's totals (links, sandboxes, rows), main/control growth with the network's own
endpoints. `connect --help` times the process floor (exec, interpreter, argparse).

The nft rule count (rules in `nft -j list ruleset`) is taken with the probe connected at
each point; it must not change with N (exit status 1 if it does).

The others are set up in-process through netstack's Controller (one helper process in the
host namespace) because 500 CLI calls would take minutes; their in-process connect and
sandbox-create times are reported too (first vs last window).

    python3 benchmarks/connect_scaling.py            # N=500, REPS=15, points 1,250,500
    python3 benchmarks/connect_scaling.py --quick    # smoke: N=20, REPS=3, points 1,20
    python3 benchmarks/connect_scaling.py --profile  # + cProfile of one connect/disconnect
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
CONTROL = "control"
FRESH = "fresh"
PEER_NOTE = (
    "peer reference (shared/peers/README.md, another run, same kind of machine): "
    "`docker network connect` 41.5 ms median; reference CNI bridge ADD 22.6 ms, "
    "500th container 46.4 ms (x2.05). dockerd is not running here: peer not re-run."
)
GOAL_RATIO = 1.2


@dataclass
class Point:
    endpoints: int
    connect: list[Timing] = field(default_factory=list)
    disconnect: list[Timing] = field(default_factory=list)
    control_connect: list[Timing] = field(default_factory=list)
    control_disconnect: list[Timing] = field(default_factory=list)
    fresh_connect: list[Timing] = field(default_factory=list)
    fresh_disconnect: list[Timing] = field(default_factory=list)
    floor: list[Timing] = field(default_factory=list)
    nft_rules: int = -1
    nft_elements: int = -1
    host_links: int = -1
    inspected_endpoints: int = -1
    profile: dict[str, Path] = field(default_factory=dict)

    def median(self, series: str, kind: str = "wall") -> float:
        values: list[Timing] = getattr(self, series)
        return Stats.of([getattr(t, kind) for t in values]).median


# --------------------------------------------------------------------------- helper process


def _cpu_ms() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # pyroute2 forks for netns work
    return (own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime) * 1000.0


def populate(network: str, prefix: str, first: int, last: int) -> None:
    """(Runs inside the host namespace.) Create sandboxes prefix-sbFIRST..LAST, connect each.

    Prints {"create": [[wall, cpu], ...], "connect": [[wall, cpu], ...]} (ms) on stdout.
    """
    from netstack.cli.commands import build_controller
    from netstack.controller import ConnectRequest

    controller = build_controller()
    create: list[tuple[float, float]] = []
    connect: list[tuple[float, float]] = []
    for i in range(first, last + 1):
        name = f"{prefix}-sb{i}"
        t0, c0 = time.perf_counter(), _cpu_ms()
        controller.create_sandbox(name)
        t1, c1 = time.perf_counter(), _cpu_ms()
        controller.connect(network, name, ConnectRequest())
        t2, c2 = time.perf_counter(), _cpu_ms()
        create.append(((t1 - t0) * 1000, c1 - c0))
        connect.append(((t2 - t1) * 1000, c2 - c1))
        if (i - first + 1) % 100 == 0:
            print(f"#   ... {i} others connected", file=sys.stderr, flush=True)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"#   helper process peak RSS {rss_mib:.0f} MiB", file=sys.stderr, flush=True)
    print(json.dumps({"create": create, "connect": connect}))


def run_populate(host: BenchHost, first: int, last: int) -> dict[str, list[Timing]]:
    """Create and connect sandboxes FIRST..LAST in one helper process in the host namespace."""
    if last < first:
        return {"create": [], "connect": []}
    argv = host.argv(
        sys.executable, str(Path(__file__).resolve()), "--populate", NETWORK, str(first), str(last)
    )
    proc = subprocess.run(
        argv,
        stdout=subprocess.PIPE,
        text=True,
        env={**host.env(), "NST_BENCH_HOST": host.name},
        cwd=host.tmp,
        timeout=3600,
        check=False,
    )
    if proc.returncode != 0:
        raise CommandFailed(f"setting up sandboxes {first}..{last} failed (rc={proc.returncode})")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    return {key: [Timing(w, c) for w, c in raw[key]] for key in ("create", "connect")}


# --------------------------------------------------------------------------- profiling


def profile_once(host: BenchHost, probe: str, tag: str) -> dict[str, Path]:
    """One connect and one disconnect under cProfile (python -m cProfile -m netstack.cli)."""
    files = {}
    for verb in ("connect", "disconnect"):
        out = host.tmp / f"{tag}-{verb}.prof"
        host.run(
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            str(out),
            "-m",
            "netstack.cli",
            "network",
            verb,
            NETWORK,
            probe,
        )
        files[verb] = out
    return files


_PROFILE_ROWS = [
    # (label, file suffix, function name); cumulative time of each
    ("whole process (under cProfile)", None, None),
    ("  imports", "<frozen importlib._bootstrap>", "_find_and_load"),
    ("  Store() open + migrate check", "netstack/store.py", "__init__"),
    ("  Controller.connect", "netstack/controller.py", "connect"),
    ("    _reserve_endpoint (IPAM, row)", "netstack/controller.py", "_reserve_endpoint"),
    ("    AddressAllocator.request", "ipam/allocator.py", "request"),
    ("    BridgeDriver.create_endpoint", "drivers/bridge/driver.py", "create_endpoint"),
    ("    BridgeDriver.join", "drivers/bridge/driver.py", "join"),
    ("      links.next_eth_name", "netstack/kernel/links.py", "next_eth_name"),
    ("      links.move_to_sandbox", "netstack/kernel/links.py", "move_to_sandbox"),
    (
        "      links.configure_sandbox_interface",
        "netstack/kernel/links.py",
        "configure_sandbox_interface",
    ),
    ("  Controller.disconnect", "netstack/controller.py", "disconnect"),
    ("    BridgeDriver.delete_endpoint", "drivers/bridge/driver.py", "delete_endpoint"),
    ("    _forget_endpoint (IPAM, row)", "netstack/controller.py", "_forget_endpoint"),
    ("  pyroute2 netns socket (fork)", "pyroute2/netns/__init__.py", "create_socket"),
    ("  sqlite3 execute", "~", "<method 'execute' of 'sqlite3.Connection' objects>"),
    ("  Store.transaction commit", "netstack/store.py", "transaction"),
]


def _cumulative(path: Path) -> tuple[float, dict[str, float]]:
    stats = pstats.Stats(str(path))
    raw = stats.stats  # type: ignore[attr-defined]
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
    return total, found


def print_profiles(first: Point, last: Point) -> None:
    """Where one connect/disconnect spends its time, at the first and the last point (ms)."""
    for verb in ("connect", "disconnect"):
        if verb not in first.profile or verb not in last.profile:
            continue
        _t1, a = _cumulative(first.profile[verb])
        _t2, b = _cumulative(last.profile[verb])
        say(f"## cProfile of one `netctl network {verb}` (cumulative ms; one run each, noisy)")
        say(f"{'':44} {f'{first.endpoints} ep':>9} {f'{last.endpoints} ep':>9}")
        for label, _suffix, _func in _PROFILE_ROWS:
            if a[label] == 0 and b[label] == 0:
                continue
            say(f"{label:44} {a[label] * 1000:9.1f} {b[label] * 1000:9.1f}")
    say()


# --------------------------------------------------------------------------- measurement


def measure_point(
    host: BenchHost,
    fresh: BenchHost,
    point: Point,
    probe: str,
    fresh_probe: str,
    reps: int,
    floor: bool,
) -> None:
    """REPS rounds of three connect+disconnect pairs (main, control, fresh host).

    The order of the pairs is shuffled in each round, so no series always runs right after
    another (or at the same phase of some periodic load on the machine).
    """
    order = random.Random(point.endpoints)
    pairs = [
        (host, NETWORK, probe, "connect", "disconnect"),
        (host, CONTROL, probe, "control_connect", "control_disconnect"),
        (fresh, FRESH, fresh_probe, "fresh_connect", "fresh_disconnect"),
    ]
    for rep in range(reps):
        order.shuffle(pairs)
        for where, network, sandbox, connect_series, disconnect_series in pairs:
            timing = where.timed_netctl("network", "connect", network, sandbox)
            getattr(point, connect_series).append(timing)
            if rep == 0 and network == NETWORK:
                point.nft_rules, point.nft_elements = host.nft_counts()
                point.host_links = host.link_count()
                inspect = host.netctl("network", "inspect", NETWORK, "--format", "json")
                (doc,) = json.loads(inspect.stdout)
                point.inspected_endpoints = len(doc["Endpoints"])
            timing = where.timed_netctl("network", "disconnect", network, sandbox)
            getattr(point, disconnect_series).append(timing)
        if floor:
            point.floor.append(host.timed_netctl("network", "connect", "--help"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode (< 30 s)")
    parser.add_argument("-n", "--endpoints", type=int, help="largest N (default 500, quick 20)")
    parser.add_argument(
        "-r", "--reps", type=int, help="repetitions per point (default 15, quick 3)"
    )
    parser.add_argument("--points", help="endpoint counts to measure at, e.g. 1,100,500")
    parser.add_argument("--subnet", default="10.0.0.0/16", help="main network (10.0.0.0/16)")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile one connect/disconnect at first/last point"
    )
    parser.add_argument(
        "--populate", nargs=3, metavar=("NETWORK", "FIRST", "LAST"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.populate:
        network, first, last = args.populate
        populate(network, os.environ["NST_BENCH_HOST"], int(first), int(last))
        return 0

    need_root()
    exit_on_signals()
    n_max = args.endpoints or (20 if args.quick else 500)
    reps = args.reps or (3 if args.quick else 15)
    if args.points:
        points = sorted({int(p) for p in args.points.split(",")})
    elif args.quick:
        points = [1, n_max]
    else:
        points = sorted({1, n_max // 2, n_max})
    if points[0] < 1:
        parser.error("points must be >= 1")

    import netstack

    conditions = RunConditions(
        "connect_scaling: netctl network connect/disconnect vs endpoints on the network",
        [
            f"netstack from {Path(netstack.__file__).resolve().parent}",
            f"network {NETWORK} {args.subnet}, control network {CONTROL} 10.255.0.0/24; "
            f"points {points}, REPS={reps}{' (quick)' if args.quick else ''}",
        ],
    )
    results: list[Point] = []
    setup: dict[str, list[Timing]] = {"create": [], "connect": []}
    with BenchHost() as host, BenchHost(inside=host, suffix="fresh") as fresh:
        say(f"# host namespaces {host.name} and {fresh.name}; netctl: {' '.join(host.netctl_argv)}")
        probe = f"{host.name}-probe"
        fresh_probe = f"{fresh.name}-probe"
        host.netctl("network", "create", "--subnet", args.subnet, NETWORK)
        host.netctl("network", "create", "--subnet", "10.255.0.0/24", CONTROL)
        host.netctl("sandbox", "create", probe)
        fresh.netctl("network", "create", "--subnet", args.subnet, FRESH)
        fresh.netctl("sandbox", "create", fresh_probe)
        for _ in range(2):  # warm-up: page cache, .pyc files
            for net in (NETWORK, CONTROL):
                host.timed_netctl("network", "connect", net, probe)
                host.timed_netctl("network", "disconnect", net, probe)
            fresh.timed_netctl("network", "connect", FRESH, fresh_probe)
            fresh.timed_netctl("network", "disconnect", FRESH, fresh_probe)
        others = 0
        for n in points:
            if n - 1 > others:
                say(f"# setting up {n - 1 - others} more sandboxes in-process ...")
                t0 = time.perf_counter()
                got = run_populate(host, others + 1, n - 1)
                for key in setup:
                    setup[key].extend(got[key])
                say(f"#   done in {time.perf_counter() - t0:.1f} s")
                others = n - 1
            point = Point(n)
            say(f"# measuring with {n} endpoints ({others} others + probe), {reps} reps ...")
            measure_point(
                host, fresh, point, probe, fresh_probe, reps, floor=n in (points[0], points[-1])
            )
            if args.profile and n in (points[0], points[-1]):
                point.profile = profile_once(host, probe, f"ep{n}")
            results.append(point)
        if args.profile:
            say()
            print_profiles(results[0], results[-1])
        return report(results, setup, reps, conditions)


SERIES = (
    ("connect", "connect"),
    ("disconnect", "disconnect"),
    ("control_connect", "control connect"),
    ("control_disconnect", "control disconn."),
    ("fresh_connect", "fresh-host connect"),
    ("fresh_disconnect", "fresh-host disconn."),
)


def _cell(values: list[Timing], kind: str) -> str:
    stats = Stats.of([getattr(t, kind) for t in values])
    return f"{stats.median:6.1f} [{stats.minimum:5.1f}-{stats.maximum:6.1f}]"


def report(
    results: list[Point], setup: dict[str, list[Timing]], reps: int, conditions: RunConditions
) -> int:
    failed = False
    first, last = results[0], results[-1]
    n1, nn = first.endpoints, last.endpoints
    say()
    for kind, title in (("wall", "wall time"), ("cpu", "CPU time (user+sys of the process)")):
        say(f"{title}, ms: median [min-max] over {reps} reps")
        say(f"{'endpoints':>9} | " + " | ".join(f"{t:^21}" for _s, t in SERIES))
        for p in results:
            cells = [_cell(getattr(p, series), kind) for series, _t in SERIES]
            say(f"{p.endpoints:>9} | " + " | ".join(cells))
        say()
    say(f"{'endpoints':>9} | nft rules | set elements | host links | endpoints in inspect")
    for p in results:
        say(
            f"{p.endpoints:>9} | {p.nft_rules:>9} | {p.nft_elements:>12} | {p.host_links:>10} | "
            f"{p.inspected_endpoints:>20}"
        )
        if p.inspected_endpoints != p.endpoints:
            say(
                f"#   WARNING: inspect shows {p.inspected_endpoints} endpoints, "
                f"expected {p.endpoints}"
            )
            failed = True
    floor_wall = Stats.of([t.wall for t in first.floor + last.floor]).median
    floor_cpu = Stats.of([t.cpu for t in first.floor + last.floor]).median
    say(
        f"process floor (`netctl network connect --help`: exec, interpreter, argparse): "
        f"{floor_wall:.1f} ms wall, {floor_cpu:.1f} ms CPU"
    )
    say()

    def seq(series: str, kind: str = "wall") -> float:
        """Last point over first point, same series (minutes apart)."""
        return ratio(last.median(series, kind), first.median(series, kind))

    def now(p: Point, a: str, b: str, kind: str = "wall") -> float:
        """Two series of the same point (interleaved rep by rep)."""
        return ratio(p.median(a, kind), p.median(b, kind))

    verdict = {}
    say(f"Nth/1st ratios (medians), N={nn}; goal <= {GOAL_RATIO}")
    say(f"{'':58} {'connect':>9} {'disconn.':>9}")
    rows = [
        (f"sequential: {nn} eps vs {n1} ep, minutes apart (wall)", "seq", "wall"),
        ("  same, CPU time", "seq", "cpu"),
        (f"same time: {nn} eps vs fresh host (wall)", "same", "wall"),
        ("  same, CPU time", "same", "cpu"),
        ("  of which host totals: control / fresh (wall)", "global", "wall"),
        ("  of which the network's endpoints: main / control (wall)", "network", "wall"),
    ]
    for label, how, kind in rows:
        values = []
        for verb in ("connect", "disconnect"):
            if how == "seq":
                value = seq(verb, kind)
            elif how == "same":
                value = now(last, verb, f"fresh_{verb}", kind)
            elif how == "global":
                value = now(last, f"control_{verb}", f"fresh_{verb}", kind)
            else:
                value = now(last, verb, f"control_{verb}", kind)
            verdict[(how, kind, verb)] = value
            values.append(value)
        say(f"{label:58} {values[0]:9.3f} {values[1]:9.3f}")
    same_wall = max(verdict[("same", "wall", v)] for v in ("connect", "disconnect"))
    seq_wall = max(verdict[("seq", "wall", v)] for v in ("connect", "disconnect"))
    say(
        f"goal (<= {GOAL_RATIO}): same-time {'met' if same_wall <= GOAL_RATIO else 'MISSED'}, "
        f"sequential {'met' if seq_wall <= GOAL_RATIO else 'MISSED'} (sequential includes load "
        f"drift: the fresh host's own ratio is "
        f"{seq('fresh_connect'):.2f} / {seq('fresh_disconnect'):.2f})"
    )
    rules_equal = len({p.nft_rules for p in results}) == 1
    say(
        f"nft rules with {n1} / {nn} endpoints: {first.nft_rules} / {last.nft_rules} "
        f"({'equal' if rules_equal else 'DIFFERENT: the rule count grows with endpoints'})"
    )
    failed = failed or not rules_equal
    for key, what in (("connect", "connect"), ("create", "sandbox create")):
        values = setup[key]
        window = min(50, len(values) // 4)
        if window >= 3:
            head, tail = values[:window], values[-window:]
            wall_a = Stats.of([t.wall for t in head]).median
            wall_b = Stats.of([t.wall for t in tail]).median
            cpu_a = Stats.of([t.cpu for t in head]).median
            cpu_b = Stats.of([t.cpu for t in tail]).median
            say(
                f"in-process set-up ({len(values)} others, Controller, no process start), "
                f"{what}: wall {wall_a:.1f} -> {wall_b:.1f} ms (x{ratio(wall_b, wall_a):.2f}), "
                f"CPU {cpu_a:.1f} -> {cpu_b:.1f} ms (x{ratio(cpu_b, cpu_a):.2f}); "
                f"first/last {window} (sequential: includes load drift)"
            )
    say(f"# {PEER_NOTE}")
    say(
        f"# netstack connect in a fresh host / docker's 41.5 ms (cross-run, context only): "
        f"x{ratio(last.median('fresh_connect'), 41.5):.2f}"
    )
    conditions.end()

    for p in (first, last) if len(results) > 1 else (first,):
        tag = f"ep{p.endpoints}"
        metric(f"netstack_connect_{tag}_median", p.median("connect"), "ms")
        metric(f"netstack_disconnect_{tag}_median", p.median("disconnect"), "ms")
        metric(f"netstack_connect_{tag}_cpu_median", p.median("connect", "cpu"), "ms")
        metric(f"netstack_disconnect_{tag}_cpu_median", p.median("disconnect", "cpu"), "ms")
        metric(f"netstack_nft_rules_{tag}", p.nft_rules, "rules")
    metric("netstack_connect_fresh_host_median", last.median("fresh_connect"), "ms")
    metric("netstack_disconnect_fresh_host_median", last.median("fresh_disconnect"), "ms")
    for verb in ("connect", "disconnect"):
        metric(f"netstack_{verb}_ratio_{nn}_{n1}", verdict[("seq", "wall", verb)], "x")
        metric(f"netstack_{verb}_ratio_{nn}_{n1}_same_time", verdict[("same", "wall", verb)], "x")
        metric(
            f"netstack_{verb}_cpu_ratio_{nn}_{n1}_same_time", verdict[("same", "cpu", verb)], "x"
        )
    metric("netstack_cli_floor_median", floor_wall, "ms")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main("connect_scaling", main)
