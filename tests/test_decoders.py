"""Property tests (hypothesis, bounded for CI) for what reads peer bytes
outside the frame decoder (which ``test_wire.py`` covers) and the
invitation decoder (``test_invitation.py``): the acceptor side of the node
handshake. Any input gives a result or a meshipc exception, never another
exception, and a handshake never admits a peer that does not hold the
secret."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshipc import MeshError
from meshipc._node import _CHALLENGE, _HELLO, _MAGIC, V_DENIED, MeshSecret, Node
from meshipc._wire import PROTOCOL_VERSION

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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
            while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 4096), 5):
                got += chunk
        await asyncio.wait_for(task, 5)  # it ends, and raises nothing
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
    d = Path(tempfile.mkdtemp(prefix="d", dir="/tmp"))
    try:
        rejected, reply = asyncio.run(_feed_acceptor(d, data))
    except MeshError as exc:  # pragma: no cover - would be a finding
        raise AssertionError(f"the acceptor raised {exc!r}") from exc
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert rejected == 1
    # at most a CHALLENGE (and a DENIED verdict) went back; never an acceptance
    assert len(reply) in (0, _CHALLENGE.size, _CHALLENGE.size + 1), len(reply)
    if len(reply) == _CHALLENGE.size + 1:
        assert reply[-1] == V_DENIED
