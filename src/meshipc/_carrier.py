"""Carriers: a command whose stdin and stdout carry a boundary link to a node
of another mesh, usually on another host (``meshipc.command``,
``meshipc.ssh``), and ``RemoteProcess``, the worker that node runs for
``Mesh.spawn(target, arg, via=carrier)``.

The local side starts the command with pipes (in a session of its own, so a
Ctrl-C in the terminal reaches it only through us), opens a ``Gateway`` over
them and talks to the far side (``python -m meshipc.remote``, see
``remote.py``) on the gateway's first port, in tagged records::

    local -> far   SpawnRequest, then the argument (its ports cross as relays)
    far -> local   Started | StartFailed, then Finished
    local closes its end: the far function is cancelled, the far process exits

The far process also exits when its stdin closes (this process died, the
carrier was killed, the link broke). Its stderr is re-emitted here line by
line (logger ``meshipc.remote``, each line prefixed with the carrier's
label, at the level the far logger wrote); the last lines go into the
``SpawnError`` of a far side that never started.

Everything the far side sends is untrusted: every text in a record is capped
(``MAX_TEXT``, ``MAX_TRACEBACK``), a stderr line is cut at ``MAX_LOG_LINE``.
The far host's mesh stays its own: its secret, node ids and socket paths
never cross (the gateway's rule); neither do file descriptors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec

from ._boundary import BoundaryLimits
from ._channel import Port
from ._codec import walk_resources
from ._errors import ChannelClosed, MeshError, MessageError, PortFailed, RemoteError, SpawnError
from ._fd import Fd
from ._gateway import Gateway
from ._node import Node
from ._process import _NO_REPORT, check_target, receiver_types
from ._tasks import TaskSet

log = logging.getLogger("meshipc")
#: The far side's stderr, re-emitted (``[label] line``).
remote_log = logging.getLogger("meshipc.remote")

#: Longest target, worker name or error message in a record (characters).
MAX_TEXT: Final = 4096
#: Longest traceback in a record (characters); the far side cuts its own.
MAX_TRACEBACK: Final = 64 * 1024
#: Most typed receivers a spawn argument describes (``receiver_types``).
MAX_ARG_TYPES: Final = 1024
#: Longest far stderr line re-emitted (bytes); the rest of a longer one is dropped.
MAX_LOG_LINE: Final = 4096
#: Far stderr lines kept for a ``SpawnError`` (the last ones).
TAIL_LINES: Final = 20
#: Far stderr lines re-emitted per second at most (a chatty far side does
#: not flood our log; the lines held back are counted, and said).
MAX_LOG_RATE: Final = 200
#: Seconds the far side's last words (and stderr) get to arrive once the
#: carrier command exited: they are in the pipes already unless a child of
#: the carrier still holds them (``unshare --fork``, a proxy command), whose
#: stdin is then closed (it exits).
EXIT_GRACE: Final = 0.5
#: Seconds the carrier command gets to exit by itself once the link ended
#: (the far side's GOODBYE, its stream closed, its heartbeats lost) before
#: it is killed.
CLOSE_GRACE: Final = 5.0

_Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
_Trace = Annotated[str, msgspec.Meta(max_length=MAX_TRACEBACK)]


# ------------------------------------------------------------------ records


class SpawnRequest(msgspec.Struct, tag="spawn", frozen=True, forbid_unknown_fields=True):
    """Run ``target`` (``"module:function"``, imported on the far host) as
    worker ``name``; the argument follows as the next message. ``arg_types``
    names the element types of the typed receivers in it (``_process``)."""

    target: _Text
    name: _Text
    arg_types: Annotated[list[tuple[int, Any]], msgspec.Meta(max_length=MAX_ARG_TYPES)] = []


class Started(msgspec.Struct, tag="started", frozen=True):
    """The far function runs, in process ``pid`` of the far host, whose
    meshipc is ``version``."""

    pid: int
    version: _Text


class StartFailed(msgspec.Struct, tag="start_failed", frozen=True):
    """The far side could not start the function (instead of ``Started``)."""

    exc_type: _Text
    message: _Text
    traceback: _Trace = ""


class Finished(msgspec.Struct, tag="finished", frozen=True):
    """The far function returned (``exc_type`` empty) or raised."""

    exc_type: _Text = ""
    message: _Text = ""
    traceback: _Trace = ""


#: What the far side says on the first port.
Answer = Started | StartFailed | Finished


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (its end kept: a traceback's last
    lines say the most)."""
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


# ------------------------------------------------------------------ carriers


@dataclass(frozen=True, slots=True)
class Carrier:
    """A way to start a node of another mesh: the command ``argv``, run
    verbatim, must start ``python -m meshipc.remote`` (directly, or through
    ``ssh``, ``sudo``, ``docker exec``, ``unshare`` ...), whose stdin and
    stdout then carry the link. ``label`` names the link in errors and in
    the far side's re-emitted log lines. Made by ``command`` and ``ssh``;
    used as ``Mesh.spawn(target, arg, via=carrier)``."""

    argv: tuple[str, ...]
    label: str
    #: this side's caps on the link and its heartbeat (its loss bound), or
    #: the defaults (``BoundaryLimits``)
    limits: BoundaryLimits | None = None

    def __repr__(self) -> str:
        return f"<Carrier {self.label} {shlex.join(self.argv)!r}>"


def command(
    argv: Sequence[str], *, label: str | None = None, limits: BoundaryLimits | None = None
) -> Carrier:
    """A carrier that runs ``argv`` (a list of strings, no shell) verbatim,
    e.g. ``["docker", "exec", "-i", "box", "python3", "-m", "meshipc.remote"]``.
    ``label`` defaults to ``"command:<program>"``; ``limits`` bound the
    link (``BoundaryLimits``: windows, body size, how soon a silent far
    side counts as lost). Raises ``TypeError`` for an argv that is not a
    non-empty sequence of strings."""
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError(f"command takes a non-empty list of strings (no shell), got {argv!r}")
    return Carrier(tuple(argv), label or f"command:{os.path.basename(argv[0])}", limits)


#: What ``ssh`` always passes: no terminal (a clean byte stream), never a
#: password prompt (no terminal to answer it), and a dead peer noticed by ssh too.
SSH_OPTIONS: Final = ("-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=15")


def ssh(
    destination: str,
    *,
    python: str = "python3",
    options: Iterable[str] = (),
    limits: BoundaryLimits | None = None,
) -> Carrier:
    """A carrier over OpenSSH: ``ssh -T -o BatchMode=yes … [options]
    destination python3 -m meshipc.remote``. The far host needs meshipc and
    the worker's code installed for that ``python`` (no code is shipped);
    ``python`` may be several words (``"/opt/venv/bin/python -X dev"``),
    each quoted for the far shell, so nothing in it is shell syntax.
    ``options`` go to ssh before the destination (``["-p", "2222", "-i",
    key]``); ``limits`` as for ``command``. Raises ``ValueError`` for a destination that would read as an
    option (it starts with ``-``) or is empty, and for an empty ``python``."""
    if not destination or destination.startswith("-") or any(c.isspace() for c in destination):
        raise ValueError(
            f"ssh destination must be [user@]host without spaces or a leading '-', got {destination!r}"
        )
    words = shlex.split(python)
    if not words:
        raise ValueError("ssh needs the far host's python command, got an empty one")
    opts = list(options)
    if not all(isinstance(o, str) for o in opts):
        raise TypeError(f"ssh options are strings, got {opts!r}")
    remote = [*(shlex.quote(w) for w in words), "-m", "meshipc.remote"]
    return Carrier(("ssh", *SSH_OPTIONS, *opts, destination, *remote), f"ssh:{destination}", limits)


# ------------------------------------------------------------------ the far side's stderr

_LEVELS: Final = {name: getattr(logging, name) for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}


class StderrLines:
    """Reads the far side's stderr to its end, re-emitting each line on
    ``meshipc.remote`` as ``[label] line``: at the level it starts with (the
    far logger's format, ``LEVEL name: message``), else ``WARNING`` (a print,
    a traceback: shown by default, like a local worker's stderr). Keeps the
    last ``TAIL_LINES``."""

    def __init__(self, reader: asyncio.StreamReader, label: str, tasks: TaskSet) -> None:
        self.label = label
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._second = 0.0  # when the current second of MAX_LOG_RATE lines began
        self._shown = 0
        self._held = 0
        self.done = tasks.spawn(self._pump(reader))

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        buf = bytearray()
        dropping = False
        while chunk := await reader.read(64 * 1024):
            buf += chunk
            while (i := buf.find(b"\n")) >= 0:
                if not dropping:
                    self._emit(bytes(buf[:i]))
                dropping = False
                del buf[: i + 1]
            if len(buf) > MAX_LOG_LINE:
                if not dropping:
                    self._emit(bytes(buf))
                dropping = True
                buf.clear()
        if buf and not dropping:
            self._emit(bytes(buf))
        self._say_held()

    def _emit(self, raw: bytes) -> None:
        text = raw[:MAX_LOG_LINE].decode("utf-8", "replace").rstrip("\r")
        if len(raw) > MAX_LOG_LINE:
            text += " [cut]"
        self.tail.append(text)
        now = time.monotonic()
        if now - self._second >= 1.0:
            self._say_held()
            self._second, self._shown = now, 0
        if self._shown >= MAX_LOG_RATE:
            self._held += 1
            return
        self._shown += 1
        word = text.split(" ", 1)[0]
        remote_log.log(_LEVELS.get(word, logging.WARNING), "[%s] %s", self.label, text)

    def _say_held(self) -> None:
        if self._held:
            remote_log.warning(
                "[%s] %d more stderr lines not shown (over %d a second)", self.label, self._held, MAX_LOG_RATE
            )
            self._held = 0

    def last(self) -> str:
        return "\n".join(self.tail)


# ------------------------------------------------------------------ the local handle


class RemoteProcess:
    """A worker started through a carrier (``Mesh.spawn(..., via=)``):
    ``await wait()`` gives its exit code, ``kill()`` ends it. ``pid`` is the
    local carrier command's (``ssh`` ...), ``remote_pid`` the far process's;
    ``label`` names the link. The exit code is the carrier command's: the
    far process's own when the command passes it on (``ssh`` does; 255 is
    ssh's own failure), negative when killed by a signal."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        transports: tuple[asyncio.SubprocessTransport, asyncio.ReadTransport],
        protocol: _Protocol,
        gateway: Gateway,
        port: Port,
        carrier: Carrier,
        name: str,
        target: str,
        stderr: StderrLines,
        tasks: TaskSet,
    ) -> None:
        self._proc = proc
        self._transports = transports
        self._protocol = protocol
        self._gateway = gateway
        self._port = port
        self._stderr = stderr
        self._tasks = tasks
        self.pid = proc.pid
        self.name = name
        self.target = target
        self.label = carrier.label
        #: the far process's pid (on the far host), once it started
        self.remote_pid: int | None = None
        #: the far side's meshipc version, once it started
        self.remote_version: str | None = None
        self.returncode: int | None = None
        #: the far function raised: its error as ``RemoteError`` (also logged)
        self.error: RemoteError | None = None
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._started: asyncio.Future[SpawnError | None] = loop.create_future()
        self._answers = tasks.spawn(self._read_answers())
        tasks.spawn(self._watch_link())
        tasks.spawn(self._watch_exit())

    @property
    def exitcode(self) -> int | None:
        """``returncode``: None while running."""
        return self.returncode

    async def _read_answers(self) -> None:
        try:
            answer = await self._port.recv()
            match answer:
                case Started(pid=pid, version=version):
                    self.remote_pid, self.remote_version = pid, version
                    self._started.set_result(None)
                case StartFailed(exc_type=t, message=m, traceback=tb):
                    self._started.set_result(SpawnError(self.name, self.target, f"{t}: {m}", tb))
                    return
                case _:
                    self.kill()
                    why = f"unexpected start report {str(answer)[:100]!r} over {self.label}"
                    self._started.set_result(SpawnError(self.name, self.target, why))
                    return
            answer = await self._port.recv()
        except (ChannelClosed, PortFailed):
            return
        except MeshError as exc:
            log.warning("remote worker %s (%s) sent an unreadable status: %s", self.name, self.label, exc)
            self.kill()
            return
        finally:
            if not self._started.done():
                self._started.set_result(SpawnError(self.name, self.target, _NO_REPORT))
            self._port.close()  # the far side exits once its end closes
        if isinstance(answer, Finished) and answer.exc_type:
            self.error = RemoteError(answer.exc_type, answer.message, answer.traceback)
            log.error(
                "remote worker %s (%s) failed: %s\n%s", self.name, self.label, self.error, answer.traceback
            )

    async def _watch_link(self) -> None:
        await self._gateway.wait_closed()
        if self.returncode is None:
            # nothing more can cross: the far side is leaving (its GOODBYE),
            # gone, or unreachable; it gets a moment to exit cleanly (and
            # remove its mesh), then the carrier is killed
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self.kill)

    async def _watch_exit(self) -> None:
        code = await _exit_code(self._proc, self._protocol)
        self.returncode = code
        # the far side's last words may still be in the pipe: read until the
        # link ends (EOF comes after the data), for a bounded time
        try:
            async with asyncio.timeout(EXIT_GRACE):
                await asyncio.wait({self._answers, self._stderr.done})
        except TimeoutError:
            pass
        self._answers.cancel()
        self._port.close()
        await self._gateway.aclose(flush=0)  # nobody is left to take more
        for t in self._transports:  # the pipes, even if a child of the carrier holds them
            t.close()
        if not self._exited.done():
            self._exited.set_result(code)

    async def _wait_started(self) -> None:
        """Return once the far function runs; else reap the carrier and
        raise ``SpawnError``. Cancelled meanwhile, the carrier is killed."""
        try:
            failed = await asyncio.shield(self._started)
        except asyncio.CancelledError:
            self.kill()
            self._port.close()
            raise
        if failed is None:
            return
        code = await self.wait()
        if failed.reason == _NO_REPORT:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            failed = SpawnError(self.name, self.target, _no_start(self.label, how, self._stderr.last()))
        raise failed

    async def wait(self) -> int:
        """Wait for the carrier command to exit; its exit code (negative:
        killed by signal)."""
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        """SIGKILL the local carrier command (no-op once it exited): the
        link ends and the far process, its stdin closed, exits."""
        if self.returncode is None:
            _sigkill(self._proc)

    def terminate(self) -> None:
        """Ask the worker to stop: the far function is cancelled and the far
        process exits."""
        self._port.close()

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return f"<RemoteProcess {self.name!r} via {self.label} pid={self.pid} {state}>"


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's subprocess protocol, telling when the process exited:
    ``Process.wait()`` of the stock loop waits for its pipes to close too,
    and a carrier's child (``unshare --fork``, a proxy command) may hold
    them after the carrier died."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2**16, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


def _sigkill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL a carrier that has not been seen to exit. Not through
    ``Process.send_signal``: on the stock loop that polls (``Popen.poll``), so
    it may reap a carrier that just exited behind the loop's child watcher,
    whose exit code then reads 255. Only the watcher reaps it: its pid is
    ours until then (and for the loop turn until ``returncode`` is set)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)


async def _exit_code(proc: asyncio.subprocess.Process, protocol: _Protocol) -> int:
    await protocol.exited
    code = proc.returncode  # set before process_exited is called
    return code if code is not None else -1


def _no_start(label: str, how: str, tail: str) -> str:
    said = f"; its last stderr lines:\n{tail}" if tail else " (nothing on its stderr)"
    return f"the carrier {label} {how} before the far side started it{said}"


async def open_pipes(
    link_in: int, link_out: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.ReadTransport]:
    """Asyncio streams over two descriptors (pipes or sockets), taken over,
    and the reading transport (closing it closes ``link_in``). Bytes reach
    the reader in the loop turn they arrive in (a subprocess transport's
    pipes hand them on one ``call_soon`` later). The writer's
    ``wait_closed()`` returns once what it buffered is written (its protocol
    is a ``StreamReaderProtocol``, which keeps that promise; the bare
    ``FlowControlMixin`` raises there, so a process could exit with its last
    bytes, a GOODBYE among them, still buffered)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    rt, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(link_in, "rb", 0)
    )
    try:
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), os.fdopen(link_out, "wb", 0)
        )
    except BaseException:
        rt.close()
        raise
    return reader, asyncio.StreamWriter(transport, protocol, None, loop), rt


_Piped = tuple[
    asyncio.SubprocessTransport, Any, asyncio.StreamReader, asyncio.StreamWriter, asyncio.ReadTransport
]


async def exec_piped(
    argv: Sequence[str], factory: Callable[[], asyncio.SubprocessProtocol], **kwargs: Any
) -> _Piped:
    """``loop.subprocess_exec(factory, *argv, **kwargs)`` with its stdin and
    stdout on pipes of our own (``open_pipes``: no extra loop turn per read);
    the transport, the protocol, the streams to and from the child and the
    reading transport. Raises ``OSError`` as ``subprocess_exec``."""
    loop = asyncio.get_running_loop()
    link_in, child_out = os.pipe()
    child_in, link_out = os.pipe()
    try:
        transport, protocol = await loop.subprocess_exec(
            factory, *argv, stdin=child_in, stdout=child_out, **kwargs
        )
    except BaseException:
        for fd in (link_in, link_out):
            os.close(fd)
        raise
    finally:
        os.close(child_in)
        os.close(child_out)
    try:
        reader, writer, rt = await open_pipes(link_in, link_out)
    except BaseException:
        transport.close()
        raise
    return transport, protocol, reader, writer, rt


async def spawn_via(
    carrier: Carrier,
    node: Node,
    target: str | Callable[..., Any],
    arg: Any,
    name: str | None,
) -> RemoteProcess:
    """Start ``carrier``'s command, open a gateway of ``node`` over its
    stdio and ask the far side to run ``target`` with ``arg``. The far side
    may not have started it yet (``RemoteProcess._wait_started``). Raises
    ``ValueError`` for a malformed target, ``MessageError`` for an argument
    holding an ``Fd`` (no descriptor crosses a boundary), ``SpawnError`` if
    the command cannot run or the link cannot open (the far side's stderr
    attached), ``OSError`` as ``create_subprocess_exec``."""
    target, name = check_target(target, name)
    if any(isinstance(h, Fd) for h in walk_resources(arg)):
        raise MessageError(f"a file descriptor (Fd) cannot cross the carrier {carrier.label} to another mesh")
    mine, first = Port.pair()
    # queued at the first port until the gateway takes it
    mine.send(SpawnRequest(target=target, name=name, arg_types=receiver_types(arg)))
    mine.send(arg)
    mine._set_type(Answer)
    tasks = TaskSet(asyncio.get_running_loop())
    loop = asyncio.get_running_loop()
    try:
        transport, protocol, out, into, rt = await exec_piped(
            carrier.argv, lambda: _Protocol(loop), stderr=asyncio.subprocess.PIPE, start_new_session=True
        )
    except OSError as exc:
        mine.close()
        first.close()
        raise SpawnError(name, target, f"cannot run the carrier {carrier.label}: {exc}") from exc
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    err = proc.stderr
    if err is None:  # pragma: no cover - PIPE always gives it
        raise SpawnError(name, target, "the carrier's stderr pipe is missing")
    stderr = StderrLines(err, carrier.label, tasks)
    try:
        gateway = await Gateway.open(node, out, into, first, label=carrier.label, limits=carrier.limits)
    except BaseException as exc:
        mine.close()
        if proc.returncode is None:
            _sigkill(proc)
        code = await _exit_code(proc, protocol)
        try:
            async with asyncio.timeout(EXIT_GRACE):
                await stderr.done
        except TimeoutError:
            tasks.cancel_all()
        transport.close()
        rt.close()
        into.close()
        if isinstance(exc, (MeshError, OSError, TimeoutError)):
            how = f"failed to open the link ({exc}) and exited with code {code}"
            raise SpawnError(name, target, _no_start(carrier.label, how, stderr.last())) from exc
        raise
    return RemoteProcess(proc, (transport, rt), protocol, gateway, mine, carrier, name, target, stderr, tasks)
