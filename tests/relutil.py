"""Helpers shared by the tests: the one bounded wait (``within``, and
``wait_until`` for state without an event), the private runtime folder
(``private_dir``; the ``runtime_dir`` fixture in ``conftest.py``), and what
the reliability, flow-control and soak tests use with real processes (see
``rel_workers.py`` for what runs in the children)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import meshipc

T = TypeVar("T")

#: Bound on any single wait (pytest-timeout bounds a whole test, far above).
STEP = 10.0


async def within(aw: Awaitable[T], timeout: float = STEP) -> T:
    """``aw``, or ``TimeoutError`` after ``timeout`` seconds: the one bounded
    wait of the tests (a test's own deadline, not pytest-timeout's)."""
    return await asyncio.wait_for(aw, timeout)


@contextlib.contextmanager
def private_dir(prefix: str = "m") -> Iterator[Path]:
    """A short (AF_UNIX paths are limited, ``tmp_path`` is too long) and
    private (0700) folder under /tmp, removed afterwards."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o700)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def root_of_length(base: Path, n: int) -> Path:
    """A private (0700) folder inside ``base`` whose path is exactly ``n``
    bytes (for path-budget tests)."""
    root = base / ("r" * (n - len(os.fsencode(base)) - 1))
    root.mkdir(mode=0o700)
    assert len(os.fsencode(root)) == n
    return root


async def wait_until(pred: Callable[[], Any], what: str, timeout: float = STEP) -> None:
    """Poll ``pred`` (a function, or a coroutine function) for state that has
    no event to wait on (a process's state, an fd count, a counter, an inspect
    tree); fail loudly after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    async def check() -> bool:
        got = pred()
        return bool(await got if inspect.isawaitable(got) else got)

    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def vmrss_kb(pid: int | str = "self") -> int:
    """Resident set size of a process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kb() -> int:
    """This process's peak resident set size in KiB (``VmHWM``) since start
    or the last ``reset_peak_rss``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Start ``peak_rss_kb`` again from the present size (Linux: writing 5 to
    ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def signal_proc(proc: meshipc.Process, sig: int) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


@contextlib.asynccontextmanager
async def reaped(mesh: meshipc.Mesh) -> AsyncIterator[list[meshipc.Process]]:
    """A list to put the test's workers in: on the way out, however the test
    ended, each is resumed (if stopped) and killed, so the mesh closes fast
    and no process outlives the test."""
    procs: list[meshipc.Process] = []
    try:
        yield procs
    finally:
        for p in procs:
            signal_proc(p, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), STEP)


async def spawn_ring(
    mesh: meshipc.Mesh, procs: list[meshipc.Process], n: int, report: meshipc.Sender[Any]
) -> list[meshipc.Sender[Any]]:
    """``n`` ``rel_workers:hop`` workers that can all reach each other's
    inbox; returns the senders to their inboxes (index = worker index)."""
    inboxes = [meshipc.channel() for _ in range(n)]
    for i in range(n):
        peers = [tx.clone() for tx, _ in inboxes]
        arg = {"idx": i, "inbox": inboxes[i][1], "peers": peers, "report": report.clone()}
        procs.append(await mesh.spawn("rel_workers:hop", arg, name=f"hop{i}"))
    return [tx for tx, _ in inboxes]


async def next_report(rx: meshipc.Receiver[Any], kind: str, timeout: float = STEP) -> list[Any]:
    """The next report of ``kind`` (``"hop"``, ``"end"``) on ``rx``; hop
    reports with a bad ordering flag fail at once."""
    async with asyncio.timeout(timeout):
        while True:
            r = await rx.recv()
            if r[0] == "hop":
                assert r[5], f"hop worker saw values out of order: {r}"
            if r[0] == kind:
                return r


class LagMeter:
    """How long this thread's event loop was kept from running: a timer asks
    for a callback every ``TICK`` seconds and keeps the largest delay beyond
    it (``worst``, in seconds; a tick still waiting counts when it is read).
    A measurement to report, never a synchronisation: tests print it.
    ``async with LagMeter() as m: ...``."""

    TICK = 0.005

    def __init__(self) -> None:
        self._worst = 0.0
        self._since = time.monotonic()  # when the pending tick was asked for
        self._timer: asyncio.TimerHandle | None = None

    @property
    def worst(self) -> float:
        return max(self._worst, time.monotonic() - self._since - self.TICK)

    def reset(self) -> float:
        """The worst delay so far, and start again from zero."""
        worst = self.worst
        self._worst, self._since = 0.0, time.monotonic()
        return worst

    def _tick(self) -> None:
        # time.monotonic(), not loop.time(): uvloop's is cached per loop turn
        now = time.monotonic()
        self._worst = max(self._worst, now - self._since - self.TICK)
        self._since = now
        self._timer = asyncio.get_running_loop().call_later(self.TICK, self._tick)

    async def __aenter__(self) -> LagMeter:
        self._since = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self.TICK, self._tick)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._worst = self.worst  # the tick under way counts
        self._since = float("inf")
        if self._timer is not None:
            self._timer.cancel()
