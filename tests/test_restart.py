"""Restarting workers, real processes: ``Process.restart`` hands a worker's
state (its ports, and what is queued at them) to a successor started from
the code now on disk; ``spawn(restart=...)`` starts a worker that exited
again, with backoff and a limit.

The workers are ``tests/restart_workers.py``, copied under a fresh module
name into a private folder (``swappable``) so that a test can rewrite the
module between restarts.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshipc
from meshipc import PortFailed, RestartError, RestartPolicy, SpawnError
from relutil import STEP, private_dir, wait_until, within

#: Messages streamed through the five restarts (the soak test streams 200,000).
STREAM = 20_000
TINY = RestartPolicy("on-failure", initial=0.01, cap=0.2, max_restarts=3, window=60)


class Swappable:
    """``restart_workers.py`` as a module of its own in a private folder on
    ``sys.path`` (the workers inherit it), to be rewritten on disk."""

    def __init__(self, folder: Path) -> None:
        self.name = f"rw_{secrets.token_hex(4)}"
        self.path = folder / f"{self.name}.py"
        self.source = (Path(__file__).parent / "restart_workers.py").read_text()
        self.path.write_text(self.source)
        self.mod = importlib.import_module(self.name)

    def target(self, func: str) -> str:
        return f"{self.name}:{func}"

    def write(self, text: str) -> None:
        # a fresh size and no cached bytecode: the next import reads this text
        shutil.rmtree(self.path.parent / "__pycache__", ignore_errors=True)
        self.path.write_text(text)

    def set_version(self, v: int) -> None:
        self.write(self.source.replace("VERSION = 1\n", f"VERSION = {v}\n" + "#" * v + "\n"))

    def break_import(self) -> None:
        self.write(self.source + '\nraise RuntimeError("broken at import")\n')


@pytest.fixture
def swappable(monkeypatch: pytest.MonkeyPatch) -> Iterator[Swappable]:
    with private_dir("rw") as d:
        monkeypatch.syspath_prepend(str(d))
        sw = Swappable(d)
        try:
            yield sw
        finally:
            sys.modules.pop(sw.name, None)


async def stream_through_restarts(runtime_dir: Path, sw: Swappable, total: int, restarts: int) -> None:
    """A sender streams ``total`` numbered items and a caller makes calls
    while the worker is restarted ``restarts`` times, each time into a new
    version of its module: every item arrives once, in order; every call
    is answered; each successor runs the version on disk."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        items_tx, items_rx = meshipc.channel(sw.mod.Item)
        calls_tx, calls_rx = meshipc.channel(meshipc.Call[int])
        out_tx, out_rx = meshipc.channel()
        state = sw.mod.State(items=items_rx, calls=calls_rx, out=out_tx)
        proc = await mesh.spawn(sw.target("stream"), state, name="streamer")
        name, key, pids = proc.name, proc.key, [proc.pid]
        up = await within(out_rx.recv())
        assert up == ["up", 1, proc.pid, 0]

        # chunk 0 goes before the first restart, chunk k + 1 while restart k
        # runs, the last chunk after the last restart
        per = total // (restarts + 2)
        gates = [asyncio.Event() for _ in range(restarts + 1)]

        async def send_all() -> None:
            for c in range(restarts + 2):
                if c:
                    await gates[c - 1].wait()
                for n in range(c * per, total if c == restarts + 1 else (c + 1) * per):
                    items_tx.send(sw.mod.Item(n))
                    if n % 512 == 0:
                        await items_tx.drain()

        answers: list[Any] = []
        stop_calls = asyncio.Event()

        async def call_loop() -> None:
            i = 0
            while not stop_calls.is_set():
                answers.append((i, await within(calls_tx.call(i))))
                i += 1

        reached = [asyncio.Event() for _ in range(restarts)]
        ups: list[list[Any]] = []
        got: list[int] = []
        versions: list[int] = []

        async def consume() -> None:
            while len(got) < total:
                m = await out_rx.recv()
                if m[0] == "up":
                    ups.append(m)
                    continue
                versions.append(m[0])
                got.append(m[1])
                if len(got) % per == 0 and len(got) // per <= restarts:
                    reached[len(got) // per - 1].set()

        sender = asyncio.ensure_future(send_all())
        caller = asyncio.ensure_future(call_loop())
        consumer = asyncio.ensure_future(consume())
        try:
            for k in range(restarts):
                await within(reached[k].wait(), 60)
                sw.set_version(k + 2)
                gates[k].set()  # the sender goes on while the worker restarts
                await within(proc.restart(timeout=STEP), 60)
                assert proc.restarts == k + 1 and proc.name == name and proc.key == key
                assert proc.pid not in pids
                pids.append(proc.pid)
            gates[restarts].set()
            await within(consumer, 120)
            await within(sender)
            stop_calls.set()
            await within(caller)
        finally:
            for t in (sender, caller, consumer):
                t.cancel()
        assert got == list(range(total)), "lost, duplicated or reordered items"
        assert versions == sorted(versions) and versions[-1] == restarts + 1
        assert [u[1] for u in ups] == list(range(2, restarts + 2))  # each successor's code on disk
        assert [u[2] for u in ups] == pids[1:]
        assert all(u[3] <= total for u in ups) and ups == sorted(ups, key=lambda u: u[3])
        assert [a[1][1] for a in answers] == [a[0] for a in answers] and len(answers) > restarts
        events = [e["kind"] for e in proc.restart_events]
        assert events == ["restart"] * restarts
        tree = await mesh.inspect(f"nodes/{bytes(mesh.node_id).hex()}/workers/{key}")
        assert tree["restarts"] == restarts and tree["pid"] == proc.pid and tree["state"] == "running"


async def test_five_restarts_into_new_code_lose_nothing(runtime_dir: Path, swappable: Swappable) -> None:
    await stream_through_restarts(runtime_dir, swappable, STREAM, 5)


@pytest.mark.soak
async def test_five_restarts_during_200k_messages(runtime_dir: Path, swappable: Swappable) -> None:
    await stream_through_restarts(runtime_dir, swappable, 200_000, 5)


async def test_a_worker_that_does_not_return_is_killed_at_the_deadline(
    runtime_dir: Path, swappable: Swappable
) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        out_tx, out_rx = meshipc.channel()
        proc = await mesh.spawn(swappable.target("hang"), out_tx)
        assert (await within(out_rx.recv()))[0] == "up"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(RestartError, match=r"did not return its state within 0\.3 s") as info:
            await within(proc.restart(timeout=0.3))
        assert 0.3 <= loop.time() - t0 < STEP
        assert info.value.name == proc.name
        assert await within(proc.wait()) == -signal.SIGKILL
        assert proc.error is info.value and proc.restarts == 0
        with pytest.raises(PortFailed):  # the port it held failed with it
            await within(out_rx.recv())
        with pytest.raises(meshipc.MeshError, match="has exited"):
            await proc.restart()


async def test_a_worker_that_raises_instead_of_handing_over(runtime_dir: Path, swappable: Swappable) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        out_tx, out_rx = meshipc.channel()
        proc = await mesh.spawn(swappable.target("raise_on_restart"), out_tx)
        await within(out_rx.recv())
        with pytest.raises(RestartError, match="restart failed: it raised") as info:
            await within(proc.restart())
        assert isinstance(info.value.__cause__, meshipc.RemoteError)
        assert "refusing to restart" in str(info.value.__cause__)
        assert await within(proc.wait()) == 1


async def spawn_stream(mesh: meshipc.Mesh, sw: Swappable) -> tuple[meshipc.Process, Any, Any, Any]:
    """A ``stream`` worker, up; its items and calls senders and its output."""
    items_tx, items_rx = meshipc.channel(sw.mod.Item)
    calls_tx, calls_rx = meshipc.channel(meshipc.Call[int])
    out_tx, out_rx = meshipc.channel()
    state = sw.mod.State(items=items_rx, calls=calls_rx, out=out_tx)
    proc = await mesh.spawn(sw.target("stream"), state)
    assert (await within(out_rx.recv()))[0] == "up"
    return proc, items_tx, calls_tx, out_rx


async def test_a_successor_that_fails_at_import_leaves_the_worker_running(
    runtime_dir: Path, swappable: Swappable
) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        proc, items_tx, calls_tx, out_rx = await spawn_stream(mesh, swappable)
        pid = proc.pid
        swappable.break_import()
        with pytest.raises(SpawnError, match="broken at import") as info:
            await within(proc.restart())
        assert "broken at import" in info.value.traceback
        # the worker was not asked: it runs on, with its ports
        assert proc.pid == pid and proc.restarts == 0 and not proc.restarting
        items_tx.send(swappable.mod.Item(0))
        assert await within(out_rx.recv()) == [1, 0]
        assert await within(calls_tx.call(7)) == [1, 7]
        swappable.set_version(3)  # fixed on disk: the next restart goes through
        await within(proc.restart())
        assert (await within(out_rx.recv()))[:2] == ["up", 3] and proc.restarts == 1
        assert [e["kind"] for e in proc.restart_events] == ["restart-failed", "restart"]


async def test_a_successor_that_rejects_the_state_ends_its_ports(
    runtime_dir: Path, swappable: Swappable
) -> None:
    """The new code's annotation does not accept the old state: the restart
    raises ``SpawnError`` saying so, and the senders to the state's ports
    learn that their receiver is gone instead of hanging (the successor
    refused the message that carried them)."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        proc, items_tx, calls_tx, _out_rx = await spawn_stream(mesh, swappable)
        swappable.write(swappable.source.replace("    seen: int = 0\n", "    seen: str = ''\n"))
        with pytest.raises(SpawnError, match="does not match the annotation of stream") as info:
            await within(proc.restart())
        with pytest.raises((PortFailed, meshipc.ChannelClosed)):
            await within(calls_tx.call(1))
        with pytest.raises((PortFailed, meshipc.ChannelClosed)):
            for _ in range(1000):
                items_tx.send(swappable.mod.Item(1))
                await within(items_tx.drain())
        assert await within(proc.wait()) == 1 and proc.error is info.value


async def test_a_cancelled_restart_still_hands_over(runtime_dir: Path, swappable: Swappable) -> None:
    """Once asked, the state is on its way: cancelling the caller does not
    strand it; a second restart meanwhile is refused."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        items_tx, items_rx = meshipc.channel(swappable.mod.Item)
        _calls_tx, calls_rx = meshipc.channel(meshipc.Call[int])
        out_tx, out_rx = meshipc.channel()
        state = swappable.mod.State(items=items_rx, calls=calls_rx, out=out_tx)
        proc = await mesh.spawn(swappable.target("stream"), state)
        first = (await within(out_rx.recv()))[2]
        items_tx.send(swappable.mod.Item(0))
        restart = asyncio.ensure_future(proc.restart())
        await wait_until(lambda: proc.restarting, "the restart under way")
        with pytest.raises(meshipc.MeshError, match="restarting already"):
            await proc.restart()
        restart.cancel()
        items_tx.send(swappable.mod.Item(1))
        seen = [await within(out_rx.recv()) for _ in range(3)]
        ups = [m for m in seen if m[0] == "up"]
        assert [m for m in seen if m[0] != "up"] == [[1, 0], [1, 1]]  # once each, in order
        assert len(ups) == 1 and ups[0][2] != first and ups[0][3] in (1, 2)
        await wait_until(lambda: not proc.restarting, "the restart to end")
        assert proc.restarts == 1 and proc.pid == ups[0][2] and restart.cancelled()


async def test_restart_outside_a_worker_and_bad_arguments(runtime_dir: Path, swappable: Swappable) -> None:
    with pytest.raises(meshipc.MeshError, match=r"worker started by Mesh\.spawn"):
        await meshipc.restarting()
    with pytest.raises(ValueError, match="restart must be one of"):
        RestartPolicy("sometimes")
    with pytest.raises(ValueError, match="initial"):
        RestartPolicy(initial=-1)
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, _rx = meshipc.channel()
        with pytest.raises(ValueError, match="holds no Port"):
            await mesh.spawn(swappable.target("hang"), tx, restart="on-failure")
        with pytest.raises(ValueError, match="restart must be one of"):
            await mesh.spawn(swappable.target("exit_with"), 0, restart="sometimes")
        # an argument its annotation refuses: a SpawnError, not a worker waiting for ever
        with pytest.raises(SpawnError, match="does not match the annotation of stream"):
            await within(mesh.spawn(swappable.target("stream"), "not a State"))
        proc = await mesh.spawn(swappable.target("hang"), tx)
        with pytest.raises(ValueError, match="timeout"):
            await proc.restart(timeout=0)
        proc.kill()
        await within(proc.wait())


async def who(mesh: meshipc.Mesh, service: str, proc: meshipc.Process) -> list[int]:
    """The pid and version of the worker serving ``service``, once ``proc``
    runs that pid (the registry may still name its predecessor for a moment)."""
    got: list[int] = []

    async def serving() -> bool:
        try:
            got[:] = await mesh.call(service, None, timeout=STEP)
        except (meshipc.ServiceNotFound, meshipc.PortFailed, meshipc.ChannelClosed):
            return False
        return got[0] == proc.pid

    await wait_until(serving, f"{service} served by pid {proc.pid}")
    return got


async def test_sigkill_three_times_restarts_with_growing_delays(
    runtime_dir: Path, swappable: Swappable
) -> None:
    policy = RestartPolicy("on-failure", initial=0.02, cap=1.0, max_restarts=5, window=60)
    async with meshipc.Mesh(name=f"rs{secrets.token_hex(3)}", runtime_dir=runtime_dir) as mesh:
        proc = await mesh.spawn(swappable.target("serve_pid"), "svc", restart=policy)
        await mesh.listen()  # for `meshipc status`
        assert await who(mesh, "svc", proc) == [proc.pid, 1]
        for k in range(3):
            old = proc.pid
            os.kill(old, signal.SIGKILL)
            await wait_until(lambda k=k: proc.restarts == k + 1, f"restart {k + 1}")
            assert proc.pid != old and proc.returncode is None
            assert (await who(mesh, "svc", proc))[0] == proc.pid
        events = list(proc.restart_events)
        assert [e["kind"] for e in events] == ["crash-restart"] * 3
        assert [e["delay"] for e in events] == [0.02, 0.04, 0.08]
        assert all("killed by signal 9" in e["reason"] for e in events)
        tree = await mesh.inspect(f"nodes/{bytes(mesh.node_id).hex()}/workers/{proc.key}")
        assert tree["restarts"] == 3 and tree["pid"] == proc.pid
        assert [e["delay"] for e in tree["restart_events"]] == [0.02, 0.04, 0.08]
        code, out = await meshipc_status(mesh, runtime_dir)
        assert code == 0, out
        assert f"serve_pid  pid {proc.pid}  running  restarts 3" in out, out
        proc.kill()
        assert await within(proc.wait()) == -signal.SIGKILL and proc.restarts == 3


async def meshipc_status(mesh: meshipc.Mesh, runtime_dir: Path) -> tuple[int, str]:
    cp = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshipc",
        "status",
        str(mesh.name),
        "--runtime-dir",
        str(runtime_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await within(cp.communicate(), 30)
    finally:
        if cp.returncode is None:
            cp.kill()
            await cp.wait()
    return cp.returncode or 0, out.decode()


async def test_a_restart_loop_stops_at_the_limit(
    runtime_dir: Path, swappable: Swappable, caplog: pytest.LogCaptureFixture
) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        proc = await mesh.spawn(swappable.target("serve_pid"), "svc", restart=TINY)
        await who(mesh, "svc", proc)
        swappable.break_import()
        caplog.set_level(logging.ERROR, logger="meshipc")
        os.kill(proc.pid, signal.SIGKILL)
        code = await within(proc.wait())
        assert code == 1  # the last attempt's exit: it failed at import
        assert isinstance(proc.error, RestartError)
        assert "stopped restarting after 3 restarts within 60 s" in str(proc.error)
        assert "broken at import" in str(proc.error)
        assert isinstance(proc.error.__cause__, SpawnError)
        assert proc.restarts == 0  # none of the successors started
        kinds = [e["kind"] for e in proc.restart_events]
        assert kinds == ["gave-up"]
        lines = [r for r in caplog.records if "stopped restarting" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.ERROR


async def test_always_restarts_a_clean_exit_and_never_does_not(
    runtime_dir: Path, swappable: Swappable
) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        policy = RestartPolicy("always", initial=0.0, max_restarts=2)
        proc = await mesh.spawn(swappable.target("exit_with"), 0, restart=policy)
        assert await within(proc.wait()) == 0
        assert proc.restarts == 2 and isinstance(proc.error, RestartError)
        proc = await mesh.spawn(swappable.target("exit_with"), 0, restart=TINY)  # on-failure
        assert await within(proc.wait()) == 0 and proc.restarts == 0 and proc.error is None
        proc = await mesh.spawn(swappable.target("exit_with"), 5)  # never
        assert await within(proc.wait()) == 5 and proc.restarts == 0


async def test_closing_the_mesh_ends_a_worker_waiting_to_restart(
    runtime_dir: Path, swappable: Swappable
) -> None:
    policy = RestartPolicy("on-failure", initial=30.0)
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        proc = await mesh.spawn(swappable.target("serve_pid"), "svc", restart=policy)
        await who(mesh, "svc", proc)
        os.kill(proc.pid, signal.SIGKILL)
        await wait_until(lambda: proc._restarting is not None, "a restart waiting out its delay")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
    assert loop.time() - t0 < 20  # the mesh closed without waiting out the 30 s delay
    assert proc.returncode == -signal.SIGKILL and proc.restarts == 0


async def test_closing_the_mesh_during_a_restart(runtime_dir: Path, swappable: Swappable) -> None:
    """The mesh closes without waiting out the restart's deadline; the
    restart says it failed; no worker is left behind."""
    loop = asyncio.get_running_loop()
    before = set(children())
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        out_tx, out_rx = meshipc.channel()
        proc = await mesh.spawn(swappable.target("hang"), out_tx)
        await within(out_rx.recv())
        restart = asyncio.ensure_future(proc.restart(timeout=30))
        await wait_until(lambda: proc._run._asked, "the worker asked to restart")
        t0 = loop.time()
    assert loop.time() - t0 < 20  # not the restart's 30 s
    with pytest.raises(RestartError, match="restart failed"):
        await within(restart)
    assert proc.returncode is not None and proc.restarts == 0
    await wait_until(lambda: set(children()) <= before, "the successor that never got a state to exit")


def children() -> list[str]:
    """This process's child processes (Linux)."""
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        return f.read().split()
