"""The control plane: services by name, inspect, across real processes.

Clients are real attached processes (``ctl_client.py``), services are served
by the test's mesh, by spawned workers (``ctl_workers.py``) and by attached
clients. Every wait is bounded; nothing synchronizes by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import meshipc
from attachutil import key_material
from meshipc import Mesh
from relutil import wait_until, within

CLIENT = Path(__file__).with_name("ctl_client.py").resolve()
T = 10.0
#: Bound on a client process's answer (a Python start, an attach and a request:
#: well under a second normally, several seconds on a machine at full load).
PROC_T = 30.0


@contextlib.asynccontextmanager
async def client(
    rd: Path, name: str, *args: str, script: Path = CLIENT
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``SCRIPT RD NAME ARGS`` (by default ``ctl_client.py``); killed and
    reaped on the way out."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        os.fspath(script),
        os.fspath(rd),
        name,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


async def line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None and proc.stderr is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), PROC_T)
    if not raw:
        err = await asyncio.wait_for(proc.stderr.read(), T)
        raise AssertionError(f"client exited without output:\n{err.decode()}")
    out: dict[str, Any] = json.loads(raw)
    return out


async def run_client(rd: Path, name: str, *args: str) -> dict[str, Any]:
    """Run a one-shot client mode and return its one result line."""
    async with client(rd, name, *args) as proc:
        out = await line(proc)
        await asyncio.wait_for(proc.wait(), PROC_T)
        return out


async def double(request: Any) -> Any:
    return request * 2


async def fails(request: Any) -> Any:
    raise ValueError(f"bad request {request!r}")


# ------------------------------------------------------------------ services


async def test_call_service_from_attached_process(runtime_dir: Path) -> None:
    async with Mesh(name="s1", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("double", double, request_type=int)
        out = await run_client(runtime_dir, "s1", "call", "double", "21", "5")
        assert out == {"reply": 42}
        out = await run_client(runtime_dir, "s1", "services")
        assert out["reply"]["double"]["node"] == bytes(mesh.node_id).hex()
        assert out["reply"]["double"]["request_type"] == "int"
        # a request of the wrong type is refused on arrival
        out = await run_client(runtime_dir, "s1", "call", "double", '"x"')
        assert out["error"] == "RemoteError" and out["type_name"] == "MessageError"
        # many calls over one opened sender
        out = await run_client(runtime_dir, "s1", "calls", "double", "4", "50")
        assert out == {"reply": 8}


async def test_unknown_service_and_handler_error(runtime_dir: Path) -> None:
    async with Mesh(name="s2", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("fails", fails)
        out = await run_client(runtime_dir, "s2", "call", "nope", "1")
        assert out["error"] == "ServiceNotFound" and out["service"] == "nope"
        assert "'nope'" in out["message"]
        out = await run_client(runtime_dir, "s2", "call", "fails", "7")
        assert out["error"] == "RemoteError" and out["type_name"] == "ValueError"
        assert "bad request 7" in out["message"]
        # in process too
        with pytest.raises(meshipc.ServiceNotFound):
            await mesh.call("nope", 1)
        with pytest.raises(meshipc.RemoteError):
            await mesh.call("fails", 1)


async def test_names_are_unique_per_mesh(runtime_dir: Path) -> None:
    async with Mesh(name="s3", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("one", double)
        with pytest.raises(meshipc.ServiceNameInUse):
            mesh.serve("one", double)
        async with meshipc.connect("s3", runtime_dir=runtime_dir) as conn:
            svc = conn.mesh.serve("one", double)
            with pytest.raises(meshipc.ServiceNameInUse):
                await asyncio.wait_for(svc, T)
            # a free name registered by the attached node, called from the root
            svc2 = conn.mesh.serve("two", double)
            await asyncio.wait_for(svc2, T)
            assert await mesh.call("two", 5) == 10
            svc2.close()
            await asyncio.wait_for(svc2.wait_closed(), T)
        # the client left: its name is free again
        with pytest.raises(meshipc.ServiceNotFound):
            await asyncio.wait_for(mesh.call("two", 5), T)
        mesh.serve("two", double)
        assert await mesh.call("two", 1) == 2


async def test_worker_service_reached_by_attached_client_then_node_dies(runtime_dir: Path) -> None:
    async with Mesh(name="s4", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        ready_tx, ready_rx = meshipc.channel()
        proc = await mesh.spawn("ctl_workers:serve_named", {"name": "w", "ready": ready_tx}, name="svc")
        try:
            assert await asyncio.wait_for(ready_rx.recv(), T) is True
            out = await run_client(runtime_dir, "s4", "call", "w", '{"x": 1}', "5")
            assert out == {"reply": {"from": proc.pid, "request": {"x": 1}}}
            assert (await mesh.services())["w"]["node"] != bytes(mesh.node_id).hex()
            # a second worker may not take the name
            ready2_tx, ready2_rx = meshipc.channel()
            proc2 = await mesh.spawn("ctl_workers:serve_named", {"name": "w", "ready": ready2_tx})
            assert "ServiceNameInUse" in await asyncio.wait_for(ready2_rx.recv(), T)
            assert await asyncio.wait_for(proc2.wait(), T) == 0
            proc.kill()
            await asyncio.wait_for(proc.wait(), T)
            with pytest.raises(meshipc.NodeFailure) as ei:
                await asyncio.wait_for(mesh.call("w", 1), T)
            # the node and its cause are named once (not "node X failed: ... node X failed: ...")
            assert str(ei.value).count("failed") == 1 and "'w'" in str(ei.value), ei.value
            # a timeout says what did not answer in how long
            async def hang(request: Any) -> Any:
                await asyncio.Event().wait()

            mesh.serve("hang", hang)
            with pytest.raises(TimeoutError, match=r"no answer from service 'hang' within 0\.2 s"):
                await mesh.call("hang", 1, timeout=0.2)
            out = await run_client(runtime_dir, "s4", "call", "w", "1")
            assert out["error"] == "NodeFailure", out
        finally:
            proc.kill()


async def test_deadline_travels_and_giving_up_reaches_the_callee(runtime_dir: Path) -> None:
    async with Mesh(name="s5", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        tx, rx = meshipc.channel()
        mesh.serve("slow", rx)
        async with client(runtime_dir, "s5", "call", "slow", '"hi"', "5") as proc:
            call = await asyncio.wait_for(rx.recv(), T)
            assert isinstance(call, meshipc.ServiceCall) and call.request == "hi"
            assert call.deadline is not None and call.deadline - time.monotonic() <= 5
            call.reply(call.remaining)
            out = await line(proc)
            assert 0 <= out["reply"] <= 5
        async with client(runtime_dir, "s5", "call", "slow", '"late"', "0.3") as proc:
            call = await asyncio.wait_for(rx.recv(), T)
            assert call.deadline is not None and call.deadline - time.monotonic() <= 0.3
            await asyncio.wait_for(call.wait_cancelled(), T)  # the caller gave up
            assert call.cancelled
            out = await line(proc)
            assert out["error"] == "TimeoutError"
        # without a timeout there is no deadline
        async with client(runtime_dir, "s5", "call", "slow", "1") as proc:
            call = await asyncio.wait_for(rx.recv(), T)
            assert call.deadline is None and call.remaining is None
            call.reply("ok")
            assert await line(proc) == {"reply": "ok"}
        # a sender from open() carries deadlines too
        svc = await mesh.open("slow")
        assert isinstance(svc, meshipc.ServiceSender)
        pending = asyncio.create_task(svc.call("again", timeout=5))
        call = await asyncio.wait_for(rx.recv(), T)
        assert call.request == "again" and call.deadline is not None
        call.reply(1)
        assert await asyncio.wait_for(pending, T) == 1
        svc.close()
        tx.close()


async def test_handler_is_cancelled_when_the_caller_gives_up(runtime_dir: Path) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    async def hang(request: Any) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    async with Mesh(name="s6", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("hang", hang)
        async with client(runtime_dir, "s6", "call", "hang", "1", "0.3") as proc:
            await asyncio.wait_for(started.wait(), T)
            assert (await line(proc))["error"] == "TimeoutError"
            await asyncio.wait_for(stopped.wait(), T)


async def test_a_long_call_among_quick_ones_is_still_cancelled_when_its_caller_gives_up(
    runtime_dir: Path,
) -> None:
    # one timer watches every running call (issue 24: not one per call): a
    # call that starts while that timer waits for quick calls that ended is
    # still watched, and its handler cancelled once its caller gives up
    started, stopped = asyncio.Event(), asyncio.Event()

    async def handler(request: Any) -> Any:
        if request == "hang":
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                stopped.set()
        return request

    async with Mesh(name="s6b", runtime_dir=runtime_dir) as mesh:
        svc = mesh.serve("mixed", handler)
        await asyncio.wait_for(svc, T)
        tx = await mesh.open("mixed")
        for i in range(20):
            assert await asyncio.wait_for(tx.call(i), T) == i
        caller = asyncio.create_task(tx.call("hang"))  # no timeout: no deadline to end it
        await asyncio.wait_for(started.wait(), T)
        caller.cancel()  # the caller gives up: only the watcher can tell the handler
        await asyncio.wait_for(stopped.wait(), T)
        assert await asyncio.wait_for(tx.call("after"), T) == "after"
        assert svc.snapshot()["active"] == 0
        tx.close()


async def test_a_handler_that_answers_at_once_takes_no_task_and_one_that_waits_keeps_one(
    runtime_dir: Path,
) -> None:
    # issue 24: the service's reader runs a handler up to where it first
    # waits; one that returns then is answered with no task of its own. One
    # that waits goes on in the task it started in (its asyncio.timeout,
    # entered before it waited, cancels that task, not the reader), and
    # every call runs in a context of its own
    var: contextvars.ContextVar[Any] = contextvars.ContextVar("var", default=None)

    async def handler(request: Any) -> Any:
        leaked = var.get()
        var.set(request)  # never reset: must not reach the next call
        if request != "wait":
            return [request, leaked]
        first = asyncio.current_task()
        try:
            async with asyncio.timeout(0.05):
                await asyncio.Event().wait()
        except TimeoutError:
            return [asyncio.current_task() is first, leaked, var.get()]
        return "not timed out"

    async with Mesh(name="s6c", runtime_dir=runtime_dir) as mesh:
        svc = mesh.serve("quick", handler)
        await asyncio.wait_for(svc, T)
        tx = await mesh.open("quick")
        assert await asyncio.wait_for(tx.call(0), T) == [0, None]
        loop = asyncio.get_running_loop()
        made: list[Any] = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            made.append(coro)
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)
        try:
            async with asyncio.timeout(T):  # (no task of its own, as wait_for's)
                for i in range(1, 41):
                    assert await tx.call(i) == [i, None]
        finally:
            loop.set_task_factory(None)
        assert len(made) < 10, made  # (one a call before: the reader's)
        assert await asyncio.wait_for(tx.call("wait"), T) == [True, None, "wait"]
        assert await asyncio.wait_for(tx.call("wait", timeout=T), T) == [True, None, "wait"]
        assert await asyncio.wait_for(tx.call(41), T) == [41, None]
        assert svc.snapshot()["active"] == 0
        tx.close()


async def test_service_registered_by_attached_client_called_by_another(runtime_dir: Path) -> None:
    async with Mesh(name="s7", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        async with client(runtime_dir, "s7", "serve", "hello") as server:
            assert await line(server) == {"ready": True}
            out = await run_client(runtime_dir, "s7", "call", "hello", "[1, 2]", "5")
            assert out == {"reply": {"from": server.pid, "request": [1, 2]}}


# ------------------------------------------------------------------ inspect


async def test_inspect_after_known_activity(runtime_dir: Path) -> None:
    async with Mesh(name="i1", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("double", double)
        out = await run_client(runtime_dir, "i1", "calls", "double", "3", "25")
        assert out == {"reply": 6}
        tree = await mesh.inspect()
        json.dumps(tree)  # plain data
        me = bytes(mesh.node_id).hex()
        assert tree["mesh"]["name"] == "i1" and tree["mesh"]["root"] == me
        node = tree["nodes"][me]
        assert node["pid"] == os.getpid() and node["role"] == "service"
        assert node["services"]["double"]["calls"] == {"$counter": 25}
        assert node["attached"] == {"$counter": 1}
        assert tree["services"]["double"]["node"] == me
        # the same tree from an attached client: nodes, path, depth
        out = await run_client(runtime_dir, "i1", "inspect", f"nodes/{me[:8]}/services/double", "-", "1")
        assert out["reply"]["calls"] == {"$counter": 25}
        out = await run_client(runtime_dir, "i1", "inspect", "nodes/nothere", "-", "1")
        assert out["error"] == "LookupError" and out["message"] == "no inspect entry 'nodes/nothere'"
        out = await run_client(runtime_dir, "i1", "inspect", "", "1", "1")
        assert out["reply"]["nodes"] == {"$more": 2}  # the root and this client
        assert "$more" in out["reply"]["mesh"]
        out = await run_client(runtime_dir, "i1", "inspect", "", "2", "1")
        assert out["reply"]["mesh"]["name"] == "i1" and len(out["reply"]["nodes"]) == 2
        out = await run_client(runtime_dir, "i1", "inspect", "", "-", "1")
        nodes = out["reply"]["nodes"]
        clients = [n for n in nodes.values() if n.get("role") == "client"]
        assert len(clients) == 1 and clients[0]["name"] == "ctl_client.py"
        conn = nodes[me]["connections"][clients[0]["id"]]
        assert conn["bytes_in"]["$counter"] > 0 and conn["messages_out"]["$counter"] > 0
        assert conn["messages_in"]["$counter"] > 0


async def test_inspect_with_a_stopped_worker_is_partial_and_bounded(runtime_dir: Path) -> None:
    async with Mesh(name="i2", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        ready_tx, ready_rx = meshipc.channel()
        proc = await mesh.spawn("ctl_workers:idle", ready_tx, name="sleepy")
        stopped = False
        try:
            assert await asyncio.wait_for(ready_rx.recv(), T) == proc.pid
            tree = await mesh.inspect(timeout=T)
            worker = [n for n in tree["nodes"].values() if n["pid"] == proc.pid]
            assert len(worker) == 1 and worker[0]["mood"] == {"calm": True}
            assert worker[0]["role"] == "worker" and worker[0]["name"] == "sleepy"
            os.kill(proc.pid, signal.SIGSTOP)
            stopped = True
            # bounded by its own timeout (a hang fails at T): the worker is unresolved
            tree = await asyncio.wait_for(mesh.inspect(timeout=0.3), T)
            (wid,) = [k for k, n in tree["nodes"].items() if n["pid"] == proc.pid]
            entry = tree["nodes"][wid]
            assert "no answer within 0.3 s" in entry["$unresolved"]
            assert entry["name"] == "sleepy" and entry["role"] == "worker"
            assert (
                tree["nodes"][bytes(mesh.node_id).hex()]["workers"][f"sleepy-{proc.pid}"]["state"]
                == "running"
            )
            # the same from an attached client
            out = await run_client(runtime_dir, "i2", "inspect", "", "-", "0.3")
            assert "$unresolved" in out["reply"]["nodes"][wid]
        finally:
            if stopped:
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()


async def test_sensitive_entries_are_hidden_and_private_keys_never_show(runtime_dir: Path) -> None:
    async with Mesh(name="i3", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.inspect_add("jobs", lambda: {"queued": 3})

        async def token() -> str:
            return "hunter2"

        mesh.inspect_add("token", token, sensitive=True)

        async def stuck() -> None:
            await asyncio.Event().wait()

        mesh.inspect_add("stuck", stuck)
        with pytest.raises(ValueError):
            mesh.inspect_add("jobs", lambda: 1)
        me = bytes(mesh.node_id).hex()
        tree = await asyncio.wait_for(mesh.inspect(timeout=0.5), T)  # "stuck" does not hold it up
        assert tree["nodes"][me]["jobs"] == {"queued": 3}
        assert "no answer within" in tree["nodes"][me]["stuck"]["$unresolved"]
        assert "hunter2" not in json.dumps(tree)
        assert await mesh.inspect(f"nodes/{me}/token", sensitive=True) == "hunter2"
        dumped = json.dumps(await mesh.inspect(sensitive=True, timeout=0.2))
        assert "hunter2" in dumped
        for key in key_material(mesh):
            assert key.hex() not in dumped
        with pytest.raises(LookupError):
            await mesh.inspect("nodes/zzzz")


class Point(msgspec.Struct):
    x: int
    y: int


async def test_typed_service_checks_its_reply(runtime_dir: Path) -> None:
    async def good(p: Point) -> Point:
        return Point(p.y, p.x)

    async def bad(p: Point) -> Any:
        return "not a point"

    async with Mesh(name="t1", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("swap", good, request_type=Point, reply_type=Point)
        mesh.serve("bad", bad, request_type=Point, reply_type=Point)
        out = await run_client(runtime_dir, "t1", "call", "swap", '{"x": 1, "y": 2}', "5")
        assert out == {"reply": {"x": 2, "y": 1}}
        out = await run_client(runtime_dir, "t1", "call", "bad", '{"x": 1, "y": 2}', "5")
        assert out["error"] == "RemoteError" and "invalid reply" in out["message"]
        # a Call[T] receiver: its calls are checked against T and carry the deadline
        tx, rx = meshipc.channel(meshipc.Call[Point])
        mesh.serve("typed", rx)
        async with client(runtime_dir, "t1", "call", "typed", '{"x": 3, "y": 4}', "5") as proc:
            call = await asyncio.wait_for(rx.recv(), T)
            assert call.request == Point(3, 4) and call.deadline is not None
            call.reply(call.request.x + call.request.y)
            assert await line(proc) == {"reply": 7}
        out = await run_client(runtime_dir, "t1", "call", "typed", '{"x": "no"}', "5")
        assert out["error"] == "RemoteError" and "invalid request" in out["message"]
        tx.close()


# ------------------------------------------------------------------ blocking API


async def test_blocking_client_in_another_process(runtime_dir: Path) -> None:
    async with Mesh(name="b1", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("double", double)
        mesh.serve("fails", fails)
        assert await run_client(runtime_dir, "b1", "sync-call", "double", "[1]") == {"reply": [1, 1]}
        out = await run_client(runtime_dir, "b1", "sync-call", "fails", "1")
        assert out["error"] == "RemoteError" and out["type_name"] == "ValueError"
        out = await run_client(runtime_dir, "b1", "sync-call", "nope", "1")
        assert out["error"] == "ServiceNotFound"


def _hammer(conn: meshipc.sync.SyncConnection, k: int) -> list[int]:
    return [conn.call("double", k * 100 + i, timeout=T) for i in range(20)]


def _inside_a_running_loop(rd: Path) -> Any:
    """What a Jupyter cell does: blocking calls while this thread's loop runs."""

    async def cell() -> Any:
        asyncio.get_running_loop()  # a loop runs in this thread
        with meshipc.sync.connect("b2", runtime_dir=rd) as conn:
            with conn.open("double") as tx:
                many = [tx.call(i) for i in range(5)]
            conn.port.send("hello from a cell")
            return conn.call("double", 21), many, sorted(conn.services()), conn.inspect("mesh/name")

    return asyncio.run(cell())


async def test_blocking_client_from_four_threads_and_inside_a_running_loop(runtime_dir: Path) -> None:
    async with Mesh(name="b2", runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        mesh.serve("double", double)
        conn = await asyncio.to_thread(meshipc.sync.connect, "b2", runtime_dir=runtime_dir)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(asyncio.to_thread(_hammer, conn, k) for k in range(4))), T * 3
            )
            for k, r in enumerate(results):
                assert r == [2 * (k * 100 + i) for i in range(20)]
        finally:
            await asyncio.to_thread(conn.close)
        conn.close()  # twice is fine
        with pytest.raises(meshipc.MeshError):
            conn.call("double", 1)
        reply, many, names, name = await asyncio.wait_for(
            asyncio.to_thread(_inside_a_running_loop, runtime_dir), T
        )
        assert reply == 42 and many == [0, 2, 4, 6, 8] and names == ["double"] and name == "b2"
        # the port of the second client carried its message to the listener's side
        await asyncio.wait_for(listener.accept(), T)  # the first client's
        second = await asyncio.wait_for(listener.accept(), T)
        assert await asyncio.wait_for(second.port.recv(), T) == "hello from a cell"


async def test_blocking_connect_to_a_missing_mesh_raises(runtime_dir: Path) -> None:
    with pytest.raises(meshipc.ConnectError):
        await asyncio.to_thread(meshipc.sync.connect, "missing", runtime_dir=runtime_dir)
    assert not [t for t in __import__("threading").enumerate() if t.name == "meshipc-portal"]


# ------------------------------------------------------------------ the meshipc command


async def cli(rd: Path, *args: str) -> tuple[int, str, str]:
    """``python -m meshipc ARGS --runtime-dir RD``: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshipc",
        *args,
        "--runtime-dir",
        os.fspath(rd),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), T)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_status_inspect_call_against_a_live_mesh(runtime_dir: Path) -> None:
    async with Mesh(name="c1", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("double", double, request_type=int)
        mesh.serve("fails", fails)
        mesh.inspect_add("jobs", lambda: {"queued": 2})
        ready_tx, ready_rx = meshipc.channel()
        proc = await mesh.spawn("ctl_workers:idle", ready_tx, name="idler")
        try:
            await asyncio.wait_for(ready_rx.recv(), T)
            me = bytes(mesh.node_id).hex()

            code, out, err = await cli(runtime_dir, "status", "c1")
            assert code == 0, err
            assert "mesh       c1" in out and f"pid        {os.getpid()}" in out
            assert f"idler  pid {proc.pid}  running" in out
            assert "double  on c1" in out and "int -> any" in out
            code, out, _ = await cli(runtime_dir, "status", "c1", "--json")
            status = json.loads(out)
            assert code == 0 and status["nodes"] == 2 and set(status["services"]) == {"double", "fails"}
            assert status["roles"] == {"service": 1, "worker": 1}

            code, out, _ = await cli(runtime_dir, "inspect", "c1")
            assert code == 0 and "nodes: {3 more" in out  # the root, the worker and this client
            code, out, _ = await cli(runtime_dir, "inspect", "c1", f"nodes/{me[:10]}", "-r")
            assert code == 0 and "jobs:\n  queued: 2" in out and "role: service" in out
            code, out, _ = await cli(runtime_dir, "inspect", "c1", "-j", "-l", "3")
            tree = json.loads(out)
            assert code == 0 and tree["nodes"][me]["jobs"] == {"$more": 1}
            code, out, _ = await cli(
                runtime_dir, "inspect", "c1", f"nodes/{me}/services/double", "-j", "-t", "2"
            )
            assert code == 0 and json.loads(out)["calls"] == {"$counter": 0}
            code, out, _ = await cli(
                runtime_dir,
                "inspect",
                "c1",
                f"nodes/{me}",
                "-r",
                "-p",
                "--period",
                "0.05",
                "--count",
                "2",
                "-j",
            )
            polls = [json.loads(x) for x in out.splitlines()]
            assert code == 0 and len(polls) == 2 and polls[0]["rates"] is None
            assert "bytes_in" in json.dumps(polls[1]["rates"])  # counters became rates
            code, out, err = await cli(runtime_dir, "inspect", "c1", "nodes/nothere")
            assert (
                code == 1
                and out == ""
                and err.strip() == "meshipc inspect: no inspect entry 'nodes/nothere' in mesh 'c1'"
            )

            code, out, _ = await cli(runtime_dir, "call", "c1", "double", "21")
            assert code == 0 and json.loads(out) == 42
            code, out, err = await cli(runtime_dir, "call", "c1", "nope", "1")
            assert code == 1 and out == "" and len(err.splitlines()) == 1 and "no service named 'nope'" in err
            code, _, err = await cli(runtime_dir, "call", "c1", "fails", "1")
            assert code == 1 and "ValueError: bad request 1" in err and "Traceback" not in err
            code, _, err = await cli(runtime_dir, "call", "c1", "double", "{oops")
            assert code == 2 and "not valid JSON" in err
            code, _, err = await cli(runtime_dir, "call", "c1", "nope", "1", "--debug")
            assert code != 0 and "Traceback" in err
        finally:
            proc.kill()


async def test_cli_missing_and_stale_mesh(runtime_dir: Path) -> None:
    code, out, err = await cli(runtime_dir, "status", "ghost")
    assert code == 1 and out == ""
    assert err.strip() == (
        f"meshipc status: no mesh named 'ghost' is running for uid {os.getuid()} "
        f"(runtime dir {runtime_dir}); see `meshipc ls`"
    )
    for cmd in (["inspect", "ghost"], ["call", "ghost", "svc"]):
        code, _, err = await cli(runtime_dir, *cmd)
        assert code == 1 and "no mesh named 'ghost'" in err and "Traceback" not in err
    # a mesh that was killed leaves its directory behind
    owner = await asyncio.create_subprocess_exec(
        sys.executable,
        os.fspath(Path(__file__).with_name("attach_client.py")),
        "named",
        os.fspath(runtime_dir),
        "stale",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert owner.stdout is not None
        assert b"directory" in await asyncio.wait_for(owner.stdout.readline(), T)
    finally:
        owner.kill()
        await owner.wait()
    code, _, err = await cli(runtime_dir, "status", "stale")
    assert code == 1 and "mesh 'stale' is not accepting clients" in err and "meshipc ls" in err


async def test_cli_against_a_stopped_mesh_gives_up_in_time(runtime_dir: Path) -> None:
    owner = await asyncio.create_subprocess_exec(
        sys.executable,
        os.fspath(Path(__file__).with_name("attach_client.py")),
        "named",
        os.fspath(runtime_dir),
        "frozen",
        stdout=asyncio.subprocess.PIPE,
    )
    stopped = False
    try:
        assert owner.stdout is not None
        assert b"directory" in await asyncio.wait_for(owner.stdout.readline(), T)
        os.kill(owner.pid, signal.SIGSTOP)
        stopped = True
        code, out, err = await cli(runtime_dir, "status", "frozen", "-t", "0.5")
        assert code == 1 and out == "" and "did not let us attach within 2 s" in err, err
    finally:
        if stopped:
            os.kill(owner.pid, signal.SIGCONT)
        owner.kill()
        await owner.wait()


async def test_cli_help_has_text_for_every_command_and_option(runtime_dir: Path) -> None:
    for cmd in ([], ["status"], ["inspect"], ["call"], ["demo"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshipc", *cmd, "--help", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), T)
        text = out.decode()
        assert proc.returncode == 0 and "usage: meshipc" in text
        assert "SUPPRESS" not in text and "demo-client" not in text, text
        lines = text.splitlines()
        for i, ln in enumerate(lines):
            if ln.startswith("  -"):  # an option: its help on the same line or the next
                same = len([p for p in ln.strip().split("  ") if p]) > 1
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                assert same or (nxt.startswith(" " * 10) and nxt.strip()), (ln, text)


async def test_inspect_counts_what_was_sent_and_not_read(runtime_dir: Path) -> None:
    async with Mesh(name="i4", runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        async with meshipc.connect("i4", runtime_dir=runtime_dir) as conn:
            server = await asyncio.wait_for(listener.accept(), T)
            await asyncio.wait_for(conn.services(), T)  # its control session is up
            me, them = bytes(mesh.node_id).hex(), bytes(conn.mesh.node_id).hex()
            before = (await mesh.inspect(f"nodes/{them}/ports", timeout=T))["unconsumed_out_messages"]
            for _ in range(10):
                conn.port.send(b"x" * 1000)
            tree: dict[str, Any] = {}

            async def all_queued() -> bool:  # no event says "arrived but unread"
                nonlocal tree
                tree = await mesh.inspect(timeout=T)
                return bool(tree["nodes"][me]["ports"]["queued_messages"] >= 10)

            await wait_until(all_queued, "10 messages queued on the service's node", T)
            mine, theirs = tree["nodes"][me], tree["nodes"][them]
            assert mine["ports"]["queued_messages"] == 10
            assert mine["ports"]["queued_bytes"] >= 10 * 1000
            assert theirs["ports"]["unconsumed_out_messages"] == before + 10
            assert theirs["ports"]["unconsumed_out_bytes"] >= 10 * 1000
            assert mine["connections"][them]["bytes_in"]["$counter"] >= 10 * 1000
            assert theirs["connections"][me]["bytes_out"]["$counter"] >= 10 * 1000
            for _ in range(10):
                assert await asyncio.wait_for(server.port.recv(), T) == b"x" * 1000
            tree = await mesh.inspect(f"nodes/{me}/ports")
            assert tree["queued_messages"] == 0


async def test_inspect_update_of_updatable_entries(runtime_dir: Path) -> None:
    async with Mesh(name="u1", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        ready_tx, ready_rx = meshipc.channel()
        proc = await mesh.spawn("ctl_workers:idle", ready_tx, name="levels")
        try:
            await asyncio.wait_for(ready_rx.recv(), T)
            tree = await mesh.inspect(timeout=T)
            (wid,) = [k for k, n in tree["nodes"].items() if n["pid"] == proc.pid]
            assert tree["nodes"][wid]["level"] == "info"
            assert await mesh.inspect_update(f"nodes/{wid[:8]}/level", "debug") == "debug"
            assert await mesh.inspect(f"nodes/{wid}/level") == "debug"
            with pytest.raises(meshipc.RemoteError, match="not a level"):
                await mesh.inspect_update(f"nodes/{wid}/level", "loud")
            with pytest.raises(LookupError, match="no updatable inspect entry 'mood'"):
                await mesh.inspect_update(f"nodes/{wid}/mood", 1)
            code, out, _ = await cli(runtime_dir, "inspect", "u1", f"nodes/{wid}/level", "-u", "warning")
            assert code == 0 and out.strip() == "warning"
            code, out, _ = await cli(runtime_dir, "inspect", "u1", f"nodes/{wid}/level", "-j")
            assert code == 0 and json.loads(out) == "warning"
            code, _, err = await cli(runtime_dir, "inspect", "u1", f"nodes/{wid}/mood", "-u", "1")
            assert code == 1 and "no updatable inspect entry 'mood'" in err
        finally:
            proc.kill()


async def test_concurrent_calls_show_as_active_then_all_answer(runtime_dir: Path) -> None:
    release = asyncio.Event()
    arrived = 0
    all_in = asyncio.Event()

    async def gated(request: Any) -> Any:
        nonlocal arrived
        arrived += 1
        if arrived == 30:
            all_in.set()
        await release.wait()
        return request

    async with Mesh(name="p1", runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        mesh.serve("gated", gated)
        async with meshipc.connect("p1", runtime_dir=runtime_dir) as conn:
            await asyncio.wait_for(listener.accept(), T)
            calls = [asyncio.create_task(conn.call("gated", i, timeout=T)) for i in range(30)]
            await asyncio.wait_for(all_in.wait(), T)
            me = bytes(mesh.node_id).hex()
            svc = await conn.inspect(f"nodes/{me}/services/gated", timeout=T)
            assert svc["active"] == 30 and svc["calls"] == {"$counter": 30}
            assert svc["oldest_active_age"] >= 0
            release.set()
            assert await asyncio.wait_for(asyncio.gather(*calls), T) == list(range(30))
            svc = await conn.inspect(f"nodes/{me}/services/gated", timeout=T)
            assert svc["active"] == 0 and svc["oldest_active_age"] is None


async def test_blocking_port_recv_with_timeout(runtime_dir: Path) -> None:
    async with Mesh(name="b3", runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        conn = await asyncio.to_thread(meshipc.sync.connect, "b3", runtime_dir=runtime_dir)
        try:
            server = await asyncio.wait_for(listener.accept(), T)
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(conn.port.recv, 0.05)
            server.port.send({"hello": 1})
            assert await asyncio.to_thread(conn.port.recv, T) == {"hello": 1}
            server.port.close()
            with pytest.raises(meshipc.ChannelClosed):
                await asyncio.to_thread(conn.port.recv, T)
        finally:
            await asyncio.to_thread(conn.close)


SERVICE_THAT_LEAVES = """
import asyncio, sys, meshipc
async def main():
    async with meshipc.Mesh(name="gone", runtime_dir=sys.argv[1]) as mesh:
        async def echo(request):
            return request
        mesh.serve("echo", echo)
        listener = await mesh.listen()
        print("ready", flush=True)
        await listener.accept()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
meshipc.run(main())
"""


async def test_a_call_on_an_attachment_whose_service_left_says_so(runtime_dir: Path) -> None:
    """Issue 17 item 8: the service an attachment was on exited; the next
    call says its process exited (before: "the receiver is closed")."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVICE_THAT_LEAVES,
        os.fspath(runtime_dir),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert await within(proc.stdout.readline()) == b"ready\n"
        async with meshipc.connect("gone", runtime_dir=runtime_dir) as conn:
            assert await within(conn.call("echo", 1, timeout=5)) == 1
            proc.stdin.write(b"leave\n")
            await within(proc.wait())
            # ChannelClosed if the service's close of its port came first,
            # NodeFailure if the link's end did: either says why
            with pytest.raises((meshipc.ChannelClosed, meshipc.NodeFailure), match="exited"):
                await within(conn.call("echo", 2, timeout=5))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ------------------------------------------------------------------ typed registry replies and the façade


def test_registry_replies_are_checked_against_their_types() -> None:
    """A reply the root sends is a typed record: plain data that is not one
    (an untyped dict of the old protocol, a wrong field, an id that is not
    hex, an oversized reason or credential) is a ``MessageError``."""
    from meshipc._control_msgs import (
        CREDENTIAL_LEN,
        MAX_REASON,
        Credential,
        Gone,
        LookupReply,
        MintReply,
        NameInUse,
        RegisterReply,
        ServiceList,
        as_reply,
    )

    node = "ab" * 16
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(Gone(node, "it died")))
    assert as_reply(wire, LookupReply, "lookup") == Gone(node, "it died")
    assert as_reply(NameInUse(node), RegisterReply, "registration") == NameInUse(node)
    good = {
        "type": "ServiceList",
        "services": {"s": {"node": node, "request_type": None, "reply_type": "int", "since": 1.0}},
    }
    assert as_reply(good, ServiceList, "service list").services["s"].reply_type == "int"
    bad = [
        ({"status": "ok", "sender": 1}, LookupReply),
        ({"type": "Found", "sender": 1}, LookupReply),
        ({"type": "Gone", "node": "zz" * 16, "reason": "x"}, LookupReply),
        ({"type": "Gone", "node": node, "reason": "x" * (MAX_REASON + 1)}, LookupReply),
        ({"ok": True}, RegisterReply),
        ({"type": "NameInUse", "node": 7}, RegisterReply),
        ({"credential": b"k"}, MintReply),
        ({"type": "Credential", "credential": b"k" * (CREDENTIAL_LEN + 1)}, MintReply),
        ({"type": "ServiceList", "services": {"bad name/": good["services"]["s"]}}, ServiceList),
        ([1, 2, 3], ServiceList),
        (None, MintReply),
    ]
    for value, tp in bad:
        with pytest.raises(meshipc.MessageError, match="malformed"):
            as_reply(value, tp, "x")
    assert isinstance(as_reply(Credential(b"k"), MintReply, "credential"), Credential)


async def test_a_malformed_reply_from_the_root_raises_message_error(runtime_dir: Path) -> None:
    """The root answers every registry request with plain data that is not
    the reply's type (sent over the link): each client method raises
    ``MessageError`` naming the reply, and the client and the root keep
    working once the root answers properly again."""
    async with Mesh(name="mr1", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        async with meshipc.connect("mr1", runtime_dir=runtime_dir) as conn:
            assert await within(conn.services()) == {}
            registry = mesh._control.registry
            assert registry is not None
            junk: dict[str, Any] = {
                "ListServices": {"double": {"node": "x"}},  # the old untyped list, and wrong
                "Lookup": {"status": "ok", "sender": "not a sender"},
                "Register": {"ok": True},
                "Mint": {"credential": b"\0" * 8},
            }
            registry.op = lambda req, node: junk.get(type(req).__name__)  # type: ignore[method-assign]
            with pytest.raises(meshipc.MessageError, match="malformed service list reply"):
                await within(conn.services())
            with pytest.raises(meshipc.MessageError, match="malformed lookup reply"):
                await within(conn.open("double"))
            with pytest.raises(meshipc.MessageError, match="malformed lookup reply"):
                await within(conn.call("double", 1))
            svc = conn.mesh.serve("mine", double)
            with pytest.raises(meshipc.MessageError, match="malformed registration reply"):
                await within(svc)
            with pytest.raises(meshipc.MessageError, match="malformed credential reply"):
                await within(conn.mesh._control.mint())
            del registry.op  # the root's own again
            mesh.serve("double", double)
            assert await within(conn.call("double", 4)) == 8
            assert set(await within(conn.services())) == {"double"}


def test_the_control_plane_methods_are_declared_once() -> None:
    """``Mesh``, ``Attachment`` and the blocking ``SyncConnection`` show the
    same control-plane methods, declared once in ``ControlPlane`` (the
    blocking ones with the same parameters and documentation)."""
    import inspect as pyinspect

    from meshipc._control import FACADE, ControlPlane
    from meshipc.sync import SyncConnection

    for name in FACADE:
        fn = getattr(ControlPlane, name)
        assert fn.__doc__ and "Raises" in fn.__doc__
        assert getattr(Mesh, name) is fn and getattr(meshipc.Attachment, name) is fn
        blocking = getattr(SyncConnection, name)
        assert blocking.__doc__ == fn.__doc__
        params = list(pyinspect.signature(fn).parameters)
        assert list(pyinspect.signature(blocking).parameters) == params
    with pytest.warns(DeprecationWarning, match="earlier name of meshipc.Attachment"):
        assert meshipc.ClientConnection is meshipc.Attachment


async def test_each_control_plane_method_on_all_three_holders(runtime_dir: Path) -> None:
    """services, call, open, inspect and inspect_update work the same on the
    root's ``Mesh``, an ``Attachment`` and a blocking ``SyncConnection``."""
    from meshipc._control import FACADE

    async with Mesh(name="fc1", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("double", double)
        knob = {"v": 1}
        mesh.inspect_add("knob", lambda: knob["v"], update=lambda v: knob.update(v=v))
        entry = f"nodes/{bytes(mesh.node_id).hex()[:12]}/knob"
        seen: list[str] = []

        async def use(holder: Any) -> None:
            assert set(await holder.services()) == {"double"}
            assert await holder.call("double", 3, timeout=T) == 6
            tx = await holder.open("double")
            assert await tx.call(5, timeout=T) == 10
            tx.close()
            assert (await holder.inspect(entry, timeout=T)) == knob["v"]
            assert await holder.inspect_update(entry, knob["v"] + 1, timeout=T) == knob["v"]
            seen.extend(FACADE)

        def use_blocking() -> None:
            with meshipc.sync.connect("fc1", runtime_dir=runtime_dir) as conn:
                assert set(conn.services()) == {"double"}
                assert conn.call("double", 3, timeout=T) == 6
                with conn.open("double") as tx:
                    assert tx.call(5, timeout=T) == 10
                assert conn.inspect(entry, timeout=T) == knob["v"]
                assert conn.inspect_update(entry, knob["v"] + 1, timeout=T) == knob["v"]
                seen.extend(FACADE)

        await within(use(mesh), T)
        async with meshipc.connect("fc1", runtime_dir=runtime_dir) as conn:
            await within(use(conn), T)
        await within(asyncio.to_thread(use_blocking), T)
        assert knob["v"] == 4 and len(seen) == 3 * len(FACADE)


