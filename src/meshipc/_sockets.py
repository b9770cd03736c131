"""Unix socket plumbing shared by every socket a node owns: read exactly n
bytes (``recv_exact``), connect through a full backlog (``connect_unix``,
``Backoff``), listen privately (``listen_private``), probe a socket path
(``is_socket_alive``), read the kernel's peer credentials (``PeerCred``),
and accept connections under flood caps (``Acceptor``, with its
``RateLimitedLog``).

It knows no protocol: the node handshake, the control socket and the
invitation listener each build their exchange on top of it (see
docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ._errors import MeshError
from ._platform import PLATFORM

log = logging.getLogger("meshipc")

#: Connections one listening socket serves at once before they are
#: authenticated (node handshakes; listener clients until their invitation
#: is sent). At the cap, accepting pauses and the rest wait in the kernel's
#: backlog: silent or slow peers cost at most this many fds per socket.
MAX_PENDING: Final = 128
#: At the cap, a connection whose peer has sent nothing for this many seconds
#: gives its slot to the next one waiting (a real peer speaks first, the
#: moment it connects): silent peers cannot keep real ones waiting in the
#: backlog. A peer that has spoken (bytes wait unread, or the handler said
#: ``Acceptor.heard``) is never evicted: its handshake has its own timeout.
EVICT_AFTER: Final = 0.25
#: Seconds between two log lines about the same kind of trouble on one
#: socket (refused peers, failed accepts); the next line says how many
#: were held back.
LOG_INTERVAL: Final = 10.0
#: ``accept`` errors meaning "out of descriptors or memory". The listening
#: socket stays readable, so accepting pauses (no busy loop) and resumes
#: after a backoff from ``PAUSE_FIRST`` to ``PAUSE_MAX`` seconds, or as soon
#: as a connection of this socket ends and gives back its fd.
OUT_OF_FDS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE_FIRST: Final = 0.05
PAUSE_MAX: Final = 1.0
#: Connections accepted per readiness callback: a bounded batch, so one busy
#: listening socket cannot starve the event loop.
ACCEPT_BATCH: Final = 64
#: Kernel backlog of a listening socket: connections beyond the ``Acceptor``'s
#: cap wait here.
LISTEN_BACKLOG: Final = 1024
#: Mode of a listening socket's file: the owner only (the directory is 0700 too).
SOCKET_MODE: Final = 0o600
#: Waits between tries of ``Backoff``: from ``BACKOFF_FIRST`` doubling to
#: ``BACKOFF_MAX`` seconds, each drawn at random from its upper half
#: (jitter), so clients shed together do not come back together.
BACKOFF_FIRST: Final = 0.01
BACKOFF_MAX: Final = 0.5
#: Seconds ``is_socket_alive`` waits for a connect (a live listener answers at
#: once; a full backlog still counts as alive).
PROBE_TIMEOUT: Final = 1.0


class StreamEnded(ConnectionError):
    """The peer closed the stream before ``expected`` bytes arrived
    (``received`` did). An ``OSError``, like the read's own failures;
    callers that report their own error catch it first."""

    def __init__(self, received: int, expected: int) -> None:
        super().__init__(f"peer closed the connection after {received} of {expected} bytes")
        self.received = received
        self.expected = expected


async def recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from the non-blocking ``sock``. Raises
    ``StreamEnded`` if the peer closes first; ``OSError`` from the read
    passes through."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise StreamEnded(len(buf), n)
        buf += chunk
    return bytes(buf)


class Backoff:
    """Growing, jittered waits between tries (``BACKOFF_FIRST`` ..
    ``BACKOFF_MAX``); ``tries`` counts the waits so far."""

    __slots__ = ("_wait", "tries")

    def __init__(self) -> None:
        self._wait = BACKOFF_FIRST
        self.tries = 0

    async def sleep(self) -> None:
        self.tries += 1
        await asyncio.sleep(random.uniform(self._wait / 2, self._wait))
        self._wait = min(self._wait * 2, BACKOFF_MAX)


async def connect_unix(loop: asyncio.AbstractEventLoop, sock: socket.socket, path: str) -> None:
    """Connect the non-blocking Unix stream ``sock`` to ``path``.

    A full backlog makes a non-blocking Unix ``connect`` fail with
    ``EAGAIN``: nothing is in progress (unlike TCP), so waiting for the
    socket to become writable, as ``loop.sock_connect`` does, would take an
    unconnected socket for a connected one. Here it is tried again after a
    ``Backoff`` until it goes through; the caller bounds the whole (its
    timeout). Other ``OSError``s pass through."""
    backoff = Backoff()
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            await backoff.sleep()
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.EISCONN and backoff.tries:
                return  # a platform where the first try did start it
            raise


def listen_private(path: Path, what: str, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A non-blocking Unix socket listening at ``path``, mode 0600."""
    s = PLATFORM.unix_socket()
    try:
        s.bind(os.fspath(path))
        os.chmod(path, SOCKET_MODE)
        s.listen(backlog)
        s.setblocking(False)
    except OSError as exc:
        s.close()
        raise MeshError(f"cannot listen on {what} {path}: {exc}") from exc
    return s


def is_socket_alive(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    s = PLATFORM.unix_socket()
    try:
        s.settimeout(PROBE_TIMEOUT)
        s.connect(os.fspath(path))
        return True
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        s.close()


class PeerCred:
    """Credentials of the process at the other end of a Unix socket, from the kernel."""

    __slots__ = ("gid", "pid", "uid")

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCred:
        """The peer of ``sock``; ``PeerCredentialsError`` (an ``OSError``
        and a ``HandshakeError``) when the kernel gives no usable record."""
        return cls(*PLATFORM.peer_cred(sock))

    def __repr__(self) -> str:
        return f"PeerCred(pid={self.pid}, uid={self.uid}, gid={self.gid})"


class RateLimitedLog:
    """Warnings, at most one per ``interval`` seconds per kind; the next
    line of a kind says how many of it were held back."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held:
            msg += " (and %d more like this in the last %.0f s)"
            args = (*args, held, now - (last or now))
        log.warning(msg, *args)


def _has_spoken(sock: socket.socket) -> bool:
    """Whether bytes from the peer of ``sock`` wait unread (a peer that hung
    up, or a socket already closed, has not: it may go)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing to read (EAGAIN), or closed under us
        return False


@dataclass(frozen=True, slots=True)
class AcceptorStats:
    """A snapshot of one ``Acceptor`` (``Acceptor.stats()``)."""

    #: connections accepted and handed on since it started
    accepted: int
    #: connections accepted and not yet done with (at most ``limit``)
    pending: int
    #: the cap on ``pending`` (``MAX_PENDING`` unless told otherwise)
    limit: int
    #: silent connections cancelled at the cap to make room
    evicted: int
    #: times accepting paused for lack of fds or memory
    out_of_fds: int
    closed: bool


class Acceptor:
    """Accepts the connections of one listening socket and hands each to
    ``handle``, which starts a task for it (and must not block).

    At most ``limit`` of those tasks run at once. At the cap, the oldest
    connection whose peer has sent nothing for ``evict_after`` seconds is
    cancelled to make room; a peer that has spoken (bytes wait unread, or
    ``heard`` was called for its socket) is never taken, so a real peer in
    the middle of its handshake keeps its slot however slow the loop is. If
    no connection may be taken, accepting stops until one ends or may be
    (the kernel's backlog holds the rest). ``evict_after=None``: never evict
    (for a socket whose peers are not expected to speak). Out of fds or
    memory (``EMFILE``, ``ENFILE`` …), accepting pauses with a growing
    backoff instead of spinning on a socket that stays readable, and
    resumes as soon as one of its own connections ends. Failures are
    logged at most once per ``LOG_INTERVAL`` per kind."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        lsock: socket.socket,
        handle: Callable[[socket.socket], asyncio.Future[Any]],
        label: str,
        limit: int | None = None,
        evict_after: float | None = EVICT_AFTER,
    ) -> None:
        self.loop = loop
        self.lsock = lsock
        self.handle = handle
        self.label = label
        self.limit = MAX_PENDING if limit is None else limit  # the cap when made
        self.evict_after = evict_after
        self._running: dict[asyncio.Future[Any], socket.socket] = {}
        # connections whose peer has not been heard yet: sock -> (task, accepted at, loop time)
        self._silent: dict[socket.socket, tuple[asyncio.Future[Any], float]] = {}
        #: times accepting paused for lack of fds or memory
        self.out_of_fds = 0
        #: connections cancelled at the cap to make room
        self.evicted = 0
        #: connections accepted and handed on
        self.accepted = 0
        self.closed = False
        self._watching = False  # the loop watches the listening socket
        self._timer: asyncio.TimerHandle | None = None
        self._pause = PAUSE_FIRST
        self._log = RateLimitedLog()

    def start(self) -> None:
        self._resume()

    def close(self) -> None:
        self.closed = True
        self._stop_reading()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def pending(self) -> int:
        """Connections accepted and not yet done with."""
        return len(self._running)

    def stats(self) -> AcceptorStats:
        """What this acceptor has done so far (a snapshot; never raises)."""
        return AcceptorStats(
            accepted=self.accepted,
            pending=len(self._running),
            limit=self.limit,
            evicted=self.evicted,
            out_of_fds=self.out_of_fds,
            closed=self.closed,
        )

    def heard(self, sock: socket.socket) -> None:
        """The peer of ``sock`` has spoken: never evict it (its handler's
        own timeout bounds it from now on)."""
        self._silent.pop(sock, None)

    def _resume(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed and not self._watching:
            self.loop.add_reader(self.lsock.fileno(), self._on_readable)
            self._watching = True

    def _evict_oldest(self) -> float:
        """Cancel the oldest connection whose peer has sent nothing for
        ``evict_after`` seconds (0.0); else the seconds until one may be
        (``PAUSE_MAX`` when none is silent). Its fd is freed, and accepting
        resumes, when its task ends."""
        if self.evict_after is None:
            return PAUSE_MAX
        now = self.loop.time()
        for sock, (task, since) in list(self._silent.items()):
            wait = since + self.evict_after - now
            if wait > 0:
                return wait  # the oldest silent one is not old enough yet
            if _has_spoken(sock):
                del self._silent[sock]
                continue
            del self._silent[sock]
            self._running.pop(task, None)
            task.cancel()  # its _release resumes accepting once its fd is closed
            self.evicted += 1
            self._log.warning(
                "evicted",
                "%s: %d connections pending; dropped one silent for %.1f s",
                self.label,
                len(self._running) + 1,
                now - since,
            )
            return 0.0
        return PAUSE_MAX

    def _make_room(self) -> bool:
        """At the cap: evict the oldest connection, or stop accepting until
        one ends or the oldest may be evicted."""
        wait = self._evict_oldest()
        if wait > 0:
            self._pause_for(wait)
            return False
        return True

    def _pause_for(self, seconds: float) -> None:
        self._stop_reading()
        if self._timer is None:
            self._timer = self.loop.call_later(seconds, self._resume)

    def _stop_reading(self) -> None:
        if self._watching:
            self.loop.remove_reader(self.lsock.fileno())
            self._watching = False  # the loop watches the listening socket

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.pending >= self.limit and not self._make_room():
                return
            try:
                sock, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_FDS:
                    self.out_of_fds += 1
                    self._log.warning(
                        "out of fds", "%s: accept failed (%s): pausing accepts", self.label, exc.strerror
                    )
                    self._stop_reading()
                    # our oldest silent peer gives its fd back, if it has had its time;
                    # else try again after a backoff (fds may be freed elsewhere)
                    wait = self._evict_oldest() if self._running else self._pause
                    if wait > 0:
                        self._pause_for(min(wait, self._pause))
                        self._pause = min(self._pause * 2, PAUSE_MAX)
                    return
                self._log.warning("accept", "%s: accept failed: %s", self.label, exc)
                continue  # ECONNABORTED and the like: that one connection
            self._pause = PAUSE_FIRST
            sock.setblocking(False)
            try:
                task = self.handle(sock)
            except BaseException:
                sock.close()
                raise
            self.accepted += 1
            self._running[task] = sock
            self._silent[sock] = (task, self.loop.time())
            task.add_done_callback(self._release)

    def _release(self, task: asyncio.Future[Any]) -> None:
        sock = self._running.pop(task, None)
        if sock is not None:
            self._silent.pop(sock, None)
        self._resume()  # also ends a pause for fds: one of ours was just freed
