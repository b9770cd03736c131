"""Node identity over real sockets and processes: an impersonator that knows
everything an attached client knows (its own key and certificate, the
root's public key, other nodes' ids and certificates) cannot link to a
worker as another node, cannot accept links as another node, learns
nothing about a node before it proved itself, and cannot replay a
handshake; only the mesh's root admits nodes. (Certificates, signatures
and the handshake's steps without sockets: ``test_handshake.py``.)"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

import meshipc
from attachutil import initiate
from meshipc import HandshakeError, Mesh, MeshError
from meshipc._handshake import (
    AUTH_LEN,
    CERT_LEN,
    HELLO_LEN,
    PROOF_LEN,
    ROLE_CLIENT,
    ROLE_ROOT,
    ROLE_WORKER,
    V_ACCEPT,
    V_DENIED,
    Authority,
    Certificate,
    Challenge,
    Hello,
    Identity,
    _initiator_message,
    build_challenge,
    build_verdict,
    hello_status,
    new_nonce,
    parse_auth,
    parse_certificate,
    parse_hello,
)
from meshipc._join import read_invitation
from meshipc._mesh import NOT_ROOT
from meshipc._names import node_path
from meshipc._sockets import recv_exact
from relutil import wait_until, within

ACCEPTED_LEN = 1 + PROOF_LEN


async def client_identity(listener: meshipc.Listener) -> Identity:
    """What an attached client holds: the credential of a real invitation."""
    inv = await within(read_invitation(listener.path))
    return inv.identity


async def spawn_linked(mesh: Mesh, target: str, arg: Any) -> bytes:
    """Spawn a worker; its node id (it links to us as it starts)."""
    before = {link.peer for link in mesh.stats().node.links}
    await mesh.spawn(target, arg)
    (new,) = {link.peer for link in mesh.stats().node.links} - before
    return bytes.fromhex(new)


async def learn_certificate(directory: Path, me: Identity, node: bytes) -> bytes:
    """``node``'s certificate, as any admitted peer learns it: by linking to it."""
    got = await initiate(node_path(directory, node), me, node, reply_len=ACCEPTED_LEN)
    got.sock.close()
    assert got.verdict == V_ACCEPT
    return got.reply[1 : 1 + CERT_LEN]


def self_signed(me: Identity, node: bytes) -> bytes:
    """A certificate for ``node`` with ``me``'s key, signed by ``me`` (no authority)."""
    cert = me.cert._replace(node=node, signature=b"")
    return bytes(cert._replace(signature=me._key.sign(b"meshipc-cert-v1" + cert.body())))


def claim(me: Identity, cert: bytes, target: bytes) -> Any:
    """An AUTH maker: ``cert`` presented to node ``target``, with the very
    message the acceptor checks signed by ``me``'s key (the best a holder of
    that key can do)."""

    def auth(hello: Hello, challenge: Challenge) -> bytes:
        claimed = parse_certificate(cert).node
        message = _initiator_message(hello, challenge.nonce, challenge.version, claimed, target)
        return cert + target + me._key.sign(message)

    return auth


def forged_certificates(me: Identity, victim: bytes, victim_cert: bytes) -> dict[str, bytes]:
    """Each certificate ``me`` can present as ``victim``."""
    return {
        "the victim's own certificate": victim_cert,
        "a certificate we signed ourselves": self_signed(me, victim),
        "a certificate from a root we made": bytes(Authority().issue(ROLE_WORKER, victim).cert),
    }


async def test_an_attached_client_cannot_link_as_another_node(runtime_dir: Path) -> None:
    """The issue's attack: a client claims a worker's id at a newly appearing
    worker before the real one links. Every form is denied with one byte,
    and the real worker's own link is then taken, its calls answered by the
    real callee."""
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        me = await client_identity(listener)
        tx1, rx1 = meshipc.channel()
        w1 = await spawn_linked(mesh, "workers:echo", rx1)
        tx2, rx2 = meshipc.channel()
        to_tx, to_rx = meshipc.channel()
        w2 = await spawn_linked(mesh, "workers:relay_later", {"rx": rx2, "to": to_rx})
        root = bytes(mesh.node_id)
        for victim in (w2, root):
            victim_cert = await learn_certificate(mesh.directory, me, victim)
            assert parse_certificate(victim_cert).node == victim
            for what, cert in forged_certificates(me, victim, victim_cert).items():
                auth = claim(me, cert, w1)
                got = await initiate(node_path(mesh.directory, w1), me, w1, auth, reply_len=ACCEPTED_LEN)
                got.sock.close()
                assert got.reply == build_verdict(V_DENIED), (victim == root, what)
        # the real w2 now links to w1: accepted, and the call reaches the real w1
        to_tx.send(tx1.clone())
        pid, answer = await within(tx2.call("through w2"))
        assert answer == "through w2" and pid != os.getpid()
        assert await within(tx1.call("direct")) == "direct"
        # the root knows who its peers are, from their certificates
        roles = {mesh._node.peer_certificate(w).role for w in (w1, w2)}  # type: ignore[union-attr]
        assert roles == {ROLE_WORKER}


async def test_a_planted_socket_cannot_accept_links_as_another_node(runtime_dir: Path) -> None:
    """An impersonator puts its own socket where a worker's was and answers
    the root's connection with every identity it can muster: the root
    refuses each; the HELLO it saw named nobody."""
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        me = await client_identity(listener)
        tx, rx = meshipc.channel()
        w = await spawn_linked(mesh, "workers:echo", rx)
        victim_cert = await learn_certificate(mesh.directory, me, w)
        path = node_path(mesh.directory, w)
        os.rename(path, mesh.directory / "moved")  # a same-uid process can
        planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        planted.bind(os.fspath(path))
        planted.listen()
        planted.setblocking(False)
        loop = asyncio.get_running_loop()
        answers = {
            "our own certificate": me.cert_bytes,
            "the victim's certificate": victim_cert,
            "a certificate we signed ourselves": self_signed(me, w),
        }
        errors = {}
        try:
            for what, cert in answers.items():
                attempt = asyncio.ensure_future(mesh._node.connect_to(w))
                conn, _ = await within(loop.sock_accept(planted))
                with conn:
                    hello_bytes = await within(recv_exact(loop, conn, HELLO_LEN))
                    root = bytes(mesh.node_id)
                    for shown in (root, root.hex()[:12].encode(), w):
                        assert shown not in hello_bytes
                    hello = parse_hello(hello_bytes)
                    nonce = new_nonce()
                    await loop.sock_sendall(conn, build_challenge(hello_status(hello), nonce))
                    auth = await within(recv_exact(loop, conn, AUTH_LEN))
                    initiator = parse_certificate(parse_auth(auth).cert).node
                    honest = me.build_proof(V_ACCEPT, hello, nonce, initiator)
                    await loop.sock_sendall(conn, build_verdict(V_ACCEPT) + cert + honest[CERT_LEN:])
                    with pytest.raises(HandshakeError) as ei:
                        await within(attempt)
                    errors[what] = str(ei.value)
        finally:
            planted.close()
        assert "answered for node" in errors["our own certificate"]
        assert "did not prove its identity" in errors["the victim's certificate"]
        assert "forged" in errors["a certificate we signed ourselves"]
        assert await within(tx.call("still linked")) == "still linked"


async def test_nothing_about_a_node_shows_before_its_peer_proves_itself(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        w = await spawn_linked(mesh, "workers:echo", rx)
        stranger = Authority().issue(ROLE_CLIENT)  # a same-uid process with no credential of ours
        for node in (w, bytes(mesh.node_id)):
            got = await initiate(node_path(mesh.directory, node), stranger, node, reply_len=ACCEPTED_LEN)
            got.sock.close()
            for shown in (got.challenge, got.reply):
                assert node not in shown and node.hex()[:12].encode() not in shown
            assert got.reply == build_verdict(V_DENIED)  # and then it hung up
        assert await within(tx.call(1)) == 1


async def test_a_replayed_handshake_is_refused(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        me = await client_identity(listener)
        tx, rx = meshipc.channel()
        w = await spawn_linked(mesh, "workers:echo", rx)
        path = node_path(mesh.directory, w)
        first = await initiate(path, me, w, reply_len=ACCEPTED_LEN)
        first.sock.close()
        assert first.verdict == V_ACCEPT

        def replay(hello: Any, challenge: Any) -> bytes:
            return first.sent[HELLO_LEN:]  # the recorded AUTH, against a fresh nonce

        again = await initiate(path, me, w, replay, reply_len=ACCEPTED_LEN)
        again.sock.close()
        assert again.reply == build_verdict(V_DENIED)
        assert await within(tx.call(2)) == 2


async def test_an_expired_certificate_is_refused(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        assert mesh._authority is not None
        late = mesh._authority.issue(ROLE_CLIENT, lifetime=-1)
        node = mesh._node
        got = await initiate(node.path, late, node.id, reply_len=ACCEPTED_LEN)
        got.sock.close()
        assert got.reply == build_verdict(V_DENIED)
        await wait_until(lambda: node.rejected == 1, "the refusal")
        fresh = mesh._authority.issue(ROLE_CLIENT)
        ok = await initiate(node.path, fresh, node.id, reply_len=ACCEPTED_LEN)
        ok.sock.close()
        assert ok.verdict == V_ACCEPT


async def test_only_the_root_admits_nodes(runtime_dir: Path) -> None:
    """A worker or an attached client has no key that issues identities:
    listen and inviter say so, and so does spawn on a client; a worker's
    spawn gets its child's credential from the root (a fresh id of the
    root's choosing, role worker); the root's own roles are right."""
    async with Mesh(name="adm", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        report_tx, report_rx = meshipc.channel()
        await mesh.spawn("workers:try_to_admit", report_tx)
        errors = await within(report_rx.recv())
        assert errors == [None] + [f"MeshError: {NOT_ROOT}"] * 2
        async with meshipc.connect("adm", runtime_dir=runtime_dir) as conn:
            with pytest.raises(MeshError, match="only the mesh's first node"):
                await conn.mesh.spawn("workers:noop")
            # nor can it ask the root for a worker's credential itself
            with pytest.raises(MeshError, match="only a worker may ask"):
                await conn.mesh._control.mint()
            with pytest.raises(MeshError, match="only the mesh's first node"):
                await conn.mesh.listen()
            with pytest.raises(MeshError, match="only the mesh's first node"):
                conn.mesh.inviter()
            cert = mesh._node.peer_certificate(bytes(conn.mesh.node_id))
            assert cert is not None and cert.role == ROLE_CLIENT
            mine = conn.mesh._node.peer_certificate(bytes(mesh.node_id))
            assert mine is not None and mine.role == ROLE_ROOT
        assert mesh._node.identity.role == ROLE_ROOT
        assert isinstance(mesh._node.identity.cert, Certificate)
