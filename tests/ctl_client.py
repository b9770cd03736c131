"""An attached control client for ``test_control.py``.

``python ctl_client.py RUNTIME_DIR NAME MODE ARGS...`` attaches to the mesh
``NAME`` and prints one JSON line per result on stdout:
``{"reply": ...}`` or ``{"error": <class>, "message": ..., "type_name": ...}``.

Modes:

``call SERVICE JSON [TIMEOUT]``
    ``conn.call`` once.
``calls SERVICE JSON N``
    ``conn.open`` then ``N`` calls on that sender; prints the last reply.
``services``
    ``conn.services()``.
``inspect PATH DEPTH TIMEOUT [sensitive]``
    ``conn.inspect``; DEPTH ``-`` for no limit; prints ``{"reply": tree, "elapsed": s}``.
``serve SERVICE``
    register ``SERVICE`` (reply ``{"from": pid, "request": r}``), print
    ``{"ready": true}`` once the registry confirmed it (or the error), then
    serve until killed.
``sync-call SERVICE JSON``
    the same as ``call`` through ``meshipc.sync``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import meshipc


def emit(**obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def emit_error(exc: BaseException) -> None:
    emit(
        # a remote error's class is also its remote type's (RemoteValueError)
        error="RemoteError" if isinstance(exc, meshipc.RemoteError) else type(exc).__name__,
        message=str(exc),
        type_name=getattr(exc, "type_name", None),
        service=getattr(exc, "service", None),
    )


async def run(rd: str, name: str, mode: str, args: list[str]) -> int:
    async with meshipc.connect(name, runtime_dir=rd) as conn:
        try:
            if mode == "call":
                timeout = float(args[2]) if len(args) > 2 else None
                emit(reply=await conn.call(args[0], json.loads(args[1]), timeout=timeout))
            elif mode == "calls":
                tx = await conn.open(args[0])
                reply = None
                for _ in range(int(args[2])):
                    reply = await tx.call(json.loads(args[1]))
                tx.close()
                emit(reply=reply)
            elif mode == "services":
                emit(reply=await conn.services())
            elif mode == "inspect":
                depth = None if args[1] == "-" else int(args[1])
                t0 = time.monotonic()
                tree = await conn.inspect(args[0], depth, float(args[2]), sensitive="sensitive" in args[3:])
                emit(reply=tree, elapsed=time.monotonic() - t0)
            elif mode == "serve":

                async def handler(request: Any) -> Any:
                    return {"from": os.getpid(), "request": request}

                svc = conn.mesh.serve(args[0], handler)
                await svc
                emit(ready=True)
                await svc.wait_closed()
            else:
                emit(error="usage", message=f"unknown mode {mode}")
                return 2
        except (meshipc.MeshError, TimeoutError, LookupError) as exc:
            emit_error(exc)
            return 1
    return 0


def sync_main(rd: str, name: str, mode: str, args: list[str]) -> int:
    with meshipc.sync.connect(name, runtime_dir=rd) as conn:
        try:
            if mode == "sync-call":
                emit(reply=conn.call(args[0], json.loads(args[1]), timeout=10))
            return 0
        except (meshipc.MeshError, TimeoutError) as exc:
            emit_error(exc)
            return 1


def main() -> int:
    rd, name, mode, *args = sys.argv[1:]
    if mode.startswith("sync-"):
        return sync_main(rd, name, mode, args)
    return asyncio.run(run(rd, name, mode, args))


if __name__ == "__main__":
    sys.exit(main())
