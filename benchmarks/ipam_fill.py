#!/usr/bin/env python3
"""Is an address allocation as cheap in a nearly full pool as in an empty one?

IPAM alone, in-process, as the controller uses it: a Store (SQLite, WAL) in a temp dir, one
pool (default 10.90.0.0/16) added with make_pool_spec, then `AddressAllocator.request()` each
address in its own `store.transaction()` (BEGIN IMMEDIATE ... COMMIT) until Exhausted.
Each allocation is timed including its transaction. Reports the time per address over the
first and the last WINDOW (1000) allocations and their ratio (goal: flat, about 1), windows
across the fill, the total, and two costs at the full end: detecting Exhausted, and finding
the one address freed in an otherwise full pool.

After each allocation a control pool in the same store (never more than one address taken)
gets one timed allocation (and an untimed release): its window medians show how much the
machine's load moved between windows, and the main ratio is also given over the control's.

    python3 benchmarks/ipam_fill.py            # /16 (65533 addresses), 3 repetitions
    python3 benchmarks/ipam_fill.py --quick    # smoke: /19, 3 repetitions
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import RunConditions, Stats, exit_on_signals, metric, ratio, say

PEER_NOTE = (
    "peer reference (shared/peers/README.md, another run): host-local (one exec per "
    "allocation, a file per address) 1st -> 2000th allocation 3.2 -> 13.7 ms (x4.3)"
)
GOAL_RATIO = 1.2
CONTROL_POOL = ipaddress.ip_network("10.255.0.0/16")


@dataclass
class Fill:
    per_address_us: list[float]
    control_us: list[float]
    total_s: float
    exhausted_ms: float
    refill_ms: float
    refill_address: str
    first_address: str
    last_address: str


def fill_once(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network, directory: Path) -> Fill:
    from netstack.ipam import AddressAllocator, make_pool_spec

    from netstack.errors import Exhausted
    from netstack.store import Store

    store = Store(directory)
    try:
        with store.transaction() as conn:
            allocator = AddressAllocator(conn)
            allocator.add_pool("bench-network", make_pool_spec(subnet))
            allocator.add_pool("control-network", make_pool_spec(CONTROL_POOL))
            (pool,) = allocator.pools("bench-network")
            (control,) = allocator.pools("control-network")
        times_ns: list[int] = []
        control_ns: list[int] = []
        addresses = []
        clock = time.perf_counter_ns
        total_ns = 0
        while True:
            t0 = clock()
            try:
                with store.transaction() as conn:
                    address = AddressAllocator(conn).request(pool, f"endpoint-{len(times_ns)}")
            except Exhausted:
                exhausted_ms = (clock() - t0) / 1e6
                break
            elapsed = clock() - t0
            total_ns += elapsed
            times_ns.append(elapsed)
            addresses.append(address)
            # the control: one allocation in a pool that never holds more than this address
            t0 = clock()
            with store.transaction() as conn:
                spare = AddressAllocator(conn).request(control, "control")
            control_ns.append(clock() - t0)
            with store.transaction() as conn:
                AddressAllocator(conn).release(control.id, spare)
        total_s = total_ns / 1e9
        # Free one address a third of the way in; the next request must wrap around and find it.
        victim = addresses[len(addresses) // 3]
        with store.transaction() as conn:
            AddressAllocator(conn).release(pool.id, victim)
        t0 = clock()
        with store.transaction() as conn:
            found = AddressAllocator(conn).request(pool, "endpoint-refill")
        refill_ms = (clock() - t0) / 1e6
        if found != victim:
            raise AssertionError(f"expected the freed {victim}, got {found}")
        return Fill(
            per_address_us=[t / 1e3 for t in times_ns],
            control_us=[t / 1e3 for t in control_ns],
            total_s=total_s,
            exhausted_ms=exhausted_ms,
            refill_ms=refill_ms,
            refill_address=str(victim),
            first_address=str(addresses[0]),
            last_address=str(addresses[-1]),
        )
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode (< 30 s)")
    parser.add_argument("--subnet", help="pool to fill (default 10.90.0.0/16, quick 10.90.0.0/19)")
    parser.add_argument("-r", "--reps", type=int, help="fills (default 3)")
    parser.add_argument("--window", type=int, default=1000, help="addresses per window (1000)")
    args = parser.parse_args()
    exit_on_signals()
    subnet = ipaddress.ip_network(args.subnet or ("10.90.0.0/19" if args.quick else "10.90.0.0/16"))
    reps = args.reps or 3
    window = args.window

    import sqlite3

    import netstack

    base = Path(tempfile.mkdtemp(prefix=f"nst-bench-{os.getpid()}-ipam-"))
    conditions = RunConditions(
        "ipam_fill: AddressAllocator.request() per address, one transaction each, until Exhausted",
        [
            f"netstack from {Path(netstack.__file__).resolve().parent}; "
            f"SQLite {sqlite3.sqlite_version}",
            f"pool {subnet}, REPS={reps}, window {window}{' (quick)' if args.quick else ''}; "
            f"store in {base} ({_filesystem(base)})",
        ],
    )
    fills: list[Fill] = []
    try:
        for rep in range(reps):
            directory = base / f"rep{rep}"
            fill = fill_once(subnet, directory)
            shutil.rmtree(directory, ignore_errors=True)
            fills.append(fill)
            say(
                f"# rep {rep + 1}: {len(fill.per_address_us)} addresses "
                f"({fill.first_address} .. {fill.last_address}) in {fill.total_s:.2f} s"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    count = len(fills[0].per_address_us)
    window = min(window, count // 2)

    def window_median(series: str, start: int, stat: str = "median") -> float:
        """Median over reps of one statistic of allocations [start, start + window)."""
        per_rep = [Stats.of(getattr(f, series)[start : start + window]) for f in fills]
        return Stats.of([getattr(st, stat) for st in per_rep]).median

    say()
    say(f"per-address time (us), medians over {reps} rep(s) of each window's statistics")
    say(
        f"{'window (allocation #)':>24} | {'median':>8} | {'mean':>8} | {'p90':>8} | "
        f"{'max':>9} | {'control median':>14} | main/control"
    )
    step = max(window, count // 8)
    starts = sorted({*range(0, count - window + 1, step), count - window})
    for start in starts:
        med = window_median("per_address_us", start)
        control = window_median("control_us", start)
        say(
            f"{f'{start + 1}-{start + window}':>24} | {med:8.1f} | "
            f"{window_median('per_address_us', start, 'mean'):8.1f} | "
            f"{window_median('per_address_us', start, 'p90'):8.1f} | "
            f"{window_median('per_address_us', start, 'maximum'):9.1f} | {control:14.1f} | "
            f"{ratio(med, control):12.3f}"
        )
    last = count - window
    first_med, last_med = window_median("per_address_us", 0), window_median("per_address_us", last)
    first_mean = window_median("per_address_us", 0, "mean")
    last_mean = window_median("per_address_us", last, "mean")
    median_ratio = ratio(last_med, first_med)
    mean_ratio = ratio(last_mean, first_mean)
    drift = ratio(window_median("control_us", last), window_median("control_us", 0))
    same_time = ratio(median_ratio, drift)
    total = Stats.of([f.total_s for f in fills]).median
    exhausted = Stats.of([f.exhausted_ms for f in fills]).median
    refill = Stats.of([f.refill_ms for f in fills]).median
    # the peer's own windows: allocations 2-21 and 1981-2000
    early = Stats.of([Stats.of(f.per_address_us[1:21]).median for f in fills]).median
    at2000 = Stats.of([Stats.of(f.per_address_us[1980:2000]).median for f in fills]).median
    say()
    say(
        f"last {window} / first {window}: median x{median_ratio:.3f}, mean x{mean_ratio:.3f}; "
        f"over the control's own ratio (x{drift:.3f}, load drift): x{same_time:.3f}  "
        f"(goal flat, <= {GOAL_RATIO}: {'met' if same_time <= GOAL_RATIO else 'MISSED'})"
    )
    say(
        f"total {count} addresses: {total:.2f} s of timed allocations "
        f"({1e6 * total / count:.1f} us each on average, WAL checkpoints included)"
    )
    say(
        f"in the full pool: detecting Exhausted {exhausted:.1f} ms; finding the one freed "
        f"address ({fills[0].refill_address}) {refill:.1f} ms  (both walk the taken addresses)"
    )
    say(
        f"like the peer's windows: allocations 2-21 {early:.1f} us, 1981-2000 {at2000:.1f} us "
        f"(x{ratio(at2000, early):.2f})"
    )
    say(f"# {PEER_NOTE}; netstack here is in-process (no exec), so compare growth, not level")
    conditions.end()
    metric(f"ipam_alloc_first{window}_median", first_med, "us")
    metric(f"ipam_alloc_last{window}_median", last_med, "us")
    metric("ipam_alloc_last_first_ratio", median_ratio, "x")
    metric("ipam_alloc_last_first_ratio_vs_control", same_time, "x")
    metric("ipam_alloc_last_first_mean_ratio", mean_ratio, "x")
    metric(f"ipam_fill_total_{count}", total, "s")
    metric("ipam_exhausted_detect", exhausted, "ms")
    metric("ipam_full_pool_refill", refill, "ms")
    return 0


def _filesystem(path: Path) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _dev, mount, fstype, *_ = line.split()
                if str(path).startswith(mount) and len(mount) > len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


if __name__ == "__main__":
    sys.exit(main())
