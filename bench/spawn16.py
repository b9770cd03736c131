"""Spawn of N workers ready to answer (issue 24): meshipc ``Mesh.spawn`` of N
echo workers at once, each answering one call, against
``concurrent.futures.ProcessPoolExecutor(N, mp_context=forkserver)`` with N
workers each running one task (a barrier of N: every worker started and
ran its task). One driver process per path keeps its mesh (and zygote) or
its forkserver across batches, as an application would; each path warms
up with a batch of 2 first. A batch's CPU is the driver's and everything
under it (zygote or forkserver, the workers) from the first spawn to the
last answer; the workers are stopped outside the measured span (``reap``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing as mp
import time
from typing import Any

import meshipc
from bench.spawn_task import pool_task, set_barrier


class SpawnPath:
    """``kind``: "meshipc" (``start``: "zygote" or "exec") or "pool"."""

    is_async = True

    def __init__(self, kind: str, start: str = "zygote") -> None:
        self.kind = kind
        self.start_method = start
        self.procs: list[Any] = []
        self.ex: concurrent.futures.ProcessPoolExecutor | None = None

    async def start(self) -> None:
        self.mesh: meshipc.Mesh | None = None
        if self.kind == "meshipc":
            self.mesh = meshipc.Mesh()
            await self.mesh.__aenter__()
        await self.batch(2)
        await self.reap()

    async def stop(self) -> None:
        await self.reap()
        if self.mesh is not None:
            await self.mesh.aclose()

    async def batch(self, n: int) -> float:
        """Milliseconds from the first spawn to the last answer."""
        t0 = time.perf_counter()
        if self.mesh is not None:
            mesh = self.mesh

            async def one(i: int) -> Any:
                tx, rx = meshipc.channel()
                proc = await mesh.spawn("bench.spawn_task:echo", rx, name=f"w{i}", start=self.start_method)
                await tx.call(b"x")
                return proc, tx

            # the senders are kept: a worker whose channel closed would exit, and
            # be reaped by the zygote, before its CPU time is read
            self.procs = await asyncio.gather(*(one(i) for i in range(n)))
        else:
            fctx = mp.get_context("forkserver")
            self.ex = concurrent.futures.ProcessPoolExecutor(
                n, mp_context=fctx, initializer=set_barrier, initargs=(fctx.Barrier(n),)
            )
            loop = asyncio.get_running_loop()
            pids = await asyncio.gather(*(loop.run_in_executor(self.ex, pool_task, i) for i in range(n)))
            if len(set(pids)) != n:
                raise RuntimeError(f"{len(set(pids))} pool workers ran the {n} tasks, not {n}")
        return (time.perf_counter() - t0) * 1e3

    async def reap(self) -> float:
        for p, _ in self.procs:
            p.terminate()
        for p, _ in self.procs:
            await p.wait()
        self.procs = []
        if self.ex is not None:
            self.ex.shutdown()
            self.ex = None
        return 0.0
