"""The gateway over real processes: a far process with its own mesh
(``gateway_peer.py``) joined to the test's mesh by a boundary link over a
socketpair (``gateway_util.far_peer``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import meshipc
from gateway_util import far_peer
from meshipc import Call, LinkFailure, Mesh, NodeFailure, Port, Receiver, Sender
from relutil import within

pytestmark = pytest.mark.timeout(60)


async def test_stream_both_ways_in_order(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        n = 20000
        tx, rx = meshipc.channel(int)
        far.agent.send(["count", rx, "up"])
        for i in range(n):
            tx.send(i)
            if i % 512 == 0:
                await tx.drain()
        tx.close()
        _, _, got, total, in_order, err = await far.report("counted")
        assert (got, total, in_order, err) == (n, n * (n - 1) // 2, True, None)

        tx2, rx2 = meshipc.channel(int)
        far.agent.send(["stream", tx2, n])
        seen = [v async for v in rx2]
        assert seen == list(range(n))


async def test_calls_both_ways(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        tx: Sender[Any]
        rx: Receiver[Call[Any]]
        tx, rx = meshipc.channel()
        far.agent.send(["double", rx])
        assert [await within(tx.call(i)) for i in range(200)] == [2 * i for i in range(200)]

        stx, srx = meshipc.channel()

        async def serve() -> None:
            async for c in srx:
                c.reply(c.request + 1000)

        server = asyncio.ensure_future(serve())
        far.agent.send(["call", stx, 300, "back"])
        _, _, total = await far.report("called")
        assert total == sum(i + 1000 for i in range(300))
        server.cancel()


async def test_ports_cross_and_come_back(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        a, b = Port.pair()
        far.agent.send(["back", b])
        _, b2 = await far.report("back")
        assert isinstance(b2, Port)
        # b went across and came back as another port, still peered with a
        for i in range(100):
            a.send(i)
        assert [await within(b2.recv()) for _ in range(100)] == list(range(100))
        b2.send("up")
        assert await within(a.recv()) == "up"
        # a port inside a port's message, while streaming on it
        c, d = Port.pair()
        far.agent.send(["echo", d])
        e, f = Port.pair()
        c.send(["inner", f])
        for i in range(50):
            c.send(i)
        tag, f2 = await within(c.recv())
        assert tag == "inner" and isinstance(f2, Port)
        assert [await within(c.recv()) for _ in range(50)] == list(range(50))
        e.send("through twice")
        assert await within(f2.recv()) == "through twice"
        c.close()
        assert far.gw.stats().relays >= 1


async def test_a_third_process_is_a_peer(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        tx, rx = meshipc.channel()
        worker = await mesh.spawn("workers:whoami", rx)
        far.agent.send(["third", tx, 20])
        _, got = await far.report("third")
        assert [v for _, v in got] == list(range(20))
        assert {pid for pid, _ in got} == {worker.pid}
        worker.kill()
        await worker.wait()


async def test_far_process_killed_fails_every_crossing_port(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        _tx, rx = meshipc.channel()
        far.agent.send(["hold", rx])
        await far.report("holding")
        p, q = Port.pair()
        far.agent.send(["hold", q])
        await far.report("holding")
        far.proc.kill()
        with pytest.raises(LinkFailure) as info:
            await within(p.recv())
        assert isinstance(info.value, NodeFailure)
        assert "test:far" in str(info.value) and "may or may not" in str(info.value)
        with pytest.raises(NodeFailure):
            await within(far.agent.recv())
        cause = await within(far.gw.wait_closed())
        assert isinstance(cause, LinkFailure)
