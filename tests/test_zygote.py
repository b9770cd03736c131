"""The fork server workers start from (``_zygote``): real processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

import meshipc
import meshipc._zygote
from meshipc._platform import Portable
from meshipc._process import worker_command
from meshipc._zygote import LOST_STATUS, MAX_REPLY, MAX_REQUEST, Zygote, ZygoteUnavailable
from relutil import wait_until, within

TESTS = Path(__file__).resolve().parent

#: the zygote's tests; the rest run in every mode (the portable mode execs workers)
needs_fork = pytest.mark.skipif(not meshipc._zygote.forks_safely(), reason="workers are exec'd here")


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return int(data[data.rindex(")") + 2 :].split()[1])


def fds_of(pid: int | str) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


async def gone(pid: int, timeout: float = 30) -> None:
    """Wait until process ``pid`` (not necessarily our child) has exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    exited = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, exited.set)
    try:
        await within(exited.wait(), timeout)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


@needs_fork
async def test_sixteen_workers_at_once_are_forked_by_one_zygote(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        chans = [meshipc.channel() for _ in range(16)]
        procs = await within(
            asyncio.gather(
                *(mesh.spawn("workers:whoami", rx, name=f"w{i}") for i, (_, rx) in enumerate(chans))
            ),
            120,
        )
        answers = await within(asyncio.gather(*(tx.call(i) for i, (tx, _) in enumerate(chans))), 60)
        assert [a[1] for a in answers] == list(range(16))
        assert [a[0] for a in answers] == [p.pid for p in procs]
        zygote = mesh._zygote
        assert (zygote.starts, zygote.forks, zygote.fallbacks) == (1, 16, 0)
        assert all(p.start_method == "zygote" for p in procs)
        assert {ppid(p.pid) for p in procs} == {zygote.pid}
        assert ppid(zygote.pid) == os.getpid()
        for tx, _ in chans:
            tx.close()  # whoami returns: exit 0, reaped by the zygote and reported
        assert await within(asyncio.gather(*(p.wait() for p in procs)), 60) == [0] * 16


@needs_fork
async def test_exit_codes_errors_and_kill_come_through_the_zygote(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        failing = await mesh.spawn("workers:fail", None)
        assert await within(failing.wait(), 30) == 1
        assert isinstance(failing.error, meshipc.RemoteError)
        tx, rx = meshipc.channel()
        idle = await mesh.spawn("workers:idle", tx)
        assert await within(rx.recv(), 30) == idle.pid
        idle.kill()
        assert await within(idle.wait(), 30) == -signal.SIGKILL
        assert [failing.start_method, idle.start_method] == ["zygote", "zygote"]
        # a worker SIGKILLed from outside (not through the zygote) too
        tx, rx = meshipc.channel()
        other = await mesh.spawn("workers:idle", tx)
        assert await within(rx.recv(), 30) == other.pid
        os.kill(other.pid, signal.SIGKILL)
        assert await within(other.wait(), 30) == -signal.SIGKILL


@needs_fork
async def test_the_worker_takes_the_callers_state_at_spawn_time(
    runtime_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zygote runs already (eager); what the caller changes afterwards
    (environment, current directory, umask, import path) is the worker's."""
    async with meshipc.Mesh(runtime_dir=runtime_dir, zygote="eager") as mesh:
        assert mesh.stats().zygote.pid is not None  # started on enter
        monkeypatch.setenv("MESHIPC_TEST_MARK", "set after the zygote started")
        monkeypatch.chdir(tmp_path)
        extra = tmp_path / "extra"
        extra.mkdir()
        monkeypatch.syspath_prepend(str(extra))
        old = os.umask(0o027)
        try:
            tx, rx = meshipc.channel()
            proc = await mesh.spawn("workers:report_state", tx)
        finally:
            os.umask(old)
        report = await within(rx.recv(), 30)
        assert proc.start_method == "zygote" and report["ppid"] == mesh.stats().zygote.pid
        assert report["mark"] == "set after the zygote started"
        assert report["cwd"] == str(tmp_path)
        assert report["umask"] == 0o027
        assert report["path"][0] == str(extra)
        assert report["fds"][1] == os.readlink("/proc/self/fd/1")  # our standard output of the moment
        assert await within(proc.wait(), 30) == 0


NEW_CODE = """
async def main(arg):
    arg.send({version!r})
"""


@needs_fork
async def test_the_workers_module_is_imported_in_the_worker_not_the_zygote(
    runtime_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code changed on disk between two spawns runs in the second: the
    zygote did not import (and cache) the worker's module."""
    mod = tmp_path / "zygote_changed_module.py"
    mod.write_text(NEW_CODE.format(version="one"))
    monkeypatch.syspath_prepend(str(tmp_path))
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        seen = []
        for version in ("one", "two"):
            mod.write_text(NEW_CODE.format(version=version))
            # same size, same second: a .pyc written by the first spawn would
            # pass for the second version (Python checks size and whole-second
            # mtime); an editor's save has this problem too, and it is not the zygote's
            shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
            tx, rx = meshipc.channel()
            proc = await mesh.spawn("zygote_changed_module:main", tx)
            seen.append(await within(rx.recv(), 30))
            assert proc.start_method == "zygote"
            assert await within(proc.wait(), 30) == 0
        assert seen == ["one", "two"] and mesh.stats().zygote.starts == 1


@needs_fork
async def test_no_descriptor_leaks_into_the_zygote_or_its_workers(runtime_dir: Path) -> None:
    r, w = os.pipe()
    os.set_inheritable(r, True)  # what a careless application leaves inheritable
    os.set_inheritable(w, True)
    leak = os.readlink(f"/proc/self/fd/{r}")
    try:
        async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
            tx, rx = meshipc.channel()
            proc = await mesh.spawn("workers:report_state", tx)
            report = await within(rx.recv(), 30)
            assert await within(proc.wait(), 30) == 0
            zfds = fds_of(mesh.stats().zygote.pid)
            # the zygote: standard descriptors, its end of the pair, its wake-up pipe
            assert sorted(zfds) == [0, 1, 2, *sorted(set(zfds) - {0, 1, 2})] and len(zfds) == 6
            assert sum(v.startswith("socket:") for k, v in zfds.items() if k > 2) == 1
            assert leak not in zfds.values()
            assert leak not in report["fds"].values()
            # the worker: no pipe or socket of the zygote's beyond its own bootstrap socket
            assert not {v for k, v in zfds.items() if k > 2} & set(report["fds"].values())
            # the node keeps nothing per worker once it exited
            before = len(fds_of("self"))
            for _ in range(4):
                tx, rx = meshipc.channel()
                proc = await mesh.spawn("workers:report_state", tx)
                await within(rx.recv(), 30)
                assert await within(proc.wait(), 30) == 0
            await wait_until(
                lambda: len(fds_of("self")) <= before, "the node to close each worker's descriptors"
            )
    finally:
        os.close(r)
        os.close(w)


@needs_fork
async def test_a_killed_zygote_takes_its_workers_and_the_next_spawn_starts_another(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshipc")
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        first = await mesh.spawn("workers:idle", tx)
        assert await within(rx.recv(), 30) == first.pid
        old = mesh.stats().zygote.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        assert await within(first.wait(), 30) == LOST_STATUS  # it ended with its zygote
        await wait_until(lambda: "the zygote (pid" in caplog.text, "the warning about the zygote")
        assert "the next spawn starts another" in caplog.text
        tx, rx = meshipc.channel()
        second = await mesh.spawn("workers:whoami", rx)
        assert (await within(tx.call("hi"), 30))[0] == second.pid
        assert second.start_method == "zygote"
        assert mesh.stats().zygote.pid not in (None, old) and mesh.stats().zygote.starts == 2


@needs_fork
async def test_after_too_many_zygote_deaths_workers_are_execd(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(meshipc._zygote, "ZYGOTE_STARTS", 1)
    caplog.set_level(logging.WARNING, logger="meshipc")
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:idle", tx)
        await within(rx.recv(), 30)
        assert mesh.stats().zygote.pid is not None
        os.kill(mesh.stats().zygote.pid, signal.SIGKILL)
        await within(proc.wait(), 30)
        assert "workers are exec'd from now on" in caplog.text
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:whoami", rx)
        assert proc.start_method == "exec" and ppid(proc.pid) == os.getpid()
        assert (await within(tx.call(1), 30))[0] == proc.pid


async def test_opting_out_and_the_portable_mode_exec_workers(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:whoami", rx, start="exec")
        assert proc.start_method == "exec" and ppid(proc.pid) == os.getpid()
        assert mesh.stats().zygote.starts == 0
        with pytest.raises(ValueError, match="start must be"):
            await mesh.spawn("workers:whoami", rx, start="fork")  # type: ignore[call-overload]
    async with meshipc.Mesh(runtime_dir=runtime_dir, zygote="off") as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:whoami", rx)
        assert proc.start_method == "exec" and mesh.stats().zygote.starts == 0
    # where forking is not safe (the portable mode runs macOS's code paths)
    monkeypatch.setattr(meshipc._zygote, "PLATFORM", Portable())
    async with meshipc.Mesh(runtime_dir=runtime_dir, zygote="eager") as mesh:
        assert mesh.stats().zygote.starts == 0
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:whoami", rx)
        assert proc.start_method == "exec"
        assert (await within(tx.call(1), 30))[0] == proc.pid
    with pytest.raises(ValueError, match="zygote must be"):
        meshipc.Mesh(zygote="sometimes")  # type: ignore[arg-type]


PARENT = """
import asyncio, json, sys, meshipc
async def main():
    async with meshipc.Mesh(runtime_dir=sys.argv[1]) as mesh:
        pids = []
        for _ in range(2):
            tx, rx = meshipc.channel()
            await mesh.spawn("workers:idle", tx)
            pids.append(await rx.recv())
        print(json.dumps({"zygote": mesh.stats().zygote.pid, "workers": pids}), flush=True)
        await asyncio.Event().wait()  # until killed
asyncio.run(main())
"""


@needs_fork
async def test_root_sigkilled_its_zygote_and_workers_exit(runtime_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, str(runtime_dir), env=env, stdout=asyncio.subprocess.PIPE
    )
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        report = json.loads(await within(parent.stdout.readline(), 60))
        pids = [report["zygote"], *report["workers"]]
        assert all(ppid(p) == report["zygote"] for p in report["workers"])
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        await parent.wait()
        for pid in pids:
            await gone(pid)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@needs_fork
async def test_a_broken_zygote_reply_stops_it_and_fails_the_waiting_fork() -> None:
    """The node reads its zygote's replies as untrusted: an oversized frame
    ends that zygote; the fork waiting on it fails (the spawn then execs)."""
    zygote = Zygote()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    zygote._sock = ours
    zygote.starts = 1
    loop = asyncio.get_running_loop()
    loop.add_reader(ours.fileno(), zygote._readable)
    waiting: asyncio.Future[Any] = loop.create_future()
    zygote._pending.append(waiting)
    try:
        theirs.sendall((MAX_REPLY + 1).to_bytes(4, "big") + b"x" * 16)
        with pytest.raises(ZygoteUnavailable, match="died"):
            await within(waiting)
        assert zygote._sock is None and zygote.usable  # the next spawn may start another
    finally:
        theirs.close()
        zygote.close()


@needs_fork
async def test_the_zygote_refuses_an_oversized_request_before_reading_it(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """The zygote caps what it reads (``MAX_REQUEST``): a larger frame ends
    it, and the node sees it go (a warning)."""
    caplog.set_level(logging.WARNING, logger="meshipc")
    zygote = Zygote()
    try:
        zygote.start(worker_command())
        assert zygote._sock is not None and zygote._popen is not None
        zygote._sock.send((MAX_REQUEST + 1).to_bytes(4, "big"))
        await wait_until(lambda: zygote._sock is None, "the node to see its zygote exit")
        assert zygote._popen.returncode is not None
        assert "the zygote (pid" in caplog.text
        assert f"zygote: a {MAX_REQUEST + 1}-byte request (at most {MAX_REQUEST})" in capfd.readouterr().err
    finally:
        zygote.close()


@needs_fork
async def test_a_zygote_that_never_gets_ready_is_stopped_and_the_worker_execd(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The node waits for a new zygote's imports (``Ready``) before the
    worker's handshake timer starts, at most ``READY_TIMEOUT``: past it the
    zygote is stopped and the worker exec'd, with a warning."""
    monkeypatch.setattr(meshipc._zygote, "READY_TIMEOUT", 0.5)
    monkeypatch.setattr(meshipc._zygote, "_BOOTSTRAP", "import time; time.sleep(60)")  # never Ready
    caplog.set_level(logging.WARNING, logger="meshipc")
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await within(mesh.spawn("workers:whoami", rx), 60)
        assert proc.start_method == "exec" and mesh.stats().zygote.fallbacks == 1
        assert (await within(tx.call(1), 30))[0] == proc.pid
        assert "the zygote did not get ready within 0.5 s" in caplog.text
        assert mesh.stats().zygote.pid is None  # stopped
