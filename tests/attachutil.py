"""Helpers shared by the attach tests: invitations as a forger would edit
them, and checks that the mesh secret never shows."""

from __future__ import annotations

from typing import Any

import msgspec

from meshipc import Invitation

#: Index of each field in the array-like msgpack invitation (``_InvitationRecord``).
FIELD = {
    name: i for i, name in enumerate(("version", "directory", "inviter", "node", "port", "secret", "expires"))
}


def reencode(inv: Invitation, **changes: Any) -> Invitation:
    """``inv`` with some wire fields replaced (as a forger would)."""
    fields = msgspec.msgpack.decode(bytes(inv))
    for name, value in changes.items():
        fields[FIELD[name]] = value
    return Invitation.from_bytes(msgspec.msgpack.encode(fields))


def secret_needles(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), repr(secret), str(secret)]


def assert_no_secret(text: str, secret: bytes, what: str) -> None:
    for needle in secret_needles(secret):
        assert needle not in text, f"the mesh secret appears in {what}: {text!r}"
