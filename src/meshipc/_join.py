"""The client side of attaching: read an invitation from a listener and
join the mesh it is for as a new node (what the client then holds,
``Attachment``, is ``_mesh``'s).

Joining is two steps over the ``Node``'s public methods, shared by an
invited process and a spawned worker: ``node_from_credential`` (the new
node, in the mesh directory, with the credential the mesh's root issued),
then reaching the node that admitted it and taking the first port
(``attach`` for an invitation, ``join_parent`` for a worker's inherited
socket). ``_mesh`` wraps the node in a ``Mesh``: this module never builds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

from ._channel import Port
from ._codec import CODEC
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
    VersionMismatch,
)
from ._handshake import V_DUPLICATE, Identity, Versions, version_mismatch
from ._invitation import FRAME, MAX_INVITATION, Invitation
from ._names import check_private_dir, listener_path, node_path, not_running_reason, runtime_location
from ._node import HANDSHAKE_TIMEOUT, ClosedEarly, Node, advertised_versions
from ._platform import PLATFORM
from ._ports import DEFAULT_LIMITS, Limits
from ._sockets import Backoff, PeerCred, StreamEnded, connect_unix, recv_exact

_T = TypeVar("_T")

#: Default bound, in seconds, on ``connect``/``join`` reaching a mesh:
#: connecting to the listener, reading the invitation and the handshake with
#: the inviting node, all together. A live mesh answers in milliseconds; the
#: bound is for a stopped, wedged or hostile one.
JOIN_TIMEOUT: Final = 10.0
#: Tries of a step whose connection the service shed (reset, or closed
#: before answering: a flooded listener or node makes room) when the attach
#: has no deadline; with one, the step is tried again until the deadline.
MAX_SHED_TRIES: Final = 40


async def read_invitation(path: Path, expected_uid: int | None = None) -> Invitation:
    """Connect to the listener at ``path`` and read one invitation."""
    loop = asyncio.get_running_loop()
    sock = PLATFORM.unix_socket()
    sock.setblocking(False)
    with sock:
        try:
            await connect_unix(loop, sock, os.fspath(path))
        except OSError as exc:
            raise _connect_error(path, exc) from None
        want = os.getuid() if expected_uid is None else expected_uid
        cred = PeerCred.of(sock)
        if cred.uid != want:
            raise AuthenticationError(
                f"listener {path} runs as uid {cred.uid}, expected uid {want} (not taking its invitation)"
            )
        head = await _read_exact(loop, sock, FRAME.size, path)
        (length,) = FRAME.unpack(head)
        if length > MAX_INVITATION:
            raise InvitationTooLarge(os.fspath(path), length, MAX_INVITATION)
        data = await _read_exact(loop, sock, length, path)
    try:
        return Invitation.from_bytes(data)
    except InvitationDecodeError as exc:
        raise InvitationDecodeError(f"listener {path}: {exc}") from None


def _connect_error(path: Path, exc: OSError) -> ConnectError:
    """A failed connect to the listener at ``path``, with a reason a person can act on."""
    if exc.errno == errno.ENOENT:
        reason = "nothing there (no such socket)"
    elif exc.errno == errno.ECONNREFUSED:
        reason = "nothing listens there any more (a stale socket of a mesh that is gone)"
    else:
        reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
    err = ConnectError(os.fspath(path), reason)
    err.errno = exc.errno
    return err


async def _read_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, path: Path) -> bytes:
    """Exactly ``n`` bytes from the listener at ``path`` (``InvitationReadError`` if it cannot give them)."""
    try:
        return await recv_exact(loop, sock, n)
    except ConnectionResetError as exc:
        raise _ListenerShed(os.fspath(path), f"connection reset: {exc}") from None
    except StreamEnded as exc:  # before OSError: it is a ConnectionError
        raise InvitationReadError(
            os.fspath(path), f"stream ended after {exc.received} of {exc.expected} bytes"
        ) from None
    except OSError as exc:
        raise InvitationReadError(os.fspath(path), f"read failed: {exc}") from None


class _ListenerShed(InvitationReadError):
    """The listener reset the connection before its invitation came: it
    sheds load (or restarts); ``take_invitation`` tries again."""


async def retry_shed(
    step: Callable[[], Awaitable[_T]], shed: tuple[type[BaseException], ...], deadline: float | None
) -> _T:
    """``step()``, tried again after a ``Backoff`` while it fails with one of
    ``shed`` (the service dropped the connection to make room). The caller
    bounds it by ``deadline``; without one, ``MAX_SHED_TRIES`` tries."""
    backoff = Backoff()
    while True:
        try:
            return await step()
        except shed:
            if deadline is None and backoff.tries + 1 >= MAX_SHED_TRIES:
                raise
        await backoff.sleep()


def deadline_after(timeout: float | None) -> float | None:
    """The loop time ``timeout`` seconds from now (``None``: no deadline);
    ``ValueError`` for a timeout that is not positive."""
    if timeout is None:
        return None
    if not timeout > 0:  # also refuses NaN
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return asyncio.get_running_loop().time() + timeout


@contextlib.asynccontextmanager
async def within_deadline(deadline: float | None, timeout: float | None, path: Path) -> AsyncIterator[None]:
    """Bound the block by ``deadline`` (loop time); past it, ``JoinTimeout``
    (also when the handshake's own, shorter bound fired first)."""
    cm = asyncio.timeout_at(deadline)
    try:
        async with cm:
            yield
    except TimeoutError:
        took = timeout if cm.expired() and timeout is not None else HANDSHAKE_TIMEOUT
        raise JoinTimeout(os.fspath(path), took) from None


def node_from_credential(
    directory: str | os.PathLike[str], identity: Identity, limits: Limits | None
) -> Node:
    """The node ``identity`` (a credential the mesh's root issued) names,
    in the mesh directory ``directory``, listening. Raises ``MeshError`` if
    the directory is not ours and private, ``OSError`` if the node's socket
    cannot be made."""
    d = Path(directory)
    check_private_dir(d)
    PLATFORM.no_core_dumps()  # this node's private key is in this process now
    node = Node(d, identity, codec=CODEC, limits=DEFAULT_LIMITS if limits is None else limits)
    node.start()
    return node


def join_parent(node: Node, parent: bytes, sock: socket.socket, port: bytes, peer_port: bytes) -> Port:
    """A spawned worker's ``node`` joins its ``parent`` over ``sock`` (its
    end of the socket pair it inherited); the bootstrap port ``port``, peered
    with ``peer_port`` there, is its first."""
    node.connect_via(parent, sock)
    return Port._wrap([node.engine.new_bound(port, parent, peer_port)])


async def attach(
    invitation: Invitation, limits: Limits | None, deadline: float | None, timeout: float | None
) -> tuple[Node, Port]:
    """Join the mesh ``invitation`` is for: the new node it admits, connected
    to the inviting node, and the port the invitation carries (peered with
    the server's ``Admission.port``). Raises ``InvitationExpired`` past its
    expiry or if the inviting node refuses it (used or expired),
    ``JoinTimeout`` past ``deadline``, ``AuthenticationError`` if the
    inviting node rejects our credential or cannot prove its own,
    ``JoinError`` if the node cannot be made or the inviting node reached,
    ``VersionMismatch`` if it speaks no protocol version this process does
    (checked before connecting)."""
    if not invitation.expires >= time.time():  # also refuses NaN
        raise InvitationExpired("the invitation has expired")
    ours = advertised_versions()
    if ours.choose(invitation.protocol) is None:
        raise _client_view(ours, invitation.protocol)
    try:
        node = node_from_credential(invitation.directory, invitation.identity, limits)
    except (OSError, MeshError) as exc:
        if isinstance(exc, JoinError):
            raise
        raise JoinError(f"cannot join the mesh in {invitation.directory}: {exc}") from exc
    try:
        port = await _reach_inviter(node, invitation, deadline, timeout)
    except BaseException:
        await node.close()
        raise
    return node, port


async def _reach_inviter(
    node: Node, invitation: Invitation, deadline: float | None, timeout: float | None
) -> Port:
    """Connect the new ``node`` to the inviting node and take the port the
    invitation carries (see ``attach``)."""
    inviter = bytes(invitation.inviter)
    inviter_path = node_path(Path(invitation.directory), inviter)
    async with within_deadline(deadline, timeout, inviter_path):
        try:
            verdict = await retry_shed(
                lambda: node.connect_to(inviter),
                (ClosedEarly, ConnectionResetError, BrokenPipeError),
                deadline,
            )
        except ClosedEarly as exc:  # shed again and again, until we gave up
            raise JoinError(f"the inviting node {inviter_path} kept dropping the connection: {exc}") from None
        except VersionMismatch as exc:  # the invitation named versions the node does not speak
            raise _client_view(Versions(*exc.ours), Versions(*exc.theirs)) from None
        except HandshakeError as exc:
            raise AuthenticationError(f"the inviting node rejected us: {exc}") from None
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise  # the handshake's own bound: reported by within_deadline
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise JoinError(f"the inviting node in {invitation.directory} is gone") from None
            raise JoinError(f"cannot reach the inviting node {inviter_path}: {exc}") from None
    if verdict == V_DUPLICATE:
        raise InvitationExpired("the inviting node refused us: invitation used or expired")
    return Port._wrap([node.import_port(inviter, invitation.port_descriptor)])


def _client_view(ours: Versions, theirs: Versions) -> VersionMismatch:
    """The refusal of a service that speaks ``theirs``, as this client says it."""
    return version_mismatch(ours, theirs, "this client", "the service")


async def take_invitation(
    name_or_path: str | os.PathLike[str],
    runtime_dir: str | os.PathLike[str] | None,
    expected_uid: int | None,
    deadline: float | None,
    timeout: float | None,
) -> Invitation:
    """The invitation of the listener ``name_or_path`` names (see
    ``connect``), taken before ``deadline`` (loop time, which ``timeout``
    set for the whole attach). For a mesh name that nothing answers for, the
    ``ConnectError`` says whether no such mesh runs, it is not listening, or
    it is stale."""
    try:
        path = listener_path(name_or_path, runtime_dir)
    except MeshError as exc:  # the runtime folder is unusable: say which and why
        raise ConnectError(os.fspath(name_or_path), str(exc)) from None
    try:
        async with within_deadline(deadline, timeout, path):
            return await retry_shed(lambda: read_invitation(path, expected_uid), (_ListenerShed,), deadline)
    except ConnectError as exc:
        name = os.fspath(name_or_path)
        if "/" in name or exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
            raise
        root, why = runtime_location(runtime_dir)
        raise ConnectError(exc.path, not_running_reason(root, why, name)) from None
