"""The far side of a boundary link in the gateway tests: a process with its
own private ``Mesh`` and a ``Gateway`` on an inherited socket.

Run as ``python gateway_peer.py FD RUNTIME_DIR INFO_PATH [INTERVAL TIMEOUT]``.
The first port's far end is an agent that runs commands (lists) it gets
there, each in a task (``AGENT``'s keys); it reports on the first port. It
writes its own node id, mesh folder and the ids of the ports it holds to
``INFO_PATH`` (never onto the link), for the byte-scan test.

Also holds worker functions the tests spawn in the *parent's* mesh (a third
process whose port crosses the link).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from typing import Any

import meshipc
from meshipc import BoundaryLimits, Call, ChannelClosed, Fd, Port, PortFailed, Receiver, Sender

held: list[Any] = []


async def echo(port: Port, report: Port) -> None:
    """Send back everything ``port`` receives, until it ends."""
    try:
        async for v in port:
            port.send(v)
            await port.drain()
    except PortFailed:
        pass
    port.close()


async def double(rx: Receiver[Call[Any]], report: Port) -> None:
    async for call in rx:
        call.reply(call.request * 2)


async def call(tx: Sender[Any], n: int, tag: str, report: Port) -> None:
    total = 0
    for i in range(n):
        total += await tx.call(i)
    report.send(["called", tag, total])


async def stream(tx: Sender[Any], n: int, report: Port) -> None:
    for i in range(n):
        tx.send(i)
        if i % 256 == 0:
            await tx.drain()
    tx.close()


async def count(rx: Receiver[Any], tag: str, report: Port) -> None:
    n = total = 0
    in_order = True
    try:
        async for v in rx:
            in_order = in_order and v == n
            n += 1
            total += v
    except PortFailed as exc:
        report.send(["counted", tag, n, total, in_order, str(exc)])
        return
    report.send(["counted", tag, n, total, in_order, None])


async def back(port: Any, report: Port) -> None:
    report.send(["back", port])


async def size(port: Port, report: Port) -> None:
    """Answer each value with its length, and then a value as long."""
    async for v in port:
        port.send(len(v))
        port.send(b"y" * len(v))


async def hold(port: Any, report: Port) -> None:
    held.append(port)
    report.send(["holding"])


async def release(report: Port) -> None:
    for p in held:
        async for v in p:
            report.send(["released", v])
            break


async def third(tx: Sender[Any], n: int, report: Port) -> None:
    """Call ``tx`` (whose receiver is in a third process) ``n`` times."""
    got = [await tx.call(i) for i in range(n)]
    report.send(["third", got])


async def send_fd_here(port: Port, report: Port) -> None:
    """Try to send an Fd on a port that crosses back: refused at send."""
    r, w = os.pipe()
    os.close(w)
    try:
        port.send(Fd(r))
    except meshipc.MessageError as exc:
        report.send(["refused", str(exc)])
    else:
        report.send(["sent"])
    port.send("after")


async def stop(code: int, report: Port) -> None:
    sys.stdout.flush()
    os._exit(code)


AGENT = {f.__name__: f for f in (echo, double, call, stream, count, back, size, hold, release, third,
                                 send_fd_here, stop)}


async def main() -> None:
    fd, runtime, info = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    limits = BoundaryLimits()
    if len(sys.argv) > 5:
        limits = BoundaryLimits(heartbeat_interval=float(sys.argv[4]), heartbeat_timeout=float(sys.argv[5]))
    sock = socket.socket(fileno=fd)
    async with meshipc.Mesh(runtime_dir=runtime) as mesh:
        reader, writer = await asyncio.open_connection(sock=sock)
        agent, first = Port.pair()
        gw = await mesh.open_gateway(reader, writer, first, label="test:parent", limits=limits)
        with open(info, "w") as f:
            json.dump({"node": mesh.node_id.hex(), "dir": str(mesh.directory), "pid": os.getpid()}, f)
        tasks = set()
        try:
            async for cmd in agent:
                op, *args = cmd
                t = asyncio.ensure_future(AGENT[op](*args, agent))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        except (ChannelClosed, PortFailed):
            pass
        await gw.aclose()


if __name__ == "__main__":
    meshipc.run(main())
