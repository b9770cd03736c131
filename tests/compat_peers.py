"""Services and clients in their own processes, for ``test_versions.py`` and
``test_reconnect.py``.

Run as ``python compat_peers.py MODE RUNTIME_DIR NAME ...``. Each process
talks to the test through one JSON line per event on stdout (and, for the
looping clients, ``stop`` on stdin), never through files or sleeps. The
protocol versions a process offers come from ``MESHIPC_TEST_PROTOCOL`` in
its environment (the test hook, read when its node starts).

Modes:

``service RUNTIME_DIR NAME``
    own ``Mesh(name=NAME)`` with a listener; serve ``echo``, which answers
    ``{"pid": <its pid>, "req": request}``, and holds a request ``"hold"``
    unanswered (printing ``{"held": true}``: a call is in flight). Prints
    ``{"ready": pid}`` once it takes clients, then runs until killed.
``call RUNTIME_DIR NAME``
    ``connect``, one ``echo`` call; prints ``{"reply": ..., "protocol": V,
    "inspected": [V]}`` (``V``: the version of its link to the service, from
    ``Mesh.stats()`` and from its inspect tree) or the error.
``loop RUNTIME_DIR NAME sync|async reconnect|once TIMEOUT``
    ``connect`` (``reconnect=True`` or not; ``meshipc.sync`` or asyncio),
    then calls ``echo`` in a loop (each call bounded by ``TIMEOUT``): ``LOOP``
    calls, then ``"hold"`` (the test kills the service while it is held),
    printing ``{"attached": pid}`` before it and ``{"in_flight": ERROR}``
    after. Then, with ``reconnect``, calls until one is answered by another
    service process, printing ``{"recovered": pid, "errors": [...],
    "reconnects": n, "took": s}``; with ``once``, one more call, printing
    ``{"later": ERROR}``.

Errors print as ``{"error": <class>, "message": ...}`` (``ERROR`` above is
such a dict); a failed attach exits with status 3.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import meshipc
import meshipc.sync

#: Plain calls each looping client makes before its held one.
LOOP = 50


def emit(**obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def described(exc: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, meshipc.VersionMismatch):
        out.update(ours=list(exc.ours), theirs=list(exc.theirs))
    return out


async def service(rd: str, name: str) -> int:
    async def echo(req: Any) -> Any:
        if req == "hold":
            emit(held=True)
            await asyncio.Event().wait()
        return {"pid": os.getpid(), "req": req}

    async with meshipc.Mesh(name=name, runtime_dir=rd) as mesh:
        await mesh.listen()
        await mesh.serve("echo", echo)
        emit(ready=os.getpid())
        await asyncio.Event().wait()
    return 0


def link_protocol(conn: meshipc.Attachment) -> int:
    """The protocol version of ``conn``'s link to the service (its root)."""
    node = conn.mesh.stats().node
    (link,) = node.links
    return link.protocol


async def call(rd: str, name: str) -> int:
    try:
        conn = await meshipc.connect(name, runtime_dir=rd)
    except meshipc.JoinError as exc:
        emit(**described(exc))
        return 3
    async with conn:
        reply = await conn.call("echo", "x", timeout=10)
        mine = bytes(conn.mesh.node_id).hex()[:12]
        links = await conn.inspect(f"nodes/{mine}/connections", timeout=5)
        emit(reply=reply, protocol=link_protocol(conn), inspected=[c["protocol"] for c in links.values()])
    return 0


class Loop:
    """The looping client's steps over either API: ``call(request)``
    returns the reply or raises; ``reconnects()``."""

    def __init__(self, call: Callable[[Any], Any], reconnects: Callable[[], int]) -> None:
        self.call = call
        self.reconnects = reconnects

    def run(self, reconnect: bool) -> None:
        pid = None
        for i in range(LOOP):
            pid = self.call(i)["pid"]
        emit(attached=pid)
        try:
            self.call("hold")
        except meshipc.MeshError as exc:
            emit(in_flight=described(exc))
        else:
            emit(in_flight=None)
        if not reconnect:
            try:
                self.call("later")
            except meshipc.MeshError as exc:
                emit(later=described(exc))
            else:
                emit(later=None)
            return
        errors = []
        t = time.monotonic()
        while True:
            try:
                reply = self.call("again")
            except meshipc.MeshError as exc:
                errors.append(described(exc))
                if len(errors) > 20:
                    break
                continue
            if reply["pid"] != pid:
                break
        emit(
            recovered=reply["pid"],
            errors=errors,
            reconnects=self.reconnects(),
            took=time.monotonic() - t,
        )


def loop_sync(rd: str, name: str, reconnect: bool, timeout: float) -> int:
    try:
        conn = meshipc.sync.connect(name, runtime_dir=rd, reconnect=reconnect)
    except meshipc.JoinError as exc:
        emit(**described(exc))
        return 3
    with conn:
        Loop(lambda r: conn.call("echo", r, timeout=timeout), lambda: conn.reconnects).run(reconnect)
    return 0


async def loop_async(rd: str, name: str, reconnect: bool, timeout: float) -> int:
    try:
        conn = await meshipc.connect(name, runtime_dir=rd, reconnect=reconnect)
    except meshipc.JoinError as exc:
        emit(**described(exc))
        return 3
    async with conn:
        # the blocking steps run in a thread; each call goes to this loop
        loop = asyncio.get_running_loop()

        def call(r: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(conn.call("echo", r, timeout=timeout), loop).result()

        await asyncio.to_thread(Loop(call, lambda: conn.reconnects).run, reconnect)
    return 0


def main(argv: list[str]) -> int:
    mode, rd, name, *args = argv
    if mode == "service":
        return asyncio.run(service(rd, name))
    if mode == "call":
        return asyncio.run(call(rd, name))
    if mode == "loop":
        api, how, timeout = args
        if api == "sync":
            return loop_sync(rd, name, how == "reconnect", float(timeout))
        return asyncio.run(loop_async(rd, name, how == "reconnect", float(timeout)))
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
