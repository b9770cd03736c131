"""Worker functions run at the far end of a carrier (``python -m
meshipc.remote``) by ``test_carrier.py`` and ``test_ssh.py``.

The far process imports this module by name: the tests put ``tests/`` on its
``PYTHONPATH``. Workers talk back only through mesh messages."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec

import meshipc
from meshipc import Call, Port, Receiver, Sender


async def echo(rx: Receiver[Call[Any]]) -> None:
    """Serve calls on ``rx``: reply with the request, unchanged."""
    async for call in rx:
        call.reply(call.request)


async def whoami(port: Port) -> None:
    """Answer once on ``port`` with what this far process sees: its pid,
    its mesh directory, ``print`` landing on stderr, then wait to be closed."""
    print("a stray print on the far side")
    mesh = meshipc.current_mesh()
    port.send({"pid": os.getpid(), "directory": str(mesh.directory)})
    async for _ in port:
        pass


async def fails(arg: Any) -> None:
    """Raise at once (the function started: ``Process.error``)."""
    raise ValueError(f"far failure {arg!r}")


async def count_to(arg: dict[str, Any]) -> None:
    """Send ``0 .. arg["n"]-1`` on ``arg["tx"]`` (a ``Sender[int]``), then close it."""
    tx: Sender[int] = arg["tx"]
    with tx:
        for i in range(arg["n"]):
            tx.send(i)


async def idle(arg: Any) -> None:
    """Print to stdout (which must land on stderr), then run until stopped."""
    print("a stray print on the far side", arg)
    await asyncio.Event().wait()


class Duplex(msgspec.Struct):
    """Both ways at once over the boundary: ``n`` typed values in and out,
    ``k`` calls in and out; the outcome on ``report``."""

    inbound: Receiver[int]
    outbound: Sender[int]
    calls_in: Receiver[Call[int]]
    calls_out: Sender[Call[int]]
    report: Sender[Any]
    n: int
    k: int


async def duplex(arg: Duplex) -> None:
    async def read() -> int:
        for i in range(arg.n):
            got = await arg.inbound.recv()
            if got != i:
                raise AssertionError(f"value {i} arrived as {got}")
        return arg.n

    async def write() -> int:
        for i in range(arg.n):
            arg.outbound.send(i)
            if i % 256 == 255:
                await arg.outbound.drain()
        return arg.n

    async def serve() -> int:
        served = 0
        async for call in arg.calls_in:
            call.reply(call.request + 1)
            served += 1
            if served == arg.k:
                break
        return served

    async def call() -> int:
        for i in range(arg.k):
            if await arg.calls_out.call(i) != 2 * i:
                raise AssertionError(f"call {i} got a wrong answer")
        return arg.k

    arg.report.send(await asyncio.gather(read(), write(), serve(), call()))


async def bounce(port: Port) -> None:
    """For each ``[receiver, count]`` on ``port``: read ``count`` values
    from the receiver, then send ``[receiver, the values]`` back."""
    async for rx, count in port:
        got = [await rx.recv() for _ in range(count)]
        port.send([rx, got])


async def call_through(arg: dict[str, Any]) -> None:
    """Call ``arg["tx"]`` with ``0 .. arg["n"]-1``; send the answers to ``arg["back"]``."""
    tx: Sender[Call[Any]] = arg["tx"]
    arg["back"].send([await tx.call(i) for i in range(arg["n"])])


async def hold_calls(arg: dict[str, Any]) -> None:
    """Send ``0 .. arg["n"]-1`` on ``arg["out"]``, then take calls on
    ``arg["rx"]`` and never answer them (the test cuts the link)."""
    out: Sender[int] = arg["out"]
    for i in range(arg["n"]):
        out.send(i)
        if i % 256 == 255:
            await out.drain()
    held = []
    async for call in arg["rx"]:
        held.append(call)


async def relay_calls(arg: dict[str, Any]) -> None:
    """A local worker: answer each call on ``arg["rx"]`` with ``arg["to"]``'s
    answer; a failed call fails the same way (the relay lives on)."""
    to: Sender[Call[Any]] = arg["to"]
    async for call in arg["rx"]:
        try:
            call.reply(await to.call(call.request))
        except meshipc.RemoteError as exc:
            call.fail(exc)


async def send_and_return(arg: dict[str, Any]) -> None:
    """Send ``0 .. arg["n"]-1`` on ``arg["out"]`` (more than a window: most
    wait on this side for credit), say so on ``arg["done"]`` and return at once."""
    out: Sender[int] = arg["out"]
    for i in range(arg["n"]):
        out.send(i)
    arg["done"].send(arg["n"])


async def spawn_far(arg: dict[str, Any]) -> None:
    """A local worker (not the mesh's root) that spawns a far echo through
    the carrier ``argv`` and answers ``arg["back"]`` with the far answer."""
    tx, rx = meshipc.channel(Call[Any])
    carrier = meshipc.command(arg["argv"], label="command:from-a-worker")
    proc = await meshipc.current_mesh().spawn("carrier_workers:echo", rx, via=carrier)
    arg["back"].send([await tx.call("via a worker"), proc.remote_pid != os.getpid()])
    tx.close()
    await proc.wait()


async def far_identity(arg: dict[str, Any]) -> None:
    """Send this far mesh's node id and socket path on ``arg["port"]`` (as
    data: the test then knows what to look for elsewhere), then echo the
    calls on ``arg["calls"]`` until the port closes."""
    mesh = meshipc.current_mesh()
    port: Port = arg["port"]
    port.send({"node": bytes(mesh.node_id), "path": mesh.stats().node.path})
    serving = asyncio.ensure_future(echo(arg["calls"]))
    async for _ in port:
        pass
    serving.cancel()
