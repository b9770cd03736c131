from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshipc
from meshipc._trace import TRACING

sys.path.insert(0, str(Path(__file__).parent))

# Processes the tests start (examples, the CLI, clients) inherit PYTHONPATH;
# a relative entry (``PYTHONPATH=src`` in a checkout) would name other code,
# or none, in a process started in another directory (the examples' service
# runs in examples/): it would import whatever meshipc is installed instead
# of the one under test.
if os.environ.get("PYTHONPATH"):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        os.path.abspath(p) if p else p for p in os.environ["PYTHONPATH"].split(os.pathsep)
    )

from relutil import private_dir  # found through the path just set

#: Test modules of the sans-IO cores (``_wire``, ``_handshake``, ``_codec``,
#: ``_ids``, the port engine on the in-memory net, the invitation decoder,
#: the exception and name tables). Their plain (not ``async def``) tests run
#: no event loop and open no socket and no process, so neither the loop nor
#: the portable mode can change what they do: they are marked ``any_mode``,
#: and CI runs them in its first mode only (``.ci/run``).
SANS_IO_MODULES = frozenset(
    {
        "test_api.py",
        "test_boundary.py",
        "test_channel.py",
        "test_codec.py",
        "test_errors.py",
        "test_handshake.py",
        "test_ids.py",
        "test_invitation.py",
        "test_ports.py",
        "test_wire.py",
    }
)
#: Test modules that only read the sources and docs (the import layout, the
#: reference pages): no test in them runs a loop, a socket or a process
STATIC_MODULES = frozenset({"test_docs.py", "test_layout.py"})
#: ... except these plain tests, which do drive a loop, sockets or a process
#: (``import meshipc`` in a fresh interpreter: the portable mode is read there)
NOT_SANS_IO = frozenset(
    {
        "test_api.py::test_the_lazy_table_and_all_agree_and_import_loads_nothing_else",
        "test_handshake.py::test_handshake_acceptor_any_bytes",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function) or inspect.iscoroutinefunction(item.obj):
            continue
        where = item.path.name
        if where in STATIC_MODULES or (
            where in SANS_IO_MODULES and f"{where}::{item.originalname}" not in NOT_SANS_IO
        ):
            item.add_marker(pytest.mark.any_mode)


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


@pytest.fixture
def untraced() -> Iterator[None]:
    """The data path as in a process where no trace context was ever set
    (``_trace.TRACING`` off for the test, as it was after): an earlier
    test that set one leaves it on for the rest of the run."""
    was, TRACING[0] = TRACING[0], False
    try:
        yield
    finally:
        TRACING[0] = was
