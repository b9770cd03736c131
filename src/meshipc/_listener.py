"""The listener: a Unix socket that hands one invitation to each process of
our uid that connects, and ``Admission``, the server's view of each client
it admitted.

The socket carries nothing but invitations (``_invitation.FRAME``), after
which the client joins as a full node by connecting node to node,
authenticated by the credential in its invitation like every other connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from ._channel import Port
from ._errors import MeshError, MeshNameInUse
from ._invitation import FRAME, Inviter
from ._node import Node
from ._sockets import Acceptor, AcceptorStats, PeerCred, RateLimitedLog, is_socket_alive, listen_private
from ._tasks import TaskSet

log = logging.getLogger("meshipc")

#: Seconds a listener client gets to take its invitation.
CLIENT_TIMEOUT: Final = 5.0
#: Invitations one listener keeps outstanding (handed out, not yet used or
#: expired). Beyond it the oldest is withdrawn: a real client uses its
#: invitation within milliseconds, so clients that take one and never join
#: cannot pile up invitations (and their ports) faster than they expire.
MAX_OUTSTANDING: Final = 256
#: At ``MAX_OUTSTANDING``, the oldest invitation is withdrawn only once it is
#: this many seconds old; until then the next client waits for a slot (one
#: used, or the oldest aged). Withdrawing at once would, in a burst of real
#: clients, take the invitations of those in the middle of their handshake.
WITHDRAW_AFTER: Final = 5.0
#: Seconds between two looks for a free slot while clients wait at
#: ``MAX_OUTSTANDING`` (one waiter looks; the others queue behind it).
SLOT_RECHECK: Final = 0.02


class Admission:
    """One client the listener admitted, as the server sees it: ``port``
    (its peer is in the client) and ``peer`` (pid, uid, gid of the client
    process, from the kernel)."""

    __slots__ = ("peer", "port")

    def __init__(self, port: Port, peer: PeerCred) -> None:
        self.port = port
        self.peer = peer

    def __repr__(self) -> str:
        return f"<Admission peer={self.peer!r}>"


@dataclass(frozen=True, slots=True)
class ListenerStats:
    """A snapshot of one ``Listener`` (``Listener.stats()``)."""

    #: invitations written to a client
    given: int
    #: invitations handed out and neither used nor expired (at most ``MAX_OUTSTANDING``)
    outstanding: int
    #: invitations withdrawn to stay under ``MAX_OUTSTANDING``
    withdrawn: int
    #: clients of another uid, closed before any invitation existed
    refused: int
    #: clients that left before taking their invitation
    left_early: int
    #: admissions not taken by ``accept()`` yet
    queued: int
    #: the accept loop of the listener's socket (None before ``start``)
    acceptor: AcceptorStats | None
    closed: bool


class Listener:
    """Hands one invitation to each client that connects to ``path``.

    ``await accept()`` / ``async for conn in listener`` give an ``Admission``
    per client. Only clients running as our own uid get an invitation (no
    other uid could use one); others are closed and logged."""

    def __init__(self, node: Node, path: Path, inviter: Inviter) -> None:
        """``inviter`` makes the invitations, for clients to join ``node``."""
        self._node = node
        self.path = path
        self._inviter = inviter
        self._loop = node.loop
        self._sock: socket.socket | None = None
        self._acceptor: Acceptor | None = None
        self._log = RateLimitedLog()
        self._queue: asyncio.Queue[Admission | None] = asyncio.Queue()
        self._tasks = TaskSet(self._loop)
        self.closed = False
        self.refused = 0
        #: invitations withdrawn to stay under MAX_OUTSTANDING
        self.withdrawn = 0
        self.given = 0
        self.left_early = 0
        self._outstanding: dict[bytes, float] = {}  # invited node id -> loop time, oldest first
        self._slot = asyncio.Lock()  # clients waiting for an invitation slot, in turn

    def start(self) -> None:
        """Bind the socket (replacing a stale one of ours) and start accepting."""
        path = self.path
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
                raise MeshError(f"{path} exists and is not a socket of ours (refusing to replace it)")
            if is_socket_alive(path):
                raise MeshNameInUse(f"a listener already runs at {path}")
            os.unlink(path)  # stale socket of a dead mesh of ours
        s = listen_private(path, "listener")
        self._sock = s
        # its clients never speak (they wait for their invitation), and each
        # task ends as soon as it runs (an invitation fits in the socket's
        # buffer): eviction would only ever drop real clients of a busy loop
        self._acceptor = Acceptor(
            self._loop,
            s,
            lambda sock: self._tasks.spawn(self._serve(sock)),
            f"listener {self.path}",
            evict_after=None,
        )
        self._acceptor.start()

    async def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                cred = PeerCred.of(sock)
            except OSError as exc:
                log.warning("listener %s: no peer credentials: %s", self.path, exc)
                return
            if cred.uid != os.getuid():
                self.refused += 1
                self._log.warning(
                    "uid",
                    "listener %s refused pid %d uid %d: not our uid (it could not join)",
                    self.path,
                    cred.pid,
                    cred.uid,
                )
                return
            await self._room_for_one()
            mine, theirs = Port.pair()
            try:
                inv = self._inviter.invite_now(theirs, None)
            except MeshError as exc:  # the mesh is shutting down
                log.info("listener %s: no invitation for pid %d: %s", self.path, cred.pid, exc)
                mine.close()
                return
            self._keep_outstanding(bytes(inv.node))
            data = bytes(inv)
            try:
                async with asyncio.timeout(CLIENT_TIMEOUT):
                    await self._loop.sock_sendall(sock, FRAME.pack(len(data)) + data)
            except (OSError, TimeoutError) as exc:
                why = f"not taken within {CLIENT_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else str(exc)
                log.info(
                    "listener %s: client pid %d uid %d left early: %s", self.path, cred.pid, cred.uid, why
                )
                self.left_early += 1
                self._node.forget(bytes(inv.node), "the client left before taking its invitation")
                mine.close()
                return
            self.given += 1
            log.info("listener %s: invitation sent to pid %d uid %d", self.path, cred.pid, cred.uid)
            self._queue.put_nowait(Admission(mine, cred))

    def _keep_outstanding(self, node_id: bytes) -> None:
        self._outstanding[node_id] = self._loop.time()

    def _forget_used(self) -> None:
        """Keep only the invitations neither used nor expired yet."""
        is_invited = self._node.is_invited
        self._outstanding = {n: t for n, t in self._outstanding.items() if is_invited(n)}

    def stats(self) -> ListenerStats:
        """What this listener has handed out (a snapshot; never raises)."""
        self._forget_used()
        return ListenerStats(
            given=self.given,
            outstanding=len(self._outstanding),
            withdrawn=self.withdrawn,
            refused=self.refused,
            left_early=self.left_early,
            queued=max(0, self._queue.qsize() - self.closed),  # less the end-of-queue mark once closed
            acceptor=self._acceptor.stats() if self._acceptor is not None else None,
            closed=self.closed,
        )

    async def _room_for_one(self) -> None:
        """Wait until fewer than ``MAX_OUTSTANDING`` invitations are
        outstanding; the oldest is withdrawn once ``WITHDRAW_AFTER`` old."""
        async with self._slot:
            while True:
                if len(self._outstanding) >= MAX_OUTSTANDING:
                    self._forget_used()
                if len(self._outstanding) < MAX_OUTSTANDING:
                    return
                oldest, since = next(iter(self._outstanding.items()))
                if self._loop.time() - since < WITHDRAW_AFTER:
                    await asyncio.sleep(SLOT_RECHECK)
                    continue
                del self._outstanding[oldest]
                self.withdrawn += 1
                self._log.warning(
                    "withdrawn",
                    "listener %s: %d invitations outstanding; withdrew the oldest",
                    self.path,
                    MAX_OUTSTANDING,
                )
                self._node.forget(oldest, "invitation withdrawn: too many outstanding")

    async def accept(self) -> Admission:
        """The next client. Raises ``MeshError`` once the listener is closed."""
        if self.closed and self._queue.empty():
            raise MeshError("listener closed")
        conn = await self._queue.get()
        if conn is None:
            self._queue.put_nowait(None)
            raise MeshError("listener closed")
        return conn

    def __aiter__(self) -> Listener:
        return self

    async def __anext__(self) -> Admission:
        try:
            return await self.accept()
        except MeshError:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop accepting and remove the socket file (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._sock is not None:
            if self._acceptor is not None:
                self._acceptor.close()
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._tasks.cancel_all()
        self._queue.put_nowait(None)

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Listener {self.path}>"
