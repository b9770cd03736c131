"""Chaos runs: streams whose receiving end hops between real processes
while producers of three kinds feed them, with processes killed and
stopped under them (hubs in ``chaos_workers.py``).

Each stream is a channel whose ``Receiver`` starts at a random hub and is
handed to a random other hub every 0-200 reads (a few hundred hops for a
long stream). Producers, in the test's process:

* kind 0: a plain thread sending ``[0, i]``, backing off on ``BufferFull``;
* kind 1: an asyncio task sending ``[0, i]`` with ``drain()`` every 100;
* kind 2: three threads, each on its own ``clone()`` of the sender, sending
  ``[k, i]`` (a merged receiver; order is checked per thread).

A producer keeps its sender open until the hubs report that everything was
read (so that a holder killed late is still seen failing), then closes it.

Verdict per stream: everything arrived in order and the stream then ended
with ``ChannelClosed`` — or it failed *visibly* (``PortFailed`` /
``NodeFailure`` at the holder, or at a producer's ``send``) after an
in-order prefix, and only if a killed process held or was handed the
stream. A clean end with anything missing, any other error, or a hang
fails the test.

The soak variants (``-m soak``): 5 hubs, 9 streams of 30,000 values, once
without faults and once with one hub SIGKILLed at a random point and the
others SIGSTOPped again and again (each while the rest read a few
thousand values, 4 s at most). A small variant without
faults runs in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

import meshipc
from meshipc import BufferFull, MeshError, NodeFailure, PortFailed
from relutil import reaped, signal_proc

#: Reads between hops (inclusive range).
TAKE = [0, 200]


@dataclass
class Stream:
    s: int
    kind: int
    counts: dict[str, int]  # producer key -> values it sends
    senders: list[meshipc.Sender[Any]] = field(default_factory=list)
    path: set[int] = field(default_factory=set)
    seen: dict[str, int] = field(default_factory=dict)
    end: list[Any] | None = None
    producer_error: BaseException | None = None
    produced: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    disorder: list[list[Any]] = field(default_factory=list)
    hops: int = 0

    def all_read(self) -> bool:
        return all(self.seen.get(k, 0) >= n for k, n in self.counts.items())

    def describe(self) -> str:
        return (
            f"stream {self.s} (kind {self.kind}): seen {self.seen} of {self.counts} in {self.hops} hops, "
            f"path {sorted(self.path)}, end {self.end}, producer error {self.producer_error!r}"
        )


def _thread_producer(
    loop: asyncio.AbstractEventLoop, st: Stream, tx: meshipc.Sender[Any], key: int, count: int, limit: float
) -> None:
    """Send ``count`` values from this thread; on ``BufferFull``, block this
    thread until the channel is back under its window (``drain()`` on the
    loop), then go on."""
    deadline = time.monotonic() + limit
    i = 0
    try:
        while i < count:
            try:
                tx.send([key, i])
                i += 1
            except BufferFull:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                asyncio.run_coroutine_threadsafe(tx.drain(), loop).result(left)
    except MeshError as exc:
        st.producer_error = exc
    except TimeoutError:
        st.producer_error = TimeoutError(f"producer {key} blocked beyond {limit} s")


async def _produce(st: Stream, limit: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        if st.kind == 1:
            tx = st.senders[0]
            for i in range(st.counts["0"]):
                tx.send([0, i])
                if i % 100 == 99:
                    await tx.drain()
        else:
            threads = [
                threading.Thread(
                    target=_thread_producer, args=(loop, st, tx, k, st.counts[str(k)], limit), daemon=True
                )
                for k, tx in enumerate(st.senders)
            ]
            for t in threads:
                t.start()
            done = asyncio.Event()

            def join_all() -> None:
                for t in threads:
                    t.join()
                loop.call_soon_threadsafe(done.set)

            threading.Thread(target=join_all, daemon=True).start()
            await done.wait()
    except MeshError as exc:
        st.producer_error = exc
    st.produced.set()


async def _follow(rx: meshipc.Receiver[Any], streams: list[Stream], reported: asyncio.Event) -> None:
    async for r in rx:
        st = streams[r[1]]
        _, _, idx, seen, ok, extra = r
        if not ok:
            st.disorder.append(r)
        st.path.add(idx)
        st.seen = {k: max(v, st.seen.get(k, 0)) for k, v in seen.items()}
        if r[0] == "hop":
            st.hops += 1
            st.path.add(extra)
        elif r[0] == "end":
            st.end = r
        st.progress.set()
        reported.set()


async def _finish(st: Stream, killed: set[int], limit: float) -> None:
    """Close the stream once everything was read; if it depends on a killed
    hub, its producer must learn of it (a probe ``send`` raises)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    closed = False
    while st.end is None and st.producer_error is None:
        if loop.time() > deadline:
            raise AssertionError(f"hung: {st.describe()}")
        if not closed and st.produced.is_set() and st.all_read():
            for tx in st.senders:
                tx.close()
            closed = True
        if not closed and st.produced.is_set() and killed & st.path:
            try:
                st.senders[0].send(["probe", 0])
                await st.senders[0].drain()
            except MeshError as exc:
                st.producer_error = exc
                break
        st.progress.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(st.progress.wait(), 0.2)
    if not closed:
        for tx in st.senders:
            tx.close()
        # a holder that lives must now end the stream, and must not end it
        # cleanly (the verdict checks): wait for its report a while
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                while st.end is None:
                    st.progress.clear()
                    await st.progress.wait()


def _verdict(st: Stream, killed: set[int]) -> str | None:
    """None if the stream's outcome is acceptable, else why not."""
    if st.disorder:
        return f"values out of order at {st.disorder[:3]}: {st.describe()}"
    how = st.end[5] if st.end is not None else None
    if how == "closed":
        if not st.all_read():
            missing = sum(n - st.seen.get(k, 0) for k, n in st.counts.items())
            return f"clean end with {missing} values missing: {st.describe()}"
        return None
    visible = (how or "").startswith(("PortFailed", "NodeFailure")) or isinstance(
        st.producer_error, PortFailed | NodeFailure
    )
    if not visible:
        return f"neither complete nor a visible failure: {st.describe()}"
    if not killed & st.path:
        return f"failed though no process on its path was killed: {st.describe()}"
    return None


async def _chaos(
    runtime_dir: Any, hubs: int, nstreams: int, total: int, faults: bool, seed: int, limit: float
) -> None:
    rng = random.Random(seed)
    killed: set[int] = set()
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        report_tx, report_rx = meshipc.channel()
        inboxes = [meshipc.channel() for _ in range(hubs)]
        for i in range(hubs):
            arg = {
                "idx": i,
                "inbox": inboxes[i][1],
                "peers": [tx.clone() for tx, _ in inboxes],
                "report": report_tx.clone(),
            }
            procs.append(await mesh.spawn("chaos_workers:hub", arg, name=f"hub{i}"))
        report_tx.close()
        streams: list[Stream] = []
        for s in range(nstreams):
            kind = s % 3
            keys = 3 if kind == 2 else 1
            st = Stream(s, kind, {str(k): total // keys for k in range(keys)})
            tx, rx = meshipc.channel()
            st.senders = [tx] + [tx.clone() for _ in range(keys - 1)]
            first = rng.randrange(hubs)
            st.path.add(first)
            inboxes[first][0].send(
                {"stream": s, "rx": rx, "seen": {}, "hops": 0, "take": TAKE, "seed": s, "counts": st.counts}
            )
            streams.append(st)
        reported = asyncio.Event()
        follower = asyncio.create_task(_follow(report_rx, streams, reported))
        producers = [asyncio.create_task(_produce(st, limit)) for st in streams]
        chaos: asyncio.Task[None] | None = None
        if faults:
            chaos = asyncio.create_task(_faults(procs, streams, reported, killed, rng, nstreams * total))
        try:
            await asyncio.wait_for(asyncio.gather(*(_finish(st, killed, limit) for st in streams)), limit)
        except TimeoutError:
            raise AssertionError("hung:\n" + "\n".join(st.describe() for st in streams)) from None
        finally:
            if chaos is not None:
                chaos.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await chaos
            for p in procs:
                signal_proc(p, signal.SIGCONT)
            follower.cancel()
            for t in producers:
                t.cancel()
        bad = [v for st in streams if (v := _verdict(st, killed)) is not None]
        assert not bad, "\n".join(bad)


def _read(streams: list[Stream]) -> int:
    return sum(sum(st.seen.values()) for st in streams)


async def _until_read(streams: list[Stream], reported: asyncio.Event, more: int, bound: float) -> None:
    """Until the hubs report ``more`` values read (across all streams), or
    ``bound`` seconds if they cannot (every stream may wait on a stopped hub)."""
    goal = _read(streams) + more
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(bound):
            while _read(streams) < goal:
                reported.clear()
                await reported.wait()


async def _faults(
    procs: list[meshipc.Process],
    streams: list[Stream],
    reported: asyncio.Event,
    killed: set[int],
    rng: random.Random,
    total: int,
) -> None:
    """SIGKILL one hub once a random share of all values was read; SIGSTOP
    the others one after another, each while the rest read a few thousand
    values (4 s at most), until the run ends."""
    kill_at = rng.uniform(0.2, 0.7) * total
    victim = rng.randrange(len(procs))
    while True:
        if not killed and _read(streams) >= kill_at:
            killed.add(victim)
            signal_proc(procs[victim], signal.SIGKILL)
        alive = [i for i in range(len(procs)) if i not in killed]
        i = rng.choice(alive)
        signal_proc(procs[i], signal.SIGSTOP)
        try:
            await _until_read(streams, reported, rng.randint(2000, 8000), 4.0)
        finally:
            signal_proc(procs[i], signal.SIGCONT)
        await _until_read(streams, reported, rng.randint(500, 3000), 1.0)


async def test_chaos_small_no_faults(runtime_dir: Any) -> None:
    """3 hubs, one stream of each producer kind: everything in order, once."""
    await _chaos(runtime_dir, hubs=3, nstreams=3, total=3000, faults=False, seed=1, limit=20)


def _soak(runtime_dir: Any, faults: bool, seed: int) -> None:
    meshipc.run(_chaos(runtime_dir, hubs=5, nstreams=9, total=30_000, faults=faults, seed=seed, limit=600))


@pytest.mark.soak
def test_chaos_soak_no_faults(runtime_dir: Any) -> None:
    _soak(runtime_dir, faults=False, seed=2)


@pytest.mark.soak
@pytest.mark.parametrize("seed", [3, 4, 5])
def test_chaos_soak_kill_and_stop(runtime_dir: Any, seed: int) -> None:
    _soak(runtime_dir, faults=True, seed=seed)
