"""Several port engines wired together in memory (no sockets).

Every event goes through the real wire encoder and decoder, so the engines
see exactly what a socket would give them. Delivery order across links is
chosen by the test; within one link it is FIFO, as on a connection.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from meshipc import ChannelClosed, Port, PortFailed
from meshipc._codec import CODEC
from meshipc._ids import NodeId, PortId
from meshipc._ports import DEFAULT_LIMITS, Engine, Limits
from meshipc._wire import Event, FdBody, FrameDecoder, MsgEvent, encode_event


class _Outbox:
    """Engine ``src``'s outbox: a FIFO link per destination."""

    def __init__(self, net: Net, src: int) -> None:
        self.net = net
        self.src = src

    def send_event(self, node: bytes, ev: Event, fds: list[Any]) -> None:
        net = self.net
        dst = net.index[node]
        if self.src in net.dead or dst in net.dead:
            for fd in fds:
                fd.close()
            return
        net.links.setdefault((self.src, dst), deque()).append((ev, fds))

    def send_data(self, node: bytes, port: bytes, seq: int, kind: int, body: bytes) -> None:
        if isinstance(body, FdBody):  # a message of fds (the fd fast path): taken over here, as a link does
            fds = body.take()
            self.send_event(node, MsgEvent(port, seq, kind, 0, [], len(fds), body.body), fds)
            return
        self.send_event(node, MsgEvent(port, seq, kind, 0, [], 0, body), [])

    def watch(self, node: bytes) -> None:
        pass

    def backlog(self, node: bytes) -> int:
        """What a test says is unwritten on this link (``Net.backlog``)."""
        return self.net.backlog.get((self.src, self.net.index[node]), 0)

    def watch_backlog(self, node: bytes, below: int, fn: Callable[[], None]) -> None:
        self.net.backlog_waiters.append((self.src, self.net.index[node], below, fn))


class _DataLink:
    """What ``Engine.links`` holds for a linked node (as a node shares its
    socket links): plain messages from ``src`` to ``node`` take the engine's
    direct path, then the source's current outbox (which a test may wrap)."""

    def __init__(self, net: Net, src: int, node: bytes) -> None:
        self.net = net
        self.src = src
        self.node = node

    def write_data(self, port: bytes, seq: int, kind: int, body: bytes) -> None:
        self.net.link_writes += 1
        self.net.engines[self.src].out.send_data(self.node, port, seq, kind, body)


class Net:
    def __init__(self, n: int, limits: Limits = DEFAULT_LIMITS) -> None:
        self.engines: list[Engine] = []
        self.links: dict[tuple[int, int], deque[tuple[Event, list[Any]]]] = {}
        self.dead: set[int] = set()
        #: unwritten bytes a test pretends a link holds (a peer not reading)
        self.backlog: dict[tuple[int, int], int] = {}
        self.backlog_waiters: list[tuple[int, int, int, Callable[[], None]]] = []
        for _ in range(n):
            self.engines.append(Engine(NodeId.random(), codec=CODEC, limits=limits))
        self.index = {e.node_id: i for i, e in enumerate(self.engines)}
        #: plain messages that went through an engine's ``links`` (its hot path)
        self.link_writes = 0
        for i, e in enumerate(self.engines):
            e.out = _Outbox(self, i)
            e.links = {o.node_id: _DataLink(self, i, o.node_id) for o in self.engines if o is not e}

    def pair(self, a: int, b: int) -> tuple[Port, Port]:
        """A port on engine a peered with a port on engine b."""
        pa, pb = PortId.random(), PortId.random()
        ea, eb = self.engines[a], self.engines[b]
        sa = ea.new_bound(pa, eb.node_id, pb)
        sb = eb.new_bound(pb, ea.node_id, pa)
        return Port._wrap([sa]), Port._wrap([sb])

    def set_backlog(self, src: int, dst: int, n: int) -> None:
        """Pretend the link src -> dst holds ``n`` unwritten bytes; wakes
        whoever waits for it to shrink."""
        self.backlog[(src, dst)] = n
        keep = []
        for w in self.backlog_waiters:
            if (w[0], w[1]) == (src, dst) and n <= w[2]:
                w[3]()
            else:
                keep.append(w)
        self.backlog_waiters = keep

    def pending(self) -> list[tuple[int, int]]:
        return [k for k, q in self.links.items() if q]

    def deliver(self, key: tuple[int, int], count: int = 1) -> None:
        """Deliver the next ``count`` events of a link as one read would:
        their frames go through one decoder call, which hands runs of plain
        messages to ``receive_run`` and the descriptors of each frame from
        one FIFO, exactly as the socket transport does."""
        link = self.links[key]
        events = [link.popleft() for _ in range(min(count, len(link)))]
        src, dst = key
        eng = self.engines[dst]
        node = self.engines[src].node_id
        fifo: deque[Any] = deque(f for _, fds in events for f in fds)

        def on_event(ev: Event) -> None:
            fds = [fifo.popleft() for _ in range(ev.nfds)] if isinstance(ev, MsgEvent) else []
            eng.receive(node, ev, fds)

        def on_data(port: bytes, seq: int, kind: int, body: bytes) -> None:
            eng.receive_data(node, port, seq, kind, body)

        def on_run(port: bytes, seq: int, bodies: list[bytes]) -> None:
            eng.receive_run(node, port, seq, bodies)

        FrameDecoder().feed_each(b"".join(encode_event(ev) for ev, _ in events), on_data, on_event, on_run)
        assert not fifo

    def run(self, rng: random.Random | None = None, limit: int = 1_000_000) -> None:
        """Deliver until quiet: whole links in order, or with ``rng`` a link
        at random and a random number of its events at a time."""
        for _ in range(limit):
            keys = self.pending()
            if not keys:
                return
            if rng is None:
                self.deliver(keys[0], len(self.links[keys[0]]))
            else:
                self.deliver(rng.choice(keys), rng.choice((1, 1, 2, 5, 40)))
        raise AssertionError("network did not settle")

    def kill(self, i: int, reason: str = "killed") -> None:
        """Engine i dies: its links vanish, the others are told."""
        self.dead.add(i)
        for k in list(self.links):
            if i in k:
                del self.links[k]
        nid = self.engines[i].node_id
        for j, e in enumerate(self.engines):
            if j not in self.dead:
                e.node_failed(nid, reason)

    def live_ports(self) -> int:
        return sum(len(e.ports) for j, e in enumerate(self.engines) if j not in self.dead)


def drain(p: Any) -> list[Any]:
    """Everything queued on ``p`` (stops at empty or at the end of the stream)."""
    out = []
    while True:
        try:
            out.append(p.try_recv())
        except (asyncio.QueueEmpty, ChannelClosed, PortFailed):
            return out


def end_of(p: Any) -> type[BaseException] | None:
    """What ``p`` raises once read: None while it is still open."""
    try:
        v = p.try_recv()
    except asyncio.QueueEmpty:
        return None
    except (ChannelClosed, PortFailed) as exc:
        return type(exc)
    raise AssertionError(f"unexpected message {v!r}")
