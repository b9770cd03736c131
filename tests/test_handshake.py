"""Node identity and the handshake (``meshipc._handshake``): certificates,
credentials, the byte format and each step as pure functions, then a
``Node`` driving it over sockets against peers forged with the same
functions (any bytes, another mesh's credential, a replay). Impersonation
over real processes: ``test_identity.py``."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import pickle
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshipc
from meshipc import HandshakeError, Mesh, MeshError, Port
from meshipc import _handshake as hs
from meshipc._codec import CODEC
from meshipc._errors import VersionMismatch
from meshipc._handshake import (
    AUTH_LEN,
    CERT_LEN,
    CHALLENGE_LEN,
    CREDENTIAL_LEN,
    HELLO_LEN,
    MAGIC,
    MAX_VERIFIED_CERTS,
    NONCE_LEN,
    PROOF_LEN,
    ROLE_CLIENT,
    ROLE_ROOT,
    ROLE_WORKER,
    S_NO_COMMON_VERSION,
    S_OK,
    V_ACCEPT,
    V_DENIED,
    V_DUPLICATE,
    VERDICT_LEN,
    Authority,
    Challenge,
    Hello,
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
    parse_certificate,
    parse_challenge,
    parse_hello,
    parse_verdict,
)
from meshipc._node import Node
from meshipc._sockets import recv_exact
from meshipc._wire import PROTOCOL_MIN, PROTOCOL_VERSION
from relutil import wait_until

T = 10.0
MESH = Authority()
A, B = MESH.issue(ROLE_WORKER), MESH.issue(ROLE_WORKER)  # initiator, acceptor


# ---------------------------------------------------------------- format


def test_the_module_does_no_io() -> None:
    tree = ast.parse(Path(hs.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"socket", "asyncio", "selectors", "os"}, imported


def test_message_layouts_are_fixed() -> None:
    assert NONCE_LEN == 32 and CERT_LEN == 138
    # HELLO and CHALLENGE keep meshipc 0.1's sizes: each side reads the other's whole
    assert (HELLO_LEN, CHALLENGE_LEN, AUTH_LEN, VERDICT_LEN, PROOF_LEN) == (72, 88, 218, 1, 202)
    assert CREDENTIAL_LEN == 32 + CERT_LEN + 32
    # HELLO and CHALLENGE carry no id: nothing about either side shows before AUTH
    hello = build_hello(Hello(4, b"n" * 32, 2))
    assert hello == MAGIC + b"\x04\x00" + b"\x02\x00" + b"n" * 32 + bytes(32)
    challenge = build_challenge(S_NO_COMMON_VERSION, b"m" * 32, 5, Versions(5, 6))
    assert challenge == MAGIC + b"\x05\x00\x03\x00" + b"m" * 32 + b"\x05\x00\x06\x00" + bytes(44)
    assert [build_verdict(v) for v in (V_ACCEPT, V_DUPLICATE, V_DENIED)] == [b"\x01", b"\x02", b"\x03"]
    cert = A.cert_bytes
    assert cert[:2] == b"\x01\x02" and cert[2:18] == MESH.mesh and cert[18:34] == A.node
    assert len(A.to_bytes()) == CREDENTIAL_LEN


def test_every_message_parses_back() -> None:
    hello = new_hello()
    assert hello.version == PROTOCOL_VERSION and len(hello.nonce) == NONCE_LEN
    assert parse_hello(build_hello(hello)) == hello
    assert parse_challenge(build_challenge(S_OK, b"m" * 32), B.node) == Challenge(
        PROTOCOL_VERSION, S_OK, b"m" * 32
    )
    challenge = Challenge(PROTOCOL_VERSION, S_OK, new_nonce())
    auth = parse_auth(A.build_auth(hello, challenge, B.node))
    assert (auth.cert, auth.want) == (A.cert_bytes, B.node)
    assert parse_certificate(A.cert_bytes) == A.cert
    assert parse_verdict(build_verdict(V_ACCEPT), B.node) == V_ACCEPT
    assert parse_verdict(build_verdict(V_DUPLICATE), B.node) == V_DUPLICATE
    assert new_nonce() != new_nonce()


def test_a_hello_that_is_not_one_is_refused() -> None:
    with pytest.raises(HandshakeError, match="not a meshipc node"):
        parse_hello(b"GET / HTTP/1.1\r\n".ljust(HELLO_LEN, b"x"))
    with pytest.raises(HandshakeError, match=f"a HELLO is {HELLO_LEN} bytes, got 5"):
        parse_hello(MAGIC + b"\x01")


def test_the_acceptor_judges_the_version() -> None:
    assert hello_status(new_hello()) == S_OK
    newer = Hello(PROTOCOL_VERSION + 1, new_nonce())  # low 0: that version only, as 0.1 sent
    assert newer.versions == Versions(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 1)
    assert hello_status(newer) == S_NO_COMMON_VERSION
    check_status(newer, S_OK)
    with pytest.raises(VersionMismatch, match=rf"the connecting node speaks protocol {PROTOCOL_VERSION + 1}"):
        check_status(newer, S_NO_COMMON_VERSION)
    assert hello_status(Hello(PROTOCOL_VERSION + 1, new_nonce(), PROTOCOL_VERSION)) == S_OK


@pytest.mark.parametrize(
    "data",
    [
        build_challenge(S_OK, b"m" * 32)[:6] + b"\x01\x00" + build_challenge(S_OK, b"m" * 32)[8:],  # status 1
        b"XXXX" + build_challenge(S_OK, b"m" * 32)[4:],  # not a meshipc node
    ],
)
def test_a_refusing_or_foreign_challenge_is_refused(data: bytes) -> None:
    with pytest.raises(HandshakeError, match=r"refused the handshake \(status"):
        parse_challenge(data, B.node)


def test_a_denied_or_unknown_verdict_is_refused() -> None:
    for verdict in (V_DENIED, 0, 99):
        with pytest.raises(HandshakeError, match="refused our credential"):
            parse_verdict(build_verdict(verdict), B.node)


# ---------------------------------------------------------------- certificates and credentials


def test_a_certificate_is_checked_against_the_root_mesh_and_clock() -> None:
    assert B.verify_certificate(A.cert_bytes) == A.cert
    forged = bytearray(A.cert_bytes)
    forged[-1] ^= 1
    other = Authority().issue(ROLE_WORKER, A.node)  # same id, another mesh's root
    late = MESH.issue(ROLE_CLIENT, lifetime=-1)
    role = bytearray(A.cert_bytes)
    role[1] = 9
    version = bytearray(A.cert_bytes)
    version[0] = 2
    fresh = Identity.from_bytes(B.to_bytes())  # nothing verified yet
    for data, why in (
        (bytes(forged), r"not signed by this mesh's root \(forged\)"),
        (other.cert_bytes, "certificate of another mesh"),
        (late.cert_bytes, "expired"),
        (bytes(role), "unknown role 9"),
        (bytes(version), "unsupported certificate version 2"),
        (A.cert_bytes[:-1], f"a certificate is {CERT_LEN} bytes, got {CERT_LEN - 1}"),
    ):
        with pytest.raises(HandshakeError, match=why):
            fresh.verify_certificate(data)
    # a remembered certificate still expires
    with pytest.raises(HandshakeError, match="expired"):
        B.verify_certificate(A.cert_bytes, now=A.cert.expires + 1)


def test_node_certificates_last_the_mesh_s_life() -> None:
    years = (A.cert.expires - time.time()) / (365 * 24 * 3600)
    assert years > 9, years


def test_verified_certificates_are_remembered_within_a_bound() -> None:
    authority = Authority()
    me = Identity.from_bytes(authority.issue(ROLE_WORKER).to_bytes())
    for _ in range(MAX_VERIFIED_CERTS + 5):
        me.verify_certificate(authority.issue(ROLE_CLIENT).cert_bytes)
    assert len(me._verified) == MAX_VERIFIED_CERTS


def test_a_credential_travels_and_checks_its_parts() -> None:
    again = Identity.from_bytes(A.to_bytes())
    assert (again.node, again.role, again.cert, again.mesh) == (A.node, ROLE_WORKER, A.cert, MESH.mesh)
    seed, cert, root = A.to_bytes()[:32], A.cert_bytes, MESH.public
    with pytest.raises(HandshakeError, match="for another key"):
        Identity.from_bytes(B.to_bytes()[:32] + cert + root)
    with pytest.raises(HandshakeError, match="of another mesh"):
        Identity.from_bytes(seed + cert + Authority().public)
    with pytest.raises(HandshakeError, match=f"a credential is {CREDENTIAL_LEN} bytes"):
        Identity.from_bytes(A.to_bytes() + b"x")
    with pytest.raises(ValueError, match="unknown role"):
        MESH.issue(7)


def test_private_keys_never_show() -> None:
    for holder in (A, MESH):
        text = repr(holder) + str(holder)
        assert "redacted" in text
        for key in (A._key.private_bytes_raw(), MESH._key.private_bytes_raw()):
            assert key.hex() not in text and repr(key) not in text
        with pytest.raises(TypeError):
            pickle.dumps(holder)
    assert "role=worker" in repr(A)


# ---------------------------------------------------------------- signatures


def run_handshake(initiator: Identity, acceptor: Identity, want: bytes | None = None) -> tuple[int, bytes]:
    """Both sides in memory, through the bytes; the verdict and the
    certificate node id each side learned of the other (they must agree)."""
    want = acceptor.node if want is None else want
    hello = new_hello()
    got = parse_hello(build_hello(hello))
    nonce = new_nonce()
    challenge = parse_challenge(build_challenge(hello_status(got), nonce), want)
    auth = parse_auth(initiator.build_auth(hello, challenge, want))
    peer = acceptor.check_auth(got, nonce, auth)
    proof = acceptor.build_proof(V_ACCEPT, got, nonce, peer.node)
    verdict = parse_verdict(build_verdict(V_ACCEPT), want)
    seen = initiator.check_verdict(hello, challenge, want, verdict, proof)
    assert seen.node == acceptor.node
    return verdict, peer.node


def test_a_full_exchange_between_two_nodes_of_one_mesh_is_accepted() -> None:
    assert run_handshake(A, B) == (V_ACCEPT, A.node)
    assert run_handshake(B, A) == (V_ACCEPT, B.node)
    root = MESH.issue(ROLE_ROOT)
    assert run_handshake(Identity.from_bytes(A.to_bytes()), root) == (V_ACCEPT, A.node)


def test_each_side_refuses_a_node_of_another_mesh() -> None:
    stranger = Authority().issue(ROLE_WORKER)
    with pytest.raises(HandshakeError, match="certificate of another mesh"):
        run_handshake(stranger, B)
    with pytest.raises(HandshakeError, match="certificate of another mesh"):
        run_handshake(A, stranger)


def test_signatures_are_bound_to_direction_nonces_ids_and_verdict() -> None:
    hello, nonce = new_hello(), new_nonce()
    challenge = Challenge(PROTOCOL_VERSION, S_OK, nonce)
    auth = parse_auth(A.build_auth(hello, challenge, B.node))
    B.check_auth(hello, nonce, auth)
    # a replayed AUTH meets a fresh acceptor nonce
    with pytest.raises(HandshakeError, match="bad signature"):
        B.check_auth(hello, new_nonce(), auth)
    # nor does it pass at another node (relayed), or for another initiator's certificate
    with pytest.raises(HandshakeError, match="asked for another node"):
        MESH.issue(ROLE_WORKER).check_auth(hello, nonce, auth)
    c = MESH.issue(ROLE_WORKER)
    with pytest.raises(HandshakeError, match="bad signature"):
        B.check_auth(hello, nonce, auth._replace(cert=c.cert_bytes))
    # a child expected on a socket pair must be that child
    with pytest.raises(HandshakeError, match="not the node expected here"):
        B.check_auth(hello, nonce, auth, expect=c.node)
    # the acceptor's proof cannot stand for the initiator's (reflection) …
    proof = B.build_proof(V_ACCEPT, hello, nonce, A.node)
    with pytest.raises(HandshakeError):
        B.check_auth(hello, nonce, auth._replace(cert=B.cert_bytes, signature=proof[CERT_LEN:]))
    # … nor a "duplicate" proof for an "accept"
    dup = B.build_proof(V_DUPLICATE, hello, nonce, A.node)
    with pytest.raises(HandshakeError, match="did not prove its identity"):
        A.check_verdict(hello, challenge, B.node, V_ACCEPT, dup)
    A.check_verdict(hello, challenge, B.node, V_DUPLICATE, dup)
    # the node that answers must be the one we asked for
    with pytest.raises(HandshakeError, match="answered for node"):
        A.check_verdict(hello, challenge, c.node, V_ACCEPT, proof)


# ---------------------------------------------------------------- a node driving it


@contextlib.asynccontextmanager
async def acceptor(
    directory: Path, identity: Identity | None = None, expect: bytes | None = None, hello_timeout: float = 2.0
) -> AsyncIterator[tuple[Node, socket.socket, asyncio.Task[None]]]:
    """A node (not started: no socket file) accepting on one end of a
    socket pair; yields the node, the other end, and the accept task."""
    node = Node(directory, identity or MESH.issue(ROLE_WORKER), codec=CODEC)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    task = asyncio.create_task(node.accept_connection(ours, expect, hello_timeout=hello_timeout))
    try:
        yield node, theirs, task
    finally:
        theirs.close()
        task.cancel()
        await node.close(linger=0)


async def test_a_forged_peer_holding_a_credential_is_linked(runtime_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    async with acceptor(runtime_dir) as (node, s, task):
        hello = new_hello()
        await loop.sock_sendall(s, build_hello(hello))
        challenge = parse_challenge(await asyncio.wait_for(recv_exact(loop, s, CHALLENGE_LEN), T), node.id)
        await loop.sock_sendall(s, A.build_auth(hello, challenge, node.id))
        verdict = parse_verdict(await asyncio.wait_for(recv_exact(loop, s, VERDICT_LEN), T), node.id)
        assert verdict == V_ACCEPT
        proof = await asyncio.wait_for(recv_exact(loop, s, PROOF_LEN), T)
        assert A.check_verdict(hello, challenge, node.id, verdict, proof).node == node.id
        await asyncio.wait_for(task, T)
        assert list(node.links) == [A.node] and node.rejected == 0
        assert node.peer_certificate(A.node) == A.cert


Send = Callable[[Node], bytes]


def raw(data: bytes) -> Send:
    return lambda node: data


def hello_of(version: int = PROTOCOL_VERSION) -> Send:
    return lambda node: build_hello(Hello(version, new_nonce()))


async def refusal(
    directory: Path,
    send: Send,
    *,
    eof: bool = True,
    expect: bytes | None = None,
    auth: Callable[[Node, Hello, Challenge], bytes] | None = None,
) -> tuple[str, bytes]:
    """Why a node refuses a peer that sends ``send(node)`` and, given
    ``auth``, then ``auth(node, hello, challenge)``; and every byte the node
    wrote back to it."""
    loop = asyncio.get_running_loop()
    async with acceptor(directory, None, expect, hello_timeout=0.2) as (node, s, task):
        reasons: list[str] = []
        original = node._refuse

        def refuse(sock: socket.socket, why: str, cred: Any) -> None:
            reasons.append(why)
            original(sock, why, cred)

        node._refuse = refuse  # type: ignore[method-assign]
        data = send(node)
        await loop.sock_sendall(s, data)
        reply = b""
        if auth is not None:
            reply = await asyncio.wait_for(recv_exact(loop, s, CHALLENGE_LEN), T)
            await loop.sock_sendall(s, auth(node, parse_hello(data), parse_challenge(reply, node.id)))
        if eof:
            s.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(loop.sock_recv(s, 4096), T):
                reply += chunk
        await asyncio.wait_for(task, T)
        assert not node.links and node.rejected == 1
        (reason,) = reasons
        return reason, reply


async def test_each_refusal_says_what_was_wrong(runtime_dir: Path) -> None:
    async def why(send: Send, **kw: Any) -> str:
        return (await refusal(runtime_dir, send, **kw))[0]

    short = f"of {HELLO_LEN} handshake bytes"
    assert await why(raw(os.urandom(7))) == f"peer closed the connection after 7 {short}"
    assert await why(raw(MAGIC + b"\x01")) == f"peer closed the connection after 5 {short}"
    assert await why(raw(b"GET / HTTP/1.1\r\n" * 200)) == "not a meshipc node"
    assert await why(raw(b""), eof=False) == "no handshake within 0.2 s"
    v = PROTOCOL_VERSION
    assert await why(hello_of(v + 1)) == (
        f"the connecting node speaks protocol {v + 1}, this node {v}: "
        f"upgrade this node to a meshipc that speaks protocol {v + 1}"
    )

    def honest(node: Node, hello: Hello, challenge: Challenge) -> bytes:
        return A.build_auth(hello, challenge, node.id)

    def to_another(node: Node, hello: Hello, challenge: Challenge) -> bytes:
        return A.build_auth(hello, challenge, os.urandom(16))

    assert await why(hello_of(), auth=honest, expect=B.node) == f"node {A.node} is not the node expected here"
    assert await why(hello_of(), auth=to_another) == f"node {A.node} asked for another node"


async def test_a_refused_hello_still_gets_a_challenge_saying_why(runtime_dir: Path) -> None:
    _, reply = await refusal(runtime_dir, hello_of(PROTOCOL_VERSION + 1))
    assert len(reply) == CHALLENGE_LEN
    with pytest.raises(
        VersionMismatch, match=rf"speaks protocol {PROTOCOL_VERSION}, this node {PROTOCOL_VERSION + 1}"
    ) as err:
        parse_challenge(reply, B.node, Versions(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 1))
    assert err.value.theirs == (PROTOCOL_MIN, PROTOCOL_VERSION)


async def test_a_foreign_forged_or_replayed_auth_is_denied_with_one_byte(runtime_dir: Path) -> None:
    stranger = Authority().issue(ROLE_WORKER)

    def foreign(node: Node, hello: Hello, challenge: Challenge) -> bytes:
        return stranger.build_auth(hello, challenge, node.id)

    def replayed(node: Node, hello: Hello, challenge: Challenge) -> bytes:
        # a real credential, signed against an older acceptor nonce
        return A.build_auth(hello, challenge._replace(nonce=new_nonce()), node.id)

    def garbage(node: Node, hello: Hello, challenge: Challenge) -> bytes:
        return os.urandom(AUTH_LEN)

    for auth, reason in (
        (foreign, "certificate of another mesh"),
        (replayed, f"bad signature from node {A.node} (forged or replayed)"),
        (garbage, "unsupported certificate version"),
    ):
        got, reply = await refusal(runtime_dir, hello_of(), auth=auth)
        assert got.startswith(reason)
        # denied, and nothing about the node: one byte, then it hangs up
        assert reply[CHALLENGE_LEN:] == build_verdict(V_DENIED)


async def _feed_acceptor(directory: Path, data: bytes) -> tuple[int, bytes]:
    """Feed ``data`` to a node's acceptor over a socket pair, then hang up;
    returns the node's refusal count and what it wrote back."""
    loop = asyncio.get_running_loop()
    async with acceptor(directory) as (node, theirs, task):
        await loop.sock_sendall(theirs, data)
        theirs.shutdown(socket.SHUT_WR)
        got = b""
        with contextlib.suppress(ConnectionResetError):  # it hung up with our bytes unread
            while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 4096), 5):
                got += chunk
        await asyncio.wait_for(task, 5)  # it ends, and raises nothing
        assert not node.links, "a peer without a credential was admitted"
        return node.rejected, got


def hellos() -> st.SearchStrategy[bytes]:
    good = st.builds(
        lambda ver, nonce: build_hello(Hello(ver, nonce)),
        st.sampled_from([PROTOCOL_VERSION, 0, 2, 65535]),
        st.binary(min_size=32, max_size=32),
    )
    auth = st.one_of(
        st.binary(max_size=AUTH_LEN + 8),
        # a real certificate of the mesh, with a signature that cannot be right
        st.builds(lambda sig: A.cert_bytes + bytes(16) + sig, st.binary(min_size=64, max_size=64)),
    )
    return st.one_of(st.binary(max_size=200), st.tuples(good, auth).map(b"".join))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hellos())
def test_handshake_acceptor_any_bytes(data: bytes) -> None:
    """Any bytes from a peer: refused, never an exception, never admitted;
    at most a CHALLENGE (and a DENIED verdict) goes back."""
    d = Path(tempfile.mkdtemp(prefix="d", dir="/tmp"))
    try:
        rejected, reply = asyncio.run(_feed_acceptor(d, data))
    except MeshError as exc:  # pragma: no cover - would be a finding
        raise AssertionError(f"the acceptor raised {exc!r}") from exc
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert rejected == 1
    assert len(reply) in (0, CHALLENGE_LEN, CHALLENGE_LEN + VERDICT_LEN), len(reply)
    if len(reply) == CHALLENGE_LEN + VERDICT_LEN:
        assert reply[-1:] == build_verdict(V_DENIED)


async def test_a_node_of_another_mesh_is_rejected_before_any_event(runtime_dir: Path) -> None:
    """A whole node of another mesh: it is told "denied" and learns nothing
    of the node it connected to; that node counts a refusal."""
    a = Node(runtime_dir, MESH.issue(ROLE_WORKER), codec=CODEC)
    intruder = Node(runtime_dir, Authority().issue(ROLE_WORKER), codec=CODEC)
    a.start()
    intruder.start()
    try:
        with pytest.raises(HandshakeError, match="refused our credential"):
            await asyncio.wait_for(intruder.connect_to(a.id), T)
        await wait_until(lambda: a.rejected == 1, "the node to count the refusal")
        assert intruder.id not in a.links
        # and the other way round: the intruder refuses the mesh node
        with pytest.raises(HandshakeError):
            await asyncio.wait_for(a.connect_to(intruder.id), T)
        assert not a.links and not intruder.links
    finally:
        await a.close(linger=1.0)
        await intruder.close(linger=1.0)


async def test_a_forged_auth_at_a_mesh_is_denied_and_the_mesh_serves_on(runtime_dir: Path) -> None:
    """A peer that answers with random bytes gets a DENIED verdict and is
    counted as rejected; the node keeps serving."""
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        node = mesh._node
        loop = asyncio.get_running_loop()
        rejected = node.rejected
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            await loop.sock_connect(s, os.fspath(node.path))
            await loop.sock_sendall(s, build_hello(new_hello()))
            await asyncio.wait_for(recv_exact(loop, s, CHALLENGE_LEN), T)
            await loop.sock_sendall(s, os.urandom(AUTH_LEN))
            verdict = await asyncio.wait_for(recv_exact(loop, s, VERDICT_LEN), T)
            assert verdict == build_verdict(V_DENIED)
            assert await asyncio.wait_for(loop.sock_recv(s, 1), T) == b""
        await wait_until(lambda: node.rejected == rejected + 1, "the node to count the refusal")

        mine, theirs = Port.pair()
        async with meshipc.join(await mesh.inviter().invite(theirs)) as cc:
            cc.port.send("ok")
            assert await asyncio.wait_for(mine.recv(), T) == "ok"
