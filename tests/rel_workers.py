"""Worker functions for the reliability, flow-control and soak tests.

Every function is an ``async def func(arg)`` started by
``Mesh.spawn("rel_workers:func", arg)``; children import this module through
the parent's ``sys.path`` (``tests/`` is on it via ``conftest.py``). Workers
talk back to the test only through mesh messages: never files, never sleeps.

The port-circulation protocol (``hop``): a worker's inbox receives hop
messages ``{"port": Port, "seen": n, "round": r, "reads": [...], "route":
[...], "take": [lo, hi] | None, "seed": s}``. The producer sends the ints
0, 1, 2, ... on the other end of ``port``; ``seen`` is the next value
expected. The holder reads ``reads[0]`` values (or a random number in
``take`` when ``reads`` is empty and ``take`` is set), checks each equals
``seen``, then forwards the port to ``route[0]`` (or a random other worker).
With neither left to do it reads to the end of the stream. Each step is
reported on ``report``:

* ``["got", round, idx]`` on receipt, if the hop message says ``announce``;
* ``["hop", round, idx, start, seen, ok, next]`` when forwarding (just
  before the send; if the send raises, an ``"end"`` report follows);
* ``["end", round, idx, seen, ok, how]`` at the end of the stream, ``how``
  being ``"closed"`` or ``"<ExceptionType>: <message>"``, or ``"complete"``
  when the hop message has ``"total": n`` and ``n`` values were read (the
  holder then closes the port; the producer need not close it first).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from typing import Any

import meshipc
import meshipc._node
from meshipc import Call, ChannelClosed, MeshError, MessageError, Port, Receiver, Sender


def _vmrss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def echo(rx: Receiver[Call[Any]]) -> None:
    """Serve calls on ``rx``: reply with the request, unchanged."""
    async for call in rx:
        call.reply(call.request)


async def hop(arg: dict[str, Any]) -> None:
    """One worker of a ring circulating a port (see the module docstring).

    ``arg``: ``idx`` (this worker's index), ``inbox`` (Receiver of hop
    messages), ``peers`` (list of Senders to every worker's inbox, own
    included), ``report`` (Sender to the test)."""
    idx: int = arg["idx"]
    inbox: Receiver[Any] = arg["inbox"]
    peers: list[Sender[Any]] = arg["peers"]
    report: Sender[Any] = arg["report"]
    async for m in inbox:
        port: Port = m["port"]
        seen: int = m["seen"]
        if m.get("announce"):
            report.send(["got", m.get("round", 0), idx])
        start = seen
        ok = True
        reads: list[int] = list(m.get("reads") or [])
        route: list[int] = list(m.get("route") or [])
        take = m.get("take")
        hops: int = m.get("hops", 0)
        rng = random.Random((m.get("seed", 0) * 1000003 + seen) * 1009 + hops)
        if reads:
            n = reads.pop(0)
        elif take:
            n = rng.randint(take[0], take[1])
        else:
            n = -1  # read to the end
        total = m.get("total")  # if set: stop at ``total`` values, report "complete"
        how = None
        try:
            while n < 0 or seen - start < n:
                if total is not None and seen >= total:
                    how = "complete"
                    break
                v = await port.recv()
                if v != seen:
                    ok = False
                    seen = v if isinstance(v, int) else seen
                seen += 1
        except ChannelClosed:
            how = "closed"
        except MeshError as exc:
            how = f"{type(exc).__name__}: {exc}"
        if how is not None:
            report.send(["end", m.get("round", 0), idx, seen, ok, how])
            port.close()
            continue
        if route:
            nxt = route.pop(0)
        else:
            nxt = rng.choice([i for i in range(len(peers)) if i != idx])
        # reported first: the test must know the port went to ``nxt`` even
        # if it fails there (``nxt`` may have been killed)
        report.send(["hop", m.get("round", 0), idx, start, seen, ok, nxt])
        try:
            peers[nxt].send(
                {
                    "port": port,
                    "seen": seen,
                    "round": m.get("round", 0),
                    "reads": reads,
                    "route": route,
                    "take": take,
                    "seed": m.get("seed", 0),
                    "hops": hops + 1,
                    "total": total,
                }
            )
        except MeshError as exc:  # e.g. refused because worker nxt is dead
            report.send(["end", m.get("round", 0), idx, seen, ok, f"{type(exc).__name__}: {exc}"])
            port.close()


async def hold_then_move(arg: dict[str, Any]) -> None:
    """Receive a port on ``arg["ports"]`` and hold it unread; report
    ``["have", pid]``; on ``"warm"`` from ``arg["ctl"]`` send ``{"warm": True}``
    to ``arg["to"]``; on ``"move"``, forward it as a
    hop message (read to the end) to ``arg["to"]`` and report ``["moved"]``.
    Stays until ``ctl`` closes (it may still be proxying)."""
    ports: Receiver[Any] = arg["ports"]
    ctl: Receiver[Any] = arg["ctl"]
    report: Sender[Any] = arg["report"]
    port = await ports.recv()
    report.send(["have", os.getpid()])
    async for cmd in ctl:
        if cmd == "warm":  # reach ``to`` once first, so the move needs no new connection
            arg["to"].send({"warm": True})
        if cmd in ("move", "move-and-stop"):
            arg["to"].send({"port": port, "seen": 0, "reads": [], "route": [], "announce": True})
            report.send(["moved"])
            if cmd == "move-and-stop":
                # one loop turn runs the write of the move (scheduled before
                # us), no read: we stop before the new holder's ARRIVED can
                # be processed, so the backlog stays here, in transit
                await asyncio.sleep(0)
                os.kill(os.getpid(), signal.SIGSTOP)


async def stall_probe(arg: dict[str, Any]) -> None:
    """Item 4. Set this node's handshake timeout to ``arg["timeout"]``,
    report ``["ready"]``; then for each Sender from ``arg["inbox"]`` (its
    receiver lives in a worker the test may have stopped) make one call and
    report ``["call", n, result-or-"<Error>: msg"]``."""
    if hasattr(meshipc._node, "HANDSHAKE_TIMEOUT"):
        meshipc._node.HANDSHAKE_TIMEOUT = arg["timeout"]  # type: ignore[misc]
    inbox: Receiver[Any] = arg["inbox"]
    report: Sender[Any] = arg["report"]
    report.send(["ready"])
    n = 0
    async for tx in inbox:
        n += 1
        try:
            async with asyncio.timeout(arg["call_timeout"]):
                res: Any = await tx.call(n)
        except (MeshError, TimeoutError) as exc:
            res = f"{type(exc).__name__}: {exc}"
        report.send(["call", n, res])
        tx.close()


async def hold_inbox(arg: dict[str, Any]) -> None:
    """Report our pid on ``arg["report"]``; keep whatever ``arg["inbox"]``
    brings (never read it) until the test stops us."""
    arg["report"].send(os.getpid())
    await asyncio.Event().wait()


async def typed_server(report: Sender[Any]) -> None:
    """Item 8: make a ``channel(int)`` here (so the receiver validates in
    this process), hand its sender to the test, serve ``call.request * 2``
    on it with a plain ``async for``; report ``["done"]`` when it ends."""
    tx, rx = meshipc.channel(int)
    report.send(tx)
    async for call in rx:
        call.reply(call.request * 2)
    report.send(["done"])


async def untyped_server(report: Sender[Any]) -> None:
    """Item 8, untyped: like ``typed_server`` with ``channel()``, replying
    with the request."""
    tx, rx = meshipc.channel()
    report.send(tx)
    async for call in rx:
        call.reply(call.request)
    report.send(["done"])


async def validate_probe(rx: Receiver[Any]) -> None:
    """Item 9: serve calls on the ``rx`` given to spawn; reply
    ``[type name of the request, bad messages seen so far]``. A message that
    does not validate (``MessageError``) is counted, not fatal."""
    bad = 0
    while True:
        try:
            call = await rx.recv()
        except MessageError:
            bad += 1
            continue
        except ChannelClosed:
            return
        call.reply([type(call.request).__name__, bad + rx.bad_messages])


async def consumer(arg: dict[str, Any]) -> None:
    """Flow control: report ``["ready", pid]``, then read ``[i, payload]``
    from ``arg["rx"]`` checking ``i`` counts up from 0; at the end report
    ``["done", count, ok, how, vmrss_kb_peak]``."""
    rx: Receiver[Any] = arg["rx"]
    report: Sender[Any] = arg["report"]
    report.send(["ready", os.getpid()])
    count = 0
    ok = True
    peak = _vmrss_kb()
    how = "closed"
    try:
        async for i, _payload in rx:
            if i != count:
                ok = False
            count += 1
            if count % 64 == 0:
                peak = max(peak, _vmrss_kb())
    except MeshError as exc:
        how = f"{type(exc).__name__}: {exc}"
    report.send(["done", count, ok, how, max(peak, _vmrss_kb())])


async def collect_threads(arg: dict[str, Any]) -> None:
    """Thread-safe senders: read ``[tid, i]`` from ``arg["rx"]``; at the end
    report ``["done", {tid: count}, ok, how]`` where ``ok`` says every
    thread's values came as 0, 1, 2, ... in order."""
    rx: Receiver[Any] = arg["rx"]
    report: Sender[Any] = arg["report"]
    report.send(["ready"])
    nxt: dict[int, int] = {}
    ok = True
    how = "closed"
    try:
        async for tid, i in rx:
            if nxt.get(tid, 0) != i:
                ok = False
            nxt[tid] = i + 1
    except MeshError as exc:
        how = f"{type(exc).__name__}: {exc}"
    report.send(["done", {str(k): v for k, v in nxt.items()}, ok, how])


async def loop_kind(rx: Receiver[Call[Any]]) -> None:
    """Answer every call with the module of the running event loop's class."""
    async for call in rx:
        call.reply(type(asyncio.get_running_loop()).__module__.split(".")[0])


async def hold_and_serve(arg: dict[str, Any]) -> None:
    """Keep the ports that arrive on ``arg["ports"]`` unread; answer calls on
    ``arg["calls"]`` (with their request) meanwhile."""
    held = []
    ports: Receiver[Any] = arg["ports"]

    async def keep() -> None:
        async for p in ports:
            held.append(p)

    keeper = asyncio.ensure_future(keep())
    async for call in arg["calls"]:
        call.reply(call.request)
    keeper.cancel()


async def merged_reader(arg: dict[str, Any]) -> None:
    """Issue 17: hold what ``arg["inbox"]`` brings (hop messages; ``port``
    may be a merged Receiver), reporting ``["got"]`` on receipt; read it once
    a ``"go"`` call came (at once unless the message says ``"gate"``): ``n``
    values, or to the end; report ``["end", values, how]``. Meanwhile answer
    calls on ``arg["calls"]``: ``"go"`` opens the gate, ``"proxied"`` answers
    how many ports here are still fed by a proxy, anything else echoes."""
    report: Sender[Any] = arg["report"]
    gate = asyncio.Event()
    engine: list[Any] = []

    async def serve() -> None:
        async for call in arg["calls"]:
            if call.request == "go":
                gate.set()
            if call.request == "proxied" and engine:
                call.reply(sum(1 for st in engine[0].ports.values() if st.proxy_from is not None))
            else:
                call.reply(call.request)

    server = asyncio.ensure_future(serve())
    async for m in arg["inbox"]:
        if m.get("warm"):
            report.send(["warm"])
            continue
        rx = m["port"]
        engine.append(rx._states[0].engine)
        report.send(["got"])
        if m.get("gate"):
            await gate.wait()
        values: list[Any] = []
        how = "complete"
        try:
            while m.get("n") is None or len(values) < m["n"]:
                values.append(await rx.recv())
        except ChannelClosed:
            how = "closed"
        except MeshError as exc:
            how = f"{type(exc).__name__}: {exc}"
        report.send(["end", values, how])
    server.cancel()


async def close_what_comes(rx: Receiver[Any]) -> None:
    """Close every handle that arrives on ``rx``."""
    async for h in rx:
        h.close()


async def forge_credit(arg: dict[str, Any]) -> None:
    """Issue 18: a consumer whose consumption reports claim a billion items:
    reads ``arg["rx"]``, reports ``["done", count, how]`` at the end."""
    from meshipc._ports import Engine
    from meshipc._wire import ConsumedEvent

    def forged(self: Engine, st: Any) -> None:
        if st.rx is not None:
            st.rx.unreported_n = st.rx.unreported_bytes = 0
        self.out.send_event(st.peer_node, ConsumedEvent(st.peer_port, 10**9), [])

    Engine._report_consumed = forged  # type: ignore[method-assign]
    report: Sender[Any] = arg["report"]
    report.send(["ready"])
    count, how = 0, "closed"
    try:
        async for _ in arg["rx"]:
            count += 1
    except MeshError as exc:
        how = f"{type(exc).__name__}: {exc}"
    report.send(["done", count, how])


async def merged_hop(arg: dict[str, Any]) -> None:
    """Issue 17 soak: one worker of a ring circulating a merged Receiver of
    ``[k, i]`` values (``k`` a sender, ``i`` counting from 0 per sender).
    A hop message is ``{"rx": Receiver, "next": {k: i}, "round": r,
    "hops": n, "seed": s, "alive": [...]}``: read a random 0-200 values checking
    each sender's order, then forward it to a random other worker of
    ``alive`` (``hops`` times), then
    read to the end. Reports ``["hop", round, idx, to]`` before forwarding
    and ``["end", round, idx, next, ok, how]`` at the end."""
    idx: int = arg["idx"]
    peers: list[Sender[Any]] = arg["peers"]
    report: Sender[Any] = arg["report"]
    async for m in arg["inbox"]:
        rx: Receiver[Any] = m["rx"]
        nxt: dict[str, int] = m["next"]
        rng = random.Random(m["seed"] * 7919 + m["hops"])
        ok = True
        n = rng.randint(0, 200) if m["hops"] > 0 else -1
        how = None
        try:
            while n != 0:
                k, i = await rx.recv()
                ok = ok and nxt.get(str(k), 0) == i
                nxt[str(k)] = i + 1
                n -= 1
        except ChannelClosed:
            how = "closed"
        except MeshError as exc:
            how = f"{type(exc).__name__}: {exc}"
        if how is None:
            to = rng.choice([i for i in m.get("alive", range(len(peers))) if i != idx])
            report.send(["hop", m["round"], idx, to])
            try:
                peers[to].send({**m, "rx": rx, "next": nxt, "hops": m["hops"] - 1})
                continue
            except MeshError as exc:
                how = f"{type(exc).__name__}: {exc}"
        report.send(["end", m["round"], idx, nxt, ok, how])
        rx.close()
