"""Hostile and careless peers on real sockets: floods of silent connections,
running out of descriptors, garbage, wrong secrets, oversized frames, fds
without a frame, peers that never read. Each is dropped (with a logged
reason) and the node keeps serving real clients — separate processes
running ``attach_client.py`` — throughout.

Every wait is bounded; nothing synchronizes by sleeping (``wait_until``
polls a counter that has no event)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import meshipc
import meshipc._node
from meshipc import Mesh

CLIENT = Path(__file__).with_name("attach_client.py").resolve()
T = 10.0


@pytest.fixture
def rd() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="h", dir="/tmp")
    os.chmod(d, 0o700)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def wait_until(pred: Callable[[], bool], what: str, timeout: float = T) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


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
        async def find() -> meshipc.Connection:
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
    rd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many silent connections to the node socket: at most ``limit`` are
    held at once (the rest wait in the kernel's backlog), the oldest give
    their slot away, a real client attaches during the noise, and fds come
    back once it stops."""
    async with Mesh(runtime_dir=rd) as mesh:
        listener = await mesh.listen()
        acceptor = mesh._node._acceptor
        assert acceptor is not None and acceptor.limit == meshipc._node.MAX_PENDING
        acceptor.limit = 8  # the same logic as the default 128, with fewer sockets
        monkeypatch.setattr(meshipc._node, "EVICT_AFTER", 0.1)  # and less waiting
        baseline = open_fds()
        held = silent(mesh._node.path, 60)
        try:
            await wait_until(lambda: acceptor.pending == 8, "the cap to be reached")
            await serve_one_client(listener, os.fspath(listener.path))
            assert acceptor.pending <= 8
            assert acceptor.evicted >= 1
        finally:
            for s in held:
                s.close()
        # once the noise stops, everything it held is given back
        await wait_until(lambda: acceptor.pending == 0, "the silent connections to be dropped")
        await wait_until(lambda: open_fds() <= baseline, f"fds back to baseline {sorted(baseline)}")
        await serve_one_client(listener, os.fspath(listener.path))


FD_SERVICE = """
import asyncio, json, logging, resource, sys, meshipc
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
async def main():
    async with meshipc.Mesh(name="fds", runtime_dir=sys.argv[1]) as mesh:
        listener = await mesh.listen()
        # few fds: the silent peers exhaust them long before the cap
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        print(json.dumps({"node": str(mesh._node.path)}), flush=True)
        async for conn in listener:
            conn.port.send("served")
            acc = mesh._node._acceptor
            print(json.dumps({"out_of_fds": acc.out_of_fds, "evicted": acc.evicted}), flush=True)
asyncio.run(main())
"""


async def test_out_of_fds_pauses_accepting_and_recovers(rd: Path) -> None:
    """A service whose fd limit silent peers exhaust: accepting pauses (a
    handful of log lines, not a busy loop writing megabytes), the oldest
    silent peers give their fds back, a real client is served during the
    noise and after it."""
    svc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FD_SERVICE,
        os.fspath(rd),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    held: list[socket.socket] = []
    try:
        node = Path((await event(svc))["node"])
        held = silent(node, 100)
        for _ in range(2):  # during the noise, then once it stopped
            async with meshipc.connect("fds", runtime_dir=rd, timeout=T) as cc:
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
    # rate-limited: at most one line per kind per LOG_INTERVAL (10 s)
    assert 1 <= sum("accept failed (Too many open files)" in line for line in lines) <= 2, err
    assert len(lines) <= 10, err
    assert list(rd.iterdir()) == []
