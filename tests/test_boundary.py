"""The boundary link's bytes (``_boundary``), sans-IO: plain synchronous tests
and hypothesis. Every ``raise`` reachable from the far side's bytes is here."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshipc import BoundaryLimits, BoundaryProtocolError, BoundaryVersionError, ProtocolError
from meshipc._boundary import (
    CHUNK_BYTES,
    HEAD_LEN,
    MAGIC,
    MAX_CAUSE,
    MAX_FRAME_PAYLOAD,
    T_CHUNK,
    T_MSG,
    BoundaryDecoder,
    Close,
    Credit,
    Fail,
    Goodbye,
    Hello,
    Msg,
    Ping,
    Pong,
    RecvCredit,
    SendCredit,
    encode_close,
    encode_credit,
    encode_fail,
    encode_goodbye,
    encode_hello,
    encode_msg,
    encode_ping,
    encode_pong,
    encode_small,
    negotiate,
)

LIMITS = BoundaryLimits()
HELLO = encode_hello("9.9.9", 42, LIMITS)


def decoder(max_body: int = LIMITS.max_body) -> BoundaryDecoder:
    d = BoundaryDecoder(max_body)
    d.feed(HELLO)
    ev = d.next_event()
    assert isinstance(ev, Hello)
    return d


def events(d: BoundaryDecoder) -> list[object]:
    out = []
    while (ev := d.next_event()) is not None:
        out.append(ev)
    return out


def msg_bytes(relay: int, kind: int, ports: list[int], body: bytes) -> bytes:
    return b"".join(bytes(p) for p in encode_msg(relay, kind, ports, body))


@given(st.integers(0, 2**32 - 1), st.integers(0, 4), st.binary(max_size=300))
def test_encode_small_is_encode_msg_in_one_piece(relay: int, kind: int, body: bytes) -> None:
    """The gateway's one-frame fast path writes exactly the bytes
    ``encode_msg`` does (so the far side cannot tell them apart)."""
    assert encode_small(relay, kind, body) == msg_bytes(relay, kind, [], body)


def test_encode_small_refuses_a_body_that_needs_chunks() -> None:
    with pytest.raises(ValueError, match="needs chunks"):
        encode_small(1, 0, b"x" * (256 * 1024 + 1))


def head(t: int, flags: int, count: int, relay: int, length: int) -> bytes:
    return struct.pack("!BBHII", t, flags, count, relay, length)


# ---------------------------------------------------------------- HELLO


def test_hello_round_trip_and_negotiation() -> None:
    d = BoundaryDecoder(LIMITS.max_body)
    d.feed(encode_hello("1.2.3", 7, BoundaryLimits(window_messages=5, heartbeat_timeout=3.5)))
    ev = d.next_event()
    assert ev == Hello(1, 1, "1.2.3", 7, 5, LIMITS.window_bytes, LIMITS.max_body, 3.5, LIMITS.max_relays)
    ours = Hello(1, 3, "2.0", 8, 1, 1, 1, 1.0)
    assert negotiate(ours, ev) == 1
    assert negotiate(ours, Hello(2, 5, "3.0", 9, 1, 1, 1, 1.0)) == 3


def test_a_version_mismatch_names_both_sides() -> None:
    ours = Hello(1, 1, "0.1.0", 1, 1, 1, 1, 1.0)
    with pytest.raises(BoundaryVersionError) as info:
        negotiate(ours, Hello(2, 4, "0.9.0", 2, 1, 1, 1, 1.0))
    text = str(info.value)
    assert "0.1.0" in text and "0.9.0" in text and "1-1" in text and "2-4" in text
    assert isinstance(info.value, ProtocolError)


def test_a_hello_that_repeats_ours_is_refused() -> None:
    h = Hello(1, 1, "0.1.0", 5, 1, 1, 1, 1.0)
    with pytest.raises(BoundaryProtocolError, match="repeats"):
        negotiate(h, h)


def test_garbage_instead_of_hello_is_named() -> None:
    d = BoundaryDecoder(100)
    with pytest.raises(BoundaryProtocolError, match="command not found"):
        d.feed(b"bash: python3: command not found\n")


def test_a_partial_magic_waits_and_a_wrong_byte_is_refused_at_once() -> None:
    d = BoundaryDecoder(100)
    d.feed(MAGIC[:5])
    assert d.next_event() is None
    with pytest.raises(BoundaryProtocolError):
        d.feed(b"X")


@pytest.mark.parametrize(
    "patch",
    [
        {"lo": 0},
        {"lo": 3, "hi": 2},
        {"window": 0},
        {"vlen": 200},
        {"version": b"\xff\xfe"},
    ],
)
def test_malformed_hello_fields_are_refused(patch: dict[str, object]) -> None:
    lo, hi = int(patch.get("lo", 1)), int(patch.get("hi", 1))  # type: ignore[call-overload]
    window = int(patch.get("window", 4))  # type: ignore[call-overload]
    version = patch.get("version", b"1.0")
    assert isinstance(version, bytes)
    vlen = int(patch.get("vlen", len(version)))  # type: ignore[call-overload]
    raw = MAGIC + struct.pack("!HHQIQQIIB", lo, hi, 1, window, 10, 10, 1000, 5, vlen) + version + b"\0" * 300
    with pytest.raises(BoundaryProtocolError):
        BoundaryDecoder(100).feed(raw)


# ---------------------------------------------------------------- frames


def test_every_frame_round_trips() -> None:
    d = decoder()
    d.feed(
        msg_bytes(0, 0, [], b"hello")
        + msg_bytes(3, 2, [2, 4, 6], b"call")
        + encode_credit(3, 10, 1000)
        + encode_close(5)
        + encode_fail(7, "node gone")
        + encode_ping(1)
        + encode_pong(1)
        + encode_goodbye("bye")
    )
    assert events(d) == [
        Msg(0, 0, (), b"hello"),
        Msg(3, 2, (2, 4, 6), b"call"),
        Credit(3, 10, 1000),
        Close(5),
        Fail(7, "node gone"),
        Ping(1),
        Pong(1),
        Goodbye("bye"),
    ]
    assert d.frames == 8 and d.buffered == 0


def test_a_large_body_goes_in_chunks_and_reads_back_fed_any_way() -> None:
    body = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 7)
    parts = encode_msg(9, 0, [1], body)
    assert len(parts) == 2 * 4  # one MSG and three CHUNK frames, each a head and a payload
    raw = b"".join(bytes(p) for p in parts) + encode_ping(5)
    for step in (1 << 20, 65536, 4093):
        d = decoder()
        for i in range(0, len(raw), step):
            d.feed(raw[i : i + step])
        assert events(d) == [Msg(9, 0, (1,), body), Ping(5)]


def test_control_frames_may_come_between_chunks() -> None:
    body = b"a" * (CHUNK_BYTES + 10)
    parts = [bytes(p) for p in encode_msg(1, 0, [], body)]
    d = decoder()
    d.feed(parts[0] + parts[1] + encode_ping(3) + encode_credit(4, 1, 1) + parts[2] + parts[3])
    assert events(d) == [Ping(3), Credit(4, 1, 1), Msg(1, 0, (), body)]


def test_a_body_over_the_cap_is_refused_on_its_announced_total() -> None:
    d = decoder(max_body=1000)
    # only the head and a few bytes of a "4 GiB" message: refused before any is kept
    pre = struct.pack("!BQ", 0, 2**32)
    with pytest.raises(BoundaryProtocolError, match="limit 1000"):
        d.feed(head(T_MSG, 1, 0, 1, len(pre) + 10) + pre + b"x" * 10)
    assert d.buffered < 100


def test_a_frame_over_the_frame_cap_is_refused_from_its_head() -> None:
    d = decoder()
    with pytest.raises(BoundaryProtocolError, match="frame of"):
        d.feed(head(T_CHUNK, 0, 0, 1, MAX_FRAME_PAYLOAD + 1))


def partial(relay: int = 1, total: int = CHUNK_BYTES + 5) -> BoundaryDecoder:
    d = decoder()
    parts = [bytes(p) for p in encode_msg(relay, 0, [], b"b" * total)]
    d.feed(parts[0] + parts[1])
    assert events(d) == []
    return d


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (msg_bytes(2, 0, [], b"x"), "began inside"),
        (head(T_CHUNK, 0, 0, 2, 5) + b"x" * 5, "outside its message"),
        (head(T_CHUNK, 0, 0, 1, 6) + b"x" * 6, "longer than"),
        (head(T_CHUNK, 1, 0, 1, 5) + b"x" * 5, "flags do not match"),
        (head(T_CHUNK, 0, 0, 1, 4) + b"x" * 4, "flags do not match"),
    ],
)
def test_chunks_out_of_their_message_are_refused(raw: bytes, what: str) -> None:
    d = partial()
    with pytest.raises(BoundaryProtocolError, match=what):
        d.feed(raw)


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (head(T_CHUNK, 0, 0, 1, 3) + b"abc", "outside its message"),
        (head(99, 0, 0, 0, 0), "unknown frame type"),
        (head(T_MSG, 4, 0, 0, 9) + struct.pack("!BQ", 0, 0), "unknown flags"),
        (head(4, 1, 0, 0, 0), "unknown flags"),
        (head(4, 0, 2, 0, 0), "port count"),
        (head(4, 0, 0, 0, 1) + b"x", "CLOSE with a payload"),
        (head(3, 0, 0, 0, 3) + b"abc", "CREDIT of 3"),
        (head(6, 0, 0, 0, 3) + b"abc", "PING"),
        (head(6, 0, 0, 1, 8) + b"\0" * 8, "PING"),
        (head(8, 0, 0, 1, 0), "GOODBYE for a relay"),
        (head(5, 0, 0, 1, 2) + b"\xff\xfe", "not UTF-8"),
        (head(5, 0, 0, 1, MAX_CAUSE + 1) + b"x" * (MAX_CAUSE + 1), "limit"),
        (head(T_MSG, 0, 0, 0, 3) + b"abc", "shorter than its head"),
        (head(T_MSG, 0, 0, 0, 9) + struct.pack("!BQ", 9, 0), "unknown message kind"),
        (head(T_MSG, 0, 2, 0, 17) + struct.pack("!BQII", 0, 0, 4, 4), "names one relay twice"),
        (head(T_MSG, 0, 0, 0, 10) + struct.pack("!BQ", 0, 5) + b"x", "does not match its total"),
        (head(T_MSG, 1, 0, 0, 10) + struct.pack("!BQ", 0, 1) + b"x", "does not match its total"),
        (head(T_MSG, 0, 5000, 0, 9) + struct.pack("!BQ", 0, 0), "ports in one message"),
    ],
)
def test_malformed_frames_are_refused(raw: bytes, what: str) -> None:
    d = decoder()
    with pytest.raises(BoundaryProtocolError, match=what):
        d.feed(raw)


def test_texts_are_cut_on_writing() -> None:
    d = decoder()
    d.feed(encode_fail(1, "é" * MAX_CAUSE) + encode_goodbye("x" * 5000))
    fail, bye = events(d)
    assert isinstance(fail, Fail) and len(fail.cause.encode()) <= MAX_CAUSE
    assert isinstance(bye, Goodbye) and len(bye.reason) == MAX_CAUSE


# ---------------------------------------------------------------- credit


def test_send_credit_holds_the_window_and_lets_one_large_message_go_alone() -> None:
    c = SendCredit(2, 100)
    assert c.can_send(1000)  # nothing in flight: a message over the byte window goes alone
    c.sent(1000)
    assert not c.can_send(1)
    c.credited(1, 1000)
    assert c.can_send(60)
    c.sent(60)
    assert not c.can_send(50) and c.can_send(40)
    c.sent(40)
    assert not c.can_send(0)  # two in flight: the message window
    with pytest.raises(BoundaryProtocolError, match="exceeds what is in flight"):
        c.credited(3, 0)


def test_recv_credit_refuses_a_sender_past_the_window_and_releases_in_batches() -> None:
    r = RecvCredit(8, 1000)
    r.received(5000)  # alone: allowed
    r.done(5000)
    assert r.release() == (1, 5000)  # over a quarter of the bytes
    for _ in range(8):
        r.received(10)
    with pytest.raises(BoundaryProtocolError, match="beyond its window"):
        r.received(10)
    r.done(10)
    assert r.release() is None  # one message, 10 bytes: under a quarter window
    assert r.release(force=True) == (1, 10)
    r.received(10)
    r2 = RecvCredit(8, 100)
    r2.received(60)
    with pytest.raises(BoundaryProtocolError):
        r2.received(50)


def test_limits_are_checked() -> None:
    for bad in (
        {"max_relays": 0},
        {"window_messages": 0},
        {"window_bytes": 0},
        {"max_body": 0},
        {"heartbeat_interval": 5.0, "heartbeat_timeout": 1.0},
        {"write_buffer_bytes": 0},
    ):
        with pytest.raises(ValueError):
            BoundaryLimits(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- fuzz

_FRAMES = st.one_of(
    st.builds(
        lambda r, k, ports, body: msg_bytes(r, k, sorted(set(ports)), body),
        st.integers(0, 2**32 - 1),
        st.integers(0, 5),
        st.lists(st.integers(0, 2**32 - 1), max_size=4),
        st.binary(max_size=64),
    ),
    st.builds(encode_credit, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**63)),
    st.builds(encode_close, st.integers(0, 2**32 - 1)),
    st.builds(encode_fail, st.integers(0, 2**32 - 1), st.text(max_size=20)),
    st.builds(encode_ping, st.integers(0, 2**64 - 1)),
    st.builds(encode_goodbye, st.text(max_size=20)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(_FRAMES, max_size=8), st.data())
def test_fuzz_any_bytes_give_events_or_a_boundary_protocol_error(
    frames: list[bytes], data: st.DataObject
) -> None:
    """Valid frames, then mutated (bytes flipped, cut, spliced, garbage
    appended), fed in random pieces: the decoder yields events or raises
    ``BoundaryProtocolError``, nothing else, and holds no more than a frame
    and one message."""
    raw = bytearray(b"".join(frames))
    for _ in range(data.draw(st.integers(0, 4))):
        if not raw:
            break
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i : i + data.draw(st.integers(1, 16))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    raw += data.draw(st.binary(max_size=32))
    d = decoder(max_body=1 << 16)
    at = 0
    try:
        while at < len(raw):
            n = data.draw(st.integers(1, 64))
            d.feed(bytes(raw[at : at + n]))
            at += n
            events(d)
            assert d.buffered <= HEAD_LEN + MAX_FRAME_PAYLOAD + (1 << 16)
    except BoundaryProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_any_opening_bytes(raw: bytes) -> None:
    d = BoundaryDecoder(1000)
    try:
        d.feed(raw)
        events(d)
    except BoundaryProtocolError:
        pass
