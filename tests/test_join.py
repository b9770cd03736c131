"""The client side of attaching (``_join``): what ``connect``/``join`` say
when the listener or the inviting node misbehaves, and their time bounds.
Peers are fakes: plain asyncio Unix servers and raw sockets. Socket paths
live in a short private folder under ``/tmp`` (the ``runtime_dir`` fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import pickle
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import meshipc
from attachutil import FIELD, assert_no_secret, foreign_credential, key_material, reencode
from meshipc import (
    AuthenticationError,
    ConnectError,
    InvitationDecodeError,
    InvitationExpired,
    InvitationReadError,
    InvitationTooLarge,
    JoinError,
    JoinTimeout,
    Mesh,
    MeshError,
    Port,
)
from meshipc._codec import CODEC
from meshipc._handshake import CREDENTIAL_LEN, ROLE_ROOT, Authority
from meshipc._invitation import _INVITATION_VERSION, Inviter
from meshipc._join import JOIN_TIMEOUT, attach
from meshipc._node import Node
from meshipc._wire import PORT_DESC_SIZE, PROTOCOL_VERSION

#: Bound on any single step.
T = 10.0
#: TTL for invitations that a test leaves unused on purpose.
SHORT_TTL = 1.0
_LEN = struct.Struct("<I")


# ----------------------------------------------- join errors, from fake peers


@contextlib.asynccontextmanager
async def fake_listener(
    path: Path, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> AsyncIterator[None]:
    server = await asyncio.start_unix_server(handler, path=os.fspath(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def sends(data: bytes, *, then_close: bool) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(data)
            await writer.drain()
            if not then_close:
                await reader.read()  # until the client hangs up
        except OSError:
            pass
        finally:
            writer.close()

    return handler


async def expect_join_error(path: Path, cls: type[JoinError], **kw: Any) -> JoinError:
    with pytest.raises(cls) as ei:
        async with meshipc.connect(path, **kw):
            pass
    exc = ei.value
    assert isinstance(exc, JoinError)
    assert isinstance(exc, MeshError)
    assert os.fspath(path) in str(exc), f"{type(exc).__name__} does not name the path: {exc}"
    return exc


async def test_invitation_too_large(runtime_dir: Path) -> None:
    path = runtime_dir / "big.sock"
    async with fake_listener(path, sends(_LEN.pack(1 << 20), then_close=False)):
        exc = await asyncio.wait_for(expect_join_error(path, InvitationTooLarge), T)
    assert isinstance(exc, InvitationTooLarge)
    assert exc.length == 1 << 20
    assert exc.limit < exc.length
    assert exc.path == os.fspath(path)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01\x00", _LEN.pack(300) + b"x" * 10],
    ids=["nothing", "two-bytes", "short-body"],
)
async def test_invitation_read_error(runtime_dir: Path, data: bytes) -> None:
    path = runtime_dir / "short.sock"
    async with fake_listener(path, sends(data, then_close=True)):
        exc = await asyncio.wait_for(expect_join_error(path, InvitationReadError), T)
    assert isinstance(exc, InvitationReadError)
    assert not isinstance(exc, ConnectError)
    assert exc.path == os.fspath(path)


def _valid_fields() -> list[Any]:
    node = os.urandom(16)
    credential = foreign_credential(node)
    fields = [_INVITATION_VERSION, "/tmp/x", os.urandom(16), node, bytes(PORT_DESC_SIZE), credential, 0.0]
    return [*fields, PROTOCOL_VERSION, PROTOCOL_VERSION]


def _wire(**changes: Any) -> bytes:
    fields = _valid_fields()
    for name, value in changes.items():
        fields[FIELD[name]] = value
    return msgspec.msgpack.encode(fields)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1" * 16,
        b"",
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode({"version": 1}),
        _wire(version=1),
        _wire(credential=os.urandom(31)),
        _wire(credential=os.urandom(CREDENTIAL_LEN)),
        _wire(node=os.urandom(16)),
        _wire(directory="/" + "d" * 200),
        _wire(directory="relative/dir"),
        _wire(directory="/nul\0byte"),
        _wire(protocol_low=0),
        _wire(protocol_low=PROTOCOL_VERSION + 1),
        _wire()[:-1],
    ],
    ids=[
        "garbage",
        "empty",
        "short-array",
        "map",
        "version",
        "credential-size",
        "credential-garbage",
        "credential-of-another-node",
        "long-directory",
        "relative",
        "nul",
        "protocol-zero",
        "protocol-not-a-range",
        "truncated",
    ],
)
async def test_invitation_decode_error(runtime_dir: Path, payload: bytes) -> None:
    path = runtime_dir / "junk.sock"
    async with fake_listener(path, sends(_LEN.pack(len(payload)) + payload, then_close=False)):
        await asyncio.wait_for(expect_join_error(path, InvitationDecodeError), T)


async def test_connect_error(runtime_dir: Path) -> None:
    missing = runtime_dir / "nothing-here.sock"
    exc = await asyncio.wait_for(expect_join_error(missing, ConnectError), T)
    assert isinstance(exc, ConnectError)
    assert exc.path == os.fspath(missing)

    not_a_socket = runtime_dir / "file.sock"
    not_a_socket.write_bytes(b"")
    await asyncio.wait_for(expect_join_error(not_a_socket, ConnectError), T)

    stale = runtime_dir / "stale.sock"  # bound, then its owner went away
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(stale))
    s.close()
    await asyncio.wait_for(expect_join_error(stale, ConnectError), T)

    # by name: the path derived from the name is the one reported
    with pytest.raises(ConnectError) as ei:
        async with meshipc.connect("no-such-mesh", runtime_dir=runtime_dir):
            pass
    assert os.fspath(runtime_dir / "mesh-no-such-mesh") in str(ei.value)


async def test_listener_of_unexpected_uid_is_not_trusted(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen(invitation_ttl=SHORT_TTL)
        other = 65534 if os.getuid() != 65534 else 65533
        exc = await asyncio.wait_for(
            expect_join_error(listener.path, AuthenticationError, expected_uid=other), T
        )
        assert str(other) in str(exc)
        for key in key_material(mesh):
            assert_no_secret(str(exc), key, "AuthenticationError")
        # and the expected uid, given explicitly, is accepted
        async with meshipc.connect(listener.path, expected_uid=os.getuid()) as cc:
            conn = await asyncio.wait_for(listener.accept(), T)
            conn.port.send("hello")
            assert await asyncio.wait_for(cc.port.recv(), T) == "hello"


async def test_forged_invitation_to_missing_node_is_join_error(runtime_dir: Path) -> None:
    """A listener of our uid hands out a well-formed invitation for a mesh
    directory that holds no inviting node: a plain ``JoinError``."""
    directory = runtime_dir / "mesh-empty"
    directory.mkdir(mode=0o700)
    payload = _wire(directory=os.fspath(directory), expires=time.time() + 60)
    forged_key = msgspec.msgpack.decode(payload)[FIELD["credential"]][:32]
    path = runtime_dir / "forger.sock"
    async with fake_listener(path, sends(_LEN.pack(len(payload)) + payload, then_close=False)):
        with pytest.raises(JoinError) as ei:
            await asyncio.wait_for(_connect_and_leave(path), T)
    exc = ei.value
    assert type(exc) is JoinError, repr(exc)
    assert os.fspath(directory) in str(exc)
    assert_no_secret(str(exc), forged_key, "JoinError")
    assert list(directory.iterdir()) == []  # the joining node cleaned up its socket


async def _connect_and_leave(path: Path, **kw: Any) -> None:
    async with meshipc.connect(path, **kw):
        pass


async def test_listener_that_never_answers_times_out(runtime_dir: Path) -> None:
    path = runtime_dir / "mute.sock"
    hung_up = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, say nothing, until the client hangs up
        hung_up.set()
        writer.close()

    async with fake_listener(path, mute):
        with pytest.raises(JoinTimeout) as ei:
            await asyncio.wait_for(_connect_and_leave(path, timeout=0.2), T)
        assert str(ei.value) == f"the mesh at {path} did not answer in time (timed out after 0.2 s)"
        await asyncio.wait_for(hung_up.wait(), T)  # the client closed its socket


def test_join_timeout_default_and_validation() -> None:
    for f in (meshipc.connect, meshipc.join):
        assert inspect.signature(f).parameters["timeout"].default == JOIN_TIMEOUT == 10.0
    exc = JoinTimeout("/p", 2.5)
    assert pickle.loads(pickle.dumps(exc)).args == exc.args


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
async def test_join_timeout_must_be_positive(runtime_dir: Path, bad: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        async with meshipc.connect(runtime_dir / "x.sock", timeout=bad):
            pass  # pragma: no cover


# ----------------------------------------------- attach over bare nodes


async def test_attach_joins_a_bare_node_in_one_step(runtime_dir: Path) -> None:
    """``attach``: invitation -> the new node -> linked to the inviter -> the
    first port, with no ``Mesh`` on either side (the inviter is a ``Node``
    and its authority's ``issue``)."""
    authority = Authority()
    server = Node(runtime_dir, authority.issue(ROLE_ROOT), codec=CODEC)
    server.start()
    try:
        ours, theirs = Port.pair()
        inv = await Inviter(server, authority.issue).invite(theirs)
        assert server.is_invited(bytes(inv.node))
        node, port = await asyncio.wait_for(attach(inv, None, None, None), T)
        try:
            assert node.id == inv.node and [link.peer for link in node.stats().links] == [server.id.hex()]
            assert not server.is_invited(bytes(inv.node)) and server.stats().attached == 1
            ours.send("hello")
            assert await asyncio.wait_for(port.recv(), T) == "hello"
            port.send("back")
            assert await asyncio.wait_for(ours.recv(), T) == "back"
        finally:
            port.close()
            await node.close(linger=1.0)
        assert not node.path.exists()
    finally:
        await server.close(linger=1.0)


async def test_a_failed_attach_leaves_no_node_behind(runtime_dir: Path) -> None:
    authority = Authority()
    server = Node(runtime_dir, authority.issue(ROLE_ROOT), codec=CODEC)
    server.start()
    _, theirs = Port.pair()
    inv = await Inviter(server, authority.issue).invite(theirs)
    await server.close(linger=0)  # the inviting node is gone
    with pytest.raises(JoinError, match="is gone"):
        await asyncio.wait_for(attach(inv, None, None, None), T)
    assert list(runtime_dir.iterdir()) == []  # the new node's socket was removed with it
    with pytest.raises(InvitationExpired):
        await attach(reencode(inv, expires=time.time() - 1), None, None, None)
