"""Spawned worker processes that join the mesh at start.

The parent makes a socket pair, passes one end to a fresh interpreter
(``python -P -c <bootstrap> <parent's sys.path>``, see ``worker_command``)
together with an invitation in the environment, or to a worker its zygote
forks (``_zygote``: the invitation in the fork request), and runs the
acceptor side of the node handshake on its end.
The child's credential (its private key, the certificate the mesh's root
issued it and the root's public key: ``_handshake.Identity``) is not in the
environment (``/proc/<pid>/environ`` keeps the initial environment whatever
the child does): it is the first ``CREDENTIAL_LEN`` bytes the parent writes
on the socket pair, once the process exists (a zygote has let go of the
socket by then). The child removes the invitation from its environment
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

A restart (``Process.restart``) adds, in order::

    successor -> parent  ["ready"]               imported; waits for its argument
    parent -> worker     ["restart"]             meshipc.restarting() returns
    worker -> parent     ["handover", state]     instead of "ok": the function's value
    parent -> successor  state                   its argument; then "started" as above

The parent accepts a hand-over only after asking for one.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
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
import time
import types
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

import msgspec

from ._channel import Call, Port, Receiver
from ._codec import CODEC, walk_resources
from ._errors import ChannelClosed, MeshError, PortFailed, RemoteError, RestartError, SpawnError
from ._handshake import Identity
from ._ids import PortId
from ._logs import LogPump, level_number
from ._node import Node
from ._platform import PLATFORM
from ._ports import Limits
from ._zygote import StartMethod, Zygote, ZygoteChild, ZygoteUnavailable

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
    #: a restart's successor: say "ready" once the function is imported,
    #: then read the argument (the predecessor's state)
    handover: bool = False
    #: the first message on the bootstrap port is the worker's log port (``_logs``)
    logs: bool = False

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


class _Run:
    """One incarnation of a worker: its OS process, its bootstrap port and
    what the child said on it. A ``Process`` holds one at a time (a restart
    puts a successor in its place)."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes] | ZygoteChild,
        name: str,
        target: str,
        port: Port,
        watch_fd: int = -1,
        logs: LogPump | None = None,
    ) -> None:
        self._popen = popen
        # our end of the worker's parent-death pipe: open while the worker
        # lives (the kernel closes it if we die), closed once it exited
        self._watch_fd = watch_fd
        self.pid = popen.pid
        #: "zygote" (forked by the node's zygote) or "exec" (a fresh interpreter)
        self.start_method: StartMethod = "zygote" if isinstance(popen, ZygoteChild) else "exec"
        self.name = name
        self.target = target
        self._port = port
        self.returncode: int | None = None
        #: the child's function raised: its error as ``RemoteError`` (also logged)
        self.error: RemoteError | None = None
        #: called once the exit is final (its status read)
        self.on_exit: Callable[[_Run, int], None] | None = None
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        #: None once the target runs; else why it did not start (the
        #: child's own report, or None when it died without one)
        self._started: asyncio.Future[SpawnError | None] = loop.create_future()
        #: a successor imported its function and waits for its argument
        self._ready: asyncio.Future[None] = loop.create_future()
        #: (True, state) once the function returned for a restart; else
        #: (False, why it did not)
        self._handover: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        #: a restart was asked of it: a hand-over is expected
        self._asked = False
        self._status_task = loop.create_task(self._read_status())
        #: the worker's forwarded logging (None: ``forward_logs=False``)
        self.logs = logs
        if logs is not None:
            logs.start(self.pid)
        self._watch_exit()

    def _watch_exit(self) -> None:
        if isinstance(self._popen, ZygoteChild):  # the zygote reaps it and reports
            self._popen.exited.add_done_callback(lambda f: self._set_exit(f.result()))
            return
        popen = self._popen
        loop = asyncio.get_running_loop()
        pidfd = PLATFORM.exit_fd(self.pid)
        if pidfd is None:
            # no pidfd (old kernel, macOS): wait in a thread, without reaping;
            # the loop's thread reaps, as with a pidfd
            fut = loop.run_in_executor(None, _wait_exited, popen)
            fut.add_done_callback(lambda _: self._set_exit(popen.wait()))
            return

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._set_exit(popen.wait())

        loop.add_reader(pidfd, on_exit)

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        if self._watch_fd >= 0:
            os.close(self._watch_fd)
            self._watch_fd = -1
        # the child's last words (its status, its last log records) may still
        # be in the socket: the readers end once they are read, or when the
        # connection to the child breaks (EOF comes after the data); only
        # then is the exit final
        readers = [self._status_task] + ([self.logs.task] if self.logs and self.logs.task else [])
        done = asyncio.gather(*readers, return_exceptions=True)
        done.add_done_callback(lambda _: self._finish_exit(code))
        loop = asyncio.get_running_loop()
        for task in readers:
            loop.call_later(STATUS_GRACE, task.cancel)

    def _finish_exit(self, code: int) -> None:
        if self._exited.done():
            return
        self._exited.set_result(code)
        self._port.close()
        if self.logs is not None:
            self.logs.close()
        if self.on_exit is not None:
            self.on_exit(self, code)

    async def _read_status(self) -> None:
        try:
            await self._read_statuses()
        finally:
            if not self._started.done():
                self._started.set_result(SpawnError(self.name, self.target, _NO_REPORT))
            if not self._handover.done():
                why = "it raised" if self.error is not None else "it ended without returning its state"
                self._handover.set_result((False, why))

    async def _read_statuses(self) -> None:
        try:
            status = await self._port.recv()
            if status == ["ready"]:
                self._ready.set_result(None)
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
        if isinstance(status, list) and len(status) == 2 and status[0] == "handover":
            if self._asked:
                self._handover.set_result((True, status[1]))
            else:  # not asked for: nobody would take the ports in it
                CODEC.dispose(status[1], f"worker {self.name!r} handed over a state nobody asked for")
                log.warning("worker %s (pid %d) handed over a state without a restart", self.name, self.pid)
        elif _is_error(status, "error"):
            self.error = RemoteError(str(status[1]), str(status[2]), str(status[3]))
            log.error("worker %s (pid %d) failed: %s\n%s", self.name, self.pid, self.error, status[3])

    async def _wait_ready(self) -> SpawnError | None:
        """A successor: None once it imported its function and waits for its
        argument; else why it will not start (the process reaped)."""
        waits: list[asyncio.Future[Any]] = [self._ready, self._started]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self._ready.done():
            return None
        return await self._wait_started()

    async def _wait_started(self) -> SpawnError | None:
        """None once the target runs; else why not, the process reaped.
        Cancelled meanwhile, the process is killed."""
        try:
            failed = await asyncio.shield(self._started)
        except asyncio.CancelledError:
            self.kill()
            self._port.close()
            raise
        if failed is None:
            return None
        code = await asyncio.shield(self._exited)
        if failed.reason == _NO_REPORT:
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            failed = SpawnError(self.name, self.target, f"the worker process {how} before starting it")
        return failed

    def kill(self) -> None:
        if self.returncode is None and isinstance(self._popen, ZygoteChild):
            self._popen.kill()
        elif self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


#: Seconds ``Process.restart`` gives the worker, by default, to return its
#: state once asked (its ``timeout``): past it the worker is killed.
RESTART_TIMEOUT: Final = 10.0
#: Restart events a ``Process`` keeps for ``inspect`` (the latest ones).
RESTART_EVENTS_KEPT: Final = 8
#: When a worker that exited is started again (``Mesh.spawn(restart=...)``).
RestartWhen = Literal["never", "on-failure", "always"]
RESTART_WHEN: Final = typing.get_args(RestartWhen)


@dataclasses.dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a worker that exited is started again, and how fast
    (``Mesh.spawn(..., restart=RestartPolicy("on-failure", initial=0.5))``;
    ``restart="on-failure"`` is this with the defaults). The delay before a
    restart is ``initial`` doubled for each restart already made within the
    last ``window`` seconds, at most ``cap``; once ``max_restarts`` were made
    within ``window``, the next exit is final (one log line, and
    ``Process.error`` says why). A failed start (an error at import) counts
    as an exit."""

    #: "never", "on-failure" (an exit status other than 0, or a signal), "always"
    when: RestartWhen = "on-failure"
    #: seconds before the first restart
    initial: float = 0.1
    #: the longest delay between two restarts, in seconds
    cap: float = 30.0
    #: restarts allowed within ``window`` seconds
    max_restarts: int = 5
    window: float = 60.0

    def __post_init__(self) -> None:
        if self.when not in RESTART_WHEN:
            raise ValueError(f"restart must be one of {', '.join(RESTART_WHEN)}, got {self.when!r}")
        for what in ("initial", "cap", "window"):
            v = getattr(self, what)
            if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
                raise ValueError(f"RestartPolicy.{what} must be a finite number of seconds >= 0, got {v!r}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"RestartPolicy.max_restarts must be an int >= 0, got {self.max_restarts!r}")

    def restarts_after(self, code: int) -> bool:
        return self.when == "always" or (self.when == "on-failure" and code != 0)

    def delay(self, recent: int) -> float:
        """Seconds to wait before a restart, ``recent`` restarts made within the window."""
        return float(min(self.cap, self.initial * 2 ** min(recent, 64)))


def restart_policy(restart: str | RestartPolicy) -> RestartPolicy:
    """``spawn``'s ``restart`` argument as a policy (``ValueError`` for anything else)."""
    if isinstance(restart, RestartPolicy):
        return restart
    if not isinstance(restart, str):
        raise TypeError(
            f"restart takes {', '.join(map(repr, RESTART_WHEN))} or a RestartPolicy, got {restart!r}"
        )
    return RestartPolicy(typing.cast(RestartWhen, restart))


def _how_exited(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"


class Process:
    """A worker process in the mesh. ``await wait()`` gives its exit code.

    The object stays the same across restarts (``restart()``, or a restart
    policy given to ``spawn``): ``name`` and its entry in ``inspect`` stay,
    ``pid`` is the running incarnation's and ``restarts`` counts them."""

    def __init__(
        self,
        run: _Run,
        launch: Callable[[Any, bool], Awaitable[_Run]],
        arg: Any = None,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.name = run.name
        self.target = run.target
        #: stable across restarts: the entry of this worker in ``inspect``
        self.key = f"{run.name}-{run.pid}"
        #: how many times a successor took over (hand-overs and crash restarts)
        self.restarts = 0
        #: why the worker is gone: ``RemoteError`` (its function raised; also
        #: logged), ``RestartError`` (a restart failed, or crash restarts
        #: stopped at their limit), ``SpawnError`` (a successor did not start)
        self.error: MeshError | None = None
        #: the latest restarts, oldest first (at most ``RESTART_EVENTS_KEPT``)
        self.restart_events: collections.deque[dict[str, Any]] = collections.deque(maxlen=RESTART_EVENTS_KEPT)
        self._launch = launch
        self._arg = arg
        self._policy = policy if policy is not None else RestartPolicy("never")
        # loop times of the crash restarts within the policy's window
        self._recent: collections.deque[float] = collections.deque()
        self._stopping = False
        self._handing_over = False
        self._live = False  # the first start succeeded: exits may restart it
        self._restarting: asyncio.Task[None] | None = None
        self._last_code = 0  # the exit a restart after an exit follows
        loop = asyncio.get_running_loop()
        #: the exit after which no successor follows
        self._exited: asyncio.Future[int] = loop.create_future()
        self._run = run
        self._use(run)

    @property
    def pid(self) -> int:
        """The process id of the running incarnation (the last one, once exited)."""
        return self._run.pid

    @property
    def start_method(self) -> StartMethod:
        """How the running incarnation started: "zygote" (forked by the
        node's fork server) or "exec" (a fresh interpreter: ``start="exec"``,
        a system where forking is unsafe, or the zygote unavailable)."""
        return self._run.start_method

    @property
    def restarting(self) -> bool:
        """A restart is under way: a hand-over, or a restart after an exit
        (waiting out its delay, or its successor starting)."""
        return self._handing_over or self._restarting is not None

    @property
    def returncode(self) -> int | None:
        """The exit code once the worker is gone for good (no restart follows); else None."""
        return self._exited.result() if self._exited.done() else None

    def _use(self, run: _Run) -> None:
        self._run = run
        run.on_exit = self._run_exited
        if run._exited.done():
            self._run_exited(run, run._exited.result())

    def _event(self, kind: str, reason: str, delay: float = 0.0) -> None:
        self.restart_events.append(
            {"at": round(time.time(), 3), "kind": kind, "pid": self.pid, "reason": reason, "delay": delay}
        )

    def _run_exited(self, run: _Run, code: int) -> None:
        if run is not self._run or run._asked:
            return  # a predecessor's exit after its hand-over, or restart() decides
        if run.error is not None:
            self.error = run.error
        self._after_exit(code, _how_exited(code))

    async def _wait_started(self) -> None:
        """``spawn``: return once the function runs; else raise ``SpawnError``
        (no restart follows a failed first start)."""
        failed = await self._run._wait_started()
        if failed is not None:
            raise failed
        self._live = True

    def _after_exit(self, code: int, why: str) -> None:
        """The running incarnation is gone: start another (the policy) or stop here."""
        if self._stopping or not self._live or not self._policy.restarts_after(code):
            self._finish(code)
            return
        self._last_code = code
        task = asyncio.get_running_loop().create_task(self._restart_after_exit(code, why))
        # cancelled (kill, terminate, the mesh closing), even before it ran: that exit was the last
        task.add_done_callback(lambda t: self._finish(self._last_code) if t.cancelled() else None)
        self._restarting = task

    def _finish(self, code: int) -> None:
        if not self._exited.done():
            self._exited.set_result(code)

    async def _restart_after_exit(self, code: int, why: str) -> None:
        policy = self._policy
        loop = asyncio.get_running_loop()
        cause: BaseException | None = self.error
        try:
            while True:
                now = loop.time()
                while self._recent and now - self._recent[0] > policy.window:
                    self._recent.popleft()
                if len(self._recent) >= policy.max_restarts:
                    err = RestartError(
                        self.name,
                        f"stopped restarting after {len(self._recent)} restarts within "
                        f"{policy.window:g} s; the last one {why}",
                    )
                    err.__cause__ = cause
                    self.error = err
                    self._event("gave-up", why)
                    log.error("%s", err)  # the one line that says the loop stopped
                    self._finish(code)
                    return
                delay = policy.delay(len(self._recent))
                self._recent.append(now)
                await asyncio.sleep(delay)
                run = await self._launch(self._arg, False)
                failed = await run._wait_started()
                if failed is None:
                    self.restarts += 1
                    self._run = run
                    self._event("crash-restart", why, delay)
                    log.warning("worker %s %s; restarted as pid %d", self.name, why, run.pid)
                    self._restarting = None  # done: an exit from here on starts another
                    self._use(run)
                    return
                cause = failed
                code = self._last_code = run._exited.result()
                why = f"failed to start ({failed.reason})"
        except MeshError as exc:  # the mesh closed, or no credential for a successor
            self.error = exc
            self._finish(code)
        finally:
            if self._restarting is asyncio.current_task():
                self._restarting = None

    async def restart(self, *, timeout: float = RESTART_TIMEOUT) -> None:
        """Restart the worker into the code now on disk, handing its state over.

        The worker's ``await meshipc.restarting()`` returns; its function
        returns a value (its state: any message value, ports included) that
        comes here and starts the successor as ``function(value)``. Messages
        sent to the ports in it meanwhile wait in those ports and follow them:
        nothing is lost, duplicated or reordered. Returns once the successor
        runs (``pid`` is its, ``restarts`` one more). Raises ``RestartError``
        if the worker does not return within ``timeout`` seconds (it is
        killed; the ports it held fail), raises or exits instead, and
        ``SpawnError`` if the successor cannot start. The successor is
        started first: if it cannot import its function, the worker was not
        asked and runs on, untouched; if it fails once it has the state (the
        state does not match its function's annotation, say), the ports in
        the state end with it (their peers get ``PortFailed`` or
        ``ChannelClosed``, never a hang). After any other failure the worker
        is gone, unless its restart policy starts it again from its spawn
        argument.
        ``MeshError`` if it already exited or a restart is under way. The
        receivers in the state take their element types from the function's
        annotation (``async def worker(state: State)``), as a spawn argument
        does; once asked, the hand-over completes even if the caller is
        cancelled."""
        if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        if self._exited.done() or self._stopping:
            raise MeshError(f"worker {self.name!r} has exited: nothing to restart")
        if self._handing_over or self._restarting is not None:
            raise MeshError(f"worker {self.name!r} is restarting already")
        self._handing_over = True
        # once asked, the hand-over runs to its end even if the caller is
        # cancelled: the worker's state is on its way and must land somewhere
        task = asyncio.get_running_loop().create_task(self._hand_over(timeout))
        await asyncio.shield(task)

    async def _hand_over(self, timeout: float) -> None:
        run = self._run
        try:
            # the successor first, from the code on disk: it imports its
            # function while the worker still runs, and a successor that
            # cannot start leaves the worker running, untouched
            new = await self._launch(None, True)
            failed = await new._wait_ready()
            if failed is not None:
                self._event("restart-failed", f"the successor did not start ({failed.reason})")
                raise failed
            if run._exited.done():  # it exited meanwhile (that exit was handled as any)
                new._port.close()
                raise RestartError(self.name, "restart failed: the worker exited before it was asked")
            run._asked = True
            with contextlib.suppress(MeshError):  # gone already: its outcome says so below
                run._port.send(["restart"])
            try:
                async with asyncio.timeout(timeout):
                    handed, value = await asyncio.shield(run._handover)
            except TimeoutError:
                run.kill()
                handed, value = (
                    False,
                    (
                        f"it did not return its state within {timeout:g} s of restart() (restart's timeout),"
                        " so it was killed"
                    ),
                )
            if not handed:
                new._port.close()  # the successor it would have had exits
                code = await asyncio.shield(run._exited)
                err = RestartError(self.name, f"restart failed: {value}")
                err.__cause__ = run.error
                self._fail_restart(err, code, f"failed to restart: {value}")
                raise err
            # the predecessor exits once the ports it held have moved on
            try:
                new._port.send(value)
            except MeshError as exc:
                new.kill()
                failed = SpawnError(self.name, self.target, f"its state cannot be sent: {exc}")
            else:
                failed = await new._wait_started()
            if failed is not None:
                # the ports in the state fail with the reason, not a bare "node died"
                CODEC.dispose(value, str(failed))
                code = await asyncio.shield(new._exited)
                self._fail_restart(failed, code, f"its successor failed to start ({failed.reason})")
                raise failed
            self.restarts += 1
            self._run = new
            self._event("restart", "restart() with a hand-over")
            self._handing_over = False
            self._use(new)
            if self._stopping:  # the mesh closed meanwhile
                new._port.close()
        finally:
            self._handing_over = False

    def _fail_restart(self, err: MeshError, code: int, why: str) -> None:
        self.error = err
        self._handing_over = False
        self._event("restart-failed", why)
        self._after_exit(code, why)

    async def wait(self) -> int:
        """Wait for the worker to exit for good (no restart follows); its
        exit code (negative: killed by signal)."""
        return await asyncio.shield(self._exited)

    def _stop(self) -> None:
        self._stopping = True
        if self._restarting is not None:
            self._restarting.cancel()  # it settles the exit with the last code

    def kill(self) -> None:
        """SIGKILL the process (no-op once it has exited); no restart follows."""
        self._stop()
        self._run.kill()

    @property
    def logs(self) -> LogPump | None:
        """The running worker's forwarded logging (``None``: ``forward_logs=False``)."""
        return self._run.logs

    async def set_log_level(self, level: int | str, logger: str = "") -> None:
        """Set the level of the worker's logger ``logger`` (its root logger
        by default) to ``level`` (``logging.DEBUG``, or ``"debug"``); returns
        once the worker's next record obeys it. Raises ``ValueError`` for an
        unknown level, ``MeshError`` if the worker does not forward its logs
        (``forward_logs=False``) or has exited. A restarted worker starts
        again at the levels its code sets."""
        n = level_number(level)
        logs = self.logs
        if logs is None:
            raise MeshError(f"worker {self.name} was spawned with forward_logs=False")
        await logs.set_level(n, logger)

    def terminate(self) -> None:
        """Ask the worker to stop: its function is cancelled and it exits;
        no restart follows."""
        self._stop()
        self._run._port.close()

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


def start_zygote(zygote: Zygote) -> None:
    """Start ``zygote`` now, with a worker's interpreter and import path
    (``Mesh(zygote="eager")``). Raises ``ZygoteUnavailable``."""
    zygote.start(worker_command())


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
    restart: str | RestartPolicy = "never",
    forward_logs: bool = True,
    zygote: Zygote | None = None,
) -> Process:
    """Start the worker ``target`` (an async function, or
    ``"package.module:function"``; see ``target_of``) as a new node joined
    to ``node``, with the credential ``credential()`` issues and ``limits``
    on its ports; ``arg`` goes first on its bootstrap port (after the
    worker's log port, with ``forward_logs``: see ``_logs``). The worker
    (and each restart of it) is forked by ``zygote`` when given and
    usable, else exec'd (``_zygote``). With a
    ``restart`` policy other than "never", ``arg`` is kept to start the
    worker again: it must hold no port or fd (those go once, and failed with
    the worker that held them), else ``ValueError``. The caller waits for
    ``Process._run._wait_started()``."""
    target, name = check_target(target, name)
    policy = restart_policy(restart)
    if policy.when != "never" and walk_resources(arg):
        raise ValueError(
            "a worker restarted after an exit starts again from its spawn argument, which therefore "
            "holds no Port, Sender, Receiver or Fd (they move once, and fail with the worker that held "
            "them): pass plain data, and let the worker serve() or find its channels by name"
        )
    launch = functools.partial(_launch, node, credential, limits, target, name, forward_logs, zygote)
    return Process(await launch(arg, False), launch, arg if policy.when != "never" else None, policy)


async def _launch(
    node: Node,
    credential: Callable[[], Awaitable[Identity]],
    limits: Limits,
    target: str,
    name: str,
    forward_logs: bool,
    zygote: Zygote | None,
    arg: Any,
    handover: bool,
) -> _Run:
    """One worker process for ``target``. ``arg`` goes first on its
    bootstrap port; with ``handover`` nothing does: the child says "ready"
    once its function is imported, and the caller sends the argument then."""
    identity = await credential()
    if zygote is not None and zygote.usable and not PLATFORM.needs_parent_pipe:
        # a zygote that starts now imports first: before the worker's
        # handshake timer starts (``accept_via``)
        try:
            await zygote.ready(worker_command())
        except ZygoteUnavailable as exc:
            zygote.fallbacks += 1
            log.warning("worker %s: no zygote (%s): starting a fresh interpreter", name, exc)
            zygote = None
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
        handover=handover,
        logs=forward_logs,
    )
    parent_sock.setblocking(False)
    # expect the child on our end of the pair before any port names it
    node.accept_via(child_id, parent_sock)
    port = Port._wrap([node.engine.new_bound(pport, child_id, cport)])
    logs: LogPump | None = None
    try:
        if forward_logs:
            ours, theirs = Port.pair()
            logs = LogPump(ours, name)
            port.send(theirs)
        # encode the argument before a process exists: an unsendable value
        # raises here and leaves nothing behind
        if not handover:
            port.send(arg)
        popen = await _start_worker(zygote, inv, child_sock, pipe, name)
        # the credential once the process exists (a zygote has closed its copy
        # of the worker's socket by then: it never holds the key). A few
        # hundred bytes fit in the empty buffer (nothing is written to the
        # worker before it sends its HELLO, after reading this): no blocking.
        # A worker gone already is reported as any exit is (by _Run)
        with contextlib.suppress(OSError):
            parent_sock.sendall(identity.to_bytes())
    except BaseException:
        node.forget(child_id, "the worker process was not started")
        port.close()
        if logs is not None:
            logs.close()
        parent_sock.close()
        if pipe:
            os.close(pipe[1])
        raise
    finally:
        child_sock.close()
        if pipe:
            os.close(pipe[0])
    return _Run(popen, name, target, port, pipe[1] if pipe else -1, logs)


async def _start_worker(
    zygote: Zygote | None,
    inv: ChildInvitation,
    child_sock: socket.socket,
    pipe: tuple[int, int] | None,
    name: str,
) -> subprocess.Popen[bytes] | ZygoteChild:
    """The worker's process: forked by ``zygote`` (its invitation in the
    request), else a fresh interpreter (its invitation in its environment)."""
    payload = msgspec.msgpack.encode(inv)
    if zygote is not None and zygote.usable and pipe is None:
        try:
            return await zygote.fork(worker_command(), payload, child_sock.fileno())
        except ZygoteUnavailable as exc:
            zygote.fallbacks += 1
            log.warning("worker %s: the zygote cannot fork it (%s): starting a fresh interpreter", name, exc)
    env = dict(os.environ)
    env[ENV_INVITATION] = base64.b64encode(payload).decode()
    return subprocess.Popen(
        worker_command(),
        env=env,
        pass_fds=[child_sock.fileno(), *pipe[:1]] if pipe else [child_sock.fileno()],
        close_fds=True,
    )
