"""Node identity and the node handshake, sans-IO: certificates the mesh's
root issues, each node's credential, the byte format of the four handshake
messages, and the pure steps that build, parse and check them. No sockets
and no event loop: ``_node`` drives these steps over a socket, tests forge
handshakes with the same functions.

Identity. The mesh's first node (the root) makes an Ed25519 **authority**
key when it starts; its private half never leaves the root's memory. The
mesh id is derived from its public half (``mesh_id``), so a mesh that
restarts under the same name is another mesh. When the root admits a node
(spawn or invitation) it draws the node's id itself, makes the node a key
pair and signs a **certificate** (mesh id, node id, the node's public key,
role, expiry). The node receives a **credential**: its private key, its
certificate and the authority's public key (``Identity``) — nothing that
can sign a certificate, so no node can obtain an id it was not given.
Certificates are valid for the mesh's life (``CERT_LIFETIME``, longer than
any service runs; the authority key dies with the mesh anyway).

Every connection between nodes is authenticated before any port event is
read (the acceptor has already checked the peer's uid from the kernel):

1. HELLO (initiator): magic, the protocol versions it speaks (highest,
   lowest), a nonce — nothing else;
2. CHALLENGE (acceptor): magic, the version chosen (the highest both
   speak), a status (a version in common or not), its own nonce and the
   versions it speaks — nothing about who it is;
3. AUTH (initiator): its certificate, the full id of the node it wants,
   and its signature over both nonces, both ids and a direction label;
   the acceptor checks the certificate against the authority's key, the
   signature, that it is the node wanted (and, for a child on a socket
   pair, that it is the node expected) — ``Identity.check_auth``;
4. VERDICT (acceptor): accepted, "duplicate" (both sides connected at once;
   the connection started by the smaller node id wins, or the peer is
   already linked, gone or expected no more) or denied; unless denied,
   followed by the acceptor's certificate and its signature over the
   verdict, both nonces, both ids and the other direction's label —
   ``Identity.check_verdict``.

One signature each way. Who reveals what to whom: the acceptor — which any
process of our uid can connect to — shows nothing about itself (not even
the prefix its socket path already shows) before the initiator proved a
certificate of this mesh and a signature over the acceptor's fresh nonce.
The initiator shows its certificate (public: an id and a public key, which
prove nothing without the private key) only to whatever listens at the
path of the node it wants — a socket in the 0700 mesh directory. Fresh
nonces on both sides make every signature good for one connection only: a
replayed AUTH or VERDICT fails. Every failure is a ``HandshakeError`` whose
text says what was wrong; no version in common is a ``VersionMismatch``
naming both ranges and which side to upgrade.

Versions. Both signatures cover the initiator's range and the version
chosen, so nobody can talk two nodes down to an older version. HELLO and
CHALLENGE keep the sizes meshipc 0.1 read (72 and 88 bytes; the tail is
reserved, zero when sent, ignored when read), so a node of 0.1 and a node of
this release each read the other's first message whole and refuse it with a
clear answer instead of waiting for bytes that never come: 0.1 puts zero
where the lowest version is now (an exact version) and answers an unknown
version with status ``S_BAD_VERSION`` and its version; this release answers
``S_NO_COMMON_VERSION`` with its range. docs/compatibility.md has the policy.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import time
from collections import OrderedDict
from typing import Any, Final, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._errors import HandshakeError, VersionMismatch
from ._ids import ID_LEN, NodeId
from ._wire import PROTOCOL_MIN, PROTOCOL_RELEASES, PROTOCOL_VERSION

#: Bytes in each side's nonce: fresh per handshake, so no signature can be replayed.
NONCE_LEN: Final = 32
#: Bytes in an Ed25519 public key, private key (its seed) and signature.
KEY_LEN: Final = 32
SEED_LEN: Final = 32
SIG_LEN: Final = 64
#: First bytes of HELLO and CHALLENGE: tells a meshipc node from anything else.
MAGIC: Final = b"MSH1"
#: Format version of a certificate; a reader refuses any other.
CERT_VERSION: Final = 1
#: Seconds a node certificate stays valid: the life of the mesh (the
#: authority key that signs it lives only in the root's memory and dies with
#: the mesh), so a service never outlives its certificate. Ten years.
CERT_LIFETIME: Final = 10 * 365 * 24 * 3600
#: Certificates a node remembers as verified (their authority signature is
#: not checked again when the same peer connects again); bounded, oldest out.
MAX_VERIFIED_CERTS: Final = 1024

#: Roles a certificate grants (the root's own, a spawned worker, an attached client).
ROLE_ROOT: Final = 1
ROLE_WORKER: Final = 2
ROLE_CLIENT: Final = 3
ROLE_NAMES: Final = {ROLE_ROOT: "root", ROLE_WORKER: "worker", ROLE_CLIENT: "client"}

#: CHALLENGE status: the acceptor will go on.
S_OK: Final = 0
#: CHALLENGE status of meshipc 0.1: the HELLO's version is not its one
#: version (the CHALLENGE's version field).
S_BAD_VERSION: Final = 2
#: CHALLENGE status: no protocol version in common (the CHALLENGE carries
#: the acceptor's range).
S_NO_COMMON_VERSION: Final = 3

#: VERDICT: the link is established.
V_ACCEPT: Final = 1
#: VERDICT: not this connection (a simultaneous connect lost, the peer is
#: already linked or known dead, or the acceptor is closing).
V_DUPLICATE: Final = 2
#: VERDICT: the initiator did not prove an identity this node takes.
V_DENIED: Final = 3

# domain labels: a signature made for one purpose cannot stand for another
_CERT_LABEL = b"meshipc-cert-v1"
_MESH_LABEL = b"meshipc-mesh-v1"
_INITIATOR_LABEL = b"meshipc-initiator-v1"
_ACCEPTOR_LABEL = b"meshipc-acceptor-v1"

# certificate: version, role, mesh id, node id, node public key, expiry (unix s), signature
_CERT_BODY = struct.Struct("<BB16s16s32sQ")
#: Bytes in a certificate.
CERT_LEN: Final = _CERT_BODY.size + SIG_LEN
# magic, highest version, lowest version (0: only the highest; meshipc 0.1
# sent 0 there), initiator nonce, reserved (meshipc 0.1's HELLO was 72 bytes)
_HELLO = struct.Struct("<4sHH32s32x")
# magic, version (chosen, or the acceptor's highest when refused), status,
# acceptor nonce, acceptor's lowest and highest version, reserved (meshipc
# 0.1's CHALLENGE was 88 bytes)
_CHALLENGE = struct.Struct("<4sHH32sHH44x")
# what the signatures say about versions: the initiator's range, the version chosen
_SIGNED_VERSIONS = struct.Struct("<HHH")
# initiator certificate, wanted node id, signature
_AUTH = struct.Struct(f"<{CERT_LEN}s16s{SIG_LEN}s")
_VERDICT = struct.Struct("<B")
# acceptor certificate, signature (after an accept or duplicate verdict)
_PROOF = struct.Struct(f"<{CERT_LEN}s{SIG_LEN}s")
# a credential: node private key (seed), its certificate, the authority's public key
_CREDENTIAL = struct.Struct(f"<{SEED_LEN}s{CERT_LEN}s{KEY_LEN}s")

#: Sizes of the handshake messages, for the reader of each.
HELLO_LEN: Final = _HELLO.size
CHALLENGE_LEN: Final = _CHALLENGE.size
AUTH_LEN: Final = _AUTH.size
VERDICT_LEN: Final = _VERDICT.size
PROOF_LEN: Final = _PROOF.size
#: Bytes in a serialized credential (``Identity.to_bytes``).
CREDENTIAL_LEN: Final = _CREDENTIAL.size


class Versions(NamedTuple):
    """A range of protocol versions one side speaks, both ends included."""

    low: int
    high: int

    def choose(self, other: Versions) -> int | None:
        """The highest version both ranges hold; None if they do not meet."""
        best = min(self.high, other.high)
        return best if best >= max(self.low, other.low) else None

    def __str__(self) -> str:
        return str(self.high) if self.low == self.high else f"{self.low}\u2013{self.high}"


#: The protocol versions this release speaks.
SUPPORTED: Final = Versions(PROTOCOL_MIN, PROTOCOL_VERSION)
#: Highest protocol version a range may name (a u16 on the wire).
MAX_VERSION: Final = 0xFFFF


def parse_versions(text: str) -> Versions:
    """``"3"`` or ``"3-4"`` as a ``Versions``; ``ValueError`` otherwise
    (the ``MESHIPC_TEST_PROTOCOL`` test hook's format)."""
    low, sep, high = text.strip().partition("-")
    try:
        v = Versions(int(low), int(high if sep else low))
    except ValueError:
        raise ValueError(f"a protocol version range is N or LOW-HIGH, got {text!r}") from None
    if not 1 <= v.low <= v.high <= MAX_VERSION:
        raise ValueError(f"a protocol version range is 1 <= LOW <= HIGH <= {MAX_VERSION}, got {text!r}")
    return v


def _release_upto(version: int) -> str | None:
    """The first release series that no longer speaks ``version`` (use an older one)."""
    return next((name for name, low, _high in PROTOCOL_RELEASES if low > version), None)


def _release_from(version: int) -> str | None:
    """The first release series that speaks ``version``."""
    return next((name for name, _low, high in PROTOCOL_RELEASES if high >= version), None)


def version_mismatch(ours: Versions, theirs: Versions, us: str, them: str) -> VersionMismatch:
    """The refusal of a peer (``them``: "the service", "node 1a2b…") whose
    range ``theirs`` does not meet ours (``us``: "this client"): both ranges,
    and which side to upgrade (or which release to use instead)."""
    said = f"{them} speaks protocol {theirs}, {us} {ours}"
    if theirs.high < ours.low:
        older = _release_upto(theirs.high)
        instead = f"use meshipc<{older}" if older else f"use a meshipc that speaks protocol {theirs.high}"
        advice = f"upgrade {them} or {instead} for {us}"
    else:
        newer = _release_from(theirs.low)
        advice = (
            f"upgrade {us} (meshipc>={newer})"
            if newer
            else f"upgrade {us} to a meshipc that speaks protocol {theirs.low}"
        )
    return VersionMismatch(f"{said}: {advice}", (ours.low, ours.high), (theirs.low, theirs.high))


def _unpack(layout: struct.Struct, data: bytes, what: str) -> tuple[Any, ...]:
    if len(data) != layout.size:
        raise HandshakeError(f"a {what} is {layout.size} bytes, got {len(data)}")
    return layout.unpack(data)


def new_nonce() -> bytes:
    """A fresh random nonce for one handshake."""
    return secrets.token_bytes(NONCE_LEN)


def mesh_id(authority_key: bytes) -> bytes:
    """The id of the mesh whose authority has public key ``authority_key``."""
    return hashlib.sha256(_MESH_LABEL + authority_key).digest()[:ID_LEN]


# ---------------------------------------------------------------- certificates


class Certificate(NamedTuple):
    """What the root vouches for: node ``node`` of mesh ``mesh`` holds the
    private half of ``key``, in role ``role``, until ``expires`` (unix s)."""

    version: int
    role: int
    mesh: bytes
    node: bytes
    key: bytes
    expires: int
    signature: bytes

    def body(self) -> bytes:
        """The signed part."""
        return _CERT_BODY.pack(self.version, self.role, self.mesh, self.node, self.key, self.expires)

    def __bytes__(self) -> bytes:
        return self.body() + self.signature

    @property
    def role_name(self) -> str:
        return ROLE_NAMES.get(self.role, f"role {self.role}")


def parse_certificate(data: bytes) -> Certificate:
    """A certificate's fields, format checked (not its signature: see
    ``Identity.verify_certificate``); ``HandshakeError`` if malformed."""
    if len(data) != CERT_LEN:
        raise HandshakeError(f"a certificate is {CERT_LEN} bytes, got {len(data)}")
    version, role, mesh, node, key, expires = _CERT_BODY.unpack(data[: _CERT_BODY.size])
    if version != CERT_VERSION:
        raise HandshakeError(f"unsupported certificate version {version}")
    if role not in ROLE_NAMES:
        raise HandshakeError(f"certificate with unknown role {role}")
    return Certificate(version, role, mesh, node, key, expires, bytes(data[_CERT_BODY.size :]))


def _verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _public(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise HandshakeError("not an Ed25519 public key") from None


class Authority:
    """The root's signing key: issues every node's credential. It exists in
    the root's process only (never serialized, never pickled, redacted in
    its repr)."""

    __slots__ = ("_key", "_verified", "mesh", "public")

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.public = self._key.public_key().public_bytes_raw()
        self.mesh = mesh_id(self.public)
        # shared with the root's own Identity: certificates issued here need
        # no signature check when their holder connects to the root
        self._verified: OrderedDict[bytes, Certificate] = OrderedDict()

    def issue(
        self,
        role: int,
        node: bytes | None = None,
        *,
        lifetime: float = CERT_LIFETIME,
        now: float | None = None,
    ) -> Identity:
        """A credential for a new node: a fresh key pair, and a certificate
        for ``node`` (default: a fresh random id) in ``role``."""
        if role not in ROLE_NAMES:
            raise ValueError(f"unknown role {role}")
        node = bytes(NodeId.random() if node is None else node)
        if len(node) != ID_LEN:
            raise ValueError(f"a node id is {ID_LEN} bytes")
        key = Ed25519PrivateKey.generate()
        expires = max(0, int((time.time() if now is None else now) + lifetime))
        unsigned = Certificate(
            CERT_VERSION, role, self.mesh, node, key.public_key().public_bytes_raw(), expires, b""
        )
        cert = unsigned._replace(signature=self._key.sign(_CERT_LABEL + unsigned.body()))
        _remember(self._verified, bytes(cert), cert)
        return Identity(key, cert, self.public, self._verified)

    def __repr__(self) -> str:
        return f"Authority(mesh={self.mesh.hex()[:12]}, key=<redacted>)"

    def __reduce__(self) -> Any:
        raise TypeError("a mesh authority is not pickled")


def _remember(cache: OrderedDict[bytes, Certificate], raw: bytes, cert: Certificate) -> None:
    cache[raw] = cert
    cache.move_to_end(raw)
    while len(cache) > MAX_VERIFIED_CERTS:
        cache.popitem(last=False)


# ---------------------------------------------------------------- records


class Hello(NamedTuple):
    """The initiator's opening: its highest version, nonce and lowest
    version (0: the highest only, as meshipc 0.1 sent)."""

    version: int
    nonce: bytes
    low: int = 0

    @property
    def versions(self) -> Versions:
        """The versions the initiator speaks."""
        return Versions(self.low or self.version, self.version)


class Challenge(NamedTuple):
    """The acceptor's answer: the version chosen, its status and nonce, and
    the versions it speaks."""

    version: int
    status: int
    nonce: bytes
    low: int = PROTOCOL_MIN
    high: int = PROTOCOL_VERSION


class Auth(NamedTuple):
    """The initiator's proof: its certificate (raw), the node it wants, its signature."""

    cert: bytes
    want: bytes
    signature: bytes


def _versions_signed(hello: Hello, version: int) -> bytes:
    low, high = hello.versions
    return _SIGNED_VERSIONS.pack(low, high, version)


def _initiator_message(
    hello: Hello, acceptor_nonce: bytes, version: int, initiator: bytes, acceptor: bytes
) -> bytes:
    versions = _versions_signed(hello, version)
    return b"".join((_INITIATOR_LABEL, hello.nonce, acceptor_nonce, versions, initiator, acceptor))


def _acceptor_message(
    verdict: int, hello: Hello, acceptor_nonce: bytes, version: int, initiator: bytes, acceptor: bytes
) -> bytes:
    versions = _versions_signed(hello, version)
    return b"".join(
        (_ACCEPTOR_LABEL, bytes((verdict,)), hello.nonce, acceptor_nonce, versions, initiator, acceptor)
    )


# ---------------------------------------------------------------- a node's credential


class Identity:
    """One node's credential: its private key, its certificate and the
    authority's public key; signs its side of a handshake and checks the
    other's. Its repr never shows the private key; it is not pickled.
    ``to_bytes``/``from_bytes`` carry it to the node it was issued for
    (``CREDENTIAL_LEN`` bytes; they contain the private key)."""

    __slots__ = ("_authority", "_key", "_verified", "authority_key", "cert", "cert_bytes", "mesh")

    def __init__(
        self,
        key: Ed25519PrivateKey,
        cert: Certificate,
        authority_key: bytes,
        verified: OrderedDict[bytes, Certificate] | None = None,
    ) -> None:
        self._key = key
        self.cert = cert
        self.cert_bytes = bytes(cert)
        self.authority_key = authority_key
        self._authority = _public(authority_key)
        self.mesh = mesh_id(authority_key)
        self._verified: OrderedDict[bytes, Certificate] = OrderedDict() if verified is None else verified

    @property
    def node(self) -> NodeId:
        return NodeId(self.cert.node)

    @property
    def role(self) -> int:
        return self.cert.role

    def to_bytes(self) -> bytes:
        """The credential as it travels to its node (holds the private key)."""
        return _CREDENTIAL.pack(self._key.private_bytes_raw(), self.cert_bytes, self.authority_key)

    @classmethod
    def from_bytes(cls, data: bytes) -> Identity:
        """A credential read back; ``HandshakeError`` if its parts do not
        fit together (a certificate of another mesh or for another key)."""
        seed, cert_bytes, authority_key = _unpack(_CREDENTIAL, bytes(data), "credential")
        cert = parse_certificate(cert_bytes)
        key = Ed25519PrivateKey.from_private_bytes(seed)
        if key.public_key().public_bytes_raw() != cert.key:
            raise HandshakeError("the credential's certificate is for another key")
        identity = cls(key, cert, authority_key)
        if cert.mesh != identity.mesh:
            raise HandshakeError("the credential's certificate is of another mesh")
        return identity

    def verify_certificate(self, data: bytes, now: float | None = None) -> Certificate:
        """A peer's certificate, checked: this mesh's, signed by its
        authority, not expired. ``HandshakeError`` saying what is wrong."""
        cert = self._verified.get(data)
        if cert is None:
            cert = parse_certificate(data)
            if cert.mesh != self.mesh:
                raise HandshakeError("certificate of another mesh")
            if not _verify(self._authority, cert.signature, _CERT_LABEL + cert.body()):
                raise HandshakeError("certificate not signed by this mesh's root (forged)")
            _remember(self._verified, bytes(data), cert)
        if cert.expires < (time.time() if now is None else now):
            raise HandshakeError(f"certificate of node {NodeId(cert.node)} expired")
        return cert

    # -------------------------------------------------------- initiator side

    def build_auth(self, hello: Hello, challenge: Challenge, want: bytes) -> bytes:
        """AUTH for node ``want``: our certificate and signature."""
        sig = self._key.sign(
            _initiator_message(hello, challenge.nonce, challenge.version, self.cert.node, want)
        )
        return _AUTH.pack(self.cert_bytes, bytes(want), sig)

    def check_verdict(
        self,
        hello: Hello,
        challenge: Challenge,
        want: bytes,
        verdict: int,
        data: bytes,
        now: float | None = None,
    ) -> Certificate:
        """The acceptor's proof after ``verdict``: its certificate must be
        node ``want``'s, its signature over this very handshake. Returns the
        acceptor's certificate; ``HandshakeError`` otherwise."""
        cert_bytes, sig = _unpack(_PROOF, data, "VERDICT proof")
        cert = self.verify_certificate(cert_bytes, now)
        if cert.node != want:
            raise HandshakeError(f"node {NodeId(cert.node)} answered for node {NodeId(want)}")
        message = _acceptor_message(verdict, hello, challenge.nonce, challenge.version, self.cert.node, want)
        if not _verify(_public(cert.key), sig, message):
            raise HandshakeError(f"node {NodeId(want)} did not prove its identity (bad signature)")
        return cert

    # -------------------------------------------------------- acceptor side

    def check_auth(
        self,
        hello: Hello,
        acceptor_nonce: bytes,
        auth: Auth,
        expect: bytes | None = None,
        now: float | None = None,
        version: int = PROTOCOL_VERSION,
    ) -> Certificate:
        """The initiator's certificate, once its AUTH proved it: a
        certificate of this mesh, asking for this node (and from ``expect``
        when one is expected), signed over this handshake's nonces and
        ``version``, the one chosen. ``HandshakeError`` saying what was wrong."""
        cert = self.verify_certificate(auth.cert, now)
        me = self.cert.node
        if auth.want != me:
            raise HandshakeError(f"node {NodeId(cert.node)} asked for another node")
        if expect is not None and cert.node != expect:
            raise HandshakeError(f"node {NodeId(cert.node)} is not the node expected here")
        message = _initiator_message(hello, acceptor_nonce, version, cert.node, me)
        if not _verify(_public(cert.key), auth.signature, message):
            raise HandshakeError(f"bad signature from node {NodeId(cert.node)} (forged or replayed)")
        return cert

    def build_proof(
        self,
        verdict: int,
        hello: Hello,
        acceptor_nonce: bytes,
        initiator: bytes,
        version: int = PROTOCOL_VERSION,
    ) -> bytes:
        """What follows an accept or duplicate VERDICT: our certificate and
        signature (over ``version``, the one chosen, too)."""
        message = _acceptor_message(verdict, hello, acceptor_nonce, version, initiator, self.cert.node)
        sig = self._key.sign(message)
        return _PROOF.pack(self.cert_bytes, sig)

    def __repr__(self) -> str:
        return f"Identity(node={self.node!r}, role={self.cert.role_name}, key=<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a node credential is not pickled")


# ---------------------------------------------------------------- HELLO


def new_hello(versions: Versions = SUPPORTED) -> Hello:
    """Initiator side: a HELLO offering ``versions`` with a fresh nonce."""
    return Hello(versions.high, new_nonce(), versions.low)


def build_hello(hello: Hello) -> bytes:
    """The bytes of ``hello``."""
    return _HELLO.pack(MAGIC, hello.version, hello.low, hello.nonce)


def parse_hello(data: bytes) -> Hello:
    """A HELLO's fields; ``HandshakeError`` if it is not one (checks the magic
    only: the versions are judged by ``hello_status``)."""
    magic, version, low, nonce = _unpack(_HELLO, data, "HELLO")
    if magic != MAGIC:
        raise HandshakeError("not a meshipc node")
    return Hello(version, nonce, low if low <= version else version)


def hello_status(hello: Hello, ours: Versions = SUPPORTED) -> int:
    """The acceptor's status for ``hello``: ``S_NO_COMMON_VERSION`` or ``S_OK``."""
    return S_NO_COMMON_VERSION if ours.choose(hello.versions) is None else S_OK


def check_status(hello: Hello, status: int, ours: Versions = SUPPORTED) -> None:
    """Acceptor side, after sending its CHALLENGE: unless ``S_OK``, the
    ``VersionMismatch`` to log (the connecting node's range and ours)."""
    if status != S_OK:
        raise version_mismatch(ours, hello.versions, "this node", "the connecting node")


# ---------------------------------------------------------------- CHALLENGE


def build_challenge(
    status: int, nonce: bytes, version: int = PROTOCOL_VERSION, ours: Versions = SUPPORTED
) -> bytes:
    """CHALLENGE: the version chosen (our highest when refusing), our status,
    nonce and range, nothing about who we are."""
    return _CHALLENGE.pack(MAGIC, version, status, nonce, ours.low, ours.high)


def parse_challenge(data: bytes, peer: bytes, ours: Versions = SUPPORTED) -> Challenge:
    """Initiator side: the CHALLENGE from the socket of node ``peer``;
    ``VersionMismatch`` if we speak no version in common (both ranges
    named), ``HandshakeError`` if it is not one, refuses otherwise, or
    chose a version we did not offer."""
    magic, version, status, nonce, low, high = _unpack(_CHALLENGE, data, "CHALLENGE")
    them = f"node {NodeId(peer)}"
    if magic == MAGIC and status == S_NO_COMMON_VERSION and 1 <= low <= high:
        raise version_mismatch(ours, Versions(low, high), "this node", them)
    if magic == MAGIC and status == S_BAD_VERSION and version >= 1:  # meshipc 0.1: one version
        raise version_mismatch(ours, Versions(version, version), "this node", them)
    if magic != MAGIC or status != S_OK:
        raise HandshakeError(f"{them} refused the handshake (status {status})")
    if not ours.low <= version <= ours.high:
        raise HandshakeError(
            f"{them} chose protocol version {version}, which this node did not offer ({ours})"
        )
    return Challenge(version, status, nonce, low, high)


# ---------------------------------------------------------------- AUTH, VERDICT


def parse_auth(data: bytes) -> Auth:
    """An AUTH's parts (format only: ``Identity.check_auth`` judges them)."""
    cert, want, sig = _unpack(_AUTH, data, "AUTH")
    return Auth(bytes(cert), bytes(want), bytes(sig))


def build_verdict(verdict: int) -> bytes:
    """VERDICT: ``V_ACCEPT``, ``V_DUPLICATE`` or ``V_DENIED``."""
    return _VERDICT.pack(verdict)


def parse_verdict(data: bytes, peer: bytes) -> int:
    """Initiator side: ``V_ACCEPT`` or ``V_DUPLICATE`` (a proof follows);
    ``HandshakeError`` when node ``peer`` denied us (or sent no known verdict)."""
    (verdict,) = _unpack(_VERDICT, data, "VERDICT")
    if verdict in (V_ACCEPT, V_DUPLICATE):
        return int(verdict)
    raise HandshakeError(f"node {NodeId(peer)} refused our credential")
