"""A hostile attached client for ``test_hostile_control.py``.

``python hostile_ctl_client.py RUNTIME_DIR NAME MODE ARGS...`` attaches to
the mesh ``NAME`` and attacks its control plane with the library's
internals, printing one JSON line per result; it then waits for stdin to
close (the test kills it on the way out).

Modes:

``inspect-flood N``
    its own node never answers the root's fan-out; ``N`` concurrent raw
    inspect requests with a one-hour timeout; prints ``{"started": N}``.
``call-flood SERVICE N``
    ``N`` concurrent calls ``"hang"`` to ``SERVICE``; prints
    ``{"busy": k, "first": <error>}`` once ``k`` were refused with ``ServiceBusy``
    (all but those the service may run or queue for one client).
``squat NAME VICTIM_HEX``
    raw ``Register`` messages: ``NAME`` claiming node ``VICTIM_HEX``, then
    a 1,000,000-character name and an escape sequence; prints each outcome.
``hellos``
    more hellos to the root's control port (a second session, malformed
    ones); prints whether its own session still answers.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import msgspec

import meshipc
from meshipc._channel import Port, Sender
from meshipc._control_msgs import CONTROL_PORT, Hello, InspectMesh, Register
from meshipc._ids import PortId
from meshipc._wire import K_DATA, K_REPLY


def emit(**obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def outcome(exc: BaseException | None, value: Any = None) -> dict[str, Any]:
    if exc is None:
        return {"ok": value}
    return {
        "error": type(exc).__name__,
        "type_name": getattr(exc, "type_name", None),
        "message": str(exc)[:200],
    }


class ForgedRegister(msgspec.Struct, tag="Register"):
    """The registration of the old protocol: it named its node."""

    name: str
    token: bytes
    node: bytes
    sender: Sender[Any]
    request_type: str | None = None
    reply_type: str | None = None


async def raw(ctl: Any, req: Any) -> dict[str, Any]:
    try:
        return outcome(None, await asyncio.wait_for(ctl._registry.call(req), 10))
    except (meshipc.MeshError, TimeoutError) as exc:
        return outcome(exc)


async def attack(conn: meshipc.Attachment, mode: str, args: list[str]) -> None:
    ctl = conn.mesh._control
    await conn.services()  # the session is open
    if mode == "inspect-flood":

        async def never(req: Any) -> Any:
            await asyncio.Event().wait()

        ctl.inspector.inspect = never  # this node never answers the fan-out
        n = int(args[0])
        calls = [asyncio.ensure_future(ctl._registry.call(InspectMesh("", None, 3600.0))) for _ in range(n)]
        emit(started=n)  # the test waits for the root to run them
        await asyncio.gather(*calls, return_exceptions=True)
    elif mode == "call-flood":
        tx = await conn.open(args[0])
        n, busy, first = int(args[1]), 0, None
        expect = n - meshipc.ControlLimits().client_calls - meshipc.ControlLimits().client_queued
        done = asyncio.Event()

        async def one() -> None:
            nonlocal busy, first
            try:
                await tx.call("hang")
            except meshipc.ServiceBusy as exc:
                busy += 1
                first = first or str(exc)
                if busy >= expect:
                    done.set()

        calls = [asyncio.ensure_future(one()) for _ in range(n)]
        await asyncio.wait_for(done.wait(), 30)
        emit(busy=busy, first=first)
        await asyncio.gather(*calls, return_exceptions=True)
    elif mode == "squat":
        name, victim = args[0], bytes.fromhex(args[1])
        tx, _rx = meshipc.channel()
        emit(forged=await raw(ctl, ForgedRegister(name, b"t" * 16, victim, tx)))
        tx2, _rx2 = meshipc.channel()
        emit(long=await raw(ctl, ForgedRegister("x" * 1_000_000, b"t" * 16, victim, tx2)))
        tx3, _rx3 = meshipc.channel()
        emit(escape=await raw(ctl, Register("evil\x1b[2J", b"t" * 16, tx3)))
        await asyncio.Event().wait()  # keep the name until killed
    elif mode == "hellos":
        engine, root = conn.mesh._node.engine, ctl._root_id
        answers = []
        for kind in (K_REPLY, K_DATA):  # a second session; a hello that is not final
            mine, theirs = engine.new_pair()
            hello = Hello(Port._wrap([theirs]), ctl.inspector.sender(), 1, 0, "x", "y", 0.0)
            st = engine.new_bound(bytes(PortId.random()), root, CONTROL_PORT)
            engine.send_value(st, kind, hello)
            try:
                answers.append(outcome(None, repr(await asyncio.wait_for(Port._wrap([mine]).recv(), 10))))
            except (meshipc.MeshError, TimeoutError) as exc:
                answers.append(outcome(exc))
        st = engine.new_bound(bytes(PortId.random()), root, CONTROL_PORT)
        engine.send_value(st, K_REPLY, {"not": "a hello"})
        emit(answers=answers, still=await raw(ctl, InspectMesh("mesh/nodes", None, 5.0)))
        await asyncio.Event().wait()


async def main() -> int:
    rd, name, mode, *args = sys.argv[1:]
    async with meshipc.connect(name, runtime_dir=rd) as conn:
        emit(node=bytes(conn.mesh.node_id).hex())
        work = asyncio.ensure_future(attack(conn, mode, args))
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.read()  # until the test closes stdin (or kills us)
        work.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
