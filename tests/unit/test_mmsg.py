"""Batched UDP I/O (recvmmsg/sendmmsg through libc), on loopback sockets."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest

from netstack.daemon import mmsg

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg/sendmmsg here")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client.bind(("127.0.0.1", 0))
    client.settimeout(2)
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def _receive_all(batch: mmsg.BatchSocket, expected: int) -> list[tuple[int, bytes | None]]:
    """(index in its batch, datagram) for `expected` datagrams, over one or more recv()."""
    got: list[tuple[int, bytes | None]] = []
    while len(got) < expected:
        count = batch.recv()
        got.extend((i, batch.datagram(i)) for i in range(count))
    return got


def test_one_batch_in_and_out_with_a_gap(pair: tuple[socket.socket, socket.socket]) -> None:
    """Five queries in one recv; replies to all but the second come back in order to the
    right sender (the gap moves the later senders' addresses down)."""
    server, client = pair
    batch = mmsg.BatchSocket(server, batch=8, size=64)
    for n in range(5):
        client.sendto(f"q{n}".encode(), server.getsockname())
    count = batch.recv()
    assert count == 5
    assert [batch.datagram(i) for i in range(count)] == [b"q0", b"q1", b"q2", b"q3", b"q4"]
    assert mmsg.sender(batch.address(0)) == client.getsockname()
    for i in range(count):
        if i != 1:
            assert batch.reply(i, f"r{i}".encode() * 3)
    assert batch.flush() == 4
    assert [client.recv(100) for _ in range(4)] == [b"r0r0r0", b"r2r2r2", b"r3r3r3", b"r4r4r4"]


def test_more_than_a_batch_and_two_senders(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    other.settimeout(2)
    try:
        batch = mmsg.BatchSocket(server, batch=4, size=64)
        for n in range(10):
            (client if n % 2 else other).sendto(bytes([n]), server.getsockname())
        received = 0
        while received < 10:
            count = batch.recv()
            assert 1 <= count <= 4
            for i in range(count):
                data = batch.datagram(i)
                assert data is not None
                want = client if data[0] % 2 else other
                assert mmsg.sender(batch.address(i)) == want.getsockname()
                batch.reply(i, b"echo" + data)
            batch.flush()
            received += count
        assert sorted(client.recv(10) for _ in range(5)) == [
            b"echo" + bytes([n]) for n in (1, 3, 5, 7, 9)
        ]
        assert sorted(other.recv(10) for _ in range(5)) == [
            b"echo" + bytes([n]) for n in (0, 2, 4, 6, 8)
        ]
    finally:
        other.close()


def test_oversized_datagrams_and_replies(pair: tuple[socket.socket, socket.socket]) -> None:
    """A datagram longer than a slot is dropped (None); a reply longer than a slot is refused
    so the caller sends it itself; nothing queued means nothing sent."""
    server, client = pair
    batch = mmsg.BatchSocket(server, batch=4, size=16)
    client.sendto(b"x" * 17, server.getsockname())
    client.sendto(b"small", server.getsockname())
    got = _receive_all(batch, 2)
    assert [data for _, data in got] == [None, b"small"]
    assert batch.reply(got[1][0], b"y" * 17) is False
    assert batch.flush() == 0


def test_ipv6_sender() -> None:
    server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        server.bind(("::1", 0))
        client.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    client.settimeout(2)
    try:
        batch = mmsg.BatchSocket(server, batch=2, size=32)
        client.sendto(b"hello", server.getsockname()[:2])
        assert batch.recv() == 1
        assert mmsg.sender(batch.address(0)) == client.getsockname()[:2]
        assert batch.reply(0, b"world")
        assert batch.flush() == 1
        assert client.recv(10) == b"world"
    finally:
        server.close()
        client.close()


def test_recv_after_shutdown_returns() -> None:
    """stop() shuts the socket down for reading: a blocked recv comes back."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        batch = mmsg.BatchSocket(sock, batch=2, size=32)
        with contextlib.suppress(OSError):  # ENOTCONN, but the socket is shut down
            sock.shutdown(socket.SHUT_RD)
        assert all(batch.datagram(i) == b"" for i in range(batch.recv()))  # must not block
    finally:
        sock.close()
