"""Host ports in use by processes (kernel/sockets.bound_ports), asked of the kernel through
sock_diag (all of them, or a few through a kernel-side filter) and, as a fallback, read
from /proc/net: both must see the same sockets."""

from __future__ import annotations

import json
import sys

from conftest import Host

PROBE = """
import json, socket
from netstack.kernel import sockets
open_sockets = []
def bound(family, kind, address, port, listen=False):
    s = socket.socket(family, kind)
    s.bind((address, port))
    if listen:
        s.listen()
    open_sockets.append(s)
bound(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 31001, listen=True)
bound(socket.AF_INET6, socket.SOCK_STREAM, "::1", 31002, listen=True)
bound(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 31003)  # bound, not listening
bound(socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", 31004)
bound(socket.AF_INET6, socket.SOCK_DGRAM, "::", 31005)
client = socket.create_connection(("127.0.0.1", 31001))  # its own port is no listener
print(json.dumps({
    "diag": {p: sorted(sockets._diag_ports(p)) for p in ("tcp", "udp")},
    "proc": {p: sorted(sockets._proc_ports(p)) for p in ("tcp", "udp")},
    "bound": {p: sorted(sockets.bound_ports(p)) for p in ("tcp", "udp")},
    "among": sorted(sockets.bound_ports("tcp", [31002, 31003, 31009])),
    "among_udp": sorted(sockets.bound_ports("udp", [31005])),
    "among_many": sorted(sockets.bound_ports("tcp", range(30000, 31002))),
    "among_none": sorted(sockets.bound_ports("tcp", [])),
    "among_proc": sorted(sockets._proc_ports("tcp") & {31002, 31003, 31009}),
}))
"""


def test_sock_diag_and_proc_see_the_same_ports(host: Host) -> None:
    host.run("ip", "link", "set", "lo", "up")
    out = host.run(sys.executable, "-c", PROBE).stdout
    found = json.loads(out)
    want = {"tcp": [31001, 31002], "udp": [31004, 31005]}
    assert found["diag"] == want
    assert found["proc"] == want
    assert found["bound"] == want
    # asked about some ports only: the kernel filters (a bytecode program per request)
    assert found["among"] == found["among_proc"] == [31002]
    assert found["among_udp"] == [31005]
    assert found["among_many"] == [31001]  # over MAX_FILTERED: every port, then the subset
    assert found["among_none"] == []
