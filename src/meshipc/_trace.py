"""One request followed across processes: the trace context and the
deadline a service call carries, kept in ``contextvars`` on both sides.

A call through a named service (``conn.call``, ``mesh.call``, a
``ServiceSender`` from ``open``) carries, in its envelope (``_Req``), the
caller's deadline and, when the caller has one, its trace context:
``TRACE_LEN`` bytes (trace id, the caller's span id, a sampled flag) — no
byte at all when there is none. The service runs each handler with
``current_trace()`` set (the caller's trace, with a span of its own; a new
trace when the call came without one) and with the call's deadline, so
that calls the handler makes carry the same trace (their parent: the
handler's span) and a deadline no later than its own: a nested call cannot
outlive its caller, and when the outer call is cancelled (its caller gave
up or its deadline passed) the handler is cancelled, which cancels the
calls it is waiting on, down the chain.

A plain channel message (``Sender.send``/``call``, ``Port.send``) sent
while a context is set carries it too, in a prefix of its body flagged in
its MSG header (``_wire.F_TRACE``, ``_PREFIX``: trace id, the sender's
span, flags, seconds left to the deadline); a call made with a timeout
carries its deadline alone. The receiver reads it as ``Call.trace`` and
``Call.deadline`` (``with call.handling():`` runs a block as the handler),
or ``recv_traced()``. Until a context may be set (``TRACING``) the data
path does not even look: an untraced message costs and weighs what it did.

With ``opentelemetry-api`` installed (optional), the ids are
OpenTelemetry's: a caller's current span is the parent of the handler's
span, which the service starts (``meshipc.call <service>``, kind SERVER)
and makes current while the handler runs; so spans from root → worker A →
worker B form one trace in whatever exporter each process configured.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from ._errors import MessageError
from ._ids import random_id

#: Bytes of a trace context on the wire: trace id (16), parent span id (8), flags (1).
TRACE_LEN: Final = 25
#: A message's context prefix (``_wire.F_TRACE``, ``_wire.TRACE_PREFIX_LEN``
#: bytes): trace id, the sender's span id, flags (``P_SAMPLED``,
#: ``P_DEADLINE``), the seconds left to the sender's deadline (a float,
#: relative: clocks of two hosts do not agree; 0 without a deadline).
_PREFIX: Final = struct.Struct(">16s8sBd")
P_SAMPLED: Final = 1
P_DEADLINE: Final = 2

#: ``TRACING[0]``: whether a context may be set in this process (a trace
#: or handler was entered, or the application imported OpenTelemetry).
#: Until then the data path does not look for one: the engine's sends are
#: the plain ones (``when_tracing`` swaps them), and a message costs what it
#: cost before traces existed.
TRACING: Final[list[bool]] = [False]
_ON_TRACING: list[Callable[[], None]] = []


def when_tracing(fn: Callable[[], None]) -> None:
    """Run ``fn`` once ``TRACING`` is set (now, if it is): the data path
    switches to the sends that look for a context (``_ports``)."""
    if TRACING[0]:
        fn()
    else:
        _ON_TRACING.append(fn)


def _tracing() -> None:
    """A context may be set from now on (``TRACING``)."""
    if not TRACING[0]:
        TRACING[0] = True
        for fn in _ON_TRACING:
            fn()
        _ON_TRACING.clear()


@dataclass(frozen=True, slots=True)
class Trace:
    """The trace a task works for (``meshipc.current_trace()``): ids as
    bytes (W3C sizes); ``str()`` gives ``"<trace id>-<span id>"`` in hex,
    for log lines."""

    #: 16 bytes, the same in every process the request reaches
    trace_id: bytes
    #: 8 bytes, this task's span (a handler's span: one per call handled)
    span_id: bytes
    #: 8 bytes: the caller's span, or None at the start of a trace
    parent_id: bytes | None = None
    sampled: bool = True

    def __str__(self) -> str:
        return f"{self.trace_id.hex()}-{self.span_id.hex()}"

    def wire(self) -> bytes:
        """The context a call made now carries (this span as the parent)."""
        return self.trace_id + self.span_id + (b"\x01" if self.sampled else b"\x00")


_trace: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("meshipc_trace", default=None)
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("meshipc_deadline", default=None)


def notice_otel() -> None:
    """Set ``TRACING`` if the application has imported OpenTelemetry (its
    spans may be current when it sends): a mesh calls this as it starts."""
    if "opentelemetry.trace" in sys.modules:
        _tracing()


def current_trace() -> Trace | None:
    """The trace this task works for: in a service handler, the caller's
    trace (or a new one) with the handler's own span; inside ``start_trace()``
    that trace; with OpenTelemetry, the current span's ids; else None."""
    t = _trace.get()
    sc = _otel_span(t)
    if sc is not None:
        span = _b(sc.span_id, 8)
        parent = t.parent_id if t is not None and t.span_id == span else None
        return Trace(_b(sc.trace_id, 16), span, parent, bool(sc.trace_flags & 1))
    return t


def _otel_span(t: Trace | None) -> Any:
    """OpenTelemetry's current span context when it names a span of this
    process (not the no-op echo of a caller's span, which the API gives
    when no SDK is configured), else None."""
    otel = _otel()
    if otel is None:
        return None
    sc = otel.get_current_span().get_span_context()
    if not sc.is_valid or (t is not None and t.parent_id is not None and _b(sc.span_id, 8) == t.parent_id):
        return None
    return sc


def current_deadline() -> float | None:
    """The deadline (``time.monotonic()`` seconds) of the call this task
    handles, or None: calls it makes end by then."""
    return _deadline.get()


@contextlib.contextmanager
def start_trace() -> Iterator[Trace]:
    """``with meshipc.start_trace() as t:`` — a new trace for the block:
    the service calls made in it carry it (``str(t)`` for log lines).
    With OpenTelemetry, start a span instead: its context is used."""
    t = Trace(random_id(), random_id()[:8])
    _tracing()
    token = _trace.set(t)
    try:
        yield t
    finally:
        _trace.reset(token)


def outgoing(deadline: float | None) -> tuple[float | None, bytes | None]:
    """For a service call made now with ``deadline`` (or None): the
    deadline it carries (no later than the one of the call this task
    handles) and the trace context it carries (None: none is set)."""
    inherited = _deadline.get()
    if inherited is not None and (deadline is None or inherited < deadline):
        deadline = inherited
    t = _trace.get()
    sc = _otel_span(t)
    if sc is not None:
        return deadline, _b(sc.trace_id, 16) + _b(sc.span_id, 8) + bytes((sc.trace_flags & 1,))
    return deadline, (t.wire() if t is not None else None)


def prefix() -> bytes | None:
    """The context a message sent now carries (``_PREFIX``): this task's
    trace, its span the parent, and the seconds left to the deadline of the
    call it handles (or of a call made with a timeout: ``with_deadline``);
    None when neither is set (nothing is carried). Without a trace the ids
    are zero: a deadline alone."""
    t = _trace.get()
    d = _deadline.get()
    sc = _otel_span(t)
    if sc is not None:
        ids = (_b(sc.trace_id, 16), _b(sc.span_id, 8), sc.trace_flags & 1)
    elif t is not None:
        ids = (t.trace_id, t.span_id, P_SAMPLED if t.sampled else 0)
    elif d is not None:
        ids = (_NO_TRACE, _NO_SPAN, 0)
    else:
        return None
    if d is None:
        return _PREFIX.pack(*ids, 0.0)
    return _PREFIX.pack(ids[0], ids[1], ids[2] | P_DEADLINE, max(d - time.monotonic(), 0.0))


_NO_TRACE: Final = bytes(16)
_NO_SPAN: Final = bytes(8)


@contextlib.contextmanager
def with_deadline(deadline: float) -> Iterator[None]:
    """The block's calls carry ``deadline`` (a call made with a timeout)."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def parse_prefix(wire: bytes) -> tuple[Trace | None, float | None]:
    """A message's context prefix, checked (``MessageError`` if malformed):
    the sender's trace (its span the ``span_id``; None: a deadline alone)
    and the deadline it set (``time.monotonic()`` seconds, from the seconds
    left it carries; no later than ``MAX_LEFT`` from now), or None."""
    if len(wire) != _PREFIX.size:
        raise MessageError(f"a message's trace context is {_PREFIX.size} bytes")
    trace_id, span_id, flags, left = _PREFIX.unpack(wire)
    if flags & ~(P_SAMPLED | P_DEADLINE):
        raise MessageError(f"a trace context with unknown flags {flags:#x}")
    t: Trace | None = Trace(trace_id, span_id, None, bool(flags & P_SAMPLED))
    if trace_id == _NO_TRACE and span_id == _NO_SPAN and flags == P_DEADLINE:
        t = None  # a deadline alone
    elif not any(trace_id) or not any(span_id):
        raise MessageError("a trace context with a zero trace or span id")
    if not flags & P_DEADLINE:
        if left != 0.0:
            raise MessageError("a trace context with time left but no deadline")
        return t, None
    if not (math.isfinite(left) and left >= 0.0):
        raise MessageError("a trace context whose deadline is not a finite time")
    return t, time.monotonic() + min(left, MAX_LEFT)


#: The farthest deadline a message's context sets, seconds from now (a
#: farther one is cut to it): a peer cannot pin a handler's calls open.
MAX_LEFT: Final = 24 * 3600.0


def parse(wire: Any) -> Trace:
    """A caller's trace context, checked (``MessageError`` if malformed);
    the span is the caller's (``span_id``: parent of the handler's)."""
    if not isinstance(wire, bytes) or len(wire) != TRACE_LEN or wire[24] > 1:
        raise MessageError(f"a trace context is {TRACE_LEN} bytes (trace id, span id, flags)")
    if not any(wire[:16]) or not any(wire[16:24]):
        raise MessageError("a trace context with a zero trace or span id")
    return Trace(wire[:16], wire[16:24], None, bool(wire[24]))


class handling:
    """``with handling(caller, deadline, service):`` runs a handler's block
    as part of ``caller``'s trace (a new trace if None) with a span of its
    own (``meshipc.call <service>``, or ``meshipc.call`` for a plain call),
    and with ``deadline`` for the calls it makes. A class, not a generator:
    a service enters one per call (issue 24)."""

    __slots__ = ("_caller", "_deadline", "_dtoken", "_service", "_span", "_ttoken")

    def __init__(self, caller: Trace | None, deadline: float | None, service: str | None) -> None:
        self._caller = caller
        self._deadline = deadline
        self._service = service
        self._span: Any = None  # OpenTelemetry's span context manager, when in use

    def __enter__(self) -> None:
        _tracing()
        otel = _otel()
        caller = self._caller
        self._dtoken = _deadline.set(self._deadline)
        if otel is None:
            if caller is None:
                t = Trace(random_id(), random_id()[:8])
            else:
                t = Trace(caller.trace_id, random_id()[:8], caller.span_id, caller.sampled)
            self._ttoken = _trace.set(t)
            return
        try:
            t = self._otel_span(otel, caller)
        except BaseException:
            _deadline.reset(self._dtoken)
            raise
        self._ttoken = _trace.set(t)

    def _otel_span(self, otel: Any, caller: Trace | None) -> Trace:
        """Start the handler's OpenTelemetry span (made current until
        ``__exit__``): the Trace it gives."""
        ctx = None
        if caller is not None:
            parent = otel.SpanContext(
                int.from_bytes(caller.trace_id, "big"),
                int.from_bytes(caller.span_id, "big"),
                is_remote=True,
                trace_flags=otel.TraceFlags(1 if caller.sampled else 0),
            )
            ctx = otel.set_span_in_context(otel.NonRecordingSpan(parent))
        tracer = otel.get_tracer("meshipc")
        name = "meshipc.call" if self._service is None else f"meshipc.call {self._service}"
        span_cm = tracer.start_as_current_span(name, context=ctx, kind=otel.SpanKind.SERVER)
        sp = span_cm.__enter__()
        try:
            sc = sp.get_span_context()
        except BaseException:
            span_cm.__exit__(*sys.exc_info())
            raise
        self._span = span_cm
        if sc.is_valid and (caller is None or _b(sc.span_id, 8) != caller.span_id):
            return Trace(_b(sc.trace_id, 16), _b(sc.span_id, 8), caller.span_id if caller else None)
        if caller is not None:  # no SDK: OpenTelemetry's no-op span keeps the caller's ids
            return Trace(caller.trace_id, random_id()[:8], caller.span_id, caller.sampled)
        return Trace(random_id(), random_id()[:8])

    def __exit__(self, *exc: Any) -> None:
        _trace.reset(self._ttoken)
        span, self._span = self._span, None
        try:
            if span is not None:
                span.__exit__(*exc)
        finally:
            _deadline.reset(self._dtoken)


def _b(n: int, size: int) -> bytes:
    return n.to_bytes(size, "big")


#: a test's stand-in for ``opentelemetry.trace`` (``[None]``: as if absent)
_OTEL: list[Any] = []


def _otel() -> Any:
    """``opentelemetry.trace`` if the application imported it (else it has
    configured no tracing that spans could come from), else None."""
    if _OTEL:
        return _OTEL[0]
    mod = sys.modules.get("opentelemetry.trace")
    if mod is not None:
        _tracing()
    return mod
