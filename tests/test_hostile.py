"""Hostile and careless peers on real sockets: floods of silent connections,
running out of descriptors, garbage, foreign credentials, oversized frames, fds
without a frame, peers that never read. Each is dropped (with a logged
reason) and the node keeps serving real clients — separate processes
running ``attach_client.py`` — throughout.

Every wait is bounded; nothing synchronizes by sleeping (``wait_until``
polls a counter that has no event)."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import meshipc
import meshipc._listener
import meshipc._node
import meshipc._sockets
from meshipc import Mesh
from meshipc._handshake import (
    AUTH_LEN,
    CHALLENGE_LEN,
    MAGIC,
    PROOF_LEN,
    ROLE_CLIENT,
    V_ACCEPT,
    V_DENIED,
    VERDICT_LEN,
    build_hello,
    new_hello,
    parse_challenge,
    parse_verdict,
)
from meshipc._join import read_invitation
from meshipc._sockets import recv_exact as recv_exact_on
from meshipc._wire import PROTOCOL_VERSION, CloseEvent, MsgEvent, encode_event
from relutil import wait_until

CLIENT = Path(__file__).with_name("attach_client.py").resolve()
T = 10.0


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@contextlib.asynccontextmanager
async def real_client(target: str, runtime_dir: str = "-") -> AsyncIterator[asyncio.subprocess.Process]:
    """``attach_client.py session``: attaches, then obeys the test; killed on the way out."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        os.fspath(CLIENT),
        "session",
        target,
        runtime_dir,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def event(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), T)
    assert line, f"client {proc.pid} exited without an event"
    ev: dict[str, Any] = json.loads(line)
    return ev


async def serve_one_client(listener: meshipc.Listener, target: str) -> None:
    """A real client process attaches, answers a call and leaves."""
    async with real_client(target) as c:
        async def find() -> meshipc.Admission:
            async for conn in listener:
                if conn.peer.pid == c.pid:
                    return conn
            raise AssertionError("listener closed")

        conn = await asyncio.wait_for(find(), T)
        assert await event(c) == {"attached": c.pid}
        conn.port.send({"op": "whoami"})
        assert await asyncio.wait_for(conn.port.recv(), T) == {"pid": c.pid, "uid": os.getuid()}
        conn.port.send({"op": "leave"})
        assert await asyncio.wait_for(c.wait(), T) == 0


def silent(path: Path, n: int) -> list[socket.socket]:
    """``n`` connections to ``path`` that never send a byte."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(os.fspath(path))
        out.append(s)
    return out


# ------------------------------------------------------- exhaustion


async def test_silent_flood_is_capped_and_a_real_client_gets_through(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many silent connections to the node socket: at most ``limit`` are
    held at once (the rest wait in the kernel's backlog), the oldest give
    their slot away, a real client attaches during the noise, and fds come
    back once it stops."""
    # the same logic as the default 128, with fewer sockets (the module's cap, read when a node starts)
    monkeypatch.setattr(meshipc._sockets, "MAX_PENDING", 8)
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()

        def acceptor() -> meshipc._sockets.AcceptorStats:
            stats = mesh.stats().node.acceptor
            assert stats is not None
            return stats

        assert acceptor().limit == 8
        monkeypatch.setattr(meshipc._sockets, "EVICT_AFTER", 0.1)  # and less waiting
        # warm-up: the event loop opens some fds of its own at its first subprocess
        await serve_one_client(listener, os.fspath(listener.path))
        baseline = open_fds()
        held = silent(Path(mesh.stats().node.path), 60)
        try:
            await wait_until(lambda: acceptor().pending == 8, "the cap to be reached")
            await serve_one_client(listener, os.fspath(listener.path))
            assert acceptor().pending <= 8
            assert acceptor().evicted >= 1
        finally:
            for s in held:
                s.close()
        # once the noise stops, everything it held is given back
        await wait_until(lambda: acceptor().pending == 0, "the silent connections to be dropped")
        await wait_until(lambda: open_fds() <= baseline, f"fds back to baseline {sorted(baseline)}")
        await serve_one_client(listener, os.fspath(listener.path))


FD_SERVICE = """
import asyncio, json, logging, resource, sys, meshipc, meshipc._sockets
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
# one line per kind per interval: an interval longer than any run of the test
# makes the count of lines independent of how fast the machine is
meshipc._sockets.RateLimitedLog.__init__.__defaults__ = (3600.0,)
async def main():
    async with meshipc.Mesh(name="fds", runtime_dir=sys.argv[1]) as mesh:
        listener = await mesh.listen()
        # few fds: the silent peers exhaust them long before the cap
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        print(json.dumps({"node": mesh.stats().node.path}), flush=True)
        async for conn in listener:
            conn.port.send("served")
            acc = mesh.stats().node.acceptor
            print(json.dumps({"out_of_fds": acc.out_of_fds, "evicted": acc.evicted}), flush=True)
asyncio.run(main())
"""


async def test_out_of_fds_pauses_accepting_and_recovers(runtime_dir: Path) -> None:
    """A service whose fd limit silent peers exhaust: accepting pauses (a
    handful of log lines, not a busy loop writing megabytes), the oldest
    silent peers give their fds back, a real client is served during the
    noise and after it."""
    svc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FD_SERVICE,
        os.fspath(runtime_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    held: list[socket.socket] = []
    try:
        node = Path((await event(svc))["node"])
        held = silent(node, 100)
        for _ in range(2):  # during the noise, then once it stopped
            async with meshipc.connect("fds", runtime_dir=runtime_dir, timeout=T) as cc:
                assert await asyncio.wait_for(cc.port.recv(), T) == "served"
            stats = await event(svc)
            for s in held:
                s.close()
            held = []
        assert stats["out_of_fds"] >= 1 and stats["evicted"] >= 1, stats
        svc.terminate()  # SIGTERM: the mesh closes cleanly
        assert svc.stderr is not None
        err = (await asyncio.wait_for(svc.stderr.read(), T)).decode()
        assert await asyncio.wait_for(svc.wait(), T) == 143, err
    finally:
        for s in held:
            s.close()
        if svc.returncode is None:
            svc.kill()
            await svc.wait()
    lines = err.splitlines()
    # rate-limited: one line per kind per interval (an hour here), so at most
    # one from each of the node's and the listener's acceptors however slow
    # the machine; the old busy loop wrote megabytes
    assert 1 <= sum("accept failed (Too many open files)" in line for line in lines) <= 2, err
    assert len(lines) <= 15, err
    assert list(runtime_dir.iterdir()) == []


# ------------------------------------------------------- hostile peers


async def recv_exact(s: socket.socket, n: int) -> bytes:
    return await asyncio.wait_for(recv_exact_on(asyncio.get_running_loop(), s, n), T)


async def raw_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, os.fspath(path)), T)
    return s


async def until_closed(s: socket.socket) -> None:
    """Read (and discard) until the node hangs up on us."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionResetError):
        while await asyncio.wait_for(loop.sock_recv(s, 65536), T):
            pass


async def handshake(mesh: Mesh, me: bytes) -> tuple[socket.socket, bytes]:
    """A full, valid initiator handshake as node ``me`` with a credential
    the mesh's root issued (as an admitted peer gone bad would hold);
    returns the socket and the bytes it sent (HELLO + AUTH), for a replay."""
    node = mesh._node
    assert mesh._authority is not None
    identity = mesh._authority.issue(ROLE_CLIENT, me)
    loop = asyncio.get_running_loop()
    s = await raw_connect(node.path)
    greeting = new_hello()
    hello = build_hello(greeting)
    await loop.sock_sendall(s, hello)
    challenge = parse_challenge(await recv_exact(s, CHALLENGE_LEN), node.id)
    auth = identity.build_auth(greeting, challenge, node.id)
    await loop.sock_sendall(s, auth)
    verdict = parse_verdict(await recv_exact(s, VERDICT_LEN), node.id)
    identity.check_verdict(greeting, challenge, node.id, verdict, await recv_exact(s, PROOF_LEN))
    assert verdict == V_ACCEPT
    return s, hello + auth


def hook_refusals(node: meshipc._node.Node) -> asyncio.Queue[str]:
    """Each reason ``node`` gives for refusing a connection."""
    q: asyncio.Queue[str] = asyncio.Queue()
    original = node._refuse

    def refuse(sock: socket.socket, why: str, cred: Any) -> None:
        original(sock, why, cred)
        q.put_nowait(why)

    node._refuse = refuse  # type: ignore[method-assign]
    return q


async def test_hostile_handshakes_are_refused_and_the_node_serves_on(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meshipc._node, "HANDSHAKE_TIMEOUT", 1.0)  # for the peer that stalls
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        node = mesh._node
        listener = await mesh.listen()
        refusals = hook_refusals(node)
        loop = asyncio.get_running_loop()
        baseline = open_fds()

        async def refused(send: bytes, close: bool = True) -> str:
            s = await raw_connect(node.path)
            with s:
                await loop.sock_sendall(s, send)
                if close:
                    s.shutdown(socket.SHUT_WR)
                await until_closed(s)
            return await asyncio.wait_for(refusals.get(), T)

        # random bytes, short and long; a half HELLO; a HELLO for another node
        assert (await refused(os.urandom(7))).startswith("peer closed the connection after 7 of")
        assert await refused(b"GET / HTTP/1.1\r\n" * 200) == "not a meshipc node"
        assert (await refused(MAGIC + b"\x01")).startswith("peer closed the connection after 5 of")
        old = build_hello(new_hello()._replace(version=PROTOCOL_VERSION - 1, low=0))
        said = f"the connecting node speaks protocol {PROTOCOL_VERSION - 1}, this node {PROTOCOL_VERSION}"
        assert (await refused(old)).startswith(said + ": upgrade the connecting node")

        # a valid HELLO, then an AUTH of random bytes
        s = await raw_connect(node.path)
        with s:
            await loop.sock_sendall(s, build_hello(new_hello()))
            await recv_exact(s, CHALLENGE_LEN)
            await loop.sock_sendall(s, os.urandom(AUTH_LEN))
            assert (await recv_exact(s, VERDICT_LEN))[0] == V_DENIED
        assert (await asyncio.wait_for(refusals.get(), T)).startswith("unsupported certificate version")

        # a replay of a valid handshake: the node's fresh nonce makes the old AUTH worthless
        me = os.urandom(16)
        good, sent = await handshake(mesh, me)
        good.close()
        await wait_until(lambda: me not in node.links, "the node to drop the first link")
        s = await raw_connect(node.path)
        with s:
            await loop.sock_sendall(s, sent)
            await until_closed(s)
        assert (await asyncio.wait_for(refusals.get(), T)).startswith("bad signature from node")

        # a peer that sends HELLO and then nothing: dropped at the deadline
        hello = build_hello(new_hello())
        assert await refused(hello, close=False) == "the handshake timed out after 1 s"
        assert node.rejected == 7

        # the listener: random bytes at it change nothing (it only writes)
        s = await raw_connect(listener.path)
        with s:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may be done already
                await loop.sock_sendall(s, os.urandom(4096))
            await until_closed(s)

        await wait_until(lambda: open_fds() <= baseline, "fds back to their baseline")
        await serve_one_client(listener, os.fspath(listener.path))


async def test_authenticated_peer_gone_bad_is_dropped_and_the_node_serves_on(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer holding a credential the root issued (trusted to join, not to be sane): a
    frame announcing 4 GiB, descriptors no frame claims, descriptors with a
    frame never finished. Each drops that one connection with a logged
    reason, nothing is allocated for the announced size, every descriptor
    it sent is closed, and the node goes on serving."""
    caplog.set_level(logging.WARNING, logger="meshipc")
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        node = mesh._node
        listener = await mesh.listen()
        loop = asyncio.get_running_loop()
        baseline = open_fds()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        async def dropped(attack: Callable[[socket.socket], Any]) -> str:
            me = os.urandom(16)
            s, _ = await handshake(mesh, me)
            with s:
                await wait_until(lambda: me in node.links, "the peer to be connected")
                await attack(s)
                await until_closed(s)  # the node hung up on us
            await wait_until(lambda: me not in node.links, "the peer to be dropped")
            return caplog.records[-1].getMessage()

        async def huge(s: socket.socket) -> None:
            await loop.sock_sendall(s, struct.pack("<IB", 0xFFFFFFFF, 1) + os.urandom(64))

        why = await dropped(huge)
        assert why.endswith(f"protocol error: frame length {0xFFFFFFFF} outside 1..{4 * 1024 * 1024}"), why
        # (ru_maxrss is in KiB) nothing near 4 GiB was ever allocated
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024

        r, w = os.pipe()
        try:

            async def unclaimed_fds(s: socket.socket) -> None:
                fds = array.array("i", [r, w] * 50)
                await loop.sock_sendall(s, struct.pack("<I", 1 << 20))  # a frame that never ends
                for _ in range(6):  # 600 descriptors, each batch with one byte of its body
                    try:
                        s.sendmsg([b"\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                    except OSError:  # dropped already (a small write never blocks)
                        break

            why = await dropped(unclaimed_fds)
            assert why.endswith("protocol error: peer sent descriptors that no frame claims"), why

            async def fds_then_leave(s: socket.socket) -> None:
                fds = array.array("i", [r, w] * 10)
                s.sendmsg([b"\x05\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                s.shutdown(socket.SHUT_WR)  # the frame is never finished

            await dropped(fds_then_leave)
        finally:
            os.close(r)
            os.close(w)
        # every descriptor the peers sent was closed by the node
        await wait_until(lambda: open_fds() <= baseline, "fds back to their baseline")
        await serve_one_client(listener, os.fspath(listener.path))


async def test_clients_that_take_invitations_and_never_join_cannot_pile_them_up(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meshipc._listener, "MAX_OUTSTANDING", 4)
    monkeypatch.setattr(meshipc._listener, "WITHDRAW_AFTER", 0.0)  # withdrawn at once (the wait: test_attach)
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen(invitation_ttl=60)
        taken = [await asyncio.wait_for(read_invitation(listener.path), T) for _ in range(10)]
        assert mesh.stats().node.invited == 4
        assert listener.stats().outstanding == 4 and listener.stats().withdrawn == 6
        # the oldest were withdrawn: too late to use them
        with pytest.raises(meshipc.InvitationExpired):
            async with meshipc.join(taken[0]):
                pass  # pragma: no cover
        # the server's ends, in the order the invitations were taken
        conns = [await asyncio.wait_for(listener.accept(), T) for _ in range(10)]
        with pytest.raises(meshipc.PortFailed, match="withdrawn"):
            await asyncio.wait_for(conns[0].port.recv(), T)
        # the newest still work
        async with meshipc.join(taken[-1]) as cc:
            cc.port.send("late but fine")
            assert await asyncio.wait_for(conns[-1].port.recv(), T) == "late but fine"
        await serve_one_client(listener, os.fspath(listener.path))


async def test_flood_of_tiny_frames_leaves_no_state_and_others_are_served(runtime_dir: Path) -> None:
    """An authenticated peer streams 200,000 tiny frames (closes of, and
    messages to, ports that do not exist) while a real client attaches and
    talks: the client is served during the flood, the frames leave nothing
    behind, and the flooder's connection stays usable (they are valid)."""
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        me = os.urandom(16)
        s, _ = await handshake(mesh, me)
        loop = asyncio.get_running_loop()
        ports_before = mesh.stats().node.ports
        frames = b"".join(
            encode_event(CloseEvent(os.urandom(16), i))
            + encode_event(MsgEvent(os.urandom(16), i, 0, 0, [], 0, b"x"))
            for i in range(100_000)
        )
        with s:
            flood = asyncio.create_task(loop.sock_sendall(s, frames))
            try:
                await serve_one_client(listener, os.fspath(listener.path))
                await asyncio.wait_for(flood, T)
            finally:
                flood.cancel()
            def read_in() -> int:
                link = mesh.stats().node.link(me)
                return link.bytes_in if link is not None else -1

            await wait_until(lambda: read_in() >= len(frames), "the flood to be read")
            assert mesh.stats().node.link(me) is not None  # the link lives
        assert mesh.stats().node.ports == ports_before
