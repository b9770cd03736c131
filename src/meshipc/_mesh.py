"""``meshipc.Mesh``: a node of a mesh in this process, and what puts the
pieces together around it: its directory and name, its workers, its
listener and invitations, its control plane, and ``connect``/``join``
(attaching this process to a running mesh as a new ``Mesh``).

Every library module sits below this one and none imports it, not even for
annotations: each subsystem is handed the ``Node`` and plain values (limits,
a callable that issues credentials). Only what is built on top of it imports
it: the package itself, ``sync``, the worker entry point ``_child`` and the
command line (``_ctlcli``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import shutil
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, overload

from ._boundary import BoundaryLimits
from ._carrier import Carrier, RemoteProcess, spawn_via
from ._control import Control, ControlPlane
from ._control_msgs import DEFAULT_CONTROL_LIMITS, ControlLimits, ControlStatistics, WorkerStatus
from ._errors import MeshError
from ._gateway import HELLO_TIMEOUT, Gateway
from ._handshake import ROLE_ROOT, ROLE_WORKER, Authority, Identity
from ._ids import NodeId
from ._invitation import INVITATION_TTL, Inviter
from ._join import (
    node_from_credential,
)
from ._listener import Listener, ListenerStats
from ._logs import level_number
from ._names import (
    LISTENER_NAME,
    NAME,
    check_socket_room,
    claim_name,
    mesh_directory,
    release_name,
    runtime_root,
    tls_directory,
)
from ._node import Node, NodeStats
from ._platform import PLATFORM
from ._ports import DEFAULT_LIMITS, Limits
from ._process import Process, RestartPolicy, RestartWhen, spawn, start_zygote
from ._service import Service
from ._tls import TCP_TIMEOUT, TlsAuthority
from ._tlslisten import TlsListener
from ._trace import notice_otel
from ._zygote import (
    ZYGOTE_MODES,
    StartMethod,
    Zygote,
    ZygoteMode,
    ZygoteStats,
    ZygoteUnavailable,
    forks_safely,
)

if TYPE_CHECKING:
    from ._channel import Port, Receiver

log = logging.getLogger("meshipc")

#: Seconds workers get to exit after the mesh closes their bootstrap port.
CHILD_GRACE = 5.0
#: Why a worker or an attached client cannot spawn, listen or invite.
NOT_ROOT: Final = (
    "only the mesh's first node can admit new nodes (listen or invite; its workers may spawn): "
    "it alone holds the key that issues node identities"
)


_current: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("meshipc_mesh", default=None)


def current_mesh() -> Mesh:
    """The ``Mesh`` this task runs in: in a spawned worker, the worker's own
    node (its function can ``serve`` services); elsewhere the innermost
    ``async with Mesh()`` / ``connect()`` of this task. Raises ``MeshError``
    if there is none."""
    mesh = _current.get()
    if mesh is None or mesh._closed:
        raise MeshError("no mesh is running in this task")
    return mesh


class _Sigterm:
    """SIGTERM closes the meshes of a process whose application left SIGTERM
    at its default action (killed at once, cleaning nothing up).

    While such a mesh is open, SIGTERM cancels the task that entered it;
    the mesh closes as on any exit (workers stopped, sockets, folder and name
    removed) and its ``async with`` then raises ``SystemExit(143)`` (128 +
    SIGTERM, the status a shell shows for a SIGTERM death). A second SIGTERM
    while closing, or one with no task to unwind, ends the process as if
    meshipc were not there. An application
    with its own SIGTERM handler (``signal.signal`` or
    ``loop.add_signal_handler``) keeps it, untouched; so does code that is
    not on the main thread."""

    meshes: ClassVar[dict[Mesh, asyncio.Task[Any]]] = {}
    loop: ClassVar[asyncio.AbstractEventLoop | None] = None

    @classmethod
    def watch(cls, mesh: Mesh) -> None:
        task = asyncio.current_task()
        if task is None:
            return
        loop = asyncio.get_running_loop()
        if cls.loop is not None and cls.loop.is_closed():
            cls.meshes.clear()  # a loop closed with meshes never closed (it removed our handler)
            cls.loop = None
        if cls.loop is None:
            if threading.current_thread() is not threading.main_thread():
                return
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                return  # the application decides what SIGTERM does
            try:
                loop.add_signal_handler(signal.SIGTERM, cls._fire)
            except (NotImplementedError, RuntimeError, ValueError):
                return
            cls.loop = loop
        elif cls.loop is not loop:
            return
        cls.meshes[mesh] = task

    @classmethod
    def unwatch(cls, mesh: Mesh) -> None:
        if cls.meshes.pop(mesh, None) is not None and not cls.meshes and cls.loop is not None:
            if not cls.loop.is_closed():
                cls.loop.remove_signal_handler(signal.SIGTERM)  # back to the default action
            cls.loop = None

    @classmethod
    def _fire(cls) -> None:
        log.info("SIGTERM: closing %d mesh(es) before exiting", len(cls.meshes))
        cancelled: set[asyncio.Task[Any]] = set()
        for mesh, task in list(cls.meshes.items()):
            mesh._terminated = True
            if not mesh._closed and task not in cancelled and not task.done():
                task.cancel()
                cancelled.add(task)
        if not cancelled:
            # nothing to unwind (already closing: a second SIGTERM; or the task
            # that entered the mesh is gone): SIGTERM does what it would have
            log.info("SIGTERM: nothing left to close cleanly; exiting")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class MeshStats:
    """A snapshot of a ``Mesh`` (``Mesh.stats()``): its node (with its
    links and accept loop), its listeners, its workers."""

    node: NodeStats
    listeners: tuple[ListenerStats, ...]
    #: spawned workers still running
    workers: int
    #: the fork server its workers start from (``Mesh(zygote=)``)
    zygote: ZygoteStats


class Mesh(ControlPlane):
    """A node of a mesh, in this process. Use as ``async with Mesh() as mesh``.

    ``Mesh()`` starts a new private mesh; ``Mesh(name="vmm")`` starts one that
    other processes of this user can find by name. Raises ``MeshError`` if the
    runtime folder is not safe to use, ``MeshNameInUse`` if a live mesh holds
    the name. While it is open, SIGTERM closes it cleanly if the application
    left SIGTERM at its default action (see ``_Sigterm``).

    ``zygote``: when this node starts the fork server its workers start
    from (see ``spawn``'s ``start``): "lazy" (the default: at its first
    spawn), "eager" (on enter, so that the first spawn does not wait for
    it), "off" (never: every worker is a fresh interpreter). ``ValueError``
    for another value."""

    def __init__(
        self,
        name: str | None = None,
        *,
        runtime_dir: str | os.PathLike[str] | None = None,
        limits: Limits | None = None,
        control_limits: ControlLimits | None = None,
        zygote: ZygoteMode = "lazy",
    ) -> None:
        if name is not None and not NAME.match(name):
            raise ValueError(f"mesh names are 1-64 letters, digits, '.', '_' or '-', got {name!r}")
        self.name = name
        #: flow-control bounds of this node's ports (spawned workers inherit them)
        self.limits = limits if limits is not None else DEFAULT_LIMITS
        #: bounds on the work one client can make this node's services (and,
        #: on the mesh's first node, the root) do; see ``ControlLimits``
        self.control_limits = control_limits if control_limits is not None else DEFAULT_CONTROL_LIMITS
        self._runtime_dir = runtime_dir
        self._node: Node = None  # type: ignore[assignment]  # set on enter
        self._owns_directory = False
        self._children: list[Process | RemoteProcess] = []
        self._closed = False
        self._entered = False
        self._terminated = False  # closed because of SIGTERM
        self._extras: list[Any] = []  # listeners and other things closed with the mesh
        self._lock_fd = -1
        #: the key that issues node credentials: only on the mesh's first node
        self._authority: Authority | None = None
        self._control: Control = None  # type: ignore[assignment]  # set on enter
        self._outer: Mesh | None = None
        if zygote not in ZYGOTE_MODES:
            raise ValueError(f"zygote must be one of {', '.join(map(repr, ZYGOTE_MODES))}, got {zygote!r}")
        #: the fork server workers start from (``_zygote``): "lazy" starts it
        #: at the first spawn, "eager" on enter, "off" never (workers exec'd)
        self._zygote_mode = zygote
        self._zygote = Zygote()

    def _start_control(self, root: bool, inviter: bytes | None = None) -> None:
        """This node's control plane, its session with the root started: a
        joining node (spawned worker or attached client) is linked to its
        inviter already (``_join``), so it says hello at once."""
        self._control = Control(
            self._node,
            root=root,
            inviter=inviter,
            limits=self.control_limits,
            name=self.name,
            workers=self._worker_status,
            admit=(lambda: self._admit(ROLE_WORKER)) if root else None,
        )
        self._control.start_session()
        self._extras.append(self._control)
        self._outer = _current.get()
        _current.set(self)

    def _plane(self) -> Control:
        if self._control is None:
            raise MeshError("this Mesh is not running (use it as `async with Mesh() as mesh`)")
        return self._control

    def _worker_status(self) -> list[WorkerStatus]:
        return [
            WorkerStatus(
                p.name, p.pid, p.returncode, p.restarts, tuple(p.restart_events), p.key, p.restarting
            )
            if isinstance(p, Process)
            else WorkerStatus(p.name, p.pid, p.returncode)  # a remote worker: never restarted
            for p in self._children
        ]

    @property
    def node_id(self) -> NodeId:
        return NodeId(self._node.id)

    @property
    def directory(self) -> Path:
        """The mesh's socket folder (mode 0700)."""
        return self._node.directory

    async def __aenter__(self) -> Mesh:
        if self._entered:
            raise MeshError("this Mesh was already entered; a Mesh is used once (make a new one)")
        self._entered = True
        notice_otel()  # spans the application starts go with its plain calls too
        root = runtime_root(self._runtime_dir)
        check_socket_room(mesh_directory(root, self.name or "0" * 16))
        if self.name is not None:
            directory, self._lock_fd = claim_name(root, self.name)
        else:
            directory = mesh_directory(root, os.urandom(8).hex())
            directory.mkdir(mode=0o700)
        self._owns_directory = True
        try:
            PLATFORM.no_core_dumps()  # this process is about to hold the mesh's signing key
            self._authority = Authority()
            self._node = node_from_credential(directory, self._authority.issue(ROLE_ROOT), self.limits)
            self._start_control(root=True)
            self.inspect_add("log_levels", self._log_levels, update=self._update_log_levels)
            if self._zygote_mode == "eager" and forks_safely():
                try:
                    start_zygote(self._zygote)
                except ZygoteUnavailable as exc:
                    log.warning("%s: workers will be exec'd", exc)
        except BaseException:
            # a failed start leaves nothing behind: directory, lock file, lock
            shutil.rmtree(directory, ignore_errors=True)
            if self._lock_fd >= 0 and self.name is not None:
                release_name(root, self.name, self._lock_fd)
                self._lock_fd = -1
            self._closed = True
            raise
        _Sigterm.watch(self)
        return self

    @classmethod
    async def _around(cls, node: Node, inviter: bytes) -> Mesh:
        """The ``Mesh`` around ``node``, a node that joined an existing mesh
        (spawned worker or invited process; ``_join``), invited by node
        ``inviter`` (whom its control plane first asks for the mesh root).
        Closing the mesh closes the node (so does a failure here)."""
        self = cls(limits=node.engine.limits)
        self._entered = True
        self._node = node
        try:
            self._start_control(root=False, inviter=inviter)
        except BaseException:
            self._closed = True
            await node.close()
            raise
        return self

    @classmethod
    @contextlib.asynccontextmanager
    async def _joined(cls, node: Node, inviter: bytes) -> AsyncIterator[Mesh]:
        """``_around``, closed when the block ends."""
        self = await cls._around(node, inviter)
        try:
            yield self
        finally:
            await self.aclose()

    def _admit(self, role: int) -> Identity:
        """A credential for a new node of ``role``: a fresh id, key pair and
        certificate. Raises ``MeshError`` on a node that is not the mesh's
        root (it holds no key that can vouch for a new node)."""
        if self._closed:
            raise MeshError("the mesh is closed")
        if self._authority is None:
            raise MeshError(NOT_ROOT)
        return self._authority.issue(role)

    async def _admit_worker(self) -> Identity:
        """A credential for a new worker: issued here on the mesh's root,
        else asked of the root (only a worker may ask; an attached client
        cannot spawn)."""
        if self._authority is not None or self._node.identity.role != ROLE_WORKER:
            return self._admit(ROLE_WORKER)
        if self._closed:
            raise MeshError("the mesh is closed")
        return await self._control.mint()

    def __await__(self) -> Generator[Any, None, Mesh]:
        """``mesh = await Mesh(...)``: started without ``async with`` (a
        notebook, a REPL), until ``await mesh.aclose()``."""
        return self.__aenter__().__await__()

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
        if self._terminated and isinstance(v, asyncio.CancelledError):
            raise SystemExit(128 + signal.SIGTERM)

    async def aclose(self) -> None:
        """Shut down: stop listeners, stop and reap workers, let ports in
        transit settle, close connections, remove our socket (and the
        directory, for the mesh's first node). Safe to call twice."""
        if self._closed or self._node is None:
            return
        self._closed = True
        if _current.get() is self:
            _current.set(self._outer)  # e.g. a worker that attached to another mesh
        try:
            await self._shut_down()
        finally:
            _Sigterm.unwatch(self)

    async def _shut_down(self) -> None:
        for extra in self._extras:
            extra.close()
        children = list(self._children)  # each leaves the list as it exits
        for proc in children:
            proc.terminate()
        for proc in children:
            try:
                async with asyncio.timeout(CHILD_GRACE):
                    await proc.wait()
            except TimeoutError:
                log.warning("worker %s (pid %d) did not exit; killing it", proc.name, proc.pid)
                proc.kill()
                await proc.wait()
        self._zygote.close()  # after its workers: it reports their exits
        await self._node.close()
        if self._owns_directory:
            shutil.rmtree(self._node.directory, ignore_errors=True)
        if self._lock_fd >= 0 and self.name is not None:
            release_name(self._node.directory.parent, self.name, self._lock_fd)  # the name is free again
            self._lock_fd = -1

    async def listen(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        invitation_ttl: float | None = None,
    ) -> Listener:
        """Start handing out invitations on a Unix socket: by default
        ``<mesh directory>/listen.sock`` (where ``connect(name)`` looks).
        Only processes of our own uid get one: a process of another user
        could not use it (the mesh's node sockets refuse other uids), so it
        is refused at the listener, before any invitation exists.
        Raises ``MeshNameInUse`` if a live listener holds the path and
        ``MeshError`` if the path holds something that is not ours."""
        if self._closed:
            raise MeshError("the mesh is closed")
        self._check_root()
        p = Path(path) if path is not None else self.directory / LISTENER_NAME
        ttl = INVITATION_TTL if invitation_ttl is None else invitation_ttl
        listener = Listener(self._node, p, Inviter(self._node, self._admit, ttl))
        listener.start()
        self._extras.append(listener)
        return listener

    async def listen_tls(
        self,
        address: tuple[str, int] = ("127.0.0.1", 0),
        *,
        limits: BoundaryLimits | None = None,
        tcp_timeout: float = TCP_TIMEOUT,
    ) -> TlsListener:
        """Accept clients on other hosts over TCP + TLS 1.3 (mutual, pinned)
        at ``address`` (port 0: the system picks one; ``tls.address``).
        Clients need an access file from ``tls.grant(path)``; each one is
        served the mesh's control plane over a boundary link (``Gateway``,
        ``limits``). The TLS keys are made at first use in the mesh's
        private folder. Raises ``OSError`` if the address cannot be bound,
        ``MeshError`` if the mesh is closed."""
        if self._closed:
            raise MeshError("the mesh is closed")
        authority = TlsAuthority(tls_directory(self.directory))
        listener = TlsListener(self._node, self, authority, limits=limits, tcp_timeout=tcp_timeout)
        await listener.start(*address)
        self._extras.append(listener)
        with contextlib.suppress(ValueError):  # a second listener: the first one's entry stays
            self.inspect_add("tls", listener.inspect)
        return listener

    def inviter(self, *, ttl: float | None = None) -> Inviter:
        """A handle that makes invitations (``await inviter.invite(port)``),
        usable from any task or thread. Raises ``MeshError`` on a node that
        is not the mesh's first (see ``spawn``)."""
        self._check_root()
        return Inviter(self._node, self._admit, INVITATION_TTL if ttl is None else ttl)

    @overload
    async def spawn(
        self,
        target: str | Callable[..., Awaitable[Any]],
        arg: Any = None,
        *,
        name: str | None = None,
        restart: RestartWhen | RestartPolicy = "never",
        forward_logs: bool = True,
        start: StartMethod = "zygote",
    ) -> Process: ...
    @overload
    async def spawn(
        self,
        target: str | Callable[..., Awaitable[Any]],
        arg: Any = None,
        *,
        name: str | None = None,
        via: Carrier,
    ) -> RemoteProcess: ...
    @overload
    async def spawn(
        self,
        target: str | Callable[..., Awaitable[Any]],
        arg: Any = None,
        *,
        name: str | None = None,
        restart: RestartWhen | RestartPolicy = "never",
        forward_logs: bool = True,
        via: Carrier | None = None,
        start: StartMethod = "zygote",
    ) -> Process | RemoteProcess: ...
    async def spawn(
        self,
        target: str | Callable[..., Awaitable[Any]],
        arg: Any = None,
        *,
        name: str | None = None,
        restart: RestartWhen | RestartPolicy = "never",
        forward_logs: bool = True,
        via: Carrier | None = None,
        start: StartMethod = "zygote",
    ) -> Process | RemoteProcess:
        """Start a worker process running ``async def function(arg)``: pass
        the function itself (defined at the top level of a module, or of the
        script you run: the worker loads it as ``__mp_main__``, like
        ``multiprocessing``, so its ``if __name__ == "__main__":`` block does
        not run there) or ``"package.module:function"``. ``arg`` is any
        message value (typically a ``Receiver``, ``Sender`` or ``Port``).
        Returns once the function runs in the worker. Raises ``TypeError``
        for what is not an async function, ``ValueError`` for a malformed
        target or a function a worker cannot import by name (a lambda, one
        defined inside another function, one typed into a REPL or notebook;
        the message says how to fix it) and ``SpawnError`` if the worker
        cannot start it (module or function missing, an error while
        importing, the process dying first; the worker's traceback
        attached). A later failure of the function is reported by
        ``Process.wait()``'s exit code and ``Process.error``; a worker whose
        link to this process broke exits with status 3. Only the mesh's
        first node issues node identities: a worker asks it for its child's;
        an attached client cannot spawn (``MeshError``). Listening and
        inviting are the first node's alone.

        ``restart``: "never" (the default), "on-failure" (an exit status
        other than 0 or a signal) or "always", or a ``RestartPolicy`` (its
        backoff and limits): the worker is started again from ``arg``, which
        must then be plain data (``ValueError`` for a port or fd in it: the
        ports a worker held fail with it, as they would without a restart).
        ``kill()``, ``terminate()`` and closing the mesh end it for good.
        ``await proc.restart()`` restarts it with a hand-over of its state.

        What the worker logs with ``logging`` is re-emitted here, through
        this process's ``logging``, with ``record.meshipc_node`` (its name)
        and ``record.meshipc_pid``, unless ``forward_logs=False`` (see
        ``set_log_level``).

        With ``via=carrier`` (``meshipc.command``, ``meshipc.ssh``) the
        worker runs in a mesh of its own at the far end of the carrier
        (usually another host), joined to this one by a boundary link: its
        ports in ``arg`` work across, the result is a ``RemoteProcess``
        (``wait``, ``kill``, ``exitcode``), ``SpawnError`` carries the far
        traceback or the carrier's last stderr lines, and an ``Fd`` in
        ``arg`` raises ``MessageError`` (no descriptor crosses). Any node
        may spawn this way (no identity of this mesh is issued); ``restart``
        is for local workers only (``ValueError``), and the far side's
        stderr is re-emitted on the ``meshipc.remote`` logger.

        ``start``: "zygote" (the default) forks the worker from this node's
        fork server, a process started once with meshipc imported (see
        ``Mesh(zygote=...)``); the worker takes the caller's environment,
        current directory, umask, import path and standard descriptors of
        the moment, and imports its own module. "exec" starts a fresh
        interpreter, as the zygote does where forking is unsafe (macOS,
        ``MESHIPC_PORTABLE=1``) or when it cannot fork (a warning says why).
        ``Process.start_method`` says which one ran. ``ValueError`` for
        another value."""
        if self._closed:
            raise MeshError("the mesh is closed")
        if start not in ("zygote", "exec"):
            raise ValueError(f"start must be 'zygote' or 'exec', got {start!r}")
        proc: Process | RemoteProcess
        if via is not None:
            if restart != "never":
                raise ValueError(
                    "restart= is for local workers: a worker spawned via a carrier is not restarted"
                )
            proc = await spawn_via(via, self._node, target, arg, name)
        else:
            zygote = (
                self._zygote if start == "zygote" and self._zygote_mode != "off" and forks_safely() else None
            )
            proc = await spawn(
                self._node, self._admit_worker, self.limits, target, arg, name, restart, forward_logs, zygote
            )
        # one of ours from now on (closing the mesh stops it even while it
        # starts); a long-lived mesh spawning many workers keeps only the
        # running ones
        self._children.append(proc)
        proc._exited.add_done_callback(lambda _: self._forget_child(proc))
        await proc._wait_started()
        return proc

    async def set_log_level(self, worker: str | Process, level: int | str, logger: str = "") -> int:
        """Set the level of the logger ``logger`` (the root logger by
        default) in the running worker(s) named ``worker`` (or in the
        ``Process`` given) to ``level`` (``logging.DEBUG`` or ``"debug"``),
        without a restart; returns how many workers obeyed, once each did
        (their next record follows it). ``"*"`` means every worker of this
        mesh node. Raises ``ValueError`` for an unknown level, ``MeshError``
        if no such worker runs or one does not forward its logs."""
        level_number(level)
        if isinstance(worker, Process):
            procs = [worker]
        else:
            procs = [
                p
                for p in self._children
                if isinstance(p, Process) and worker in ("*", p.name) and p.returncode is None
            ]
            if not procs and worker != "*":
                raise MeshError(f"no running worker named {worker!r}")
        for p in procs:
            await p.set_log_level(level, logger)
        return len(procs)

    def _log_levels(self) -> dict[str, Any]:
        """The ``log_levels`` inspect entry: per worker, the levels set
        through ``set_log_level`` (logger name, "" the root logger)."""
        return {
            f"{p.name}-{p.pid}": {k or "root": logging.getLevelName(v) for k, v in p.logs.levels.items()}
            for p in self._children
            if isinstance(p, Process) and p.logs is not None
        }

    async def _update_log_levels(self, value: Any) -> None:
        """``inspect_update(".../log_levels", {"worker": name or "*",
        "level": level, "logger": name})`` (``meshipc log``)."""
        if not isinstance(value, dict) or not isinstance(value.get("worker", "*"), str):
            raise ValueError('log_levels takes {"worker": NAME or "*", "level": LEVEL, "logger": NAME}')
        logger = value.get("logger", "")
        if not isinstance(logger, str) or len(logger) > 1024:
            raise ValueError("logger is a logger name")
        level = value.get("level")
        if not isinstance(level, (int, str)):
            raise ValueError("level is a number or a level name")
        await self.set_log_level(value.get("worker", "*"), level, logger)

    async def open_gateway(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: Port[Any],
        *,
        label: str,
        limits: BoundaryLimits | None = None,
        timeout: float | None = HELLO_TIMEOUT,
    ) -> Gateway:
        """A boundary link from this mesh's node to another mesh over the
        byte stream ``reader``/``writer`` (see ``Gateway.open``): ``first``
        joins the far side's first port. Raises what ``Gateway.open`` does."""
        if self._closed or self._node is None:
            raise MeshError("the mesh is closed")
        gw = await Gateway.open(
            self._node, reader, writer, first, label=label, limits=limits, timeout=timeout
        )
        self._extras.append(gw)
        # a link that ends leaves the list (a long-lived mesh may open many)
        ended = asyncio.ensure_future(gw.wait_closed())
        ended.add_done_callback(lambda _: self._extras.remove(gw) if gw in self._extras else None)
        return gw

    def _check_root(self) -> None:
        if self._authority is None:
            raise MeshError(NOT_ROOT)

    def _forget_child(self, proc: Process | RemoteProcess) -> None:
        if proc in self._children:
            self._children.remove(proc)

    def stats(self) -> MeshStats:
        """A snapshot of this mesh's node (its links and accept loop), its
        listeners and workers: counters for tests, ``inspect`` and
        monitoring; also once closed. Raises ``MeshError`` before the mesh
        was entered (it has no node yet)."""
        if self._node is None:
            raise MeshError("the mesh was not entered yet: no node to describe")
        return MeshStats(
            node=self._node.stats(),
            listeners=tuple(x.stats() for x in self._extras if isinstance(x, Listener)),
            workers=len(self._children),
            zygote=self._zygote.stats(),
        )

    # ------------------------------------------------------------ control plane

    def serve(
        self,
        name: str,
        handler: Callable[[Any], Awaitable[Any]] | Receiver[Any],
        request_type: Any = None,
        reply_type: Any = None,
    ) -> Service:
        """Register the service ``name`` for the whole mesh: ``handler`` is
        ``async def handler(request) -> reply`` (an exception becomes
        ``RemoteError`` at the caller; a caller that gives up cancels it) or
        a ``Receiver`` the application drains itself (it gets
        ``ServiceCall`` objects: a ``Call`` with ``deadline``).
        ``request_type``/``reply_type`` (msgspec types) are checked on the
        serving side. Raises ``ServiceNameInUse`` at once for a name this node
        or (on the mesh's first node) the mesh already serves; elsewhere
        ``await`` the returned ``Service`` to learn the registry's verdict."""
        return self._plane().serve(name, handler, request_type, reply_type)

    def control_statistics(self) -> ControlStatistics:
        """A snapshot of this node's control plane: sessions, inspects in
        progress and the registry (on the mesh's first node), the services
        this node serves."""
        return self._plane().statistics()

    def inspect_add(
        self,
        name: str,
        fn: Callable[[], Any],
        sensitive: bool = False,
        *,
        update: Callable[[Any], Any] | None = None,
    ) -> None:
        """Add the entry ``name`` to this node's inspect subtree: ``fn()``
        returns plain data (or an awaitable of it) when someone inspects.
        ``sensitive`` entries show only when asked for (``sensitive=True``).
        With ``update``, ``inspect_update("nodes/<id>/<name>", value)`` calls
        ``update(value)`` (may be async). Raises ``ValueError`` for a name
        that is taken or malformed."""
        self._plane().inspector.add(name, fn, sensitive, update)

    def __repr__(self) -> str:
        return f"<Mesh name={self.name!r} node={self._node.id if self._node else None}>"


# ------------------------------------------------------------------ attaching
