"""A node: it owns one port engine, its listening socket in the mesh
directory and its links to other nodes, and routes what the engine sends
(it is the engine's ``Outbox``).

Nodes reach each other directly by path (``node_path``: ``<directory>/<node
id prefix>``): no broker. A link is made on demand when a port first needs a
node, and is authenticated before any port event is read: the accepting side
checks the peer's uid (``PeerCred``, from the kernel), then both sides run
the handshake of ``_handshake`` over the socket. A node that dies (its link
breaks, or it cannot be reached) is remembered, so traffic to it fails at
once. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from ._errors import HandshakeError, ProtocolError
from ._handshake import (
    AUTH_LEN,
    CHALLENGE_LEN,
    HELLO_LEN,
    PROOF_LEN,
    SUPPORTED,
    V_ACCEPT,
    V_DENIED,
    V_DUPLICATE,
    VERDICT_LEN,
    Certificate,
    Identity,
    Versions,
    build_challenge,
    build_hello,
    build_verdict,
    check_status,
    hello_status,
    new_hello,
    new_nonce,
    parse_auth,
    parse_challenge,
    parse_hello,
    parse_verdict,
    parse_versions,
)
from ._ids import NodeId
from ._names import node_path, remove_dead_socket
from ._platform import PLATFORM
from ._ports import DEFAULT_LIMITS, Codec, Engine, Limits, PortState
from ._sockets import (
    Acceptor,
    AcceptorStats,
    PeerCred,
    RateLimitedLog,
    StreamEnded,
    connect_unix,
    is_socket_alive,
    listen_private,
    recv_exact,
)
from ._tasks import TaskSet
from ._transport import Link, LinkStats, ReadBuffer
from ._wire import FD_BODY, PORT_DESC_SIZE, Event, FdBody, MsgEvent, decode_port_desc, encode_port_desc

log = logging.getLogger("meshipc")

#: Seconds a connecting peer gets to finish the handshake; a silent or slow
#: peer never holds up anyone else (each handshake is its own task).
HANDSHAKE_TIMEOUT: Final = 10.0
#: A node that does not finish the handshake in time is not dead (it may be
#: stopped or busy): the connection is retried, with waits doubling from
#: ``RETRY_FIRST_WAIT`` to ``RETRY_MAX_WAIT`` seconds.
RETRY_FIRST_WAIT: Final = 0.05
RETRY_MAX_WAIT: Final = 1.0
#: Nodes remembered as dead (so traffic to them fails at once); the oldest
#: are forgotten beyond this, which costs at most a refused connect later.
MAX_DEAD_NODES: Final = 128
#: Seconds a peer accepted on a listening socket gets to send its HELLO. A
#: real node sends it the moment it connects; a silent peer frees its slot
#: (see ``_sockets.MAX_PENDING``) this soon.
HELLO_TIMEOUT: Final = 2.0
#: Connection attempts to a node that hangs up mid-handshake before it is
#: deemed gone.
MAX_EARLY_CLOSES: Final = 5
#: Seconds ``Node.close`` lets ports in transit settle and buffers drain.
CLOSE_LINGER: Final = 5.0
#: Seconds between two looks at ``Node.busy`` while closing: transit and
#: buffers settle inside the engine and the links, which signal no event.
CLOSE_POLL: Final = 0.005
#: Characters of a refusal reason that make its kind, for rate-limited logging.
REFUSAL_KIND_LEN: Final = 40
#: Test hook, read when a node starts: the protocol versions it advertises
#: ("N" or "LOW-HIGH") instead of the release's own (``SUPPORTED``), so
#: tests can pin two processes to different ranges. Not for production: a
#: node still speaks this release's protocol whatever version it names.
TEST_PROTOCOL_ENV: Final = "MESHIPC_TEST_PROTOCOL"


def advertised_versions() -> Versions:
    """The protocol versions a node of this process offers: the release's,
    or the ``MESHIPC_TEST_PROTOCOL`` test hook's (``ValueError`` if malformed)."""
    hook = os.environ.get(TEST_PROTOCOL_ENV)
    if not hook:
        return SUPPORTED
    try:
        return parse_versions(hook)
    except ValueError as exc:
        raise ValueError(f"${TEST_PROTOCOL_ENV}: {exc}") from None


class ClosedEarly(HandshakeError):
    """The other side hung up mid-handshake (a node under a flood of
    connections sheds the oldest; a dying one closes): worth a retry."""


async def _recv_handshake(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    """One handshake message of ``n`` bytes; ``ClosedEarly`` on a hang-up."""
    try:
        return await recv_exact(loop, sock, n)
    except StreamEnded as exc:
        raise ClosedEarly(
            f"peer closed the connection after {exc.received} of {exc.expected} handshake bytes"
        ) from None


def _describe(exc: BaseException) -> str:
    """An error's text for a log line or a failure reason: never empty."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"the handshake timed out after {HANDSHAKE_TIMEOUT:g} s"
    return str(exc) or type(exc).__name__


#: Seconds to wait before each probe of a lost peer's socket file (see
#: ``Node._remove_dead_socket``): at once, then while its process finishes dying.
DEAD_SOCKET_PROBES: Final = (0.0, 0.2, 1.0, 3.0)


@dataclass(frozen=True, slots=True)
class NodeStats:
    """A snapshot of one ``Node`` (``Node.stats()``)."""

    #: this node's id (hex)
    node: str
    #: its socket in the mesh directory
    path: str
    #: port ends the engine holds (owned, in transit, proxies)
    ports: int
    #: nodes being connected to (handshake under way)
    connecting: int
    #: invited nodes expected to connect, neither joined nor expired yet
    invited: int
    #: invited nodes that joined
    attached: int
    #: connections refused (bad credential, uid, garbage, silence)
    rejected: int
    #: nodes remembered as dead (at most ``MAX_DEAD_NODES``)
    dead: int
    #: the accept loop of the node's socket (None before ``start``)
    acceptor: AcceptorStats | None
    #: one record per established link
    links: tuple[LinkStats, ...]
    closed: bool

    def link(self, peer: bytes) -> LinkStats | None:
        """The record of the link to node ``peer``, if there is one."""
        return next((s for s in self.links if s.peer == peer.hex()), None)


class Node:
    """One node: a port engine, a listening socket, links to peers.

    ``identity`` is the credential the mesh's root issued to this node (its
    id is the one its certificate names). ``codec`` turns the engine's
    message objects into bytes and back (the channel layer's ``CODEC``): the
    node ships bytes and never looks inside."""

    def __init__(
        self,
        directory: Path,
        identity: Identity,
        *,
        codec: Codec,
        allowed_uids: Iterable[int] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.id = identity.node
        self.directory = Path(directory)
        self.identity = identity
        self.allowed_uids = set(allowed_uids) if allowed_uids is not None else {os.getuid()}
        #: the protocol versions this node offers (``advertised_versions``)
        self.versions = advertised_versions()
        self.engine = Engine(self.id, outbox=self, codec=codec, limits=limits)
        # handles used from other threads hand their sends to this loop
        self.engine.thread = threading.get_ident()
        self.engine.post = self.loop.call_soon_threadsafe
        self.path = node_path(self.directory, self.id)
        self._links: dict[bytes, Link] = {}
        self.engine.links = self._links  # shared: plain messages skip send_data
        #: the certificate each linked peer proved in its handshake
        self._peers: dict[bytes, Certificate] = {}
        self._reads = ReadBuffer()  # one for all links: they read one at a time
        self._connecting: dict[bytes, asyncio.Task[None]] = {}
        # events for nodes being connected to, written once the link is up
        self._queued: dict[bytes, list[tuple[Event, list[Any]]]] = {}
        self._dead: OrderedDict[bytes, str] = OrderedDict()
        # set when a node waited for is linked or known dead
        self._settled: dict[bytes, asyncio.Event] = {}
        self._tasks = TaskSet(self.loop)
        self._listening: socket.socket | None = None
        self._acceptor: Acceptor | None = None
        self._log = RateLimitedLog()
        self.closed = False
        self.rejected = 0  # connections refused (bad credential, uid, garbage)
        self.attached = 0  # invited nodes that joined
        self._invited: dict[bytes, asyncio.TimerHandle] = {}
        # futures told why a peer died (``when_gone``), one per watcher
        self._watchers: dict[bytes, list[asyncio.Future[str]]] = {}

    @property
    def links(self) -> Mapping[bytes, Link]:
        """The established links, by peer node id."""
        return self._links

    def stats(self) -> NodeStats:
        """What this node holds and has done (a snapshot; never raises)."""
        return NodeStats(
            node=self.id.hex(),
            path=os.fspath(self.path),
            ports=len(self.engine.ports),
            connecting=len(self._connecting),
            invited=len(self._invited),
            attached=self.attached,
            rejected=self.rejected,
            dead=len(self._dead),
            acceptor=self._acceptor.stats() if self._acceptor is not None else None,
            links=tuple(link.stats() for link in self._links.values()),
            closed=self.closed,
        )

    def when_gone(self, peer: bytes) -> asyncio.Future[str]:
        """A future that gets the reason once node ``peer`` is known dead
        (at once if it is): its link broke, or it cannot be reached. Cancel
        it to stop watching; it never completes once this node is closed."""
        fut: asyncio.Future[str] = self.loop.create_future()
        reason = self._dead.get(peer)
        if reason is not None:
            fut.set_result(reason)
        else:
            watchers = self._watchers.setdefault(peer, [])
            watchers[:] = [f for f in watchers if not f.done()]
            watchers.append(fut)
        return fut

    def peer_certificate(self, peer: bytes) -> Certificate | None:
        """The certificate node ``peer`` proved when its link was made (its
        id, role and key, vouched for by the mesh's root), while linked."""
        return self._peers.get(peer)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        s = listen_private(self.path, "node socket")
        self._listening = s
        self._acceptor = Acceptor(
            self.loop,
            s,
            lambda sock: self._tasks.spawn(self.accept_connection(sock, hello_timeout=HELLO_TIMEOUT)),
            f"node {self.id}",
        )
        self._acceptor.start()

    @property
    def busy(self) -> bool:
        """Ports in transit, or bytes not yet written."""
        live = self._links
        stats = self.engine.stats()
        # only ports in transit over a live link can still settle
        # (not, say, the port of an invitation nobody has used yet)
        if any(n in live or n in self._connecting for n in stats.transit_hops):
            return True
        if any(n in live for n in stats.proxy_targets):
            return True
        return bool(self._connecting) or not all(link.idle for link in self._links.values())

    async def settle(self, linger: float = CLOSE_LINGER) -> bool:
        """Wait (at most ``linger`` seconds) until no port is in transit over
        a live link and every buffer is written: False if time ran out. A
        worker that handed its ports over waits here before it closes: an
        end still on its way (a call's reply end buffered behind a moving
        port) is not an open end to close."""
        try:
            async with asyncio.timeout(linger):
                while self.busy:
                    await asyncio.sleep(CLOSE_POLL)
        except TimeoutError:
            return False
        return True

    async def close(self, linger: float = CLOSE_LINGER) -> None:
        """Shut down in order: ends still open towards other nodes are closed
        (their peers see ``ChannelClosed``, not a failure), ports in transit
        settle and buffers drain (at most ``linger`` seconds), then every
        link closes and whatever still depends on one fails."""
        if self.closed:
            return
        if self._acceptor is not None:
            self._acceptor.close()
        engine = self.engine
        engine.close_remote()
        if not await self.settle(linger):
            log.debug("node %s closing with work in flight", self.id)
        for link in list(self._links.values()):
            link.flush()
        others = set(self._links) | set(self._invited) | set(self._queued) | set(self._connecting)
        self.closed = True
        if self._listening is not None:
            self._listening.close()
            self._listening = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._tasks.cancel_all()
        for timer in self._invited.values():
            timer.cancel()
        self._invited.clear()
        for link in list(self._links.values()):
            link.close()
        self._links.clear()
        self._peers.clear()
        for evs in self._queued.values():
            for _, fds in evs:
                for f in fds:
                    f.close()
        self._queued.clear()
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
        link = self._links.get(node)
        if link is not None:
            link.write_event(ev, fds)
            return
        if node in self._dead or self.closed:
            for f in fds:
                f.close()
            reason = self._dead.get(node, "local node closed")
            self.loop.call_soon(self.engine.node_failed, node, reason)
            return
        self._queued.setdefault(node, []).append((ev, fds))
        self.watch(node)

    def send_data(self, node: bytes, port: bytes, seq: int, kind: int, body: bytes) -> None:
        """``send_event`` for a plain message, without an event object."""
        link = self._links.get(node)
        if link is not None:
            link.write_data(port, seq, kind, body)
        elif type(body) is FD_BODY:  # a message of fds (Codec.encode_with_fds)
            fb = cast(FdBody, body)
            fds = fb.take()
            self.send_event(node, MsgEvent(port, seq, kind, 0, [], len(fds), fb.body), fds)
        else:
            self.send_event(node, MsgEvent(port, seq, kind, 0, [], 0, body), [])

    def watch(self, node: bytes) -> None:
        """Connect to ``node`` unless linked, connecting or expected."""
        if node in self._links or node in self._connecting or node == self.id or self.closed:
            return
        if node in self._invited:
            return  # it will connect to us (or its invitation expires)
        if node in self._dead:
            self.loop.call_soon(self.engine.node_failed, node, self._dead[node])
            return
        self._connecting[node] = self._tasks.spawn(self._connect(node))

    def backlog(self, node: bytes) -> int:
        """Unsent bytes on the link to ``node`` (0 while not linked)."""
        link = self._links.get(node)
        return 0 if link is None else link.backlog

    def watch_backlog(self, node: bytes, below: int, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the link to ``node`` is down to ``below`` unsent
        bytes, or gone."""
        link = self._links.get(node)
        if link is None:
            self.loop.call_soon(fn)
        else:
            link.watch_backlog(below, fn)

    def _on_event(self, src: bytes, ev: Event, fds: list[Any]) -> None:
        self.engine.receive(src, ev, fds)

    def _established(self, sock: socket.socket, cert: Certificate, version: int) -> None:
        peer = cert.node
        link = Link(
            self.loop,
            sock,
            peer,
            self.engine.receive,  # (every event but plain data: straight to the engine)
            self._on_lost,
            functools.partial(self.engine.receive_data, peer),
            functools.partial(self.engine.receive_run, peer),
            self._reads,
            body_root=self.directory.parent,
        )
        link.protocol = version
        self._links[peer] = link
        self._peers[peer] = cert
        self._settle(peer)
        for ev, fds in self._queued.pop(peer, []):
            link.write_event(ev, fds)

    def _settle(self, peer: bytes) -> None:
        settled = self._settled.pop(peer, None)
        if settled is not None:
            settled.set()

    def _on_lost(self, link: Link, reason: str) -> None:
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
            self._peers.pop(link.peer, None)
        self._mark_dead(link.peer, reason)
        if not self.closed:
            self._tasks.spawn(self._remove_dead_socket(link.peer))

    async def _remove_dead_socket(self, peer: bytes) -> None:
        """A peer killed without closing left its socket file behind. Its
        link can break before its process has closed its listening socket
        (which then still takes connections): so the probe (a connect, off
        the loop) is tried again a few times (``DEAD_SOCKET_PROBES``)."""
        for delay in DEAD_SOCKET_PROBES:
            await asyncio.sleep(delay)
            if self.closed or peer in self._links or not node_path(self.directory, peer).exists():
                return
            if await asyncio.to_thread(remove_dead_socket, self.directory, peer, is_socket_alive):
                return

    def _mark_dead(self, peer: bytes, reason: str) -> None:
        if self.closed:
            return
        self._dead[peer] = reason
        while len(self._dead) > MAX_DEAD_NODES:
            self._dead.popitem(last=False)
        self._settle(peer)
        for fut in self._watchers.pop(peer, ()):
            if not fut.done():
                fut.set_result(reason)
        for _, fds in self._queued.pop(peer, []):
            for f in fds:
                f.close()
        log.debug("node %s: peer %s failed: %s", self.id, NodeId(peer), reason)
        self.engine.node_failed(peer, reason)

    # ------------------------------------------------------------ handshakes

    def _refuse(self, sock: socket.socket, why: str, cred: PeerCred | None) -> None:
        self.rejected += 1
        who = f"pid {cred.pid} uid {cred.uid}" if cred else "unknown peer"
        kind = why.split(":")[0][:REFUSAL_KIND_LEN]
        self._log.warning(kind, "node %s refused a connection from %s: %s", self.id, who, why)
        sock.close()

    def _verdict_for(self, peer: bytes, me: asyncio.Task[Any] | None) -> int:
        """Acceptor side, once ``peer`` proved its identity: take this link or not."""
        if peer in self._links or peer in self._dead or self.closed or peer == self.id:
            return V_DUPLICATE
        if peer in self._connecting and self._connecting[peer] is not me and self.id < peer:
            return V_DUPLICATE  # our own connection wins
        # else: ours, if any, finishes its handshake and is told "duplicate"
        # (cancelling it midway would look like an attack to the peer)
        return V_ACCEPT

    async def accept_connection(
        self, sock: socket.socket, expect: bytes | None = None, *, hello_timeout: float = HANDSHAKE_TIMEOUT
    ) -> None:
        """Run the acceptor side of the handshake on ``sock`` (takes ownership);
        the peer's HELLO must arrive within ``hello_timeout`` seconds."""
        cred: PeerCred | None = None
        me = asyncio.current_task()
        loop = self.loop
        try:
            cred = PeerCred.of(sock)
            if cred.uid not in self.allowed_uids:
                self._refuse(sock, f"uid {cred.uid} is not allowed", cred)
                return
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                try:
                    async with asyncio.timeout(hello_timeout):
                        data = await _recv_handshake(loop, sock, HELLO_LEN)
                except TimeoutError:
                    raise HandshakeError(f"no handshake within {hello_timeout:g} s") from None
                if self._acceptor is not None:
                    self._acceptor.heard(sock)  # mid-handshake now: never evicted as silent
                hello = parse_hello(data)
                nonce = new_nonce()
                status = hello_status(hello, self.versions)
                version = self.versions.choose(hello.versions) or self.versions.high
                await loop.sock_sendall(sock, build_challenge(status, nonce, version, self.versions))
                check_status(hello, status, self.versions)
                auth = parse_auth(await _recv_handshake(loop, sock, AUTH_LEN))
                try:
                    cert = self.identity.check_auth(hello, nonce, auth, expect, version=version)
                except HandshakeError:
                    await loop.sock_sendall(sock, build_verdict(V_DENIED))
                    raise
                peer = cert.node
                verdict = self._verdict_for(peer, me)
                proof = self.identity.build_proof(verdict, hello, nonce, peer, version)
                await loop.sock_sendall(sock, build_verdict(verdict) + proof)
                if verdict != V_ACCEPT:
                    log.info(
                        "node %s: node %s (pid %d uid %d) refused: already joined, expired or duplicate",
                        self.id,
                        NodeId(peer),
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
                        NodeId(peer),
                        cred.pid,
                        cred.uid,
                    )
        except asyncio.CancelledError:
            sock.close()  # node closing, or the connection gave its slot away
            raise
        except (HandshakeError, OSError, TimeoutError) as exc:
            self._refuse(sock, _describe(exc), cred)
            if expect is not None and self._connecting.get(expect) is me:
                del self._connecting[expect]
                self._mark_dead(expect, f"handshake failed: {_describe(exc)}")
            return
        finally:
            if expect is not None and self._connecting.get(expect) is me:
                del self._connecting[expect]
        self._established(sock, cert, version)

    def expect_invited(self, node: bytes, ttl: float) -> None:
        """Node ``node`` was invited: if it has not joined within ``ttl``
        seconds, it never will (its ports fail, a late join is refused)."""
        self._invited[node] = self.loop.call_later(ttl, self._invite_expired, node)

    def is_invited(self, node: bytes) -> bool:
        """Node ``node`` was invited and has neither joined nor expired."""
        return node in self._invited

    def export_port(self, st: PortState, dest: bytes) -> bytes:
        """Send the end ``st`` (held by no handle any more) towards node
        ``dest`` outside any message: the packed descriptor an invitation
        carries, which ``dest`` turns back into the end (``import_port``)."""
        return encode_port_desc(self.engine.send_port(st, dest))

    def import_port(self, src: bytes, packed: bytes) -> PortState:
        """The end node ``src`` sent us outside any message (``export_port``
        there). Raises ``ProtocolError`` for a descriptor that is malformed
        or names a port we hold."""
        if len(packed) != PORT_DESC_SIZE:
            raise ProtocolError(f"a port descriptor of {len(packed)} bytes, not {PORT_DESC_SIZE}")
        return self.engine.materialize(src, decode_port_desc(packed))

    def _invite_expired(self, node: bytes) -> None:
        if self._invited.pop(node, None) is not None and node not in self._links:
            log.info("node %s: invitation for node %s expired unused", self.id, NodeId(node))
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
        self._connecting[peer] = self._tasks.spawn(self.accept_connection(sock, expect=peer))

    def connect_via(self, peer: bytes, sock: socket.socket) -> None:
        """Connect to ``peer`` over an already connected socket (inherited)."""
        self._connecting[peer] = self._tasks.spawn(self._connect(peer, sock))

    async def _connect(self, peer: bytes, sock: socket.socket | None = None) -> None:
        wait = RETRY_FIRST_WAIT
        early = 0
        try:
            while True:
                try:
                    verdict = await self.connect_to(peer, sock)
                except (ClosedEarly, ConnectionResetError, BrokenPipeError):
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
                        NodeId(peer),
                        HANDSHAKE_TIMEOUT,
                    )
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, RETRY_MAX_WAIT)
                    continue
                if verdict == V_DUPLICATE:
                    # the peer's own connection to us carries the traffic; give it time
                    self._tasks.spawn(self._await_inbound(peer))
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
            self._mark_dead(peer, f"cannot connect: {_describe(exc)}")
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
        loop = self.loop
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                if own:
                    await connect_unix(loop, sock, os.fspath(node_path(self.directory, peer)))
                hello = new_hello(self.versions)
                await loop.sock_sendall(sock, build_hello(hello))
                data = await _recv_handshake(loop, sock, CHALLENGE_LEN)
                challenge = parse_challenge(data, peer, self.versions)
                await loop.sock_sendall(sock, self.identity.build_auth(hello, challenge, peer))
                verdict = parse_verdict(await _recv_handshake(loop, sock, VERDICT_LEN), peer)
                proof = await _recv_handshake(loop, sock, PROOF_LEN)
                cert = self.identity.check_verdict(hello, challenge, peer, verdict, proof)
        except BaseException:
            sock.close()
            raise
        if verdict == V_ACCEPT and peer not in self._links:
            self._established(sock, cert, challenge.version)
            return V_ACCEPT
        # told "duplicate", or lost a race we could not see coming
        sock.close()
        return V_DUPLICATE

    async def _await_inbound(self, peer: bytes) -> None:
        """After a "duplicate" verdict: the peer's own connection should
        arrive; if it neither arrives nor fails in time, the peer is dead."""
        if peer in self._links or peer in self._dead:
            return
        settled = self._settled.setdefault(peer, asyncio.Event())
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await settled.wait()
        except TimeoutError:
            if self._settled.get(peer) is settled:
                del self._settled[peer]
            self._mark_dead(peer, "no connection after a simultaneous connect")
