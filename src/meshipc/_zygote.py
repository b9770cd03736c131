"""The fork server ("zygote") spawned workers start from.

A worker started as a fresh interpreter spends most of its start-up CPU
importing meshipc and its dependencies (``python -X importtime``: about
nine tenths of it). The zygote pays that once: a child of the spawning
node, started as ``python -P -c <bootstrap> <path>`` (lazily at the first
spawn, or at once with ``Mesh(zygote="eager")``), it imports the worker's
entry point (``_child``) and nothing of the application, then forks one
worker per request. It is single-threaded (it refuses to serve if an
import started a thread), runs no event loop, holds no credential and no
socket but its end of a private socket pair to the node (``close_fds``:
nothing else is inherited), and is frozen for the garbage collector
(``gc.freeze``) so that forked workers share its pages.

The node sends, on the pair, a ``Fork`` request with the worker's
descriptors attached (``SCM_RIGHTS``): its bootstrap socket and the
node's standard input, output and error of the moment. The request carries
the caller's environment, current directory, umask and import path at
spawn time, and the worker's invitation as opaque bytes; the forked child
takes them on and joins exactly as an exec'd worker does (``_child``): its
credential arrives on its bootstrap socket, never through the zygote. The
application's module is imported in the worker, so a restart picks up code
changed on disk; meshipc itself is the zygote's (the node's) version.

Exit statuses: a worker is the zygote's child, so the zygote reaps it and
reports ``Exited(pid, code)`` (``code`` as ``Popen.returncode``: negative
for a signal); ``kill`` goes through the zygote (``Kill``), which signals
only a child it has not reaped, so a recycled pid is never hit. The node
cannot reap a process it did not fork: making it a child subreaper would
change how every orphan of the application is reaped, and forking with
``CLONE_PARENT`` would bypass the C library's fork bookkeeping.

Parent death, chained: the zygote dies with the node (``PR_SET_PDEATHSIG``,
and end-of-file on the pair), a worker with the zygote (the same). A zygote
killed on its own therefore takes its workers with it; their statuses are
lost with it and reported as ``LOST_STATUS``. The next spawn starts a new
zygote (a warning says so), up to ``ZYGOTE_STARTS`` per node, then spawns
exec fresh interpreters (one more warning). Where forking a
half-initialised interpreter is not safe (macOS, and the portable mode that
runs its code paths on Linux: ``Platform.forks``), workers are exec'd.

The frames on the pair are a 4-byte big-endian length and a msgpack record
(``Request`` one way, ``Reply`` the other), each capped
(``MAX_REQUEST``, ``MAX_REPLY``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import typing
from typing import Any, Final, Literal

import msgspec

from ._errors import MeshError
from ._platform import PLATFORM

log = logging.getLogger("meshipc")

#: How a spawn starts its worker: forked by the zygote, or a fresh interpreter.
StartMethod = Literal["zygote", "exec"]
#: When a node starts its zygote: at its first spawn, at once, or never (every worker exec'd).
ZygoteMode = Literal["lazy", "eager", "off"]
ZYGOTE_MODES: Final = typing.get_args(ZygoteMode)

#: Bytes of one request (the caller's environment and import path dominate):
#: a larger one (a huge environment) is spawned by exec instead.
MAX_REQUEST: Final = 1 << 20
#: Bytes of one reply (a pid and a status): anything larger is a broken zygote.
MAX_REPLY: Final = 256
#: Descriptors a request carries: the bootstrap socket and standard input, output, error.
MAX_FDS: Final = 4
#: Zygotes one node starts in its life; past that its workers are exec'd.
ZYGOTE_STARTS: Final = 3
#: Seconds a node waits for a new zygote's ``Ready`` (its imports) before
#: stopping it and exec'ing the worker instead. The wait comes before the
#: worker's own handshake timer starts, so a slow first start (a loaded
#: machine) does not eat into the worker's ``HANDSHAKE_TIMEOUT``.
READY_TIMEOUT: Final = 60.0
#: The exit code reported for a worker whose zygote died before reaping it
#: (the zygote's death sent it SIGTERM; nobody can read its real status).
LOST_STATUS: Final = -int(signal.SIGTERM)

_HEADER = struct.Struct(">I")


class Fork(msgspec.Struct, tag=True, frozen=True):
    """Fork a worker. Descriptors attached: the bootstrap socket, then the
    standard descriptors named by ``stdio``, in order."""

    #: what the worker's entry point decodes (``_process.ChildInvitation``)
    invitation: bytes
    environ: list[tuple[bytes, bytes]]
    cwd: bytes
    path: list[str]
    #: -1: leave the zygote's
    umask: int
    #: which of 0, 1, 2 follow the bootstrap socket (a closed one is closed in the worker)
    stdio: list[int]


class Kill(msgspec.Struct, tag=True, frozen=True):
    """SIGKILL the worker ``pid`` if it is a child not yet reaped."""

    pid: int


class Forked(msgspec.Struct, tag=True, frozen=True):
    pid: int


class ForkFailed(msgspec.Struct, tag=True, frozen=True):
    reason: str


class Exited(msgspec.Struct, tag=True, frozen=True):
    pid: int
    code: int


class Ready(msgspec.Struct, tag=True, frozen=True):
    """The zygote imported what workers need: forks are quick from now on."""


Request = Fork | Kill
Reply = Forked | ForkFailed | Exited | Ready

_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


def _frame(record: Any) -> bytes:
    body = _encoder.encode(record)
    return _HEADER.pack(len(body)) + body


class ZygoteUnavailable(MeshError):
    """The zygote cannot fork this worker (it died, failed to start, or the
    request is too large): the spawn execs a fresh interpreter instead."""


# ----------------------------------------------------------- the zygote


class Spawned(msgspec.Struct, frozen=True):
    """In a forked worker: what the zygote was asked (its state taken on)."""

    invitation: bytes
    #: the worker's end of its bootstrap socket
    fd: int
    #: the zygote's pid: the worker checks it is still its parent once it watches it
    parent: int


def _recv_frame(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One request and its descriptors (blocking); None at end-of-file."""
    fds: list[int] = []
    space = socket.CMSG_SPACE(MAX_FDS * 4)
    head = b""
    while len(head) < _HEADER.size:
        data, anc, _flags, _ = sock.recvmsg(_HEADER.size - len(head), space, socket.MSG_CMSG_CLOEXEC)
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) // 4 * 4]))
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        head += data
    (n,) = _HEADER.unpack(head)
    if n > MAX_REQUEST:
        raise MeshError(f"zygote: a {n}-byte request (at most {MAX_REQUEST})")
    body = bytearray()
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    return bytes(body), fds


def _read_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets
    it: another thread could create a file in between); -1 if unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return -1


def _take_on(req: Fork, fds: list[int]) -> None:
    """In the forked worker: the caller's state at spawn time."""
    for fd, target in zip(fds[1:], req.stdio, strict=False):
        os.dup2(fd, target)
        os.close(fd)
    for target in {0, 1, 2} - set(req.stdio):
        with contextlib.suppress(OSError):
            os.close(target)
    os.environb.clear()
    os.environb.update(req.environ)
    os.chdir(req.cwd)
    if req.umask >= 0:
        os.umask(req.umask)
    sys.path[:] = req.path


def _on_sigchld(signum: int, frame: object) -> None:
    pass  # the wake-up fd did the work


def serve(fd: int, parent: int) -> Spawned | None:
    """Run the zygote on the socket ``fd`` for the node ``parent``.
    Returns in a forked worker (what it was asked), or None once the node
    is gone (the zygote then exits)."""
    PLATFORM.die_with_parent(-1)
    if os.getppid() != parent:
        return None  # the node died before we could watch it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the node to handle
    # the mask is inherited from the node's thread that started us: SIGCHLD
    # must reach us (we reap), SIGTERM our workers (parent death)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD, signal.SIGTERM})
    zygote = os.getpid()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    if threading.active_count() != 1:
        sock.sendall(_frame(ForkFailed("the zygote is not single-threaded: an import started a thread")))
        return None
    gc.freeze()  # the workers share these pages: no collection writes to them
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, _on_sigchld)
    signal.set_wakeup_fd(wake_w)
    children: set[int] = set()
    sock.sendall(_frame(Ready()))
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for what, _ in events:
            if what == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                _reap(sock, children)
                continue
            frame = _recv_frame(sock)
            if frame is None:
                return None
            body, fds = frame
            try:
                req = _request_decoder.decode(body)
            except msgspec.DecodeError as exc:
                for f in fds:
                    os.close(f)
                sock.sendall(_frame(ForkFailed(f"zygote: a malformed request: {exc}")))
                continue
            if isinstance(req, Kill):
                if req.pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(req.pid, signal.SIGKILL)
                for f in fds:
                    os.close(f)
                continue
            if not fds or len(fds) != 1 + len(req.stdio) or not set(req.stdio) <= {0, 1, 2}:
                for f in fds:
                    os.close(f)
                sock.sendall(_frame(ForkFailed("zygote: a fork request without its descriptors")))
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                pid = -1
                why = str(exc)
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(wake_r)
                os.close(wake_w)
                sock.close()
                _take_on(req, fds)
                return Spawned(req.invitation, fds[0], zygote)
            for f in fds:
                os.close(f)
            if pid < 0:
                sock.sendall(_frame(ForkFailed(f"fork failed: {why}")))
                continue
            children.add(pid)
            sock.sendall(_frame(Forked(pid)))


def _reap(sock: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        sock.sendall(_frame(Exited(pid, os.waitstatus_to_exitcode(status))))


# ------------------------------------------------------- the node's side


class ZygoteChild:
    """A worker the zygote forked: its pid, its exit code once reaped."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.pid = pid
        self._zygote = zygote
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def kill(self) -> None:
        """SIGKILL it (through the zygote: never a recycled pid)."""
        if not self.exited.done():
            self._zygote._send(Kill(self.pid), ())


#: Run by the zygote interpreter before anything else (see ``_process.worker_command``).
_BOOTSTRAP = (
    "import sys; sys.path[:] = sys.argv[1:]; del sys.argv[1:]; "
    "from meshipc._child import zygote_main; zygote_main({fd}, {parent})"
)


@dataclasses.dataclass(frozen=True, slots=True)
class ZygoteStats:
    """The fork server of a node (``MeshStats.zygote``)."""

    #: the running zygote's pid (None: none runs)
    pid: int | None
    #: zygotes started (more than one: one died and was replaced)
    starts: int
    #: workers it forked
    forks: int
    #: spawns that asked for the zygote and were exec'd instead (it was unusable)
    fallbacks: int


class Zygote:
    """The node's handle on its zygote: started on first use (``fork``),
    restarted after it died (``ZYGOTE_STARTS`` in all), closed with the
    node. Counters: ``forks`` (workers it forked), ``starts`` (zygotes
    started), ``fallbacks`` (spawns exec'd instead); ``stats()``."""

    def __init__(self) -> None:
        self._popen: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        #: fork requests sent, oldest first, waiting for their reply
        self._pending: collections.deque[asyncio.Future[int]] = collections.deque()
        self._children: dict[int, ZygoteChild] = {}
        self._out: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._inbuf = bytearray()
        #: the running zygote said ``Ready`` (None: none runs)
        self._ready: asyncio.Future[None] | None = None
        self._closed = False
        self.forks = 0
        self.starts = 0
        self.fallbacks = 0

    def stats(self) -> ZygoteStats:
        return ZygoteStats(self.pid, self.starts, self.forks, self.fallbacks)

    @property
    def usable(self) -> bool:
        """False once closed, or after ``ZYGOTE_STARTS`` zygotes died."""
        return not self._closed and (self._sock is not None or self.starts < ZYGOTE_STARTS)

    @property
    def pid(self) -> int | None:
        """The running zygote's pid (None: none runs)."""
        return self._popen.pid if self._popen is not None and self._sock is not None else None

    def start(self, command: list[str]) -> None:
        """Start a zygote now (``command``: the interpreter and import path of
        a worker, its ``-c`` code at index 3 replaced). Raises ``ZygoteUnavailable``."""
        if not self.usable:
            raise ZygoteUnavailable("no zygote: it died too often, or the node is closing")
        if self._sock is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = list(command)
        argv[3] = _BOOTSTRAP.format(fd=theirs.fileno(), parent=os.getpid())
        self.starts += 1
        try:
            self._popen = subprocess.Popen(argv, pass_fds=[theirs.fileno()], close_fds=True)
        except OSError as exc:
            ours.close()
            raise ZygoteUnavailable(f"the zygote did not start: {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._inbuf.clear()
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        loop.add_reader(ours.fileno(), self._readable)

    async def ready(self, command: list[str]) -> None:
        """Return once a zygote runs and has done its imports (started with
        ``command`` if none runs). Raises ``ZygoteUnavailable`` if it cannot
        start, dies, or is not ready within ``READY_TIMEOUT`` (it is stopped)."""
        self.start(command)
        ready = self._ready
        if ready is None:
            raise ZygoteUnavailable("no zygote")
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await asyncio.shield(ready)
        except TimeoutError:
            if self._ready is ready:
                log.warning("the zygote did not get ready within %g s: stopping it", READY_TIMEOUT)
                self._died()
            raise ZygoteUnavailable(f"the zygote was not ready within {READY_TIMEOUT:g} s") from None

    async def fork(self, command: list[str], invitation: bytes, bootstrap: int) -> ZygoteChild:
        """Ask the zygote (started if none runs) for a worker with the
        bootstrap socket ``bootstrap`` and the caller's environment, current
        directory, umask, import path and standard descriptors. Raises
        ``ZygoteUnavailable`` (the caller then execs the worker)."""
        try:
            cwd = os.getcwdb()
        except OSError as exc:
            raise ZygoteUnavailable(f"no current directory to give the worker: {exc}") from exc
        stdio = [fd for fd in (0, 1, 2) if _is_open(fd)]
        req = Fork(
            invitation=invitation,
            environ=list(os.environb.items()),
            cwd=cwd,
            path=[os.path.abspath(p) for p in sys.path],
            umask=_read_umask(),
            stdio=stdio,
        )
        if len(_encoder.encode(req)) > MAX_REQUEST:
            raise ZygoteUnavailable(f"the environment and import path exceed {MAX_REQUEST} bytes")
        await self.ready(command)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        self._send(req, [bootstrap, *stdio])
        try:
            pid = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # it may still fork: kill what it forks for nobody
            fut.add_done_callback(self._kill_orphan)
            raise
        child = self._children.get(pid)
        if child is None:  # reaped already: an Exited came first? never (Forked precedes it)
            raise ZygoteUnavailable(f"the zygote lost worker {pid}")
        self.forks += 1
        return child

    def _kill_orphan(self, fut: asyncio.Future[int]) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result() in self._children:
            self._children[fut.result()].kill()

    def _send(self, record: Any, fds: list[int] | tuple[int, ...]) -> None:
        if self._sock is None:
            return
        # descriptors are duplicated: a frame may wait for the socket to drain,
        # and the caller closes its own at once
        self._out.append((memoryview(_frame(record)), [os.dup(fd) for fd in fds]))
        self._flush()

    def _flush(self) -> None:
        sock = self._sock
        while self._out and sock is not None:
            data, fds = self._out[0]
            try:
                anc = (
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
                )
                n = sock.sendmsg([data], anc)
            except BlockingIOError:
                n = 0
            except OSError:
                self._died()
                return
            for fd in fds if n else ():
                os.close(fd)
            if n == len(data):
                self._out.popleft()
                continue
            self._out[0] = (data[n:], [] if n else fds)
            asyncio.get_running_loop().add_writer(sock.fileno(), self._writable)
            return

    def _writable(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_writer(self._sock.fileno())
            self._flush()

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died()
            return
        self._inbuf += data
        while len(self._inbuf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self._inbuf)
            if n > MAX_REPLY:
                log.warning("the zygote sent a %d-byte reply (at most %d): stopping it", n, MAX_REPLY)
                self._died()
                return
            if len(self._inbuf) < _HEADER.size + n:
                return
            body = bytes(self._inbuf[_HEADER.size : _HEADER.size + n])
            del self._inbuf[: _HEADER.size + n]
            try:
                reply = _reply_decoder.decode(body)
            except msgspec.DecodeError as exc:
                log.warning("the zygote sent a malformed reply (%s): stopping it", exc)
                self._died()
                return
            self._on_reply(reply)

    def _on_reply(self, reply: Reply) -> None:
        if self._ready is not None and not self._ready.done():
            if isinstance(reply, Ready):
                self._ready.set_result(None)
            else:  # it refused to serve (not single-threaded), or it is broken
                why = reply.reason if isinstance(reply, ForkFailed) else f"{type(reply).__name__} first"
                log.warning("the zygote cannot serve: %s", why)
                self._died()
            return
        if isinstance(reply, Ready):
            log.warning("the zygote said Ready twice: stopping it")
            self._died()
            return
        if isinstance(reply, Exited):
            child = self._children.pop(reply.pid, None)
            if child is not None and not child.exited.done():
                child.exited.set_result(reply.code)
            return
        if not self._pending:
            log.warning("the zygote answered a fork nobody asked for: stopping it")
            self._died()
            return
        fut = self._pending.popleft()
        if isinstance(reply, Forked):
            self._children[reply.pid] = ZygoteChild(self, reply.pid)
            if not fut.done():
                fut.set_result(reply.pid)
        elif not fut.done():
            fut.set_exception(ZygoteUnavailable(reply.reason))

    def _died(self) -> None:
        """The zygote is gone (or broken): fail what waits on it; its
        workers died with it (their status lost)."""
        sock, popen = self._sock, self._popen
        if sock is None:
            return
        self._sock = None
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        loop.remove_writer(sock.fileno())
        sock.close()
        for _, fds in self._out:
            for fd in fds:
                os.close(fd)
        self._out.clear()
        code = _reap_zygote(popen)
        if not self._closed:
            log.warning(
                "the zygote (pid %s) %s; %d worker(s) it forked ended with it; %s",
                popen.pid if popen else "?",
                "exited" if code is None else f"exited with status {code}",
                len(self._children),
                "the next spawn starts another" if self.usable else "workers are exec'd from now on",
            )
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ZygoteUnavailable("the zygote died before it was ready"))
        self._ready = None
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(ZygoteUnavailable("the zygote died"))
        children, self._children = self._children, {}
        for child in children.values():
            _when_gone(child)

    def close(self) -> None:
        """Stop the zygote (its workers get SIGTERM: close them first)."""
        self._closed = True
        popen = self._popen
        self._died()
        if popen is not None and popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            popen.wait()


def _reap_zygote(popen: subprocess.Popen[bytes] | None) -> int | None:
    if popen is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        popen.kill()  # end-of-file, or a broken reply: make sure
    return popen.wait()


def _when_gone(child: ZygoteChild) -> None:
    """Settle a worker whose zygote died: once it has exited (a pidfd says
    when), with ``LOST_STATUS``."""
    loop = asyncio.get_running_loop()
    pidfd = PLATFORM.exit_fd(child.pid)
    if pidfd is None:
        child.exited.set_result(LOST_STATUS)
        return

    def gone() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not child.exited.done():
            child.exited.set_result(LOST_STATUS)

    loop.add_reader(pidfd, gone)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def forks_safely() -> bool:
    """Whether this system may fork a worker from the zygote: Linux only
    (macOS frameworks break in a child forked without exec, and the portable
    mode runs the macOS code paths)."""
    return PLATFORM.name == "linux" and hasattr(os, "fork")
