"""Helpers shared by the attach tests: invitations as a forger would edit
them, credentials a forger can make, and checks that private keys never show."""

from __future__ import annotations

from typing import Any

import msgspec

from meshipc import Invitation, Mesh
from meshipc._handshake import ROLE_CLIENT, Authority

#: Index of each field in the array-like msgpack invitation (``_InvitationRecord``).
FIELD = {
    name: i for i, name in enumerate(("version", "directory", "inviter", "node", "port", "credential", "expires"))
}


def reencode(inv: Invitation, **changes: Any) -> Invitation:
    """``inv`` with some wire fields replaced (as a forger would)."""
    fields = msgspec.msgpack.decode(bytes(inv))
    for name, value in changes.items():
        fields[FIELD[name]] = value
    return Invitation.from_bytes(msgspec.msgpack.encode(fields))


def foreign_credential(node: bytes, role: int = ROLE_CLIENT) -> bytes:
    """A well-formed credential for ``node`` that a forger issued itself
    (its own authority: the certificate is of another mesh)."""
    return Authority().issue(role, node).to_bytes()


def key_material(mesh: Mesh) -> list[bytes]:
    """The private keys ``mesh`` holds: its node's, and its authority's on the root."""
    keys = [mesh._node.identity._key.private_bytes_raw()]
    if mesh._authority is not None:
        keys.append(mesh._authority._key.private_bytes_raw())
    return keys


def invitation_key(inv: Invitation) -> bytes:
    """The private key an invitation carries for its new node."""
    return inv._identity._key.private_bytes_raw()


def secret_needles(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), repr(secret), str(secret)]


def assert_no_secret(text: str, secret: bytes, what: str) -> None:
    for needle in secret_needles(secret):
        assert needle not in text, f"a private key appears in {what}: {text!r}"
