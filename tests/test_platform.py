"""The platform layer (``meshipc._platform``): each implementation on real
sockets where this kernel has what it needs (Linux and the portable mode,
whichever mode the suite runs in), fakes for what only macOS gives
(``LOCAL_PEERCRED``/``LOCAL_PEERPID`` records, ``ENOBUFS`` on a full
receiver), the path budget, and ``import meshipc`` with every Linux-only
attribute gone."""

from __future__ import annotations

import array
import asyncio
import errno
import os
import re
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

import meshipc
from meshipc import (
    DescriptorsTruncated,
    HandshakeError,
    Mesh,
    MessageError,
    PeerCredentialsError,
    PlatformError,
    ProtocolError,
    SocketPathTooLong,
    _platform,
    _transport,
)
from meshipc._names import MAX_DIRECTORY_NAME, MAX_ROOT_FOR_ANY_NAME, mesh_directory
from meshipc._platform import (
    LOCAL_PEERCRED,
    LOCAL_PEERPID,
    MAX_SOCKET_NAME,
    MAX_SOCKET_PATH,
    PLATFORM,
    SOL_LOCAL,
    XUCRED,
    Linux,
    MacOS,
    Platform,
    Portable,
    parse_peerpid,
    parse_xucred,
    select,
)
from meshipc._transport import Link
from meshipc._wire import OOB_THRESHOLD, THREAD_BODY_MIN, MsgEvent
from relutil import root_of_length, wait_until

T = 10.0
#: the implementations this kernel can run for real
REAL = [Linux(), Portable()]


def xucred(
    version: int = 0, uid: int = 501, groups: tuple[int, ...] = (20, 12, 61), ngroups: int | None = None
) -> bytes:
    n = len(groups) if ngroups is None else ngroups
    padded = list(groups) + [0] * (16 - len(groups))
    return XUCRED.pack(version, uid, n, *padded)


# ------------------------------------------------------------- selection


def test_select_picks_by_system_and_environment() -> None:
    assert type(select("linux", {})) is Linux
    assert type(select("linux", {"MESHIPC_PORTABLE": "1"})) is Portable
    assert type(select("linux", {"MESHIPC_PORTABLE": "0"})) is Linux
    assert type(select("darwin", {})) is MacOS
    assert type(select("darwin", {"MESHIPC_PORTABLE": "1"})) is MacOS
    other = select("freebsd14", {})
    assert type(other) is Platform
    a, b = socket.socketpair()
    with a, b, pytest.raises(PlatformError, match="cannot read peer credentials on"):
        other.peer_cred(a)
    # this run's mode
    want = Portable if os.environ.get("MESHIPC_PORTABLE") == "1" else Linux
    assert type(PLATFORM) is want


def test_import_works_with_every_linux_only_attribute_gone() -> None:
    """macOS has none of these: meshipc imports, picks the macOS
    implementation, and builds its paths without touching them."""
    code = textwrap.dedent(
        """
        import fcntl, os, socket, sys
        for mod, names in (
            (socket, ["MSG_CMSG_CLOEXEC", "SOCK_CLOEXEC", "SO_PEERCRED", "SOCK_NONBLOCK", "SO_PASSCRED"]),
            (os, ["memfd_create", "MFD_CLOEXEC", "MFD_ALLOW_SEALING", "pidfd_open", "eventfd"]),
            (fcntl, ["F_ADD_SEALS", "F_GET_SEALS", "F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW",
                     "F_SEAL_WRITE"]),
        ):
            for name in names:
                if hasattr(mod, name):
                    delattr(mod, name)
        sys.platform = "darwin"
        import meshipc, meshipc.sync
        from meshipc import _platform
        from meshipc._names import mesh_directory
        p = _platform.PLATFORM
        assert type(p) is _platform.MacOS, p
        assert p.recv_flags == 0 and p.oob == "file" and p.needs_parent_pipe
        assert str(p.default_runtime_root()) == f"/tmp/meshipc-{os.getuid()}"
        assert len(mesh_directory(p.default_runtime_root(), "n" * 64).name) <= 45
        s = p.unix_socket()
        assert not s.get_inheritable()
        s.close()
        print("macos ok")
        """
    )
    env = dict(os.environ)
    env.pop("MESHIPC_PORTABLE", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "macos ok"


# ------------------------------------------------------ peer credentials


@pytest.mark.parametrize("plat", REAL, ids=lambda p: p.name)
def test_peer_credentials_on_real_sockets(plat: Platform) -> None:
    a, b = socket.socketpair()
    with a, b:
        assert plat.peer_cred(a) == (os.getpid(), os.getuid(), os.getgid())
        assert meshipc.PeerCred.of(b).uid == os.getuid()


def test_xucred_parsing() -> None:
    assert XUCRED.size == 76  # u_int, uid_t, short (+2 padding), gid_t[16]
    assert parse_xucred(xucred()) == (501, 20)
    assert parse_xucred(xucred(groups=())) == (501, -1)
    assert parse_xucred(xucred(groups=(7,))[:16]) == (501, 7)  # only what ngroups says is read
    bad = [
        (b"", "is 0 bytes"),
        (xucred()[:11], "is 11 bytes"),
        (xucred() + b"\0", "is 77 bytes"),
        (xucred(version=1), "version 1"),
        (xucred(ngroups=17), "17 groups"),
        (xucred(ngroups=-1), "-1 groups"),
        (xucred(groups=(1, 2, 3))[:20], "cut short: 3 groups in 20 bytes"),
    ]
    for data, why in bad:
        with pytest.raises(PeerCredentialsError, match=why):
            parse_xucred(data)


def test_peerpid_parsing() -> None:
    assert parse_peerpid(struct.pack("=i", 4242)) == 4242
    for data in (b"", b"\1\2\3", b"\0" * 8, struct.pack("=i", -5)):
        with pytest.raises(PeerCredentialsError):
            parse_peerpid(data)


class FakeMacSocket:
    """Answers ``getsockopt`` as macOS documents it, from canned records."""

    def __init__(self, cred: bytes, pid: bytes, fail: OSError | None = None) -> None:
        self.records = {(SOL_LOCAL, LOCAL_PEERCRED): cred, (SOL_LOCAL, LOCAL_PEERPID): pid}
        self.asked: list[tuple[int, int, int]] = []
        self.fail = fail

    def getsockopt(self, level: int, opt: int, size: int) -> bytes:
        self.asked.append((level, opt, size))
        if self.fail is not None:
            raise self.fail
        return self.records[(level, opt)][:size]


def test_macos_peer_credentials_through_local_peercred_and_peerpid() -> None:
    mac = MacOS()
    fake = FakeMacSocket(xucred(uid=os.getuid(), groups=(os.getgid(),)), struct.pack("=i", 777))
    assert mac.peer_cred(fake) == (777, os.getuid(), os.getgid())  # type: ignore[arg-type]
    assert fake.asked == [(0, 1, 76), (0, 2, 4)]
    # PeerCred, the public face, goes through the platform
    assert meshipc.PeerCred(*mac.peer_cred(fake)).pid == 777  # type: ignore[arg-type]

    with pytest.raises(PeerCredentialsError, match="version 3"):
        mac.peer_cred(FakeMacSocket(xucred(version=3), struct.pack("=i", 1)))  # type: ignore[arg-type]
    with pytest.raises(PeerCredentialsError) as ei:
        mac.peer_cred(FakeMacSocket(b"", b"", fail=OSError(errno.ENOTCONN, "not connected")))  # type: ignore[arg-type]
    # callers that refuse a peer on OSError or HandshakeError both catch it
    assert isinstance(ei.value, OSError) and isinstance(ei.value, HandshakeError)


# ------------------------------------------------------ out-of-band bodies


@pytest.mark.parametrize("plat", REAL, ids=lambda p: p.name)
def test_bodies_round_trip_and_interoperate(plat: Platform) -> None:
    body = os.urandom(5 * 1024 * 1024)
    fd = plat.make_body(body)
    try:
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode) and st.st_size == len(body)
        assert not os.get_inheritable(fd)
        if plat.oob == "file":
            assert st.st_nlink == 0  # unlinked at once: nothing left on disk
            assert stat.S_IMODE(st.st_mode) == 0o600
        # both readers take both kinds (a portable peer may talk to a Linux one)
        for reader in REAL:
            assert reader.read_body(fd, len(body)) == body
    finally:
        os.close(fd)


@pytest.mark.parametrize("plat", REAL, ids=lambda p: p.name)
def test_bad_bodies_are_refused(plat: Platform) -> None:
    fd = Portable().make_body(b"x" * 100)
    try:
        with pytest.raises(ProtocolError, match="is 100 bytes, frame said 101"):
            plat.read_body(fd, 101)
        os.ftruncate(fd, 10)  # the sender shrinks it: a short file, no fault
        with pytest.raises(ProtocolError, match="is 10 bytes"):
            plat.read_body(fd, 100)
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        with pytest.raises(ProtocolError, match="not a regular file"):
            Portable().read_body(r, 10)
        with pytest.raises(ProtocolError):
            plat.read_body(r, 10)
    finally:
        os.close(r)
        os.close(w)


# ------------------------------------------------------- received fds


def test_received_descriptors_are_made_close_on_exec() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    with a, b:
        try:
            for plat in REAL:
                a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
                _, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(4), plat.recv_flags)
                (got,) = array.array("i", anc[0][2])
                try:
                    plat.adopt_received([got])
                    assert not os.get_inheritable(got), plat
                finally:
                    os.close(got)
        finally:
            os.close(r)
            os.close(w)


# ----------------------------------------------- connections (fakes for macOS)


class FlakySocket:
    """A real socket whose first ``fails`` sendmsg calls raise ``err``, as
    macOS's does while the receiver has no room for descriptors."""

    def __init__(self, real: socket.socket, fails: int, err: int) -> None:
        self._real = real
        self.fails = fails
        self.err = err

    def sendmsg(self, *args: Any) -> int:
        if self.fails:
            self.fails -= 1
            raise OSError(self.err, os.strerror(self.err))
        return self._real.sendmsg(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def pair(loop: asyncio.AbstractEventLoop, a: Any, b: socket.socket) -> tuple[Link, Link, Any]:
    got: asyncio.Queue[Any] = asyncio.Queue()

    def on_event(peer: bytes, ev: Any, fds: list[Any]) -> None:
        got.put_nowait((ev, fds))

    def on_lost(link: Link, reason: str) -> None:
        got.put_nowait(("lost", reason))

    def on_data(*args: Any) -> None:
        got.put_nowait(args)

    ca = Link(loop, a, b"A" * 16, on_event, on_lost, on_data)
    cb = Link(loop, b, b"B" * 16, on_event, on_lost, on_data)
    return ca, cb, got


@pytest.mark.parametrize("err", [errno.ENOBUFS, errno.EMSGSIZE])
async def test_descriptors_retry_while_the_receiver_is_full(
    monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    monkeypatch.setattr(_transport, "PLATFORM", MacOS())
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    flaky = FlakySocket(a, 3, err)
    ca, cb, got = pair(loop, flaky, b)
    r, w = os.pipe()
    try:
        ca.write_event(MsgEvent(b"p" * 16, 1, 0, 0, [], 1, b"with an fd"), [meshipc.Fd(r)])
        ca.write_data(b"p" * 16, 2, 0, b"after it")  # queued behind, in order
        ev, fds = await asyncio.wait_for(got.get(), T)
        assert ev.body == b"with an fd" and len(fds) == 1
        _port, seq, _kind, body = await asyncio.wait_for(got.get(), T)
        assert (seq, body) == (2, b"after it")
        assert ca.retries == 3 and not ca.closed
        os.write(w, b"!")
        assert os.read(fds[0].fileno(), 1) == b"!"
        fds[0].close()
    finally:
        ca.close()
        cb.close()
        os.close(w)


async def test_on_linux_a_descriptor_send_error_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_transport, "PLATFORM", Linux())
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    ca, cb, got = pair(loop, FlakySocket(a, 1, errno.ENOBUFS), b)
    r, w = os.pipe()
    try:
        ca.write_event(MsgEvent(b"p" * 16, 1, 0, 0, [], 1, b"x"), [meshipc.Fd(r)])
        tag, reason = await asyncio.wait_for(got.get(), T)
        assert tag == "lost" and "write failed" in reason and ca.retries == 0
    finally:
        ca.close()
        cb.close()
        os.close(w)


async def test_truncated_descriptors_are_closed_and_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel cuts descriptors that do not fit the reader's control
    buffer (``MSG_CTRUNC``): the ones that did arrive are closed, nothing
    leaks, and the connection ends with ``DescriptorsTruncated``."""
    assert issubclass(DescriptorsTruncated, ProtocolError)
    # room for one or two (alignment)
    monkeypatch.setattr(_transport, "_ANCILLARY_SPACE", socket.CMSG_SPACE(4))
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    r, w = os.pipe()
    ca, cb, got = pair(loop, a, b)
    try:
        ca.write_event(MsgEvent(b"p" * 16, 1, 0, 0, [], 3, b"x"), [meshipc.Fd(os.dup(r)) for _ in range(3)])
        os.close(r)  # now only the copies in flight and at the receiver hold the read end
        tag, reason = await asyncio.wait_for(got.get(), T)
        assert tag == "lost" and re.search(r"descriptors were truncated \([12] arrived", reason), reason
        with pytest.raises(BrokenPipeError):  # every read end is closed: none leaked
            os.write(w, b"x")
    finally:
        ca.close()
        cb.close()
        os.close(w)


# ------------------------------------------------------------ parent death


@pytest.mark.parametrize("plat", REAL, ids=lambda p: p.name)
def test_parent_death_pipe_ends_a_blocked_worker(plat: Platform) -> None:
    """The portable watch: a worker whose main thread is stuck (no event
    loop turns) gets SIGTERM as soon as the pipe's write end closes."""
    pipe = Portable().parent_pipe()
    assert pipe is not None
    r, w = pipe
    code = textwrap.dedent(
        """
        import os, sys
        from meshipc._platform import Portable
        Portable().die_with_parent(int(sys.argv[1]))
        print("ready", flush=True)
        os.read(0, 1)  # blocked: only the watch thread can end us
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(r)], pass_fds=[r], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        os.close(r)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        os.close(w)  # what the kernel does when the parent dies
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.stdout.close()
    assert Linux().parent_pipe() is None  # the kernel's PR_SET_PDEATHSIG instead


# ------------------------------------------------------------- path budget


def test_directory_names_are_bounded_whatever_the_mesh_name() -> None:
    root = Path("/x")
    names = ["a", "n" * 40, "n" * 41, "n" * 64, "n" * 63 + "m", "a.b-c_d" * 9]
    dirs = {mesh_directory(root, n).name for n in names}
    assert len(dirs) == len(names)  # distinct names, distinct folders
    assert max(len(d) for d in dirs) == MAX_DIRECTORY_NAME == 45
    assert mesh_directory(root, "short").name == "mesh-short"  # short names as before
    assert MAX_ROOT_FOR_ANY_NAME == MAX_SOCKET_PATH - (1 + 45 + 1 + MAX_SOCKET_NAME) == 41
    for default in ("/run/user/4294967294", "/tmp/meshipc-4294967294"):
        assert len(default) <= MAX_ROOT_FOR_ANY_NAME


async def test_longest_name_under_the_longest_root_that_has_room(runtime_dir: Path) -> None:
    """The longest documented name (64 characters) under a runtime root of
    the longest length with room for any name: every socket fits the budget;
    one byte more and ``Mesh()`` refuses, naming the path, before creating
    anything."""
    name = "L" * 64
    root = root_of_length(runtime_dir, MAX_ROOT_FOR_ANY_NAME)
    async with Mesh(name=name, runtime_dir=root) as mesh:
        await mesh.listen()
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:echo", rx)
        assert await asyncio.wait_for(tx.call(1), T) == 1
        async with meshipc.connect(name, runtime_dir=root, timeout=T):
            pass
        tx.close()
        assert await asyncio.wait_for(proc.wait(), T) == 0
        socks = list(mesh.directory.iterdir())
        assert len(socks) == 2  # the node and listener sockets (the worker left)
        assert max(len(os.fsencode(p)) for p in socks) == MAX_SOCKET_PATH
    assert list(root.iterdir()) == []

    longer = root_of_length(runtime_dir, MAX_ROOT_FOR_ANY_NAME + 1)
    with pytest.raises(SocketPathTooLong) as ei:
        async with Mesh(name=name, runtime_dir=longer):
            pass  # pragma: no cover
    e = ei.value
    assert (e.length, e.limit) == (MAX_SOCKET_PATH + 1, MAX_SOCKET_PATH)
    assert e.path.startswith(str(longer)) and e.path in str(e)
    assert list(longer.iterdir()) == []
    # a shorter name still fits there
    async with Mesh(name="short", runtime_dir=longer):
        pass


def test_the_fallback_runtime_root_ignores_tmpdir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", "/var/folders/zz/zyxvpxvq6csfxvn_n0000000000000/T/")
    assert MacOS().default_runtime_root() == Path(f"/tmp/meshipc-{os.getuid()}")
    assert Portable().default_runtime_root() == Path(f"/tmp/meshipc-{os.getuid()}")
    monkeypatch.setattr(tempfile, "tempdir", "/somewhere")  # nor a Linux one: /tmp whatever the environment
    assert Linux().default_runtime_root() == Path(f"/tmp/meshipc-{os.getuid()}")


# --------------------------------------------------- big bodies end to end


async def test_large_messages_through_a_worker(runtime_dir: Path) -> None:
    """16 MiB each way through a worker, by whichever body path this mode uses."""
    big = os.urandom(16 * 1024 * 1024)
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:echo", rx)
        assert await asyncio.wait_for(tx.call(big), 30) == big
        tx.close()
        assert await asyncio.wait_for(proc.wait(), T) == 0
    assert _platform.PLATFORM.oob in ("memfd", "file")


# ------------------------------------------------ body hardening, key material


@pytest.mark.parametrize("plat", REAL, ids=lambda p: p.name)
def test_sparse_bodies_are_refused_before_any_read(plat: Platform, tmp_path: Path) -> None:
    """A body descriptor whose blocks are not there (a 1 GiB hole, or a file
    written in part and then extended) is refused at once: reading it would
    cost us its size in zeros for nothing on the sender's side."""
    for make in (lambda: os.memfd_create("sparse"), lambda: os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)):
        fd = make()
        try:
            os.ftruncate(fd, 1 << 30)
            with pytest.raises(ProtocolError, match="sparse file"):
                plat.read_body(fd, 1 << 30)
            os.ftruncate(fd, 0)
            os.write(fd, b"x" * (1 << 20))
            os.ftruncate(fd, 8 << 20)
            with pytest.raises(ProtocolError, match=r"sparse file \(\d+ of 8388608 bytes in use\)"):
                plat.read_body(fd, 8 << 20)
        finally:
            os.close(fd)
    # what every platform makes passes the check (a memfd counts its pages)
    body = os.urandom(THREAD_BODY_MIN)
    for maker in REAL:
        fd = maker.make_body(body, tmp_path)
        try:
            assert plat.read_body(fd, len(body)) == body
        finally:
            os.close(fd)


def test_making_a_body_that_fails_raises_message_error_naming_the_cause(tmp_path: Path) -> None:
    """A missing folder, a folder without room for the body, a write the
    system refuses (here: beyond ``RLIMIT_FSIZE``): ``MessageError`` with the
    cause, never a bare ``OSError``; no descriptor is left open."""
    portable = Portable()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(MessageError, match="No such file or directory"):
        portable.new_body(OOB_THRESHOLD, tmp_path / "missing")
    with pytest.raises(MessageError, match=r"No space left.*bytes free in"):
        portable.new_body(1 << 62, tmp_path)  # more than the file system holds
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        for plat in REAL:
            with pytest.raises(MessageError, match="File too large"):
                plat.make_body(b"x" * (2 << 20), tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert len(os.listdir("/proc/self/fd")) == before
    assert os.listdir(tmp_path) == []  # file bodies are unlinked at once


async def test_file_bodies_are_made_in_a_private_folder_under_the_runtime_root(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where bodies are files (portable mode, macOS) they are made in
    ``<runtime root>/bodies`` (0700), not in the world-visible temporary
    folder; a folder there that is not private is refused, by name."""
    portable = Portable()
    made: list[str] = []
    new_body = portable.new_body

    def recording(length: int, folder: Path | None = None) -> int:
        fd = new_body(length, folder)
        made.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fd

    monkeypatch.setattr(portable, "new_body", recording)
    monkeypatch.setattr(_transport, "PLATFORM", portable)
    a, b = socket.socketpair()
    got: list[bytes] = []
    loop = asyncio.get_running_loop()
    quiet: Any = lambda *_: None  # noqa: E731
    sender = Link(loop, a, b"B" * 16, quiet, quiet, quiet, body_root=runtime_dir)
    receiver = Link(loop, b, b"A" * 16, lambda _p, ev, _f: got.append(ev.body), quiet, quiet)
    try:
        body = os.urandom(OOB_THRESHOLD)
        sender.write_event(MsgEvent(b"P" * 16, 0, 0, 0, [], 0, body), [])
        await wait_until(lambda: got == [body], "the body")
        folder = runtime_dir / "bodies"
        assert made == [f"{folder}/{made[0].split('/')[-1]}"] and made[0].endswith(" (deleted)")
        assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700 and os.listdir(folder) == []
        # a folder someone made readable is refused, by name, before any body
        other = root_of_length(runtime_dir, len(os.fsencode(runtime_dir)) + 8)
        (other / "bodies").mkdir(mode=0o755)
        (other / "bodies").chmod(0o755)
        c, d = socket.socketpair()
        with c, d:
            loose = Link(loop, c, b"C" * 16, quiet, quiet, quiet, body_root=other)
            with pytest.raises(MessageError, match=f"{other}/bodies has mode 755"):
                loose.write_event(MsgEvent(b"P" * 16, 0, 0, 0, [], 0, body), [])
            loose.close()
    finally:
        sender.close()
        receiver.close()


_DUMPABLE = """
import ctypes, resource, sys
from meshipc._platform import PR_GET_DUMPABLE, select
{before}
libc = ctypes.CDLL(None)
print(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE)[0])
"""


def _dumpable_after(before: str, env: dict[str, str] | None = None) -> tuple[int, int]:
    """(``PR_GET_DUMPABLE``, ``RLIMIT_CORE`` soft) of a fresh interpreter after ``before`` ran."""
    out = subprocess.run(
        [sys.executable, "-c", _DUMPABLE.format(before=textwrap.dedent(before))],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
        capture_output=True,
        text=True,
        timeout=T,
        check=True,
    ).stdout.split()
    return int(out[-2]), int(out[-1])  # what it printed itself comes first


def test_no_core_dumps_from_a_process_that_holds_key_material(runtime_dir: Path) -> None:
    """``no_core_dumps``: Linux makes the process non-dumpable (no core, no
    ptrace or /proc peeking by other same-uid processes) and zeroes the core
    limit; elsewhere the core limit is zeroed. A process does it when it
    starts or joins a mesh and when it runs the CLI; before, it is dumpable."""
    assert _dumpable_after("")[0] == 1
    assert _dumpable_after("select('linux', {}).no_core_dumps()") == (0, 0)
    assert _dumpable_after("select('linux', {'MESHIPC_PORTABLE': '1'}).no_core_dumps()") == (1, 0)
    linux_mode = PLATFORM.name == "linux"
    mesh = f"""
        import meshipc
        async def main():
            async with meshipc.Mesh(runtime_dir={str(runtime_dir)!r}):
                pass
        meshipc.run(main())
    """
    assert _dumpable_after(mesh) == (0 if linux_mode else 1, 0)
    cli = f"from meshipc._cli import main; main(['ls', '--runtime-dir', {str(runtime_dir)!r}])"
    assert _dumpable_after(cli) == (0 if linux_mode else 1, 0)


async def test_a_spawned_worker_is_not_dumpable(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:core_dumps", tx)
        dumpable, core = await asyncio.wait_for(rx.recv(), T)
        assert await asyncio.wait_for(proc.wait(), T) == 0
    assert (dumpable, core) == (0 if PLATFORM.name == "linux" else 1, 0)
