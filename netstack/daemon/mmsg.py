"""Batched UDP I/O: `recvmmsg`/`sendmmsg` through libc, for the resolver's hot path.

Python's socket module has no batched calls, and under load the resolver's cost is the two
syscalls per query (the reply itself is a cached bytes object). Here one `recvmmsg` takes
every datagram waiting on the socket, up to `batch`, and one `sendmmsg` sends every reply
to them, so a busy socket pays two syscalls per batch instead of two per query.

The message headers, address slots and buffers are allocated once. Receive slot i and
send slot i share one address slot, so a reply to datagram i needs no address copied
unless an earlier datagram of the batch got no reply. Datagrams longer than `size` are
dropped (a DNS query over UDP is a few hundred bytes). Only for Linux on 64-bit machines
(the header layout below); `available()` says whether this one qualifies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct
import sys
from functools import cache

_MSG_WAITFORONE = 0x10000
_MSG_TRUNC = 0x20
_ADDR_SIZE = 28  # sockaddr_in6; a sockaddr_in fits too
_HEADER = 64  # struct mmsghdr on 64-bit Linux: msghdr (56) + msg_len + padding
_IOVEC = 16
# struct mmsghdr: msg_name @0, msg_namelen @8, msg_iov @16, msg_iovlen @24, msg_control
# @32, msg_controllen @40, msg_flags @48, msg_len @56
_FLAGS_AND_LEN = "48xi4xI4x"


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("hdr", _Msghdr), ("len", ctypes.c_uint32))


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    if ctypes.sizeof(_Mmsghdr) != _HEADER or ctypes.sizeof(_Iovec) != _IOVEC:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
    send.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    recv.restype = send.restype = ctypes.c_int
    return libc


def available() -> bool:
    """Whether batched I/O works on this machine (else use recvfrom/sendto)."""
    return _libc() is not None


class BatchSocket:
    """recvmmsg/sendmmsg on one UDP socket, with buffers allocated once.

    Use: `count = recv()`, then for i in range(count): `datagram(i)`, `address(i)`, and
    `reply(i, data)` for each one to answer; then `flush()` sends the replies in one call.
    Not thread-safe: one per serving thread.
    """

    def __init__(self, sock: socket.socket, batch: int = 32, size: int = 2048) -> None:
        libc = _libc()
        if libc is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available here")
        self.sock = sock
        self.batch = batch
        self.size = size
        self._recvmmsg, self._sendmmsg = libc.recvmmsg, libc.sendmmsg
        self._names = (ctypes.c_char * (_ADDR_SIZE * batch))()
        self._rbuf = (ctypes.c_char * (size * batch))()
        self._sbuf = (ctypes.c_char * (size * batch))()
        self._riov = (_Iovec * batch)()
        self._siov = (_Iovec * batch)()
        self._rhdr = (_Mmsghdr * batch)()
        self._shdr = (_Mmsghdr * batch)()
        names, rbuf, sbuf = map(ctypes.addressof, (self._names, self._rbuf, self._sbuf))
        for i in range(batch):
            self._riov[i].base, self._riov[i].len = rbuf + i * size, size
            self._siov[i].base = sbuf + i * size
            for hdrs, iovs in ((self._rhdr, self._riov), (self._shdr, self._siov)):
                hdr = hdrs[i].hdr
                hdr.name, hdr.namelen = names + i * _ADDR_SIZE, _ADDR_SIZE
                hdr.iov, hdr.iovlen = ctypes.addressof(iovs[i]), 1
        self._names_mv = memoryview(self._names).cast("B")
        self._rbuf_mv = memoryview(self._rbuf).cast("B")
        self._sbuf_mv = memoryview(self._sbuf).cast("B")
        self._siov_mv = memoryview(self._siov).cast("B")
        self._received = [struct.Struct(_FLAGS_AND_LEN * n) for n in range(batch + 1)]
        self._lengths: tuple[int, ...] = ()
        self._pending = 0
        self._fd = sock.fileno()

    def recv(self) -> int:
        """Block until at least one datagram arrives; how many were taken (0 when the socket
        was shut down). Raises OSError on failure."""
        self._pending = 0
        count: int = self._recvmmsg(self._fd, self._rhdr, self.batch, _MSG_WAITFORONE, None)
        if count < 0:
            code = ctypes.get_errno()
            raise OSError(code, errno.errorcode.get(code, str(code)))
        self._lengths = self._received[count].unpack_from(self._rhdr)
        return count

    def datagram(self, i: int) -> bytes | None:
        """Datagram i of the last `recv`, or None if it was longer than `size`."""
        flags, length = self._lengths[2 * i], self._lengths[2 * i + 1]
        if flags & _MSG_TRUNC:
            return None
        start = i * self.size
        return self._rbuf_mv[start : start + length].tobytes()

    def address(self, i: int) -> bytes:
        """The sender of datagram i, as raw sockaddr bytes (a dictionary key)."""
        start = i * _ADDR_SIZE
        return self._names_mv[start : start + _ADDR_SIZE].tobytes()

    def reply(self, i: int, data: bytes) -> bool:
        """Queue `data` for the sender of datagram i (replies go in receive order). False,
        and nothing queued, if it is longer than `size`: send that one yourself."""
        if len(data) > self.size:
            return False
        j = self._pending
        if j != i:  # an earlier datagram got no reply: move this sender's address down
            self._names_mv[j * _ADDR_SIZE : (j + 1) * _ADDR_SIZE] = self._names_mv[
                i * _ADDR_SIZE : (i + 1) * _ADDR_SIZE
            ]
        start = j * self.size
        self._sbuf_mv[start : start + len(data)] = data
        struct.pack_into("Q", self._siov_mv, j * _IOVEC + 8, len(data))
        self._pending = j + 1
        return True

    def flush(self) -> int:
        """Send the queued replies; how many went out. A reply the kernel refuses (e.g. no
        route back) is skipped, as `sendto` failing for it would be."""
        count, sent, first = self._pending, 0, 0
        self._pending = 0
        while first < count:
            done = self._sendmmsg(
                self._fd, ctypes.byref(self._shdr, first * _HEADER), count - first, 0
            )
            if done <= 0:
                first += 1  # the first one failed: skip it, send the rest
            else:
                sent += done
                first += done
        return sent


def sender(raw: bytes) -> tuple[str, int]:
    """(ip, port) from raw sockaddr bytes as `BatchSocket.address` gives them."""
    family = int.from_bytes(raw[:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
