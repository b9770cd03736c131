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
from attachutil import key_material
from meshipc import BoundaryLimits, Call, ChannelClosed, Fd, Port, PortFailed, Receiver, Sender

held: list[Any] = []
_mesh: list[meshipc.Mesh] = []
_info: list[str] = []
_gateway: list[meshipc.Gateway] = []


def identifying(mesh: meshipc.Mesh) -> dict[str, Any]:
    """What must never cross a boundary, of ``mesh``: its node id, folder and
    socket path, the ids of the ports its node holds, its private keys."""
    return {
        "node": mesh.node_id.hex(),
        "dir": str(mesh.directory),
        "path": mesh.stats().node.path,
        "ports": [p.hex() for p in mesh._node.engine.ports],
        "keys": [k.hex() for k in key_material(mesh)],
        "pid": os.getpid(),
    }


async def dump(report: Port) -> None:
    """Write what identifies this side to the info file (not onto the link)."""
    with open(_info[0], "w") as f:
        json.dump(identifying(_mesh[0]), f)
    report.send(["dumped"])


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


async def collect(port: Port, report: Port) -> None:
    """Report each value ``port`` receives (or the error it raises), until it closes."""
    while True:
        try:
            v = await port.recv()
        except meshipc.MessageError as exc:
            report.send(["error", str(exc)])
            continue
        except (ChannelClosed, PortFailed):
            report.send(["ended"])
            return
        report.send(["item", v])


async def send_fd(port: Port) -> None:
    """(Spawned in the test's mesh) send an Fd, then a str, on ``port``."""
    r, w = os.pipe()
    os.close(w)
    port.send(Fd(r))
    port.send("after the fd")
    await port.recv()  # until the test lets go


async def goodbye(tx: Sender[Any], n: int, report: Port) -> None:
    """Send ``n`` values on ``tx`` (no waiting), then close the link in order."""
    for i in range(n):
        tx.send(i)
    await _gateway[0].aclose()


async def wait_for_failure(arg: dict[str, Any]) -> None:
    """(Spawned in the test's mesh) wait on ``arg["port"]`` and report how
    it ended on ``arg["report"]``."""
    try:
        await arg["port"].recv()
    except meshipc.MeshError as exc:
        arg["report"].send([type(exc).__name__, str(exc)])


async def stop(code: int, report: Port) -> None:
    sys.stdout.flush()
    os._exit(code)


AGENT = {f.__name__: f for f in (echo, double, call, stream, count, back, size, hold, release, third,
                                 send_fd_here, collect, dump, goodbye, stop)}


async def quietly(coro: Any) -> None:
    """A command, whose ports may end under it when the link goes."""
    try:
        await coro
    except (ChannelClosed, PortFailed):
        pass


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
        _mesh.append(mesh)
        _gateway.append(gw)
        _info.append(info)
        with open(info, "w") as f:
            json.dump(identifying(mesh), f)
        tasks = set()
        try:
            async for cmd in agent:
                op, *args = cmd
                t = asyncio.ensure_future(quietly(AGENT[op](*args, agent)))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        except (ChannelClosed, PortFailed):
            pass
        await gw.aclose()


if __name__ == "__main__":
    meshipc.run(main())
