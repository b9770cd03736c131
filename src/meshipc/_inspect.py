"""The inspect tree: the helpers that cut and select plain-data trees
(``counter``, ``prune``, ``select``, ``jsonable``) and ``NodeInspector``, one
node's own subtree (identity, connections, ports, services, workers, the
application's entries) and the node's answers to the root's fan-out.

A node's subtree is built from what the node shows through public methods
(``Node.links``, ``Engine.ports``) and from what its owner hands in (its
workers as ``WorkerStatus`` records, its services' snapshots): it holds no
``Mesh``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect as _inspect
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import msgspec

from ._channel import Call, Sender, channel
from ._control_msgs import ControlLimits, InspectNode, NodeMsg, UpdateNode, WorkerStatus, check_timeout
from ._errors import ChannelClosed, NodeFailure, PortFailed
from ._tasks import TaskSet

if TYPE_CHECKING:
    from ._node import Node

#: The keys of a node's subtree that the library fills (an application's
#: ``inspect_add`` entry takes none of them).
BUILTIN_KEYS: Final = frozenset(
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


def counter(n: int) -> dict[str, int]:
    """An inspect value that only grows: clients may show it as a rate."""
    return {"$counter": n}


async def answer(call: Call[Any], work: Any) -> None:
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


def split(path: str) -> list[str]:
    return [p for p in path.strip("/").split("/") if p]


def prune(value: Any, depth: int | None) -> Any:
    """``value`` with dict nesting cut after ``depth`` levels."""
    if depth is None or not isinstance(value, dict) or not value or is_leaf(value):
        return value
    if depth <= 0:
        return {"$more": len(value)}
    return {k: prune(v, depth - 1) for k, v in value.items()}


def is_leaf(value: dict[str, Any]) -> bool:
    return len(value) == 1 and next(iter(value)) in ("$counter", "$unresolved", "$more")


def select(tree: Any, parts: list[str]) -> Any:
    for i, p in enumerate(parts):
        if not isinstance(tree, dict) or is_leaf(tree):
            raise KeyError("/".join(parts[: i + 1]))
        if p in tree:
            tree = tree[p]
            continue
        matches = [k for k in tree if isinstance(k, str) and k.startswith(p)]
        if len(matches) != 1:
            raise KeyError("/".join(parts[: i + 1]))
        tree = tree[matches[0]]
    return tree


def jsonable(value: Any, _depth: int = 0) -> Any:
    """Plain data only: anything else becomes its repr (never a handle)."""
    if _depth > 32:
        return "..."
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, _depth + 1) for v in value]
    if isinstance(value, msgspec.Struct):
        return jsonable(msgspec.structs.asdict(value), _depth + 1)
    return repr(value)


def type_name(tp: Any) -> str | None:
    if tp is None:
        return None
    return getattr(tp, "__name__", None) or repr(tp)


def why(exc: BaseException) -> str:
    """The cause of a failure, once: a ``NodeFailure``'s own reason (its text
    already names the node, which the caller names again)."""
    if isinstance(exc, NodeFailure):
        return exc.reason
    if isinstance(exc, PortFailed):
        return exc.cause
    return str(exc) or type(exc).__name__


def process_name() -> str:
    """What this process is called: its ``-m`` module, else its script's name."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def granted(call: Call[Any], timeout: Any, limits: ControlLimits) -> float | None:
    """The timeout an inspect request from a peer gets: its own, checked
    (finite, not negative) and cut to ``max_inspect_timeout``; None once
    the call was failed for a bad one."""
    try:
        return min(check_timeout(timeout), limits.max_inspect_timeout)
    except ValueError as exc:
        with contextlib.suppress(ChannelClosed):
            call.fail(exc)
        return None


class _AppEntry:
    """An application's inspect entry (``inspect_add``)."""

    __slots__ = ("fn", "sensitive", "update")

    def __init__(self, fn: Callable[[], Any], sensitive: bool, update: Callable[[Any], Any] | None) -> None:
        self.fn = fn
        self.sensitive = sensitive
        self.update = update


class NodeInspector:
    """One node's inspect subtree and its control server: the channel on
    which the root asks this node (``InspectNode``/``UpdateNode``), served at
    most ``limits.total_inspects`` requests at once (the channel is not read
    meanwhile)."""

    def __init__(
        self,
        node: Node,
        *,
        role: str,
        name: str | None,
        limits: ControlLimits,
        workers: Callable[[], Iterable[WorkerStatus]],
        services: Callable[[], dict[str, Any]],
    ) -> None:
        self.node = node
        self.role = role
        self.name = name
        self.limits = limits
        self._workers = workers
        self._services = services
        self.started = time.time()
        self._t0 = time.monotonic()
        self._app: dict[str, _AppEntry] = {}
        self._tx, self._rx = channel(NodeMsg)
        self._answers = 0
        self._slot: asyncio.Future[None] | None = None
        self._tasks = TaskSet(node.loop)
        self._tasks.spawn(self._serve())

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._t0

    def sender(self) -> Sender[Any]:
        """A ``Sender`` to this node's control server (for its ``Hello``)."""
        return self._tx.clone()

    def close(self) -> None:
        self._tasks.cancel_all()
        self._rx.close()
        self._tx.close()

    def add(
        self,
        name: str,
        fn: Callable[[], Any],
        sensitive: bool = False,
        update: Callable[[Any], Any] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("$"):
            raise ValueError("an inspect entry name is a non-empty string without '/' or a leading '$'")
        if name in BUILTIN_KEYS or name in self._app:
            raise ValueError(f"inspect entry {name!r} already exists")
        if not callable(fn) or (update is not None and not callable(update)):
            raise TypeError("inspect_add() takes a function returning plain data (or awaiting it)")
        self._app[name] = _AppEntry(fn, sensitive, update)

    # -------------------------------------------------------------- the root's requests

    async def _serve(self) -> None:
        async for call in self._rx:
            if isinstance(call, Call):
                self._answers += 1
                self._tasks.spawn(self._answer(call))
                while self._answers >= self.limits.total_inspects:
                    self._slot = self.node.loop.create_future()
                    await self._slot

    async def _answer(self, call: Call[Any]) -> None:
        try:
            req = call.request
            if isinstance(req, UpdateNode):
                await answer(call, self.update(req))
                return
            timeout = granted(call, req.timeout, self.limits)
            if timeout is None:
                return
            await answer(call, self.inspect(msgspec.structs.replace(req, timeout=timeout)))
        finally:
            self._answers -= 1
            if self._slot is not None and not self._slot.done():
                self._slot.set_result(None)

    async def update(self, req: UpdateNode) -> Any:
        """Set an updatable entry; its new value. ``LookupError`` if there is none."""
        entry = self._app.get(req.name)
        if entry is None or entry.update is None:
            raise LookupError(f"no updatable inspect entry {req.name!r}")
        done = entry.update(req.value)
        if _inspect.isawaitable(done):
            await done
        value = entry.fn()
        if _inspect.isawaitable(value):
            value = await value
        return jsonable(value)

    async def inspect(self, req: InspectNode) -> Any:
        """This node's subtree, or the part at ``req.path``, cut at ``req.depth``."""
        parts = split(req.path)
        section: str | None = None
        if parts:
            keys = [*BUILTIN_KEYS, *self._app]
            matches = [k for k in keys if k == parts[0]] or [k for k in keys if k.startswith(parts[0])]
            if len(matches) == 1:
                section = matches[0]
        tree = self.node_tree(section)
        for name, entry in self._app.items():
            if parts and parts[0] != name:
                continue
            if entry.sensitive and not req.sensitive:
                tree[name] = "<sensitive: ask with sensitive=True>"
                continue
            try:
                value = entry.fn()
                if _inspect.isawaitable(value):
                    # one slow entry must not cost the node its whole answer
                    value = await asyncio.wait_for(value, req.timeout * 0.8)
                tree[name] = jsonable(value)
            except TimeoutError:
                tree[name] = {"$unresolved": f"no answer within {req.timeout * 0.8:g} s"}
            except Exception as exc:
                tree[name] = {"$unresolved": f"{type(exc).__name__}: {exc}"}
        return prune(select(tree, parts), req.depth)

    def workers(self) -> list[WorkerStatus]:
        return list(self._workers())

    def node_tree(self, section: str | None = None) -> dict[str, Any]:
        """This node's inspect subtree; with ``section``, only that entry is
        computed among the costly ones (a request for ``services`` does not
        walk every port: each request costs what it shows)."""
        node = self.node
        costly: dict[str, Callable[[], Any]] = {
            "connections": self._connection_stats,
            "ports": self._port_stats,
            "services": self._services,
            "workers": lambda: {
                w.key or f"{w.name}-{w.pid}": {
                    "name": w.name,
                    "pid": w.pid,
                    "state": w.state,
                    "returncode": w.returncode,
                    "restarts": w.restarts,
                    "restart_events": list(w.events),
                }
                for w in self._workers()
            },
            "tasks": lambda: {"total": len(asyncio.all_tasks(node.loop))},
        }
        tree: dict[str, Any] = {
            "id": bytes(node.id).hex(),
            "pid": os.getpid(),
            "uid": os.getuid(),
            "name": self.name or process_name(),
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
                "protocol": c.protocol,
            }
            for peer, c in list(self.node.links.items())
        }

    def _port_stats(self) -> dict[str, Any]:
        """This node's ports, from the engine's ``stats()``."""
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
