"""A ``meshipc.sync`` client in its own process, for ``test_sync.py``.

``python sync_client.py RUNTIME_DIR NAME MODE ARGS...`` attaches with
``meshipc.sync.connect`` and prints one JSON line per result on stdout.
Errors print as ``{"error": <class>, "message": ...}``; every mode ends
with ``{"stats": {...}}`` (``SyncConnection.stats()``) and exits 0: the
process outlives whatever the service did.

Modes:

``threads N K``
    ``N`` threads at once, each ``K`` calls of ``echo`` with requests of its
    own (``[thread, i]``); prints ``{"wrong": [...], "errors": [...],
    "calls": N * K}`` (replies that were not the thread's own request).
``hold TIMEOUT``
    one call of ``echo`` with ``"hold"`` (bounded by ``TIMEOUT``), printing
    ``{"held": outcome}``, then one more call ``"after"``, printing
    ``{"after": outcome}`` (outcome: the reply or the error).
``interrupt``
    one call of ``echo`` with ``"hold"`` from the main thread, which the
    test interrupts (SIGINT): prints ``{"interrupted": true}`` once it
    raised ``KeyboardInterrupt``, then ``{"after": outcome}`` of one more call.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import asdict
from typing import Any

import meshipc
import meshipc.sync


def emit(**obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def outcome(fn: Any) -> Any:
    try:
        return {"reply": fn()}
    except meshipc.MeshError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    except TimeoutError as exc:
        return {"error": "TimeoutError", "message": str(exc)}


def threads(conn: meshipc.sync.SyncConnection, n: int, k: int) -> None:
    wrong: list[Any] = []
    errors: list[str] = []
    start = threading.Barrier(n)

    def caller(t: int) -> None:
        start.wait()
        for i in range(k):
            try:
                reply = conn.call("echo", [t, i], timeout=30)
            except Exception as exc:
                errors.append(repr(exc))
                continue
            if reply != [t, i]:
                wrong.append([t, i, reply])

    ts = [threading.Thread(target=caller, args=(t,)) for t in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    emit(wrong=wrong, errors=errors, calls=n * k)


def main() -> int:
    rd, name, mode, *args = sys.argv[1:]
    with meshipc.sync.connect(name, runtime_dir=rd) as conn:
        if mode == "threads":
            threads(conn, int(args[0]), int(args[1]))
        elif mode == "hold":
            timeout = float(args[0])
            emit(held=outcome(lambda: conn.call("echo", "hold", timeout=timeout)))
            emit(after=outcome(lambda: conn.call("echo", "after", timeout=timeout)))
        elif mode == "interrupt":
            try:
                conn.call("echo", "hold")
            except KeyboardInterrupt:
                emit(interrupted=True)
            emit(after=outcome(lambda: conn.call("echo", "after", timeout=30)))
        else:
            emit(error="usage", message=f"unknown mode {mode}")
        emit(stats=asdict(conn.stats()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
