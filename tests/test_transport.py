"""``meshipc._transport.Link`` on its own, over a real socket pair: write
coalescing, partial writes, descriptor batches, out-of-band bodies, bodies
written as their own chunk, and a peer hanging up."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from meshipc._fd import Fd
from meshipc._transport import SCM_MAX_FD, SEPARATE_BODY_MIN, Link
from meshipc._wire import K_CALL, K_DATA, MAX_FDS_PER_MESSAGE, OOB_THRESHOLD, MsgEvent
from relutil import wait_until

PORT = b"P" * 16


class Inbox:
    """What one link hands its node."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []  # plain messages, in order (single or in runs)
        self.seqs: list[int] = []
        self.events: list[tuple[MsgEvent, list[Any]]] = []
        self.lost: list[str] = []

    def on_data(self, port: bytes, seq: int, kind: int, body: bytes) -> None:
        self.seqs.append(seq)
        self.bodies.append(bytes(body))

    def on_run(self, port: bytes, first: int, bodies: list[bytes]) -> None:
        self.seqs.extend(range(first, first + len(bodies)))
        self.bodies.extend(bytes(b) for b in bodies)

    def on_event(self, peer: bytes, ev: Any, fds: list[Any]) -> None:
        self.events.append((ev, fds))

    def on_lost(self, link: Link, reason: str) -> None:
        self.lost.append(reason)


def make_link(sock: socket.socket, peer: bytes, inbox: Inbox) -> Link:
    loop = asyncio.get_running_loop()
    return Link(loop, sock, peer, inbox.on_event, inbox.on_lost, inbox.on_data, inbox.on_run)


@asynccontextmanager
async def linked() -> AsyncIterator[tuple[Link, Link, Inbox, Inbox]]:
    """Two links on the ends of a socket pair, and what each received."""
    a, b = socket.socketpair()
    ia, ib = Inbox(), Inbox()
    la, lb = make_link(a, b"B" * 16, ia), make_link(b, b"A" * 16, ib)
    try:
        yield la, lb, ia, ib
    finally:
        la.close()
        lb.close()


async def test_the_first_message_goes_out_at_once_and_the_rest_of_the_turn_coalesces() -> None:
    async with linked() as (a, _b, _, got):
        a.write_data(PORT, 0, K_DATA, b"first")
        assert a.writes == 1  # written inside the call, no loop turn
        for i in range(1, 1000):
            a.write_data(PORT, i, K_DATA, b"x%d" % i)
        assert a.queued_bytes > 0 and not a.idle
        await wait_until(lambda: len(got.bodies) == 1000, "every message")
        assert got.bodies == [b"first"] + [b"x%d" % i for i in range(1, 1000)]
        assert got.seqs == list(range(1000))
        assert a.frames_out == 1000
        assert a.writes <= 3, f"{a.writes} writes for 1000 frames"
        assert a.idle and a.queued_bytes == 0


async def test_a_stream_keeps_coalescing_one_write_per_turn() -> None:
    async with linked() as (a, _b, _, got):
        n = 0
        for _ in range(50):  # 50 loop turns of 100 frames each
            for _ in range(100):
                a.write_data(PORT, n, K_DATA, b"%d" % n)
                n += 1
            await asyncio.sleep(0)
        await wait_until(lambda: len(got.bodies) == n, "every message")
        assert got.seqs == list(range(n))
        assert a.writes < 200, f"{a.writes} writes for {n} frames"


async def test_partial_writes_resume_in_order_once_the_peer_reads() -> None:
    a_sock, b_sock = socket.socketpair()
    a_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a = make_link(a_sock, b"B" * 16, Inbox())  # and nobody reads b_sock yet
    try:
        bodies = [bytes([i % 251]) * 1000 for i in range(2000)]  # about 2 MB
        for i, body in enumerate(bodies):
            a.write_data(PORT, i, K_DATA, body)
        await asyncio.sleep(0)  # the turn's flush writes what the socket takes
        assert not a.idle, "2 MB cannot fit a socket nobody reads"
        assert a.bytes_out < sum(len(b) for b in bodies)
        got = Inbox()
        b = make_link(b_sock, b"A" * 16, got)  # now the peer reads
        await wait_until(lambda: len(got.bodies) == len(bodies), "every message")
        assert got.bodies == bodies and got.seqs == list(range(len(bodies)))
        await wait_until(lambda: a.idle, "the writer to drain")
        b.close()
    finally:
        a.close()
        b_sock.close()


async def test_descriptors_beyond_one_sendmsg_go_in_batches_and_each_message_gets_its_own() -> None:
    r, w = os.pipe()
    per_message = [MAX_FDS_PER_MESSAGE, MAX_FDS_PER_MESSAGE, 50]
    assert sum(per_message) > SCM_MAX_FD  # more than one sendmsg can carry
    try:
        async with linked() as (a, _b, _, got):
            sent: list[list[Fd]] = []
            for seq, n in enumerate(per_message):
                fds = [Fd.dup(w) for _ in range(n)]
                sent.append(fds)
                a.write_event(MsgEvent(PORT, seq, K_DATA, 0, [], n, b"m%d" % seq), fds)
            await wait_until(lambda: len(got.events) == len(per_message), "every message")
            assert a.writes >= 2
            for seq, (ev, fds) in enumerate(got.events):
                assert (ev.seq, ev.body, len(fds)) == (seq, b"m%d" % seq, per_message[seq])
                for f in fds:
                    assert stat.S_ISFIFO(os.fstat(f.fileno()).st_mode)
                    f.close()
            # the sender's copies were closed once delivered
            assert all(f.closed for fds in sent for f in fds)
    finally:
        os.close(r)
        os.close(w)


async def test_a_large_body_travels_out_of_band_and_a_medium_one_as_its_own_chunk() -> None:
    big = os.urandom(OOB_THRESHOLD)
    medium = os.urandom(SEPARATE_BODY_MIN + 1)
    async with linked() as (a, _b, _, got):
        a.write_event(MsgEvent(PORT, 0, K_DATA, 0, [], 0, big), [])
        a.write_data(PORT, 1, K_DATA, medium)
        await wait_until(lambda: len(got.events) + len(got.bodies) == 2, "both messages")
        ((ev, fds),) = got.events
        assert (ev.seq, ev.flags, ev.nfds, fds) == (0, 0, 0, [])
        assert ev.body == big
        assert got.bodies == [medium]


async def test_the_peer_hanging_up_is_reported_once() -> None:
    async with linked() as (a, b, mine, theirs):
        b.close()
        await wait_until(lambda: bool(mine.lost), "the link to be lost")
        assert mine.lost == ["connection closed by peer"]
        assert a.closed
        a.write_data(PORT, 0, K_DATA, b"into the void")  # dropped, no error
        await asyncio.sleep(0)  # a loop turn for anything it might have scheduled
        assert mine.lost == ["connection closed by peer"] and theirs.lost == []


async def test_links_of_one_node_share_one_read_buffer_even_when_a_read_reenters() -> None:
    """Two links reading into one ``ReadBuffer``: each gets its own bytes;
    a read started from inside another link's callback (re-entered while the
    shared buffer still holds frames being decoded) reads into a buffer of
    its own, and neither stream is corrupted."""
    from meshipc._transport import ReadBuffer
    from meshipc._wire import data_frame

    loop = asyncio.get_running_loop()
    reads = ReadBuffer()
    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    one = [b"one%d" % i for i in range(500)]
    two = [b"two%d" % i * 20 for i in range(500)]
    # link 1's whole stream waits in its socket: one read takes it all
    a1.sendall(b"".join(data_frame(PORT, i, K_CALL, b) for i, b in enumerate(one)))
    got1, got2 = Inbox(), Inbox()
    reentered: list[bool] = []
    r2 = Link(loop, b2, b"A" * 16, got2.on_event, got2.on_lost, got2.on_data, got2.on_run, reads)

    def on_data1(port: bytes, seq: int, kind: int, body: bytes) -> None:
        got1.on_data(port, seq, kind, body)
        if not reentered:
            reentered.append(reads.busy)
            a2.sendall(b"".join(data_frame(PORT, i, K_DATA, b) for i, b in enumerate(two)))
            r2._read_once()  # link 2 reads while link 1's frames sit in the shared buffer

    r1 = Link(loop, b1, b"A" * 16, got1.on_event, got1.on_lost, on_data1, got1.on_run, reads)
    try:
        await wait_until(lambda: len(got1.bodies) == 500 and len(got2.bodies) == 500, "both streams")
        assert reentered == [True]
        assert got1.bodies == one
        assert got2.bodies == two
        assert not reads.busy and not got1.lost and not got2.lost
    finally:
        for link in (r1, r2):
            link.close()
        a1.close()
        a2.close()


async def test_messages_apart_go_out_at_once_and_a_burst_waits_for_one_write(monkeypatch: Any) -> None:
    """A message sent a while after the last immediate one (a call's next
    request or reply) is written at once, with no loop turn; one following
    within ``BURST_GAP`` joins the turn's single coalesced write."""
    import meshipc._transport as transport

    now = [100.0]
    monkeypatch.setattr(transport, "_monotonic", lambda: now[0])
    async with linked() as (a, _b, _, got):
        a.write_data(PORT, 0, K_DATA, b"first")
        assert a.writes == 1 and a.idle
        now[0] += 1.0  # a round trip later
        a.write_data(PORT, 1, K_DATA, b"second")
        assert a.writes == 2 and a.idle  # out inside the call again
        now[0] += transport.BURST_GAP / 10  # right behind it: a burst
        a.write_data(PORT, 2, K_DATA, b"third")
        a.write_data(PORT, 3, K_DATA, b"fourth")
        assert a.writes == 2 and not a.idle  # queued for the turn's write
        await wait_until(lambda: len(got.bodies) == 4, "every message")
        assert a.writes == 3
        assert got.bodies == [b"first", b"second", b"third", b"fourth"]


async def test_backlog_counts_what_the_peer_has_not_taken_and_wakes_when_it_shrinks() -> None:
    """Issue 18: ``Link.backlog`` (what flow control sees without trusting
    the peer) counts the bytes a peer that stopped reading left unwritten,
    and ``watch_backlog`` fires once it is back under the mark."""
    async with linked() as (a, b, _, got):
        fd = b.sock.fileno()
        b.loop.remove_reader(fd)  # b stops reading
        body = b"y" * 65536
        for i in range(64):
            a.write_data(PORT, i, K_DATA, body)
            await asyncio.sleep(0)  # one write per turn
        assert a.backlog > 1024 * 1024
        assert a.backlog == a.queued_bytes
        fired: list[int] = []
        a.watch_backlog(64 * 1024, lambda: fired.append(a.backlog))
        await asyncio.sleep(0)
        assert not fired
        b.loop.add_reader(fd, b._on_readable)  # b reads again
        await wait_until(lambda: fired, "the backlog to shrink")
        assert fired[0] <= 64 * 1024
        await wait_until(lambda: len(got.bodies) == 64, "every message")
        assert a.backlog == 0
