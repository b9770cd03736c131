"""Handles and RPC: ``Port``, ``Sender``, ``Receiver``, ``channel()`` and ``Call``.

This module's one job is what the application holds: handles that sit on
port states of an engine, and RPC on top of them. Ports created outside any
mesh live in the process's default engine; they join a mesh node
(``Engine.adopt``) the first time one of them is sent through it. Within one
process nothing is serialized: the object you send is the object the
receiver gets. What a handle becomes inside a message to another process is
registered here with the codec (``_codec.register_handle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import traceback
import typing
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, cast, overload

from . import _codec
from ._codec import (
    ANY_PLAIN_DECODER,
    CODEC,
    DECODE_ERRORS,
    Failure,
    ResourceTables,
    check_encodable,
    decode,
    encode_plain,
    plain_decoder,
    refused,
)
from ._errors import ChannelClosed, MeshError, MessageError, RemoteError, remote_type_name
from ._ids import NodeId
from ._ports import Engine, Message, PortState, TracedMessage
from ._trace import TRACING, Trace, current_deadline, parse_prefix, prefix, with_deadline
from ._trace import handling as _handling
from ._wire import FD_BODY, K_ADD_SENDER, K_CALL, K_DATA, K_ERROR, K_REPLY, K_REPLY_ERROR

T = TypeVar("T")
if TYPE_CHECKING:  # a default (PEP 696): a bare ``Port`` is a ``Port[Any]``
    from typing_extensions import TypeVar as _DefaultingTypeVar

    M = _DefaultingTypeVar("M", default=Any)
else:
    M = TypeVar("M")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
log = logging.getLogger("meshipc")

# Extension type codes of the handles inside message bodies (registered with
# the codec at the end of this module). Part of the wire format: never
# renumber; _codec.EXT_FD is 4.
EXT_PORT: Final = 1
EXT_SENDER: Final = 2
EXT_RECEIVER: Final = 3

_get_ident = threading.get_ident

#: The ready list and scheduled set of a receiving end nothing was scheduled
#: on yet: shared and empty (an empty deque and set are 800 bytes, and most
#: ends of an idle mesh never receive). ``_Inbox._own_ready`` swaps in its
#: own before the first is scheduled; nothing mutates these.
_NO_READY: Final = cast("deque[PortState]", ())
_NO_SCHED: Final = cast("set[PortState]", frozenset())
#: Held while an end swaps in its own (a wake from another thread may race
#: with the owner's: one swap only, else a scheduled end could be lost)
_OWN_READY_LOCK: Final = threading.Lock()

#: a sender's peer closed: its holder closed it, or its process (a service,
#: the other side of an attachment) exited
_RECEIVER_GONE: Final = "the receiver is gone (closed by its holder, or its process exited)"

@dataclass(frozen=True)
class ChannelStatistics:
    """A snapshot of one channel end (``statistics()`` on a ``Sender``,
    ``Receiver`` or ``Port``)."""

    #: items received and not read yet: messages (and the notice a
    #: ``clone()`` sends, until the next read takes it)
    queued: int
    #: port ends behind this handle: a ``Receiver`` merges one per sender
    #: that ever sent to it (and is still open); 0 once closed or sent away
    ends: int
    #: messages sent to another process that its reader has not consumed
    #: yet (what ``drain()`` and ``BufferFull`` count), and their bytes
    in_flight: int
    in_flight_bytes: int
    #: this end was closed or sent away
    closed: bool
    #: the other side of one of its ends closed (normally)
    peer_closed: bool
    #: the failure that ended one of its ends, if any
    error: MeshError | None


# the process's default engine: ports that never left this process
_local_engine = Engine(NodeId.random(), codec=CODEC)


def default_engine() -> Engine:
    return _local_engine


def _on_engine_thread(eng: Engine) -> bool:
    return eng.thread == threading.get_ident()


def _from_thread(st: PortState, fn: Any, *args: Any, handle: _Handle | None = None) -> None:
    """Run an engine call for ``st`` from a thread that does not drive its
    engine: under the engine's lock when no loop drives it, else on the
    loop's thread (in order per calling thread). There it is queued on the
    state (``PortState.posted``), which the engine empties before the state
    closes or moves: a close or a move on the loop never overtakes a call
    accepted here. With ``handle``: accepted only while ``st`` is still the
    handle's (it detaches under the same lock), else ``ChannelClosed``."""
    while True:
        eng = st.engine
        if eng.post is None:
            with eng.lock:
                if st.engine is not eng:
                    continue  # adopted by a mesh node meanwhile
                fn(eng, *args)
            return
        if _on_engine_thread(eng):
            fn(eng, *args)
            return
        with eng.lock:
            if st.engine is not eng:
                continue
            if handle is not None and not (handle._states and handle._states[0] is st):
                raise ChannelClosed(f"send on a closed or sent {type(handle).__name__}")
            if eng.add_posted(st, _run_posted, (st, fn, args)):  # else a run is already on its way
                try:
                    eng.post(eng.run_posted, st)
                except RuntimeError:
                    eng.drop_posted(st)
                    raise ChannelClosed("the event loop of this port's mesh is closed") from None
        return


def _run_posted(st: PortState, fn: Any, args: tuple[Any, ...]) -> None:
    try:
        fn(st.engine, *args)
    except MeshError as exc:  # raised in the caller's thread had it been on the loop
        log.warning("a send from another thread was dropped: %s", exc)


def _body(eng: Engine, st: PortState, value: Any) -> bytes | None:
    """The bytes ``value`` goes as when ``st`` sends it to another process
    (None: its peer is here or gone, or it has ports or fds, which the full
    encoder takes): every value is encoded by the sender, on its own thread,
    here. ``MessageError`` for a value that cannot go."""
    if st.peer_node == eng.node_id or st.peer_closed or st.error is not None:
        return None
    try:
        return encode_plain(value)
    except Exception as exc:
        raise refused(exc) from None


def _engine_send(eng: Engine, st: PortState, kind: int, value: Any) -> None:
    eng.send_value(st, kind, value, _body(eng, st, value))


def _engine_send_encoded(eng: Engine, st: PortState, kind: int, value: Any, body: bytes | None) -> None:
    """A send from another thread, admitted and encoded there (``force``:
    past the hard limit; no trace context: this runs in the loop's)."""
    eng._send_value(st, kind, value, body, force=True)


def _engine_close(eng: Engine, st: PortState) -> None:
    eng.close(st)


class _Handle:
    """Common base of Port, Sender and Receiver: owns port states."""

    __slots__ = ("__weakref__", "_states")
    _states: list[PortState]

    def __init__(self) -> None:
        raise TypeError(f"use meshipc.channel() or Port.pair() to make a {type(self).__name__}")

    def _detach(self) -> list[PortState]:
        states = self._states
        if not states:
            return []
        # under the lock other threads' sends take (see _from_thread): once
        # detached, none is accepted, and those accepted are queued on the
        # state, ahead of whatever happens to it next
        with states[0].engine.lock:
            states, self._states = self._states, []
        for st in states:
            st.engine.set_waker(st, None)
        return states

    def close(self) -> None:
        """Close this end (idempotent, from any thread). The other side sees
        ``ChannelClosed`` once it has read what was already sent."""
        for st in self._detach():
            if _on_engine_thread(st.engine):
                st.engine.close(st)
            else:
                _from_thread(st, _engine_close, st)

    @property
    def closed(self) -> bool:
        return not self._states

    def statistics(self) -> ChannelStatistics:
        """What this end holds now (a snapshot: other threads may change it
        the next moment). Never raises."""
        states = list(self._states)
        queued = messages = nbytes = 0
        error: MeshError | None = None
        peer_closed = False
        for st in states:
            peer_closed = peer_closed or st.peer_closed
            queued += len(st.queue)
            m, b = st.engine.in_flight(st)
            messages += m
            nbytes += b
            if error is None and st.error is not None:
                error = st.error
        return ChannelStatistics(queued, len(states), messages, nbytes, not states, peer_closed, error)

    def __del__(self) -> None:
        if getattr(self, "_states", None):
            try:
                self.close()
            except (MeshError, RuntimeError):  # RuntimeError: its event loop is closed
                pass

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} cannot be pickled; send it in a mesh message instead")

    async def drain(self) -> None:
        """Return once this end is back under its flow-control window (what
        the receiver has not consumed yet, see ``meshipc.Limits``); at once if
        it is. A producer that awaits ``drain()`` after sends never gets
        ``BufferFull``: it waits for a slow or stopped consumer. Raises
        ``ChannelClosed`` if this end was closed or the receiver closed,
        ``PortFailed`` if the receiver is gone abnormally."""
        while True:
            if not self._states:
                raise ChannelClosed(f"drain on a closed or sent {type(self).__name__}")
            st = self._states[0]
            eng = st.engine
            if not _on_engine_thread(eng) and eng.post is not None:
                raise MeshError("drain() must run on the event loop thread of the port's mesh")
            if st.error is not None:
                raise st.error
            if st.peer_closed:
                raise ChannelClosed(_RECEIVER_GONE)
            if not eng.over_window(st):
                return
            fut = asyncio.get_running_loop().create_future()

            def wake(fut: asyncio.Future[None] = fut) -> None:
                if not fut.done():
                    fut.set_result(None)

            eng.watch_credit(st, wake)
            await fut


_H = TypeVar("_H", bound=_Handle)


def _send(h: _Handle, kind: int, value: Any) -> None:
    if not h._states:
        CODEC.dispose(value)
        raise ChannelClosed(f"send on a closed or sent {type(h).__name__}")
    st = h._states[0]
    if value is h:
        raise MessageError(f"a {type(h).__name__} cannot be sent through itself")
    eng = st.engine
    if _on_engine_thread(eng):
        eng.send_value(st, kind, value, _body(eng, st, value))
    elif eng.post is None:
        _from_thread(st, _engine_send, st, kind, value)
    else:
        # another thread: check what can be checked here, so the error is
        # raised to this caller, then hand the send to the loop (in order)
        if st.sent_lost and st.error is not None:
            raise st.error
        if eng.over_hard_limit(st):
            raise eng._full(st)
        try:
            plain = encode_plain(value)
        except Exception as exc:
            raise refused(exc) from None
        # encoded once, here: the loop ships these bytes (or, for a value with
        # ports or fds, goes straight to the full encoder)
        if plain is None:
            check_encodable(value)
        _from_thread(st, _engine_send_encoded, st, kind, value, plain, handle=h)


class _Inbox(_Handle):
    """Receiving side: one or more port states, one queue of readiness."""

    #: a Receiver merges many senders' ports; a Port is one end of one pair
    _merges = True

    __slots__ = (
        "_call",
        "_calls_only",
        "_error",
        "_foreign",
        "_fut",
        "_last_node",
        "_loop",
        "_more",
        "_plain_dec",
        "_ready",
        "_sched",
        "_thread",
        "_type",
        "bad_messages",
    )

    def _init_inbox(self, states: list[PortState], tp: Any) -> None:
        self._states = []
        self._ready: deque[PortState] = _NO_READY  # own ones from the first wake on
        self._sched: set[PortState] = _NO_SCHED
        self._fut: asyncio.Future[None] | None = None
        self._more: list[asyncio.Future[None]] | None = None
        self._set_type(tp)
        self._error: MeshError | None = None
        # the loop this end waits on, and its thread: a wake from any other
        # thread is handed to that loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.get_ident()
        self._foreign = False  # woken from another thread at least once
        self._last_node = b""  # node of the last message taken (for bad-message reports)
        #: messages from other processes dropped because they did not decode
        #: or validate (each is logged with the node that sent it)
        self.bad_messages = 0
        for st in states:
            self._add(st)

    def _set_type(self, tp: Any) -> None:
        """What this end validates messages from other processes against; a
        ``Call[T]`` receiver (a server's) takes calls only, with ``T`` requests."""
        origin = tp if isinstance(tp, type) else typing.get_origin(tp)
        self._calls_only = isinstance(origin, type) and issubclass(origin, Call)
        self._call = origin if self._calls_only else Call
        if self._calls_only:
            args = typing.get_args(tp)
            tp = args[0] if args else Any
        self._type = tp
        self._plain_dec = plain_decoder(tp)  # built once, not looked up per message

    def _add(self, st: PortState) -> None:
        self._states.append(st)
        # a weak reference: the engine's table must not keep a dropped handle alive
        ref = weakref.ref(self)

        def waker() -> None:
            h = ref()
            if h is None:
                return
            if h._thread == _get_ident():
                # _wake and _wake_waiters, inlined for the one waiting task
                # (two Python frames per message received)
                if st not in h._sched:
                    if h._ready is _NO_READY:
                        h._own_ready()
                    h._sched.add(st)
                    h._ready.append(st)
                fut = h._fut
                if fut is not None and not fut.done():
                    fut.set_result(None)
                if h._more:
                    h._wake_waiters()
                return
            h._foreign = True
            loop = h._loop
            if loop is None:
                h._wake(st)  # nobody waits yet; _next_message rescans
            else:
                try:
                    loop.call_soon_threadsafe(h._wake, st)
                except RuntimeError:
                    pass  # that loop is closed: a later wait rebinds and rescans

        st.engine.set_waker(st, waker)
        if st.queue or st.ended:
            self._wake(st)

    def _own_ready(self) -> None:
        """Give this end its own ready list and scheduled set (see ``_NO_READY``)."""
        with _OWN_READY_LOCK:
            if self._ready is _NO_READY:
                self._sched = set()  # first: whoever sees the new list finds its set
                self._ready = deque()

    def _wake(self, st: PortState) -> None:
        if st not in self._sched:
            if self._ready is _NO_READY:
                self._own_ready()
            self._sched.add(st)
            self._ready.append(st)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)
        more = self._more
        if more:
            self._more = None
            for f in more:
                if not f.done():
                    f.set_result(None)

    def _detach(self) -> list[PortState]:
        self._ready = _NO_READY
        self._sched = _NO_SCHED
        self._wake_waiters()  # a task blocked in recv() sees the close
        return super()._detach()

    def _rescan(self) -> bool:
        """After wakes from other threads: schedule every end with something
        to read (a wake racing with ``_next_message`` may have been missed)."""
        found = False
        for st in self._states:
            if (st.queue or st.ended) and st not in self._sched:
                if self._ready is _NO_READY:
                    self._own_ready()
                self._sched.add(st)
                self._ready.append(st)
                found = True
        return found

    async def _wait(self) -> None:
        """Wait until something may be readable. Several tasks may wait on one
        end; each has its own future, so cancelling one leaves the others."""
        loop = self._loop
        # the bound loop reused while it runs on this thread (only one loop
        # runs per thread): asyncio.get_running_loop() makes a getpid()
        # system call each time
        if loop is None or self._thread != _get_ident() or not loop.is_running():
            loop = asyncio.get_running_loop()
        if self._loop is not loop:
            old = self._loop
            if old is not None and old.is_running() and self._thread != threading.get_ident():
                raise MeshError(f"this {type(self).__name__} is in use on another thread's event loop")
            self._loop = loop
            self._thread = threading.get_ident()
        fut = loop.create_future()
        cur = self._fut
        if cur is None or cur.done():
            self._fut = fut
        else:
            if self._more is None:
                self._more = []
            self._more.append(fut)
        if self._foreign and self._rescan():
            fut.set_result(None)
        try:
            await fut
        finally:
            if self._fut is fut:
                self._fut = None
            elif self._more is not None and fut in self._more:
                self._more.remove(fut)

    def _next_message(self) -> Message | None:
        """A queued message, or None; raises at the end of the stream."""
        ready = self._ready
        if not ready and self._foreign:
            self._rescan()
        while ready:
            st = ready[0]
            q = st.queue
            if q:
                msg = q.popleft()
                if not q:
                    if not st.ended:
                        ready.popleft()
                        self._sched.discard(st)
                elif len(ready) > 1:
                    ready.rotate(-1)  # round-robin between merged senders
                body = msg.body
                if body is not None:
                    # flow control: a remote sender counts this off its window
                    self._last_node = st.peer_node
                    st.engine.took(st, body)
                elif st.credit is not None:
                    st.engine.took(st, None)  # a local sender waits in drain()
                return msg
            ready.popleft()
            self._sched.discard(st)
            if st.ended and st in self._states and self._merges:
                # one of several senders is gone: drop it. A failure is
                # reported when it ends the stream (the last sender), or at
                # once when items of this sender may have been lost (the
                # stream must not end cleanly with a hole in it); else one
                # client dying must not end a server's loop over many
                self._states.remove(st)
                st.engine.set_waker(st, None)
                self._error = st.error
                if st.error is not None and (st.lost or not self._states):
                    raise st.error
        if not self._merges:
            # a single port keeps its state until closed: the end is sticky and
            # later sends are dropped, as on a socket whose peer has gone
            if not self._states:
                raise ChannelClosed("the port was closed or sent away")
            st = self._states[0]
            if st.ended and not st.queue:
                if st.error is not None:
                    raise st.error
                raise ChannelClosed("the peer port is closed")
            return None
        if not self._states:
            if self._error is not None:
                raise self._error
            raise ChannelClosed("every sender is closed")
        return None

    def _drop_bad(self, exc: MessageError) -> Any:
        """A message from another process that does not decode or validate:
        logged with its node, counted, dropped; the stream goes on."""
        self.bad_messages += 1
        log.warning(
            "dropped a bad message from node %s on %r (%d so far): %s",
            self._last_node.hex()[:12],
            self,
            self.bad_messages,
            exc,
        )
        return _SKIP

    def _value_of(self, msg: Message) -> Any:
        kind = msg.kind
        if kind == K_REPLY:
            kind = K_DATA  # a peer's last message; the end follows
        elif kind == K_REPLY_ERROR:
            kind = K_ERROR
        if kind == K_DATA:
            if self._calls_only:
                _local_engine.dispose(msg)
                return self._drop_bad(MessageError("a plain message on a channel of calls"))
            body = msg.body
            if body is None:
                return msg.obj
            if msg.ports is None and msg.fds is None:
                try:  # the common message: decode inline with this end's decoder
                    return self._plain_dec.decode(body)
                except DECODE_ERRORS as exc:
                    return self._drop_bad(MessageError(f"invalid message: {exc}"))
            try:
                return decode(msg, self._type)
            except MessageError as exc:
                return self._drop_bad(exc)
        if kind == K_CALL:
            if msg.body is None:
                cm: _CallMsg = msg.obj
                if type(msg) is TracedMessage:
                    return self._traced(self._call(cm.request, cm.reply), msg.trace)
                return self._call(cm.request, cm.reply)
            ports = msg.ports
            if not ports:
                _local_engine.dispose(msg)
                return self._drop_bad(MessageError("a call without its reply port"))
            reply = ports[-1]  # the reply port comes last (the Call holds its state)
            try:
                if len(ports) == 1 and not msg.fds:
                    try:  # the common request: decode inline with this end's decoder
                        req = self._plain_dec.decode(msg.body)
                    except DECODE_ERRORS as e:
                        raise MessageError(f"invalid message: {e}") from None
                else:
                    req = decode(Message(K_CALL, None, msg.body, ports[:-1], msg.fds), self._type)
            except MessageError as exc:
                Call(None, reply).fail(exc)  # tell the caller why, instead of hanging up
                return self._drop_bad(exc)
            if type(msg) is TracedMessage:
                return self._traced(self._call(req, reply), msg.trace)
            return self._call(req, reply)
        if kind == K_ADD_SENDER:
            if msg.body is None:
                sender = msg.obj
            else:
                try:
                    sender = decode(msg, Sender)
                except MessageError as exc:
                    return self._drop_bad(exc)
            if isinstance(self, Receiver):
                for st in sender._detach():
                    self._add(st)  # one more sender merged into this receiver
            else:
                sender.close()  # a raw port has no use for it
            return _SKIP
        if msg.body is None:
            why: Failure = msg.obj
            raise MessageError(f"{why.type_name}: {why.message}")
        # K_ERROR where data was expected: a value that could not be encoded
        # when its port moved, or a peer bug; this message only
        try:
            why = decode(msg, Failure)
        except MessageError as exc:
            return self._drop_bad(exc)
        raise MessageError(f"{why.type_name}: {why.message}")

    def _traced(self, call: Call[Any], wire: bytes) -> Any:
        """``call`` with the context its message carried, or, for a
        malformed one, failed (the caller learns why) and dropped."""
        try:
            call._ctx = parse_prefix(wire)
        except MessageError as exc:
            call.fail(exc)
            return self._drop_bad(exc)
        return call

    def _poll(self) -> Any:
        """The next value, or ``_EMPTY``; raises at the end of the stream."""
        while True:
            msg = self._next_message()
            if msg is None:
                return _EMPTY
            body = msg.body
            if msg.kind == K_DATA and body is not None and msg.ports is None and msg.fds is None:
                # the common message (``_value_of``'s first case, one call less):
                # decode inline with this end's decoder
                if not self._calls_only:
                    try:
                        return self._plain_dec.decode(body)
                    except DECODE_ERRORS as exc:
                        self._drop_bad(MessageError(f"invalid message: {exc}"))
                        continue
            value = self._value_of(msg)
            if value is not _SKIP:
                return value

    def try_recv(self) -> Any:
        """The next message if one is queued; raises ``asyncio.QueueEmpty`` if
        none is, ``ChannelClosed``/``PortFailed`` at the end of the stream."""
        value = self._poll()
        if value is _EMPTY:
            raise asyncio.QueueEmpty
        return value

    def _poll_many(self, limit: int) -> list[Any]:
        """Up to ``limit`` values queued now (``[]``: none). The first as
        ``_poll`` takes it (which raises at the end of the stream); then the
        plain data messages queued behind it, sender by sender, decoded in
        one loop with the flow-control bookkeeping once per sender
        (``Engine.took_run``). It stops before anything else (a call, an
        end, a message with ports or fds): the next poll takes that."""
        first = self._poll()
        if first is _EMPTY:
            return []
        out = [first]
        if self._calls_only:
            return out
        ready, dec = self._ready, self._plain_dec.decode
        while ready and len(out) < limit:
            st = ready[0]
            q = st.queue
            n = nbytes = 0
            try:
                while q and len(out) < limit:
                    msg = q[0]
                    if msg.kind != K_DATA or msg.ports is not None or msg.fds is not None:
                        break
                    q.popleft()
                    body = msg.body
                    if body is None:  # from this process: the object itself
                        out.append(msg.obj)
                        continue
                    n += 1
                    nbytes += len(body)
                    try:
                        out.append(dec(body))
                    except DECODE_ERRORS as exc:
                        self._last_node = st.peer_node
                        self._drop_bad(MessageError(f"invalid message: {exc}"))
            finally:
                st.engine.took_run(st, n, nbytes)
            if q or st.ended:
                break  # something else next, or the end: the next poll takes it
            ready.popleft()
            self._sched.discard(st)
        return out

    async def recv_many(self, max: int = 1024) -> list[Any]:
        """Every message queued now, at most ``max`` (at least one: waits
        for it, as ``recv``), in order per sender. Ends as ``recv`` does:
        ``ChannelClosed``/``PortFailed`` once nothing is left before the end
        (the messages before it come first). For a stream of small messages
        this costs less per message than ``recv``: one wait, and one decode
        loop and flow-control count per batch. ``ValueError`` for ``max`` < 1."""
        if max < 1:
            raise ValueError(f"recv_many(max) takes at least 1, got {max!r}")
        while True:
            out = self._poll_many(max)
            if out:
                return out
            await self._wait()

    async def recv(self) -> Any:
        """The next message. Raises ``ChannelClosed`` once every sender is
        closed, ``PortFailed`` if the last one failed, or (a merged receiver)
        in its place in the stream when one sender's messages may have been
        lost; the other senders' messages follow. A message from another process
        that does not decode or validate is dropped and logged (counted in
        ``bad_messages``); the channel goes on."""
        while True:
            value = self._poll()
            if value is not _EMPTY:
                return value
            await self._wait()

    async def recv_traced(self) -> tuple[Any, Trace | None]:
        """As ``recv``, with the trace context the message carried: the
        sender's trace (its span the ``span_id``), or None (it was sent with
        none set, from another thread, or with ports or fds). A message
        whose context is malformed is dropped as a bad one."""
        while True:
            msg = self._next_message()
            if msg is None:
                await self._wait()
                continue
            trace = None
            if type(msg) is TracedMessage:
                try:
                    trace = parse_prefix(msg.trace)[0]
                except MessageError as exc:
                    _local_engine.dispose(msg)
                    self._drop_bad(exc)
                    continue
            value = self._value_of(msg)
            if value is not _SKIP:
                return value, trace

    def __aiter__(self) -> _Inbox:
        return self

    async def __anext__(self) -> Any:
        # recv() inlined: one coroutine per message instead of two
        while True:
            try:
                value = self._poll()
            except ChannelClosed:
                raise StopAsyncIteration from None
            if value is not _EMPTY:
                return value
            await self._wait()


_SKIP = object()
_EMPTY = object()


class Port(_Inbox, Generic[M]):
    """A raw bidirectional port: one end of a pair. ``send`` never blocks.
    ``Port[M]`` carries ``M`` both ways (a bare ``Port`` is ``Port[Any]``)."""

    __slots__ = ()
    _merges = False

    @overload
    @staticmethod
    def pair() -> tuple[Port[Any], Port[Any]]: ...
    @overload
    @staticmethod
    def pair(tp: type[M]) -> tuple[Port[M], Port[M]]: ...
    @overload
    @staticmethod
    def pair(tp: Any) -> tuple[Port[Any], Port[Any]]: ...
    @staticmethod
    def pair(tp: Any = Any) -> tuple[Port[Any], Port[Any]]:
        """Two connected ports in this process; ``Port.pair(M)`` gives
        ``Port[M]`` ends that validate what comes from other processes
        against ``M``."""
        a, b = _local_engine.new_pair()
        return Port._wrap([a], tp), Port._wrap([b], tp)

    @classmethod
    def _wrap(cls, states: list[PortState], tp: Any = Any) -> Port[Any]:
        self = object.__new__(cls)
        self._init_inbox(states, tp)
        return self

    if TYPE_CHECKING:  # the inherited methods, typed for M (no wrapper at run time)

        async def recv(self) -> M: ...

        async def recv_many(self, max: int = 1024) -> list[M]: ...

        def try_recv(self) -> M: ...

        def __aiter__(self) -> Port[M]: ...

        async def __anext__(self) -> M: ...

    def send(self, value: M) -> None:
        """Send ``value`` (any message value) to the peer port; safe from any
        thread. Raises ``MessageError`` for a value that cannot go to another
        process, ``BufferFull`` at the flow-control hard limit, ``PortFailed``
        once messages it sent may have been lost."""
        _send(self, K_DATA, value)

    def __repr__(self) -> str:
        return f"<Port {self._states[0].id.hex()[:8]}>" if self._states else "<Port closed>"


class Sender(_Handle, Generic[T]):
    """Sending end of a channel. ``send`` never blocks; messages to a receiver
    that is gone are dropped. ``call`` does RPC."""

    __slots__ = ()

    @classmethod
    def _wrap(cls, states: list[PortState]) -> Sender[Any]:
        self = object.__new__(cls)
        self._states = states
        return self

    def send(self, value: T) -> None:
        """Queue ``value`` for the receiver; safe from any thread (each
        thread's messages keep their order; closing or sending this sender
        away never overtakes a send another thread already made). Raises
        ``ChannelClosed`` if this sender was closed or sent away,
        ``MessageError`` for a value that cannot go to another process
        (nothing is sent, the channel stays usable), ``BufferFull`` at the
        flow-control hard limit (see ``drain``), ``PortFailed`` once messages
        it sent may have been lost (the receiver failed with them in
        transit); to a receiver that is merely gone, sends are dropped."""
        states = self._states
        if states:
            st = states[0]
            eng = st.engine
            if eng.thread == _get_ident() and value is not self:
                if st.peer_node == eng.node_id or st.peer_closed or st.error is not None:
                    eng.send_value(st, K_DATA, value)
                    return
                # encoded here, as every value sent (_body, inlined: the hot path);
                # a value of fds and plain values too (the link takes the fds)
                try:
                    body = encode_plain(value, True)
                except Exception as exc:
                    raise refused(exc) from None
                if type(body) is not FD_BODY:
                    eng.send_value(st, K_DATA, value, body)
                    return
                try:
                    eng.send_value(st, K_DATA, value, body)
                except BaseException:
                    CODEC.dispose(value)  # as a failed send of the full encoder's: nothing stays open
                    raise
                return
        _send(self, K_DATA, value)

    def clone(self) -> Sender[T]:
        """Another sender to the same receiver (closed independently)."""
        if not self._states:
            raise ChannelClosed("clone of a closed sender")
        st = self._states[0]
        a, b = st.engine.new_pair()
        _send(self, K_ADD_SENDER, Sender._wrap([b]))
        return Sender._wrap([a])

    @overload
    async def call(self: Sender[Rpc[Req, Resp]], request: Req, *, timeout: float | None = None) -> Resp: ...
    @overload
    async def call(self: Sender[Call[Req]], request: Req, *, timeout: float | None = None) -> Any: ...
    async def call(self, request: Any, *, timeout: float | None = None) -> Any:
        """Send ``request`` as a ``Call`` and wait for the reply (a
        ``Sender[Rpc[Req, Resp]]`` takes a ``Req`` and returns a ``Resp``).

        Raises ``RemoteError`` if the callee failed it, ``ChannelClosed`` if the
        call was dropped unanswered or the receiver is gone, ``PortFailed`` if
        the callee's node died, ``MessageError`` (nothing sent) if the request
        cannot go to the callee's process, ``TimeoutError`` after ``timeout``
        seconds (``ValueError`` for one that is not a positive finite number).
        Cancelling the caller (or the timeout) closes the reply port, which
        the callee sees as ``call.cancelled``."""
        if timeout is not None:
            if timeout is not _WITHIN:
                return await self._call_within(request, timeout)
        elif TRACING[0] and current_deadline() is not None:
            return await self._call_within(request, None)  # no later than the call being handled
        if not self._states:
            raise ChannelClosed("call on a closed sender")
        st = self._states[0]
        if st.peer_closed:
            raise ChannelClosed(_RECEIVER_GONE)
        if st.error is not None:
            raise st.error
        eng = st.engine
        a = None
        if eng.thread == _get_ident() and request is not self:
            # the common call: a plain request to another process, one frame
            # that names its reply port (no second port, no descriptor)
            try:
                body = _codec.encode_call(request)
            except Exception as exc:
                raise refused(exc) from None
            if body is not None:
                # (the deadline of a timed call goes with it: _call_within)
                a = eng.call_plain(st, body, None if timeout is None else prefix())
        if a is not None:
            msg = await _reply_to(a)
        else:
            a, b = eng.new_pair(pinned=True)  # a never leaves this call: b may travel without a proxy
            reply = Port._wrap([a])
            try:
                _send(self, K_CALL, _CallMsg(request, Port._wrap([b])))
            except BaseException:
                reply.close()
                raise
            try:
                got = reply._next_message()
                while got is None:
                    await reply._wait()
                    got = reply._next_message()
                msg = got
            except ChannelClosed:
                raise ChannelClosed("the call was dropped without a reply") from None
            finally:
                reply.close()
        if msg.kind == K_REPLY_ERROR or msg.kind == K_ERROR:
            why: Failure = msg.obj if msg.body is None else decode(msg, Failure)
            raise RemoteError(why.type_name, why.message, why.traceback)
        if msg.body is None:
            return msg.obj
        if msg.ports is None and msg.fds is None:
            try:  # the common reply: a plain value
                return ANY_PLAIN_DECODER.decode(msg.body)
            except DECODE_ERRORS as exc:
                raise MessageError(f"invalid message: {exc}") from None
        return decode(msg, Any)

    async def _call_within(self, request: Any, timeout: float | None) -> Any:
        """``call`` within ``timeout`` seconds and (a call made while
        handling one: ``current_deadline``) by the handled call's deadline."""
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
            raise ValueError(f"timeout must be a positive finite number of seconds or None, got {timeout!r}")
        deadline = current_deadline() if TRACING[0] else None
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the deadline of the call being handled has passed")
            if timeout is None or left < timeout:
                timeout = left
        if timeout is None:  # (no deadline after all: the caller's timeout was None)
            timeout = math.inf
        untyped: Any = self  # the overloads type a Sender of calls; this one may carry anything
        try:
            async with asyncio.timeout(None if timeout == math.inf else timeout):
                # the callee sees the deadline (a finite one: none is math.inf)
                with with_deadline(time.monotonic() + timeout) if timeout < math.inf else _NO_BLOCK:
                    # Sender's own call (a subclass's wraps the request, which it has done)
                    return await Sender.call(untyped, request, timeout=_WITHIN)
        except TimeoutError:
            raise TimeoutError(f"no reply within {timeout:g} s") from None

    def __repr__(self) -> str:
        return f"<Sender {self._states[0].id.hex()[:8]}>" if self._states else "<Sender closed>"


def _loop_of(eng: Engine) -> asyncio.AbstractEventLoop:
    """The running loop, called on the thread that drives ``eng``: its node's
    loop while that runs (``asyncio.get_running_loop()`` makes a getpid()
    system call each time), else whatever runs here."""
    # post is loop.call_soon_threadsafe
    loop: asyncio.AbstractEventLoop | None = getattr(eng.post, "__self__", None)
    if loop is not None and loop.is_running():
        return loop  # (no typing.cast: a Python call per wait)
    return asyncio.get_running_loop()


async def _reply_to(st: PortState) -> Message:
    """The answer on the reply end of a call this loop's thread made (see
    ``Engine.call_plain``): waited for on one future, with no handle object.
    The end is closed whatever happens, which a callee sees as
    ``call.cancelled`` if the caller gave up first."""
    try:
        if not st.queue and not st.ended:
            fut = _loop_of(st.engine).create_future()

            def wake() -> None:  # the engine runs on this thread (call_plain's rule)
                if not fut.done():
                    fut.set_result(None)

            st.engine.set_waker(st, wake)
            await fut
        q = st.queue  # (read after the wait: the first message gives the end its deque)
        if q:
            return q.popleft()
        if st.error is not None:
            raise st.error
        raise ChannelClosed("the call was dropped without a reply")
    finally:
        # the waker stays: a later wake finds its future done (a call is one
        # future), and the closed end leaves the table with it
        st.engine.close(st)


#: ``Sender.call``'s timeout from ``_call_within``: the time limit is set
_WITHIN: Final = -1.0
_NO_BLOCK: Final = contextlib.nullcontext()


class Receiver(_Inbox, Generic[T]):
    """Receiving end of a channel; ``async for`` ends when every sender is
    closed. A typed receiver validates messages from other processes."""

    __slots__ = ()

    @classmethod
    def _wrap(cls, states: list[PortState], tp: Any = Any) -> Receiver[Any]:
        self = object.__new__(cls)
        self._init_inbox(states, tp)
        return self

    if TYPE_CHECKING:  # the inherited methods, typed for T (no wrapper at run time)

        async def recv(self) -> T: ...

        async def recv_many(self, max: int = 1024) -> list[T]: ...

        def try_recv(self) -> T: ...

        def __aiter__(self) -> Receiver[T]: ...

        async def __anext__(self) -> T: ...

    async def drain(self) -> None:
        """A receiver has nothing to drain: ``MeshError``."""
        raise MeshError("drain() is for the sending end of a channel")

    def __repr__(self) -> str:
        return f"<Receiver ports={len(self._states)}>"


@overload
def channel() -> tuple[Sender[Any], Receiver[Any]]: ...
@overload
def channel(tp: type[T]) -> tuple[Sender[T], Receiver[T]]: ...
@overload
def channel(tp: Any) -> tuple[Sender[Any], Receiver[Any]]: ...
def channel(tp: Any = Any) -> tuple[Sender[Any], Receiver[Any]]:
    """A new channel: ``tx, rx = meshipc.channel(MyType)`` gives
    ``Sender[MyType], Receiver[MyType]`` (``channel()``: ``Any``).

    ``tp`` is what the receiver validates messages from other processes
    against (messages within the process are passed as they are). A
    channel of calls is ``channel(Call[Req])`` or, typed both ways,
    ``channel(Rpc[Req, Resp])``: ``await tx.call(req)`` returns ``Resp`` and
    the server's ``call.reply(x)`` takes a ``Resp``."""
    a, b = _local_engine.new_pair()
    return Sender._wrap([a]), Receiver._wrap([b], tp)


class _CallMsg:
    __slots__ = ("reply", "request")

    def __init__(self, request: Any, reply: Port) -> None:
        self.request = request
        self.reply = reply


def _engine_final(eng: Engine, st: PortState, kind: int, value: Any) -> None:
    eng.send_final(st, kind, value, _body(eng, st, value))


def _answer(c: Call[Any], kind: int, value: Any) -> None:
    """The one answer to a call: a final message (one frame, no CLOSE)."""
    st = c._take()
    eng = st.engine
    if eng.thread == _get_ident():
        eng.send_final(st, kind, value, _body(eng, st, value))
    else:
        _from_thread(st, _engine_final, st, kind, value)


class Call(Generic[T]):
    """One RPC request as the server sees it. Answer it once with ``reply`` or
    ``fail``; dropping it unanswered gives the caller ``ChannelClosed``."""

    # The reply end: a call from another process holds its port state itself
    # (``_st``: no Port handle, waker or table entry per call, issue 24); a
    # Port (``_port``) only for a call made in this process, or once
    # ``wait_cancelled`` needs one to wait on. At most one of the two is set
    # until answered; neither after.
    # ``_ctx``: (the caller's Trace, the deadline) when the call carried a
    # context; unset (not even None: no store per call) when it did not
    __slots__ = ("_ctx", "_port", "_st", "request")
    _ctx: tuple[Trace | None, float | None]

    def __init__(self, request: T, port: Port | PortState) -> None:
        self.request = request
        if isinstance(port, PortState):
            self._st: PortState | None = port
            self._port: Port | None = None
        else:
            self._st = None
            self._port = port

    def _take(self) -> PortState:
        """The reply end, given up by this call (answered once)."""
        st = self._st
        if st is not None:
            self._st = None
            return st
        p = self._port
        if p is None or not p._states:
            raise ChannelClosed("this call was already answered")
        (st,) = p._detach()
        return st

    def _reply_end(self) -> PortState | None:
        if self._st is not None:
            return self._st
        p = self._port
        return p._states[0] if p is not None and p._states else None

    def _hand_over(self) -> Port | PortState:
        """The reply end as it is held, given up to another ``Call`` (a
        service's, which carries the deadline); this one is then answered."""
        held: Port | PortState | None = self._st if self._st is not None else self._port
        self._st = self._port = None
        if held is None:
            raise ChannelClosed("this call was already answered")
        return held

    def _caller(self) -> bytes:
        """The node the call came from: its reply end's peer (for a call from
        another node, the link's authenticated id that sent it); b"" once answered."""
        st = self._reply_end()
        return st.peer_node if st is not None else b""

    def _drop(self) -> None:
        """Let the call go unanswered: the caller gets ``ChannelClosed``."""
        if self._st is not None:
            self.__del__()
        elif self._port is not None:
            self._port.close()

    @property
    def trace(self) -> Trace | None:
        """The trace context the call carried: the caller's trace, its span
        the ``span_id`` (the parent of the handler's), or None."""
        ctx: tuple[Trace | None, float | None] | None = getattr(self, "_ctx", None)
        return None if ctx is None else ctx[0]

    @property
    def deadline(self) -> float | None:
        """When the caller stops waiting (``time.monotonic()`` seconds; the
        clock is system-wide on Linux), or None: it set no deadline."""
        ctx: tuple[Trace | None, float | None] | None = getattr(self, "_ctx", None)
        return None if ctx is None else ctx[1]

    @property
    def remaining(self) -> float | None:
        """Seconds left to ``deadline``, or None."""
        d = self.deadline
        return None if d is None else d - time.monotonic()

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """``with call.handling():`` runs the block as this call's handler:
        ``current_trace()`` is the caller's trace with a span of its own
        (a new trace if the call carried none; with OpenTelemetry, a span
        it starts), the calls and sends it makes carry that context and end
        by ``deadline``, and, in a task, the task is cancelled if the
        caller gives up meanwhile (so are the calls it waits on, down the
        chain). A service's handler (``serve``) runs so already; a server
        reading calls (``async for call in rx``) opts in with this."""
        watcher = None
        with contextlib.suppress(RuntimeError):  # (no running loop: nothing to cancel)
            task = asyncio.current_task()
            if task is not None:
                watcher = task.get_loop().create_task(self._cancel_when_given_up(task))
        try:
            with _handling(self.trace, self.deadline, self._service_name()):
                yield
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _cancel_when_given_up(self, task: asyncio.Task[Any]) -> None:
        await self.wait_cancelled()
        if self.cancelled:
            task.cancel()

    def _service_name(self) -> str | None:
        return None

    def reply(self, value: Any) -> None:
        """Send the result to the caller (no-op if it has gone away)."""
        _answer(self, K_REPLY, value)

    def fail(self, exc: BaseException) -> None:
        """Answer with an error: the caller gets ``RemoteError``."""
        if self._reply_end() is None:
            raise ChannelClosed("this call was already answered")
        if isinstance(exc, RemoteError):
            why = Failure(exc.type_name, exc.message, exc.traceback)
        else:
            tb = "".join(traceback.format_exception(exc))
            why = Failure(remote_type_name(type(exc)), str(exc), tb)
        _answer(self, K_REPLY_ERROR, why)

    @property
    def cancelled(self) -> bool:
        """True once the caller stopped waiting (cancelled, or its node died)."""
        st = self._reply_end()
        if st is None:
            return False
        return st.peer_closed or st.error is not None

    async def wait_cancelled(self) -> None:
        """Return when the caller stops waiting (for servers doing long work)."""
        if self._st is not None:  # a handle to wait on (its waker), made on first need
            self._port, self._st = Port._wrap([self._st]), None
        p = self._port
        while p is not None and not self.cancelled and not p.closed:
            await p._wait()

    def __del__(self) -> None:
        # dropped unanswered: the caller gets ChannelClosed (as a dropped
        # Port handle would give it)
        st = self._st
        if st is not None:
            self._st = None
            try:
                if _on_engine_thread(st.engine):
                    st.engine.close(st)
                else:
                    _from_thread(st, _engine_close, st)
            except (MeshError, RuntimeError):  # RuntimeError: its event loop is closed
                pass

    def __repr__(self) -> str:
        return f"<Call {self.request!r}>"


class Rpc(Call[Req], Generic[Req, Resp]):
    """A ``Call`` typed both ways: ``tx, rx = channel(Rpc[Req, Resp])``
    gives a server ``Rpc[Req, Resp]`` objects whose ``reply`` takes a
    ``Resp``, and a caller whose ``await tx.call(req)`` returns a ``Resp``.
    The receiver validates requests from other processes against ``Req``
    (as for ``Call[Req]``); ``Resp`` is for the type checker (a caller
    that wants the reply checked at run time converts it itself, e.g.
    ``msgspec.convert``)."""

    __slots__ = ()

    if TYPE_CHECKING:

        def reply(self, value: Resp) -> None: ...


# ------------------------------------------------ what handles are in a message


def _take_states(engine: Engine, handle: _Handle) -> list[PortState]:
    """The handle's port states, given up and moved into ``engine``."""
    states = handle._detach()
    for st in states:
        if st.engine is not engine:
            engine.adopt(st)
    return states


def _encode_one(h: Port | Sender[Any], tables: ResourceTables) -> bytes:
    engine = _codec.check_sendable(h._states, type(h).__name__)
    return _codec.pack_indices(tables.add_ports(_take_states(engine, h))[-1:])


def _encode_receiver(h: Receiver[Any], tables: ResourceTables) -> bytes:
    engine = _codec.check_sendable(h._states, "Receiver")
    return _codec.pack_indices(tables.add_ports(_take_states(engine, h)))


def _decode_port(data: memoryview, tables: ResourceTables) -> Port:
    (i,) = _codec.unpack_indices(data, exactly_one=True)
    return Port._wrap([tables.take_port(i)])


def _decode_sender(data: memoryview, tables: ResourceTables) -> Sender[Any]:
    (i,) = _codec.unpack_indices(data, exactly_one=True)
    return Sender._wrap([tables.take_port(i)])


def _decode_receiver(data: memoryview, tables: ResourceTables) -> Receiver[Any]:
    indices = _codec.unpack_indices(data, exactly_one=False)
    return Receiver._wrap([tables.take_port(i) for i in indices])


def _retype(h: _Inbox, args: tuple[Any, ...]) -> None:
    h._set_type(args[0])


def _detach(h: _Handle) -> list[PortState]:
    return h._detach()


def _split_call(cm: _CallMsg) -> tuple[Any, Port]:
    return cm.request, cm.reply


def _check_call(cm: _CallMsg) -> None:
    if not cm.reply._states:
        raise ChannelClosed("the reply port of this call is closed")


_codec.register_handle(Port, EXT_PORT, _encode_one, _decode_port, detach=_detach, retype=_retype)
_codec.register_handle(Sender, EXT_SENDER, _encode_one, _decode_sender, detach=_detach)
_codec.register_handle(
    Receiver, EXT_RECEIVER, _encode_receiver, _decode_receiver, detach=_detach, retype=_retype
)
_codec.register_envelope(_CallMsg, _split_call, _check_call)
