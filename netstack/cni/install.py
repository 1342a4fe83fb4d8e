"""`netctl cni install`: the plugin executable in a CNI bin dir, example conflists.

The executable is named ``netstack`` (a configuration's ``"type": "netstack"``). It is a
small Python script bound to the interpreter netstack is installed in, with the state
and run directories of the installing environment baked in as defaults (runtimes exec
plugins with a bare environment), and it starts `netstack.cni.main`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from netstack.cni.spec import NETWORK_NAME
from netstack.errors import InvalidArgument, KernelError

PLUGIN_NAME = "netstack"
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


def install(bin_dir: Path, conf_dir: Path | None, networks: list[str]) -> list[Path]:
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
    _write(written[0], plugin_script(sys.executable, dict(os.environ), root), 0o755)
    for network in networks:
        assert conf_dir is not None
        path = conf_dir / f"10-{network}.conflist"
        _write(path, json.dumps(example_conflist(network), indent=2) + "\n", 0o644)
        written.append(path)
    return written
