"""A boundary link's gateway: one node's end of a link to another mesh.

``Gateway.open`` joins a node of this mesh with a node of another mesh over
one reliable byte stream (a command's pipes, a TLS socket, a socketpair):
the bytes are ``_boundary``'s; this module drives them from asyncio and
makes no protocol decision of its own.

A port that crosses becomes a *relay*: a pinned port end of this node (it
never moves; ``Engine.set_relay``) whose peer is the crossing port's local
end, numbered per link. The gateway forwards what its relay ends receive
(``Engine.take``: the bytes as they came, never decoded) and hands what the
far side sends to them (``Engine.send_message``); the ports inside a message
become new relays, both ways, recursively. The local end of a crossing port
is an ordinary port: it moves freely inside its mesh.

The promise, per relay: in order, exactly once, while the link lives. When
the stream ends or breaks, the far side breaks the protocol or says
GOODBYE, or nothing is heard from it for ``heartbeat_timeout`` (checked
every ``heartbeat_interval / 2``), every relay's local peer fails with
``LinkFailure`` (a ``NodeFailure``) naming the link, the cause and that
messages in flight may or may not have been processed. What arrived before
stays readable before the failure. No reconnect.

Memory a far side can make us hold: per relay one window of messages
(``BoundaryLimits``; credit goes back only while the relay's local peer is
under its own window, so a slow reader on our side slows the far sender),
one partial message, ``max_relays`` relays; what we send waits in the relay
ends' queues, bounded by the local senders' own flow control, while the
far side gives no credit or the stream's write buffer is over
``write_buffer_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import meshipc

from ._boundary import (
    DEFAULT_BOUNDARY_LIMITS,
    PROTOCOL_MAX,
    PROTOCOL_MIN,
    BoundaryDecoder,
    BoundaryLimits,
    Close,
    Credit,
    Event,
    Fail,
    Goodbye,
    Hello,
    Msg,
    Ping,
    Pong,
    RecvCredit,
    SendCredit,
    encode_close,
    encode_credit,
    encode_fail,
    encode_goodbye,
    encode_hello,
    encode_msg,
    encode_ping,
    encode_pong,
    encode_small,
    negotiate,
)
from ._channel import Port
from ._errors import (
    BoundaryProtocolError,
    ChannelClosed,
    LinkFailure,
    MeshError,
    MessageError,
    PortFailed,
)
from ._node import Node
from ._ports import Engine, Message, PortState
from ._wire import K_CALL, K_ERROR, K_REPLY, K_REPLY_ERROR

log = logging.getLogger("meshipc.gateway")

#: bytes asked of the stream per read
READ_BYTES: Final = 256 * 1024
#: messages one relay forwards before the next ready relay gets its turn
TURN: Final = 64
#: control frames (credit, closes back) beyond the write buffer before a far
#: side that does not read them is dropped
CONTROL_SLACK: Final = 1024 * 1024
#: relay turns in one synchronous pass before the loop gets a turn
PASS_TURNS: Final = 16
#: message frames smaller than this are joined into writes of about this size
COALESCE_BYTES: Final = 64 * 1024
#: we PING at most this often, whatever loss bound the far side announces
MIN_PING_INTERVAL: Final = 0.05
#: after our GOODBYE, how long we wait for the far side to close its half
LINGER: Final = 2.0
#: how long ``open`` waits for the far side's HELLO by default (seconds)
HELLO_TIMEOUT: Final = 30.0

#: the cause of a link the far side ended in order (its GOODBYE): logged at
#: INFO, every other end of a link at WARNING
_BYE: Final = "the far side closed the link (GOODBYE: "

_FD_REFUSED: Final = "an Fd cannot cross a boundary link to another host's mesh: it was closed at the gateway"


@dataclass(frozen=True, slots=True)
class GatewayStats:
    """A snapshot of one link (``Gateway.stats()``)."""

    label: str
    #: relays open (crossing ports)
    relays: int
    bytes_in: int
    bytes_out: int
    frames_in: int
    frames_out: int
    messages_in: int
    messages_out: int
    #: bytes the gateway itself holds: unsent stream bytes, an incomplete
    #: frame or message being read, messages taken and waiting for credit
    buffered_bytes: int
    #: messages and bytes waiting in relay ends' queues to be forwarded
    #: (bounded by the local senders' flow control)
    queued_messages: int
    queued_bytes: int
    #: sent to the far side and not credited back yet, over all relays
    window_messages: int
    window_bytes: int
    closed: bool


class _Relay:
    __slots__ = ("head", "number", "queued", "rx", "st", "tx", "watching")

    def __init__(self, number: int, st: PortState, far: Hello, ours: BoundaryLimits) -> None:
        self.number = number
        self.st = st
        self.tx = SendCredit(far.window_messages, far.window_bytes)
        self.rx = RecvCredit(ours.window_messages, ours.window_bytes)
        #: the next message to send, taken and encoded, waiting for credit
        self.head: tuple[int, bytes, list[PortState]] | None = None
        self.queued = False  # in the gateway's ready queue
        self.watching = False


def _take_port(engine: Engine, first: Port[Any]) -> PortState:
    states = first._detach()
    if len(states) != 1:
        raise MeshError("the first port of a gateway must be an open Port")
    st = states[0]
    if st.engine is not engine:
        engine.adopt(st)
    return st


class Gateway:
    """One end of a boundary link (see the module's docstring). Made by
    :meth:`open`; ``label`` names the link in every error."""

    def __init__(self, node: Node, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 label: str, limits: BoundaryLimits) -> None:
        self.label = label
        self.limits = limits
        self._node = node
        self._engine = node.engine
        self._loop = node.loop
        self._reader = reader
        self._writer = writer
        self._decoder = BoundaryDecoder(limits.max_body)
        self._nonce = int.from_bytes(os.urandom(8), "big")
        self._far: Hello | None = None
        self._relays: dict[int, _Relay] = {}
        self._next = 0  # the next relay number this side opens (parity set by HELLO)
        self._far_max = 0  # the highest relay number the far side opened (they only grow)
        self._ready: deque[_Relay] = deque()
        self._wake = asyncio.Event()  # the pump: wait for the stream to drain, then go on
        self._in_pass = False
        self._kicked = False
        self._draining = False
        self._out: list[bytes | memoryview] = []  # message frames of this pass, joined into one write
        self._out_len = 0
        self._flushed = asyncio.Event()  # set when the pump has nothing ready
        self._credited = asyncio.Event()  # set when credit comes back
        self._touched: set[_Relay] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: asyncio.Future[BaseException | None] = self._loop.create_future()
        self._closed = False
        self._lingering: asyncio.Task[None] | None = None
        self._last_heard = self._loop.time()
        self._last_written = self._loop.time()
        self._ping = 0
        self.bytes_out = 0
        self.frames_out = 0
        self.messages_in = 0
        self.messages_out = 0

    # ------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls,
        node: Node,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: Port[Any],
        *,
        label: str,
        limits: BoundaryLimits | None = None,
        timeout: float | None = HELLO_TIMEOUT,
    ) -> Gateway:
        """Say HELLO, check the far side's, then join ``first`` with the far
        side's ``first``: the caller keeps ``first``'s peer end; what it sends
        there arrives at the far caller's kept end, and back. Ports inside
        messages cross as relays, both ways, recursively. A message with an
        ``Fd`` sent from this process to a crossing port raises
        ``MessageError``; one forwarded from another process of the mesh has
        its fds closed here and arrives at the far end as an error (the port
        lives on).

        Raises ``BoundaryProtocolError`` if the far side does not speak the
        boundary protocol (the text shows what it sent), ends the stream or
        sends no HELLO within ``timeout`` seconds; ``BoundaryVersionError``
        (naming both sides' versions) if it speaks no common version. The
        stream is closed then, and ``first`` with it."""
        gw = cls(node, reader, writer, label, limits or DEFAULT_BOUNDARY_LIMITS)
        st = _take_port(node.engine, first)
        try:
            await gw._hello(timeout)
        except BaseException:
            node.engine.close(st)
            writer.close()
            raise
        gw._add(0, st)
        gw._start()
        return gw

    async def _hello(self, timeout: float | None) -> None:
        try:
            await self._exchange_hello(timeout)
        except BoundaryProtocolError as exc:
            text = str(exc)
            if not text.startswith("boundary link "):
                raise type(exc)(f"boundary link {self.label}: {text}") from None
            raise

    async def _exchange_hello(self, timeout: float | None) -> None:
        ours = encode_hello(meshipc.__version__, self._nonce, self.limits)
        self._write(ours)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    ev = self._decoder.next_event()
                    if ev is not None:
                        break
                    data = await self._reader.read(READ_BYTES)
                    if not data:
                        raise BoundaryProtocolError(
                            f"boundary link {self.label}: the stream ended before the far side's HELLO"
                        )
                    self._decoder.feed(data)
        except TimeoutError:
            raise BoundaryProtocolError(
                f"boundary link {self.label}: no HELLO from the far side within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise BoundaryProtocolError(f"boundary link {self.label}: the stream broke: {exc}") from exc
        if not isinstance(ev, Hello):  # the decoder's first event is always a Hello
            raise BoundaryProtocolError("the far side did not start with HELLO")
        lim = self.limits
        mine = Hello(PROTOCOL_MIN, PROTOCOL_MAX, meshipc.__version__, self._nonce,
                     lim.window_messages, lim.window_bytes, lim.max_body, lim.heartbeat_timeout,
                     lim.max_relays)
        negotiate(mine, ev)
        self._far = ev
        self._next = 2 if self._nonce < ev.nonce else 1
        self._last_heard = self._loop.time()

    def _start(self) -> None:
        for coro in (self._pump(), self._heartbeat()):
            t = self._loop.create_task(coro)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        if not self._tap():
            t = self._loop.create_task(self._read_loop())
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ relays

    def _add(self, number: int, st: PortState) -> _Relay:
        far = self._far
        if far is None:
            raise MeshError("gateway not open")
        rel = _Relay(number, st, far, self.limits)
        self._relays[number] = rel
        self._engine.set_relay(st)
        self._engine.set_waker(st, lambda: self._ready_up(rel))
        if st.queue or st.ended:
            self._ready_up(rel)
        return rel

    def _relay_cap(self) -> int:
        """Relays we may hold open: ours and the far side's limit, the smaller."""
        return min(self.limits.max_relays, self._far.max_relays if self._far is not None else 1)

    def _open_relay(self, st: PortState) -> int:
        """A port state leaving in a message: a new relay of ours (the
        caller checked ``_relay_cap``)."""
        n = self._next
        self._next += 2
        self._add(n, st)
        return n

    def _ready_up(self, rel: _Relay) -> None:
        """``rel`` has something to send (a relay end's waker, or credit came)."""
        if not rel.queued and self._relays.get(rel.number) is rel:
            rel.queued = True
            self._ready.append(rel)
            if not self._in_pass and not self._kicked:
                # forward at the end of this loop turn, everything that got
                # ready in it at once (one write), without a task switch
                self._kicked = True
                self._loop.call_soon(self._kick)

    def _drop(self, rel: _Relay) -> None:
        if self._relays.get(rel.number) is rel:
            del self._relays[rel.number]
        self._engine.set_waker(rel.st, None)
        head, rel.head = rel.head, None
        if head is not None:
            self._engine.dispose(Message(head[0], None, head[1], head[2] or None))

    # ------------------------------------------------------------ writing

    def _write(self, data: bytes | memoryview) -> None:
        self._writer.write(data)
        self.bytes_out += len(data)
        self._last_written = self._loop.time()

    def _frame(self, data: bytes, *, now: bool = False) -> None:
        """A control frame. Credit, PONG and closes back join the batch the
        next pass writes (at the end of this loop turn, with the replies the
        messages just delivered make: one write, one wake-up of the far side);
        ``now`` writes it at once. No message frame is ever held back between
        passes, so order within a relay holds. Control frames answer what
        the far side sends; one that does not read them cannot make us hold
        more than ``CONTROL_SLACK`` beyond the write buffer."""
        if self._closed:
            return
        if self._out_len + self._unsent() > self.limits.write_buffer_bytes + CONTROL_SLACK:
            self._end("the far side does not read what it asks us to write")
            return
        self.frames_out += 1
        self._out.append(data)
        self._out_len += len(data)
        if now or self._out_len >= COALESCE_BYTES:
            self._flush_out()
        elif not self._in_pass and not self._kicked:
            self._kicked = True
            self._loop.call_soon(self._kick)

    def _emit(self, part: bytes | memoryview) -> None:
        """Part of a message frame: small ones are joined into one write."""
        if len(part) >= COALESCE_BYTES:
            self._flush_out()
            self._write(part)
            return
        self._out.append(part)
        self._out_len += len(part)
        if self._out_len >= COALESCE_BYTES:
            self._flush_out()

    def _flush_out(self) -> None:
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self._out_len = 0
            self._write(data)

    def _unsent(self) -> int:
        transport = self._writer.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def _kick(self) -> None:
        self._kicked = False
        if self._closed or self._draining:
            return  # the pump goes on once the stream has drained
        try:
            if self._pass():
                self._wake.set()  # the stream's buffer is full: the pump waits for it
        except (OSError, RuntimeError) as exc:  # the stream broke under a write
            self._end(f"the stream broke: {exc!r}")
        except Exception as exc:  # a bug here must end the link loudly, not hang its ports
            log.exception("boundary link %s: the gateway failed", self.label)
            self._end(f"the gateway failed: {exc!r}")

    async def _pump(self) -> None:
        """Forward what waits while the stream's buffer is full (the common
        case is ``_kick``, with no task switch)."""
        try:
            while not self._closed:
                await self._wake.wait()
                self._wake.clear()
                self._draining = True
                try:
                    await self._writer.drain()
                finally:
                    self._draining = False
                if not self._closed and self._pass():
                    self._wake.set()
        except (OSError, RuntimeError) as exc:  # the stream broke under a write
            self._end(f"the stream broke: {exc!r}")
        except Exception as exc:  # a bug here must end the link loudly, not hang its ports
            log.exception("boundary link %s: the gateway failed", self.label)
            self._end(f"the gateway failed: {exc!r}")

    def _pass(self) -> bool:
        """Forward what ready relays hold, each up to ``TURN`` messages in
        turn; True if it stopped because the stream's buffer is full."""
        self._in_pass = True
        limit = self.limits.write_buffer_bytes
        try:
            for _ in range(PASS_TURNS):
                if not self._ready or self._closed:
                    return False
                rel = self._ready.popleft()
                rel.queued = False
                if self._relays.get(rel.number) is not rel:
                    continue
                if self._forward(rel) and not rel.queued:
                    rel.queued = True
                    self._ready.append(rel)
                if self._out_len + self._unsent() > limit:
                    return True
            if self._ready and not self._kicked:  # let the loop breathe, then go on
                self._kicked = True
                self._loop.call_soon(self._kick)
            return False
        finally:
            self._flush_out()
            self._in_pass = False
            if not self._ready:
                self._flushed.set()

    def _forward(self, rel: _Relay) -> bool:
        """Send up to ``TURN`` messages of ``rel``; True if it has more to send now."""
        st = rel.st
        eng = self._engine
        limit = self.limits.write_buffer_bytes
        for _ in range(TURN):
            if rel.head is None:
                msg = eng.take(st)
                if msg is None:
                    break
                rel.head = self._prepare(rel, msg)
                if rel.head is None:
                    continue
            kind, body, states = rel.head
            if not rel.tx.can_send(len(body)):
                return False  # a CREDIT wakes it
            rel.head = None
            if states and len(self._relays) + len(states) > self._relay_cap():
                # too many ports crossing: the message crosses as an error
                # (a call: the caller's reply port fails), its ports fail here
                why = MessageError(
                    f"boundary link {self.label}: {len(self._relays)} ports crossing and "
                    f"{len(states)} more in this message exceed the limit of {self._relay_cap()}"
                )
                for ps in states:
                    eng.fail_with(ps, PortFailed(str(why)))
                if kind == K_CALL:
                    continue
                kind = K_REPLY_ERROR if kind >= K_REPLY else K_ERROR
                body, states = eng.codec.encode_error(why), []
            numbers = [self._open_relay(ps) for ps in states]
            rel.tx.sent(len(body))
            if numbers or len(body) >= COALESCE_BYTES:
                parts = encode_msg(rel.number, kind, numbers, body)
                for part in parts:
                    self._emit(part)
                self.frames_out += len(parts) // 2  # a head and a payload each
            else:  # the common case: one small frame, joined into this pass's write
                frame = encode_small(rel.number, kind, body)
                self._out.append(frame)
                self._out_len += len(frame)
                self.frames_out += 1
                if self._out_len >= COALESCE_BYTES:
                    self._flush_out()
            self.messages_out += 1
            if kind >= K_REPLY:
                self._drop(rel)  # a final message: the relay goes with it, on both sides
                return False
            if self._out_len + self._unsent() > limit:
                return True
        if st.queue or rel.head is not None:
            return rel.tx.can_send(len(rel.head[1])) if rel.head is not None else True
        if st.ended:
            if st.error is not None:
                self._emit(encode_fail(rel.number, st.error.cause))
            else:
                self._emit(encode_close(rel.number))
            self.frames_out += 1
            self._drop(rel)
            eng.close(st)
        return False

    def _prepare(self, rel: _Relay, msg: Message) -> tuple[int, bytes, list[PortState]] | None:
        """``msg`` as it crosses: encoded, its fds closed (the message then
        crosses as an error item, or a call is answered with the error)."""
        eng = self._engine
        if msg.body is None:
            try:
                msg = eng.encode_message(msg)
            except MeshError as exc:  # a value that cannot be encoded: this message only
                return (K_ERROR if msg.kind < K_REPLY else K_REPLY_ERROR, eng.codec.encode_error(exc), [])
        raw = msg.body if msg.body is not None else b""
        body = raw if isinstance(raw, bytes) else bytes(raw)
        states = list(msg.ports or ())
        if msg.fds:
            for fd in msg.fds:
                fd.close()
            refusal = MessageError(_FD_REFUSED)
            if msg.kind == K_CALL and states:
                reply = states.pop()
                for ps in states:
                    eng.close(ps)
                answer = Message(K_REPLY_ERROR, None, eng.codec.encode_error(refusal))
                eng.send_message(reply, answer, final=True)
                return None
            for ps in states:
                eng.close(ps)
            if msg.kind >= K_REPLY:
                return (K_REPLY_ERROR, eng.codec.encode_error(refusal), [])
            return (K_ERROR, eng.codec.encode_error(refusal), [])
        return (msg.kind, body, states)

    # ------------------------------------------------------------ reading

    def _take_in(self, data: bytes) -> str | None:
        """Handle what the stream delivered; the cause if it ends the link."""
        try:
            if data:
                self._last_heard = self._loop.time()
                self._decoder.feed(data)
            self._events()
        except BoundaryProtocolError as exc:
            return f"the far side broke the protocol: {exc}"
        except _Goodbye as bye:
            return f"{_BYE}{bye.reason})"
        except (OSError, EOFError) as exc:  # the stream broke under a write
            return f"the stream broke: {exc!r}"
        except Exception as exc:  # a bug here must end the link loudly, not hang its ports
            log.exception("boundary link %s: the gateway failed", self.label)
            return f"the gateway failed: {exc!r}"
        return None

    def _tap(self) -> bool:
        """Read in the stream's own callback: a plain ``StreamReader``'s
        ``feed_data``/``feed_eof``/``set_exception`` (what its protocol
        calls) hand the bytes to us as they arrive, so a message reaches its
        port in the loop turn it arrived in, with no reading task to wake.
        False (the reading task does it) for any other reader, or one that
        has ended already."""
        r = self._reader
        held = getattr(r, "_buffer", None)
        if (type(r) is not asyncio.StreamReader or not isinstance(held, bytearray)
                or r.exception() is not None or getattr(r, "_eof", True)):
            return False
        data = bytes(held)
        held.clear()
        r.feed_data = self._on_data  # type: ignore[method-assign,assignment]
        r.feed_eof = self._on_eof  # type: ignore[method-assign]
        r.set_exception = self._on_broken  # type: ignore[method-assign]
        resume = getattr(r, "_maybe_resume_transport", None)
        if resume is not None:
            resume()  # it may have paused its transport while it held more
        self._on_data(data)
        return True

    def _untap(self) -> None:
        for name in ("feed_data", "feed_eof", "set_exception"):
            vars(self._reader).pop(name, None)

    def _on_data(self, data: bytes) -> None:
        if not self._closed:
            cause = self._take_in(bytes(data))
            if cause is not None:
                self._end(cause)

    def _on_eof(self) -> None:
        self._end("the stream ended (EOF)")

    def _on_broken(self, exc: BaseException) -> None:
        self._end(f"the stream broke: {exc!r}")

    async def _read_loop(self) -> None:
        """Read with a task (a reader ``_tap`` cannot take)."""
        cause = self._take_in(b"")  # what came with the far side's HELLO
        try:
            while cause is None and not self._closed:
                data = await self._reader.read(READ_BYTES)
                if not data:
                    cause = "the stream ended (EOF)"
                    break
                cause = self._take_in(data)
        except (OSError, EOFError) as exc:
            cause = self._read_what_arrived() or f"the stream broke: {exc!r}"
        if cause is not None:
            self._end(cause)

    def _read_what_arrived(self) -> str | None:
        """What the stream had delivered when it broke, still to read: an
        asyncio ``StreamReader`` raises its error before what it holds (a
        failed *write* of ours sets that error), so the far side's last
        messages would be lost though they had arrived. Processes them;
        returns a better cause if they end the link in order."""
        held = getattr(self._reader, "_buffer", None)
        if not isinstance(held, bytearray) or not held:
            return None
        data = bytes(held)
        held.clear()
        cause = self._take_in(data)
        return cause if cause is not None and cause.startswith(_BYE) else None

    def _events(self) -> None:
        dec = self._decoder
        while True:
            ev = dec.next_event()
            if ev is None:
                break
            self._on(ev)
        for rel in self._touched:
            self._give_credit(rel)
        self._touched.clear()

    def _on(self, ev: Event) -> None:
        if isinstance(ev, Msg):
            self._on_msg(ev)
        elif isinstance(ev, Credit):
            rel = self._relays.get(ev.relay)
            if rel is not None:
                rel.tx.credited(ev.messages, ev.nbytes)
                self._credited.set()
                if rel.st.queue or rel.head is not None:
                    self._ready_up(rel)
        elif isinstance(ev, Close):
            rel = self._relays.get(ev.relay)
            if rel is not None:
                self._drop(rel)
                self._engine.close(rel.st)
        elif isinstance(ev, Fail):
            rel = self._relays.get(ev.relay)
            if rel is not None:
                self._drop(rel)
                self._engine.fail_with(rel.st, PortFailed(ev.cause))
        elif isinstance(ev, Ping):
            if self._unsent() <= self.limits.write_buffer_bytes:
                self._frame(encode_pong(ev.token))
        elif isinstance(ev, Pong):
            pass  # being heard is what counts
        elif isinstance(ev, Goodbye):
            raise _Goodbye(ev.reason)
        else:
            raise BoundaryProtocolError("a second HELLO")

    def _on_msg(self, ev: Msg) -> None:
        eng = self._engine
        far_parity = 1 - (self._next & 1)
        r = ev.relay
        if r and (r >= self._next if r & 1 != far_parity else r > self._far_max):
            raise BoundaryProtocolError(f"a message for relay {r}, which was never opened")
        for n in ev.ports:
            if n & 1 != far_parity or n <= self._far_max:
                raise BoundaryProtocolError(
                    f"the far side opened relay {n}, which is not its to open (or not a new one)"
                )
            self._far_max = n
        if len(self._relays) + len(ev.ports) > 2 * self.limits.max_relays:
            raise BoundaryProtocolError(
                f"the far side opened more than {2 * self.limits.max_relays} relays "
                f"(twice the limit of {self.limits.max_relays})"
            )
        self.messages_in += 1
        rel = self._relays.get(ev.relay)
        if rel is None:
            # the relay ended here (a CLOSE crossed this message): what it
            # carries goes nowhere, so the ports in it are closed back
            for n in ev.ports:
                self._frame(encode_close(n))
            return
        rel.rx.received(len(ev.body))
        ends: list[PortState] = []
        for n in ev.ports:
            ours, theirs = eng.new_pair()
            self._add(n, ours)
            ends.append(theirs)
        msg = Message(ev.kind, None, ev.body, ends or None)
        final = ev.kind >= K_REPLY
        if final:
            self._drop(rel)
        try:
            eng.send_message(rel.st, msg, final)
        except ChannelClosed:
            pass  # our end is closed: disposed, as a send to a closed peer is
        except MeshError as exc:  # it could not be handed on here: this message only
            log.warning("boundary link %s: a message for relay %d was dropped: %s", self.label, ev.relay, exc)
        if final:
            return
        rel.rx.done(len(ev.body))
        self._touched.add(rel)

    def _give_credit(self, rel: _Relay) -> None:
        """Give back what ``rel`` received, while its local peer is under its
        window; else once it is."""
        if self._closed or self._relays.get(rel.number) is not rel:
            return
        eng = self._engine
        if eng.over_window(rel.st):
            if not rel.watching:
                rel.watching = True

                def later() -> None:
                    rel.watching = False
                    self._give_credit(rel)

                eng.watch_credit(rel.st, later)
            return
        got = rel.rx.release(force=True)
        if got is not None:
            self._frame(encode_credit(rel.number, *got))

    # ------------------------------------------------------------ liveness and the end

    async def _heartbeat(self) -> None:
        lim = self.limits
        far = self._far
        # we PING after this much silence: our own interval, or less when the
        # far side's loss bound is shorter (a third of it)
        interval = lim.heartbeat_interval
        if far is not None:
            interval = max(MIN_PING_INTERVAL, min(interval, far.heartbeat_timeout / 3))
        period = min(lim.heartbeat_interval, interval) / 2
        while not self._closed:
            await asyncio.sleep(period)
            now = self._loop.time()
            if now - self._last_heard > lim.heartbeat_timeout:
                self._end(
                    f"nothing heard from the far side for {lim.heartbeat_timeout:g} s (heartbeats unanswered)"
                )
                return
            if now - self._last_written >= interval:
                self._ping += 1
                self._frame(encode_ping(self._ping), now=True)

    def _end(self, cause: str, *, ours: bool = False) -> None:
        """The link is over: fail every relay, stop, close the stream."""
        if self._closed:
            return
        self._closed = True
        self._untap()
        err = LinkFailure(self.label, cause)
        relays = list(self._relays.values())
        self._relays.clear()
        for rel in relays:
            self._drop(rel)
            self._engine.fail_with(rel.st, err)
        me = asyncio.current_task()
        for t in list(self._tasks):
            if t is not me:
                t.cancel()
        if ours:
            self._lingering = self._loop.create_task(self._linger())
        else:
            with contextlib.suppress(Exception):
                self._writer.close()
        if not self._done.done():
            self._done.set_result(None if ours else err)
        if ours:
            return
        if cause.startswith(_BYE):  # an orderly end: a remote worker exited, a client left
            log.info("boundary link %s closed by the far side (GOODBYE: %s", self.label, cause[len(_BYE) :])
        else:  # a real loss
            log.warning("%s", err)

    async def _linger(self) -> None:
        """After our GOODBYE: end our half of the stream and read (dropping
        it) what the far side still sends until it closes its half, for at
        most ``LINGER`` seconds, then close. Closing at once could make the
        far side's next write fail, and a failed write can hide from its
        reader what had arrived before our GOODBYE."""
        w = self._writer
        try:
            with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
                if w.can_write_eof():
                    w.write_eof()
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                async with asyncio.timeout(LINGER):
                    while await self._reader.read(READ_BYTES):
                        pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    def close(self) -> None:
        """``aclose`` without waiting for the stream to close (what a closing
        ``Mesh`` calls)."""
        if not self._closed:
            self._frame(encode_goodbye("closed"), now=True)
            self._end("closed by this side", ours=True)

    async def aclose(self, *, flush: float = 5.0) -> None:
        """Send what crossing ports hold (for up to ``flush`` seconds: the far
        side's credit permitting), say GOODBYE and close the stream; every
        crossing port fails with ``LinkFailure`` ("closed by this side").
        Safe to call twice."""
        if not self._closed and flush > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush):
                    while not self._closed:
                        sendable, awaiting = self._pending()
                        if sendable:
                            self._flushed.clear()
                            if not self._draining and self._pass():
                                self._wake.set()
                            await self._flushed.wait()
                        elif awaiting:  # blocked until the far side gives credit back
                            self._credited.clear()
                            await self._credited.wait()
                        else:
                            break
                    if not self._closed:
                        await self._writer.drain()
        self.close()
        if self._lingering is not None:
            await asyncio.shield(self._lingering)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_closed(self) -> BaseException | None:
        """Wait for the link to end; its cause (a ``LinkFailure``), or None
        when this side closed it."""
        return await asyncio.shield(self._done)

    def _pending(self) -> tuple[bool, bool]:
        """Whether a relay has a message it may send now, and whether one
        waits for credit the far side still owes."""
        sendable = awaiting = bool(self._ready)
        for r in self._relays.values():
            if r.head is not None or r.st.queue:
                n = len(r.head[1]) if r.head is not None else 0
                if r.tx.can_send(n):
                    sendable = True
                elif r.tx.messages:
                    awaiting = True
        return sendable, awaiting

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> GatewayStats:
        qm = qb = wm = wb = held = 0
        for rel in self._relays.values():
            q = rel.st.queue
            qm += len(q)
            for m in q:
                qb += len(m.body or b"")
            wm += rel.tx.messages
            wb += rel.tx.nbytes
            if rel.head is not None:
                held += len(rel.head[1])
        return GatewayStats(
            label=self.label,
            relays=len(self._relays),
            bytes_in=self._decoder.fed,
            bytes_out=self.bytes_out,
            frames_in=self._decoder.frames,
            frames_out=self.frames_out,
            messages_in=self.messages_in,
            messages_out=self.messages_out,
            buffered_bytes=self._unsent() + self._decoder.buffered + held,
            queued_messages=qm,
            queued_bytes=qb,
            window_messages=wm,
            window_bytes=wb,
            closed=self._closed,
        )

    def __repr__(self) -> str:
        return f"<Gateway {self.label} relays={len(self._relays)}{' closed' if self._closed else ''}>"


class _Goodbye(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
