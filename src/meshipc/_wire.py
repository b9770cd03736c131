"""Wire format of node-to-node traffic: frames and events, sans-IO.

This module's one job is the bytes on a link: the frame and event formats,
every size limit a peer is held to, and the incremental ``FrameDecoder``.
It is the only place that builds frame headers and port descriptors.
Everything here is pure: bytes in, events out, and events in, bytes out. No
socket, no event loop. :class:`FrameDecoder` is the only reader of peer bytes;
if it raises anything but :class:`ProtocolError`, that is a bug (and the fuzz
tests hold it to that).

A connection carries a handshake (fixed-size records, see ``HELLO_*``) and
then frames::

    frame := u32-le length | u8 type | payload[length - 1]

File descriptors travel beside the bytes (``SCM_RIGHTS``); a MSG frame says
how many of the received descriptors are its own, in order.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from ._errors import ProtocolError
from ._fd import Fd
from ._ids import ID_LEN

# --- limits: every length read from a peer is checked against one of these ---

#: Largest frame accepted inline. Senders switch to an out-of-band body
#: far below this (OOB_THRESHOLD); the slack covers port descriptors.
MAX_FRAME: Final = 4 * 1024 * 1024
#: Bodies at or above this size travel in a descriptor (a sealed memfd on
#: Linux, an unlinked temporary file elsewhere: see _platform): one copy instead of
#: the several a large socket write costs, and no huge receive buffers.
OOB_THRESHOLD: Final = 256 * 1024
#: Largest out-of-band body accepted (the descriptor's size is checked before reading).
MAX_OOB_BODY: Final = 1024 * 1024 * 1024
#: Bodies of this size or more are large: written into their descriptor and
#: read from it in a worker thread (the event loop would stall for about a
#: millisecond per 2-4 MiB copied), and a ``bytes`` value this large is sent
#: without being copied into an encoding (a ``Gather`` body). Smaller ones
#: are copied at once, which costs less than the hop to a thread.
THREAD_BODY_MIN: Final = 4 * 1024 * 1024
#: Ports carried by one message; each costs a table entry at the receiver.
MAX_PORTS_PER_MESSAGE: Final = 4096
#: Descriptors owned by one message; a process has a limited fd table and
#: Linux passes at most 253 per sendmsg (SCM_MAX_FD).
MAX_FDS_PER_MESSAGE: Final = 128
#: Failure reasons are text for humans; longer ones are truncated by senders.
MAX_REASON: Final = 1024
#: Out-of-order items one port holds beyond its flow-control bound before the
#: peer is deemed broken (the port fails; the link stays). A correct peer never
#: sends more than the receiver's ``Limits.max_messages`` ahead of what was read.
MAX_REORDER: Final = 65536

#: 2: CONSUMED (flow-control credit), final message kinds. 3: the node
#: handshake proves certificates the mesh's root issued (``_handshake``) and
#: negotiates a version from each side's range. The highest version this
#: release speaks (docs/compatibility.md says when a new one is needed).
PROTOCOL_VERSION: Final = 3
#: The lowest protocol version this release speaks: two nodes link at the
#: highest version both speak, none if their ranges do not meet.
PROTOCOL_MIN: Final = 3
#: The releases (MAJOR.MINOR series) and the protocol versions each speaks
#: (lowest, highest), oldest first: a refusal names the release to use.
PROTOCOL_RELEASES: Final = (("0.1", 2, 2), ("0.2", PROTOCOL_MIN, PROTOCOL_VERSION))

# --- frame types ---
T_MSG: Final = 1
T_CLOSE: Final = 2
T_CHANGE_PEER: Final = 3
T_ARRIVED: Final = 4
T_PROXY_ACK: Final = 5
T_FAIL: Final = 6
T_PROXY_DONE: Final = 7
T_CONSUMED: Final = 8

#: MSG flag: the body is in the message's last fd (see _platform).
F_OOB: Final = 1
#: MSG flag: the body starts with ``TRACE_PREFIX_LEN`` bytes of trace
#: context (``_trace``: trace id, the sender's span id, flags, the seconds
#: left to the deadline of the call being handled). Set only when a
#: context is; never with ``F_OOB`` (a large body goes without one).
F_TRACE: Final = 2
#: Bytes of a message's trace context prefix (``F_TRACE``).
TRACE_PREFIX_LEN: Final = 33

# MSG kinds (what the channel layer makes of the body)
K_DATA: Final = 0
K_ADD_SENDER: Final = 1
#: an RPC request: the body is the request; the reply port is the message's
#: last port, or, in a frame without ports, named by the first 32 bytes of
#: the body (CALL_HEAD: the id the callee gives its reply end, then the
#: caller's reply port id; the caller is the sending node)
K_CALL: Final = 2
K_ERROR: Final = 3
#: final kinds: the last item on their port, which the sender has already
#: let go (no CLOSE follows, none is echoed): an RPC reply is one frame
K_REPLY: Final = 4
K_REPLY_ERROR: Final = 5
K_MAX: Final = 5

# descriptor flags
D_PEER_CLOSED: Final = 1
D_DEAD: Final = 2
#: the sender already pointed the peer at the new end (its peer is pinned):
#: no ARRIVED, no CHANGE_PEER
D_DIRECT: Final = 4

_LEN = struct.Struct("<I")
_MSG = struct.Struct("<B16sQBBHH")  # type port seq kind flags nports nfds
_LEN_MSG = struct.Struct("<IB16sQBBHH")  # length prefix + MSG header
#: The whole head of the common frame, a message without ports, fds or flags
#: (see ``data_frame``).
DATA_HEAD: Final = _LEN_MSG
DATA_HEAD_LEN: Final = _LEN_MSG.size - 4
_DESC = struct.Struct("<16s16s16s16sQQB")  # id peer_node peer_port origin send recv flags
#: bytes of one packed port descriptor (``encode_port_desc``)
PORT_DESC_SIZE: Final = _DESC.size
_CLOSE = struct.Struct("<B16sQ")
_CHANGE = struct.Struct("<B16sQ16s16s16s16s")
_ARRIVED = struct.Struct("<B16s16s")
_ACK = struct.Struct("<B16sQ")
_FAIL = struct.Struct("<B16s")
_DONE = struct.Struct("<B16s")
_CONSUMED = struct.Struct("<B16sQ")
_OOB = struct.Struct("<Q")
_BIN32 = struct.Struct(">BI")
#: the head of a compact RPC request's body: two port ids (see ``K_CALL``)
CALL_HEAD: Final = 2 * ID_LEN


class PortDesc:
    """A port in transit inside a message."""

    __slots__ = ("flags", "id", "origin", "peer_node", "peer_port", "recv_seq", "send_seq")

    def __init__(
        self,
        id: bytes,
        peer_node: bytes,
        peer_port: bytes,
        origin: bytes,
        send_seq: int,
        recv_seq: int,
        flags: int,
    ) -> None:
        self.id = id
        self.peer_node = peer_node
        self.peer_port = peer_port
        self.origin = origin
        self.send_seq = send_seq
        self.recv_seq = recv_seq
        self.flags = flags

    def _key(self) -> tuple[object, ...]:
        return (
            self.id,
            self.peer_node,
            self.peer_port,
            self.origin,
            self.send_seq,
            self.recv_seq,
            self.flags,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PortDesc) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"PortDesc({self.id.hex()[:8]} peer={self.peer_node.hex()[:8]}/{self.peer_port.hex()[:8]})"


class Gather:
    """An encoded body kept in pieces, for a large value that must not be
    copied on the event loop: ``parts`` are buffers written one after the
    other (a head, msgpack's header of a ``bin`` value, the value itself,
    which is immutable). ``len`` is the body's length. It goes wherever
    bytes of ``THREAD_BODY_MIN`` or more go: into an out-of-band body,
    written in a worker thread. An RPC's head is written into its first
    part in place (``body[:n] = head``, where that part has room)."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[bytes | bytearray]) -> None:
        self.parts = parts
        self.size = sum(len(p) for p in parts)

    def __len__(self) -> int:
        return self.size

    def __setitem__(self, key: slice, head: bytes) -> None:
        first = self.parts[0]
        if not (isinstance(first, bytearray) and key.start is None and key.stop == len(first) == len(head)):
            raise TypeError("only the room at the front of a Gather body can be written")
        first[:] = head


class FdBody:
    """The encoded body of a message of ``Fd``s and plain values (the fd
    fast path, issue 24) and the ``Fd``s it refers to, in order (extension
    references by index, as the full encoder writes them). It goes where a
    plain body goes, as far as the link (``Link.write_data``), which takes
    the descriptors over only then; ``len`` is the body's length. Anything
    else that meets one (it is not ``bytes``) fails loudly."""

    __slots__ = ("body", "fds")

    def __init__(self, body: bytes, fds: list[Fd]) -> None:
        self.body = body
        self.fds = fds

    def __len__(self) -> int:
        return len(self.body)

    def take(self) -> list[Fd]:
        """The descriptors, taken over from the value's ``Fd``s (each is left
        detached, as sending hands it over). ``ValueError`` if one was closed."""
        return [Fd._take(f) for f in self.fds]


#: ``FdBody`` as the type checks of a body typed ``bytes`` name it (it passes
#: for bytes on the way to the link).
FD_BODY: Final[Any] = FdBody


def bin_header(n: int) -> bytes:
    """msgpack's header of a ``bin 32`` value of ``n`` bytes (``n`` < 2**32)."""
    return _BIN32.pack(0xC6, n)


class MsgEvent:
    """A message on a port. ``nfds`` descriptors belong to it; with ``F_OOB``
    the last one holds the body and ``body`` is empty until the node reads it."""

    __slots__ = ("body", "flags", "kind", "nfds", "port", "ports", "seq")

    def __init__(
        self, port: bytes, seq: int, kind: int, flags: int, ports: list[PortDesc], nfds: int, body: bytes
    ) -> None:
        self.port = port
        self.seq = seq
        self.kind = kind
        self.flags = flags
        self.ports = ports
        self.nfds = nfds
        self.body = body

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MsgEvent) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]


class CloseEvent:
    """The sender closed its end; ``seq`` is the last item of its stream."""

    __slots__ = ("port", "seq")

    def __init__(self, port: bytes, seq: int) -> None:
        self.port = port
        self.seq = seq

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CloseEvent) and (self.port, self.seq) == (other.port, other.seq)

    __hash__ = None  # type: ignore[assignment]


class ChangePeerEvent:
    """Sequenced: from ``seq`` on, the peer lives at (new_node, new_port);
    acknowledge to the proxy (old_node, old_port) with the last seq sent to it."""

    __slots__ = ("new_node", "new_port", "old_node", "old_port", "port", "seq")

    def __init__(
        self, port: bytes, seq: int, new_node: bytes, new_port: bytes, old_node: bytes, old_port: bytes
    ) -> None:
        self.port = port
        self.seq = seq
        self.new_node = new_node
        self.new_port = new_port
        self.old_node = old_node
        self.old_port = old_port

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChangePeerEvent) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]


class ArrivedEvent:
    """The port ``port`` sent from the receiving node arrived as ``new_port``
    on the node that sends this event."""

    __slots__ = ("new_port", "port")

    def __init__(self, port: bytes, new_port: bytes) -> None:
        self.port = port
        self.new_port = new_port

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArrivedEvent) and (self.port, self.new_port) == (other.port, other.new_port)

    __hash__ = None  # type: ignore[assignment]


class ProxyAckEvent:
    """To a proxy: the peer sent it every item up to ``last_seq``, no more."""

    __slots__ = ("last_seq", "port")

    def __init__(self, port: bytes, last_seq: int) -> None:
        self.port = port
        self.last_seq = last_seq

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProxyAckEvent) and (self.port, self.last_seq) == (other.port, other.last_seq)

    __hash__ = None  # type: ignore[assignment]


class FailEvent:
    """Unsequenced: the other side of this port is gone abnormally."""

    __slots__ = ("port", "reason")

    def __init__(self, port: bytes, reason: str) -> None:
        self.port = port
        self.reason = reason

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FailEvent) and (self.port, self.reason) == (other.port, other.reason)

    __hash__ = None  # type: ignore[assignment]


class ProxyDoneEvent:
    """To a port that arrived through a proxy: the proxy has forwarded its
    last item (everything it owed is now ahead of this event on the link)."""

    __slots__ = ("port",)

    def __init__(self, port: bytes) -> None:
        self.port = port

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProxyDoneEvent) and self.port == other.port

    __hash__ = None  # type: ignore[assignment]


class ConsumedEvent:
    """Flow-control credit, unsequenced, to the sending end of a port: the
    receiver has consumed every item up to ``seq`` (so the sender may count
    them off its window)."""

    __slots__ = ("port", "seq")

    def __init__(self, port: bytes, seq: int) -> None:
        self.port = port
        self.seq = seq

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConsumedEvent) and (self.port, self.seq) == (other.port, other.seq)

    __hash__ = None  # type: ignore[assignment]


Event = (
    MsgEvent
    | CloseEvent
    | ChangePeerEvent
    | ArrivedEvent
    | ProxyAckEvent
    | FailEvent
    | ProxyDoneEvent
    | ConsumedEvent
)


def encode_port_desc(d: PortDesc) -> bytes:
    """The ``PORT_DESC_SIZE`` bytes of a port descriptor."""
    return _DESC.pack(d.id, d.peer_node, d.peer_port, d.origin, d.send_seq, d.recv_seq, d.flags)


def decode_port_desc(data: bytes | memoryview, offset: int = 0) -> PortDesc:
    """The port descriptor packed at ``offset`` (``struct.error`` if short;
    its flags are not checked here)."""
    return PortDesc(*_DESC.unpack_from(data, offset))


def encode_msg_header(
    port: bytes, seq: int, kind: int, flags: int, ports: list[PortDesc], nfds: int, body_len: int
) -> bytes:
    """The bytes of a MSG frame up to (not including) its body."""
    parts = [_MSG.pack(T_MSG, port, seq, kind, flags, len(ports), nfds)]
    parts.extend(map(encode_port_desc, ports))
    head = b"".join(parts)
    return _LEN.pack(len(head) + body_len) + head


def data_frame(port: bytes, seq: int, kind: int, body: bytes) -> bytes:
    """The whole frame of a message without ports, fds or flags (the common
    frame; ``encode_msg_header`` builds the same head, one call slower)."""
    return _LEN_MSG.pack(len(body) + DATA_HEAD_LEN, T_MSG, port, seq, kind, 0, 0, 0) + body


def fd_frame(port: bytes, seq: int, kind: int, nfds: int, body: bytes) -> bytes:
    """``data_frame`` of a message that carries ``nfds`` fds (no ports, no flags)."""
    return _LEN_MSG.pack(len(body) + DATA_HEAD_LEN, T_MSG, port, seq, kind, 0, 0, nfds) + body


def encode_event(ev: Event) -> bytes:
    """One frame for one event (MSG bodies inline; see ``encode_msg_header``)."""
    if isinstance(ev, MsgEvent):
        return (
            encode_msg_header(ev.port, ev.seq, ev.kind, ev.flags, ev.ports, ev.nfds, len(ev.body)) + ev.body
        )
    if isinstance(ev, CloseEvent):
        payload = _CLOSE.pack(T_CLOSE, ev.port, ev.seq)
    elif isinstance(ev, ChangePeerEvent):
        payload = _CHANGE.pack(
            T_CHANGE_PEER, ev.port, ev.seq, ev.new_node, ev.new_port, ev.old_node, ev.old_port
        )
    elif isinstance(ev, ArrivedEvent):
        payload = _ARRIVED.pack(T_ARRIVED, ev.port, ev.new_port)
    elif isinstance(ev, ProxyAckEvent):
        payload = _ACK.pack(T_PROXY_ACK, ev.port, ev.last_seq)
    elif isinstance(ev, FailEvent):
        payload = _FAIL.pack(T_FAIL, ev.port) + ev.reason.encode("utf-8", "replace")[:MAX_REASON]
    elif isinstance(ev, ProxyDoneEvent):
        payload = _DONE.pack(T_PROXY_DONE, ev.port)
    elif isinstance(ev, ConsumedEvent):
        payload = _CONSUMED.pack(T_CONSUMED, ev.port, ev.seq)
    else:
        raise TypeError(f"not an event: {ev!r}")
    return _LEN.pack(len(payload)) + payload


def oob_body_length(body: bytes) -> int:
    """Length of an out-of-band MSG body (its inline body is this u64)."""
    if len(body) != _OOB.size:
        raise ProtocolError("out-of-band message without its length")
    (n,) = _OOB.unpack(body)
    if n > MAX_OOB_BODY:
        raise ProtocolError(f"out-of-band body of {n} bytes exceeds {MAX_OOB_BODY}")
    return int(n)


def oob_body_marker(length: int) -> bytes:
    return _OOB.pack(length)


def _decode_frame(frame: memoryview) -> Event:
    t = frame[0]
    n = len(frame)
    if t == T_MSG:
        if n < _MSG.size:
            raise ProtocolError("short MSG frame")
        _, port, seq, kind, flags, nports, nfds = _MSG.unpack_from(frame)
        if kind > K_MAX:
            raise ProtocolError(f"unknown message kind {kind}")
        if flags & ~(F_OOB | F_TRACE):
            raise ProtocolError(f"unknown message flags {flags:#x}")
        if flags & F_TRACE and flags & F_OOB:
            raise ProtocolError("an out-of-band message with a trace context")
        if nports > MAX_PORTS_PER_MESSAGE:
            raise ProtocolError(f"{nports} ports in one message (limit {MAX_PORTS_PER_MESSAGE})")
        if nfds > MAX_FDS_PER_MESSAGE + (1 if flags & F_OOB else 0):  # + the body's descriptor
            raise ProtocolError(f"{nfds} fds in one message (limit {MAX_FDS_PER_MESSAGE})")
        if flags & F_OOB and nfds == 0:
            raise ProtocolError("out-of-band message without a descriptor")
        off = _MSG.size
        end = off + nports * _DESC.size
        if end > n:
            raise ProtocolError("MSG frame shorter than its port descriptors")
        descs = []
        for i in range(nports):
            d = decode_port_desc(frame, off + i * _DESC.size)
            if d.flags & ~(D_PEER_CLOSED | D_DEAD | D_DIRECT):
                raise ProtocolError(f"unknown port descriptor flags {d.flags:#x}")
            descs.append(d)
        body = bytes(frame[end:])
        if flags & F_TRACE and len(body) < TRACE_PREFIX_LEN:
            raise ProtocolError(f"a trace context is {TRACE_PREFIX_LEN} bytes, the body has {len(body)}")
        if flags & F_OOB:
            oob_body_length(body)
        return MsgEvent(port, seq, kind, flags, descs, nfds, body)
    if t == T_CLOSE:
        if n != _CLOSE.size:
            raise ProtocolError("bad CLOSE frame size")
        _, port, seq = _CLOSE.unpack_from(frame)
        return CloseEvent(port, seq)
    if t == T_CHANGE_PEER:
        if n != _CHANGE.size:
            raise ProtocolError("bad CHANGE_PEER frame size")
        _, port, seq, nn, np_, on, op = _CHANGE.unpack_from(frame)
        return ChangePeerEvent(port, seq, nn, np_, on, op)
    if t == T_ARRIVED:
        if n != _ARRIVED.size:
            raise ProtocolError("bad ARRIVED frame size")
        _, port, new_port = _ARRIVED.unpack_from(frame)
        return ArrivedEvent(port, new_port)
    if t == T_PROXY_ACK:
        if n != _ACK.size:
            raise ProtocolError("bad PROXY_ACK frame size")
        _, port, last = _ACK.unpack_from(frame)
        return ProxyAckEvent(port, last)
    if t == T_FAIL:
        if n < _FAIL.size or n > _FAIL.size + MAX_REASON:
            raise ProtocolError("bad FAIL frame size")
        _, port = _FAIL.unpack_from(frame)
        return FailEvent(port, bytes(frame[_FAIL.size :]).decode("utf-8", "replace"))
    if t == T_PROXY_DONE:
        if n != _DONE.size:
            raise ProtocolError("bad PROXY_DONE frame size")
        _, port = _DONE.unpack_from(frame)
        return ProxyDoneEvent(port)
    if t == T_CONSUMED:
        if n != _CONSUMED.size:
            raise ProtocolError("bad CONSUMED frame size")
        _, port, seq = _CONSUMED.unpack_from(frame)
        return ConsumedEvent(port, seq)
    raise ProtocolError(f"unknown frame type {t}")


class FrameDecoder:
    """Incremental frame reader: ``feed`` bytes as they come, get whole events.

    Never raises anything but :class:`ProtocolError`; after one, the decoder
    is spent (the connection must be dropped).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._broken = False
        #: whole frames decoded so far
        self.frames = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Decode what ``data`` completes; returns whole events in order."""
        out: list[Event] = []

        def on_data(port: bytes, seq: int, kind: int, body: bytes) -> None:
            out.append(MsgEvent(port, seq, kind, 0, [], 0, body))

        self.feed_each(data, on_data, out.append)
        return out

    def feed_each(
        self,
        data: bytes | bytearray | memoryview,
        on_data: Callable[[bytes, int, int, bytes], None],
        on_event: Callable[[Event], bool | None],
        on_run: Callable[[bytes, int, list[bytes]], None] | None = None,
    ) -> None:
        """Like ``feed``, but hands each event over as soon as it is decoded.

        The common frame, a message without ports, fds or flags, goes to
        ``on_data(port, seq, kind, body)`` without an event object: on the
        hot path every Python object per message counts. With ``on_run``,
        consecutive ``K_DATA`` frames for one port with consecutive sequence
        numbers go as one ``on_run(port, first_seq, bodies)`` (a stream is
        delivered a read at a time, not a frame at a time); a run is handed
        over before any other frame, so the order is the wire's. An exception
        from a callback leaves the decoder spent, like a ``ProtocolError``.

        An ``on_event`` that returns True stops the feed after its frame:
        the rest stays buffered until the next call (``feed_each(b"", ...)``
        goes on with it). A reader that must finish something before the
        next frame is handed over (an out-of-band body read in a thread)
        keeps the link's order that way."""
        if self._broken:
            raise ProtocolError("decoder already failed")
        buf = self._buf
        if buf:
            buf += data
            mv = memoryview(buf)
        else:
            mv = memoryview(data)
        pos = 0
        frames = 0
        total = len(mv)
        head = _LEN_MSG.size
        unpack_head = _LEN_MSG.unpack_from
        run: list[bytes] = []  # bodies of the pending run
        run_port = b""
        run_seq = run_next = 0
        try:
            while total - pos >= 4:
                if total - pos >= head:
                    # one unpack for the length and a MSG header, the common frame
                    length, t, port, seq, kind, flags, nports, nfds = unpack_head(mv, pos)
                    if t == T_MSG and not (flags or nports or nfds) and kind <= K_MAX:
                        end = pos + 4 + length
                        if pos + head <= end <= total and length <= MAX_FRAME:
                            body = bytes(mv[pos + head : end])
                            pos = end
                            frames += 1
                            if on_run is not None and kind == K_DATA:
                                if run and seq == run_next and port == run_port:
                                    run.append(body)
                                    run_next += 1
                                    continue
                                if run:
                                    _hand_run(run_port, run_seq, run, on_data, on_run)
                                run = [body]
                                run_port = port
                                run_seq = seq
                                run_next = seq + 1
                                continue
                            if run:
                                _hand_run(run_port, run_seq, run, on_data, on_run)
                                run = []
                            on_data(port, seq, kind, body)
                            continue
                    elif t == T_MSG and nfds and not (flags or nports) and kind <= K_MAX:
                        # a message of fds and plain values (the fd fast path):
                        # what _decode_frame makes of it, without its general work
                        end = pos + 4 + length
                        if pos + head <= end <= total and length <= MAX_FRAME and nfds <= MAX_FDS_PER_MESSAGE:
                            if run:
                                _hand_run(run_port, run_seq, run, on_data, on_run)
                                run = []
                            with_fds = MsgEvent(port, seq, kind, 0, [], nfds, bytes(mv[pos + head : end]))
                            pos = end
                            frames += 1
                            if on_event(with_fds):
                                break
                            continue
                if run:
                    _hand_run(run_port, run_seq, run, on_data, on_run)
                    run = []
                (length,) = _LEN.unpack_from(mv, pos)
                if length == 0 or length > MAX_FRAME:
                    raise ProtocolError(f"frame length {length} outside 1..{MAX_FRAME}")
                start = pos + 4
                end = start + length
                if end > total:
                    break
                ev = _decode_frame(mv[start:end])
                pos = end
                frames += 1
                if on_event(ev):
                    break
            if run:
                _hand_run(run_port, run_seq, run, on_data, on_run)
        except ProtocolError:
            self._broken = True
            raise
        except (struct.error, ValueError, IndexError) as exc:  # defensive: any slip is the peer's fault
            self._broken = True
            raise ProtocolError(f"malformed frame: {exc}") from exc
        except BaseException:
            self._broken = True
            raise
        finally:
            self.frames += frames
            rest = bytes(mv[pos:]) if not buf and pos < total else b""
            mv.release()
        if buf:
            del buf[:pos]
        elif rest:
            buf += rest


def _hand_run(
    port: bytes,
    seq: int,
    run: list[bytes],
    on_data: Callable[[bytes, int, int, bytes], None],
    on_run: Callable[[bytes, int, list[bytes]], None] | None,
) -> None:
    """Hand a run of K_DATA bodies over (one body goes as plain data)."""
    if len(run) == 1 or on_run is None:
        on_data(port, seq, K_DATA, run[0])
    else:
        on_run(port, seq, run)
