"""External attach: named meshes, listeners, invitations, ``connect``/``join``.

Clients are real processes (``attach_client.py``) or real sockets: fake
listeners are plain asyncio Unix servers, silent clients are raw sockets.
Every wait is bounded by ``asyncio.wait_for`` and fails loudly; nothing
synchronizes by sleeping. Socket paths live in a short private folder under
``/tmp`` (AF_UNIX paths are limited to 108 bytes, ``tmp_path`` is too long).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import meshipc
from attach_client import read_all
from attachutil import FIELD, assert_no_secret, foreign_credential, invitation_key, key_material, reencode
from meshipc import (
    AuthenticationError,
    ChannelClosed,
    Fd,
    Invitation,
    InvitationExpired,
    JoinError,
    JoinTimeout,
    Mesh,
    MeshNameInUse,
    Port,
    PortFailed,
    Sender,
)
from meshipc._join import read_invitation
from meshipc._names import node_path

CLIENT = Path(__file__).with_name("attach_client.py").resolve()
SRC = Path(meshipc.__file__).resolve().parent.parent
#: Bound on any single step (a process start, a reply, a failure to show).
T = 10.0
#: TTL for invitations that a test leaves unused on purpose (they fail their
#: kept port and are forgotten soon after the test is done with them).
SHORT_TTL = 1.0
OTHER_USER = "meshipc-test"

# ------------------------------------------------------------------ helpers


class Client:
    """A client process: JSON events on its stdout, stderr collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.stderr = b""
        self._stderr_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()

    async def event(self, timeout: float = T) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
            await asyncio.wait_for(self._stderr_task, timeout)
            raise AssertionError(
                f"client {self.pid} exited ({code}) without an event:\n{self.stderr.decode()}"
            )
        ev: dict[str, Any] = json.loads(line)
        return ev

    async def exit_code(self, timeout: float = T) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._stderr_task, timeout)
        return code

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


@contextlib.asynccontextmanager
async def client(
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    script: Path = CLIENT,
    keep_stdin: bool = False,
    **kw: Any,
) -> AsyncIterator[Client]:
    """Run ``attach_client.py ARGS``; killed and reaped on the way out.
    Its stdin is closed after ``stdin`` unless ``keep_stdin``."""
    proc = await asyncio.create_subprocess_exec(
        python,
        os.fspath(script),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        **kw,
    )
    c = Client(proc)
    try:
        assert proc.stdin is not None
        if stdin is not None:
            proc.stdin.write(stdin)
            await proc.stdin.drain()
        if not keep_stdin:
            proc.stdin.close()
        yield c
    finally:
        c.kill()
        await proc.wait()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(c._stderr_task, T)


async def ask(port: Port, cmd: dict[str, Any]) -> Any:
    """Send a command to a client's session and wait for its answer."""
    port.send(cmd)
    return await asyncio.wait_for(port.recv(), T)


async def accept_from(listener: meshipc.Listener, pid: int) -> meshipc.Admission:
    """The connection of process ``pid`` (others, e.g. silent sockets, skipped)."""

    async def find() -> meshipc.Admission:
        async for conn in listener:
            if conn.peer.pid == pid:
                return conn
        raise AssertionError("listener closed before the client arrived")

    return await asyncio.wait_for(find(), T)


def serve_calls(rx: meshipc.Receiver[Any]) -> asyncio.Task[None]:
    async def serve() -> None:
        async for call in rx:
            call.reply({"served_by": os.getpid(), "request": call.request})

    return asyncio.create_task(serve())


def hook_refusals(node: Any) -> asyncio.Queue[str]:
    """A queue that gets the reason each time ``node`` refuses a connection
    (so tests wait for the refusal instead of polling its counter)."""
    q: asyncio.Queue[str] = asyncio.Queue()
    original = node._refuse

    def refuse(sock: Any, why: str, cred: Any) -> None:
        original(sock, why, cred)
        q.put_nowait(why)

    node._refuse = refuse
    return q


async def exercise(conn: meshipc.Admission, pid: int) -> Sender[Any]:
    """RPC both ways, a Port and an Fd each way, with the client ``pid``.

    Returns the Sender whose calls the client serves (still open)."""
    # the server sends a channel end and serves the client's calls on it
    tx, rx = meshipc.channel()
    server = serve_calls(rx)
    try:
        got = await ask(conn.port, {"op": "call", "tx": tx, "request": {"n": 1}})
        assert got == {"result": {"served_by": os.getpid(), "request": {"n": 1}}}
    finally:
        server.cancel()
        rx.close()

    # the client sends a channel end and serves the server's calls on it
    got = await ask(conn.port, {"op": "serve"})
    client_tx = got["tx"]
    assert isinstance(client_tx, Sender)
    for i in range(3):
        assert await asyncio.wait_for(client_tx.call([i, "x"]), T) == {
            "served_by": pid,
            "request": [i, "x"],
        }

    # a raw Port travels to the client; the client answers on it and closes it
    mine, theirs = Port.pair()
    conn.port.send({"op": "port", "port": theirs})
    mine.send(41)
    assert await asyncio.wait_for(mine.recv(), T) == 42
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(mine.recv(), T)
    assert await asyncio.wait_for(conn.port.recv(), T) == {"port": "done"}

    # an Fd to the client: the write end of our pipe; the client writes
    r, w = os.pipe()
    data = b"written by the client " + os.urandom(8).hex().encode()
    got = await ask(conn.port, {"op": "fd_write", "fd": Fd(w), "data": data})
    assert got == {"written": len(data)}
    # sending the Fd closed our copy of the write end, so EOF follows the data
    assert await asyncio.wait_for(read_all(r), T) == data

    # an Fd from the client: the write end of its pipe; we write, it reads
    got = await ask(conn.port, {"op": "fd_give"})
    fd = got["fd"]
    assert isinstance(fd, Fd)
    back = b"written by the server " + os.urandom(8).hex().encode()
    with fd:
        os.write(fd.fileno(), back)
    assert await asyncio.wait_for(conn.port.recv(), T) == {"read": back}
    return client_tx


# --------------------------------------------------------- attach end to end


async def test_attach_by_name_rpc_both_ways_then_leave(runtime_dir: Path) -> None:
    async with Mesh(name="a", runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        assert listener.path == mesh.directory / "listen.sock"
        async with client("session", "a", os.fspath(runtime_dir)) as c:
            conn = await asyncio.wait_for(listener.accept(), T)
            assert conn.peer.pid == c.pid
            assert conn.peer.uid == os.getuid()
            assert conn.peer.gid == os.getgid()
            assert await c.event() == {"attached": c.pid}
            assert await ask(conn.port, {"op": "whoami"}) == {"pid": c.pid, "uid": os.getuid()}
            client_tx = await exercise(conn, c.pid)

            # the client leaves its `async with connect(...)`: a normal close
            conn.port.send({"op": "leave"})
            with pytest.raises(ChannelClosed) as ei:
                await asyncio.wait_for(conn.port.recv(), T)
            assert not isinstance(ei.value, PortFailed)
            assert await c.event() == {"left": "leave"}
            assert await c.exit_code() == 0, c.stderr.decode()
            # the client's own served channel closed with it
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(client_tx.call("late"), T)
        assert mesh.stats().node.attached == 1


async def test_attach_by_path_to_unnamed_mesh_then_sigkill(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        assert mesh.name is None
        path = runtime_dir / "l.sock"
        listener = await mesh.listen(path=path)
        assert listener.path == path
        async with client("session", os.fspath(path), "-") as c:
            conn = await asyncio.wait_for(listener.accept(), T)
            assert conn.peer.pid == c.pid
            assert conn.peer.uid == os.getuid()
            assert await c.event() == {"attached": c.pid}
            client_tx = await exercise(conn, c.pid)

            assert await ask(conn.port, {"op": "hang"}) == {"hanging": c.pid}
            c.kill()
            with pytest.raises(PortFailed):
                await asyncio.wait_for(conn.port.recv(), T)
            # everything else peered with the dead node fails too
            with pytest.raises(PortFailed):
                await asyncio.wait_for(client_tx.call("after death"), T)
            assert await c.exit_code() < 0


async def test_hundred_concurrent_clients(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        tx, rx = meshipc.channel()
        seen: set[tuple[int, int]] = set()
        conns: list[meshipc.Admission] = []

        async def serve() -> None:
            while True:
                try:
                    call = await rx.recv()
                except PortFailed:
                    # one sender's node went away with it open: that
                    # fails that sender only, the others keep calling
                    continue
                pid, i = call.request
                seen.add((pid, i))
                call.reply([pid, i, "ok"])

        async def hand_out() -> None:
            async for conn in listener:
                conns.append(conn)  # keep the server ends open
                conn.port.send(tx.clone())

        tasks = [asyncio.create_task(serve()), asyncio.create_task(hand_out())]
        sizes = [100, 5, 5, 5]
        try:
            async with contextlib.AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(client("many", os.fspath(listener.path), str(n)))
                    for n in sizes
                ]
                for c, n in zip(clients, sizes, strict=True):
                    assert await c.event(timeout=30) == {"ok": n}, c.stderr.decode()
                    assert await c.exit_code() == 0, c.stderr.decode()
        finally:
            for t in tasks:
                t.cancel()
        assert len(seen) == sum(sizes)
        assert {pid for pid, _ in seen} == {c.pid for c in clients}
        assert len(conns) == sum(sizes)
        by_pid = {c.pid: n for c, n in zip(clients, sizes, strict=True)}
        for pid, n in by_pid.items():
            assert sum(1 for conn in conns if conn.peer.pid == pid) == n
        assert mesh.stats().node.attached == sum(sizes)


# ------------------------------------------------------------------ bursts


async def burst(
    runtime_dir: Path, procs: int, each: int, *, nofile: int = 0, backlog: int = 0, timeout: float = 20.0
) -> tuple[int, dict[str, Any]]:
    """``procs`` client processes of ``each`` concurrent ``connect``s (each
    bounded by ``timeout``) against a service process (``burst-service``,
    with ``nofile``/``backlog`` if given). Returns how many clients attached
    and made their call, and the service's figures. Reports every client's
    errors on failure."""
    name = f"burst{os.getpid()}"
    async with client(
        "burst-service", os.fspath(runtime_dir), name, str(nofile), str(backlog), keep_stdin=True
    ) as svc:
        ready = await svc.event()
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(client("many", ready["listener"], str(each), str(timeout)))
                for _ in range(procs)
            ]
            outcomes = [await c.event(timeout=2 * timeout + T) for c in clients]
        assert svc.proc.stdin is not None
        svc.proc.stdin.write(b"figures\n")
        figures = await svc.event()
    errors = [o["errors"] for o in outcomes if "errors" in o]
    ok = sum(o["ok"] for o in outcomes)
    print(f"burst {procs}x{each} nofile={nofile} backlog={backlog}: {ok} attached; service {figures}")
    assert not errors, errors
    return ok, figures


async def test_a_burst_of_clients_from_many_processes_all_attach(runtime_dir: Path) -> None:
    """More clients at once than the acceptors' cap (``MAX_PENDING``) from
    several processes: none is evicted in the middle of its handshake (or
    while its listener task waits for the loop), and all attach."""
    ok, figures = await burst(runtime_dir, 10, 40)
    assert ok == 400
    assert figures["attached"] == 400


async def test_a_burst_against_a_tiny_backlog_and_few_fds_all_attach(runtime_dir: Path) -> None:
    """The service listens with a backlog of 4 (clients' connects fail with
    ``EAGAIN`` and must be tried again, not taken for connected) and has
    128 fds (fewer than the clients: accepts fail with ``EMFILE`` until
    earlier clients leave); every client still attaches within its timeout."""
    ok, figures = await burst(runtime_dir, 4, 40, nofile=128, backlog=4)
    assert ok == 160
    assert figures["attached"] == 160


@pytest.mark.soak
async def test_a_thousand_clients_from_twenty_processes_all_attach(runtime_dir: Path) -> None:
    ok, figures = await burst(runtime_dir, 20, 50)
    assert ok == 1000
    assert figures["attached"] == 1000


# -------------------------------------------------------- silent and stalling


async def test_silent_and_stalling_clients_do_not_block_a_real_one(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen(invitation_ttl=SHORT_TTL)
        held: list[socket.socket] = []
        try:
            for _ in range(20):  # connect to the listener, never read
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(os.fspath(listener.path))
                held.append(s)
            for _ in range(20):  # connect and close at once
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(os.fspath(listener.path))
            for i in range(10):  # the node socket itself: silent, or half a HELLO
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(mesh.stats().node.path)
                if i % 2:
                    s.sendall(b"MSH1\x01")
                held.append(s)

            async with client("session", os.fspath(listener.path), "-") as c:
                conn = await accept_from(listener, c.pid)
                assert await c.event() == {"attached": c.pid}
                assert await ask(conn.port, {"op": "whoami"}) == {"pid": c.pid, "uid": os.getuid()}
                conn.port.send({"op": "leave"})
                with pytest.raises(ChannelClosed):
                    await asyncio.wait_for(conn.port.recv(), T)
                assert await c.exit_code() == 0, c.stderr.decode()
        finally:
            for s in held:
                s.close()


# ------------------------------------------------------------- bounded waits


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """Process ``pid`` SIGSTOPped for the block, continued afterwards."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def test_connect_and_join_to_a_stopped_service_time_out(runtime_dir: Path) -> None:
    async with client("named", os.fspath(runtime_dir), "svc") as svc:
        ev = await svc.event()
        listener = Path(ev["listener"])
        # an invitation taken while the service ran, used once it is stopped
        inv = await asyncio.wait_for(read_invitation(listener), T)
        with stopped(svc.pid):
            with pytest.raises(JoinTimeout) as ei:
                async with meshipc.connect("svc", runtime_dir=runtime_dir, timeout=0.5):
                    pass  # pragma: no cover
            exc = ei.value
            assert isinstance(exc, JoinError) and isinstance(exc, TimeoutError)
            assert str(exc) == (f"the mesh at {listener} did not answer in time (timed out after 0.5 s)")
            assert (exc.path, exc.timeout) == (os.fspath(listener), 0.5)

            with pytest.raises(JoinTimeout) as ei:
                async with meshipc.join(inv, timeout=0.3):
                    pass  # pragma: no cover
            inviter = node_path(Path(ev["directory"]), bytes(inv.inviter))
            assert str(ei.value) == f"the mesh at {inviter} did not answer in time (timed out after 0.3 s)"
            # the joining node cleaned up after itself
            assert not node_path(Path(ev["directory"]), bytes(inv.node)).exists()
        # continued, the same service answers within the default bound
        async with meshipc.connect("svc", runtime_dir=runtime_dir) as conn:
            assert conn.mesh.directory == Path(ev["directory"])


# ------------------------------------------------------------------ names


async def test_mesh_name_held_by_another_process(runtime_dir: Path) -> None:
    async with client("named", os.fspath(runtime_dir), "held") as owner:
        ready = await owner.event()
        assert ready["pid"] == owner.pid
        with pytest.raises(MeshNameInUse):
            async with Mesh(name="held", runtime_dir=runtime_dir):
                pass
        owner.proc.terminate()
        await owner.exit_code()
    async with Mesh(name="held", runtime_dir=runtime_dir) as mesh:
        assert mesh.directory == runtime_dir / "mesh-held"


async def test_stale_directory_of_a_killed_mesh_is_replaced(runtime_dir: Path) -> None:
    async with client("named", os.fspath(runtime_dir), "y") as owner:
        ready = await owner.event()
        directory = Path(ready["directory"])
        assert directory == runtime_dir / "mesh-y"
        owner.kill()
        assert await owner.exit_code() < 0
    leftovers = sorted(p.name for p in directory.iterdir())
    # node socket + listener (no control socket: sessions go over the node links)
    assert "listen.sock" in leftovers and len(leftovers) == 2, leftovers

    async with Mesh(name="y", runtime_dir=runtime_dir) as mesh:
        assert mesh.directory == directory
        assert sorted(p.name for p in directory.iterdir()) == [Path(mesh.stats().node.path).name]
        listener = await mesh.listen()
        async with client("session", "y", os.fspath(runtime_dir)) as c:
            conn = await asyncio.wait_for(listener.accept(), T)
            assert conn.peer.pid == c.pid
            assert await ask(conn.port, {"op": "whoami"}) == {"pid": c.pid, "uid": os.getuid()}
            conn.port.send({"op": "leave"})
            assert await c.exit_code() == 0, c.stderr.decode()


async def test_close_with_unused_invitation_is_prompt(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port of an invitation nobody used cannot settle: closing the mesh
    does not wait for it (the close linger is made a minute here, far above
    the bound on the close, so a close that fell into it fails however fast
    or slow the machine is)."""
    import meshipc._node

    monkeypatch.setattr(meshipc._node.Node.close, "__defaults__", (60.0,))
    mesh = Mesh(runtime_dir=runtime_dir)
    await mesh.__aenter__()
    try:
        _mine, theirs = Port.pair()
        await mesh.inviter(ttl=60).invite(theirs)
        await asyncio.wait_for(mesh.aclose(), T)
    finally:
        await mesh._node.close(linger=0)


async def test_kept_end_of_unused_invitation_fails_when_mesh_closes(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mine, theirs = Port.pair()
        await mesh.inviter(ttl=60).invite(theirs)
    # the mesh is closed: nothing can ever reach the kept end any more
    with pytest.raises(PortFailed):
        await asyncio.wait_for(mine.recv(), T)


# -------------------------------------------------------------- other uid


@pytest.fixture
def other_user() -> Iterator[dict[str, Any]]:
    """A system user other than us, and a Python it can run meshipc with."""
    if os.getuid() != 0:
        pytest.skip("running a client as another uid needs root")
    try:
        pw = pwd.getpwnam(OTHER_USER)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.skip("useradd is missing; cannot create a second user")
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", OTHER_USER], capture_output=True, timeout=30
        )
        if made.returncode != 0:
            pytest.skip(f"useradd {OTHER_USER} failed: {made.stderr.decode().strip()}")
        pw = pwd.getpwnam(OTHER_USER)
    shared = Path(tempfile.mkdtemp(prefix="mu", dir="/tmp"))
    try:
        os.chmod(shared, 0o755)
        # our interpreter may live where the other user cannot read (/root):
        # offer a copy of msgspec for a system Python of the same version
        lib = shared / "lib"
        shutil.copytree(Path(msgspec.__file__).parent, lib / "msgspec")
        # and of meshipc and the client script: the checkout may be unreadable to that user
        shutil.copytree(SRC / "meshipc", lib / "meshipc")
        client = shared / CLIENT.name
        shutil.copy(CLIENT, client)
        for p in [shared, *shared.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        v = sys.version_info
        candidates = [
            sys.executable,
            f"/usr/bin/python{v.major}.{v.minor}",
            f"/usr/local/bin/python{v.major}.{v.minor}",
        ]
        env = {"PATH": "/usr/bin:/bin", "HOME": "/", "PYTHONDONTWRITEBYTECODE": "1"}
        user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "cwd": "/"}
        why = []
        for python in candidates:
            for path in (os.fspath(lib), os.fspath(SRC), f"{SRC}{os.pathsep}{lib}"):
                env["PYTHONPATH"] = path
                try:
                    probe = subprocess.run(
                        [python, os.fspath(client), "no-such-mode"],
                        env=env,
                        capture_output=True,
                        timeout=30,
                        **user,
                    )
                except OSError as exc:
                    why.append(f"{python}: {exc}")
                    break
                if probe.returncode == 2 and b"unknown mode" in probe.stderr:
                    yield {"python": python, "env": dict(env), "uid": pw.pw_uid, "client": client, **user}
                    return
                why.append(f"{python} with PYTHONPATH={path}: {probe.stderr.decode().strip()[-200:]}")
        pytest.skip(f"user {OTHER_USER} cannot run attach_client.py with meshipc: {why}")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.stock_loop  # uvloop cannot start a process as another user
async def test_client_of_another_uid_is_refused(runtime_dir: Path, other_user: dict[str, Any]) -> None:
    public = Path(tempfile.mkdtemp(prefix="mp", dir="/tmp"))
    try:
        os.chmod(public, 0o755)
        async with Mesh(runtime_dir=runtime_dir) as mesh:
            path = public / "l.sock"
            listener = await mesh.listen(path=path)
            os.chmod(path, 0o666)  # reachable by the other user; refused by uid
            ou = dict(other_user)
            python, env = ou.pop("python"), ou.pop("env")
            other_uid = ou.pop("uid")
            ou["script"] = ou.pop("client")
            assert other_uid != os.getuid()

            # trusting our uid explicitly, the client is refused by the listener
            async with client(
                "connect-only", os.fspath(path), str(os.getuid()), python=python, env=env, **ou
            ) as c:
                ev = await c.event()
                assert ev["error"] in ("InvitationReadError", "ConnectError"), ev
                assert os.fspath(path) in ev["message"]
                assert await c.exit_code() == 3
            assert listener.stats().refused == 1
            # refused before any invitation existed
            assert listener.stats().given == 0 and mesh.stats().node.invited == 0

            # expecting its own uid (the default), the client distrusts the
            # listener before reading; the listener refuses it all the same
            async with client(
                "connect-only", os.fspath(path), str(other_uid), python=python, env=env, **ou
            ) as c:
                ev = await c.event()
                assert ev["error"] == "AuthenticationError", ev
                assert await c.exit_code() == 3

            # a client of ours still attaches, and is the first connection
            async with client("session", os.fspath(path), "-") as c:
                conn = await asyncio.wait_for(listener.accept(), T)
                # the listener serves clients in the order they arrived, so
                # the one that hung up on it was refused by now
                assert listener.stats().refused == 2
                assert conn.peer.pid == c.pid
                assert conn.peer.uid == os.getuid()
                assert await ask(conn.port, {"op": "whoami"}) == {"pid": c.pid, "uid": os.getuid()}
                conn.port.send({"op": "leave"})
                assert await c.exit_code() == 0, c.stderr.decode()
            assert listener.stats().refused == 2
            assert mesh.stats().node.attached == 1
    finally:
        shutil.rmtree(public, ignore_errors=True)


# -------------------------------------------------------------- invitations


async def test_forged_credential_is_rejected_by_the_node(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        node = mesh._node
        refusals = hook_refusals(node)
        mine, theirs = Port.pair()
        inv = await mesh.inviter().invite(theirs)
        assert msgspec.msgpack.decode(bytes(inv))[FIELD["credential"]] == inv.identity.to_bytes()
        # the invited id, vouched for by a root the forger made itself
        forged = foreign_credential(bytes(inv.node))
        bad = reencode(inv, credential=forged)

        rejected = node.stats().rejected
        with pytest.raises(AuthenticationError, match="refused our credential") as ei:
            async with meshipc.join(bad):
                pass
        assert await asyncio.wait_for(refusals.get(), T) == "certificate of another mesh"
        assert node.stats().rejected == rejected + 1
        assert node.stats().attached == 0
        for s in (*key_material(mesh), invitation_key(inv), forged[:32]):
            assert_no_secret(str(ei.value), s, "AuthenticationError")

        # the real holder of the invitation is not locked out by the forger
        async with meshipc.join(inv) as cc:
            mine.send("hi")
            assert await asyncio.wait_for(cc.port.recv(), T) == "hi"
        assert node.stats().attached == 1

        # and the mesh still serves fresh invitations, to another process
        mine2, theirs2 = Port.pair()
        inv2 = await mesh.inviter().invite(theirs2)
        async with client("join", stdin=bytes(inv2).hex().encode() + b"\n") as c:
            assert await c.event() == {"attached": c.pid}
            assert await ask(mine2, {"op": "whoami"}) == {"pid": c.pid, "uid": os.getuid()}
            mine2.send({"op": "leave"})
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(mine2.recv(), T)
            assert await c.exit_code() == 0, c.stderr.decode()
        assert node.stats().attached == 2


async def test_invitation_used_twice(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mine, theirs = Port.pair()
        inv = await mesh.inviter().invite(theirs)
        data = bytes(inv).hex().encode() + b"\n"
        async with client("join", stdin=data) as c:
            assert await c.event() == {"attached": c.pid}
            assert await ask(mine, {"op": "whoami"}) == {"pid": c.pid, "uid": os.getuid()}

            # a second use while the first node is attached: another process…
            async with client("join", stdin=data) as c2:
                ev = await c2.event()
                assert ev["error"] in ("InvitationExpired", "JoinError"), ev
                assert await c2.exit_code() == 3
            # …and this one
            with pytest.raises(JoinError):
                async with meshipc.join(inv):
                    pass
            # the first one is unharmed
            assert await ask(mine, {"op": "whoami"}) == {"pid": c.pid, "uid": os.getuid()}
            mine.send({"op": "leave"})
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(mine.recv(), T)
            assert await c.exit_code() == 0, c.stderr.decode()

        # a use after the first node has left
        with pytest.raises(InvitationExpired):
            async with meshipc.join(inv):
                pass
        assert mesh.stats().node.attached == 1


async def test_unused_invitation_expires(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        inviter = mesh.inviter(ttl=0.3)
        mine, theirs = Port.pair()
        t0 = time.time()
        inv = await inviter.invite(theirs)
        assert t0 < inv.expires <= time.time() + 0.3
        # the kept end fails once nobody joined in time
        with pytest.raises(PortFailed):
            await asyncio.wait_for(mine.recv(), T)
        # a late join is refused by the client's own check…
        with pytest.raises(InvitationExpired):
            async with meshipc.join(inv):
                pass
        # …and by the inviting node, even if the expiry time is forged
        late = reencode(inv, expires=time.time() + 60)
        with pytest.raises(InvitationExpired):
            async with meshipc.join(late):
                pass
        assert mesh.stats().node.attached == 0


async def test_private_keys_never_appear(runtime_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="meshipc")
    async with Mesh(name="s", runtime_dir=runtime_dir) as mesh:
        node = mesh._node
        keys = key_material(mesh)
        listener = await mesh.listen(invitation_ttl=SHORT_TTL)
        mine, theirs = Port.pair()
        inv = await mesh.inviter().invite(theirs)
        keys.append(invitation_key(inv))
        texts = {
            "repr(inv)": repr(inv),
            "str(inv)": str(inv),
            "repr(identity)": repr(node.identity),
            "str(identity)": str(node.identity),
            "repr(authority)": repr(mesh._authority),
            "repr(mesh)": repr(mesh),
            "repr(listener)": repr(listener),
        }
        import pickle

        for holder in (node.identity, mesh._authority, inv):
            with pytest.raises(TypeError):
                pickle.dumps(holder)

        # an attach, with the client logging at DEBUG too
        env = dict(os.environ, ATTACH_CLIENT_LOG="1")
        async with client("session", "s", os.fspath(runtime_dir), env=env) as c:
            conn = await asyncio.wait_for(listener.accept(), T)
            texts["repr(conn)"] = repr(conn)
            assert await ask(conn.port, {"op": "whoami"}) == {"pid": c.pid, "uid": os.getuid()}
            conn.port.send({"op": "leave"})
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(conn.port.recv(), T)
            assert await c.exit_code() == 0, c.stderr.decode()
        assert b"DEBUG" in c.stderr or b"INFO" in c.stderr, "the client logged nothing"
        texts["client stderr"] = c.stderr.decode(errors="replace")

        # failures, logged and raised
        bad = reencode(inv, credential=foreign_credential(bytes(inv.node)))
        with pytest.raises(AuthenticationError) as ei:
            async with meshipc.join(bad):
                pass
        texts["AuthenticationError"] = str(ei.value)
        with pytest.raises(AuthenticationError) as ei2:
            async with meshipc.connect("s", runtime_dir=runtime_dir, expected_uid=os.getuid() + 1):
                pass
        texts["AuthenticationError(uid)"] = str(ei2.value)
        async with meshipc.join(inv) as cc:
            texts["repr(client conn)"] = repr(cc)
            mine.send(1)
            assert await asyncio.wait_for(cc.port.recv(), T) == 1
        with pytest.raises(InvitationExpired) as ei3:
            async with meshipc.join(inv):
                pass
        texts["InvitationExpired"] = str(ei3.value)

    assert caplog.records, "nothing was logged during an attach"
    for i, rec in enumerate(caplog.records):
        texts[f"log record {i} message"] = rec.getMessage()
        texts[f"log record {i} args"] = repr(rec.args)
        texts[f"log record {i} exc"] = rec.exc_text or ""
    for what, text in texts.items():
        for key in keys:
            assert_no_secret(text, key, what)


async def test_join_error_messages_carry_no_private_key(runtime_dir: Path) -> None:
    """Every JoinError raised while a real mesh is involved, checked at once."""
    async with Mesh(name="e", runtime_dir=runtime_dir) as mesh:
        keys = key_material(mesh)
        listener = await mesh.listen(invitation_ttl=SHORT_TTL)
        errors: list[BaseException] = []
        mine, theirs = Port.pair()
        inv = await mesh.inviter(ttl=0.05).invite(theirs)
        keys.append(invitation_key(inv))
        with pytest.raises(PortFailed):  # expired unused
            await asyncio.wait_for(mine.recv(), T)
        forged = foreign_credential(bytes(inv.node))
        for attempt in (
            meshipc.join(reencode(inv, credential=forged, expires=time.time() + 60)),
            meshipc.join(inv),  # expired
            meshipc.join(reencode(inv, expires=time.time() + 60)),  # refused by the node as expired
            meshipc.connect(listener.path, expected_uid=os.getuid() + 1),
            meshipc.connect(runtime_dir / "missing.sock"),
            meshipc.join(reencode(inv, directory=os.fspath(runtime_dir / "gone"), expires=time.time() + 60)),
        ):
            with pytest.raises(JoinError) as ei:
                async with attempt:
                    pass
            errors.append(ei.value)
        assert len({type(e) for e in errors}) >= 4, errors
        for e in errors:
            for key in keys:
                assert_no_secret(str(e), key, type(e).__name__)
                assert_no_secret(repr(e), key, type(e).__name__)


# ---------------------------------------------------------------- listener


async def test_inviter_from_other_threads(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        inviter = mesh.inviter()
        loop = asyncio.get_running_loop()

        def plain_thread(port: Port, out: asyncio.Future[Invitation]) -> None:
            try:
                inv = inviter.invite_blocking(port)
            except BaseException as exc:
                loop.call_soon_threadsafe(out.set_exception, exc)
            else:
                loop.call_soon_threadsafe(out.set_result, inv)

        def other_loop(port: Port, out: asyncio.Future[Invitation]) -> None:
            try:
                inv = asyncio.run(inviter.invite(port))
            except BaseException as exc:
                loop.call_soon_threadsafe(out.set_exception, exc)
            else:
                loop.call_soon_threadsafe(out.set_result, inv)

        for target in (plain_thread, other_loop):
            mine, theirs = Port.pair()
            out: asyncio.Future[Invitation] = loop.create_future()
            th = threading.Thread(target=target, args=(theirs, out), name=target.__name__)
            th.start()
            try:
                inv = await asyncio.wait_for(out, T)
            finally:
                th.join(T)
            assert isinstance(inv, Invitation)
            async with client("join", stdin=bytes(inv).hex().encode() + b"\n") as c:
                assert await c.event() == {"attached": c.pid}, target.__name__
                assert await ask(mine, {"op": "whoami"}) == {"pid": c.pid, "uid": os.getuid()}
                mine.send({"op": "leave"})
                with pytest.raises(ChannelClosed):
                    await asyncio.wait_for(mine.recv(), T)
                assert await c.exit_code() == 0, c.stderr.decode()
        assert mesh.stats().node.attached == 2

        # many threads at once: every invitation is for a distinct new node
        invs: list[Invitation] = []
        lock = threading.Lock()
        ports = [Port.pair() for _ in range(20)]

        def many(chunk: list[Port]) -> None:
            for p in chunk:
                inv = inviter.invite_blocking(p, ttl=SHORT_TTL)
                with lock:
                    invs.append(inv)

        threads = [threading.Thread(target=many, args=([b for _, b in ports[i::4]],)) for i in range(4)]
        for th in threads:
            th.start()
        await asyncio.wait_for(asyncio.to_thread(lambda: [th.join(T) for th in threads]), T + 1)
        assert len(invs) == 20
        assert len({bytes(i.node) for i in invs}) == 20


@pytest.mark.parametrize("withdraw_after", [0.0, None], ids=["withdrawn-at-once", "wait-for-a-slot"])
async def test_more_clients_at_once_than_outstanding_invitations_all_attach(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch, withdraw_after: float | None
) -> None:
    """A burst of clients larger than the listener's cap on outstanding
    invitations. Withdrawn at once (``WITHDRAW_AFTER`` 0): the oldest
    invitations go before their clients use them, and ``connect`` takes a
    fresh one instead of failing with ``InvitationExpired``. By default,
    invitations that young are not withdrawn: the next clients wait for a
    slot."""
    import meshipc._listener

    monkeypatch.setattr(meshipc._listener, "MAX_OUTSTANDING", 2)
    if withdraw_after is not None:
        monkeypatch.setattr(meshipc._listener, "WITHDRAW_AFTER", withdraw_after)
    n = 8
    async with meshipc.Mesh(name="burst", runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()

        async def client(i: int) -> Any:
            async with meshipc.connect("burst", runtime_dir=runtime_dir, timeout=T) as conn:
                conn.port.send(i)
                return await conn.port.recv()

        async def echo(c: Any) -> None:
            with contextlib.suppress(meshipc.PortFailed):  # a withdrawn invitation's end
                c.port.send(await c.port.recv())

        async def server() -> None:
            async with asyncio.TaskGroup() as tg:
                while True:
                    tg.create_task(echo(await listener.accept()))

        srv = asyncio.ensure_future(server())
        try:
            got = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(n))), 3 * T)
        finally:
            srv.cancel()
            await asyncio.gather(srv, return_exceptions=True)
        assert sorted(got) == list(range(n))
        if withdraw_after is None:
            assert listener.stats().withdrawn == 0  # each waited for a slot
        else:
            assert listener.stats().withdrawn > 0  # the burst did overflow the cap
