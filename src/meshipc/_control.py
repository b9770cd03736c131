"""The control plane of one node: ``Control``, the client session with the
mesh root and the glue between the pieces, and ``ControlPlane``, the methods
every holder of a node shows (``Mesh``, ``Attachment``; ``sync`` wraps the
same list). The pieces, in import order: ``_control_msgs`` (bounds and
typed records), ``_inspect`` (the inspect tree, a node's own subtree),
``_service`` (the service runtime), ``_registry`` (the root's registry and
sessions). ``Control`` is handed a ``Node`` and plain values, never the
``Mesh`` that composes it.

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
own inviter) and the node says hello to the root. A node says hello only
once told that its link to its inviter is up (``start_session()``): a
second connection to the inviter could beat the joining one. One session
per node id: a second hello from the same node is refused. The session port breaking
tells the root that the node is gone (its services go with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast, overload

import msgspec

from ._channel import Port, Receiver, Sender
from ._codec import decode
from ._control_msgs import (
    CONTROL_PORT,
    DEFAULT_CONTROL_LIMITS,
    MAX_LABEL,
    MAX_PENDING_REDIRECTS,
    ROOT_GRACE,
    SERVICE_NAME,
    SESSION_DELAY,
    SESSION_TIMEOUT,
    ControlLimits,
    ControlStatistics,
    Credential,
    Done,
    Found,
    Gone,
    Hello,
    InspectMesh,
    ListServices,
    Lookup,
    LookupReply,
    Mint,
    MintReply,
    NameInUse,
    NotFound,
    Redirect,
    Refused,
    Register,
    RegisterReply,
    ServiceList,
    SessionMsg,
    Unregister,
    UpdateMesh,
    Welcome,
    WorkerStatus,
    accept_objects,
    as_reply,
    check_service_name,
    check_timeout,
)
from ._errors import (
    ChannelClosed,
    HandshakeError,
    MeshError,
    MessageError,
    NodeFailure,
    RemoteError,
    ServiceNameInUse,
    ServiceNotFound,
)
from ._handshake import ROLE_CLIENT, ROLE_ROOT, ROLE_WORKER, Identity
from ._ids import PortId
from ._inspect import NodeInspector, process_name
from ._ports import Message
from ._registry import Registry, close_hello
from ._service import Service, ServiceSender, busy_call, call_service, consume, sender_dead, split_handler
from ._tasks import TaskSet, answer_within
from ._wire import K_REPLY

if TYPE_CHECKING:
    from ._node import Node

R = TypeVar("R")
#: Said with a registration's failure, for code that did not await ``serve``.
_AWAIT_IT: Final = " (`await mesh.serve(...)` raises this where it is called)"

log = logging.getLogger("meshipc")

#: What a node's inspect subtree and its hello call its role.
_ROLES: Final = {ROLE_ROOT: "service", ROLE_WORKER: "worker", ROLE_CLIENT: "client"}


class Control:
    """The control plane of one node. ``root``: this node is the mesh's
    first (it keeps the registry); else ``inviter`` is the node it asks for
    the root, once ``start_session()`` says the link to it is up.
    ``name`` is the mesh's name (the root's subtree shows it); ``workers()``
    lists this node's workers; ``admit()`` mints a new worker's credential
    (the root's authority; None elsewhere)."""

    def __init__(
        self,
        node: Node,
        *,
        root: bool,
        inviter: bytes | None = None,
        limits: ControlLimits | None = None,
        name: str | None = None,
        workers: Callable[[], Iterable[WorkerStatus]] = tuple,
        admit: Callable[[], Identity] | None = None,
    ) -> None:
        self.node = node
        self.root = root
        self.limits = limits if limits is not None else DEFAULT_CONTROL_LIMITS
        self.loop = node.loop
        self.closed = False
        self._tasks = TaskSet(self.loop)
        self._services: dict[str, Service] = {}
        #: this node's inspect subtree and its answers to the root
        self.inspector = NodeInspector(
            node,
            role=_ROLES.get(node.identity.role, "worker"),
            name=name if root else None,
            limits=self.limits,
            workers=workers,
            services=lambda: {n: s.snapshot() for n, s in sorted(self._services.items())},
        )
        #: the registry and the sessions (on the root only)
        self.registry: Registry | None = None
        if root:
            self.registry = Registry(
                node, limits=self.limits, inspector=self.inspector, name=name, admit=admit
            )
        # the session with the root (other nodes)
        self._inviter = inviter
        self._root_id: bytes | None = bytes(node.id) if root else None
        self._registry: Sender[Any] | None = None
        self._ready: asyncio.Future[None] = self.loop.create_future()
        self._ready.add_done_callback(consume)
        self._session_port: Port | None = None
        self._linked = asyncio.Event()
        self._senders: dict[str, ServiceSender] = {}
        self._redirects: list[Hello] = []
        self._session_task: asyncio.Task[None] | None = None
        self._session_timer: asyncio.TimerHandle | None = None
        node.engine.unknown_port = self._on_control_port
        if root:
            self._ready.set_result(None)

    @property
    def role(self) -> str:
        return self.inspector.role

    def start_session(self) -> None:
        """This node's link to its inviter is up (or is made before the loop
        runs again): say hello ``SESSION_DELAY`` from now (a node's first
        messages should not queue behind the session setup), or at once when
        the control plane is first used. Until then, a use of the control
        plane waits for it (within ``SESSION_TIMEOUT``). Idempotent; nothing
        to do on the root."""
        if self.root or self.closed or self._linked.is_set():
            return
        self._linked.set()
        if self._session_task is None:
            self._session_timer = self.loop.call_later(SESSION_DELAY, self._begin)

    def _begin(self) -> None:
        """Start the session with the root now, if not yet started (it says
        hello once ``start_session()`` was called)."""
        if self._session_timer is not None:
            self._session_timer.cancel()
            self._session_timer = None
        if self._session_task is None and not self.closed and not self.root:
            self._session_task = self._tasks.spawn(self._session())

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
        if self.registry is not None:
            self.registry.close()
        self._refuse_redirects()
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()
        if self._session_port is not None:
            self._session_port.close()
        if self._registry is not None:
            self._registry.close()
        self.inspector.close()
        if not self._ready.done():
            self._ready.set_exception(MeshError("the mesh is closed"))

    def statistics(self) -> ControlStatistics:
        if self.registry is None:
            return ControlStatistics((), 0, {}, {}, tuple(self._services))
        return self.registry.statistics(tuple(self._services))

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
        if self.registry is not None:
            self.registry.open_session(src, hello)
        else:
            self._redirect(hello)
        return True

    def _redirect(self, hello: Hello) -> None:
        if self._root_id is not None:
            with contextlib.suppress(MeshError):
                hello.session.send(Redirect(self._root_id))
            close_hello(hello)
            return
        if len(self._redirects) >= MAX_PENDING_REDIRECTS:
            close_hello(hello)  # refused: the newcomer's session says so
            return
        self._redirects.append(hello)
        self._begin()

    def _refuse_redirects(self) -> None:
        for hello in self._redirects:
            close_hello(hello)
        self._redirects.clear()

    # -------------------------------------------------------------- session (non-root)

    async def _session(self) -> None:
        try:
            if self._inviter is None:
                raise MeshError("this node knows no inviter to ask for the mesh root")
            async with asyncio.timeout(SESSION_TIMEOUT):
                await self._linked.wait()
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
            self.inspector.sender(),
            os.getpid(),
            os.getuid(),
            self.role,
            process_name()[:MAX_LABEL],
            self.inspector.started,
        )
        st = engine.new_bound(bytes(PortId.random()), target, CONTROL_PORT)
        engine.send_final(st, K_REPLY, hello)  # one message; the port goes with it
        return Port._wrap([mine], SessionMsg)

    # -------------------------------------------------------------- the registry, from here

    async def _ask_root(self, req: InspectMesh | UpdateMesh, timeout: float, silent: str) -> Any:
        """An inspect request to the root, which bounds its own fan-out by
        ``timeout``; ``ROOT_GRACE`` more covers the root itself (then
        ``MeshError(silent ...)``). A missing entry is a ``LookupError``;
        the root at its bound raises ``ServiceBusy``."""
        try:
            async with asyncio.timeout(timeout + ROOT_GRACE):
                return await busy_call(self._registry_call(req))
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
        reply: Credential | Refused = as_reply(await self._registry_call(Mint()), MintReply, "credential")
        if isinstance(reply, Refused):
            raise MeshError(f"the mesh root issued no credential: {reply.reason}")
        try:
            identity = Identity.from_bytes(reply.credential)
        except HandshakeError as exc:
            raise MeshError(f"the mesh root sent a bad credential: {exc}") from None
        if identity.authority_key != self.node.identity.authority_key or identity.role != ROLE_WORKER:
            raise MeshError("the mesh root sent a credential that is not a worker's of this mesh")
        return identity

    async def _registry_call(self, req: Any) -> Any:
        if self.closed:
            raise MeshError("the mesh is closed")
        if self.registry is not None:
            if isinstance(req, InspectMesh):
                return await self.registry.inspect_mesh(req)
            if isinstance(req, UpdateMesh):
                return await self.registry.update_mesh(req)
            return self.registry.op(req, bytes(self.node.id))
        self._begin()
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
        fn, target, request_type, reply_type = split_handler(handler, request_type, reply_type)
        svc = Service(
            name, fn, target, request_type, reply_type, limits=self.limits, on_close=self._service_closed
        )
        reg = svc.registration()
        if self.registry is not None:
            if isinstance(taken := self.registry.op(reg, bytes(self.node.id)), NameInUse):
                svc.close()
                raise ServiceNameInUse(name, taken.node)
            svc._registered.set_result(None)
        else:
            self._tasks.spawn(self._register(svc, reg))
        self._services[name] = svc
        return svc

    async def _register(self, svc: Service, reg: Register) -> None:
        try:
            reply: Done | NameInUse = as_reply(await self._registry_call(reg), RegisterReply, "registration")
        except MeshError as exc:
            if not svc._registered.done():
                svc._registered.set_exception(exc)
            log.error("service %r could not be registered: %s%s", svc.name, exc, _AWAIT_IT)
            return
        if isinstance(reply, NameInUse):
            err = ServiceNameInUse(svc.name, reply.node)
            if not svc._registered.done():
                svc._registered.set_exception(err)
            log.error("%s%s", err, _AWAIT_IT)
            svc.close()
            return
        if not svc._registered.done():
            svc._registered.set_result(None)

    def _service_closed(self, svc: Service) -> None:
        if self._services.get(svc.name) is svc:
            del self._services[svc.name]
        if self.closed:
            return
        if self.registry is not None:
            self.registry.op(Unregister(svc.name, svc.token), bytes(self.node.id))
        elif self._registry is not None:
            with contextlib.suppress(MeshError):
                self._registry.send(Unregister(svc.name, svc.token))

    # -------------------------------------------------------------- client side

    async def services(self) -> dict[str, Any]:
        reply: ServiceList = as_reply(await self._registry_call(ListServices()), ServiceList, "service list")
        services: dict[str, Any] = msgspec.to_builtins(reply.services)
        return services

    async def open(self, service: str) -> ServiceSender:
        if not isinstance(service, str) or not SERVICE_NAME.fullmatch(service):
            raise ServiceNotFound(service if isinstance(service, str) else repr(service))
        found = await self._registry_call(Lookup(service))
        reply: Found | Gone | NotFound = as_reply(found, LookupReply, "lookup")
        if isinstance(reply, Found):
            return cast(ServiceSender, ServiceSender._wrap(reply.sender._detach()))
        if isinstance(reply, Gone):
            raise NodeFailure(reply.node, f"{reply.reason} (service {service!r} was on it)")
        raise ServiceNotFound(service)

    def call(self, service: str, request: Any, timeout: float | None = None) -> Coroutine[Any, Any, Any]:
        """The call to await (a coroutine: no frame of its own on the way,
        and with the service's sender at hand, none to find it: issue 24)."""
        if timeout is None:
            sender = self._senders.get(service)
            if sender is not None and not sender_dead(sender):
                return call_service(sender, request, None)
            return self._call(service, request, None)
        return self._call_within(service, request, timeout)

    async def _call_within(self, service: str, request: Any, timeout: float) -> Any:
        timeout = check_timeout(timeout)
        # the timeout covers finding the service too
        deadline = time.monotonic() + timeout
        async with answer_within(timeout, f"service {service!r}"):
            return await self._call(service, request, deadline)

    async def _call(self, service: str, request: Any, deadline: float | None) -> Any:
        sender = self._senders.get(service)
        if sender is None or sender_dead(sender):
            if sender is not None:
                sender.close()
                del self._senders[service]
            sender = await self.open(service)
            if service in self._senders:  # another task opened it meanwhile
                sender.close()
                sender = self._senders[service]
            else:
                self._senders[service] = sender
        return await call_service(sender, request, deadline)

    # -------------------------------------------------------------- inspect

    async def inspect_update(self, path: str, value: Any, timeout: float = 1.0) -> Any:
        timeout = min(check_timeout(timeout), self.limits.max_inspect_timeout)
        req = UpdateMesh(path, value, timeout)
        return await self._ask_root(req, timeout, f"no answer to the update of {path!r}")

    async def inspect(
        self, path: str = "", depth: int | None = None, timeout: float = 1.0, sensitive: bool = False
    ) -> Any:
        timeout = min(check_timeout(timeout), self.limits.max_inspect_timeout)
        req = InspectMesh(path, depth, timeout, sensitive)
        if self.registry is not None:
            try:
                return await self.registry.inspect_mesh(req)
            except KeyError as exc:
                raise LookupError(f"no inspect entry {exc.args[0]!r}") from None
        return await self._ask_root(req, timeout, "the mesh root did not answer inspect")


# ------------------------------------------------------------------ the façade

#: The control-plane methods every holder of a node shows: ``Mesh``,
#: ``Attachment`` (through ``ControlPlane``) and ``sync.SyncConnection``
#: (blocking wrappers of the same methods).
FACADE: Final = ("services", "call", "open", "inspect", "inspect_update")


class ControlPlane:
    """The control-plane methods of whatever holds a node (``Mesh``,
    ``Attachment``): declared once here, with their documentation; the
    holder says where its node's ``Control`` is (``_plane``) and may run
    each call through ``_guard`` (an ``Attachment`` notices the service
    going away there)."""

    __slots__ = ()

    def _plane(self) -> Control:
        raise NotImplementedError

    async def _guard(self, step: Callable[[float], Awaitable[R]], timeout: float | None) -> R:
        """Run ``step(spent)``, one call on ``_plane()``; ``timeout`` bounds
        the whole (None: the call has no bound of its own), ``spent`` is the
        part of it used before the step (none here)."""
        return await step(0.0)

    async def services(self) -> dict[str, Any]:
        """The mesh's services: name -> ``{"node", "request_type",
        "reply_type", "since"}`` (the serving node's hex id, the type names,
        ``time.time()`` of the registration). Raises ``MeshError`` if the
        mesh root cannot be reached, ``MessageError`` if it answers with
        something that is not a service list."""
        return await self._guard(lambda _: self._plane().services(), None)

    @overload
    async def call(self, service: str, request: Any, timeout: float | None = None) -> Any: ...
    @overload
    async def call(
        self, service: str, request: Any, timeout: float | None = None, *, reply_type: type[R]
    ) -> R: ...
    async def call(
        self, service: str, request: Any, timeout: float | None = None, *, reply_type: Any = None
    ) -> Any:
        """Call the service ``service``; the callee sees the deadline
        (``call.deadline``) and, if we give up, ``call.cancelled``. With
        ``reply_type`` (a msgspec type) the reply is converted to it (and
        typed so): ``MessageError`` if it does not fit. Raises
        ``ServiceNotFound``, ``NodeFailure`` (its node died), ``RemoteError``
        (the handler raised), ``ServiceBusy`` (it refused the call: this
        client has too many waiting there), ``TimeoutError`` (after
        ``timeout`` seconds, finding the service included), ``ValueError``
        for a NaN, infinite or negative ``timeout``."""
        if timeout is not None:
            timeout = check_timeout(timeout)

        def step(spent: float) -> Awaitable[Any]:  # what the guard left of the timeout
            left = None if timeout is None else max(0.0, timeout - spent)
            return self._plane().call(service, request, left)

        reply = await self._guard(step, timeout)
        if reply_type is None:
            return reply
        try:
            return msgspec.convert(reply, reply_type, dec_hook=accept_objects, from_attributes=True)
        except (msgspec.ValidationError, TypeError) as exc:
            what = f"service {service!r} replied with something that is not a {reply_type!r}"
            raise MessageError(f"{what}: {exc}") from None

    async def open(self, service: str) -> Sender[Any]:
        """A ``Sender`` to the service for many calls (``await tx.call(r,
        timeout=...)``). Raises ``ServiceNotFound`` or ``NodeFailure``;
        ``MessageError`` if the mesh root's answer is malformed."""
        return await self._guard(lambda _: self._plane().open(service), None)

    async def inspect(
        self, path: str = "", depth: int | None = None, timeout: float = 1.0, *, sensitive: bool = False
    ) -> Any:
        """The mesh's live inspect tree (plain data), or the part at
        ``path`` (``"nodes/<id prefix>/connections"``), cut at ``depth``
        levels. Each node answers for itself within ``timeout`` seconds; one
        that does not shows as ``{"$unresolved": reason}``. Entries added as
        ``sensitive`` show only with ``sensitive=True``. Raises
        ``LookupError`` for a path that does not exist, ``ServiceBusy`` if
        the root has too many requests in progress."""
        return await self._guard(lambda _: self._plane().inspect(path, depth, timeout, sensitive), None)

    async def inspect_update(self, path: str, value: Any, timeout: float = 1.0) -> Any:
        """Set the entry at ``path`` (``"nodes/<id prefix>/<entry>"``) that
        its node registered as updatable (``inspect_add(..., update=fn)``);
        returns the entry's new value. Raises ``LookupError`` for a path that
        is not updatable, ``RemoteError`` if the entry's setter raised."""
        return await self._guard(lambda _: self._plane().inspect_update(path, value, timeout), None)
