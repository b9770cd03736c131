"""The port engine, several engines wired in memory (no sockets)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memnet import Net, drain, end_of
from meshipc import BufferFull, ChannelClosed, MessageError, NodeFailure, Port, PortFailed, ProtocolError
from meshipc._ports import CHECKPOINT_MESSAGES, NO_QUEUE, PORT_BYTES
from meshipc._ports import PROXY as PROXY_MODE
from meshipc._wire import FailEvent


def test_local_pair_delivers_and_leaves_nothing():
    a, b = Port.pair()
    eng = a._states[0].engine
    ids = {a._states[0].id, b._states[0].id}
    assert ids <= eng.ports.keys()
    a.send(1)
    a.send("two")
    assert drain(b) == [1, "two"]
    a.close()
    assert end_of(b) is ChannelClosed
    b.close()
    # the process's default engine: other tests in this process may hold ports in it
    assert not ids & eng.ports.keys()


def test_two_engines_deliver_then_close():
    net = Net(2)
    a, b = net.pair(0, 1)
    for i in range(100):
        a.send({"i": i})
    a.close()
    net.run()
    assert drain(b) == [{"i": i} for i in range(100)]
    assert end_of(b) is ChannelClosed
    b.close()
    net.run()
    assert net.live_ports() == 0


def test_plain_messages_take_the_link_and_idle_ends_hold_no_queue():
    """A plain message to a node the engine has a link for goes straight to
    that link's ``write_data`` (issue 24: no outbox call per send), else to
    the outbox; an end nothing was queued on shares the empty ``NO_QUEUE``
    (an idle end holds no deque) until its first message."""
    net = Net(2)
    a, b = net.pair(0, 1)
    sa, sb = a._states[0], b._states[0]
    assert sa.queue is NO_QUEUE and sb.queue is NO_QUEUE
    for i in range(3):
        a.send(i)
    assert net.link_writes == 3
    net.engines[0].links = {}  # not linked (connecting, say): the outbox takes it
    a.send(3)
    assert net.link_writes == 3
    net.run()
    assert sb.queue is not NO_QUEUE
    assert drain(b) == [0, 1, 2, 3]
    assert sa.queue is NO_QUEUE and len(NO_QUEUE) == 0
    a.close()
    b.close()
    net.run()
    assert net.live_ports() == 0


def test_close_from_receiving_side_drops_later_sends():
    net = Net(2)
    a, b = net.pair(0, 1)
    b.close()
    net.run()
    a.send("lost")  # silently dropped, like a write to a closed peer
    net.run()
    assert end_of(a) is ChannelClosed
    a.close()
    net.run()
    assert net.live_ports() == 0


@pytest.mark.parametrize("hops", [[1], [1, 2], [1, 2, 0], [1, 0]])
def test_send_port_keeps_order(hops: list[int]):
    """A port moves along ``hops`` while its peer on engine 0 keeps sending."""
    net = Net(3)
    peer, moving = Port.pair()  # local pair on the default engine
    carriers = []
    where = 0
    n = 0
    for h in hops:
        src, dst = net.pair(where, h)
        carriers.append((src, dst))
        for _ in range(5):
            peer.send(n)
            n += 1
        src.send(moving)
        for _ in range(5):
            peer.send(n)
            n += 1
        net.run()
        (moving,) = drain(dst)
        where = h
    for _ in range(5):
        peer.send(n)
        n += 1
    net.run()
    assert drain(moving) == list(range(n))
    # and back the other way
    moving.send("back")
    net.run()
    assert drain(peer) == ["back"]
    moving.close()
    peer.close()
    for s, d in carriers:
        s.close()
        d.close()
    net.run()
    assert net.live_ports() == 0


def test_port_bounced_back_to_origin():
    net = Net(2)
    x0, x1 = net.pair(0, 1)
    p, q = net.engines[0].new_pair()
    p, q = Port._wrap([p]), Port._wrap([q])
    q.send("before")
    x0.send(p)
    q.send("during")
    net.run()
    (p,) = drain(x1)
    x1.send(p)  # straight back to engine 0, where its peer lives
    q.send("after")
    net.run()
    (p,) = drain(x0)
    assert drain(p) == ["before", "during", "after"]
    p.send("reply")
    net.run()
    assert drain(q) == ["reply"]
    for h in (p, q, x0, x1):
        h.close()
    net.run()
    assert net.live_ports() == 0


def test_sent_port_whose_peer_closed_arrives_closed():
    net = Net(2)
    x0, x1 = net.pair(0, 1)
    p, q = Port.pair()
    q.send("last words")
    q.close()
    x0.send(p)
    net.run()
    (p,) = drain(x1)
    assert drain(p) == ["last words"]
    assert end_of(p) is ChannelClosed
    p.close()
    x0.close()
    x1.close()
    net.run()
    assert net.live_ports() == 0


def test_closed_port_sent_is_refused_and_dead_port_arrives_closed():
    net = Net(2)
    x0, x1 = net.pair(0, 1)
    p, q = Port.pair()
    p.close()
    with pytest.raises(ChannelClosed):
        x0.send(p)
    # a port whose peer closed while it was in transit
    p, q = Port.pair()
    x0.send(p)
    q.close()
    net.run()
    (p,) = drain(x1)
    assert end_of(p) is ChannelClosed


def test_dropping_port_with_queued_ports_closes_them():
    net = Net(2)
    x0, x1 = net.pair(0, 1)
    inner_keep, inner_sent = Port.pair()
    x0.send([inner_sent])
    net.run()
    x1.close()  # never read: the port inside the queued message is closed
    net.run()
    assert end_of(inner_keep) is ChannelClosed
    # same thing within one process
    a, b = Port.pair()
    k, s = Port.pair()
    a.send({"p": s})
    del s
    b.close()
    assert end_of(k) is ChannelClosed


def test_send_port_to_dropped_peer_closes_it():
    net = Net(2)
    x0, x1 = net.pair(0, 1)
    x1.close()
    net.run()
    keep, sent = Port.pair()
    x0.send(sent)
    net.run()
    assert end_of(keep) is ChannelClosed


def test_node_failure_fails_peered_ports():
    net = Net(3)
    a, b = net.pair(0, 1)
    c, d = net.pair(0, 2)
    b.send("queued")
    net.run()
    net.kill(1)
    assert drain(a) == ["queued"]
    with pytest.raises(NodeFailure):
        a.try_recv()
    # the other engine is untouched
    c.send("alive")
    net.run()
    assert drain(d) == ["alive"]


def test_port_sent_to_node_that_then_fails():
    net = Net(3)
    x0, _x1 = net.pair(0, 1)
    keep, sent = Port.pair()
    x0.send(sent)
    net.kill(1)  # the carrying message died in transit
    err = end_of(keep)
    assert err is not None and issubclass(err, PortFailed)


def test_port_arrived_then_node_fails():
    net = Net(3)
    x0, _x1 = net.pair(0, 1)
    keep, sent = Port.pair()
    x0.send(sent)
    net.run()
    net.kill(1)
    err = end_of(keep)
    assert err is not None and issubclass(err, PortFailed)


def test_failure_through_a_proxy():
    """Peer on engine 0; port moved 0 -> 1 -> 2 and the messages settle;
    then engine 2 dies: engine 0 learns through direct link failure."""
    net = Net(3)
    x01, x10 = net.pair(0, 1)
    x12, _x21 = net.pair(1, 2)
    keep, sent = Port.pair()
    x01.send(sent)
    net.run()
    (p,) = drain(x10)
    x12.send(p)
    # kill engine 1 while the port is still proxied through it
    net.kill(1)
    assert end_of(keep) in (NodeFailure, PortFailed)


def test_explicit_fail_propagates():
    net = Net(2)
    a, b = net.pair(0, 1)
    a._states[0].engine.fail(a._states[0], "gave up")
    net.run()
    with pytest.raises(PortFailed, match="gave up"):
        b.try_recv()


def test_port_in_message_to_failed_node_arrives_failed():
    net = Net(3)
    a, _b = net.pair(0, 1)
    x0, x2 = net.pair(0, 2)
    net.kill(1)
    x0.send(a)  # a's peer is dead
    net.run()
    (a2,) = drain(x2)
    assert end_of(a2) is PortFailed


def check_ordering(seed: int, moves: list[tuple[int, bool]], close_at: int | None = None) -> None:
    """Both ends of a channel wander between three engines, messages flow
    both ways all along, and events are delivered in random link order.
    Every message arrives exactly once, in order, and nothing leaks. With
    ``close_at``, end 0 closes at that step while end 1 goes on moving: end 1
    still reads everything, then ``ChannelClosed``."""
    rng = random.Random(seed)
    net = Net(3)
    # one carrier channel per (side, link) so each pick-up is unambiguous
    carriers = {(s, i, j): net.pair(i, j) for s in (0, 1) for i in range(3) for j in range(3) if i != j}

    def carrier(side: int, i: int, j: int) -> tuple[Port, Port]:
        return carriers[(side, i, j)]

    e0, e1 = net.engines[0].new_pair()
    ends = [Port._wrap([e0]), Port._wrap([e1])]
    where = [0, 0]
    sent = [0, 0]
    got: list[list[Any]] = [[], []]
    in_flight: list[tuple[int, int] | None] = [None, None]

    def step_random(k: int) -> None:
        for _ in range(k):
            keys = net.pending()
            if not keys:
                return
            net.deliver(rng.choice(keys))

    def settle_end(side: int) -> None:
        # deliver until the moving end has arrived, then pick it up
        src, dst = in_flight[side]  # type: ignore[misc]
        _, rx = carrier(side, src, dst)
        while True:
            got_ports = drain(rx)
            if got_ports:
                (ends[side],) = got_ports
                where[side] = dst
                in_flight[side] = None
                return
            keys = net.pending()
            if not keys:
                raise AssertionError("moving port never arrived")
            net.deliver(rng.choice(keys))

    closed = False
    for step, (dest, which) in enumerate(moves):
        side = int(which)
        if step == close_at:
            if in_flight[0] is not None:
                settle_end(0)
            got[0].extend(drain(ends[0]))
            ends[0].close()
            closed = True
        if closed:
            side = 1
        for s in (0, 1):
            if closed and s == 0:
                continue
            if in_flight[s] is None:
                for _ in range(rng.randint(0, 3)):
                    ends[s].send((s, sent[s]))
                    sent[s] += 1
                got[s].extend(drain(ends[s]))
        if in_flight[side] is None and dest != where[side]:
            tx, _ = carrier(side, where[side], dest)
            tx.send(ends[side])
            in_flight[side] = (where[side], dest)
        step_random(rng.randint(0, 6))
        for s in (0, 1):
            if in_flight[s] is not None and rng.random() < 0.5:
                settle_end(s)
    for s in (0, 1):
        if in_flight[s] is not None:
            settle_end(s)
    if closed:
        net.run(rng)
        got[1].extend(drain(ends[1]))
        assert [tuple(x) for x in got[1]] == [(0, i) for i in range(sent[0])]
        assert end_of(ends[1]) is ChannelClosed
        ends[1].close()
        for a, b in carriers.values():
            a.close()
            b.close()
        net.run(rng)
        assert net.live_ports() == 0
        return
    for s in (0, 1):
        ends[s].send((s, sent[s]))
        sent[s] += 1
    net.run(rng)
    for s in (0, 1):
        got[s].extend(drain(ends[s]))
    # values that crossed an engine come back as lists (msgpack arrays)
    assert [tuple(x) for x in got[1]] == [(0, i) for i in range(sent[0])]
    assert [tuple(x) for x in got[0]] == [(1, i) for i in range(sent[1])]
    ends[0].close()
    net.run(rng)
    assert end_of(ends[1]) is ChannelClosed
    ends[1].close()
    for a, b in carriers.values():
        a.close()
        b.close()
    net.run(rng)
    assert net.live_ports() == 0


def check_failures(seed: int, moves: list[tuple[int, bool]], kill_at: int, victim: int) -> None:
    """As above, over four engines, and one engine (not 0) dies at a random
    point. Afterwards every surviving end has received an in-order prefix of
    what its peer sent, then either keeps working or reports the failure; and
    once everything is closed, no surviving engine holds a port."""
    rng = random.Random(seed)
    net = Net(4)
    carriers = {(s, i, j): net.pair(i, j) for s in (0, 1) for i in range(4) for j in range(4) if i != j}
    e0, e1 = net.engines[0].new_pair()
    ends: list[Port | None] = [Port._wrap([e0]), Port._wrap([e1])]
    where = [0, 0]
    sent = [0, 0]
    got: list[list[Any]] = [[], []]
    ended: list[type[BaseException] | None] = [None, None]
    in_flight: list[tuple[int, int] | None] = [None, None]

    def pick_up(s: int) -> None:
        src, dst = in_flight[s]  # type: ignore[misc]
        if dst in net.dead:
            ends[s], in_flight[s] = None, None
            return
        arrived = drain(carriers[(s, src, dst)][1])
        if arrived:
            (ends[s],) = arrived
            where[s], in_flight[s] = dst, None

    def read(s: int) -> None:
        p = ends[s]
        if p is None or ended[s]:
            return
        got[s].extend(drain(p))
        ended[s] = end_of(p)

    for step, (dest, which) in enumerate(moves):
        if step == kill_at:
            net.kill(victim)
        side = int(which)
        for s in (0, 1):
            if in_flight[s] is not None:
                pick_up(s)
            p = ends[s]
            if p is not None and in_flight[s] is None and where[s] not in net.dead:
                for _ in range(rng.randint(0, 3)):
                    try:
                        p.send((s, sent[s]))
                    except PortFailed:
                        # items of this stream were lost: the sender is told
                        assert p._states[0].sent_lost
                        break
                    sent[s] += 1
                read(s)
        p = ends[side]
        if p is not None and in_flight[side] is None and dest != where[side] and where[side] not in net.dead:
            if dest not in net.dead:
                carriers[(side, where[side], dest)][0].send(p)
                in_flight[side] = (where[side], dest)
        for _ in range(rng.randint(0, 8)):
            keys = net.pending()
            if keys:
                net.deliver(rng.choice(keys))
    if kill_at >= len(moves):
        net.kill(victim)
    net.run(rng)
    for s in (0, 1):
        if in_flight[s] is not None:
            pick_up(s)
            if in_flight[s] is not None:
                ends[s] = None  # the carrying message died with the victim
        if ends[s] is not None and where[s] in net.dead:
            ends[s] = None
        read(s)
    net.run(rng)
    for s in (0, 1):
        read(s)
        other = 1 - s
        values = [tuple(x) for x in got[s]]
        # an in-order prefix, nothing duplicated or reordered
        assert values == [(other, i) for i in range(len(values))]
        if ends[s] is not None and ends[other] is not None and not ended[s]:
            # both ends alive: everything arrived
            assert len(values) == sent[other]
        if ends[s] is not None and ends[other] is None:
            # the peer died: this end must learn it (no silent hang)
            assert ended[s] is not None and issubclass(ended[s], (PortFailed, ChannelClosed))
    for p in ends:
        if p is not None:
            p.close()
    for a, b in carriers.values():
        a.close()
        b.close()
    net.run(rng)
    assert net.live_ports() == 0


_moves3 = st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=1, max_size=12)
_moves4 = st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=10)
_fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_soak = settings(max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(seed=st.integers(0, 2**32 - 1), moves=_moves3)
def test_ordering_under_arbitrary_interleavings(seed: int, moves: list[tuple[int, bool]]) -> None:
    check_ordering(seed, moves)


@_fast
@given(seed=st.integers(0, 2**32 - 1), moves=_moves4, kill_at=st.integers(0, 10), victim=st.integers(1, 3))
def test_failures_never_hang_reorder_or_leak(
    seed: int, moves: list[tuple[int, bool]], kill_at: int, victim: int
) -> None:
    check_failures(seed, moves, kill_at, victim)


@pytest.mark.soak
@_soak
@given(seed=st.integers(0, 2**32 - 1), moves=_moves3, close_at=st.integers(0, 11))
def test_close_while_the_other_end_moves(seed: int, moves: list[tuple[int, bool]], close_at: int) -> None:
    check_ordering(seed, moves, close_at)


@given(seed=st.integers(0, 2**32 - 1), moves=_moves3)
def test_soak_ordering(seed: int, moves: list[tuple[int, bool]]) -> None:
    check_ordering(seed, moves)


@pytest.mark.soak
@_soak
@given(seed=st.integers(0, 2**32 - 1), moves=_moves4, kill_at=st.integers(0, 10), victim=st.integers(1, 3))
def test_soak_failures(seed: int, moves: list[tuple[int, bool]], kill_at: int, victim: int) -> None:
    check_failures(seed, moves, kill_at, victim)


def test_explicit_fail_between_local_ports_terminates():
    a, b = Port.pair()
    st = a._states[0]
    st.engine.receive(st.engine.node_id, FailEvent(st.id, "boom"))  # as if a Fail event arrived for a
    with pytest.raises(PortFailed):
        a.try_recv()
    with pytest.raises(PortFailed):
        b.try_recv()
    assert st.id not in st.engine.ports and b._states[0].id not in st.engine.ports


async def drive_calls(seed: int, engines: int, kill: bool) -> tuple[Net, dict[int, Any], list[Any]]:
    """20 calls from engine 0 to a server whose receiver wanders between
    engines, events delivered in random order; with ``kill``, one engine
    other than the caller's dies at a random moment. Returns each call's
    outcome (its answer, or the type of the error it raised) once all ended,
    and the handles still to close."""
    import meshipc

    rng = random.Random(seed)
    net = Net(engines)
    carriers = {(i, j): net.pair(i, j) for i in range(engines) for j in range(engines) if i != j}
    tx, rx = meshipc.channel()
    where = 0
    carriers[(0, 1)][0].send(rx)  # the server starts on engine 1, the caller stays on 0
    in_flight: tuple[int, int] | None = (0, 1)
    server: Any = None
    outcome: dict[int, Any] = {}
    kill_at = rng.randint(0, 60) if kill else -1
    victim = rng.randint(1, engines - 1)
    moves = 0

    async def caller(i: int) -> None:
        try:
            outcome[i] = await tx.call(i)
        except (PortFailed, ChannelClosed) as exc:
            outcome[i] = type(exc)

    tasks = [asyncio.create_task(caller(i)) for i in range(20)]
    for step in range(100_000):
        if all(t.done() for t in tasks):
            break
        await asyncio.sleep(0)  # let callers run
        if step == kill_at:
            net.kill(victim)
            if (server is not None and where == victim) or (in_flight is not None and victim in in_flight):
                server, in_flight = None, None  # the server died, or its carrying message did
        if in_flight is not None:
            got = drain(carriers[in_flight][1])
            if got:
                (server,) = got
                where, in_flight = in_flight[1], None
        r = rng.random()
        if server is not None and r < 0.3:
            for call in drain(server):
                call.reply(["answer", call.request])
            if server.closed:
                server = None  # its stream ended (the caller's side failed)
        elif server is not None and r < 0.35 and moves < 8:
            moves += 1
            dest = rng.choice([e for e in range(engines) if e != where and e not in net.dead])
            carriers[(where, dest)][0].send(server)
            server, in_flight = None, (where, dest)
        else:
            keys = net.pending()
            if keys:
                net.deliver(rng.choice(keys))
    else:
        raise AssertionError(f"calls did not finish: {sorted(outcome)}")
    for t in tasks:
        t.result()
    leftovers: list[Any] = [tx, server, *(p for pair in carriers.values() for p in pair)]
    if in_flight is not None:
        leftovers.extend(drain(carriers[in_flight][1]))
    return net, outcome, leftovers


@pytest.mark.parametrize("seed", range(30))
async def test_calls_answered_while_the_server_moves(seed: int):
    """RPC reply ports travel without proxies when they can (they are pinned
    to the call), while calls reach the wandering server through proxies.
    Every call gets its own answer, and nothing is left behind."""
    net, outcome, leftovers = await drive_calls(seed, 3, kill=False)
    assert outcome == {i: ["answer", i] for i in range(20)}
    for h in leftovers:
        if h is not None:
            h.close()
    net.run(random.Random(seed))
    assert net.live_ports() == 0


@pytest.mark.parametrize("seed", range(100))
async def test_pending_calls_never_hang_when_a_node_dies(seed: int):
    """Over four engines, one other than the caller's dies at a random moment
    (perhaps the server's, perhaps one its calls pass through). Every call
    still ends: with its own answer, or with ``PortFailed``/``ChannelClosed``."""
    import meshipc

    _, outcome, _ = await drive_calls(seed, 4, kill=True)
    assert sorted(outcome) == list(range(20))
    for i, got in outcome.items():
        assert got == ["answer", i] or got in (PortFailed, meshipc.NodeFailure, ChannelClosed), got


def _bodies(values: list[Any]) -> list[bytes]:
    from meshipc._codec import CODEC

    return [CODEC.encode_plain(v) or b"" for v in values]


def test_a_run_is_queued_in_one_step_and_wakes_the_holder_once():
    net = Net(2)
    _a, b = net.pair(0, 1)
    eb, src = net.engines[1], net.engines[0].node_id
    st = b._states[0]
    wakes = []
    inner = st.waker
    assert inner is not None

    def waker() -> None:
        wakes.append(len(st.queue))
        inner()

    st.waker = waker
    eb.receive_run(src, st.id, 1, _bodies([1, 2, 3]))
    assert wakes == [3]  # woken once, with the whole run queued
    eb.receive_run(src, st.id, 4, _bodies([4, 5]))
    assert wakes == [3]  # the queue was not empty: no second wakeup
    assert drain(b) == [1, 2, 3, 4, 5]


def test_a_run_out_of_order_waits_for_the_gap_then_comes_in_order():
    net = Net(2)
    _a, b = net.pair(0, 1)
    eb, src = net.engines[1], net.engines[0].node_id
    st = b._states[0]
    eb.receive_run(src, st.id, 3, _bodies([3, 4, 5]))  # 1 and 2 took a slower path
    assert drain(b) == []
    eb.receive_run(src, st.id, 1, _bodies([1, 2]))
    assert drain(b) == [1, 2, 3, 4, 5]


def test_a_run_for_a_moving_port_is_buffered_and_forwarded():
    net = Net(3)
    _a, b = net.pair(0, 1)
    c_tx, c_rx = net.pair(1, 2)
    st = b._states[0]
    c_tx.send(b)  # b moves from engine 1 to engine 2
    net.engines[1].receive_run(net.engines[0].node_id, st.id, 1, _bodies(["x", "y", "z"]))
    net.run()
    (moved,) = drain(c_rx)
    assert drain(moved) == ["x", "y", "z"]


def test_a_run_for_an_unknown_port_is_dropped():
    net = Net(2)
    eb = net.engines[1]
    eb.receive_run(net.engines[0].node_id, bytes(16), 1, _bodies([1, 2]))
    assert not eb.ports


def test_port_modes_are_named() -> None:
    # that the module is sans-IO is checked by test_layout.py
    import meshipc._ports as ports

    assert ports.PortMode.OWNED == 0 and ports.OWNED is ports.PortMode.OWNED


def test_a_message_larger_than_the_window_is_counted_off_once_consumed():
    """Regression: the byte count was only known at checkpoints taken before
    a send, so a last message larger than the byte window stayed "in flight"
    after it was read and ``drain`` never returned."""
    net = Net(2)
    a, b = net.pair(0, 1)
    ea = net.engines[0]
    st = a._states[0]
    big = b"x" * (ea.limits.window_bytes + 1024)
    a.send(big)
    assert ea.over_window(st)
    net.run()
    assert drain(b) == [big]
    net.run()  # the CONSUMED report goes back
    assert not ea.over_window(st)
    assert ea.in_flight(st) == (0, 0)


# ------------------------------------------- issues 17 and 18: nothing lost, credit not forged


def _read_all(rx: Any) -> list[Any]:
    """Everything ``rx`` gives until it is empty or ends; errors (the end, or
    a loss reported in the middle) are in the list as exception types."""
    out: list[Any] = []
    while True:
        try:
            v = rx.try_recv()
            out.append(tuple(v) if isinstance(v, list) else v)
        except asyncio.QueueEmpty:
            return out
        except ChannelClosed:
            out.append(ChannelClosed)
            return out
        except PortFailed as exc:
            out.append(type(exc))
            if not rx._states:
                return out


def test_merged_receiver_reports_what_a_dead_proxy_lost_and_its_sender_learns():
    """Issue 17 item 1, deterministic: a receiver merging senders A and B
    moves 0 -> 1 -> 2; B's proxy on engine 1 dies holding 20 of B's
    messages, after A's proxy was done. The receiver reads B's 5 earlier
    messages, then NodeFailure for B (not a quiet drop), and A's stream to
    its clean end; B's next send raises. (Before: A's 20 then a clean
    ChannelClosed, 20 lost, B's sends "succeeding".)"""
    import meshipc

    net = Net(3)
    c01, c12 = net.pair(0, 1), net.pair(1, 2)
    txa, rx = meshipc.channel()
    txb = txa.clone()
    with pytest.raises(asyncio.QueueEmpty):
        rx.try_recv()  # merges B
    sa, sb = txa._states[0], txb._states[0]
    c01[0].send(rx)
    net.run()
    (rx1,) = drain(c01[1])
    c12[0].send(rx1)
    net.deliver((1, 2), 10)  # rx arrives on 2: both its ends fed by proxies on 1
    net.deliver((2, 1), 10)  # ARRIVED: the proxies forward from now on
    (rx2,) = drain(c12[1])
    assert [s.proxy_from for s in rx2._states] == [net.engines[1].node_id] * 2
    net.deliver((2, 0), 1)  # A's CHANGE_PEER only: A acks its proxy, which is done
    assert sa.peer_node == net.engines[2].node_id and sb.peer_node == net.engines[1].node_id
    net.deliver((0, 1), 10)
    net.deliver((1, 2), 10)
    assert rx2._states[0].proxy_from is None
    for i in range(5):
        txb.send(("b", i))
    net.deliver((0, 1), 10)
    net.deliver((1, 2), 10)  # B's first 5 arrive through the proxy
    for i in range(20):
        txb.send(("b", 5 + i))
    net.deliver((0, 1), 100)  # B's next 20 now sit on the link 1 -> 2
    for i in range(20):
        txa.send(("a", i))  # straight to 2
    net.kill(1)
    net.run()
    got = _read_all(rx2)
    assert [v for v in got if isinstance(v, tuple) and v[0] == "b"] == [("b", i) for i in range(5)]
    fail = got.index(NodeFailure)
    assert fail > max(i for i, v in enumerate(got) if isinstance(v, tuple) and v[0] == "b")
    assert "messages in transit were lost" in str(rx2._error)
    with pytest.raises(PortFailed):
        txb.send("more")
    txa.close()
    net.run()
    got += _read_all(rx2)
    assert [v for v in got if isinstance(v, tuple) and v[0] == "a"] == [("a", i) for i in range(20)]
    assert got[-1] is ChannelClosed
    txb.close()
    rx2.close()
    net.run()


def test_merged_receiver_is_round_robin():
    """Issue 17 item 3: three merged senders, one with a big backlog: reads
    alternate between them instead of emptying the first queue first."""
    import meshipc

    tx1, rx = meshipc.channel()
    tx2, tx3 = tx1.clone(), tx1.clone()
    with pytest.raises(asyncio.QueueEmpty):
        rx.try_recv()  # merges both clones
    for i in range(1000):
        tx1.send((1, i))
    for i in range(10):
        tx2.send((2, i))
        tx3.send((3, i))
    first = [rx.try_recv()[0] for _ in range(30)]
    assert first.count(2) == first.count(3) == 10, first
    for t in (tx1, tx2, tx3, rx):
        t.close()


def _small_limits() -> Any:
    from meshipc import Limits

    return Limits(window_messages=64, window_bytes=4096, max_messages=1024, max_bytes=16384)


def test_a_message_over_the_byte_limit_goes_once_everything_before_was_consumed():
    """Issue 17 item 4: after a small message that was read (consumption is
    reported in batches, so the sender has not heard of it), a message larger
    than the byte limit is refused (BufferFull) once; ``drain`` then waits
    for an exact report (asked for) and the retry goes. (Before: BufferFull
    for ever, while drain() returned at once.)"""
    net = Net(2, _small_limits())
    a, b = net.pair(0, 1)
    ea, st = net.engines[0], a._states[0]
    a.send("small")
    net.run()
    assert drain(b) == ["small"]
    net.run()
    big = b"x" * 20000
    with pytest.raises(BufferFull):
        a.send(big)
    assert ea.over_window(st)  # drain() waits...
    net.run()  # ...for the report it asked for
    assert not ea.over_window(st)
    a.send(big)
    net.run()
    assert drain(b) == [big]
    a.send("after")
    net.run()
    assert drain(b) == ["after"]
    a.close()
    b.close()
    net.run()


def test_a_message_over_the_limit_waits_for_a_receiver_still_reading():
    """The same while the earlier messages are still unread: the exact
    report comes once the receiver's queue runs empty, not before."""
    net = Net(2, _small_limits())
    a, b = net.pair(0, 1)
    ea, st = net.engines[0], a._states[0]
    for i in range(3):
        a.send(i)
    with pytest.raises(BufferFull):
        a.send(b"x" * 20000)
    net.run()
    assert ea.over_window(st)
    assert b.try_recv() == 0
    net.run()
    assert ea.over_window(st)  # two still unread
    assert drain(b) == [1, 2]
    net.run()
    assert not ea.over_window(st)
    a.close()
    b.close()
    net.run()


def test_a_send_the_outbox_refuses_leaves_the_port_usable():
    """Issue 17 item 5: the outbox raising OSError (EMFILE making an
    out-of-band body) gives MessageError with the cause; no sequence number
    was taken, so later sends arrive and nothing waits for a gap."""
    import errno

    net = Net(2)
    a, b = net.pair(0, 1)
    ea, st = net.engines[0], a._states[0]
    a.send("before")
    real = ea.out.send_data

    def refuse(*args: Any) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    ea.out.send_data = refuse  # type: ignore[method-assign]
    seq = st.send_seq
    with pytest.raises(MessageError, match="Too many open files"):
        a.send("refused")
    assert st.send_seq == seq
    ea.out.send_data = real  # type: ignore[method-assign]
    a.send("after")
    net.run()
    assert drain(b) == ["before", "after"]
    a.close()
    b.close()
    net.run()
    assert net.live_ports() == 0


def test_a_message_with_ports_the_outbox_refuses_fails_those_ports_with_the_cause():
    net = Net(2)
    a, b = net.pair(0, 1)
    ea = net.engines[0]
    p, q = Port.pair()
    real = ea.out.send_event

    def refuse(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    ea.out.send_event = refuse  # type: ignore[method-assign]
    with pytest.raises(MessageError, match="No space"):
        a.send([p])
    ea.out.send_event = real  # type: ignore[method-assign]
    with pytest.raises(PortFailed, match="No space"):
        q.try_recv()
    a.send("after")
    net.run()
    assert drain(b) == ["after"]


def test_a_forged_consumption_report_is_a_protocol_error():
    """Issue 18 item 2: CONSUMED for items never sent fails the link (the
    node drops it on ProtocolError); a true one is taken."""
    from meshipc._wire import ConsumedEvent

    net = Net(2)
    a, _b = net.pair(0, 1)
    ea, st = net.engines[0], a._states[0]
    for i in range(3):
        a.send(i)
    src = net.engines[1].node_id
    ea.receive(src, ConsumedEvent(st.id, 2))
    assert ea.in_flight(st)[0] == 1
    with pytest.raises(ProtocolError, match="sent only 3"):
        ea.receive(src, ConsumedEvent(st.id, 4))


def test_drain_and_send_are_bounded_by_the_links_unwritten_bytes():
    """Issue 18 item 2: whatever credit the peer reports, ``drain`` waits
    while the link holds more than ``link_buffer_bytes`` unwritten (woken
    when it shrinks) and ``send`` raises BufferFull past ``link_max_bytes``."""
    from meshipc import Limits

    limits = Limits(link_buffer_bytes=10_000, link_max_bytes=50_000)
    net = Net(2, limits)
    a, _b = net.pair(0, 1)
    ea, st = net.engines[0], a._states[0]
    a.send(b"x" * 100)
    assert not ea.over_window(st)
    net.set_backlog(0, 1, 20_000)  # the peer stopped reading
    assert ea.over_window(st)
    woken: list[bool] = []
    ea.watch_credit(st, lambda: woken.append(True))
    net.set_backlog(0, 1, 60_000)
    assert not woken
    with pytest.raises(BufferFull, match="not written yet"):
        for _ in range(CHECKPOINT_MESSAGES + 1):
            a.send(b"y")
    net.set_backlog(0, 1, 5_000)
    assert woken and not ea.over_window(st)
    a.send(b"z")


def test_ports_in_a_message_count_towards_the_window():
    """Issue 18 item 3: a message carrying ports counts PORT_BYTES each plus
    their unread backlog; a compact call counts one port."""
    net = Net(2)
    a, _b = net.pair(0, 1)
    ea, st = net.engines[0], a._states[0]
    p, q = Port.pair()
    p.send(b"b" * 1000)
    before = ea.in_flight(st)[1]
    a.send([q])
    assert ea.in_flight(st)[1] - before >= PORT_BYTES + 1000
    assert ea.call_plain(st, b"\x01") is not None
    assert ea.in_flight(st)[1] - before >= 2 * PORT_BYTES + 1000


def test_a_port_that_had_failed_carries_its_cause_when_sent():
    """Issue 17 item 8: a failed port sent on says why it failed, not "the
    port was failed before it was sent"."""
    net = Net(3)
    x, _y = net.pair(0, 2)
    c01 = net.pair(0, 1)
    net.kill(2, "it crashed")
    c01[0].send(x)
    net.run()
    (moved,) = drain(c01[1])
    with pytest.raises(PortFailed) as err:
        moved.try_recv()
    assert "it crashed" in str(err.value)


def test_a_proxy_that_cannot_forward_fails_both_sides_saying_items_were_lost():
    """Issue 17 item 5 at a forwarding node: its outbox refusing an item
    (EMFILE making an out-of-band body) fails the port at both ends as a
    loss, instead of an OSError escaping from the read path."""
    import errno

    net = Net(3)
    c12 = net.pair(1, 2)
    a, b = net.pair(0, 1)
    c12[0].send(b)  # b: engine 1 -> 2; engine 1 proxies for it
    net.deliver((1, 2), 10)
    net.deliver((2, 1), 10)  # ARRIVED: engine 1 forwards from now on
    (moved,) = drain(c12[1])
    e1 = net.engines[1]
    assert any(s.mode is PROXY_MODE for s in e1.ports.values())
    real = e1.out.send_data

    def refuse(*args: Any) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    a.send("refused on the way")  # a still sends to engine 1
    e1.out.send_data = refuse  # type: ignore[method-assign]
    net.deliver((0, 1), 10)
    e1.out.send_data = real  # type: ignore[method-assign]
    net.run()
    with pytest.raises(PortFailed, match="lost"):
        moved.try_recv()
    with pytest.raises(PortFailed):
        a.send("after")


def check_merged_losses(seed: int, hops: list[int], kill_at: int, victim: int) -> None:
    """A receiver merging three senders (on engine 0) wanders between
    engines while they send; one other engine dies at a random moment,
    events arrive in random order (the victim is the engine the receiver
    last left, when there is one). If the receiver survives, each sender's
    values reach it as an in-order prefix, and the stream never ends cleanly
    (no PortFailed on the way) with any value missing; a sender whose values
    did not all arrive is told at its next send."""
    import meshipc

    rng = random.Random(seed)
    net = Net(4)
    carriers = {(i, j): net.pair(i, j) for i in range(4) for j in range(4) if i != j}
    tx, rx0 = meshipc.channel()
    txs = [tx, tx.clone(), tx.clone()]
    with pytest.raises(asyncio.QueueEmpty):
        rx0.try_recv()
    holder: Any = rx0
    where, in_flight = 0, None
    sent = [0, 0, 0]
    refused = [False, False, False]
    got: list[Any] = []

    def pick_up() -> None:
        nonlocal holder, where, in_flight
        src, dst = in_flight  # type: ignore[misc]
        if dst in net.dead:
            holder, in_flight = None, None
            return
        arrived = drain(carriers[(src, dst)][1])
        if arrived:
            (holder,) = arrived
            where, in_flight = dst, None

    left: list[int] = []  # engines the receiver left, most recent last
    for step, dest in enumerate(hops):
        if step == kill_at:
            # most telling: an engine the receiver just passed through
            near = [e for e in left if e not in (0, where) and (in_flight is None or e != in_flight[1])]
            net.kill(near[-1] if near else victim)
        for k in range(3):
            for _ in range(rng.randint(0, 3)):
                if refused[k]:
                    break
                try:
                    txs[k].send((k, sent[k]))
                    sent[k] += 1
                except PortFailed:
                    refused[k] = True  # told: what it sent may be lost
        if in_flight is not None:
            pick_up()
        if holder is not None and in_flight is None and where in net.dead:
            holder = None
        if holder is not None and in_flight is None:
            got.extend(_read_all(holder))
            if holder._states and dest != where and dest not in net.dead and rng.random() < 0.7:
                carriers[(where, dest)][0].send(holder)
                holder, in_flight = None, (where, dest)
                left.append(where)
        for _ in range(rng.randint(0, 4)):
            keys = net.pending()
            if keys:
                net.deliver(rng.choice(keys), rng.choice((1, 2, 5, 40)))
    net.run(rng)
    if in_flight is not None:
        pick_up()
    if holder is not None and where not in net.dead:
        got.extend(_read_all(holder))
        for k in range(3):
            values = [v for v in got if isinstance(v, tuple) and v[0] == k]
            assert values == [(k, i) for i in range(len(values))], f"sender {k}: {values}"
            if len(values) < sent[k] and not refused[k]:
                # what it sent did not all arrive: its next send says so
                with pytest.raises(PortFailed):
                    txs[k].send("after")
    for t in txs:
        t.close()
    net.run(rng)
    if holder is None or where in net.dead:
        return  # the receiver itself was lost with the dead engine
    got.extend(_read_all(holder))
    if PortFailed not in got and NodeFailure not in got:
        assert got[-1] is ChannelClosed, got[-3:]
        for k in range(3):
            n = sum(1 for v in got if isinstance(v, tuple) and v[0] == k)
            assert n == sent[k], f"a clean end, but sender {k}: {n} of {sent[k]} arrived"
    holder.close()


@_fast
@given(
    seed=st.integers(0, 2**32 - 1),
    hops=st.lists(st.integers(0, 3), min_size=2, max_size=6),
    kill_at=st.integers(1, 6),
    victim=st.integers(1, 3),
)
def test_a_merged_receiver_never_ends_cleanly_with_a_hole(
    seed: int, hops: list[int], kill_at: int, victim: int
) -> None:
    check_merged_losses(seed, hops, kill_at, victim)


@pytest.mark.soak
@_soak
@given(
    seed=st.integers(0, 2**32 - 1),
    hops=st.lists(st.integers(0, 3), min_size=2, max_size=10),
    kill_at=st.integers(1, 10),
    victim=st.integers(1, 3),
)
def test_soak_merged_receiver_losses(seed: int, hops: list[int], kill_at: int, victim: int) -> None:
    check_merged_losses(seed, hops, kill_at, victim)


# ------------------------------------------------------------------ layout


def _state_fields() -> set[str]:
    from meshipc import _ports

    names: set[str] = set()
    for cls in (_ports.PortState, _ports.Transit, _ports.Proxy, _ports.SendWindow, _ports.RecvWindow):
        names.update(n for n in cls.__slots__ if not n.startswith("__"))
    return names


def _assigned_fields(tree: Any, fields: set[str]) -> list[tuple[int, str]]:
    """(line, "x.field") for every assignment to ``x.<field>`` (plain,
    augmented, annotated, inside tuples), ``x`` anything but ``self``."""
    import ast

    found: list[tuple[int, str]] = []

    def check(target: ast.expr) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                check(t)
        elif isinstance(target, ast.Starred):
            check(target.value)
        elif isinstance(target, ast.Attribute) and target.attr in fields:
            if not (isinstance(target.value, ast.Name) and target.value.id == "self"):
                found.append((target.lineno, f"{ast.unparse(target.value)}.{target.attr}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                check(t)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            check(node.target)
    return found


def test_only_the_engine_writes_port_state():
    """Issue 19: no module but ``_ports`` assigns a field of a port state (or
    of its per-mode and per-direction records): the handles, the node and
    the control plane call engine methods and read ``Engine.stats()``."""
    import ast
    from pathlib import Path

    import meshipc

    src = Path(meshipc.__file__).parent
    fields = _state_fields()
    assert {"waker", "pinned", "posted", "mode", "move", "tx", "rx"} <= fields
    checked = 0
    bad: list[str] = []
    for path in sorted(src.glob("*.py")):
        if path.name in ("_ports.py", "_codec.py"):  # the engine; the codec's tables have an `engine`
            continue
        checked += 1
        tree = ast.parse(path.read_text(), str(path))
        bad += [f"{path.name}:{line}: {what}" for line, what in _assigned_fields(tree, fields)]
    assert checked >= 20  # every module but the engine's
    assert bad == []
    # the check itself sees the ways a field is written
    sample = "\n".join(
        [
            "st.waker = f",
            "st.rx.unreported_n += 1",
            "a, b.pinned = 1, 2",
            "x: int",
            "st.tx: Any = None",
            "self.closed = 1",
        ]
    )
    assert [w for _, w in _assigned_fields(ast.parse(sample), fields)] == [
        "st.waker",
        "st.rx.unreported_n",
        "b.pinned",
        "st.tx",
    ]


def test_port_records_follow_the_mode():
    """Each mode's fields live in its own record: none while owned,
    ``Transit`` while sending (its first hop), ``Proxy`` once arrived (its
    target); send-side flow control appears with the first send to another
    node, receive-side with the first message read from one."""
    from meshipc._ports import OWNED, SENDING, Proxy, Transit

    net = Net(3)
    a, b = net.pair(0, 1)
    sa, sb = a._states[0], b._states[0]
    assert sa.move is None and sa.mode is OWNED and sa.tx is None and sb.rx is None
    a.send(1)
    assert sa.tx is not None
    net.run()
    assert b.try_recv() == 1
    assert sb.rx is not None and sb.rx.unreported_n == 1
    x, y = Port.pair()
    sy = y._states[0]
    a.send(y)  # y travels to node 1
    assert sy.mode is SENDING and type(sy.move) is Transit and sy.move.first_hop == net.engines[1].node_id
    net.deliver((0, 1))  # the carrying message: node 1 materializes y, answers ARRIVED
    net.deliver((1, 0))  # ARRIVED: the old end proxies to the new one
    assert sy.mode is PROXY_MODE and type(sy.move) is Proxy and sy.move.target_node == net.engines[1].node_id
    net.run()
    assert sy.move is not None and sy.id not in net.engines[0].ports  # the proxy went
    y2 = b.try_recv()
    x.send("hi")
    net.run()
    assert y2.try_recv() == "hi"
    for h in (a, b, x, y2):
        h.close()
    net.run()
    assert net.live_ports() == 0


def test_engine_stats_count_ports_by_state_queue_and_flight():
    """``Engine.stats()``: what the inspect tree and a node's shutdown read
    instead of port fields: ends per state and per peer node, what is queued,
    what is in flight, and where ports in transit and proxies lead."""
    from meshipc._codec import CODEC

    net = Net(2)
    e0, e1 = net.engines
    a, b = net.pair(0, 1)
    a.send(b"xyz")
    a.send(b"xyz")
    s = e0.stats()
    assert (s.total, s.by_state, s.by_peer) == (1, {"owned": 1}, {e1.node_id: 1})
    assert (s.in_flight_messages, s.in_flight_bytes) == (2, 2 * len(CODEC.encode_plain(b"xyz") or b""))
    net.run()
    s1 = e1.stats()
    assert (s1.queued_messages, s1.queued_bytes) == (2, s.in_flight_bytes)
    x, y = Port.pair()
    a.send(y)  # y in transit to node 1: its old end waits for ARRIVED
    s = e0.stats()
    assert s.by_state == {"owned": 2, "sending": 1} and s.transit_hops == {e1.node_id}
    assert s.by_peer == {e1.node_id: 1, e0.node_id: 2}
    net.deliver((0, 1))
    net.deliver((1, 0))  # ARRIVED: a proxy now
    s = e0.stats()
    assert s.by_state == {"owned": 2, "proxy": 1} and s.proxy_targets == {e1.node_id} and not s.transit_hops
    net.run()
    assert e0.stats().by_state == {"owned": 2}
    for h in (a, b, x):
        h.close()
    net.run()
