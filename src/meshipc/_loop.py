"""Which event loop meshipc runs on: uvloop when installed (the ``fast``
extra), the stock asyncio loop otherwise or when asked.

``MESHIPC_UVLOOP=0`` in the environment (inherited by spawned workers)
turns uvloop off; ``MESHIPC_UVLOOP=1`` insists on it (an error if missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from ._errors import MeshError

T = TypeVar("T")
ENV_UVLOOP = "MESHIPC_UVLOOP"


def want_uvloop(choice: bool | None = None) -> bool:
    """Whether to run on uvloop: ``choice`` if given, else the environment,
    else whether uvloop is installed."""
    if choice is None:
        env = os.environ.get(ENV_UVLOOP, "").strip().lower()
        if env in ("0", "no", "false", "off"):
            return False
        if env in ("1", "yes", "true", "on"):
            choice = True
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice:
            raise MeshError(
                "uvloop was asked for but is not installed: pip install 'meshipc[fast]'"
            ) from None
        return False
    return True if choice is None else choice


#: The parent's script a spawned worker is loading (``loading_script``), or None.
_loading: str | None = None


@contextlib.contextmanager
def loading_script(path: str) -> Iterator[None]:
    """While a worker loads its parent's script: ``run`` refuses, naming the
    missing ``if __name__ == "__main__":`` guard."""
    global _loading
    _loading = path
    try:
        yield
    finally:
        _loading = None


#: Exit status of a program whose ``meshipc.run`` was interrupted (Ctrl-C):
#: 128 + SIGINT, what a shell shows for it.
EXIT_INTERRUPTED = 130


def run(main: Coroutine[Any, Any, T], *, uvloop: bool | None = None, exit_on_interrupt: bool = True) -> T:
    """``asyncio.run(main)`` on uvloop when installed (see ``want_uvloop``);
    spawned workers make the same choice.

    Ctrl-C (SIGINT) cancels ``main``, so its ``async with`` blocks close
    cleanly (a mesh stops its workers and removes its sockets), and then
    ends the program with ``SystemExit(130)`` and no traceback;
    ``exit_on_interrupt=False`` raises ``KeyboardInterrupt`` instead, as
    ``asyncio.run`` does. Raises ``RuntimeError`` saying what to do instead
    when called where an event loop already runs (a Jupyter cell, IPython's
    autoawait, async code): there, ``await main`` directly."""
    if _loading is not None:
        main.close()
        raise RuntimeError(
            f"meshipc.run() was called while a worker loaded {_loading} for the function it runs: "
            'start the script\'s main code under `if __name__ == "__main__":` (the worker loads it '
            "as __mp_main__, as multiprocessing does)"
        )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        main.close()  # never awaited: no "coroutine was never awaited" warning on top
        raise RuntimeError(
            "meshipc.run() starts an event loop, and one is already running in this thread "
            "(a Jupyter notebook, IPython, or async code): await the coroutine instead, "
            "e.g. `await main()`"
        )
    try:
        if want_uvloop(uvloop):
            import uvloop as _uvloop

            return _uvloop.run(main)
        return asyncio.run(main)
    except KeyboardInterrupt:
        if not exit_on_interrupt:
            raise
    # outside the except block: no "during handling" chain
    raise SystemExit(EXIT_INTERRUPTED)
