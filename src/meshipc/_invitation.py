"""Invitations: the record that admits one new node to a running mesh,
its wire format, and ``Inviter``, which makes them.

An invitation admits one new node, once, for a limited time. It holds the
mesh directory, the inviting node's id, the id the new node must use, the
port it receives first (a port descriptor: the port is in transit to the
new node, exactly as if it had been sent in a message), and the new node's
credential (``_handshake.Identity``: its own private key, the certificate
the mesh's root issued for its id in the client role, and the root's public
key) — nothing that lets its holder vouch for any other id — and the
protocol versions the inviting node speaks, so a client that speaks none of
them says so before it connects. Serialized it is a msgpack array
(``_InvitationRecord``) whose first element is its format version; the
listener (``_listener``) frames it as ``[u32 little-endian length][record]``
(``FRAME``) and the client (``_join``) reads it back and joins.

Versioning (docs/compatibility.md): a reader reads the format version alone
first and refuses one outside ``INVITATION_FORMATS`` naming both; fields
appended at the end are ignored by older readers of the same format, so a
new format is needed only for a change an older reader must not miss.
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec

from ._channel import Port
from ._errors import HandshakeError, InvitationDecodeError, MeshError
from ._handshake import CREDENTIAL_LEN, MAX_VERSION, ROLE_CLIENT, Identity, Versions
from ._ids import NodeId
from ._node import Node
from ._platform import MAX_SOCKET_PATH
from ._wire import PORT_DESC_SIZE

#: Largest invitation a client reads (checked before allocating). Real ones
#: are a few hundred bytes; the cap is the reference design's.
MAX_INVITATION: Final = 64 * 1024
#: Seconds an invitation stays valid by default.
INVITATION_TTL: Final = 10.0
#: Default seconds ``invite_blocking`` waits for the mesh's loop to make the
#: invitation (it takes microseconds on a loop that is not blocked).
INVITE_BLOCKING_TIMEOUT: Final = 10.0
#: The length prefix of an invitation on the listener socket.
FRAME: Final = struct.Struct("<I")
#: Format version of the invitations this release writes. 2: a credential
#: issued by the mesh's root instead of the mesh secret; the inviting node's
#: protocol versions.
_INVITATION_VERSION: Final = 2
#: The format versions this release reads (lowest, highest); any other is
#: refused with both named.
INVITATION_FORMATS: Final = (2, 2)
#: The first release (MAJOR.MINOR series) that wrote each format, oldest first.
INVITATION_RELEASES: Final = (("0.1", 1), ("0.2", 2))
#: Size of the ids an invitation carries.
_ID_SIZE: Final = 16
#: Longest mesh directory an invitation names: every node socket in it must
#: fit an AF_UNIX address.
MAX_DIRECTORY: Final = MAX_SOCKET_PATH


class _InvitationHead(msgspec.Struct, array_like=True):
    """The first field of every invitation, whatever its format."""

    version: int


class _InvitationRecord(msgspec.Struct, array_like=True):
    """An invitation as it travels: a msgpack array of these fields, in
    order; elements after the last are ignored (appended by a later
    release: see ``INVITATION_FORMATS``)."""

    version: int
    directory: str
    inviter: bytes
    node: bytes
    port: bytes
    credential: bytes
    expires: float
    #: the protocol versions the inviting node speaks
    protocol_low: int
    protocol_high: int


def _format_refusal(version: int) -> str:
    """Why an invitation of format ``version`` is not read, naming both formats."""
    low, high = INVITATION_FORMATS
    ours = str(high) if low == high else f"{low}\u2013{high}"
    if version > high:
        return (
            f"the invitation is format {version}, this meshipc reads format {ours}: "
            "the mesh that wrote it is newer; upgrade this client"
        )
    wrote = next((name for name, v in reversed(INVITATION_RELEASES) if v <= version), None)
    after = next((name for name, v in INVITATION_RELEASES if v > version), None)
    by = f" (written by meshipc {wrote})" if wrote else ""
    instead = f" or use meshipc<{after} for this client" if after else ""
    return (
        f"the invitation is format {version}{by}, this meshipc reads format {ours}: "
        f"the mesh that wrote it is older; upgrade it{instead}"
    )


class Invitation:
    """Admits one new node to a mesh, once, before it expires.

    ``bytes(inv)`` serializes it (it contains the new node's private key:
    carry it only over channels as private as the mesh itself);
    ``Invitation.from_bytes(data)`` reads one back (raises
    ``InvitationDecodeError``). The repr never shows the key."""

    __slots__ = ("_identity", "_record")

    def __init__(self, record: _InvitationRecord, identity: Identity) -> None:
        self._record = record
        self._identity = identity

    @property
    def directory(self) -> str:
        return self._record.directory

    @property
    def inviter(self) -> NodeId:
        return NodeId(self._record.inviter)

    @property
    def node(self) -> NodeId:
        return NodeId(self._record.node)

    @property
    def expires(self) -> float:
        return self._record.expires

    @property
    def protocol(self) -> Versions:
        """The protocol versions the inviting node speaks."""
        return Versions(self._record.protocol_low, self._record.protocol_high)

    @property
    def identity(self) -> Identity:
        """The new node's credential (its private key: never shown)."""
        return self._identity

    @property
    def port_descriptor(self) -> bytes:
        """The packed descriptor of the port the new node receives first
        (``Node.import_port`` makes it there)."""
        return self._record.port

    def __bytes__(self) -> bytes:
        return msgspec.msgpack.encode(self._record)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Invitation:
        if len(data) > MAX_INVITATION:
            raise InvitationDecodeError(f"invitation of {len(data)} bytes exceeds {MAX_INVITATION}")
        try:
            head = msgspec.msgpack.decode(data, type=_InvitationHead)
            if not INVITATION_FORMATS[0] <= head.version <= INVITATION_FORMATS[1]:
                raise InvitationDecodeError(_format_refusal(head.version))
            w = msgspec.msgpack.decode(data, type=_InvitationRecord)
        except (ValueError, RecursionError) as exc:  # msgspec's errors, and bad UTF-8 in a str
            raise InvitationDecodeError(f"not a meshipc invitation: {exc}") from None
        if not 1 <= w.protocol_low <= w.protocol_high <= MAX_VERSION:
            raise InvitationDecodeError("the invitation's protocol versions are not a range")
        if not math.isfinite(w.expires):
            raise InvitationDecodeError("invitation expiry is not a finite time")
        if (
            len(w.inviter) != _ID_SIZE
            or len(w.node) != _ID_SIZE
            or len(w.credential) != CREDENTIAL_LEN
            or len(w.port) != PORT_DESC_SIZE
        ):
            raise InvitationDecodeError("invitation fields have the wrong sizes")
        if len(w.directory) > MAX_DIRECTORY:
            raise InvitationDecodeError(f"invitation directory longer than {MAX_DIRECTORY} characters")
        if not w.directory.startswith("/") or "\0" in w.directory:
            raise InvitationDecodeError("invitation directory is not an absolute path")
        try:
            identity = Identity.from_bytes(w.credential)
        except HandshakeError as exc:
            raise InvitationDecodeError(f"invitation credential: {exc}") from None
        if identity.node != w.node:
            raise InvitationDecodeError("invitation credential is for another node")
        return cls(w, identity)

    def __repr__(self) -> str:
        return f"Invitation(directory={self.directory!r}, node={self.node!r}, key=<redacted>)"

    def __reduce__(self) -> Any:
        raise TypeError("an invitation is not pickled (use bytes(inv), privately)")


class Inviter:
    """Makes invitations for one mesh; safe to use from any task or thread.

    ``node`` is the inviting node (the new node connects to it), ``admit``
    issues the credential of a new node of a role (the mesh root's
    authority); the work runs on the node's own event loop, so holders need
    not own the ``Mesh``."""

    def __init__(self, node: Node, admit: Callable[[int], Identity], ttl: float = INVITATION_TTL) -> None:
        self._node = node
        self._admit = admit
        self._loop = node.loop
        self.ttl = ttl

    def invite_now(self, port: Port, ttl: float | None) -> Invitation:
        """The invitation, made at once: only on the mesh's own loop."""
        node = self._node
        if node.closed:
            raise MeshError("the mesh is closed")
        if not isinstance(port, Port) or len(port._states) != 1:
            raise _uninvitable(port)
        identity = self._admit(ROLE_CLIENT)
        (st,) = port._detach()
        new_node = identity.node
        ttl = self.ttl if ttl is None else ttl
        node.expect_invited(new_node, ttl)  # first: nothing may try to connect to it
        packed = node.export_port(st, new_node)
        return Invitation(
            _InvitationRecord(
                _INVITATION_VERSION,
                os.fspath(node.directory),
                bytes(node.id),
                bytes(new_node),
                packed,
                identity.to_bytes(),
                time.time() + ttl,
                node.versions.low,
                node.versions.high,
            ),
            identity,
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
            return self.invite_now(port, ttl)
        cf = asyncio.run_coroutine_threadsafe(self._async_invite(port, ttl), self._loop)
        return await asyncio.wrap_future(cf)

    async def _async_invite(self, port: Port, ttl: float | None) -> Invitation:
        return self.invite_now(port, ttl)

    def invite_blocking(
        self, port: Port, *, ttl: float | None = None, timeout: float = INVITE_BLOCKING_TIMEOUT
    ) -> Invitation:
        """``invite`` for plain threads (not the mesh's loop thread)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise MeshError("invite_blocking called on the mesh's own loop; use await invite()")
        cf = asyncio.run_coroutine_threadsafe(self._async_invite(port, ttl), self._loop)
        return cf.result(timeout)


def _uninvitable(port: Any) -> MeshError:
    """The error for a ``port`` that ``invite`` cannot send."""
    if isinstance(port, Port):
        return MeshError("the port is closed or was sent away")
    return MeshError(f"invite() takes a meshipc.Port, got {type(port).__name__}")
