"""``_invitation``: the invitation format (any bytes give an invitation or
``InvitationDecodeError``; hypothesis, bounded for CI) and ``Inviter``
(from the mesh's loop and from other threads)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attachutil import foreign_credential, key_material, reencode
from meshipc import InvitationDecodeError, Mesh, MeshError, Port
from meshipc._handshake import ROLE_CLIENT
from meshipc._invitation import _INVITATION_VERSION, MAX_INVITATION, Invitation, _InvitationRecord
from meshipc._wire import D_DEAD, PORT_DESC_SIZE, PROTOCOL_VERSION, decode_port_desc

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Bound on any single step.
T = 10.0
#: TTL for invitations that a test leaves unused on purpose.
SHORT_TTL = 1.0


# ------------------------------------------------------------------ format


def valid_invitation() -> bytes:
    node = os.urandom(16)
    return msgspec.msgpack.encode(
        _InvitationRecord(
            _INVITATION_VERSION,
            "/tmp/some-mesh",
            os.urandom(16),
            node,
            os.urandom(PORT_DESC_SIZE),
            foreign_credential(node),
            time.time() + 60,
            PROTOCOL_VERSION,
            PROTOCOL_VERSION,
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
        assert bytes(inv) == msgspec.msgpack.encode(msgspec.msgpack.decode(data, type=_InvitationRecord))


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


def test_deeply_nested_invitation_is_a_decode_error_not_a_crash() -> None:
    with pytest.raises(InvitationDecodeError):
        Invitation.from_bytes(b"\x91" * 60_000 + b"\xc0")  # 60,000 nested one-element arrays


@pytest.mark.parametrize("expires", [float("nan"), float("inf"), float("-inf")])
async def test_invitation_with_a_non_finite_expiry_is_refused(runtime_dir: Path, expires: float) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mine, theirs = Port.pair()
        inv = await mesh.inviter(ttl=SHORT_TTL).invite(theirs)
        with pytest.raises(InvitationDecodeError, match="expiry is not a finite time"):
            reencode(inv, expires=expires)
        mine.close()


# ----------------------------------------------------------------- inviter


async def test_an_invitation_carries_its_port_as_a_wire_descriptor(runtime_dir: Path) -> None:
    """The port field is exactly what ``_wire`` packs: a live descriptor whose
    peer is the kept end, on the inviting node."""
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        mine, theirs = Port.pair()
        inv = await mesh.inviter(ttl=SHORT_TTL).invite(theirs)
        d = decode_port_desc(inv.port_descriptor)
        assert not d.flags & D_DEAD
        assert d.peer_node == bytes(inv.inviter)
        mine.close()


async def test_invite_takes_an_open_port_only(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        inviter = mesh.inviter()
        with pytest.raises(MeshError, match=r"takes a meshipc\.Port, got int"):
            await inviter.invite(3)  # type: ignore[arg-type]
        mine, theirs = Port.pair()
        theirs.close()
        with pytest.raises(MeshError, match="closed or was sent away"):
            await inviter.invite(theirs)
        mine.close()


async def test_invite_blocking_on_the_mesh_loop_is_refused(runtime_dir: Path) -> None:
    """On the mesh's own loop it would deadlock until ``timeout``: refused at once."""
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        _, theirs = Port.pair()
        with pytest.raises(MeshError):
            mesh.inviter().invite_blocking(theirs, timeout=0.5)


# ------------------------------------------------------------ secret hygiene


async def test_an_invitation_carries_a_client_credential_and_no_key_that_mints(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        assert mesh._authority is not None
        mine, theirs = Port.pair()
        inv = await mesh.inviter(ttl=SHORT_TTL).invite(theirs)
        identity = Invitation.from_bytes(bytes(inv)).identity
        assert identity.node == inv.node and identity.role == ROLE_CLIENT
        assert identity.authority_key == mesh._authority.public
        data = bytes(inv)
        for key in key_material(mesh):  # neither the root's signing key nor its node's key
            assert key not in data
        assert "key=<redacted>" in repr(inv)
        mine.close()
