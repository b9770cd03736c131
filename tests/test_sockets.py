"""``meshipc._sockets``: exact reads, private listening sockets, probing a
socket path, peer credentials, the accept loop's caps and its rate-limited
log."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import types
from pathlib import Path
from typing import Any

import pytest

import meshipc._sockets
from meshipc import MeshError
from meshipc._sockets import (
    MAX_PENDING,
    Acceptor,
    AcceptorStats,
    PeerCred,
    RateLimitedLog,
    StreamEnded,
    is_socket_alive,
    listen_private,
    recv_exact,
)
from relutil import wait_until

T = 10.0


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


# ---------------------------------------------------------------- recv_exact


async def test_recv_exact_gathers_pieces_and_leaves_the_rest() -> None:
    loop = asyncio.get_running_loop()
    a, b = pair()
    with a, b:

        async def dribble() -> None:
            for piece in (b"ab", b"cde", b"fgh"):
                await loop.sock_sendall(b, piece)
                await asyncio.sleep(0)  # let the reader take this piece alone

        writer = asyncio.ensure_future(dribble())
        assert await asyncio.wait_for(recv_exact(loop, a, 6), T) == b"abcdef"
        await writer
        assert await asyncio.wait_for(recv_exact(loop, a, 2), T) == b"gh"


async def test_recv_exact_says_how_much_came_before_the_peer_left() -> None:
    loop = asyncio.get_running_loop()
    a, b = pair()
    with a:
        b.sendall(b"abc")
        b.close()
        with pytest.raises(StreamEnded) as ei:
            await asyncio.wait_for(recv_exact(loop, a, 10), T)
    assert (ei.value.received, ei.value.expected) == (3, 10)
    assert str(ei.value) == "peer closed the connection after 3 of 10 bytes"
    assert isinstance(ei.value, ConnectionError)  # handled like the read's own failures


# ---------------------------------------------------------------- listening, probing


async def test_listen_private_is_owner_only_and_non_blocking(runtime_dir: Path) -> None:
    path = runtime_dir / "s"
    s = listen_private(path, "test socket")
    with s:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert not s.getblocking()
        assert is_socket_alive(path)
    assert not is_socket_alive(path)  # a stale socket file: refused
    assert not is_socket_alive(runtime_dir / "missing")


def test_listen_private_failing_says_where_and_leaks_nothing(runtime_dir: Path) -> None:
    before = set(os.listdir("/dev/fd"))
    with pytest.raises(MeshError, match=r"cannot listen on test socket .*/nowhere/s: "):
        listen_private(runtime_dir / "nowhere" / "s", "test socket")
    assert set(os.listdir("/dev/fd")) == before


def test_peer_credentials_of_a_socket_pair_are_ours() -> None:
    a, b = socket.socketpair()
    with a, b:
        cred = PeerCred.of(a)
    assert (cred.pid, cred.uid) == (os.getpid(), os.getuid())
    assert repr(cred) == f"PeerCred(pid={os.getpid()}, uid={os.getuid()}, gid={cred.gid})"


# ---------------------------------------------------------------- Acceptor


async def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, os.fspath(path)), T)
    return s


async def test_each_connection_is_handed_over_and_released(runtime_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    lsock = listen_private(runtime_dir / "s", "test socket")
    served: list[bytes] = []

    async def serve(sock: socket.socket) -> None:
        with sock:
            served.append(await recv_exact(loop, sock, 2))

    acceptor = Acceptor(loop, lsock, lambda s: loop.create_task(serve(s)), "test")
    acceptor.start()
    clients = [await connect(runtime_dir / "s") for _ in range(5)]
    try:
        for i, c in enumerate(clients):
            await loop.sock_sendall(c, b"%02d" % i)
        await wait_until(lambda: len(served) == 5, "every connection served")
        assert sorted(served) == [b"%02d" % i for i in range(5)]
        await wait_until(lambda: acceptor.pending == 0, "every task released")
        assert acceptor.stats() == AcceptorStats(
            accepted=5, pending=0, limit=MAX_PENDING, evicted=0, out_of_fds=0, closed=False
        )
    finally:
        acceptor.close()
        lsock.close()
        for c in clients:
            c.close()
    assert acceptor.stats().closed


async def test_at_the_cap_the_oldest_silent_connection_gives_way(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meshipc._sockets, "EVICT_AFTER", 0.05)
    loop = asyncio.get_running_loop()
    lsock = listen_private(runtime_dir / "s", "test socket")
    handed: list[asyncio.Task[None]] = []

    async def silent(sock: socket.socket) -> None:
        with sock:
            await asyncio.Event().wait()  # a peer that never finishes

    def handle(sock: socket.socket) -> asyncio.Task[None]:
        handed.append(loop.create_task(silent(sock)))
        return handed[-1]

    acceptor = Acceptor(loop, lsock, handle, "test", limit=2)
    acceptor.start()
    clients = [await connect(runtime_dir / "s") for _ in range(5)]
    try:
        await wait_until(lambda: len(handed) == 5, "every connection accepted in turn")
        stats = acceptor.stats()
        assert stats.accepted == 5 and stats.pending <= stats.limit == 2
        assert stats.evicted >= 3 and stats.evicted == acceptor.evicted
        assert [t.cancelled() for t in handed[:3]] == [True, True, True]
    finally:
        acceptor.close()
        lsock.close()
        for c in clients:
            c.close()
        for t in handed:
            t.cancel()


# ---------------------------------------------------------------- RateLimitedLog


def test_repeated_warnings_are_held_back_and_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(meshipc._sockets, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    rl = RateLimitedLog(interval=0.05)

    def lines() -> list[Any]:
        return [r.getMessage() for r in caplog.records if r.name == "meshipc"]

    with caplog.at_level(logging.WARNING, logger="meshipc"):
        for i in range(5):
            rl.warning("refused", "refused %d", i)
        rl.warning("other", "another kind")
        assert lines() == ["refused 0", "another kind"]
        now[0] += 0.06  # the interval has passed
        rl.warning("refused", "refused %d", 5)
    assert lines()[-1].startswith("refused 5 (and 4 more like this in the last ")
