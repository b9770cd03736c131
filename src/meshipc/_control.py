"""The control plane: services by name and the live inspect tree.

Every node of a mesh keeps one *session* with the mesh's root node (the one
that created the mesh directory), opened with an ordinary mesh message over
the node's authenticated link: the node sends one final message, ``Hello``,
to the well-known port id ``CONTROL_PORT`` of its inviter (its parent, for a
spawned worker). The engine hands a message to a port it does not hold to
``Engine.unknown_port`` with the sending node's id, which the link
authenticated: that id, never a claim inside a message, is who the session
is with. ``Hello`` carries the node's end of the session port and a
``Sender`` to its own control server. The root answers ``Welcome`` (a
``Sender`` to a registry channel of that session alone); any other node
answers ``Redirect`` (the root's id, which it learned the same way from its
own inviter) and the node says hello to the root. One session per node id:
a second hello from the same node is refused. The session port breaking
tells the root that the node is gone (its services go with it).

The root keeps the registry of services: a name maps to a ``Sender`` whose
receiver is on the serving node, and to the node of the session that
registered it. A client asks the root once (``Lookup``) and then calls the
service directly. Requests carry their deadline in an envelope (``_Req``);
the serving side checks it and unwraps it into a ``ServiceCall``.

``inspect`` asks the root, which answers for the mesh and fans out to the
nodes in parallel, each answering for its own subtree, with a timeout: a
node that does not answer in time shows as ``{"$unresolved": reason}``.
Counters are ``{"$counter": n}``; subtrees cut by ``depth`` are
``{"$more": number of entries}``.

The work one client can make a service or the root do is bounded
(``ControlLimits``): calls a service runs at once, per client and in all;
inspect requests in progress, per client and in all; the timeouts and
deadlines a server grants. Timeouts are checked on both sides: the API
raises ``ValueError`` for a NaN, infinite or negative one; a server answers
a malformed one from a peer with ``ValueError``/``MessageError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect as _inspect
import logging
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, cast

import msgspec

from ._channel import Call, Port, Receiver, Sender, channel
from ._codec import decode
from ._errors import (
    ChannelClosed,
    HandshakeError,
    MeshError,
    MessageError,
    NodeFailure,
    PortFailed,
    RemoteError,
    ServiceBusy,
    ServiceNameInUse,
    ServiceNotFound,
)
from ._handshake import ROLE_WORKER, Identity
from ._ids import PortId
from ._ports import Message
from ._tasks import TaskSet, answer_within
from ._wire import K_REPLY

if TYPE_CHECKING:
    from ._mesh import Mesh

log = logging.getLogger("meshipc")

#: Seconds a node gets to open its control session (hello, maybe a redirect, welcome).
SESSION_TIMEOUT: Final = 10.0
#: Services of dead nodes remembered (to answer NodeFailure, not "unknown").
MAX_TOMBSTONES: Final = 256
#: Seconds after joining that a node starts its session with the root
#: (at once if it uses the control plane first).
SESSION_DELAY: Final = 0.05
#: Seconds a handler runs before a task starts watching for its caller to give up.
WATCH_AFTER: Final = 0.05
#: Seconds an inspect request waits for the root beyond its own timeout
#: (which bounds the root's fan-out to the nodes).
ROOT_GRACE: Final = 2.0
#: The port id at which every node's control plane takes a ``Hello``: never
#: a random port id (those are 16 random bytes), never held by an engine.
CONTROL_PORT: Final = b"meshipc:control\x00"
#: Hellos a node that is not the root holds while its own session opens (it
#: redirects them once it knows the root); more are refused. A node's
#: invitees say hello once each: this is many more than a node invites at once.
MAX_PENDING_REDIRECTS: Final = 64
#: A service name: 1-128 letters, digits, ``.``, ``_``, ``-``, ``:``, ``@``
#: or ``+``, not starting with punctuation but ``_`` (printable and shell-safe;
#: no ``/``, which separates inspect paths). Checked by ``serve`` and by the root.
SERVICE_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@+-]{0,127}")
MAX_SERVICE_NAME: Final = 128
#: Longest inspect path, type name, process name or role a peer may send (characters).
MAX_INSPECT_PATH: Final = 1024
_MAX_LABEL: Final = 256
#: Bytes of a service's withdrawal token.
_TOKEN_LEN: Final = 16


@dataclass(frozen=True)
class ControlLimits:
    """Bounds on the work one client (one node) can make the control plane
    do, so that no client can starve the others or grow a node without
    bound. ``Mesh(control_limits=...)`` sets them for that node's services
    and, on the mesh's first node, for the root.

    A *client* is the node a call or request came from (its link's
    authenticated id). Raises ``ValueError`` for a bound below 1.
    """

    #: Handler calls one service runs at once (one task each). Beyond it the
    #: service stops reading its receiver: calls wait in its port queue and
    #: flow control pushes back on callers (``drain()`` waits, ``BufferFull``
    #: at the hard limit). 256: far above the concurrency a handler usually
    #: has a use for, far below the 50,000 tasks one client could start.
    service_calls: int = 256
    #: Handler calls of one client one service runs at once; its further calls
    #: wait, in order, in a queue of that client's (others are not held up by
    #: it). 32: one client cannot take more than an eighth of ``service_calls``.
    client_calls: int = 32
    #: Calls of one client waiting beyond ``client_calls`` in one service;
    #: further calls of that client are refused at once with ``ServiceBusy``
    #: (each waiting call holds its request: about a kilobyte).
    client_queued: int = 1024
    #: Inspect and update requests of one client in progress on the root.
    #: Beyond it the root stops reading that client's registry channel (its
    #: requests wait; flow control pushes back). 4: a tool rarely needs more.
    client_inspects: int = 4
    #: Inspect and update requests in progress on the root from all clients;
    #: beyond it a request is refused at once with ``ServiceBusy``. Each one
    #: asks every node: 64 bounds the fan-out to 64 requests per node.
    total_inspects: int = 64
    #: Longest inspect/update timeout the root and each node grant, seconds
    #: (a longer one is cut to it): nobody holds a request for an hour.
    max_inspect_timeout: float = 60.0
    #: Farthest call deadline a service grants, seconds from now (a farther
    #: one is cut to it). A call without a deadline has none.
    max_call_timeout: float = 24 * 3600.0

    def __post_init__(self) -> None:
        for f in ("service_calls", "client_calls", "client_queued", "client_inspects", "total_inspects"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ControlLimits.{f} must be an int >= 1, got {v!r}")
        for f in ("max_inspect_timeout", "max_call_timeout"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"ControlLimits.{f} must be a finite number > 0, got {v!r}")


DEFAULT_CONTROL_LIMITS: Final = ControlLimits()


def check_timeout(timeout: Any, what: str = "timeout") -> float:
    """``timeout`` as seconds; ``ValueError`` unless a finite number >= 0
    (NaN, infinities, negatives, booleans and non-numbers are refused)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"{what} must be a number of seconds, got {type(timeout).__name__}")
    try:
        t = float(timeout)
    except OverflowError:
        raise ValueError(f"{what} is out of range") from None
    if not 0.0 <= t < math.inf:  # also refuses NaN
        raise ValueError(f"{what} must be finite and >= 0, got {timeout!r}")
    return t


def check_service_name(name: Any) -> str:
    """``name`` if it is a valid service name, else ``ValueError``."""
    if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
        shown = repr(name[:40]) + "..." if isinstance(name, str) and len(name) > 40 else repr(name)
        raise ValueError(
            f"a service name is 1-{MAX_SERVICE_NAME} letters, digits, '.', '_', '-', ':', '@' or '+' "
            f"(not starting with punctuation other than '_'), got {shown}"
        )
    return name


# ------------------------------------------------------------------ messages

_ServiceName = Annotated[str, msgspec.Meta(pattern=f"^{SERVICE_NAME.pattern}$")]
_Label = Annotated[str, msgspec.Meta(max_length=_MAX_LABEL)]
_Path = Annotated[str, msgspec.Meta(max_length=MAX_INSPECT_PATH)]
_Token = Annotated[bytes, msgspec.Meta(max_length=_TOKEN_LEN)]
_NodeId = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]


class _Req(msgspec.Struct, array_like=True, tag="meshipc.req"):
    """A service request with its deadline (``time.monotonic()`` seconds)."""

    deadline: float | None
    request: Any


class Hello(msgspec.Struct, tag=True):
    """A node's first message to its inviter's ``CONTROL_PORT`` (final: the
    port it left goes with it). Who it comes from is the link's business."""

    session: Port
    ctl: Sender[Any]
    pid: int
    uid: int
    role: _Label
    name: _Label
    started: float


class Welcome(msgspec.Struct, tag=True):
    registry: Sender[Any]


class Redirect(msgspec.Struct, tag=True):
    """From a node that is not the root: say hello to ``root`` instead."""

    root: _NodeId


SessionMsg = Welcome | Redirect


class Register(msgspec.Struct, tag=True):
    name: _ServiceName
    token: _Token
    sender: Sender[Any]
    request_type: _Label | None = None
    reply_type: _Label | None = None


class Unregister(msgspec.Struct, tag=True):
    name: _ServiceName
    token: _Token


class Lookup(msgspec.Struct, tag=True):
    name: _ServiceName


class ListServices(msgspec.Struct, tag=True):
    pass


class Mint(msgspec.Struct, tag=True):
    """A worker asks the root for a new worker's credential (to spawn one):
    the root draws the id; only a node whose certificate says "worker" gets
    one."""


class InspectMesh(msgspec.Struct, tag=True):
    path: _Path = ""
    depth: int | None = None
    timeout: float = 1.0
    sensitive: bool = False


class UpdateMesh(msgspec.Struct, tag=True):
    path: _Path
    value: Any
    timeout: float = 1.0


RegistryMsg = Register | Unregister | Lookup | ListServices | Mint | InspectMesh | UpdateMesh


class InspectNode(msgspec.Struct, tag=True):
    path: _Path = ""
    depth: int | None = None
    sensitive: bool = False
    timeout: float = 1.0


class UpdateNode(msgspec.Struct, tag=True):
    name: _Label
    value: Any


NodeMsg = InspectNode | UpdateNode


# ------------------------------------------------------------------ tree helpers


def counter(n: int) -> dict[str, int]:
    """An inspect value that only grows: clients may show it as a rate."""
    return {"$counter": n}


async def _answer(call: Call[Any], work: Any) -> None:
    """Answer an inspect call with what ``work`` returns: a missing entry
    becomes ``LookupError`` at the caller, any other error ``RemoteError``."""
    try:
        result = await work
    except KeyError as exc:
        with contextlib.suppress(ChannelClosed):
            call.fail(LookupError(f"no inspect entry {exc.args[0]!r}"))
        return
    except Exception as exc:
        with contextlib.suppress(ChannelClosed):
            call.fail(exc)
        return
    with contextlib.suppress(ChannelClosed):
        call.reply(result)


def _split(path: str) -> list[str]:
    return [p for p in path.strip("/").split("/") if p]


def _prune(value: Any, depth: int | None) -> Any:
    """``value`` with dict nesting cut after ``depth`` levels."""
    if depth is None or not isinstance(value, dict) or not value or _is_leaf(value):
        return value
    if depth <= 0:
        return {"$more": len(value)}
    return {k: _prune(v, depth - 1) for k, v in value.items()}


def _is_leaf(value: dict[str, Any]) -> bool:
    return len(value) == 1 and next(iter(value)) in ("$counter", "$unresolved", "$more")


def _select(tree: Any, parts: list[str]) -> Any:
    for i, p in enumerate(parts):
        if not isinstance(tree, dict) or _is_leaf(tree):
            raise KeyError("/".join(parts[: i + 1]))
        if p in tree:
            tree = tree[p]
            continue
        matches = [k for k in tree if isinstance(k, str) and k.startswith(p)]
        if len(matches) != 1:
            raise KeyError("/".join(parts[: i + 1]))
        tree = tree[matches[0]]
    return tree


def _jsonable(value: Any, _depth: int = 0) -> Any:
    """Plain data only: anything else becomes its repr (never a handle)."""
    if _depth > 32:
        return "..."
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, _depth + 1) for v in value]
    if isinstance(value, msgspec.Struct):
        return _jsonable(msgspec.structs.asdict(value), _depth + 1)
    return repr(value)


def _type_name(tp: Any) -> str | None:
    if tp is None:
        return None
    return getattr(tp, "__name__", None) or repr(tp)


def _accept_objects(tp: Any, obj: Any) -> Any:
    origin = getattr(tp, "__origin__", None) or tp
    if isinstance(origin, type) and isinstance(obj, origin):
        return obj
    raise msgspec.ValidationError(f"Expected `{getattr(origin, '__name__', origin)}`")


def _why(exc: BaseException) -> str:
    """The cause of a failure, once: a ``NodeFailure``'s own reason (its text
    already names the node, which the caller names again)."""
    if isinstance(exc, NodeFailure):
        return exc.reason
    if isinstance(exc, PortFailed):
        return exc.cause
    return str(exc) or type(exc).__name__


def _sender_dead(s: Sender[Any]) -> bool:
    states = s._states
    return not states or states[0].peer_closed or states[0].error is not None


# ------------------------------------------------------------------ services


class ServiceCall(Call[Any]):
    """A ``meshipc.Call`` made through a named service: also ``deadline``
    (``time.monotonic()`` seconds, or None; the clock is system-wide on
    Linux) and ``remaining`` (seconds left, or None)."""

    __slots__ = ("deadline",)

    def __init__(self, request: Any, port: Port, deadline: float | None) -> None:
        super().__init__(request, port)
        self.deadline = deadline

    @property
    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class ServiceSender(Sender[Any]):
    """A ``Sender`` to a named service (from ``open``): ``call`` also takes
    ``timeout``, and the callee sees the deadline. Sent to another process,
    it arrives as a plain ``Sender`` (its calls carry no deadline)."""

    __slots__ = ()

    async def call(self, request: Any, *, timeout: float | None = None) -> Any:
        """As ``Sender.call``; ``TimeoutError`` after ``timeout`` seconds,
        ``ValueError`` for a NaN, infinite or negative ``timeout``,
        ``ServiceBusy`` if the service refused the call (this client has
        too many waiting there)."""
        if timeout is None:
            return await _busy_call(super().call(_Req(None, request)))
        timeout = check_timeout(timeout)
        async with answer_within(timeout, "the service"):
            return await _busy_call(super().call(_Req(time.monotonic() + timeout, request)))


async def _busy_call(work: Awaitable[Any]) -> Any:
    """``await work``, a service's ``ServiceBusy`` refusal raised as itself."""
    try:
        return await work
    except RemoteError as exc:
        if exc.type_name == "ServiceBusy":
            raise ServiceBusy(exc.message.removeprefix("busy: ")) from None
        raise


def _caller(call: Call[Any]) -> bytes:
    """The node a call came from: its reply port's peer (for a call from
    another node, the link's authenticated id that sent it)."""
    states = call._port._states
    return states[0].peer_node if states else b""


class Service:
    """A registered service (from ``mesh.serve``).

    ``await service`` returns once the mesh's registry has confirmed the
    name (raises ``ServiceNameInUse`` if another node holds it);
    ``close()`` withdraws it; ``await wait_closed()`` waits for that."""

    def __init__(
        self,
        control: Control,
        name: str,
        handler: Callable[[Any], Awaitable[Any]] | None,
        target: Sender[Any] | None,
        request_type: Any,
        reply_type: Any,
    ) -> None:
        self.name = name
        self._control = control
        self._handler = handler
        self._target = target  # Receiver mode: feeds the application's receiver
        self.request_type = request_type
        self.reply_type = reply_type
        self.token = os.urandom(16)
        self._tx, self._rx = channel()
        loop = asyncio.get_running_loop()
        self._registered: asyncio.Future[None] = loop.create_future()
        self._registered.add_done_callback(_consume)
        self._done: asyncio.Future[None] = loop.create_future()
        self._tasks = TaskSet(loop)
        self._active: dict[int, float] = {}
        self._limits = control.limits
        # handler calls running, in all and per client; calls of a client at
        # its bound wait in its queue (see ControlLimits)
        self._running = 0
        self._per_client: dict[bytes, int] = {}
        self._waiting: dict[bytes, deque[ServiceCall]] = {}
        self._slot: asyncio.Future[None] | None = None
        self.refused = 0
        self.calls = 0
        self.errors = 0
        self.closed = False
        self._pump = loop.create_task(self._run())

    def __await__(self) -> Any:
        return asyncio.shield(self._registered).__await__()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)

    def close(self) -> None:
        """Withdraw the service (idempotent); calls in progress are cancelled."""
        if self.closed:
            return
        self.closed = True
        self._pump.cancel()
        self._tasks.cancel_all()
        for q in self._waiting.values():
            for sc in q:
                sc._port.close()  # the caller learns the call was dropped
        self._waiting.clear()
        self._rx.close()
        self._tx.close()
        if self._target is not None:
            self._target.close()
        if not self._registered.done():
            self._registered.set_exception(MeshError(f"service {self.name!r} was closed"))
        if not self._done.done():
            self._done.set_result(None)
        self._control._service_closed(self)

    def _unwrap(self, call: Call[Any]) -> ServiceCall | None:
        """The ``ServiceCall`` of a call, or None once it was failed: a
        deadline that is not a finite number (a peer's doing) or a request
        of the wrong type. A deadline is cut to ``max_call_timeout`` from now."""
        req = call.request
        deadline: Any = None
        if isinstance(req, _Req):
            deadline, req = req.deadline, req.request
        elif isinstance(req, list) and len(req) == 3 and req[0] == "meshipc.req":
            deadline, req = req[1], req[2]
        if deadline is not None:
            try:
                deadline = float(deadline) if not isinstance(deadline, bool) else math.nan
            except (TypeError, ValueError, OverflowError):
                deadline = math.nan
            if not math.isfinite(deadline):
                self.errors += 1
                with contextlib.suppress(ChannelClosed):
                    call.fail(
                        MessageError(f"service {self.name!r}: the call's deadline is not a finite time")
                    )
                return None
            deadline = min(deadline, time.monotonic() + self._limits.max_call_timeout)
        sc = ServiceCall(req, call._port, deadline)
        if self.request_type is not None:
            try:
                sc.request = msgspec.convert(req, self.request_type, dec_hook=_accept_objects)
            except (msgspec.ValidationError, TypeError) as exc:
                self.errors += 1
                sc.fail(MessageError(f"service {self.name!r}: invalid request: {exc}"))
                return None
        return sc

    async def _run(self) -> None:
        limits = self._limits
        async for call in self._rx:
            if not isinstance(call, Call):
                continue
            self.calls += 1
            sc = self._unwrap(call)
            if sc is None:
                continue
            if self._target is not None:
                try:
                    self._target.send(sc)
                except ChannelClosed:
                    self.close()
                    return
                except MeshError as exc:  # e.g. the application stopped draining (BufferFull)
                    self.errors += 1
                    with contextlib.suppress(ChannelClosed):
                        sc.fail(exc)
                continue
            self._admit(_caller(call), sc)
            while self._running >= limits.service_calls:
                # stop reading: further calls wait in the port's queue, and
                # flow control pushes back on their callers
                self._slot = asyncio.get_running_loop().create_future()
                await self._slot

    def _admit(self, client: bytes, sc: ServiceCall) -> None:
        """Run ``sc`` now, queue it behind its client's running calls, or
        refuse it (``ServiceBusy``) when that queue is full."""
        if self._per_client.get(client, 0) < self._limits.client_calls:
            self._running += 1
            self._per_client[client] = self._per_client.get(client, 0) + 1
            self._tasks.spawn(self._handle(sc, client))
            return
        q = self._waiting.setdefault(client, deque())
        if len(q) >= self._limits.client_queued:
            self.refused += 1
            with contextlib.suppress(ChannelClosed):
                sc.fail(
                    ServiceBusy(
                        f"service {self.name!r} already has {self._limits.client_calls} calls running "
                        f"and {len(q)} waiting from this client"
                    )
                )
            return
        q.append(sc)

    def _call_done(self, client: bytes) -> None:
        """A call of ``client`` ended: its next waiting call takes the slot."""
        q = self._waiting.get(client)
        while q:
            sc = q.popleft()
            if not q:
                del self._waiting[client]
            if sc.cancelled:
                sc._port.close()
                continue
            self._tasks.spawn(self._handle(sc, client))
            return
        self._waiting.pop(client, None)
        self._running -= 1
        n = self._per_client.get(client, 1) - 1
        if n > 0:
            self._per_client[client] = n
        else:
            self._per_client.pop(client, None)
        slot = self._slot
        if slot is not None and not slot.done():
            slot.set_result(None)

    async def _handle(self, call: ServiceCall, client: bytes) -> None:
        key = id(call)
        self._active[key] = time.monotonic()
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        # most calls end quickly: a task that watches the caller is started
        # only for a call still running after WATCH_AFTER seconds
        watcher: list[asyncio.Task[None]] = []
        timer = loop.call_later(WATCH_AFTER, self._watch_caller, call, me, watcher)
        try:
            result = await self._invoke(call)
        except asyncio.CancelledError:
            if self.closed or call.cancelled:
                return  # the caller gave up (or the service closed): nobody to answer
            raise
        except Exception as exc:
            self.errors += 1
            with contextlib.suppress(ChannelClosed):
                call.fail(exc)
        else:
            with contextlib.suppress(ChannelClosed):
                call.reply(result)
        finally:
            timer.cancel()
            for t in watcher:
                t.cancel()
            self._active.pop(key, None)
            if not self.closed:
                self._call_done(client)

    def _watch_caller(
        self, call: ServiceCall, work: asyncio.Task[Any] | None, watcher: list[asyncio.Task[None]]
    ) -> None:
        async def watch() -> None:
            await call.wait_cancelled()
            if work is not None and not work.done():
                work.cancel()  # the caller gave up: stop working for it

        watcher.append(asyncio.get_running_loop().create_task(watch()))

    async def _invoke(self, call: ServiceCall) -> Any:
        handler = self._handler
        if handler is None:
            raise MeshError("this service has no handler")
        if call.deadline is not None:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout_at(loop.time() + (call.deadline - time.monotonic())):
                result = await handler(call.request)
        else:
            result = await handler(call.request)
        if self.reply_type is not None:
            try:
                result = msgspec.convert(
                    result, self.reply_type, dec_hook=_accept_objects, from_attributes=True
                )
            except (msgspec.ValidationError, TypeError) as exc:
                raise MessageError(f"service {self.name!r}: invalid reply: {exc}") from None
        return result

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "request_type": _type_name(self.request_type),
            "reply_type": _type_name(self.reply_type),
            "mode": "receiver" if self._target is not None else "handler",
            "calls": counter(self.calls),
            "errors": counter(self.errors),
            "active": len(self._active) if self._target is None else None,
            "waiting": sum(map(len, self._waiting.values())),
            "unread": self._rx.statistics().queued,
            "refused": counter(self.refused),
            "oldest_active_age": round(now - min(self._active.values()), 6) if self._active else None,
        }

    def __repr__(self) -> str:
        return f"<Service {self.name!r}{' closed' if self.closed else ''}>"


def _close_hello(hello: Hello) -> None:
    hello.session.close()
    hello.ctl.close()


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # marked retrieved: a failure is logged where it happens


class _Entry:
    __slots__ = ("node", "reply_type", "request_type", "sender", "since", "token")

    def __init__(self, r: Register, node: bytes) -> None:
        self.node = node  # the session's node: never a claim in the message
        self.sender = r.sender
        self.token = r.token
        self.request_type = r.request_type
        self.reply_type = r.reply_type
        self.since = time.time()


@dataclass(frozen=True)
class ControlStatistics:
    """A snapshot of a node's control plane (``Mesh.control_statistics()``).
    On nodes other than the root, only ``services_here`` is filled."""

    #: nodes with a session open with the root (hex ids; not the root's own)
    sessions: tuple[str, ...]
    #: inspect and update requests the root is running, in all and per session
    inspects: int
    inspects_by_session: dict[str, int]
    #: the registry: service name -> node serving it (hex id)
    registry: dict[str, str]
    #: services this node serves
    services_here: tuple[str, ...]


class _Session:
    """The root's view of one node: its session port, its hello, and the
    registry channel that is its alone (so every request on it is that node's)."""

    __slots__ = ("hello", "inspects", "port", "registry", "slot", "task")

    def __init__(self, hello: Hello, registry: Receiver[Any]) -> None:
        self.port = hello.session
        self.hello = hello
        self.registry = registry
        self.task: asyncio.Task[None] | None = None
        self.inspects = 0  # inspect/update requests in progress
        self.slot: asyncio.Future[None] | None = None  # set when one ends


# ------------------------------------------------------------------ the control object


class Control:
    """The control plane of one ``Mesh`` (one node)."""

    def __init__(
        self, mesh: Mesh, root: bool, inviter: bytes | None = None, limits: ControlLimits | None = None
    ) -> None:
        self.mesh = mesh
        self.node = mesh._node
        self.root = root
        self.limits = limits if limits is not None else DEFAULT_CONTROL_LIMITS
        self.loop = self.node.loop
        self.started = time.time()
        self._t0 = time.monotonic()
        self.closed = False
        self.role = "service" if root else "worker"
        self._tasks = TaskSet(self.loop)
        self._services: dict[str, Service] = {}
        self._app: dict[str, tuple[Callable[[], Any], bool, Callable[[Any], Any] | None]] = {}
        # the node's own control server (inspect requests from the root)
        self._ctl_tx, self._ctl_rx = channel(NodeMsg)
        self._node_answers = 0
        self._node_slot: asyncio.Future[None] | None = None
        self._tasks.spawn(self._serve_node())
        # root: registry and sessions; others: the session
        self._inviter = inviter
        self._root_id: bytes | None = bytes(self.node.id) if root else None
        self._registry: Sender[Any] | None = None
        self._ready: asyncio.Future[None] = self.loop.create_future()
        self._ready.add_done_callback(_consume)
        self._session_port: Port | None = None
        self._gate = asyncio.Event()
        self._gate.set()
        self._clients: dict[bytes, _Session] = {}
        self._inspects = 0  # inspect/update requests in progress on the root, from all clients
        self._services_reg: dict[str, _Entry] = {}
        self._tombstones: dict[str, tuple[str, str]] = {}
        self._senders: dict[str, ServiceSender] = {}
        self._redirects: list[Hello] = []
        self._session_task: asyncio.Task[None] | None = None
        self._session_timer: asyncio.TimerHandle | None = None
        self.node.engine.unknown_port = self._on_control_port
        if root:
            self._ready.set_result(None)
        else:
            # not at once: a node's first messages (a worker's first reply, a
            # client's first call) should not queue behind the session setup
            self._session_timer = self.loop.call_later(SESSION_DELAY, self._start_session)

    def _start_session(self) -> None:
        """Start the session with the root now, if not yet started."""
        if self._session_timer is not None:
            self._session_timer.cancel()
            self._session_timer = None
        if self._session_task is None and not self.closed and not self.root:
            self._session_task = self._tasks.spawn(self._session())

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._t0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.node.engine.unknown_port == self._on_control_port:
            self.node.engine.unknown_port = None
        if self._session_timer is not None:
            self._session_timer.cancel()
        for svc in list(self._services.values()):
            svc.close()
        self._tasks.cancel_all()
        for s in self._clients.values():
            s.port.close()
            s.registry.close()
        self._clients.clear()
        self._refuse_redirects()
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()
        for e in self._services_reg.values():
            e.sender.close()
        self._services_reg.clear()
        if self._session_port is not None:
            self._session_port.close()
        if self._registry is not None:
            self._registry.close()
        self._ctl_rx.close()
        self._ctl_tx.close()
        if not self._ready.done():
            self._ready.set_exception(MeshError("the mesh is closed"))

    # -------------------------------------------------------------- the control port (every node)

    def _on_control_port(self, src: bytes, port: bytes, seq: int, msg: Message) -> bool:
        """The engine's ``unknown_port`` hook: a ``Hello`` from node ``src``
        (authenticated by its link) opens its session (root) or is
        redirected to the root (any other node). Anything else is dropped."""
        if port != CONTROL_PORT or self.closed:
            return False
        if seq != 1 or msg.kind != K_REPLY:
            log.info("node %s: dropped a malformed control hello from node %s", self.node.id, src.hex()[:12])
            return False
        try:
            hello = decode(msg, Hello)  # closes what the message carried if it is malformed
        except MessageError as exc:
            log.info(
                "node %s: dropped a malformed control hello from node %s: %s",
                self.node.id,
                src.hex()[:12],
                exc,
            )
            return True
        if self.root:
            self._open_session(src, hello)
        else:
            self._redirect(hello)
        return True

    def _redirect(self, hello: Hello) -> None:
        if self._root_id is not None:
            with contextlib.suppress(MeshError):
                hello.session.send(Redirect(self._root_id))
            _close_hello(hello)
            return
        if len(self._redirects) >= MAX_PENDING_REDIRECTS:
            _close_hello(hello)  # refused: the newcomer's session says so
            return
        self._redirects.append(hello)
        self._start_session()

    def _refuse_redirects(self) -> None:
        for hello in self._redirects:
            _close_hello(hello)
        self._redirects.clear()

    # -------------------------------------------------------------- session (non-root)

    def joining(self) -> None:
        """``join`` is handshaking with its inviter: saying hello now would
        start a second connection to it that could beat the invitation's own
        (and be refused as a duplicate). The session waits for ``joined()``."""
        self.role = "client"
        self._gate.clear()

    def joined(self) -> None:
        self._gate.set()

    async def _session(self) -> None:
        try:
            if self._inviter is None:
                raise MeshError("this node knows no inviter to ask for the mesh root")
            async with asyncio.timeout(SESSION_TIMEOUT):
                await self._gate.wait()
                target = self._inviter
                while True:
                    port = self._say_hello(target)
                    self._session_port = port
                    try:
                        answer = await port.recv()
                    except ChannelClosed:
                        raise MeshError("the mesh root refused a control session") from None
                    if isinstance(answer, Welcome):
                        break
                    port.close()
                    self._session_port = None
                    # one redirect, from our inviter, to another node: no loops
                    if target != self._inviter or answer.root in (target, bytes(self.node.id)):
                        raise MeshError("the mesh root sent no welcome")
                    target = answer.root
        except (OSError, TimeoutError, MeshError) as exc:
            log.debug("node %s: no control session with the mesh root: %s", self.node.id, exc)
            if not self._ready.done():
                self._ready.set_exception(MeshError(f"no control plane: the mesh root did not answer: {exc}"))
            self._refuse_redirects()
            return
        self._root_id = target
        self._registry = answer.registry
        self._ready.set_result(None)
        for hello in self._redirects:
            self._redirect(hello)
        self._redirects.clear()
        try:
            while True:
                await port.recv()
        except MeshError as exc:
            log.debug("node %s: control session ended: %s", self.node.id, exc)

    def _say_hello(self, target: bytes) -> Port:
        """Send ``Hello`` to ``target``'s control port; our session end."""
        engine = self.node.engine
        mine, theirs = engine.new_pair()
        hello = Hello(
            Port._wrap([theirs]),
            self._ctl_tx.clone(),
            os.getpid(),
            os.getuid(),
            self.role,
            _process_name()[:_MAX_LABEL],
            self.started,
        )
        st = engine.new_bound(bytes(PortId.random()), target, CONTROL_PORT)
        engine.send_final(st, K_REPLY, hello)  # one message; the port goes with it
        return Port._wrap([mine], SessionMsg)

    # -------------------------------------------------------------- sessions (root)

    def _open_session(self, peer: bytes, hello: Hello) -> None:
        if peer in self._clients or peer == bytes(self.node.id):
            log.warning("node %s: refused a second control session of node %s", self.node.id, peer.hex()[:12])
            _close_hello(hello)
            return
        tx, rx = channel(RegistryMsg)
        s = _Session(hello, rx)
        self._clients[peer] = s
        try:
            s.port.send(Welcome(tx))
        except MeshError:
            pass  # the session port is already gone: _run_session sees it
        s.task = self._tasks.spawn(self._run_session(peer, s))

    async def _run_session(self, peer: bytes, s: _Session) -> None:
        reason: str | None = None
        registry = self._tasks.spawn(self._serve_registry(peer, s))
        try:
            while True:
                await s.port.recv()
        except ChannelClosed:
            pass
        except PortFailed as exc:
            reason = _why(exc)
        except MeshError as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            registry.cancel()
            if self._clients.get(peer) is s:
                del self._clients[peer]
            _close_hello(s.hello)
            s.registry.close()
            self._node_gone(peer, reason)

    def _node_gone(self, peer: bytes, reason: str | None) -> None:
        for name, e in list(self._services_reg.items()):
            if e.node == peer:
                del self._services_reg[name]
                e.sender.close()
                if reason is not None:
                    self._tombstones[name] = (peer.hex(), reason)
                    while len(self._tombstones) > MAX_TOMBSTONES:
                        del self._tombstones[next(iter(self._tombstones))]

    # -------------------------------------------------------------- registry (root)

    async def _serve_registry(self, peer: bytes, s: _Session) -> None:
        """The registry channel of node ``peer``'s session: every request on
        it is that node's. Inspect requests are bounded per node (the channel
        is not read meanwhile) and in all (refused with ``ServiceBusy``)."""
        limits = self.limits
        async for msg in s.registry:
            if isinstance(msg, Call):
                req = msg.request
                if isinstance(req, (InspectMesh, UpdateMesh)):
                    if self._inspects >= limits.total_inspects:
                        with contextlib.suppress(ChannelClosed):
                            msg.fail(
                                ServiceBusy(
                                    f"the mesh root has {self._inspects} inspect requests in progress"
                                )
                            )
                        continue
                    s.inspects += 1
                    self._inspects += 1
                    self._tasks.spawn(self._answer_inspect(msg, req, s))
                    while s.inspects >= limits.client_inspects:
                        s.slot = self.loop.create_future()
                        await s.slot
                    continue
                try:
                    msg.reply(self._registry_op(req, peer))
                except ChannelClosed:
                    pass
                except (MeshError, ValueError) as exc:
                    with contextlib.suppress(ChannelClosed):
                        msg.fail(exc)
            elif isinstance(msg, Unregister):
                self._registry_op(msg, peer)

    def _registry_op(self, req: Any, node: bytes) -> Any:
        """One registry request of ``node`` (the root's own, or the session's)."""
        if isinstance(req, Register):
            check_service_name(req.name)
            cur = self._services_reg.get(req.name)
            if cur is not None:
                req.sender.close()
                return {"error": "in_use", "node": cur.node.hex()}
            self._services_reg[req.name] = _Entry(req, node)
            self._tombstones.pop(req.name, None)
            return {"ok": True}
        if isinstance(req, Unregister):
            cur = self._services_reg.get(req.name)
            if cur is not None and cur.node == node and cur.token == req.token:
                del self._services_reg[req.name]
                cur.sender.close()
            return {"ok": True}
        if isinstance(req, Lookup):
            e = self._services_reg.get(req.name)
            if e is not None:
                if not _sender_dead(e.sender):
                    return {"status": "ok", "sender": e.sender.clone()}
                err = e.sender._states[0].error if e.sender._states else None
                if err is not None:  # its node died; the session has not noticed yet
                    return {"status": "failed", "node": e.node.hex(), "reason": _why(err)}
            dead = self._tombstones.get(req.name)
            if dead is not None:
                return {"status": "failed", "node": dead[0], "reason": dead[1]}
            return {"status": "unknown"}
        if isinstance(req, ListServices):
            return self._service_list()
        if isinstance(req, Mint):
            cert = self.node.peer_certificate(node)
            if cert is None or cert.role != ROLE_WORKER:
                return {"error": "only a worker may ask for a worker's credential"}
            return {"credential": self.mesh._admit(ROLE_WORKER).to_bytes()}
        raise MeshError(f"unknown registry request {type(req).__name__}")

    def _service_list(self) -> dict[str, Any]:
        return {
            name: {
                "node": e.node.hex(),
                "request_type": e.request_type,
                "reply_type": e.reply_type,
                "since": e.since,
            }
            for name, e in sorted(self._services_reg.items())
        }

    async def _ask_root(self, req: InspectMesh | UpdateMesh, timeout: float, silent: str) -> Any:
        """An inspect request to the root, which bounds its own fan-out by
        ``timeout``; ``ROOT_GRACE`` more covers the root itself (then
        ``MeshError(silent ...)``). A missing entry is a ``LookupError``;
        the root at its bound raises ``ServiceBusy``."""
        try:
            async with asyncio.timeout(timeout + ROOT_GRACE):
                return await _busy_call(self._registry_call(req))
        except TimeoutError:
            raise MeshError(f"{silent} within {timeout + ROOT_GRACE:.1f} s") from None
        except RemoteError as exc:
            if exc.type_name in ("LookupError", "KeyError"):
                raise LookupError(exc.message) from None
            raise

    async def mint(self) -> Identity:
        """A credential for a new worker, issued by the root (this node is a
        worker: it holds no key that issues one). ``MeshError`` if the root
        refuses or sends something that is not a credential of this mesh."""
        result = await self._registry_call(Mint())
        cred = result.get("credential") if isinstance(result, dict) else None
        if not isinstance(cred, bytes):
            why = result.get("error") if isinstance(result, dict) else None
            raise MeshError(f"the mesh root issued no credential: {why or 'no answer'}")
        try:
            identity = Identity.from_bytes(cred)
        except HandshakeError as exc:
            raise MeshError(f"the mesh root sent a bad credential: {exc}") from None
        if identity.authority_key != self.node.identity.authority_key or identity.role != ROLE_WORKER:
            raise MeshError("the mesh root sent a credential that is not a worker's of this mesh")
        return identity

    async def _registry_call(self, req: Any) -> Any:
        if self.closed:
            raise MeshError("the mesh is closed")
        if self.root:
            if isinstance(req, InspectMesh):
                return await self._inspect_mesh(req)
            if isinstance(req, UpdateMesh):
                return await self._update_mesh(req)
            return self._registry_op(req, bytes(self.node.id))
        self._start_session()
        await asyncio.shield(self._ready)
        if self._registry is None:
            raise MeshError("no control plane")
        return await self._registry.call(req)

    # -------------------------------------------------------------- serving

    def serve(
        self,
        name: str,
        handler: Callable[[Any], Awaitable[Any]] | Receiver[Any],
        request_type: Any = None,
        reply_type: Any = None,
    ) -> Service:
        if self.closed:
            raise MeshError("the mesh is closed")
        check_service_name(name)
        if name in self._services:
            raise ServiceNameInUse(name, self.node.id.hex())
        target: Sender[Any] | None = None
        fn: Callable[[Any], Awaitable[Any]] | None = None
        if isinstance(handler, Receiver):
            if not handler._states:
                raise ChannelClosed("serve() was given a closed receiver")
            if getattr(handler, "_calls_only", False):
                # a Call[T] receiver takes only calls; ours arrive as local
                # ServiceCall objects (with the deadline), validated against T here
                if request_type is None and handler._type is not Any:
                    request_type = handler._type
                handler._calls_only = False
            ftx, frx = channel()
            for st in frx._detach():
                handler._add(st)  # calls arrive on the application's receiver
            target = ftx
        elif callable(handler):
            fn = handler
        else:
            raise TypeError("serve() takes an async function or a Receiver of meshipc.Call")
        svc = Service(self, name, fn, target, request_type, reply_type)
        reg = Register(
            name,
            svc.token,
            svc._tx.clone(),
            _type_name(request_type),
            _type_name(reply_type),
        )
        if self.root:
            result = self._registry_op(reg, bytes(self.node.id))
            if "error" in result:
                svc.close()
                raise ServiceNameInUse(name, result["node"])
            svc._registered.set_result(None)
        else:
            self._tasks.spawn(self._register(svc, reg))
        self._services[name] = svc
        return svc

    async def _register(self, svc: Service, reg: Register) -> None:
        try:
            result = await self._registry_call(reg)
        except MeshError as exc:
            if not svc._registered.done():
                svc._registered.set_exception(exc)
            log.warning("service %r could not be registered: %s", svc.name, exc)
            return
        if isinstance(result, dict) and "error" in result:
            err = ServiceNameInUse(svc.name, str(result.get("node", "")))
            if not svc._registered.done():
                svc._registered.set_exception(err)
            log.warning("%s", err)
            svc.close()
            return
        if not svc._registered.done():
            svc._registered.set_result(None)

    def _service_closed(self, svc: Service) -> None:
        if self._services.get(svc.name) is svc:
            del self._services[svc.name]
        if self.closed:
            return
        if self.root:
            self._registry_op(Unregister(svc.name, svc.token), bytes(self.node.id))
        elif self._registry is not None:
            with contextlib.suppress(MeshError):
                self._registry.send(Unregister(svc.name, svc.token))

    # -------------------------------------------------------------- client side

    async def services(self) -> dict[str, Any]:
        result = await self._registry_call(ListServices())
        return dict(result)

    async def open(self, service: str) -> ServiceSender:
        if not isinstance(service, str) or not SERVICE_NAME.fullmatch(service):
            raise ServiceNotFound(service if isinstance(service, str) else repr(service))
        result = await self._registry_call(Lookup(service))
        status = result.get("status") if isinstance(result, dict) else None
        if status == "ok":
            sender = result["sender"]
            if isinstance(sender, Sender):
                return cast(ServiceSender, ServiceSender._wrap(sender._detach()))
        if status == "failed":
            raise NodeFailure(str(result["node"]), f"{result['reason']} (service {service!r} was on it)")
        raise ServiceNotFound(service)

    async def call(self, service: str, request: Any, timeout: float | None = None) -> Any:
        if timeout is None:
            return await self._call(service, request, None)
        timeout = check_timeout(timeout)
        # the timeout covers finding the service too
        deadline = time.monotonic() + timeout
        async with answer_within(timeout, f"service {service!r}"):
            return await self._call(service, request, deadline)

    async def _call(self, service: str, request: Any, deadline: float | None) -> Any:
        sender = self._senders.get(service)
        if sender is None or _sender_dead(sender):
            if sender is not None:
                sender.close()
                del self._senders[service]
            sender = await self.open(service)
            if service in self._senders:  # another task opened it meanwhile
                sender.close()
                sender = self._senders[service]
            else:
                self._senders[service] = sender
        return await _busy_call(Sender.call(sender, _Req(deadline, request)))

    # -------------------------------------------------------------- inspect

    def inspect_add(
        self,
        name: str,
        fn: Callable[[], Any],
        sensitive: bool = False,
        update: Callable[[Any], Any] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("$"):
            raise ValueError("an inspect entry name is a non-empty string without '/' or a leading '$'")
        if name in _BUILTIN_KEYS or name in self._app:
            raise ValueError(f"inspect entry {name!r} already exists")
        if not callable(fn) or (update is not None and not callable(update)):
            raise TypeError("inspect_add() takes a function returning plain data (or awaiting it)")
        self._app[name] = (fn, sensitive, update)

    async def inspect_update(self, path: str, value: Any, timeout: float = 1.0) -> Any:
        timeout = min(check_timeout(timeout), self.limits.max_inspect_timeout)
        req = UpdateMesh(path, value, timeout)
        return await self._ask_root(req, timeout, f"no answer to the update of {path!r}")

    async def _update_mesh(self, req: UpdateMesh) -> Any:
        parts = _split(req.path)
        if len(parts) != 3 or parts[0] != "nodes":
            raise LookupError(f"{req.path!r} is not an updatable entry (nodes/<node id>/<entry>)")
        me = bytes(self.node.id).hex()
        sessions = {p.hex(): s for p, s in self._clients.items() if s.hello is not None}
        matches = [n for n in (me, *sessions) if n.startswith(parts[1])]
        if len(matches) != 1:
            raise LookupError(f"no node {parts[1]!r} in this mesh")
        msg = UpdateNode(parts[2], req.value)
        if matches[0] == me:
            return await self._update_node(msg)
        hello = sessions[matches[0]].hello
        if hello is None:
            raise LookupError(f"node {parts[1]!r} has not said hello")
        try:
            async with asyncio.timeout(req.timeout):
                return await hello.ctl.call(msg)
        except TimeoutError:
            raise MeshError(f"node {parts[1]} did not answer within {req.timeout:g} s") from None
        except RemoteError as exc:
            if exc.type_name == "LookupError":
                raise LookupError(exc.message) from None
            raise

    async def _update_node(self, req: UpdateNode) -> Any:
        entry = self._app.get(req.name)
        if entry is None or entry[2] is None:
            raise LookupError(f"no updatable inspect entry {req.name!r}")
        fn, _, update = entry
        done = update(req.value) if update is not None else None
        if _inspect.isawaitable(done):
            await done
        value = fn()
        if _inspect.isawaitable(value):
            value = await value
        return _jsonable(value)

    async def inspect(
        self, path: str = "", depth: int | None = None, timeout: float = 1.0, sensitive: bool = False
    ) -> Any:
        timeout = min(check_timeout(timeout), self.limits.max_inspect_timeout)
        req = InspectMesh(path, depth, timeout, sensitive)
        if self.root:
            try:
                return await self._inspect_mesh(req)
            except KeyError as exc:
                raise LookupError(f"no inspect entry {exc.args[0]!r}") from None
        return await self._ask_root(req, timeout, "the mesh root did not answer inspect")

    async def _answer_inspect(self, call: Call[Any], req: InspectMesh | UpdateMesh, s: _Session) -> None:
        """Answer a session's inspect or update request; the request's
        timeout (a peer's number) is checked and cut to ``max_inspect_timeout``."""
        try:
            timeout = self._granted(call, req.timeout)
            if timeout is None:
                return
            if isinstance(req, UpdateMesh):
                await _answer(call, self._update_mesh(msgspec.structs.replace(req, timeout=timeout)))
            else:
                await _answer(call, self._inspect_mesh(msgspec.structs.replace(req, timeout=timeout)))
        finally:
            s.inspects -= 1
            self._inspects -= 1
            if s.slot is not None and not s.slot.done():
                s.slot.set_result(None)

    async def _inspect_mesh(self, req: InspectMesh) -> Any:
        parts = _split(req.path)
        depth = req.depth
        sessions = {peer: s for peer, s in self._clients.items() if s.hello is not None}
        node_ids = [bytes(self.node.id).hex(), *(p.hex() for p in sessions)]
        tree: dict[str, Any] = {
            "mesh": {
                "name": self.mesh.name,
                "directory": os.fspath(self.node.directory),
                "root": bytes(self.node.id).hex(),
                "pid": os.getpid(),
                "uid": os.getuid(),
                "executable": sys.executable,
                "started": self.started,
                "uptime": round(self.uptime, 3),
                "nodes": len(node_ids),
            },
            "services": self._service_list(),
            "nodes": {},
        }
        # which nodes to ask, and for what part of their subtree
        want: list[str] = node_ids
        sub_parts: list[str] = []
        if parts and parts[0] == "nodes" and len(parts) > 1:
            matches = [n for n in node_ids if n.startswith(parts[1])]
            if len(matches) != 1:
                raise KeyError("/".join(parts[:2]))
            want = matches
            sub_parts = parts[2:]
        elif parts and parts[0] != "nodes":
            want = []
        # depth below the node level: root(0) -> nodes(1) -> <id>(2) -> ...
        if parts[:1] == ["nodes"] and len(parts) > 1:
            node_depth = depth
        elif depth is None:
            node_depth = None
        else:
            node_depth = depth - (2 - len(parts))
        nodes: dict[str, Any] = tree["nodes"]
        if node_depth is not None and node_depth < 0:
            for n in want:
                nodes[n] = {"$more": 0}
            want = []

        async def ask(n: str) -> Any:
            sub = "/".join(sub_parts)
            ask_node = InspectNode(sub, node_depth, req.sensitive, req.timeout)
            if n == node_ids[0]:
                try:
                    async with asyncio.timeout(req.timeout):
                        return await self._inspect_node(ask_node)
                except TimeoutError:
                    return {"$unresolved": f"no answer within {req.timeout:g} s"}
            hello = sessions[bytes.fromhex(n)].hello
            if hello is None:
                return {"$unresolved": "the node has not said hello"}
            try:
                async with asyncio.timeout(req.timeout):
                    return await hello.ctl.call(ask_node)
            except TimeoutError:
                return {"$unresolved": f"no answer within {req.timeout:g} s"}
            except MeshError as exc:
                return {"$unresolved": str(exc)}

        results = await asyncio.gather(*(ask(n) for n in want))
        for n, r in zip(want, results, strict=True):
            nodes[n] = r
        self._name_workers(nodes, sessions)
        if parts:
            if parts[0] == "nodes" and len(parts) > 1:
                out = nodes[want[0]]
                return out  # already cut to the node's path and depth
            return _prune(_select(tree, parts), depth)
        return _prune(tree, depth)

    def _name_workers(self, nodes: dict[str, Any], sessions: dict[bytes, _Session]) -> None:
        """Workers know no name of their own: their parent's list has it."""
        names: dict[int, str] = {p.pid: p.name for p in self.mesh._children}
        for info in nodes.values():
            if isinstance(info, dict) and isinstance(info.get("workers"), dict):
                for w in info["workers"].values():
                    if isinstance(w, dict) and isinstance(w.get("pid"), int):
                        names[w["pid"]] = str(w.get("name"))
        for peer, s in sessions.items():
            info = nodes.get(peer.hex())
            if isinstance(info, dict) and s.hello is not None and "$unresolved" in info:
                # what the root knows without an answer
                info.update(
                    id=peer.hex(),
                    pid=s.hello.pid,
                    uid=s.hello.uid,
                    role=s.hello.role,
                    name=names.get(s.hello.pid, s.hello.name),
                )
            elif isinstance(info, dict) and info.get("pid") in names:
                info["name"] = names[info["pid"]]

    async def _serve_node(self) -> None:
        """The root's inspect requests to this node: at most
        ``total_inspects`` at once (the channel is not read meanwhile)."""
        async for call in self._ctl_rx:
            if isinstance(call, Call):
                self._node_answers += 1
                self._tasks.spawn(self._answer_node(call))
                while self._node_answers >= self.limits.total_inspects:
                    self._node_slot = self.loop.create_future()
                    await self._node_slot

    async def _answer_node(self, call: Call[Any]) -> None:
        try:
            await self._answer_node_now(call)
        finally:
            self._node_answers -= 1
            if self._node_slot is not None and not self._node_slot.done():
                self._node_slot.set_result(None)

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(
            tuple(p.hex() for p in self._clients),
            self._inspects,
            {p.hex(): s.inspects for p, s in self._clients.items()},
            {name: e.node.hex() for name, e in self._services_reg.items()},
            tuple(self._services),
        )

    def _granted(self, call: Call[Any], timeout: Any) -> float | None:
        """The timeout an inspect request from a peer gets: its own, checked
        (finite, not negative) and cut to ``max_inspect_timeout``; None once
        the call was failed for a bad one."""
        try:
            return min(check_timeout(timeout), self.limits.max_inspect_timeout)
        except ValueError as exc:
            with contextlib.suppress(ChannelClosed):
                call.fail(exc)
            return None

    async def _answer_node_now(self, call: Call[Any]) -> None:
        req = call.request
        if isinstance(req, UpdateNode):
            await _answer(call, self._update_node(req))
            return
        timeout = self._granted(call, req.timeout)
        if timeout is None:
            return
        await _answer(call, self._inspect_node(msgspec.structs.replace(req, timeout=timeout)))

    async def _inspect_node(self, req: InspectNode) -> Any:
        parts = _split(req.path)
        section: str | None = None
        if parts:
            keys = [*_BUILTIN_KEYS, *self._app]
            matches = [k for k in keys if k == parts[0]] or [k for k in keys if k.startswith(parts[0])]
            if len(matches) == 1:
                section = matches[0]
        tree = self.node_tree(section)
        for name, (fn, sensitive, _) in self._app.items():
            if parts and parts[0] != name:
                continue
            if sensitive and not req.sensitive:
                tree[name] = "<sensitive: ask with sensitive=True>"
                continue
            try:
                value = fn()
                if _inspect.isawaitable(value):
                    # one slow entry must not cost the node its whole answer
                    value = await asyncio.wait_for(value, req.timeout * 0.8)
                tree[name] = _jsonable(value)
            except TimeoutError:
                tree[name] = {"$unresolved": f"no answer within {req.timeout * 0.8:g} s"}
            except Exception as exc:
                tree[name] = {"$unresolved": f"{type(exc).__name__}: {exc}"}
        return _prune(_select(tree, parts), req.depth)

    def node_tree(self, section: str | None = None) -> dict[str, Any]:
        """This node's inspect subtree; with ``section``, only that entry is
        computed among the costly ones (a request for ``services`` does not
        walk every port: each request costs what it shows)."""
        node = self.node
        mesh = self.mesh
        costly: dict[str, Callable[[], Any]] = {
            "connections": self._connection_stats,
            "ports": self._port_stats,
            "services": lambda: {name: s.snapshot() for name, s in sorted(self._services.items())},
            "workers": lambda: {
                f"{p.name}-{p.pid}": {
                    "name": p.name,
                    "pid": p.pid,
                    "state": "running" if p.returncode is None else "exited",
                    "returncode": p.returncode,
                }
                for p in mesh._children
            },
            "tasks": lambda: {"total": len(asyncio.all_tasks(self.loop))},
        }
        tree: dict[str, Any] = {
            "id": bytes(node.id).hex(),
            "pid": os.getpid(),
            "uid": os.getuid(),
            "name": mesh.name if self.root and mesh.name else _process_name(),
            "role": self.role,
            "uptime": round(self.uptime, 3),
        }
        for key, fn in costly.items():
            if section is None or section == key:
                tree[key] = fn()
        tree["rejected"] = counter(node.rejected)
        tree["attached"] = counter(node.attached)
        return tree

    def _connection_stats(self) -> dict[str, Any]:
        return {
            peer.hex(): {
                "bytes_in": counter(c.bytes_in),
                "bytes_out": counter(c.bytes_out),
                "messages_in": counter(c.frames_in),
                "messages_out": counter(c.frames_out),
                "writes": counter(c.writes),
                "queued_bytes": c.queued_bytes,
            }
            for peer, c in list(self.node.links.items())
        }

    def _port_stats(self) -> dict[str, Any]:
        """One walk over this node's ports."""
        node = self.node
        s = node.engine.stats()
        by_peer: dict[str, int] = {}
        for peer, n in s.by_peer.items():
            where = "local" if peer == node.id else bytes(peer).hex()
            by_peer[where] = by_peer.get(where, 0) + n
        return {
            "total": s.total,
            "by_state": dict(s.by_state),
            "by_peer": by_peer,
            "queued_messages": s.queued_messages,
            "queued_bytes": s.queued_bytes,
            "unconsumed_out_messages": s.in_flight_messages,
            "unconsumed_out_bytes": s.in_flight_bytes,
        }


_BUILTIN_KEYS = frozenset(
    (
        "id",
        "pid",
        "uid",
        "name",
        "role",
        "uptime",
        "connections",
        "ports",
        "services",
        "workers",
        "tasks",
        "rejected",
        "attached",
    )
)


def _process_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
