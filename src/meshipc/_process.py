"""Spawned worker processes that join the mesh at start.

The parent makes a socket pair, passes one end to a fresh interpreter
(``python -P -c <bootstrap> <parent's sys.path>``, see ``worker_command``)
together with an invitation in the environment, and runs the acceptor side
of the node handshake on its end.
The child's credential (its private key, the certificate the mesh's root
issued it and the root's public key: ``_handshake.Identity``) is not in the
environment (``/proc/<pid>/environ`` keeps the initial environment whatever
the child does): it is the first ``CREDENTIAL_LEN`` bytes the parent writes
on the socket pair. The child removes the invitation from its environment
first thing, reads its credential, creates its own node in the mesh
directory, and receives the spawn argument as the first message on its
bootstrap port. The bootstrap port stays open while the
child lives: the parent reads the child's outcome on it, and the child
learns on it that its parent died or the mesh is shutting down.

What the child says on the bootstrap port, in order::

    ["started"]                                  target imported, function running
    ["start_failed", type, message, traceback]   instead of "started"; the child exits 1
    ["ok"] | ["error", type, message, traceback] the function returned / raised

``spawn`` returns once "started" arrives and raises ``SpawnError`` for
anything else (including the process dying first). A traceback travels once,
on the port: the child does not print it as well.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import importlib
import inspect
import logging
import operator
import os
import re
import signal
import socket
import subprocess
import sys
import types
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec

from ._channel import Call, Port, Receiver
from ._codec import walk_resources
from ._errors import ChannelClosed, MeshError, PortFailed, RemoteError, SpawnError
from ._handshake import Identity
from ._ids import PortId
from ._node import Node
from ._platform import PLATFORM
from ._ports import Limits

log = logging.getLogger("meshipc")

ENV_INVITATION = "MESHIPC_CHILD_INVITATION"
#: Why a worker did not start when it said nothing: replaced by its exit status.
_NO_REPORT = "no start report"
#: Seconds the parent waits, after a worker exited, for its status message.
STATUS_GRACE = 2.0
_TARGET = re.compile(r"^(?:[A-Za-z_][\w.]*|/[^\0]+):[A-Za-z_]\w*$")
#: How a worker fails to find a function, and what to do instead.
_MOVE_IT: Final = (
    "define it with `async def` at the top level of a module file and pass it (or 'module:function')"
)


def target_of(func: Callable[..., Any]) -> str:
    """The target a worker finds ``func`` by: ``"module:function"``, or
    ``"/path/to/script:function"`` for a function of a script run as
    ``python script.py`` (any file name; the worker loads the script as ``__mp_main__``,
    as ``multiprocessing`` does: its ``if __name__ == "__main__":`` block
    does not run there). Raises ``TypeError`` for what is not an ``async``
    function, ``ValueError`` for one the worker cannot import by name (a
    lambda, a function defined inside another, or typed into a REPL or a
    notebook), saying how to fix it."""
    if not callable(func) or not hasattr(func, "__qualname__") or not hasattr(func, "__module__"):
        raise TypeError(f"spawn takes an async function or 'module:function', got {func!r}")
    qualname: str = func.__qualname__
    if "<lambda>" in qualname:
        raise ValueError(f"a lambda cannot be spawned (the worker imports its function by name): {_MOVE_IT}")
    if "<locals>" in qualname or "." in qualname:
        raise ValueError(
            f"{qualname} is defined inside a function or class, so the worker cannot import it by name: "
            + _MOVE_IT
        )
    if not inspect.iscoroutinefunction(inspect.unwrap(func)):
        raise TypeError(f"{qualname} is not an async function: a worker runs `async def {qualname}(arg)`")
    module = sys.modules.get(func.__module__)
    if module is None or getattr(module, qualname, None) is not func:
        where = f"{func.__module__}.{qualname}"
        raise ValueError(f"{where} is not reachable by its name in its module: {_MOVE_IT}")
    where = func.__module__
    if where in ("__main__", "__mp_main__"):
        spec = getattr(module, "__spec__", None)
        path = getattr(module, "__file__", None)
        if spec is not None and spec.name not in ("__main__", "__mp_main__"):
            where = spec.name  # run as `python -m package.module`
        elif isinstance(path, str) and os.path.isfile(path):
            where = os.path.abspath(path)  # run as `python any/file` (any name, any suffix)
        else:
            raise ValueError(
                f"{qualname} was typed into an interactive session (a REPL or a notebook), "
                f"which a worker process cannot import: {_MOVE_IT}"
            )
    return f"{where}:{qualname}"


class ChildInvitation(msgspec.Struct, frozen=True):
    """What a spawned child needs to join (travels in its environment)."""

    directory: str
    parent: bytes
    node: bytes
    port: bytes
    peer_port: bytes
    fd: int
    target: str
    name: str
    #: the parent's flow-control limits (Limits fields, in order)
    limits: tuple[int, ...] | None = None
    #: element types of the typed receivers in the argument: (index among the
    #: argument's handles, type reference); see ``type_ref``
    arg_types: list[tuple[int, Any]] = []
    #: read end of the parent-death pipe (``Platform.parent_pipe``), or -1
    watch_fd: int = -1

    def __repr__(self) -> str:
        return f"ChildInvitation(name={self.name!r}, target={self.target!r}, directory={self.directory!r})"


# A receiver's element type does not travel in messages (no pickle, and a
# peer must not make us import things). A worker's parent is trusted, though,
# and names the worker's module anyway: so spawn passes the types of the typed
# receivers in its argument by name, and the worker imports them.


def type_ref(tp: Any) -> Any:
    """A plain-data name for ``tp`` (a class, or a generic or union of
    them), or None if it has none."""
    if tp is Any:
        return None
    origin = typing.get_origin(tp)
    if origin is not None:
        args = [type_ref(a) if a is not Any else "any" for a in typing.get_args(tp)]
        if None in args:
            return None
        if origin is types.UnionType or origin is typing.Union:
            return ["union", args]
        head = type_ref(origin)
        return None if head is None else ["generic", head, args]
    if tp is None or tp is type(None):
        return "none"
    if isinstance(tp, type) and "<locals>" not in tp.__qualname__:
        return f"{tp.__module__}:{tp.__qualname__}"
    return None


def resolve_type_ref(ref: Any) -> Any:
    """The type named by ``type_ref``; ``Any`` if it cannot be resolved."""
    try:
        if ref == "any":
            return Any
        if ref == "none":
            return None
        if isinstance(ref, str):
            mod, _, qual = ref.partition(":")
            obj: Any = importlib.import_module(mod)
            for part in qual.split("."):
                obj = getattr(obj, part)
            return obj
        if ref[0] == "union":
            return functools.reduce(operator.or_, [resolve_type_ref(a) for a in ref[1]])
        if ref[0] == "generic":
            head = resolve_type_ref(ref[1])
            args = tuple(resolve_type_ref(a) for a in ref[2])
            return head[args if len(args) != 1 else args[0]]
    except (ImportError, AttributeError, TypeError, IndexError, ValueError) as exc:
        log.warning("cannot resolve the receiver type %r: %s", ref, exc)
    return Any


def receiver_types(arg: Any) -> list[tuple[int, Any]]:
    out = []
    for i, h in enumerate(walk_resources(arg)):
        if isinstance(h, Receiver):
            call: Any = Call
            tp = h._type if not h._calls_only else (call if h._type is Any else call[h._type])
            ref = type_ref(tp)
            if ref is not None:
                out.append((i, ref))
    return out


def apply_receiver_types(arg: Any, refs: list[tuple[int, Any]]) -> None:
    """In the worker: type the receivers of ``arg`` that arrived untyped."""
    if not refs:
        return
    handles = walk_resources(arg)
    for i, ref in refs:
        if i < len(handles) and isinstance(handles[i], Receiver) and handles[i]._type is Any:
            handles[i]._set_type(resolve_type_ref(ref))


def _wait_exited(popen: subprocess.Popen[bytes]) -> None:
    """Block until the child has exited, leaving it to be reaped where
    ``waitid`` exists (else reaping it here)."""
    try:
        os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOWAIT)
    except AttributeError:
        popen.wait()
    except OSError:
        pass  # reaped elsewhere: the caller's wait() settles it


class Process:
    """A worker process in the mesh. ``await wait()`` gives its exit code."""

    def __init__(
        self, popen: subprocess.Popen[bytes], name: str, target: str, port: Port, watch_fd: int = -1
    ) -> None:
        self._popen = popen
        # our end of the worker's parent-death pipe: open while the worker
        # lives (the kernel closes it if we die), closed once it exited
        self._watch_fd = watch_fd
        self.pid = popen.pid
        self.name = name
        self.target = target
        self._port = port
        self.returncode: int | None = None
        #: the child's function raised: its error as ``RemoteError`` (also logged)
        self.error: RemoteError | None = None
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        #: None once the target runs; else why it did not start (the
        #: child's own report, or None when it died without one)
        self._started: asyncio.Future[SpawnError | None] = loop.create_future()
        self._status_task = loop.create_task(self._read_status())
        self._watch_exit()

    def _watch_exit(self) -> None:
        loop = asyncio.get_running_loop()
        pidfd = PLATFORM.exit_fd(self.pid)
        if pidfd is None:
            # no pidfd (old kernel, macOS): wait in a thread, without reaping;
            # the loop's thread reaps, as with a pidfd
            fut = loop.run_in_executor(None, _wait_exited, self._popen)
            fut.add_done_callback(lambda _: self._set_exit(self._popen.wait()))
            return

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._set_exit(self._popen.wait())

        loop.add_reader(pidfd, on_exit)

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        if self._watch_fd >= 0:
            os.close(self._watch_fd)
            self._watch_fd = -1
        # the child's last words (its status) may still be in the socket: the
        # status reader ends once they are read, or when the connection to the
        # child breaks (EOF comes after the data); only then is the exit final
        self._status_task.add_done_callback(lambda _: self._finish_exit(code))
        asyncio.get_running_loop().call_later(STATUS_GRACE, self._status_task.cancel)

    def _finish_exit(self, code: int) -> None:
        if not self._exited.done():
            self._exited.set_result(code)
        self._port.close()

    async def _read_status(self) -> None:
        try:
            await self._read_statuses()
        finally:
            if not self._started.done():
                self._started.set_result(SpawnError(self.name, self.target, _NO_REPORT))

    async def _read_statuses(self) -> None:
        try:
            status = await self._port.recv()
            if _is_error(status, "start_failed"):
                why = f"{status[1]}: {status[2]}"
                self._started.set_result(SpawnError(self.name, self.target, why, str(status[3])))
                return
            if status != ["started"]:
                self.kill()  # not a worker of ours: it gets no chance to run
                why = f"unexpected start report {str(status)[:100]!r}"
                self._started.set_result(SpawnError(self.name, self.target, why))
                return
            self._started.set_result(None)
            status = await self._port.recv()
        except (ChannelClosed, PortFailed):
            return
        except MeshError as exc:
            log.warning("worker %s sent an unreadable status: %s", self.name, exc)
            return
        if _is_error(status, "error"):
            self.error = RemoteError(str(status[1]), str(status[2]), str(status[3]))
            log.error("worker %s (pid %d) failed: %s\n%s", self.name, self.pid, self.error, status[3])

    async def _wait_started(self) -> None:
        """Return once the target runs; else reap the process and raise
        ``SpawnError``. Cancelled meanwhile, the process is killed."""
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
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            failed = SpawnError(self.name, self.target, f"the worker process {how} before starting it")
        raise failed

    async def wait(self) -> int:
        """Wait for the process to exit; its exit code (negative: killed by signal)."""
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        """SIGKILL the process (no-op once it has exited)."""
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """Ask the worker to stop: its function is cancelled and it exits."""
        self._port.close()

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return f"<Process {self.name!r} pid={self.pid} {state}>"


#: Run by the worker interpreter before anything else: the import path
#: becomes exactly the one given on the command line, then the worker starts.
_BOOTSTRAP = (
    "import sys; sys.path[:] = sys.argv[1:]; del sys.argv[1:]; from meshipc._child import main; main()"
)


def worker_command() -> list[str]:
    """The command line of a worker: this interpreter, and this process's
    import path exactly (relative entries made absolute against our current
    directory, which the worker inherits).

    ``-P`` keeps the interpreter from putting the directory it runs in (or
    ``''``) first on its path, so a module planted where the worker happens
    to run is never imported; the bootstrap then replaces the startup path
    with ours before importing meshipc. The path goes on the command line
    rather than in ``PYTHONPATH`` so that the worker's environment is the
    parent's, unchanged."""
    path = [os.path.abspath(p) for p in sys.path]  # '' is the current directory
    return [sys.executable, "-P", "-c", _BOOTSTRAP, *path]


def _is_error(status: Any, tag: str) -> bool:
    return isinstance(status, list) and len(status) == 4 and status[0] == tag


def check_target(target: str | Callable[..., Any], name: str | None) -> tuple[str, str]:
    """``target`` as a string (see ``target_of``) and the worker's name
    (``name``, else the function's). Raises ``ValueError`` for a malformed
    target (and what ``target_of`` raises)."""
    if not isinstance(target, str):
        target = target_of(target)
    if not _TARGET.match(target):
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    return target, name or target.rsplit(":", 1)[1]


async def spawn(
    node: Node,
    credential: Callable[[], Awaitable[Identity]],
    limits: Limits,
    target: str | Callable[..., Any],
    arg: Any,
    name: str | None,
) -> Process:
    """Start the worker ``target`` (an async function, or
    ``"package.module:function"``; see ``target_of``) as a new node joined
    to ``node``, with the credential ``credential()`` issues and ``limits``
    on its ports; ``arg`` goes first on its bootstrap port."""
    target, name = check_target(target, name)
    identity = await credential()
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pipe = PLATFORM.parent_pipe()
    child_id, pport, cport = identity.node, PortId.random(), PortId.random()
    inv = ChildInvitation(
        directory=os.fspath(node.directory),
        parent=bytes(node.id),
        node=bytes(child_id),
        port=bytes(cport),
        peer_port=bytes(pport),
        fd=child_sock.fileno(),
        target=target,
        name=name,
        limits=dataclasses.astuple(limits),
        arg_types=receiver_types(arg),
        watch_fd=pipe[0] if pipe else -1,
    )
    env = dict(os.environ)
    env[ENV_INVITATION] = base64.b64encode(msgspec.msgpack.encode(inv)).decode()
    # a credential (a few hundred bytes) always fits in an empty socket
    # buffer: this never blocks
    parent_sock.sendall(identity.to_bytes())
    parent_sock.setblocking(False)
    # expect the child on our end of the pair before any port names it
    node.accept_via(child_id, parent_sock)
    port = Port._wrap([node.engine.new_bound(pport, child_id, cport)])
    try:
        # encode the argument before a process exists: an unsendable value
        # raises here and leaves nothing behind
        port.send(arg)
        popen = subprocess.Popen(
            worker_command(),
            env=env,
            pass_fds=[child_sock.fileno(), *pipe[:1]] if pipe else [child_sock.fileno()],
            close_fds=True,
        )
    except BaseException:
        node.forget(child_id, "the worker process was not started")
        port.close()
        parent_sock.close()
        if pipe:
            os.close(pipe[1])
        raise
    finally:
        child_sock.close()
        if pipe:
            os.close(pipe[0])
    return Process(popen, name, target, port, pipe[1] if pipe else -1)
