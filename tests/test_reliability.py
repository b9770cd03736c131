"""Regression tests for issue 7, items 1-9: the data path keeps its promise.

Real processes and real sockets, public API only (except where a test says
otherwise). Each test asserts the behaviour the issue expects; on the code of
the day the issue was filed most of them fail, and that is their purpose.
Workers live in ``rel_workers.py``; every test kills its workers on the way
out (``relutil.reaped``), and every wait is bounded and fails loudly.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from pathlib import Path
from typing import Any

import msgspec
import pytest

import meshipc
from meshipc import MeshError, MessageError, NodeFailure, Port, PortFailed
from meshipc._node import MAX_DEAD_NODES
from relutil import next_report, reaped, signal_proc, spawn_ring, vmrss_kb, wait_until, within


def _assert_end(r: list[Any], total: int) -> None:
    _, rnd, idx, seen, ok, how = r
    assert ok, f"round {rnd}: worker {idx} saw values out of order"
    assert (seen, how) == (total, "closed"), (
        f"round {rnd}: the last holder (worker {idx}) read {seen} of {total} values, then {how}"
    )


# ----------------------------------------------------------------- item 1


async def test_item1_backlog_survives_close_while_port_moves_twice(runtime_dir: Path) -> None:
    """X -> Y -> Z with X and Y forwarding at once, the producer (the parent)
    sending a burst and closing: Z reads every message, then ChannelClosed.

    Every ordered route through three workers, in two orders: the producer
    closes before the port leaves (the close handshake with the local end
    completes first, so the port leaves as "peer closed" with its backlog,
    and X forwards it before the proxied CLOSE reaches X: the case that
    fails deterministically today), and the producer closes after the port
    left (in bursts, while it moves)."""
    n = 600
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        rep_tx, rep_rx = meshipc.channel()
        inbox = await spawn_ring(mesh, procs, 3, rep_tx)
        # each close-first round loses the race that shows the bug ~30% of
        # the time today: 24 of them fail the test all but every 10,000th run
        routes = list(itertools.permutations(range(3))) * 4
        for rnd, ((x, y, z), close_first) in enumerate(itertools.product(routes, (True, False))):
            a, b = Port.pair()
            hop = {"port": b, "seen": 0, "round": rnd, "reads": [0, 0], "route": [y, z]}
            if not close_first:
                inbox[x].send(hop)
            for i in range(n):
                a.send(i)
                if not close_first and i % 100 == 99:
                    await asyncio.sleep(0)  # let the moves progress between bursts
            a.close()
            if close_first:
                inbox[x].send(hop)
            _assert_end(await next_report(rep_rx, "end"), n)


async def test_item1_random_ring_close_while_moving(runtime_dir: Path) -> None:
    """The issue's reproduction, smaller: a 3-process ring with random hops
    (reading 0-40 values at each), the producer streaming then closing."""
    n = 2000
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        rep_tx, rep_rx = meshipc.channel()
        inbox = await spawn_ring(mesh, procs, 3, rep_tx)
        for rnd in range(8):
            a, b = Port.pair()
            inbox[rnd % 3].send({"port": b, "seen": 0, "round": rnd, "take": [0, 40], "seed": rnd})
            for i in range(n):
                a.send(i)
                if i % 200 == 199:
                    await asyncio.sleep(0)
            a.close()
            _assert_end(await next_report(rep_rx, "end", 30), n)


# ----------------------------------------------------------------- item 2


async def _drain(port: Port) -> None:
    """``await port.drain()`` where flow control exists, else one loop turn."""
    drain = getattr(port, "drain", None)
    if drain is not None:
        await drain()
    else:
        await asyncio.sleep(0)


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2]


async def test_item2_backlog_over_65536_moves_intact(runtime_dir: Path) -> None:
    """Worker X holds a port with 70,000 unread values and moves it to Y; X
    stops itself right after the move, so its backlog is still in transit
    when the producer (the parent, now pointed at Y) streams 70,000 more
    straight to Y. After SIGCONT, Y reads all 140,000 in order, then
    ChannelClosed; a new port to Y's process still works. (Today Y
    rejects the 65,537th early item with ProtocolError and drops the link.)

    The producer drains: a window must be enforced by waiting, so it blocks
    while X is stopped; once it went over its window (or finished), X
    resumes."""
    backlog = more = 70_000
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        rep_tx, rep_rx = meshipc.channel()
        inbox = await spawn_ring(mesh, procs, 1, rep_tx)  # Y
        ports_tx, ports_rx = meshipc.channel()
        ctl_tx, ctl_rx = meshipc.channel()
        hold_rep_tx, hold_rep_rx = meshipc.channel()
        x = await mesh.spawn(
            "rel_workers:hold_then_move",
            {"ports": ports_rx, "ctl": ctl_rx, "to": inbox[0].clone(), "report": hold_rep_tx},
            name="X",
        )
        procs.append(x)
        a, b = Port.pair()
        ports_tx.send(b)
        assert (await within(hold_rep_rx.recv()))[0] == "have"  # our a now sends to X directly
        for i in range(backlog):
            # X never reads: no drain here (it would wait for X forever, which
            # is flow control working); the backlog stays under the hard limit
            a.send(i)
            if i % 1000 == 999:
                await asyncio.sleep(0)  # let the bytes out
        ctl_tx.send("move-and-stop")
        assert await within(hold_rep_rx.recv()) == ["moved"]
        # Y has the port and told us where it is (its CHANGE_PEER precedes this report)
        assert (await next_report(rep_rx, "got"))[0] == "got"
        await wait_until(lambda: _proc_state(x.pid) == "T", "X to stop itself")

        over_window = asyncio.Event()

        async def produce() -> None:
            for i in range(backlog, backlog + more):
                a.send(i)
                if i % 1000 == 999:
                    if a.statistics().in_flight > mesh.limits.window_messages:
                        over_window.set()  # Y has read nothing: drain() waits for X
                    await _drain(a)

        producer = asyncio.ensure_future(produce())
        blocked = asyncio.ensure_future(over_window.wait())
        try:
            # Y can consume nothing while X's backlog is stuck behind it: the
            # producer either finishes or goes over its window and waits
            await within(asyncio.wait({producer, blocked}, return_when=asyncio.FIRST_COMPLETED))
        finally:
            blocked.cancel()
            signal_proc(x, signal.SIGCONT)
        await within(producer)
        a.close()
        try:
            end = await next_report(rep_rx, "end", 10)
        except TimeoutError:
            raise AssertionError("Y never reported the end of the stream (its link to us dropped?)") from None
        _assert_end(end, backlog + more)
        # the link to Y is intact: a new port to it works
        a2, b2 = Port.pair()
        inbox[0].send({"port": b2, "seen": 0, "round": 1})
        a2.send(0)
        a2.send(1)
        a2.close()
        assert await next_report(rep_rx, "end") == ["end", 1, 0, 2, True, "closed"]
        ctl_tx.close()


# ----------------------------------------------------------------- item 3


async def test_item3_port_circulating_under_load_keeps_up(runtime_dir: Path) -> None:
    """A port circulates through three workers (each reads 200 values, then
    forwards it) while 40,000 values stream in as fast as the producer may
    send (draining): all arrive, in order. A move costs what the port holds,
    which flow control bounds by the window, not by everything sent so far:
    before, every hop re-forwarded the whole unread backlog item by item,
    ~n^2/400 forwards (4 M here, ~18 s; 100,000 values took minutes). The
    60 s bound only turns a hang into a failure (it takes a few seconds)."""
    n = 40_000
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        rep_tx, rep_rx = meshipc.channel()
        inbox = await spawn_ring(mesh, procs, 3, rep_tx)
        a, b = Port.pair()
        inbox[0].send({"port": b, "seen": 0, "take": [200, 200], "seed": 3})
        try:
            async with asyncio.timeout(60):
                for i in range(n):
                    a.send(i)
                    if i % 500 == 499:
                        await _drain(a)
                a.close()
                end = await next_report(rep_rx, "end", 12)
        except TimeoutError:
            raise AssertionError(f"{n} values through a circulating port took over 60 s") from None
        _assert_end(end, n)


# ----------------------------------------------------------------- item 4


async def test_item4_peer_stalled_at_first_contact_is_not_cut_off_for_good(runtime_dir: Path) -> None:
    """Worker A first contacts worker B while B is SIGSTOPped for longer than
    A's handshake timeout. After SIGCONT, a fresh port from A to B works.

    Stopping a process for the real HANDSHAKE_TIMEOUT (10 s) is too slow for
    CI: A sets ``meshipc._node.HANDSHAKE_TIMEOUT`` to 0.3 s in its own
    process before it learns of B (the connecting side is the one whose
    handshake times out), and the parent keeps B stopped until A's first
    call has either failed (today: the handshake timed out and B went into
    A's dead-node table) or 1.5 s have passed (a fixed node retries within
    the caller's deadline). The first call may then succeed late or fail;
    what must hold is that B is not partitioned from A for good."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        b = await mesh.spawn("rel_workers:echo", rx, name="B")
        procs.append(b)
        assert await within(tx.call("up")) == "up"  # B is running and connected to us
        in_tx, in_rx = meshipc.channel()
        rep_tx, rep_rx = meshipc.channel()
        procs.append(
            await mesh.spawn(
                "rel_workers:stall_probe",
                {"inbox": in_rx, "report": rep_tx, "timeout": 0.3, "call_timeout": 8.0},
                name="A",
            )
        )
        assert await within(rep_rx.recv()) == ["ready"]
        # a second sender to B, settled (its peer is B's end) before B stops
        fresh = tx.clone()
        assert await within(fresh.call("up")) == "up"
        signal_proc(b, signal.SIGSTOP)
        try:
            # tx's peer is in B (settled by the call above): A contacts B first
            in_tx.send(tx)
            first: list[Any] | None = None
            try:
                first = await within(rep_rx.recv(), 1.5)
            except TimeoutError:
                pass  # A is still waiting for B: fine, B resumes now
        finally:
            signal_proc(b, signal.SIGCONT)
        if first is None:
            first = await within(rep_rx.recv())
        assert first[:2] == ["call", 1]
        # after SIGCONT: a fresh port from A to B must work
        in_tx.send(fresh)
        second = await within(rep_rx.recv())
        assert second == ["call", 2, 2], f"first call: {first[2]!r}; fresh port after SIGCONT: {second[2]!r}"


async def test_item4_dead_node_table_is_bounded(runtime_dir: Path) -> None:
    """More attach cycles than the dead-node table holds (in-process ``join``,
    each leaving cleanly, and each leaving an entry) leave no more than its
    cap, ``MAX_DEAD_NODES`` (``stats().node.dead``)."""
    cycles = MAX_DEAD_NODES + 32
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        inviter = mesh.inviter()
        for i in range(cycles):
            ours, theirs = Port.pair()
            async with meshipc.join(await inviter.invite(theirs)) as cc:
                ours.send(i)
                assert await within(cc.port.recv()) == i
            with pytest.raises(MeshError):
                await within(ours.recv())
        left = mesh.stats().node.dead
        assert left <= MAX_DEAD_NODES < cycles, f"{left} dead-node entries after {cycles} clean joins"


# ----------------------------------------------------------------- item 5


@pytest.mark.parametrize("noticed", [False, True], ids=["just-killed", "death-noticed"])
async def test_item5_port_sent_to_dead_process_fails(runtime_dir: Path, noticed: bool) -> None:
    """A port sent to a worker that was just SIGKILLed ends with
    PortFailed/NodeFailure at the kept end, not ChannelClosed (an orderly
    close), whether or not the parent noticed the death before sending."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        in_tx, in_rx = meshipc.channel()
        rep_tx, rep_rx = meshipc.channel()
        w = await mesh.spawn("rel_workers:hold_inbox", {"inbox": in_rx, "report": rep_tx})
        procs.append(w)
        assert await within(rep_rx.recv()) == w.pid
        signal_proc(w, signal.SIGKILL)
        if noticed:
            await within(w.wait())
        a, b = Port.pair()
        try:
            in_tx.send(b)
        except PortFailed:
            return  # refused at send with the cause: also acceptable
        with pytest.raises(PortFailed) as info:
            await within(a.recv())
        assert isinstance(info.value, NodeFailure) or "fail" in str(info.value).lower()


# ----------------------------------------------------------------- item 6


async def test_item6_unencodable_call_right_after_spawn_fails_in_caller(runtime_dir: Path) -> None:
    """``await tx.call(object())`` right after spawn (the receiver is still
    in transit) raises MessageError in the caller; the worker lives on and
    the channel still works."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        w = await mesh.spawn("rel_workers:echo", rx)
        procs.append(w)
        with pytest.raises(MessageError):
            await within(tx.call(object()))
        assert await within(tx.call(5)) == 5
        assert w.returncode is None


async def test_item6_unencodable_send_to_remote_fails_at_send(runtime_dir: Path) -> None:
    """The same on an established link, with ``send``: MessageError at
    ``send``, and the channel still works."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        procs.append(await mesh.spawn("rel_workers:echo", rx))
        assert await within(tx.call(1)) == 1
        with pytest.raises(MessageError):
            await within(tx.call({"x": object()}))
        assert await within(tx.call(2)) == 2


def _deep(depth: int) -> list[Any]:
    v: list[Any] = []
    for _ in range(depth):
        v = [v]
    return v


async def test_item6_too_deep_value_fails_at_call(runtime_dir: Path) -> None:
    """A list nested 2,000 deep raises MessageError at ``call`` (today it
    raises RecursionError in the worker's read callback and the call hangs);
    the channel and the link are untouched."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        w = await mesh.spawn("rel_workers:echo", rx)
        procs.append(w)
        assert await within(tx.call(1)) == 1
        with pytest.raises(MessageError):
            await within(tx.call(_deep(2000)), 5)
        assert await within(tx.call(2)) == 2
        assert w.returncode is None


async def test_item6_oversized_message_fails_at_send(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message over the size cap raises MessageError at ``send`` (before,
    the receiver dropped the whole connection). The cap is 1 GiB; building
    such a value is too slow for CI, so the test lowers it in this process
    (the sender checks its own cap, which is the point)."""
    import meshipc._ports as ports

    monkeypatch.setattr(ports, "MAX_OOB_BODY", 1024 * 1024)
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        w = await mesh.spawn("rel_workers:echo", rx)
        procs.append(w)
        assert await within(tx.call(1)) == 1
        with pytest.raises(MessageError, match="exceeds the limit"):
            tx.send(b"x" * (2 * 1024 * 1024))
        with pytest.raises(MessageError, match="exceeds the limit"):
            await within(tx.call({"big": b"x" * (2 * 1024 * 1024)}))
        assert await within(tx.call(b"y" * 1000)) == b"y" * 1000
        assert w.returncode is None


# ----------------------------------------------------------------- item 7


async def test_item7_sender_sent_through_itself_is_refused(runtime_dir: Path) -> None:
    """``tx.send(tx)`` (its receiver in a worker) is refused at send with a
    MeshError; the sender, and an unrelated channel on the same connection,
    keep working (today: 'duplicate sequence number' drops the link)."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        procs.append(await mesh.spawn("rel_workers:echo", rx))
        other_tx, other_rx = meshipc.channel()
        procs.append(await mesh.spawn("rel_workers:echo", other_rx))
        assert await within(tx.call(1)) == 1
        assert await within(other_tx.call(1)) == 1
        with pytest.raises(MeshError):
            tx.send(tx)
        assert not tx.closed
        assert await within(tx.call(2)) == 2
        assert await within(other_tx.call(2)) == 2


async def test_item7_port_sent_through_itself_is_refused(runtime_dir: Path) -> None:
    """The same with a raw ``Port`` whose peer is in a worker: ``a.send(a)``
    is refused; unrelated traffic on the connection is unaffected."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        procs.append(await mesh.spawn("rel_workers:echo", rx))
        assert await within(tx.call(1)) == 1
        a, b = Port.pair()
        tx.send(b)  # b goes to the worker (its echo loop ignores it: not a Call)
        a.send("hello")
        with pytest.raises(MeshError):
            a.send(a)
        assert await within(tx.call(2)) == 2


# ----------------------------------------------------------------- item 8


async def _typed_server(mesh: meshipc.Mesh, procs: list[meshipc.Process], which: str) -> Any:
    rep_tx, rep_rx = meshipc.channel()
    w = await mesh.spawn(f"rel_workers:{which}", rep_tx)
    procs.append(w)
    return w, await within(rep_rx.recv())


@pytest.mark.parametrize(
    "which,bad",
    [
        ("typed_server", "not an int"),
        ("typed_server", msgspec.msgpack.Ext(99, b"?")),
        ("untyped_server", msgspec.msgpack.Ext(99, b"?")),
    ],
    ids=["mistyped", "unknown-ext-typed", "unknown-ext-untyped"],
)
async def test_item8_bad_message_does_not_end_a_server(runtime_dir: Path, which: str, bad: Any) -> None:
    """A worker serving ``async for call in rx`` gets a mistyped value or an
    unknown msgpack extension from one client: the bad call ends for that
    client (any MeshError, not a hang), and the worker keeps serving another
    client."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        w, tx = await _typed_server(mesh, procs, which)
        good = tx.clone()
        assert await within(good.call(21)) in (42, 21)
        with pytest.raises(MeshError):
            await within(tx.call(bad))
        assert await within(good.call(4)) in (8, 4), "the server stopped serving after one bad message"
        assert w.returncode is None


# ----------------------------------------------------------------- item 9


async def test_item9_typed_receiver_given_to_spawn_validates_in_worker(runtime_dir: Path) -> None:
    """``spawn(..., rx)`` with ``rx`` from ``channel(int)``: in the worker a
    string is a MessageError (the call fails), an int goes through."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel(int)
        procs.append(await mesh.spawn("rel_workers:validate_probe", rx))
        try:
            got: Any = await within(tx.call("not an int"))
        except MeshError as exc:
            got = exc
        assert isinstance(got, MeshError), f"the worker accepted a str on a Receiver[int]: {got!r}"
        assert await within(tx.call(7)) == ["int", 1]


# ------------------------------------------------- issues 17 and 18 (nothing lost, credit)


async def _merged_reader(
    mesh: meshipc.Mesh, procs: list[meshipc.Process]
) -> tuple[meshipc.Sender[Any], meshipc.Sender[Any], meshipc.Receiver[Any]]:
    """A ``rel_workers:merged_reader`` worker: (its inbox, its calls, its reports)."""
    inbox_tx, inbox_rx = meshipc.channel()
    calls_tx, calls_rx = meshipc.channel()
    rep_tx, rep_rx = meshipc.channel()
    arg = {"inbox": inbox_rx, "calls": calls_rx, "report": rep_tx}
    procs.append(await mesh.spawn("rel_workers:merged_reader", arg, name="Y"))
    return inbox_tx, calls_tx, rep_rx


def _merged(n: int) -> tuple[list[meshipc.Sender[Any]], meshipc.Receiver[Any]]:
    """A receiver merging ``n`` senders (the clones already merged)."""
    tx, rx = meshipc.channel()
    txs = [tx, *(tx.clone() for _ in range(n - 1))]
    with pytest.raises(asyncio.QueueEmpty):
        rx.try_recv()
    return txs, rx


async def test_issue17_merged_receiver_reports_what_a_killed_proxy_lost(runtime_dir: Path) -> None:
    """Issue 17 item 1 over processes: a receiver merging A and B is held by
    X (B's 20 messages unread there), moved to Y, and X stops before it
    forwards them; C joins at Y directly and sends 20. X is killed: Y's
    reader must not end cleanly once A and C close (before: C's 20, then a
    clean end, 20 lost); it gets NodeFailure naming the loss, and B's next
    send raises PortFailed instead of "succeeding"."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        inbox, calls, rep = await _merged_reader(mesh, procs)
        ports_tx, ports_rx = meshipc.channel()
        ctl_tx, ctl_rx = meshipc.channel()
        hold_tx, hold_rx = meshipc.channel()
        arg = {"ports": ports_rx, "ctl": ctl_rx, "to": inbox.clone(), "report": hold_tx}
        x = await mesh.spawn("rel_workers:hold_then_move", arg, name="X")
        procs.append(x)
        (txa, txb), rx = _merged(2)
        ports_tx.send(rx)
        assert (await within(hold_rx.recv()))[0] == "have"
        ctl_tx.send("warm")
        assert await within(rep.recv()) == ["warm"]  # X reaches Y without a new connection
        for i in range(20):
            txb.send(["b", i])  # unread in X
        ctl_tx.send("move-and-stop")
        assert await within(hold_rx.recv()) == ["moved"]
        assert await within(rep.recv()) == ["got"]  # Y's CHANGE_PEERs came before this
        txc = txa.clone()  # merged at Y straight from here: no proxy on X
        for i in range(20):
            txc.send(["c", i])
        await wait_until(lambda: _eq(calls.call("proxied"), 2), "Y to be fed only by the proxies on X")
        signal_proc(x, signal.SIGKILL)
        await wait_until(lambda: _eq(calls.call("proxied"), 0), "Y to see X die")
        txa.close()
        txc.close()
        _, values, how = await within(rep.recv())
        assert how.startswith("NodeFailure") and "messages in transit were lost" in how, (len(values), how)
        assert values == [["c", i] for i in range(len(values))]
        with pytest.raises(PortFailed):
            txb.send("after the loss")


async def _eq(aw: Any, want: Any) -> bool:
    return bool(await aw == want)


@pytest.mark.parametrize("how", ["close", "move"])
async def test_issue17_thread_sends_accepted_before_close_or_move_all_arrive(
    runtime_dir: Path, how: str
) -> None:
    """Issue 17 item 2: a thread sends 20,000 through a Sender (its receiver
    in a worker) while the loop is busy, then signals; the loop at once
    closes the Sender, or sends it to another worker. Every accepted send
    arrives, in order, before the end (before: the close or move went first
    and thousands were dropped with a log line)."""
    import threading

    n = 20_000
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        rep_tx, rep_rx = meshipc.channel()
        procs.append(await mesh.spawn("rel_workers:collect_threads", {"rx": rx, "report": rep_tx}))
        assert await within(rep_rx.recv()) == ["ready"]
        tx.send([99, 0])  # settles tx on the worker's end: a node's engine, with a loop
        closer_tx, closer_rx = meshipc.channel()
        procs.append(await mesh.spawn("rel_workers:close_what_comes", closer_rx))
        done = threading.Event()

        def produce() -> None:
            for i in range(n):
                tx.send([0, i])
            done.set()

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        try:
            # the loop is held here while the thread sends: all its sends are
            # accepted and wait for this loop when it closes or moves tx
            assert done.wait(60), "the producer thread did not finish"
            if how == "close":
                tx.close()
            else:
                closer_tx.send(tx)
        finally:
            t.join(60)
        assert await within(rep_rx.recv(), 30) == ["done", {"99": 1, "0": n}, True, "closed"]


async def test_issue17_merged_senders_are_served_round_robin(runtime_dir: Path) -> None:
    """Issue 17 item 3 over processes: A has 500 queued at the reader, B 10;
    B's 10 are among the first 20 read (before: 20 of A's)."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        inbox, calls, rep = await _merged_reader(mesh, procs)
        (txa, txb), rx = _merged(2)
        inbox.send({"port": rx, "gate": True, "n": 20})
        assert await within(rep.recv()) == ["got"]  # the senders now send straight to Y
        for i in range(500):
            txa.send(["a", i])
        for i in range(10):
            txb.send(["b", i])
        assert await within(calls.call("go")) == "go"  # after the data, on the same link
        _, values, _ = await within(rep.recv())
        assert [v for v in values if v[0] == "b"] == [["b", i] for i in range(10)], values


def _window_limits() -> Any:
    return meshipc.Limits(window_messages=64, window_bytes=64 * 1024, max_messages=1024, max_bytes=256 * 1024)


async def _consumer(
    mesh: meshipc.Mesh, procs: list[meshipc.Process]
) -> tuple[meshipc.Sender[Any], meshipc.Receiver[Any]]:
    tx, rx = meshipc.channel()
    rep_tx, rep_rx = meshipc.channel()
    procs.append(await mesh.spawn("rel_workers:consumer", {"rx": rx, "report": rep_tx}, name="consumer"))
    assert (await within(rep_rx.recv()))[0] == "ready"
    return tx, rep_rx


async def test_issue17_message_over_the_byte_limit_goes_after_drain(runtime_dir: Path) -> None:
    """Issue 17 item 4: after one small message, a message larger than the
    byte limit is refused with BufferFull; ``drain()`` waits until the
    small one is known consumed and the retry goes (before: drain returned
    at once and every retry raised BufferFull again)."""
    big = 300 * 1024
    async with meshipc.Mesh(runtime_dir=runtime_dir, limits=_window_limits()) as mesh, reaped(mesh) as procs:
        tx, rep = await _consumer(mesh, procs)
        tx.send([0, b""])
        for i in (1, 2):
            with pytest.raises(meshipc.BufferFull):
                tx.send([i, b"x" * big])
            await within(tx.drain())
            tx.send([i, b"x" * big])
        tx.close()
        assert (await within(rep.recv()))[:4] == ["done", 3, True, "closed"]


async def test_issue17_a_send_whose_body_cannot_be_made_leaves_the_channel_usable(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17 item 5: making the out-of-band body fails (EMFILE): the send
    raises MessageError naming it, and the channel goes on (before: OSError
    after the sequence number was taken, then every later message waited
    for the gap)."""
    import errno

    from meshipc._platform import PLATFORM

    def emfile(size: int, folder: Any) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rep = await _consumer(mesh, procs)
        tx.send([0, b""])
        with monkeypatch.context() as m:
            m.setattr(PLATFORM, "new_body", emfile)
            with pytest.raises(MessageError, match="Too many open files"):
                tx.send([1, b"x" * (512 * 1024)])
        tx.send([1, b"y" * (512 * 1024)])
        tx.send([2, b""])
        tx.close()
        assert (await within(rep.recv()))[:4] == ["done", 3, True, "closed"]


async def test_issue18_forged_consumption_report_drops_the_link(runtime_dir: Path) -> None:
    """Issue 18 item 2: a peer reporting more consumed than was sent is a
    protocol error: its link is dropped and the port fails saying so
    (before: the report was clamped and believed)."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        rep_tx, rep_rx = meshipc.channel()
        procs.append(await mesh.spawn("rel_workers:forge_credit", {"rx": rx, "report": rep_tx}))
        assert await within(rep_rx.recv()) == ["ready"]
        for i in range(mesh.limits.window_messages):
            tx.send(i)
        await wait_until(lambda: tx.statistics().error is not None, "the forger's link to be dropped")
        error = tx.statistics().error
        assert "protocol error" in str(error) and "consumed" in str(error)
        with pytest.raises(PortFailed):
            await within(tx.drain())


async def test_issue18_credit_cannot_grow_a_links_unwritten_buffer(runtime_dir: Path) -> None:
    """Issue 18 item 2: a stopped peer whose credit looks complete (every
    send reported consumed at once, as a forger that guesses right would):
    ``drain()`` still blocks, on the link's unwritten bytes, with the
    producer's RSS bounded; without drain, ``send`` raises BufferFull at
    ``link_max_bytes`` (before: 64 MiB queued without a pause). (Out-of-band
    bodies already handed to the peer's socket are not ours to count: the
    cap on out-of-band bytes in flight covers them.)"""
    size = 64 * 1024
    limits = meshipc.Limits(link_buffer_bytes=2 * 1024 * 1024, link_max_bytes=8 * 1024 * 1024)
    blob = b"f" * size
    async with meshipc.Mesh(runtime_dir=runtime_dir, limits=limits) as mesh, reaped(mesh) as procs:
        tx, _rep = await _consumer(mesh, procs)
        tx.send([0, b""])
        signal_proc(procs[-1], signal.SIGSTOP)
        st = tx._states[0]
        eng = st.engine

        def forge() -> None:
            eng._on_consumed(st.id, st.send_seq - 1)

        before = vmrss_kb()
        blocked = False
        for i in range(1, 64 * 1024 * 1024 // size):  # 64 MiB worth
            tx.send([i, blob])
            forge()
            try:
                await within(tx.drain(), 0.5)
            except TimeoutError:
                blocked = True
                break
        assert blocked, "drain() never blocked on a peer that does not read"
        with pytest.raises(meshipc.BufferFull, match="not written yet"):
            for j in range(i + 1, i + 64 * 1024 * 1024 // size):
                tx.send([j, blob])
                forge()
                await asyncio.sleep(0)  # let the link write what it can
        assert (vmrss_kb() - before) / 1024 < 100
        signal_proc(procs[-1], signal.SIGCONT)


async def test_issue17_calling_a_receiver_that_is_gone_says_so(runtime_dir: Path) -> None:
    """Issue 17 item 8: a call through a Sender whose receiver's process
    exited says the receiver is gone, not "the receiver is closed"."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        w = await mesh.spawn("workers:noop", rx)
        procs.append(w)
        assert await within(w.wait()) == 0
        stats = tx.statistics
        await wait_until(lambda: stats().peer_closed or stats().error is not None, "the worker's end to go")
        with pytest.raises(MeshError) as err:
            await within(tx.call(1))
        assert "is closed" not in str(err.value)
        assert "gone" in str(err.value) or isinstance(err.value, NodeFailure), err.value


async def test_issue17_a_failed_port_sent_on_carries_its_cause(runtime_dir: Path) -> None:
    """Issue 17 item 8: a port whose peer's process was killed, sent on to
    another worker, fails there with the real cause (the node that died),
    not "the port was failed before it was sent"."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        rep_tx, rep_rx = meshipc.channel()
        inbox = await spawn_ring(mesh, procs, 1, rep_tx)
        keep_tx, keep_rx = meshipc.channel()
        pid_tx, pid_rx = meshipc.channel()
        holder = await mesh.spawn("rel_workers:hold_inbox", {"inbox": keep_rx, "report": pid_tx})
        procs.append(holder)
        assert await within(pid_rx.recv()) == holder.pid
        a, b = Port.pair()
        keep_tx.send(b)
        a.send(0)  # b is in the holder once this is there
        signal_proc(holder, signal.SIGKILL)
        with pytest.raises(PortFailed) as died:
            await within(a.recv())
        inbox[0].send({"port": a, "seen": 0, "reads": [], "route": []})
        how = (await next_report(rep_rx, "end"))[5]
        assert how == f"PortFailed: {died.value.cause}", how


@pytest.mark.soak
def test_soak_merged_receiver_hops_with_thread_producers_and_kills(runtime_dir: Path) -> None:
    """Issue 17's chaos soak, smaller: a receiver merging three senders (one
    on the loop, two in threads, each sending 20,000 then closing) hops
    among five workers; in half the rounds one worker it has left is
    SIGKILLed on the way. Every round either delivers everything in order
    and ends cleanly, or fails visibly (PortFailed/NodeFailure, at the
    holder or at a producer) after an in-order prefix: never a clean end
    with anything missing."""
    import threading

    n, rounds, workers = 20_000, 6, 5

    async def soak() -> None:
        async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
            rep_tx, rep_rx = meshipc.channel()
            inboxes = [meshipc.channel() for _ in range(workers)]
            for i in range(workers):
                peers = [tx.clone() for tx, _ in inboxes]
                arg = {"idx": i, "inbox": inboxes[i][1], "peers": peers, "report": rep_tx.clone()}
                procs.append(await mesh.spawn("rel_workers:merged_hop", arg, name=f"mh{i}"))
            alive = set(range(workers))
            for rnd in range(rounds):
                start = min(alive)
                (t0, t1, t2), rx = _merged(3)
                told: list[str] = []

                def produce(tx: meshipc.Sender[Any], k: int, told: list[str] = told) -> None:
                    try:
                        for i in range(n):
                            tx.send([k, i])
                    except (PortFailed, meshipc.BufferFull) as exc:
                        told.append(f"{k}: {type(exc).__name__}")
                    finally:
                        tx.close()

                kill = rnd % 2 == 1

                async def follow(
                    rnd: int = rnd, kill: bool = kill, start: int = start
                ) -> tuple[Any, bool, str]:
                    """Reports of this round, killing (in kill rounds) a worker
                    the receiver left two hops ago while the data flows."""
                    left = [start]
                    while True:
                        r = await rep_rx.recv()
                        if r[1] != rnd:
                            continue
                        if r[0] == "end":
                            return r[3], r[4], r[5]
                        if r[3] not in alive:
                            return {}, True, "sent to a killed worker"  # gone with it
                        left.append(r[3])
                        victims = [w for w in left[:-2] if w in alive and w != r[3]]
                        if kill and victims and len(left) >= 6:  # late: few hops left to reach it
                            signal_proc(procs[victims[-1]], signal.SIGKILL)
                            alive.discard(victims[-1])
                            kill = False

                follower = asyncio.ensure_future(follow())
                hop = {"rx": rx, "next": {}, "round": rnd, "hops": 6, "seed": rnd, "alive": sorted(alive)}
                inboxes[start][0].send(hop)
                threads = [
                    threading.Thread(target=produce, args=(t, k), daemon=True) for k, t in ((1, t1), (2, t2))
                ]
                for t in threads:
                    t.start()
                try:
                    for i in range(n):
                        t0.send([0, i])
                        if i % 500 == 499:
                            await within(t0.drain(), 60)
                except PortFailed as exc:
                    told.append(f"0: {type(exc).__name__}")
                t0.close()
                for t in threads:
                    await asyncio.to_thread(t.join, 60)
                nxt, ok, how = await within(follower, 60)
                assert ok, f"round {rnd}: values out of order: {nxt}"
                complete = all(nxt.get(str(k), 0) == n for k in range(3))
                if how == "closed":
                    assert complete, f"round {rnd}: a clean end with values missing: {nxt} (told: {told})"
                elif how != "sent to a killed worker":
                    assert how.startswith(("PortFailed", "NodeFailure")), how
                if len(alive) < 3:
                    break

    asyncio.run(soak())
