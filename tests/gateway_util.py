"""The gateway tests' harness: a far process (``gateway_peer.py``) with its own
mesh, joined to ours by a boundary link over a socketpair (optionally
through a recorder that keeps every byte that crosses)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshipc import BoundaryLimits, Gateway, Mesh, Port
from relutil import STEP, within

PEER = Path(__file__).with_name("gateway_peer.py").resolve()


@dataclass
class Far:
    proc: asyncio.subprocess.Process
    gw: Gateway
    #: our end of the link's first port: commands to the far agent, its reports back
    agent: Port[Any]
    info_path: Path
    #: every byte that crossed, each direction (when recording)
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)

    def info(self) -> dict[str, Any]:
        return dict(json.loads(self.info_path.read_text()))

    async def report(self, what: str) -> list[Any]:
        """The next report of kind ``what`` (others are kept for later)."""
        msg: list[Any] = await within(self.agent.recv())
        assert msg[0] == what, msg
        return msg


async def _pipe(src: socket.socket, dst: socket.socket, keep: bytearray) -> None:
    loop = asyncio.get_running_loop()
    while True:
        data = await loop.sock_recv(src, 1 << 16)
        if not data:
            dst.shutdown(socket.SHUT_WR)
            return
        keep += data
        await loop.sock_sendall(dst, data)


@contextlib.asynccontextmanager
async def far_peer(
    mesh: Mesh,
    runtime: Path,
    *,
    limits: BoundaryLimits | None = None,
    far_heartbeat: tuple[float, float] | None = None,
    record: bool = False,
) -> AsyncIterator[Far]:
    """Start ``gateway_peer.py`` and open our gateway to it; killed and
    reaped on the way out, whatever happened."""
    ours, theirs = socket.socketpair()
    extra: list[socket.socket] = []
    tasks: list[asyncio.Task[None]] = []
    sent, received = bytearray(), bytearray()
    if record:
        # our gateway on `ours`; the recorder copies between `theirs` and `a`,
        # keeping every byte; the child gets `b`
        a, b = socket.socketpair()
        for s in (theirs, a):
            s.setblocking(False)
        tasks.append(asyncio.ensure_future(_pipe(theirs, a, sent)))
        tasks.append(asyncio.ensure_future(_pipe(a, theirs, received)))
        extra += [theirs, a]
        child_sock = b
    else:
        child_sock = theirs
    info = runtime / f"far-{os.urandom(4).hex()}.json"
    args = [sys.executable, str(PEER), str(child_sock.fileno()), str(runtime), str(info)]
    if far_heartbeat is not None:
        args += [str(far_heartbeat[0]), str(far_heartbeat[1])]
    proc = await asyncio.create_subprocess_exec(*args, pass_fds=[child_sock.fileno()])
    child_sock.close()
    try:
        reader, writer = await asyncio.open_connection(sock=ours)
        agent, first = Port.pair()
        gw = await mesh.open_gateway(reader, writer, first, label="test:far", limits=limits, timeout=STEP)
        far = Far(proc, gw, agent, info, sent, received)
        try:
            yield far
        finally:
            await gw.aclose()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
        await proc.wait()
        for t in tasks:
            t.cancel()
        for s in extra:
            s.close()
