"""Worker lifecycle around the parent: its environment, and its parent dying."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

import meshipc
from attachutil import key_material
from meshipc._handshake import ROLE_ROOT, ROLE_WORKER, Authority, Identity
from meshipc._process import ENV_INVITATION, worker_command
from relutil import wait_until, within

TESTS = Path(__file__).resolve().parent


async def test_invitation_and_private_keys_not_in_the_worker_environment(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    issued: list[Identity] = []
    issue = Authority.issue

    def recording(self: Authority, *args: Any, **kw: Any) -> Identity:
        issued.append(issue(self, *args, **kw))
        return issued[-1]

    monkeypatch.setattr(Authority, "issue", recording)
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:report_environment", tx)
        report = await within(rx.recv(), 30)
        assert ENV_INVITATION not in report["env"]
        assert [i.role for i in issued] == [ROLE_ROOT, ROLE_WORKER]  # the root's, the worker's
        # not even in the initial environment block other tools can read
        for key in (*key_material(mesh), issued[1]._key.private_bytes_raw()):
            for form in (key, key.hex().encode(), key.hex().upper().encode()):
                assert form not in report["proc_environ"]
        assert await within(proc.wait(), 30) == 0


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


async def test_worker_exits_when_its_parent_is_killed(runtime_dir: Path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, str(runtime_dir), env=env, stdout=asyncio.subprocess.PIPE
    )
    worker_pid = None
    pidfd = -1
    try:
        assert parent.stdout is not None
        worker_pid = int(await within(parent.stdout.readline(), 30))
        pidfd = os.pidfd_open(worker_pid)
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        await parent.wait()
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(pidfd, exited.set)  # a pidfd turns readable when its process exits
        try:
            await within(exited.wait(), 15)
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


# ------------------------------------------------------------ import path

PLANTED = """
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "IMPORTED-" + __name__), "w").close()
raise ImportError("a planted module was imported: " + __name__)
"""

REPORTER = """
import asyncio, json, sys, meshipc
async def main():
    async with meshipc.Mesh(runtime_dir=sys.argv[1]) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:report_imports", tx)
        report = await asyncio.wait_for(rx.recv(), 30)
        report["code"] = await asyncio.wait_for(proc.wait(), 30)
        report["parent_path"] = sys.path
        print(json.dumps(report), flush=True)
asyncio.run(main())
"""


async def test_worker_never_imports_from_the_directory_it_runs_in(runtime_dir: Path, tmp_path: Path):
    """A service started by its script's absolute path from a shared,
    world-writable folder: modules planted there (a dependency, meshipc
    itself, the worker's own module) are not imported by its workers, whose
    import path is exactly the parent's."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    for mod in ("msgspec", "meshipc", "workers"):
        (shared / f"{mod}.py").write_text(PLANTED)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "service.py").write_text(REPORTER)
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        str(scripts / "service.py"),
        str(runtime_dir),
        env=env,
        cwd=shared,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await within(parent.communicate(), 60)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
    assert sorted(p.name for p in shared.iterdir() if p.name.startswith("IMPORTED")) == []
    assert parent.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["code"] == 0
    assert report["path"] == report["parent_path"]
    assert str(shared) not in report["path"] and "" not in report["path"]
    assert report["files"]["workers"] == str(TESTS / "workers.py")
    for mod in ("msgspec", "meshipc"):
        assert not report["files"][mod].startswith(str(shared)), report["files"]


def test_worker_command_path_is_the_parents(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The parent's path, relative entries (``''`` included: the parent had
    its current directory) made absolute; the interpreter adds nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", "rel", "/abs/lib"])
    cmd = worker_command()
    assert cmd[:3] == [sys.executable, "-P", "-c"]
    assert cmd[4:] == [str(tmp_path), str(tmp_path / "rel"), "/abs/lib"]


# ------------------------------------------------------------ re-entering


async def test_a_mesh_is_entered_once(runtime_dir: Path):
    mesh = meshipc.Mesh(name="once", runtime_dir=runtime_dir)
    async with mesh:
        with pytest.raises(meshipc.MeshError, match="already entered"):
            await mesh.__aenter__()
    assert list(runtime_dir.iterdir()) == []
    # re-entering a closed mesh would leak a node, its folder and its lock
    with pytest.raises(meshipc.MeshError, match="already entered"):
        async with mesh:
            pass  # pragma: no cover
    assert list(runtime_dir.iterdir()) == []
    async with meshipc.Mesh(name="once", runtime_dir=runtime_dir):  # a new one is fine
        pass


# ------------------------------------------------------------ SIGTERM

SERVICE = """
import asyncio, json, signal, sys, meshipc
async def main():
    own = sys.argv[2] == "own"
    if own:  # the application handles SIGTERM itself
        got = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, got.set)
    async with meshipc.Mesh(name="svc", runtime_dir=sys.argv[1]) as mesh:
        await mesh.listen()
        tx, rx = meshipc.channel()
        await mesh.spawn("workers:idle", tx)
        print(json.dumps({"worker": await rx.recv()}), flush=True)
        if own:
            await got.wait()
            print(json.dumps({"handled": "by the application"}), flush=True)
        else:
            await asyncio.Event().wait()
    print(json.dumps({"after": "the mesh"}), flush=True)
asyncio.run(main())
"""


@pytest.mark.parametrize("handler", ["default", "own"])
async def test_sigterm_closes_the_mesh_cleanly(runtime_dir: Path, handler: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    svc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVICE, str(runtime_dir), handler, env=env, stdout=asyncio.subprocess.PIPE
    )
    pidfd = -1
    try:
        assert svc.stdout is not None
        ready = json.loads(await within(svc.stdout.readline(), 30))
        pidfd = os.pidfd_open(ready["worker"])
        assert sorted(p.name for p in runtime_dir.iterdir()) == ["mesh-svc", "mesh-svc.lock"]
        svc.terminate()  # SIGTERM, what `kill` sends
        out = await within(svc.stdout.read(), 30)
        code = await within(svc.wait(), 30)
        lines = [json.loads(line) for line in out.splitlines()]
        if handler == "default":
            # closed by the mesh, then the process ends as SIGTERM would end it
            assert code == 143 and lines == []
        else:
            # the application's own handler was left alone
            assert code == 0
            assert lines == [{"handled": "by the application"}, {"after": "the mesh"}]
        # either way: nothing left behind, the worker stopped with its parent
        assert list(runtime_dir.iterdir()) == []
        assert select.select([pidfd], [], [], 10)[0] == [pidfd], "the worker is still running"
    finally:
        await _kill_leftovers(svc, pidfd)


async def test_sigterm_handler_is_ours_only_while_a_mesh_is_open(runtime_dir: Path):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    async with meshipc.Mesh(runtime_dir=runtime_dir):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        async with meshipc.Mesh(runtime_dir=runtime_dir):
            pass
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


ORPHANED = """
import asyncio, sys, meshipc
async def main():
    async def open_mesh():  # enters the mesh in a task that then ends
        return await meshipc.Mesh(runtime_dir=sys.argv[1]).__aenter__()
    mesh = await asyncio.create_task(open_mesh())
    print(mesh.name, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def test_sigterm_with_no_task_to_unwind_still_ends_the_process(runtime_dir: Path):
    """A mesh whose entering task is gone cannot be closed by cancelling it:
    SIGTERM must then end the process as it would without meshipc, never be
    swallowed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ORPHANED, str(runtime_dir), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert await within(proc.stdout.readline(), 30) == b"None\n"
        proc.terminate()
        assert await within(proc.wait(), 30) == -signal.SIGTERM
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


STUBBORN_SERVICE = """
import asyncio, logging, sys, meshipc
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
async def main():
    async with meshipc.Mesh(runtime_dir=sys.argv[1]) as mesh:
        tx, rx = meshipc.channel()
        # ignores being stopped: closing waits CHILD_GRACE (5 s); once its
        # parent is gone, it lives 1 s (its TERM_GRACE)
        await mesh.spawn("workers:stubborn_brief", tx)
        print(await rx.recv(), flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


async def test_second_sigterm_while_closing_ends_the_process_at_once(runtime_dir: Path, tmp_path: Path):
    """And the worker it leaves behind, which ignores being cancelled, still
    exits (within the child's TERM_GRACE, 1 s here) when its parent is gone."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    out, err = tmp_path / "out", tmp_path / "err"
    # files, not pipes: the orphaned worker inherits them, and a pipe it holds
    # open would keep asyncio's wait() waiting
    with open(out, "wb") as fo, open(err, "wb") as fe:
        svc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", STUBBORN_SERVICE, str(runtime_dir), env=env, stdout=fo, stderr=fe
        )
    pidfd = -1
    try:
        await wait_for_text(out, "\n")
        pidfd = os.pidfd_open(int(out.read_text()))
        svc.terminate()
        await wait_for_text(err, "SIGTERM: closing")
        svc.terminate()  # impatient: the second one is not swallowed
        assert await within(svc.wait(), 30) == -signal.SIGTERM
        assert "nothing left to close cleanly" in err.read_text()
        assert select.select([pidfd], [], [], 15)[0] == [pidfd], "the orphaned worker lives on"
    finally:
        await _kill_leftovers(svc, pidfd)


async def _kill_leftovers(svc: asyncio.subprocess.Process, pidfd: int) -> None:
    """Whatever a failed test left running: the service, and its worker."""
    if svc.returncode is None:
        svc.kill()
        await svc.wait()
    if pidfd >= 0:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)


async def wait_for_text(path: Path, text: str, timeout: float = 30) -> None:
    """Wait for ``text`` in a file a child process writes (no event to wait on)."""
    await wait_until(lambda: text in path.read_text(), f"{text!r} in {path}", timeout)
