"""``_far``: the far control plane (``FarServer`` backed by a mesh's
``ControlPlane``, ``FarPlane`` the client's side) over a local port pair;
over a real boundary link and TLS in ``test_tls_attach.py``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshipc import ChannelClosed, Mesh, MeshError, Port, RemoteError, ServiceNotFound
from meshipc._control import FACADE
from meshipc._far import MAX_FAR_INFLIGHT, FarPlane, FarReply, FarRequest, FarServer, ListServices
from relutil import within


async def double(x: int) -> int:
    return 2 * x


async def slow(x: float) -> float:
    await asyncio.sleep(x)
    return x


@contextlib.asynccontextmanager
async def far(runtime_dir: Path) -> AsyncIterator[tuple[Mesh, FarPlane, FarServer]]:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mesh.serve("double", double)
        mesh.serve("slow", slow)
        kept, first = Port.pair()
        server = FarServer(kept, mesh, "test")
        task = asyncio.get_running_loop().create_task(server.run())
        plane = FarPlane(first, "test")
        plane.start()
        try:
            yield mesh, plane, server
        finally:
            plane.close()
            await within(task)


def test_far_plane_has_every_facade_method() -> None:
    for name in FACADE:
        assert callable(getattr(FarPlane, name)), name


async def test_services_call_open_inspect(runtime_dir: Path) -> None:
    async with far(runtime_dir) as (_, plane, _):
        services = await within(plane.services())
        assert set(services) == {"double", "slow"}
        assert all("node" not in info for info in services.values())  # node ids stay home
        assert await within(plane.call("double", 21)) == 42
        tx = await within(plane.open("double"))
        assert await within(tx.call(5)) == 10
        tx.close()
        tree = await within(plane.inspect(depth=1))
        assert "nodes" in tree
        with pytest.raises(MeshError, match="sensitive"):
            await plane.inspect(sensitive=True)


async def test_errors_cross_as_their_kinds(runtime_dir: Path) -> None:
    async with far(runtime_dir) as (_, plane, _):
        with pytest.raises(ServiceNotFound):
            await within(plane.call("nope", 1))
        with pytest.raises(RemoteError) as info:
            await within(plane.call("double", "x" * 3))
        assert info.value.type_name == "TypeError" or "str" in str(info.value)
        with pytest.raises(TimeoutError):
            await within(plane.call("slow", 5.0, timeout=0.05))
        with pytest.raises(LookupError):
            await within(plane.inspect("no/such/path"))
        with pytest.raises(ValueError):
            await plane.call("double", 1, timeout=float("nan"))
        assert await within(plane.call("double", 1)) == 2  # still served


async def test_malformed_requests_are_dropped_and_the_client_served(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mesh.serve("double", double)
        kept, first = Port.pair()
        server = FarServer(kept, mesh, "test")
        task = asyncio.get_running_loop().create_task(server.run())
        for junk in (1, "x", {"id": "no"}, [1, 2], {"type": "req", "id": 1, "op": {"type": "bogus"}}):
            first.send(junk)
        first.send(FarRequest(7, ListServices()))
        reply: Any = await within(first.recv())
        assert isinstance(reply, FarReply) and reply.id == 7 and "double" in reply.value
        first.close()
        await within(task)  # the client left: the server ends


async def test_many_requests_at_once_stay_under_the_cap(runtime_dir: Path) -> None:
    async with far(runtime_dir) as (_, plane, server):
        calls = [plane.call("slow", 0.05) for _ in range(MAX_FAR_INFLIGHT * 2)]
        assert await within(asyncio.gather(*calls)) == [0.05] * (MAX_FAR_INFLIGHT * 2)
        assert server.served == MAX_FAR_INFLIGHT * 2


async def test_a_closed_far_side_fails_waiting_requests(runtime_dir: Path) -> None:
    async with far(runtime_dir) as (_, plane, server):
        waiting = asyncio.ensure_future(plane.call("slow", 5.0))
        await asyncio.sleep(0)
        server.close()
        with pytest.raises((ChannelClosed, MeshError)):
            await within(waiting)
        with pytest.raises((ChannelClosed, MeshError)):
            await within(plane.services())
