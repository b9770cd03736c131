"""What the spawned workers of the ``spawn16`` row run (``bench/spawn16.py``):
kept free of imports, so that neither side pays for a module the other does
not load."""

from __future__ import annotations

import os
from typing import Any

_barrier: Any = None


def set_barrier(barrier: Any) -> None:
    """Pool worker initializer."""
    global _barrier
    _barrier = barrier


def pool_task(_: int) -> int:
    """Pool worker: wait until all N workers run a task, then answer."""
    _barrier.wait(60)
    return os.getpid()


async def echo(rx: Any) -> None:
    """meshipc worker: answer every call with its request."""
    async for call in rx:
        call.reply(call.request)
