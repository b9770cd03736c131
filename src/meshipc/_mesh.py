"""``meshipc.Mesh``: a node of a mesh in this process, and its directory."""

from __future__ import annotations

import asyncio
import contextlib
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
from ._process import Process, spawn

if TYPE_CHECKING:
    from ._invitation import Inviter, Listener

log = logging.getLogger("meshipc")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Seconds workers get to exit after the mesh closes their bootstrap port.
CHILD_GRACE = 5.0


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

    def __init__(self, name: str | None = None, *, runtime_dir: str | os.PathLike[str] | None = None) -> None:
        if name is not None and not _NAME.match(name):
            raise ValueError(f"mesh names are 1-64 letters, digits, '.', '_' or '-', got {name!r}")
        self.name = name
        self._runtime_dir = runtime_dir
        self._node: Node = None  # type: ignore[assignment]  # set on enter
        self._owns_directory = False
        self._children: list[Process] = []
        self._closed = False
        self._extras: list[Any] = []  # listeners and other things closed with the mesh
        self._lock_fd = -1

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
            self._node = Node(directory, MeshSecret())
            self._node.start()
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
            raise
        return self

    @classmethod
    @contextlib.asynccontextmanager
    async def _joined(cls, directory: str, secret: bytes, node_id: bytes) -> AsyncIterator[Mesh]:
        """A node joining an existing mesh (spawned child or invited process)."""
        self = cls()
        d = Path(directory)
        check_private_dir(d)
        self._node = Node(d, MeshSecret(secret), node_id)
        self._node.start()
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
        a ``Receiver``, ``Sender`` or ``Port``). Returns once the function
        runs in the worker. Raises ``ValueError`` for a malformed target and
        ``SpawnError`` if the worker cannot start it (module or function
        missing, an error while importing, the process dying first; the
        worker's traceback attached). A later failure of the function is
        reported by ``Process.wait()``'s exit code and ``Process.error``; a
        worker whose link to this process broke exits with status 3."""
        if self._closed:
            raise MeshError("the mesh is closed")
        proc = await spawn(self, target, arg, name)
        self._children.append(proc)
        return proc

    def __repr__(self) -> str:
        return f"<Mesh name={self.name!r} node={self._node.id if self._node else None}>"
