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
import functools
import os
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from ._attach import Attachment
from ._attach import connect as _aconnect
from ._channel import Port, Sender
from ._control import ControlPlane
from ._errors import MeshError
from ._service import ServiceSender
from ._tasks import answer_within
from ._tlsclient import connect_tls as _aconnect_tls

__all__ = ("Portal", "SyncConnection", "SyncPort", "SyncSender", "connect", "connect_tls")

R = TypeVar("R")
P = ParamSpec("P")


class Portal:
    """An event loop running in a daemon thread; ``call`` runs a coroutine
    function on it and blocks until it is done."""

    def __init__(self, name: str = "meshipc-portal") -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        self.closed = False

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            with contextlib.suppress(RuntimeError):
                tasks = asyncio.all_tasks(self._loop)
                for t in tasks:
                    t.cancel()
                if tasks:
                    self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    def call(self, fn: Callable[..., Coroutine[Any, Any, R]], *args: Any, **kwargs: Any) -> R:
        """``await fn(*args, **kwargs)`` on the portal's loop; its result or
        exception. Raises ``MeshError`` if the portal is closed or if called
        from the portal's own thread (that would wait for itself)."""
        if self.closed:
            raise MeshError("the connection is closed")
        if threading.current_thread() is self._thread:
            raise MeshError("a blocking meshipc.sync call from its own portal thread would deadlock")
        fut: concurrent.futures.Future[R] = asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self._loop)
        try:
            return fut.result()
        except Exception as exc:
            failed = exc
        except BaseException:
            fut.cancel()  # interrupted (Ctrl-C): the coroutine is cancelled too
            raise
        # the error as the caller's own: without the portal loop's frames (a
        # remote error's traceback is its note), and without "during handling"
        try:
            raise failed.with_traceback(None)
        finally:
            del failed

    def stop(self) -> None:
        """Stop the loop and join the thread (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
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

        async def call() -> Any:
            if isinstance(self._sender, ServiceSender):
                return await self._sender.call(request, timeout=timeout)  # the deadline travels
            async with answer_within(timeout, "the service"):
                return await self._sender.call(request)

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
