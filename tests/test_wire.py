"""The sans-IO wire layer, ids and the exception tree (no sockets, no loop)."""

from __future__ import annotations

import random
import struct
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshipc._wire as wire
from meshipc import ProtocolError
from meshipc._wire import (
    D_DEAD,
    D_PEER_CLOSED,
    F_OOB,
    K_ADD_SENDER,
    K_CALL,
    K_DATA,
    K_ERROR,
    K_MAX,
    MAX_FDS_PER_MESSAGE,
    MAX_FRAME,
    MAX_OOB_BODY,
    MAX_PORTS_PER_MESSAGE,
    MAX_REASON,
    PORT_DESC_SIZE,
    T_FAIL,
    T_MSG,
    ArrivedEvent,
    ChangePeerEvent,
    CloseEvent,
    Event,
    FailEvent,
    FrameDecoder,
    MsgEvent,
    PortDesc,
    ProxyAckEvent,
    _decode_frame,
    decode_port_desc,
    encode_event,
    encode_msg_header,
    encode_port_desc,
    fd_frame,
    oob_body_length,
    oob_body_marker,
)

MAX_U64 = (1 << 64) - 1


def rid(n: int) -> bytes:
    """A recognisable 16-byte id."""
    return bytes([n]) * 16


def frame(payload: bytes) -> bytes:
    """``u32-le length | payload`` (payload starts with the type byte)."""
    return struct.pack("<I", len(payload)) + payload


def payload_of(ev: Event) -> bytes:
    data = encode_event(ev)
    (n,) = struct.unpack_from("<I", data)
    assert n == len(data) - 4
    return data[4:]


def desc(n: int, flags: int = 0) -> PortDesc:
    return PortDesc(rid(n), rid(n + 1), rid(n + 2), rid(n + 3), n * 1000 + 1, MAX_U64 - n, flags)


EVENT_TYPES = typing.get_args(Event)
SAMPLES: dict[str, Event] = {
    "msg-plain": MsgEvent(rid(1), 1, K_DATA, 0, [], 0, b"hello"),
    "msg-empty-body": MsgEvent(rid(1), 2, K_ADD_SENDER, 0, [], 0, b""),
    "msg-ports-fds": MsgEvent(
        rid(2),
        MAX_U64,
        K_CALL,
        0,
        [desc(10), desc(20, D_PEER_CLOSED), desc(30, D_DEAD), desc(40, D_DEAD | D_PEER_CLOSED)],
        3,
        bytes(range(256)) * 3,
    ),
    "msg-error": MsgEvent(rid(3), 7, K_ERROR, 0, [], 0, b"\x93\xa1a\xa1b\xa0"),
    "msg-oob": MsgEvent(rid(4), 9, K_DATA, F_OOB, [desc(50)], 2, oob_body_marker(10**9)),
    "close": CloseEvent(rid(5), 42),
    "close-max-seq": CloseEvent(rid(5), MAX_U64),
    "change-peer": ChangePeerEvent(rid(6), 3, rid(7), rid(8), rid(9), rid(10)),
    "arrived": ArrivedEvent(rid(11), rid(12)),
    "proxy-ack": ProxyAckEvent(rid(13), 0),
    "proxy-ack-max": ProxyAckEvent(rid(13), MAX_U64),
    "fail": FailEvent(rid(14), "peer went away: d\u00e9j\u00e0 vu \u2603"),
    "fail-empty": FailEvent(rid(15), ""),
    "fail-max-reason": FailEvent(rid(16), "r" * MAX_REASON),
}
SAMPLES["proxy-done"] = wire.ProxyDoneEvent(rid(17))
SAMPLES["consumed"] = wire.ConsumedEvent(rid(18), 7)
SAMPLES["consumed-max"] = wire.ConsumedEvent(rid(18), MAX_U64)


def test_every_event_type_has_a_sample():
    assert {type(e) for e in SAMPLES.values()} == set(EVENT_TYPES)


def feed_chunks(data: bytes, sizes: list[int]) -> tuple[list[Event], bool]:
    """Feed ``data`` cut into pieces of the given sizes (cycled); returns the
    events decoded before any error and whether a ``ProtocolError`` came."""
    dec = FrameDecoder()
    out: list[Event] = []
    pos = 0
    i = 0
    while pos < len(data):
        n = max(1, sizes[i % len(sizes)]) if sizes else len(data)
        i += 1
        try:
            out.extend(dec.feed(data[pos : pos + n]))
        except ProtocolError:
            with pytest.raises(ProtocolError):
                dec.feed(b"")
            return out, True
        pos += n
    return out, False


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(SAMPLES))
def test_round_trip_whole(name: str):
    ev = SAMPLES[name]
    dec = FrameDecoder()
    assert dec.feed(encode_event(ev)) == [ev]
    assert dec.buffered == 0


@pytest.mark.parametrize("name", list(SAMPLES))
def test_round_trip_byte_at_a_time(name: str):
    ev = SAMPLES[name]
    data = encode_event(ev)
    dec = FrameDecoder()
    for i in range(len(data) - 1):
        assert dec.feed(data[i : i + 1]) == []
        assert dec.buffered == i + 1
    assert dec.feed(data[-1:]) == [ev]
    assert dec.buffered == 0


def test_decoded_fields_and_types():
    ev = SAMPLES["msg-ports-fds"]
    (got,) = FrameDecoder().feed(encode_event(ev))
    assert isinstance(got, MsgEvent)
    assert (got.port, got.seq, got.kind, got.flags, got.nfds) == (rid(2), MAX_U64, K_CALL, 0, 3)
    assert got.body == bytes(range(256)) * 3
    assert [d.flags for d in got.ports] == [0, D_PEER_CLOSED, D_DEAD, D_DEAD | D_PEER_CLOSED]
    d = got.ports[0]
    assert (d.id, d.peer_node, d.peer_port, d.origin) == (rid(10), rid(11), rid(12), rid(13))
    assert (d.send_seq, d.recv_seq) == (10001, MAX_U64 - 10)
    assert isinstance(got.body, bytes)
    assert got.ports == ev.ports and got != SAMPLES["msg-plain"]


def test_several_frames_concatenated():
    evs = list(SAMPLES.values()) * 2
    data = b"".join(encode_event(e) for e in evs)
    assert FrameDecoder().feed(data) == evs
    assert feed_chunks(data, [1]) == (evs, False)
    rng = random.Random(1234)
    for _ in range(20):
        sizes = [rng.randint(1, 300) for _ in range(10)]
        assert feed_chunks(data, sizes) == (evs, False)


def test_partial_frame_is_kept_between_feeds():
    a, b = encode_event(SAMPLES["close"]), encode_event(SAMPLES["fail"])
    dec = FrameDecoder()
    assert dec.feed(a + b[:5]) == [SAMPLES["close"]]
    assert dec.buffered == 5
    assert dec.feed(memoryview(b[5:])) == [SAMPLES["fail"]]
    assert dec.feed(bytearray()) == []
    assert dec.buffered == 0


def test_msg_header_plus_body_equals_encode_event():
    ev = SAMPLES["msg-ports-fds"]
    head = encode_msg_header(ev.port, ev.seq, ev.kind, ev.flags, ev.ports, ev.nfds, len(ev.body))
    assert head + ev.body == encode_event(ev)


def test_fail_reason_truncated_by_encoder():
    ev = FailEvent(rid(1), "x" * (MAX_REASON * 3))
    (got,) = FrameDecoder().feed(encode_event(ev))
    assert got == FailEvent(rid(1), "x" * MAX_REASON)


def test_port_desc_round_trip():
    """One descriptor is PORT_DESC_SIZE bytes; it reads back from any offset,
    and a short one is a struct.error (FrameDecoder makes that a ProtocolError)."""
    d = desc(60, D_DEAD | D_PEER_CLOSED)
    data = encode_port_desc(d)
    assert len(data) == PORT_DESC_SIZE == 81
    assert decode_port_desc(data) == d
    assert decode_port_desc(memoryview(b"xyz" + data + b"tail"), 3) == d
    with pytest.raises(struct.error):
        decode_port_desc(data[:-1])


def test_oob_marker_round_trip():
    for n in (0, 1, 300 * 1024, MAX_OOB_BODY):
        assert oob_body_length(oob_body_marker(n)) == n
    with pytest.raises(ProtocolError):
        oob_body_length(oob_body_marker(MAX_OOB_BODY + 1))
    with pytest.raises(ProtocolError):
        oob_body_length(b"1234567")


def test_encode_rejects_non_events():
    with pytest.raises(TypeError):
        encode_event("not an event")  # type: ignore[arg-type]


# ---------------------------------------------------------------- caps and malformed frames


def msg_payload(
    *,
    kind: int = K_DATA,
    flags: int = 0,
    ports: list[PortDesc] | None = None,
    nfds: int = 0,
    body: bytes = b"",
) -> bytes:
    return payload_of(MsgEvent(rid(1), 1, kind, flags, ports or [], nfds, body))


GOOD_PAYLOADS = {
    "fds-at-limit": msg_payload(nfds=MAX_FDS_PER_MESSAGE),
    "kind-max": msg_payload(kind=K_MAX),
    "oob-at-limit": msg_payload(flags=F_OOB, nfds=1, body=oob_body_marker(MAX_OOB_BODY)),
    "fail-reason-at-limit": bytes([T_FAIL]) + rid(1) + b"r" * MAX_REASON,
    "fail-no-reason": bytes([T_FAIL]) + rid(1),
}


def _too_many_ports_header() -> bytes:
    p = bytearray(msg_payload())
    # nports is the u16 right after type(1) port(16) seq(8) kind(1) flags(1)
    struct.pack_into("<H", p, 27, MAX_PORTS_PER_MESSAGE + 1)
    return bytes(p)


def _bad_desc_flags() -> bytes:
    p = bytearray(msg_payload(ports=[desc(1)]))
    p[-1] = 8  # the descriptor's flags byte: unknown bit
    return bytes(p)


BAD_PAYLOADS = {
    "unknown-type-0": bytes([0]) + rid(1) + bytes(8),
    "unknown-type-99": bytes([99]) + rid(1) + bytes(8),
    "unknown-type-255": bytes([255]) * 40,
    "unknown-kind": msg_payload(kind=K_MAX + 1),
    "unknown-kind-255": msg_payload(kind=255),
    "unknown-flags": msg_payload(flags=2),
    "unknown-flags-high": msg_payload(flags=0x80 | F_OOB, nfds=1, body=oob_body_marker(1)),
    "too-many-ports": payload_of(
        MsgEvent(rid(1), 1, K_DATA, 0, [desc(1)] * (MAX_PORTS_PER_MESSAGE + 1), 0, b"")
    ),
    "too-many-ports-header-only": _too_many_ports_header(),
    "too-many-fds": msg_payload(nfds=MAX_FDS_PER_MESSAGE + 1),
    "too-many-fds-u16-max": msg_payload(nfds=0xFFFF),
    "oob-without-fd": msg_payload(flags=F_OOB, nfds=0, body=oob_body_marker(10)),
    "oob-too-long": msg_payload(flags=F_OOB, nfds=1, body=oob_body_marker(MAX_OOB_BODY + 1)),
    "oob-u64-max": msg_payload(flags=F_OOB, nfds=1, body=oob_body_marker(MAX_U64)),
    "oob-no-length": msg_payload(flags=F_OOB, nfds=1, body=b""),
    "oob-short-length": msg_payload(flags=F_OOB, nfds=1, body=b"\x01\x02\x03"),
    "oob-long-length": msg_payload(flags=F_OOB, nfds=1, body=oob_body_marker(5) + b"x"),
    "bad-desc-flags": _bad_desc_flags(),
    "msg-short": msg_payload()[:-1],
    "msg-type-only": bytes([T_MSG]),
    "msg-ports-truncated": msg_payload(ports=[desc(1), desc(2)])[:-1],
    "fail-reason-too-long": bytes([T_FAIL]) + rid(1) + b"r" * (MAX_REASON + 1),
    "fail-short": bytes([T_FAIL]) + rid(1)[:15],
    "fail-type-only": bytes([T_FAIL]),
}
# every fixed-size event: one byte short, one byte long, type byte alone
for _name, _ev in SAMPLES.items():
    if not isinstance(_ev, (MsgEvent, FailEvent)):
        _p = payload_of(_ev)
        BAD_PAYLOADS[f"{_name}-short"] = _p[:-1]
        BAD_PAYLOADS[f"{_name}-long"] = _p + b"\0"
        BAD_PAYLOADS[f"{_name}-type-only"] = _p[:1]


@pytest.mark.parametrize("name", list(GOOD_PAYLOADS))
def test_limits_are_inclusive(name: str):
    (ev,) = FrameDecoder().feed(frame(GOOD_PAYLOADS[name]))
    assert encode_event(ev) == frame(GOOD_PAYLOADS[name])


def test_ports_at_limit_accepted():
    ev = MsgEvent(rid(1), 1, K_DATA, 0, [desc(1)] * MAX_PORTS_PER_MESSAGE, 0, b"b")
    data = encode_event(ev)
    assert len(data) <= MAX_FRAME
    assert FrameDecoder().feed(data) == [ev]


@pytest.mark.parametrize("name", list(BAD_PAYLOADS))
def test_malformed_frame_rejected(name: str):
    data = frame(BAD_PAYLOADS[name])
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(data)
    # the decoder is spent: even good bytes are refused now
    with pytest.raises(ProtocolError):
        dec.feed(encode_event(SAMPLES["close"]))
    with pytest.raises(ProtocolError):
        dec.feed(b"")
    # same verdict when the bad frame follows a good one and arrives bytewise
    assert feed_chunks(encode_event(SAMPLES["arrived"]) + data, [1]) == ([SAMPLES["arrived"]], True)


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 0xFFFFFFFF])
def test_frame_length_outside_limits(length: int):
    dec = FrameDecoder()
    # the length alone is enough to refuse: nothing of that size is awaited
    with pytest.raises(ProtocolError):
        dec.feed(struct.pack("<I", length))
    with pytest.raises(ProtocolError):
        dec.feed(encode_event(SAMPLES["close"]))


def test_frame_length_at_limit_is_awaited():
    dec = FrameDecoder()
    assert dec.feed(struct.pack("<I", MAX_FRAME) + bytes([T_MSG])) == []
    assert dec.buffered == 5


def test_short_length_prefix_is_awaited():
    dec = FrameDecoder()
    assert dec.feed(b"\x00\x00\x00") == []
    with pytest.raises(ProtocolError):
        dec.feed(b"\x00")


def test_error_after_good_frames_in_one_feed():
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(encode_event(SAMPLES["close"]) + frame(BAD_PAYLOADS["unknown-kind"]))
    with pytest.raises(ProtocolError):
        dec.feed(encode_event(SAMPLES["close"]))


# ---------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids16 = st.binary(min_size=16, max_size=16)
u64 = st.integers(0, MAX_U64)
descs = st.builds(
    PortDesc,
    ids16,
    ids16,
    ids16,
    ids16,
    u64,
    u64,
    st.sampled_from([0, D_PEER_CLOSED, D_DEAD, D_DEAD | D_PEER_CLOSED]),
)
inline_msgs = st.builds(
    MsgEvent,
    ids16,
    u64,
    st.integers(0, K_MAX),
    st.just(0),
    st.lists(descs, max_size=4),
    st.integers(0, MAX_FDS_PER_MESSAGE),
    st.binary(max_size=300),
)
oob_msgs = st.builds(
    MsgEvent,
    ids16,
    u64,
    st.integers(0, K_MAX),
    st.just(F_OOB),
    st.lists(descs, max_size=2),
    st.integers(1, MAX_FDS_PER_MESSAGE),
    st.integers(0, MAX_OOB_BODY).map(oob_body_marker),
)
events = st.one_of(
    inline_msgs,
    oob_msgs,
    st.builds(CloseEvent, ids16, u64),
    st.builds(ChangePeerEvent, ids16, u64, ids16, ids16, ids16, ids16),
    st.builds(ArrivedEvent, ids16, ids16),
    st.builds(ProxyAckEvent, ids16, u64),
    st.builds(FailEvent, ids16, st.text(max_size=200)),
    st.builds(wire.ProxyDoneEvent, ids16),
    st.builds(wire.ConsumedEvent, ids16, u64),
)
chunk_sizes = st.lists(st.integers(1, 64), min_size=1, max_size=8)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(data: bytes):
    dec = FrameDecoder()
    try:
        out = dec.feed(data)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            dec.feed(data)
        return
    assert isinstance(out, list)
    assert all(isinstance(e, EVENT_TYPES) for e in out)


@FUZZ
@given(pieces=st.lists(st.binary(max_size=64), max_size=20))
def test_fuzz_arbitrary_chunks(pieces: list[bytes]):
    dec = FrameDecoder()
    for p in pieces:
        try:
            dec.feed(p)
        except ProtocolError:
            with pytest.raises(ProtocolError):
                dec.feed(p)
            return


@FUZZ
@given(data=st.binary(max_size=512), type_byte=st.integers(0, 255))
def test_fuzz_plausible_frames(data: bytes, type_byte: int):
    """Correct length prefix, any type, any payload: the decoder must judge
    every payload without tripping over it."""
    try:
        FrameDecoder().feed(frame(bytes([type_byte]) + data))
    except ProtocolError:
        pass


@FUZZ
@given(evs=st.lists(events, min_size=1, max_size=6), sizes=chunk_sizes)
def test_fuzz_valid_frames_any_chunking(evs: list[Event], sizes: list[int]):
    data = b"".join(encode_event(e) for e in evs)
    assert FrameDecoder().feed(data) == evs
    assert feed_chunks(data, sizes) == (evs, False)


@FUZZ
@given(
    evs=st.lists(events, min_size=1, max_size=5),
    mutations=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
    insert=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8))),
    sizes=chunk_sizes,
)
def test_fuzz_mutated_frames(
    evs: list[Event],
    mutations: list[tuple[int, int]],
    cut: int | None,
    insert: tuple[int, bytes] | None,
    sizes: list[int],
):
    """Valid frames with bytes changed, inserted or cut off: events or
    ProtocolError, and the same verdict however the bytes are chunked."""
    data = bytearray(b"".join(encode_event(e) for e in evs))
    for pos, value in mutations:
        data[pos % len(data)] = value
    if insert is not None:
        pos, extra = insert
        data[pos % (len(data) + 1) : pos % (len(data) + 1)] = extra
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    raw = bytes(data)
    chunked = feed_chunks(raw, sizes)
    bytewise = feed_chunks(raw, [1])
    # a feed that ends in an error returns nothing, so bigger chunks may lose
    # the events decoded just before it; fed bytewise, every one comes out
    assert chunked[1] == bytewise[1]
    assert chunked[0] == bytewise[0][: len(chunked[0])]
    try:
        whole = FrameDecoder().feed(raw)
    except ProtocolError:
        assert chunked[1]
    else:
        assert chunked == bytewise == (whole, False)


# ---------------------------------------------------------------- protocol 2: calls, replies, credit


def test_final_kinds_decode_and_unknown_kinds_do_not():
    from meshipc._wire import K_MAX, K_REPLY, K_REPLY_ERROR

    for kind in (K_REPLY, K_REPLY_ERROR):
        frame = encode_event(MsgEvent(rid(1), 3, kind, 0, [], 0, b"\x01"))
        (ev,) = FrameDecoder().feed(frame)
        assert (ev.kind, ev.body) == (kind, b"\x01")
    bad = bytearray(encode_event(MsgEvent(rid(1), 3, K_REPLY, 0, [], 0, b"\x01")))
    bad[4 + 1 + 16 + 8] = K_MAX + 1  # the kind byte
    with pytest.raises(ProtocolError, match="kind"):
        FrameDecoder().feed(bytes(bad))


def test_consumed_frame_truncated_or_padded_is_refused():
    frame = encode_event(wire.ConsumedEvent(rid(2), 9))
    for broken in (frame[:4] + bytes([frame[4]]) + frame[5:-1], frame + b"\x00"):
        body = broken[4:]
        with pytest.raises(ProtocolError, match="CONSUMED"):
            FrameDecoder().feed(struct.pack("<I", len(body)) + body)


def test_compact_call_request_is_checked_by_the_engine():
    """A K_CALL frame without ports names its reply port in its first 32
    bytes: shorter, or reusing a live port id, is a protocol error."""
    from meshipc._codec import CODEC
    from meshipc._ids import NodeId, PortId
    from meshipc._ports import Engine
    from meshipc._wire import K_CALL

    eng = Engine(NodeId.random(), codec=CODEC)
    src = NodeId.random()
    st = eng.new_bound(PortId.random(), src, PortId.random())
    with pytest.raises(ProtocolError, match="reply port"):
        eng.receive_data(src, st.id, 1, K_CALL, b"\x00" * 31)
    with pytest.raises(ProtocolError, match="reuses a live port id"):
        eng.receive_data(src, st.id, 1, K_CALL, st.id + bytes(16) + b"\xc0")
    reply_id, caller_port = PortId.random(), PortId.random()
    eng.receive_data(src, st.id, 1, K_CALL, reply_id + caller_port + b"\x07")
    (msg,) = st.queue
    (reply,) = msg.ports
    assert (msg.body, reply.id, reply.peer_node, reply.peer_port) == (b"\x07", reply_id, src, caller_port)


def test_a_frame_shorter_than_its_header_is_refused_whatever_the_chunking():
    """Regression (found by the mutation fuzzer): the fast path compared the
    header size with an absolute offset, so past the first frame a MSG frame
    shorter than its own header was accepted when fed in one piece and
    refused when fed byte by byte."""
    first = encode_event(MsgEvent(rid(9), 3, 0, 0, [], 0, b"x"))
    short = struct.pack("<I", 5) + bytes([1]) + bytes(4)  # a 5-byte "MSG frame"
    raw = first + short + bytes(40)
    with pytest.raises(ProtocolError, match="short MSG frame"):
        FrameDecoder().feed(raw)
    d = FrameDecoder()
    with pytest.raises(ProtocolError, match="short MSG frame"):
        for i in range(len(raw)):
            d.feed(raw[i : i + 1])


def test_the_decoder_counts_whole_frames_however_they_arrive():
    raw = b"".join(encode_event(e) for e in SAMPLES.values() if not isinstance(e, MsgEvent) or not e.nfds)
    n = len(FrameDecoder().feed(raw))
    for size in (1, 7, len(raw)):
        d = FrameDecoder()
        for i in range(0, len(raw), size):
            d.feed(raw[i : i + size])
        assert d.frames == n


def _feed_each_log(chunks: list[bytes]) -> tuple[list[tuple[Any, ...]], list[tuple[bytes, int, int, bytes]]]:
    """Feed ``chunks``; returns the calls made (in order) and the messages
    they amount to, each as (port, seq, kind, body)."""
    calls: list[tuple[Any, ...]] = []
    flat: list[tuple[bytes, int, int, bytes]] = []

    def on_data(port: bytes, seq: int, kind: int, body: bytes) -> None:
        calls.append(("data", port, seq))
        flat.append((port, seq, kind, body))

    def on_run(port: bytes, seq: int, bodies: list[bytes]) -> None:
        calls.append(("run", port, seq, len(bodies)))
        flat.extend((port, seq + i, K_DATA, b) for i, b in enumerate(bodies))

    def on_event(ev: Event) -> None:
        calls.append(("event", type(ev).__name__))
        if isinstance(ev, MsgEvent):
            flat.append((ev.port, ev.seq, ev.kind, ev.body))

    d = FrameDecoder()
    for c in chunks:
        d.feed_each(c, on_data, on_event, on_run)
    return calls, flat


def _data(port: bytes, seq: int, body: bytes = b"\xc0", kind: int = K_DATA) -> MsgEvent:
    return MsgEvent(port, seq, kind, 0, [], 0, body)


def test_a_run_of_plain_messages_on_one_port_is_handed_over_in_one_call():
    p, q = rid(1), rid(2)
    evs: list[Event] = [
        *(_data(p, s) for s in range(1, 6)),  # a run of 5
        _data(q, 1),  # another port: the run ends
        _data(q, 2),
        _data(q, 4),  # a gap: a new run
        _data(q, 5, kind=K_CALL, body=bytes(32) + b"\xc0"),  # not K_DATA: on its own
        CloseEvent(p, 6),  # any other frame ends the run before it
        _data(p, 7),
    ]
    calls, flat = _feed_each_log([b"".join(encode_event(e) for e in evs)])
    assert calls == [
        ("run", p, 1, 5),
        ("run", q, 1, 2),
        ("data", q, 4),
        ("data", q, 5),
        ("event", "CloseEvent"),
        ("data", p, 7),
    ]
    assert [(port, seq) for port, seq, _, _ in flat] == [(p, s) for s in range(1, 6)] + [
        (q, 1),
        (q, 2),
        (q, 4),
        (q, 5),
        (p, 7),
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.binary(max_size=40)), max_size=40),
    st.lists(st.integers(1, 64), max_size=10),
)
def test_runs_keep_the_wire_order_whatever_the_chunking(
    spec: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    """Every message comes out once, in wire order, with its own seq, kind and
    body, however the bytes are split between reads."""
    seqs = [1, 1, 1]
    evs: list[Event] = []
    for port_i, kind_i, body in spec:
        port = rid(port_i + 1)
        if kind_i == 3:
            evs.append(ProxyAckEvent(port, seqs[port_i]))
            continue
        seqs[port_i] += 1 if kind_i else random.Random(len(evs)).choice((1, 1, 2))
        kind = (K_DATA, K_ERROR, K_DATA)[kind_i]
        evs.append(_data(port, seqs[port_i], b"\xc4" + bytes([len(body)]) + body, kind))
    raw = b"".join(encode_event(e) for e in evs)
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(raw[pos : pos + c])
        pos += c
    chunks.append(raw[pos:])
    _, flat = _feed_each_log(chunks)
    assert flat == [(e.port, e.seq, e.kind, e.body) for e in evs if isinstance(e, MsgEvent)]


def _fields(ev: Event) -> tuple[Any, ...]:
    assert isinstance(ev, MsgEvent)
    return (ev.port, ev.seq, ev.kind, ev.flags, ev.ports, ev.nfds, bytes(ev.body))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from([K_DATA, K_ERROR]), st.binary(max_size=30)), max_size=30
    ),
    st.lists(st.integers(1, 64), max_size=10),
)
def test_messages_of_fds_decode_as_the_general_decoder_does_whatever_the_chunking(
    spec: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    """A frame of a message of fds (``fd_frame``, what the fd fast path
    writes) is the general frame of that message, and ``feed_each``'s fast
    branch for it gives ``_decode_frame``'s event, in wire order among
    plain frames, however the bytes are split."""
    evs = [MsgEvent(rid(1), i + 1, kind, 0, [], nfds, body) for i, (nfds, kind, body) in enumerate(spec)]
    frames = [encode_event(e) for e in evs]
    for e, f in zip(evs, frames, strict=True):
        if e.nfds:
            assert fd_frame(e.port, e.seq, e.kind, e.nfds, e.body) == f
    want = [_fields(_decode_frame(memoryview(f)[4:])) for f in frames]
    raw = b"".join(frames)
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(raw[pos : pos + c])
        pos += c
    chunks.append(raw[pos:])
    got: list[tuple[Any, ...]] = []
    d = FrameDecoder()
    for c in chunks:
        d.feed_each(
            c,
            lambda port, seq, kind, body: got.append((port, seq, kind, 0, [], 0, bytes(body))),
            lambda ev: got.append(_fields(ev)),
            lambda port, seq, bodies: got.extend(
                (port, seq + i, K_DATA, 0, [], 0, bytes(b)) for i, b in enumerate(bodies)
            ),
        )
    assert got == want


def test_a_frame_claiming_too_many_fds_is_a_protocol_error_on_the_fast_branch_too() -> None:
    frame = fd_frame(rid(1), 1, K_DATA, MAX_FDS_PER_MESSAGE + 1, b"\xc0")
    with pytest.raises(ProtocolError, match="fds in one message"):
        FrameDecoder().feed_each(frame, lambda *a: None, lambda ev: None)
