"""Soak (``-m soak``, a few minutes): a million sequence-numbered messages
through a port circulating among real processes, and a variant with random
SIGKILLs of processes that do not own the port (issue 7).

The parent produces 0, 1, 2, ... on one end of a ``Port.pair``; the other end
circulates among ``rel_workers:hop`` workers, each reading a random number of
values (checking each is the next one) before forwarding it to a random other
worker (see ``rel_workers.py``). The producer stays at most ``WINDOW`` values
ahead of what the holders have reported reading (and drains, where
``drain`` exists), so the backlog that moves with the port stays bounded.

Expected outcomes:

* without kills (one port with a million values, then 40 rounds of 25,000
  that close while the port moves, half of them closing before the port
  leaves the producer): every value arrives exactly once, in order, then
  ``ChannelClosed``;
* with kills (the producer keeps its end open until the holder reports it
  read everything, so that a holder killed late is still seen failing):
  every hop reads a gap-free, duplicate-free continuation of the
  previous one (so whatever was read before a failure is an in-order prefix);
  the stream either completes as above, or ends with ``PortFailed`` /
  ``NodeFailure`` (at the holder or at the producer) - and only if a killed
  process was on the port's path this round (held it, or was handed it). A
  kill of a process that never held the port must not disturb it. Nothing
  else (``ProtocolError``, ``MessageError``, an early ``ChannelClosed``, a
  hang) is acceptable.

These tests run their own event loop (``asyncio.run``) so that they are not
bound by the 60 s limit the conftest puts on ``async def`` tests.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path
from typing import Any

import pytest

import meshipc
from meshipc import ChannelClosed, MeshError, NodeFailure, Port, PortFailed
from relutil import reaped, signal_proc, spawn_ring

WINDOW = 50_000
BATCH = 1000

pytestmark = pytest.mark.soak


class Round:
    """One port's life: produce ``total`` values, follow the hop reports."""

    def __init__(self, rnd: int, total: int, first: int) -> None:
        self.rnd = rnd
        self.total = total
        self.acked = 0  # values the holders reported reading
        self.path: set[int] = {first}  # workers that held or were handed the port
        self.hops = 0
        self.end: list[Any] | None = None
        self.progress = asyncio.Event()

    def describe(self, kill: tuple[list[meshipc.Process], set[int]] | None) -> str:
        killed = sorted(kill[1]) if kill else []
        return (
            f"round {self.rnd}: {self.acked} of {self.total} read in {self.hops} hops, "
            f"path {sorted(self.path)}, killed {killed}, end {self.end}"
        )

    def on_report(self, r: list[Any]) -> None:
        if r[1] != self.rnd:
            return
        if r[0] == "hop":
            _, _, idx, start, seen, ok, nxt = r
            assert ok, f"round {self.rnd}: worker {idx} read values out of order in [{start}, {seen})"
            self.path.update((idx, nxt))
            self.acked = max(self.acked, seen)
            self.hops += 1
        elif r[0] == "end":
            self.end = r
            self.path.add(r[2])
        self.progress.set()


async def _drain(port: Port) -> None:
    drain = getattr(port, "drain", None)
    if drain is not None:
        await drain()


async def _circulate(
    inbox: list[meshipc.Sender[Any]],
    reports: meshipc.Receiver[Any],
    rnd: int,
    total: int,
    rng: random.Random,
    kill: tuple[list[meshipc.Process], set[int]] | None = None,
    close_first: bool = False,
) -> tuple[Round, str]:
    """Run one round; returns it and how it ended: ``"closed"`` or the
    failure text. With ``kill``, one worker that is not the last known
    holder is SIGKILLed after a random number of hops; its index goes in the
    set. With ``close_first``, all ``total`` values are sent and the
    producer's end closed before the other end is handed to the ring (the
    whole backlog then travels with the port)."""
    first = rng.randrange(len(inbox))
    r = Round(rnd, total, first)
    a, b = Port.pair()
    seed = rng.randrange(1 << 30)
    hop: dict[str, Any] = {"port": b, "seen": 0, "round": rnd, "take": [2000, 20000], "seed": seed}
    if kill:
        # the producer keeps its end open until the holder has read all (so a
        # holder killed after the producer finished still fails something we
        # watch); the holder reports "complete" and closes the port
        hop["total"] = total
    if close_first:
        for i in range(total):
            a.send(i)
        a.close()
    inbox[first].send(hop)
    kill_after = rng.randint(1, 12) if kill else -1
    producer_failed: list[str] = []

    async def read_reports() -> None:
        while True:
            rep = await reports.recv()
            r.on_report(rep)
            if kill and r.hops == kill_after and not kill[1]:
                last = rep[6] if rep[0] == "hop" else rep[2]
                victims = [i for i in range(len(inbox)) if i != last]
                victim = rng.choice(victims)
                kill[1].add(victim)
                signal_proc(kill[0][victim], signal.SIGKILL)

    async def watch_producer_end() -> None:
        try:
            await a.recv()  # nothing comes back on a: this ends with the stream
        except (PortFailed, ChannelClosed) as exc:
            # ChannelClosed here, before the holder reported the end, means
            # the port was closed without anyone reading it to the end
            # the holder's "complete" report comes before its close on the
            # same link: give its processing a few loop turns to come first
            if not a.closed:  # (not our own close)
                if isinstance(exc, ChannelClosed):
                    for _ in range(100):
                        if r.end is not None:
                            break
                        await asyncio.sleep(0)
                if r.end is None:
                    producer_failed.append(f"{type(exc).__name__}: {exc}")
        r.progress.set()

    tasks = [asyncio.ensure_future(read_reports()), asyncio.ensure_future(watch_producer_end())]
    try:
        sent = total if close_first else 0
        while sent < total and not producer_failed and r.end is None:
            if sent - r.acked >= WINDOW:
                r.progress.clear()
                try:
                    await asyncio.wait_for(r.progress.wait(), 30)
                except TimeoutError:
                    raise AssertionError(f"no progress for 30 s: {r.describe(kill)}") from None
                continue
            try:
                # a send raises too once the port failed under values sent
                # earlier (they may not have arrived), as drain reports it
                for i in range(sent, min(total, sent + BATCH)):
                    a.send(i)
                sent = min(total, sent + BATCH)
                await _drain(a)
            except (PortFailed, ChannelClosed) as exc:
                if isinstance(exc, ChannelClosed) and sent >= total:
                    break  # the holder read it all and closed: its report decides
                # the port broke under the producer (drain reports it): the
                # round's end says whether a killed worker was on its path
                producer_failed.append(f"{type(exc).__name__}: {exc}")
                r.progress.set()
                break
            await asyncio.sleep(0)
        if not kill:
            a.close()  # the end of the stream (with kills: the holder ends it)
        try:
            async with asyncio.timeout(60):
                while r.end is None and not producer_failed:
                    r.progress.clear()
                    await r.progress.wait()
        except TimeoutError:
            raise AssertionError(f"the stream did not end within 60 s: {r.describe(kill)}") from None
        if producer_failed:
            # reports travel on other links than the failure: a holder reports
            # where it sends the port before sending it, but that report may
            # still be on its way. Take what arrives until a quiet second.
            while True:
                r.progress.clear()
                try:
                    await asyncio.wait_for(r.progress.wait(), 1.0)
                except TimeoutError:
                    break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        a.close()
    if r.end is not None:
        _, _, idx, seen, ok, how = r.end
        assert ok, f"round {rnd}: the last holder (worker {idx}) read values out of order"
        if how in ("closed", "complete"):
            assert seen == total, f"round {rnd}: the stream ended ({how}) after {seen} of {total} values"
            return r, "closed"
        return r, how
    return r, producer_failed[0]


async def _soak_no_kills(rdir: Path) -> None:
    """One port carrying a million values, then 40 rounds of 25,000 values
    each ending with a close while the port moves; every other one closes
    first and hands the port over with its whole backlog."""
    total = 1_000_000
    rng = random.Random(7)
    async with meshipc.Mesh(runtime_dir=rdir) as mesh, reaped(mesh) as procs:
        rep_tx, rep_rx = meshipc.channel()
        inbox = await spawn_ring(mesh, procs, 3, rep_tx)
        r, how = await _circulate(inbox, rep_rx, 0, total, rng)
        assert how == "closed", f"the stream ended with {how}: {r.describe(None)}"
        assert r.hops > 50, f"only {r.hops} hops: the port did not circulate much"
        print(f"soak: {total} values through {r.hops} hops among 3 processes, in order, no loss")
        hops = 0
        for rnd in range(1, 41):
            r, how = await _circulate(inbox, rep_rx, rnd, 25_000, rng, close_first=rnd % 2 == 0)
            assert how == "closed", f"the stream ended with {how}: {r.describe(None)}"
            hops += r.hops
        print(f"soak: 40 rounds of 25,000 values closed while moving ({hops} hops), in order, no loss")


async def _soak_with_kills(rdir: Path) -> None:
    rounds, per_round = 10, 100_000
    rng = random.Random(11)
    outcomes: list[str] = []
    async with meshipc.Mesh(runtime_dir=rdir) as mesh:
        for rnd in range(rounds):
            async with reaped(mesh) as procs:
                rep_tx, rep_rx = meshipc.channel()
                inbox = await spawn_ring(mesh, procs, 4, rep_tx)
                killed: set[int] = set()
                r, how = await _circulate(inbox, rep_rx, rnd, per_round, rng, (procs, killed))
                if how != "closed":
                    assert how.startswith(("PortFailed", "NodeFailure")), (
                        f"ended with {how}: {r.describe((procs, killed))}"
                    )
                    assert killed & r.path, (
                        f"round {rnd}: the port failed ({how}) though the killed worker(s) {killed} "
                        f"never held it (path {sorted(r.path)})"
                    )
                outcomes.append(f"{rnd}: {how[:40]} after {r.acked} (killed {killed}, path {sorted(r.path)})")
    print("\n".join(outcomes))


@pytest.mark.timeout(900)
def test_soak_million_messages_port_circulating_among_three_processes(runtime_dir: Path) -> None:
    asyncio.run(_soak_no_kills(runtime_dir))


@pytest.mark.timeout(900)
def test_soak_circulating_port_with_random_sigkills(runtime_dir: Path) -> None:
    asyncio.run(_soak_with_kills(runtime_dir))


def test_error_types_are_the_documented_ones() -> None:
    """The failure types the soak accepts are PortFailed and its subclass."""
    assert issubclass(NodeFailure, PortFailed)
    assert issubclass(PortFailed, MeshError)
