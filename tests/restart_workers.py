"""Workers of ``tests/test_restart.py``.

``test_restart`` copies this file into a temporary folder under a fresh
module name and rewrites ``VERSION`` there between restarts: a successor
reports the version it finds on disk. The test process imports this copy
too (for ``Item`` and ``State``), as the version it started with.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec

import meshipc
from meshipc import Call, Receiver, Sender

VERSION = 1


class Item(msgspec.Struct, array_like=True):
    n: int


class State(msgspec.Struct):
    """What ``stream`` hands to its successor: its ports and a count."""

    items: Receiver[Item]
    calls: Receiver[Call[int]]
    out: Sender[Any]
    seen: int = 0


async def stream(state: State) -> State:
    """Forwards each item to ``out`` as ``[VERSION, n]`` and answers each
    call with ``[VERSION, request]``; on a restart, stops between two
    messages (``recv`` is safe to cancel) and returns its state."""
    state.out.send(["up", VERSION, os.getpid(), state.seen])

    async def items() -> None:
        async for item in state.items:
            state.seen += 1
            state.out.send([VERSION, item.n])

    async def calls() -> None:
        async for call in state.calls:
            call.reply([VERSION, call.request])

    work = [asyncio.ensure_future(items()), asyncio.ensure_future(calls())]
    await meshipc.restarting()
    for w in work:
        w.cancel()
    await asyncio.wait(work)
    return state


async def hang(out: Sender[Any]) -> Sender[Any]:
    """Ignores restarts: ``restart`` must kill it at its deadline."""
    out.send(["up", os.getpid()])
    await asyncio.Event().wait()
    return out


async def raise_on_restart(out: Sender[Any]) -> None:
    """Raises instead of handing over."""
    out.send(["up", os.getpid()])
    await meshipc.restarting()
    raise RuntimeError("refusing to restart")


async def serve_pid(arg: Any) -> None:
    """Crash-restart target (plain argument): serves its pid and version
    under the name ``arg`` until killed."""
    mesh = meshipc.current_mesh()

    async def handle(req: Any) -> Any:
        return [os.getpid(), VERSION]

    svc = mesh.serve(arg, handle)
    await svc
    await svc.wait_closed()


async def exit_with(code: int) -> None:
    """Exits at once with ``code`` (a clean return for 0)."""
    if code:
        os._exit(code)
