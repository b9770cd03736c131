"""Attaching this process to a running mesh: ``connect`` (by name or
listener path) and ``join`` (with an invitation) make this process a new
node of the mesh (``_join`` does the steps, ``Mesh`` wraps the node) and
give an ``Attachment``, what the client holds. Both return an ``Attaching``:
``async with`` it, or ``await`` it for a connection that lives until
``await conn.aclose()`` (notebooks, REPLs).

When the service's node goes away (it exited, crashed or restarts), every
later control-plane call raises ``NodeFailure`` saying so and how to come
back; ``connect(name, reconnect=True)`` attaches again on the next call
instead, once a mesh of that name runs again. Only the attachment itself is
re-made: a call in flight when the service went away fails and is never
repeated (it may have run), and channels the application opened there stay
failed (their state died with the service; only the application knows
whether to reopen them and what to replay)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, ClassVar, Final, TypeVar

from ._channel import Port
from ._control import Control, ControlPlane
from ._errors import (
    AuthenticationError,
    ChannelClosed,
    InvitationExpired,
    JoinError,
    MeshError,
    NodeFailure,
    PortFailed,
    VersionMismatch,
)
from ._invitation import Invitation
from ._join import JOIN_TIMEOUT, attach, deadline_after, take_invitation
from ._mesh import Mesh
from ._sockets import Backoff

R = TypeVar("R")

#: Seconds a control-plane call that failed with ``ChannelClosed`` or
#: ``PortFailed`` waits to learn whether the service's node went away with
#: it (a service that exits cleanly closes its channels just before its
#: connection ends). Only a failed call waits; a call the service merely
#: dropped reports this much later.
GONE_GRACE: Final = 0.25

#: Attach once more (``connect`` with ``reconnect=True``): given the
#: deadline and the timeout that set it, the new port, mesh and inviting node.
_Reattach = Callable[[float | None, float | None], Awaitable[tuple[Port, Mesh, bytes]]]


class Attachment(ControlPlane):
    """This process attached to a running mesh: ``port`` is peered with the
    server's ``Admission.port``; ``mesh`` is this process's new node. The
    control-plane methods are ``ControlPlane``'s.

    Held in ``async with meshipc.connect(...) as conn`` it closes with the
    block; got with ``conn = await meshipc.connect(...)`` (a notebook, a
    REPL) it lives until ``await conn.aclose()``. One dropped unclosed warns
    (``ResourceWarning``) and is closed on its loop.

    Once the service's node went away, each control-plane call raises
    ``NodeFailure`` (the service went away, and how to come back); made by
    ``connect(name, reconnect=True)``, the next call attaches again instead
    (``port`` and ``mesh`` are then the new attachment's; ``reconnects``
    counts them)."""

    __slots__ = (
        "__weakref__",
        "_closed",
        "_gone",
        "_inviter",
        "_lock",
        "_reattach",
        "_target",
        "_timeout",
        "mesh",
        "port",
        "reconnects",
    )

    def __init__(
        self,
        port: Port,
        mesh: Mesh,
        inviter: bytes = b"",
        *,
        target: str = "",
        reattach: _Reattach | None = None,
        timeout: float | None = JOIN_TIMEOUT,
    ) -> None:
        self.port = port
        self.mesh = mesh
        self._closed = False
        self._inviter = inviter
        # tells why the service's node went away, once it did
        self._gone: asyncio.Future[str] | None = mesh._node.when_gone(inviter) if inviter else None
        self._target = target
        self._reattach = reattach
        self._timeout = timeout
        self._lock = asyncio.Lock()
        #: times this connection attached again after the service went away
        self.reconnects = 0

    def _plane(self) -> Control:
        return self.mesh._plane()

    # ---------------------------------------------------------- the service going away

    def _went_away(self, reason: str) -> NodeFailure:
        if self._reattach is not None:
            back = f"the next call attaches again once a mesh {self._target!r} runs"
        elif self._target:
            back = (
                f"connect again (meshipc.connect({self._target!r})) once it runs, "
                "or connect with reconnect=True to attach again on the next call"
            )
        else:
            back = "join again with a new invitation once it runs"
        return NodeFailure(self._inviter.hex(), f"the service went away ({reason}): {back}")

    async def _guard(self, step: Callable[[float], Awaitable[R]], timeout: float | None) -> R:
        """``step()``, a control-plane call: if the service's node went away,
        ``NodeFailure`` (or, with ``reconnect=True``, attach again first,
        within ``timeout``); a call that fails because it went away meanwhile
        raises ``NodeFailure`` too, and is not repeated."""
        gone = self._gone
        spent = 0.0
        if gone is not None and gone.done() and not self._closed:
            if self._reattach is None:
                raise self._went_away(gone.result())
            loop = asyncio.get_running_loop()
            start = loop.time()
            await self._reconnect(timeout)
            spent = loop.time() - start
            gone = self._gone
        try:
            return await step(spent)
        except (ChannelClosed, PortFailed, MeshError) as exc:
            fell = isinstance(exc, ChannelClosed | PortFailed) or type(exc) is MeshError
            if gone is None or self._closed or not fell:
                raise
            if not gone.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(gone), GONE_GRACE)
            if not gone.done():
                raise
            raise self._went_away(gone.result()) from exc

    async def _reconnect(self, timeout: float | None) -> None:
        """Attach again by the name connected to, within ``timeout`` (the
        call's, else the connect's), trying again while no mesh of that name
        answers; ``NodeFailure`` if none did in time, ``VersionMismatch`` or
        ``AuthenticationError`` if the one that answers refuses us."""
        reattach = self._reattach
        async with self._lock:
            old = self._gone
            if reattach is None or old is None or not old.done():
                return  # another call attached again meanwhile
            bound = timeout if timeout is not None else self._timeout
            loop = asyncio.get_running_loop()
            deadline = None if bound is None else loop.time() + bound
            self.port.close()
            with contextlib.suppress(MeshError):
                await self.mesh.aclose()
            backoff = Backoff()
            while True:
                left = None if deadline is None else deadline - loop.time()
                try:
                    if left is not None and left <= 0:
                        raise TimeoutError(f"no mesh {self._target!r} answered within {bound:g} s")
                    port, mesh, inviter = await reattach(deadline, left)
                    break
                except (VersionMismatch, AuthenticationError):
                    raise  # it runs again, and refuses us: that is the answer
                except (JoinError, TimeoutError) as exc:
                    if deadline is not None and loop.time() >= deadline:
                        raise self._went_away(f"{old.result()}; {str(exc) or type(exc).__name__}") from None
                with contextlib.suppress(TimeoutError):  # past the deadline: reported above
                    async with asyncio.timeout_at(deadline):
                        await backoff.sleep()
            if self._closed:  # closed by the application meanwhile
                port.close()
                await mesh.aclose()
                raise MeshError("the connection is closed")
            self.port, self.mesh, self._inviter = port, mesh, inviter
            self._gone = mesh._node.when_gone(inviter)
            self.reconnects += 1

    @property
    def closed(self) -> bool:
        """True once ``aclose()`` ran (or the block that held it ended)."""
        return self._closed

    async def aclose(self) -> None:
        """Leave the mesh: close ``port`` and this process's node. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._gone is not None:
            self._gone.cancel()
        self.port.close()
        await self.mesh.aclose()

    async def __aenter__(self) -> Attachment:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if self._closed or self.mesh._closed:
            return
        warnings.warn(
            f"unclosed {self!r}: leave with `await conn.aclose()` "
            "(or use `async with meshipc.connect(...)`); closing it now",
            ResourceWarning,
            source=self,
            stacklevel=2,
        )
        _close_later(self.mesh)

    def __repr__(self) -> str:
        return f"<Attachment node={self.mesh.node_id!r}>"


def _close_later(mesh: Mesh) -> None:
    """Close ``mesh`` on its own loop (from a finalizer: any thread, no await)."""
    loop = mesh._node.loop
    if loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # the loop is shutting down
        loop.call_soon_threadsafe(lambda: _Closing.tasks.add(loop.create_task(mesh.aclose())))


class _Closing:
    #: closes started by finalizers, kept referenced until they finish
    tasks: ClassVar[set[asyncio.Task[None]]] = set()


async def _attached(
    invitation: Invitation, deadline: float | None, timeout: float | None
) -> tuple[Port, Mesh, bytes]:
    """This process as the new node ``invitation`` admits (until its mesh
    is closed): its first port, its mesh and the inviting node."""
    node, port = await attach(invitation, None, deadline, timeout)
    inviter = bytes(invitation.inviter)
    try:
        mesh = await Mesh._around(node, inviter)
    except BaseException:
        port.close()
        raise
    return port, mesh, inviter


class Attaching:
    """What ``connect``/``join`` return: ``await`` it for an ``Attachment``
    that lives until ``await conn.aclose()``, or use it as ``async with``
    for one closed with the block."""

    __slots__ = ("_conn", "_make")

    def __init__(self, make: Callable[[], Awaitable[Attachment]]) -> None:
        self._make = make
        self._conn: Attachment | None = None

    def __getattr__(self, name: str) -> Any:
        # only for names it does not have: most likely a missing await
        raise AttributeError(
            f"{type(self).__name__!r} object has no attribute {name!r}: connect() and join() give an "
            "Attaching; use `conn = await meshipc.connect(...)` or `async with meshipc.connect(...) as conn`"
        )

    def __await__(self) -> Generator[Any, None, Attachment]:
        return self._make().__await__()

    async def __aenter__(self) -> Attachment:
        if self._conn is not None:
            raise MeshError("this connect()/join() was entered already; call it again for another")
        self._conn = await self._make()
        return self._conn

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._conn is not None:
            await self._conn.aclose()


def join(invitation: Invitation, *, timeout: float | None = JOIN_TIMEOUT) -> Attaching:
    """Join the mesh an invitation is for, as a new node of this process:
    ``async with meshipc.join(inv) as conn`` or ``conn = await meshipc.join(inv)``.

    Raises ``JoinTimeout`` if the inviting node does not answer within
    ``timeout`` seconds (default ``JOIN_TIMEOUT``, 10 s; ``None``: no bound
    but the handshake's own), ``AuthenticationError`` if the inviting node
    rejects the invitation's credential (or cannot prove its own),
    ``InvitationExpired`` if the invitation was used or expired, and
    ``JoinError`` for any other failure while joining."""

    async def make() -> Attachment:
        return Attachment(*await _attached(invitation, deadline_after(timeout), timeout), timeout=timeout)

    return Attaching(make)


#: Invitations ``connect`` takes before giving up when each is withdrawn
#: before it is used (many clients attaching at once overflow a listener's
#: outstanding invitations, oldest first).
CONNECT_ATTEMPTS: Final = 5


def connect(
    name_or_path: str | os.PathLike[str],
    *,
    runtime_dir: str | os.PathLike[str] | None = None,
    expected_uid: int | None = None,
    timeout: float | None = JOIN_TIMEOUT,
    reconnect: bool = False,
) -> Attaching:
    """Attach this process to a running mesh by name or listener path:
    ``async with meshipc.connect("vmm") as conn`` (closed with the block) or
    ``conn = await meshipc.connect("vmm")`` (until ``await conn.aclose()``;
    for notebooks and REPLs).

    ``timeout`` bounds everything up to the attached connection (reaching
    the listener, its invitation, the handshake); default ``JOIN_TIMEOUT``
    (10 s), ``None`` for no bound. Raises ``JoinTimeout`` (the mesh did not
    answer in time), ``ConnectError`` (no such path, refused, permission
    denied, an unusable runtime folder; for a name, the reason says whether
    no such mesh runs, it is not listening, or it is stale),
    ``InvitationReadError``, ``InvitationTooLarge``,
    ``InvitationDecodeError``, ``AuthenticationError`` (listener of an
    unexpected uid, or a credential refused), ``VersionMismatch`` (the
    service speaks no protocol version this meshipc does: both named) or
    ``JoinError``.

    When the service's node goes away, each later control-plane call
    raises ``NodeFailure``; with ``reconnect=True`` the next call attaches
    again instead, once a mesh of that name runs again (within a ``call``'s
    ``timeout``, which covers attaching and the call together; for the other
    methods, or a call without one, within this ``timeout``). A call in flight when the service went away
    still fails with ``NodeFailure`` and is never repeated (it may have
    run); senders from ``open()`` and anything sent on ``port`` stay failed:
    the application reopens what it needs (what the old service held for
    them is gone, and only the application knows what to replay)."""

    async def attempt(deadline: float | None, timeout: float | None) -> tuple[Port, Mesh, bytes]:
        for n in range(1, CONNECT_ATTEMPTS + 1):
            invitation = await take_invitation(name_or_path, runtime_dir, expected_uid, deadline, timeout)
            try:
                return await _attached(invitation, deadline, timeout)
            except InvitationExpired:
                # withdrawn before we used it (a listener keeps a bounded
                # number outstanding, oldest first out): take a fresh one
                if n == CONNECT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def make() -> Attachment:
        parts = await attempt(deadline_after(timeout), timeout)
        target = os.fspath(name_or_path)
        return Attachment(*parts, target=target, reattach=attempt if reconnect else None, timeout=timeout)

    return Attaching(make)
