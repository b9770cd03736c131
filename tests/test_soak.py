"""Soak: thousands of attach/detach cycles and hundreds of spawn/exit
cycles over real processes, with the service's fds constant and its memory
bounded. Minutes long: run with ``python -m pytest -q -m soak
tests/test_soak.py`` (not part of the default run). Each test prints its
figures (fds and RSS before/after)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from pathlib import Path

import pytest

import meshipc
from meshipc import Mesh, PortFailed

CLIENT = Path(__file__).with_name("attach_client.py").resolve()
ATTACH_CYCLES = int(os.environ.get("MESHIPC_SOAK_ATTACH", "3000"))
SPAWN_CYCLES = int(os.environ.get("MESHIPC_SOAK_SPAWN", "300"))
#: RSS growth allowed over the measured cycles (after a warm-up).
RSS_SLACK_KIB = 16 * 1024

pytestmark = pytest.mark.soak


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def run_cycles(target: str, n: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.fspath(CLIENT), "cycles", target, str(n), stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30 + n * 0.1)
        assert proc.returncode == 0, out
        assert json.loads(out) == {"ok": n}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


#: Bound on one soak test (the default 60 s per async test is for the quick suite).
SOAK_TIMEOUT = 900


def test_soak_attach_detach(runtime_dir: Path) -> None:
    meshipc.run(asyncio.wait_for(attach_detach(runtime_dir), SOAK_TIMEOUT))


def test_soak_spawn_exit(runtime_dir: Path) -> None:
    meshipc.run(asyncio.wait_for(spawn_exit(runtime_dir), SOAK_TIMEOUT))


async def attach_detach(rd: Path) -> None:
    async with Mesh(runtime_dir=rd) as mesh:
        listener = await mesh.listen()
        tx, rx = meshipc.channel()

        async def serve() -> None:
            while True:
                try:
                    call = await rx.recv()
                except PortFailed:
                    continue
                pid, i = call.request
                call.reply([pid, i, "ok"])

        async def hand_out() -> None:
            async for conn in listener:
                conn.port.send(tx.clone())
                conn.port.close()

        tasks = [asyncio.create_task(serve()), asyncio.create_task(hand_out())]
        try:
            await run_cycles(os.fspath(listener.path), 50)  # warm-up
            gc.collect()
            fds0, rss0, ports0 = fds(), rss_kib(), mesh.stats().node.ports
            for _ in range(4):  # four client processes in a row
                await run_cycles(os.fspath(listener.path), ATTACH_CYCLES // 4)
            gc.collect()
            fds1, rss1, ports1 = fds(), rss_kib(), mesh.stats().node.ports
        finally:
            for t in tasks:
                t.cancel()
        print(
            f"\nattach/detach x{ATTACH_CYCLES}: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB, "
            f"ports {ports0} -> {ports1}, dead-node table {mesh.stats().node.dead}"
        )
        assert mesh.stats().node.attached == 50 + ATTACH_CYCLES // 4 * 4
        assert fds1 <= fds0
        assert ports1 <= ports0 + 2
        assert rss1 - rss0 < RSS_SLACK_KIB


async def spawn_exit(rd: Path) -> None:
    async with Mesh(runtime_dir=rd) as mesh:

        async def cycle(i: int) -> None:
            tx, rx = meshipc.channel()
            proc = await mesh.spawn("workers:echo", rx)
            assert await asyncio.wait_for(tx.call(i), 30) == i
            tx.close()
            assert await asyncio.wait_for(proc.wait(), 30) == 0

        for i in range(10):  # warm-up
            await cycle(i)
        gc.collect()
        fds0, rss0, ports0 = fds(), rss_kib(), mesh.stats().node.ports
        for i in range(SPAWN_CYCLES):
            await cycle(i)
        assert mesh._children == []  # exited workers are not kept
        gc.collect()
        fds1, rss1, ports1 = fds(), rss_kib(), mesh.stats().node.ports
        print(
            f"\nspawn/exit x{SPAWN_CYCLES}: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB, "
            f"ports {ports0} -> {ports1}, dead-node table {mesh.stats().node.dead}"
        )
        assert fds1 <= fds0 + 2
        assert ports1 <= ports0 + 2
        assert rss1 - rss0 < RSS_SLACK_KIB
