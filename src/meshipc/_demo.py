"""``meshipc demo``: the seed scenario end to end.

A named service mesh starts a worker process; a separate control client
process attaches to the running mesh, inspects and drives the worker
(pause / resume / status), hands it a file descriptor to write into, and
detaches; the service keeps running until the demo ends it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import msgspec

import meshipc


class Status(msgspec.Struct):
    pid: int
    paused: bool
    ticks: int


async def worker(control: meshipc.Receiver[Any]) -> None:
    """Counts ticks while not paused; answers control calls."""
    paused = False
    ticks = 0
    resumed = asyncio.Event()
    resumed.set()

    async def tick() -> None:
        nonlocal ticks
        while True:
            await resumed.wait()
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        async for call in control:
            req = call.request
            op = req.get("op") if isinstance(req, dict) else None
            if op == "status":
                call.reply(Status(os.getpid(), paused, ticks))
            elif op == "pause":
                paused = True
                resumed.clear()
                call.reply(Status(os.getpid(), paused, ticks))
            elif op == "resume":
                paused = False
                resumed.set()
                call.reply(Status(os.getpid(), paused, ticks))
            elif op == "write" and isinstance(req.get("fd"), meshipc.Fd):
                with req["fd"] as fd:
                    os.write(
                        fd.fileno(),
                        f"    (written by worker pid {os.getpid()} into the client's fd)\n".encode(),
                    )
                call.reply("written")
            else:
                call.fail(ValueError(f"unknown request {req!r}"))
    finally:
        ticker.cancel()


async def client(name: str, runtime_dir: str) -> None:
    """The control client: attaches by name, drives the worker, detaches."""
    t0 = time.perf_counter()
    async with meshipc.connect(name, runtime_dir=runtime_dir) as conn:
        ctl: meshipc.Sender[Any] = await conn.port.recv()
        st = await ctl.call({"op": "status"})
        attach_ms = (time.perf_counter() - t0) * 1000
        print(f"  client pid {os.getpid()}: attached to mesh {name!r} as node {conn.mesh.node_id}")
        print(f"  client: connect -> first reply took {attach_ms:.1f} ms")
        print(f"  client: worker status {st}")
        print(f"  client: pause -> {await ctl.call({'op': 'pause'})}")
        before = (await ctl.call({"op": "status"}))["ticks"]
        after = (await ctl.call({"op": "status"}))["ticks"]
        print(f"  client: paused, ticks stay at {before} -> {after}")
        print(f"  client: resume -> {await ctl.call({'op': 'resume'})}")
        sys.stdout.flush()
        await ctl.call({"op": "write", "fd": meshipc.Fd.dup(sys.stdout)})
        try:
            await ctl.call({"op": "reboot"})
        except meshipc.RemoteError as exc:
            print(f"  client: a bad request fails remotely: {exc.type_name}: {exc.message}")
        ctl.close()
    print("  client: detached")


async def service() -> int:
    runtime_dir = tempfile.mkdtemp(prefix="meshipc-demo-")
    name = f"demo-{os.getpid()}"
    async with meshipc.Mesh(name=name, runtime_dir=runtime_dir) as mesh:
        print(f"service pid {os.getpid()}: mesh {name!r} in {mesh.directory}")
        ctl_tx, ctl_rx = meshipc.channel()
        proc = await mesh.spawn("meshipc._demo:worker", ctl_rx, name="ticker")
        print(f"service: worker {proc.name!r} running as pid {proc.pid}")
        listener = await mesh.listen()
        print(f"service: listening for control clients on {listener.path}")
        cp = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshipc", "demo-client", name, "--runtime-dir", runtime_dir
        )
        try:
            conn = await asyncio.wait_for(listener.accept(), 30)
            print(f"service: control client attached (pid {conn.peer.pid}, uid {conn.peer.uid})")
            conn.port.send(ctl_tx.clone())  # the client drives the worker directly
            try:
                await conn.port.recv()
            except meshipc.ChannelClosed:
                print("service: control client detached")
            code = await asyncio.wait_for(cp.wait(), 30)
        finally:
            if cp.returncode is None:
                cp.kill()
                await cp.wait()
        st = await ctl_tx.call({"op": "status"})
        print(f"service: still running after the client left: {st}")
        ctl_tx.close()
        print(f"service: worker exited with code {await asyncio.wait_for(proc.wait(), 10)}")
    shutil.rmtree(runtime_dir, ignore_errors=True)
    print("service: mesh closed, demo done" if code == 0 else f"service: client failed ({code})")
    return code
