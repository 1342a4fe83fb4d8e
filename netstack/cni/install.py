"""`netctl cni install`: the plugin executable in a CNI bin dir, example conflists.

The executable is named ``netstack`` (a configuration's ``"type": "netstack"``), bound to
the interpreter netstack is installed in, with the state and run directories of the
installing environment baked in as defaults (runtimes exec plugins with a bare
environment). Where a C compiler is found it is `shim.c` compiled: it forwards calls to
netstackd without starting Python (a Python start costs 10-20 ms here, a C start 1 ms)
and runs the Python plugin when no daemon takes the call. Otherwise, or with
``compile=False``, it is a small Python script that starts `netstack.cni.main`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from netstack.cni.spec import NETWORK_NAME
from netstack.errors import InvalidArgument, KernelError

log = logging.getLogger(__name__)

PLUGIN_NAME = "netstack"
SHIM_SOURCE = Path(__file__).with_name("shim.c")
COMPILE_TIMEOUT = 120.0
_DEFAULTS = ("NETSTACK_STATE_DIR", "NETSTACK_RUN_DIR")


def plugin_script(python: str, env: dict[str, str], package_root: str) -> str:
    """The executable's text.

    It starts the interpreter with -S: the site machinery (site-packages, .pth files,
    an editable install's finder) costs ~25 ms here, more than the fast path's whole
    round trip to netstackd. `package_root` (where `netstack` lives) goes on sys.path by
    hand; `netstack.cni.main` runs `site.main()` itself before falling back in-process.
    """
    lines = [
        f"#!{python} -S",
        '"""netstack CNI plugin (written by `netctl cni install`)."""',
        "import os",
        "import sys",
        "",
        f"sys.path.insert(0, {package_root!r})",
    ]
    for name in _DEFAULTS:
        if env.get(name):
            lines.append(f"os.environ.setdefault({name!r}, {env[name]!r})")
    lines += [
        "from netstack.cni.main import main",
        "",
        "raise SystemExit(main())",
    ]
    return "\n".join(lines) + "\n"


# The example conflist's version: the newest one the runtimes in use can read (podman 4.3's
# libcni 1.1 and containerd 1.6 reject a 1.1.0 result). The plugin itself speaks 1.1.0 too.
CONFLIST_VERSION = "1.0.0"


def example_conflist(network: str) -> dict[str, Any]:
    """A conflist running netstack first, with the capabilities it handles itself."""
    return {
        "cniVersion": CONFLIST_VERSION,
        "name": network,
        "plugins": [
            {
                "type": PLUGIN_NAME,
                "driver": "bridge",
                "isDefaultGateway": True,
                "ipMasq": True,
                "ipam": {"type": "netstack"},
                "capabilities": {"portMappings": True, "ips": True, "mac": True, "dns": True},
            }
        ],
    }


def _write(path: Path, text: str, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text)
        temporary.chmod(mode)
        temporary.replace(path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise KernelError(f"cannot write {path}: {error.strerror or error}") from None


def c_string(text: str) -> str:
    """`text` as a C string literal: ASCII letters, digits and path characters as they
    are, every other byte as an octal escape."""
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+:@,=")
    return '"' + "".join(chr(b) if chr(b) in safe else f"\\{b:03o}" for b in text.encode()) + '"'


def shim_config(python: str, env: dict[str, str], package_root: str) -> str:
    """The header `shim.c` is compiled with (what the Python script bakes in)."""
    lines = [
        f"#define NETSTACK_PYTHON {c_string(python)}",
        f"#define NETSTACK_PACKAGE_ROOT {c_string(package_root)}",
        f"#define NETSTACK_DEFAULT_STATE_DIR {c_string(env.get('NETSTACK_STATE_DIR', ''))}",
        f"#define NETSTACK_DEFAULT_RUN_DIR {c_string(env.get('NETSTACK_RUN_DIR', ''))}",
    ]
    return "\n".join(lines) + "\n"


def compile_shim(target: Path, python: str, env: dict[str, str], package_root: str) -> bool:
    """Compile the C front into `target` (atomically); False when there is no compiler or
    it fails (logged), so the caller writes the Python script instead."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not SHIM_SOURCE.is_file():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="netstack-cni-") as scratch:
        work = Path(scratch)
        (work / "shim_config.h").write_text(shim_config(python, env, package_root))
        built = target.with_name(f".{target.name}.{os.getpid()}")
        argv = [compiler, "-O2", "-Wall", "-I", str(work), "-o", str(built), str(SHIM_SOURCE)]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            log.warning("cannot compile the CNI plugin (%s); writing the Python one", error)
            built.unlink(missing_ok=True)
            return False
        if proc.returncode != 0:
            log.warning("cannot compile the CNI plugin; writing the Python one:\n%s", proc.stderr)
            built.unlink(missing_ok=True)
            return False
        built.chmod(0o755)
        built.replace(target)
    return True


def install(
    bin_dir: Path, conf_dir: Path | None, networks: list[str], compile: bool = True
) -> list[Path]:
    """Write the plugin (and a conflist per network); the paths written."""
    for network in networks:
        if not NETWORK_NAME.fullmatch(network) or len(network) > 63:
            raise InvalidArgument(
                f"network name {network!r} is invalid: 1-63 letters, digits, '_', '.', '-'"
            )
    if networks and conf_dir is None:
        raise InvalidArgument("--network needs --conf-dir (where the .conflist files go)")
    written = [bin_dir / PLUGIN_NAME]
    root = str(Path(__file__).resolve().parents[2])  # the directory holding netstack/
    env = dict(os.environ)
    if not (compile and compile_shim(written[0], sys.executable, env, root)):
        _write(written[0], plugin_script(sys.executable, env, root), 0o755)
    for network in networks:
        assert conf_dir is not None
        path = conf_dir / f"10-{network}.conflist"
        _write(path, json.dumps(example_conflist(network), indent=2) + "\n", 0o644)
        written.append(path)
    return written
