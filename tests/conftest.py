"""Shared fixtures: a throwaway "host" network namespace per test.

Every integration and packet test runs netstack inside its own host namespace
``nst-<worker>-<n>``; sandboxes it creates are named ``<host>-<suffix>``. Nothing
touches the machine's real interfaces, routes or firewall.

Ownership: before a host namespace is created, its name is reserved by creating
``/run/nst-tests/<host>.owner`` exclusively; the file records the owning process
(pid and start time). The sweep at session start removes the fixture's namespaces
(``nst-<worker>-<n>`` and ``nst-<worker>-<n>-*``) whose owner process is gone or whose
owner file is missing, so a killed run is cleaned up while namespaces of live runs
(other xdist workers, other pytest runs at the same time) are left alone. Other
``nst-*`` namespaces (made by other tools) are touched only if an owner file of ours
names them and its owner is dead.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
NETNS_DIR = Path("/run/netns")
OWNER_DIR = Path("/run/nst-tests")
PREFIX = "nst-"
# Names the fixture makes: host nst-<worker>-<n>, children nst-<worker>-<n>-<suffix>.
HOST_NAME_RE = re.compile(r"^(nst-(?:gw\d+|main)-\d+)(?:-.*)?$")
ROOT_DIRS = ("integration", "packets", "e2e")

_counter = itertools.count(1)


# --------------------------------------------------------------------------- helpers


def worker_id() -> str:
    """The xdist worker id (``gw0``...) or ``main`` when not running under xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def _run(
    argv: Sequence[str], check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise AssertionError on failure if check."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed: {list(argv)}\nrc={proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def list_netns() -> list[str]:
    """Names of the named network namespaces under /run/netns."""
    try:
        return sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def _process_start_time(pid: int) -> str | None:
    """The start time (clock ticks since boot) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces; split after its closing parenthesis.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19]  # field 22 overall: starttime


def _owner_token() -> str:
    pid = os.getpid()
    return f"{pid} {_process_start_time(pid)}"


def _owner_alive(host_name: str) -> bool:
    """False only if host_name's owner file is missing or names a process that is gone.

    An owner file we cannot parse is not ours to judge: it counts as alive.
    """
    try:
        text = (OWNER_DIR / f"{host_name}.owner").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        pid_text, start = text.split()
        pid = int(pid_text)
    except ValueError:
        return True
    return _process_start_time(pid) == start


def _netns_pids(name: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", name], check=False, timeout=10)
    return [int(word) for word in proc.stdout.split() if word.isdigit()]


def _kill_netns_processes(names: Sequence[str]) -> None:
    """SIGKILL processes living in the given (test-made) namespaces, never ourselves."""
    me = os.getpid()
    for name in names:
        for pid in _netns_pids(name):
            if pid != me:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _delete_netns(name: str) -> None:
    """Delete one named namespace; tolerate it being gone already."""
    proc = _run(["ip", "netns", "delete", name], check=False, timeout=30)
    if proc.returncode != 0 and (NETNS_DIR / name).exists():
        # A stale mount point without a namespace behind it: remove the file.
        with contextlib.suppress(OSError):
            subprocess.run(
                ["umount", "-l", str(NETNS_DIR / name)], capture_output=True, check=False
            )
            (NETNS_DIR / name).unlink()


def _remove_host_namespaces(host_name: str, kill: bool) -> None:
    """Delete <host_name>-* namespaces, then host_name, and /etc/netns/<host_name>-* dirs."""
    children = [n for n in list_netns() if n.startswith(f"{host_name}-")]
    if kill:
        _kill_netns_processes([*children, host_name])
    for name in children:
        _delete_netns(name)
    if host_name in list_netns():
        _delete_netns(host_name)
    etc_netns = Path("/etc/netns")
    if etc_netns.is_dir():
        for entry in etc_netns.iterdir():
            if entry.name == host_name or entry.name.startswith(f"{host_name}-"):
                shutil.rmtree(entry, ignore_errors=True)


def sweep_stale_namespaces() -> list[str]:
    """Remove nst-* namespaces (and owner files) whose owning test process is gone."""
    removed: list[str] = []
    stale_hosts: set[str] = set()
    for name in list_netns():
        match = HOST_NAME_RE.match(name)
        if match and not _owner_alive(match.group(1)):
            stale_hosts.add(match.group(1))
    if OWNER_DIR.is_dir():
        for owner in OWNER_DIR.glob(f"{PREFIX}*.owner"):
            host_name = owner.name.removesuffix(".owner")
            if not _owner_alive(host_name):
                stale_hosts.add(host_name)
    for host_name in sorted(stale_hosts):
        if _owner_alive(host_name):  # reserved afresh since it was found stale
            continue
        names = [n for n in list_netns() if n == host_name or n.startswith(f"{host_name}-")]
        _remove_host_namespaces(host_name, kill=False)
        removed.extend(names)
        # Only drop the owner file if it is still stale (a live process may have
        # reserved the name in the meantime).
        if not _owner_alive(host_name):
            with contextlib.suppress(FileNotFoundError):
                (OWNER_DIR / f"{host_name}.owner").unlink()
    return removed


def _reserve_host_name() -> str:
    """Reserve a fresh host namespace name nst-<worker>-<n> by creating its owner file."""
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    token = _owner_token()
    for number in _counter:
        name = f"{PREFIX}{worker_id()}-{number}"
        if (NETNS_DIR / name).exists():
            continue
        # Write the token to a private file, then hard-link it into place: the owner
        # file appears atomically with its content, and the link fails if it exists.
        scratch = OWNER_DIR / f".{name}.{os.getpid()}.tmp"
        scratch.write_text(token)
        try:
            os.link(scratch, OWNER_DIR / f"{name}.owner")
        except FileExistsError:
            continue
        finally:
            scratch.unlink()
        if (NETNS_DIR / name).exists():  # created by someone without a reservation
            (OWNER_DIR / f"{name}.owner").unlink()
            continue
        return name
    raise AssertionError("unreachable")


def _netctl_argv() -> list[str]:
    """The netctl installed with the interpreter running the tests (a venv's own first)."""
    beside = Path(sys.executable).with_name("netctl")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("netctl")
    return [found] if found else [sys.executable, "-m", "netstack.cli"]


def _needs_root_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: creates network namespaces (run the integration tests as root)"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    return None


# --------------------------------------------------------------------------- pytest hooks


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root and network namespaces")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Sweep namespaces left behind by a killed run (only those with a dead owner).

    Under xdist this runs in the controller, before any worker starts (xdist starts
    them in its own trylast sessionstart hook), so workers never race the sweep.
    """
    if os.geteuid() == 0 and "PYTEST_XDIST_WORKER" not in os.environ:
        sweep_stale_namespaces()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests under integration/, packets/, e2e/ as root; skip them without root."""
    reason = _needs_root_reason()
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        path = Path(str(item.path)).resolve()
        try:
            top = path.relative_to(tests_dir).parts[0]
        except (ValueError, IndexError):
            top = ""
        if top in ROOT_DIRS:
            item.add_marker(pytest.mark.root)
        if reason and item.get_closest_marker("root"):
            item.add_marker(pytest.mark.skip(reason=reason))


# --------------------------------------------------------------------------- fixtures


@dataclass
class Outside:
    """A namespace standing for "the internet", joined to the host by a veth pair.

    It knows only 192.0.2.0/24 and 2001:db8:99::/64: no routes to sandbox subnets.
    """

    name: str
    iface: str = "eth0"
    host_iface: str = "nstup0"
    addr4: str = "192.0.2.2"
    host_addr4: str = "192.0.2.1"
    addr6: str = "2001:db8:99::2"
    host_addr6: str = "2001:db8:99::1"

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the outside namespace."""
        return _run(
            ["nsenter", f"--net={NETNS_DIR / self.name}", *argv], check=check, timeout=timeout
        )


def _netstackd_argv() -> list[str]:
    beside = Path(sys.executable).with_name("netstackd")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "netstack.daemon"]


class Daemons:
    """netstackd processes started in a host namespace; the host's teardown stops them."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, extra_env: dict[str, str] | None = None, log: Path | None = None
    ) -> subprocess.Popen[str]:
        """Start netstackd in the host namespace with the host's env (not waiting).

        Its output goes to pipes read at teardown, or to the file `log` (appended): give
        one when the daemon may log more than a pipe holds (64 KiB) before teardown, or
        it blocks writing its log.
        """
        argv = ["nsenter", f"--net={self.host.netns_path}", *_netstackd_argv()]
        env = self.host._env(extra_env)
        if log is None:
            proc = subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        else:
            with open(log, "a") as output:
                proc = subprocess.Popen(
                    argv, env=env, stdout=output, stderr=subprocess.STDOUT, text=True
                )
        self.procs.append(proc)
        return proc

    def wait_running(self, timeout: float = 15.0) -> dict[str, Any]:
        """Poll `netctl status` until a daemon answers; its status document."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.host.netctl("status", "--format", "json", check=False)
            if proc.returncode == 0:
                return dict(json.loads(proc.stdout))
            time.sleep(0.1)
        raise AssertionError("netstackd did not come up")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)


@dataclass
class Host:
    """A throwaway host network namespace with its own netstack state directory.

    Its netstackd (`daemons`) forwards DNS to the servers in `resolv_conf`, a file of the
    test's (empty by default), never to the machine's resolver.
    """

    name: str
    state_dir: Path
    run_dir: Path
    sandboxes: list[str] = field(default_factory=list)
    outsides: list[Outside] = field(default_factory=list)
    daemons: Daemons = field(init=False)

    def __post_init__(self) -> None:
        self.daemons = Daemons(self)
        self.resolv_conf.parent.mkdir(parents=True, exist_ok=True)
        self.resolv_conf.write_text("# test host: no upstream DNS server\n")

    @property
    def resolv_conf(self) -> Path:
        """The host resolv.conf netstackd reads its upstream servers from."""
        return self.state_dir.parent / "resolv.conf"

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.name)

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env["NETSTACK_STATE_DIR"] = str(self.state_dir)
        env["NETSTACK_RUN_DIR"] = str(self.run_dir)
        env["NETSTACK_RESOLV_CONF"] = str(self.resolv_conf)
        env.pop("NETSTACK_FAULT", None)
        if extra:
            env.update(extra)
        return env

    def netctl(
        self,
        *args: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``netctl *args`` in the host namespace; raise AssertionError if check and rc!=0."""
        argv = ["nsenter", f"--net={self.netns_path}", *_netctl_argv(), *args]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env(env),
            cwd=REPO_ROOT,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"netctl {' '.join(args)} failed (rc={proc.returncode})\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def netctl_json(self, *args: str) -> Any:
        """Run ``netctl *args --format json`` and parse its output."""
        proc = self.netctl(*args, "--format", "json")
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(
                f"netctl {' '.join(args)} --format json printed invalid JSON: {exc}\n{proc.stdout}"
            ) from exc

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run any command in the host namespace (via nsenter)."""
        return _run(["nsenter", f"--net={self.netns_path}", *argv], check=check, timeout=timeout)

    def ip_json(self, *args: str) -> Any:
        """``ip -j *args`` in the host namespace, parsed."""
        out = self.run("ip", "-j", *args).stdout
        return json.loads(out) if out.strip() else []

    def sandbox(self, suffix: str) -> str:
        """Create sandbox ``<host>-<suffix>`` with netctl; it is removed at teardown."""
        name = f"{self.name}-{suffix}"
        self.sandboxes.append(name)
        self.netctl("sandbox", "create", name)
        return name

    def in_sandbox(
        self, sandbox: str, *argv: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside a sandbox namespace (``ip netns exec``)."""
        return _run(["ip", "netns", "exec", sandbox, *argv], check=check, timeout=timeout)

    def sandbox_ip_json(self, sandbox: str, *args: str) -> Any:
        """``ip -j *args`` inside a sandbox, parsed."""
        out = _run(["ip", "-n", sandbox, "-j", *args]).stdout
        return json.loads(out) if out.strip() else []

    def links(self) -> list[str]:
        """Interface names in the host namespace."""
        return [link["ifname"] for link in self.ip_json("link", "show")]

    def link_mac(self, ifname: str) -> str:
        """MAC address of an interface in the host namespace."""
        return str(self.ip_json("link", "show", "dev", ifname)[0]["address"])

    def nft_ruleset(self) -> dict[str, Any]:
        """Parsed ``nft -j list ruleset`` of the host namespace."""
        out = self.run("nft", "-j", "list", "ruleset").stdout
        return json.loads(out) if out.strip() else {"nftables": []}

    def outside(self, suffix: str = "out") -> Outside:
        """Create the "internet" namespace ``<host>-<suffix>`` joined by veth ``nstup0``.

        Host side 192.0.2.1/24 + 2001:db8:99::1/64; outside 192.0.2.2/24 +
        2001:db8:99::2/64. The host gets default routes via the outside; the outside
        has no route beyond its own subnets. Only one outside per host.
        """
        assert not self.outsides, "only one outside namespace per host"
        out = Outside(name=f"{self.name}-{suffix}")
        _run(["ip", "netns", "add", out.name])
        self.outsides.append(out)
        host_ip = ["ip", "-n", self.name]
        out_ip = ["ip", "-n", out.name]
        _run([*host_ip, "link", "add", out.host_iface, "type", "veth", "peer", "name",
              out.iface, "netns", out.name])  # fmt: skip
        _run([*out_ip, "link", "set", "lo", "up"])
        _run([*host_ip, "addr", "add", f"{out.host_addr4}/24", "dev", out.host_iface])
        _run([*host_ip, "addr", "add", f"{out.host_addr6}/64", "dev", out.host_iface, "nodad"])
        _run([*out_ip, "addr", "add", f"{out.addr4}/24", "dev", out.iface])
        _run([*out_ip, "addr", "add", f"{out.addr6}/64", "dev", out.iface, "nodad"])
        _run([*host_ip, "link", "set", out.host_iface, "up"])
        _run([*out_ip, "link", "set", out.iface, "up"])
        _run([*host_ip, "route", "add", "default", "via", out.addr4])
        _run([*host_ip, "-6", "route", "add", "default", "via", out.addr6])
        # Static neighbours: IPv6 neighbour discovery on a fresh link loses its first
        # solicitation (about 1 s of delay); traffic across this link must flow at once.
        host_mac = self.link_mac(out.host_iface)
        out_mac = json.loads(out.run("ip", "-j", "link", "show", "dev", out.iface).stdout)[0][
            "address"
        ]
        for addr in (out.addr4, out.addr6):
            _run([*host_ip, "neigh", "replace", addr, "lladdr", out_mac, "dev", out.host_iface,
                  "nud", "permanent"])  # fmt: skip
        for addr in (out.host_addr4, out.host_addr6):
            _run([*out_ip, "neigh", "replace", addr, "lladdr", host_mac, "dev", out.iface,
                  "nud", "permanent"])  # fmt: skip
        self._wait_reachable(out.addr4, out.addr6)
        return out

    def _wait_reachable(self, *addresses: str, timeout: float = 10.0) -> None:
        """Poll ping from the host namespace until every address answers."""
        deadline = time.monotonic() + timeout
        for addr in addresses:
            while True:
                proc = self.run("ping", "-c1", "-W0.2", addr, check=False)
                if proc.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{addr} unreachable from host {self.name}: {proc.stdout}")


def _create_host(state_root: Path) -> Host:
    """Reserve a name and build the host namespace; undo everything if a step fails."""
    name = _reserve_host_name()
    state_dir = state_root / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-run-"))
    host = Host(name=name, state_dir=state_dir, run_dir=run_dir)
    try:
        _run(["ip", "netns", "add", name])
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        host.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    except BaseException:
        _destroy_host(host)
        raise
    return host


def _destroy_host(host: Host) -> None:
    """Kill processes in the host's namespaces, delete them, drop the reservation.

    If a namespace survives, the owner file stays, so a later sweep removes it.
    """
    try:
        host.daemons.stop_all()
        _remove_host_namespaces(host.name, kill=True)
    finally:
        shutil.rmtree(host.run_dir, ignore_errors=True)
        left = [n for n in list_netns() if n == host.name or n.startswith(f"{host.name}-")]
        if not left:
            with contextlib.suppress(FileNotFoundError):
                (OWNER_DIR / f"{host.name}.owner").unlink()


@pytest.fixture
def host_factory(tmp_path: Path) -> Iterator[Callable[[], Host]]:
    """Make extra host namespaces (e.g. for two-host tests); all removed at teardown."""
    reason = _needs_root_reason()
    if reason:
        pytest.skip(reason)
    made: list[Host] = []

    def make() -> Host:
        made_host = _create_host(tmp_path / f"host{len(made)}")
        made.append(made_host)
        return made_host

    try:
        yield make
    finally:
        for made_host in reversed(made):
            _destroy_host(made_host)


@pytest.fixture
def host(host_factory: Callable[[], Host]) -> Host:
    """A fresh host namespace (lo up, forwarding on) with its own state directory."""
    return host_factory()
