"""Property tests (hypothesis, bounded for CI) for what reads peer bytes
outside the frame decoder (which ``test_wire.py`` covers) and the node
handshake (``test_handshake.py``): the invitation decoder. Any input gives
a result or a meshipc exception, never another exception."""

from __future__ import annotations

import os
import time

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshipc import InvitationDecodeError
from meshipc._invitation import _INVITATION_VERSION, MAX_INVITATION, Invitation, _Wire
from meshipc._wire import _DESC

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
