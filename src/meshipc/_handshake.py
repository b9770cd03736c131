"""The node handshake, sans-IO: the mesh secret, the byte format of the four
handshake messages, and the pure steps that build, parse and check them.
No sockets and no event loop: ``_node`` drives these steps over a socket,
tests forge handshakes with the same functions.

Every connection between nodes is authenticated before any port event is
read (the acceptor has already checked the peer's uid from the kernel):

1. HELLO (initiator): version, its node id, the node id it wants, a nonce;
2. CHALLENGE (acceptor): version, a status, its node id, a nonce, and its
   proof: an HMAC-SHA256 of both nonces and ids under the mesh secret —
   the initiator checks it (``verify_acceptor_proof``);
3. AUTH (initiator): its own proof — the acceptor checks it, in constant
   time (``verify_initiator_proof``);
4. VERDICT (acceptor): accepted, "duplicate" (both sides connected at once;
   the connection started by the smaller node id wins, or the peer is
   already linked, gone or expected no more), or denied.

The secret itself never goes on the wire, so a socket planted in the
directory learns nothing from a node that connects to it. Every failure is
a ``HandshakeError`` whose text says what was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import Any, Final, NamedTuple

from ._errors import HandshakeError
from ._ids import NodeId
from ._wire import PROTOCOL_VERSION

#: Bytes in a mesh secret (256 bits).
SECRET_LEN: Final = 32
#: Bytes in each side's nonce: fresh per handshake, so no proof can be replayed.
NONCE_LEN: Final = 32
#: Bytes in a proof (an HMAC-SHA256).
PROOF_LEN: Final = 32
#: First bytes of HELLO and CHALLENGE: tells a meshipc node from anything else.
MAGIC: Final = b"MSH1"

#: CHALLENGE status: the acceptor will go on.
S_OK: Final = 0
#: CHALLENGE status: the HELLO asked for another node (or not the one expected).
S_WRONG_NODE: Final = 1
#: CHALLENGE status: the HELLO's protocol version is not ours.
S_BAD_VERSION: Final = 2

#: VERDICT: the link is established.
V_ACCEPT: Final = 1
#: VERDICT: not this connection (a simultaneous connect lost, the peer is
#: already linked or known dead, or the acceptor is closing).
V_DUPLICATE: Final = 2
#: VERDICT: the initiator's proof is wrong (it does not hold the secret).
V_DENIED: Final = 3

# the proofs are bound to their direction, so one cannot stand for the other
_ACCEPTOR_LABEL = b"meshipc-acceptor"
_INITIATOR_LABEL = b"meshipc-initiator"

# magic, version, flags (always 0), initiator id, wanted id, initiator nonce
_HELLO = struct.Struct("<4sHH16s16s32s")
# magic, version, status, acceptor id, acceptor nonce, acceptor proof
_CHALLENGE = struct.Struct("<4sHH16s32s32s")
_AUTH = struct.Struct("<32s")
_VERDICT = struct.Struct("<B")

#: Sizes of the four messages, for the reader of each.
HELLO_LEN: Final = _HELLO.size
CHALLENGE_LEN: Final = _CHALLENGE.size
AUTH_LEN: Final = _AUTH.size
VERDICT_LEN: Final = _VERDICT.size


class MeshSecret:
    """The 256-bit mesh secret. Its repr never shows the value."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes | None = None) -> None:
        if value is None:
            value = secrets.token_bytes(SECRET_LEN)
        if len(value) != SECRET_LEN:
            raise ValueError("a mesh secret is 32 bytes")
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def mac(self, *parts: bytes) -> bytes:
        """HMAC-SHA256 of the concatenated ``parts`` under the secret."""
        return hmac.new(self._value, b"".join(parts), hashlib.sha256).digest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MeshSecret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "MeshSecret(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a mesh secret is not pickled")


class Hello(NamedTuple):
    """The initiator's opening: who it is, whom it wants, its nonce."""

    version: int
    node: bytes
    want: bytes
    nonce: bytes


class Challenge(NamedTuple):
    """The acceptor's answer: its status, id, nonce and proof."""

    version: int
    status: int
    node: bytes
    nonce: bytes
    proof: bytes


def new_nonce() -> bytes:
    """A fresh random nonce for one handshake."""
    return secrets.token_bytes(NONCE_LEN)


def _unpack(layout: struct.Struct, data: bytes, what: str) -> tuple[Any, ...]:
    if len(data) != layout.size:
        raise HandshakeError(f"a {what} is {layout.size} bytes, got {len(data)}")
    return layout.unpack(data)


# ---------------------------------------------------------------- proofs


def acceptor_proof(secret: MeshSecret, hello: Hello, acceptor: bytes, acceptor_nonce: bytes) -> bytes:
    """The acceptor's proof that it holds ``secret``, bound to both nonces and ids."""
    return secret.mac(_ACCEPTOR_LABEL, hello.nonce, acceptor_nonce, hello.node, acceptor)


def initiator_proof(secret: MeshSecret, hello: Hello, acceptor: bytes, acceptor_nonce: bytes) -> bytes:
    """The initiator's proof that it holds ``secret``, bound to both nonces and ids."""
    return secret.mac(_INITIATOR_LABEL, hello.nonce, acceptor_nonce, hello.node, acceptor)


def verify_acceptor_proof(secret: MeshSecret, hello: Hello, challenge: Challenge) -> None:
    """Initiator side: ``HandshakeError`` unless the CHALLENGE's proof is right."""
    want = acceptor_proof(secret, hello, challenge.node, challenge.nonce)
    if not hmac.compare_digest(challenge.proof, want):
        raise HandshakeError("the node did not prove it holds the mesh secret")


def verify_initiator_proof(
    secret: MeshSecret, hello: Hello, acceptor: bytes, acceptor_nonce: bytes, proof: bytes
) -> None:
    """Acceptor side: ``HandshakeError`` unless the AUTH's proof is right (constant time)."""
    if not hmac.compare_digest(proof, initiator_proof(secret, hello, acceptor, acceptor_nonce)):
        raise HandshakeError("wrong mesh secret")


# ---------------------------------------------------------------- HELLO


def new_hello(node: bytes, want: bytes) -> Hello:
    """Initiator side: the HELLO of ``node`` asking for node ``want``, with
    our protocol version and a fresh nonce."""
    return Hello(PROTOCOL_VERSION, bytes(node), bytes(want), new_nonce())


def build_hello(hello: Hello) -> bytes:
    """The bytes of ``hello``."""
    return _HELLO.pack(MAGIC, hello.version, 0, hello.node, hello.want, hello.nonce)


def parse_hello(data: bytes) -> Hello:
    """A HELLO's fields; ``HandshakeError`` if it is not one (checks the magic
    only: the version is judged by ``hello_status``)."""
    magic, version, _flags, node, want, nonce = _unpack(_HELLO, data, "HELLO")
    if magic != MAGIC:
        raise HandshakeError("not a meshipc node")
    return Hello(version, node, want, nonce)


def hello_status(hello: Hello, acceptor: bytes, expect: bytes | None = None) -> int:
    """The acceptor's status for ``hello``: ``S_BAD_VERSION``, ``S_WRONG_NODE``
    (not asking for ``acceptor``, or not from ``expect`` when one is
    expected) or ``S_OK``."""
    if hello.version != PROTOCOL_VERSION:
        return S_BAD_VERSION
    if hello.want != acceptor or (expect is not None and hello.node != expect):
        return S_WRONG_NODE
    return S_OK


def check_status(hello: Hello, status: int) -> None:
    """Acceptor side, after sending its CHALLENGE: ``HandshakeError`` unless ``S_OK``."""
    if status != S_OK:
        raise HandshakeError(f"handshake status {status} (version {hello.version})")


# ---------------------------------------------------------------- CHALLENGE


def build_challenge(
    status: int, node: bytes, nonce: bytes, proof: bytes, version: int = PROTOCOL_VERSION
) -> bytes:
    """CHALLENGE from acceptor ``node``."""
    return _CHALLENGE.pack(MAGIC, version, status, node, nonce, proof)


def parse_challenge(data: bytes, peer: bytes) -> Challenge:
    """Initiator side: the CHALLENGE of node ``peer``; ``HandshakeError`` if
    it is not one, refuses (status), or comes from another node."""
    magic, version, status, node, nonce, proof = _unpack(_CHALLENGE, data, "CHALLENGE")
    if magic != MAGIC or status != S_OK or node != peer:
        raise HandshakeError(f"node {NodeId(peer)} refused the handshake (status {status})")
    return Challenge(version, status, node, nonce, proof)


# ---------------------------------------------------------------- AUTH, VERDICT


def build_auth(proof: bytes) -> bytes:
    """AUTH carrying the initiator's proof."""
    return _AUTH.pack(proof)


def parse_auth(data: bytes) -> bytes:
    """The proof an AUTH carries."""
    (proof,) = _unpack(_AUTH, data, "AUTH")
    return bytes(proof)


def build_verdict(verdict: int) -> bytes:
    """VERDICT: ``V_ACCEPT``, ``V_DUPLICATE`` or ``V_DENIED``."""
    return _VERDICT.pack(verdict)


def parse_verdict(data: bytes, peer: bytes) -> int:
    """Initiator side: ``V_ACCEPT`` or ``V_DUPLICATE``; ``HandshakeError``
    when node ``peer`` denied us (or sent no known verdict)."""
    (verdict,) = _unpack(_VERDICT, data, "VERDICT")
    if verdict in (V_ACCEPT, V_DUPLICATE):
        return int(verdict)
    raise HandshakeError(f"node {NodeId(peer)} rejected the mesh secret")
