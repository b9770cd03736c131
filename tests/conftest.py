from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshipc

sys.path.insert(0, str(Path(__file__).parent))

from relutil import private_dir  # found through the path just set


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    """Run ``async def`` tests in a fresh event loop (no plugin needed)."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        names = pyfuncitem._fixtureinfo.argnames
        kwargs = {n: pyfuncitem.funcargs[n] for n in names}
        # the loop meshipc.run picks: uvloop if installed unless MESHIPC_UVLOOP=0;
        # a test marked stock_loop needs what only asyncio's own loop has
        stock = pyfuncitem.get_closest_marker("stock_loop") is not None
        meshipc.run(asyncio.wait_for(pyfuncitem.obj(**kwargs), 60), uvloop=False if stock else None)
        return True
    return None


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """The runtime folder of a test's meshes: short (AF_UNIX paths are
    limited), private (0700), removed afterwards."""
    with private_dir() as d:
        yield d
