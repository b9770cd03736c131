"""Worker functions run at the far end of a carrier (``python -m
meshipc.remote``) by ``test_carrier.py`` and ``test_ssh.py``.

The far process imports this module by name: the tests put ``tests/`` on its
``PYTHONPATH``. Workers talk back only through mesh messages."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import meshipc
from meshipc import Call, Port, Receiver, Sender


async def echo(rx: Receiver[Call[Any]]) -> None:
    """Serve calls on ``rx``: reply with the request, unchanged."""
    async for call in rx:
        call.reply(call.request)


async def whoami(port: Port) -> None:
    """Answer once on ``port`` with what this far process sees: its pid,
    its mesh directory, ``print`` landing on stderr, then wait to be closed."""
    print("a stray print on the far side")
    mesh = meshipc.current_mesh()
    port.send({"pid": os.getpid(), "directory": str(mesh.directory)})
    async for _ in port:
        pass


async def fails(arg: Any) -> None:
    """Raise at once (the function started: ``Process.error``)."""
    raise ValueError(f"far failure {arg!r}")


async def count_to(arg: dict[str, Any]) -> None:
    """Send ``0 .. arg["n"]-1`` on ``arg["tx"]`` (a ``Sender[int]``), then close it."""
    tx: Sender[int] = arg["tx"]
    with tx:
        for i in range(arg["n"]):
            tx.send(i)


async def idle(arg: Any) -> None:
    """Print to stdout (which must land on stderr), then run until stopped."""
    print("a stray print on the far side", arg)
    await asyncio.Event().wait()
