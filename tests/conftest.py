from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshipc

sys.path.insert(0, str(Path(__file__).parent))


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
def rdir() -> Iterator[Path]:
    """A short (AF_UNIX paths are limited), private (0700) runtime folder,
    removed afterwards."""
    d = tempfile.mkdtemp(prefix="m", dir="/tmp")
    os.chmod(d, 0o700)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rd(rdir: Path) -> Path:
    return rdir


@pytest.fixture
def mesh_dir(rdir: Path) -> Path:
    return rdir
