"""netstackd entry point: one daemon per state directory, clean shutdown on SIGTERM.

State lives in the store (NETSTACK_STATE_DIR), so a restart loses nothing; runtime files
(the API socket) live in NETSTACK_RUN_DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from netstack import __version__
from netstack.cni.plugin import run as cni_run
from netstack.controller import Controller
from netstack.daemon.api import MAX_REQUEST, Api
from netstack.daemon.dns_server import DnsServer, dns_config
from netstack.daemon.forwarder import HostServers, UpstreamPolicy
from netstack.daemon.mirror import StoreMirror, StoreView
from netstack.daemon.paths import LOCK_NAME, run_dir, socket_path
from netstack.daemon.relay import LoopbackRelay, RelayChange, RelayPlanner
from netstack.daemon.reloads import ReloadScheduler, wait_until_idle
from netstack.dns import Records, RecordsBuilder
from netstack.dockerplugin.server import PluginServer, plugin_dir, plugin_socket
from netstack.drivers.bridge import BridgeDriver
from netstack.drivers.bridge.spares import VethSpares
from netstack.errors import Conflict, InvalidArgument, NetstackError
from netstack.kernel import coexist, sockets
from netstack.kernel.nftables import Nftables
from netstack.kernel.reaper import LinkReaper
from netstack.model import IPAddress
from netstack.resolvconf import host_resolv_conf
from netstack.store import Store, state_dir

log = logging.getLogger("netstackd")

WATCH_INTERVAL = 0.02
PLUGIN_RELOAD_QUIET = 0.03
"""Docker's calls come in bursts (RequestAddress, CreateEndpoint, Join a few ms apart) with
dockerd waiting on each: one reload after the burst, rather than one per call competing for
the CPU (and the GIL) with the burst's own work, e.g. the veth a worker thread is making for
the Join."""
CNI_RELOAD_QUIET = 0.01  # a runtime's next exec follows the last reply within a few ms
RELOAD_MAX_WAIT = 0.08  # records follow a change within 100 ms, even under a stream of calls
SETTLE_MAX_WAIT = 10.0  # seconds `settle` waits by default
SETTLE_MAX_WAIT_LIMIT = 60.0
COEXIST_INTERVAL = 1.0  # how soon a dockerd started later stops dropping netstack traffic


def acquire_lock(directory: Path) -> IO[str]:
    """Hold an exclusive lock on the state directory for the daemon's lifetime.

    Raises Conflict when another netstackd holds it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_NAME, "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise Conflict(
            f"netstackd already runs for state directory {directory} (pid {holder}); "
            "stop it first or use another NETSTACK_STATE_DIR"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@dataclass(frozen=True)
class StoreState:
    """What one reload read from the store, ready for each part of the daemon."""

    bridges: list[str]
    dns: tuple[Records, UpstreamPolicy, list[IPAddress]]
    relay: RelayChange | None  # None: as it is
    networks: int
    endpoints: int


class Daemon:
    """The daemon's parts and their lifetime."""

    def __init__(self, state: Path, runtime: Path, docker_plugin: Path | None = None) -> None:
        self.state = state
        self.docker_plugin = docker_plugin  # the plugin socket to serve, if any
        self.runtime = runtime
        self.started = time.time()
        self.store = Store(state)
        self.dns = DnsServer(HostServers(host_resolv_conf()))
        self.relay = LoopbackRelay()
        self.generation = 0
        self._records = RecordsBuilder()  # these two: used by one reload at a time
        self._relay_plan = RelayPlanner()
        self._mirror = StoreMirror()
        self._seen_version: int | None = None
        self.api = Api()
        self.api.register("status", self.status)
        self.api.register("reload", self.reload_op)
        self.api.register("cni", self.cni_op)
        self.api.register("settle", self.settle_op)
        self._workers = threading.local()
        self.reaper = LinkReaper()  # veths are deleted after the reply, not before
        self.spares = VethSpares()  # veths made ahead for Docker's Joins
        self.plugin = PluginServer(self._controller, self._plugin_changed, self._plugin_called)
        self.reloads = ReloadScheduler(
            self.reload, self._calls_in_flight, RELOAD_MAX_WAIT, collect_garbage
        )
        self._reload_lock = asyncio.Lock()
        self._ops_in_flight = 0  # CNI calls being served: each reloads once it is answered
        self.bridges: list[str] = []
        self._nft: Nftables | None = None
        self.stopping = asyncio.Event()

    async def status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "state_dir": str(self.state),
            "run_dir": str(self.runtime),
            "uptime": round(time.time() - self.started, 3),
            "dns": self.dns.status(),
            "relay": [str(target) for target in self.relay.listening()],
            "docker_plugin": None if self.docker_plugin is None else str(self.docker_plugin),
        }

    async def reload_op(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.reload()
        return {"generation": self.generation}

    async def settle_op(self, request: dict[str, Any]) -> dict[str, Any]:
        """Wait until the work that follows calls is done: no call being served, the store
        read (records, relay and DNS in line with it) and no link left to delete.

        For benchmarks and tests that must not time one call beside the background work of
        the one before (on a real host, one netstackd serves every network; a benchmark
        running a netstackd per series would otherwise time one series' call beside
        another daemon's reload). `max_wait`: seconds, default 10, at most 60.
        """
        max_wait = request.get("max_wait", SETTLE_MAX_WAIT)
        if (
            isinstance(max_wait, bool)
            or not isinstance(max_wait, int | float)
            or not 0 < max_wait <= SETTLE_MAX_WAIT_LIMIT
        ):
            raise InvalidArgument(
                f"settle: 'max_wait' must be a number of seconds in (0, {SETTLE_MAX_WAIT_LIMIT:g}]"
            )
        waited = await wait_until_idle(self._background_work, float(max_wait))
        return {"generation": self.generation, "waited_ms": round(waited * 1e3, 3)}

    def _background_work(self) -> str:
        """What the daemon is still doing after its calls ("" when nothing)."""
        work = []
        if self._calls_in_flight():
            work.append("calls being served")
        if self.reloads.pending() or self._reload_lock.locked() or self._store_unread():
            work.append("store changes not yet read")
        if queued := self.reaper.pending():
            work.append(f"{queued} link(s) being deleted")
        return ", ".join(work)

    async def cni_op(self, request: dict[str, Any]) -> dict[str, Any]:
        """The CNI plugin's fast path: run its request here, where everything is loaded.

        Runs in a worker thread (the controller blocks on the kernel and SQLite), with a
        controller per thread (SQLite connections stay in their thread). Answers exactly
        what the plugin would print and exit with.
        """
        env, stdin = request.get("env"), request.get("stdin")
        if not isinstance(env, dict) or not isinstance(stdin, str):
            raise InvalidArgument("cni needs 'env' (an object) and 'stdin' (a string)")
        variables = {str(k): str(v) for k, v in env.items()}
        loop = asyncio.get_running_loop()
        self._ops_in_flight += 1
        try:
            code, stdout = await loop.run_in_executor(
                None, cni_run, variables, stdin.encode("utf-8", "surrogateescape"), self._controller
            )
        finally:
            self._ops_in_flight -= 1
        if code == 0:
            self.reloads.changed(CNI_RELOAD_QUIET)  # records and relay follow, after the burst
        return {"code": code, "stdout": stdout}

    def _controller(self) -> Controller:
        controller: Controller | None = getattr(self._workers, "controller", None)
        if controller is None:
            driver = BridgeDriver(self.reaper, self.spares)
            controller = Controller(
                Store(self.state), {"bridge": driver}, busy_on_host=self._busy_on_host
            )
            self._workers.controller = controller
        return controller

    def _busy_on_host(self, protocol: str, among: Sequence[int] | None) -> set[int]:
        """Host ports bound by processes, less the relay's own listeners (in a worker
        thread: `LoopbackRelay.own_ports` says why)."""
        return sockets.bound_ports(protocol, among) - self.relay.own_ports(protocol, among)

    async def reload(self) -> None:
        """Re-read the store and bring every part in line with it.

        Reading the store and building the records is CPU work (~0.5 ms at 500 endpoints
        with a port each on a quiet machine here, the records' copies the part that still
        grows; see docs/design.md, "Reloads"), so it runs in a worker thread: on the loop
        it held back every reply due meanwhile. Reloads run one at a time, so records
        never go back in time.
        """
        async with self._reload_lock:
            self._seen_version = self.store.data_version()
            self.generation += 1
            loop = asyncio.get_running_loop()
            state = await loop.run_in_executor(None, self._read_state, self.generation)
            try:
                if state.bridges != self.bridges:  # else the periodic sync keeps up (dockerd)
                    self.bridges = state.bridges
                    self._sync_coexist()
                await self.dns.update(*state.dns)
                if state.relay is not None:
                    await self.relay.apply(state.relay)
            except BaseException:
                self._mirror.forget()  # a change read but not applied: read afresh next time
                raise
            log.debug(
                "state generation %d: %d networks, %d endpoints",
                self.generation,
                state.networks,
                state.endpoints,
            )

    def _read_state(self, generation: int) -> StoreState:
        """In a worker thread: what the DNS server, the relay and coexistence need, from
        the endpoints written since the last reload (`StoreMirror`)."""
        try:
            view = self._mirror.read(self._controller().store)
            return StoreState(
                bridges=[
                    BridgeDriver.options_of(network).bridge_name
                    for network in view.networks
                    if network.driver == BridgeDriver.name
                ],
                dns=dns_config(view.networks, view.rows, generation, self._records, view.changes),
                relay=self._relay_change(view),
                networks=len(view.networks),
                endpoints=len(view.rows),
            )
        except BaseException:
            self._mirror.forget()  # the builder may be half-way: start afresh next time
            raise

    def _relay_change(self, view: StoreView) -> RelayChange | None:
        if not view.relay_changed:
            return None
        if view.published_changes is None:
            return self._relay_plan.full(view.published)
        return self._relay_plan.change(view.published_changes)

    def _store_unread(self) -> bool:
        """Whether another connection committed since the last reload began reading."""
        return self.store.data_version() != self._seen_version

    def _plugin_changed(self) -> None:
        self.reloads.changed(PLUGIN_RELOAD_QUIET)

    def _plugin_called(self) -> None:
        # measured: dockerd's two EndpointOperInfo come ~25 ms after its Join, and a
        # reload 30 ms after the Join landed on them (~1 ms each)
        self.reloads.postpone()

    def _calls_in_flight(self) -> bool:
        return bool(self._ops_in_flight or self.plugin.calls_in_flight)

    async def watch(self) -> None:
        """Follow the store: netctl and other writers commit there, the daemon reloads.

        SQLite's data_version changes on every commit by another connection; probing it
        costs microseconds, so polling every `WATCH_INTERVAL` keeps records within 100 ms
        of a connect or disconnect without any notification channel.
        """
        while True:
            try:
                # A reload on its way reads the latest state anyway, and a CNI or plugin
                # call being served reloads once answered: reloading meanwhile (its own
                # commit shows here) only competed with it for the CPU (measured: a CNI ADD
                # at the 300th container waited ~20 ms for such a reload).
                if (
                    self._store_unread()
                    and not self.reloads.pending()
                    and not self._calls_in_flight()
                ):
                    await self.reload()
            except Exception:  # a bad row or a locked database must not stop the watch
                log.exception("reload failed; retrying")
                await asyncio.sleep(1)
            await asyncio.sleep(WATCH_INTERVAL)

    async def coexist(self) -> None:
        """Keep dockerd's DOCKER-USER chains accepting netstack's bridges (kernel/coexist),
        also when dockerd starts or restarts after netstackd."""
        while True:
            self._sync_coexist()
            await asyncio.sleep(COEXIST_INTERVAL)

    def _sync_coexist(self) -> None:
        try:
            self._nft = self._nft or Nftables()
            coexist.sync(self.bridges, self._nft)
        except Exception:  # nftables busy or missing: try again next round
            log.exception("DOCKER-USER sync failed; retrying")

    async def run(self) -> None:
        sock = socket_path()
        self.runtime.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)  # left by a killed daemon; the lock proves it is dead
        server = await asyncio.start_unix_server(
            self.api.serve_connection, path=str(sock), limit=MAX_REQUEST
        )
        os.chmod(sock, 0o600)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        log.info("netstackd %s serving on %s (state %s)", __version__, sock, self.state)
        await self.reload()
        with contextlib.suppress(NetstackError):  # a killed daemon's spares
            await loop.run_in_executor(None, VethSpares.sweep)
        quiet_garbage_collector()
        watcher = asyncio.create_task(self.watch())
        coexisting = asyncio.create_task(self.coexist())
        try:
            if self.docker_plugin is not None:
                await self.plugin.start(self.docker_plugin)
            await self.stopping.wait()
        finally:
            watcher.cancel()
            coexisting.cancel()
            await self.plugin.close()
            await self.dns.close()
            await self.relay.close()
            await asyncio.get_running_loop().run_in_executor(None, self.spares.close)
            await asyncio.get_running_loop().run_in_executor(None, self.reaper.close)
            self.store.close()
            server.close()
            await server.wait_closed()
            sock.unlink(missing_ok=True)
            log.info("netstackd stopped")


GC_THRESHOLDS = (50_000, 20, 100)
GC_QUIET_MINIMUM = 1000  # young objects worth a collection in a quiet moment


def collect_garbage() -> None:
    """Collect the young generations now, between calls (ReloadScheduler, in a quiet moment).

    pyroute2 leaves ~900 objects in reference cycles per connect (netlink messages and
    their request processors), only ever freed by the cyclic collector, at ~1.5 µs each
    here: left to the 50k threshold, one collection paused the daemon for 60-130 ms in the
    middle of whatever call triggered it. After each burst of calls it takes 1-7 ms.
    """
    if gc.get_count()[0] >= GC_QUIET_MINIMUM:
        gc.collect(1)


def quiet_garbage_collector() -> None:
    """Keep the cyclic garbage collector's pauses out of the calls netstackd serves.

    Measured here during benchmarks/docker_run.py with Python's defaults: 20 pauses over
    0.3 ms in 25 s (one generation-2 pass of 39 ms, generation-1 passes of 3-4 ms), each
    one landing on whatever call was being served. Everything made at start-up (modules,
    pyroute2's tables) is moved out of the collector's sight for good (`gc.freeze`), and
    the youngest generation is collected after 50k allocations rather than 700: the same
    run then saw none in the measured calls.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netstackd", description="netstack daemon")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "--docker-plugin",
        metavar="NAME",
        nargs="?",
        const="netstack",
        default=os.environ.get("NETSTACK_DOCKER_PLUGIN") or None,
        help="serve Docker's network and IPAM plugin API as NAME (default name: netstack) on "
        "DIR/NAME.sock (env NETSTACK_DOCKER_PLUGIN)",
    )
    parser.add_argument(
        "--docker-plugin-dir",
        metavar="DIR",
        type=Path,
        default=None,
        help="where Docker finds plugins (default: $NETSTACK_DOCKER_PLUGIN_DIR or "
        "/run/docker/plugins)",
    )
    args = parser.parse_args(argv)
    docker_plugin = None
    if args.docker_plugin:
        if "/" in args.docker_plugin or args.docker_plugin.startswith("."):
            parser.error(f"--docker-plugin {args.docker_plugin!r}: give a name, not a path")
        docker_plugin = plugin_socket(args.docker_plugin_dir or plugin_dir(), args.docker_plugin)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        lock = acquire_lock(state_dir())
    except (NetstackError, OSError) as exc:
        print(f"netstackd: error: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(Daemon(state_dir(), run_dir(), docker_plugin).run())
    except NetstackError as exc:
        print(f"netstackd: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"netstackd: error: cannot serve: {exc}", file=sys.stderr)
        return 1
    finally:
        lock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
