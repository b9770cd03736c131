"""Two-process paths: round trip, latency after idle, one-way throughput,
large messages and fd passing — meshipc and each peer.

Every path is a class run inside its driver process (see core.py) with
``start``/``stop`` and some of:

* ``rtt(n)``: µs per round trip of a 64-byte request and reply, n in a row;
* ``idle(n, gap)``: the median µs of n round trips made ``gap`` s apart;
* ``throughput(n, size)``: messages per second, n one-way messages of
  ``size`` bytes, timed until the receiver says it has read them all.

Peers' servers are child processes of the driver; their protocol: a command
``echo:n`` (echo the next n messages) or ``count:n`` (read n messages, then
answer ``done``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing.connection as mpc
import os
import secrets
import statistics
import struct
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import msgspec

import meshipc
from bench.core import LIMIT, MSG, ctx, rmtree, run_loop, short_tmp

#: The async senders yield to the loop every this many messages (pipelining).
YIELD_EVERY = 256
#: Large messages: how many meshipc keeps in flight (the worker acks each).
LARGE_AHEAD = 2
_LEN = struct.Struct("<I")


@functools.lru_cache(maxsize=4)
def _blob(size: int) -> bytes:
    """The body of ``size`` bytes (made once: its making is not the path's CPU)."""
    return MSG if size == 64 else os.urandom(size)


def _wait_ready(ev: Any, what: str) -> None:
    if not ev.wait(60):
        raise RuntimeError(f"the {what} server did not start")


def _stop_proc(proc: Any) -> None:
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


# --------------------------------------------------------------- meshipc



def idle_median(one: Callable[[], Any], n: int, gap: float) -> float:
    """Median µs of ``one()`` (a round trip) when calls are ``gap`` s apart."""
    times = []
    for _ in range(n):
        time.sleep(gap)
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


async def idle_median_async(one: Callable[[], Awaitable[Any]], n: int, gap: float) -> float:
    """``idle_median`` for an awaitable round trip, the loop idle in between."""
    times = []
    for _ in range(n):
        await asyncio.sleep(gap)
        t0 = time.perf_counter()
        await one()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


class SinkArgs(msgspec.Struct):
    rx: meshipc.Receiver[bytes]  # typed: validated in the worker
    ctl: meshipc.Receiver[int]
    done: meshipc.Sender[int]


async def mesh_echo(rx: meshipc.Receiver[Any]) -> None:
    """Worker: answer every call with its request."""
    async for call in rx:
        call.reply(call.request)


async def mesh_sink(arg: SinkArgs) -> None:
    """Worker: read a count n on ``ctl``, then n messages (in batches:
    ``recv_many``); answer n on ``done``. A negative count -n: answer 1
    after each of the n messages (read one by one)."""
    many = getattr(arg.rx, "recv_many", None)  # (an older meshipc, in an A/B, has none)
    with arg.done:
        async for n in arg.ctl:
            if n > 0 and many is not None:
                left = n
                while left:
                    left -= len(await many(left))
            else:
                for _ in range(abs(n)):
                    await arg.rx.recv()
                    if n < 0:
                        arg.done.send(1)
            if n > 0:
                arg.done.send(n)


async def mesh_fd_sink(arg: dict[str, Any]) -> None:
    """Worker: like mesh_sink, the messages carry one fd each (closed here)."""
    rx, ctl, done = arg["rx"], arg["ctl"], arg["done"]
    with done:
        async for n in ctl:
            for _ in range(n):
                (await rx.recv()).close()
            done.send(n)


class MeshPath:
    """A mesh in the driver, an echo worker and a sink worker spawned from it."""

    is_async = True

    async def start(self) -> None:
        self.tmp = short_tmp()
        self.stack = contextlib.AsyncExitStack()
        mesh = await self.stack.enter_async_context(meshipc.Mesh(runtime_dir=os.path.join(self.tmp, "rt")))
        self.call_tx, call_rx = meshipc.channel()
        self.data_tx, data_rx = meshipc.channel(bytes)
        self.ctl_tx, ctl_rx = meshipc.channel(int)
        done_tx, self.done_rx = meshipc.channel(int)
        await mesh.spawn("bench.paths:mesh_echo", call_rx, name="echo")
        await mesh.spawn("bench.paths:mesh_sink", SinkArgs(data_rx, ctl_rx, done_tx), name="sink")
        self.fd_tx, fd_rx = meshipc.channel()
        fctl_tx, fctl_rx = meshipc.channel(int)
        fdone_tx, self.fdone_rx = meshipc.channel(int)
        self.fctl_tx = fctl_tx
        await mesh.spawn("bench.paths:mesh_fd_sink", {"rx": fd_rx, "ctl": fctl_rx, "done": fdone_tx})
        self.devnull = os.open(os.devnull, os.O_RDONLY)

    async def rtt(self, n: int) -> float:
        tx = self.call_tx
        t0 = time.perf_counter()
        for _ in range(n):
            await tx.call(MSG)
        return (time.perf_counter() - t0) / n * 1e6

    async def idle(self, n: int, gap: float) -> float:
        tx = self.call_tx
        return await idle_median_async(lambda: tx.call(MSG), n, gap)

    async def throughput(self, n: int, size: int) -> float:
        tx, blob = self.data_tx, _blob(size)
        t0 = time.perf_counter()
        if size <= 4096:
            self.ctl_tx.send(n)
            for i in range(n):
                tx.send(blob)
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # let the loop write what is queued
            got = await self.done_rx.recv()
            assert got == n, got
        else:
            # Large: at most LARGE_AHEAD messages not yet read by the worker.
            # (Not ``await tx.drain()``: a message larger than the byte window
            # is only credited once a later one is sent, so drain() after it
            # never returns — reported, see bench/results/README-section.md.)
            self.ctl_tx.send(-n)
            for i in range(n):
                if i >= LARGE_AHEAD:
                    await self.done_rx.recv()
                tx.send(blob)
            for _ in range(min(n, LARGE_AHEAD)):
                await self.done_rx.recv()
        return n / (time.perf_counter() - t0)

    async def fds(self, n: int) -> float:
        tx, dup = self.fd_tx, self.devnull
        t0 = time.perf_counter()
        self.fctl_tx.send(n)
        for i in range(n):
            tx.send(meshipc.Fd(os.dup(dup)))  # sending hands the Fd over (closed here once sent)
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await tx.drain()
        got = await self.fdone_rx.recv()
        dt = time.perf_counter() - t0
        assert got == n, got
        return n / dt

    async def stop(self) -> None:
        for tx in (self.call_tx, self.data_tx, self.ctl_tx, self.fd_tx, self.fctl_tx):
            tx.close()
        os.close(self.devnull)
        await self.stack.aclose()
        rmtree(self.tmp)


# --------------------------------------------------------------- meshipc.sync


async def _sync_service(name: str, rd: str, ready: Any) -> None:
    async def echo(req: Any) -> Any:
        return req

    async with meshipc.Mesh(name=name, runtime_dir=rd) as mesh:
        await mesh.listen()
        mesh.serve("echo", echo)
        ready.set()
        await asyncio.Event().wait()


def sync_service(name: str, rd: str, ready: Any) -> None:
    """Child: a named mesh serving ``echo`` (stock loop)."""
    asyncio.run(_sync_service(name, rd, ready))


class MeshSyncPath:
    """The blocking API: ``meshipc.sync.connect`` to a service process, then
    ``conn.open("echo").call(msg)``."""

    def start(self) -> None:
        self.tmp = short_tmp()
        name = f"bench-{os.getpid()}"
        ready = ctx().Event()
        self.proc = ctx().Process(target=sync_service, args=(name, self.tmp, ready), daemon=True)
        self.proc.start()
        _wait_ready(ready, "meshipc")
        self.conn = meshipc.sync.connect(name, runtime_dir=self.tmp)
        self.tx = self.conn.open("echo")

    def rtt(self, n: int) -> float:
        call = self.tx.call
        t0 = time.perf_counter()
        for _ in range(n):
            call(MSG)
        return (time.perf_counter() - t0) / n * 1e6

    def idle(self, n: int, gap: float) -> float:
        return idle_median(lambda: self.tx.call(MSG), n, gap)

    def stop(self) -> None:
        self.tx.close()
        self.conn.close()
        self.proc.terminate()
        _stop_proc(self.proc)
        rmtree(self.tmp)


class MeshServicePath:
    """``meshipc.connect`` to a service process, then ``await conn.call("echo", msg)``
    (by name: the registry is asked on the first call only)."""

    is_async = True

    async def start(self) -> None:
        self.tmp = short_tmp()
        name = f"bench-{os.getpid()}"
        ready = ctx().Event()
        self.proc = ctx().Process(target=sync_service, args=(name, self.tmp, ready), daemon=True)
        self.proc.start()
        await asyncio.to_thread(_wait_ready, ready, "meshipc")
        self.stack = contextlib.AsyncExitStack()
        self.conn = await self.stack.enter_async_context(meshipc.connect(name, runtime_dir=self.tmp))
        await self.conn.call("echo", MSG)

    async def rtt(self, n: int) -> float:
        call = self.conn.call
        t0 = time.perf_counter()
        for _ in range(n):
            await call("echo", MSG)
        return (time.perf_counter() - t0) / n * 1e6

    async def idle(self, n: int, gap: float) -> float:
        return await idle_median_async(lambda: self.conn.call("echo", MSG), n, gap)

    async def stop(self) -> None:
        await self.stack.aclose()
        self.proc.terminate()
        await asyncio.to_thread(_stop_proc, self.proc)
        rmtree(self.tmp)


# --------------------------------------------------------------- multiprocessing.Pipe / connection


def conn_server(conn: Connection) -> None:
    """Child: the echo/count protocol on a multiprocessing Connection; an
    empty message ends it."""
    while True:
        try:
            cmd = conn.recv_bytes()
        except EOFError:
            return
        if not cmd:
            return
        kind, n = cmd.split(b":")
        if kind == b"echo":
            for _ in range(int(n)):
                conn.send_bytes(conn.recv_bytes())
        else:
            for _ in range(int(n)):
                conn.recv_bytes()
            conn.send_bytes(b"done")


def listener_server(path: str, key: bytes, ready: Any) -> None:
    """Child: ``multiprocessing.connection.Listener`` with an authkey, one client."""
    with mpc.Listener(path, family="AF_UNIX", authkey=key) as lis:
        ready.set()
        with lis.accept() as conn:
            conn_server(conn)


class _ConnPath:
    conn: Connection
    proc: Any

    def rtt(self, n: int) -> float:
        conn = self.conn
        conn.send_bytes(b"echo:%d" % n)
        t0 = time.perf_counter()
        for _ in range(n):
            conn.send_bytes(MSG)
            conn.recv_bytes()
        return (time.perf_counter() - t0) / n * 1e6

    def idle(self, n: int, gap: float) -> float:
        conn = self.conn
        conn.send_bytes(b"echo:%d" % n)

        def one() -> None:
            conn.send_bytes(MSG)
            conn.recv_bytes()

        return idle_median(one, n, gap)

    def throughput(self, n: int, size: int) -> float:
        conn, blob = self.conn, _blob(size)
        t0 = time.perf_counter()
        conn.send_bytes(b"count:%d" % n)
        for _ in range(n):
            conn.send_bytes(blob)
        assert conn.recv_bytes() == b"done"
        return n / (time.perf_counter() - t0)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send_bytes(b"")
        _stop_proc(self.proc)
        self.conn.close()


class PipePath(_ConnPath):
    """``multiprocessing.Pipe`` (``send_bytes``/``recv_bytes``), blocking."""

    def start(self) -> None:
        self.conn, child = ctx().Pipe()
        self.proc = ctx().Process(target=conn_server, args=(child,), daemon=True)
        self.proc.start()
        child.close()


class ListenerPath(_ConnPath):
    """``multiprocessing.connection.Client`` with an authkey to a Listener."""

    def start(self) -> None:
        self.tmp = short_tmp()
        path, key, ready = os.path.join(self.tmp, "l.sock"), secrets.token_bytes(32), ctx().Event()
        self.proc = ctx().Process(target=listener_server, args=(path, key, ready), daemon=True)
        self.proc.start()
        _wait_ready(ready, "multiprocessing.connection")
        self.conn = mpc.Client(path, family="AF_UNIX", authkey=key)

    def stop(self) -> None:
        super().stop()
        rmtree(self.tmp)


# --------------------------------------------------------------- asyncio Unix streams


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = _LEN.unpack(await reader.readexactly(4))
    return await reader.readexactly(n)


def _frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


async def serve_frames(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The raw streams' server side: ``echo:n`` (echo the next n frames) or
    ``count:n`` (read n frames, answer ``done``), until the stream ends."""
    try:
        while True:
            kind, n = (await _read_frame(reader)).split(b":")
            if kind == b"echo":
                for _ in range(int(n)):
                    writer.write(_frame(await _read_frame(reader)))
                    await writer.drain()
            else:
                for _ in range(int(n)):
                    await _read_frame(reader)
                writer.write(_frame(b"done"))
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _stream_serve(path: str, ready: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve_frames(reader, writer)
        finally:
            stop.set()

    stop = asyncio.Event()
    server = await asyncio.start_unix_server(handle, path, limit=2**26)
    ready.set()
    async with server:
        await stop.wait()


def stream_server(path: str, ready: Any, loop: str) -> None:
    """Child: an asyncio Unix stream server for one client, ``[u32 len][data]`` frames."""
    run_loop(_stream_serve(path, ready), loop)


class StreamPath:
    """Raw asyncio Unix streams (both sides on the driver's loop)."""

    is_async = True

    def __init__(self, loop: str = "asyncio") -> None:
        self.loop = loop

    async def start(self) -> None:
        self.tmp = short_tmp()
        path, ready = os.path.join(self.tmp, "s.sock"), ctx().Event()
        self.proc = ctx().Process(target=stream_server, args=(path, ready, self.loop), daemon=True)
        self.proc.start()
        await asyncio.to_thread(_wait_ready, ready, "asyncio streams")
        self.reader, self.writer = await asyncio.open_unix_connection(path, limit=2**26)

    async def rtt(self, n: int) -> float:
        reader, writer, frame = self.reader, self.writer, _frame(MSG)
        writer.write(_frame(b"echo:%d" % n))
        t0 = time.perf_counter()
        for _ in range(n):
            writer.write(frame)
            await _read_frame(reader)
        return (time.perf_counter() - t0) / n * 1e6

    async def idle(self, n: int, gap: float) -> float:
        reader, writer, frame = self.reader, self.writer, _frame(MSG)
        writer.write(_frame(b"echo:%d" % n))

        async def one() -> None:
            writer.write(frame)
            await _read_frame(reader)

        return await idle_median_async(one, n, gap)

    async def throughput(self, n: int, size: int) -> float:
        reader, writer, blob = self.reader, self.writer, _blob(size)
        t0 = time.perf_counter()
        writer.write(_frame(b"count:%d" % n))
        every = YIELD_EVERY if size <= 4096 else 1
        for i in range(n):
            writer.write(_LEN.pack(len(blob)))
            writer.write(blob)
            if i % every == every - 1:
                await writer.drain()
        assert await _read_frame(reader) == b"done"
        return n / (time.perf_counter() - t0)

    async def stop(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
        await asyncio.to_thread(_stop_proc, self.proc)
        rmtree(self.tmp)


# --------------------------------------------------------------- the floor


class _Framed(asyncio.Protocol):
    """The floor's protocol: ``[u32 len][msgpack]`` frames, each decoded and
    handed to ``on_msg``; nothing else."""

    def __init__(self, dec: msgspec.msgpack.Decoder[Any]) -> None:
        self.dec = dec
        self.buf = b""
        self.on_msg: Callable[[Any], None] = lambda m: None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
        pos, end, dec, on_msg = 0, len(data), self.dec.decode, self.on_msg
        while end - pos >= 4:
            n = _LEN.unpack_from(data, pos)[0]
            if end - pos - 4 < n:
                break
            on_msg(dec(data[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        self.buf = data[pos:]


def _fframe(enc: msgspec.msgpack.Encoder, msg: Any) -> bytes:
    b = enc.encode(msg)
    return _LEN.pack(len(b)) + b


async def _floor_serve(path: str, ready: Any) -> None:
    enc = msgspec.msgpack.Encoder()
    stop = asyncio.Event()

    class Server(_Framed):
        # the first message says what this connection is: "echo" (answer each
        # message with itself) or "sink" (then per batch: a count n as ASCII
        # bytes, n messages of bytes, answered with the int n)
        def __init__(self) -> None:
            super().__init__(msgspec.msgpack.Decoder())
            self.on_msg = self.hello
            self.left = 0

        def hello(self, kind: Any) -> None:
            if kind == "echo":
                self.on_msg = lambda m: self.transport.write(_fframe(enc, m))
            else:
                self.dec = msgspec.msgpack.Decoder(bytes)  # typed, as meshipc's channel(bytes)
                self.on_msg = self.count

        def count(self, m: Any) -> None:
            if self.left == 0:
                self.left = self.total = int(m)
                return
            self.left -= 1
            if self.left == 0:
                self.transport.write(_fframe(enc, self.total))

        def connection_lost(self, exc: Exception | None) -> None:
            stop.set()

    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(Server, path)
    ready.set()
    async with server:
        await stop.wait()


def floor_server(path: str, ready: Any, loop: str) -> None:
    """Child: the floor's server (see ``FloorPath``)."""
    run_loop(_floor_serve(path, ready), loop)


class FloorPath:
    """The floor: what an echo and a sink cost with the least a Python
    program must do — ``asyncio.Protocol`` both sides, msgspec msgpack encode
    and decode of every message both sides, ``[u32 len]`` frames — on the
    loop named (stock or uvloop). meshipc's CPU per operation is measured
    against it."""

    is_async = True

    def __init__(self, loop: str = "asyncio") -> None:
        self.loop = loop

    async def start(self) -> None:
        self.tmp = short_tmp()
        path, ready = os.path.join(self.tmp, "f.sock"), ctx().Event()
        self.proc = ctx().Process(target=floor_server, args=(path, ready, self.loop), daemon=True)
        self.proc.start()
        await asyncio.to_thread(_wait_ready, ready, "floor")
        self.enc = msgspec.msgpack.Encoder()
        loop = asyncio.get_running_loop()
        self.echo_t, self.echo = await loop.create_unix_connection(
            lambda: _Framed(msgspec.msgpack.Decoder()), path
        )
        self.sink_t, self.sink = await loop.create_unix_connection(
            lambda: _Framed(msgspec.msgpack.Decoder(int)), path
        )
        self.echo_t.write(_fframe(self.enc, "echo"))
        self.sink_t.write(_fframe(self.enc, "sink"))

    async def _one(self, proto: _Framed, write: Callable[[], None]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.on_msg = fut.set_result
        write()
        return await fut

    async def rtt(self, n: int) -> float:
        loop = asyncio.get_running_loop()
        enc, t, proto = self.enc, self.echo_t, self.echo
        t0 = time.perf_counter()
        for _ in range(n):
            fut = loop.create_future()
            proto.on_msg = fut.set_result
            t.write(_fframe(enc, MSG))
            await fut
        return (time.perf_counter() - t0) / n * 1e6

    async def idle(self, n: int, gap: float) -> float:
        enc, t = self.enc, self.echo_t
        return await idle_median_async(
            lambda: self._one(self.echo, lambda: t.write(_fframe(enc, MSG))), n, gap
        )

    async def throughput(self, n: int, size: int) -> float:
        enc, t, blob = self.enc, self.sink_t, _blob(size)
        t0 = time.perf_counter()
        done = asyncio.get_running_loop().create_future()
        self.sink.on_msg = done.set_result
        t.write(_fframe(enc, b"%d" % n))
        for i in range(n):
            t.write(_fframe(enc, blob))
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # as meshipc's sender: let the loop write
        got = await done
        assert got == n, got
        return n / (time.perf_counter() - t0)

    async def stop(self) -> None:
        self.echo_t.close()
        self.sink_t.close()
        await asyncio.to_thread(_stop_proc, self.proc)
        rmtree(self.tmp)


# --------------------------------------------------------------- pyzmq


def zmq_server(directory: str, ready: Any) -> None:
    """Child: blocking zmq. REP echoes, except ``count:n`` (read n from PULL,
    then answer ``done``) and ``quit``."""
    import zmq

    zctx = zmq.Context()
    rep, pull = zctx.socket(zmq.REP), zctx.socket(zmq.PULL)
    rep.bind(f"ipc://{directory}/zr.sock")
    pull.bind(f"ipc://{directory}/zp.sock")
    ready.set()
    try:
        while True:
            req = rep.recv()
            if req == b"quit":
                rep.send(b"bye")
                return
            if req.startswith(b"count:"):
                for _ in range(int(req[6:])):
                    pull.recv(copy=False)
                rep.send(b"done")
            else:
                rep.send(req)
    finally:
        rep.close(linger=0)
        pull.close(linger=0)
        zctx.term()


class ZmqPath:
    """pyzmq over ``ipc://``, blocking calls on both sides (zmq.asyncio in the
    client measured ~5x slower: that would measure its loop glue, not zmq).
    REQ/REP for the round trip, PUSH/PULL for throughput."""

    def start(self) -> None:
        import zmq

        self.zmq = zmq
        self.tmp = short_tmp()
        ready = ctx().Event()
        self.proc = ctx().Process(target=zmq_server, args=(self.tmp, ready), daemon=True)
        self.proc.start()
        _wait_ready(ready, "zmq")
        self.zctx = zmq.Context()
        self.req, self.push = self.zctx.socket(zmq.REQ), self.zctx.socket(zmq.PUSH)
        for sock in (self.req, self.push):
            sock.rcvtimeo = sock.sndtimeo = int(LIMIT * 1000)  # a dead server fails the run
        self.req.connect(f"ipc://{self.tmp}/zr.sock")
        self.push.connect(f"ipc://{self.tmp}/zp.sock")

    def rtt(self, n: int) -> float:
        req = self.req
        t0 = time.perf_counter()
        for _ in range(n):
            req.send(MSG)
            req.recv()
        return (time.perf_counter() - t0) / n * 1e6

    def idle(self, n: int, gap: float) -> float:
        req = self.req

        def one() -> None:
            req.send(MSG)
            req.recv()

        return idle_median(one, n, gap)

    def throughput(self, n: int, size: int) -> float:
        req, push, blob = self.req, self.push, _blob(size)
        copy = size <= 4096
        t0 = time.perf_counter()
        req.send(b"count:%d" % n)
        for _ in range(n):
            push.send(blob, copy=copy)
        assert req.recv() == b"done"
        return n / (time.perf_counter() - t0)

    def stop(self) -> None:
        self.req.rcvtimeo = self.req.sndtimeo = 5000
        with contextlib.suppress(self.zmq.ZMQError):
            self.req.send(b"quit")
            self.req.recv()
        self.req.close(linger=0)
        self.push.close(linger=0)
        self.zctx.term()
        _stop_proc(self.proc)
        rmtree(self.tmp)


# --------------------------------------------------------------- Pyro5


def pyro_server(path: str, ready: Any, hang: Any = None) -> None:
    """Child: a Pyro5 daemon on a Unix socket with an ``echo`` object (its
    ``echo`` never answers when ``hang`` is an Event: it sets it instead)."""
    from Pyro5 import api

    @api.expose
    class Echo:
        def echo(self, data: Any) -> Any:
            if hang is not None:
                hang.set()
                time.sleep(3600)
            return data

    with api.Daemon(unixsocket=path) as daemon:
        daemon.register(Echo, "echo")
        ready.set()
        daemon.requestLoop()


def pyro_proxy(path: str) -> Any:
    from Pyro5 import api

    proxy = api.Proxy(f"PYRO:echo@./u:{path}")
    proxy._pyroSerializer = "marshal"  # bytes as bytes (serpent would base64 them)
    return proxy


class PyroPath:
    """Pyro5 over a Unix socket, the marshal serializer."""

    def start(self) -> None:
        self.tmp = short_tmp()
        path, ready = os.path.join(self.tmp, "p.sock"), ctx().Event()
        self.proc = ctx().Process(target=pyro_server, args=(path, ready), daemon=True)
        self.proc.start()
        _wait_ready(ready, "Pyro5")
        self.proxy = pyro_proxy(path)
        self.proxy.echo(MSG)

    def rtt(self, n: int) -> float:
        echo = self.proxy.echo
        t0 = time.perf_counter()
        for _ in range(n):
            echo(MSG)
        return (time.perf_counter() - t0) / n * 1e6

    def idle(self, n: int, gap: float) -> float:
        return idle_median(lambda: self.proxy.echo(MSG), n, gap)

    def stop(self) -> None:
        self.proxy._pyroRelease()
        self.proc.kill()
        _stop_proc(self.proc)
        rmtree(self.tmp)


# --------------------------------------------------------------- gRPC


async def _grpc_serve(path: str, ready: Any, hang: Any) -> None:
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        if hang is not None:
            hang.set()
            await asyncio.sleep(3600)
        return request

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(echo)  # no (de)serializers: bytes in, bytes out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("b.E", {"Echo": handler}),))
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    ready.set()
    await server.wait_for_termination()


def grpc_server(path: str, ready: Any, hang: Any = None) -> None:
    """Child: a grpc.aio server on a Unix socket with a generic bytes handler."""
    asyncio.run(_grpc_serve(path, ready, hang))


class GrpcPath:
    """gRPC (grpc.aio) over a Unix socket, generic handlers, bytes."""

    is_async = True

    async def start(self) -> None:
        import grpc

        self.tmp = short_tmp()
        path, ready = os.path.join(self.tmp, "g.sock"), ctx().Event()
        self.proc = ctx().Process(target=grpc_server, args=(path, ready), daemon=True)
        self.proc.start()
        await asyncio.to_thread(_wait_ready, ready, "gRPC")
        self.channel = grpc.aio.insecure_channel(f"unix:{path}")
        self.echo = self.channel.unary_unary("/b.E/Echo")
        await self.echo(MSG)

    async def rtt(self, n: int) -> float:
        echo = self.echo
        t0 = time.perf_counter()
        for _ in range(n):
            await echo(MSG)
        return (time.perf_counter() - t0) / n * 1e6

    async def idle(self, n: int, gap: float) -> float:
        return await idle_median_async(lambda: self.echo(MSG), n, gap)

    async def stop(self) -> None:
        await self.channel.close()
        self.proc.kill()
        await asyncio.to_thread(_stop_proc, self.proc)
        rmtree(self.tmp)


# --------------------------------------------------------------- fd passing: multiprocessing.reduction


def fd_server(path: str, ctl: Connection, ready: Any) -> None:
    """Child: ``count:n`` on ``ctl``, then n ``recvfds`` (each fd closed), ``done``."""
    import socket
    from multiprocessing import reduction

    with socket.socket(socket.AF_UNIX) as lis:
        lis.bind(path)
        lis.listen(1)
        ready.set()
        sock, _ = lis.accept()
    with sock:
        while True:
            try:
                cmd = ctl.recv_bytes()
            except EOFError:
                return
            if not cmd:
                return
            for _ in range(int(cmd.split(b":")[1])):
                for fd in reduction.recvfds(sock, 1):
                    os.close(fd)
            ctl.send_bytes(b"done")


class ReductionPath:
    """``multiprocessing.reduction.sendfds``/``recvfds`` over a Unix socket."""

    def start(self) -> None:
        import socket

        self.tmp = short_tmp()
        path, ready = os.path.join(self.tmp, "f.sock"), ctx().Event()
        self.ctl, child = ctx().Pipe()
        self.proc = ctx().Process(target=fd_server, args=(path, child, ready), daemon=True)
        self.proc.start()
        child.close()
        _wait_ready(ready, "reduction")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.devnull = os.open(os.devnull, os.O_RDONLY)

    def fds(self, n: int) -> float:
        from multiprocessing import reduction

        sock, fds = self.sock, [self.devnull]
        t0 = time.perf_counter()
        self.ctl.send_bytes(b"count:%d" % n)
        for _ in range(n):
            reduction.sendfds(sock, fds)
        assert self.ctl.recv_bytes() == b"done"
        return n / (time.perf_counter() - t0)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.ctl.send_bytes(b"")
        _stop_proc(self.proc)
        self.sock.close()
        os.close(self.devnull)
        rmtree(self.tmp)
