"""What a user meets first: ``meshipc.run`` where a loop already runs (a
notebook cell) says what to do instead."""

from __future__ import annotations

import warnings

import pytest

import meshipc


async def test_run_inside_a_running_loop_says_to_await_instead() -> None:
    async def main() -> int:
        return 1

    coro = main()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "never awaited" warning either
        with pytest.raises(RuntimeError, match=r"already running .* await the coroutine instead"):
            meshipc.run(coro)
    assert coro.cr_frame is None  # closed, not left pending


def test_run_outside_a_loop_runs() -> None:
    async def main() -> int:
        return 7

    assert meshipc.run(main()) == 7
