"""Helpers shared by the attach tests: invitations as a forger would edit
them, credentials a forger can make, and checks that private keys never show."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from meshipc import Invitation, Mesh
from meshipc._handshake import (
    CHALLENGE_LEN,
    ROLE_CLIENT,
    Authority,
    Challenge,
    Hello,
    Identity,
    build_hello,
    new_hello,
    parse_challenge,
)
from meshipc._sockets import recv_exact

#: Index of each field in the array-like msgpack invitation (``_InvitationRecord``).
_FIELDS = (
    "version",
    "directory",
    "inviter",
    "node",
    "port",
    "credential",
    "expires",
    "protocol_low",
    "protocol_high",
)
FIELD = {name: i for i, name in enumerate(_FIELDS)}


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
    return inv.identity._key.private_bytes_raw()


def secret_needles(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), repr(secret), str(secret)]


def assert_no_secret(text: str, secret: bytes, what: str) -> None:
    for needle in secret_needles(secret):
        assert needle not in text, f"a private key appears in {what}: {text!r}"


class Initiated:
    """One handshake run by hand (``initiate``): the open socket, the bytes
    we sent (HELLO + AUTH, for a replay) and everything the node sent back
    after its CHALLENGE (a verdict byte, then its proof unless denied)."""

    def __init__(self, sock: socket.socket, sent: bytes, challenge: bytes, reply: bytes) -> None:
        self.sock = sock
        self.sent = sent
        self.challenge = challenge
        self.reply = reply

    @property
    def verdict(self) -> int:
        return self.reply[0] if self.reply else -1


async def initiate(
    path: Path,
    identity: Identity,
    want: bytes,
    auth: Callable[[Hello, Challenge], bytes] | None = None,
    *,
    reply_len: int,
) -> Initiated:
    """Connect to the node socket at ``path`` and run the initiator side of
    the handshake as ``identity`` asking for node ``want`` — or, with
    ``auth``, sending ``auth(hello, challenge)`` as the AUTH (a forger's).
    Reads ``reply_len`` bytes, or up to the node hanging up."""
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(s, os.fspath(path)), 10)
        hello = new_hello()
        await loop.sock_sendall(s, build_hello(hello))
        raw = await asyncio.wait_for(recv_exact(loop, s, CHALLENGE_LEN), 10)
        challenge = parse_challenge(raw, want)
        data = auth(hello, challenge) if auth is not None else identity.build_auth(hello, challenge, want)
        await loop.sock_sendall(s, data)
        reply = b""
        while len(reply) < reply_len:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(s, reply_len - len(reply)), 10)
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
    except BaseException:
        s.close()
        raise
    return Initiated(s, build_hello(hello) + data, raw, reply)
