"""One request followed across processes (``_trace``): the trace context
and the deadline travel with service calls root -> worker A -> worker B,
in ``contextvars`` on both sides; OpenTelemetry's ids when installed."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import meshipc
import meshipc._trace
from memnet import Net
from meshipc import MessageError, ProtocolError, RemoteError
from meshipc._control_msgs import _Req, envelope
from meshipc._trace import _PREFIX, TRACE_LEN, Trace, outgoing, parse, parse_prefix
from meshipc._wire import (
    DATA_HEAD_LEN,
    F_OOB,
    F_TRACE,
    K_DATA,
    K_REPLY_ERROR,
    TRACE_PREFIX_LEN,
    FrameDecoder,
    data_frame,
    encode_event,
    encode_msg_header,
)
from relutil import wait_until, within


@pytest.fixture
def no_otel() -> Iterator[None]:
    """This process as if OpenTelemetry were not installed."""
    saved = list(meshipc._trace._OTEL)
    meshipc._trace._OTEL[:] = [None]
    try:
        yield
    finally:
        meshipc._trace._OTEL[:] = saved


@contextlib.asynccontextmanager
async def chain(rd: Path, otel: bool = False) -> AsyncIterator[meshipc.Mesh]:
    """A mesh with worker "a" (serving "a", which calls "b") and worker "b"."""
    async with meshipc.Mesh(runtime_dir=rd) as mesh:
        ready_tx, ready_rx = meshipc.channel(str)
        await mesh.spawn(
            "trace_workers:chain", {"name": "b", "ready": ready_tx.clone(), "otel": otel}, name="b"
        )
        await mesh.spawn(
            "trace_workers:chain",
            {"name": "a", "next": "b", "ready": ready_tx.clone(), "otel": otel},
            name="a",
        )
        assert sorted([await within(ready_rx.recv()), await within(ready_rx.recv())]) == ["a", "b"]
        yield mesh


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_trace_follows_a_call_root_to_a_to_b(runtime_dir: Path, no_otel: None) -> None:
    seen = Collect()
    logging.getLogger("tracew").addHandler(seen)
    async with chain(runtime_dir) as mesh:
        with meshipc.start_trace() as t:
            assert meshipc.current_trace() is t
            got = await within(mesh.call("a", None))
        a_trace, a_span, a_parent = got["me"]
        b_trace, b_span, b_parent = got["next"]["me"]
        assert a_trace == b_trace == t.trace_id.hex()
        assert a_parent == t.span_id.hex() and b_parent == a_span  # the expected parent links
        assert len({t.span_id.hex(), a_span, b_span}) == 3
        assert str(t) == f"{t.trace_id.hex()}-{t.span_id.hex()}"
        assert meshipc.current_trace() is None
    logging.getLogger("tracew").removeHandler(seen)
    # the workers' log lines, forwarded to the root, name the trace and span they were logged in
    by_node = {r.meshipc_node: r.meshipc_trace for r in seen.records}  # type: ignore[attr-defined]
    assert by_node == {"a": f"{a_trace}-{a_span}", "b": f"{b_trace}-{b_span}"}


async def test_without_a_trace_a_handler_starts_one(runtime_dir: Path, no_otel: None) -> None:
    async with chain(runtime_dir) as mesh:
        got = await within(mesh.call("a", None))
        a_trace, a_span, a_parent = got["me"]
        b_trace, _, b_parent = got["next"]["me"]
        assert a_trace is not None and a_parent is None  # a new trace at the first hop
        assert b_trace == a_trace and b_parent == a_span


def test_the_context_costs_no_byte_when_unset(no_otel: None) -> None:
    assert outgoing(None) == (None, None)
    # the envelope is byte for byte what it was before traces existed
    assert msgspec.msgpack.encode(_Req(None, 5)) == msgspec.msgpack.encode(["meshipc.req", None, 5])
    assert msgspec.msgpack.encode(_Req(1.5, "x")) == msgspec.msgpack.encode(["meshipc.req", 1.5, "x"])
    with meshipc.start_trace() as t:
        _, wire = outgoing(None)
        assert wire is not None and len(wire) == TRACE_LEN and parse(wire).span_id == t.span_id
        extra = len(msgspec.msgpack.encode(envelope(None, 5, wire))) - len(
            msgspec.msgpack.encode(_Req(None, 5))
        )
        assert extra <= TRACE_LEN + 2


def test_malformed_contexts_are_refused() -> None:
    good = b"\x01" * 16 + b"\x02" * 8 + b"\x01"
    assert parse(good) == Trace(b"\x01" * 16, b"\x02" * 8, None, True)
    for bad in (b"", good[:-1], good + b"\x00", b"\x00" * 16 + good[16:], good[:16] + b"\x00" * 8 + b"\x01",
                good[:-1] + b"\x07", "text", 5):  # fmt: skip
        with pytest.raises(MessageError):
            parse(bad)


async def test_a_malformed_context_fails_that_call_only(runtime_dir: Path) -> None:
    async with chain(runtime_dir) as mesh:
        b = await mesh.open("b")
        with pytest.raises(RemoteError, match="trace context"):
            await within(meshipc.Sender.call(b, envelope(None, 1, b"short")))
        assert (await within(mesh.call("b", None)))["me"][0] is not None  # the service goes on


async def test_a_nested_call_inherits_the_deadline_and_is_cancelled_with_it(runtime_dir: Path) -> None:
    async with chain(runtime_dir) as mesh:
        with pytest.raises(TimeoutError):
            await mesh.call("a.hang", None, timeout=0.5)
        # b's handler ran with a's deadline (no later), and was cancelled when it passed
        await wait_until(lambda: _state(mesh, "b", "cancelled"), "b's handler to be cancelled")
        b = await within(mesh.call("b.state", None))
        a = await within(mesh.call("a.state", None))
        assert 0 < b["remaining"] <= a["remaining"] <= 0.5
        # a's handler is cancelled too; a and b learn it independently, in either order
        await wait_until(lambda: _state(mesh, "a", "cancelled"), "a's handler to be cancelled")


async def test_cancelling_the_outer_call_reaches_the_inner_one(runtime_dir: Path) -> None:
    async with chain(runtime_dir) as mesh:
        outer = asyncio.ensure_future(mesh.call("a.hang", None))  # no deadline anywhere
        await wait_until(lambda: _state(mesh, "b", "started"), "the call to reach b")
        assert (await within(mesh.call("b.state", None)))["remaining"] is None
        outer.cancel()
        await wait_until(lambda: _state(mesh, "b", "cancelled"), "b's handler to be cancelled")
        await wait_until(lambda: _state(mesh, "a", "cancelled"), "a's handler to be cancelled")


async def _state(mesh: meshipc.Mesh, worker: str, key: str) -> bool:
    return bool((await within(mesh.call(f"{worker}.state", None))).get(key))


# ------------------------------------------------------------------ OpenTelemetry

has_sdk = importlib.util.find_spec("opentelemetry") is not None and (
    importlib.util.find_spec("opentelemetry.sdk") is not None
)


@pytest.mark.skipif(not has_sdk, reason="opentelemetry-sdk is not installed (pip install opentelemetry-sdk)")
async def test_opentelemetry_spans_form_one_trace_root_a_b(runtime_dir: Path) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    async with chain(runtime_dir, otel=True) as mesh:
        with tracer.start_as_current_span("root") as root:
            ours = meshipc.current_trace()
            got = await within(mesh.call("a", None))
        a_spans = await within(mesh.call("a.spans", None))
        b_spans = await within(mesh.call("b.spans", None))
    rc = root.get_span_context()
    assert ours is not None and ours.trace_id == rc.trace_id.to_bytes(16, "big")
    (a_span,) = [s for s in a_spans if s[0] == "meshipc.call a"]
    (b_span,) = [s for s in b_spans if s[0] == "meshipc.call b"]
    assert a_span[1] == b_span[1] == f"{rc.trace_id:032x}"  # one trace
    assert a_span[3] == f"{rc.span_id:016x}" and b_span[3] == a_span[2]  # root -> a -> b
    # meshipc.current_trace() in the handlers names the same spans
    assert got["me"][1] == a_span[2] and got["next"]["me"][1] == b_span[2]
    assert [s.name for s in exporter.get_finished_spans()] == ["root"]
    del trace


# ------------------------------------------------------------------ plain calls and sends

@contextlib.asynccontextmanager
async def rpc_chain(
    rd: Path, otel: bool = False
) -> AsyncIterator[tuple[meshipc.Mesh, meshipc.Sender[Any], meshipc.Sender[Any], meshipc.Receiver[Any]]]:
    """Workers "a" and "b" serving plain ``Rpc`` channels (no named
    service), a's handler calling b's; yields the mesh, a's and b's
    senders and the receiver a's handler sends a note to."""
    async with meshipc.Mesh(runtime_dir=rd) as mesh:
        ready_tx, ready_rx = meshipc.channel()
        sink_tx, sink_rx = meshipc.channel()
        await mesh.spawn("trace_workers:rpc_chain", {"name": "b", "ready": ready_tx.clone(), "otel": otel})
        b = await within(ready_rx.recv())
        await mesh.spawn(
            "trace_workers:rpc_chain",
            {"name": "a", "next": b.clone(), "sink": sink_tx, "ready": ready_tx.clone(), "otel": otel},
        )
        a = await within(ready_rx.recv())
        yield mesh, a, b, sink_rx


async def test_plain_rpc_calls_root_a_b_form_one_trace(runtime_dir: Path, no_otel: None) -> None:
    async with rpc_chain(runtime_dir) as (_, a, _b, sink):
        with meshipc.start_trace() as t:
            got = await within(a.call("go"))
        a_trace, a_span, a_parent = got["me"]
        b_trace, b_span, b_parent = got["next"]["me"]
        assert a_trace == b_trace == t.trace_id.hex()
        assert a_parent == t.span_id.hex() and b_parent == a_span
        assert len({t.span_id.hex(), a_span, b_span}) == 3
        # the send a's handler made carries the trace, its span the sender's
        note, trace = await within(sink.recv_traced())
        assert note == ["a", a_trace, a_span, a_parent]
        assert trace is not None and (trace.trace_id.hex(), trace.span_id.hex()) == (a_trace, a_span)
        # outside a trace, a call carries none: the first handler starts one
        got = await within(a.call("go"))
        assert got["me"][0] not in (None, a_trace) and got["me"][2] is None
        assert got["next"]["me"][0] == got["me"][0] and got["next"]["me"][2] == got["me"][1]
        assert (await within(sink.recv_traced()))[1] is not None  # a's handler has its own trace


async def test_a_nested_plain_call_inherits_the_deadline(runtime_dir: Path) -> None:
    async with rpc_chain(runtime_dir) as (_, a, b, _sink):
        with pytest.raises(TimeoutError):
            await a.call("hang", timeout=0.5)
        # b ran with a's deadline (no later), and saw the call given up when it passed
        await wait_until(lambda: _got(b, "cancelled"), "b's handler to see its caller give up")
        sa, sb = await within(a.call("state")), await within(b.call("state"))
        assert 0 < sb["remaining"] <= sa["remaining"] <= 0.5
        # a's inner call ended at the deadline a's caller set, or a's handler was
        # cancelled as its caller gave up (whichever came first)
        assert sa.get("timed_out") or sa.get("cancelled")


async def test_cancelling_a_plain_outer_call_reaches_the_inner_one(runtime_dir: Path) -> None:
    async with rpc_chain(runtime_dir) as (_, a, b, _sink):
        outer = asyncio.ensure_future(a.call("hang"))  # no deadline anywhere
        await wait_until(lambda: _got(b, "started"), "the call to reach b")
        assert (await within(b.call("state")))["remaining"] is None
        outer.cancel()
        await wait_until(lambda: _got(b, "cancelled"), "b's handler to see its caller give up")
        assert (await within(a.call("state")))["cancelled"]  # a's handler was cancelled


async def _got(tx: meshipc.Sender[Any], key: str) -> bool:
    return bool((await within(tx.call("state"))).get(key))


def _frames(net: Net) -> list[bytes]:
    """The frames waiting on engine 0's link to engine 1, as the wire has them."""
    return [encode_event(ev) for ev, _ in net.links.get((0, 1), ())]


def test_untraced_messages_are_byte_for_byte_unchanged(no_otel: None) -> None:
    net = Net(2)
    pa, pb = net.pair(0, 1)
    peer, seq = pb._states[0].id, pa._states[0].send_seq
    pa.send({"x": 1})  # no context set: the frame it always was, flags 0 and the body alone
    assert _frames(net) == [data_frame(peer, seq, K_DATA, msgspec.msgpack.encode({"x": 1}))]
    with meshipc.start_trace() as t:
        pa.send({"x": 2})
    pa.send({"x": 3})  # the context ended with the block: nothing more is carried
    _, f2, f3 = _frames(net)
    body = msgspec.msgpack.encode({"x": 2})
    n = TRACE_PREFIX_LEN + len(body)
    assert f2[: 4 + DATA_HEAD_LEN] == encode_msg_header(peer, seq + 1, K_DATA, F_TRACE, [], 0, n)
    assert f2[4 + DATA_HEAD_LEN :] == t.trace_id + t.span_id + b"\x01" + bytes(8) + body  # 33 bytes, the body
    assert f3 == data_frame(peer, seq + 2, K_DATA, msgspec.msgpack.encode({"x": 3}))
    net.run()
    assert asyncio.run(_recv_traced(pb, 3)) == [
        ({"x": 1}, None),
        ({"x": 2}, Trace(t.trace_id, t.span_id, None, True)),
        ({"x": 3}, None),
    ]
    assert pb.bad_messages == 0


async def _recv_traced(p: meshipc.Port[Any], n: int) -> list[tuple[Any, Trace | None]]:
    return [await within(p.recv_traced()) for _ in range(n)]


def _traced_frame(port: bytes, seq: int, kind: int, ctx: bytes, body: bytes) -> bytes:
    return encode_msg_header(port, seq, kind, F_TRACE, [], 0, len(ctx) + len(body)) + ctx + body


def test_a_message_with_a_malformed_context_is_refused_and_the_port_goes_on(no_otel: None) -> None:
    good = _PREFIX.pack(b"\x01" * 16, b"\x02" * 8, 1, 0.0)
    for bad in (
        _PREFIX.pack(bytes(16), b"\x02" * 8, 1, 0.0),  # zero trace id
        _PREFIX.pack(b"\x01" * 16, bytes(8), 1, 0.0),  # zero span id
        _PREFIX.pack(b"\x01" * 16, b"\x02" * 8, 0x81, 0.0),  # unknown flags
        _PREFIX.pack(b"\x01" * 16, b"\x02" * 8, 3, math.nan),  # a deadline that is no time
        _PREFIX.pack(b"\x01" * 16, b"\x02" * 8, 3, -1.0),
        _PREFIX.pack(b"\x01" * 16, b"\x02" * 8, 1, 5.0),  # time left without a deadline
    ):
        with pytest.raises(MessageError, match="trace context"):
            parse_prefix(bad)
        net = Net(2)
        ea, eb = net.engines
        pa, pb = net.pair(0, 1)
        peer, seq = pb._states[0].id, pb._states[0].recv_seq
        frames = _traced_frame(peer, seq, K_DATA, bad, b"\x01")
        frames += _traced_frame(peer, seq + 1, K_DATA, good, b"\x02")
        for ev in FrameDecoder().feed(frames):
            eb.receive(ea.node_id, ev)
        assert asyncio.run(_recv_traced(pb, 1)) == [(2, Trace(b"\x01" * 16, b"\x02" * 8, None, True))]
        assert pb.bad_messages == 1
        # a call with one is failed, the caller told why
        # (pa is left open: its frames were forged, a close would not follow them)
        pc, pd = net.pair(0, 1)
        reply = ea.call_plain(pc._states[0], msgspec.msgpack.encode("req"), bad)
        assert reply is not None
        net.run()
        with pytest.raises(asyncio.QueueEmpty):
            pd.try_recv()
        net.run()
        (answer,) = reply.queue
        assert answer.kind == K_REPLY_ERROR and b"trace context" in (answer.body or b"")
        assert pd.bad_messages == 1
        pb.send(3)  # both ports go on
        pd.send(4)
        net.run()
        assert (pa.try_recv(), pc.try_recv()) == (3, 4)


def test_the_frame_of_a_traced_message_is_checked() -> None:
    assert _PREFIX.size == TRACE_PREFIX_LEN
    short = encode_msg_header(b"p" * 16, 0, K_DATA, F_TRACE, [], 0, 5) + b"\x00" * 5
    with pytest.raises(ProtocolError, match="trace context"):
        FrameDecoder().feed(short)
    oob = encode_msg_header(b"p" * 16, 0, K_DATA, F_TRACE | F_OOB, [], 1, 8) + bytes(8)
    with pytest.raises(ProtocolError, match="trace context"):
        FrameDecoder().feed(oob)


@pytest.mark.skipif(not has_sdk, reason="opentelemetry-sdk is not installed (pip install opentelemetry-sdk)")
async def test_opentelemetry_spans_over_plain_rpc_calls_form_one_trace(runtime_dir: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    async with rpc_chain(runtime_dir, otel=True) as (_, a, b, sink):
        with tracer.start_as_current_span("root") as root:
            got = await within(a.call("go"))
        a_spans, b_spans = await within(a.call("spans")), await within(b.call("spans"))
        _, note_trace = await within(sink.recv_traced())
    rc = root.get_span_context()
    (a_span,) = [s for s in a_spans if s[0] == "meshipc.call"]
    (b_span,) = [s for s in b_spans if s[0] == "meshipc.call"]
    assert a_span[1] == b_span[1] == f"{rc.trace_id:032x}"  # one trace
    assert a_span[3] == f"{rc.span_id:016x}" and b_span[3] == a_span[2]  # root -> a -> b
    assert got["me"][1] == a_span[2] and got["next"]["me"][1] == b_span[2]
    assert note_trace is not None and note_trace.span_id.hex() == a_span[2]  # a's send: a's span


async def test_a_receiver_mode_service_handler_opts_in(runtime_dir: Path, no_otel: None) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        _tx, rx = meshipc.channel(meshipc.Call[Any])
        await mesh.serve("r", rx)

        async def server() -> None:
            async for call in rx:
                with call.handling():
                    t = meshipc.current_trace()
                    assert t is not None
                    call.reply([t.trace_id.hex(), t.parent_id.hex() if t.parent_id else None, call.remaining])

        task = asyncio.ensure_future(server())
        try:
            with meshipc.start_trace() as t:
                got = await within(mesh.call("r", None, timeout=5))
            assert got[:2] == [t.trace_id.hex(), t.span_id.hex()] and 0 < got[2] <= 5
        finally:
            task.cancel()
