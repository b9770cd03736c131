"""``_listener``: the listener socket (mode, path, closing, iteration) and
who it hands invitations to. End-to-end attach with real client processes
is in ``test_attach.py``."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

import meshipc
from meshipc import ConnectError, Mesh, MeshError, MeshNameInUse
from meshipc._join import read_invitation
from meshipc._listener import ListenerStats
from relutil import wait_until

#: Bound on any single step.
T = 10.0
#: TTL for invitations that a test leaves unused on purpose.
SHORT_TTL = 1.0


def test_earlier_names_still_work() -> None:
    with pytest.warns(DeprecationWarning, match="use meshipc.Admission"):
        assert meshipc.Connection is meshipc.Admission
    with pytest.warns(DeprecationWarning, match="use meshipc.Attachment"):
        assert meshipc.ClientConnection is meshipc.Attachment


async def test_listen_has_no_option_to_invite_other_uids(runtime_dir: Path) -> None:
    """Other users' processes could never join (the node sockets are ours
    alone): the listener offers no way to hand them the secret."""
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        with pytest.raises(TypeError):
            await mesh.listen(allowed_uids={os.getuid() + 1})  # type: ignore[call-arg]
        assert not (mesh.directory / "listen.sock").exists()


async def test_listener_socket_mode_close_and_iteration(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        path = runtime_dir / "l.sock"
        listener = await mesh.listen(path=path, invitation_ttl=SHORT_TTL)
        default = await mesh.listen()
        for p in (path, default.path):
            st = os.lstat(p)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.getuid()

        # a second listener on a live path is refused, and the first one kept
        with pytest.raises(MeshNameInUse):
            await mesh.listen(path=default.path)
        assert stat.S_ISSOCK(os.lstat(default.path).st_mode)
        # a path holding something else is refused and kept
        other = runtime_dir / "other"
        other.write_text("keep")
        with pytest.raises(MeshError):
            await mesh.listen(path=other)
        assert other.read_text() == "keep"

        got: list[meshipc.Admission] = []
        first = asyncio.Event()

        async def collect() -> None:
            async for conn in listener:
                got.append(conn)
                first.set()

        it = asyncio.create_task(collect())
        async with meshipc.connect(path) as cc:
            await asyncio.wait_for(first.wait(), T)
            assert got[0].peer.pid == os.getpid()
            cc.port.send("x")
            assert await asyncio.wait_for(got[0].port.recv(), T) == "x"

        listener.close()
        assert not os.path.lexists(path)
        await asyncio.wait_for(it, T)  # `async for` ended
        assert len(got) == 1
        listener.close()  # idempotent
        with pytest.raises(MeshError):
            await asyncio.wait_for(listener.accept(), T)
        with pytest.raises(ConnectError):
            async with meshipc.connect(path):
                pass

        # a stale socket of ours at the path is replaced by a new listener
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.fspath(path))
        s.close()
        again = await mesh.listen(path=path)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        again.close()
        assert not os.path.lexists(path)

        default_path = default.path
    # closing the mesh closes its listeners
    assert not os.path.lexists(default_path)
    assert not os.path.lexists(mesh.directory)


async def test_listener_closed_while_accept_waits(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        waiting = asyncio.create_task(listener.accept())
        iterating = asyncio.create_task(anext(aiter(listener), None))
        await asyncio.sleep(0)  # one loop pass: both tasks now wait in the queue
        listener.close()
        with pytest.raises(MeshError):
            await asyncio.wait_for(waiting, T)
        assert await asyncio.wait_for(iterating, T) is None


async def test_stats_follow_invitations_from_given_to_used(runtime_dir: Path) -> None:
    """``Listener.stats()`` and ``Mesh.stats()``: an invitation given is
    outstanding until its client joins; a client that never joins keeps one
    outstanding (and the node still expects it)."""
    with pytest.raises(MeshError, match="not entered"):
        Mesh(runtime_dir=runtime_dir).stats()
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        assert listener.stats() == ListenerStats(
            given=0,
            outstanding=0,
            withdrawn=0,
            refused=0,
            left_early=0,
            queued=0,
            acceptor=listener.stats().acceptor,
            closed=False,
        )
        async with meshipc.connect(listener.path, timeout=T) as conn:
            admission = await asyncio.wait_for(listener.accept(), T)
            admission.port.send("hi")
            assert await asyncio.wait_for(conn.port.recv(), T) == "hi"
            stats = listener.stats()
            assert (stats.given, stats.outstanding, stats.queued) == (1, 0, 0)
            assert stats.acceptor is not None and stats.acceptor.accepted == 1
        unused = await asyncio.wait_for(read_invitation(listener.path), T)
        await wait_until(lambda: listener.stats().queued == 1, "the admission to be queued")
        stats = mesh.stats()
        assert stats.listeners == (listener.stats(),) and stats.workers == 0
        assert (stats.listeners[0].given, stats.listeners[0].outstanding) == (2, 1)
        assert stats.node.invited == 1 and stats.node.attached == 1
        assert mesh._node.is_invited(bytes(unused.node))
        # a client that hangs up before its invitation is written: counted, and
        # its invitation forgotten at once (nobody can use it)
        with socket.socket(socket.AF_UNIX) as quitter:
            quitter.connect(os.fspath(listener.path))
        await wait_until(lambda: listener.stats().left_early == 1, "the listener to see the client go")
        stats = listener.stats()
        assert (stats.given, stats.outstanding, mesh.stats().node.invited) == (2, 1, 1)
    # closed: the admission not taken yet can still be (then accept() raises)
    assert listener.stats().closed and listener.stats().queued == 1
