"""Named meshes, listeners, invitations, ``connect`` and ``join`` (layer 8).

An invitation admits one new node to a running mesh, once, for a limited
time. It holds the mesh directory, the inviting node's id, the id the new
node must use, the port it receives first (a port descriptor: the port is in
transit to the new node, exactly as if it had been sent in a message), and
the mesh secret. The listener socket carries nothing but invitations::

    [u32 little-endian length][msgpack invitation]

after which the client joins as a full node by connecting node to node,
authenticated by the secret like every other connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import msgspec

from ._channel import Port, Sender
from ._errors import (
    AuthenticationError,
    ConnectError,
    HandshakeError,
    InvitationDecodeError,
    InvitationExpired,
    InvitationReadError,
    InvitationTooLarge,
    JoinError,
    JoinTimeout,
    MeshError,
    MeshNameInUse,
)
from ._ids import NodeId
from ._names import listener_path, node_path, not_running_reason, runtime_location
from ._node import (
    HANDSHAKE_TIMEOUT,
    V_DUPLICATE,
    Acceptor,
    PeerCred,
    RateLimitedLog,
    is_socket_alive,
    listen_private,
)
from ._platform import PLATFORM
from ._wire import _DESC, PortDesc

if TYPE_CHECKING:
    from ._mesh import Mesh

log = logging.getLogger("meshipc")

#: Largest invitation a client reads (checked before allocating). Real ones
#: are a few hundred bytes; the cap is the reference design's.
MAX_INVITATION: Final = 64 * 1024
#: Seconds an invitation stays valid by default.
INVITATION_TTL: Final = 10.0
#: Seconds a listener client gets to take its invitation.
CLIENT_TIMEOUT: Final = 5.0
#: Default bound, in seconds, on ``connect``/``join`` reaching a mesh:
#: connecting to the listener, reading the invitation and the handshake with
#: the inviting node, all together. A live mesh answers in milliseconds; the
#: bound is for a stopped, wedged or hostile one.
JOIN_TIMEOUT: Final = 10.0
#: Invitations one listener keeps outstanding (handed out, not yet used or
#: expired). Beyond it the oldest is withdrawn: a real client uses its
#: invitation within milliseconds, so clients that take one and never join
#: cannot pile up invitations (and their ports) faster than they expire.
MAX_OUTSTANDING: Final = 256
_LEN = struct.Struct("<I")
_INVITATION_VERSION = 1


# --------------------------------------------------------------- invitation


class _Wire(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    version: int
    directory: str
    inviter: bytes
    node: bytes
    port: bytes
    secret: bytes
    expires: float


class Invitation:
    """Admits one new node to a mesh, once, before it expires.

    ``bytes(inv)`` serializes it (it contains the mesh secret: carry it only
    over channels as private as the mesh itself);
    ``Invitation.from_bytes(data)`` reads one back (raises
    ``InvitationDecodeError``). The repr never shows the secret."""

    __slots__ = ("_w",)

    def __init__(self, w: _Wire) -> None:
        self._w = w

    @property
    def directory(self) -> str:
        return self._w.directory

    @property
    def inviter(self) -> NodeId:
        return NodeId(self._w.inviter)

    @property
    def node(self) -> NodeId:
        return NodeId(self._w.node)

    @property
    def expires(self) -> float:
        return self._w.expires

    def __bytes__(self) -> bytes:
        return msgspec.msgpack.encode(self._w)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Invitation:
        if len(data) > MAX_INVITATION:
            raise InvitationDecodeError(f"invitation of {len(data)} bytes exceeds {MAX_INVITATION}")
        try:
            w = msgspec.msgpack.decode(data, type=_Wire)
        except (ValueError, RecursionError) as exc:  # msgspec's errors, and bad UTF-8 in a str
            raise InvitationDecodeError(f"not a meshipc invitation: {exc}") from None
        if w.version != _INVITATION_VERSION:
            raise InvitationDecodeError(f"unsupported invitation version {w.version}")
        if not math.isfinite(w.expires):
            raise InvitationDecodeError("invitation expiry is not a finite time")
        if len(w.inviter) != 16 or len(w.node) != 16 or len(w.secret) != 32 or len(w.port) != _DESC.size:
            raise InvitationDecodeError("invitation fields have the wrong sizes")
        if not w.directory.startswith("/") or "\0" in w.directory:
            raise InvitationDecodeError("invitation directory is not an absolute path")
        return cls(w)

    def __repr__(self) -> str:
        return f"Invitation(directory={self.directory!r}, node={self.node!r}, secret=<redacted>)"


class Inviter:
    """Makes invitations for one mesh; safe to use from any task or thread.

    The work runs on the mesh's own event loop, so holders need not own the
    ``Mesh``."""

    def __init__(self, mesh: Mesh, ttl: float = INVITATION_TTL) -> None:
        self._mesh = mesh
        self._loop = mesh._node.loop
        self.ttl = ttl

    def _invite_now(self, port: Port, ttl: float | None) -> Invitation:
        node = self._mesh._node
        if node.closed:
            raise MeshError("the mesh is closed")
        if not isinstance(port, Port) or len(port._states) != 1:
            raise ChannelClosedOrType(port)
        (st,) = port._detach()
        new_node = NodeId.random()
        ttl = self.ttl if ttl is None else ttl
        node.expect_invited(new_node, ttl)  # first: nothing may try to connect to it
        desc = node.engine._send_port(st, new_node)
        packed = _DESC.pack(
            desc.id, desc.peer_node, desc.peer_port, desc.origin, desc.send_seq, desc.recv_seq, desc.flags
        )
        return Invitation(
            _Wire(
                _INVITATION_VERSION,
                os.fspath(node.directory),
                bytes(node.id),
                bytes(new_node),
                packed,
                node._secret.reveal(),
                time.time() + ttl,
            )
        )

    async def invite(self, port: Port, *, ttl: float | None = None) -> Invitation:
        """An invitation whose new node receives ``port`` as its first port
        (keep the other end). Unused, it expires after ``ttl`` seconds and the
        kept end fails."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return self._invite_now(port, ttl)
        cf = asyncio.run_coroutine_threadsafe(self._async_invite(port, ttl), self._loop)
        return await asyncio.wrap_future(cf)

    async def _async_invite(self, port: Port, ttl: float | None) -> Invitation:
        return self._invite_now(port, ttl)

    def invite_blocking(self, port: Port, *, ttl: float | None = None, timeout: float = 10.0) -> Invitation:
        """``invite`` for plain threads (not the mesh's loop thread)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise MeshError("invite_blocking called on the mesh's own loop; use await invite()")
        cf = asyncio.run_coroutine_threadsafe(self._async_invite(port, ttl), self._loop)
        return cf.result(timeout)


def ChannelClosedOrType(port: Any) -> MeshError:
    if isinstance(port, Port):
        return MeshError("the port is closed or was sent away")
    return MeshError(f"invite() takes a meshipc.Port, got {type(port).__name__}")


# ----------------------------------------------------------------- listener


class Connection:
    """One attached client as the server sees it: ``port`` (its peer is in the
    client) and ``peer`` (pid, uid, gid of the client process, from the kernel)."""

    __slots__ = ("peer", "port")

    def __init__(self, port: Port, peer: PeerCred) -> None:
        self.port = port
        self.peer = peer

    def __repr__(self) -> str:
        return f"<Connection peer={self.peer!r}>"


class Listener:
    """Hands one invitation to each client that connects to ``path``.

    ``await accept()`` / ``async for conn in listener`` give a ``Connection``
    per client. Only clients running as our own uid get an invitation (no
    other uid could use one); others are closed and logged."""

    def __init__(self, mesh: Mesh, path: Path, ttl: float) -> None:
        self._mesh = mesh
        self.path = path
        self._inviter = Inviter(mesh, ttl)
        self._loop = mesh._node.loop
        self._sock: socket.socket | None = None
        self._acceptor: Acceptor | None = None
        self._log = RateLimitedLog()
        self._queue: asyncio.Queue[Connection | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.refused = 0
        #: invitations withdrawn to stay under MAX_OUTSTANDING
        self.withdrawn = 0
        self._outstanding: dict[bytes, None] = {}  # invited node ids, oldest first

    def start(self) -> None:
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
        self._acceptor = Acceptor(self._loop, s, self._start_serving, f"listener {self.path}")
        self._acceptor.start()

    def _start_serving(self, sock: socket.socket) -> asyncio.Task[None]:
        t = self._loop.create_task(self._serve(sock))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

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
            mine, theirs = Port.pair()
            try:
                inv = self._inviter._invite_now(theirs, None)
            except MeshError as exc:  # the mesh is shutting down
                log.info("listener %s: no invitation for pid %d: %s", self.path, cred.pid, exc)
                mine.close()
                return
            self._keep_outstanding(inv._w.node)
            data = bytes(inv)
            try:
                async with asyncio.timeout(CLIENT_TIMEOUT):
                    await self._loop.sock_sendall(sock, _LEN.pack(len(data)) + data)
            except (OSError, TimeoutError) as exc:
                why = f"not taken within {CLIENT_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else str(exc)
                log.info(
                    "listener %s: client pid %d uid %d left early: %s", self.path, cred.pid, cred.uid, why
                )
                self._mesh._node.forget(inv._w.node, "the client left before taking its invitation")
                mine.close()
                return
            log.info("listener %s: invitation sent to pid %d uid %d", self.path, cred.pid, cred.uid)
            self._queue.put_nowait(Connection(mine, cred))

    def _keep_outstanding(self, node_id: bytes) -> None:
        self._outstanding[node_id] = None
        if len(self._outstanding) <= MAX_OUTSTANDING:
            return
        invited = self._mesh._node._invited  # neither used nor expired yet
        self._outstanding = {n: None for n in self._outstanding if n in invited}
        while len(self._outstanding) > MAX_OUTSTANDING:
            oldest = next(iter(self._outstanding))
            del self._outstanding[oldest]
            if oldest in invited:
                self.withdrawn += 1
                self._log.warning(
                    "withdrawn",
                    "listener %s: %d invitations outstanding; withdrew the oldest",
                    self.path,
                    MAX_OUTSTANDING,
                )
                self._mesh._node.forget(oldest, "invitation withdrawn: too many outstanding")

    async def accept(self) -> Connection:
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

    async def __anext__(self) -> Connection:
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
        for t in self._tasks:
            t.cancel()
        self._queue.put_nowait(None)

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Listener {self.path}>"


# ------------------------------------------------------------------- client


class ClientConnection:
    """An attached client's side: ``port`` is peered with the server's
    ``Connection.port``; ``mesh`` is this process's new node."""

    __slots__ = ("mesh", "port")

    def __init__(self, port: Port, mesh: Mesh) -> None:
        self.port = port
        self.mesh = mesh

    # the control plane (see ``_control``)

    async def services(self) -> dict[str, Any]:
        """The mesh's services: name -> ``{"node", "request_type", "reply_type", "since"}``."""
        return await self.mesh._control.services()

    async def call(self, service: str, request: Any, timeout: float | None = None) -> Any:
        """Call the service ``service``; the callee sees the deadline
        (``call.deadline``) and, if we give up, ``call.cancelled``. Raises
        ``ServiceNotFound``, ``NodeFailure`` (its node died), ``RemoteError``
        (the handler raised), ``TimeoutError`` (after ``timeout`` seconds)."""
        return await self.mesh._control.call(service, request, timeout)

    async def open(self, service: str) -> Sender[Any]:
        """A ``Sender`` to the service for many calls (``await tx.call(r)``).
        Raises ``ServiceNotFound`` or ``NodeFailure``."""
        return await self.mesh._control.open(service)

    async def inspect(
        self, path: str = "", depth: int | None = None, timeout: float = 1.0, *, sensitive: bool = False
    ) -> Any:
        """The mesh's live inspect tree (plain data), or the part at
        ``path`` (``"nodes/<id prefix>/connections"``), cut at ``depth``
        levels. Each node answers for itself within ``timeout`` seconds; one
        that does not shows as ``{"$unresolved": reason}``. Raises
        ``LookupError`` for a path that does not exist."""
        return await self.mesh._control.inspect(path, depth, timeout, sensitive)

    async def inspect_update(self, path: str, value: Any, timeout: float = 1.0) -> Any:
        """Set the entry at ``path`` (``"nodes/<id prefix>/<entry>"``) that
        its node registered as updatable (``inspect_add(..., update=fn)``);
        returns the entry's new value. Raises ``LookupError`` for a path that
        is not updatable, ``RemoteError`` if the entry's setter raised."""
        return await self.mesh._control.inspect_update(path, value, timeout)

    def __repr__(self) -> str:
        return f"<ClientConnection node={self.mesh.node_id!r}>"


async def read_invitation(path: Path, expected_uid: int | None = None) -> Invitation:
    """Connect to the listener at ``path`` and read one invitation."""
    loop = asyncio.get_running_loop()
    sock = PLATFORM.unix_socket()
    sock.setblocking(False)
    with sock:
        try:
            await loop.sock_connect(sock, os.fspath(path))
        except OSError as exc:
            raise _connect_error(path, exc) from None
        want = os.getuid() if expected_uid is None else expected_uid
        cred = PeerCred.of(sock)
        if cred.uid != want:
            raise AuthenticationError(
                f"listener {path} runs as uid {cred.uid}, expected uid {want} (not taking its invitation)"
            )
        head = await _read(loop, sock, _LEN.size, path)
        (length,) = _LEN.unpack(head)
        if length > MAX_INVITATION:
            raise InvitationTooLarge(os.fspath(path), length, MAX_INVITATION)
        data = await _read(loop, sock, length, path)
    try:
        return Invitation.from_bytes(data)
    except InvitationDecodeError as exc:
        raise InvitationDecodeError(f"listener {path}: {exc}") from None


def _connect_error(path: Path, exc: OSError) -> ConnectError:
    if exc.errno == errno.ENOENT:
        reason = "nothing there (no such socket)"
    elif exc.errno == errno.ECONNREFUSED:
        reason = "nothing listens there any more (a stale socket of a mesh that is gone)"
    else:
        reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
    err = ConnectError(os.fspath(path), reason)
    err.errno = exc.errno
    return err


async def _read(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, path: Path) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await loop.sock_recv(sock, n - len(buf))
        except OSError as exc:
            raise InvitationReadError(os.fspath(path), f"read failed: {exc}") from None
        if not chunk:
            raise InvitationReadError(os.fspath(path), f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@contextlib.asynccontextmanager
async def _deadline(deadline: float | None, timeout: float | None, path: Path) -> AsyncIterator[None]:
    """Bound the block by ``deadline`` (loop time); past it, ``JoinTimeout``
    (also when the handshake's own, shorter bound fired first)."""
    cm = asyncio.timeout_at(deadline)
    try:
        async with cm:
            yield
    except TimeoutError:
        took = timeout if cm.expired() and timeout is not None else HANDSHAKE_TIMEOUT
        raise JoinTimeout(os.fspath(path), took) from None


async def _enter(
    invitation: Invitation, deadline: float | None, timeout: float | None
) -> tuple[contextlib.AbstractAsyncContextManager[Mesh], ClientConnection]:
    """Join as a new node: the node's context (to exit when done) and the connection."""
    from ._mesh import Mesh

    w = invitation._w
    if not w.expires >= time.time():  # also refuses NaN
        raise InvitationExpired("the invitation has expired")
    inviter_path = node_path(Path(w.directory), w.inviter)
    try:
        ctx = Mesh._joined(w.directory, w.secret, w.node)
        mesh = await ctx.__aenter__()
        mesh._control.joining()  # its session waits until we have joined
    except (OSError, MeshError) as exc:
        if isinstance(exc, JoinError):
            raise
        raise JoinError(f"cannot join the mesh in {w.directory}: {exc}") from exc
    try:
        node = mesh._node
        async with _deadline(deadline, timeout, inviter_path):
            try:
                verdict = await node.connect_to(w.inviter)
            except HandshakeError as exc:
                raise AuthenticationError(f"the inviting node rejected us: {exc}") from None
            except OSError as exc:
                if isinstance(exc, TimeoutError):
                    raise  # the handshake's own bound: reported by _deadline
                if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                    raise JoinError(f"the inviting node in {w.directory} is gone") from None
                raise JoinError(f"cannot reach the inviting node {inviter_path}: {exc}") from None
        if verdict == V_DUPLICATE:
            raise InvitationExpired("the inviting node refused us: invitation used or expired")
        d = PortDesc(*_DESC.unpack(w.port))
        st = node.engine._materialize(w.inviter, d)
        mesh._control.joined()
        return ctx, ClientConnection(Port._wrap([st]), mesh)
    except BaseException:
        await ctx.__aexit__(None, None, None)
        raise


def _deadline_after(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if not timeout > 0:  # also refuses NaN
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return asyncio.get_running_loop().time() + timeout


@contextlib.asynccontextmanager
async def join(
    invitation: Invitation, *, timeout: float | None = JOIN_TIMEOUT
) -> AsyncIterator[ClientConnection]:
    """Join the mesh an invitation is for, as a new node of this process.

    Raises ``JoinTimeout`` if the inviting node does not answer within
    ``timeout`` seconds (default ``JOIN_TIMEOUT``, 10 s; ``None``: no bound
    but the handshake's own), ``AuthenticationError`` if the inviting node
    rejects the secret, ``InvitationExpired`` if the invitation was used or
    expired, and ``JoinError`` for any other failure while joining."""
    ctx, conn = await _enter(invitation, _deadline_after(timeout), timeout)
    try:
        yield conn
    finally:
        conn.port.close()
        await ctx.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def connect(
    name_or_path: str | os.PathLike[str],
    *,
    runtime_dir: str | os.PathLike[str] | None = None,
    expected_uid: int | None = None,
    timeout: float | None = JOIN_TIMEOUT,
) -> AsyncIterator[ClientConnection]:
    """Attach this process to a running mesh by name or listener path.

    ``timeout`` bounds everything up to the attached connection (reaching
    the listener, its invitation, the handshake); default ``JOIN_TIMEOUT``
    (10 s), ``None`` for no bound. Raises ``JoinTimeout`` (the mesh did not
    answer in time), ``ConnectError`` (no such path, refused, permission
    denied, an unusable runtime folder; for a name, the reason says whether
    no such mesh runs, it is not listening, or it is stale), ``InvitationReadError``, ``InvitationTooLarge``,
    ``InvitationDecodeError``, ``AuthenticationError`` (listener of an
    unexpected uid, or secret rejected) or ``JoinError``."""
    try:
        path = listener_path(name_or_path, runtime_dir)
    except MeshError as exc:  # the runtime folder is unusable: say which and why
        raise ConnectError(os.fspath(name_or_path), str(exc)) from None
    deadline = _deadline_after(timeout)
    try:
        async with _deadline(deadline, timeout, path):
            inv = await read_invitation(path, expected_uid)
    except ConnectError as exc:
        name = os.fspath(name_or_path)
        if "/" in name or exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
            raise
        root, why = runtime_location(runtime_dir)
        raise ConnectError(exc.path, not_running_reason(root, why, name)) from None
    ctx, conn = await _enter(inv, deadline, timeout)
    try:
        yield conn
    finally:
        conn.port.close()
        await ctx.__aexit__(None, None, None)
