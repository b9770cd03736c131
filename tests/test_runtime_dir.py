"""Where meshes live, whatever environment a process starts from: a service
started in a login session (``XDG_RUNTIME_DIR`` set) is found by a client
started from cron, ssh or sudo (no ``XDG_RUNTIME_DIR``) through the session
folder ``/run/user/<uid>``; ``MESHIPC_RUNTIME_DIR`` points both anywhere;
and where two processes picked different folders, the error names the one
the mesh runs in and how to point at it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import meshipc
from meshipc._names import ENV_RUNTIME_DIR, runtime_location
from meshipc._platform import PLATFORM
from relutil import STEP, within

SERVICE = """
import asyncio, sys
import meshipc

async def main():
    async with meshipc.Mesh(name=sys.argv[1]) as mesh:
        await mesh.listen()
        print("ready", mesh.directory, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

meshipc.run(main())
"""


@pytest.fixture
def env(runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A fake system: ``sessions/<uid>`` is the login session's folder, ``tmp``
    the fallback's base; this process starts with no runtime folder set."""
    sessions = runtime_dir / "sessions"
    session = sessions / str(os.getuid())
    session.mkdir(mode=0o700, parents=True)
    tmp = runtime_dir / "tmp"
    tmp.mkdir(mode=0o700)
    monkeypatch.setattr(PLATFORM, "session_base", str(sessions))
    monkeypatch.setattr(PLATFORM, "tmp_base", str(tmp))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv(ENV_RUNTIME_DIR, raising=False)
    return {"session": session, "tmp": tmp, "base": runtime_dir}


@contextlib.asynccontextmanager
async def service(name: str, **environ: str) -> AsyncIterator[Path]:
    """A real service process started with ``environ`` (and none of our
    runtime variables); yields its mesh directory; always stopped."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", ENV_RUNTIME_DIR)}
    child_env.update(environ)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVICE,
        name,
        env=child_env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await within(proc.stdout.readline(), STEP)).decode().split()
        assert line[:1] == ["ready"], line
        yield Path(line[1])
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def test_the_session_folder_is_used_when_xdg_is_not_set(env: dict[str, Path]) -> None:
    assert runtime_location() == (env["session"], "the login session's folder; XDG_RUNTIME_DIR is not set")


def test_no_session_folder_falls_back_to_tmp_and_a_shared_one_is_refused(env: dict[str, Path]) -> None:
    os.chmod(env["session"], 0o755)  # not private: not ours to use
    root, why = runtime_location()
    assert root == env["tmp"] / f"meshipc-{os.getuid()}" and "no login session folder" in why
    env["session"].rmdir()
    assert runtime_location()[0] == root


def test_meshipc_runtime_dir_wins_and_is_never_made(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = env["base"] / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    mine = env["base"] / "mine" / "meshes"
    monkeypatch.setenv(ENV_RUNTIME_DIR, str(mine))
    with pytest.raises(meshipc.MeshError, match=f"{ENV_RUNTIME_DIR}=.* does not exist"):
        runtime_location()  # a mistyped path is an error, not a new folder
    assert not mine.exists()
    mine.mkdir(mode=0o700, parents=True)
    assert runtime_location() == (mine, f"from {ENV_RUNTIME_DIR}")
    os.chmod(mine, 0o750)
    with pytest.raises(meshipc.MeshError, match=f"{ENV_RUNTIME_DIR}=.* cannot hold meshes"):
        runtime_location()
    monkeypatch.setenv(ENV_RUNTIME_DIR, "relative")
    with pytest.raises(meshipc.MeshError, match="not an absolute path"):
        runtime_location()


async def test_a_client_without_xdg_finds_a_service_started_in_a_session(env: dict[str, Path]) -> None:
    # the service runs in a desktop session (XDG_RUNTIME_DIR set); the client
    # is started from cron (nothing set) and finds it through /run/user/<uid>
    async with service("rt-session", XDG_RUNTIME_DIR=str(env["session"])) as directory:
        assert directory.parent == env["session"]
        async with meshipc.connect("rt-session", timeout=STEP) as conn:
            assert await conn.inspect("", depth=1, timeout=STEP)


async def test_different_folders_are_named_with_the_fix(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the client has its own XDG_RUNTIME_DIR; the service is in the session folder
    elsewhere = env["base"] / "xdg"
    elsewhere.mkdir(mode=0o700)
    async with service("rt-apart", XDG_RUNTIME_DIR=str(env["session"])):
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(elsewhere))
        with pytest.raises(meshipc.ConnectError) as ei:
            async with meshipc.connect("rt-apart", timeout=STEP):
                pass  # pragma: no cover
        reason = ei.value.reason
        assert f"no mesh named 'rt-apart' in the runtime folder {elsewhere}" in reason
        assert f"one runs in {env['session']}" in reason
        assert f"{ENV_RUNTIME_DIR}={env['session']}" in reason and "--runtime-dir" in reason
        cli = subprocess.run(  # the command says the same (its choice: MESHIPC_RUNTIME_DIR over XDG's)
            [sys.executable, "-m", "meshipc", "status", "rt-apart"],
            env={**os.environ, ENV_RUNTIME_DIR: str(elsewhere), "XDG_RUNTIME_DIR": str(env["session"])},
            capture_output=True,
            text=True,
            timeout=STEP,
        )
        assert cli.returncode == 1 and f"one runs in {env['session']}" in cli.stderr, cli.stderr
        monkeypatch.setenv(ENV_RUNTIME_DIR, str(env["session"]))  # the fix the error gave
        async with meshipc.connect("rt-apart", timeout=STEP):
            pass
    # nothing runs anywhere: the error lists where it looked
    monkeypatch.delenv(ENV_RUNTIME_DIR)
    with pytest.raises(meshipc.ConnectError) as ei:
        async with meshipc.connect("rt-apart", timeout=STEP):
            pass  # pragma: no cover
    assert f"also looked in {env['session']}" in ei.value.reason
