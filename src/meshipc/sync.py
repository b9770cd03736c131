"""The blocking client API: ``meshipc.sync``.

::

    with meshipc.sync.connect("vmm") as conn:
        print(conn.services())
        print(conn.call("vm", {"op": "status"}, timeout=5))

It drives the same asyncio code as ``meshipc.connect`` from an event loop
in a background thread (a *portal*, after anyio's blocking portal): every
blocking method submits a coroutine to that loop and waits for its result,
so there is one protocol implementation. It works from plain scripts, from
several threads at once (each call waits only for itself), and from code
that already runs an event loop in its thread (a Jupyter cell): that loop
is blocked for the duration of the call, the portal's is not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Iterable
from types import FrameType, TracebackType
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

from ._attach import Attachment
from ._attach import connect as _aconnect
from ._channel import Port, Sender
from ._control import ControlPlane
from ._errors import MeshError
from ._ports import Engine
from ._service import ServiceSender
from ._tasks import answer_within
from ._tlsclient import connect_tls as _aconnect_tls

__all__ = ("Portal", "SyncConnection", "SyncPort", "SyncSender", "connect", "connect_tls")

R = TypeVar("R")
P = ParamSpec("P")

#: Seconds the portal thread lets a blocking call's loop rest: once no call
#: came for this long (it looks this often), it drives the loop (what the
#: peer sends unasked, timers, a service going away) until the next call
#: takes it back. Until then nobody does, and a call drives it in its own
#: thread at once, with no hand-off between threads (calls in a loop, and
#: calls 10 ms apart, never wait for the portal thread); what arrives
#: meanwhile waits in the socket, at most twice this long.
IDLE_HANDOVER: Final = 0.05

_MAIN = threading.main_thread().ident


@dataclasses.dataclass(slots=True)
class PortalStats:
    """How a portal's calls were run (``SyncConnection.stats()``)."""

    #: calls whose own thread drove the loop: it wrote the request and read the reply
    driven: int = 0
    #: calls another thread ran while it drove the loop (several threads
    #: calling at once; a thread running an event loop of its own)
    handed: int = 0
    #: calls whose thread took the loop over from a caller that finished first
    taken_over: int = 0
    #: times the portal thread drove the loop (after ``IDLE_HANDOVER``, or for a caller with a loop)
    portal_runs: int = 0


class _Interrupts:
    """Ctrl-C while the main thread drives a portal's loop: the call being
    driven is cancelled and ``KeyboardInterrupt`` raised once it ended,
    rather than the loop interrupted half-way through whatever it ran (what
    ``asyncio.run`` does for its main task). The handler is installed while
    portals are open, only over Python's default one, and behaves as that
    one whenever no call is driven; the default comes back when the last
    portal closes (from the main thread)."""

    portals = 0
    installed = False
    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Future[Any] | None = None
    hit = False

    @classmethod
    def join(cls) -> None:
        cls.portals += 1

    @classmethod
    def leave(cls) -> None:
        cls.portals -= 1
        if cls.portals <= 0 and cls.installed and threading.get_ident() == _MAIN:
            if signal.getsignal(signal.SIGINT) is _on_interrupt:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            cls.installed = False

    @classmethod
    def hold(cls, loop: asyncio.AbstractEventLoop, task: asyncio.Future[Any]) -> None:
        """(Main thread.) ``task`` is driven now."""
        if not cls.installed and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_interrupt)
            cls.installed = True
        cls.loop, cls.task, cls.hit = loop, task, False

    @classmethod
    def release(cls) -> bool:
        """(Main thread.) The driven task is done: whether Ctrl-C came meanwhile."""
        hit = cls.hit
        cls.loop = cls.task = None
        cls.hit = False
        return hit


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    task, loop = _Interrupts.task, _Interrupts.loop
    if task is None or loop is None or task.done():
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt
        return
    _Interrupts.hit = True
    loop.call_soon_threadsafe(task.cancel)  # wakes the selector this thread waits in


async def _then_stop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, R]) -> R:
    """``await coro``, then stop ``loop``: the run driving it ends in the
    same loop iteration (a done callback would take one more)."""
    try:
        return await coro
    finally:
        loop.stop()


class Portal:
    """An event loop for blocking callers; ``call`` runs a coroutine
    function on it and blocks until it is done.

    Whoever calls drives the loop in its own thread: ``call`` takes the loop
    (nobody else is driving it), runs it until its coroutine is done and lets
    go, so the request is written and the reply read by the calling thread,
    with no hand-off between threads. A caller that finds the loop taken has
    its coroutine run by the thread driving it, and drives it itself if that
    one lets go first: several threads calling at once each get their own
    result. The portal thread drives the loop whenever no caller has for
    ``IDLE_HANDOVER`` seconds (what the peer sends unasked, timers, the
    service going away), and lets go when a caller comes (one hand-off, for
    the first call after a pause). A caller whose thread runs an event loop
    of its own (a Jupyter cell) cannot drive this one: the portal thread
    runs its coroutine (that caller's loop is blocked meanwhile)."""

    def __init__(self, name: str = "meshipc-portal") -> None:
        self._loop = asyncio.new_event_loop()
        # reentrant: a future's callback may fire under it; taken directly
        # (C-level enter and exit) where nothing waits
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._driver: int | None = None  # the thread driving the loop
        self._waiting = 0  # callers waiting for the loop or for their coroutine
        self._served = 0  # callers the portal thread must drive the loop for
        self._stop_asked = False  # the portal thread's run was asked to stop
        self._calls = 0  # calls so far: the portal thread drives once none came for a while
        self._targeted: int | None = None  # the thread the engines were last told drives them
        #: the engines this loop drives (they run calls from the driving thread at once)
        self.engines: Callable[[], Iterable[Engine]] = tuple
        self._stats = PortalStats()
        self.closed = False
        self._finished = False  # the loop is closed
        self._ready = threading.Event()
        _Interrupts.join()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    # -------------------------------------------------------------- the portal thread

    def _main(self) -> None:
        me = threading.get_ident()
        cv = self._cv
        self._ready.set()
        try:
            while True:
                with cv:
                    if not self._wait_to_drive():
                        break
                    self._driver = me
                    self._stats.portal_runs += 1
                self._target(me)
                try:
                    self._loop.run_forever()
                finally:
                    with cv:
                        self._driver = None
                        self._stop_asked = False
                        cv.notify_all()
        finally:
            self._shut(me)

    def _wait_to_drive(self) -> bool:
        """(Under the lock, in the portal thread.) Wait until the portal
        thread should drive the loop: True; False once closed. It looks
        every ``IDLE_HANDOVER`` seconds whether a call came meanwhile (a
        caller never wakes it: that would cost every call a thread switch)."""
        cv = self._cv
        seen = -1
        while True:
            if self._driver is None:
                if self.closed:
                    return False
                if self._served or (not self._waiting and self._calls == seen):
                    return True
            seen = self._calls
            cv.wait(IDLE_HANDOVER)

    def _shut(self, me: int) -> None:
        """Cancel what is left on the loop, run it to its end and close the loop."""
        with self._cv:
            while self._driver is not None:
                self._cv.wait()
            self._driver = me
        loop = self._loop
        self._target(me)
        try:
            with contextlib.suppress(RuntimeError):
                tasks = asyncio.all_tasks(loop)
                for t in tasks:
                    t.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()
        finally:
            with self._cv:
                self._finished = True
                self._cv.notify_all()

    def _target(self, me: int) -> None:
        """Tell the engines on this loop that thread ``me`` drives it now."""
        if self._targeted != me:
            self._targeted = me
            for engine in self.engines():
                engine.thread = me

    # -------------------------------------------------------------- callers

    def stats(self) -> PortalStats:
        """How calls were run so far (a copy)."""
        return dataclasses.replace(self._stats)

    def call(self, fn: Callable[..., Coroutine[Any, Any, R]], *args: Any, **kwargs: Any) -> R:
        """``await fn(*args, **kwargs)`` on the portal's loop; its result or
        exception. Raises ``MeshError`` if the portal is closed or if called
        from the portal's own thread (that would wait for itself)."""
        if self.closed:
            raise MeshError("the connection is closed")
        me = threading.get_ident()
        if me == self._thread.ident:
            raise MeshError("a blocking meshipc.sync call from its own portal thread would deadlock")
        running = asyncio.events._get_running_loop()
        if running is self._loop:
            raise MeshError("a blocking meshipc.sync call from inside its own event loop would deadlock")
        try:
            if running is not None:
                return self._served_call(fn(*args, **kwargs))
            return self._driven_call(me, fn, args, kwargs)
        except Exception as exc:
            failed = exc
        # the error as the caller's own: without the loop's frames (a remote
        # error's traceback is its note), and without "during handling"
        try:
            raise failed.with_traceback(None)
        finally:
            del failed

    def _driven_call(self, me: int, fn: Callable[..., Coroutine[Any, Any, R]], args: Any, kwargs: Any) -> R:
        """A call from a thread that can drive the loop: it does, unless the
        thread driving it finishes the call first."""
        cv = self._cv
        loop = self._loop
        fut: concurrent.futures.Future[R] | None = None
        with self._lock:
            if self.closed:
                raise MeshError("the connection is closed")
            self._calls += 1
            if self._driver is None:
                self._driver = me
                self._stats.driven += 1
            else:
                self._ask_stop()  # before the coroutine goes: the portal thread lets go, this one runs it
                fut = self._submit(fn(*args, **kwargs))
                self._waiting += 1
                try:
                    while not fut.done() and self._driver is not None and not self._finished:
                        cv.wait()
                except BaseException:
                    fut.cancel()  # interrupted (Ctrl-C): the coroutine is cancelled too
                    raise
                finally:
                    self._waiting -= 1
                if fut.done():
                    self._stats.handed += 1
                    return fut.result()
                if self._finished:
                    fut.cancel()
                    raise MeshError("the connection is closed")
                self._driver = me  # the driver let go first: this thread goes on
                self._stats.taken_over += 1
        try:
            if self._targeted != me:
                self._target(me)
            if fut is None:
                return self._drive(me, loop.create_task(_then_stop(loop, fn(*args, **kwargs))))
            theirs = asyncio.wrap_future(fut, loop=loop)
            theirs.add_done_callback(lambda _: loop.stop())
            return self._drive(me, theirs)
        finally:
            with self._lock:
                self._driver = None
                if self._waiting or self._served or self.closed:
                    cv.notify_all()

    def _drive(self, me: int, task: asyncio.Future[R]) -> R:
        """Run the loop in this thread until ``task`` is done. Ctrl-C (in the
        main thread) cancels the task rather than stop the loop wherever it
        was; the ``KeyboardInterrupt`` is raised once the task has ended."""
        main = me == _MAIN
        if main:
            _Interrupts.hold(self._loop, task)
        try:
            while not task.done():  # a stop meant for another run may end one early
                self._loop.run_forever()
            return task.result()
        except BaseException:
            if not task.done():
                task.cancel()  # run by the next driver
            raise
        finally:
            if main and _Interrupts.release():
                raise KeyboardInterrupt from None

    def _submit(self, coro: Coroutine[Any, Any, R]) -> concurrent.futures.Future[R]:
        """(Under the lock.) ``coro`` run by whoever drives the loop; a
        portal thread driving it is asked to let go (the caller takes over)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        fut.add_done_callback(self._notify)
        return fut

    def _ask_stop(self) -> None:
        """(Under the lock.) Ask the portal thread to let go of the loop, if it drives it."""
        if self._driver == self._thread.ident and not self._stop_asked:
            self._stop_asked = True
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _notify(self, _: object) -> None:
        with self._cv:
            self._cv.notify_all()

    def _served_call(self, coro: Coroutine[Any, Any, R]) -> R:
        """A call from a thread whose own loop runs: the portal thread (or
        whoever drives) runs it; this thread waits."""
        cv = self._cv
        with cv:
            if self.closed:
                coro.close()
                raise MeshError("the connection is closed")
            fut = self._submit(coro)
            self._served += 1
            self._stats.handed += 1
            cv.notify_all()
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise
        finally:
            with cv:
                self._served -= 1

    def stop(self) -> None:
        """Stop the loop and join the thread (idempotent)."""
        with self._cv:
            if self.closed:
                return
            self.closed = True
            self._ask_stop()
            self._cv.notify_all()
        _Interrupts.leave()
        if threading.current_thread() is not self._thread:
            self._thread.join()


class SyncPort:
    """Blocking view of a ``Port``: ``send`` and ``recv``."""

    def __init__(self, portal: Portal, port: Port) -> None:
        self._portal = portal
        self._port = port

    def send(self, value: Any) -> None:
        """Send ``value``; raises ``ChannelClosed`` if this end is closed."""

        async def send() -> None:
            self._port.send(value)

        self._portal.call(send)

    def recv(self, timeout: float | None = None) -> Any:
        """The next message; ``TimeoutError`` after ``timeout`` seconds,
        ``ChannelClosed``/``PortFailed`` at the end of the stream."""

        async def recv() -> Any:
            async with answer_within(timeout, "the port"):
                return await self._port.recv()

        return self._portal.call(recv)

    def close(self) -> None:
        async def close() -> None:
            self._port.close()

        with contextlib.suppress(MeshError):
            self._portal.call(close)


class SyncSender:
    """Blocking view of a ``Sender`` to a service (from ``SyncConnection.open``)."""

    def __init__(self, portal: Portal, sender: Sender[Any]) -> None:
        self._portal = portal
        self._sender = sender

    def call(self, request: Any, timeout: float | None = None) -> Any:
        """One call; raises ``RemoteError``, ``ChannelClosed``, ``PortFailed``,
        ``TimeoutError`` after ``timeout`` seconds."""

        sender = self._sender
        if isinstance(sender, ServiceSender):  # the deadline travels
            return self._portal.call(sender.call, request, timeout=timeout)

        async def call() -> Any:
            async with answer_within(timeout, "the service"):
                return await sender.call(request)

        return self._portal.call(call)

    def send(self, value: Any) -> None:
        async def send() -> None:
            self._sender.send(value)

        self._portal.call(send)

    def close(self) -> None:
        async def close() -> None:
            self._sender.close()

        with contextlib.suppress(MeshError):
            self._portal.call(close)

    def __enter__(self) -> SyncSender:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _blocking(
    method: Callable[Concatenate[ControlPlane, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncConnection, P], R]:
    """The blocking form of a ``ControlPlane`` method: the same signature
    and documentation (``help()`` shows them), run on the connection's portal."""
    name = method.__name__

    @functools.wraps(method)
    def blocking(self: SyncConnection, /, *args: P.args, **kwargs: P.kwargs) -> R:
        bound: Callable[P, Coroutine[Any, Any, R]] = getattr(self._conn, name)
        return self._portal.call(bound, *args, **kwargs)

    return blocking


class SyncConnection:
    """A blocking attached client: the control-plane methods of
    ``ControlPlane`` (``FACADE``: ``services``, ``call``, ``open``,
    ``inspect``, ``inspect_update``), each blocking until done. Use as a
    context manager, or call ``close()``."""

    def __init__(self, portal: Portal, cm: Any, conn: Attachment) -> None:
        self._portal = portal
        self._cm = cm
        self._conn = conn
        self._lock = threading.Lock()
        portal.engines = self._engines
        portal._targeted = None  # the engines made while connecting learn who drives next

    def _engines(self) -> tuple[Engine, ...]:
        """The engine of this process's node (the new one after a reconnect)."""
        return (self._conn.mesh._node.engine,)

    def stats(self) -> PortalStats:
        """How this connection's blocking calls were run: ``driven`` in the
        calling thread (the usual case), ``handed`` to another thread driving
        the loop, ``taken_over`` from one; ``portal_runs``: times the portal
        thread drove the loop between calls."""
        return self._portal.stats()

    @property
    def port(self) -> SyncPort:
        """The connection's first port (the new attachment's after a reconnect)."""
        return SyncPort(self._portal, self._conn.port)

    @property
    def reconnects(self) -> int:
        """Times this connection attached again after the service went away
        (``connect(name, reconnect=True)``)."""
        return self._conn.reconnects

    @property
    def node_id(self) -> Any:
        return self._conn.mesh.node_id

    # the control plane: ``ControlPlane``'s methods (``FACADE``), blocking
    services = _blocking(ControlPlane.services)
    call = _blocking(ControlPlane.call)
    inspect = _blocking(ControlPlane.inspect)
    inspect_update = _blocking(ControlPlane.inspect_update)
    _open = _blocking(ControlPlane.open)

    def open(self, service: str) -> SyncSender:
        return SyncSender(self._portal, self._open(service))

    open.__doc__ = ControlPlane.open.__doc__

    def close(self) -> None:
        """Detach from the mesh and stop the portal thread (idempotent)."""
        with self._lock:
            if self._portal.closed:
                return
            try:
                self._portal.call(self._cm.__aexit__, None, None, None)
            finally:
                self._portal.stop()

    def __enter__(self) -> SyncConnection:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncConnection node={self._conn.mesh.node_id!r}>"


def connect(name_or_path: str | os.PathLike[str], **options: Any) -> SyncConnection:
    """Attach to a running mesh without ``async``: the same arguments as
    ``meshipc.connect`` (``runtime_dir=``, ``expected_uid=``,
    ``reconnect=`` …), and raises what it raises (after the service went
    away, each call raises ``NodeFailure``, or with ``reconnect=True``
    attaches again first: see ``meshipc.connect``)."""
    portal = Portal()
    try:
        cm = _aconnect(name_or_path, **options)
        conn = portal.call(cm.__aenter__)
    except BaseException:
        portal.stop()
        raise
    return SyncConnection(portal, cm, conn)


def connect_tls(path: str | os.PathLike[str], **options: Any) -> SyncConnection:
    """Attach to a mesh on another host without ``async``: the same
    arguments as ``meshipc.connect_tls`` (an access file, ``timeout=`` …),
    and raises what it raises."""
    portal = Portal()
    try:
        cm = _aconnect_tls(path, **options)
        conn = portal.call(cm.__aenter__)
    except BaseException:
        portal.stop()
        raise
    return SyncConnection(portal, cm, conn)
