"""Attaching this process to a running mesh: ``connect`` (by name or
listener path) and ``join`` (with an invitation) make this process a new
node of the mesh (``_join`` does the steps, ``Mesh`` wraps the node) and
give an ``Attachment``, what the client holds. Both return an ``Attaching``:
``async with`` it, or ``await`` it for a connection that lives until
``await conn.aclose()`` (notebooks, REPLs)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, ClassVar, Final

from ._channel import Port
from ._control import Control, ControlPlane
from ._errors import InvitationExpired, MeshError
from ._invitation import Invitation
from ._join import JOIN_TIMEOUT, attach, deadline_after, take_invitation
from ._mesh import Mesh


class Attachment(ControlPlane):
    """This process attached to a running mesh: ``port`` is peered with the
    server's ``Admission.port``; ``mesh`` is this process's new node. The
    control-plane methods are ``ControlPlane``'s.

    Held in ``async with meshipc.connect(...) as conn`` it closes with the
    block; got with ``conn = await meshipc.connect(...)`` (a notebook, a
    REPL) it lives until ``await conn.aclose()``. One dropped unclosed warns
    (``ResourceWarning``) and is closed on its loop."""

    __slots__ = ("__weakref__", "_closed", "mesh", "port")

    def __init__(self, port: Port, mesh: Mesh) -> None:
        self.port = port
        self.mesh = mesh
        self._closed = False

    def _plane(self) -> Control:
        return self.mesh._plane()

    @property
    def closed(self) -> bool:
        """True once ``aclose()`` ran (or the block that held it ended)."""
        return self._closed

    async def aclose(self) -> None:
        """Leave the mesh: close ``port`` and this process's node. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
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


async def _attached(invitation: Invitation, deadline: float | None, timeout: float | None) -> Attachment:
    """This process as the new node ``invitation`` admits (until ``aclose()``)."""
    node, port = await attach(invitation, None, deadline, timeout)
    try:
        mesh = await Mesh._around(node, bytes(invitation.inviter))
    except BaseException:
        port.close()
        raise
    return Attachment(port, mesh)


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
        return await _attached(invitation, deadline_after(timeout), timeout)

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
    unexpected uid, or a credential refused) or ``JoinError``."""

    async def make() -> Attachment:
        deadline = deadline_after(timeout)
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            invitation = await take_invitation(name_or_path, runtime_dir, expected_uid, deadline, timeout)
            try:
                return await _attached(invitation, deadline, timeout)
            except InvitationExpired:
                # withdrawn before we used it (a listener keeps a bounded
                # number outstanding, oldest first out): take a fresh one
                if attempt == CONNECT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    return Attaching(make)
