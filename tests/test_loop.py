"""The event loop meshipc runs on: uvloop when installed, unless
``MESHIPC_UVLOOP=0``; spawned workers make the same choice."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

import meshipc
from meshipc._loop import want_uvloop
from relutil import reaped, within

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_choice_follows_argument_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHIPC_UVLOOP", raising=False)
    assert want_uvloop() is HAVE_UVLOOP
    assert want_uvloop(False) is False
    monkeypatch.setenv("MESHIPC_UVLOOP", "0")
    assert want_uvloop() is False
    monkeypatch.setenv("MESHIPC_UVLOOP", "1")
    if HAVE_UVLOOP:
        assert want_uvloop() is True
    else:
        with pytest.raises(meshipc.MeshError, match="not installed"):
            want_uvloop()


def test_run_uses_the_chosen_loop() -> None:
    async def kind() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert meshipc.run(kind(), uvloop=False) == "asyncio"
    if HAVE_UVLOOP:
        assert meshipc.run(kind(), uvloop=True) == "uvloop"


async def test_workers_run_on_the_loop_the_environment_picks(runtime_dir: Path) -> None:
    expected = "uvloop" if want_uvloop() else "asyncio"
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        procs.append(await mesh.spawn("rel_workers:loop_kind", rx))
        assert await within(tx.call(None)) == expected
