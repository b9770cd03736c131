"""The bytes of a boundary link, sans-IO.

A *boundary link* joins two gateway nodes of different meshes over one
reliable byte stream (a command's pipes, a TLS socket). This module's one
job is what travels on it: no socket, no event loop (``_gateway`` drives it).

Rules of this module:

* Nothing of either mesh crosses: no node id, no port id, no socket path, no
  secret. A crossing port is a *relay*, a small number per link; relay 0 is
  the link's first port. Each side numbers the relays it opens: the side
  whose HELLO nonce is lower takes even numbers, the other odd ones
  (``Hello.nonce``), so the two never collide; each side's numbers only
  grow (the gateway holds the far side to it).
* Each side starts with ``HELLO``: ``MAGIC``, the protocol version *range*
  it speaks, its meshipc version, a random nonce and the caps it holds the
  far side to (per-relay window, largest body). Both use the highest common
  version (``negotiate``); none in common is a ``BoundaryVersionError`` that
  names both sides' meshipc versions and ranges.
* Then frames, each a 12-byte header (type, flags, count, relay, payload
  length) and its payload, never more than ``MAX_FRAME_PAYLOAD``. A message
  larger than ``CHUNK_BYTES`` goes as one ``MSG`` frame and ``CHUNK`` frames
  (``F_MORE`` on all but the last); its announced total is checked against
  our ``max_body`` before a byte of it is kept, and a message's chunks are
  not interleaved with another message's (control frames may come between).
* Flow control per relay and direction (``SendCredit``/``RecvCredit``): a
  sender may have at most the receiver's window of messages and bytes not
  yet given back with ``CREDIT`` (a message larger than the byte window goes
  alone); more is a protocol error, so a far side cannot grow our memory.
* ``CLOSE``/``FAIL`` end one relay (its ports' stream, in order after its
  messages); ``PING``/``PONG`` keep an idle link provably alive;
  ``GOODBYE`` ends the link in order.
* Anything malformed raises ``BoundaryProtocolError`` (a ``ProtocolError``)
  from the decoder, saying what; nothing else escapes it.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

from ._errors import BoundaryProtocolError, BoundaryVersionError
from ._wire import K_MAX, MAX_PORTS_PER_MESSAGE

#: the first bytes each side sends: anything else is not a meshipc boundary
#: (a shell's error message on a command's stdout, say) and is refused
MAGIC: Final = b"MESHIPC-BOUNDARY"
#: protocol versions this side speaks (a range: the far side may be older)
PROTOCOL_MIN: Final = 1
PROTOCOL_MAX: Final = 1
#: a meshipc version string is at most this long on the wire
MAX_VERSION_LEN: Final = 64
# lo, hi, nonce, window msgs, window bytes, max body, heartbeat timeout (ms), max relays, version length
_HELLO: Final = struct.Struct("!HHQIQQIIB")
HELLO_FIXED: Final = len(MAGIC) + _HELLO.size

_HEAD: Final = struct.Struct("!BBHII")  # type, flags, count, relay, payload length
HEAD_LEN: Final = _HEAD.size
#: body bytes per frame: a large message goes in chunks of this size, so
#: control frames (heartbeats, credit) are never stuck behind it for long
CHUNK_BYTES: Final = 256 * 1024
_MSG_HEAD: Final = struct.Struct("!BQ")  # kind, total body length
#: the largest payload of one frame: a chunk plus a message's relay numbers
MAX_FRAME_PAYLOAD: Final = CHUNK_BYTES + _MSG_HEAD.size + 4 * MAX_PORTS_PER_MESSAGE
#: a FAIL's cause or a GOODBYE's reason is cut to this many bytes
MAX_CAUSE: Final = 1024
#: relay numbers are below this (a u32 on the wire)
MAX_RELAY: Final = 2**32 - 1

T_MSG: Final = 1
T_CHUNK: Final = 2
T_CREDIT: Final = 3
T_CLOSE: Final = 4
T_FAIL: Final = 5
T_PING: Final = 6
T_PONG: Final = 7
T_GOODBYE: Final = 8
#: more chunks of this message follow
F_MORE: Final = 1

_CREDIT: Final = struct.Struct("!IQ")
_TOKEN: Final = struct.Struct("!Q")
_RELAY: Final = struct.Struct("!I")


@dataclass(frozen=True)
class BoundaryLimits:
    """Caps of one boundary link, each side its own (the far side learns the
    window and body cap from our HELLO and is held to them).

    Memory a far side can make a gateway hold is bounded by these: per relay
    at most one window of messages not given back, one partial message of
    at most ``max_body`` at a time, at most twice ``max_relays`` relays."""

    #: relays open on one link at a time (each is a port end in the gateway):
    #: we open at most the smaller of ours and the far side's; a far side
    #: that makes us hold more than twice ours (closes may be in flight) is
    #: dropped
    max_relays: int = 4096
    #: largest message body accepted (checked on the announced total, before
    #: anything is kept); larger ones are refused at the sender
    max_body: int = 256 * 1024 * 1024
    #: per relay and direction: messages the sender may have not credited back
    window_messages: int = 1024
    #: per relay and direction: bytes likewise (a larger message goes alone)
    window_bytes: int = 4 * 1024 * 1024
    #: a side that wrote nothing for this long sends PING (seconds)
    heartbeat_interval: float = 2.0
    #: the loss bound: nothing heard from the far side for this long fails
    #: the link (seconds; detected within one more ``heartbeat_interval``)
    heartbeat_timeout: float = 10.0
    #: bytes written to the stream and not yet sent above which the gateway
    #: stops forwarding messages until the stream drains
    write_buffer_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.max_relays <= MAX_RELAY // 2:
            raise ValueError("need 1 <= max_relays <= 2**31")
        if not 1 <= self.window_messages < 2**32 or not 1 <= self.window_bytes:
            raise ValueError("windows must be at least 1")
        if self.max_body < 1:
            raise ValueError("max_body must be at least 1")
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        if self.write_buffer_bytes < 1:
            raise ValueError("write_buffer_bytes must be at least 1")


DEFAULT_BOUNDARY_LIMITS: Final = BoundaryLimits()


# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class Hello:
    """A side's opening: the versions it speaks and the caps it holds the
    other side to."""

    lo: int
    hi: int
    version: str
    nonce: int
    window_messages: int
    window_bytes: int
    max_body: int
    #: the sender's loss bound: it fails the link after hearing nothing for
    #: this long, so we must write at least a PING well within it
    heartbeat_timeout: float
    #: relays the sender holds open at most: we open no more than this
    #: (it drops the link past twice as many: closes may be in flight)
    max_relays: int = 1


@dataclass(frozen=True, slots=True)
class Msg:
    """One whole message for ``relay`` (chunks already joined); ``ports``
    are the relays the sender opened for the ports inside, in order."""

    relay: int
    kind: int
    ports: tuple[int, ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class Credit:
    relay: int
    messages: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Close:
    relay: int


@dataclass(frozen=True, slots=True)
class Fail:
    relay: int
    cause: str


@dataclass(frozen=True, slots=True)
class Ping:
    token: int


@dataclass(frozen=True, slots=True)
class Pong:
    token: int


@dataclass(frozen=True, slots=True)
class Goodbye:
    reason: str


Event = Hello | Msg | Credit | Close | Fail | Ping | Pong | Goodbye


# ------------------------------------------------------------------ writing


def encode_hello(version: str, nonce: int, limits: BoundaryLimits,
                 lo: int = PROTOCOL_MIN, hi: int = PROTOCOL_MAX) -> bytes:
    v = version.encode()[:MAX_VERSION_LEN]
    timeout_ms = min(2**32 - 1, max(1, round(limits.heartbeat_timeout * 1000)))
    return MAGIC + _HELLO.pack(lo, hi, nonce, limits.window_messages, limits.window_bytes,
                               limits.max_body, timeout_ms, limits.max_relays, len(v)) + v


def _frame(t: int, flags: int, count: int, relay: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(t, flags, count, relay, len(payload)) + payload


def encode_msg(relay: int, kind: int, ports: list[int] | tuple[int, ...],
               body: bytes | memoryview) -> list[bytes | memoryview]:
    """The frames of one message: a ``MSG`` frame, then ``CHUNK`` frames when
    the body is larger than ``CHUNK_BYTES`` (each item of the list is one
    write; a large body's parts are views, not copies)."""
    if len(ports) > MAX_PORTS_PER_MESSAGE:
        raise ValueError(f"{len(ports)} ports in one message (limit {MAX_PORTS_PER_MESSAGE})")
    view = memoryview(body)
    total = len(view)
    first = view[:CHUNK_BYTES]
    more = F_MORE if total > CHUNK_BYTES else 0
    pre = _MSG_HEAD.pack(kind, total) + b"".join(_RELAY.pack(r) for r in ports)
    out: list[bytes | memoryview] = [
        _HEAD.pack(T_MSG, more, len(ports), relay, len(pre) + len(first)) + pre,
        first,
    ]
    at = CHUNK_BYTES
    while at < total:
        part = view[at : at + CHUNK_BYTES]
        at += len(part)
        out.append(_HEAD.pack(T_CHUNK, F_MORE if at < total else 0, 0, relay, len(part)))
        out.append(part)
    return out


#: a MSG frame's head and its message head, for one without ports
_MSG_HEADS: Final = struct.Struct("!BBHIIBQ")


def encode_small(relay: int, kind: int, body: bytes) -> bytes:
    """``encode_msg`` of a message without ports whose body fits one frame,
    as one ``bytes`` (the common case: no views, no list)."""
    if len(body) > CHUNK_BYTES:
        raise ValueError(f"a body of {len(body)} bytes needs chunks (encode_msg)")
    return _MSG_HEADS.pack(T_MSG, 0, 0, relay, _MSG_HEAD.size + len(body), kind, len(body)) + body


def encode_credit(relay: int, messages: int, nbytes: int) -> bytes:
    return _frame(T_CREDIT, 0, 0, relay, _CREDIT.pack(messages, nbytes))


def encode_close(relay: int) -> bytes:
    return _frame(T_CLOSE, 0, 0, relay)


def _text(s: str) -> bytes:
    return s.encode("utf-8", "replace")[:MAX_CAUSE].decode("utf-8", "ignore").encode()


def encode_fail(relay: int, cause: str) -> bytes:
    return _frame(T_FAIL, 0, 0, relay, _text(cause))


def encode_ping(token: int) -> bytes:
    return _frame(T_PING, 0, 0, 0, _TOKEN.pack(token))


def encode_pong(token: int) -> bytes:
    return _frame(T_PONG, 0, 0, 0, _TOKEN.pack(token))


def encode_goodbye(reason: str) -> bytes:
    return _frame(T_GOODBYE, 0, 0, 0, _text(reason))


def negotiate(ours: Hello, theirs: Hello) -> int:
    """The protocol version both speak (the highest common one); raises
    ``BoundaryVersionError`` naming both sides' versions if there is none,
    ``BoundaryProtocolError`` for equal nonces (a link to itself, or a
    replayed HELLO: relay numbers would collide)."""
    lo, hi = max(ours.lo, theirs.lo), min(ours.hi, theirs.hi)
    if lo > hi:
        raise BoundaryVersionError(
            f"no common boundary protocol version: this side runs meshipc {ours.version} "
            f"(protocol {ours.lo}-{ours.hi}), the far side meshipc {theirs.version} "
            f"(protocol {theirs.lo}-{theirs.hi})"
        )
    if ours.nonce == theirs.nonce:
        raise BoundaryProtocolError("the far side's HELLO repeats ours (a link to itself?)")
    return hi


# ------------------------------------------------------------------ reading


def _printable(data: bytes) -> str:
    text = data[:80].decode("utf-8", "replace")
    return repr(text) + ("..." if len(data) > 80 else "")


class BoundaryDecoder:
    """Bytes in, events out (h11-style): ``feed(data)``, then ``next_event()``
    until it returns None. The first event is the far side's ``Hello``.

    Holds at most one incomplete frame (at most ``MAX_FRAME_PAYLOAD`` bytes)
    and one incomplete message (at most ``max_body``, checked on its announced
    total before any of it is kept). Raises ``BoundaryProtocolError`` on
    anything malformed; once it has raised, the link is done."""

    def __init__(self, max_body: int, max_ports: int = MAX_PORTS_PER_MESSAGE) -> None:
        self._buf = bytearray()
        self._max_body = max_body
        self._max_ports = max_ports
        self._hello_done = False
        self._broken = False
        # the message being assembled from chunks: relay, kind, ports, parts, total
        self._part_relay = -1
        self._part_kind = 0
        self._part_ports: tuple[int, ...] = ()
        self._parts: bytearray | None = None
        self._part_total = 0
        self._events: deque[Event] = deque()
        #: bytes fed and frames read so far (statistics)
        self.fed = 0
        self.frames = 0

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete frame and an incomplete message."""
        return len(self._buf) + (len(self._parts) if self._parts is not None else 0)

    def feed(self, data: bytes) -> None:
        if self._broken:
            raise BoundaryProtocolError("the link already broke the protocol")
        self.fed += len(data)
        self._buf += data
        self._parse()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def _parse(self) -> None:
        buf = self._buf
        if not self._hello_done:
            n = min(len(buf), len(MAGIC))
            if bytes(buf[:n]) != MAGIC[:n]:
                raise BoundaryProtocolError(
                    "the far side does not speak the meshipc boundary protocol: "
                    f"it sent {_printable(bytes(buf))}"
                )
            if len(buf) < HELLO_FIXED:
                return
            lo, hi, nonce, wm, wb, mb, hb, mr, vlen = _HELLO.unpack_from(buf, len(MAGIC))
            if vlen > MAX_VERSION_LEN:
                raise BoundaryProtocolError(f"HELLO version string of {vlen} bytes (limit {MAX_VERSION_LEN})")
            if len(buf) < HELLO_FIXED + vlen:
                return
            try:
                version = bytes(buf[HELLO_FIXED : HELLO_FIXED + vlen]).decode()
            except UnicodeDecodeError:
                raise BoundaryProtocolError("HELLO version string is not UTF-8") from None
            if not (1 <= lo <= hi) or wm < 1 or wb < 1 or mb < 1 or hb < 1 or mr < 1:
                raise BoundaryProtocolError(
                    f"HELLO with invalid fields (protocol {lo}-{hi}, window {wm}/{wb}, max body {mb})"
                )
            del buf[: HELLO_FIXED + vlen]
            self._hello_done = True
            self._events.append(Hello(lo, hi, version, nonce, wm, wb, mb, hb / 1000, mr))
        at = 0
        n = len(buf)
        view = memoryview(buf)
        try:
            while n - at >= HEAD_LEN:
                t, flags, count, relay, length = _HEAD.unpack_from(buf, at)
                if length > MAX_FRAME_PAYLOAD:
                    raise BoundaryProtocolError(f"frame of {length} bytes (limit {MAX_FRAME_PAYLOAD})")
                if n - at - HEAD_LEN < length:
                    break
                start = at + HEAD_LEN
                self.frames += 1
                self._frame(t, flags, count, relay, view[start : start + length])
                at = start + length
        except BoundaryProtocolError:
            self._broken = True  # views of the buffer may live on in the traceback: leave it be
            raise
        view.release()
        if at:
            del buf[:at]

    def _frame(self, t: int, flags: int, count: int, relay: int, p: memoryview) -> None:
        if flags & ~F_MORE or (flags and t not in (T_MSG, T_CHUNK)):
            raise BoundaryProtocolError(f"frame type {t} with unknown flags {flags:#x}")
        if count and t != T_MSG:
            raise BoundaryProtocolError(f"frame type {t} with a port count")
        if t == T_MSG:
            self._msg(flags, count, relay, p)
        elif t == T_CHUNK:
            self._chunk(flags, relay, p)
        elif t == T_CREDIT:
            if len(p) != _CREDIT.size:
                raise BoundaryProtocolError(f"CREDIT of {len(p)} bytes")
            m, b = _CREDIT.unpack(p)
            self._events.append(Credit(relay, m, b))
        elif t == T_CLOSE:
            if len(p):
                raise BoundaryProtocolError("CLOSE with a payload")
            self._events.append(Close(relay))
        elif t == T_FAIL:
            self._events.append(Fail(relay, self._cause(p, "FAIL")))
        elif t in (T_PING, T_PONG):
            if len(p) != _TOKEN.size or relay:
                raise BoundaryProtocolError("malformed PING/PONG")
            (token,) = _TOKEN.unpack(p)
            self._events.append(Ping(token) if t == T_PING else Pong(token))
        elif t == T_GOODBYE:
            if relay:
                raise BoundaryProtocolError("GOODBYE for a relay")
            self._events.append(Goodbye(self._cause(p, "GOODBYE")))
        else:
            raise BoundaryProtocolError(f"unknown frame type {t}")

    @staticmethod
    def _cause(p: memoryview, what: str) -> str:
        if len(p) > MAX_CAUSE:
            raise BoundaryProtocolError(f"{what} text of {len(p)} bytes (limit {MAX_CAUSE})")
        try:
            return bytes(p).decode()
        except UnicodeDecodeError:
            raise BoundaryProtocolError(f"{what} text is not UTF-8") from None

    def _msg(self, flags: int, count: int, relay: int, p: memoryview) -> None:
        if self._parts is not None:
            raise BoundaryProtocolError(
                f"a message for relay {relay} began inside one for relay {self._part_relay}"
            )
        if count > self._max_ports:
            raise BoundaryProtocolError(f"{count} ports in one message (limit {self._max_ports})")
        pre = _MSG_HEAD.size + 4 * count
        if len(p) < pre:
            raise BoundaryProtocolError("MSG frame shorter than its head")
        kind, total = _MSG_HEAD.unpack_from(p)
        if kind > K_MAX:
            raise BoundaryProtocolError(f"unknown message kind {kind}")
        if total > self._max_body:
            raise BoundaryProtocolError(f"message of {total} bytes (limit {self._max_body})")
        ports: tuple[int, ...] = ()
        if count:
            ports = struct.unpack_from(f"!{count}I", p, _MSG_HEAD.size)
            if len(set(ports)) != count:
                raise BoundaryProtocolError("a message names one relay twice")
        first = p[pre:]
        if len(first) > total or (flags & F_MORE) != (F_MORE if len(first) < total else 0):
            raise BoundaryProtocolError("MSG frame length does not match its total")
        if not flags & F_MORE:
            self._events.append(Msg(relay, kind, ports, bytes(first)))
            return
        self._part_relay, self._part_kind, self._part_ports = relay, kind, ports
        self._part_total = total
        self._parts = bytearray(first)

    def _chunk(self, flags: int, relay: int, p: memoryview) -> None:
        parts = self._parts
        if parts is None or relay != self._part_relay:
            raise BoundaryProtocolError(f"a CHUNK for relay {relay} outside its message")
        if len(parts) + len(p) > self._part_total:
            raise BoundaryProtocolError("chunks longer than their message's total")
        parts += p
        done = len(parts) == self._part_total
        if done == bool(flags & F_MORE):
            raise BoundaryProtocolError("CHUNK flags do not match its message's total")
        if done:
            self._parts = None
            self._events.append(Msg(relay, self._part_kind, self._part_ports, bytes(parts)))


# ------------------------------------------------------------------ credit


class SendCredit:
    """What one relay may still send: the far side's window less what it has
    not given back. A message larger than the byte window goes alone."""

    __slots__ = ("messages", "nbytes", "window_bytes", "window_messages")

    def __init__(self, window_messages: int, window_bytes: int) -> None:
        self.window_messages = window_messages
        self.window_bytes = window_bytes
        self.messages = 0  # in flight (sent, not credited)
        self.nbytes = 0

    def can_send(self, n: int) -> bool:
        if self.messages >= self.window_messages:
            return False
        return self.messages == 0 or self.nbytes + n <= self.window_bytes

    def sent(self, n: int) -> None:
        self.messages += 1
        self.nbytes += n

    def credited(self, messages: int, nbytes: int) -> None:
        """The far side gave ``messages``/``nbytes`` back; more than is in
        flight is a ``BoundaryProtocolError`` (forged credit opens nothing)."""
        if messages > self.messages or nbytes > self.nbytes:
            raise BoundaryProtocolError(
                f"CREDIT of {messages} messages / {nbytes} bytes exceeds what is in flight "
                f"({self.messages} / {self.nbytes})"
            )
        self.messages -= messages
        self.nbytes -= nbytes


class RecvCredit:
    """What one relay has received and not given back yet, held to our
    window; released in batches of a quarter window (``release``)."""

    __slots__ = ("held_bytes", "held_messages", "messages", "nbytes", "window_bytes", "window_messages")

    def __init__(self, window_messages: int, window_bytes: int) -> None:
        self.window_messages = window_messages
        self.window_bytes = window_bytes
        self.messages = 0  # received and not credited back
        self.nbytes = 0
        self.held_messages = 0  # of those: delivered, waiting to be credited in a batch
        self.held_bytes = 0

    def received(self, n: int) -> None:
        """One message of ``n`` bytes arrived; over the window (the sender
        ignored our credit) is a ``BoundaryProtocolError``."""
        m = self.messages + 1
        b = self.nbytes + n
        if m > self.window_messages or (b > self.window_bytes and m > 1):
            raise BoundaryProtocolError(
                f"the far side sent {m} messages / {b} bytes on one relay beyond its window "
                f"({self.window_messages} / {self.window_bytes})"
            )
        self.messages = m
        self.nbytes = b

    def done(self, n: int) -> None:
        """A message of ``n`` bytes was handed on; it is credited in a batch."""
        self.held_messages += 1
        self.held_bytes += n

    def release(self, force: bool = False) -> tuple[int, int] | None:
        """The credit to give back now (a quarter window gathered, or
        ``force``), or None."""
        m, b = self.held_messages, self.held_bytes
        if not m:
            return None
        if not force and m < max(1, self.window_messages // 4) and b < max(1, self.window_bytes // 4):
            return None
        self.held_messages = self.held_bytes = 0
        self.messages -= m
        self.nbytes -= b
        return m, b
