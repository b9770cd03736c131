"""Failure detection: the time from SIGKILL of the callee (while it holds a
call unanswered) to the caller's pending call failing.

Each ``failure(bound)`` call is one trial with a fresh server process: the
server signals once it has the request and never answers; the driver then
SIGKILLs it and times how long the pending call takes to fail. A call still
pending ``bound`` seconds after the kill counts as hanging (``inf``): the
caller's own timeout (set to ``bound`` + 1 s where the peer has one) ends
it, never an unbounded wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.connection as mpc
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import meshipc
from bench.core import MSG, ctx, rmtree, run_loop, short_tmp
from bench.paths import _read_frame, _stop_proc, _wait_ready, grpc_server, pyro_proxy, pyro_server

INF = float("inf")


def _result(t_kill: float | None, t_fail: float, bound: float) -> float:
    if t_kill is None:
        raise RuntimeError("the server never got the request")
    dt = t_fail - t_kill
    return INF if dt >= bound else dt * 1e3


def _sync_trial(proc: Any, got: Any, call: Callable[[], Any], bound: float) -> float:
    """``call()`` blocks in this thread; another kills ``proc`` once ``got`` is set."""
    t_kill: list[float] = []

    def killer() -> None:
        if got.wait(30):
            t_kill.append(time.perf_counter())
            os.kill(proc.pid, signal.SIGKILL)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    with contextlib.suppress(Exception):
        call()
    t_fail = time.perf_counter()
    th.join()
    _stop_proc(proc)
    return _result(t_kill[0] if t_kill else None, t_fail, bound)


# --------------------------------------------------------------- servers that take a call and never answer


def hang_conn(conn: Connection, got: Any) -> None:
    conn.recv_bytes()
    got.set()
    time.sleep(3600)


def hang_listener(path: str, key: bytes, ready: Any, got: Any) -> None:
    with mpc.Listener(path, family="AF_UNIX", authkey=key) as lis:
        ready.set()
        hang_conn(lis.accept(), got)


async def _hang_stream(path: str, ready: Any, got: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_frame(reader)
        got.set()
        await asyncio.sleep(3600)

    server = await asyncio.start_unix_server(handle, path)
    ready.set()
    async with server:
        await asyncio.sleep(3600)


def hang_stream(path: str, ready: Any, got: Any, loop: str) -> None:
    run_loop(_hang_stream(path, ready, got), loop)


def hang_zmq(directory: str, ready: Any, got: Any) -> None:
    import zmq

    rep = zmq.Context().socket(zmq.REP)
    rep.bind(f"ipc://{directory}/h.sock")
    ready.set()
    rep.recv()
    got.set()
    time.sleep(3600)


async def mesh_hang(arg: dict[str, Any]) -> None:
    """Worker: take one call, say so on ``got``, never answer."""
    call = await arg["rx"].recv()
    arg["got"].send(1)
    await asyncio.sleep(3600)
    call.reply(None)


# --------------------------------------------------------------- paths


class MeshFail:
    """``await tx.call(msg)`` to a spawned worker that gets SIGKILLed."""

    is_async = True

    async def start(self) -> None:
        self.tmp = short_tmp()
        self.stack = contextlib.AsyncExitStack()
        self.mesh = await self.stack.enter_async_context(
            meshipc.Mesh(runtime_dir=os.path.join(self.tmp, "rt"))
        )

    async def failure(self, bound: float) -> float:
        tx, rx = meshipc.channel()
        got_tx, got_rx = meshipc.channel()
        proc = await self.mesh.spawn("bench.failure:mesh_hang", {"rx": rx, "got": got_tx})
        task = asyncio.create_task(tx.call(MSG))
        await asyncio.wait_for(got_rx.recv(), 30)
        t_kill = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, bound + 1)
        t_fail = time.perf_counter()
        tx.close()
        got_rx.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        return _result(t_kill, t_fail, bound)

    async def stop(self) -> None:
        await self.stack.aclose()
        rmtree(self.tmp)


class PipeFail:
    def start(self) -> None:
        pass

    def failure(self, bound: float) -> float:
        conn, child = ctx().Pipe()
        got = ctx().Event()
        proc = ctx().Process(target=hang_conn, args=(child, got), daemon=True)
        proc.start()
        child.close()

        def call() -> None:
            conn.send_bytes(MSG)
            if conn.poll(bound + 1):
                conn.recv_bytes()

        try:
            return _sync_trial(proc, got, call, bound)
        finally:
            conn.close()

    def stop(self) -> None:
        pass


class ListenerFail(PipeFail):
    def failure(self, bound: float) -> float:
        tmp = short_tmp()
        path, key, ready, got = (
            os.path.join(tmp, "l.sock"),
            secrets.token_bytes(32),
            ctx().Event(),
            ctx().Event(),
        )
        proc = ctx().Process(target=hang_listener, args=(path, key, ready, got), daemon=True)
        proc.start()
        try:
            _wait_ready(ready, "listener")
            conn = mpc.Client(path, family="AF_UNIX", authkey=key)

            def call() -> None:
                conn.send_bytes(MSG)
                if conn.poll(bound + 1):
                    conn.recv_bytes()

            return _sync_trial(proc, got, call, bound)
        finally:
            rmtree(tmp)


class StreamFail:
    is_async = True

    def __init__(self, loop: str = "asyncio") -> None:
        self.loop = loop

    async def start(self) -> None:
        pass

    async def failure(self, bound: float) -> float:
        tmp = short_tmp()
        path, ready, got = os.path.join(tmp, "s.sock"), ctx().Event(), ctx().Event()
        proc = ctx().Process(target=hang_stream, args=(path, ready, got, self.loop), daemon=True)
        proc.start()
        try:
            await asyncio.to_thread(_wait_ready, ready, "stream")
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(len(MSG).to_bytes(4, "little") + MSG)
            await asyncio.to_thread(got.wait, 30)
            t_kill = time.perf_counter()
            os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_read_frame(reader), bound + 1)
            t_fail = time.perf_counter()
            writer.close()
            await asyncio.to_thread(_stop_proc, proc)
            return _result(t_kill, t_fail, bound)
        finally:
            rmtree(tmp)

    async def stop(self) -> None:
        pass


class ZmqFail(PipeFail):
    def failure(self, bound: float) -> float:
        import zmq

        tmp = short_tmp()
        ready, got = ctx().Event(), ctx().Event()
        proc = ctx().Process(target=hang_zmq, args=(tmp, ready, got), daemon=True)
        proc.start()
        zctx = zmq.Context()
        req = zctx.socket(zmq.REQ)
        req.rcvtimeo = int((bound + 1) * 1000)
        try:
            _wait_ready(ready, "zmq")
            req.connect(f"ipc://{tmp}/h.sock")

            def call() -> None:
                req.send(MSG)
                req.recv()

            return _sync_trial(proc, got, call, bound)
        finally:
            req.close(linger=0)
            zctx.term()
            rmtree(tmp)


class PyroFail(PipeFail):
    def failure(self, bound: float) -> float:
        tmp = short_tmp()
        path, ready, got = os.path.join(tmp, "p.sock"), ctx().Event(), ctx().Event()
        proc = ctx().Process(target=pyro_server, args=(path, ready, got), daemon=True)
        proc.start()
        try:
            _wait_ready(ready, "Pyro5")
            proxy = pyro_proxy(path)
            proxy._pyroTimeout = bound + 1
            proxy._pyroBind()
            try:
                return _sync_trial(proc, got, lambda: proxy.echo(MSG), bound)
            finally:
                proxy._pyroRelease()
        finally:
            rmtree(tmp)


class GrpcFail:
    is_async = True

    async def start(self) -> None:
        pass

    async def failure(self, bound: float) -> float:
        import grpc

        tmp = short_tmp()
        path, ready, got = os.path.join(tmp, "g.sock"), ctx().Event(), ctx().Event()
        proc = ctx().Process(target=grpc_server, args=(path, ready, got), daemon=True)
        proc.start()
        try:
            await asyncio.to_thread(_wait_ready, ready, "gRPC")
            async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
                echo = channel.unary_unary("/b.E/Echo")
                task = asyncio.ensure_future(echo(MSG, timeout=bound + 1))
                await asyncio.to_thread(got.wait, 30)
                t_kill = time.perf_counter()
                os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await task
                t_fail = time.perf_counter()
            await asyncio.to_thread(_stop_proc, proc)
            return _result(t_kill, t_fail, bound)
        finally:
            rmtree(tmp)

    async def stop(self) -> None:
        pass
