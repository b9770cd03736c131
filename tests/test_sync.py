"""``meshipc.sync``: a blocking call writes its request and reads its reply
in the calling thread (it drives the portal's loop), several threads at
once each get their own reply, the portal thread drives the loop between
calls, and the errors are the async API's: the service killed mid-call
(``NodeFailure``), a timeout, a hostile peer's oversized frame length, Ctrl-C.
Real processes: ``sync_client.py`` (a blocking client) and ``compat_peers.py``
(a service)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import struct
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import meshipc
import meshipc.sync
from meshipc import NodeFailure
from meshipc._wire import MAX_FRAME
from relutil import STEP, wait_until, within
from test_control import client, line
from test_reconnect import GONE, processes, service
from test_versions import peer

CLIENT = Path(__file__).with_name("sync_client.py")


def _calls(conn: meshipc.sync.SyncConnection, n: int) -> tuple[list[Any], set[int]]:
    """``n`` calls; the replies and the threads that ran the portal's loop for them."""
    replies = []
    drivers: set[int] = set()

    async def whose() -> int:
        return threading.get_ident()

    for i in range(n):
        replies.append(conn.call("echo", i, timeout=STEP))
        drivers.add(conn._portal.call(whose))
    return replies, drivers


@contextlib.asynccontextmanager
async def attached(runtime_dir: Path) -> AsyncIterator[meshipc.sync.SyncConnection]:
    """A blocking connection to ``test_reconnect.service``'s "svc", closed afterwards."""
    async with service(runtime_dir) as (_mesh, _echo):
        conn = await asyncio.to_thread(meshipc.sync.connect, "svc", runtime_dir=runtime_dir)
        try:
            yield conn
        finally:
            await asyncio.to_thread(conn.close)


async def test_a_call_is_written_and_read_by_the_calling_thread(runtime_dir: Path) -> None:
    async with attached(runtime_dir) as conn:
        before = conn.stats()

        def run() -> tuple[list[Any], set[int], int]:
            replies, drivers = _calls(conn, 20)
            return replies, drivers, threading.get_ident()

        replies, drivers, me = await within(asyncio.to_thread(run))
        assert replies == list(range(20))
        assert drivers == {me}  # the loop ran in the calling thread, not the portal's
        after = conn.stats()
        assert after.driven - before.driven == 40 and after.handed == before.handed == 0


async def test_a_blocking_call_from_inside_the_loop_it_drives_is_refused(runtime_dir: Path) -> None:
    async with attached(runtime_dir) as conn:

        async def nested() -> Any:
            return conn.call("echo", 1, timeout=STEP)  # blocking, on the loop's own thread

        with pytest.raises(meshipc.MeshError, match="would deadlock"):
            await within(asyncio.to_thread(conn._portal.call, nested))
        assert await within(asyncio.to_thread(conn.call, "echo", 2, STEP)) == 2


async def test_between_calls_the_portal_thread_drives_and_sees_the_service_go(runtime_dir: Path) -> None:
    """After a pause the portal thread drives the loop (the service leaving is
    noticed with no call made); a later call takes the loop back."""
    async with service(runtime_dir) as (_mesh, _echo):
        conn = await asyncio.to_thread(meshipc.sync.connect, "svc", runtime_dir=runtime_dir)
        try:
            assert await within(asyncio.to_thread(conn.call, "echo", 1, STEP)) == 1
            await wait_until(lambda: conn.stats().portal_runs > 0, "the portal thread drove the loop")
            s = conn.stats()
            assert await within(asyncio.to_thread(conn.call, "echo", 2, STEP)) == 2
            t = conn.stats()  # taken back from the portal thread
            assert t.driven + t.taken_over + t.handed == s.driven + s.taken_over + s.handed + 1
        except BaseException:
            await asyncio.to_thread(conn.close)
            raise
    try:
        gone = conn._conn._gone
        assert gone is not None
        await wait_until(gone.done, "the idle client noticed the service go")
        with pytest.raises(NodeFailure, match=GONE):
            await within(asyncio.to_thread(conn.call, "echo", 3, STEP))
    finally:
        await asyncio.to_thread(conn.close)


async def test_a_service_killed_mid_call_fails_the_call_with_node_failure(runtime_dir: Path) -> None:
    async with processes() as procs:
        svc = await peer(runtime_dir, "killed", "service")
        procs.append(svc)
        await line(svc)  # ready
        conn = await asyncio.to_thread(meshipc.sync.connect, "killed", runtime_dir=runtime_dir)
        try:
            assert (await within(asyncio.to_thread(conn.call, "echo", 1, STEP)))["req"] == 1
            held = asyncio.ensure_future(asyncio.to_thread(conn.call, "echo", "hold", None))
            assert await line(svc) == {"held": True}
            svc.send_signal(signal.SIGKILL)
            with pytest.raises(NodeFailure, match=GONE):
                await within(held)  # no timeout of its own: the death ends it
            with pytest.raises(NodeFailure, match=GONE):
                await within(asyncio.to_thread(conn.call, "echo", 2, STEP))
            assert conn.stats().driven >= 3
        finally:
            await asyncio.to_thread(conn.close)


async def test_a_timeout_leaves_the_connection_usable(runtime_dir: Path) -> None:
    async with attached(runtime_dir) as conn:
        with pytest.raises(TimeoutError):
            await within(asyncio.to_thread(conn.call, "echo", "hold", 0.2))
        assert await within(asyncio.to_thread(conn.call, "echo", 5, STEP)) == 5


async def test_eight_threads_at_once_each_get_their_own_replies(runtime_dir: Path) -> None:
    async with (
        service(runtime_dir) as (_mesh, _echo),
        client(runtime_dir, "svc", "threads", "8", "25", script=CLIENT) as proc,
    ):
        out = await line(proc)
        assert out == {"wrong": [], "errors": [], "calls": 200}
        stats = (await line(proc))["stats"]
        assert stats["driven"] + stats["handed"] + stats["taken_over"] >= 200
        assert stats["handed"] + stats["taken_over"] > 0  # they did overlap: another thread ran some
        assert await within(proc.wait(), STEP) == 0


async def test_an_oversized_frame_length_fails_the_call_not_the_client(runtime_dir: Path) -> None:
    """The service's node writes a frame length beyond ``MAX_FRAME`` on its
    link while a blocking call is in flight: the call fails at once with
    ``NodeFailure`` naming the protocol error (nothing waits for, or
    allocates, the announced bytes); the client process goes on and exits cleanly."""
    async with (
        service(runtime_dir) as (mesh, echo),
        client(runtime_dir, "svc", "hold", str(STEP * 3), script=CLIENT) as proc,
    ):
        await within(echo.held.wait())
        (link,) = mesh._node._links.values()
        link.sock.send(struct.pack("<I", MAX_FRAME + 1) + bytes(64))
        held = (await line(proc))["held"]
        assert held["error"] == "NodeFailure" and "protocol error" in held["message"], held
        assert f"frame length {MAX_FRAME + 1}" in held["message"]
        after = (await line(proc))["after"]
        assert after["error"] == "NodeFailure", after
        assert (await line(proc))["stats"]["driven"] >= 2
        assert await within(proc.wait(), STEP) == 0


async def test_ctrl_c_in_a_blocking_call_cancels_it_and_leaves_the_loop_whole(runtime_dir: Path) -> None:
    """SIGINT while the main thread drives the loop in a call: the call ends
    with ``KeyboardInterrupt``, and the next call on the connection works."""
    async with (
        service(runtime_dir) as (_mesh, echo),
        client(runtime_dir, "svc", "interrupt", script=CLIENT) as proc,
    ):
        await within(echo.held.wait())
        proc.send_signal(signal.SIGINT)
        assert await line(proc) == {"interrupted": True}
        assert await line(proc) == {"after": {"reply": "after"}}
        await line(proc)  # stats
        assert await within(proc.wait(), STEP) == 0
