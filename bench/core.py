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
    try:
        while True:
            method, args = await _arecv(conn)
            if method == "stop":
                break
            try:
                conn.send(("ok", await getattr(path, method)(*args)))
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
    try:
        while True:
            method, args = conn.recv()
            if method == "stop":
                break
            try:
                conn.send(("ok", getattr(path, method)(*args)))
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
        if not self.proc.is_alive():
            raise PathFailed(f"{self.spec}: the driver process is gone")
        self.conn.send((method, args))
        return self._result(timeout)

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
    import subprocess

    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, timeout=timeout, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise PathFailed(f"{argv[:3]} exited {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}")
    return dt


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise PathFailed(f"no VmRSS for pid {pid}")
