"""Channels, raw ports and RPC: within one process (the default engine) and
across engines wired in memory (``memnet``).

Values that cross engines are msgpack-decoded: tuples come back as lists and
untyped structs as dicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import pickle
import random
import sys
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

import meshipc
from memnet import Net, drain, end_of
from meshipc import (
    Call,
    ChannelClosed,
    Fd,
    MeshError,
    MessageError,
    NodeFailure,
    Port,
    PortFailed,
    Receiver,
    RemoteError,
    Sender,
)
from meshipc._channel import _NO_READY, default_engine
from meshipc._codec import CODEC
from meshipc._ports import DEFAULT_LIMITS, NO_QUEUE, Limits
from relutil import within


class Point(msgspec.Struct):
    x: int
    y: int


class Bundle(msgspec.Struct):
    port: Port
    tx: Sender[Any]
    rx: Receiver[Any]
    more: list[Port]
    by_name: dict[str, Sender[Any]]


# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_leak_in_default_engine() -> Iterator[None]:
    """Ports a test creates in the process's default engine are gone at its end."""
    gc.collect()
    before = set(default_engine().ports)
    yield
    gc.collect()
    leaked = [st for pid, st in default_engine().ports.items() if pid not in before]
    assert not leaked, f"ports left in the default engine: {leaked}"


def move(net: Net, handle: Any, src: int = 0, dst: int = 1) -> Any:
    """Send ``handle`` from engine ``src`` to engine ``dst``; return what arrives."""
    a, b = net.pair(src, dst)
    a.send(handle)
    net.run()
    (got,) = drain(b)
    a.close()
    b.close()
    net.run()
    return got


def close_all(net: Net, *handles: Any) -> None:
    for h in handles:
        h.close()
    net.run()
    assert net.live_ports() == 0


def autopump(net: Net) -> None:
    """Deliver the network's events from the running loop as soon as they
    are sent, so ``await`` works across engines."""
    loop = asyncio.get_running_loop()
    scheduled = False

    def flush() -> None:
        nonlocal scheduled
        scheduled = False
        net.run()

    def schedule() -> None:
        nonlocal scheduled
        if not scheduled and not loop.is_closed():
            scheduled = True
            loop.call_soon(flush)

    class Outbox:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def send_event(self, node: bytes, ev: Any, fds: list[Any]) -> None:
            self.inner.send_event(node, ev, fds)
            schedule()

        def send_data(self, node: bytes, port: bytes, seq: int, kind: int, body: bytes) -> None:
            self.inner.send_data(node, port, seq, kind, body)
            schedule()

        def watch(self, node: bytes) -> None:
            pass

        def backlog(self, node: bytes) -> int:
            return int(self.inner.backlog(node))

        def watch_backlog(self, node: bytes, below: int, fn: Any) -> None:
            self.inner.watch_backlog(node, below, fn)

    for e in net.engines:
        e.out = Outbox(e.out)


# ---------------------------------------------------------------- one process


async def test_send_recv_local_passes_objects_untouched():
    tx, rx = meshipc.channel()
    obj = {"a": [1, 2], "t": (3, 4)}
    tx.send(obj)
    tx.send(("tuple", 1))
    tx.send(None)
    got = await within(rx.recv())
    assert got is obj
    assert await rx.recv() == ("tuple", 1)
    assert await rx.recv() is None
    tx.close()
    with pytest.raises(ChannelClosed):
        await rx.recv()
    with pytest.raises(ChannelClosed):
        await rx.recv()  # stays at the end
    rx.close()


async def test_async_for_ends_when_sender_closed():
    tx, rx = meshipc.channel()
    for i in range(10):
        tx.send(i)
    tx.close()
    assert [x async for x in rx] == list(range(10))
    rx.close()


async def test_recv_waits_for_send_and_close():
    tx, rx = meshipc.channel()
    got: list[Any] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for x in rx:
            got.append(x)
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)  # let it block in recv
    tx.send("a")
    await within(first.wait())
    tx.send("b")
    tx.close()
    await within(task)
    assert got == ["a", "b"]
    rx.close()


async def test_waiting_recv_raises_when_sender_closes():
    tx, rx = meshipc.channel()
    task = asyncio.create_task(rx.recv())
    await asyncio.sleep(0)
    assert not task.done()
    tx.close()
    with pytest.raises(ChannelClosed):
        await within(task)
    rx.close()


async def test_concurrent_recv_on_one_receiver():
    tx, rx = meshipc.channel()
    t1 = asyncio.create_task(rx.recv())
    t2 = asyncio.create_task(rx.recv())
    await asyncio.sleep(0)  # both block in recv
    tx.send(1)
    tx.send(2)
    try:
        done, _ = await asyncio.wait({t1, t2}, timeout=10.0)
        assert len(done) == 2
        assert sorted([t1.result(), t2.result()]) == [1, 2]
    finally:
        for t in (t1, t2):
            t.cancel()
        tx.close()
        rx.close()


async def test_cancelling_one_waiter_leaves_the_others_waiting():
    tx, rx = meshipc.channel()
    first = asyncio.create_task(rx.recv())
    await asyncio.sleep(0)  # first blocks in recv
    second = asyncio.create_task(rx.recv())
    await asyncio.sleep(0)  # second blocks too
    first.cancel()  # e.g. a wait_for(rx.recv(), timeout) that timed out
    await asyncio.wait({first})
    tx.send("for the second")
    try:
        done, _ = await asyncio.wait({second}, timeout=10.0)
        assert not second.cancelled(), "a recv() nobody cancelled raised CancelledError"
        assert done and second.result() == "for the second"
    finally:
        second.cancel()
        tx.close()
        rx.close()


async def test_close_wakes_waiting_recv():
    tx, rx = meshipc.channel()
    task = asyncio.create_task(rx.recv())
    await asyncio.sleep(0)
    rx.close()  # e.g. another task shutting a server down
    try:
        done, _ = await asyncio.wait({task}, timeout=10.0)
        assert done, "recv still blocked after its receiver was closed"
        assert isinstance(task.exception(), ChannelClosed)
    finally:
        task.cancel()
        tx.close()


def test_try_recv():
    tx, rx = meshipc.channel()
    with pytest.raises(asyncio.QueueEmpty):
        rx.try_recv()
    tx.send(1)
    assert rx.try_recv() == 1
    with pytest.raises(asyncio.QueueEmpty):
        rx.try_recv()
    tx.send(2)
    tx.close()
    assert rx.try_recv() == 2
    with pytest.raises(ChannelClosed):
        rx.try_recv()
    rx.close()
    with pytest.raises(ChannelClosed):
        rx.try_recv()


async def test_closed_ends():
    tx, rx = meshipc.channel()
    tx.close()
    tx.close()  # idempotent
    assert tx.closed
    with pytest.raises(ChannelClosed):
        tx.send(1)
    with pytest.raises(ChannelClosed):
        tx.clone()
    with pytest.raises(ChannelClosed):
        await tx.call(1)
    rx.close()
    rx.close()
    assert rx.closed
    with pytest.raises(ChannelClosed):
        await rx.recv()
    a, b = Port.pair()
    a.close()
    with pytest.raises(ChannelClosed):
        a.send(1)
    with pytest.raises(ChannelClosed):
        await b.recv()
    b.close()


def test_send_to_closed_receiver_is_dropped():
    tx, rx = meshipc.channel()
    rx.close()
    tx.send("nobody listens")  # no error, like a write to a closed peer
    inner_keep, inner_sent = Port.pair()
    tx.send([inner_sent])  # a port in a dropped message is closed
    del inner_sent
    gc.collect()
    assert end_of(inner_keep) is ChannelClosed
    inner_keep.close()
    tx.close()


async def test_context_managers():
    with meshipc.channel()[0] as tx:
        pass
    assert tx.closed
    tx, rx = meshipc.channel()
    with tx, rx as r:
        assert r is rx
        tx.send(1)
        assert await rx.recv() == 1
    assert tx.closed and rx.closed
    a, b = Port.pair()
    with a, b:
        a.send("x")
        assert await b.recv() == "x"
    assert a.closed and b.closed


async def test_port_pair_is_bidirectional():
    a, b = Port.pair()
    a.send(1)
    b.send(2)
    assert await within(b.recv()) == 1
    assert await within(a.recv()) == 2
    a.close()
    b.send("dropped")  # peer gone: dropped silently
    with pytest.raises(ChannelClosed):
        await b.recv()
    b.close()


def test_handles_refuse_pickle_and_direct_construction():
    tx, rx = meshipc.channel()
    a, b = Port.pair()
    for h in (tx, rx, a):
        with pytest.raises(TypeError):
            pickle.dumps(h)
    for cls in (Port, Sender, Receiver):
        with pytest.raises(TypeError):
            cls()
    for h in (tx, rx, a, b):
        h.close()


# ---------------------------------------------------------------- clones, one process


async def test_clones_many_senders_one_receiver():
    tx, rx = meshipc.channel()
    senders = [tx] + [tx.clone() for _ in range(4)]
    for i in range(20):
        for k, s in enumerate(senders):
            s.send((k, i))
    tx.close()  # the original goes first; the clones keep the channel open
    for s in senders[1:-1]:
        s.close()
    got = drain(rx)
    with pytest.raises(asyncio.QueueEmpty):
        rx.try_recv()  # one clone is still open
    senders[-1].send((4, 20))
    senders[-1].close()
    got += [x async for x in rx]
    for k in range(5):
        mine = [i for kk, i in got if kk == k]
        assert mine == list(range(21 if k == 4 else 20)), k
    rx.close()


async def test_clone_of_a_clone_and_waiting_receiver():
    tx, rx = meshipc.channel()
    t2 = tx.clone()
    t3 = t2.clone()
    tx.close()
    t2.close()
    task = asyncio.create_task(rx.recv())
    await asyncio.sleep(0)
    t3.send("from t3")
    assert await within(task) == "from t3"
    t3.close()
    with pytest.raises(ChannelClosed):
        await within(rx.recv())
    rx.close()


def test_dropped_clone_counts_as_closed():
    tx, rx = meshipc.channel()
    t2 = tx.clone()
    t2.send("x")
    tx.close()
    del t2
    gc.collect()
    assert drain(rx) == ["x"]
    assert end_of(rx) is ChannelClosed
    rx.close()


def test_clone_to_closed_receiver():
    tx, rx = meshipc.channel()
    rx.close()
    t2 = tx.clone()
    t2.send("dropped")
    tx.close()
    t2.close()


# ---------------------------------------------------------------- across engines


def test_send_recv_across_engines():
    net = Net(2)
    tx, rx = meshipc.channel()
    rx = move(net, rx)
    values: list[Any] = [1, "two", b"three", 4.5, None, True, {"k": [1, {"n": None}]}, (1, 2), [3, (4, 5)]]
    for v in values:
        tx.send(v)
    tx.close()
    net.run()
    got = drain(rx)
    assert got == [1, "two", b"three", 4.5, None, True, {"k": [1, {"n": None}]}, [1, 2], [3, [4, 5]]]
    assert end_of(rx) is ChannelClosed
    close_all(net, rx)


async def test_async_for_across_engines():
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    rx = move(net, rx)
    got: list[Any] = []

    async def consume() -> None:
        async for x in rx:
            got.append(x)

    task = asyncio.create_task(consume())
    for i in range(50):
        tx.send(i)
        if i % 10 == 0:
            await asyncio.sleep(0)
    tx.close()
    await within(task)
    assert got == list(range(50))
    close_all(net, rx)


def test_raw_port_pair_across_engines():
    net = Net(2)
    a, b = Port.pair()
    b = move(net, b)
    a.send("ping")
    net.run()
    assert drain(b) == ["ping"]
    b.send(("pong", 1))
    net.run()
    assert drain(a) == [["pong", 1]]
    b.close()
    net.run()
    assert end_of(a) is ChannelClosed
    close_all(net, a)


@pytest.mark.parametrize("path", [[1], [1, 2], [1, 2, 0], [1, 0]])
def test_receiver_moved_with_queue_while_sending(path: list[int]):
    """A receiver holding unread messages travels along ``path`` while its
    sender keeps sending: every message arrives once, in order."""
    net = Net(3)
    tx, rx = meshipc.channel()
    n = 0
    for _ in range(5):
        tx.send(n)
        n += 1
    got = [rx.try_recv()]  # read some, leave some queued
    where = 0
    carriers = []
    for dst in path:
        a, b = net.pair(where, dst)
        carriers += [a, b]
        for _ in range(3):
            tx.send(n)
            n += 1
        a.send(rx)
        for _ in range(3):
            tx.send(n)
            n += 1
        # deliver part of the traffic, send more, then the rest
        for _ in range(2):
            keys = net.pending()
            if keys:
                net.deliver(keys[0])
        tx.send(n)
        n += 1
        net.run()
        (rx,) = drain(b)
        got += [rx.try_recv(), rx.try_recv()]  # read a little on each stop
        where = dst
    for _ in range(3):
        tx.send(n)
        n += 1
    tx.close()
    net.run()
    got += drain(rx)
    assert got == list(range(n))
    assert end_of(rx) is ChannelClosed
    close_all(net, rx, *carriers)


def test_receiver_with_clones_moved():
    """Messages from two senders (one a clone whose existence the receiver
    has not read yet) are queued when the receiver moves."""
    net = Net(2)
    tx, rx = meshipc.channel()
    t2 = tx.clone()
    for i in range(5):
        tx.send(("a", i))
        t2.send(("b", i))
    rx = move(net, rx)
    for i in range(5, 10):
        tx.send(("a", i))
        t2.send(("b", i))
    tx.close()
    net.run()
    got = drain(rx)
    assert end_of(rx) is None  # t2 is still open
    t2.send(("b", 10))
    t2.close()
    net.run()
    got += drain(rx)
    assert [i for k, i in got if k == "a"] == list(range(10))
    assert [i for k, i in got if k == "b"] == list(range(11))
    assert end_of(rx) is ChannelClosed
    close_all(net, rx)


def test_clones_across_engines():
    """Receiver on engine 1; the original sender stays on engine 0, one clone
    is made there after the move and another travels to engine 2."""
    net = Net(3)
    tx, rx = meshipc.channel()
    rx = move(net, rx, 0, 1)
    t2 = tx.clone()
    t3 = move(net, tx.clone(), 0, 2)
    t4 = t3.clone()  # a clone of a clone, made on engine 2
    senders = {"tx": tx, "t2": t2, "t3": t3, "t4": t4}
    for i in range(10):
        for name, s in senders.items():
            s.send([name, i])
    net.run()
    got = drain(rx)
    for name in senders:
        assert [i for n, i in got if n == name] == list(range(10)), name
    for name in ("tx", "t2", "t3"):
        senders[name].close()
    net.run()
    assert end_of(rx) is None  # t4 is still open
    t4.send("last")
    t4.close()
    net.run()
    assert drain(rx) == ["last"]
    assert end_of(rx) is ChannelClosed
    close_all(net, rx)


def test_sender_moved_receiver_stays():
    net = Net(2)
    tx, rx = meshipc.channel()
    tx = move(net, tx)
    tx.send((1, 2))
    net.run()
    assert drain(rx) == [[1, 2]]
    tx.close()
    net.run()
    assert end_of(rx) is ChannelClosed
    close_all(net, rx)


def test_node_failure_reaches_receiver():
    net = Net(2)
    tx, rx = meshipc.channel()
    tx = move(net, tx)  # the sender lives on engine 1
    tx.send("before")
    net.run()
    net.kill(1, "crashed")
    assert drain(rx) == ["before"]
    with pytest.raises(NodeFailure, match="crashed"):
        rx.try_recv()
    rx.close()


# ---------------------------------------------------------------- typed channels


async def test_typed_channel_local_passes_objects_untouched():
    tx, rx = meshipc.channel(Point)
    p = Point(1, 2)
    tx.send(p)
    assert await within(rx.recv()) is p
    tx.close()
    rx.close()


def test_typed_channel_validates_messages_from_other_engines():
    net = Net(2)
    tx, rx = meshipc.channel(Point)
    tx = move(net, tx)  # the typed receiver stays; messages come from engine 1
    tx.send(Point(1, 2))
    tx.send(Point("one", 2))  # type: ignore[arg-type]  # wrong field type
    tx.send({"x": 3, "y": 4})  # same shape: becomes a Point
    tx.send([5])  # not a Point at all
    tx.send(Point(5, 6))
    net.run()
    first = rx.try_recv()
    assert type(first) is Point and first == Point(1, 2)
    # a bad message from another process is dropped, counted and logged: the
    # receiving loop goes on serving the good ones
    assert rx.try_recv() == Point(3, 4)
    assert rx.try_recv() == Point(5, 6)
    assert rx.bad_messages == 2
    with pytest.raises(asyncio.QueueEmpty):
        rx.try_recv()
    tx.close()
    net.run()
    assert end_of(rx) is ChannelClosed
    close_all(net, rx)


def test_typed_channel_with_clone_on_other_engine():
    net = Net(2)
    tx, rx = meshipc.channel(Point)
    tx = move(net, tx)
    t2 = tx.clone()  # made on engine 1
    tx.send(Point(1, 1))
    t2.send(Point(2, 2))
    t2.send({"x": "bad"})
    t2.send(Point(3, 3))
    tx.close()
    t2.close()
    net.run()
    got = []
    while True:
        try:
            got.append(rx.try_recv())
        except ChannelClosed:
            break
    assert rx.bad_messages == 1
    assert sorted(p.x for p in got) == [1, 2, 3] and all(type(p) is Point for p in got)
    close_all(net, rx)


async def test_typed_call_with_invalid_request():
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel(Point)
    tx = move(net, tx)  # the caller is on engine 1
    bad = asyncio.create_task(tx.call({"x": "bad", "y": 0}))
    caller = asyncio.create_task(tx.call(Point(1, 2)))
    call = await within(rx.recv())  # the bad call is dropped, the server goes on...
    assert type(call.request) is Point
    call.reply(call.request.x + call.request.y)
    assert await within(caller) == 3
    with pytest.raises(RemoteError) as info:
        await within(bad)  # ...and its caller is told why, not left hanging
    assert info.value.type_name == "_BadMessage" or "MessageError" in info.value.type_name
    assert "Expected `int`" in str(info.value)
    assert rx.bad_messages == 1
    close_all(net, tx, rx)


def test_invalid_message_closes_its_ports():
    net = Net(2)
    tx, rx = meshipc.channel(Point)
    tx = move(net, tx)
    keep, inner = Port.pair()
    inner = move(net, inner, 0, 1)  # so it is sent from engine 1
    tx.send({"x": inner, "y": 1})
    tx.send(Point(7, 8))
    net.run()
    assert rx.try_recv() == Point(7, 8)  # the bad one is dropped, with its port
    assert rx.bad_messages == 1
    net.run()
    assert end_of(keep) is ChannelClosed
    close_all(net, tx, rx, keep)


class Holder(msgspec.Struct):
    rx: Receiver[Point]


@pytest.mark.parametrize("slot", ["channel", "struct-field"])
def test_typed_receiver_moved_through_typed_slot(slot: str):
    """The element type is not on the wire: a Receiver that arrives in a slot
    annotated ``Receiver[Point]`` validates against Point."""
    net = Net(2)
    ctx, crx = meshipc.channel(Receiver[Point] if slot == "channel" else Holder)
    ctx = move(net, ctx)  # the carrier sends from engine 1 to engine 0
    tx, rx = meshipc.channel(Point)
    ctx.send(rx if slot == "channel" else Holder(rx))
    net.run()
    got = crx.try_recv()
    rx = got if slot == "channel" else got.rx
    assert type(rx) is Receiver
    tx.send(Point(1, 2))  # tx went to engine 1 with its peer
    tx.send(Point("bad", 2))  # type: ignore[arg-type]
    tx.send({"x": 3, "y": 4})
    net.run()
    assert type(rx.try_recv()) is Point
    assert rx.try_recv() == Point(3, 4)
    assert rx.bad_messages == 1
    close_all(net, ctx, crx, tx, rx)


def _check_handles_work(net: Net, pairs: list[tuple[Any, Any]]) -> None:
    """Each (kept, arrived) pair: the kept end on engine 1, the arrived one on 0."""
    for i, (kept, arrived) in enumerate(pairs):
        if isinstance(arrived, Receiver):
            kept.send(i)
            net.run()
            assert drain(arrived) == [i]
        elif isinstance(arrived, Sender):
            arrived.send([i])
            net.run()
            assert drain(kept) == [[i]]
        else:
            assert isinstance(arrived, Port)
            arrived.send(i)
            kept.send(-i)
            net.run()
            assert drain(kept) == [i]
            assert drain(arrived) == [-i]


def test_handles_nested_anywhere_untyped():
    net = Net(2)
    tx, rx = meshipc.channel()
    tx = move(net, tx)  # send from engine 1 to the receiver on engine 0
    p_keep, p_sent = Port.pair()
    s_sent, s_keep = meshipc.channel()  # send the sender, keep the receiver
    r_keep, r_sent = meshipc.channel()  # keep the sender, send the receiver
    q_keep, q_sent = Port.pair()
    tx.send({"deep": [{"port": p_sent}, ("tx", s_sent)], "rx": r_sent, "struct": Point(1, 2), "ps": [q_sent]})
    net.run()
    (msg,) = drain(rx)
    assert msg["struct"] == {"x": 1, "y": 2}
    port = msg["deep"][0]["port"]
    sender = msg["deep"][1][1]
    receiver = msg["rx"]
    (q,) = msg["ps"]
    assert (type(port), type(sender), type(receiver), type(q)) == (Port, Sender, Receiver, Port)
    assert p_sent.closed and s_sent.closed and r_sent.closed  # handed over
    _check_handles_work(net, [(p_keep, port), (s_keep, sender), (r_keep, receiver), (q_keep, q)])
    close_all(net, tx, rx, p_keep, s_keep, r_keep, q_keep, port, sender, receiver, q)


def test_handles_nested_in_typed_struct():
    net = Net(2)
    tx, rx = meshipc.channel(Bundle)
    tx = move(net, tx)
    p_keep, p_sent = Port.pair()
    s_sent, s_keep = meshipc.channel()
    r_keep, r_sent = meshipc.channel()
    m_keep, m_sent = Port.pair()
    n_sent, n_keep = meshipc.channel()
    tx.send(Bundle(p_sent, s_sent, r_sent, [m_sent], {"n": n_sent}))
    net.run()
    b = rx.try_recv()
    assert type(b) is Bundle
    assert type(b.port) is Port and type(b.tx) is Sender and type(b.rx) is Receiver
    _check_handles_work(
        net, [(p_keep, b.port), (s_keep, b.tx), (r_keep, b.rx), (m_keep, b.more[0]), (n_keep, b.by_name["n"])]
    )
    close_all(
        net, tx, rx, p_keep, s_keep, r_keep, m_keep, n_keep, b.port, b.tx, b.rx, b.more[0], b.by_name["n"]
    )


def test_struct_expecting_handle_rejects_plain_value():
    net = Net(2)
    tx, rx = meshipc.channel(Bundle)
    tx = move(net, tx)
    tx.send({"port": 1, "tx": 2, "rx": 3, "more": [], "by_name": {}})
    tx.send("next")
    net.run()
    with pytest.raises(asyncio.QueueEmpty):
        rx.try_recv()  # neither is a Bundle: both dropped
    assert rx.bad_messages == 2
    close_all(net, tx, rx)


# ---------------------------------------------------------------- sending what cannot be sent


def test_sending_closed_handles_across_engines():
    net = Net(2)
    a, b = net.pair(0, 1)
    for make in (Port.pair, meshipc.channel):
        x, y = make()
        x.close()
        with pytest.raises(ChannelClosed):
            a.send(x)
        with pytest.raises(ChannelClosed):
            a.send({"nested": [x]})
        y.close()
    # a handle already sent away is closed too
    p, q = Port.pair()
    t, r = meshipc.channel()
    a.send(p)
    a.send(t)
    with pytest.raises(ChannelClosed):
        a.send(p)
    with pytest.raises(ChannelClosed):
        a.send([t])
    a.send("still works")
    net.run()
    (p2, t2, msg) = drain(b)
    assert msg == "still works"
    close_all(net, a, b, p2, q, t2, r)


def test_sending_closed_receiver_across_engines():
    net = Net(2)
    a, b = net.pair(0, 1)
    tx, rx = meshipc.channel()
    rx.close()
    try:
        with pytest.raises(ChannelClosed):
            a.send(rx)
        tx2, rx2 = meshipc.channel()
        a.send(rx2)
        with pytest.raises(ChannelClosed):
            a.send(rx2)  # already sent away
        tx2.close()
    finally:
        net.run()
        close_all(net, a, b, tx, *drain(b))


@pytest.mark.parametrize(
    "bad", [lambda: 1, object(), 1j, {"nested": [print]}], ids=["lambda", "object", "complex", "nested"]
)
def test_unencodable_value_raises_at_send(bad: Any):
    net = Net(2)
    tx, rx = meshipc.channel()
    rx = move(net, rx)
    tx.send("before")
    with pytest.raises((TypeError, NotImplementedError, MeshError)):
        tx.send(bad)
    tx.send("after")
    net.run()
    assert drain(rx) == ["before", "after"]
    tx.close()
    net.run()
    assert end_of(rx) is ChannelClosed
    close_all(net, rx)


def test_unencodable_value_queued_locally_then_receiver_moves():
    """The value was fine within the process; when its receiver moves it can
    no longer be encoded: the send that moves the receiver raises."""
    net = Net(2)
    tx, rx = meshipc.channel()
    tx.send(1)
    tx.send(lambda: 2)
    tx.send(3)
    a, b = net.pair(0, 1)
    with pytest.raises(MessageError, match="cannot move"):
        a.send(rx)
    a.send("still usable")
    net.run()
    assert b.try_recv() == "still usable"
    close_all(net, tx, rx, a, b)


# ---------------------------------------------------------------- RPC


async def _serve(rx: Receiver[Any], handler: Any) -> None:
    async for call in rx:
        assert isinstance(call, Call)
        handler(call)


def _double(call: Call[Any]) -> None:
    call.reply(call.request * 2)


async def test_rpc_local():
    tx, rx = meshipc.channel()
    server = asyncio.create_task(_serve(rx, _double))
    assert await within(tx.call(21)) == 42
    results = await within(asyncio.gather(*(tx.call(i) for i in range(20))))
    assert results == [i * 2 for i in range(20)]
    tx.close()
    await within(server)
    rx.close()


async def test_rpc_across_engines():
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    rx = move(net, rx)
    server = asyncio.create_task(_serve(rx, _double))
    assert await within(tx.call(21)) == 42
    assert await within(tx.call((1, "a"))) == [1, "a", 1, "a"]
    results = await within(asyncio.gather(*(tx.call(i) for i in range(20))))
    assert results == [i * 2 for i in range(20)]
    # a clone calls the same server
    t2 = tx.clone()
    assert await within(t2.call("x")) == "xx"
    t2.close()
    tx.close()
    await within(server)
    close_all(net, rx)


async def test_rpc_compact_path_keeps_ends_lean():
    """The compact call between engines this thread drives (``call_plain``,
    ``_reply_to``; issue 24): the request and the reply take the engines'
    direct link path (``Engine.links``); the callee's reply end never holds
    a deque of its own, the caller's gets one for its reply (read after the
    wait: the end it waited on had none); an idle receiver holds no ready
    list."""
    net = Net(2)
    autopump(net)
    for e in net.engines:
        e.thread = threading.get_ident()
    a, b = net.pair(0, 1)
    tx, rx = Sender._wrap(a._detach()), Receiver._wrap(b._detach())
    assert rx._ready is _NO_READY and b._ready is _NO_READY
    lean: list[bool] = []

    async def serve() -> None:
        async for call in rx:
            lean.append(call._st is not None and call._st.queue is NO_QUEUE)
            call.reply(call.request * 2)

    server = asyncio.create_task(serve())
    before = net.link_writes
    for i in range(3):
        assert await within(tx.call(i)) == i * 2
    assert net.link_writes - before == 6  # three requests, three replies
    assert lean == [True, True, True]
    assert rx._ready is not _NO_READY  # its own, since the first call
    tx.close()
    await within(server)
    close_all(net, rx)


async def test_a_receiver_swaps_in_its_ready_list_once():
    """A wake from another thread may race the owner's first wake: the end
    gets its own ready list once, and a second swap keeps what was scheduled."""
    tx, rx = meshipc.channel()
    tx.send(1)  # the first wake: its own list, the sender's end scheduled
    ready = rx._ready
    assert ready is not _NO_READY and len(ready) == 1
    rx._own_ready()  # what a racing thread would do next
    assert rx._ready is ready and len(rx._sched) == 1
    assert await within(rx.recv()) == 1
    tx.close()
    rx.close()


async def test_rpc_caller_on_other_engine():
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    tx = move(net, tx)  # the caller is on engine 1, the server on engine 0
    server = asyncio.create_task(_serve(rx, _double))
    assert await within(tx.call([1])) == [1, 1]
    tx.close()
    await within(server)
    close_all(net, rx)


async def test_rpc_reply_carries_handles():
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    rx = move(net, rx)

    def handler(call: Call[Any]) -> None:
        s, r = meshipc.channel()
        s.send(call.request)
        s.close()
        call.reply({"stream": r})

    server = asyncio.create_task(_serve(rx, handler))
    out = await within(tx.call("hello"))
    assert [x async for x in out["stream"]] == ["hello"]
    out["stream"].close()
    tx.close()
    await within(server)
    close_all(net, rx)


@pytest.mark.parametrize("cross", [False, True], ids=["local", "cross"])
async def test_rpc_fail_gives_remote_error(cross: bool):
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    if cross:
        rx = move(net, rx)

    def raising_helper() -> None:
        raise KeyError("deep")

    def handler(call: Call[Any]) -> None:
        if call.request == "plain":
            call.fail(ValueError("x"))
            return
        try:
            raising_helper()
        except KeyError as exc:
            call.fail(exc)

    server = asyncio.create_task(_serve(rx, handler))
    with pytest.raises(RemoteError) as info:
        await within(tx.call("plain"))
    err = info.value
    assert err.type_name == "ValueError"
    assert err.message == "x"
    assert "ValueError" in err.traceback
    with pytest.raises(RemoteError) as info:
        await within(tx.call("raised"))
    assert info.value.type_name == "KeyError"
    assert "raising_helper" in info.value.traceback
    # the channel keeps working after failed calls
    (again,) = await within(asyncio.gather(tx.call("plain"), return_exceptions=True))
    assert isinstance(again, RemoteError)
    tx.close()
    await within(server)
    close_all(net, rx)


@pytest.mark.parametrize("cross", [False, True], ids=["local", "cross"])
async def test_rpc_dropped_call_gives_channel_closed(cross: bool):
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    if cross:
        rx = move(net, rx)

    async def server() -> None:
        call = await rx.recv()
        del call  # dropped unanswered
        call = await rx.recv()
        call.reply("answered")

    task = asyncio.create_task(server())
    with pytest.raises(ChannelClosed):
        await within(tx.call("ignored"))
    assert await within(tx.call("second")) == "answered"
    await within(task)
    close_all(net, tx, rx)


async def test_a_call_from_another_node_holds_its_reply_end_itself():
    # issue 24: a call from another process costs no Port handle (with its
    # inbox, waker closure and weak reference) on the callee: the Call holds
    # the reply end's state; answered, dropped or waited on, it ends as before
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    rx = move(net, rx)

    async def server() -> None:
        call = await rx.recv()
        assert call._port is None and call._reply_end() is not None
        assert call._reply_end().waker is None  # nobody to wake: no handle
        assert not call.cancelled
        call.reply(call.request * 2)
        assert call._reply_end() is None and not call.cancelled
        with pytest.raises(ChannelClosed, match="already answered"):
            call.reply(0)
        with pytest.raises(ChannelClosed, match="already answered"):
            call.fail(ValueError("late"))
        dropped = await rx.recv()
        assert dropped.request == 2
        del dropped  # unanswered: the caller gets ChannelClosed
        waited = await rx.recv()
        await waited.wait_cancelled()  # a handle made on demand to wait on
        assert waited.cancelled
        waited.reply("nobody listens")  # a no-op

    task = asyncio.create_task(server())
    assert await within(tx.call(21)) == 42
    with pytest.raises(ChannelClosed, match="dropped without a reply"):
        await within(tx.call(2))
    caller = asyncio.create_task(tx.call(3))
    await asyncio.sleep(0)
    net.run()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await within(task)
    close_all(net, tx, rx)  # and no reply end is left behind in either engine


@pytest.mark.parametrize("cross", [False, True], ids=["local", "cross"])
async def test_rpc_caller_cancelled_reaches_callee(cross: bool):
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    if cross:
        rx = move(net, rx)
    got_call = asyncio.Event()
    calls: list[Call[Any]] = []

    async def server() -> None:
        call = await rx.recv()
        calls.append(call)
        got_call.set()
        await call.wait_cancelled()

    srv = asyncio.create_task(server())
    caller = asyncio.create_task(tx.call("long job"))
    await within(got_call.wait())
    assert not calls[0].cancelled
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await within(srv)
    assert calls[0].cancelled
    calls[0].reply("too late")  # nobody waits: no error
    close_all(net, tx, rx)


@pytest.mark.parametrize("cross", [False, True], ids=["local", "cross"])
async def test_rpc_receiver_closed(cross: bool):
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    if cross:
        rx = move(net, rx)
    rx.close()
    net.run()
    with pytest.raises(ChannelClosed):
        await within(tx.call(1))
    close_all(net, tx)


@pytest.mark.parametrize("cross", [False, True], ids=["local", "cross"])
async def test_rpc_receiver_closes_with_call_unread(cross: bool):
    net = Net(2)  # delivered by hand here
    tx, rx = meshipc.channel()
    if cross:
        rx = move(net, rx)
    caller = asyncio.create_task(tx.call("never read"))
    await asyncio.sleep(0)  # one loop turn: the call is sent
    assert not caller.done()
    net.run()  # the call is queued at the receiver, unread
    rx.close()  # ...which drops it, and the reply port inside
    net.run()
    with pytest.raises(ChannelClosed):
        await within(caller)
    close_all(net, tx)


async def test_rpc_callee_node_dies():
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    rx = move(net, rx)  # the server lives on engine 1
    caller = asyncio.create_task(tx.call("work"))
    call = await within(rx.recv())
    net.kill(1, "server crashed")
    with pytest.raises(PortFailed, match="server crashed"):
        await within(caller)
    del call
    tx.close()
    rx.close()


async def test_rpc_reply_that_cannot_be_encoded():
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    rx = move(net, rx)
    caller = asyncio.create_task(tx.call("give me a lambda"))
    call = await within(rx.recv())
    with pytest.raises((TypeError, NotImplementedError, MeshError)):
        call.reply(lambda: 1)
    with pytest.raises(ChannelClosed):
        await within(caller)  # the reply port was closed: no hang
    close_all(net, tx, rx)


async def test_rpc_fail_with_remote_error_passes_it_through():
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    rx = move(net, rx)

    def handler(call: Call[Any]) -> None:
        call.fail(RemoteError("CustomError", "from further away", "remote tb text"))

    server = asyncio.create_task(_serve(rx, handler))
    with pytest.raises(RemoteError) as info:
        await within(tx.call(None))
    assert (info.value.type_name, info.value.message, info.value.traceback) == (
        "CustomError",
        "from further away",
        "remote tb text",
    )
    tx.close()
    await within(server)
    close_all(net, rx)


async def test_call_answered_twice():
    tx, rx = meshipc.channel()
    caller = asyncio.create_task(tx.call(1))
    call = await within(rx.recv())
    assert call.request == 1 and "1" in repr(call)
    call.reply(2)
    with pytest.raises(ChannelClosed):
        call.reply(3)
    with pytest.raises(ChannelClosed):
        call.fail(ValueError("late"))
    assert await within(caller) == 2
    tx.close()
    rx.close()


# ---------------------------------------------------------------- Fd


def test_fd_dup_fileno_detach_close():
    r, w = os.pipe()
    try:
        fd = Fd.dup(r)
        n = fd.fileno()
        assert n not in (r, w) and not fd.closed
        assert not os.get_inheritable(n)
        os.write(w, b"hi")
        assert os.read(n, 2) == b"hi"  # same pipe
        fd.close()
        assert fd.closed
        fd.close()  # idempotent
        with pytest.raises(ValueError):
            fd.fileno()
        with pytest.raises(ValueError):
            fd.detach()
        with pytest.raises(OSError):
            os.fstat(n)  # really closed

        with open(w, "wb", closefd=False) as f, Fd.dup(f) as fd2:
            assert fd2.fileno() != w
        assert fd2.closed

        fd3 = Fd.dup(r)
        raw = fd3.detach()
        assert fd3.closed and "closed" in repr(fd3)
        fd3.close()  # does not close what was detached
        os.fstat(raw)
        os.close(raw)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("bad", [-1, "3", 1.5, None])
def test_fd_rejects_non_descriptors(bad: Any):
    with pytest.raises(ValueError):
        Fd(bad)


def test_fd_failed_construction_is_quiet():
    seen: list[Any] = []
    old = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with pytest.raises(ValueError):
            Fd(-1)
        gc.collect()
    finally:
        sys.unraisablehook = old
    assert not seen, [u.exc_value for u in seen]


def test_fd_travels_across_engines():
    net = Net(2)
    tx, rx = meshipc.channel()
    rx = move(net, rx)
    r, w = os.pipe()
    fd = Fd(w)
    tx.send({"out": fd})
    assert fd.closed  # handed over
    net.run()
    (msg,) = drain(rx)
    got = msg["out"]
    assert isinstance(got, Fd)
    os.write(got.fileno(), b"through the mesh")
    assert os.read(r, 100) == b"through the mesh"
    got.close()
    os.close(r)
    close_all(net, tx, rx)


def _fd_net(limits: Limits = DEFAULT_LIMITS) -> tuple[Net, Sender[Any], Receiver[Any]]:
    """Two engines driven from this thread (a send there takes the fast
    paths), a channel from engine 0 to engine 1."""
    net = Net(2, limits)
    for e in net.engines:
        e.thread = threading.get_ident()
    a, b = net.pair(0, 1)
    return net, Sender._wrap(a._detach()), Receiver._wrap(b._detach())


def test_messages_of_fds_and_plain_values_skip_the_full_encoder(monkeypatch: Any, untraced: None) -> None:
    """The fd fast path (issue 24): a lone ``Fd``, or ``Fd``s among plain
    values, goes without the full encoder (a spy counts it), handed over
    at once, and arrives as the full encoder's would; an ``Fd`` beside a
    port still takes the full encoder."""
    net, tx, rx = _fd_net()
    full: list[Any] = []
    real = CODEC.encode
    monkeypatch.setattr(CODEC, "encode", lambda *a: full.append(a) or real(*a))
    r, w = os.pipe()
    fds = [Fd.dup(w) for _ in range(4)]
    tx.send(fds[0])
    tx.send({"out": fds[1], "n": 1})
    tx.send([fds[2], "x", (fds[3], None)])
    assert all(f.closed for f in fds) and full == []
    p, q = Port.pair()
    beside = Fd.dup(w)
    tx.send({"fd": beside, "port": p})
    assert beside.closed and len(full) == 1
    net.run()
    one, two, three, four = drain(rx)
    got = [one, two["out"], three[0], three[2][0], four["fd"]]
    assert two["n"] == 1 and three[1] == "x" and isinstance(four["port"], Port)
    for i, f in enumerate(got):
        os.write(f.fileno(), b"%d" % i)
        f.close()
    assert os.read(r, 100) == b"01234"
    os.close(r)
    os.close(w)
    close_all(net, tx, rx, q, four["port"])


def test_a_message_of_fds_refused_at_the_hard_limit_closes_its_fds(untraced: None) -> None:
    """``BufferFull`` on the fd fast path leaves nothing open, as a refused
    send of the full encoder's does; the stream goes on once read."""
    net, tx, rx = _fd_net(Limits(window_messages=2, max_messages=4))
    r, w = os.pipe()
    sent = []
    with pytest.raises(meshipc.BufferFull):
        for _ in range(300):  # (the limit is checked every CHECKPOINT_MESSAGES)
            f = Fd.dup(w)
            sent.append(f)
            tx.send({"fd": f})
    assert all(f.closed for f in sent)
    net.run()
    got = drain(rx)
    assert len(got) == len(sent) - 1
    for m in got:
        m["fd"].close()
    os.close(w)
    assert os.read(r, 10) == b""  # every copy of the write end is closed
    os.close(r)
    close_all(net, tx, rx)


# ---------------------------------------------------------------- close while a port moves


def _forward_at_once(seed: int, n: int = 5) -> tuple[list[Any], str]:
    """A port rides in a local message whose receiver is itself in transit;
    its peer sends ``n`` values and closes meanwhile (so the port answers the
    close while still here), then the next node forwards it at once."""
    rng = random.Random(seed)
    net = Net(3)
    c0, c1 = net.pair(0, 1)
    d1, d2 = net.pair(1, 2)
    tx, rx = meshipc.channel()
    c0.send(rx)  # in transit: what tx sends waits in its buffer
    a, b = Port.pair()
    tx.send(b)
    for i in range(n):
        a.send(i)
    a.close()
    rx1: Any = None
    forwarded = False
    for _ in range(10_000):
        if rx1 is None:
            with contextlib.suppress(asyncio.QueueEmpty):
                rx1 = c1.try_recv()
        elif not forwarded:
            with contextlib.suppress(asyncio.QueueEmpty):
                d1.send(rx1.try_recv())  # the next hop, before it read anything
                forwarded = True
        keys = net.pending()
        if not keys and forwarded:
            break
        if keys:
            net.deliver(rng.choice(keys))
    (last,) = drain(d2)
    got = drain(last)
    end = end_of(last)
    close_all(net, c0, c1, d1, d2, tx, rx1, last)
    return got, end.__name__ if end else "open"


@pytest.mark.parametrize("seed", range(60))
def test_backlog_survives_close_while_its_port_is_forwarded_at_once(seed: int):
    """Regression (real processes lost the whole backlog): the forwarded end
    used to announce itself to the closed peer, whose table no longer had it,
    and the "peer port is gone" notice failed the final holder."""
    assert _forward_at_once(seed) == ([0, 1, 2, 3, 4], "ChannelClosed")


# ---------------------------------------------------------------- flow control in one process


async def test_local_drain_waits_for_the_reader_and_the_hard_limit_refuses():
    from meshipc._ports import DEFAULT_LIMITS

    tx, rx = meshipc.channel()
    window, hard = DEFAULT_LIMITS.window_messages, DEFAULT_LIMITS.max_messages
    for i in range(window):
        tx.send(i)
    await within(tx.drain(), 5)  # at the window, not over it: returns
    tx.send(window)
    drain = asyncio.ensure_future(tx.drain())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not drain.done()  # over the window: waits for the reader
    assert await rx.recv() == 0  # one read brings it back to the window
    await within(drain, 5)
    for i in range(window + 1, hard + 1):
        tx.send(i)
    with pytest.raises(meshipc.BufferFull, match="unread"):
        tx.send("one too many")
    got = [rx.try_recv() for _ in range(hard)]
    assert got == list(range(1, hard + 1))  # nothing lost, nothing extra
    tx.send("room again")
    assert rx.try_recv() == "room again"
    tx.close()
    with pytest.raises(ChannelClosed):
        await tx.drain()
    rx.close()


async def test_drain_raises_when_the_receiver_goes():
    tx, rx = meshipc.channel()
    for i in range(3000):
        tx.send(i)
    drain = asyncio.ensure_future(tx.drain())
    rx.close()
    with pytest.raises(ChannelClosed):
        await within(drain, 5)


def test_backlog_beyond_any_reorder_window_moves_intact():
    """70,000 unread values on a port, which then moves while 70,000 more
    stream straight to its new place (arriving first): all arrive, in order,
    and no link breaks (the reorder buffer is bounded by flow control, not by
    a fixed window that failed the connection)."""
    net = Net(3)
    a, b = net.pair(0, 1)
    n = 70_000
    for i in range(n):
        a.send(i)
    net.run()
    c1, c2 = net.pair(1, 2)
    c1.send(b)  # b moves to engine 2 with its backlog
    # let the move reach engine 2 and the producer, but hold the backlog back
    for _ in range(10_000):
        keys = [k for k in net.pending() if k != (1, 2)] or net.pending()
        if not keys:
            break
        net.deliver(keys[0])
        if a._states[0].peer_node == net.engines[2].node_id:
            break
    assert a._states[0].peer_node == net.engines[2].node_id
    for i in range(n, 2 * n):
        a.send(i)  # straight to engine 2, ahead of the backlog still at engine 1
    for _ in range(3):
        while net.links.get((0, 2)):
            net.deliver((0, 2))  # the direct stream first
        net.run()
    (moved,) = drain(c2)
    got = drain(moved)
    assert got == list(range(2 * n))
    close_all(net, a, moved, c1, c2)


def test_send_value_ships_the_bytes_to_another_node_and_the_object_locally():
    """``Engine.send_value`` with the bytes its caller encoded (a send from
    another thread is encoded there): the bytes go to a remote peer; a local
    peer gets the object itself."""
    from meshipc._codec import CODEC
    from meshipc._wire import K_DATA

    net = Net(2)
    a, b = net.pair(0, 1)
    st = a._states[0]
    value = {"n": [1, 2]}
    st.engine.send_value(st, K_DATA, value, CODEC.encode_plain(value) or b"")
    net.run()
    assert drain(b) == [value]
    x, y = Port.pair()
    sx = x._states[0]
    obj = Point(1, 2)
    sx.engine.send_value(sx, K_DATA, obj, b"not used")
    assert y.try_recv() is obj
    close_all(net, a, b, x, y)


async def test_statistics_say_what_an_end_holds() -> None:
    """``statistics()``: messages queued, ends merged, closed, the peer's
    close, and (to another process: test_reliability) what is in flight."""
    tx, rx = meshipc.channel()
    for i in range(3):
        tx.send(i)
    got = rx.statistics()
    assert got == meshipc.ChannelStatistics(3, 1, 0, 0, False, False, None)
    assert await rx.recv() == 0
    assert rx.statistics().queued == 2
    tx.close()
    assert [await rx.recv(), await rx.recv()] == [1, 2]
    with pytest.raises(meshipc.ChannelClosed):
        await rx.recv()
    assert tx.statistics().closed and tx.statistics().ends == 0
    rx.close()
    assert rx.statistics() == meshipc.ChannelStatistics(0, 0, 0, 0, True, False, None)


def test_a_value_the_encoder_refuses_is_a_message_error_on_every_send_path():
    """Issue 19: every value is encoded in the channel, and what the encoder
    refuses (an int beyond 64 bits: msgspec's ``OverflowError``) becomes
    ``MessageError`` in one place, whether the send runs on the engine's
    thread, under its lock (no loop), or as a call; nothing is sent and the
    channel stays usable."""
    import threading

    net = Net(2)
    a, b = net.pair(0, 1)
    eng = a._states[0].engine
    for thread in (threading.get_ident(), None):  # on the loop's thread; no loop (under the lock)
        eng.thread = thread
        for bad in (2**70, {"n": [2**70]}):
            with pytest.raises(MessageError, match="cannot be sent to another process"):
                a.send(bad)
    eng.thread = threading.get_ident()
    p, rx = net.pair(0, 1)
    tx = meshipc.Sender._wrap(p._detach())  # a sender on an end bound to node 1
    with pytest.raises(MessageError, match="cannot be sent to another process"):
        asyncio.run(tx.call(2**70))
    a.send("still usable")
    net.run()
    assert drain(b) == ["still usable"]
    close_all(net, a, b, tx, rx)


async def test_recv_many_takes_batches_in_order_and_reports_them_consumed():
    # issue 24: a batch is decoded in one loop and counted off the sender's
    # window once; a sender that keeps to a small window (drain()) goes on
    # only if those counts reach it, so 300 messages through a window of 8
    # prove the batches are reported
    net = Net(2, limits=meshipc.Limits(window_messages=8, window_bytes=1 << 20))
    autopump(net)
    tx, rx = meshipc.channel(int)
    rx = move(net, rx)
    rx._set_type(int)  # (a handle that moves arrives untyped, unless received typed)

    async def produce() -> None:
        for i in range(300):
            if i == 150:
                tx.send("not an int")  # type: ignore[arg-type]  # dropped by the typed receiver
            tx.send(i)
            await tx.drain()
        tx.close()

    task = asyncio.create_task(produce())
    got: list[int] = []
    sizes = []
    with pytest.raises(ChannelClosed):
        while True:
            batch = await within(rx.recv_many(max=5))
            assert 1 <= len(batch) <= 5
            sizes.append(len(batch))
            got.extend(batch)
    assert got == list(range(300))  # every message, in order, then the end
    assert max(sizes) > 1  # batches, not one message a wait
    assert rx.bad_messages == 1
    await within(task)
    with pytest.raises(ValueError):
        await rx.recv_many(max=0)
    close_all(net, tx, rx)


async def test_recv_many_stops_before_what_is_not_a_plain_message():
    # a call, a message with a port, or a sender's end in the queue: the
    # batch ends before it, the next recv takes it; a merged receiver's
    # batches keep each sender's order, and local messages come as objects
    net = Net(2)
    autopump(net)
    tx, rx = meshipc.channel()
    rx = move(net, rx)  # tx on engine 0, rx on engine 1
    local = tx.clone()
    local2 = move(net, local, 0, 1)  # a sender on the receiver's own engine
    for i in range(3):
        tx.send(i)
    a, b = Port.pair()
    tx.send(a)  # carries a port: not plain
    tx.send(3)
    net.run()
    assert await within(rx.recv_many()) == [0, 1, 2]
    port, three = await within(rx.recv_many())  # it starts a batch: anything may
    assert isinstance(port, Port) and three == 3
    local2.send({"x": 1})
    local2.send({"x": 2})
    assert await within(rx.recv_many()) == [{"x": 1}, {"x": 2}]
    caller = asyncio.create_task(tx.call("ping"))
    await asyncio.sleep(0)
    tx.send(4)
    net.run()
    tx.send(5)
    c, d = Port.pair()
    tx.send(c)  # the batch stops before it (ports from another process)
    call, four, five = await within(rx.recv_many())
    assert isinstance(call, Call) and call.request == "ping" and (four, five) == (4, 5)
    (other,) = await within(rx.recv_many())
    assert isinstance(other, Port)
    other.close()
    d.close()
    call.reply("pong")
    assert await within(caller) == "pong"
    tx.close()
    local2.close()
    net.run()
    with pytest.raises(ChannelClosed):
        await within(rx.recv_many())
    for h in (port, b):
        h.close()
    close_all(net, rx)
