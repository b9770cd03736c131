"""Worker lifecycle around the parent: its environment, and its parent dying."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshipc
from meshipc._process import ENV_INVITATION

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def rdir() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="l", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


async def test_invitation_and_secret_not_in_the_worker_environment(rdir: Path):
    async with meshipc.Mesh(runtime_dir=rdir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:report_environment", tx)
        report = await asyncio.wait_for(rx.recv(), 30)
        assert ENV_INVITATION not in report["env"]
        secret = mesh._node._secret.reveal()
        # not even in the initial environment block other tools can read
        for form in (secret, secret.hex().encode(), secret.hex().upper().encode()):
            assert form not in report["proc_environ"]
        assert await asyncio.wait_for(proc.wait(), 30) == 0


PARENT = """
import asyncio, sys, meshipc
async def main():
    async with meshipc.Mesh(runtime_dir=sys.argv[1]) as mesh:
        tx, rx = meshipc.channel()
        await mesh.spawn("workers:idle", tx)
        print(await rx.recv(), flush=True)   # the worker's pid
        await asyncio.Event().wait()         # until killed
asyncio.run(main())
"""


async def test_worker_exits_when_its_parent_is_killed(rdir: Path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, str(rdir), env=env, stdout=asyncio.subprocess.PIPE
    )
    worker_pid = None
    pidfd = -1
    try:
        assert parent.stdout is not None
        worker_pid = int(await asyncio.wait_for(parent.stdout.readline(), 30))
        pidfd = os.pidfd_open(worker_pid)
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        await parent.wait()
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(pidfd, exited.set)  # a pidfd turns readable when its process exits
        try:
            await asyncio.wait_for(exited.wait(), 15)
        finally:
            loop.remove_reader(pidfd)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if pidfd >= 0:
            if worker_pid is not None:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.close(pidfd)
