"""Round trip of a 64-byte request to a named service: the control plane's
paths against ``multiprocessing.Pipe``, in the same run.

    python bench/bench_control.py [--runs 5] [-n 2000]

Paths (each against a service process started once):

* ``sync call``: ``meshipc.sync.connect(name)`` then ``conn.call("echo", msg)``
  (a blocking call through the portal thread; the first call of a name asks
  the registry, later ones go straight to the serving node);
* ``sync open``: ``conn.open("echo")`` then ``tx.call(msg)`` on that sender;
* ``async call``: ``await conn.call("echo", msg)`` from ``meshipc.connect``;
* ``async Sender.call``: ``await tx.call(msg)`` on a ``conn.open`` sender;
* ``mp.Pipe``: blocking ``send_bytes``/``recv_bytes`` to a child that echoes.

The table gives the median per-call time of the runs and the ratio to
``mp.Pipe``. Stock asyncio loop. Not collected by pytest (lives in bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import meshipc

MSG = b"m" * 64


async def _serve(name: str, rd: str) -> None:
    async def echo(req: Any) -> Any:
        return req

    async with meshipc.Mesh(name=name, runtime_dir=rd) as mesh:
        listener = await mesh.listen()
        mesh.serve("echo", echo)
        print("ready", flush=True)
        async for conn in listener:
            conn.port.close()  # this benchmark uses services only


def _pipe_echo(c: Connection) -> None:
    while True:
        try:
            c.send_bytes(c.recv_bytes())
        except EOFError:
            return


def _time(n: int, fn: Callable[[], Any]) -> float:
    for _ in range(min(200, n)):  # warm-up
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


async def _atime(n: int, fn: Callable[[], Any]) -> float:
    for _ in range(min(200, n)):
        await fn()
    t0 = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-n", type=int, default=2000, help="calls per measurement")
    ap.add_argument("--serve", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        asyncio.run(_serve(*a.serve))
        return 0
    rd = tempfile.mkdtemp(prefix="mb", dir="/tmp")
    name = f"bench-{os.getpid()}"
    svc = subprocess.Popen([sys.executable, __file__, "--serve", name, rd], stdout=subprocess.PIPE)
    parent, child = mp.Pipe()
    echo = mp.Process(target=_pipe_echo, args=(child,), daemon=True)
    echo.start()
    results: dict[str, list[float]] = {}
    try:
        assert svc.stdout is not None and svc.stdout.readline().strip() == b"ready"
        sconn = meshipc.sync.connect(name, runtime_dir=rd)
        stx = sconn.open("echo")

        async def async_paths() -> tuple[float, float]:
            async with meshipc.connect(name, runtime_dir=rd) as conn:
                tx = await conn.open("echo")
                c = await _atime(a.n, lambda: conn.call("echo", MSG))
                s = await _atime(a.n, lambda: tx.call(MSG))
                tx.close()
                return c, s

        def pipe_rt() -> None:
            parent.send_bytes(MSG)
            parent.recv_bytes()

        for _ in range(a.runs):
            results.setdefault("mp.Pipe", []).append(_time(a.n, pipe_rt))
            results.setdefault("sync call", []).append(_time(a.n, lambda: sconn.call("echo", MSG)))
            results.setdefault("sync open", []).append(_time(a.n, lambda: stx.call(MSG)))
            c, s = asyncio.run(async_paths())
            results.setdefault("async call", []).append(c)
            results.setdefault("async Sender.call", []).append(s)
        stx.close()
        sconn.close()
    finally:
        parent.close()
        echo.join(5)
        svc.terminate()
        svc.wait(10)
        shutil.rmtree(rd, ignore_errors=True)
    base = statistics.median(results["mp.Pipe"])
    print(f"64-byte round trip, median of {a.runs} runs x {a.n} calls (python {sys.version.split()[0]})")
    for k, v in results.items():
        m = statistics.median(v)
        spread = f"{min(v) * 1e6:.1f}-{max(v) * 1e6:.1f}"
        print(f"  {k:<18} {m * 1e6:8.1f} us   {m / base:5.2f}x mp.Pipe   (spread {spread})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
