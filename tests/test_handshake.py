"""The node handshake (``meshipc._handshake``): its byte format and each step
as pure functions, then a ``Node`` driving it over sockets against peers
forged with the same functions (any bytes, a wrong secret, a replay)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import pickle
import shutil
import socket
import tempfile
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
from meshipc._handshake import (
    AUTH_LEN,
    CHALLENGE_LEN,
    HELLO_LEN,
    MAGIC,
    NONCE_LEN,
    PROOF_LEN,
    S_BAD_VERSION,
    S_OK,
    S_WRONG_NODE,
    SECRET_LEN,
    V_ACCEPT,
    V_DENIED,
    V_DUPLICATE,
    VERDICT_LEN,
    Challenge,
    Hello,
    MeshSecret,
    acceptor_proof,
    build_auth,
    build_challenge,
    build_hello,
    build_verdict,
    check_status,
    hello_status,
    initiator_proof,
    new_hello,
    new_nonce,
    parse_auth,
    parse_challenge,
    parse_hello,
    parse_verdict,
    verify_acceptor_proof,
    verify_initiator_proof,
)
from meshipc._node import Node
from meshipc._sockets import recv_exact
from meshipc._wire import PROTOCOL_VERSION
from relutil import wait_until

T = 10.0
A, B = b"A" * 16, b"B" * 16  # initiator, acceptor


# ---------------------------------------------------------------- format


def test_the_module_does_no_io() -> None:
    tree = ast.parse(Path(hs.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"socket", "asyncio", "selectors", "os"}, imported


def test_message_layouts_are_fixed() -> None:
    assert (SECRET_LEN, NONCE_LEN, PROOF_LEN) == (32, 32, 32)
    assert (HELLO_LEN, CHALLENGE_LEN, AUTH_LEN, VERDICT_LEN) == (72, 88, 32, 1)
    hello = build_hello(Hello(1, A, B, b"n" * 32))
    assert hello == MAGIC + b"\x01\x00" + b"\x00\x00" + A + B + b"n" * 32
    challenge = build_challenge(S_WRONG_NODE, B, b"m" * 32, b"p" * 32, version=1)
    assert challenge == MAGIC + b"\x01\x00" + b"\x01\x00" + B + b"m" * 32 + b"p" * 32
    assert build_auth(b"p" * 32) == b"p" * 32
    assert [build_verdict(v) for v in (V_ACCEPT, V_DUPLICATE, V_DENIED)] == [b"\x01", b"\x02", b"\x03"]


def test_every_message_parses_back() -> None:
    hello = new_hello(A, B)
    assert hello.version == PROTOCOL_VERSION and len(hello.nonce) == NONCE_LEN
    assert parse_hello(build_hello(hello)) == hello
    data = build_challenge(S_OK, B, b"m" * 32, b"p" * 32)
    assert parse_challenge(data, B) == Challenge(PROTOCOL_VERSION, S_OK, B, b"m" * 32, b"p" * 32)
    assert parse_auth(build_auth(b"p" * 32)) == b"p" * 32
    assert parse_verdict(build_verdict(V_ACCEPT), B) == V_ACCEPT
    assert parse_verdict(build_verdict(V_DUPLICATE), B) == V_DUPLICATE
    assert new_nonce() != new_nonce()


def test_a_hello_that_is_not_one_is_refused() -> None:
    with pytest.raises(HandshakeError, match="not a meshipc node"):
        parse_hello(b"GET / HTTP/1.1\r\n".ljust(HELLO_LEN, b"x"))
    with pytest.raises(HandshakeError, match=f"a HELLO is {HELLO_LEN} bytes, got 5"):
        parse_hello(MAGIC + b"\x01")


def test_the_acceptor_judges_version_and_wanted_node() -> None:
    assert hello_status(new_hello(A, B), B) == S_OK
    assert hello_status(new_hello(A, B), B, expect=A) == S_OK
    assert hello_status(new_hello(A, b"C" * 16), B) == S_WRONG_NODE
    assert hello_status(new_hello(A, B), B, expect=b"C" * 16) == S_WRONG_NODE
    old = Hello(PROTOCOL_VERSION + 1, A, B, new_nonce())
    assert hello_status(old, B) == S_BAD_VERSION
    check_status(old, S_OK)
    with pytest.raises(HandshakeError, match=rf"handshake status 2 \(version {PROTOCOL_VERSION + 1}\)"):
        check_status(old, S_BAD_VERSION)


@pytest.mark.parametrize(
    "data",
    [
        build_challenge(S_WRONG_NODE, B, b"m" * 32, b"p" * 32),  # refused
        build_challenge(S_OK, b"C" * 16, b"m" * 32, b"p" * 32),  # another node answered
        b"XXXX" + build_challenge(S_OK, B, b"m" * 32, b"p" * 32)[4:],  # not a meshipc node
    ],
)
def test_a_refusing_or_foreign_challenge_is_refused(data: bytes) -> None:
    with pytest.raises(HandshakeError, match=r"refused the handshake \(status"):
        parse_challenge(data, B)


def test_a_denied_or_unknown_verdict_is_refused() -> None:
    for verdict in (V_DENIED, 0, 99):
        with pytest.raises(HandshakeError, match="rejected the mesh secret"):
            parse_verdict(build_verdict(verdict), B)


# ---------------------------------------------------------------- proofs


def run_handshake(initiator_secret: MeshSecret, acceptor_secret: MeshSecret) -> int:
    """Both sides in memory, through the bytes; returns the verdict."""
    hello = new_hello(A, B)
    got = parse_hello(build_hello(hello))
    status = hello_status(got, B)
    nonce = new_nonce()
    challenge_bytes = build_challenge(status, B, nonce, acceptor_proof(acceptor_secret, got, B, nonce))
    check_status(got, status)
    challenge = parse_challenge(challenge_bytes, B)
    verify_acceptor_proof(initiator_secret, hello, challenge)
    auth = build_auth(initiator_proof(initiator_secret, hello, B, challenge.nonce))
    verify_initiator_proof(acceptor_secret, got, B, nonce, parse_auth(auth))
    return parse_verdict(build_verdict(V_ACCEPT), B)


def test_a_full_exchange_under_one_secret_is_accepted() -> None:
    secret = MeshSecret()
    assert run_handshake(secret, MeshSecret(secret.reveal())) == V_ACCEPT


def test_each_side_refuses_a_peer_without_the_secret() -> None:
    # the initiator checks the acceptor's proof first: a planted socket learns nothing
    with pytest.raises(HandshakeError, match="did not prove it holds the mesh secret"):
        run_handshake(MeshSecret(), MeshSecret())
    # an initiator that ignores the acceptor's proof is caught at its AUTH
    secret = MeshSecret()
    hello = new_hello(A, B)
    nonce = new_nonce()
    forged = initiator_proof(MeshSecret(), hello, B, nonce)
    with pytest.raises(HandshakeError, match="wrong mesh secret"):
        verify_initiator_proof(secret, hello, B, nonce, forged)


def test_proofs_are_bound_to_direction_nonces_and_ids() -> None:
    secret = MeshSecret()
    hello = new_hello(A, B)
    nonce = new_nonce()
    proof = initiator_proof(secret, hello, B, nonce)
    assert len(proof) == PROOF_LEN
    # the acceptor's own proof cannot stand for the initiator's (reflection)
    assert acceptor_proof(secret, hello, B, nonce) != proof
    # a replayed AUTH meets a fresh acceptor nonce
    with pytest.raises(HandshakeError):
        verify_initiator_proof(secret, hello, B, new_nonce(), proof)
    # nor does it pass for another initiator or another acceptor
    with pytest.raises(HandshakeError):
        verify_initiator_proof(secret, hello._replace(node=b"C" * 16), B, nonce, proof)
    with pytest.raises(HandshakeError):
        verify_initiator_proof(secret, hello, b"C" * 16, nonce, proof)
    verify_initiator_proof(secret, hello, B, nonce, proof)


def test_the_secret_never_shows() -> None:
    secret = MeshSecret()
    assert len(secret.reveal()) == SECRET_LEN
    assert repr(secret) == str(secret) == "MeshSecret(<redacted>)"
    assert secret == MeshSecret(secret.reveal()) and hash(secret) == hash(MeshSecret(secret.reveal()))
    assert secret != MeshSecret()
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(ValueError, match="32 bytes"):
        MeshSecret(b"short")


# ---------------------------------------------------------------- a node driving it


@contextlib.asynccontextmanager
async def acceptor(
    directory: Path, secret: MeshSecret, expect: bytes | None = None, hello_timeout: float = 2.0
) -> AsyncIterator[tuple[Node, socket.socket, asyncio.Task[None]]]:
    """A node (not started: no socket file) accepting on one end of a
    socket pair; yields the node, the other end, and the accept task."""
    node = Node(directory, secret, codec=CODEC)
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


async def test_a_forged_peer_holding_the_secret_is_linked(runtime_dir: Path) -> None:
    secret = MeshSecret()
    loop = asyncio.get_running_loop()
    async with acceptor(runtime_dir, secret) as (node, s, task):
        hello = new_hello(A, node.id)
        await loop.sock_sendall(s, build_hello(hello))
        challenge = parse_challenge(await asyncio.wait_for(recv_exact(loop, s, CHALLENGE_LEN), T), node.id)
        verify_acceptor_proof(secret, hello, challenge)
        await loop.sock_sendall(s, build_auth(initiator_proof(secret, hello, node.id, challenge.nonce)))
        verdict = await asyncio.wait_for(recv_exact(loop, s, VERDICT_LEN), T)
        assert parse_verdict(verdict, node.id) == V_ACCEPT
        await asyncio.wait_for(task, T)
        assert list(node.links) == [A] and node.rejected == 0


Send = Callable[[Node], bytes]


def raw(data: bytes) -> Send:
    return lambda node: data


def hello_to(version: int = PROTOCOL_VERSION, want: bytes | None = None) -> Send:
    """A HELLO from a random node to this node (or to ``want``)."""
    return lambda node: build_hello(Hello(version, os.urandom(16), want or node.id, new_nonce()))


async def refusal(
    directory: Path,
    send: Send,
    *,
    eof: bool = True,
    expect: bytes | None = None,
    auth: Callable[[Hello, Challenge], bytes] | None = None,
    secret: MeshSecret | None = None,
) -> tuple[str, bytes]:
    """Why a node refuses a peer that sends ``send(node)`` and, given
    ``auth``, then ``auth(hello, challenge)``; and every byte the node wrote
    back to it."""
    loop = asyncio.get_running_loop()
    secret = secret or MeshSecret()
    async with acceptor(directory, secret, expect, hello_timeout=0.2) as (node, s, task):
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
            await loop.sock_sendall(s, auth(parse_hello(data), parse_challenge(reply, node.id)))
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
    assert await why(hello_to(want=os.urandom(16))) == f"handshake status {S_WRONG_NODE} (version {v})"
    assert await why(hello_to(), expect=os.urandom(16)) == f"handshake status {S_WRONG_NODE} (version {v})"
    assert await why(hello_to(v + 1)) == f"handshake status {S_BAD_VERSION} (version {v + 1})"


async def test_a_refused_hello_still_gets_a_challenge_saying_why(runtime_dir: Path) -> None:
    _, reply = await refusal(runtime_dir, hello_to(PROTOCOL_VERSION + 1))
    assert len(reply) == CHALLENGE_LEN
    with pytest.raises(HandshakeError, match=rf"refused the handshake \(status {S_BAD_VERSION}\)"):
        parse_challenge(reply, reply[8:24])


async def test_a_wrong_or_replayed_auth_is_denied(runtime_dir: Path) -> None:
    secret, another_mesh = MeshSecret(), MeshSecret()

    def wrong(hello: Hello, challenge: Challenge) -> bytes:
        return build_auth(initiator_proof(another_mesh, hello, challenge.node, challenge.nonce))

    def replayed(hello: Hello, challenge: Challenge) -> bytes:
        # the right secret, proved against an older acceptor nonce
        return build_auth(initiator_proof(secret, hello, challenge.node, new_nonce()))

    def garbage(hello: Hello, challenge: Challenge) -> bytes:
        return os.urandom(AUTH_LEN)

    for auth in (wrong, replayed, garbage):
        reason, reply = await refusal(runtime_dir, hello_to(), auth=auth, secret=secret)
        assert reason == "wrong mesh secret"
        assert reply[CHALLENGE_LEN:] == build_verdict(V_DENIED)


async def _feed_acceptor(directory: Path, data: bytes) -> tuple[int, bytes]:
    """Feed ``data`` to a node's acceptor over a socket pair, then hang up;
    returns the node's refusal count and what it wrote back."""
    loop = asyncio.get_running_loop()
    async with acceptor(directory, MeshSecret()) as (node, theirs, task):
        await loop.sock_sendall(theirs, data)
        theirs.shutdown(socket.SHUT_WR)
        got = b""
        with contextlib.suppress(ConnectionResetError):  # it hung up with our bytes unread
            while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 4096), 5):
                got += chunk
        await asyncio.wait_for(task, 5)  # it ends, and raises nothing
        assert not node.links, "a peer without the secret was admitted"
        return node.rejected, got


def hellos() -> st.SearchStrategy[bytes]:
    good = st.builds(
        lambda ver, peer, want, nonce: build_hello(Hello(ver, peer, want, nonce)),
        st.sampled_from([PROTOCOL_VERSION, 0, 2, 65535]),
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=32, max_size=32),
    )
    return st.one_of(st.binary(max_size=200), st.tuples(good, st.binary(max_size=64)).map(b"".join))


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


async def test_wrong_secret_is_rejected_before_any_event(runtime_dir: Path) -> None:
    """A whole node with another secret: it finds out the node it connects
    to does not share its secret; that node counts a refusal."""
    a = Node(runtime_dir, MeshSecret(), codec=CODEC)
    intruder = Node(runtime_dir, MeshSecret(), codec=CODEC)
    a.start()
    intruder.start()
    try:
        with pytest.raises(HandshakeError):
            await asyncio.wait_for(intruder.connect_to(a.id), T)
        # the acceptor's handshake task ends when the intruder hangs up
        await asyncio.wait(a._tasks.running(), timeout=T)
        assert a.rejected == 1
        assert intruder.id not in a.links
    finally:
        await a.close(linger=1.0)
        await intruder.close(linger=1.0)


async def test_wrong_secret_in_raw_handshake_is_denied(runtime_dir: Path) -> None:
    """A peer that ignores the node's proof and answers with a wrong MAC gets
    a DENIED verdict and is counted as rejected; the node keeps serving."""
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        node = mesh._node
        loop = asyncio.get_running_loop()
        rejected = node.rejected
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            await loop.sock_connect(s, os.fspath(node.path))
            await loop.sock_sendall(s, build_hello(new_hello(os.urandom(16), node.id)))
            await asyncio.wait_for(recv_exact(loop, s, CHALLENGE_LEN), T)
            await loop.sock_sendall(s, build_auth(os.urandom(PROOF_LEN)))
            verdict = await asyncio.wait_for(recv_exact(loop, s, VERDICT_LEN), T)
            assert verdict == build_verdict(V_DENIED)
            assert await asyncio.wait_for(loop.sock_recv(s, 1), T) == b""
        await wait_until(lambda: node.rejected == rejected + 1, "the node to count the refusal")

        mine, theirs = Port.pair()
        async with meshipc.join(await mesh.inviter().invite(theirs)) as cc:
            cc.port.send("ok")
            assert await asyncio.wait_for(mine.recv(), T) == "ok"
