"""The port engine: every port's state and the port protocol, sans-IO.

This module's one job is the state machine of port ends: sequencing,
moving ports between nodes, failure rules and flow control (``Limits``).
It reads and writes no socket and runs no event loop: a node feeds it
decoded events and ships what it hands its ``Outbox``; values are turned
into bytes by a ``Codec`` it is given.

Rules of this module:

* Everything that changes a port's state lives here; the node only
  feeds events in (:meth:`Engine.receive`, :meth:`Engine.receive_data`,
  :meth:`Engine.node_failed`) and ships what the engine hands its
  :class:`Outbox`. No socket, no event loop.
* Each port end has a stream of *sequenced items* towards its peer: messages,
  ``CLOSE`` (the last item) and ``CHANGE_PEER``. Items carry per-port sequence
  numbers starting at 1 and are processed strictly in order through a reorder
  buffer, so items that took different paths (directly, or through a proxy)
  are never reordered, lost or duplicated.
* Moving a port (sending it inside a message to another node) works as in
  Mojo ports / openvmm ``mesh_node``: the old end becomes ``SENDING`` (it
  buffers what arrives), the receiving node materializes the new end, tells
  the old end where it is (``ARRIVED``) and tells the peer, as a sequenced
  item, to send there from now on (``CHANGE_PEER``). The peer answers the old
  end with the last sequence number it sent it (``PROXY_ACK``); the old end
  forwards everything up to that number (``PROXY``) and disappears.
* Every node that receives a message materializes the ports inside it, even
  when it only forwards the message: so each hop of a port in transit is a
  direct link, and a node that dies while holding a port in transit fails it
  (its sender sees the link break).
* A closed end stays in the table (a tombstone that discards messages and
  still answers ``CHANGE_PEER``) until the peer's ``CLOSE`` comes back: each
  side closes its half, so nothing is left behind on either node.

Port modes, and what each sequenced item does in it:

============  =========================  ===================  =================
item          OWNED                      SENDING              PROXY
============  =========================  ===================  =================
message       queue for the user         buffer               forward
CLOSE         peer closed; close back    buffer               forward; remove
CHANGE_PEER   repoint; PROXY_ACK old     buffer               forward
============  =========================  ===================  =================

What a ``PortState`` holds, per mode (``st.mode`` and its record
``st.move``, which ``Engine._process`` matches on) and per direction of
flow control (``st.tx``, ``st.rx``, each made when first needed):

============  =====================  ==========================================
record        when                   fields
============  =====================  ==========================================
(PortState)   always                 ids, peer, seqs, queue, pending, waker,
                                     closed/close_sent/peer_closed, error,
                                     lost/sent_lost, pinned, proxy_from,
                                     credit, posted; read by every send:
                                     sent_bytes, next_checkpoint_seq/bytes
None          OWNED                  (queued for the user)
Transit       SENDING                first_hop, buffer, pending_fail,
                                     proxy_last, relayed
Proxy         PROXY                  target_node/port, proxy_last, relayed
SendWindow    sent to another node   checkpoints, acked_seq, acked_bytes,
                                     want_all (None: not tracking)
RecvWindow    read from another one  unreported_n/bytes, report_all
============  =====================  ==========================================

Only this module assigns these fields (a test parses the other modules):
handles call ``took``, ``set_waker``, ``add_posted``, ``new_pair(pinned=)``;
the node and the control plane read ``stats()``.

Unsequenced events: ``ARRIVED`` (SENDING -> PROXY, flush the buffer),
``PROXY_ACK`` (a proxy may go once it has forwarded up to the given seq),
``PROXY_DONE`` (to the new end: its proxy owes it nothing more), ``FAIL``
(OWNED: failed, and echoed to the peer; SENDING: remember; PROXY: forward
and remove).

Failures (a node dies, so its links break):

* an end whose peer lived there fails;
* an end still fed by a proxy there (``proxy_from``, until ``PROXY_DONE``)
  has a hole in its stream that can never fill: it fails, and so does its
  peer;
* a port in transit through it, or a proxy forwarding to it, fails its peer
  and every peer-side proxy whose ``CHANGE_PEER`` it passed on (``relayed``),
  so none of them waits forever for an acknowledgement;
* a proxy whose peer lived there forwards the failure to its target.

An end whose ``CLOSE`` already went to its peer (it answered the peer's
close, or arrived flagged ``D_PEER_CLOSED`` with that close still on its way)
moves on as peer-closed too: it must not send a ``CHANGE_PEER`` to a peer
that is being removed (the peer's table would no longer know it, and the
"peer port is gone" notice would fail the end with its whole backlog).

Final messages (``K_REPLY``, ``K_REPLY_ERROR``) are the last item of their
port: the sender lets its end go as it sends one, the receiver treats it as
message + ``CLOSE`` and echoes nothing. An RPC answer is one frame.

Flow control (``Limits``): a sending end keeps (seq, bytes) of what it sent
to another node until the receiver reports it consumed (``CONSUMED``,
unsequenced, a cumulative sequence number, every quarter window); a local
receiver's queue length is the count itself. ``drain`` waits while over the
window; ``send`` raises ``BufferFull`` at the hard limit. A reorder buffer
beyond the hard limit plus ``MAX_REORDER`` fails that port, not the link.

* A report of more than was sent is a ``ProtocolError`` (the link goes):
  forged credit cannot open a window. Credit that is merely claimed early
  cannot grow our memory either: ``drain`` also waits while the peer's link
  holds more than ``link_buffer_bytes`` unwritten, and ``send`` raises
  ``BufferFull`` past ``link_max_bytes`` (``Outbox.backlog``).
* A message larger than the byte limit goes once everything before it was
  consumed: the refused send asks the receiver for an exact report
  (``CONSUMED`` with ``CONSUMED_POLL``); it answers now and again when its
  queue runs empty, and ``drain`` waits for exactly that.
* Ports inside a message count ``PORT_BYTES`` each plus their unread
  backlog; a compact call counts the port it makes at the callee.
* A moving port re-forwards its whole unread backlog at every hop (the old
  end buffers it, then proxies it to the new end): n hops of a backlog of b
  items cost n * b forwards. It is bounded, not avoided: b is at most what
  its producer may leave unconsumed (``max_messages``/``max_bytes``; a
  producer that drains keeps it under the window), and each carrying message
  counts that backlog against its own sender's window, so holders that
  drain before passing it on are paced by the consumer.
* Every item is sent before it takes its sequence number (an outbox that
  refuses it, say while making an out-of-band body, raises ``MessageError``
  and leaves no gap).

Losses are never silent, and they have a direction. An end whose incoming
stream has a hole (a proxy feeding it died, items wait beyond a dead hop, the
peer overran it) is marked ``lost``: a merged receiver raises its failure in
order instead of dropping that sender quietly. An end whose sent items may
not have arrived (its peer says so, its peer's path through a dead node
broke, or it sent items not yet reported consumed to a node that died) is
marked ``sent_lost``: its next ``send`` raises. Failure causes carry the
mark as seen by the end that gets them (``LOST``/``UNDELIVERED``), and an
end passing a failure on to its peer swaps it.

Calls other threads make on an end (sends, close) wait on that end
(``PortState.posted``) until its engine's thread runs them; it runs them
before the end closes or moves, so neither overtakes an accepted send.

A shortcut: an end whose peer is *pinned* (an RPC reply port, which never
moves) travels as ``D_DIRECT``: the peer is repointed at once and the new
end needs no proxy, ``ARRIVED`` or ``CHANGE_PEER``. It is safe only because
nobody but the pinned peer can learn the new address before the carrying
message arrives, and the peer's own items follow it on the same link.
"""

from __future__ import annotations

import enum
import functools
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

from ._errors import (
    BufferFull,
    ChannelClosed,
    MeshError,
    MessageError,
    NodeFailure,
    PortFailed,
    ProtocolError,
)
from ._ids import ID_LEN, PortId, random_id
from ._trace import prefix, when_tracing
from ._wire import (
    CALL_HEAD,
    D_DEAD,
    D_DIRECT,
    D_PEER_CLOSED,
    F_TRACE,
    K_CALL,
    K_DATA,
    K_ERROR,
    K_REPLY,
    MAX_FDS_PER_MESSAGE,
    MAX_OOB_BODY,
    MAX_PORTS_PER_MESSAGE,
    MAX_REORDER,
    OOB_THRESHOLD,
    TRACE_PREFIX_LEN,
    ArrivedEvent,
    ChangePeerEvent,
    CloseEvent,
    ConsumedEvent,
    Event,
    FailEvent,
    MsgEvent,
    PortDesc,
    ProxyAckEvent,
    ProxyDoneEvent,
)


class PortMode(enum.IntEnum):
    """Where a port end is in its life (see the table above). An ``IntEnum``
    (modes compare as ints elsewhere); every mode a ``PortState`` holds is a
    member, so this module tests modes by identity (``is``): on the hot
    paths that is cheaper than ``==``, which Python does not specialize for
    an int subclass."""

    #: held here: messages are queued for the user
    OWNED = 0
    #: sent inside a message, not yet arrived: what comes is buffered
    SENDING = 1
    #: arrived elsewhere: what comes is forwarded to the new end
    PROXY = 2


OWNED: Final = PortMode.OWNED
SENDING: Final = PortMode.SENDING
PROXY: Final = PortMode.PROXY

#: the first sequence number of each direction of a port
_FIRST_SEQ: Final = 1
#: "no node / no port": an id no random id equals
_NO_ID: Final = bytes(ID_LEN)
#: consumption is reported to a remote sender every this fraction of a window
ACK_FRACTION: Final = 4
#: a sender notes its byte count every this fraction of the byte window
CHECKPOINT_FRACTION: Final = 8


@dataclass(frozen=True)
class Limits:
    """Flow-control bounds of one port end, per direction.

    A sending end counts what it sent that the receiver has not consumed yet
    (read by the application, or held unread in the receiver's queue):

    * ``drain()`` waits while that exceeds ``window_messages`` or
      ``window_bytes``;
    * ``send`` raises :class:`BufferFull` once it reaches ``max_messages`` or
      ``max_bytes`` (a producer that never drains gets an error, never
      unbounded memory).

    Bytes are encoded body bytes and count only towards another process (a
    local message is not serialized); messages count everywhere. The
    receiver reports consumption in batches of a quarter window, so the
    credit traffic is one small frame per quarter window. A port carried
    inside a message counts ``PORT_BYTES`` plus the bytes of its unread
    backlog (which travels with it).

    Consumption reports are the peer's word; what we hold for one peer node
    is also bounded by what we can see ourselves, its link's unsent write
    buffer (a peer that stops reading cannot make us queue more, whatever
    it reports):

    * ``drain()`` also waits while that buffer holds more than
      ``link_buffer_bytes``;
    * ``send`` raises :class:`BufferFull` while it holds more than
      ``link_max_bytes``.

    A report of more than was sent on a port is a protocol error: the link
    to that peer is dropped.
    """

    window_messages: int = 2048
    window_bytes: int = 2 * 1024 * 1024
    max_messages: int = 262144
    max_bytes: int = 64 * 1024 * 1024
    #: unsent bytes on one peer's link above which ``drain()`` waits
    link_buffer_bytes: int = 8 * 1024 * 1024
    #: unsent bytes on one peer's link at which ``send`` raises ``BufferFull``
    link_max_bytes: int = 128 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.window_messages <= self.max_messages:
            raise ValueError("need 1 <= window_messages <= max_messages")
        if not 1 <= self.window_bytes <= self.max_bytes:
            raise ValueError("need 1 <= window_bytes <= max_bytes")
        if not 1 <= self.link_buffer_bytes <= self.link_max_bytes:
            raise ValueError("need 1 <= link_buffer_bytes <= link_max_bytes")


DEFAULT_LIMITS: Final = Limits()
#: A sender notes how many bytes it had sent every this many messages (or
#: window/8 bytes): consumption reports are matched against these notes.
CHECKPOINT_MESSAGES: Final = 64
#: What a port carried inside a message counts towards the byte window (on
#: top of its unread backlog): about what its state costs the receiver.
PORT_BYTES: Final = 1024
#: ``CONSUMED`` with this sequence number asks the receiver for an exact
#: report (a sender holds a message larger than its window until every
#: earlier one was consumed); no real report is 0 (it follows a read).
CONSUMED_POLL: Final = 0
#: A failure's cause starts with one of these when items were lost, as seen
#: by the end that gets it: LOST, items on their way *to* it (a hole in what
#: it receives: even a merged receiver must report it); UNDELIVERED, items it
#: *sent* (its next send raises). An end passes a failure on to its peer
#: with the other one.
LOST: Final = "messages in transit were lost"
UNDELIVERED: Final = "messages sent on this port were lost"


def _unmarked(cause: str) -> str:
    """``cause`` without a leading LOST/UNDELIVERED."""
    for mark in (LOST, UNDELIVERED):
        if cause.startswith(mark + ": "):
            return cause[len(mark) + 2 :]
    return cause
#: Ports that arrived failed (``D_DEAD | D_PEER_CLOSED``) whose cause may
#: still come (the sender follows the carrying message with a ``FAIL`` naming
#: it, on the same link), and causes of ends that failed lately (for a
#: ``CHANGE_PEER`` still on its way to them): each kept for this many.
MAX_DEAD_CAUSES: Final = 256


class Message:
    """One message as the engine holds it.

    Local messages keep the sender's object (``obj``) untouched: nothing is
    serialized inside a process. Messages from another node hold ``body``
    bytes plus the ports and descriptors that arrived with them.
    """

    __slots__ = ("body", "fds", "kind", "obj", "ports")

    def __init__(
        self,
        kind: int,
        obj: Any = None,
        body: bytes | None = None,
        ports: list[PortState] | None = None,
        fds: list[Any] | None = None,
    ) -> None:
        self.kind = kind
        self.obj = obj
        self.body = body
        self.ports = ports
        self.fds = fds


class TracedMessage(Message):
    """A message that carries a trace context (``_wire.F_TRACE``): its
    ``TRACE_PREFIX_LEN`` bytes as they came (``_trace.parse_prefix`` checks
    them where the message is read). A message without one is a plain
    ``Message``: nothing per message is added to the common case. Only the
    end a message is sent to reads it: forwarded on (a proxy, a gateway's
    relay), a message goes without its context."""

    __slots__ = ("trace",)

    def __init__(
        self,
        kind: int,
        obj: Any,
        body: bytes | None,
        ports: list[PortState] | None,
        fds: list[Any] | None,
        trace: bytes,
    ) -> None:
        super().__init__(kind, obj, body, ports, fds)
        self.trace = trace


#: a received plain K_DATA message (a C-level call per message in a run)
_data_message: Final = functools.partial(Message, K_DATA, None)


class _CloseItem:
    __slots__ = ()


_CLOSE: Final = _CloseItem()


class _ChangePeer:
    __slots__ = ("new_node", "new_port", "old_node", "old_port")

    def __init__(self, new_node: bytes, new_port: bytes, old_node: bytes, old_port: bytes) -> None:
        self.new_node = new_node
        self.new_port = new_port
        self.old_node = old_node
        self.old_port = old_port


Item = Message | _CloseItem | _ChangePeer


class Codec(Protocol):
    """What the engine needs from the channel layer to ship local objects."""

    def encode(
        self, engine: Engine, obj: Any, carrier: PortState | None = None
    ) -> tuple[bytes, list[PortState], list[Any]]:
        """Encode a local value; ``carrier`` is the port it is sent on, which
        it must not contain (``MessageError``)."""
        ...

    def dispose(self, obj: Any, reason: str | None = None) -> None:
        """Close the resources in a local value (fail its ports with
        ``reason`` if one is given)."""
        ...

    def encode_error(self, exc: BaseException) -> bytes: ...

    def encode_plain(self, obj: Any) -> bytes | None:
        """Encode a value without ports or fds; None if it has any (or a
        type only the full encoder can judge)."""
        ...


class Transit:
    """What only a ``SENDING`` end holds (``PortState.move``): it was sent
    inside a message and has not arrived yet."""

    __slots__ = ("buffer", "first_hop", "pending_fail", "proxy_last", "relayed")

    def __init__(self, first_hop: bytes, buffer: list[tuple[int, Item]] | None) -> None:
        #: the node the carrying message went to (it fails the port if it dies)
        self.first_hop = first_hop
        #: sequenced items that arrived meanwhile, forwarded on ARRIVED
        self.buffer = buffer
        #: a failure that came meanwhile, passed on to the new end on ARRIVED
        self.pending_fail: str | None = None
        #: the peer's PROXY_ACK (the last seq it sent here), if it came first
        self.proxy_last: int | None = None
        #: proxies of the other side whose CHANGE_PEER this end passed on
        #: (they wait for an acknowledgement that a failure may swallow)
        self.relayed: list[tuple[bytes, bytes]] | None = None


class Proxy:
    """What only a ``PROXY`` end holds (``PortState.move``): it arrived
    elsewhere and forwards what still comes here."""

    __slots__ = ("proxy_last", "relayed", "target_node", "target_port")

    def __init__(self, target_node: bytes, target_port: bytes, transit: Transit) -> None:
        #: the new end
        self.target_node = target_node
        self.target_port = target_port
        #: forward up to this seq, then go (None: no PROXY_ACK yet)
        self.proxy_last = transit.proxy_last
        #: as ``Transit.relayed``
        self.relayed = transit.relayed


class SendWindow:
    """Flow control of the sending direction towards another node
    (``PortState.tx``; None while not tracking: nothing sent to another node
    yet, or the peer is local, whose queue is the count). Sequence numbers
    count messages (``acked_seq``: the last one reported consumed); bytes are
    cumulative (``PortState.sent_bytes``), known consumed at checkpoints
    (``checkpoints``: (seq, sent_bytes before it)) taken every
    ``CHECKPOINT_MESSAGES`` or window/8 bytes, so a send costs an addition
    and a comparison (the fields each send reads stay on ``PortState``)."""

    __slots__ = ("acked_bytes", "acked_seq", "checkpoints", "want_all")

    def __init__(self, acked_seq: int, acked_bytes: int) -> None:
        self.checkpoints: deque[tuple[int, int]] = deque()
        self.acked_seq = acked_seq
        self.acked_bytes = acked_bytes
        #: a send was refused for a message larger than the window: drain()
        #: waits until everything sent before it was consumed
        self.want_all = False


class RecvWindow:
    """Flow control of the receiving direction from another node
    (``PortState.rx``; made by the first report or poll): what was consumed
    since the last ``CONSUMED`` report."""

    __slots__ = ("report_all", "unreported_bytes", "unreported_n")

    def __init__(self) -> None:
        self.unreported_n = 0
        self.unreported_bytes = 0
        #: the sender asked for an exact report: one more once the queue is empty
        self.report_all = False


#: The queue of an end that nothing was queued on yet: one shared empty
#: sequence instead of an empty deque each (about 600 bytes: an idle channel
#: pair held four, and an RPC's callee end never queues anything). It reads
#: as an empty deque (truth, ``len``, iteration); the only places that add
#: to a queue (``Engine._enqueue``, ``receive_data``, ``receive_run``) put a
#: deque in its place first, and nothing else mutates an empty queue.
NO_QUEUE: Final = cast("deque[Message]", ())


class PortState:
    """One port end as its engine knows it (see the layout table at the top
    of this module). Only this module assigns its fields."""

    __slots__ = (
        "__weakref__",
        "close_sent",
        "closed",
        "credit",
        "engine",
        "error",
        "id",
        "lost",
        "mode",
        "move",
        "next_checkpoint_bytes",
        "next_checkpoint_seq",
        "peer_closed",
        "peer_node",
        "peer_port",
        "pending",
        "pinned",
        "posted",
        "proxy_from",
        "queue",
        "recv_seq",
        "relay",
        "rx",
        "send_seq",
        "sent_bytes",
        "sent_lost",
        "tx",
        "waker",
    )

    def __init__(self, engine: Engine, id: bytes, peer_node: bytes, peer_port: bytes) -> None:
        self.id = id
        self.engine = engine
        self.mode: PortMode = OWNED
        #: the mode's own record: None (OWNED), Transit (SENDING), Proxy (PROXY)
        self.move: Transit | Proxy | None = None
        self.peer_node = peer_node
        self.peer_port = peer_port
        self.send_seq = _FIRST_SEQ
        self.recv_seq = _FIRST_SEQ
        self.pending: dict[int, Item] | None = None
        self.queue: deque[Message] = NO_QUEUE  # a deque from the first message on
        # called when the queue turns non-empty and when the stream ends
        # (not per message: a holder drains the queue once woken)
        self.waker: Callable[[], None] | None = None
        self.closed = False  # the user closed this end
        self.close_sent = False  # our CLOSE is on its way to the peer
        self.peer_closed = False  # the peer's CLOSE was processed
        self.error: PortFailed | None = None
        # the failure may have lost items of the stream towards this end (see
        # LOST: a merged receiver reports it), or items this end sent (see
        # UNDELIVERED: its next send raises)
        self.lost = False
        self.sent_lost = False
        # an end the library never moves (RPC reply ports): see _send_port
        self.pinned = False
        # a gateway's relay end (``_gateway``): what is sent to it crosses a
        # boundary link, so a local send is encoded at once and may carry no fd
        self.relay = False
        # node of the proxy still forwarding items to this end (until PROXY_DONE)
        self.proxy_from: bytes | None = None
        # flow control, sending side: read by every send, so kept here (the
        # rest is in ``tx``): bytes sent so far, and the next checkpoint at
        # this seq... or once sent_bytes reaches this
        self.tx: SendWindow | None = None
        self.sent_bytes = 0
        self.next_checkpoint_seq = 0
        self.next_checkpoint_bytes = 0
        # flow control, receiving side
        self.rx: RecvWindow | None = None
        # called when this end's window may have opened (or the port ended)
        self.credit: list[Callable[[], None]] | None = None
        # calls other threads accepted for this end (sends, close), run on
        # the engine's thread in order, and always before this end closes or
        # moves (Engine.run_posted); guarded by the engine's lock
        self.posted: deque[tuple[Callable[..., None], tuple[Any, ...]]] | None = None

    @property
    def ended(self) -> bool:
        """True when no further message can ever be queued here."""
        return self.peer_closed or self.error is not None or self.closed or self.mode is not OWNED

    def __repr__(self) -> str:
        mode = PortMode(self.mode).name
        peer = f"{self.peer_node.hex()[:6]}/{self.peer_port.hex()[:6]}"
        return f"<PortState {self.id.hex()[:8]} {mode} peer={peer}>"


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of an engine's ports (``Engine.stats()``): what a node's
    inspect tree and its shutdown read, without touching port state."""

    #: ends in the table
    total: int
    #: ends per state: "owned", "closing", "peer_closed", "failed" (owned
    #: ends), "sending", "proxy"
    by_state: dict[str, int]
    #: ends per node their peer lives on
    by_peer: dict[bytes, int]
    #: messages queued for the application, and the bytes of those that came
    #: from another process
    queued_messages: int
    queued_bytes: int
    #: sent to another node and not reported consumed yet (``in_flight``)
    in_flight_messages: int
    in_flight_bytes: int
    #: nodes the messages carrying ports in transit went to
    transit_hops: frozenset[bytes]
    #: nodes proxies forward to
    proxy_targets: frozenset[bytes]


class Outbox(Protocol):
    """Where the engine hands what must go to other nodes: the one interface
    between the port protocol and the node layer (which implements it).
    Frames for one destination must leave in the order they are handed."""

    def send_event(self, node: bytes, ev: Event, fds: list[Any]) -> None:
        """Ship any event to ``node``; ``fds`` travel with it."""
        ...

    def send_data(self, node: bytes, port: bytes, seq: int, kind: int, body: bytes) -> None:
        """Ship a plain message (no ports, no fds) to ``node``: the hot path,
        no event object."""
        ...

    def watch(self, node: bytes) -> None:
        """A port now depends on ``node``: connect to it (if not yet) and
        report its death through :meth:`Engine.node_failed`."""
        ...

    def backlog(self, node: bytes) -> int:
        """Bytes handed over for ``node`` that could not be written yet (the
        peer is not reading): what flow control sees without trusting the
        peer (``Limits.link_buffer_bytes``)."""
        ...

    def watch_backlog(self, node: bytes, below: int, fn: Callable[[], None]) -> None:
        """Call ``fn`` once (later, never inside this call) when the backlog
        of ``node`` is at most ``below`` bytes, or its link is gone."""
        ...


class DataLink(Protocol):
    """One node's link as the engine writes a plain message on it: the
    outbox's ``send_data`` for that node, one call shorter (``Engine.links``)."""

    def write_data(self, port: bytes, seq: int, kind: int, body: bytes) -> None:
        """Queue or write one plain message, in order with what went before."""
        ...


class _NoOutbox:
    """The outbox of an engine with no node: nothing can leave it."""

    def send_event(self, node: bytes, ev: Event, fds: list[Any]) -> None:
        raise MeshError("this engine has no connections; the port must first join a mesh node")

    def send_data(self, node: bytes, port: bytes, seq: int, kind: int, body: bytes) -> None:
        raise MeshError("this engine has no connections; the port must first join a mesh node")

    def watch(self, node: bytes) -> None:
        pass

    def backlog(self, node: bytes) -> int:
        return 0

    def watch_backlog(self, node: bytes, below: int, fn: Callable[[], None]) -> None:
        fn()


class _NullCodec:
    def encode(
        self, engine: Engine, obj: Any, carrier: PortState | None = None
    ) -> tuple[bytes, list[PortState], list[Any]]:
        raise MeshError("no codec")

    def dispose(self, obj: Any, reason: str | None = None) -> None:
        pass

    def encode_error(self, exc: BaseException) -> bytes:
        return b""

    def encode_plain(self, obj: Any) -> bytes | None:
        return None


class Engine:
    """A node's table of ports and the port protocol.

    What must reach another node goes to ``outbox`` (see :class:`Outbox`);
    an engine without one only serves ports whose both ends it holds.
    """

    def __init__(
        self,
        node_id: bytes,
        outbox: Outbox | None = None,
        codec: Codec | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.node_id = node_id
        self.limits = limits
        #: consumption reported to a remote sender in batches of a quarter window
        self.ack_every_n = max(1, limits.window_messages // ACK_FRACTION)
        self.ack_every_bytes = max(1, limits.window_bytes // ACK_FRACTION)
        self._max_n = limits.max_messages  # read per checkpoint: plain attributes
        self._max_b = limits.max_bytes
        self._link_max = limits.link_max_bytes
        self._checkpoint_every_bytes = max(1, limits.window_bytes // CHECKPOINT_FRACTION)
        #: the thread that drives this engine, and how to run a call there;
        #: None for an engine no event loop drives (then ``lock`` serializes
        #: every change made through the handles, from any thread)
        self.thread: int | None = None
        self.post: Callable[..., object] | None = None
        self.lock = threading.RLock()
        self.out: Outbox = outbox if outbox is not None else _NoOutbox()
        #: the outbox's live links by node, when it shares them (a node's
        #: table, kept by the node): a plain message to a linked node goes
        #: straight to its link's ``write_data`` (the hot path); a node not in
        #: it goes through ``out.send_data`` (queued while connecting, ...)
        self.links: Mapping[bytes, DataLink] = {}
        self.codec: Codec = codec if codec is not None else _NullCodec()
        self.ports: dict[bytes, PortState] = {}
        self._work: deque[tuple[bytes, int, Item]] = deque()
        # FAIL events naming the cause of failed ports in a message: sent
        # right after it (see _send_port), and where they are awaited
        self._after: list[tuple[bytes, FailEvent]] = []
        self._dead_causes: dict[bytes, PortState] = {}
        # ends that failed here lately (bounded): a CHANGE_PEER that finds
        # one gone answers with its cause, a later notice of a loss marks it
        self._failed: dict[bytes, PortState] = {}
        self._running = False
        #: called as ``unknown_port(src, port, seq, msg)`` for a message from
        #: node ``src`` (authenticated by its link) to a port id this engine
        #: does not hold; True if it took ``msg`` (its ports and fds), else the
        #: message is dropped. How a node opens its control session with the
        #: mesh root (``_control``): off the hot path, only for unknown ids.
        self.unknown_port: Callable[[bytes, bytes, int, Message], bool] | None = None
        self._handlers: dict[type, Callable[[bytes, Any, list[Any] | None], None]] = {
            CloseEvent: self._close_in,
            ChangePeerEvent: self._change_in,
            ArrivedEvent: self._arrived_in,
            ProxyAckEvent: self._proxy_ack_in,
            FailEvent: self._fail_in,
            ProxyDoneEvent: self._proxy_done_in,
            ConsumedEvent: self._consumed_in,
        }

    # ------------------------------------------------------------------ user side

    def new_pair(self, pinned: bool = False) -> tuple[PortState, PortState]:
        """Two ends peered with each other; ``pinned``: the first never
        moves (an RPC's reply end), so the second may travel without a proxy."""
        a = PortState(self, PortId.random(), self.node_id, b"")
        b = PortState(self, PortId.random(), self.node_id, a.id)
        a.peer_port = b.id
        a.pinned = pinned
        self.ports[a.id] = a
        self.ports[b.id] = b
        return a, b

    @staticmethod
    def set_waker(st: PortState, fn: Callable[[], None] | None) -> None:
        """Who to call when the queue of ``st`` turns non-empty or its stream
        ends (None: nobody)."""
        st.waker = fn

    @staticmethod
    def add_posted(st: PortState, fn: Callable[..., None], args: tuple[Any, ...]) -> bool:
        """Queue a call another thread accepted for ``st`` (under the engine's
        lock); True if it is the first, so a run must be posted."""
        q = st.posted
        if q is None:
            q = st.posted = deque()
        q.append((fn, args))
        return len(q) == 1

    @staticmethod
    def drop_posted(st: PortState) -> None:
        """Take back the call ``add_posted`` just queued (its run could not
        be posted; under the engine's lock)."""
        if st.posted:
            st.posted.pop()

    def close_remote(self) -> None:
        """Close every open owned end whose peer is on another node (a node
        shutting down in order: those peers see ``ChannelClosed``)."""
        for st in list(self.ports.values()):
            if st.mode is OWNED and not st.closed and st.peer_node != self.node_id:
                self.close(st)

    def new_bound(self, port_id: bytes, peer_node: bytes, peer_port: bytes) -> PortState:
        """One end of a pair whose other end another node creates with the
        ids swapped (how a spawned child or an invited node gets its first
        port: both sides learn the three ids from the invitation)."""
        if port_id in self.ports:
            raise MeshError("port id already in use")
        st = PortState(self, port_id, peer_node, peer_port)
        self.ports[port_id] = st
        if peer_node != self.node_id:
            self.out.watch(peer_node)
        return st

    def send_port(self, ps: PortState, dest: bytes) -> PortDesc:
        """Turn the end ``ps`` into a descriptor bound for node ``dest``,
        outside any message (an invitation's port; see ``materialize``)."""
        return self._send_port(ps, dest)

    def materialize(self, src: bytes, d: PortDesc) -> PortState:
        """The end the descriptor ``d`` from node ``src`` names, made here
        (the other half of ``send_port``)."""
        return self._materialize(src, d)

    def _send_value(
        self,
        st: PortState,
        kind: int,
        obj: Any,
        body: bytes | None = None,
        force: bool = False,
        extra: int = 0,
        trace: bytes | None = None,
    ) -> None:
        """Send ``obj`` from ``st``: the one way in for a value. ``body`` is its
        encoding without ports or fds, made by the caller (``Codec.encode_plain``,
        on the caller's thread) when the peer was on another node, else None.
        Shipped as it is when the peer is on another node and this end is
        owned and open: size limit, flow-control count, the outbox, and only
        then the sequence number (a message that could not be queued leaves
        no gap); else ``obj`` goes as a message (``send``: a local peer gets
        the object, a value with ports or fds takes the full encoder).
        ``force`` skips the hard limit (a send from another thread, admitted
        there); ``extra``: bytes it counts beyond its body. ``trace``: a
        context prefix (``_trace.prefix``) the message carries (``F_TRACE``)
        to a peer here or on another node, unless its body goes out of band."""
        node = st.peer_node
        if (
            body is None
            or node == self.node_id
            or st.mode is not OWNED
            or st.closed
            or st.peer_closed
            or st.error is not None
        ):
            msg = Message(kind, obj) if trace is None else TracedMessage(kind, obj, None, None, None, trace)
            self.send(st, msg, force)
            return
        n = len(body)
        if n > MAX_OOB_BODY:
            raise MessageError(f"a message of {n} bytes exceeds the limit of {MAX_OOB_BODY}")
        n += extra
        seq = st.send_seq
        if (seq >= st.next_checkpoint_seq or st.sent_bytes + n >= st.next_checkpoint_bytes) and (
            kind < K_REPLY or st.tx is not None
        ):
            # (the first message of an end is never over a limit: a final one,
            # an RPC reply, whose end goes with it, starts no tracking)
            self._checkpoint(st, seq, n, force)  # may raise BufferFull
        try:
            if trace is None or n + TRACE_PREFIX_LEN >= OOB_THRESHOLD:
                link = self.links.get(node)
                if link is not None:
                    link.write_data(st.peer_port, seq, kind, body)
                else:
                    self.out.send_data(node, st.peer_port, seq, kind, body)
            else:
                ev = MsgEvent(st.peer_port, seq, kind, F_TRACE, [], 0, trace + bytes(body))
                self.out.send_event(node, ev, [])
        except OSError as exc:  # making its out-of-band body, say: nothing was queued
            raise MessageError(f"the message could not be queued: {exc}") from exc
        st.send_seq = seq + 1
        st.sent_bytes += n

    #: every message sent (``_send_value``); once a context may be set, the
    #: one that looks for it (``_send_value_traced``: ``_trace.when_tracing``)
    send_value = _send_value

    def _send_value_traced(
        self,
        st: PortState,
        kind: int,
        obj: Any,
        body: bytes | None = None,
        force: bool = False,
        extra: int = 0,
        trace: bytes | None = None,
    ) -> None:
        """``send_value`` in a process where a context may be set: a message
        sent while one is (``_trace.prefix``) carries it."""
        self._send_value(st, kind, obj, body, force, extra, prefix() if trace is None else trace)

    def send(self, st: PortState, msg: Message, force: bool = False) -> None:
        """Send ``msg`` from the end ``st``. Dropped silently once the peer is
        gone (as a socket write to a closed peer would be); raises
        ``ChannelClosed`` if this end was closed or sent away, ``BufferFull``
        at the flow-control hard limit, ``MessageError`` for a value that
        cannot go to another process (nothing is queued then)."""
        if st.closed or st.mode is not OWNED:
            self.dispose(msg)
            raise ChannelClosed("send on a port that was closed or sent away")
        if st.peer_closed or st.error is not None:
            self.dispose(msg, None if st.error is None else st.error.cause)
            if st.sent_lost and st.error is not None:
                raise st.error  # what this end sent may not have arrived: say so
            return
        node = st.peer_node
        if node != self.node_id:
            if not force and self.over_hard_limit(st):
                self.dispose(msg)
                raise self._full(st)
            # encode before taking the sequence number: a value that cannot be
            # encoded raises here and leaves no gap in the stream
            seq = st.send_seq
            if msg.body is None:
                msg = self.encode_message(msg, st)
            n = len(msg.body or b"")
            if msg.ports:
                n += self._carried_bytes(msg.ports)
            ev, fds = self._event_for(node, st.peer_port, seq, msg, strict=True)
            if seq >= st.next_checkpoint_seq or st.sent_bytes + n >= st.next_checkpoint_bytes:
                self._checkpoint(st, seq, n, True)
            try:
                self.out.send_event(node, ev, fds)
            except (OSError, MessageError, BufferFull) as exc:
                self._after.clear()
                self._unsent(msg, exc)
            st.send_seq = seq + 1
            st.sent_bytes += n
            if self._after:
                self._send_after()
            return
        target = self.ports.get(st.peer_port)
        if target is not None and target.mode is OWNED:
            if not force and len(target.queue) >= self.limits.max_messages and not target.closed:
                self.dispose(msg)
                raise self._full(st)
            if target.relay and msg.body is None:
                msg = self._crossing(msg, st)  # it leaves the host: encoded now
            seq = st.send_seq
            if not target.closed and seq == target.recv_seq and not target.pending:
                # hot path: a local peer waiting in order
                st.send_seq = seq + 1
                target.recv_seq = seq + 1
                self._enqueue(target, msg)
                return
        elif target is not None:
            # the peer is on its way to another process: whatever goes there
            # is encoded here, so an unsendable value fails this send, and
            # counts towards the window (the peer's new end reports to us)
            if not force and self.over_hard_limit(st):
                self.dispose(msg)
                raise self._full(st)
            if msg.body is None and msg.obj is not None:
                msg = self.encode_message(msg, st)
            seq = st.send_seq
            n = len(msg.body or b"")
            if seq >= st.next_checkpoint_seq or st.sent_bytes + n >= st.next_checkpoint_bytes:
                self._checkpoint(st, seq, n, True)
            st.send_seq = seq + 1
            st.sent_bytes += n
            self._route(node, st.peer_port, seq, msg)
            return
        seq = st.send_seq
        st.send_seq = seq + 1
        self._route(node, st.peer_port, seq, msg)

    @staticmethod
    def _carried_bytes(states: list[PortState]) -> int:
        """What the ports in a message count towards the byte window: each
        ``PORT_BYTES`` plus the unread backlog that travels with it (so a
        port that moves on at every hop re-sends a bounded backlog)."""
        n = 0
        for ps in states:
            n += PORT_BYTES
            for m in ps.queue:
                n += len(m.body or b"")
        return n

    def _unsent(self, msg: Message, exc: OSError | MessageError | BufferFull) -> None:
        """The outbox refused a message whose ports were already turned into
        descriptors (an out-of-band body could not be made, or too many are
        in flight): nothing was queued, so fail those ports with the cause and
        raise ``exc`` (an ``OSError`` as ``MessageError``)."""
        reason = f"the message carrying this port could not be sent: {exc}"
        for ps in msg.ports or ():
            mv = ps.move
            if type(mv) is Transit and self.ports.get(ps.id) is ps:
                self._fail_other_side(ps, mv, _NO_ID, reason)
                self._remove(ps)
        for fd in msg.fds or ():
            fd.close()
        if not isinstance(exc, OSError):
            raise exc
        raise MessageError(f"the message could not be queued: {exc}") from exc

    def call_plain(
        self, st: PortState, body: bytes | bytearray, trace: bytes | None = None
    ) -> PortState | None:
        """Send an RPC request whose encoded value is ``body`` from ``st`` to
        its peer on another node, in one frame that names the reply port by
        id (no port descriptor). A ``bytearray`` body has ``CALL_HEAD`` bytes
        of room at its front for that head (``_codec.encode_call``: a large
        request is not copied once more to prepend it). Returns the caller's reply end (pinned: it
        never moves), or None when this shortcut does not apply (the peer is
        local, moving, or gone; the caller then takes the general path).
        ``trace``: a context the request carries (``send_value``)."""
        node = st.peer_node
        if (
            node == self.node_id
            or st.mode is not OWNED
            or st.closed
            or st.peer_closed
            or st.error is not None
        ):
            return None
        reply_id, callee_end = random_id(), random_id()
        # the head names both reply ends; if the send raises, nothing is registered
        # the callee gets a port state for it: counted like a carried port
        if isinstance(body, bytes):
            self.send_value(st, K_CALL, None, callee_end + reply_id + body, False, PORT_BYTES, trace)
        else:  # room at its front for the head (a bytearray, or a _wire.Gather)
            body[:CALL_HEAD] = callee_end + reply_id
            # it goes where bytes go (length, buffer protocol); nothing keeps or changes it
            self.send_value(st, K_CALL, None, cast(bytes, body), False, PORT_BYTES, trace)
        reply = PortState(self, reply_id, node, callee_end)
        reply.pinned = True
        self.ports[reply_id] = reply
        return reply

    def _call_in(self, src: bytes, body: bytes, trace: bytes | None = None) -> Message:
        """A compact RPC request from ``src``: make the callee's reply end
        (``trace``: the context it carried)."""
        if len(body) < CALL_HEAD:
            raise ProtocolError("RPC request without its reply port")
        # bytes, never views: a large body may be a mapping (_transport._map_body)
        new_id, caller_port = bytes(body[:ID_LEN]), bytes(body[ID_LEN:CALL_HEAD])
        if new_id in self.ports:
            raise ProtocolError("RPC request reuses a live port id")
        reply = PortState(self, new_id, src, caller_port)
        self.ports[new_id] = reply
        # a large request is not copied again to drop its head: decoders and
        # links take the view as they take bytes
        rest = body[CALL_HEAD:] if len(body) < OOB_THRESHOLD else cast(bytes, memoryview(body)[CALL_HEAD:])
        if trace is not None:
            return TracedMessage(K_CALL, None, rest, [reply], None, trace)
        return Message(K_CALL, None, rest, [reply])

    def send_final(self, st: PortState, kind: int, obj: Any, body: bytes | None = None) -> None:
        """Send the last message of this end (a final kind, an RPC reply; its
        ``body`` as for ``send_value``) and let the end go at once: the peer
        ends its stream on that message, so no CLOSE is sent and none comes
        back."""
        try:
            self._send_value(st, kind, obj, body)  # an answer carries no context
        except PortFailed:
            pass  # the caller is gone (it learnt why): an answer to nobody is a no-op
        except BaseException:
            self.close(st)  # the peer learns the end the usual way
            raise
        if not st.closed:
            self._let_go(st)

    def _let_go(self, st: PortState) -> None:
        """``st`` sent its last item (a final kind): it goes now, and no
        CLOSE is sent or expected."""
        st.closed = True
        st.close_sent = True
        if st.queue:  # (the tests first: an RPC's reply end has neither)
            self._drop_queue(st)
        if st.credit:
            self._fire_credit(st)
        if st.mode is OWNED:
            self._remove(st)

    # ------------------------------------------------------- a gateway's relays

    @staticmethod
    def set_relay(st: PortState) -> None:
        """Mark ``st`` as a gateway's relay end (``_gateway``): sends to it
        from this node are encoded at once and refuse fds (``MessageError``)."""
        st.relay = True

    def _crossing(self, msg: Message, st: PortState) -> Message:
        """``msg``, sent from ``st`` to a relay end, encoded: a plain value
        at once, anything else by the full encoder, which refuses fds."""
        try:
            body = self.codec.encode_plain(msg.obj)
        except Exception:  # the full encoder below says what is wrong
            body = None
        if type(body) is bytes:
            return Message(msg.kind, None, body)
        return self.encode_message(msg, st, crossing=True)

    def take(self, st: PortState) -> Message | None:
        """The next queued message of ``st`` as it is held (not decoded), counted
        as consumed like a read; None if none is queued (a gateway forwarding
        what a relay end receives)."""
        q = st.queue
        if not q:
            return None
        msg = q.popleft()
        body = msg.body
        if body is not None:
            self.took(st, body)
        elif st.credit is not None:
            self.took(st, None)
        return msg

    def send_message(self, st: PortState, msg: Message, final: bool = False) -> None:
        """Send ``msg`` as it is held (encoded ``body`` and port states of this
        engine, as ``take`` gives them) from ``st``, past the hard limit (the
        caller bounds what it sends). ``final``: an RPC reply, the last item of
        ``st``, which goes with it (as ``send_final``)."""
        if not final:
            self.send(st, msg, True)
            return
        try:
            self.send(st, msg, True)
        except PortFailed:
            pass
        except BaseException:
            self.close(st)
            raise
        if not st.closed:
            self._let_go(st)

    def fail_with(self, st: PortState, err: PortFailed) -> None:
        """Close ``st`` abnormally: its peer fails with ``err`` itself when it
        is an end of this engine, with ``err.cause`` when on another node."""
        if st.closed or st.mode is not OWNED:
            return
        st.closed = True
        self._drop_queue(st)
        tell = st.error is None and not st.peer_closed
        self._remove(st)
        if tell:
            if st.peer_node == self.node_id:
                self._on_fail(st.peer_port, err)
            else:
                self.out.send_event(st.peer_node, FailEvent(st.peer_port, err.cause), [])
        self._fire_credit(st)

    def _finished(self, st: PortState) -> None:
        """A final message was queued on ``st``: its peer is gone, in order."""
        st.peer_closed = True
        st.close_sent = True  # nothing to answer: the peer let go already
        self._remove(st)
        if st.waker is not None:
            st.waker()

    def encode_message(
        self, msg: Message, carrier: PortState | None = None, crossing: bool = False
    ) -> Message:
        """``msg`` with its value encoded for another process. Raises
        ``MessageError`` (the value's own resources are closed) for a value
        that cannot be encoded, is nested too deep, is too large, carries too
        many resources or carries ``carrier``, the port it is sent on; or,
        ``crossing`` a boundary link (sent to a gateway's relay end), any fd."""
        try:
            body, states, fds = self.codec.encode(self, msg.obj, carrier)
        except MeshError:
            raise
        except (TypeError, ValueError, OverflowError, NotImplementedError, RecursionError) as exc:
            what = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
            raise MessageError(f"this value cannot be sent to another process: {what}") from None
        problem = None
        if crossing and fds:
            problem = (
                f"this message carries {len(fds)} fd(s) and its port's peer is across a boundary "
                "link to another host's mesh: an Fd cannot cross (nothing was sent)"
            )
        elif len(body) > MAX_OOB_BODY:
            problem = f"a message of {len(body)} bytes exceeds the limit of {MAX_OOB_BODY}"
        elif len(fds) > MAX_FDS_PER_MESSAGE or len(states) > MAX_PORTS_PER_MESSAGE:
            problem = (
                f"a message may carry at most {MAX_FDS_PER_MESSAGE} fds and "
                f"{MAX_PORTS_PER_MESSAGE} ports (got {len(fds)} and {len(states)})"
            )
        else:
            try:
                for ps in states:
                    self._encode_queued(ps)
            except MessageError as exc:
                problem = f"a port in this message holds a message that cannot move: {exc}"
        if problem is not None:
            for f in fds:
                f.close()
            for ps in states:
                ps.engine.close(ps)
            raise MessageError(problem)
        if crossing:
            for ps in states:
                ps.relay = True  # it will be a relay end: sends to it cross too
        return Message(msg.kind, None, body, states or None, fds or None)

    def _encode_queued(self, ps: PortState) -> None:
        """Encode the local messages queued on ``ps`` before it leaves this
        process (raises ``MessageError`` for one that cannot go)."""
        q = ps.queue
        for i, m in enumerate(q):
            if m.body is None:
                q[i] = self.encode_message(m, ps)
        if ps.pending:
            for seq, item in list(ps.pending.items()):
                if isinstance(item, Message) and item.body is None:
                    ps.pending[seq] = self.encode_message(item, ps)

    def _full(self, st: PortState) -> BufferFull:
        unsent = self.out.backlog(st.peer_node) if st.peer_node != self.node_id else 0
        if unsent >= self._link_max:
            return BufferFull(
                f"{unsent} bytes for node {st.peer_node.hex()[:12]} are not written yet (limit "
                f"{self._link_max}): it is not reading; await drain() before sending more"
            )
        if st.tx is None:
            t = self.ports.get(st.peer_port)
            n = len(t.queue) if t is not None else 0
            return BufferFull(
                f"the receiver holds {n} unread messages (limit {self.limits.max_messages}); "
                "await drain() before sending more"
            )
        n, b = self.in_flight(st)
        return BufferFull(
            f"{n} messages ({b} bytes) sent to node {st.peer_node.hex()[:12]} are not "
            f"consumed yet (limits {self.limits.max_messages} messages, {self.limits.max_bytes} bytes); "
            "await drain() before sending more"
        )

    # ------------------------------------------------------------ flow control

    def over_hard_limit(self, st: PortState) -> bool:
        """Whether a send on ``st`` now would raise ``BufferFull``."""
        lim = self.limits
        if st.peer_node == self.node_id:
            t = self.ports.get(st.peer_port)
            if t is not None and t.mode is OWNED:
                return not t.closed and len(t.queue) >= lim.max_messages
        tx = st.tx
        if tx is None:
            return False
        return (
            st.send_seq - 1 - tx.acked_seq >= lim.max_messages
            or st.sent_bytes - tx.acked_bytes >= lim.max_bytes
            or self.out.backlog(st.peer_node) >= lim.link_max_bytes
        )

    def over_window(self, st: PortState) -> bool:
        """Whether ``st`` has more unconsumed messages or bytes in flight than
        its window (``drain`` waits while this is true)."""
        lim = self.limits
        if st.peer_node == self.node_id:
            t = self.ports.get(st.peer_port)
            if t is not None and t.mode is OWNED:
                return len(t.queue) > lim.window_messages
        tx = st.tx
        if tx is None:
            return False
        return (
            st.send_seq - 1 - tx.acked_seq > lim.window_messages
            or st.sent_bytes - tx.acked_bytes > lim.window_bytes
            or (tx.want_all and tx.acked_seq < st.send_seq - 1)
            or self.out.backlog(st.peer_node) > lim.link_buffer_bytes
        )

    def in_flight(self, st: PortState) -> tuple[int, int]:
        """Messages (sequenced items, to be exact) and bytes sent from ``st``
        to another node and not reported consumed yet."""
        tx = st.tx
        if tx is None:
            return 0, 0
        return st.send_seq - 1 - tx.acked_seq, st.sent_bytes - tx.acked_bytes

    def _checkpoint(self, st: PortState, seq: int, n: int, force: bool) -> None:
        """Before sending item ``seq`` of ``n`` bytes: start tracking, check
        the hard limit, note what "consumed through seq - 1" will mean in
        bytes."""
        tx = st.tx
        if tx is None:  # first send to another node (or first after a local spell)
            tx = st.tx = SendWindow(seq - 1, st.sent_bytes)
        elif not force:
            out_n = seq - 1 - tx.acked_seq
            out_b = st.sent_bytes - tx.acked_bytes
            if out_n >= self._max_n or (out_b + n > self._max_b and out_n):
                if out_n < self._max_n and not tx.want_all:
                    # this message alone is over the limit: it goes once every
                    # earlier one was consumed; consumption is reported in
                    # batches, so ask the receiver for an exact report now
                    tx.want_all = True
                    self._poll_consumed(st)
                raise self._full(st)
            if self.out.backlog(st.peer_node) >= self._link_max:
                raise self._full(st)
        tx.checkpoints.append((seq - 1, st.sent_bytes))
        st.next_checkpoint_seq = seq + CHECKPOINT_MESSAGES
        st.next_checkpoint_bytes = st.sent_bytes + n + self._checkpoint_every_bytes

    def watch_credit(self, st: PortState, fn: Callable[[], None]) -> None:
        """Call ``fn`` once when the window of ``st`` may have opened (also
        when the port ends or moves); the caller re-checks ``over_window``."""
        holder = st
        if st.peer_node == self.node_id:
            # a local receiver's queue is the window; it fires on reads, on its
            # removal (which our own close or failure also causes) and on moving
            t = self.ports.get(st.peer_port)
            if t is not None and t.mode is OWNED:
                holder = t
        elif self.out.backlog(st.peer_node) > self.limits.link_buffer_bytes:
            self.out.watch_backlog(st.peer_node, self.limits.link_buffer_bytes, fn)
        if holder.credit is None:
            holder.credit = []
        holder.credit.append(fn)

    @staticmethod
    def _fire_credit(st: PortState) -> None:
        fns = st.credit
        if fns:
            st.credit = None
            for fn in fns:
                fn()

    def took(self, st: PortState, body: bytes | None) -> None:
        """The application took a message (``body``: its bytes, None for a
        local one) from ``st``'s queue: count it, report consumption to a
        remote sender once a quarter window has gone (or at once, when it
        asked for an exact report and the queue ran empty), wake a local
        sender waiting in ``drain()``."""
        if body is not None:  # took_run(st, 1, len(body)), inlined: the per-message path
            rx = st.rx
            if rx is None:
                rx = st.rx = RecvWindow()
            n = rx.unreported_n = rx.unreported_n + 1
            b = rx.unreported_bytes = rx.unreported_bytes + len(body)
            if n >= self.ack_every_n or b >= self.ack_every_bytes:
                self._report_consumed(st)
            elif rx.report_all and not st.queue:  # its sender waits for an exact report
                rx.report_all = False
                self._report_consumed(st)
        if st.credit is not None and len(st.queue) <= self.limits.window_messages:
            self._fire_credit(st)

    def took_run(self, st: PortState, n: int, nbytes: int) -> None:
        """``took`` for a batch the application took at once from ``st``'s
        queue: ``n`` messages from another node, ``nbytes`` of bodies in all
        (and any number of local ones): the flow-control bookkeeping once."""
        if n:
            rx = st.rx
            if rx is None:
                rx = st.rx = RecvWindow()
            un = rx.unreported_n = rx.unreported_n + n
            ub = rx.unreported_bytes = rx.unreported_bytes + nbytes
            if un >= self.ack_every_n or ub >= self.ack_every_bytes:
                self._report_consumed(st)
            elif rx.report_all and not st.queue:  # its sender waits for an exact report
                rx.report_all = False
                self._report_consumed(st)
        if st.credit is not None and len(st.queue) <= self.limits.window_messages:
            self._fire_credit(st)

    def _poll_consumed(self, st: PortState) -> None:
        if st.peer_node != self.node_id:
            self.out.send_event(st.peer_node, ConsumedEvent(st.peer_port, CONSUMED_POLL), [])

    def _report_consumed(self, st: PortState) -> None:
        rx = st.rx
        if rx is not None:
            rx.unreported_n = rx.unreported_bytes = 0
        if (
            st.peer_node != self.node_id
            and st.mode is OWNED
            and not (st.closed or st.peer_closed or st.error is not None)
        ):
            # every item before the unread ones has been taken (or was not a message)
            consumed = st.recv_seq - 1 - len(st.queue)
            self.out.send_event(st.peer_node, ConsumedEvent(st.peer_port, consumed), [])

    def _on_consumed(self, port: bytes, seq: int) -> None:
        st = self.ports.get(port)
        if st is None or st.mode is not OWNED:
            return  # the sender moved on: its new end counts from its own first send
        if seq == CONSUMED_POLL:
            # our peer waits to send a message larger than its window: report
            # now, and again once the queue is empty
            rx = st.rx
            if rx is None:
                rx = st.rx = RecvWindow()
            if rx.unreported_n:
                self._report_consumed(st)
            rx.report_all = bool(st.queue)
            return
        if seq >= st.send_seq:
            # credit for items never sent: a peer that forges it would make
            # us queue without bound (Limits), so it is a broken peer
            raise ProtocolError(
                f"the peer reported item {seq} consumed on port {st.id.hex()[:8]}, "
                f"which has sent only {st.send_seq - 1}"
            )
        tx = st.tx
        if tx is None or seq <= tx.acked_seq:
            return
        tx.acked_seq = seq
        ck = tx.checkpoints
        if seq == st.send_seq - 1:
            # everything sent was consumed: so were all its bytes (the
            # checkpoints only know the bytes *before* the last one, which
            # would keep a message larger than the window counted forever)
            ck.clear()
            tx.acked_bytes = st.sent_bytes
            tx.want_all = False
        else:
            b = tx.acked_bytes
            while ck and ck[0][0] <= seq:
                b = ck.popleft()[1]
            tx.acked_bytes = b
        if st.credit is not None and not self.over_window(st):
            self._fire_credit(st)

    def run_posted(self, st: PortState) -> None:
        """Run, in order, the calls other threads accepted for ``st``
        (``PortState.posted``): when the loop gets to them, and before ``st``
        closes or moves, so a close or a move never overtakes them."""
        q = st.posted
        while q:
            with self.lock:
                if not q:
                    return
                fn, args = q.popleft()
            fn(*args)

    def close(self, st: PortState) -> None:
        """Close this end: the peer reads what is queued, then ``ChannelClosed``."""
        if st.posted:
            self.run_posted(st)
        if st.closed:
            return
        st.closed = True
        if st.queue:
            self._drop_queue(st)
        if st.credit:
            self._fire_credit(st)
        if st.mode is not OWNED or st.error is not None:
            return
        if not st.close_sent:
            st.close_sent = True
            self._route(st.peer_node, st.peer_port, st.send_seq, _CLOSE)
            st.send_seq += 1
        if st.peer_closed:
            self._remove(st)

    def fail(self, st: PortState, reason: str) -> None:
        """Close this end abnormally: the peer gets ``PortFailed(reason)``."""
        if st.closed or st.mode is not OWNED:
            return
        st.closed = True
        self._drop_queue(st)
        if st.error is None and not st.peer_closed:
            self._unsequenced(st.peer_node, FailEvent(st.peer_port, reason))
        self._remove(st)

    def adopt(self, st: PortState) -> None:
        """Move a local pair from another engine (the process's default one)
        into this engine, so one end can be sent to another node."""
        old = st.engine
        if old is self:
            return
        with old.lock:
            if st.mode is not OWNED or st.peer_node != old.node_id:
                raise MeshError("a port already bound to another mesh node cannot be sent through this one")
            peer = old.ports.get(st.peer_port)
            for s in (st, peer):
                if s is None:
                    continue
                s.engine = self
                if s.peer_node == old.node_id:
                    s.peer_node = self.node_id
                if old.ports.pop(s.id, None) is not None:
                    self.ports[s.id] = s

    def stats(self) -> EngineStats:
        """One walk over the table (see :class:`EngineStats`)."""
        by_state: dict[str, int] = {}
        by_peer: dict[bytes, int] = {}
        queued = queued_bytes = out_n = out_b = 0
        hops: set[bytes] = set()
        targets: set[bytes] = set()
        for st in list(self.ports.values()):
            mv = st.move
            if mv is None:
                if st.error is not None:
                    state = "failed"
                elif st.closed:
                    state = "closing"
                elif st.peer_closed:
                    state = "peer_closed"
                else:
                    state = "owned"
                n, b = self.in_flight(st)
                out_n += n
                out_b += b
            elif type(mv) is Transit:
                state = "sending"
                hops.add(mv.first_hop)
            elif type(mv) is Proxy:
                state = "proxy"
                targets.add(mv.target_node)
            else:
                continue
            by_state[state] = by_state.get(state, 0) + 1
            by_peer[st.peer_node] = by_peer.get(st.peer_node, 0) + 1
            queued += len(st.queue)
            queued_bytes += sum(len(m.body) for m in st.queue if m.body is not None)
        return EngineStats(
            len(self.ports), by_state, by_peer, queued, queued_bytes, out_n, out_b,
            frozenset(hops), frozenset(targets),
        )

    # ------------------------------------------------------------------ wire side

    def receive(self, src: bytes, ev: Event, fds: list[Any] | None = None) -> None:
        """Handle one event that arrived from node ``src``.

        Raises ``ProtocolError`` for events no correct peer sends; the caller
        then drops that connection.
        """
        if type(ev) is MsgEvent:  # the common event (plain data never gets here)
            self._msg_in(src, ev, fds)
            return
        handler = self._handlers.get(type(ev))
        if handler is None:
            raise ProtocolError(f"unexpected event {type(ev).__name__}")
        handler(src, ev, fds)

    # one handler per event type (a dict lookup, not an isinstance chain)

    def _msg_in(self, src: bytes, ev: MsgEvent, fds: list[Any] | None) -> None:
        ports = [self._materialize(src, d) for d in ev.ports] if ev.ports else None
        body, trace = ev.body, None
        if ev.flags & F_TRACE:  # (the decoder checked its length)
            trace, body = body[:TRACE_PREFIX_LEN], body[TRACE_PREFIX_LEN:]
        if ev.kind == K_CALL and not ports and not fds:
            msg = self._call_in(src, body, trace)
        elif trace is not None:
            msg = TracedMessage(ev.kind, None, body, ports, fds, trace)
        else:
            msg = Message(ev.kind, None, body, ports, fds)
        self._deliver(src, ev.port, ev.seq, msg)

    def _close_in(self, src: bytes, ev: CloseEvent, fds: list[Any] | None) -> None:
        self._work.append((ev.port, ev.seq, _CLOSE))
        self._run()

    def _change_in(self, src: bytes, ev: ChangePeerEvent, fds: list[Any] | None) -> None:
        self._work.append((ev.port, ev.seq, _ChangePeer(ev.new_node, ev.new_port, ev.old_node, ev.old_port)))
        self._run()

    def _arrived_in(self, src: bytes, ev: ArrivedEvent, fds: list[Any] | None) -> None:
        self._on_arrived(src, ev.port, ev.new_port)

    def _proxy_ack_in(self, src: bytes, ev: ProxyAckEvent, fds: list[Any] | None) -> None:
        self._on_proxy_ack(ev.port, ev.last_seq)

    def _fail_in(self, src: bytes, ev: FailEvent, fds: list[Any] | None) -> None:
        self._on_fail(ev.port, PortFailed(ev.reason))

    def _proxy_done_in(self, src: bytes, ev: ProxyDoneEvent, fds: list[Any] | None) -> None:
        st = self.ports.get(ev.port)
        if st is not None and st.proxy_from == src:
            st.proxy_from = None

    def _consumed_in(self, src: bytes, ev: ConsumedEvent, fds: list[Any] | None) -> None:
        self._on_consumed(ev.port, ev.seq)

    def _deliver(self, src: bytes, port: bytes, seq: int, msg: Message) -> None:
        st = self.ports.get(port)
        if st is None:
            hook = self.unknown_port
            if hook is None or not hook(src, port, seq, msg):
                self.dispose(msg)
            return
        if st.mode is OWNED and seq == st.recv_seq and not st.pending and not st.closed:
            st.recv_seq = seq + 1
            self._enqueue(st, msg)
            return
        self._work.append((port, seq, msg))
        self._run()

    def _enqueue(self, st: PortState, msg: Message) -> None:
        """Queue an in-order message for the holder of ``st``: the one place,
        but for ``receive_run``'s batch form of it."""
        q = st.queue
        if q is NO_QUEUE:
            q = st.queue = deque()
        q.append(msg)
        if msg.kind >= K_REPLY:
            self._finished(st)
        elif len(q) == 1 and st.waker is not None:
            st.waker()  # not per message: a holder drains the queue once woken

    def receive_data(self, src: bytes, port: bytes, seq: int, kind: int, body: bytes) -> None:
        """``receive`` for a plain message (no ports, no fds): the hot path."""
        if kind == K_CALL:
            msg = self._call_in(src, body)
            self._deliver(src, port, seq, msg)
            return
        st = self.ports.get(port)
        if st is not None and seq == st.recv_seq and not st.pending:
            if st.mode is OWNED and not st.closed:
                st.recv_seq = seq + 1
                if kind >= K_REPLY:
                    self._enqueue(st, Message(kind, None, body))
                    return
                # _enqueue of a message that is not final, inlined (a lone frame)
                q = st.queue
                if q is NO_QUEUE:
                    q = st.queue = deque()
                q.append(Message(kind, None, body))
                if len(q) == 1 and st.waker is not None:
                    st.waker()
                return
            # a port on the move: buffer or forward without event objects (a
            # moving port's backlog comes through here item by item)
            mv = st.move
            if type(mv) is Transit:
                st.recv_seq = seq + 1
                self._buffer(mv, seq, Message(kind, None, body))
                return
            if type(mv) is Proxy and mv.target_node != self.node_id:
                st.recv_seq = seq + 1
                try:
                    self.out.send_data(mv.target_node, mv.target_port, seq, kind, body)
                except (OSError, MessageError, BufferFull) as exc:
                    self._forward_failed(st, mv, exc)
                    return
                if kind >= K_REPLY or (mv.proxy_last is not None and seq >= mv.proxy_last):
                    self._proxy_done(st, mv)
                return
        self.receive(src, MsgEvent(port, seq, kind, 0, [], 0, body))

    def receive_run(self, src: bytes, port: bytes, seq: int, bodies: list[bytes]) -> None:
        """Plain ``K_DATA`` messages ``seq``, ``seq + 1``, ... for one port
        (what one read of a stream brings): queued in one step, the holder
        woken once; anything but an in-order owned end takes them one by one."""
        st = self.ports.get(port)
        if st is not None and seq == st.recv_seq and st.mode is OWNED and not st.pending and not st.closed:
            # _enqueue for a whole run, inlined (the path of a stream): K_DATA
            # is never final, so only the wakeup is left, once per run
            st.recv_seq = seq + len(bodies)
            q = st.queue
            if q is NO_QUEUE:
                q = st.queue = deque()
            woke = not q
            q.extend(map(_data_message, bodies))
            if woke and st.waker is not None:
                st.waker()
            return
        receive_data = self.receive_data
        for body in bodies:
            receive_data(src, port, seq, K_DATA, body)
            seq += 1

    def node_failed(self, node: bytes, reason: str) -> None:
        """``node`` is gone: fail every port that depends on it."""
        if node == self.node_id:
            return
        err = NodeFailure(node.hex(), reason)
        for st in list(self.ports.values()):
            mv = st.move
            if st.proxy_from == node:
                # items forwarded to this end through that node are lost: the
                # stream has a hole that can never fill, so both sides fail
                lost, undelivered = f"{LOST}: {err.cause}", f"{UNDELIVERED}: {err.cause}"
                match mv:
                    case None:
                        if st.peer_node != node and not st.peer_closed:
                            self._unsequenced(st.peer_node, FailEvent(st.peer_port, undelivered))
                        st.lost = True
                        self._fail_local(st, NodeFailure(node.hex(), f"{LOST}: {reason}"))
                    case Transit():
                        self._fail_other_side(st, mv, node, undelivered)
                        if mv.first_hop == node:
                            self._remove(st)
                        else:
                            mv.pending_fail = lost
                    case Proxy():
                        self._unsequenced(mv.target_node, FailEvent(mv.target_port, lost))
                        self._fail_other_side(st, mv, node, undelivered)
                        self._remove(st)
                continue
            match mv:
                case None:
                    if st.peer_node == node:
                        # items waiting in the reorder buffer came another way: the
                        # peer moved on (it is alive), and what it sent through the
                        # dead node before is lost; and what we sent there that
                        # was not reported consumed may be lost too
                        st.lost = bool(st.pending)
                        st.sent_lost = st.tx is not None and st.tx.acked_seq < st.send_seq - 1
                        self._fail_local(st, err)
                case Transit():
                    if mv.first_hop == node:
                        # the message carrying this port died with that node, and
                        # what its peer sent to it with it
                        self._fail_other_side(st, mv, node, f"{UNDELIVERED}: {err.cause}")
                        self._remove(st)
                    elif st.peer_node == node and mv.pending_fail is None:
                        mv.pending_fail = err.cause
                case Proxy():
                    if mv.target_node == node:  # what it forwarded there may be lost
                        self._fail_other_side(st, mv, node, f"{UNDELIVERED}: {err.cause}")
                        self._remove(st)
                    elif st.peer_node == node:
                        self._unsequenced(mv.target_node, FailEvent(mv.target_port, err.cause))
                        self._remove(st)
        self._run()

    # ------------------------------------------------------------------ internals

    def dispose(self, msg: Message, reason: str | None = None) -> None:
        """Drop a message nobody will read, closing the ports and fds in it
        (failing the ports with ``reason``, if given: they went to a peer
        that is gone abnormally, which is not an orderly close)."""
        if msg.obj is not None:
            self.codec.dispose(msg.obj, reason)
            return
        if msg.ports:
            for ps in msg.ports:
                if reason is None:
                    ps.engine.close(ps)
                else:
                    ps.engine.fail(ps, reason)
        if msg.fds:
            for fd in msg.fds:
                fd.close()

    def _drop_queue(self, st: PortState) -> None:
        while st.queue:
            self.dispose(st.queue.popleft())

    def _remove(self, st: PortState) -> None:
        if self.ports.get(st.id) is st:
            del self.ports[st.id]
        # items that can no longer be processed (only left on failure paths)
        left: list[Item] = []
        if st.pending:
            left.extend(st.pending.values())
        mv = st.move
        if type(mv) is Transit and mv.buffer:
            left.extend(item for _, item in mv.buffer)
            mv.buffer = None
        st.pending = None
        st.tx = None
        for item in left:
            self._abandon(item)
        if st.credit:  # (_fire_credit's test first: an RPC end has none)
            self._fire_credit(st)

    @staticmethod
    def _repoint(st: PortState, item: _ChangePeer) -> None:
        """A ``CHANGE_PEER`` reached an end in transit or proxying: its peer
        is now the new end, and the old one's proxy waits for an
        acknowledgement (``relayed``) that a failure may swallow."""
        st.peer_node = item.new_node
        st.peer_port = item.new_port
        mv = st.move
        if mv is not None:
            if mv.relayed is None:
                mv.relayed = []
            mv.relayed.append((item.old_node, item.old_port))

    @staticmethod
    def _buffer(mv: Transit, seq: int, item: Item) -> None:
        if mv.buffer is None:
            mv.buffer = []
        mv.buffer.append((seq, item))

    def _fail_other_side(self, st: PortState, mv: Transit | Proxy, dead: bytes, reason: str) -> None:
        """This end in transit or proxying broke: tell the peer, and every
        proxy of the peer's side still waiting on an acknowledgement."""
        targets = [(st.peer_node, st.peer_port), *(mv.relayed or ())]
        for node, port in dict.fromkeys(targets):
            if node != dead:
                self._unsequenced(node, FailEvent(port, reason))

    def _abandon(self, item: Item, port: bytes = _NO_ID) -> None:
        """Drop a sequenced item whose port (``port``, if known) is gone for good."""
        if isinstance(item, Message):
            self.dispose(item)
        elif isinstance(item, _ChangePeer):
            # the proxy waiting for our acknowledgement would wait forever;
            # tell it why the port went, if it failed (a loss must reach the
            # other side as a loss, not as "gone")
            gone = self._failed.get(port)
            reason = "the peer port is gone" if gone is None else self._cause_for_peer(gone)
            self._unsequenced(item.old_node, FailEvent(item.old_port, reason))

    def _forward_failed(self, st: PortState, mv: Proxy, exc: OSError | MessageError | BufferFull) -> None:
        """A proxy could not pass an item on (the outbox refused it: no
        descriptor for an out-of-band body, say): the stream has a hole that
        can never fill, so both sides fail, saying items were lost."""
        reason = f"a node forwarding them could not pass one on: {exc}"
        self._unsequenced(mv.target_node, FailEvent(mv.target_port, f"{LOST}: {reason}"))
        self._fail_other_side(st, mv, _NO_ID, f"{UNDELIVERED}: {reason}")
        self._remove(st)

    @staticmethod
    def _cause_for_peer(st: PortState) -> str:
        """The failure of ``st`` as its peer must see it: what ``st`` did not
        receive, the peer sent (UNDELIVERED), and the other way round (LOST)."""
        cause = _unmarked(st.error.cause) if st.error is not None else "the peer port is gone"
        if st.lost:
            return f"{UNDELIVERED}: {cause}"
        if st.sent_lost:
            return f"{LOST}: {cause}"
        return cause

    def _proxy_done(self, st: PortState, mv: Proxy) -> None:
        """A proxy has forwarded all it owed: tell its target, and go."""
        self._remove(st)
        self._unsequenced(mv.target_node, ProxyDoneEvent(mv.target_port))

    def _fail_local(self, st: PortState, err: PortFailed) -> None:
        if st.error is None and not st.peer_closed:
            st.error = err
            failed = self._failed  # the cause, for a CHANGE_PEER still on its way here
            if len(failed) >= MAX_DEAD_CAUSES:
                del failed[next(iter(failed))]
            failed[st.id] = st
        self._remove(st)
        if st.waker is not None:
            st.waker()
        self._fire_credit(st)

    def _unsequenced(self, node: bytes, ev: Event) -> None:
        if node == self.node_id:
            if isinstance(ev, FailEvent):
                self._on_fail(ev.port, PortFailed(ev.reason))
            elif isinstance(ev, ProxyAckEvent):
                self._on_proxy_ack(ev.port, ev.last_seq)
            elif isinstance(ev, ProxyDoneEvent):
                st = self.ports.get(ev.port)
                if st is not None and st.proxy_from == node:
                    st.proxy_from = None
            return
        self.out.send_event(node, ev, [])

    def _route(self, node: bytes, port: bytes, seq: int, item: Item) -> None:
        """Ship one sequenced item to (node, port)."""
        if node == self.node_id:
            self._work.append((port, seq, item))
            self._run()
            return
        ev, fds = self._event_for(node, port, seq, item, strict=False)
        self.out.send_event(node, ev, fds)
        if self._after:
            self._send_after()

    def _send_after(self) -> None:
        after, self._after = self._after, []
        for node, ev in after:
            self.out.send_event(node, ev, [])

    def _event_for(
        self, node: bytes, port: bytes, seq: int, item: Item, strict: bool
    ) -> tuple[Event, list[Any]]:
        if isinstance(item, Message):
            if item.body is None:
                try:
                    item = self.encode_message(item)
                except MessageError as exc:
                    if strict:
                        raise
                    # a local message forwarded after its port moved (queued
                    # messages are encoded when the port leaves, so this is a
                    # value that changed since): keep the sequence intact and
                    # let the receiver see the error
                    item = Message(K_ERROR, None, self.codec.encode_error(exc))
            states = item.ports or []
            fds = item.fds or []
            descs = [self._send_port(ps, node) for ps in states]
            return MsgEvent(port, seq, item.kind, 0, descs, len(fds), item.body or b""), fds
        if isinstance(item, _CloseItem):
            return CloseEvent(port, seq), []
        return ChangePeerEvent(port, seq, item.new_node, item.new_port, item.old_node, item.old_port), []

    def _run(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            work = self._work
            while work:
                port, seq, item = work.popleft()
                st = self.ports.get(port)
                if st is None:
                    self._abandon(item, port)
                    continue
                self._receive_item(st, seq, item)
        finally:
            self._running = False

    def _receive_item(self, st: PortState, seq: int, item: Item) -> None:
        if seq != st.recv_seq:
            if seq < st.recv_seq:
                if isinstance(item, Message):
                    self.dispose(item)
                raise ProtocolError(f"duplicate sequence number {seq} on port {st.id.hex()[:8]}")
            if st.pending is None:
                st.pending = {}
            if seq in st.pending:
                if isinstance(item, Message):
                    self.dispose(item)
                raise ProtocolError(f"duplicate sequence number {seq} on port {st.id.hex()[:8]}")
            st.pending[seq] = item
            if len(st.pending) > self.limits.max_messages + MAX_REORDER:
                # more than any flow-controlled sender may have in flight: this
                # port's peer is broken, not the link (other ports go on)
                self._overrun(st)
            return
        while True:
            st.recv_seq = seq + 1
            self._process(st, seq, item)
            pending = st.pending
            if not pending or st.recv_seq not in pending:
                return
            seq = st.recv_seq
            item = pending.pop(seq)

    def _overrun(self, st: PortState) -> None:
        reason = (
            f"the peer sent more than {self.limits.max_messages + MAX_REORDER} items "
            "beyond what this end consumed (flow-control limit)"
        )
        mv = st.move
        if mv is None:
            self._unsequenced(st.peer_node, FailEvent(st.peer_port, f"{UNDELIVERED}: {reason}"))
            st.lost = True
            self._fail_local(st, PortFailed(reason))
        else:
            self._fail_other_side(st, mv, _NO_ID, f"{UNDELIVERED}: {reason}")
            self._remove(st)

    def _process(self, st: PortState, seq: int, item: Item) -> None:
        """One sequenced item, in order: the table at the top of this module."""
        match st.move:
            case None:  # OWNED
                match item:
                    case Message():
                        if st.closed or st.error is not None:
                            self.dispose(item)
                            if item.kind >= K_REPLY and st.error is None:
                                self._finished(st)  # the peer let go: no tombstone left waiting
                            return
                        self._enqueue(st, item)
                    case _CloseItem():
                        st.peer_closed = True
                        if not st.close_sent:
                            st.close_sent = True
                            self._route(st.peer_node, st.peer_port, st.send_seq, _CLOSE)
                            st.send_seq += 1
                        self._remove(st)
                        if st.waker is not None:
                            st.waker()
                    case _ChangePeer():
                        self._repoint(st, item)
                        self._unsequenced(item.old_node, ProxyAckEvent(item.old_port, st.send_seq - 1))
                        if item.new_node != self.node_id:
                            self.out.watch(item.new_node)
                        else:
                            st.tx = None  # a local peer's queue is the count now
                            st.next_checkpoint_seq = 0
                        if st.tx is not None and st.tx.want_all:
                            self._poll_consumed(st)  # the old end's poll died with it
                        self._fire_credit(st)  # a drain() waiting on the old peer re-checks
            case Transit() as mv:  # SENDING: buffer
                if type(item) is _ChangePeer:
                    self._repoint(st, item)
                self._buffer(mv, seq, item)
            case Proxy() as mv:  # PROXY: forward
                if type(item) is _ChangePeer:
                    self._repoint(st, item)
                try:
                    self._route(mv.target_node, mv.target_port, seq, item)
                except (OSError, MessageError, BufferFull) as exc:
                    self._abandon(item)
                    self._forward_failed(st, mv, exc)
                    return
                if (
                    type(item) is _CloseItem
                    or (type(item) is Message and item.kind >= K_REPLY)
                    or (mv.proxy_last is not None and seq >= mv.proxy_last)
                ):
                    self._proxy_done(st, mv)

    def _send_port(self, ps: PortState, dest: bytes) -> PortDesc:
        """Turn the end ``ps`` into a descriptor bound for node ``dest``."""
        if ps.engine is not self:
            self.adopt(ps)
        if ps.posted:
            self.run_posted(ps)  # sends other threads made before it left go first
        new_id = random_id()
        if ps.mode is not OWNED or ps.closed:
            return PortDesc(new_id, _NO_ID, _NO_ID, _NO_ID, 0, 0, D_DEAD)
        if ps.error is not None:
            self._drop_queue(ps)
            self._after.append((dest, FailEvent(new_id, ps.error.cause)))  # its real cause follows
            return PortDesc(new_id, _NO_ID, _NO_ID, _NO_ID, 0, 0, D_DEAD | D_PEER_CLOSED)
        ps.waker = None
        if ps.rx is not None and ps.rx.unreported_n:
            self._report_consumed(ps)  # the new end counts from zero
        self._fire_credit(ps)
        for i, m in enumerate(ps.queue):
            if m.body is None:  # not encoded by a send (an invitation's port)
                try:
                    ps.queue[i] = self.encode_message(m, ps)
                except MessageError as exc:
                    ps.queue[i] = Message(K_ERROR, None, self.codec.encode_error(exc))
        peer = self.ports.get(ps.peer_port) if ps.peer_node == self.node_id else None
        if (
            peer is not None
            and peer.pinned
            and peer.mode is OWNED
            and not (peer.closed or peer.peer_closed or peer.error is not None)
            and not (ps.queue or ps.pending or peer.pending or ps.peer_closed)
            and ps.recv_seq == peer.send_seq
            and peer.recv_seq == ps.send_seq
        ):
            # The peer is a pinned end here (an RPC reply port: it never moves,
            # so nobody else can learn the new address before the carrying
            # message is delivered): point it at the new end now. No proxy,
            # no ARRIVED, no CHANGE_PEER; its own later items follow the
            # carrying message on the same link.
            peer.peer_node = dest
            peer.peer_port = new_id
            ps.mode = SENDING  # gone from here; any stale use fails
            ps.move = Transit(dest, None)
            self._remove(ps)
            return PortDesc(new_id, self.node_id, peer.id, ps.id, ps.send_seq, ps.recv_seq, D_DIRECT)
        unread = list(ps.queue)
        ps.queue = NO_QUEUE
        extra = 1 if ps.peer_closed else 0
        base = ps.recv_seq - len(unread) - extra
        buffer: list[tuple[int, Item]] = [(base + i, m) for i, m in enumerate(unread)]
        flags = 0
        if ps.peer_closed:
            buffer.append((ps.recv_seq - 1, _CLOSE))
            flags = D_PEER_CLOSED
        elif ps.close_sent:
            # our CLOSE (or a predecessor's) went to the peer, which is going
            # away: the new end must not send it a CHANGE_PEER, and the peer's
            # own CLOSE is still to come through this end as it proxies
            flags = D_PEER_CLOSED
        desc = PortDesc(new_id, ps.peer_node, ps.peer_port, ps.id, ps.send_seq, base, flags)
        ps.mode = SENDING
        ps.move = Transit(dest, buffer)
        ps.send_seq += 1
        self.ports[ps.id] = ps
        return desc

    def _materialize(self, src: bytes, d: PortDesc) -> PortState:
        if d.flags & D_DEAD:
            st = PortState(self, d.id, _NO_ID, _NO_ID)
            st.closed = False
            st.close_sent = True
            if d.flags & D_PEER_CLOSED:
                st.error = PortFailed("the port had failed before it was sent")
                # its cause follows the message (a FAIL for this id); bounded
                causes = self._dead_causes
                if len(causes) >= MAX_DEAD_CAUSES:
                    del causes[next(iter(causes))]
                causes[d.id] = st
            else:
                st.peer_closed = True
            return st
        if d.id in self.ports:
            raise ProtocolError("port descriptor reuses a live port id")
        st = PortState(self, d.id, d.peer_node, d.peer_port)
        st.recv_seq = d.recv_seq
        if d.flags & D_DIRECT:
            st.send_seq = d.send_seq  # no CHANGE_PEER to number
            self.ports[st.id] = st
            if d.peer_node != self.node_id:
                self.out.watch(d.peer_node)
            return st
        st.send_seq = d.send_seq + 1
        st.proxy_from = src
        self.ports[st.id] = st
        self.out.send_event(src, ArrivedEvent(d.origin, st.id), [])
        if d.flags & D_PEER_CLOSED:
            st.close_sent = True
        else:
            self._route(d.peer_node, d.peer_port, d.send_seq, _ChangePeer(self.node_id, st.id, src, d.origin))
            if d.peer_node != self.node_id:
                self.out.watch(d.peer_node)
        return st

    def _on_arrived(self, src: bytes, port: bytes, new_port: bytes) -> None:
        st = self.ports.get(port)
        if st is None:
            return
        tr = st.move
        if type(tr) is not Transit:
            return
        st.mode = PROXY
        mv = st.move = Proxy(src, new_port, tr)
        buffer = tr.buffer or []
        tr.buffer = None
        data = self.out.send_data if src != self.node_id else None
        for i, (seq, item) in enumerate(buffer):
            try:
                if data is not None and type(item) is Message and item.body is not None and not item.ports:
                    if not item.fds:
                        data(src, new_port, seq, item.kind, item.body)  # no event object per item
                        continue
                self._route(src, new_port, seq, item)
            except (OSError, MessageError, BufferFull) as exc:
                for _, rest in buffer[i:]:
                    self._abandon(rest)
                self._forward_failed(st, mv, exc)
                return
            if isinstance(item, _CloseItem):
                self._proxy_done(st, mv)
                return
        if tr.pending_fail is not None:
            self._unsequenced(src, FailEvent(new_port, tr.pending_fail))
            self._remove(st)
        elif mv.proxy_last is not None and st.recv_seq - 1 >= mv.proxy_last:
            self._proxy_done(st, mv)
        self._run()

    def _on_proxy_ack(self, port: bytes, last: int) -> None:
        st = self.ports.get(port)
        if st is None:
            return
        mv = st.move
        if mv is None:
            return
        mv.proxy_last = last
        if type(mv) is Proxy and st.recv_seq - 1 >= last:
            self._proxy_done(st, mv)

    def _on_fail(self, port: bytes, err: PortFailed) -> None:
        st = self.ports.get(port)
        if st is None:
            dead = self._dead_causes.pop(port, None)
            if dead is not None:
                dead.error = err  # the real cause of a port that arrived failed
            gone = self._failed.get(port)
            if gone is not None:  # it failed for another reason first: were items lost too?
                gone.lost = gone.lost or err.cause.startswith(LOST)
                gone.sent_lost = gone.sent_lost or err.cause.startswith(UNDELIVERED)
            return
        if st.mode is OWNED:
            echo = not st.peer_closed
            st.lost = bool(st.pending) or err.cause.startswith(LOST)
            st.sent_lost = err.cause.startswith(UNDELIVERED)
            self._fail_local(st, err)  # first: out of the table, so an echo cannot come back
            if echo:
                # echo it to where the peer lives now: a failure detected in
                # the middle of the path (items lost at a dead forwarder) must
                # reach both ends, and the forwarder's own target may be long
                # gone by the time its notice arrives; a dead peer ignores it.
                self._unsequenced(st.peer_node, FailEvent(st.peer_port, self._cause_for_peer(st)))
        elif type(mv := st.move) is Transit:
            if mv.pending_fail is None or err.cause.startswith((LOST, UNDELIVERED)):
                # the first cause is the root one; a later notice (say "the peer
                # port is gone", which the first failure caused) must not hide
                # that items were lost
                mv.pending_fail = err.cause
        elif type(mv) is Proxy:
            self._unsequenced(mv.target_node, FailEvent(mv.target_port, err.cause))
            self._remove(st)


def _trace_sends() -> None:
    """Once a context may be set in this process, every engine's sends look
    for one (before that, not even a ``contextvars`` lookup per message)."""
    Engine.send_value = Engine._send_value_traced


when_tracing(_trace_sends)
