"""The gateway over real processes: a far process with its own mesh
(``gateway_peer.py``) joined to the test's mesh by a boundary link over a
socketpair (``gateway_util.far_peer``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import meshipc
from attachutil import key_material
from gateway_util import far_peer
from meshipc import (
    Call,
    ChannelClosed,
    Fd,
    LinkFailure,
    Mesh,
    NodeFailure,
    Port,
    PortFailed,
    Receiver,
    Sender,
)
from meshipc._boundary import (
    BoundaryDecoder,
    Close,
    Msg,
    encode_close,
    encode_credit,
    encode_goodbye,
    encode_hello,
    encode_msg,
)
from meshipc._channel import EXT_PORT
from meshipc._codec import pack_indices
from meshipc._gateway import CONTROL_SLACK
from relutil import wait_until, within

pytestmark = pytest.mark.timeout(60)


async def test_stream_both_ways_in_order(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        n = 20000
        tx, rx = meshipc.channel(int)
        far.agent.send(["count", rx, "up"])
        for i in range(n):
            tx.send(i)
            if i % 512 == 0:
                await tx.drain()
        tx.close()
        _, _, got, total, in_order, err = await far.report("counted")
        assert (got, total, in_order, err) == (n, n * (n - 1) // 2, True, None)

        tx2, rx2 = meshipc.channel(int)
        far.agent.send(["stream", tx2, n])
        seen = [v async for v in rx2]
        assert seen == list(range(n))


async def test_calls_both_ways(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        tx: Sender[Any]
        rx: Receiver[Call[Any]]
        tx, rx = meshipc.channel()
        far.agent.send(["double", rx])
        assert [await within(tx.call(i)) for i in range(200)] == [2 * i for i in range(200)]

        stx, srx = meshipc.channel()

        async def serve() -> None:
            async for c in srx:
                c.reply(c.request + 1000)

        server = asyncio.ensure_future(serve())
        far.agent.send(["call", stx, 300, "back"])
        _, _, total = await far.report("called")
        assert total == sum(i + 1000 for i in range(300))
        server.cancel()


async def test_ports_cross_and_come_back(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        a, b = Port.pair()
        far.agent.send(["back", b])
        _, b2 = await far.report("back")
        assert isinstance(b2, Port)
        # b went across and came back as another port, still peered with a
        for i in range(100):
            a.send(i)
        assert [await within(b2.recv()) for _ in range(100)] == list(range(100))
        b2.send("up")
        assert await within(a.recv()) == "up"
        # a port inside a port's message, while streaming on it
        c, d = Port.pair()
        far.agent.send(["echo", d])
        e, f = Port.pair()
        c.send(["inner", f])
        for i in range(50):
            c.send(i)
        tag, f2 = await within(c.recv())
        assert tag == "inner" and isinstance(f2, Port)
        assert [await within(c.recv()) for _ in range(50)] == list(range(50))
        e.send("through twice")
        assert await within(f2.recv()) == "through twice"
        c.close()
        assert far.gw.stats().relays >= 1


async def test_a_third_process_is_a_peer(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        tx, rx = meshipc.channel()
        worker = await mesh.spawn("workers:whoami", rx)
        far.agent.send(["third", tx, 20])
        _, got = await far.report("third")
        assert [v for _, v in got] == list(range(20))
        assert {pid for pid, _ in got} == {worker.pid}
        worker.kill()
        await worker.wait()


async def test_far_process_killed_fails_every_crossing_port(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        _tx, rx = meshipc.channel()
        far.agent.send(["hold", rx])
        await far.report("holding")
        p, q = Port.pair()
        far.agent.send(["hold", q])
        await far.report("holding")
        far.proc.kill()
        with pytest.raises(LinkFailure) as info:
            await within(p.recv())
        assert isinstance(info.value, NodeFailure)
        assert "test:far" in str(info.value) and "may or may not" in str(info.value)
        with pytest.raises(NodeFailure):
            await within(far.agent.recv())
        cause = await within(far.gw.wait_closed())
        assert isinstance(cause, LinkFailure)


async def test_a_call_waiting_across_fails_when_the_far_process_dies(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        tx, rx = meshipc.channel()
        far.agent.send(["hold", rx])  # held, never answered
        await far.report("holding")
        before = far.gw.stats().messages_out
        call = asyncio.ensure_future(tx.call("anyone?"))
        await wait_until(lambda: far.gw.stats().messages_out > before, "the call to cross")
        far.proc.kill()
        with pytest.raises(LinkFailure, match="test:far"):
            await within(call)


async def test_nothing_lost_before_the_cut(runtime_dir: Path) -> None:
    """The far side streams until it is killed: what arrived is 0..k-1, in
    order, each once, then the failure."""
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        tx, rx = meshipc.channel(int)
        far.agent.send(["stream", tx, 10**9])
        got: list[int] = []
        with pytest.raises(LinkFailure) as info:
            async for v in rx:
                got.append(v)
                if len(got) == 5000:
                    far.proc.kill()
        assert got == list(range(len(got))) and len(got) >= 5000
        assert "the stream ended" in str(info.value) or "the stream broke" in str(info.value)


async def test_stream_eof_fails_every_crossing_port(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        p, q = Port.pair()
        far.agent.send(["hold", q])
        await far.report("holding")
        far.agent.send(["stop", 0])  # exits at once: its end of the stream closes
        with pytest.raises(LinkFailure, match="the stream ended"):
            await within(p.recv())
        assert far.gw.stats().closed and far.gw.stats().relays == 0


async def test_heartbeat_loss_fails_within_the_bound(runtime_dir: Path) -> None:
    """A far side that stops (SIGSTOP: it neither reads nor writes) is
    declared lost after ``heartbeat_timeout`` (+ half an interval)."""
    limits = meshipc.BoundaryLimits(heartbeat_interval=0.1, heartbeat_timeout=1.5)
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir, limits=limits) as far:
        p, q = Port.pair()
        far.agent.send(["echo", q])
        p.send("ping")
        assert await within(p.recv()) == "ping"
        # an idle link stays up well past the bound: the far side pings us
        # (its own interval is 2 s, but it follows our announced bound)
        idle = asyncio.get_running_loop().time()
        await asyncio.sleep(2.0)  # idle time under test, not synchronisation
        assert not far.gw.closed
        p.send("still there")
        assert await within(p.recv()) == "still there"
        os.kill(far.proc.pid, signal.SIGSTOP)
        t0 = asyncio.get_running_loop().time()
        most = 0

        async def produce() -> None:  # towards a far side that reads nothing now
            nonlocal most
            with contextlib.suppress(LinkFailure):
                for _ in range(100_000):
                    p.send(b"s" * 1024)
                    await p.drain()
                    most = max(most, far.gw.stats().buffered_bytes)

        producer = asyncio.ensure_future(produce())
        with pytest.raises(LinkFailure, match="nothing heard"):
            while True:
                await within(p.recv())
        took = asyncio.get_running_loop().time() - t0
        await within(producer)
        assert 0 < most <= limits.write_buffer_bytes + 256 * 1024, most
        assert 1.0 < took < 1.5 + 0.05 + 3.0, took  # the bound, generous for a loaded machine
        assert idle < t0


async def test_an_fd_sent_towards_a_boundary_is_refused_at_send(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        p, q = Port.pair()
        far.agent.send(["echo", q])
        r, w = os.pipe()
        os.close(w)
        fd = Fd(r)
        with pytest.raises(meshipc.MessageError, match="cannot cross"):
            p.send(["with", fd])
        p.send("after")  # the port lives on
        assert await within(p.recv()) == "after"
        # and the same on the far side, towards us
        a, b = Port.pair()
        far.agent.send(["send_fd_here", b])
        _, why = await far.report("refused")
        assert "cannot cross" in why
        assert await within(a.recv()) == "after"


async def test_an_fd_forwarded_from_a_local_hop_arrives_as_one_error(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        p, q = Port.pair()
        far.agent.send(["collect", q])
        worker = await mesh.spawn("gateway_peer:send_fd", p)  # a third process sends the fd
        _, why = await far.report("error")
        assert "an Fd cannot cross" in why
        assert await far.report("item") == ["item", "after the fd"]
        worker.kill()  # its port fails: the far end learns it, in order
        await worker.wait()
        assert await far.report("ended") == ["ended"]


async def test_a_64_mib_value_crosses_in_chunks_both_ways(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        p, q = Port.pair()
        far.agent.send(["size", q])
        n = 64 * 1024 * 1024
        frames = far.gw.stats().frames_out
        p.send(b"x" * n)
        assert await within(p.recv(), 60) == n
        back = await within(p.recv(), 60)
        assert back == b"y" * n
        st = far.gw.stats()
        assert st.frames_out - frames >= n // (256 * 1024)  # it went in chunks
        assert st.buffered_bytes < 2 * 1024 * 1024


async def test_a_far_side_that_does_not_read_cannot_grow_the_gateway(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        p, q = Port.pair()
        far.agent.send(["hold", q])  # held, never read
        await far.report("holding")
        payload = b"z" * 1000

        async def produce() -> None:
            for _ in range(100_000):
                p.send(payload)
                await p.drain()

        producer = asyncio.ensure_future(produce())
        window = meshipc.BoundaryLimits().window_messages
        await wait_until(lambda: far.gw.stats().window_messages == window, "the far window to fill")
        await wait_until(lambda: far.gw.stats().queued_messages > mesh.limits.window_messages,
                         "our relay end to hold a window")
        for _ in range(3):
            st = far.gw.stats()
            assert st.window_messages <= window and st.window_bytes <= window * (len(payload) + 8)
            assert st.buffered_bytes < 1024 * 1024 + 300 * 1024, st
            assert st.queued_messages <= mesh.limits.window_messages + 1, st
            assert not producer.done()
            await asyncio.sleep(0.2)  # time passes: nothing grows
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


async def test_nothing_that_identifies_either_mesh_crosses(runtime_dir: Path) -> None:
    """Every byte that crossed, both ways, scanned for both meshes' node ids,
    socket folders and paths, port ids and private keys (raw and hex)."""
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir, record=True) as far:
        ours_seen: set[bytes] = set()

        def note() -> None:
            ours_seen.update(mesh._node.engine.ports)

        # traffic of every kind: values, calls both ways, ports both ways and back
        tx, rx = meshipc.channel()
        far.agent.send(["double", rx])
        assert await within(tx.call(21)) == 42
        stx, srx = meshipc.channel()

        async def serve() -> None:
            async for c in srx:
                note()
                c.reply(c.request)

        server = asyncio.ensure_future(serve())
        far.agent.send(["call", stx, 5, "t"])
        await far.report("called")
        a, b = Port.pair()
        note()
        far.agent.send(["back", b])
        _, b2 = await far.report("back")
        a.send(["x", Port.pair()[0]])
        await within(b2.recv())
        note()
        far.agent.send(["dump"])
        await far.report("dumped")
        theirs = far.info()
        server.cancel()
        mine = {
            "node": mesh.node_id.hex(),
            "dir": str(mesh.directory),
            "path": mesh.stats().node.path,
            "ports": [p.hex() for p in ours_seen],
            "keys": [k.hex() for k in key_material(mesh)],
        }
    wire = bytes(far.sent) + bytes(far.received)
    assert len(far.sent) > 100 and len(far.received) > 100
    for side in (mine, theirs):
        needles = [side["node"], *side["ports"], *side["keys"]]
        for h in needles:
            raw = bytes.fromhex(h)
            assert raw not in wire and h.encode() not in wire and h.upper().encode() not in wire
        for text in (side["dir"], side["path"], os.path.basename(side["dir"])):
            assert text.encode() not in wire, text
    assert len(theirs["ports"]) >= 3 and len(mine["ports"]) >= 3


# ------------------------------------------------------------ a hostile far side, in-process


_decoders: dict[int, BoundaryDecoder] = {}


@contextlib.asynccontextmanager
async def raw_far(
    mesh: Mesh, limits: meshipc.BoundaryLimits | None = None, hello: bytes | None = None, timeout: float = 5.0
) -> AsyncIterator[tuple[meshipc.Gateway, Port[Any], asyncio.StreamReader, asyncio.StreamWriter]]:
    """Our gateway on one end of a socketpair; the test writes the far side's
    bytes itself (its HELLO nonce is the highest: it opens odd relays)."""
    ours, theirs = socket.socketpair()
    r2, w2 = await asyncio.open_connection(sock=theirs)
    w2.write(hello if hello is not None else encode_hello("0.0.1", 2**64 - 1, meshipc.BoundaryLimits()))
    r, w = await asyncio.open_connection(sock=ours)
    agent, first = Port.pair()
    gw = await mesh.open_gateway(r, w, first, label="raw:far", limits=limits, timeout=timeout)
    try:
        yield gw, agent, r2, w2
    finally:
        _decoders.pop(id(r2), None)
        await gw.aclose()
        w2.close()


async def read_frames(r: asyncio.StreamReader, pred: Any) -> list[object]:
    """The far side's view of what our gateway wrote: events until one
    matches ``pred`` (one decoder per stream, its HELLO first)."""
    dec = _decoders.setdefault(id(r), BoundaryDecoder(1 << 30))
    seen: list[object] = []
    while True:
        while (ev := dec.next_event()) is not None:
            seen.append(ev)
            if pred(ev):
                return seen
        data = await within(r.read(65536))
        assert data, f"the stream ended; saw {seen}"
        dec.feed(data)


def raw_msg(relay: int, value: Any, ports: tuple[int, ...] = ()) -> bytes:
    return b"".join(bytes(p) for p in encode_msg(relay, 0, list(ports), msgspec.msgpack.encode(value)))


async def test_a_raw_far_side_can_talk(runtime_dir: Path) -> None:
    """The harness itself: a message in, a port opened by the far side, its
    message out; a message to a relay that ended has its ports closed back."""
    async with Mesh(runtime_dir=runtime_dir) as mesh, raw_far(mesh) as (_gw, agent, r, w):
        port_ref = msgspec.msgpack.Ext(EXT_PORT, pack_indices([0]))  # the message's port 0
        w.write(raw_msg(0, ["hello", port_ref], ports=(3,)))
        msg = await within(agent.recv())
        assert msg[0] == "hello" and isinstance(msg[1], Port)
        msg[1].send("to relay 3")
        seen = await read_frames(r, lambda ev: isinstance(ev, Msg) and ev.relay == 3)
        assert msgspec.msgpack.decode(seen[-1].body) == "to relay 3"
        w.write(encode_close(3) + raw_msg(3, "late", ports=(5, 7)))  # relay 3 ended
        seen = await read_frames(r, lambda ev: isinstance(ev, Close) and ev.relay == 7)
        assert Close(5) in seen
        with pytest.raises(ChannelClosed):
            await within(msg[1].recv())


@pytest.mark.parametrize(
    ("frames", "what"),
    [
        (raw_msg(0, "x", ports=(2,)), "relay 2, which is not its to open"),
        (raw_msg(0, "x", ports=(0,)), "relay 0, which is not its to open"),
        (raw_msg(0, "a", ports=(3,)) + raw_msg(0, "b", ports=(3,)), "relay 3, which is not its to open"),
        (raw_msg(99, "x"), "relay 99, which was never opened"),
        (raw_msg(8, "x"), "relay 8, which was never opened"),
        (raw_msg(0, "a", ports=(1, 3, 5, 9, 11, 13)), "more than 6 relays"),
        (raw_msg(0, 1) * 5, "beyond its window"),
        (encode_credit(0, 1, 1), "exceeds what is in flight"),
        (b"\x63" * 40, "broke the protocol"),
        (encode_goodbye("enough"), "GOODBYE: enough"),
        (encode_hello("x", 1, meshipc.BoundaryLimits()), "broke the protocol"),
    ],
)
async def test_a_far_side_that_breaks_the_protocol_loses_only_its_link(
    runtime_dir: Path, frames: bytes, what: str
) -> None:
    limits = meshipc.BoundaryLimits(window_messages=4, max_relays=3)
    async with Mesh(runtime_dir=runtime_dir) as mesh, raw_far(mesh, limits) as (gw, agent, _r, w):
        w.write(frames)
        with pytest.raises(LinkFailure, match=re.escape(what)):
            while True:
                await within(agent.recv())
        cause = await within(gw.wait_closed())
        assert isinstance(cause, LinkFailure) and what in str(cause)
        # the node lives on
        a, b = Port.pair()
        a.send("fine")
        assert await within(b.recv()) == "fine"
        tx, rx = meshipc.channel()
        worker = await mesh.spawn("workers:echo", rx)
        assert await within(tx.call("still serving")) == "still serving"
        worker.kill()
        await worker.wait()


@pytest.mark.parametrize(
    ("hello", "error", "what"),
    [
        (b"bash: python3: command not found\n", meshipc.BoundaryProtocolError, "command not found"),
        (
            encode_hello("7.0.0", 1, meshipc.BoundaryLimits(), lo=5, hi=9),
            meshipc.BoundaryVersionError,
            "far side meshipc 7.0.0 (protocol 5-9)",
        ),
        (b"", meshipc.BoundaryProtocolError, "no HELLO from the far side within 0.3 s"),
    ],
)
async def test_open_refuses_a_far_side_that_is_not_a_peer(
    runtime_dir: Path, hello: bytes, error: type[Exception], what: str
) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        with pytest.raises(error, match=re.escape(what)) as info:
            async with raw_far(mesh, hello=hello, timeout=0.3):
                pass
        assert meshipc.__version__ in str(info.value) or error is not meshipc.BoundaryVersionError


async def test_open_refuses_a_stream_that_ends_before_hello(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        ours, theirs = socket.socketpair()
        theirs.close()
        r, w = await asyncio.open_connection(sock=ours)
        with pytest.raises(meshipc.BoundaryProtocolError, match=r"ended before|the stream broke"):
            await mesh.open_gateway(r, w, Port.pair()[1], label="gone")


async def test_an_orderly_close_sends_what_was_sent_first(runtime_dir: Path) -> None:
    """The far side sends 5,000 values (more than a window) and closes the
    link at once: all arrive, in order, then the link's end (GOODBYE)."""
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        tx, rx = meshipc.channel(int)
        far.agent.send(["goodbye", tx, 5000])
        got: list[int] = []
        with pytest.raises(LinkFailure, match="GOODBYE"):
            async for v in rx:
                got.append(v)
        assert got == list(range(5000))


@pytest.mark.parametrize("orderly", [True, False])
async def test_an_orderly_end_is_logged_as_info_a_loss_as_a_warning(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture, orderly: bool
) -> None:
    """The far side's GOODBYE (a remote worker exiting, a TLS client leaving)
    is no failure: one INFO line, no WARNING; a stream that just ends is."""
    caplog.set_level(logging.INFO, logger="meshipc.gateway")
    async with Mesh(runtime_dir=runtime_dir) as mesh, raw_far(mesh) as (gw, _agent, _r, w):
        if orderly:
            w.write(encode_goodbye("done"))
        else:
            w.close()
        cause = await within(gw.wait_closed())
        assert isinstance(cause, LinkFailure)
    ours = [r for r in caplog.records if r.name == "meshipc.gateway"]
    levels = [r.levelno for r in ours]
    if orderly:
        assert levels == [logging.INFO], caplog.text
        assert "raw:far closed by the far side (GOODBYE: done)" in ours[0].getMessage()
        assert "failed" not in ours[0].getMessage()
    else:
        assert levels == [logging.WARNING], caplog.text
        assert "raw:far failed: the stream" in ours[0].getMessage()


async def test_a_waiter_in_a_third_process_learns_the_link_is_lost(runtime_dir: Path) -> None:
    """An end in another process of our mesh, whose peer crossed: it fails
    too, with the link named (as a ``PortFailed``: failures that travel
    between nodes carry their text)."""
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        p, q = Port.pair()
        rtx, rrx = meshipc.channel()
        worker = await mesh.spawn("gateway_peer:wait_for_failure", {"port": p, "report": rtx})
        far.agent.send(["hold", q])
        await far.report("holding")
        far.proc.kill()
        kind, text = await within(rrx.recv())
        assert kind in ("PortFailed", "NodeFailure", "LinkFailure")
        assert "boundary link test:far failed" in text and "may or may not" in text
        await within(worker.wait())


async def test_a_far_side_that_never_reads_what_it_asks_for_is_dropped(runtime_dir: Path) -> None:
    """Messages for a relay that ended make us close their ports back: a far
    side that sends many and reads nothing cannot grow our write buffer past
    ``write_buffer_bytes`` + ``CONTROL_SLACK``."""
    limits = meshipc.BoundaryLimits(max_relays=8192, write_buffer_bytes=64 * 1024)
    async with Mesh(runtime_dir=runtime_dir) as mesh, raw_far(mesh, limits) as (gw, agent, _, w):
        w.write(raw_msg(0, "open 3", ports=(3,)) + encode_close(3))
        assert await within(agent.recv()) == "open 3"
        n = 5
        with pytest.raises(LinkFailure, match="does not read"):
            for _ in range(200):
                ports = tuple(range(n, n + 2 * 4000, 2))
                n += 2 * 4000
                w.write(raw_msg(3, None, ports=ports))
                await w.drain()
                if gw.closed:
                    break
            await within(agent.recv())
        assert gw.stats().buffered_bytes <= 64 * 1024 + CONTROL_SLACK + 64 * 1024


async def test_what_arrived_before_the_stream_broke_is_still_delivered(runtime_dir: Path) -> None:
    """An asyncio ``StreamReader`` raises a failed write's error before the
    bytes it holds: those messages had arrived, and are delivered before the
    failure."""
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        ours, theirs = socket.socketpair()
        _, w = await asyncio.open_connection(sock=ours)
        reader = asyncio.StreamReader()
        reader.feed_data(encode_hello("0.0.1", 2**64 - 1, meshipc.BoundaryLimits()))
        agent, first = Port.pair()
        gw = await mesh.open_gateway(reader, w, first, label="held")
        reader.feed_data(b"".join(raw_msg(0, i) for i in range(10)))
        reader.set_exception(BrokenPipeError(32, "Broken pipe"))
        got = []
        with pytest.raises(LinkFailure, match="Broken pipe"):
            while True:
                got.append(await within(agent.recv()))
        assert got == list(range(10))
        await gw.aclose()
        theirs.close()


async def test_ports_beyond_the_far_sides_relay_limit_fail_and_the_message_says_so(runtime_dir: Path) -> None:
    """The far side holds at most 2 relays (its HELLO says so): a message
    carrying two more ports crosses as an error, its ports fail here, a call
    carrying too many fails at the caller; the link lives on."""
    hello = encode_hello("0.0.1", 2**64 - 1, meshipc.BoundaryLimits(max_relays=2))
    async with Mesh(runtime_dir=runtime_dir) as mesh, raw_far(mesh, hello=hello) as (gw, agent, r, _w):
        (a, b), (c, d) = Port.pair(), Port.pair()
        agent.send(["two", b, d])
        for end in (a, c):
            with pytest.raises(PortFailed, match="exceed the limit of 2"):
                await within(end.recv())
        seen = await read_frames(r, lambda ev: isinstance(ev, Msg) and ev.relay == 0)
        assert seen[-1].kind == 3 and b"exceed the limit" in seen[-1].body  # K_ERROR
        agent.send("fine")
        seen = await read_frames(r, lambda ev: isinstance(ev, Msg) and ev.relay == 0)
        assert msgspec.msgpack.decode(seen[-1].body) == "fine"
        tx, rx = meshipc.channel()
        agent.send(rx)  # the second relay: a call's reply port would be a third
        with pytest.raises(PortFailed, match="exceed the limit of 2"):
            await within(tx.call("too many"))
        assert not gw.closed


async def test_sends_from_another_thread_cross_in_order(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh, far_peer(mesh, runtime_dir) as far:
        p, q = Port.pair()
        far.agent.send(["echo", q])

        def produce() -> None:
            for i in range(500):
                p.send(i)

        await asyncio.to_thread(produce)
        assert [await within(p.recv()) for _ in range(500)] == list(range(500))
