"""One request followed across processes (``_trace``): the trace context
and the deadline travel with service calls root -> worker A -> worker B,
in ``contextvars`` on both sides; OpenTelemetry's ids when installed."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

import meshipc
import meshipc._trace
from meshipc import MessageError, RemoteError
from meshipc._control_msgs import _Req, envelope
from meshipc._trace import TRACE_LEN, Trace, outgoing, parse
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
        assert a["cancelled"]


async def test_cancelling_the_outer_call_reaches_the_inner_one(runtime_dir: Path) -> None:
    async with chain(runtime_dir) as mesh:
        outer = asyncio.ensure_future(mesh.call("a.hang", None))  # no deadline anywhere
        await wait_until(lambda: _state(mesh, "b", "started"), "the call to reach b")
        assert (await within(mesh.call("b.state", None)))["remaining"] is None
        outer.cancel()
        await wait_until(lambda: _state(mesh, "b", "cancelled"), "b's handler to be cancelled")
        assert (await within(mesh.call("a.state", None)))["cancelled"]


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
