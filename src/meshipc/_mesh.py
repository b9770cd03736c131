"""``meshipc.Mesh``: a node of a mesh in this process, and its directory."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._errors import MeshError
from ._ids import NodeId
from ._node import MeshSecret, Node, check_private_dir
from ._ports import DEFAULT_LIMITS, Limits
from ._process import Process, spawn

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._channel import Receiver, Sender
    from ._control import Control, Service
    from ._invitation import Inviter, Listener

log = logging.getLogger("meshipc")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Seconds workers get to exit after the mesh closes their bootstrap port.
CHILD_GRACE = 5.0


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


def runtime_root(runtime_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding this user's mesh directories.

    ``runtime_dir`` if given, else ``$XDG_RUNTIME_DIR`` (when it is a private
    directory of ours), else ``<tmp>/meshipc-<uid>``, created 0700. An
    existing folder must be a real directory owned by us with mode 0700."""
    if runtime_dir is not None:
        root = Path(runtime_dir)
        if not os.path.lexists(root):
            root.mkdir(mode=0o700, parents=True)
        check_private_dir(root)  # lstat: a symlink, dangling or not, is refused
        return root
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        try:
            check_private_dir(Path(xdg))
            return Path(xdg)
        except (OSError, MeshError):
            log.debug("ignoring XDG_RUNTIME_DIR=%s (not a private directory of ours)", xdg)
    root = Path(tempfile.gettempdir()) / f"meshipc-{os.getuid()}"
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        pass
    check_private_dir(root)
    return root


def mesh_directory(root: Path, name: str) -> Path:
    return root / f"mesh-{name}"


class Mesh:
    """A node of a mesh, in this process. Use as ``async with Mesh() as mesh``.

    ``Mesh()`` starts a new private mesh; ``Mesh(name="vmm")`` starts one that
    other processes of this user can find by name. Raises ``MeshError`` if the
    runtime folder is not safe to use, ``MeshNameInUse`` if a live mesh holds
    the name."""

    def __init__(
        self,
        name: str | None = None,
        *,
        runtime_dir: str | os.PathLike[str] | None = None,
        limits: Limits | None = None,
    ) -> None:
        if name is not None and not _NAME.match(name):
            raise ValueError(f"mesh names are 1-64 letters, digits, '.', '_' or '-', got {name!r}")
        self.name = name
        #: flow-control bounds of this node's ports (spawned workers inherit them)
        self.limits = limits if limits is not None else DEFAULT_LIMITS
        self._runtime_dir = runtime_dir
        self._node: Node = None  # type: ignore[assignment]  # set on enter
        self._owns_directory = False
        self._children: list[Process] = []
        self._closed = False
        self._extras: list[Any] = []  # listeners and other things closed with the mesh
        self._lock_fd = -1
        self._control: Control = None  # type: ignore[assignment]  # set on enter
        self._outer: Mesh | None = None

    def _start_control(self, root: bool) -> None:
        from ._control import Control

        self._control = Control(self, root)
        self._extras.append(self._control)
        self._outer = _current.get()
        _current.set(self)

    @property
    def node_id(self) -> NodeId:
        return NodeId(self._node.id)

    @property
    def directory(self) -> Path:
        """The mesh's socket folder (mode 0700)."""
        return self._node.directory

    async def __aenter__(self) -> Mesh:
        root = runtime_root(self._runtime_dir)
        if self.name is not None:
            from ._invitation import claim_name

            directory, self._lock_fd = claim_name(root, self.name)
        else:
            directory = mesh_directory(root, os.urandom(8).hex())
            directory.mkdir(mode=0o700)
        self._owns_directory = True
        try:
            check_private_dir(directory)
            self._node = Node(directory, MeshSecret(), limits=self.limits)
            self._node.start()
            self._start_control(root=True)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
            raise
        return self

    @classmethod
    @contextlib.asynccontextmanager
    async def _joined(
        cls, directory: str, secret: bytes, node_id: bytes, limits: Limits | None = None
    ) -> AsyncIterator[Mesh]:
        """A node joining an existing mesh (spawned child or invited process)."""
        self = cls(limits=limits)
        d = Path(directory)
        check_private_dir(d)
        self._node = Node(d, MeshSecret(secret), node_id, limits=self.limits)
        self._node.start()
        self._start_control(root=False)
        try:
            yield self
        finally:
            await self.aclose()

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Shut down: stop listeners, stop and reap workers, let ports in
        transit settle, close connections, remove our socket (and the
        directory, for the mesh's first node). Safe to call twice."""
        if self._closed or self._node is None:
            return
        self._closed = True
        if _current.get() is self:
            _current.set(self._outer)  # e.g. a worker that attached to another mesh
        for extra in self._extras:
            extra.close()
        for proc in self._children:
            proc.terminate()
        for proc in self._children:
            try:
                async with asyncio.timeout(CHILD_GRACE):
                    await proc.wait()
            except TimeoutError:
                log.warning("worker %s (pid %d) did not exit; killing it", proc.name, proc.pid)
                proc.kill()
                await proc.wait()
        await self._node.close()
        if self._owns_directory:
            shutil.rmtree(self._node.directory, ignore_errors=True)
        if self._lock_fd >= 0 and self.name is not None:
            from ._invitation import release_name

            release_name(self._node.directory.parent, self.name, self._lock_fd)  # the name is free again
            self._lock_fd = -1

    async def listen(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        allowed_uids: set[int] | None = None,
        invitation_ttl: float | None = None,
    ) -> Listener:
        """Start handing out invitations on a Unix socket: by default
        ``<mesh directory>/listen.sock`` (where ``connect(name)`` looks).
        Raises ``MeshNameInUse`` if a live listener holds the path and
        ``MeshError`` if the path holds something that is not ours."""
        from ._invitation import INVITATION_TTL, LISTENER_NAME, Listener

        if self._closed:
            raise MeshError("the mesh is closed")
        p = Path(path) if path is not None else self.directory / LISTENER_NAME
        uids = set(allowed_uids) if allowed_uids is not None else {os.getuid()}
        listener = Listener(self, p, uids, INVITATION_TTL if invitation_ttl is None else invitation_ttl)
        listener.start()
        self._extras.append(listener)
        return listener

    def inviter(self, *, ttl: float | None = None) -> Inviter:
        """A handle that makes invitations (``await inviter.invite(port)``),
        usable from any task or thread."""
        from ._invitation import INVITATION_TTL, Inviter

        return Inviter(self, INVITATION_TTL if ttl is None else ttl)

    async def spawn(self, target: str, arg: Any = None, *, name: str | None = None) -> Process:
        """Start a worker process running ``async def function(arg)`` from
        ``"package.module:function"``; ``arg`` is any message value (typically
        a ``Receiver``, ``Sender`` or ``Port``). Raises ``ValueError`` for a
        malformed target; a failure inside the child is reported by
        ``Process.wait()``'s exit code and ``Process.error``."""
        if self._closed:
            raise MeshError("the mesh is closed")
        proc = await spawn(self, target, arg, name)
        self._children.append(proc)
        return proc

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
        return self._control.serve(name, handler, request_type, reply_type)

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
        self._control.inspect_add(name, fn, sensitive, update)

    async def inspect_update(self, path: str, value: Any, timeout: float = 1.0) -> Any:
        """Update an updatable entry (see ``ClientConnection.inspect_update``)."""
        return await self._control.inspect_update(path, value, timeout)

    async def services(self) -> dict[str, Any]:
        """The mesh's services: name -> node, request and reply type names."""
        return await self._control.services()

    async def call(self, service: str, request: Any, timeout: float | None = None) -> Any:
        """Call a service by name (see ``ClientConnection.call``)."""
        return await self._control.call(service, request, timeout)

    async def open(self, service: str) -> Sender[Any]:
        """A ``Sender`` to a service, for many calls (see ``ClientConnection.open``)."""
        return await self._control.open(service)

    async def inspect(
        self, path: str = "", depth: int | None = None, timeout: float = 1.0, *, sensitive: bool = False
    ) -> Any:
        """The live inspect tree of the mesh (see ``ClientConnection.inspect``)."""
        return await self._control.inspect(path, depth, timeout, sensitive)

    def __repr__(self) -> str:
        return f"<Mesh name={self.name!r} node={self._node.id if self._node else None}>"
