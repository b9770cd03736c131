"""TCP + TLS 1.3, mutual and pinned: the credentials of a mesh's TLS
listener, the access files it grants, the two TLS contexts and the accept
loop that lets only a granted client past the TLS handshake.

A mesh that listens on TCP makes, at first use, in its private folder
(``<mesh directory>/tls``, 0700; every file 0600): a CA key and certificate
(EC P-256), a server certificate signed by it, and a certificate revocation
list. ``TlsAuthority.grant`` mints one client certificate per grant (signed
by the CA, ``notAfter`` = the grant's expiry) and writes it with its key,
the listener's address, the server certificate's pin (sha256 of its DER)
and the CA certificate to one *access file* (0600). The server asks every
client for a certificate (``CERT_REQUIRED``), checks it against the CA and
the CRL (``VERIFY_CRL_CHECK_LEAF``; a revoke builds a fresh context), so a
revoked, expired or unknown certificate fails in the TLS handshake, before
any mesh frame; the client checks the chain and then the pin, and closes on
a mismatch. TLS 1.3 only; there is no switch that turns a check off.

The accept loop (``TlsServer``) bounds what unauthenticated peers cost:
at most ``MAX_HANDSHAKING`` connections in the handshake (past it, the
oldest is dropped: a real client finishes in milliseconds, a stalled one is
the oldest), each within ``HANDSHAKE_TIMEOUT``; a refusal is one log line,
rate-limited per kind (``RateLimitedLog``); at most ``MAX_TLS_CLIENTS``
authenticated clients at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import importlib
import logging
import os
import re
import secrets
import socket
import ssl
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ._errors import AccessFileError, AuthenticationError, ConnectError, JoinTimeout, MeshError
from ._platform import PLATFORM
from ._sockets import RateLimitedLog

log = logging.getLogger("meshipc")


class _OnFirstUse:
    """A module (or a name in one) imported when first used: ``cryptography.x509``
    costs a cold ``meshipc call`` about a sixth of its imports, and only a
    TLS listener or client needs it."""

    def __init__(self, module: str, name: str = "") -> None:
        self._module = module
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        target: Any = importlib.import_module(self._module)
        if self._name:
            target = getattr(target, self._name)
        return getattr(target, attr)


if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
else:
    x509 = _OnFirstUse("cryptography.x509")
    ExtendedKeyUsageOID = _OnFirstUse("cryptography.x509.oid", "ExtendedKeyUsageOID")
    NameOID = _OnFirstUse("cryptography.x509.oid", "NameOID")

#: Connections in the TLS handshake at once (unauthenticated peers); past
#: it the oldest is dropped. Each costs a socket and an SSL object.
MAX_HANDSHAKING: Final = 64
#: Seconds a peer has to complete the TLS handshake.
HANDSHAKE_TIMEOUT: Final = 5.0
#: Authenticated TLS clients served at once (each holds a gateway);
#: past it a new client is closed after its handshake, with a log line.
MAX_TLS_CLIENTS: Final = 256
#: Grants one listener keeps (live and revoked-not-yet-expired); past it
#: ``grant`` raises ``MeshError`` (revoke some, or let them expire).
MAX_GRANTS: Final = 4096
#: How long a grant lasts unless ``expires=`` says otherwise (seconds).
DEFAULT_GRANT_LIFETIME: Final = 30 * 24 * 3600.0
#: The largest access file ``connect_tls`` reads (a real one is ~2 KiB).
MAX_ACCESS_FILE: Final = 64 * 1024
#: Seconds unacknowledged data may sit on a TCP connection before the
#: kernel gives up on it (``TCP_USER_TIMEOUT``); idle connections are probed
#: by keepalive on the same bound. The gateway's heartbeats catch the rest.
TCP_TIMEOUT: Final = 10.0
#: How far back a client certificate's ``notBefore`` goes (clock skew between hosts).
CLOCK_SKEW: Final = 300.0
#: What the server writes once it accepted a client's certificate, before
#: the link's own HELLO: a client learns "refused" (the server's TLS alert)
#: or "accepted" before it starts the link (in TLS 1.3 the client's side of
#: the handshake ends before the server has checked the client's certificate).
ACCEPTED: Final = b"meshipc-tls-ok\n"
#: The first line of an access file, and its version.
ACCESS_MAGIC: Final = "meshipc-access: 1"

_FOLDER: Final = "tls"
_GRANTS_FILE: Final = "grants.json"
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1-----\r?\n?")
_HEX_PIN = re.compile(r"sha256:([0-9a-f]{64})")
_GRANT_ID = re.compile(r"[0-9a-f]{16}")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def pin_of(der: bytes) -> str:
    """The pin of a certificate: ``sha256:<hex of the sha256 of its DER>``."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600, replacing it atomically)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Grant(msgspec.Struct, frozen=True):
    """One client's access (``TlsListener.grants()``): no key material."""

    #: 16 hex digits; also the client certificate's serial number
    id: str
    #: where its access file was written
    path: str
    #: ``time.time()`` of issue and of expiry
    issued: float
    expires: float
    revoked: bool = False

    @property
    def serial(self) -> int:
        return int(self.id, 16)

    def state(self, now: float | None = None) -> str:
        """``"revoked"``, ``"expired"`` or ``"valid"``."""
        if self.revoked:
            return "revoked"
        return "expired" if (time.time() if now is None else now) >= self.expires else "valid"


class TlsAuthority:
    """A mesh's TLS keys and grants, kept in ``folder`` (0700, files 0600),
    made at first use. Not thread-safe: used on the mesh's loop."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        st = folder.lstat()
        if not folder.is_dir() or folder.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise MeshError(
                f"{folder} is not a private folder of ours (0700): refusing to keep TLS keys there"
            )
        ca_key_path, server_key_path = folder / "ca.key", folder / "server.key"
        if not ca_key_path.exists():
            self._create()
        self._ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        self._ca_pem = (folder / "ca.pem").read_bytes()
        self._ca = x509.load_pem_x509_certificate(self._ca_pem)
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca.public_key())  # type: ignore[arg-type]
        self._server_key_path = server_key_path
        self._server_cert_path = folder / "server.pem"
        server = x509.load_pem_x509_certificate(self._server_cert_path.read_bytes())
        #: the pin clients check: sha256 of the server certificate's DER
        self.pin = pin_of(server.public_bytes(serialization.Encoding.DER))
        self._grants: dict[str, Grant] = {}
        grants_path = folder / _GRANTS_FILE
        if grants_path.exists():
            for g in msgspec.json.decode(grants_path.read_bytes(), type=list[Grant]):
                self._grants[g.id] = g
        self._context = self._server_context()

    def _create(self) -> None:
        now = _now()
        ten_years = now + datetime.timedelta(days=3650)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(_name("meshipc mesh CA"))
            .issuer_name(_name("meshipc mesh CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW))
            .not_valid_after(ten_years)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = (
            x509.CertificateBuilder()
            .subject_name(_name("meshipc mesh server"))
            .issuer_name(ca.subject)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW))
            .not_valid_after(ten_years)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(self.folder / "server.key", _key_pem(server_key))
        _write_private(self.folder / "server.pem", _cert_pem(server))
        _write_private(self.folder / "ca.pem", _cert_pem(ca))
        _write_private(self.folder / "ca.key", _key_pem(ca_key))  # last: its presence means "made"

    # ------------------------------------------------------------ contexts

    def _server_context(self) -> ssl.SSLContext:
        """A fresh server context: TLS 1.3, client certificates required and
        checked against the CA and the current CRL."""
        now = _now()
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._ca.subject)
            .last_update(now - datetime.timedelta(seconds=CLOCK_SKEW))
            .next_update(now + datetime.timedelta(days=3650))
            .add_extension(self._aki, critical=False)
            .add_extension(x509.CRLNumber(time.time_ns()), critical=False)
        )
        for g in self._grants.values():
            if g.revoked:
                crl = crl.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(g.serial).revocation_date(now).build()
                )
        signed = crl.sign(self._ca_key, hashes.SHA256())  # type: ignore[arg-type]
        trust = self.folder / "trust.pem"
        _write_private(trust, self._ca_pem + signed.public_bytes(serialization.Encoding.PEM))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(self._server_cert_path, self._server_key_path)
        ctx.load_verify_locations(cafile=str(trust))  # the CA and its CRL
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
        return ctx

    def context(self) -> ssl.SSLContext:
        """The server context for the next handshake (current revocations)."""
        return self._context

    # ------------------------------------------------------------ grants

    def grant(self, address: tuple[str, int], path: Path, expires: float) -> Grant:
        """Mint a client certificate valid for ``expires`` seconds and write
        the access file at ``path`` (0600; replaced if it exists). Raises
        ``ValueError`` for a non-positive or non-finite ``expires``,
        ``MeshError`` past ``MAX_GRANTS``."""
        if not isinstance(expires, int | float) or not 0 < expires < float("inf"):
            raise ValueError(f"expires must be a positive number of seconds, got {expires!r}")
        self._prune()
        if len(self._grants) >= MAX_GRANTS:
            raise MeshError(f"this listener holds {MAX_GRANTS} grants (MAX_GRANTS): revoke some first")
        grant_id = secrets.token_hex(8)
        while grant_id in self._grants or grant_id[0] in "0":  # a positive serial of 64 bits
            grant_id = secrets.token_hex(8)
        now = _now()
        until = now + datetime.timedelta(seconds=expires)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"meshipc grant {grant_id}"))
            .issuer_name(self._ca.subject)
            .public_key(key.public_key())
            .serial_number(int(grant_id, 16))
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW))
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        host, port = address
        header = (
            "# meshipc TLS access file: whoever reads it can use this grant; keep it private (0600)\n"
            f"{ACCESS_MAGIC}\naddress: {host} {port}\npin: {self.pin}\ngrant: {grant_id}\n"
            f"expires: {until.isoformat(timespec='seconds')}\n"
        )
        path = Path(path)
        _write_private(path, header.encode() + _cert_pem(cert) + _key_pem(key) + self._ca_pem)
        g = Grant(grant_id, str(path), now.timestamp(), until.timestamp())
        self._grants[grant_id] = g
        self._save()
        return g

    def grants(self) -> list[Grant]:
        """Every grant not yet expired (revoked ones included), oldest first."""
        self._prune()
        return sorted(self._grants.values(), key=lambda g: g.issued)

    def revoke(self, grant_id: str) -> Grant:
        """Revoke a grant: new handshakes with its certificate fail. Raises
        ``KeyError`` for an unknown id."""
        g = self._grants.get(grant_id) if isinstance(grant_id, str) else None
        if g is None:
            raise KeyError(f"no grant {grant_id!r}")
        g = msgspec.structs.replace(g, revoked=True)
        self._grants[grant_id] = g
        self._save()
        self._context = self._server_context()
        return g

    def check(self, serial: int) -> Grant | None:
        """The live grant of a client certificate's serial (after the TLS
        checks passed; a second look at our own table), or None."""
        g = self._grants.get(f"{serial:016x}")
        return g if g is not None and g.state() == "valid" else None

    def _prune(self) -> None:
        now = time.time()
        gone = [k for k, g in self._grants.items() if g.expires <= now]
        for k in gone:
            del self._grants[k]
        if gone:
            self._save()

    def _save(self) -> None:
        _write_private(self.folder / _GRANTS_FILE, msgspec.json.encode(list(self._grants.values())))


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


# ------------------------------------------------------------------ the client side


@dataclass(frozen=True, slots=True)
class Access:
    """A parsed access file (what ``connect_tls`` needs)."""

    path: Path
    host: str
    port: int
    pin: str
    grant: str
    ca_pem: str

    @property
    def label(self) -> str:
        return f"tls:{self.host}:{self.port}"


def read_access(path: str | os.PathLike[str]) -> Access:
    """Read and check an access file. Raises ``AccessFileError`` for a file
    that is missing, too large (``MAX_ACCESS_FILE``), readable by others, or
    malformed."""
    p = Path(path)
    try:
        # O_NONBLOCK: a FIFO put in its place does not hang us
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise AccessFileError(str(p), exc.strerror or str(exc)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise AccessFileError(str(p), "not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_mode & 0o077:
            raise AccessFileError(str(p), f"mode {st.st_mode & 0o777:o} lets others read the key (chmod 600)")
        data = f.read(MAX_ACCESS_FILE + 1)
    if len(data) > MAX_ACCESS_FILE:
        raise AccessFileError(str(p), f"larger than {MAX_ACCESS_FILE} bytes (MAX_ACCESS_FILE)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise AccessFileError(str(p), "not an ASCII text file") from None
    fields: dict[str, str] = {}
    for line in text.split("-----BEGIN", 1)[0].splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            raise AccessFileError(str(p), f"malformed line {line[:40]!r}")
        fields[key] = value.strip()
    if fields.get("meshipc-access") != ACCESS_MAGIC.split(": ")[1]:
        raise AccessFileError(str(p), "not a meshipc access file of a version this meshipc reads")
    try:
        host, port_text = fields["address"].rsplit(" ", 1)
        port = int(port_text)
        if not 0 < port < 65536 or not host:
            raise ValueError(port)
        pin, grant = fields["pin"], fields["grant"]
    except (KeyError, ValueError):
        raise AccessFileError(str(p), "missing or malformed address, pin or grant") from None
    if not _HEX_PIN.fullmatch(pin) or not _GRANT_ID.fullmatch(grant):
        raise AccessFileError(str(p), "malformed pin or grant id")
    blocks = [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(text)]
    if [k for k, _ in blocks] != ["CERTIFICATE", "PRIVATE KEY", "CERTIFICATE"]:
        raise AccessFileError(str(p), "expected a client certificate, its key and the CA certificate")
    return Access(p, host, port, pin, grant, blocks[2][1])


def client_context(access: Access) -> ssl.SSLContext:
    """TLS 1.3, the server's chain checked against the mesh CA (its pin is
    checked after the handshake, ``check_pin``); our certificate from the
    access file. ``AccessFileError`` if the file's certificate or key is bad."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the server is known by its pin, not by a name
    try:
        ctx.load_verify_locations(cadata=access.ca_pem)
        ctx.load_cert_chain(access.path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise AccessFileError(str(access.path), f"unusable certificate or key: {exc}") from None
    return ctx


def check_pin(access: Access, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> None:
    """``AuthenticationError`` unless the server's certificate has the access
    file's pin."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der or not secrets.compare_digest(pin_of(der), access.pin):
        raise AuthenticationError(
            f"{access.label}: the server's certificate does not match the access file's pin "
            "(another server at that address, or a new mesh: ask for a new grant)"
        )


async def open_tls(
    access: Access, timeout: float | None, tcp_timeout: float = TCP_TIMEOUT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect, make the TLS handshake and check the pin. Raises
    ``ConnectError`` (TCP), ``AuthenticationError`` (the handshake failed
    or the pin does not match), ``JoinTimeout``."""
    ctx = client_context(access)
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_connection(access.host, access.port)
            except OSError as exc:
                raise ConnectError(access.label, exc.strerror or str(exc)) from None
            sock = writer.get_extra_info("socket")
            if sock is not None:
                PLATFORM.tcp_liveness(sock, tcp_timeout)
            try:
                await start_tls(writer, ctx)
            except (ssl.SSLError, OSError, EOFError) as exc:
                writer.close()
                raise AuthenticationError(f"{access.label}: TLS handshake refused: {_reason(exc)}") from None
            try:
                check_pin(access, writer.get_extra_info("ssl_object"))
                try:
                    said = await reader.readexactly(len(ACCEPTED))
                except (ssl.SSLError, OSError, EOFError) as exc:
                    why = "" if isinstance(exc, asyncio.IncompleteReadError) else f": {_reason(exc)}"
                    raise AuthenticationError(
                        f"{access.label}: the server refused our certificate (a revoked, expired or "
                        f"unknown grant: ask for a new one){why}"
                    ) from None
                if said != ACCEPTED:
                    raise AuthenticationError(f"{access.label}: the server is not a meshipc TLS listener")
            except AuthenticationError:
                writer.close()
                raise
    except TimeoutError:
        raise JoinTimeout(access.label, timeout if timeout is not None else 0.0) from None
    return reader, writer


async def start_tls(writer: asyncio.StreamWriter, ctx: ssl.SSLContext) -> None:
    """``writer.start_tls(ctx)``; ``ConnectionResetError`` when the peer
    closed during the handshake (CPython 3.11's asyncio then leaves the
    writer with no transport, and may fail reading it: it is given its old
    one back, to be closed)."""
    raw = writer.transport
    try:
        await writer.start_tls(ctx)
    except AttributeError:  # that case again: 3.11's start_tls reads the missing transport
        if writer.transport is not None:
            raise
    if writer.transport is None:
        writer._transport = raw
        raise ConnectionResetError("the peer closed the connection during the TLS handshake")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


# ------------------------------------------------------------------ the server side


@dataclass(frozen=True, slots=True)
class TlsServerStats:
    """A snapshot of a ``TlsServer``."""

    #: clients that passed the handshake and were handed on, since start
    accepted: int
    #: connections refused (handshake failed, timed out, dropped at a cap)
    refused: int
    #: connections in the handshake now (at most ``MAX_HANDSHAKING``)
    handshaking: int
    #: authenticated clients now (at most ``MAX_TLS_CLIENTS``)
    clients: int


OnClient = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Grant, str], Awaitable[None]]


class TlsServer:
    """The accept loop: TCP, then the TLS handshake under the caps, then
    ``on_client(reader, writer, grant, peer)`` for a granted client, which
    runs until that client is done.

    Each accepted socket is handed to the loop's TLS layer from its first
    byte (``connect_accepted_socket(ssl=...)``), never upgraded from a
    plain stream: a ClientHello read before ``start_tls`` would be lost to
    the handshake (measured: uvloop lost a third of them)."""

    def __init__(
        self,
        authority: TlsAuthority,
        on_client: OnClient,
        tcp_timeout: float = TCP_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.authority = authority
        self._on_client = on_client
        self._tcp_timeout = tcp_timeout
        self._handshake_timeout = handshake_timeout
        self._listening: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._handshaking: dict[asyncio.Task[None], socket.socket] = {}  # oldest first
        self._evicted: set[asyncio.Task[None]] = set()
        self._clients: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = RateLimitedLog()
        self._accepted = 0
        self._refused = 0
        self.address: tuple[str, int] = ("", 0)

    async def start(self, host: str, port: int) -> None:
        """Bind ``(host, port)`` and start accepting. ``OSError`` if it cannot be bound."""
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listening = socket.create_server((host, port), family=family, backlog=MAX_HANDSHAKING)
        self._listening.setblocking(False)
        name = self._listening.getsockname()
        self.address = (str(name[0]), int(name[1]))
        self._acceptor = self._loop.create_task(self._accept_loop())

    def stats(self) -> TlsServerStats:
        return TlsServerStats(self._accepted, self._refused, len(self._handshaking), len(self._clients))

    def _refuse(self, kind: str, peer: str, why: str) -> None:
        self._refused += 1
        self._log.warning(kind, "TLS listener %s: refused %s: %s", self.address[1], peer, why)

    async def _accept_loop(self) -> None:
        loop = self._loop
        listening = self._listening
        if loop is None or listening is None:
            return
        while True:
            try:
                sock, addr = await loop.sock_accept(listening)
            except OSError as exc:  # out of descriptors, most likely: back off, keep the ones we hold
                self._log.warning("accept", "TLS listener %s: accept failed: %s", self.address[1], exc)
                await asyncio.sleep(0.1)
                continue
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "?"
            with contextlib.suppress(OSError):
                PLATFORM.tcp_liveness(sock, self._tcp_timeout)
            if len(self._handshaking) >= MAX_HANDSHAKING:
                oldest = next(iter(self._handshaking))
                _drop(self._handshaking.pop(oldest))
                self._evicted.add(oldest)
                oldest.cancel()
                self._refuse(
                    "cap",
                    "the oldest connection in the handshake",
                    f"{MAX_HANDSHAKING} at once (MAX_HANDSHAKING)",
                )
            task = loop.create_task(self._handshake(sock, peer))
            self._handshaking[task] = sock
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handshake(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        me = asyncio.current_task()
        try:
            async with asyncio.timeout(self._handshake_timeout):
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol,
                    sock,
                    ssl=self.authority.context(),
                    ssl_handshake_timeout=self._handshake_timeout,
                )
        except asyncio.CancelledError:
            _drop(sock)
            if me in self._evicted:  # dropped at the cap (said so): not the loop ending
                self._evicted.discard(me)
                return
            raise
        except Exception as exc:  # whatever a peer provokes in the handshake refuses it
            _drop(sock)
            if isinstance(exc, TimeoutError):
                self._refuse("timeout", peer, f"no TLS handshake within {self._handshake_timeout:g} s")
            else:
                self._refuse("handshake", peer, f"TLS handshake failed: {_reason(exc)}")
            return
        finally:
            self._handshaking.pop(me, None)  # type: ignore[arg-type]
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            await self._serve(reader, writer, peer)
        except asyncio.CancelledError:
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        grant = self._grant_of(writer)
        if grant is None:
            self._refuse("grant", peer, "no valid grant for its certificate")
            writer.transport.abort()
            return
        if len(self._clients) >= MAX_TLS_CLIENTS:
            self._refuse("clients", peer, f"{MAX_TLS_CLIENTS} clients at once (MAX_TLS_CLIENTS)")
            writer.transport.abort()
            return
        self._accepted += 1
        writer.write(ACCEPTED)
        self._clients.add(writer)
        try:
            await self._on_client(reader, writer, grant, peer)
        except (MeshError, OSError) as exc:  # the link broke or never started: one line, others served
            self._log.warning("link", "TLS listener %s: client %s: %s", self.address[1], peer, exc)
        finally:
            self._clients.discard(writer)
            writer.transport.abort()

    def _grant_of(self, writer: asyncio.StreamWriter) -> Grant | None:
        """The live grant of the certificate the peer showed (OpenSSL checked
        it; this is a second look at our own table), or None."""
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return None
        try:
            serial = x509.load_der_x509_certificate(der).serial_number
        except ValueError:
            return None
        return self.authority.check(serial)

    def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
        if self._listening is not None:
            self._listening.close()
        for t, sock in list(self._handshaking.items()):
            _drop(sock)
            self._evicted.add(t)
            t.cancel()
        self._handshaking.clear()
        for w in list(self._clients):  # each client's task ends as its stream does
            w.transport.abort()


def _drop(sock: socket.socket) -> None:
    """End a connection whose handshake is given up, whoever holds its
    descriptor now (the loop's transport may hold a duplicate)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
