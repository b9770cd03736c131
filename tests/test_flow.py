"""Flow control and thread-safe senders (issue 7, new behaviour), over real
processes and sockets.

The API under test: ``await sender.drain()`` / ``await port.drain()``
(returns when the channel is back under its bound), ``meshipc.Limits(
window_bytes=, window_messages=, max_bytes=, max_messages=)`` given to
``meshipc.Mesh(limits=...)``, and ``meshipc.BufferFull`` (a ``MeshError``)
raised by ``send`` past the hard limit. Until that API exists these tests
fail with ``AttributeError``/``TypeError``: that is expected.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import meshipc
from relutil import STEP, reaped, signal_proc, vmrss_kb, within

MiB = 1024 * 1024


def _limits(**kw: int) -> Any:
    return meshipc.Limits(**kw)  # type: ignore[attr-defined]


async def _stopped_consumer(
    mesh: meshipc.Mesh, procs: list[meshipc.Process]
) -> tuple[meshipc.Sender[Any], meshipc.Receiver[Any], meshipc.Process]:
    """A ``rel_workers:consumer`` worker, connected, then SIGSTOPped."""
    tx, rx = meshipc.channel()
    rep_tx, rep_rx = meshipc.channel()
    w = await mesh.spawn("rel_workers:consumer", {"rx": rx, "report": rep_tx}, name="consumer")
    procs.append(w)
    assert (await within(rep_rx.recv()))[0] == "ready"
    tx.send([0, b""])  # settles tx on the worker's end: the data path is direct
    signal_proc(w, signal.SIGSTOP)
    return tx, rep_rx, w


async def test_stalled_consumer_drain_waits_memory_bounded_then_all_delivered(runtime_dir: Path) -> None:
    """A SIGSTOPped consumer: a producer that drains after every 1 MiB
    message blocks in ``drain`` (it does not finish 1 GiB worth of attempts),
    its RSS grows by less than 200 MB while blocked; after SIGCONT every
    message arrives in order and the consumer's own RSS stayed bounded."""
    total = 1024  # 1 GiB in 1 MiB messages
    blob = b"x" * MiB
    limits = _limits(window_bytes=8 * MiB, window_messages=4096, max_bytes=64 * MiB, max_messages=65536)
    async with meshipc.Mesh(runtime_dir=runtime_dir, limits=limits) as mesh, reaped(mesh) as procs:  # type: ignore[call-arg]
        tx, rep_rx, w = await _stopped_consumer(mesh, procs)
        consumer_before = vmrss_kb(w.pid)
        before = vmrss_kb()
        sent = 1
        blocked = False
        try:
            while sent <= total:
                tx.send([sent, blob])
                sent += 1
                try:
                    await within(tx.drain(), 1.0)  # type: ignore[attr-defined]
                except TimeoutError:
                    blocked = True
                    break
            grew = (vmrss_kb() - before) / 1024
        finally:
            signal_proc(w, signal.SIGCONT)
        assert blocked, f"drain() never blocked: {sent - 1} MiB sent to a stopped consumer"
        assert grew < 200, f"producer RSS grew by {grew:.0f} MB while the consumer was stopped"
        async with asyncio.timeout(30):
            await tx.drain()  # type: ignore[attr-defined]
            while sent <= total:
                tx.send([sent, blob])
                sent += 1
                await tx.drain()  # type: ignore[attr-defined]
            tx.close()
            done = await rep_rx.recv()
        assert done[:4] == ["done", total + 1, True, "closed"], done[:4]
        consumer_grew = (done[4] - consumer_before) / 1024
        assert consumer_grew < 200, f"consumer RSS grew by {consumer_grew:.0f} MB"


async def test_port_drain_waits_for_stalled_peer(runtime_dir: Path) -> None:
    """``Port.drain`` too: a raw port whose peer is in a stopped worker."""
    limits = _limits(window_bytes=1 * MiB, window_messages=1024, max_bytes=64 * MiB, max_messages=65536)
    async with meshipc.Mesh(runtime_dir=runtime_dir, limits=limits) as mesh, reaped(mesh) as procs:  # type: ignore[call-arg]
        rep_tx, rep_rx = meshipc.channel()
        a, b = meshipc.Port.pair()
        w = await mesh.spawn("rel_workers:consumer", {"rx": b, "report": rep_tx}, name="consumer")
        procs.append(w)
        assert (await within(rep_rx.recv()))[0] == "ready"
        a.send([0, b""])
        signal_proc(w, signal.SIGSTOP)
        try:
            blocked = False
            for i in range(1, 4096):
                a.send([i, b"y" * 4096])
                try:
                    await within(a.drain(), 1.0)  # type: ignore[attr-defined]
                except TimeoutError:
                    blocked = True
                    break
        finally:
            signal_proc(w, signal.SIGCONT)
        assert blocked, "Port.drain() never blocked on a stopped peer"
        await within(a.drain())  # type: ignore[attr-defined]
        a.close()
        done = await within(rep_rx.recv())
        assert done[:4] == ["done", i + 1, True, "closed"]


async def test_never_draining_producer_gets_buffer_full(runtime_dir: Path) -> None:
    """A producer that never drains, to a SIGSTOPped consumer, gets
    ``BufferFull`` (a MeshError) from ``send`` once past the hard limit,
    long before 1 GiB, and its RSS stays bounded."""
    assert issubclass(meshipc.BufferFull, meshipc.MeshError)  # type: ignore[attr-defined]
    limits = _limits(window_bytes=1 * MiB, window_messages=1024, max_bytes=16 * MiB, max_messages=65536)
    blob = b"z" * (64 * 1024)
    async with meshipc.Mesh(runtime_dir=runtime_dir, limits=limits) as mesh, reaped(mesh) as procs:  # type: ignore[call-arg]
        tx, _rep_rx, w = await _stopped_consumer(mesh, procs)
        before = vmrss_kb()
        try:
            with pytest.raises(meshipc.BufferFull):  # type: ignore[attr-defined]
                for i in range(16 * 1024):  # 1 GiB worth of attempts
                    tx.send([i + 1, blob])
                    if i % 16 == 15:
                        await asyncio.sleep(0)  # let the transport write what it can
            grew = (vmrss_kb() - before) / 1024
        finally:
            signal_proc(w, signal.SIGCONT)
        assert grew < 200, f"producer RSS grew by {grew:.0f} MB before BufferFull"


# --------------------------------------------------------------- threads


def _thread_sends(
    tx: meshipc.Sender[Any], tid: int, n: int, tail: int, start: threading.Event, last: threading.Event
) -> None:
    start.wait(STEP)
    for i in range(n):
        tx.send([tid, i])
    # the last few while the loop thread is idle (waiting in recv or on a
    # report): a send from another thread must wake the loop itself
    last.wait(STEP)
    for i in range(n, n + tail):
        tx.send([tid, i])


async def _run_threads(
    tx: meshipc.Sender[Any], n: int, tail: int, loop_tid: int, last: threading.Event
) -> list[threading.Thread]:
    """Four threads send ``[tid, i]`` through ``tx`` while this (the loop)
    thread sends ``[loop_tid, i]`` too, yielding now and then; once the
    caller sets ``last``, each thread sends ``tail`` more. The GIL switch
    interval is made tiny meanwhile so that threads interleave inside
    ``send``. Returns the threads (waiting for ``last`` or sending their tail)."""
    start = threading.Event()
    threads = [
        threading.Thread(target=_thread_sends, args=(tx, t, n, tail, start, last), daemon=True)
        for t in range(4)
    ]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        start.set()
        for i in range(n):
            tx.send([loop_tid, i])
            if i % 100 == 99:
                await asyncio.sleep(0)
    except BaseException:
        last.set()
        raise
    finally:
        sys.setswitchinterval(old)
    return threads


async def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        await asyncio.to_thread(t.join, STEP)
        assert not t.is_alive()


async def test_threads_send_through_one_sender_to_local_receiver() -> None:
    """Four threads plus the loop thread send through one Sender to a
    receiver in this process: each thread's messages arrive in its order,
    nothing is lost (including the ones sent while the loop thread only
    waits in ``recv``: no timer of the loop wakes it; a send from another
    thread must, and the deadline is a thread that cancels the reader)."""
    n, tail = 20_000, 100
    want = {t: n + tail for t in range(4)} | {4: n}
    tx, rx = meshipc.channel()
    nxt: dict[int, int] = {}
    got = 0
    last = threading.Event()
    sender = asyncio.ensure_future(_run_threads(tx, n, tail, 4, last))
    me, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert me is not None
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        me.cancel()

    watchdog = threading.Timer(STEP, loop.call_soon_threadsafe, (expire,))
    watchdog.start()
    try:
        while got < sum(want.values()):
            if got == 5 * n:
                # everything of the first phase is read: the loop thread
                # now only waits in recv() while the threads send the tail
                last.set()
            tid, i = await rx.recv()
            assert nxt.get(tid, 0) == i, f"thread {tid}: got {i}, expected {nxt.get(tid, 0)}"
            nxt[tid] = i + 1
            got += 1
    except asyncio.CancelledError:
        if not expired:
            raise
        me.uncancel()
        raise AssertionError(
            f"only {got} of {sum(want.values())} messages arrived within {STEP} s"
            f" (a send from another thread must wake the loop): {nxt}"
        ) from None
    finally:
        watchdog.cancel()
        last.set()
        await _join(await sender)
    assert nxt == want


async def test_threads_send_through_one_sender_to_worker(runtime_dir: Path) -> None:
    """The same with the receiver in a spawned worker: each thread's
    messages arrive in its order, nothing lost, the link survives (and the
    tail sent while the loop thread is idle is written without help)."""
    n, tail = 20_000, 100
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        rep_tx, rep_rx = meshipc.channel()
        procs.append(await mesh.spawn("rel_workers:collect_threads", {"rx": rx, "report": rep_tx}))
        assert await within(rep_rx.recv()) == ["ready"]
        tx.send([99, 0])  # settle tx on the worker's end first
        last = threading.Event()
        try:
            threads = await within(_run_threads(tx, n, tail, 4, last))
        finally:
            last.set()
        await _join(threads)
        tx.close()
        done = await within(rep_rx.recv())
        want = {"99": 1, "4": n} | {str(t): n + tail for t in range(4)}
        assert done == ["done", want, True, "closed"]


async def test_a_flooded_port_does_not_hold_back_calls_on_the_same_link(runtime_dir: Path) -> None:
    """A producer floods a port the worker never reads, draining as it goes:
    it stops at the window. A call to the same worker over the same
    connection is answered meanwhile (it waits behind at most one window,
    not behind an unbounded flood)."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        ports_tx, ports_rx = meshipc.channel()
        calls_tx, calls_rx = meshipc.channel()
        procs.append(await mesh.spawn("rel_workers:hold_and_serve", {"ports": ports_rx, "calls": calls_rx}))
        assert await within(calls_tx.call("ready")) == "ready"
        a, b = meshipc.Port.pair()
        ports_tx.send(b)
        payload = b"x" * 1000

        async def flood() -> int:
            sent = 0
            while True:
                a.send(payload)
                sent += 1
                await a.drain()

        producer = asyncio.ensure_future(flood())
        try:
            # the producer blocks once the window is full; calls still go through
            for i in range(20):
                assert await within(calls_tx.call(i)) == i
            assert not producer.done(), "the flood ended by itself"
        finally:
            producer.cancel()
        st = a._states[0]
        window = mesh.limits.window_messages
        assert st.engine.in_flight(st)[0] <= window + 1  # what the flood may have in flight: one window
        a.close()


async def test_a_receiver_in_use_on_one_loop_refuses_another_threads_loop() -> None:
    """recv/drain belong to the loop a handle is used on: another thread's
    running loop gets a clear MeshError, never a silent hang or loss."""
    tx, rx = meshipc.channel()
    waiting = asyncio.ensure_future(rx.recv())  # bound to this loop now
    await asyncio.sleep(0)
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            asyncio.run(rx.recv())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other_thread)
    t.start()
    await asyncio.to_thread(t.join, STEP)
    assert len(errors) == 1 and isinstance(errors[0], meshipc.MeshError), errors
    assert "another thread" in str(errors[0])
    tx.send("still fine")  # and the loop that owns it still gets its message
    assert await within(waiting) == "still fine"
    tx.close()
    rx.close()


async def test_drain_returns_after_a_message_larger_than_the_window(runtime_dir: Path) -> None:
    """Regression: a single message larger than the byte window kept
    ``drain`` waiting forever after the consumer had read it."""
    limits = _limits(window_bytes=1 * MiB, window_messages=1024, max_bytes=64 * MiB, max_messages=65536)
    async with meshipc.Mesh(runtime_dir=runtime_dir, limits=limits) as mesh, reaped(mesh) as procs:  # type: ignore[call-arg]
        tx, rx = meshipc.channel()
        rep_tx, rep_rx = meshipc.channel()
        w = await mesh.spawn("rel_workers:consumer", {"rx": rx, "report": rep_tx}, name="consumer")
        procs.append(w)
        assert (await within(rep_rx.recv()))[0] == "ready"
        for i in range(3):
            tx.send([i, b"b" * (3 * MiB)])
            await within(tx.drain())  # type: ignore[attr-defined]
        tx.close()
        done = await within(rep_rx.recv())
        assert done[:4] == ["done", 3, True, "closed"], done[:4]
