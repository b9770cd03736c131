"""``meshipc demo``: the seed scenario end to end.

A named service mesh starts a worker process that registers the service
``ticker``; a separate control client process attaches to the running mesh,
lists the services, inspects the mesh, drives the worker through the
service (pause / resume with numbers that show it), hands it a file
descriptor to write into, calls a request that fails on purpose, and
detaches; the service keeps running until the demo ends it. Then a second
worker is restarted into new code (its module rewritten on disk) while
numbers stream through it, none lost or reordered. Each step is
one line with its timing; the exit status is 0 only if every step worked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import meshipc

#: Seconds the client watches the ticker while paused, and after resuming.
WATCH = 0.3
#: Numbers streamed through the worker that restarts into new code.
STREAM = 2000

#: The worker that restarts: written into the demo's folder, then rewritten
#: (a new VERSION) while numbers stream through it.
COUNTER = """\
import asyncio

import meshipc

VERSION = {version}


async def relay(state):
    async def work():
        async for n in state["numbers"]:
            state["out"].send([VERSION, n])

    task = asyncio.ensure_future(work())
    await meshipc.restarting()  # the parent called proc.restart()
    task.cancel()  # recv() is safe to cancel: a number not taken stays queued
    await asyncio.wait({{task}})
    return state  # its channels, with what is queued in them: the successor's argument
"""


async def worker(ready: meshipc.Sender[Any]) -> None:
    """Counts ticks while not paused; serves ``ticker`` for the whole mesh."""
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

    def status() -> dict[str, Any]:
        return {"pid": os.getpid(), "paused": paused, "ticks": ticks}

    async def handle(req: Any) -> Any:
        nonlocal paused
        op = req.get("op") if isinstance(req, dict) else None
        if op == "status":
            return status()
        if op == "pause":
            paused = True
            resumed.clear()
            return status()
        if op == "resume":
            paused = False
            resumed.set()
            return status()
        if op == "write" and isinstance(req.get("fd"), meshipc.Fd):
            with req["fd"] as fd:
                os.write(
                    fd.fileno(),
                    f"    (written by worker pid {os.getpid()} into the client's fd)\n".encode(),
                )
            return "written"
        raise ValueError(f"unknown request {req!r}")

    ticker = asyncio.create_task(tick())
    mesh = meshipc.current_mesh()
    mesh.inspect_add("ticker", status)
    svc = mesh.serve("ticker", handle)
    try:
        await svc
        ready.send(True)
        await svc.wait_closed()
    finally:
        ticker.cancel()


class _Steps:
    """Prints one line per step with its duration."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def done(self, text: str, shows: str = "") -> None:
        now = time.perf_counter()
        print(f"  client: {text}  [{(now - self.t) * 1000:.1f} ms]", flush=True)
        if shows:
            print(f"          = {shows}", flush=True)
        self.t = now


async def client(name: str, runtime_dir: str) -> None:
    """The control client: attaches by name, uses services and inspect, detaches."""
    step = _Steps()
    async with meshipc.connect(name, runtime_dir=runtime_dir) as conn:
        step.done(
            f"pid {os.getpid()} attached to mesh {name!r} as node {conn.mesh.node_id}",
            "an already-running process joined by name, authenticated (listener, invitation, handshake)",
        )
        services = await conn.services()
        if "ticker" not in services:
            raise RuntimeError(f"the ticker service is missing: {services}")
        listed = ", ".join(f"{n} (node {s['node'][:12]})" for n, s in services.items())
        step.done(f"services: {listed}", "services are found by name, whichever process serves them")
        tree = await conn.inspect(timeout=1.0)
        nodes = tree["nodes"]
        roles = ", ".join(f"{n.get('role')} pid {n.get('pid')}" for n in nodes.values())
        worker_node = nodes[services["ticker"]["node"]]
        step.done(
            f"inspect: {len(nodes)} nodes ({roles}); worker's own entry {worker_node['ticker']}",
            "every node answers for its own part of the live inspect tree",
        )

        st = await conn.call("ticker", {"op": "status"}, timeout=5)
        step.done(f"worker status {st}", "an RPC straight to the worker process that serves 'ticker'")
        print(f"  client: pause -> {await conn.call('ticker', {'op': 'pause'}, timeout=5)}")
        before = (await conn.call("ticker", {"op": "status"}))["ticks"]
        await asyncio.sleep(WATCH)  # the interval being demonstrated
        after = (await conn.call("ticker", {"op": "status"}))["ticks"]
        if after != before:
            raise RuntimeError(f"ticks moved while paused: {before} -> {after}")
        step.done(f"paused for {WATCH:.1f} s: ticks stay at {before} -> {after}")
        await conn.call("ticker", {"op": "resume"}, timeout=5)
        await asyncio.sleep(WATCH)
        moved = (await conn.call("ticker", {"op": "status"}))["ticks"]
        if moved <= after:
            raise RuntimeError(f"ticks did not move after resume: {after} -> {moved}")
        step.done(f"resumed: ticks {after} -> {moved} in {WATCH:.1f} s")
        sys.stdout.flush()
        await conn.call("ticker", {"op": "write", "fd": meshipc.Fd.dup(sys.stdout)}, timeout=5)
        step.done(
            "passed our stdout to the worker, which wrote the line above",
            "file descriptors travel inside messages",
        )
        try:
            await conn.call("ticker", {"op": "reboot"}, timeout=5)
        except meshipc.RemoteError as exc:
            step.done(
                f"a bad request fails remotely: {exc.type_name}: {exc.message}",
                "the worker's exception reaches the caller with its type (`except ValueError` works)",
            )
        else:
            raise RuntimeError("the bad request did not fail")
        tree = await conn.inspect(f"nodes/{services['ticker']['node']}/services/ticker")
        step.done(f"the worker counted {tree['calls']['$counter']} calls, {tree['errors']['$counter']} error")
    step.done("detached")


async def restart_into_new_code(mesh: meshipc.Mesh, folder: str) -> None:
    """A worker restarted into new code while numbers stream through it."""
    module = os.path.join(folder, "demo_relay.py")
    with open(module, "w") as f:
        f.write(COUNTER.format(version=1))
    sys.path.insert(0, folder)  # a worker imports from this process's path
    try:
        numbers, numbers_rx = meshipc.channel(int)
        out_tx, out = meshipc.channel()
        proc = await mesh.spawn("demo_relay:relay", {"numbers": numbers_rx, "out": out_tx}, name="relay")
        first = proc.pid

        restarted = asyncio.Event()

        async def send() -> None:
            for n in range(STREAM):
                if n == STREAM * 3 // 4:
                    await restarted.wait()  # the last quarter is surely the new code's
                numbers.send(n)
                if n % 10 == 0:
                    await asyncio.sleep(0.001)  # a stream, not a burst: it goes on during the restart

        sender = asyncio.create_task(send())
        got: list[list[int]] = []
        while len(got) < STREAM // 2:
            got.append(await asyncio.wait_for(out.recv(), 30))
        with open(module, "w") as f:  # new code on disk, while the numbers keep coming
            f.write(COUNTER.format(version=2))
        # Python's bytecode cache goes by the source's size and mtime in whole
        # seconds: this rewrite (same size, same second) would load version 1 again
        shutil.rmtree(os.path.join(folder, "__pycache__"), ignore_errors=True)
        t = time.perf_counter()
        await proc.restart()
        took = (time.perf_counter() - t) * 1000
        restarted.set()
        while len(got) < STREAM:
            got.append(await asyncio.wait_for(out.recv(), 30))
        await sender
    finally:
        sys.path.remove(folder)
    if [n for _, n in got] != list(range(STREAM)):
        raise RuntimeError("numbers were lost, duplicated or reordered across the restart")
    v2 = sum(1 for v, _ in got if v == 2)
    print(
        f"service: restarted worker {proc.name!r} (pid {first} -> {proc.pid}) into new code mid-stream "
        f"in {took:.0f} ms: all {STREAM} numbers arrived once, in order ({STREAM - v2} by version 1, "
        f"{v2} by version 2)"
    )
    print(
        "          = the worker returned its state (its channels, with what was queued in them) and its\n"
        "            successor, started from the code now on disk, carried on: nothing lost or reordered"
    )


async def service(hold: bool = False) -> int:
    runtime_dir = tempfile.mkdtemp(prefix="meshipc-demo-")
    name = f"demo-{os.getpid()}"
    code = 1
    async with meshipc.Mesh(name=name, runtime_dir=runtime_dir) as mesh:
        print(f"service pid {os.getpid()}: mesh {name!r} in {mesh.directory}")
        ready_tx, ready_rx = meshipc.channel()
        proc = await mesh.spawn("meshipc._demo:worker", ready_tx, name="ticker")
        await asyncio.wait_for(ready_rx.recv(), 30)
        print(f"service: worker {proc.name!r} running as pid {proc.pid}, serving 'ticker'")
        clients = 0
        mesh.inspect_add("demo", lambda: {"clients_seen": clients})
        listener = await mesh.listen()
        print(f"service: listening for control clients on {listener.path}")
        cp = await asyncio.create_subprocess_exec(sys.executable, "-m", "meshipc._demo", name, runtime_dir)
        try:
            conn = await asyncio.wait_for(listener.accept(), 30)
            clients += 1
            print(f"service: control client attached (pid {conn.peer.pid}, uid {conn.peer.uid})")
            with contextlib.suppress(meshipc.ChannelClosed):
                await conn.port.recv()
            print("service: control client detached")
            code = await asyncio.wait_for(cp.wait(), 30)
        finally:
            if cp.returncode is None:
                cp.kill()
                await cp.wait()
        st = await mesh.call("ticker", {"op": "status"}, timeout=5)
        print(f"service: still running after the client left: {st}")
        if code == 0:
            await restart_into_new_code(mesh, runtime_dir)
        if hold:
            print("service: holding; try in another terminal (Ctrl-C to end):")
            call = ("call", ' ticker \'{"op": "status"}\'')
            tries = (("top", ""), ("status", ""), ("inspect", " -r"), call)
            for cmd, extra in tries:
                print(f"  meshipc {cmd} {name}{extra} --runtime-dir {runtime_dir}")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, stop.set)
            await stop.wait()
            loop.remove_signal_handler(signal.SIGINT)
    print(f"service: worker exited with code {proc.returncode}")
    shutil.rmtree(runtime_dir, ignore_errors=True)
    if code != 0:
        print(f"service: client failed ({code})")
        return code
    print("service: mesh closed, demo done")
    if not hold:
        print(
            "\nTry next: `meshipc demo --hold` keeps the mesh running so that, from another terminal,\n"
            "`meshipc top` (a live view: q quits), `meshipc status`, `meshipc inspect` and\n"
            "`meshipc call` can attach to it; the code of\n"
            "this demo is meshipc/_demo.py, and examples/ holds a service and its clients to copy."
        )
    return code


if __name__ == "__main__":  # the demo's control client: python -m meshipc._demo NAME RUNTIME_DIR
    asyncio.run(client(sys.argv[1], sys.argv[2]))
