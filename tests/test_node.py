"""Nodes in one process: two or more real nodes on real sockets in one
event loop (links on their own: ``test_transport.py``; the handshake:
``test_handshake.py``)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest

import meshipc
from meshipc import Fd, Port
from meshipc._codec import CODEC
from meshipc._handshake import ROLE_WORKER, Authority
from meshipc._ids import PortId
from meshipc._node import Node
from meshipc._wire import MAX_FDS_PER_MESSAGE
from relutil import wait_until


def nodes(d: Path, n: int, authority: Authority | None = None) -> list[Node]:
    """``n`` started nodes of one mesh (of ``authority``'s, or a new one)."""
    authority = authority or Authority()
    out = []
    for _ in range(n):
        node = Node(d, authority.issue(ROLE_WORKER), codec=CODEC)
        node.start()
        out.append(node)
    return out


def link(a: Node, b: Node) -> tuple[Port, Port]:
    """A port on node a peered with one on node b (ids agreed up front)."""
    pa, pb = PortId.random(), PortId.random()
    sa = a.engine.new_bound(pa, b.id, pb)
    sb = b.engine.new_bound(pb, a.id, pa)
    return Port._wrap([sa]), Port._wrap([sb])


async def close_all(*ns: Node) -> None:
    for n in ns:
        await n.close(linger=1.0)


async def test_simultaneous_connects_resolve_to_one_connection(runtime_dir: Path):
    for _ in range(10):
        a, b = nodes(runtime_dir, 2)
        try:
            pa, pb = link(a, b)  # both sides start connecting at the same moment
            pa.send("from a")
            pb.send("from b")
            assert await asyncio.wait_for(pb.recv(), 10) == "from a"
            assert await asyncio.wait_for(pa.recv(), 10) == "from b"
            assert list(a.links) == [b.id] and list(b.links) == [a.id]
            # the two ends of one socket, not two sockets
            ca, cb = a.links[b.id], b.links[a.id]
            assert os.fstat(ca.sock.fileno()).st_ino != os.fstat(cb.sock.fileno()).st_ino
            assert a.stats().connecting == b.stats().connecting == 0
            for i in range(100):
                pa.send(i)
            assert [await asyncio.wait_for(pb.recv(), 10) for _ in range(100)] == list(range(100))
        finally:
            await close_all(a, b)


async def test_malformed_frames_drop_only_that_connection(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture
):
    a, bad, good = nodes(runtime_dir, 3)
    try:
        pa, pbad = link(a, bad)
        qa, qgood = link(a, good)
        pbad.send("hello")
        assert await asyncio.wait_for(pa.recv(), 10) == "hello"
        # an authenticated peer goes mad: garbage on its connection
        bad.links[a.id].sock.send(b"\xff\xff\xff\x7f" + b"garbage" * 10)
        with caplog.at_level(logging.WARNING, logger="meshipc"):
            with pytest.raises(meshipc.PortFailed):
                await asyncio.wait_for(pa.recv(), 10)
        assert any("protocol error" in r.getMessage() for r in caplog.records)
        assert bad.id not in a.links
        # the node lives on and keeps serving its other peers
        qgood.send("still here")
        assert await asyncio.wait_for(qa.recv(), 10) == "still here"
        qa.send("and back")
        assert await asyncio.wait_for(qgood.recv(), 10) == "and back"
    finally:
        await close_all(a, bad, good)


async def test_too_many_fds_in_one_message_is_refused_at_send(runtime_dir: Path):
    a, b = nodes(runtime_dir, 2)
    r, w = os.pipe()
    try:
        pa, pb = link(a, b)
        fds = [Fd.dup(w) for _ in range(MAX_FDS_PER_MESSAGE + 1)]
        with pytest.raises(meshipc.MeshError):
            pa.send(fds)
        # the channel still works, and a message at the cap goes through
        pa.send([Fd.dup(w) for _ in range(MAX_FDS_PER_MESSAGE)])
        got = await asyncio.wait_for(pb.recv(), 10)
        assert len(got) == MAX_FDS_PER_MESSAGE and all(isinstance(f, Fd) for f in got)
        for f in got:
            f.close()
    finally:
        os.close(r)
        os.close(w)
        await close_all(a, b)


async def test_port_moves_between_three_nodes_over_sockets(runtime_dir: Path):
    a, b, c = nodes(runtime_dir, 3)
    try:
        ab, ba = link(a, b)
        bc, cb = link(b, c)
        keep, moving = Port.pair()
        n = 0
        for _ in range(100):
            keep.send(n)
            n += 1
        ab.send(moving)
        for _ in range(100):
            keep.send(n)
            n += 1
        moved = await asyncio.wait_for(ba.recv(), 10)
        bc.send(moved)
        for _ in range(100):
            keep.send(n)
            n += 1
        final = await asyncio.wait_for(cb.recv(), 10)
        assert [await asyncio.wait_for(final.recv(), 10) for _ in range(n)] == list(range(n))
        # b and c connected directly to a's node when the port settled at c
        final.send("direct")
        assert await asyncio.wait_for(keep.recv(), 10) == "direct"
        assert a.id in c.links
    finally:
        await close_all(a, b, c)


async def test_deeply_nested_message_over_a_socket_leaves_the_channel_usable(runtime_dir: Path):
    a, b = nodes(runtime_dir, 2)
    try:
        pa, pb = link(a, b)
        pa.send("first")
        assert await asyncio.wait_for(pb.recv(), 10) == "first"
        st = pa._states[0]
        # a peer's raw bytes, bypassing the encoder
        a.send_data(b.id, st.peer_port, st.send_seq, 0, b"\x91" * 200_000 + b"\xc0")
        st.send_seq += 1
        pa.send("after")
        assert await asyncio.wait_for(pb.recv(), 10) == "after"  # the bad one was dropped
        assert pb.bad_messages == 1
    finally:
        await close_all(a, b)


async def test_a_call_is_one_frame_each_way(runtime_dir: Path):
    """Over a real connection: the request, then a final reply that closes
    the reply path (no CLOSE frames, no echo)."""
    a, b = nodes(runtime_dir, 2)
    try:
        pa, pb = link(a, b)
        tx, rx = meshipc.channel()
        pa.send(rx)
        srx = await asyncio.wait_for(pb.recv(), 10)

        async def serve() -> None:
            async for call in srx:
                call.reply(call.request + 1)

        server = asyncio.ensure_future(serve())
        assert await asyncio.wait_for(tx.call(1), 10) == 2  # warm up: the receiver settles
        async def barrier() -> None:
            # one frame each way on the same connection: whatever either side
            # owed before it (bookkeeping, a CLOSE, an echo) is written first
            pa.send("ping")
            assert await asyncio.wait_for(pb.recv(), 10) == "ping"
            pb.send("pong")
            assert await asyncio.wait_for(pa.recv(), 10) == "pong"

        await barrier()
        ca, cb = a.links[b.id], b.links[a.id]
        before = ca.frames_out, cb.frames_out
        for i in range(10):
            assert await asyncio.wait_for(tx.call(i), 10) == i + 1
        await barrier()
        # 10 requests and 10 replies, plus the barrier's own frame each way
        assert (ca.frames_out - before[0], cb.frames_out - before[1]) == (11, 11)
        assert a.stats().ports + b.stats().ports == 4  # pa, pb, tx, rx: no reply port left
        server.cancel()
        tx.close()
    finally:
        await close_all(a, b)


async def test_plain_messages_go_from_the_engine_to_the_link(runtime_dir: Path, monkeypatch: Any):
    """Over a real connection: once linked, a plain message goes from the
    engine straight to the link (``Engine.links`` is the node's own table;
    issue 24: no outbox call per message); before, the node's outbox takes
    it (queued while connecting) and it still arrives, in order."""
    via_outbox: list[bytes] = []
    send_data = Node.send_data

    def spy(self: Node, node: bytes, port: bytes, seq: int, kind: int, body: bytes) -> None:
        via_outbox.append(node)
        send_data(self, node, port, seq, kind, body)

    monkeypatch.setattr(Node, "send_data", spy)
    a, b = nodes(runtime_dir, 2)
    try:
        assert a.engine.links is a.links
        pa, pb = link(a, b)
        pa.send("first")  # not linked yet
        assert via_outbox == [b.id]
        assert await asyncio.wait_for(pb.recv(), 10) == "first"
        ca = a.links[b.id]
        before, outbox = ca.frames_out, len(via_outbox)
        for i in range(5):
            pa.send(i)
        assert [await asyncio.wait_for(pb.recv(), 10) for _ in range(5)] == list(range(5))
        assert ca.frames_out - before == 5
        assert len(via_outbox) == outbox  # none through the outbox
    finally:
        await close_all(a, b)


async def test_a_node_that_hangs_up_mid_handshake_is_retried_then_given_up(runtime_dir: Path):
    """A node under a flood sheds connections (EOF mid-handshake): that is
    retried; only a node that keeps hanging up is deemed gone."""
    import socket

    from meshipc._ids import NodeId
    from meshipc._names import node_path
    from meshipc._node import MAX_EARLY_CLOSES

    (a,) = nodes(runtime_dir, 1)
    ghost = NodeId.random()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(os.fspath(node_path(runtime_dir, ghost)))
    lsock.listen(16)
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()
    accepted = 0

    async def shed() -> None:
        nonlocal accepted
        while True:
            conn, _ = await loop.sock_accept(lsock)
            accepted += 1
            conn.close()  # hang up before answering the HELLO

    shedder = asyncio.ensure_future(shed())
    try:
        st = a.engine.new_bound(PortId.random(), ghost, PortId.random())
        p = Port._wrap([st])
        with pytest.raises(meshipc.NodeFailure, match=r"closed the connection|reset|pipe"):
            await asyncio.wait_for(p.recv(), 20)
        assert accepted == MAX_EARLY_CLOSES
    finally:
        shedder.cancel()
        lsock.close()
        await close_all(a)


async def test_streams_on_interleaved_ports_arrive_whole_and_in_order(runtime_dir: Path):
    """Reads bring runs of frames for one port (delivered in one step) cut
    by frames of another port and by partial frames: every value still
    arrives once, in order, on its own port, over a real socket."""
    a, b = nodes(runtime_dir, 2)
    try:
        (p1, q1), (p2, q2) = link(a, b), link(a, b)
        n = 20_000

        async def read(q: Port, count: int) -> list[Any]:
            return [await q.recv() for _ in range(count)]

        reader1 = asyncio.ensure_future(read(q1, n))
        for i in range(n):
            p1.send(i)
            if i % 3 == 0:
                p2.send(("x" * (i % 200), i))  # varying sizes cut reads mid-frame
            if i % 1000 == 999:
                await asyncio.wait_for(p1.drain(), 10)
        got1 = await asyncio.wait_for(reader1, 10)
        got2 = await asyncio.wait_for(read(q2, len(range(0, n, 3))), 10)
        assert got1 == list(range(n))
        assert got2 == [["x" * (i % 200), i] for i in range(0, n, 3)]
    finally:
        await close_all(a, b)


# ------------------------------------------------------------ what the node offers the layers above


async def test_stats_count_links_traffic_and_refusals(runtime_dir: Path):
    a, b = nodes(runtime_dir, 2)
    try:
        before = a.stats()
        assert before.node == a.id.hex() and before.links == () and before.rejected == 0
        assert before.acceptor is not None and before.acceptor.accepted == 0
        pa, pb = link(a, b)
        for i in range(10):
            pa.send(i)
        assert [await asyncio.wait_for(pb.recv(), 10) for _ in range(10)] == list(range(10))
        (la,) = a.stats().links
        (lb,) = b.stats().links
        assert la.peer == b.id.hex() and lb.peer == a.id.hex()
        assert la.frames_out >= 10 and lb.frames_in >= 10 and lb.bytes_in == la.bytes_out > 0
        assert la.writes <= la.frames_out and la.queued_bytes == la.backlog == la.oob_queued == 0
        # both sides connect at once (``link``): one or two accepted, one link kept
        accepted = sum(s.acceptor.accepted for s in (a.stats(), b.stats()) if s.acceptor is not None)
        assert accepted in (1, 2)
        # garbage on the node socket: refused and counted
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(os.fspath(a.path))
            s.sendall(b"\x00" * 64)
            await wait_until(lambda: a.stats().rejected == 1, "the node to count the refusal")
        assert a.stats().ports == len(a.engine.ports) == 1  # the record agrees with the engine
        st = a.stats()
        assert st.path == os.fspath(a.path)
        assert st.link(bytes(b.id)) == next(link for link in st.links if link.peer == bytes(b.id).hex())
        assert st.link(os.urandom(16)) is None
    finally:
        await close_all(a, b)
    assert a.stats().closed and a.stats().links == ()


async def test_an_exported_port_is_imported_on_the_other_node(runtime_dir: Path):
    """``export_port``/``import_port``: a port handed over outside any
    message (as an invitation carries one) keeps its peer and its queue."""
    a, b = nodes(runtime_dir, 2)
    try:
        mine, theirs = Port.pair()
        mine.send("queued before the move")
        (st,) = theirs._detach()
        packed = a.export_port(st, b.id)
        moved = Port._wrap([b.import_port(a.id, packed)])
        assert await asyncio.wait_for(moved.recv(), 10) == "queued before the move"
        moved.send("back")
        assert await asyncio.wait_for(mine.recv(), 10) == "back"
        with pytest.raises(meshipc.ProtocolError, match="descriptor of 3 bytes"):
            b.import_port(a.id, b"abc")
        with pytest.raises(meshipc.ProtocolError, match="reuses a live port"):
            b.import_port(a.id, packed)
    finally:
        await close_all(a, b)


async def test_an_invited_node_is_expected_until_it_joins_or_expires(runtime_dir: Path):
    authority = Authority()
    (a,) = nodes(runtime_dir, 1, authority)
    try:
        late, soon = authority.issue(ROLE_WORKER), authority.issue(ROLE_WORKER)
        a.expect_invited(late.node, 60)
        a.expect_invited(soon.node, 0.01)
        assert a.is_invited(late.node) and a.is_invited(soon.node)
        await wait_until(lambda: not a.is_invited(soon.node), "the short invitation to expire")
        assert a.is_invited(late.node) and a.stats().invited == 1 and a.stats().dead == 1
        a.forget(late.node, "withdrawn")
        assert not a.is_invited(late.node) and a.stats().invited == 0 and a.stats().dead == 2
    finally:
        await close_all(a)
