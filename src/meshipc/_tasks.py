"""Background tasks an object starts and owns: kept referenced while they run
(the event loop holds only weak references) and cancelled together when
their owner closes; and ``answer_within``, a timeout whose error says what timed
out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TaskSet:
    """The running tasks one owner started on ``loop``."""

    __slots__ = ("_loop", "_tasks")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` as a task kept here until it ends."""
        t = self._loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def adopt(self, t: asyncio.Task[Any]) -> None:
        """Keep ``t``, a task started elsewhere, here until it ends."""
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def running(self) -> set[asyncio.Task[Any]]:
        """The tasks still running (a copy)."""
        return set(self._tasks)

    def cancel_all(self) -> None:
        """Cancel every task still running (each leaves the set as it ends)."""
        for t in list(self._tasks):
            t.cancel()


@contextlib.asynccontextmanager
async def answer_within(timeout: float | None, what: str) -> AsyncIterator[None]:
    """``asyncio.timeout(timeout)``, whose ``TimeoutError`` says what did not
    happen in time (``"<what> within <timeout> s"``) instead of nothing."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise TimeoutError(f"no answer from {what} within {timeout:g} s") from None
