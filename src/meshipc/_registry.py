"""The registry, on the mesh's root node: one session per node that said
hello (its registry channel is its alone, so every request on it is that
node's), the services by name (``Register``/``Unregister``/``Lookup``/
``ListServices``, each answered with a typed reply), new workers'
credentials (``Mint``, for a node whose certificate says "worker"), and the
mesh's inspect tree (the root's own subtree and every node's, asked in
parallel). A session's port breaking tells the root that the node is gone:
its services go with it, remembered (``MAX_TOMBSTONES``) to answer
``NodeFailure`` rather than "unknown".

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ._channel import Call, Receiver, channel
from ._control_msgs import (
    MAX_REASON,
    MAX_TOMBSTONES,
    ControlLimits,
    ControlStatistics,
    Credential,
    Done,
    Found,
    Gone,
    Hello,
    InspectMesh,
    InspectNode,
    ListServices,
    Lookup,
    Mint,
    NameInUse,
    NotFound,
    Refused,
    Register,
    RegistryMsg,
    RegistryReply,
    ServiceInfo,
    ServiceList,
    Unregister,
    UpdateMesh,
    UpdateNode,
    Welcome,
    check_service_name,
)
from ._errors import ChannelClosed, MeshError, PortFailed, RemoteError, ServiceBusy
from ._handshake import ROLE_WORKER, Identity
from ._inspect import NodeInspector, answer, granted, prune, select, split, why
from ._service import sender_dead
from ._tasks import TaskSet

if TYPE_CHECKING:
    from ._node import Node

log = logging.getLogger("meshipc")


def close_hello(hello: Hello) -> None:
    """Close what a ``Hello`` carried (a refused or finished session)."""
    hello.session.close()
    hello.ctl.close()


class _Entry:
    __slots__ = ("node", "reply_type", "request_type", "sender", "since", "token")

    def __init__(self, r: Register, node: bytes) -> None:
        self.node = node  # the session's node: never a claim in the message
        self.sender = r.sender
        self.token = r.token
        self.request_type = r.request_type
        self.reply_type = r.reply_type
        self.since = time.time()


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


class Registry:
    """The root's registry and sessions. ``admit`` mints a worker's
    credential (the root's authority); ``inspector`` is the root's own node."""

    def __init__(
        self,
        node: Node,
        *,
        limits: ControlLimits,
        inspector: NodeInspector,
        name: str | None,
        admit: Callable[[], Identity] | None,
    ) -> None:
        self.node = node
        self.limits = limits
        self.inspector = inspector
        self.name = name
        self._admit = admit
        self._tasks = TaskSet(node.loop)
        self.sessions: dict[bytes, _Session] = {}
        self.inspects = 0  # inspect/update requests in progress, from all clients
        self.entries: dict[str, _Entry] = {}
        self._tombstones: dict[str, Gone] = {}

    def statistics(self, services_here: tuple[str, ...]) -> ControlStatistics:
        return ControlStatistics(
            tuple(p.hex() for p in self.sessions),
            self.inspects,
            {p.hex(): s.inspects for p, s in self.sessions.items()},
            {name: e.node.hex() for name, e in self.entries.items()},
            services_here,
        )

    def close(self) -> None:
        self._tasks.cancel_all()
        for s in self.sessions.values():
            s.port.close()
            s.registry.close()
        self.sessions.clear()
        for e in self.entries.values():
            e.sender.close()
        self.entries.clear()

    # -------------------------------------------------------------- sessions

    def open_session(self, peer: bytes, hello: Hello) -> None:
        if peer in self.sessions or peer == bytes(self.node.id):
            log.warning("node %s: refused a second control session of node %s", self.node.id, peer.hex()[:12])
            close_hello(hello)
            return
        tx, rx = channel(RegistryMsg)
        s = _Session(hello, rx)
        self.sessions[peer] = s
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
            reason = why(exc)
        except MeshError as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            registry.cancel()
            if self.sessions.get(peer) is s:
                del self.sessions[peer]
            close_hello(s.hello)
            s.registry.close()
            self._node_gone(peer, reason)

    def _node_gone(self, peer: bytes, reason: str | None) -> None:
        for name, e in list(self.entries.items()):
            if e.node == peer:
                del self.entries[name]
                e.sender.close()
                if reason is not None:
                    self._tombstones[name] = Gone(peer.hex(), reason[:MAX_REASON])
                    while len(self._tombstones) > MAX_TOMBSTONES:
                        del self._tombstones[next(iter(self._tombstones))]

    # -------------------------------------------------------------- registry

    async def _serve_registry(self, peer: bytes, s: _Session) -> None:
        """The registry channel of node ``peer``'s session: every request on
        it is that node's. Inspect requests are bounded per node (the channel
        is not read meanwhile) and in all (refused with ``ServiceBusy``)."""
        limits = self.limits
        async for msg in s.registry:
            if isinstance(msg, Call):
                req = msg.request
                if isinstance(req, (InspectMesh, UpdateMesh)):
                    if self.inspects >= limits.total_inspects:
                        with contextlib.suppress(ChannelClosed):
                            msg.fail(
                                ServiceBusy(f"the mesh root has {self.inspects} inspect requests in progress")
                            )
                        continue
                    s.inspects += 1
                    self.inspects += 1
                    self._tasks.spawn(self._answer_inspect(msg, req, s))
                    while s.inspects >= limits.client_inspects:
                        s.slot = self.node.loop.create_future()
                        await s.slot
                    continue
                try:
                    msg.reply(self.op(req, peer))
                except ChannelClosed:
                    pass
                except (MeshError, ValueError) as exc:
                    with contextlib.suppress(ChannelClosed):
                        msg.fail(exc)
            elif isinstance(msg, Unregister):
                self.op(msg, peer)

    def op(self, req: Any, node: bytes) -> RegistryReply | None:
        """One registry request of ``node`` (the root's own, or the session's);
        its typed reply (None for ``Unregister``, which is sent, not called)."""
        if isinstance(req, Register):
            check_service_name(req.name)
            cur = self.entries.get(req.name)
            if cur is not None:
                req.sender.close()
                return NameInUse(cur.node.hex())
            self.entries[req.name] = _Entry(req, node)
            self._tombstones.pop(req.name, None)
            return Done()
        if isinstance(req, Unregister):
            cur = self.entries.get(req.name)
            if cur is not None and cur.node == node and cur.token == req.token:
                del self.entries[req.name]
                cur.sender.close()
            return None
        if isinstance(req, Lookup):
            e = self.entries.get(req.name)
            if e is not None:
                if not sender_dead(e.sender):
                    return Found(e.sender.clone())
                err = e.sender.statistics().error
                if err is not None:  # its node died; the session has not noticed yet
                    return Gone(e.node.hex(), why(err)[:MAX_REASON])
            return self._tombstones.get(req.name) or NotFound()
        if isinstance(req, ListServices):
            return self.service_list()
        if isinstance(req, Mint):
            cert = self.node.peer_certificate(node)
            if cert is None or cert.role != ROLE_WORKER or self._admit is None:
                return Refused("only a worker may ask for a worker's credential")
            return Credential(self._admit().to_bytes())
        raise MeshError(f"unknown registry request {type(req).__name__}")

    def service_list(self) -> ServiceList:
        return ServiceList(
            {
                name: ServiceInfo(e.node.hex(), e.request_type, e.reply_type, e.since)
                for name, e in sorted(self.entries.items())
            }
        )

    # -------------------------------------------------------------- inspect

    async def update_mesh(self, req: UpdateMesh) -> Any:
        parts = split(req.path)
        if len(parts) != 3 or parts[0] != "nodes":
            raise LookupError(f"{req.path!r} is not an updatable entry (nodes/<node id>/<entry>)")
        me = bytes(self.node.id).hex()
        sessions = {p.hex(): s for p, s in self.sessions.items() if s.hello is not None}
        matches = [n for n in (me, *sessions) if n.startswith(parts[1])]
        if len(matches) != 1:
            raise LookupError(f"no node {parts[1]!r} in this mesh")
        msg = UpdateNode(parts[2], req.value)
        if matches[0] == me:
            return await self.inspector.update(msg)
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

    async def _answer_inspect(self, call: Call[Any], req: InspectMesh | UpdateMesh, s: _Session) -> None:
        """Answer a session's inspect or update request; the request's
        timeout (a peer's number) is checked and cut to ``max_inspect_timeout``."""
        try:
            timeout = granted(call, req.timeout, self.limits)
            if timeout is None:
                return
            if isinstance(req, UpdateMesh):
                await answer(call, self.update_mesh(msgspec.structs.replace(req, timeout=timeout)))
            else:
                await answer(call, self.inspect_mesh(msgspec.structs.replace(req, timeout=timeout)))
        finally:
            s.inspects -= 1
            self.inspects -= 1
            if s.slot is not None and not s.slot.done():
                s.slot.set_result(None)

    async def inspect_mesh(self, req: InspectMesh) -> Any:
        parts = split(req.path)
        depth = req.depth
        sessions = {peer: s for peer, s in self.sessions.items() if s.hello is not None}
        node_ids = [bytes(self.node.id).hex(), *(p.hex() for p in sessions)]
        tree: dict[str, Any] = {
            "mesh": {
                "name": self.name,
                "directory": os.fspath(self.node.directory),
                "root": bytes(self.node.id).hex(),
                "pid": os.getpid(),
                "uid": os.getuid(),
                "executable": sys.executable,
                "started": self.inspector.started,
                "uptime": round(self.inspector.uptime, 3),
                "nodes": len(node_ids),
            },
            "services": msgspec.to_builtins(self.service_list().services),
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
                        return await self.inspector.inspect(ask_node)
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
            return prune(select(tree, parts), depth)
        return prune(tree, depth)

    def _name_workers(self, nodes: dict[str, Any], sessions: dict[bytes, _Session]) -> None:
        """Workers know no name of their own: their parent's list has it."""
        names: dict[int, str] = {w.pid: w.name for w in self.inspector.workers()}
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
