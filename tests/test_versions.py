"""Version skew: nodes link at the highest protocol version both speak, and
a peer outside the range — an older or newer release, meshipc 0.1 included
— is refused with both ranges named and what to upgrade; invitations carry
the inviting node's range and their own format version. The handshake's
format without sockets is in ``test_handshake.py``; here the negotiation
over sockets, nodes and real processes (``compat_peers.py``, pinned with the
``MESHIPC_TEST_PROTOCOL`` test hook). See docs/compatibility.md."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import meshipc
from attachutil import reencode
from meshipc import HandshakeError, InvitationDecodeError, Mesh, Port, VersionMismatch
from meshipc._codec import CODEC
from meshipc._handshake import (
    CHALLENGE_LEN,
    HELLO_LEN,
    MAGIC,
    ROLE_WORKER,
    S_BAD_VERSION,
    SUPPORTED,
    Authority,
    Challenge,
    Versions,
    build_challenge,
    new_hello,
    new_nonce,
    parse_auth,
    parse_challenge,
    parse_hello,
    parse_versions,
    version_mismatch,
)
from meshipc._invitation import INVITATION_FORMATS, Invitation
from meshipc._node import TEST_PROTOCOL_ENV, Node
from meshipc._sockets import recv_exact
from meshipc._wire import PROTOCOL_MIN, PROTOCOL_VERSION

T = 10.0
PEERS = Path(__file__).with_name("compat_peers.py").resolve()
MESH = Authority()
V = PROTOCOL_VERSION
#: meshipc 0.1's handshake (protocol 2): HELLO magic, version, flags, its
#: id, the id it wants, nonce; CHALLENGE magic, version, status, its id,
#: nonce, proof.
OLD_HELLO = struct.Struct("<4sHH16s16s32s")
OLD_CHALLENGE = struct.Struct("<4sHH16s32s32s")


# ---------------------------------------------------------------- ranges and refusals


def test_the_highest_version_both_speak_is_chosen() -> None:
    assert Versions(3, 3).choose(Versions(3, 4)) == 3
    assert Versions(3, 4).choose(Versions(4, 5)) == 4
    assert Versions(2, 6).choose(Versions(3, 4)) == 4
    assert Versions(2, 2).choose(Versions(3, 3)) is None
    assert Versions(4, 5).choose(Versions(2, 3)) is None
    assert SUPPORTED == Versions(PROTOCOL_MIN, PROTOCOL_VERSION)
    assert (str(Versions(3, 3)), str(Versions(2, 3))) == ("3", "2\u20133")


def test_the_test_hook_s_format() -> None:
    assert parse_versions("4") == Versions(4, 4)
    assert parse_versions(" 2-5 ") == Versions(2, 5)
    for bad in ("", "x", "5-4", "0", "3-70000", "1-2-3"):
        with pytest.raises(ValueError, match="protocol version range"):
            parse_versions(bad)


def test_a_refusal_names_both_ranges_and_what_to_upgrade() -> None:
    older = version_mismatch(Versions(3, 3), Versions(2, 2), "this client", "the service")
    assert str(older) == (
        "the service speaks protocol 2, this client 3: upgrade the service or use meshipc<0.2 for this client"
    )
    assert (older.ours, older.theirs) == ((3, 3), (2, 2))
    newer = version_mismatch(Versions(4, 5), Versions(2, 3), "this client", "the service")
    assert str(newer).startswith(
        "the service speaks protocol 2\u20133, this client 4\u20135: upgrade the service"
    )
    ahead = version_mismatch(Versions(3, 3), Versions(4, 5), "this client", "the service")
    assert str(ahead) == (
        "the service speaks protocol 4\u20135, this client 3: "
        "upgrade this client to a meshipc that speaks protocol 4"
    )
    # a release that speaks the newer version is named when known
    assert "(meshipc>=0.2)" in str(version_mismatch(Versions(2, 2), Versions(3, 3), "this client", "it"))
    assert isinstance(older, meshipc.JoinError) and isinstance(older, HandshakeError)


def test_signatures_cover_the_versions_so_nobody_talks_two_nodes_down() -> None:
    a, b = MESH.issue(ROLE_WORKER), MESH.issue(ROLE_WORKER)
    hello = new_hello(Versions(3, 4))
    nonce = new_nonce()
    auth = a.build_auth(hello, Challenge(3, 0, nonce, 3, 4), b.node)  # a was told 3
    with pytest.raises(HandshakeError, match="bad signature"):
        b.check_auth(hello, nonce, parse_auth(auth), version=4)  # b chose 4
    assert b.check_auth(hello, nonce, parse_auth(auth), version=3).node == a.node
    # and the initiator's range: a HELLO edited on the way says another
    with pytest.raises(HandshakeError, match="bad signature"):
        b.check_auth(hello._replace(low=3, version=3), nonce, parse_auth(auth), version=3)


def test_a_challenge_that_picks_a_version_not_offered_is_refused() -> None:
    data = build_challenge(0, new_nonce(), 9, Versions(9, 9))
    with pytest.raises(HandshakeError, match="chose protocol version 9, which this node did not offer"):
        parse_challenge(data, MESH.issue(ROLE_WORKER).node, Versions(3, 4))


# ---------------------------------------------------------------- nodes over sockets


@contextlib.asynccontextmanager
async def two_nodes(
    directory: Path, initiator: Versions, acceptor: Versions
) -> AsyncIterator[tuple[Node, Node, Any]]:
    """Nodes offering ``initiator`` and ``acceptor``; yields them and the
    outcome of the first connecting to the second over a socket pair (the
    verdict, or the exception) once the acceptor finished."""
    a = Node(directory, MESH.issue(ROLE_WORKER), codec=CODEC)
    b = Node(directory, MESH.issue(ROLE_WORKER), codec=CODEC)
    a.versions, b.versions = initiator, acceptor
    sa, sb = socket.socketpair()
    sa.setblocking(False)
    sb.setblocking(False)
    task = asyncio.create_task(b.accept_connection(sb, hello_timeout=T))
    try:
        try:
            outcome: Any = await asyncio.wait_for(a.connect_to(b.id, sa), T)
        except HandshakeError as exc:
            outcome = exc
        await asyncio.wait_for(task, T)
        yield a, b, outcome
    finally:
        task.cancel()
        await a.close(linger=0)
        await b.close(linger=0)


@pytest.mark.parametrize(
    ("initiator", "acceptor", "chosen"),
    [((3, 4), (4, 5), 4), ((3, 3), (2, 6), 3), ((4, 6), (3, 5), 5)],
)
async def test_nodes_link_at_the_highest_version_both_speak(
    runtime_dir: Path, initiator: tuple[int, int], acceptor: tuple[int, int], chosen: int
) -> None:
    async with two_nodes(runtime_dir, Versions(*initiator), Versions(*acceptor)) as (a, b, outcome):
        assert outcome == 1  # V_ACCEPT
        assert a.stats().link(b.id).protocol == chosen  # type: ignore[union-attr]
        assert b.stats().link(a.id).protocol == chosen  # type: ignore[union-attr]


async def test_nodes_that_share_no_version_refuse_each_other_naming_both(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with two_nodes(runtime_dir, Versions(3, 3), Versions(4, 5)) as (a, b, outcome):
        assert isinstance(outcome, VersionMismatch)
        assert str(outcome) == (
            f"node {b.id} speaks protocol 4\u20135, this node 3: "
            "upgrade this node to a meshipc that speaks protocol 4"
        )
        assert not a.links and not b.links and b.rejected == 1
    assert (
        "the connecting node speaks protocol 3, this node 4\u20135: upgrade the connecting node"
        in caplog.text
    )


async def test_a_node_of_meshipc_0_1_is_refused_with_an_answer_it_reads_whole(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """0.1 reads a 72-byte HELLO and an 88-byte CHALLENGE: a node of this
    release reads its HELLO whole and answers one it can read whole too
    (refused: 0.1 says "refused the handshake (status 3)"), and logs both
    versions, instead of a garbage parse or a wait for bytes that never come."""
    assert (HELLO_LEN, CHALLENGE_LEN) == (OLD_HELLO.size, OLD_CHALLENGE.size)
    old = OLD_HELLO.pack(MAGIC, 2, 0, os.urandom(16), os.urandom(16), new_nonce())
    assert parse_hello(old).versions == Versions(2, 2)
    loop = asyncio.get_running_loop()
    node = Node(runtime_dir, MESH.issue(ROLE_WORKER), codec=CODEC)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    task = asyncio.create_task(node.accept_connection(ours, hello_timeout=T))
    try:
        await loop.sock_sendall(theirs, old)
        reply = await asyncio.wait_for(recv_exact(loop, theirs, OLD_CHALLENGE.size), T)
        magic, _version, status, *_ = OLD_CHALLENGE.unpack(reply)
        assert magic == MAGIC and status not in (0, S_BAD_VERSION)
        await asyncio.wait_for(task, T)
    finally:
        theirs.close()
        await node.close(linger=0)
    assert node.rejected == 1
    assert f"the connecting node speaks protocol 2, this node {V}: upgrade the connecting node" in caplog.text


def test_meshipc_0_1_s_refusal_is_read_as_its_version() -> None:
    """What a node of 0.1 answers our (72-byte) HELLO: status 2 and its one version."""
    old = OLD_CHALLENGE.pack(MAGIC, 2, S_BAD_VERSION, os.urandom(16), new_nonce(), os.urandom(32))
    peer = MESH.issue(ROLE_WORKER).node
    with pytest.raises(VersionMismatch) as err:
        parse_challenge(old, peer)
    assert str(err.value) == (
        f"node {peer} speaks protocol 2, this node {V}: upgrade node {peer} or use meshipc<0.2 for this node"
    )


# ---------------------------------------------------------------- invitations


def test_an_invitation_of_an_unknown_format_is_refused_naming_both() -> None:
    ours = INVITATION_FORMATS[1]
    with pytest.raises(InvitationDecodeError) as err:
        Invitation.from_bytes(msgspec.msgpack.encode([ours + 7, "/x", b"", b"", b"", b"", 0.0, 9, 9, "new"]))
    assert str(err.value) == (
        f"the invitation is format {ours + 7}, this meshipc reads format {ours}: "
        "the mesh that wrote it is newer; upgrade this client"
    )
    # meshipc 0.1 wrote format 1 (its own fields after the version)
    with pytest.raises(InvitationDecodeError) as err:
        Invitation.from_bytes(msgspec.msgpack.encode([1, "/x", b"i" * 16, b"n" * 16, b"p", b"s" * 32, 0.0]))
    assert str(err.value) == (
        f"the invitation is format 1 (written by meshipc 0.1), this meshipc reads format {ours}: "
        "the mesh that wrote it is older; upgrade it or use meshipc<0.2 for this client"
    )


async def test_fields_appended_by_a_later_release_are_ignored(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mine, theirs = Port.pair()
        inv = await mesh.inviter().invite(theirs)
        fields = msgspec.msgpack.decode(bytes(inv))
        later = Invitation.from_bytes(msgspec.msgpack.encode([*fields, "a field 0.3 added", 7]))
        assert later.protocol == SUPPORTED and later.node == inv.node
        mine.close()


async def test_a_client_refuses_an_invitation_outside_its_range_before_connecting(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mine, theirs = Port.pair()
        inv = await mesh.inviter().invite(theirs)
        ahead = reencode(inv, protocol_low=V + 1, protocol_high=V + 2)
        with pytest.raises(VersionMismatch) as err:
            await meshipc.join(ahead, timeout=T)
        assert str(err.value) == (
            f"the service speaks protocol {V + 1}\u2013{V + 2}, this client {V}: "
            f"upgrade this client to a meshipc that speaks protocol {V + 1}"
        )
        assert mesh.stats().node.rejected == 0  # never connected
        mine.close()


async def test_a_node_that_speaks_other_versions_than_its_invitation_says_is_refused_at_the_handshake(
    runtime_dir: Path,
) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mesh._node.versions = Versions(V + 1, V + 1)
        mine, theirs = Port.pair()
        inv = await mesh.inviter().invite(theirs)
        lying = reencode(inv, protocol_low=V, protocol_high=V)
        with pytest.raises(VersionMismatch) as err:
            await meshipc.join(lying, timeout=T)
        assert str(err.value).startswith(f"the service speaks protocol {V + 1}, this client {V}: ")
        mine.close()


# ---------------------------------------------------------------- real processes


async def peer(rd: Path, name: str, *args: str, protocol: str | None = None) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env.pop(TEST_PROTOCOL_ENV, None)
    if protocol is not None:
        env[TEST_PROTOCOL_ENV] = protocol
    return await asyncio.create_subprocess_exec(
        sys.executable,
        os.fspath(PEERS),
        args[0],
        os.fspath(rd),
        name,
        *args[1:],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None and proc.stderr is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), T * 3)
    if not raw:
        err = await asyncio.wait_for(proc.stderr.read(), T)
        raise AssertionError(f"the process exited without output:\n{err.decode()}")
    out: dict[str, Any] = json.loads(raw)
    return out


@contextlib.asynccontextmanager
async def service(rd: Path, name: str, protocol: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A service process offering ``protocol``; killed and reaped on the way out."""
    proc = await peer(rd, name, "service", protocol=protocol)
    try:
        assert "ready" in await line(proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def one_call(rd: Path, name: str, protocol: str | None) -> dict[str, Any]:
    proc = await peer(rd, name, "call", protocol=protocol)
    try:
        return await line(proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def test_processes_pinned_to_different_versions_interoperate(runtime_dir: Path) -> None:
    async with service(runtime_dir, "skew", f"{V}-{V + 1}"):
        plain, ahead = await asyncio.gather(
            one_call(runtime_dir, "skew", None), one_call(runtime_dir, "skew", f"{V + 1}-{V + 2}")
        )
    assert plain["reply"]["req"] == "x" and plain["protocol"] == V and plain["inspected"] == [V]
    assert ahead["reply"]["req"] == "x" and ahead["protocol"] == V + 1 and ahead["inspected"] == [V + 1]


@pytest.mark.parametrize(
    ("service_range", "expected"),
    [
        (
            f"{V + 1}-{V + 2}",
            f"the service speaks protocol {V + 1}\u2013{V + 2}, this client {V}: "
            f"upgrade this client to a meshipc that speaks protocol {V + 1}",
        ),
        (
            "2",
            f"the service speaks protocol 2, this client {V}: "
            "upgrade the service or use meshipc<0.2 for this client",
        ),
    ],
    ids=["service-newer", "service-older"],
)
async def test_a_client_outside_the_service_s_range_is_refused_naming_both(
    runtime_dir: Path, service_range: str, expected: str
) -> None:
    async with service(runtime_dir, "far", service_range):
        out = await one_call(runtime_dir, "far", None)
    assert out["error"] == "VersionMismatch" and out["message"] == expected


async def test_a_malformed_test_hook_stops_the_node_from_starting(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_PROTOCOL_ENV, "5-4")
    with pytest.raises(ValueError, match=r"\$MESHIPC_TEST_PROTOCOL: a protocol version range is"):
        await Mesh(runtime_dir=runtime_dir)
    monkeypatch.setenv(TEST_PROTOCOL_ENV, f"{V}-{V + 3}")
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mine, theirs = Port.pair()
        assert (await mesh.inviter().invite(theirs)).protocol == Versions(V, V + 3)
        mine.close()
