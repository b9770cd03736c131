"""The service runtime: a ``Service`` (from ``serve``) reads its calls,
checks their deadline envelope and types, and runs its handler within the
bounds of ``ControlLimits`` (per client and in all); ``ServiceSender`` is the
caller's end, whose calls carry a deadline; ``ServiceCall`` is what a
receiver-mode application gets (a handler gets the request). A handler runs
in the reader up to where it first waits (``carry_on`` drives the rest).

A service knows nothing of the registry: whoever made it is told when it
closes (``on_close``) and withdraws the name.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import math
import os
import time
import types
import typing
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

import msgspec
import msgspec.inspect

from ._channel import Call, Port, Receiver, Sender, channel
from ._control_msgs import (
    TOKEN_LEN,
    WATCH_AFTER,
    ControlLimits,
    Register,
    _Req,
    accept_objects,
    check_timeout,
    envelope,
)
from ._errors import ChannelClosed, MeshError, MessageError, RemoteError, ServiceBusy
from ._inspect import counter, type_name
from ._ports import PortState
from ._tasks import TaskSet, answer_within
from ._trace import Trace, handling, outgoing, parse

T = TypeVar("T")


def sender_dead(s: Sender[Any]) -> bool:
    """True once ``s`` can carry no call (closed, its receiver gone, or failed)."""
    states = s._states
    return not states or states[0].peer_closed or states[0].error is not None


def consume(fut: asyncio.Future[None]) -> None:
    """A done callback: the future's exception counts as retrieved (a
    failure is logged where it happens)."""
    if not fut.cancelled():
        fut.exception()


@types.coroutine
def carry_on(
    work: Coroutine[Any, Any, T], waits_on: Any, ctx: contextvars.Context | None = None
) -> Generator[Any, Any, T]:
    """``await carry_on(work, waits_on)``: the rest of ``work``, a coroutine
    whose first step was taken outside ``await`` (it yielded ``waits_on``),
    run by the awaiting task as if it had awaited ``work`` from the start
    (``ctx``: each step in that context)."""
    while True:
        try:
            sent = yield waits_on
        except GeneratorExit:
            work.close()
            raise
        except BaseException as exc:
            step: Callable[[Any], Any] = work.throw
            arg: Any = exc
        else:
            step, arg = work.send, sent
        try:
            waits_on = step(arg) if ctx is None else ctx.run(step, arg)
        except StopIteration as done:
            return typing.cast(T, done.value)


def split_handler(
    handler: Callable[[Any], Awaitable[Any]] | Receiver[Any], request_type: Any, reply_type: Any
) -> tuple[Callable[[Any], Awaitable[Any]] | None, Sender[Any] | None, Any, Any]:
    """What ``serve`` was given, as a service runs it: an async function,
    or a ``Sender`` feeding the application's receiver (which from now on
    also takes the service's ``ServiceCall`` objects); and the request and
    reply types: the ones given, else a ``Call[T]`` receiver's ``T``, else
    the handler's annotations (its first parameter's, its return's).
    ``TypeError`` for a plain (not async) function, and for an annotation
    msgspec cannot check."""
    if isinstance(handler, Receiver):
        if not handler._states:
            raise ChannelClosed("serve() was given a closed receiver")
        if getattr(handler, "_calls_only", False):
            # a Call[T] receiver takes only calls; ours arrive as local
            # ServiceCall objects (with the deadline), validated against T here
            if request_type is None and handler._type is not Any:
                request_type = handler._type
            handler._calls_only = False
        ftx, frx = channel()
        for st in frx._detach():
            handler._add(st)  # calls arrive on the application's receiver
        return None, ftx, request_type, reply_type
    if not callable(handler):
        raise TypeError("serve() takes an async function or a Receiver of meshipc.Call")
    target = inspect.unwrap(handler)
    if (inspect.isfunction(target) or inspect.ismethod(target)) and target.__name__ != "<lambda>":
        if not inspect.iscoroutinefunction(target):
            raise TypeError(
                f"serve() runs `async def` handlers, and {target.__qualname__} is a plain function: "
                "make it async (for blocking work, `return await asyncio.to_thread(work, request)`)"
            )
        wanted, returns = _annotations(target)
        if request_type is None:
            request_type = wanted
        if reply_type is None:
            reply_type = returns
    return handler, None, request_type, reply_type


def _annotations(fn: Callable[..., Any]) -> tuple[Any, Any]:
    """The types ``fn``'s first parameter and its return are annotated
    with (``None``: not annotated, or ``Any``: nothing to check)."""
    try:
        hints = typing.get_type_hints(fn)
        params = list(inspect.signature(fn).parameters)
    except Exception:  # annotations that do not resolve here: check nothing
        return None, None
    found = [hints.get(params[0]) if params else None, hints.get("return")]
    for i, tp in enumerate(found):
        if tp is Any:
            found[i] = None
        elif tp is not None:
            try:
                msgspec.inspect.type_info(tp)
            except TypeError as exc:
                what = f"serve(): {fn.__qualname__}'s annotation {tp!r}"
                raise TypeError(f"{what} cannot be checked: {exc}") from None
    return found[0], found[1]


class ServiceCall(Call[Any]):
    """A ``meshipc.Call`` made through a named service: its ``deadline``
    and ``trace`` are the ones its envelope carried (cut to the service's
    ``max_call_timeout``); ``handling()`` names the service's span."""

    __slots__ = ("_service",)

    def __init__(
        self,
        request: Any,
        port: Port | PortState,
        deadline: float | None,
        trace: Trace | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(request, port)
        self._ctx = (trace, deadline)
        self._service = service

    def _service_name(self) -> str | None:
        return self._service


class ServiceSender(Sender[Any]):
    """A ``Sender`` to a named service (from ``open``): ``call`` also takes
    ``timeout``, and the callee sees the deadline. Sent to another process,
    it arrives as a plain ``Sender`` (whose calls carry a deadline and a
    trace as plain calls do: with a ``timeout``, or made in a handler)."""

    __slots__ = ()

    async def call(self, request: Any, *, timeout: float | None = None) -> Any:
        """As ``Sender.call``; ``TimeoutError`` after ``timeout`` seconds,
        ``ValueError`` for a NaN, infinite or negative ``timeout``,
        ``ServiceBusy`` if the service refused the call (this client has
        too many waiting there)."""
        if timeout is None:
            return await call_service(self, request, None)
        timeout = check_timeout(timeout)
        async with answer_within(timeout, "the service"):
            return await call_service(self, request, time.monotonic() + timeout)


async def call_service(sender: Sender[Any], request: Any, deadline: float | None) -> Any:
    """``request`` called on ``sender``, a service's, in the envelope that
    carries ``deadline`` (or the handled call's, if sooner) and the trace
    context; a ``ServiceBusy`` refusal raised as itself (one frame: the
    call path, issue 24)."""
    deadline, trace = outgoing(deadline)
    try:
        return await Sender.call(sender, envelope(deadline, request, trace))
    except RemoteError as exc:
        if exc.type_name == "ServiceBusy":
            raise ServiceBusy(exc.message.removeprefix("busy: ")) from None
        raise


async def busy_call(work: Awaitable[Any]) -> Any:
    """``await work``, a service's ``ServiceBusy`` refusal raised as itself."""
    try:
        return await work
    except RemoteError as exc:
        if exc.type_name == "ServiceBusy":
            raise ServiceBusy(exc.message.removeprefix("busy: ")) from None
        raise


#: a running handler call: the call, its task, the watcher once started
_Running = tuple[Call[Any], "asyncio.Task[Any] | None", list["asyncio.Task[None]"]]


class Service:
    """A registered service (from ``mesh.serve``).

    ``await service`` returns once the mesh's registry has confirmed the
    name (raises ``ServiceNameInUse`` if another node holds it);
    ``close()`` withdraws it; ``await wait_closed()`` waits for that."""

    def __init__(
        self,
        name: str,
        handler: Callable[[Any], Awaitable[Any]] | None,
        target: Sender[Any] | None,
        request_type: Any,
        reply_type: Any,
        *,
        limits: ControlLimits,
        on_close: Callable[[Service], None],
    ) -> None:
        self.name = name
        self._on_close = on_close
        self._handler = handler
        self._target = target  # Receiver mode: feeds the application's receiver
        self.request_type = request_type
        self.reply_type = reply_type
        self.token = os.urandom(TOKEN_LEN)
        self._tx, self._rx = channel()
        loop = asyncio.get_running_loop()
        self._registered: asyncio.Future[None] = loop.create_future()
        self._registered.add_done_callback(consume)
        self._done: asyncio.Future[None] = loop.create_future()
        self._tasks = TaskSet(loop)
        # id() of a call whose handler waits -> when it started (a handler
        # that answers at once is never seen waiting: none is kept for it)
        self._active: dict[int, float] = {}
        # calls running, and (in start order) those not yet watched: one
        # timer for them all checks which still run WATCH_AFTER seconds in,
        # instead of a timer per call (issue 24)
        self._running_calls: dict[int, _Running] = {}
        self._seqs: dict[int, int] = {}  # id() of a call whose handler waits -> its key there
        self._unwatched: deque[tuple[float, int]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._seq = 0  # keys of _running_calls (an id() may be reused once a call ends)
        self._limits = limits
        # handler calls running, in all and per client; calls of a client at
        # its bound wait in its queue (see ControlLimits)
        self._running = 0
        self._per_client: dict[bytes, int] = {}
        self._waiting: dict[bytes, deque[Call[Any]]] = {}
        self._slot: asyncio.Future[None] | None = None
        self.refused = 0
        self.calls = 0
        self.errors = 0
        self.closed = False
        self._pump = loop.create_task(self._run())

    def __await__(self) -> Any:
        return asyncio.shield(self._registered).__await__()

    def registration(self) -> Register:
        """The registry request that names this service."""
        return Register(
            self.name, self.token, self._tx.clone(), type_name(self.request_type), type_name(self.reply_type)
        )

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)

    def close(self) -> None:
        """Withdraw the service (idempotent); calls in progress are cancelled."""
        if self.closed:
            return
        self.closed = True
        self._pump.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._tasks.cancel_all()
        for q in self._waiting.values():
            for sc in q:
                sc._drop()  # the caller learns the call was dropped
        self._waiting.clear()
        self._rx.close()
        self._tx.close()
        if self._target is not None:
            self._target.close()
        if not self._registered.done():
            self._registered.set_exception(MeshError(f"service {self.name!r} was closed"))
        if not self._done.done():
            self._done.set_result(None)
        self._on_close(self)

    def _unwrap(self, call: Call[Any]) -> Call[Any] | None:
        """The call as the service runs it, or None once it was failed: a
        deadline that is not a finite number (a peer's doing) or a request
        of the wrong type. A deadline is cut to ``max_call_timeout`` from now.
        For the application's receiver, a ``ServiceCall``; for a handler
        (which sees only the request) the call itself, its request and
        context replaced (no second object per call, issue 24)."""
        req = call.request
        deadline: Any = None
        wire: Any = None
        if isinstance(req, _Req):
            deadline, wire, req = req.deadline, getattr(req, "trace", None), req.request
        elif isinstance(req, list) and len(req) in (3, 4) and req[0] == "meshipc.req":
            deadline, req, wire = req[1], req[2], (req[3] if len(req) == 4 else None)
        # a context prefix, from a plain sender (the envelope's comes first)
        ctx: tuple[Trace | None, float | None] | None = getattr(call, "_ctx", None)
        trace = None if ctx is None else ctx[0]
        if deadline is None and ctx is not None:
            deadline = ctx[1]
        if wire is not None:
            try:
                trace = parse(wire)
            except MessageError as exc:
                self.errors += 1
                with contextlib.suppress(ChannelClosed):
                    call.fail(MessageError(f"service {self.name!r}: {exc}"))
                return None
        if deadline is not None:
            try:
                deadline = float(deadline) if not isinstance(deadline, bool) else math.nan
            except (TypeError, ValueError, OverflowError):
                deadline = math.nan
            if not math.isfinite(deadline):
                self.errors += 1
                with contextlib.suppress(ChannelClosed):
                    call.fail(
                        MessageError(f"service {self.name!r}: the call's deadline is not a finite time")
                    )
                return None
            deadline = min(deadline, time.monotonic() + self._limits.max_call_timeout)
        if self._target is not None:
            sc: Call[Any] = ServiceCall(req, call._hand_over(), deadline, trace, self.name)
        else:
            sc = call
            sc.request, sc._ctx = req, (trace, deadline)
        if self.request_type is not None:
            try:
                sc.request = msgspec.convert(req, self.request_type, dec_hook=accept_objects)
            except (msgspec.ValidationError, TypeError) as exc:
                self.errors += 1
                sc.fail(MessageError(f"service {self.name!r}: invalid request: {exc}"))
                return None
        return sc

    async def _run(self) -> None:
        """The service's reader. A call admitted to run now runs right here,
        in this task, up to where its handler first waits: one that returns
        at once is answered with no task and no timer (issue 24) and this
        task reads on; one that waits goes on in this task (its deadline
        armed then), and a fresh task takes the reading over. Each handler
        runs in a context of its own (as in a task of its own)."""
        limits = self._limits
        while True:
            while self._running >= limits.service_calls:
                # stop reading: further calls wait in the port's queue, and
                # flow control pushes back on their callers
                self._slot = asyncio.get_running_loop().create_future()
                await self._slot
            try:
                call = await self._rx.recv()
            except ChannelClosed:
                return
            if not isinstance(call, Call):
                continue
            self.calls += 1
            sc = self._unwrap(call)
            if sc is None:
                continue
            if self._target is not None:
                try:
                    self._target.send(sc)
                except ChannelClosed:
                    self.close()
                    return
                except MeshError as exc:  # e.g. the application stopped draining (BufferFull)
                    self.errors += 1
                    with contextlib.suppress(ChannelClosed):
                        sc.fail(exc)
                continue
            client = sc._caller()
            if not self._admit(client, sc):
                continue
            ctx = contextvars.copy_context()
            work = self._handle(sc, client)
            try:
                waits_on = ctx.run(work.send, None)
            except StopIteration:  # answered at once
                if self.closed:
                    return
                continue
            except asyncio.CancelledError:  # raised by the handler itself: ends unanswered
                continue
            # it waits: this task is the handler's from now on, a fresh one reads
            me = asyncio.current_task()
            if not self.closed:
                self._pump = asyncio.get_running_loop().create_task(self._run())
            if me is not None:
                self._tasks.adopt(me)  # cancelled on close
                self._watch(sc, me)
            await carry_on(work, waits_on, ctx)
            return

    def _admit(self, client: bytes, sc: Call[Any]) -> bool:
        """True if ``sc`` may run now (counted as running: the caller runs
        it); else it is queued behind its client's running calls, or refused
        (``ServiceBusy``) when that queue is full."""
        if self._per_client.get(client, 0) < self._limits.client_calls:
            self._running += 1
            self._per_client[client] = self._per_client.get(client, 0) + 1
            return True
        q = self._waiting.setdefault(client, deque())
        if len(q) >= self._limits.client_queued:
            self.refused += 1
            with contextlib.suppress(ChannelClosed):
                sc.fail(
                    ServiceBusy(
                        f"service {self.name!r} already has {self._limits.client_calls} calls running "
                        f"and {len(q)} waiting from this client"
                    )
                )
            return False
        q.append(sc)
        return False

    def _call_done(self, client: bytes) -> None:
        """A call of ``client`` ended: its next waiting call takes the slot."""
        q = self._waiting.get(client)
        while q:
            sc = q.popleft()
            if not q:
                del self._waiting[client]
            if sc.cancelled:
                sc._drop()
                continue
            self._watch(sc, self._tasks.spawn(self._handle(sc, client)))
            return
        self._waiting.pop(client, None)
        self._running -= 1
        n = self._per_client.get(client, 1) - 1
        if n > 0:
            self._per_client[client] = n
        else:
            self._per_client.pop(client, None)
        slot = self._slot
        if slot is not None and not slot.done():
            slot.set_result(None)

    async def _handle(self, call: Call[Any], client: bytes) -> None:
        key = id(call)
        ctx = getattr(call, "_ctx", None)
        trace, deadline = (None, None) if ctx is None else ctx
        try:
            with handling(trace, deadline, self.name):
                handler = self._handler
                if handler is None:
                    raise MeshError("this service has no handler")
                work = handler(call.request)
                if deadline is None:
                    result = await work
                elif type(work) is not types.CoroutineType:
                    loop = asyncio.get_running_loop()
                    async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic())):
                        result = await work
                else:
                    # its first step cannot time out (nothing interrupts it): the
                    # deadline's timer is armed only if the handler waits (issue 24)
                    try:
                        waits_on = work.send(None)
                    except StopIteration as done:
                        result = done.value
                    else:
                        loop = asyncio.get_running_loop()
                        async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic())):
                            result = await carry_on(work, waits_on)
                if self.reply_type is not None:
                    result = self._checked_reply(result)
        except asyncio.CancelledError:
            if self.closed or call.cancelled:
                return  # the caller gave up (or the service closed): nobody to answer
            raise
        except Exception as exc:
            self.errors += 1
            try:
                call.fail(exc)
            except ChannelClosed:
                pass
        else:
            try:
                call.reply(result)
            except ChannelClosed:
                pass
        finally:
            if self._active.pop(key, None) is not None:
                seq = self._seqs.pop(key, 0)
                entry = self._running_calls.pop(seq, None)
                if entry is not None:
                    for t in entry[2]:
                        t.cancel()
            if not self.closed:
                self._call_done(client)

    def _watch(self, call: Call[Any], work: asyncio.Task[Any]) -> None:
        """``call``'s handler, which ``work`` runs, did not end at once:
        a task that watches the caller is started if it still runs
        WATCH_AFTER seconds from now (``_sweep``: one timer for all, not a
        timer per call; most calls end quickly)."""
        seq = self._seq = self._seq + 1
        key = id(call)
        self._seqs[key] = seq
        self._running_calls[seq] = (call, work, [])
        self._active[key] = now = time.monotonic()
        self._unwatched.append((now, seq))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(WATCH_AFTER, self._sweep)

    def _sweep(self) -> None:
        """The calls started WATCH_AFTER seconds ago or more that still run
        get a watcher; the timer comes back for the next one to come due."""
        self._sweeper = None
        q, running = self._unwatched, self._running_calls
        due = time.monotonic() - WATCH_AFTER
        while q:
            start, seq = q[0]
            entry = running.get(seq)
            if entry is not None:  # still running
                if start > due:
                    break  # the next to come due
                if not entry[2]:
                    self._watch_caller(*entry)
            q.popleft()  # watched now, or ended
        if q and not self.closed:
            self._sweeper = asyncio.get_running_loop().call_later(q[0][0] - due, self._sweep)

    def _watch_caller(
        self, call: Call[Any], work: asyncio.Task[Any] | None, watcher: list[asyncio.Task[None]]
    ) -> None:
        async def watch() -> None:
            await call.wait_cancelled()
            if work is not None and not work.done():
                work.cancel()  # the caller gave up: stop working for it

        watcher.append(asyncio.get_running_loop().create_task(watch()))

    def _checked_reply(self, result: Any) -> Any:
        """A handler's result as ``reply_type``; ``MessageError`` if it does not fit."""
        try:
            return msgspec.convert(result, self.reply_type, dec_hook=accept_objects, from_attributes=True)
        except (msgspec.ValidationError, TypeError) as exc:
            raise MessageError(f"service {self.name!r}: invalid reply: {exc}") from None

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "request_type": type_name(self.request_type),
            "reply_type": type_name(self.reply_type),
            "mode": "receiver" if self._target is not None else "handler",
            "calls": counter(self.calls),
            "errors": counter(self.errors),
            "active": len(self._active) if self._target is None else None,
            "waiting": sum(map(len, self._waiting.values())),
            "unread": self._rx.statistics().queued,
            "refused": counter(self.refused),
            "oldest_active_age": round(now - min(self._active.values()), 6) if self._active else None,
        }

    def __repr__(self) -> str:
        return f"<Service {self.name!r}{' closed' if self.closed else ''}>"
