"""Entry point of a spawned worker: ``main`` for a fresh interpreter
(started by ``_process.worker_command``), ``zygote_main`` for the fork
server (``_zygote``) and the workers it forks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import os
import signal
import socket
import sys
import traceback
import typing
from collections.abc import Awaitable
from typing import Any

import msgspec

from ._channel import Port
from ._errors import ChannelClosed, MeshError, MessageError, PortFailed, remote_type_name
from ._handshake import CREDENTIAL_LEN, Identity
from ._join import join_parent, node_from_credential
from ._logs import forward
from ._loop import loading_script, run, want_uvloop
from ._mesh import Mesh
from ._platform import PLATFORM
from ._ports import Limits
from ._process import ENV_INVITATION, ChildInvitation, apply_receiver_types
from ._zygote import serve

log = logging.getLogger("meshipc")


#: Seconds a worker told to stop by SIGTERM (its parent died, or someone
#: sent it) gets to unwind; code that ignores cancellation cannot keep it
#: alive past this.
TERM_GRACE = 5


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the alarm ends the process
    signal.alarm(TERM_GRACE)
    sys.exit(143)


def _read_credential(sock: socket.socket, node: bytes) -> Identity:
    """Our credential: the first ``CREDENTIAL_LEN`` bytes the parent wrote
    on our socket, for the node id our invitation names."""
    sock.settimeout(30)
    buf = b""
    while len(buf) < CREDENTIAL_LEN:
        chunk = sock.recv(CREDENTIAL_LEN - len(buf))
        if not chunk:
            raise MeshError("the parent closed the bootstrap socket before sending our credential")
        buf += chunk
    sock.setblocking(False)
    identity = Identity.from_bytes(buf)
    if identity.node != node:
        raise MeshError("the parent sent a credential for another node")
    return identity


#: Exit status of a worker whose link to its parent broke (the parent died
#: or the connection failed) before its function finished.
EXIT_PARENT_LOST = 3


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def _find(target: str) -> Any:
    """The function ``module:function`` names (``/path/script.py:function``:
    the script loaded as ``__mp_main__``, its folder first on ``sys.path``
    as for ``python script.py``); raises whatever importing raises."""
    mod_name, func_name = target.rsplit(":", 1)
    if mod_name.startswith("/"):
        module = _load_script(mod_name)
    else:
        module = importlib.import_module(mod_name)
    try:
        return getattr(module, func_name)
    except AttributeError:
        raise AttributeError(f"module {mod_name!r} has no function {func_name!r}") from None


def _load_script(path: str) -> Any:
    # a source loader of its own: the script may have any name, ".py" or not
    loader = importlib.machinery.SourceFileLoader(_SCRIPT_MODULE, path)
    spec = importlib.util.spec_from_loader(_SCRIPT_MODULE, loader)
    if spec is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    module.__file__ = path
    sys.path.insert(0, os.path.dirname(path))
    sys.modules[_SCRIPT_MODULE] = module  # its functions pickle, its classes resolve, as multiprocessing's
    with loading_script(path):  # meshipc.run at its top level says the main guard is missing
        loader.exec_module(module)
    return module


#: The name a worker gives the parent's main script (as ``multiprocessing``).
_SCRIPT_MODULE = "__mp_main__"


def _call(target: str, func: Any, arg: Any) -> Awaitable[Any]:
    result = func(arg)
    if not inspect.isawaitable(result):
        raise TypeError(f"{target} returned {type(result).__name__}, not an awaitable (make it an async def)")
    return result


def _arg_type(func: Any) -> Any:
    """The annotation of ``func``'s first parameter, or ``Any``."""
    try:
        params = list(inspect.signature(func).parameters)
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable annotations: validate nothing
        return Any
    return hints.get(params[0], Any) if params else Any


async def _argument(port: Port, func: Any) -> Any:
    """The first message on ``port``: the function's argument, validated
    against its annotation. Raises ``MessageError`` for one that does not
    validate (a channel drops such a message and waits for the next: here
    none would come)."""
    while True:
        bad = port.bad_messages
        try:
            return port.try_recv()
        except asyncio.QueueEmpty:
            if port.bad_messages != bad:
                raise MessageError(
                    f"the argument does not match the annotation of {getattr(func, '__qualname__', func)} "
                    "(the worker logged why)"
                ) from None
            await port._wait()


#: Set in a spawned worker once its parent asks for a restart (``restarting``).
_restart_asked: asyncio.Event | None = None


async def restarting() -> None:
    """In a spawned worker: return once the parent asked for a restart
    (``Process.restart``). The worker's function then returns its state (any
    message value, ports included), and its successor, started from the code
    now on disk, runs ``function(state)``. Wait on it beside the worker's own
    work, e.g. ``asyncio.wait({work, asyncio.ensure_future(meshipc.restarting())},
    return_when=asyncio.FIRST_COMPLETED)``; ``recv()`` is safe to cancel (a
    message not returned stays queued and moves with its port). Raises
    ``MeshError`` in a process that is not a spawned worker."""
    event = _restart_asked
    if event is None:
        raise MeshError("meshipc.restarting() is for the function of a worker started by Mesh.spawn")
    await event.wait()


async def _forward_logs(inv: ChildInvitation, port: Port) -> bool:
    """Our ``logging`` records go to the parent on the port that comes
    first on the bootstrap port (``_logs``), from before the target is
    imported; False if the parent went away first."""
    try:
        logs = await port.recv()
    except (ChannelClosed, PortFailed) as exc:
        print(f"meshipc worker {inv.name}: no log port: {exc}", file=sys.stderr)
        return False
    if isinstance(logs, Port):
        handler = forward(logs)
        _background.add(asyncio.get_running_loop().create_task(handler.serve()))
    return True


#: Tasks the worker keeps referenced while it runs.
_background: set[asyncio.Task[Any]] = set()


async def _run(inv: ChildInvitation) -> int:
    global _restart_asked
    sock = socket.socket(fileno=inv.fd)
    identity = _read_credential(sock, inv.node)
    limits = Limits(*inv.limits) if inv.limits is not None else None
    node = node_from_credential(inv.directory, identity, limits)
    port = join_parent(node, inv.parent, sock, inv.port, inv.peer_port)
    async with Mesh._joined(node, inv.parent):
        if inv.logs and not await _forward_logs(inv, port):
            return 1
        try:
            func = _find(inv.target)
            # the argument is validated against the function's annotation (a
            # `rx: Receiver[int]` validates what later arrives on rx)
            port._set_type(_arg_type(func))
            if inv.handover:
                port.send(["ready"])  # a successor: the parent sends the state now
            try:
                arg = await _argument(port, func)
            except (ChannelClosed, PortFailed) as exc:
                if inv.handover and isinstance(exc, ChannelClosed):
                    return 0  # a successor whose restart was called off
                print(f"meshipc worker {inv.name}: no start message: {exc}", file=sys.stderr)
                return 1
            apply_receiver_types(arg, inv.arg_types)
            work: asyncio.Task[Any] = asyncio.ensure_future(_call(inv.target, func, arg))
        except Exception as exc:
            # reported once, to the parent, whose spawn() raises it
            port.send(["start_failed", type(exc).__qualname__, str(exc), _format(exc)])
            port.close()
            return 1
        port.send(["started"])
        port._set_type(Any)  # from now on the parent's requests, not the argument's type
        _restart_asked = asyncio.Event()
        # the bootstrap port says when the parent is gone, wants us to stop,
        # or asks for a restart (then the function's value is our state)
        watch = asyncio.ensure_future(port.recv())
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done and not watch.cancelled() and watch.exception() is None:
            if watch.result() == ["restart"]:
                _restart_asked.set()
                watch = asyncio.ensure_future(port.recv())
                done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            await asyncio.wait({work})  # let it unwind; its outcome no longer matters
            if not work.cancelled():
                work.exception()  # retrieved: asyncio would log it as never retrieved
            lost = watch.exception()
            if lost is None or isinstance(lost, ChannelClosed):
                return 0  # the parent asked us to stop
            # the link to the parent broke: nobody hears our outcome
            print(f"meshipc worker {inv.name}: lost the link to its parent: {lost}", file=sys.stderr)
            return EXIT_PARENT_LOST
        watch.cancel()
        err = work.exception()
        if err is None and _restart_asked.is_set():
            try:
                # the state goes to the parent, its ports with it (and what is
                # queued at them); closing the node lets them settle first
                port.send(["handover", work.result()])
                await node.settle()
                port.close()
                return 0
            except (MeshError, TypeError, ValueError) as exc:
                err = exc
        if err is not None:
            # the parent logs it, with this traceback: not printed here too
            port.send(["error", remote_type_name(type(err)), str(err), _format(err)])
            port.close()
            return 1
        port.send(["ok"])
        port.close()
        return 0


def main() -> None:
    raw = os.environ.pop(ENV_INVITATION, None)
    if raw is None:
        print("meshipc._child is started by Mesh.spawn, not by hand", file=sys.stderr)
        sys.exit(2)
    try:
        inv = msgspec.msgpack.decode(base64.b64decode(raw), type=ChildInvitation)
    except (ValueError, msgspec.DecodeError) as exc:
        print(f"meshipc worker: bad invitation: {exc}", file=sys.stderr)
        sys.exit(2)
    _start(inv)


def zygote_main(fd: int, parent: int) -> None:
    """The zygote (``_zygote``): serve fork requests on ``fd`` for the node
    ``parent``; in each forked child, run the worker it asked for."""
    with contextlib.suppress(MeshError):
        want_uvloop()  # imported here once, rather than in every worker
    spawned = serve(fd, parent)
    if spawned is None:
        sys.exit(0)  # the node is gone
    try:
        inv = msgspec.msgpack.decode(spawned.invitation, type=ChildInvitation)
    except (ValueError, msgspec.DecodeError) as exc:
        print(f"meshipc worker: bad invitation: {exc}", file=sys.stderr)
        sys.exit(2)
    _start(msgspec.structs.replace(inv, fd=spawned.fd), spawned.parent)


def _start(inv: ChildInvitation, parent: int | None = None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    # SIGTERM when the parent dies (the kernel on Linux; elsewhere a thread
    # that sees the parent's end of the watch pipe close)
    PLATFORM.die_with_parent(inv.watch_fd)
    if parent is not None and os.getppid() != parent:
        sys.exit(EXIT_PARENT_LOST)  # forked by a zygote that died before we watched it
    # Ctrl-C in a terminal reaches the whole process group: the parent decides
    # when its workers stop (it closes their bootstrap port on mesh exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(run(_run(inv)))


if __name__ == "__main__":
    main()
