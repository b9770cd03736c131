"""Clients that outlive a service restart: once the node an ``Attachment``
is attached to goes away, every later call raises ``NodeFailure`` saying so
and how to come back (never ``ChannelClosed``); ``connect(name,
reconnect=True)`` attaches again on the next call once a mesh of that name
runs again, within the call's timeout; calls in flight fail and are not
repeated. In-process meshes for the rules, real processes
(``compat_peers.py``) for a service killed and started again under sync
and async clients calling it in a loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import meshipc
from meshipc import Mesh, NodeFailure, Port, RemoteError, ServiceNotFound
from relutil import wait_until, within
from test_versions import line, peer

T = 10.0
#: What every call after the service went away says (without reconnect).
GONE = "the service went away"


class Echo:
    """A service's handler: answers its request, holds ``"hold"`` (setting
    ``held``), fails ``"fail"``; ``seen`` lists what it was asked."""

    def __init__(self) -> None:
        self.held = asyncio.Event()
        self.seen: list[Any] = []

    async def __call__(self, req: Any) -> Any:
        self.seen.append(req)
        if req == "hold":
            self.held.set()
            await asyncio.Event().wait()
        if req == "fail":
            raise ValueError("no")
        return req


@contextlib.asynccontextmanager
async def service(rd: Path, name: str = "svc") -> AsyncIterator[tuple[Mesh, Echo]]:
    echo = Echo()
    async with Mesh(name=name, runtime_dir=rd) as mesh:
        await mesh.listen()
        await mesh.serve("echo", echo)
        yield mesh, echo


async def hold(conn: meshipc.Attachment, echo: Echo) -> asyncio.Task[Any]:
    """A call in flight: it reached the service's handler, which holds it."""
    task = asyncio.create_task(conn.call("echo", "hold"))
    await within(echo.held.wait())
    return task


async def test_every_call_after_the_service_went_away_says_so_and_how_to_come_back(runtime_dir: Path) -> None:
    async with service(runtime_dir) as (mesh, echo):
        conn = await meshipc.connect("svc", runtime_dir=runtime_dir, timeout=T)
        sender = await conn.open("echo")
        assert await within(conn.call("echo", 1)) == 1
        held = await hold(conn, echo)
    # the service closed cleanly: its channels closed just before its node went
    with pytest.raises(NodeFailure, match=GONE) as err:
        await within(held)
    assert "meshipc.connect('svc')" in str(err.value) and "reconnect=True" in str(err.value)
    assert err.value.node == bytes(mesh.node_id).hex()
    for later in (
        conn.call("echo", 2, timeout=T),
        conn.services(),
        conn.open("echo"),
        conn.inspect(),
        conn.inspect_update("x", 1),
    ):
        with pytest.raises(NodeFailure, match=GONE):
            await within(later)
    with pytest.raises((meshipc.ChannelClosed, meshipc.PortFailed)):  # opened there: stays failed
        await within(sender.call(3))
    assert conn.reconnects == 0
    await conn.aclose()
    with pytest.raises(meshipc.MeshError, match="closed"):  # "you closed it" is not "it went away"
        await conn.services()


async def test_a_living_service_s_errors_pass_unchanged(runtime_dir: Path) -> None:
    async with service(runtime_dir) as (_mesh, _echo):
        async with meshipc.connect("svc", runtime_dir=runtime_dir, reconnect=True) as conn:
            with pytest.raises(RemoteError, match="no"):
                await within(conn.call("echo", "fail"))
            with pytest.raises(ServiceNotFound):
                await within(conn.call("nothing", 1))
            with pytest.raises(TimeoutError):
                await conn.call("echo", "hold", timeout=0.2)
            assert await within(conn.call("echo", 4)) == 4 and conn.reconnects == 0


async def test_reconnect_attaches_again_on_the_next_call_and_repeats_nothing(runtime_dir: Path) -> None:
    async with service(runtime_dir) as (_first, echo):
        conn = await meshipc.connect("svc", runtime_dir=runtime_dir, reconnect=True)
        old_port = conn.port
        assert await within(conn.call("echo", 1)) == 1
        held = await hold(conn, echo)
    with pytest.raises(NodeFailure, match="the next call attaches again"):
        await within(held)
    async with service(runtime_dir) as (second, echo2):
        # back within the call's timeout (a bounded wait, not a clock reading)
        assert await within(conn.call("echo", 2, timeout=T), T) == 2
        assert conn.reconnects == 1 and conn.port is not old_port
        assert echo2.seen == [2]  # the held call was not repeated
        assert set(await within(conn.services())) == {"echo"}
        assert conn.mesh.stats().node.link(bytes(second.node_id)) is not None
        assert await within(conn.call("echo", 3)) == 3 and conn.reconnects == 1
        await conn.aclose()


async def test_reconnect_is_bounded_by_the_call_s_timeout(runtime_dir: Path) -> None:
    async with service(runtime_dir) as (mesh, _echo):
        conn = await meshipc.connect("svc", runtime_dir=runtime_dir, reconnect=True)
        assert await within(conn.call("echo", 1)) == 1
    gone = bytes(mesh.node_id)
    await wait_until(lambda: conn.mesh.stats().node.link(gone) is None, "the client noticed")
    with pytest.raises(NodeFailure, match=r"no mesh 'svc' answered within 0.5 s"):
        await within(conn.call("echo", 2, timeout=0.5), T)  # generous: the bound is 0.5 s
    async with service(runtime_dir) as (_mesh, _echo):
        assert await within(conn.call("echo", 3, timeout=T)) == 3
        assert conn.reconnects == 1
        await conn.aclose()


async def test_an_attachment_by_invitation_says_to_join_again(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mesh.serve("echo", Echo())
        mine, theirs = Port.pair()
        conn = await meshipc.join(await mesh.inviter().invite(theirs), timeout=T)
        assert await within(conn.call("echo", 1)) == 1
    with pytest.raises(NodeFailure, match="join again with a new invitation"):
        await within(conn.call("echo", 2))
    await conn.aclose()
    mine.close()


# ---------------------------------------------------------------- real processes


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """The processes a test starts: killed and reaped on the way out."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in procs:
            await p.wait()


async def test_sync_and_async_clients_outlive_a_killed_and_restarted_service(runtime_dir: Path) -> None:
    """A service killed (SIGKILL) and started again under the same name while
    a sync and an async client call it in a loop, each with and without
    ``reconnect``: the call in flight fails with ``NodeFailure`` in all four,
    none hangs; with ``reconnect`` both recover within their call timeout
    (no other error, one reconnect); without it, the precise error."""
    rd = runtime_dir
    kinds = [("sync", "reconnect"), ("async", "reconnect"), ("sync", "once"), ("async", "once")]
    async with processes() as procs:
        first = await peer(rd, "restarted", "service")
        procs.append(first)
        ready = await line(first)
        clients = [await peer(rd, "restarted", "loop", api, how, str(T)) for api, how in kinds]
        procs.extend(clients)
        for c in clients:
            assert await line(c) == {"attached": ready["ready"]}
        for _ in clients:
            assert await line(first) == {"held": True}  # every client has a call in flight
        first.send_signal(signal.SIGKILL)
        await asyncio.wait_for(first.wait(), T)
        for c in clients:
            gone = (await line(c))["in_flight"]
            assert gone["error"] == "NodeFailure" and GONE in gone["message"], gone
        for c, (_api, how) in zip(clients, kinds, strict=True):
            if how == "once":
                later = (await line(c))["later"]
                assert later["error"] == "NodeFailure", later
                assert GONE in later["message"] and "meshipc.connect('restarted')" in later["message"]
        second = await peer(rd, "restarted", "service")
        procs.append(second)
        back = (await line(second))["ready"]
        for c, (api, how) in zip(clients, kinds, strict=True):
            if how == "reconnect":
                out = await line(c)
                assert out["recovered"] == back and out["errors"] == [] and out["reconnects"] == 1, (api, out)
                assert out["took"] < T, (api, out)
        for c in clients:
            assert await asyncio.wait_for(c.wait(), T) == 0
