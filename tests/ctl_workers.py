"""Worker functions for ``test_control.py`` (run in spawned processes)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import meshipc


async def serve_named(arg: dict[str, Any]) -> None:
    """Register the service ``arg["name"]`` from this worker (it replies
    ``{"from": pid, "request": r}``), send ``True`` on ``arg["ready"]`` once
    the mesh confirmed it (or the error text), and serve until stopped."""
    ready: meshipc.Sender[Any] = arg["ready"]

    async def handler(request: Any) -> Any:
        return {"from": os.getpid(), "request": request}

    svc = meshipc.current_mesh().serve(arg["name"], handler)
    try:
        await svc
    except meshipc.MeshError as exc:
        ready.send(f"{type(exc).__name__}: {exc}")
        return
    ready.send(True)
    await svc.wait_closed()


async def idle(arg: meshipc.Sender[Any]) -> None:
    """Tell the parent when this worker's control session works, then wait
    until stopped (for inspect tests)."""
    mesh = meshipc.current_mesh()
    mesh.inspect_add("mood", lambda: {"calm": True})
    level = ["info"]

    async def set_level(value: Any) -> None:
        if value not in ("debug", "info", "warning"):
            raise ValueError(f"not a level: {value!r}")
        level[0] = value

    mesh.inspect_add("level", lambda: level[0], update=set_level)
    await mesh.services()  # needs the session with the root
    arg.send(os.getpid())
    await asyncio.Event().wait()  # until the worker is stopped


async def spawn_server(arg: dict[str, Any]) -> None:
    """Spawn a worker of our own that runs ``serve_named(arg)``: its inviter
    is this worker, not the root, so its control session starts with a
    redirect. Wait until stopped (stopping us stops it)."""
    await meshipc.current_mesh().spawn("ctl_workers:serve_named", arg, name="nested")
    await asyncio.Event().wait()
