"""Shared helpers for netstack's benchmarks.

* statistics and `METRIC name=value unit` lines (the format of shared/peers/lib.sh),
* the conditions of a run (host, load at start and end, CPU busy fraction),
* `BenchHost`: a throwaway host network namespace ``nst-bench-<pid>`` with its own state
  directory, in which netctl runs as users run it (``nsenter --net=/run/netns/<ns> netctl``).
  Sandboxes are named ``<host>-<suffix>``. Everything is removed on exit, on an exception,
  on Ctrl-C and on SIGTERM/SIGHUP; namespaces left by a killed benchmark (dead pid) are
  swept at the next start.

Nothing here touches the machine's real interfaces, routes or firewall.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

NETNS_DIR = Path("/run/netns")
# netctl writes /etc/netns/<sandbox>/resolv.conf; removed with the namespaces.
ETC_NETNS = Path("/etc/netns")
# The test suite's owner files (tests/conftest.py): a pytest session sweeps every nst-*
# namespace whose owner file is missing or names a dead process. Registering ours there
# keeps a concurrent test run from deleting a benchmark's namespaces under it.
OWNER_DIR = Path("/run/nst-tests")
PREFIX = "nst-bench-"
_HOST_RE = re.compile(r"^nst-bench-(\d+)(?:-.*)?$")


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stats:
    n: int
    median: float
    minimum: float
    maximum: float
    mean: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan)
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered) + 0.999) - 1)]
        return cls(
            len(ordered),
            statistics.median(ordered),
            ordered[0],
            ordered[-1],
            statistics.fmean(ordered),
            p90,
        )

    def line(self, precision: int = 1) -> str:
        f = f"{{:.{precision}f}}"
        return (
            f"median {f.format(self.median)}  min {f.format(self.minimum)}  "
            f"max {f.format(self.maximum)}  p90 {f.format(self.p90)}  (n={self.n})"
        )


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def median_ratio_interval(
    before: Sequence[float],
    after: Sequence[float],
    level: float = 0.9,
    reps: int = 2000,
    seed: int = 1,
) -> tuple[float, float]:
    """A percentile-bootstrap interval for median(after) / median(before): each sample
    resampled with replacement `reps` times (seeded, so a report is reproducible).

    How far another run of the same code may read the ratio from this one, given the scatter
    inside the two samples (not drift between them; that is what controls are for). NaNs
    when either sample is empty."""
    if not before or not after:
        return float("nan"), float("nan")
    rnd = random.Random(seed)
    ratios = sorted(
        ratio(
            statistics.median(rnd.choices(after, k=len(after))),
            statistics.median(rnd.choices(before, k=len(before))),
        )
        for _ in range(reps)
    )
    tail = (1 - level) / 2
    return ratios[int(tail * (reps - 1))], ratios[int((1 - tail) * (reps - 1))]


def metric(name: str, value: float | int, unit: str) -> None:
    """Print one `METRIC name=value unit` line (the peers' format)."""
    text = str(value) if isinstance(value, int) else f"{value:.3f}"
    print(f"METRIC {name}={text} {unit}", flush=True)


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- run conditions


def _cpu_busy_total() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
    return busy, busy + fields[3] + fields[4]


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class RunConditions:
    """Prints the machine's conditions at the start and at the end of a run."""

    def __init__(self, title: str, details: Sequence[str] = ()) -> None:
        model = "?"
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        say(f"# {title}")
        say(
            f"# host: {os.uname().release} {os.cpu_count()} CPUs ({model}), "
            f"python {sys.version.split()[0]}"
        )
        say(
            f"# date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; "
            f"loadavg at start: {_loadavg()}"
        )
        for detail in details:
            say(f"# {detail}")
        self._start = _cpu_busy_total()
        self._t0 = time.perf_counter()

    def end(self) -> None:
        busy0, total0 = self._start
        busy1, total1 = _cpu_busy_total()
        share = 100.0 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        say(
            f"# end: {time.perf_counter() - self._t0:.1f} s; loadavg {_loadavg()}; machine CPU "
            f"busy during run {share:.0f}% of {os.cpu_count()} CPUs (ours and anyone else's)"
        )


# --------------------------------------------------------------------------- signals


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP unwind the stack, so `finally` blocks clean up.

    SIGINT is set explicitly: a job started with `&` from a script inherits it ignored.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ignore INT/TERM/HUP while cleaning up, so a second Ctrl-C cannot leave half a mess."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in saved:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- namespaces


def list_netns() -> list[str]:
    try:
        return sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(host: str) -> bool:
    try:
        pid_text, start = (OWNER_DIR / f"{host}.owner").read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid_text)) == start


def delete_netns(names: Sequence[str]) -> None:
    """Delete named namespaces in one `ip -batch` (tolerates ones already gone)."""
    if not names:
        return
    script = "".join(f"netns delete {name}\n" for name in names)
    subprocess.run(
        ["ip", "-force", "-batch", "-"],
        input=script,
        text=True,
        capture_output=True,
        check=False,
        timeout=600,
    )
    for name in names:  # a stale mount point without a namespace behind it
        path = NETNS_DIR / name
        if path.exists():
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
            with contextlib.suppress(OSError):
                path.unlink()


def _stale(host: str) -> bool:
    """No live owner file and no process with the pid in the name."""
    match = _HOST_RE.match(host)
    return bool(match) and not _owner_alive(host) and _start_time(int(match.group(1))) is None


def sweep_stale() -> list[str]:
    """Remove what a killed benchmark left: nst-bench-<pid>* namespaces, temp dirs, owner file.

    Only for a <pid> that is no longer running (and has no live owner file).
    """
    hosts: set[str] = set()
    for name in list_netns():
        match = _HOST_RE.match(name)
        if match:
            hosts.add(f"{PREFIX}{match.group(1)}")
    if OWNER_DIR.is_dir():
        hosts.update(o.name.removesuffix(".owner") for o in OWNER_DIR.glob(f"{PREFIX}*.owner"))
    temp = Path(tempfile.gettempdir())
    for entry in temp.glob(f"{PREFIX}*"):
        match = _HOST_RE.match(entry.name)
        if match:
            hosts.add(f"{PREFIX}{match.group(1)}")
    removed: list[str] = []
    for host in sorted(h for h in hosts if _stale(h)):
        names = [n for n in list_netns() if n == host or n.startswith(f"{host}-")]
        delete_netns([n for n in names if n != host])
        delete_netns([n for n in names if n == host])
        removed.extend(names)
        for entry in [*temp.glob(f"{host}-*"), *ETC_NETNS.glob(f"{host}-*")]:
            shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (OWNER_DIR / f"{host}.owner").unlink()
    return removed


def netctl_command() -> list[str]:
    """netctl as users run it: the console script installed with this interpreter (a venv's
    own first), else the one on PATH, else `python -m netstack.cli`."""
    beside = Path(sys.executable).with_name("netctl")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("netctl")
    return [found] if found else [sys.executable, "-m", "netstack.cli"]


def need_root() -> None:
    if os.geteuid() != 0:
        sys.exit("this benchmark needs root: it creates network namespaces")
    for tool in ("ip", "nsenter", "nft"):
        if shutil.which(tool) is None:
            sys.exit(f"this benchmark needs the {tool!r} command")


class CommandFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Timing:
    """One timed process: wall-clock and CPU (user + system) milliseconds."""

    wall: float
    cpu: float


class BenchHost:
    """A throwaway host namespace ``nst-bench-<pid>`` with its own netstack state directory.

    Use as a context manager: on exit (normal, exception, Ctrl-C, SIGTERM) every
    ``<host>-*`` sandbox namespace, the host namespace, the temp dir and the owner file
    are removed. `inside` makes a second host ``<that host>-<suffix>``: it is covered by
    that host's owner file and swept with it.
    """

    def __init__(self, inside: BenchHost | None = None, suffix: str = "") -> None:
        base = f"{PREFIX}{os.getpid()}"
        self.name = f"{inside.name}-{suffix}" if inside is not None else base
        self.path = str(NETNS_DIR / self.name)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.state_dir = self.tmp / "state"
        self.run_dir = self.tmp / "run"
        self.netctl_argv = netctl_command()
        self._owner = None if inside is not None else OWNER_DIR / f"{self.name}.owner"

    # lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> BenchHost:
        try:
            if self._owner is not None:
                swept = sweep_stale()
                if swept:
                    say(f"# swept {len(swept)} namespace(s) left by a killed benchmark")
                OWNER_DIR.mkdir(parents=True, exist_ok=True)
                self._owner.write_text(f"{os.getpid()} {_start_time(os.getpid())}")
            subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
            subprocess.run(
                ["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True
            )
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        """Remove sandboxes, the host namespace, the temp dir, the owner file. Idempotent."""
        with signals_deferred():
            children = [n for n in list_netns() if n.startswith(f"{self.name}-")]
            delete_netns(children)
            delete_netns([n for n in list_netns() if n == self.name])
            shutil.rmtree(self.tmp, ignore_errors=True)
            for directory in ETC_NETNS.glob(f"{self.name}-*"):
                shutil.rmtree(directory, ignore_errors=True)
            if self._owner is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._owner.unlink()
            left = [n for n in list_netns() if n == self.name or n.startswith(f"{self.name}-")]
            if left:
                print(f"# WARNING: could not remove namespaces: {left}", file=sys.stderr)

    # running things in the host namespace -------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NETSTACK_STATE_DIR"] = str(self.state_dir)
        env["NETSTACK_RUN_DIR"] = str(self.run_dir)
        env.pop("NETSTACK_FAULT", None)
        return env

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", *argv]

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command in the host namespace; raise CommandFailed on a non-zero exit."""
        proc = subprocess.run(
            self.argv(*argv),
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.tmp,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise CommandFailed(
                f"{' '.join(argv)} failed (rc={proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def netctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run(*self.netctl_argv, *args, timeout=timeout)

    def timed_netctl(self, *args: str) -> Timing:
        """Wall and CPU time (ms) of one `nsenter --net=... netctl ARGS` process.

        nsenter enters the namespace and execs netctl in the same process, so the child's
        rusage (user + system, with the children it waited for) is netctl's CPU time. Wall
        time is what a user waits for; CPU time leaves out sleeping and waiting on the kernel,
        but on a shared VM it drifts with the load too (seen here: +-20% between identical
        runs a minute apart). Raises CommandFailed.
        """
        argv = self.argv(*self.netctl_argv, *args)
        env = self.env()
        with tempfile.TemporaryFile() as errors:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=errors, env=env, cwd=self.tmp
            )
            try:
                _pid, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            wall = (time.perf_counter() - t0) * 1000.0
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                errors.seek(0)
                raise CommandFailed(
                    f"netctl {' '.join(args)} failed (rc={proc.returncode}): "
                    f"{errors.read().decode(errors='replace').strip()}"
                )
        return Timing(wall, (usage.ru_utime + usage.ru_stime) * 1000.0)

    def nft_ruleset(self) -> list[dict[str, Any]]:
        """`nft -j list ruleset` of the host namespace, parsed."""
        text = self.run("nft", "-j", "list", "ruleset").stdout
        items: list[dict[str, Any]] = json.loads(text).get("nftables", []) if text.strip() else []
        return items

    def nft_counts(self) -> tuple[int, int]:
        """(rules, set elements) in the host namespace's whole ruleset."""
        rules = elements = 0
        for item in self.nft_ruleset():
            if "rule" in item:
                rules += 1
            elif "set" in item:
                elements += len(item["set"].get("elem", []))
            elif "map" in item:
                elements += len(item["map"].get("elem", []))
        return rules, elements

    def link_count(self) -> int:
        return len(json.loads(self.run("ip", "-j", "link", "show").stdout or "[]"))


def run_main(name: str, main: Callable[[], int]) -> NoReturn:
    """Run a benchmark's main: exit 130 on Ctrl-C, 1 with one error line on a failed command.

    Clean-up is each benchmark's own (context managers and signal handlers) and has run by
    the time these exceptions arrive here.
    """
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("# interrupted; what the benchmark made has been removed", file=sys.stderr)
        sys.exit(130)
    except CommandFailed as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(1)
