"""Benchmarks made of whole processes: attach (an already-running client's
connect -> first reply), the cold command (process start to exit), import
time, and attaching many clients (time, service memory). Also the scale
driver (RPC throughput and inspect with 1-16 workers).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing.connection as mpc
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import meshipc
from bench.core import MSG, PathFailed, ctx, rmtree, rss_kib, short_tmp, timed_run_cpu
from bench.paths import _stop_proc, _wait_ready, grpc_server, pyro_server

# --------------------------------------------------------------- services


async def _mesh_service(name: str, rd: str, ready: Any) -> None:
    async def echo(req: Any) -> Any:
        return req

    async def pinger(conn: Any) -> None:
        with contextlib.suppress(meshipc.MeshError):
            async for msg in conn.port:
                conn.port.send(msg)

    async with meshipc.Mesh(name=name, runtime_dir=rd) as mesh:
        listener = await mesh.listen()
        mesh.serve("echo", echo)
        ready.set()
        tasks = set()
        async for conn in listener:
            t = asyncio.create_task(pinger(conn))
            tasks.add(t)
            t.add_done_callback(tasks.discard)


def mesh_service(name: str, rd: str, ready: Any) -> None:
    """Child: a named mesh listening, serving ``echo``, echoing port messages."""
    _raise_nofile()
    asyncio.run(_mesh_service(name, rd, ready))


def mpc_service(path: str, key: bytes, ready: Any) -> None:
    """Child: a ``multiprocessing.connection.Listener`` (authkey), a thread
    per client echoing its messages."""
    _raise_nofile()

    def serve(c: Any) -> None:
        with c, contextlib.suppress(EOFError, OSError):
            while True:
                c.send_bytes(c.recv_bytes())

    with mpc.Listener(path, family="AF_UNIX", authkey=key, backlog=1024) as lis:
        ready.set()
        while True:
            try:
                c = lis.accept()
            except (OSError, mpc.AuthenticationError):
                continue
            threading.Thread(target=serve, args=(c,), daemon=True).start()


def _raise_nofile() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Services:
    """One running service per system, in child processes of the runner."""

    def __init__(self, want: set[str]) -> None:
        self.tmp = short_tmp()
        self.name = f"bench-{os.getpid()}"
        self.key = secrets.token_bytes(32)
        self.mpc_path = os.path.join(self.tmp, "l.sock")
        self.pyro_path = os.path.join(self.tmp, "p.sock")
        self.grpc_path = os.path.join(self.tmp, "g.sock")
        self.procs: dict[str, Any] = {}
        targets = {
            "meshipc": (mesh_service, (self.name, self.tmp)),
            "mpc": (mpc_service, (self.mpc_path, self.key)),
            "pyro": (pyro_server, (self.pyro_path,)),
            "grpc": (grpc_server, (self.grpc_path,)),
        }
        for key in want:
            fn, args = targets[key]
            ready = ctx().Event()
            p = ctx().Process(target=fn, args=(*args, ready), daemon=True)
            p.start()
            _wait_ready(ready, key)
            self.procs[key] = p

    def close(self) -> None:
        for p in self.procs.values():
            p.kill()
            _stop_proc(p)
        rmtree(self.tmp)


# --------------------------------------------------------------- attach: timed inside a running client

# (meshipc loads its submodules on first use: load them all before timing,
# as the peers' clients have imported theirs)
ATTACH_MESH = r"""
import asyncio, sys, time, meshipc
[getattr(meshipc, n) for n in meshipc.__all__]
async def main():
    t, c0 = time.perf_counter(), time.process_time()
    async with meshipc.connect(sys.argv[1], runtime_dir=sys.argv[2]) as conn:
        if sys.argv[3] == "call":
            await conn.call("echo", b"x", timeout=10)
        else:
            conn.port.send(b"x")
            await conn.port.recv()
        print(time.perf_counter() - t, time.process_time() - c0)
asyncio.run(main())
"""

ATTACH_MPC = r"""
import sys, time, multiprocessing.connection as mpc
t, c0 = time.perf_counter(), time.process_time()
c = mpc.Client(sys.argv[1], family="AF_UNIX", authkey=bytes.fromhex(sys.argv[2]))
c.send_bytes(b"x"); c.recv_bytes()
print(time.perf_counter() - t, time.process_time() - c0)
c.close()
"""

ATTACH_PYRO = r"""
import sys, time
from Pyro5 import api
t, c0 = time.perf_counter(), time.process_time()
p = api.Proxy("PYRO:echo@./u:" + sys.argv[1])
p.echo(b"x")
print(time.perf_counter() - t, time.process_time() - c0)
p._pyroRelease()
"""

ATTACH_GRPC = r"""
import sys, time, grpc
t, c0 = time.perf_counter(), time.process_time()
ch = grpc.insecure_channel("unix:" + sys.argv[1])
ch.unary_unary("/b.E/Echo")(b"x", timeout=10)
print(time.perf_counter() - t, time.process_time() - c0)
ch.close()
"""

# the same clients as whole commands: start, import, connect, call, print, exit
COLD_MPC = (
    "import sys, multiprocessing.connection as m; "
    "c = m.Client(sys.argv[1], family='AF_UNIX', authkey=bytes.fromhex(sys.argv[2])); "
    "c.send_bytes(b'x'); print(c.recv_bytes())"
)
COLD_PYRO = "import sys; from Pyro5 import api; print(api.Proxy('PYRO:echo@./u:' + sys.argv[1]).echo('x'))"
COLD_GRPC = (
    "import sys, grpc; ch = grpc.insecure_channel('unix:' + sys.argv[1]); "
    "print(ch.unary_unary('/b.E/Echo')(b'x', timeout=10))"
)


def _inside(argv: list[str]) -> tuple[float, float]:
    """(ms, client CPU µs) a client reports for connecting to its first reply."""
    r = subprocess.run(argv, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise PathFailed(f"client exited {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}")
    wall, cpu = map(float, r.stdout.split())
    return wall * 1e3, cpu * 1e6


def meshipc_cli() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "meshipc")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "meshipc"]


def attach_paths(s: Services) -> dict[str, Any]:
    """name -> (callable giving ms, is_meshipc). Clients inherit our env."""
    py = sys.executable
    out: dict[str, Any] = {}
    if "meshipc" in s.procs:
        out["meshipc.connect + call"] = lambda: _inside([py, "-c", ATTACH_MESH, s.name, s.tmp, "call"])
        out["meshipc.connect + port message"] = lambda: _inside(
            [py, "-c", ATTACH_MESH, s.name, s.tmp, "port"]
        )
    if "mpc" in s.procs:
        out["multiprocessing.connection"] = lambda: _inside([py, "-c", ATTACH_MPC, s.mpc_path, s.key.hex()])
    if "pyro" in s.procs:
        out["Pyro5"] = lambda: _inside([py, "-c", ATTACH_PYRO, s.pyro_path])
    if "grpc" in s.procs:
        out["gRPC"] = lambda: _inside([py, "-c", ATTACH_GRPC, s.grpc_path])
    return out


def _wall(argv: list[str]) -> tuple[float, float]:
    """(wall ms, the command's CPU µs) of a whole command."""
    dt, cpu = timed_run_cpu(argv)
    return dt * 1e3, cpu * 1e6


def cold_paths(s: Services) -> dict[str, Any]:
    py = sys.executable
    out: dict[str, Any] = {}
    if "meshipc" in s.procs:
        cmd = [*meshipc_cli(), "call", s.name, "echo", '"x"', "--runtime-dir", s.tmp]
        out["meshipc call NAME echo"] = lambda: _wall(cmd)
    if "mpc" in s.procs:
        out["multiprocessing.connection"] = lambda: _wall([py, "-c", COLD_MPC, s.mpc_path, s.key.hex()])
    if "pyro" in s.procs:
        out["Pyro5"] = lambda: _wall([py, "-c", COLD_PYRO, s.pyro_path])
    if "grpc" in s.procs:
        out["gRPC"] = lambda: _wall([py, "-c", COLD_GRPC, s.grpc_path])
    return out


# --------------------------------------------------------------- start-up

IMPORTS = {
    "import meshipc": "import meshipc",
    "import meshipc, load all": "import meshipc; [getattr(meshipc, n) for n in meshipc.__all__]",
    "import zmq": "import zmq",
    "import multiprocessing.connection": "import multiprocessing.connection",
    "import Pyro5.api": "import Pyro5.api",
    "import grpc": "import grpc",
    "python -c pass": "pass",
}


def import_paths(available: set[str]) -> dict[str, Any]:
    py = sys.executable
    return {k: (lambda c=c: _wall([py, "-c", c])) for k, c in IMPORTS.items() if k in available}


# --------------------------------------------------------------- many attached clients

HOLD_MESH = r"""
import asyncio, contextlib, sys, time, meshipc
[getattr(meshipc, n) for n in meshipc.__all__]
async def main():
    k = int(sys.argv[3])
    async with contextlib.AsyncExitStack() as stack:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        t = time.perf_counter()
        sem = asyncio.Semaphore(32)  # > 256 attaching at once: InvitationExpired (see the report)
        async def one():
            async with sem:
                conn = await stack.enter_async_context(
                    meshipc.connect(sys.argv[1], runtime_dir=sys.argv[2], timeout=60)
                )
                conn.port.send(b"x")
                await conn.port.recv()
        await asyncio.gather(*(one() for _ in range(k)))
        print(time.perf_counter() - t, flush=True)
        await asyncio.to_thread(sys.stdin.readline)
asyncio.run(main())
"""

HOLD_MPC = r"""
import sys, time, multiprocessing.connection as mpc
from concurrent.futures import ThreadPoolExecutor
k = int(sys.argv[3]); key = bytes.fromhex(sys.argv[2])
print("ready", flush=True); sys.stdin.readline()
t = time.perf_counter()
def one(_):
    c = mpc.Client(sys.argv[1], family="AF_UNIX", authkey=key)
    c.send_bytes(b"x"); c.recv_bytes()
    return c
with ThreadPoolExecutor(16) as ex:
    conns = list(ex.map(one, range(k)))
print(time.perf_counter() - t, flush=True)
sys.stdin.readline()
"""

HOLDERS = 4


def attach_many(kind: str, n: int) -> tuple[float, float]:
    """Attach ``n`` clients (from up to HOLDERS client processes, concurrently)
    to a fresh service: (ms until all have their first reply, service RSS
    growth per client in KiB once they idle)."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the holders
    s = Services({kind})
    holders: list[subprocess.Popen[str]] = []
    try:
        proc = s.procs[kind]
        script, args = (
            (HOLD_MESH, [s.name, s.tmp]) if kind == "meshipc" else (HOLD_MPC, [s.mpc_path, s.key.hex()])
        )

        def start(k: int) -> subprocess.Popen[str]:
            h = subprocess.Popen(
                [sys.executable, "-c", script, *args, str(k)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert h.stdout is not None and h.stdout.readline().strip() == "ready"
            return h

        # warm-up: one client attaches and leaves (first-use allocations are not per client)
        w = start(1)
        assert w.stdin is not None and w.stdout is not None
        w.stdin.write("go\n")
        w.stdin.flush()
        w.stdout.readline()
        w.stdin.close()
        w.wait(30)
        time.sleep(0.3)
        base = rss_kib(proc.pid)
        p = min(HOLDERS, n)
        holders = [start(n // p + (1 if i < n % p else 0)) for i in range(p)]
        t0 = time.perf_counter()
        for h in holders:
            assert h.stdin is not None
            h.stdin.write("go\n")
            h.stdin.flush()
        for h in holders:
            assert h.stdout is not None
            line = h.stdout.readline()
            if not line:
                raise PathFailed(f"a {kind} client holder died (exit {h.wait()})")
        elapsed = (time.perf_counter() - t0) * 1e3
        time.sleep(1.0)  # idle
        grown = rss_kib(proc.pid) - base
        return elapsed, grown / n
    finally:
        for h in holders:
            with contextlib.suppress(OSError):
                assert h.stdin is not None
                h.stdin.close()
        for h in holders:
            try:
                h.wait(30)
            except subprocess.TimeoutExpired:
                h.kill()
        s.close()


# --------------------------------------------------------------- workers: RPC throughput, inspect


def pool_echo(x: bytes) -> bytes:
    return x


class ScalePath:
    """A named mesh in the driver with up to 16 echo workers (spawned as
    needed); ``concurrent.futures.ProcessPoolExecutor`` as the peer."""

    is_async = True

    async def start(self) -> None:
        self.tmp = short_tmp()
        self.name = f"bench-scale-{os.getpid()}"
        self.stack = contextlib.AsyncExitStack()
        self.mesh = await self.stack.enter_async_context(meshipc.Mesh(name=self.name, runtime_dir=self.tmp))
        await self.mesh.listen()
        self.txs: list[meshipc.Sender[Any]] = []

    async def _workers(self, w: int) -> None:
        while len(self.txs) < w:
            tx, rx = meshipc.channel()
            await self.mesh.spawn("bench.paths:mesh_echo", rx, name=f"echo{len(self.txs)}")
            self.txs.append(tx)
        await asyncio.sleep(0.2)  # sessions with the first node (inspect sees nodes > 50 ms old)

    async def where(self) -> tuple[str, str]:
        return self.name, self.tmp

    async def rpc(self, w: int, n: int) -> float:
        await self._workers(w)
        txs = self.txs[:w]
        c = 8 * w

        async def caller(i: int) -> None:
            tx = txs[i % w]
            for _ in range(n // c):
                await tx.call(MSG)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(c)))
        return (n // c) * c / (time.perf_counter() - t0)

    async def pool(self, w: int, n: int) -> float:
        loop = asyncio.get_running_loop()
        c = 8 * w
        with concurrent.futures.ProcessPoolExecutor(w, mp_context=ctx()) as ex:
            await asyncio.gather(*(loop.run_in_executor(ex, pool_echo, MSG) for _ in range(4 * w)))

            async def caller() -> None:
                for _ in range(n // c):
                    await loop.run_in_executor(ex, pool_echo, MSG)

            t0 = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(c)))
            return (n // c) * c / (time.perf_counter() - t0)

    async def inspect(self, w: int, k: int) -> float:
        await self._workers(w)
        times = []
        for _ in range(k):
            t0 = time.perf_counter()
            tree = await self.mesh.inspect()
            times.append(time.perf_counter() - t0)
        nodes = len(tree.get("nodes", {}))
        if nodes < w + 1:
            raise PathFailed(f"inspect showed {nodes} nodes, expected {w + 1}")
        times.sort()
        return times[len(times) // 2] * 1e3

    async def stop(self) -> None:
        for tx in self.txs:
            tx.close()
        await self.stack.aclose()
        shutil.rmtree(self.tmp, ignore_errors=True)


def inspect_cli(name: str, rd: str) -> float:
    return _wall([*meshipc_cli(), "inspect", name, "-r", "-j", "--runtime-dir", rd])
