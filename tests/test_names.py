"""``_names``: where meshes live. The runtime folder, name lengths, socket
paths, the name locks, what a failed start leaves behind, and the errors
that say which folder and why.

Real meshes on real sockets under short private folders in /tmp; every test
removes what it made."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import meshipc
from meshipc import ConnectError, Mesh, MeshError, MeshNameInUse, SocketPathTooLong, _names
from meshipc._names import (
    LISTENER_NAME,
    MAX_DIRECTORY_NAME,
    check_private_dir,
    check_socket_room,
    listener_path,
    lock_path,
    mesh_directory,
    named_meshes,
    node_path,
    runtime_location,
)
from meshipc._platform import MAX_SOCKET_PATH, PLATFORM
from relutil import root_of_length

T = 10.0


# ------------------------------------------------------------- runtime dir


def test_runtime_dir_comes_from_xdg_or_says_why_not(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = runtime_dir / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert runtime_location() == (xdg, "from XDG_RUNTIME_DIR")
    assert runtime_location(runtime_dir) == (runtime_dir, "given as runtime_dir")

    os.chmod(xdg, 0o755)  # unusable: not private
    with pytest.raises(MeshError) as ei:
        runtime_location()
    msg = str(ei.value)
    assert msg.startswith(f"XDG_RUNTIME_DIR={xdg} cannot hold meshes: {xdg} has mode 755")
    assert "pass runtime_dir=" in msg and "unset XDG_RUNTIME_DIR" in msg
    # the same folder is refused by name, not silently replaced, at every entry point
    with pytest.raises(MeshError, match="XDG_RUNTIME_DIR="):
        asyncio.run(Mesh(name="x").__aenter__())
    with pytest.raises(ConnectError, match="XDG_RUNTIME_DIR="):  # what clients catch

        async def attach() -> None:
            async with meshipc.connect("x"):
                pass  # pragma: no cover

        asyncio.run(attach())

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir / "missing"))
    with pytest.raises(MeshError, match=r"XDG_RUNTIME_DIR=.*/missing does not exist"):
        runtime_location()
    assert not (runtime_dir / "missing").exists()
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    with pytest.raises(MeshError, match="not an absolute path"):
        runtime_location()


def test_squatted_tmp_folder_says_how_to_get_out(runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("MESHIPC_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(PLATFORM, "tmp_base", str(runtime_dir))
    monkeypatch.setattr(PLATFORM, "session_base", str(runtime_dir / "no-sessions"))
    squat = runtime_dir / f"meshipc-{os.getuid()}"
    squat.mkdir(mode=0o777)
    os.chmod(squat, 0o777)  # what another user could have made before us
    if os.getuid() == 0:
        os.chown(squat, 65534, 65534)
    with pytest.raises(MeshError) as ei:
        runtime_location()
    msg = str(ei.value)
    assert str(squat) in msg and "refusing to use it" in msg
    assert "set MESHIPC_RUNTIME_DIR (or XDG_RUNTIME_DIR) to a private folder of yours (mode 0700)" in msg
    assert "pass runtime_dir= or --runtime-dir" in msg
    assert list(squat.iterdir()) == []  # nothing created in it
    shutil.rmtree(squat)
    assert runtime_location() == (squat, "no runtime folder is set and no login session folder exists")


def test_ls_says_which_runtime_dir_and_why(runtime_dir: Path) -> None:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir))
    out = subprocess.run(
        [sys.executable, "-m", "meshipc", "ls"], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == f"(runtime dir {runtime_dir}: from XDG_RUNTIME_DIR)"
    os.chmod(runtime_dir, 0o750)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "meshipc", "ls"], env=env, capture_output=True, text=True, timeout=30
        )
    finally:
        os.chmod(runtime_dir, 0o700)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith(f"meshipc ls: XDG_RUNTIME_DIR={runtime_dir} cannot hold meshes"), out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------- names, paths


@pytest.mark.parametrize("length", [1, 50, 63, 64])
async def test_every_documented_name_works_under_a_default_length_root(
    runtime_dir: Path, length: int
) -> None:
    """The longest default root is ``/tmp/meshipc-<10-digit uid>`` (23
    characters; ``/run/user/<uid>`` is shorter): a mesh with a name of any
    documented length starts there, spawns, listens and is attached to by
    name, and leaves nothing behind."""
    root = root_of_length(runtime_dir, len("/tmp/meshipc-4294967294"))
    name = ("n" * length)[:length]
    async with Mesh(name=name, runtime_dir=root) as mesh:
        listener = await mesh.listen()
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:echo", rx)
        assert await asyncio.wait_for(tx.call(length), T) == length
        async with meshipc.connect(name, runtime_dir=root) as cc:
            conn = await asyncio.wait_for(listener.accept(), T)
            cc.port.send("hi")
            assert await asyncio.wait_for(conn.port.recv(), T) == "hi"
        tx.close()
        assert await asyncio.wait_for(proc.wait(), T) == 0
        assert max(len(bytes(p)) for p in mesh.directory.iterdir()) <= MAX_SOCKET_PATH
    assert list(root.iterdir()) == []


async def test_failed_start_leaves_nothing_behind(runtime_dir: Path) -> None:
    """A root too long for the sockets: refused before anything is made,
    with the path, the limit and what to do."""
    for length, name in ((60, "n" * 64), (90, None)):
        root = root_of_length(runtime_dir, length)
        with pytest.raises(MeshError) as ei:
            async with Mesh(name=name, runtime_dir=root):
                pass  # pragma: no cover
        msg = str(ei.value)
        assert f"over the AF_UNIX limit of {MAX_SOCKET_PATH}" in msg
        assert str(root) in msg and "use a shorter runtime folder" in msg
        assert list(root.iterdir()) == []


async def test_start_failing_at_bind_releases_the_lock_file(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import meshipc._node

    def no_listen(path: Path, what: str, backlog: int = 1024) -> socket.socket:
        raise MeshError(f"cannot listen on {what} {path}: planted failure")

    monkeypatch.setattr(meshipc._node, "listen_private", no_listen)
    with pytest.raises(MeshError, match="planted failure"):
        async with Mesh(name="fails", runtime_dir=runtime_dir):
            pass  # pragma: no cover
    assert list(runtime_dir.iterdir()) == []


# ------------------------------------------------------------- not running


async def test_connect_by_name_says_why_nothing_answers(runtime_dir: Path) -> None:
    async def attach(name: str) -> str:
        with pytest.raises(ConnectError) as ei:
            async with meshipc.connect(name, runtime_dir=runtime_dir, timeout=T):
                pass  # pragma: no cover
        assert str(runtime_dir / f"mesh-{name}" / "listen.sock") in str(ei.value)
        return ei.value.reason

    assert await attach("absent") == (
        f"no mesh named 'absent' is running (runtime dir {runtime_dir}, given as runtime_dir)"
    )
    async with Mesh(name="quiet", runtime_dir=runtime_dir) as mesh:
        assert await attach("quiet") == (
            f"mesh 'quiet' is running but not listening (no listener at {mesh.directory / 'listen.sock'})"
        )
    # what a SIGKILLed service leaves: its lock file (unlocked), its folder, its listener socket
    (runtime_dir / "mesh-dead.lock").touch(mode=0o600)
    (runtime_dir / "mesh-dead").mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(runtime_dir / "mesh-dead" / "listen.sock"))
    reason = await attach("dead")
    assert reason.startswith("mesh 'dead' is not running any more (stale since 20"), reason
    assert "`meshipc ls --prune`" in reason

    # by path: the socket's state, in words
    for path, want in (
        (runtime_dir / "nothing.sock", "nothing there (no such socket)"),
        (
            runtime_dir / "mesh-dead" / "listen.sock",
            "nothing listens there any more (a stale socket of a mesh that is gone)",
        ),
    ):
        with pytest.raises(ConnectError) as ei:
            async with meshipc.connect(path, timeout=T):
                pass  # pragma: no cover
        assert str(ei.value) == f"cannot connect to mesh listener {path}: {want}"


async def test_ls_prune_removes_what_a_killed_mesh_left_and_nothing_else(runtime_dir: Path) -> None:
    client = Path(__file__).with_name("attach_client.py")
    owner = await asyncio.create_subprocess_exec(
        sys.executable, str(client), "named", str(runtime_dir), "dead", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert owner.stdout is not None
        assert b"listener" in await asyncio.wait_for(owner.stdout.readline(), T)
    finally:
        owner.kill()  # SIGKILL: no cleanup runs
        await owner.wait()

    async def cli(*args: str) -> str:
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshipc",
            *args,
            "--runtime-dir",
            str(runtime_dir),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(p.communicate(), T)
        assert p.returncode == 0
        return out.decode()

    async with Mesh(name="alive", runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        assert (await cli("ls")).splitlines()[:2] == [f"alive\tlive  listener {listener.path}", "dead\tstale"]
        assert (await cli("ls", "--prune")).splitlines()[:2] == [
            "dead\tpruned",
            f"alive\tlive  listener {listener.path}",
        ]
        assert sorted(p.name for p in runtime_dir.iterdir()) == ["mesh-alive", "mesh-alive.lock"]
        async with meshipc.connect("alive", runtime_dir=runtime_dir) as cc:  # untouched
            conn = await asyncio.wait_for(listener.accept(), T)
            cc.port.send("still here")
            assert await asyncio.wait_for(conn.port.recv(), T) == "still here"
    assert list(runtime_dir.iterdir()) == []


async def test_ls_tells_live_from_stale_without_taking_any_lock(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trying a name's lock, even shared and for a moment, could make a mesh
    starting then fail with MeshNameInUse: ``ls`` reads /proc/locks."""
    import fcntl

    from meshipc import _cli
    from meshipc._names import lock_is_held

    def no_flock(fd: int, op: int) -> None:
        raise AssertionError("ls tried a lock")

    (runtime_dir / "mesh-dead.lock").touch(mode=0o600)
    (runtime_dir / "mesh-dead").mkdir(mode=0o700)
    assert lock_is_held(runtime_dir / "mesh-dead.lock") is False
    assert lock_is_held(runtime_dir / "mesh-absent.lock") is None
    async with Mesh(name="alive", runtime_dir=runtime_dir):
        assert lock_is_held(runtime_dir / "mesh-alive.lock") is True
        monkeypatch.setattr(fcntl, "flock", no_flock)
        assert _cli.main(["ls", "--runtime-dir", str(runtime_dir)]) == 0
        monkeypatch.undo()
    out = capsys.readouterr().out.splitlines()
    assert out == ["alive\tlive", "dead\tstale", f"(runtime dir {runtime_dir}: given as runtime_dir)"]


# ------------------------------------------------------------- name locks


async def test_mesh_name_in_use_then_free(runtime_dir: Path) -> None:
    async with Mesh(name="x", runtime_dir=runtime_dir) as first:
        with pytest.raises(MeshNameInUse) as ei:
            async with Mesh(name="x", runtime_dir=runtime_dir):
                pass
        assert isinstance(ei.value, MeshError)
        assert "'x'" in str(ei.value)
        # the refused attempt disturbed nothing
        assert first.directory.is_dir()
        listener = await first.listen()
        async with meshipc.connect("x", runtime_dir=runtime_dir) as cc:
            conn = await asyncio.wait_for(listener.accept(), T)
            cc.port.send("still here")
            assert await asyncio.wait_for(conn.port.recv(), T) == "still here"
    assert not (runtime_dir / "mesh-x").exists()
    async with Mesh(name="x", runtime_dir=runtime_dir) as again:
        assert again.directory == runtime_dir / "mesh-x"


@pytest.mark.parametrize("kind", ["other-owner", "mode-0755", "symlink", "regular-file"])
async def test_directory_not_ours_is_refused_and_kept(runtime_dir: Path, kind: str) -> None:
    d = runtime_dir / "mesh-z"
    marker = None
    if kind == "other-owner":
        if os.getuid() != 0:
            pytest.skip("chown to another uid needs root")
        d.mkdir(mode=0o700)
        marker = d / "marker"
        marker.write_text("keep me")
        os.chown(d, 65534, 65534)
    elif kind == "mode-0755":
        d.mkdir()
        os.chmod(d, 0o755)
        marker = d / "marker"
        marker.write_text("keep me")
    elif kind == "symlink":
        target = runtime_dir / "elsewhere"
        target.mkdir(mode=0o700)
        marker = target / "marker"
        marker.write_text("keep me")
        d.symlink_to(target)
    else:
        d.write_text("keep me")

    before = os.lstat(d)
    with pytest.raises(MeshError) as ei:
        async with Mesh(name="z", runtime_dir=runtime_dir):
            pass
    assert not isinstance(ei.value, MeshNameInUse)
    assert os.fspath(d) in str(ei.value)
    after = os.lstat(d)
    assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode, before.st_uid)
    if marker is not None:
        assert marker.read_text() == "keep me"
    # the refusal does not hold the name
    with pytest.raises(MeshError) as again:
        async with Mesh(name="z", runtime_dir=runtime_dir):
            pass
    assert not isinstance(again.value, MeshNameInUse)


async def test_failed_start_does_not_hold_the_name(runtime_dir: Path) -> None:
    """A named mesh whose node cannot start releases the name's lock."""
    too_long = runtime_dir / ("d" * 80)  # the node socket path exceeds the AF_UNIX limit
    for _ in range(2):
        with pytest.raises(MeshError) as ei:
            async with Mesh(name="n", runtime_dir=too_long):
                pass
        assert not isinstance(ei.value, MeshNameInUse), ei.value
    assert not (too_long / "mesh-n").exists()


def test_name_claim_retries_when_the_lock_file_is_replaced(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clean exit removes the lock file while holding the lock: a claimant
    that opened the old file and locks it just after must not believe it holds
    the name (another claimant may hold the new file)."""
    root = runtime_dir
    lock_path = root / "mesh-racy.lock"
    real_flock = fcntl.flock
    calls: list[int] = []

    def flock_after_swap(fd: int, op: int) -> None:
        if not calls:  # the owner releases between our open() and our flock()
            os.unlink(lock_path)
            lock_path.touch(mode=0o600)
        calls.append(fd)
        real_flock(fd, op)

    monkeypatch.setattr(_names.fcntl, "flock", flock_after_swap)
    directory, fd = _names.claim_name(root, "racy")
    try:
        assert len(calls) == 2  # the stale inode was dropped and the new file taken
        assert os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        assert directory == root / "mesh-racy"
    finally:
        _names.release_name(root, "racy", fd)
    assert not lock_path.exists()


# ------------------------------------------------------------------- paths


def test_every_mesh_path_is_built_from_the_name(runtime_dir: Path) -> None:
    assert mesh_directory(runtime_dir, "vmm") == runtime_dir / "mesh-vmm"
    assert lock_path(runtime_dir, "vmm") == runtime_dir / "mesh-vmm.lock"
    long = "n" * 64
    cut = mesh_directory(runtime_dir, long)
    assert cut.name.startswith("mesh-" + "n" * 23 + "~") and len(cut.name) <= MAX_DIRECTORY_NAME
    assert mesh_directory(runtime_dir, long[:-1]) != cut  # the digest tells cut names apart
    assert listener_path("vmm", runtime_dir) == runtime_dir / "mesh-vmm" / LISTENER_NAME
    assert listener_path(runtime_dir / "x.sock", None) == runtime_dir / "x.sock"  # a path is taken as given
    assert node_path(runtime_dir, bytes(range(16))) == runtime_dir / "000102030405"


def test_named_meshes_lists_lock_files_only(runtime_dir: Path) -> None:
    for entry in ("mesh-a.lock", "mesh-b.lock", "other.lock", "mesh-c"):
        (runtime_dir / entry).touch(mode=0o600)
    assert named_meshes(runtime_dir) == ["a", "b"]


def test_socket_room_is_checked_against_the_longest_socket_name(runtime_dir: Path) -> None:
    longest = len(node_path(Path("/x"), bytes(16)).name)  # a node socket's name
    budget = MAX_SOCKET_PATH - len(os.fsencode(runtime_dir)) - 2  # two slashes
    directory = runtime_dir / ("d" * (budget - longest))
    check_socket_room(directory)  # exactly at the budget
    with pytest.raises(SocketPathTooLong):
        check_socket_room(Path(os.fspath(directory) + "d"))


def test_check_private_dir_refuses_a_shared_folder(runtime_dir: Path) -> None:
    shared = runtime_dir / "shared"
    shared.mkdir(mode=0o700)
    check_private_dir(shared)
    os.chmod(shared, 0o750)
    with pytest.raises(MeshError, match="0700"):
        check_private_dir(shared)


async def test_name_is_live_without_proc_locks(runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``/proc/locks`` cannot be read, liveness is told by trying a shared lock."""
    monkeypatch.setattr(_names, "lock_is_held", lambda path: None)
    lock_path(runtime_dir, "gone").touch(mode=0o600)
    assert not _names.name_is_live(runtime_dir, "gone")
    async with Mesh(name="here", runtime_dir=runtime_dir):
        assert _names.name_is_live(runtime_dir, "here")


def test_every_socket_name_fits_the_budget_check_socket_room_assumes() -> None:
    """``check_socket_room`` bounds every socket of a mesh by its longest
    name: node sockets and the listener must all stay within
    ``MAX_SOCKET_NAME`` bytes."""
    from meshipc._names import LISTENER_NAME, node_path
    from meshipc._platform import MAX_SOCKET_NAME

    names = [node_path(Path("/x"), bytes([i]) * 16).name for i in (0, 255)] + [LISTENER_NAME]
    assert max(len(n.encode()) for n in names) <= MAX_SOCKET_NAME, names
