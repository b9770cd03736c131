"""Property tests (hypothesis, bounded for CI) for what reads peer bytes
outside the frame decoder (which ``test_wire.py`` covers): the invitation
decoder and the acceptor side of the node handshake. Any input gives a
result or a meshipc exception, never another exception, and a handshake
never admits a peer that does not hold the secret."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshipc import InvitationDecodeError, MeshError
from meshipc._invitation import _INVITATION_VERSION, MAX_INVITATION, Invitation, _Wire
from meshipc._node import _CHALLENGE, _HELLO, _MAGIC, V_DENIED, MeshSecret, Node
from meshipc._wire import _DESC, PROTOCOL_VERSION
from relutil import private_dir, within

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_invitation() -> bytes:
    return msgspec.msgpack.encode(
        _Wire(
            _INVITATION_VERSION,
            "/tmp/some-mesh",
            os.urandom(16),
            os.urandom(16),
            os.urandom(_DESC.size),
            os.urandom(32),
            time.time() + 60,
        )
    )


def decode(data: bytes) -> Invitation | None:
    try:
        return Invitation.from_bytes(data)
    except InvitationDecodeError:
        return None


@BOUNDED
@given(data=st.binary(max_size=1024))
def test_invitation_decoder_any_bytes(data: bytes) -> None:
    inv = decode(data)
    if inv is not None:
        assert bytes(inv) == msgspec.msgpack.encode(msgspec.msgpack.decode(data, type=_Wire))


@BOUNDED
@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=8),
    cut=st.integers(0, 10_000),
    tail=st.binary(max_size=16),
)
def test_invitation_decoder_mutated(flips: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    data = bytearray(valid_invitation())
    for pos, x in flips:
        data[pos % len(data)] ^= x
    data = data[: cut % (len(data) + 1)] + tail
    inv = decode(bytes(data))
    if inv is not None:  # whatever got through is well-formed
        assert inv.directory.startswith("/") and len(bytes(inv.node)) == 16
        assert inv.expires == inv.expires and abs(inv.expires) != float("inf")


@BOUNDED
@given(
    fields=st.lists(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(),
            st.text(max_size=40),
            st.binary(max_size=80),
            st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3),
        ),
        max_size=9,
    )
)
def test_invitation_decoder_wrong_shapes(fields: list[object]) -> None:
    decode(msgspec.msgpack.encode(fields))


def test_invitation_decoder_size_cap() -> None:
    try:
        Invitation.from_bytes(b"\x00" * (MAX_INVITATION + 1))
    except InvitationDecodeError as exc:
        assert str(MAX_INVITATION) in str(exc)
    else:
        raise AssertionError("an oversized invitation was decoded")


# ---------------------------------------------------------------- handshake


async def _feed_acceptor(directory: Path, data: bytes) -> tuple[int, bytes]:
    """Feed ``data`` to a node's acceptor over a socket pair, then hang up;
    returns the node's refusal count and what it wrote back."""
    node = Node(directory, MeshSecret())  # not started: no socket file needed
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(node.accept_connection(ours, hello_timeout=2.0))
    try:
        await loop.sock_sendall(theirs, data)
        theirs.shutdown(socket.SHUT_WR)
        got = b""
        with contextlib.suppress(ConnectionResetError):  # it hung up with our bytes unread
            while chunk := await within(loop.sock_recv(theirs, 4096), 5):
                got += chunk
        await within(task, 5)  # it ends, and raises nothing
        assert not node._conns, "a peer without the secret was admitted"
        return node.rejected, got
    finally:
        theirs.close()
        task.cancel()
        await node.close(linger=0)


def hellos() -> st.SearchStrategy[bytes]:
    good = st.builds(
        lambda ver, flags, peer, want, nonce: _HELLO.pack(_MAGIC, ver, flags, peer, want, nonce),
        st.sampled_from([PROTOCOL_VERSION, 0, 2, 65535]),
        st.integers(0, 65535),
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=32, max_size=32),
    )
    return st.one_of(st.binary(max_size=200), st.tuples(good, st.binary(max_size=64)).map(b"".join))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hellos())
def test_handshake_acceptor_any_bytes(data: bytes) -> None:
    with private_dir("d") as d:
        try:
            rejected, reply = asyncio.run(_feed_acceptor(d, data))
        except MeshError as exc:  # pragma: no cover - would be a finding
            raise AssertionError(f"the acceptor raised {exc!r}") from exc
    assert rejected == 1
    # at most a CHALLENGE (and a DENIED verdict) went back; never an acceptance
    assert len(reply) in (0, _CHALLENGE.size, _CHALLENGE.size + 1), len(reply)
    if len(reply) == _CHALLENGE.size + 1:
        assert reply[-1] == V_DENIED
