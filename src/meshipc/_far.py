"""Far control: the control plane of a mesh, offered to a client on the far
side of a boundary link (a TLS connection today).

The client holds one port whose peer, through the link's gateways, is a
``FarServer`` in the service's process. It sends ``FarRequest`` records
(an id and one operation: list services, call, open a service channel,
inspect, update an inspect entry) and gets ``FarReply`` records with the
same id, in any order. The server answers with the service mesh's own
``ControlPlane`` (the ``Mesh`` that listens), so what a far client may do is
what a local ``connect(name)`` client may do, less ``sensitive`` inspect
entries; a ``Sender`` that ``open`` returns crosses the link as a relay.
Node ids never cross: a failure names the service, not the node.

``FarPlane`` is the client's side, with ``Control``'s client methods
(``FACADE``), so an attachment over it is a ``ControlPlane``.

Bounds: a server runs at most ``MAX_FAR_INFLIGHT`` requests of one client
at once (then it stops reading that client's port: flow control pushes
back); replies and requests are checked records (``ProtocolError`` on the
client, a refused request on the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

import msgspec

from ._channel import Port, Sender
from ._control import Control, ControlPlane
from ._control_msgs import accept_objects, check_service_name, check_timeout
from ._errors import (
    ChannelClosed,
    MeshError,
    MessageError,
    PortFailed,
    ProtocolError,
    RemoteError,
    ServiceBusy,
    ServiceNotFound,
)
from ._service import ServiceSender
from ._tasks import TaskSet

log = logging.getLogger("meshipc")

#: Requests of one far client the server runs at once.
MAX_FAR_INFLIGHT: Final = 32
#: Longest error message or traceback text a far reply carries (characters).
MAX_FAR_TEXT: Final = 16 * 1024


class ListServices(msgspec.Struct, tag="services", frozen=True):
    pass


class CallService(msgspec.Struct, tag="call", frozen=True):
    service: str
    request: Any
    timeout: float | None = None


class OpenService(msgspec.Struct, tag="open", frozen=True):
    service: str


class Inspect(msgspec.Struct, tag="inspect", frozen=True):
    path: str = ""
    depth: int | None = None
    timeout: float = 1.0


class InspectUpdate(msgspec.Struct, tag="update", frozen=True):
    path: str
    value: Any
    timeout: float = 1.0


FarOp = ListServices | CallService | OpenService | Inspect | InspectUpdate


class FarRequest(msgspec.Struct, tag="req", frozen=True):
    id: int
    op: FarOp


class Failed(msgspec.Struct, frozen=True):
    """Why a request failed: ``kind`` picks the exception raised at the
    client (``remote`` carries the handler's type name and traceback)."""

    kind: str
    message: str
    type_name: str = ""
    traceback: str = ""


class FarReply(msgspec.Struct, tag="rep", frozen=True):
    id: int
    value: Any = None
    failed: Failed | None = None


def _checked(value: Any, tp: Any) -> Any:
    if isinstance(value, tp):
        return value
    return msgspec.convert(value, tp, dec_hook=accept_objects)


def _failure(exc: BaseException) -> Failed:
    msg = str(exc)[:MAX_FAR_TEXT]
    if isinstance(exc, ServiceNotFound):
        return Failed("not_found", exc.service[:MAX_FAR_TEXT])
    if isinstance(exc, ServiceBusy):
        return Failed("busy", exc.what[:MAX_FAR_TEXT])
    if isinstance(exc, RemoteError):
        return Failed(
            "remote", exc.message[:MAX_FAR_TEXT], exc.type_name[:200], exc.traceback[-MAX_FAR_TEXT:]
        )
    if isinstance(exc, TimeoutError):
        return Failed("timeout", msg)
    if isinstance(exc, LookupError):
        return Failed("lookup", msg)
    if isinstance(exc, ValueError):
        return Failed("value", msg)
    if isinstance(exc, PortFailed):
        # a node id stays on its side of the link: say what failed, not where
        return Failed("failed", getattr(exc, "reason", msg)[:MAX_FAR_TEXT])
    return Failed("error", msg)


def _raise(f: Failed) -> None:
    if f.kind == "not_found":
        raise ServiceNotFound(f.message)
    if f.kind == "busy":
        raise ServiceBusy(f.message)
    if f.kind == "remote":
        raise RemoteError(f.type_name, f.message, f.traceback)
    if f.kind == "timeout":
        raise TimeoutError(f.message)
    if f.kind == "lookup":
        raise LookupError(f.message)
    if f.kind == "value":
        raise ValueError(f.message)
    if f.kind == "failed":
        raise PortFailed(f"far side: {f.message}")
    raise MeshError(f"far side: {f.message}")


# ------------------------------------------------------------------ the server


class FarServer:
    """Serves one far client's requests on ``port`` with ``plane`` (the
    service mesh) until the port ends or ``close()``."""

    def __init__(self, port: Port[Any], plane: ControlPlane, label: str) -> None:
        self.port = port
        self.plane = plane
        self.label = label
        self._tasks = TaskSet(asyncio.get_running_loop())
        self._slots = asyncio.Semaphore(MAX_FAR_INFLIGHT)
        self.served = 0

    async def run(self) -> None:
        try:
            while True:
                await self._slots.acquire()
                try:
                    raw = await self.port.recv()
                except MessageError as exc:  # one undecodable request: dropped, the client served
                    self._slots.release()
                    log.info("%s: dropped an undecodable far-control request: %s", self.label, exc)
                    continue
                except BaseException:
                    self._slots.release()
                    raise
                try:
                    req = _checked(raw, FarRequest)
                except (msgspec.ValidationError, TypeError) as exc:
                    self._slots.release()
                    log.info("%s: dropped a malformed far-control request: %s", self.label, exc)
                    continue
                self._tasks.spawn(self._serve(req))
        except (ChannelClosed, PortFailed):
            pass
        finally:
            self.close()

    async def _serve(self, req: FarRequest) -> None:
        try:
            try:
                value = await self._do(req.op)
                reply = FarReply(req.id, value)
            except (MeshError, TimeoutError, LookupError, ValueError) as exc:
                reply = FarReply(req.id, failed=_failure(exc))
            except Exception as exc:  # a bug here must not end the client's link
                log.warning("%s: far-control request failed: %s", self.label, exc, exc_info=True)
                reply = FarReply(
                    req.id, failed=Failed("error", f"{type(exc).__name__}: {exc}"[:MAX_FAR_TEXT])
                )
            self.served += 1
            with contextlib.suppress(MeshError):
                self.port.send(reply)
        finally:
            self._slots.release()

    async def _do(self, op: FarOp) -> Any:
        plane = self.plane
        match op:
            case ListServices():
                services = await plane.services()
                for info in services.values():
                    info.pop("node", None)  # node ids stay on this side
                return services
            case CallService(service, request, timeout):
                return await plane.call(service, request, timeout)
            case OpenService(service):
                return await plane.open(service)
            case Inspect(path, depth, timeout):
                return await plane.inspect(path, depth, timeout, sensitive=False)
            case InspectUpdate(path, value, timeout):
                return await plane.inspect_update(path, value, timeout)
        raise MeshError("unknown far-control request")  # pragma: no cover - the union is closed

    def close(self) -> None:
        self._tasks.cancel_all()
        self.port.close()


# ------------------------------------------------------------------ the client


class FarPlane:
    """A far client's control plane: ``Control``'s client methods, each one
    request over ``port`` and its reply. ``PortFailed``/``ChannelClosed``
    once the link is gone; ``ProtocolError`` for a malformed reply."""

    def __init__(self, port: Port[Any], label: str) -> None:
        self.port = port
        self.label = label
        self._next = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._error: BaseException | None = None
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                raw = await self.port.recv()
                try:
                    rep = _checked(raw, FarReply)
                except (msgspec.ValidationError, TypeError) as exc:
                    raise ProtocolError(f"{self.label}: malformed far-control reply: {exc}") from None
                fut = self._pending.pop(rep.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(rep)
                elif isinstance(rep.value, Sender | Port):
                    rep.value.close()
        except (MeshError, asyncio.CancelledError) as exc:
            if isinstance(exc, ChannelClosed):
                exc = ChannelClosed(f"{self.label}: the far side closed the connection")
            self._fail(exc if isinstance(exc, MeshError) else ChannelClosed(f"{self.label}: closed"))

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _ask(self, op: FarOp) -> Any:
        if self._error is not None:
            raise self._error
        self._next += 1
        rid = self._next
        fut: asyncio.Future[FarReply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self.port.send(FarRequest(rid, op))
            rep = await fut
        finally:
            self._pending.pop(rid, None)
        if rep.failed is not None:
            _raise(rep.failed)
        return rep.value

    async def services(self) -> dict[str, Any]:
        value = await self._ask(ListServices())
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.label}: the service list is not a mapping")
        return value

    async def call(self, service: str, request: Any, timeout: float | None = None) -> Any:
        if timeout is not None:
            timeout = check_timeout(timeout)
        return await self._ask(CallService(service, request, timeout))

    async def open(self, service: str) -> ServiceSender:
        check_service_name(service)
        value = await self._ask(OpenService(service))
        if not isinstance(value, Sender):
            raise ProtocolError(f"{self.label}: open({service!r}) answered something that is not a Sender")
        sender: ServiceSender = ServiceSender._wrap(value._detach())  # type: ignore[assignment]
        return sender

    async def inspect(
        self, path: str = "", depth: int | None = None, timeout: float = 1.0, sensitive: bool = False
    ) -> Any:
        if sensitive:
            raise MeshError("sensitive inspect entries are not shown across a boundary link")
        return await self._ask(Inspect(path, depth, check_timeout(timeout)))

    async def inspect_update(self, path: str, value: Any, timeout: float = 1.0) -> Any:
        return await self._ask(InspectUpdate(path, value, check_timeout(timeout)))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.port.close()
        self._fail(ChannelClosed(f"{self.label}: closed"))


def plane_of(far: FarPlane) -> Control:
    """``far`` where a ``ControlPlane`` wants its node's ``Control``: it has
    the same client methods (``FACADE``), which is all ``ControlPlane`` calls."""
    return far  # type: ignore[return-value]
