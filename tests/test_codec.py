"""The codec alone (``meshipc._codec``): values <-> msgpack bytes, extension
payloads and resource tables, without a network. Handles inside messages
across engines are in ``test_channel.py``."""

from __future__ import annotations

import mmap
import os
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshipc
from meshipc import Fd, MessageError, NodeId, Port, PortId, Receiver, Sender
from meshipc._codec import (
    CODEC,
    EXT_FD,
    check_encodable,
    decode,
    encode_plain,
    pack_indices,
    plain_decoder,
    register_handle,
    unpack_indices,
    walk_resources,
)
from meshipc._ports import Engine, Message
from meshipc._trace import TRACING
from meshipc._wire import (
    CALL_HEAD,
    K_DATA,
    MAX_FDS_PER_MESSAGE,
    MAX_OOB_BODY,
    THREAD_BODY_MIN,
    FdBody,
    Gather,
)
from relutil import vmrss_kb


class Point(msgspec.Struct):
    x: int
    y: int


def message(body: bytes, ports: Any = None, fds: Any = None) -> Message:
    return Message(K_DATA, None, body, ports, fds)


# ---------------------------------------------------------------- plain values


@pytest.mark.parametrize("value", [1, "s", b"b", [1, 2], {"k": [None, 1.5]}, Point(1, 2)])
def test_plain_round_trip(value: Any) -> None:
    body = encode_plain(value)
    assert body is not None
    got = decode(message(body), type(value) if isinstance(value, Point) else Any)
    assert got == (value if not isinstance(value, Point) else Point(1, 2))


def test_plain_encoder_defers_resources_and_unknown_types() -> None:
    r, w = os.pipe()
    os.close(r)
    fd = Fd(w)
    try:
        assert encode_plain({"fd": fd}) is None
        assert encode_plain(object()) is None
        assert encode_plain("fine after a deferral") is not None
    finally:
        fd.close()


def test_ids_travel_as_bytes_and_come_back_typed() -> None:
    n, p = NodeId.random(), PortId.random()
    body = CODEC.encode(Engine(NodeId.random()), [n, p])[0]
    got = decode(message(body), tuple[NodeId, PortId])
    assert got == (n, p) and type(got[0]) is NodeId and type(got[1]) is PortId


def test_decode_validates_against_the_type() -> None:
    body = encode_plain({"x": 1, "y": "no"})
    assert body is not None
    with pytest.raises(MessageError, match="invalid message"):
        decode(message(body), Point)


def test_invalid_utf8_from_a_peer_is_a_message_error() -> None:
    """msgspec raises UnicodeDecodeError for a bad string: still one
    MessageError for that message, whatever the receiver's type."""
    for tp in (Any, str, list[str]):
        with pytest.raises(MessageError):
            decode(message(b"\xa2\xff\xfe"), tp)


def test_deeply_nested_peer_data_is_a_message_error_not_a_crash() -> None:
    """msgspec's RecursionError on a too-deep body is one MessageError for
    that message (over a socket, the channel stays usable: ``test_node.py``)."""
    bomb = b"\x91" * 200_000 + b"\xc0"  # 200,000 nested one-element arrays
    with pytest.raises(MessageError):
        decode(message(bomb), Any)


def test_plain_decoder_refuses_resources() -> None:
    body = msgspec.msgpack.encode(msgspec.msgpack.Ext(EXT_FD, pack_indices([0])))
    with pytest.raises(MessageError, match="does not carry"):
        plain_decoder(Any).decode(body)


def test_check_encodable() -> None:
    check_encodable({"a": [1, 2]})
    with pytest.raises(MessageError, match="cannot be sent"):
        check_encodable({"a": 1j})


# ---------------------------------------------------------------- resources


def test_fd_reference_out_of_range_or_used_twice() -> None:
    r, w = os.pipe()
    os.close(w)
    ext = msgspec.msgpack.Ext(EXT_FD, pack_indices([0]))
    with pytest.raises(MessageError, match="missing or used twice"):
        decode(message(msgspec.msgpack.encode([ext, ext]), fds=[Fd(r)]), Any)
    r2, w2 = os.pipe()
    os.close(w2)
    missing = msgspec.msgpack.Ext(EXT_FD, pack_indices([3]))
    with pytest.raises(MessageError):
        decode(message(msgspec.msgpack.encode(missing), fds=[Fd(r2)]), Any)


def test_unreferenced_fds_are_closed() -> None:
    r, w = os.pipe()
    os.close(w)
    fd = Fd(r)
    assert decode(message(encode_plain("no fd") or b"", fds=[fd]), str) == "no fd"
    assert fd.closed


def test_a_lone_fd_takes_a_fast_path_with_the_same_bytes() -> None:
    # issue 24: a message that is one Fd is encoded and decoded without the
    # extension hooks; its bytes are the general encoder's (a peer of either
    # kind reads the other), and a lone fd of the wrong type still fails
    from meshipc import _codec

    general = msgspec.msgpack.encode(msgspec.msgpack.Ext(EXT_FD, pack_indices([0])))
    assert _codec._LONE_FD == general
    r, w = os.pipe()
    os.close(w)
    sent = Fd(r)
    assert encode_plain(sent) is None  # the full encoder's, at once
    body, ports, fds = CODEC.encode(Engine(NodeId.random()), sent)
    assert body == general and ports == [] and len(fds) == 1
    assert sent.closed and not fds[0].closed  # handed over, as the hook does
    for tp in (Any, Fd):
        got = decode(message(body, fds=list(fds)), tp)
        assert got is fds[0] and not got.closed
    with pytest.raises(MessageError):
        decode(message(body, fds=list(fds)), int)
    assert fds[0].closed  # a refused message's fd is closed
    r, w = os.pipe()
    os.close(w)
    in_list = Fd(r)
    body, _, fds = CODEC.encode(Engine(NodeId.random()), [in_list])  # not lone: the general path
    (back,) = decode(message(body, fds=list(fds)), list[Fd])
    assert back is fds[0]
    back.close()
    done = Fd(os.dup(0))
    done.close()
    with pytest.raises(MessageError):
        CODEC.encode(Engine(NodeId.random()), done)  # a closed Fd cannot go, as before


def test_unknown_extension_type() -> None:
    r, w = os.pipe()
    os.close(w)
    body = msgspec.msgpack.encode(msgspec.msgpack.Ext(99, b""))
    with pytest.raises(MessageError):
        decode(message(body, fds=[Fd(r)]), Any)


def test_index_payloads() -> None:
    assert unpack_indices(memoryview(pack_indices([7])), exactly_one=True) == (7,)
    assert unpack_indices(memoryview(pack_indices([1, 2, 3])), exactly_one=False) == (1, 2, 3)
    with pytest.raises(MessageError, match="bad port reference"):
        unpack_indices(memoryview(b"\0" * 5), exactly_one=True)
    with pytest.raises(MessageError, match="bad receiver reference"):
        unpack_indices(memoryview(b"\0" * 5), exactly_one=False)


def test_walk_resources_finds_handles_and_fds() -> None:
    tx, rx = meshipc.channel()
    a, b = Port.pair()
    r, w = os.pipe()
    os.close(r)
    fd = Fd(w)
    try:
        found = walk_resources({"x": [tx, (a,)], "p": Point(1, 2), "fd": fd, "s": "text"})
        assert {type(x) for x in found} == {Sender, Port, Fd}
        assert walk_resources(rx) == [rx] and isinstance(rx, Receiver)
    finally:
        for h in (tx, rx, a, b, fd):
            h.close()


def test_extension_codes_cannot_be_taken_twice() -> None:
    class Other:
        pass

    with pytest.raises(ValueError, match="taken"):
        register_handle(Other, EXT_FD, lambda h, t: b"", lambda d, t: None, detach=lambda h: [])
    with pytest.raises(ValueError, match="taken"):
        register_handle(Other, 1, lambda h, t: b"", lambda d, t: None, detach=lambda h: [])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=256))
def test_any_bytes_decode_to_a_value_or_a_message_error(data: bytes) -> None:
    for tp in (Any, Point, list[int]):
        try:
            decode(message(data), tp)
        except MessageError:
            pass


def test_codec_imports_nothing_above_ports_and_no_io() -> None:
    import inspect

    import meshipc._codec as codec

    src = inspect.getsource(codec)
    for mod in ("socket", "asyncio", "selectors", "._channel", "._node", "._transport"):
        assert f"import {mod}" not in src and f"from {mod} import" not in src


# ------------------------------------------------------------ large values


def test_a_value_known_to_exceed_the_body_limit_is_refused_before_any_copy() -> None:
    """A bytes-like value over ``MAX_OOB_BODY`` is refused by its length
    alone: a 1 GiB + 1 anonymous mapping (no memory behind it until touched)
    goes through every encoder's check without the process growing."""
    with mmap.mmap(-1, MAX_OOB_BODY + 1) as m:
        view = memoryview(m)
        try:
            rss = vmrss_kb()
            engine = Engine(os.urandom(16))
            for encode in (encode_plain, CODEC.encode_call, lambda v: CODEC.encode(engine, v)):
                with pytest.raises(MessageError, match=f"at least {MAX_OOB_BODY + 1} bytes exceeds"):
                    encode(view)
            assert vmrss_kb() - rss < 64 * 1024, "the value was copied"
        finally:
            view.release()
    with pytest.raises(MessageError, match="exceeds"):
        encode_plain("x" * (MAX_OOB_BODY + 1))  # a str has at least as many bytes as characters


def test_a_large_bytes_value_is_sent_without_a_copy() -> None:
    """A ``bytes`` value of ``THREAD_BODY_MIN`` or more is encoded as a
    ``Gather`` (msgpack's header, then the value itself), the same bytes
    msgspec would make; as an RPC request it has room for the call's head."""
    value = os.urandom(THREAD_BODY_MIN)
    body = encode_plain(value)
    assert isinstance(body, Gather) and body.parts[-1] is value
    assert b"".join(body.parts) == msgspec.msgpack.encode(value) and len(body) == len(value) + 5
    call = CODEC.encode_call(value)
    assert isinstance(call, Gather) and call.parts[-1] is value
    call[:CALL_HEAD] = b"h" * CALL_HEAD
    assert b"".join(call.parts) == b"h" * CALL_HEAD + msgspec.msgpack.encode(value)
    with pytest.raises(TypeError):
        call[:3] = b"abc"
    # smaller or mutable values are encoded (a bytearray may change after the send)
    assert isinstance(encode_plain(value[:-1]), bytes)
    mutable = CODEC.encode_call(bytearray(value))
    assert isinstance(mutable, bytearray) and mutable[CALL_HEAD:] == msgspec.msgpack.encode(value)


# ---------------------------------------------------------------- the fd fast path (issue 24)


def _fds(n: int) -> list[Fd]:
    return [Fd(os.dup(0)) for _ in range(n)]


@pytest.mark.parametrize("shape", ["lone", "dict", "nested", "struct"])
def test_fds_and_plain_values_encode_in_one_plain_pass_as_the_full_encoder_would(
    shape: str, untraced: None
) -> None:
    """``encode_plain(value, True)``: a value of ``Fd``s and plain values is
    an ``FdBody`` holding the ``Fd``s as they are (nothing detached yet),
    whose bytes are exactly the full encoder's (same wire format, the same
    decoder at the other end)."""
    a, b = _fds(2)
    value: Any = {
        "lone": a,
        "dict": {"out": a, "n": 7, "s": "text"},
        "nested": [1, (a, [b, None]), {"k": b"x"}],
        "struct": Point(a, b),
    }[shape]
    got = encode_plain(value, True)
    assert type(got) is FdBody
    used = [a] if shape in ("lone", "dict") else [a, b]
    assert [f is g for f, g in zip(got.fds, used, strict=True)] == [True] * len(used)
    assert not a.closed and not b.closed  # the link takes them over, not the encoder
    assert encode_plain(value) is None  # without fds=True: the full encoder's, as before
    full, _, taken = CODEC.encode(Engine(NodeId.random()), value)
    assert got.body == full and len(got) == len(full)
    back = decode(message(got.body, fds=taken), Any)
    assert isinstance(back, Fd) if shape == "lone" else True
    for f in taken:
        f.close()


def test_what_the_fd_fast_path_leaves_to_the_full_encoder_and_detaches_nothing(untraced: None) -> None:
    """A closed ``Fd``, the same one twice, one more than the cap, an ``Fd``
    beside a port, or a process where a trace context may be set: None (the
    full encoder says what is wrong, or carries the context), and every
    ``Fd`` is still the caller's."""
    fds = _fds(MAX_FDS_PER_MESSAGE + 1)
    closed = Fd(os.dup(0))
    closed.close()
    a, b = Port.pair()
    try:
        assert encode_plain(closed, True) is None
        assert encode_plain([closed], True) is None
        assert encode_plain([fds[0], fds[0]], True) is None
        assert encode_plain(fds, True) is None
        assert type(encode_plain(fds[:MAX_FDS_PER_MESSAGE], True)) is FdBody  # the cap itself goes
        assert encode_plain({"fd": fds[0], "port": a}, True) is None
        assert encode_plain([fds[0], object()], True) is None
        TRACING[0] = True  # (untraced puts it back)
        assert encode_plain(fds[0], True) is None and encode_plain([fds[0]], True) is None
        TRACING[0] = False
        assert encode_plain("plain after all that", True) == msgspec.msgpack.encode("plain after all that")
        assert not any(f.closed for f in fds)
    finally:
        for f in (*fds, a, b):
            f.close()
