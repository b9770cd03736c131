"""The README's examples, run as a new user would: a service in one process,
control clients attaching from others."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

from relutil import within

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def run(env: dict[str, str], *args: str, script: str | None = "control.py") -> tuple[int, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable,
        *([str(EXAMPLES / script)] if script else []),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await within(p.communicate(), 30)
    assert p.returncode is not None
    return p.returncode, out.decode()


async def test_service_and_control_examples(runtime_dir: Path):
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir))
    code, out = await run(env, "list")
    assert code == 1 and "is the service running?" in out
    svc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "service.py"),
        env=env,
        cwd=EXAMPLES,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert svc.stdout is not None
        line = await within(svc.stdout.readline(), 30)
        assert b"service ready" in line
        assert await run(env, "submit", "build") == (0, "queued as job 1\n")
        assert await run(env, "submit", "test") == (0, "queued as job 2\n")
        code, out = await run(env, "list")
        assert code == 0 and "'jobs': ['build', 'test']" in out
        # the same service through the blocking API and the CLI
        code, out = await run(env, "submit", "deploy", script="control_sync.py")
        assert (code, out) == (0, "queued as job 3\n")
        code, out = await run(env, "-m", "meshipc", "call", "jobs", "jobs", '["list"]', script=None)
        assert code == 0 and json.loads(out)["jobs"] == ["build", "test", "deploy"]
        code, out = await run(env, "-m", "meshipc", "status", "jobs", script=None)
        assert code == 0 and "jobs-worker  pid" in out and "jobs  on jobs-worker" in out
        # Ctrl-C in the terminal: the whole process group gets SIGINT
        os.killpg(svc.pid, signal.SIGINT)
        await within(svc.wait(), 30)
        assert not (runtime_dir / "mesh-jobs").exists()
    finally:
        if svc.returncode is None:
            os.killpg(svc.pid, signal.SIGKILL)
            await svc.wait()


async def test_readme_demo_command_runs():
    """The README's first command: ``meshipc demo`` (here via ``python -m``)."""
    p = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshipc",
        "demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await within(p.communicate(), 120)
    finally:
        if p.returncode is None:
            p.kill()
            await p.wait()
    text = out.decode()
    assert p.returncode == 0, text
    for expected in (
        "control client attached",
        "client: services: ticker",
        "client: inspect: 3 nodes (service pid",
        "client: pause ->",
        "ticks stay at",
        "client: resumed: ticks",
        "written by worker pid",
        "a bad request fails remotely: ValueError",
        "control client detached",
        "still running after the client left",
        "into new code mid-stream",
        "all 2000 numbers arrived once, in order",
        "demo done",
    ):
        assert expected in text, text
    # mid-stream for real: the successor (new code) handled part of the stream
    by_v2 = re.search(r"\((\d+) by version 1, (\d+) by version 2\)", text)
    assert by_v2 and int(by_v2[2]) >= 500, text


async def test_cli_version_and_ls(runtime_dir: Path):
    async def cli(*args: str) -> str:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshipc", *args, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await within(p.communicate(), 30)
        assert p.returncode == 0
        return out.decode()

    assert (await cli("--version")).startswith("meshipc ")
    assert "no named meshes" in await cli("ls", "--runtime-dir", str(runtime_dir))
    import meshipc

    async with meshipc.Mesh(name="listed", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        out = await cli("ls", "--runtime-dir", str(runtime_dir))
        assert out.startswith("listed\tlive") and "listen.sock" in out
    # a clean exit gives the name back entirely
    assert "no named meshes" in await cli("ls", "--runtime-dir", str(runtime_dir))
    # what a crashed mesh leaves: its lock file (unlocked) and its directory
    (runtime_dir / "mesh-crashed.lock").touch(mode=0o600)
    (runtime_dir / "mesh-crashed").mkdir(mode=0o700)
    assert (await cli("ls", "--runtime-dir", str(runtime_dir))).startswith("crashed\tstale")
    async with meshipc.Mesh(name="crashed", runtime_dir=runtime_dir):
        assert (await cli("ls", "--runtime-dir", str(runtime_dir))).startswith("crashed\tlive")
