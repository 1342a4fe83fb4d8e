"""A narrated demo of netctl, inside a throwaway host namespace.

Run as root: ``python3 -m netstack.demo``. It creates a network namespace that plays the
host, so the machine's real interfaces, routes and firewall are never touched, then shows
two networks, three sandboxes, reachability, isolation and a sandbox on both networks,
and removes everything it made, even when interrupted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HOST = f"nsdemo-{os.getpid()}"


def _netctl() -> list[str]:
    beside = Path(sys.executable).with_name("netctl")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "netstack.cli"]


class Demo:
    """Runs each step as a user would and prints it."""

    def __init__(self, state_dir: str) -> None:
        self.env = dict(os.environ, NETSTACK_STATE_DIR=state_dir)
        self.sandboxes: list[str] = []

    def show(self, title: str) -> None:
        print(f"\n=== {title}")

    def sh(self, argv: list[str], *, expect_ok: bool = True, shown: str | None = None) -> bool:
        print(f"$ {shown or ' '.join(argv)}", flush=True)
        proc = subprocess.run(argv, env=self.env, text=True, capture_output=True)
        out = (proc.stdout + proc.stderr).rstrip()
        if out:
            print(out)
        if expect_ok and proc.returncode != 0:
            raise SystemExit(f"demo step failed ({proc.returncode}): {' '.join(argv)}")
        return proc.returncode == 0

    def netctl(self, *args: str) -> None:
        self.sh(
            ["nsenter", f"--net=/run/netns/{HOST}", *_netctl(), *args],
            shown="netctl " + " ".join(args),
        )

    def ping(self, sandbox: str, address: str, *, expect: bool) -> None:
        ok = self.sh(
            ["ip", "netns", "exec", sandbox, "ping", "-c", "1", "-W", "1", address],
            expect_ok=False,
            shown=f"ip netns exec {sandbox} ping -c 1 {address}",
        )
        verdict = "reachable" if ok else "unreachable"
        wanted = "reachable" if expect else "unreachable"
        print(f"--> {address} is {verdict} from {sandbox} (expected {wanted})")
        if ok != expect:
            raise SystemExit("demo: unexpected reachability result")

    def sandbox(self, suffix: str) -> str:
        name = f"{HOST}-{suffix}"
        self.netctl("sandbox", "create", name)
        self.sandboxes.append(name)
        return name


def run(demo: Demo) -> None:
    demo.show(f"a throwaway host namespace {HOST} stands in for the machine")
    demo.sh(["ip", "netns", "add", HOST])
    demo.sh(["ip", "netns", "exec", HOST, "ip", "link", "set", "lo", "up"])

    demo.show("two networks")
    demo.netctl("network", "create", "--subnet", "10.20.0.0/24", "frontend")
    demo.netctl("network", "create", "--subnet", "10.30.0.0/24", "backend")
    demo.netctl("network", "ls")

    demo.show("three sandboxes: web on frontend, db on backend, api on both")
    web, db, api = demo.sandbox("web"), demo.sandbox("db"), demo.sandbox("api")
    demo.netctl("network", "connect", "frontend", web, "--ip", "10.20.0.10")
    demo.netctl("network", "connect", "backend", db, "--ip", "10.30.0.10")
    demo.netctl("network", "connect", "frontend", api, "--ip", "10.20.0.20")
    demo.netctl("network", "connect", "backend", api, "--ip", "10.30.0.20")
    demo.netctl("sandbox", "ls")

    demo.show("reachability within a network")
    demo.ping(web, "10.20.0.20", expect=True)
    demo.ping(db, "10.30.0.20", expect=True)
    demo.ping(web, "10.20.0.1", expect=True)

    demo.show("isolation across networks")
    demo.ping(web, "10.30.0.10", expect=False)
    demo.ping(db, "10.20.0.10", expect=False)

    demo.show("api is on both networks: eth0 and eth1")
    demo.sh(
        ["ip", "netns", "exec", api, "ip", "-br", "addr"], shown=f"ip netns exec {api} ip -br addr"
    )
    demo.ping(api, "10.20.0.10", expect=True)
    demo.ping(api, "10.30.0.10", expect=True)

    demo.show("inspect")
    demo.netctl("network", "inspect", "frontend")

    demo.show("clean up")
    demo.netctl("network", "disconnect", "backend", api)
    for name in (web, db, api):
        demo.netctl("sandbox", "rm", name)
    demo.sandboxes.clear()
    demo.netctl("network", "rm", "frontend", "backend")


def cleanup(demo: Demo) -> None:
    for name in demo.sandboxes:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "del", HOST], capture_output=True)


def main() -> int:
    if os.geteuid() != 0:
        print("the demo creates network namespaces: run it as root", file=sys.stderr)
        return 1
    missing = [tool for tool in ("ip", "nsenter", "ping") if shutil.which(tool) is None]
    if missing:
        print(
            f"the demo needs {', '.join(missing)}: install iproute2, util-linux and"
            " iputils-ping (.ci/setup does)",
            file=sys.stderr,
        )
        return 1
    state_dir = tempfile.mkdtemp(prefix="netstack-demo-")
    demo = Demo(state_dir)
    try:
        run(demo)
        print("\ndemo finished: everything it made has been removed")
        return 0
    finally:
        cleanup(demo)
        shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
