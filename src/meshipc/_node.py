"""A node: port engine + its socket in the mesh directory + its connections
(layer 6).

Nodes reach each other directly by path (``node_path``: ``<directory>/<node id prefix>``):
no broker. A connection is made on demand when a port first needs a node, and
every connection is authenticated before any port event is read:

1. the accepting side checks the peer's uid (the kernel's peer
   credentials, ``PLATFORM.peer_cred``);
2. HELLO (initiator): version, its node id, the node id it wants, a nonce;
3. CHALLENGE (acceptor): version, its node id, a nonce, and an HMAC-SHA256 of
   both nonces and ids under the mesh secret — the initiator checks it;
4. AUTH (initiator): its own HMAC — the acceptor checks it (constant time);
5. VERDICT (acceptor): accepted, or "duplicate" when both sides connected at
   once (the connection started by the smaller node id wins).

The secret itself never goes on the wire, so a socket planted in the
directory learns nothing from a node that connects to it.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import hmac
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from ._codec import CODEC
from ._errors import HandshakeError, MeshError
from ._ids import NodeId
from ._platform import PLATFORM
from ._ports import DEFAULT_LIMITS, OWNED, PROXY, SENDING, Engine, Limits
from ._transport import Connection
from ._wire import PROTOCOL_VERSION, Event, MsgEvent

log = logging.getLogger("meshipc")

#: Seconds a connecting peer gets to finish the handshake; a silent or slow
#: peer never holds up anyone else (each handshake is its own task).
HANDSHAKE_TIMEOUT: Final = 10.0
#: A node that does not finish the handshake in time is not dead (it may be
#: stopped or busy): the connection is retried, with waits growing to this.
RETRY_MAX_WAIT: Final = 1.0
#: Nodes remembered as dead (so traffic to them fails at once); the oldest
#: are forgotten beyond this, which costs at most a refused connect later.
MAX_DEAD_NODES: Final = 128
#: Seconds a peer accepted on a listening socket gets to send its HELLO. A
#: real node sends it the moment it connects; a silent peer frees its slot
#: (see ``MAX_PENDING``) this soon.
HELLO_TIMEOUT: Final = 2.0
#: Connections one listening socket serves at once before they are
#: authenticated (node handshakes; listener clients until their invitation
#: is sent). At the cap, accepting pauses and the rest wait in the kernel's
#: backlog: silent or slow peers cost at most this many fds per socket.
MAX_PENDING: Final = 128
#: At the cap, a connection still unauthenticated after this many seconds
#: gives its slot to the next one waiting (a real peer finishes in
#: milliseconds): silent peers cannot keep real ones waiting in the backlog.
EVICT_AFTER: Final = 0.25
#: Seconds between two log lines about the same kind of trouble on one
#: socket (refused peers, failed accepts); the next line says how many
#: were held back.
LOG_INTERVAL: Final = 10.0
#: ``accept`` errors meaning "out of descriptors or memory". The listening
#: socket stays readable, so accepting pauses (no busy loop) and resumes
#: after a backoff from ``_PAUSE_FIRST`` to ``_PAUSE_MAX`` seconds, or as soon
#: as a connection of this socket ends and gives back its fd.
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_PAUSE_FIRST, _PAUSE_MAX = 0.05, 1.0
SECRET_LEN: Final = 32

_MAGIC = b"MSH1"
_HELLO = struct.Struct("<4sHH16s16s32s")
_CHALLENGE = struct.Struct("<4sHH16s32s32s")
_AUTH = struct.Struct("<32s")
_VERDICT = struct.Struct("<B")
V_ACCEPT, V_DUPLICATE, V_DENIED = 1, 2, 3
S_OK, S_WRONG_NODE, S_BAD_VERSION = 0, 1, 2


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


class _ClosedEarly(HandshakeError):
    """The other side hung up mid-handshake (a node under a flood of
    connections sheds the oldest; a dying one closes): worth a retry."""


#: Connection attempts to a node that hangs up mid-handshake before it is
#: deemed gone.
MAX_EARLY_CLOSES: Final = 5


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise _ClosedEarly(f"peer closed the connection after {len(buf)} of {n} handshake bytes")
        buf += chunk
    return bytes(buf)


def _why(exc: BaseException) -> str:
    """An error's text for a log line or a failure reason: never empty."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"the handshake timed out after {HANDSHAKE_TIMEOUT:g} s"
    return str(exc) or type(exc).__name__


def check_private_dir(path: Path) -> None:
    """Refuse a directory that is not ours alone (owner, mode 0700, no symlink)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise MeshError(f"{path} exists and is not a directory (refusing to use it)")
    if st.st_uid != os.getuid():
        raise MeshError(f"{path} is owned by uid {st.st_uid}, not by us (refusing to use it)")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise MeshError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}; a mesh directory must be 0700")


def node_path(directory: Path, node: bytes) -> Path:
    """Where node ``node`` listens: the first 48 bits of its (random) id in
    hex, short so that any mesh name fits an AF_UNIX address; a clash is
    refused at bind and the handshake checks the whole id."""
    return directory / node.hex()[:12]


class Node:
    """One node: a port engine, a listening socket, connections to peers."""

    def __init__(
        self,
        directory: Path,
        secret: MeshSecret,
        node_id: bytes | None = None,
        *,
        allowed_uids: Iterable[int] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.id = NodeId(node_id) if node_id is not None else NodeId.random()
        self.directory = Path(directory)
        self._secret = secret
        self.allowed_uids = set(allowed_uids) if allowed_uids is not None else {os.getuid()}
        self.engine = Engine(
            self.id,
            outbox=self,
            codec=CODEC,
            limits=limits,
        )
        # handles used from other threads hand their sends to this loop
        self.engine.thread = threading.get_ident()
        self.engine.post = self.loop.call_soon_threadsafe
        self.path = node_path(self.directory, self.id)
        self._conns: dict[bytes, Connection] = {}
        self._connecting: dict[bytes, asyncio.Task[None]] = {}
        self._pending: dict[bytes, list[tuple[Event, list[Any]]]] = {}
        self._dead: OrderedDict[bytes, str] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lsock: socket.socket | None = None
        self._acceptor: Acceptor | None = None
        self._log = RateLimitedLog()
        self.closed = False
        self.rejected = 0  # connections refused (bad secret, uid, garbage)
        self.attached = 0  # invited nodes that joined
        self._invited: dict[bytes, asyncio.TimerHandle] = {}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        s = listen_private(self.path, "node socket")
        self._lsock = s
        self._acceptor = Acceptor(
            self.loop,
            s,
            lambda sock: self._spawn(self.accept_connection(sock, hello_timeout=HELLO_TIMEOUT)),
            f"node {self.id}",
        )
        self._acceptor.start()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    @property
    def busy(self) -> bool:
        """Ports in transit, or bytes not yet written."""
        live = self._conns
        for st in self.engine.ports.values():
            # only ports in transit over a live connection can still settle
            # (not, say, the port of an invitation nobody has used yet)
            if st.mode == SENDING and (st.first_hop in live or st.first_hop in self._connecting):
                return True
            if st.mode == PROXY and st.target_node in live:
                return True
        return bool(self._connecting) or not all(c.idle for c in self._conns.values())

    async def close(self, linger: float = 5.0) -> None:
        """Shut down in order: ends still open towards other nodes are closed
        (their peers see ``ChannelClosed``, not a failure), ports in transit
        settle and buffers drain (at most ``linger`` seconds), then every
        connection closes and whatever still depends on one fails."""
        if self.closed:
            return
        if self._acceptor is not None:
            self._acceptor.close()
        engine = self.engine
        for st in list(engine.ports.values()):
            if st.mode == OWNED and not st.closed and st.peer_node != self.id:
                engine.close(st)
        try:
            async with asyncio.timeout(linger):
                while self.busy:
                    await asyncio.sleep(0.005)
        except TimeoutError:
            log.debug("node %s closing with work in flight", self.id)
        for conn in list(self._conns.values()):
            conn.flush()
        others = set(self._conns) | set(self._invited) | set(self._pending) | set(self._connecting)
        self.closed = True
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        for t in list(self._tasks):
            t.cancel()
        for timer in self._invited.values():
            timer.cancel()
        self._invited.clear()
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()
        for evs in self._pending.values():
            for _, fds in evs:
                for f in fds:
                    f.close()
        self._pending.clear()
        # whatever still waits on another node (an unused invitation, a port
        # in transit) fails now for its local holder instead of hanging
        for node in others:
            engine.node_failed(node, "the local node closed")
        for st in list(engine.ports.values()):
            if st.peer_node != self.id:
                engine.node_failed(st.peer_node, "the local node closed")

    # ------------------------------------------------------------ routing (the engine's Outbox)

    def send_event(self, node: bytes, ev: Event, fds: list[Any]) -> None:
        """Write ``ev`` on the link to ``node``; queued while connecting,
        failed back to the engine (next turn) once ``node`` is known dead."""
        conn = self._conns.get(node)
        if conn is not None:
            conn.write_event(ev, fds)
            return
        if node in self._dead or self.closed:
            for f in fds:
                f.close()
            reason = self._dead.get(node, "local node closed")
            self.loop.call_soon(self.engine.node_failed, node, reason)
            return
        self._pending.setdefault(node, []).append((ev, fds))
        self.watch(node)

    def send_data(self, node: bytes, port: bytes, seq: int, kind: int, body: bytes) -> None:
        """``send_event`` for a plain message, without an event object."""
        conn = self._conns.get(node)
        if conn is not None:
            conn.write_data(port, seq, kind, body)
        else:
            self.send_event(node, MsgEvent(port, seq, kind, 0, [], 0, body), [])

    def watch(self, node: bytes) -> None:
        """Connect to ``node`` unless linked, connecting or expected."""
        if node in self._conns or node in self._connecting or node == self.id or self.closed:
            return
        if node in self._invited:
            return  # it will connect to us (or its invitation expires)
        if node in self._dead:
            self.loop.call_soon(self.engine.node_failed, node, self._dead[node])
            return
        self._connecting[node] = self._spawn(self._connect(node))

    def _on_event(self, src: bytes, ev: Event, fds: list[Any]) -> None:
        self.engine.receive(src, ev, fds)

    def _established(self, sock: socket.socket, peer: bytes) -> None:
        conn = Connection(
            self.loop,
            sock,
            peer,
            self._on_event,
            self._on_lost,
            functools.partial(self.engine.receive_data, peer),
            functools.partial(self.engine.receive_run, peer),
        )
        self._conns[peer] = conn
        for ev, fds in self._pending.pop(peer, []):
            conn.write_event(ev, fds)

    def _on_lost(self, conn: Connection, reason: str) -> None:
        if self._conns.get(conn.peer) is conn:
            del self._conns[conn.peer]
        self._mark_dead(conn.peer, reason)

    def _mark_dead(self, peer: bytes, reason: str) -> None:
        if self.closed:
            return
        self._dead[peer] = reason
        while len(self._dead) > MAX_DEAD_NODES:
            self._dead.popitem(last=False)
        for _, fds in self._pending.pop(peer, []):
            for f in fds:
                f.close()
        log.debug("node %s: peer %s failed: %s", self.id, peer.hex()[:12], reason)
        self.engine.node_failed(peer, reason)

    # ------------------------------------------------------------ handshakes

    def _refuse(self, sock: socket.socket, why: str, cred: PeerCred | None) -> None:
        self.rejected += 1
        who = f"pid {cred.pid} uid {cred.uid}" if cred else "unknown peer"
        kind = why.split(":")[0][:40]
        self._log.warning(kind, "node %s refused a connection from %s: %s", self.id, who, why)
        sock.close()

    async def accept_connection(
        self, sock: socket.socket, expect: bytes | None = None, *, hello_timeout: float = HANDSHAKE_TIMEOUT
    ) -> None:
        """Run the acceptor side of the handshake on ``sock`` (takes ownership);
        the peer's HELLO must arrive within ``hello_timeout`` seconds."""
        cred: PeerCred | None = None
        me = asyncio.current_task()
        try:
            cred = PeerCred.of(sock)
            if cred.uid not in self.allowed_uids:
                self._refuse(sock, f"uid {cred.uid} is not allowed", cred)
                return
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                try:
                    async with asyncio.timeout(hello_timeout):
                        hello = await _recv_exact(self.loop, sock, _HELLO.size)
                except TimeoutError:
                    raise HandshakeError(f"no handshake within {hello_timeout:g} s") from None
                magic, ver, _, peer, want, nonce_i = _HELLO.unpack(hello)
                if magic != _MAGIC:
                    raise HandshakeError("not a meshipc node")
                status = S_OK
                if ver != PROTOCOL_VERSION:
                    status = S_BAD_VERSION
                elif want != self.id or (expect is not None and peer != expect):
                    status = S_WRONG_NODE
                nonce_a = secrets.token_bytes(32)
                mac_a = self._secret.mac(b"meshipc-acceptor", nonce_i, nonce_a, peer, self.id)
                await self.loop.sock_sendall(
                    sock, _CHALLENGE.pack(_MAGIC, PROTOCOL_VERSION, status, self.id, nonce_a, mac_a)
                )
                if status != S_OK:
                    raise HandshakeError(f"handshake status {status} (version {ver})")
                (mac_i,) = _AUTH.unpack(await _recv_exact(self.loop, sock, _AUTH.size))
                want_mac = self._secret.mac(b"meshipc-initiator", nonce_i, nonce_a, peer, self.id)
                if not hmac.compare_digest(mac_i, want_mac):
                    await self.loop.sock_sendall(sock, _VERDICT.pack(V_DENIED))
                    raise HandshakeError("wrong mesh secret")
                verdict = V_ACCEPT
                if peer in self._conns or peer in self._dead or self.closed or peer == self.id:
                    verdict = V_DUPLICATE
                elif peer in self._connecting and self._connecting[peer] is not me and self.id < peer:
                    verdict = V_DUPLICATE  # our own connection wins
                # else: ours, if any, finishes its handshake and is told "duplicate"
                # (cancelling it midway would look like an attack to the peer)
                await self.loop.sock_sendall(sock, _VERDICT.pack(verdict))
                if verdict != V_ACCEPT:
                    log.info(
                        "node %s: node %s (pid %d uid %d) refused: already joined, expired or duplicate",
                        self.id,
                        peer.hex()[:12],
                        cred.pid,
                        cred.uid,
                    )
                    sock.close()
                    return
                timer = self._invited.pop(peer, None)
                if timer is not None:
                    timer.cancel()
                    self.attached += 1
                    log.info(
                        "node %s: invited node %s attached (pid %d uid %d)",
                        self.id,
                        peer.hex()[:12],
                        cred.pid,
                        cred.uid,
                    )
        except asyncio.CancelledError:
            sock.close()  # node closing, or the connection gave its slot away
            raise
        except (HandshakeError, OSError, TimeoutError, struct.error) as exc:
            self._refuse(sock, _why(exc), cred)
            if expect is not None and self._connecting.get(expect) is me:
                del self._connecting[expect]
                self._mark_dead(expect, f"handshake failed: {_why(exc)}")
            return
        finally:
            if expect is not None and self._connecting.get(expect) is me:
                del self._connecting[expect]
        self._established(sock, peer)

    def expect_invited(self, node: bytes, ttl: float) -> None:
        """Node ``node`` was invited: if it has not joined within ``ttl``
        seconds, it never will (its ports fail, a late join is refused)."""
        self._invited[node] = self.loop.call_later(ttl, self._invite_expired, node)

    def _invite_expired(self, node: bytes) -> None:
        if self._invited.pop(node, None) is not None and node not in self._conns:
            log.info("node %s: invitation for node %s expired unused", self.id, node.hex()[:12])
            self._mark_dead(node, "invitation expired unused")

    def forget(self, peer: bytes, reason: str) -> None:
        """Node ``peer`` will never connect: stop waiting, fail its ports."""
        task = self._connecting.pop(peer, None)
        if task is not None:
            task.cancel()
        timer = self._invited.pop(peer, None)
        if timer is not None:
            timer.cancel()
        self._mark_dead(peer, reason)

    def accept_via(self, peer: bytes, sock: socket.socket) -> None:
        """Expect node ``peer`` to connect over ``sock`` (an end of a socket
        pair given to a child); no connection by path is tried meanwhile."""
        self._connecting[peer] = self._spawn(self.accept_connection(sock, expect=peer))

    def connect_via(self, peer: bytes, sock: socket.socket) -> None:
        """Connect to ``peer`` over an already connected socket (inherited)."""
        self._connecting[peer] = self._spawn(self._connect(peer, sock))

    async def _connect(self, peer: bytes, sock: socket.socket | None = None) -> None:
        wait = 0.05
        early = 0
        try:
            while True:
                try:
                    verdict = await self.connect_to(peer, sock)
                except (_ClosedEarly, ConnectionResetError, BrokenPipeError):
                    early += 1
                    if sock is not None or self.closed or early >= MAX_EARLY_CLOSES:
                        raise
                    await asyncio.sleep(wait)  # a shed connection: try again, once it breathes
                    wait = min(wait * 2, RETRY_MAX_WAIT)
                    continue
                except TimeoutError:
                    # stopped or busy is not dead: dead is a socket that is gone
                    # or refuses (its process exited), or a broken handshake
                    if sock is not None or self.closed:
                        raise
                    log.info(
                        "node %s: node %s did not answer within %.0f s; retrying",
                        self.id,
                        peer.hex()[:12],
                        HANDSHAKE_TIMEOUT,
                    )
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, RETRY_MAX_WAIT)
                    continue
                if verdict == V_DUPLICATE:
                    # the peer's own connection to us carries the traffic; give it time
                    self._spawn(self._await_inbound(peer))
                break
        except asyncio.CancelledError:
            if self._connecting.get(peer) is asyncio.current_task():
                del self._connecting[peer]
            raise
        except TimeoutError:
            self._connecting.pop(peer, None)
            self._mark_dead(peer, f"cannot connect: no handshake within {HANDSHAKE_TIMEOUT:.0f} s")
            return
        except (HandshakeError, OSError) as exc:
            self._connecting.pop(peer, None)
            self._mark_dead(peer, f"cannot connect: {_why(exc)}")
            return
        self._connecting.pop(peer, None)

    async def connect_to(self, peer: bytes, sock: socket.socket | None = None) -> int:
        """Initiator side of the handshake to node ``peer``; returns the
        verdict (``V_ACCEPT`` or ``V_DUPLICATE``), raises ``HandshakeError``
        if the node refused us and ``OSError`` if it cannot be reached."""
        own = sock is None
        if sock is None:
            sock = PLATFORM.unix_socket()
            sock.setblocking(False)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                if own:
                    await self.loop.sock_connect(sock, os.fspath(node_path(self.directory, peer)))
                nonce_i = secrets.token_bytes(32)
                await self.loop.sock_sendall(
                    sock, _HELLO.pack(_MAGIC, PROTOCOL_VERSION, 0, self.id, peer, nonce_i)
                )
                magic, _ver, status, got, nonce_a, mac_a = _CHALLENGE.unpack(
                    await _recv_exact(self.loop, sock, _CHALLENGE.size)
                )
                if magic != _MAGIC or status != S_OK or got != peer:
                    raise HandshakeError(f"node {peer.hex()[:12]} refused the handshake (status {status})")
                want_mac = self._secret.mac(b"meshipc-acceptor", nonce_i, nonce_a, self.id, peer)
                if not hmac.compare_digest(mac_a, want_mac):
                    raise HandshakeError("the node did not prove it holds the mesh secret")
                mac_i = self._secret.mac(b"meshipc-initiator", nonce_i, nonce_a, self.id, peer)
                await self.loop.sock_sendall(sock, _AUTH.pack(mac_i))
                (verdict,) = _VERDICT.unpack(await _recv_exact(self.loop, sock, _VERDICT.size))
        except BaseException:
            sock.close()
            raise
        if verdict == V_ACCEPT:
            if peer in self._conns:  # lost a race we could not see coming
                sock.close()
                return V_DUPLICATE
            self._established(sock, peer)
            return V_ACCEPT
        sock.close()
        if verdict == V_DUPLICATE:
            return V_DUPLICATE
        raise HandshakeError(f"node {peer.hex()[:12]} rejected the mesh secret")

    async def _await_inbound(self, peer: bytes) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                while peer not in self._conns and peer not in self._dead:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            self._mark_dead(peer, "no connection after a simultaneous connect")


def listen_private(path: Path, what: str, backlog: int = 1024) -> socket.socket:
    """A non-blocking Unix socket listening at ``path``, mode 0600."""
    s = PLATFORM.unix_socket()
    try:
        s.bind(os.fspath(path))
        os.chmod(path, 0o600)
        s.listen(backlog)
        s.setblocking(False)
    except OSError as exc:
        s.close()
        raise MeshError(f"cannot listen on {what} {path}: {exc}") from exc
    return s


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


class Acceptor:
    """Accepts the connections of one listening socket and hands each to
    ``handle``, which starts a task for it (and must not block).

    At most ``limit`` of those tasks run at once. At the cap, the oldest one
    still running after ``EVICT_AFTER`` seconds is cancelled to make room
    (its peer is silent or too slow); if none is that old, accepting stops
    until one ends or gets that old (the kernel's backlog holds the rest). Out of fds or
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
        limit: int = MAX_PENDING,
    ) -> None:
        self.loop = loop
        self.lsock = lsock
        self.handle = handle
        self.label = label
        self.limit = limit
        self._running: dict[asyncio.Future[Any], float] = {}  # task -> accepted at (loop time)
        #: times accepting paused for lack of fds or memory
        self.out_of_fds = 0
        #: connections cancelled at the cap to make room
        self.evicted = 0
        self.closed = False
        self._reading = False
        self._timer: asyncio.TimerHandle | None = None
        self._pause = _PAUSE_FIRST
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

    def _resume(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed and not self._reading:
            self.loop.add_reader(self.lsock.fileno(), self._on_readable)
            self._reading = True

    def _evict_oldest(self) -> float:
        """Cancel the oldest connection if it has had ``EVICT_AFTER`` seconds
        (0.0); else the seconds until it has. Its fd is freed, and accepting
        resumes, when its task ends."""
        task, since = next(iter(self._running.items()))
        wait = since + EVICT_AFTER - self.loop.time()
        if wait > 0:
            return wait
        del self._running[task]
        task.cancel()  # its _release resumes accepting once its fd is closed
        self.evicted += 1
        self._log.warning(
            "evicted",
            "%s: %d connections pending; dropped one silent for %.1f s",
            self.label,
            len(self._running) + 1,
            EVICT_AFTER - wait,
        )
        return 0.0

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
        if self._reading:
            self.loop.remove_reader(self.lsock.fileno())
            self._reading = False

    def _on_readable(self) -> None:
        for _ in range(64):  # a bounded batch: one busy socket cannot starve the loop
            if self.pending >= self.limit and not self._make_room():
                return
            try:
                sock, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
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
                        self._pause = min(self._pause * 2, _PAUSE_MAX)
                    return
                self._log.warning("accept", "%s: accept failed: %s", self.label, exc)
                continue  # ECONNABORTED and the like: that one connection
            self._pause = _PAUSE_FIRST
            sock.setblocking(False)
            try:
                task = self.handle(sock)
            except BaseException:
                sock.close()
                raise
            self._running[task] = self.loop.time()
            task.add_done_callback(self._release)

    def _release(self, task: asyncio.Future[Any]) -> None:
        self._running.pop(task, None)
        self._resume()  # also ends a pause for fds: one of ours was just freed


def is_socket_alive(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    s = PLATFORM.unix_socket()
    try:
        s.settimeout(1.0)
        s.connect(os.fspath(path))
        return True
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        s.close()
