"""The suite's plumbing: driver processes, interleaving, statistics.

A *path* is one way of doing a thing (meshipc on the stock loop, a
``multiprocessing.Pipe``, pyzmq ...). Its measuring side runs in a *driver*
process of its own (started once per group of benchmarks, spawned, so every
path starts from a clean interpreter and picks its own event loop); the
runner sends it ``(method, args)`` and gets the measured figure back. The
runner itself only waits, so the two CPUs go to the path being measured.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

#: Most seconds one measurement may take before the path is given up.
LIMIT = 120.0
ROOT = Path(__file__).resolve().parent.parent
MSG = b"m" * 64


def ctx() -> Any:
    return mp.get_context("spawn")


def short_tmp(prefix: str = "mb") -> str:
    """A short temporary folder (AF_UNIX paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run_loop(main: Awaitable[Any], loop: str) -> Any:
    """Run ``main`` under the event loop named ``loop`` (``asyncio`` or ``uvloop``)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)  # type: ignore[arg-type]
    return asyncio.run(main)  # type: ignore[arg-type]


def set_loop_env(loop: str | None) -> None:
    """meshipc's spawned workers pick their loop from the environment: ours."""
    if loop is not None:
        os.environ["MESHIPC_UVLOOP"] = "1" if loop == "uvloop" else "0"


class PathFailed(Exception):
    pass


# --------------------------------------------------------------- CPU time


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc (this kernel may lack /proc/PID/task/TID/children)."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out.setdefault(ppid, []).append(int(name))
    return out


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, theirs ...)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


def process_cpu(pid: int) -> float:
    """Seconds on CPU of process ``pid``, all its threads (also those that
    ended): the process's CPU-time clock (``clock_getcpuclockid``: ns, Linux
    lets any process read another's); 0 for a process gone."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    except OSError:
        return 0.0


def _reaped_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """CPU seconds, over ``start()`` .. ``stop()``, of this process (all threads,
    ``time.process_time``: also threads that ended) plus every process below
    it (the servers and workers a path starts, all their threads:
    ``process_cpu``; a process started during the span counts from 0; one
    that ended and was reaped through ``getrusage(RUSAGE_CHILDREN)``). The
    scans of /proc happen outside the measured span."""

    def _scan(self) -> dict[int, float]:
        return {pid: process_cpu(pid) for pid in descendants(os.getpid())}

    def start(self) -> None:
        self.k0 = self._scan()
        self.r0 = _reaped_cpu()
        self.c0 = time.process_time()

    def stop(self) -> float:
        c1 = time.process_time()
        r1 = _reaped_cpu()
        k1 = self._scan()
        gone = sum(v for pid, v in self.k0.items() if pid not in k1)  # counted again, whole, in r1
        kids = sum(v - self.k0.get(pid, 0.0) for pid, v in k1.items())
        return c1 - self.c0 + kids + max(0.0, r1 - self.r0 - gone)


# --------------------------------------------------------------- driver side


async def _arecv(conn: Connection) -> Any:
    if not conn.poll():
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(conn.fileno(), ready)
        try:
            await fut
        finally:
            loop.remove_reader(conn.fileno())
    return conn.recv()


async def _async_driver(conn: Connection, path: Any) -> None:
    try:
        await path.start()
    except Exception:
        conn.send(("err", traceback.format_exc()))
        return
    conn.send(("ok", None))
    meter = CpuMeter()
    try:
        while True:
            method, args = await _arecv(conn)
            if method == "stop":
                break
            try:
                meter.start()
                value = await getattr(path, method)(*args)
                conn.send(("ok", (value, meter.stop())))
            except Exception:
                conn.send(("err", traceback.format_exc()))
    finally:
        try:
            await path.stop()
        finally:
            conn.send(("ok", None))


def _sync_driver(conn: Connection, path: Any) -> None:
    try:
        path.start()
    except Exception:
        conn.send(("err", traceback.format_exc()))
        return
    conn.send(("ok", None))
    meter = CpuMeter()
    try:
        while True:
            method, args = conn.recv()
            if method == "stop":
                break
            try:
                meter.start()
                value = getattr(path, method)(*args)
                conn.send(("ok", (value, meter.stop())))
            except Exception:
                conn.send(("err", traceback.format_exc()))
    finally:
        try:
            path.stop()
        finally:
            conn.send(("ok", None))


def driver_main(conn: Connection, spec: str, kwargs: dict[str, Any], loop: str | None) -> None:
    set_loop_env(loop)
    mod, _, attr = spec.partition(":")
    path = getattr(importlib.import_module(mod), attr)(**kwargs)
    if getattr(path, "is_async", False):
        run_loop(_async_driver(conn, path), loop or "asyncio")
    else:
        _sync_driver(conn, path)


class Driver:
    """The runner's handle on a path's driver process."""

    def __init__(self, spec: str, kwargs: dict[str, Any] | None = None, loop: str | None = None) -> None:
        self.spec = spec
        self.conn, child = ctx().Pipe()
        # not a daemon: a driver starts server processes of its own
        self.proc = ctx().Process(target=driver_main, args=(child, spec, kwargs or {}, loop))
        self.proc.start()
        child.close()
        self._result(LIMIT)

    def _result(self, timeout: float) -> Any:
        try:
            ready = self.conn.poll(timeout)
        except (EOFError, OSError):
            ready = True
        if not ready:
            self.kill()
            raise PathFailed(f"{self.spec}: no answer within {timeout:.0f} s")
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise PathFailed(f"{self.spec}: the driver process died (exit {self.proc.exitcode})") from None
        if status != "ok":
            raise PathFailed(f"{self.spec}: {value.strip().splitlines()[-1]}\n{value}")
        return value

    def call(self, method: str, *args: Any, timeout: float = LIMIT) -> Any:
        """The path's figure; ``self.cpu``: the CPU seconds it took (the driver
        and everything it started, all threads: see ``CpuMeter``)."""
        if not self.proc.is_alive():
            raise PathFailed(f"{self.spec}: the driver process is gone")
        self.conn.send((method, args))
        value, self.cpu = self._result(timeout)
        return value

    def measure(self, method: str, ops: int, *args: Any, scale: float = 1.0) -> tuple[float, float]:
        """``(figure * scale, CPU µs per op)`` of ``call(method, *args)`` doing ``ops`` operations."""
        value = self.call(method, *args)
        return value * scale, self.cpu / ops * 1e6

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop", ()))
                self._result(20)
            except (PathFailed, OSError):
                pass
        self.proc.join(10)
        self.kill()
        self.conn.close()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# --------------------------------------------------------------- statistics


def summary(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if v == v and v not in (float("inf"), float("-inf"))]
    if not values:
        return {"median": None, "min": None, "max": None, "samples": []}
    return {
        "median": statistics.median(values),
        "min": min(finite) if finite else None,
        "max": max(finite) if finite else None,
        "samples": values,
    }


def interleave(
    paths: dict[str, Callable[[], float]], runs: int, failed: dict[str, str], label: str = ""
) -> dict[str, list[float]]:
    """Measure every path ``runs`` times, in an order rotating per run, so that
    drift (other load on the machine) hits every path alike. A path that
    fails is dropped with its reason in ``failed``."""
    out: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for run in range(runs):
        k = run % len(names) if names else 0
        for name in names[k:] + names[:k]:
            if name in failed:
                continue
            try:
                out[name].append(paths[name]())
            except PathFailed as exc:
                failed[name] = str(exc).splitlines()[0]
                print(f"  {label}{name}: FAILED {failed[name]}", file=sys.stderr)
    return out


def timed_run(argv: list[str], timeout: float = 60.0, env: dict[str, str] | None = None) -> float:
    """Wall seconds of a whole command, from start to exit (which must be 0)."""
    return timed_run_cpu(argv, timeout, env)[0]


def timed_run_cpu(
    argv: list[str], timeout: float = 60.0, env: dict[str, str] | None = None
) -> tuple[float, float]:
    """(wall, CPU) seconds of a whole command, from start to exit (which must
    be 0); CPU is the command's and its waited-for children's user+system time
    (``getrusage(RUSAGE_CHILDREN)``)."""
    import resource
    import subprocess

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, timeout=timeout, env=env)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise PathFailed(f"{argv[:3]} exited {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}")
    return dt, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise PathFailed(f"no VmRSS for pid {pid}")
