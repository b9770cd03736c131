"""Worker functions for ``test_trace.py``: services that report the trace
context and deadline they run with, and call on down a chain."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import meshipc
from meshipc import Sender

#: what the handlers of this process saw (returned by the "state" service)
STATE: dict[str, Any] = {}


def _me() -> list[str | None]:
    t = meshipc.current_trace()
    if t is None:
        return [None, None, None]
    return [t.trace_id.hex(), t.span_id.hex(), t.parent_id.hex() if t.parent_id else None]


def _otel(on: bool) -> Any:
    """An OpenTelemetry SDK provider with an in-memory exporter for this process."""
    if not on:
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def chain(arg: dict[str, Any]) -> None:
    """Serve ``arg["name"]``: reply with this handler's trace ids and, if
    ``arg["next"]`` names a service, what that one replied. Also serve
    ``<name>.hang`` (calls ``<next>.hang``, or waits forever, recording its
    deadline and whether it was cancelled) and ``<name>.state``."""
    mesh = meshipc.current_mesh()
    name, nxt = arg["name"], arg.get("next")
    exporter = _otel(arg.get("otel", False))

    async def handle(req: Any) -> Any:
        logging.getLogger("tracew").warning("handling %s", name)
        me = _me()
        inner = await mesh.call(nxt, req) if nxt else None
        return {"me": me, "next": inner}

    async def hang(req: Any) -> Any:
        d = meshipc._trace.current_deadline()
        STATE["remaining"] = None if d is None else d - time.monotonic()
        STATE["started"] = True
        try:
            if nxt:
                return await mesh.call(f"{nxt}.hang", req)
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            STATE["cancelled"] = True
            raise

    async def state(req: Any) -> Any:
        return dict(STATE)

    async def spans(req: Any) -> Any:
        return [
            [s.name, f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}",
             f"{s.parent.span_id:016x}" if s.parent else None]
            for s in exporter.get_finished_spans()
        ]  # fmt: skip

    services = [
        mesh.serve(name, handle),
        mesh.serve(f"{name}.hang", hang),
        mesh.serve(f"{name}.state", state),
    ]
    if exporter is not None:
        services.append(mesh.serve(f"{name}.spans", spans))
    for s in services:
        await s
    ready: Sender[str] = arg["ready"]
    ready.send(name)
    await asyncio.Event().wait()


async def rpc_chain(arg: dict[str, Any]) -> None:
    """A plain ``Rpc`` server (no named service): its sender goes back on
    ``arg["ready"]``; each call is handled in ``with call.handling()``
    and, for ``"go"``, calls on to ``arg["next"]`` (a plain ``Sender``)
    and sends a note to ``arg["sink"]`` while handling it. ``"hang"``
    calls on, or waits until its caller gives up; ``"state"``/``"spans"``
    report what this process saw."""
    name, nxt, sink = arg["name"], arg.get("next"), arg.get("sink")
    exporter = _otel(arg.get("otel", False))
    tx, rx = meshipc.channel(meshipc.Rpc[Any, Any])

    async def handle(call: meshipc.Rpc[Any, Any]) -> None:
        if call.request == "state":
            call.reply(dict(STATE))
            return
        if call.request == "spans":
            call.reply(
                [[s.name, f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}",
                  f"{s.parent.span_id:016x}" if s.parent else None]
                 for s in exporter.get_finished_spans()]
            )  # fmt: skip
            return
        with call.handling():
            me = _me()
            if call.request == "hang":
                STATE["remaining"] = call.remaining
                STATE["started"] = True
                try:
                    if nxt is not None:
                        await nxt.call("hang")
                    else:
                        await call.wait_cancelled()
                        STATE["cancelled"] = True
                        return
                except TimeoutError:
                    STATE["timed_out"] = True
                    return
                except asyncio.CancelledError:
                    STATE["cancelled"] = True
                    raise
            if sink is not None:
                sink.send([name, *me])  # a send made while handling the call
            inner = await nxt.call(call.request) if nxt is not None else None
        call.reply({"me": me, "next": inner})

    ready: Sender[Any] = arg["ready"]
    ready.send(tx)
    tasks = set()
    async for call in rx:
        t = asyncio.get_running_loop().create_task(handle(call))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
