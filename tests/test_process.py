"""Real processes, real sockets: spawned workers in a mesh.

Every test runs its mesh in a short private runtime directory under /tmp
(AF_UNIX paths are limited to 108 bytes). The ``Mesh`` context stops and
reaps the workers even when a test fails; tests that kill a worker on purpose
also kill it in ``finally``. No sleep stands in for synchronization: every
wait is on an event or a message, bounded by ``asyncio.timeout``/``wait_for``,
and fails loudly (``sleep(0)`` only yields one loop turn; ``wait_until`` polls
the one counter that has no event; ``block_until_exited`` blocks the loop on
purpose, to line events up).
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import select
import socket
import stat
from pathlib import Path
from typing import Any

import msgspec
import pytest

import meshipc
import meshipc._mesh
import meshipc._process
from meshipc import ChannelClosed, Fd, HandshakeError, MeshError, PortFailed, RemoteError
from meshipc._child import EXIT_PARENT_LOST
from meshipc._codec import CODEC, walk_resources
from meshipc._handshake import (
    CHALLENGE_LEN,
    HELLO_LEN,
    ROLE_CLIENT,
    ROLE_WORKER,
    V_DENIED,
    Authority,
    Hello,
    build_hello,
    build_verdict,
    new_hello,
    parse_challenge,
)
from meshipc._node import Node
from meshipc._wire import OOB_THRESHOLD, PROTOCOL_VERSION
from relutil import STEP, wait_until, within


async def read_to_eof(fd: int, timeout: float = STEP) -> bytes:
    """Everything readable from ``fd`` until end of file, without blocking the loop."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                return
            except OSError as exc:
                if not done.done():
                    done.set_exception(exc)
                return
            if not chunk:
                if not done.done():
                    done.set_result(None)
                return
            chunks.append(chunk)

    loop.add_reader(fd, on_readable)
    try:
        await within(done, timeout)
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


def parent_bytes(mesh: meshipc.Mesh) -> int:
    """Bytes the parent node has sent and received on all its connections."""
    return sum(link.bytes_in + link.bytes_out for link in mesh.stats().node.links)


def open_fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor listdir itself used
    return out


def block_until_exited(proc: meshipc.Process) -> None:
    """Keep the event loop busy (blocked) until ``proc`` has exited, without
    reaping it: whatever it sent and its exit are then all pending at once.
    (A pidfd: the worker is our child, or our zygote's.)"""
    pidfd = os.pidfd_open(proc.pid)
    try:
        # blocking on purpose: the loop must not run
        assert select.select([pidfd], [], [], STEP)[0], f"{proc} did not exit"
    finally:
        os.close(pidfd)


def child_processes() -> dict[int, str]:
    """Our worker processes, zombies included: pid -> state letter. A worker
    is a child of ours, or (forked by a zygote: ``_zygote``) of a zygote of
    ours; the zygote itself is not a worker (it outlives them, reaping them)."""
    parents: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        state, ppid = data[data.rindex(")") + 2 :].split()[:2]
        parents[int(name)] = (int(ppid), "zygote" if b"zygote_main" in cmd and state != "Z" else state)
    zygotes = {pid for pid, (ppid, st) in parents.items() if ppid == os.getpid() and st == "zygote"}
    return {
        pid: st
        for pid, (ppid, st) in parents.items()
        if (ppid == os.getpid() and st != "zygote") or ppid in zygotes
    }


# --------------------------------------------------------------------------- RPC


async def test_rpc_to_spawned_worker(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:echo", rx, name="echo")
        assert proc.name == "echo"
        assert proc.pid != os.getpid()
        values: list[Any] = [
            None,
            True,
            -(2**63),
            2**64 - 1,
            1.5,
            "héllo ✓",
            b"\x00\xff" * 10,
            [1, [2, [3]]],
            {"k": {"nested": [b"x", None]}},
        ]
        for v in values:
            assert await within(tx.call(v)) == v
        # many calls in flight at once, answered in any order
        got = await within(asyncio.gather(*(tx.call(i) for i in range(200))))
        assert got == list(range(200))
        tx.close()  # the worker's loop ends, its function returns
        assert await within(proc.wait()) == 0
        assert proc.returncode == 0
        assert proc.error is None


async def test_three_processes_workers_talk_directly(runtime_dir: Path) -> None:
    """The parent makes a channel and hands its ends to two workers: A sends,
    B receives, B reports to the parent. After the ends have settled, A's
    traffic to B does not pass through the parent."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        go_tx, go_rx = meshipc.channel()
        rep_tx, rep_rx = meshipc.channel()
        b = await mesh.spawn("workers:talk_receiver", {"rx": rx, "report": rep_tx}, name="B")
        a = await mesh.spawn("workers:talk_sender", {"tx": tx, "go": go_rx}, name="A")

        go_tx.send(1)
        assert await within(rep_rx.recv()) == ["round", 1, 1, True, [a.pid], b.pid]

        before = parent_bytes(mesh)
        go_tx.send(2000)
        assert await within(rep_rx.recv()) == ["round", 2, 2000, True, [a.pid], b.pid]
        through_parent = parent_bytes(mesh) - before
        # the go message and B's report, not the 2001 frames (> 100 kB) of
        # A's round, which a relaying parent would have read and written
        assert through_parent < 2000, f"{through_parent} bytes of A->B traffic went through the parent"

        go_tx.close()  # A closes its sender, B sees the end of the stream
        assert await within(rep_rx.recv()) == ["done", 2001]
        assert await within(a.wait()) == 0
        assert await within(b.wait()) == 0


async def test_rpc_chain_through_relay_worker(runtime_dir: Path) -> None:
    """parent -> relay worker -> whoami worker, with the relay holding a
    Sender whose receiver lives in the other worker."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        wtx, wrx = meshipc.channel()
        rtx, rrx = meshipc.channel()
        who = await mesh.spawn("workers:whoami", wrx, name="whoami")
        rel = await mesh.spawn("workers:relay", {"rx": rrx, "to": wtx}, name="relay")
        for i in range(20):
            assert await within(rtx.call({"i": i})) == [rel.pid, [who.pid, {"i": i}]]
        rtx.close()
        assert await within(rel.wait()) == 0  # its Sender to whoami closes with it
        assert await within(who.wait()) == 0


# ------------------------------------------------------------------ moving ports


async def test_port_moves_parent_to_b_to_c_while_peer_keeps_sending(runtime_dir: Path) -> None:
    """A port made in the parent goes to worker B, which reads a few messages
    and sends it on to worker C, while the parent keeps sending on the peer
    end throughout: every message arrives exactly once, in order."""
    n, keep = 10_000, 100
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        to_b, b_ports = meshipc.channel()
        to_c, c_ports = meshipc.channel()
        rep_b_tx, rep_b = meshipc.channel()
        rep_c_tx, rep_c = meshipc.channel()
        c = await mesh.spawn("workers:collect_port", {"ports": c_ports, "report": rep_c_tx}, name="C")
        b = await mesh.spawn(
            "workers:forward_port",
            {"ports": b_ports, "to": to_c, "keep": keep, "report": rep_b_tx},
            name="B",
        )
        here, moving = meshipc.Port.pair()
        sent = 0

        def send(k: int) -> None:
            nonlocal sent
            for _ in range(k):
                here.send(sent)
                sent += 1

        send(10)  # queued at `moving` before it leaves
        to_b.send(moving)
        forwarded = asyncio.ensure_future(rep_b.recv())
        sent_when_forwarded = None
        try:
            while sent < n:
                send(min(25, n - sent))
                await asyncio.sleep(0)  # let the loop move bytes
                if forwarded.done() and sent_when_forwarded is None:
                    sent_when_forwarded = sent
                if sent >= n // 2 and sent_when_forwarded is None:
                    # make sure the B -> C move starts while we still send
                    await within(asyncio.shield(forwarded))
                    sent_when_forwarded = sent
            here.close()
            report_b = await within(forwarded)
        finally:
            forwarded.cancel()
        assert report_b == ["forwarded", b.pid, list(range(keep))]
        assert sent_when_forwarded is not None and sent_when_forwarded < n

        kind, pid, values, end = await within(rep_c.recv())
        assert (kind, pid, end) == ("collected", c.pid, "closed")
        assert len(values) == n - keep
        first_bad = next((i for i, v in enumerate(values, keep) if v != i), None)
        assert first_bad is None, f"C got {values[first_bad - keep]} where {first_bad} was due"
        to_b.close()  # B may go now
        assert await within(b.wait()) == 0
        assert await within(c.wait()) == 0


# ------------------------------------------------------------------ descriptors


async def test_fd_passing_pipe_write_end_to_worker(runtime_dir: Path) -> None:
    data = b"written by the worker into a pipe it received\n"
    r, w = os.pipe()
    try:
        async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
            fd = Fd(w)  # owns w from here
            proc = await mesh.spawn("workers:write_fd", {"fd": fd, "data": data})
            assert fd.closed, "sending an Fd hands it over"
            # EOF only comes once every write end is closed: the worker's, and
            # the parent's copy that travelled (closed after sendmsg)
            assert await read_to_eof(r) == data
            assert await within(proc.wait()) == 0
    finally:
        os.close(r)


async def test_fd_passing_in_calls_small_and_out_of_band(runtime_dir: Path) -> None:
    """Fds inside RPC requests, including one in a body big enough to travel in
    a memfd (which is itself a descriptor riding with the message)."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        await mesh.spawn("workers:fd_writer", rx)
        for size in (5, 70_000, OOB_THRESHOLD + 1):
            data = secrets.token_bytes(size)
            r, w = os.pipe()
            try:
                call = asyncio.ensure_future(tx.call({"fd": Fd(w), "data": data}))
                got = await read_to_eof(r)
                assert await within(call) == size
                assert got == data, f"size {size}: pipe contents differ"
            finally:
                os.close(r)


async def test_a_stream_of_fd_messages_to_a_worker_takes_the_fast_path_and_leaks_nothing(
    runtime_dir: Path, monkeypatch: Any, untraced: None
) -> None:
    """Hundreds of messages of fds (lone ``Fd``s, ``Fd``s among plain values)
    to a worker, more than one ``sendmsg`` carries: each arrives in order
    with its own fds (the worker writes into each), the parent sends them
    without the full encoder (a spy counts it), and neither process keeps a
    descriptor it did not have before."""
    n = 600
    r, w = os.pipe()
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        done_tx, done_rx = meshipc.channel()
        await mesh.spawn("workers:fd_stream_writer", {"rx": rx, "done": done_tx, "n": n})
        full: list[Any] = []
        real = CODEC.encode


        def spy(*a: Any) -> Any:
            if any(isinstance(x, Fd) for x in walk_resources(a[1])):  # (not the control plane's own)
                full.append(a[1])
            return real(*a)

        monkeypatch.setattr(CODEC, "encode", spy)
        opened = await within(done_rx.recv())
        before = len(os.listdir("/proc/self/fd"))
        want = []
        for i in range(n):
            if i % 3 == 0:
                tx.send(Fd.dup(w))
                want.append(b"%d.0;" % i)
            else:
                tx.send({"i": i, "fds": [Fd.dup(w) for _ in range(i % 3)], "text": "x" * (i % 7)})
                want.extend(b"%d.%d;" % (i, j) for j in range(i % 3))
            if i % 64 == 63:
                await within(tx.drain())
        os.close(w)
        left = await within(done_rx.recv())
        assert left == opened, f"the worker kept {left - opened} descriptors"
        assert full == [], "a message of fds took the full encoder"
        assert await read_to_eof(r) == b"".join(want)
        # the worker read every message: each was written, and its fds closed here
        assert len(os.listdir("/proc/self/fd")) <= before
        tx.close()
    os.close(r)


# ------------------------------------------------------------------ message sizes


def _sizes() -> list[int]:
    t = OOB_THRESHOLD
    # bytes payloads: msgpack adds a small header; the reply body is the
    # encoded payload, the call body adds the reply port (an ext) and a tuple
    reply_overhead = len(msgspec.msgpack.encode(b"\0" * t)) - t
    call_overhead = reply_overhead + 1 + 6
    around = {t + d - o for d in (-1, 0, 1) for o in (0, reply_overhead, call_overhead)}
    return sorted({0, 1, 100, 4095, 4096, 65536, 1 << 20, 16 << 20} | around)


async def test_message_sizes_round_trip(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        await mesh.spawn("workers:echo", rx)
        bad = []
        for size in _sizes():
            payload = os.urandom(size)
            got = await within(tx.call(payload))
            if got != payload:
                bad.append((size, len(got) if isinstance(got, bytes) else type(got).__name__))
        assert not bad, f"(size sent, what came back): {bad}"
        # the worker is still fine after all that
        assert await within(tx.call("still there")) == "still there"


# ------------------------------------------------------------------ failures


async def test_kill_9_mid_stream(runtime_dir: Path) -> None:
    """A worker streaming to the parent is SIGKILLed: the stream fails with
    PortFailed in bounded time, a call pending on it fails, new calls fail at
    once, and another worker keeps serving."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        out_tx, out_rx = meshipc.channel()
        calls_tx, calls_rx = meshipc.channel()
        streamer = await mesh.spawn(
            "workers:stream_and_serve", {"out": out_tx, "calls": calls_rx}, name="streamer"
        )
        etx, erx = meshipc.channel()
        other = await mesh.spawn("workers:echo", erx, name="other")
        try:
            assert await within(calls_tx.call("ping")) == "pong"
            assert await within(etx.call("before")) == "before"
            expected = 0

            async def next_item() -> Any:
                nonlocal expected
                v = await within(out_rx.recv())
                if isinstance(v, int):
                    assert v == expected, "stream out of order"
                    expected += 1
                return v

            while expected < 1000:
                await next_item()
            pending = asyncio.ensure_future(calls_tx.call("hold this"))
            while await next_item() != ["held", "hold this"]:
                pass
            assert not pending.done()

            streamer.kill()
            with pytest.raises(PortFailed):
                async with asyncio.timeout(STEP):  # a hang fails (TimeoutError)
                    while True:
                        await next_item()
            # the pending call fails with the stream
            with pytest.raises((PortFailed, ChannelClosed)):
                await within(pending)
            # and a new one fails
            with pytest.raises((PortFailed, ChannelClosed)):
                await within(calls_tx.call("ping"))
            # the stream stays failed
            with pytest.raises(PortFailed):
                await within(out_rx.recv())

            assert await within(streamer.wait()) == -9
            for i in range(10):
                assert await within(etx.call(i)) == i
            assert other.returncode is None
        finally:
            streamer.kill()


async def test_worker_that_raises(runtime_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        proc = await mesh.spawn("workers:fail", 42)
        assert await within(proc.wait()) == 1
        raised = proc.error
        assert isinstance(raised, RemoteError)
        assert raised.type_name == "ValueError"
        assert raised.message == "worker refused 42"
        assert "ValueError" in str(raised)
        assert "workers.py" in raised.traceback and "raise ValueError" in raised.traceback
    # the traceback reached us on the port (and is logged by the parent); the
    # worker did not print it to its stderr as well
    assert "raise ValueError" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("target", "reason", "in_traceback"),
    [
        (
            "no_such_module_for_meshipc:main",
            "ModuleNotFoundError: No module named 'no_such_module_for_meshipc'",
            "import_module",
        ),
        (
            "workers:no_such_function",
            "AttributeError: module 'workers' has no function 'no_such_function'",
            "has no function",
        ),
        (
            "broken_workers:main",
            "RuntimeError: broken_workers refuses to be imported (planted failure 8d1f)",
            'broken_workers.py", line 6',
        ),
        (
            "workers:not_async",
            "TypeError: workers:not_async returned int, not an awaitable (make it an async def)",
            "in _call",
        ),
        ("dying_workers:main", "the worker process exited with code 7 before starting it", None),
    ],
)
async def test_spawn_raises_when_the_worker_cannot_start(
    runtime_dir: Path, capfd: pytest.CaptureFixture[str], target: str, reason: str, in_traceback: str | None
) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        with pytest.raises(meshipc.SpawnError) as ei:
            await within(mesh.spawn(target, None, name="w"))
        exc = ei.value
        assert isinstance(exc, MeshError)
        assert str(exc) == f"worker 'w' could not start {target!r}: {reason}"
        assert (exc.name, exc.target, exc.reason) == ("w", target, reason)
        if in_traceback is None:
            assert exc.traceback == "" and not getattr(exc, "__notes__", [])
        else:
            assert in_traceback in exc.traceback
            assert exc.__notes__ == [f"traceback in the worker:\n{exc.traceback.rstrip()}"]
        # the failed worker is reaped, not kept as a child of the mesh
        assert mesh._children == []
        assert child_processes() == {}
        # and the mesh is as good as before
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:echo", rx)
        assert await within(tx.call("still fine")) == "still fine"
        tx.close()
        assert await within(proc.wait()) == 0
    # the child's traceback was not printed by the child (nor logged by us)
    err = capfd.readouterr().err
    if in_traceback is not None:
        assert "Traceback" not in err, err


async def test_spawn_cancelled_while_the_worker_starts_kills_it(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        started = asyncio.Event()
        original = meshipc._process.Process._wait_started

        async def observed(self: meshipc.Process) -> None:
            started.set()
            await original(self)

        task = asyncio.create_task(mesh.spawn("workers:echo", None))
        try:
            meshipc._process.Process._wait_started = observed  # type: ignore[method-assign]
            await within(started.wait())
        finally:
            meshipc._process.Process._wait_started = original  # type: ignore[method-assign]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: child_processes() == {}, "the cancelled worker to be reaped")
        await wait_until(lambda: mesh._children == [], "the mesh to forget it")


async def test_worker_whose_link_to_its_parent_broke_exits_nonzero(
    runtime_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:idle", tx)
        assert await within(rx.recv()) == proc.pid
        (conn,) = mesh._node.links.values()  # the only peer: the worker
        conn.sock.shutdown(socket.SHUT_RDWR)  # the link breaks; both processes live on
        assert await within(proc.wait()) == EXIT_PARENT_LOST != 0
    assert "meshipc worker idle: lost the link to its parent" in capfd.readouterr().err


async def test_worker_error_survives_a_busy_parent_loop(runtime_dir: Path) -> None:
    """Same as above, but the parent's loop is busy while the child fails and
    exits, so the status message and the exit arrive together."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:fail_later", rx)
        assert await within(tx.call("ready?")) == "ready"
        tx.send("boom")
        await asyncio.sleep(0)  # one loop turn: the message is written
        # its status message and its exit are then seen in the same iteration
        block_until_exited(proc)
        assert await within(proc.wait()) == 1
        assert isinstance(proc.error, RemoteError), proc.error
        assert proc.error.type_name == "ValueError"


async def test_messages_sent_before_a_worker_exits_are_delivered(runtime_dir: Path) -> None:
    """A worker sends a message and exits while the parent is busy; then the
    parent writes to it before reading. What the worker sent must still be
    delivered (before any failure)."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        out_tx, out_rx = meshipc.channel()
        go_tx, go_rx = meshipc.channel()
        proc = await mesh.spawn("workers:last_words", {"out": out_tx, "go": go_rx})
        assert await within(out_rx.recv()) == "hello"
        go_tx.send("go")
        await asyncio.sleep(0)  # one loop turn: "go" is written
        block_until_exited(proc)
        go_tx.send("too late")  # a write to the dead worker, due before any read
        assert await within(out_rx.recv()) == "last words"


async def test_worker_returning_closes_the_ports_it_was_given(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:noop", {"tx": tx})
        assert await within(proc.wait()) == 0
        with pytest.raises(ChannelClosed) as info:
            await within(rx.recv())
        assert not isinstance(info.value, PortFailed)


@pytest.mark.parametrize(
    ("nfds", "body"),
    [
        (129, 10),
        (128, OOB_THRESHOLD),
    ],
    ids=["129fds", "128fds+oob"],
)
async def test_too_many_fds_in_one_message_fail_only_that_message(
    runtime_dir: Path, nfds: int, body: int
) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:echo", rx)
        assert await within(tx.call("up")) == "up"
        r, w = os.pipe()
        try:
            fds = [Fd.dup(w) for _ in range(nfds)]
            try:
                got = await within(tx.call([b"x" * body, fds]))
                for f in got[1]:
                    f.close()
            except (MeshError, ValueError) as exc:
                # refusing the message is fine, breaking the connection is not
                assert not isinstance(exc, PortFailed), exc
        finally:
            os.close(r)
            os.close(w)
        assert await within(tx.call("still connected")) == "still connected"
        assert proc.returncode is None


async def test_spawn_with_unsendable_argument_leaves_no_process(runtime_dir: Path) -> None:
    before = child_processes()
    try:
        async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
            with pytest.raises((TypeError, ValueError, NotImplementedError, MeshError)):
                await mesh.spawn("workers:echo", object())
            assert mesh._children == []
        left = {pid: st for pid, st in child_processes().items() if pid not in before}
        assert not left, f"processes left behind by a failed spawn (pid: state): {left}"
    finally:
        for pid in child_processes().keys() - before.keys():
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


# ------------------------------------------------------------------ authentication


async def test_garbage_and_foreign_credentials_are_rejected(runtime_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        node = mesh._node
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:echo", rx)
        assert await within(tx.call("before")) == "before"
        rejected = node.stats().rejected

        async def raw_connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            await within(loop.sock_connect(s, os.fspath(node.path)))
            return s

        async def hung_up(s: socket.socket) -> bool:
            """True once the node closed the connection (EOF or reset)."""
            try:
                while await within(loop.sock_recv(s, 4096)):
                    pass
            except ConnectionResetError:
                pass
            return True

        # 1. garbage the size of a HELLO, 2. lots of garbage, 3. a few bytes then EOF
        for garbage, eof in (
            (b"\xff" * HELLO_LEN, False),
            (b"GET / HTTP/1.1\r\n" * 500, False),
            (b"MS", True),
        ):
            s = await raw_connect()
            try:
                await within(loop.sock_sendall(s, garbage))
                if eof:
                    s.shutdown(socket.SHUT_WR)
                assert await hung_up(s)
            finally:
                s.close()
            rejected += 1
            assert node.stats().rejected == rejected, garbage[:16]

        # 4. a HELLO with an unknown protocol version
        s = await raw_connect()
        try:
            hello = build_hello(Hello(PROTOCOL_VERSION + 1, os.urandom(32)))
            await within(loop.sock_sendall(s, hello))
            assert await hung_up(s)
        finally:
            s.close()
        rejected += 1
        assert node.stats().rejected == rejected

        # 5. a real handshake with a credential of another mesh, from the
        #    acceptor's side: the AUTH is refused with V_DENIED
        wrong = Authority().issue(ROLE_CLIENT)
        s = await raw_connect()
        try:
            hello = new_hello()
            await within(loop.sock_sendall(s, build_hello(hello)))
            buf = b""
            while len(buf) < CHALLENGE_LEN:
                chunk = await within(loop.sock_recv(s, CHALLENGE_LEN - len(buf)))
                assert chunk, "node hung up before its challenge"
                buf += chunk
            challenge = parse_challenge(buf, node.id)  # status OK
            await within(loop.sock_sendall(s, wrong.build_auth(hello, challenge, node.id)))
            assert await within(loop.sock_recv(s, 1)) == build_verdict(V_DENIED)
            assert await hung_up(s)
        finally:
            s.close()
        rejected += 1
        assert node.stats().rejected == rejected

        # 6. a whole Node of another mesh connecting by path: the mesh node
        #    denies its certificate
        intruder = Node(mesh.directory, Authority().issue(ROLE_WORKER), codec=CODEC)
        try:
            with pytest.raises(HandshakeError):
                await within(intruder.connect_to(node.id))
        finally:
            await within(intruder.close())
        rejected += 1
        await wait_until(lambda: node.stats().rejected >= rejected, "the node to refuse the intruder")
        assert node.stats().rejected == rejected
        assert intruder.id not in node.links

        # the mesh still serves, old and new workers alike
        for i in range(5):
            assert await within(tx.call(i)) == i
        tx2, rx2 = meshipc.channel()
        await mesh.spawn("workers:echo", rx2)
        assert await within(tx2.call("after")) == "after"
        assert proc.returncode is None


# ------------------------------------------------------------------ permissions


async def test_directory_and_socket_modes(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        await mesh.spawn("workers:echo", rx)
        assert await within(tx.call(1)) == 1  # the worker's node socket exists
        st = os.lstat(mesh.directory)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.getuid()
        assert stat.S_IMODE(os.lstat(runtime_dir).st_mode) == 0o700
        node_st = os.lstat(mesh.stats().node.path)
        assert stat.S_ISSOCK(node_st.st_mode) and stat.S_IMODE(node_st.st_mode) == 0o600
        socks = list(mesh.directory.iterdir())
        assert len(socks) == 2, socks  # parent and worker (no control socket)
        for p in socks:
            m = os.lstat(p).st_mode
            assert stat.S_ISSOCK(m) and stat.S_IMODE(m) == 0o600, (p, oct(m))
        directory = mesh.directory
    assert not directory.exists(), "the mesh's first node removes its directory"


def _unsafe_root(base: Path, kind: str) -> Path:
    root = base / "rt"
    if kind.startswith("mode"):
        root.mkdir()
        os.chmod(root, int(kind[4:], 8))
    elif kind == "other_uid":
        root.mkdir(mode=0o700)
        os.chown(root, 65534, 65534)
    elif kind == "symlink":
        target = base / "real"
        target.mkdir(mode=0o700)
        root.symlink_to(target)
    elif kind == "dangling_symlink":
        root.symlink_to(base / "nothing-here")
    elif kind == "file":
        root.write_bytes(b"")
    else:
        raise ValueError(kind)
    return root


@pytest.mark.parametrize(
    "kind",
    [
        "mode755",
        "mode750",
        "mode701",
        "mode1777",
        pytest.param(
            "other_uid",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root"),
        ),
        "symlink",
        "dangling_symlink",
        "file",
    ],
)
async def test_unsafe_runtime_dir_is_refused(runtime_dir: Path, kind: str) -> None:
    root = _unsafe_root(runtime_dir, kind)
    before = sorted(os.listdir(runtime_dir))
    with pytest.raises(MeshError):
        async with meshipc.Mesh(runtime_dir=root):
            pass
    assert sorted(os.listdir(runtime_dir)) == before
    if kind == "symlink":
        assert os.listdir(runtime_dir / "real") == [], "nothing may be created through the symlink"


# ------------------------------------------------------------------ resources


async def test_no_fd_leak_over_spawn_cycles(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:

        async def cycle(i: int) -> None:
            tx, rx = meshipc.channel()
            proc = await mesh.spawn("workers:echo", rx)
            assert await within(tx.call(i)) == i
            tx.close()
            assert await within(proc.wait()) == 0

        await cycle(-1)  # warm-up: lazy imports, executor threads
        gc.collect()
        before = open_fds()
        ports_before = mesh.stats().node.ports
        for i in range(8):  # a leak of one fd or port per cycle shows as 8 > 3
            await cycle(i)
        gc.collect()
        assert mesh.stats().workers == 0  # exited workers are not kept by the mesh
        after = open_fds()
        new = {fd: target for fd, target in after.items() if fd not in before}
        assert len(after) - len(before) <= 3, f"{len(after) - len(before)} more open fds: {new}"
        assert mesh.stats().node.ports <= ports_before + 3, mesh.stats().node


async def test_mesh_exit_reaps_children(runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meshipc._mesh, "CHILD_GRACE", 1.0)
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        pid_tx, pid_rx = meshipc.channel()
        idle = [await mesh.spawn("workers:idle", pid_tx.clone()) for _ in range(2)]
        stubborn = await mesh.spawn("workers:stubborn", pid_tx.clone())
        pid_tx.close()
        procs = [*idle, stubborn]
        try:
            pids = {await within(pid_rx.recv()) for _ in procs}
            assert pids == {p.pid for p in procs}
            assert all(p.returncode is None for p in procs)
            directory = mesh.directory
        except BaseException:
            for p in procs:
                p.kill()
            raise
    for p in procs:
        assert p.returncode is not None, p
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)  # reaped: not even a zombie is left
    assert [p.returncode for p in idle] == [0, 0]  # stopped by the mesh, cleanly
    assert stubborn.returncode == -9  # ignored the stop, killed after the grace time
    assert not directory.exists()


async def test_closing_the_mesh_stops_a_worker_still_starting(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meshipc._mesh, "CHILD_GRACE", 0.5)
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        spawning = asyncio.create_task(mesh.spawn("slow_workers:main", None, name="slow"))
        try:
            await wait_until(lambda: len(mesh._children) == 1, "the worker process to exist")
            assert not spawning.done()
        except BaseException:
            for p in mesh._children:
                p.kill()
            raise
    # closing the mesh stopped it (killed after the grace time: it could not listen)
    with pytest.raises(meshipc.SpawnError, match="'slow' could not start 'slow_workers:main'"):
        await within(spawning)
    await wait_until(lambda: child_processes() == {}, "the worker to be reaped")
