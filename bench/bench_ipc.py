"""Round-trip latency and one-way throughput of 64-byte messages between a
parent and one child process: meshipc against its peers, in the same run.

    python bench/bench_ipc.py [--runs 5] [--rtt-n 2000] [--tp-n 100000] [--loop {asyncio,uvloop}]

Paths measured (each with a child process started once, reused by every run):

* meshipc: ``await tx.call(msg)`` to a spawned worker that replies with the
  request; throughput: ``tx.send(msg)`` N times, the worker ``await rx.recv()``s
  them and answers on another channel when it has N.
* ``multiprocessing.Pipe`` (raw bytes, ``send_bytes``/``recv_bytes``), blocking,
  same protocol.
* raw asyncio Unix streams: ``[u32 len][data]`` frames, a server in a child
  process (``StreamReader.readexactly``/``StreamWriter.write``), same protocol.
* pyzmq over ``ipc://`` (optional: ``pip install '.[bench]'``; skipped with a
  note when ``import zmq`` fails): a child with blocking zmq sockets binds a
  REP and a PULL socket in the benchmark's tmp dir. Round trip: REQ/REP, one
  64-byte request echoed per round trip. Throughput: a ``count:n`` request on
  the REQ socket, then n messages on PUSH; the child reads n from PULL and
  then answers ``done`` on REP. The parent uses *blocking* zmq calls too
  (like the Pipe path), not ``zmq.asyncio``: measured on 2 vCPUs, zmq.asyncio
  in the parent was ~5x slower in round trip (~180 µs vs ~36 µs) and ~6x
  slower in throughput (~0.2 M vs ~1.35 M msg/s) than blocking calls, which
  would measure the future/loop glue of zmq.asyncio rather than zmq. Its
  sockets have send/receive timeouts of ``LIMIT`` so a dead child fails the
  run instead of hanging it.

Each run measures every path once, in a rotating order; the table gives the
median of the runs (and their spread) and the ratios meshipc/peer.

``--loop`` picks the event loop (default ``asyncio``, the stock loop): the
parent runs under ``asyncio.run`` or ``uvloop.run``, and ``MESHIPC_UVLOOP``
(``0``/``1``) is set before anything is spawned, so meshipc's workers run on
the same loop; the asyncio-streams server child uses it too. The Pipe and zmq
children are blocking and use no loop. Not collected by pytest (lives in bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec

import meshipc

try:
    import zmq
except ImportError:
    zmq = None  # type: ignore[assignment]

MSG = b"m" * 64
_LEN = struct.Struct("<I")
#: Most seconds one measurement may take before the benchmark gives up.
LIMIT = 120.0
#: The sender yields to the event loop every this many messages (pipelining).
YIELD_EVERY = 256

# the module name children import the worker functions from
_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
_MOD = Path(__file__).stem


# --------------------------------------------------------------- meshipc side


async def mesh_echo(rx: meshipc.Receiver[Any]) -> None:
    """Worker: answer every call with its request."""
    async for call in rx:
        call.reply(call.request)


async def mesh_sink(arg: dict[str, Any]) -> None:
    """Worker: read a count n, then n messages; answer n on ``done``. Repeat."""
    rx, done = arg["rx"], arg["done"]
    with done:
        async for n in rx:
            for _ in range(n):
                await rx.recv()
            done.send(n)


class MeshPath:
    name = "meshipc"

    async def start(self, mesh: meshipc.Mesh) -> None:
        self.call_tx, call_rx = meshipc.channel()
        self.data_tx, data_rx = meshipc.channel()
        done_tx, self.done_rx = meshipc.channel()
        await mesh.spawn(f"{_MOD}:mesh_echo", call_rx, name="echo")
        await mesh.spawn(f"{_MOD}:mesh_sink", {"rx": data_rx, "done": done_tx}, name="sink")

    async def rtt(self, n: int) -> float:
        tx = self.call_tx
        t0 = time.perf_counter()
        for _ in range(n):
            await tx.call(MSG)
        return (time.perf_counter() - t0) / n

    async def throughput(self, n: int) -> float:
        tx = self.data_tx
        t0 = time.perf_counter()
        tx.send(n)
        for i in range(n):
            tx.send(MSG)
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # let the loop write what is queued
        got = await self.done_rx.recv()
        dt = time.perf_counter() - t0
        assert got == n, got
        return n / dt

    async def stop(self) -> None:
        self.call_tx.close()
        self.data_tx.close()


# --------------------------------------------------------------- multiprocessing.Pipe


def pipe_server(conn: Connection) -> None:
    """Child: commands ``echo:n`` (echo n messages) and ``count:n`` (read n,
    answer ``done``); an empty message ends it."""
    while True:
        cmd = conn.recv_bytes()
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


class PipePath:
    name = "multiprocessing.Pipe"

    async def start(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=pipe_server, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    async def rtt(self, n: int) -> float:
        conn = self.conn
        conn.send_bytes(b"echo:%d" % n)
        t0 = time.perf_counter()
        for _ in range(n):
            conn.send_bytes(MSG)
            conn.recv_bytes()
        return (time.perf_counter() - t0) / n

    async def throughput(self, n: int) -> float:
        conn = self.conn
        t0 = time.perf_counter()
        conn.send_bytes(b"count:%d" % n)
        for _ in range(n):
            conn.send_bytes(MSG)
        assert conn.recv_bytes() == b"done"
        return n / (time.perf_counter() - t0)

    async def stop(self) -> None:
        try:
            self.conn.send_bytes(b"")
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


# --------------------------------------------------------------- asyncio Unix streams


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = _LEN.unpack(await reader.readexactly(4))
    return await reader.readexactly(n)


def _frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


async def _stream_serve(path: str, ready: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()
            stop.set()

    stop = asyncio.Event()
    server = await asyncio.start_unix_server(handle, path)
    ready.set()
    async with server:
        await stop.wait()


def run_loop(main: Awaitable[Any], loop: str) -> Any:
    """Run ``main`` under the event loop named ``loop`` (``asyncio`` or ``uvloop``)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)  # type: ignore[arg-type]
    return asyncio.run(main)  # type: ignore[arg-type]


def stream_server(path: str, ready: Any, loop: str) -> None:
    """Child: an asyncio Unix stream server for one client, same commands."""
    run_loop(_stream_serve(path, ready), loop)


class StreamPath:
    name = "asyncio Unix streams"

    async def start(self, ctx: Any, directory: str, loop: str) -> None:
        path = os.path.join(directory, "s.sock")
        ready = ctx.Event()
        self.proc = ctx.Process(target=stream_server, args=(path, ready, loop), daemon=True)
        self.proc.start()
        if not await asyncio.to_thread(ready.wait, 30):
            raise RuntimeError("the stream server did not start")
        self.reader, self.writer = await asyncio.open_unix_connection(path)

    async def rtt(self, n: int) -> float:
        reader, writer = self.reader, self.writer
        writer.write(_frame(b"echo:%d" % n))
        frame = _frame(MSG)
        t0 = time.perf_counter()
        for _ in range(n):
            writer.write(frame)
            await _read_frame(reader)
        return (time.perf_counter() - t0) / n

    async def throughput(self, n: int) -> float:
        reader, writer = self.reader, self.writer
        frame = _frame(MSG)
        t0 = time.perf_counter()
        writer.write(_frame(b"count:%d" % n))
        for i in range(n):
            writer.write(frame)
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await writer.drain()
        assert await _read_frame(reader) == b"done"
        return n / (time.perf_counter() - t0)

    async def stop(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
        await asyncio.to_thread(self.proc.join, 5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# --------------------------------------------------------------- pyzmq over ipc://


def zmq_server(directory: str, ready: Any) -> None:
    """Child: blocking zmq. REP answers every request with itself, except
    ``count:n`` (read n messages from PULL, then answer ``done``) and ``quit``."""
    zctx = zmq.Context()
    rep = zctx.socket(zmq.REP)
    pull = zctx.socket(zmq.PULL)
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
                    pull.recv()
                rep.send(b"done")
            else:
                rep.send(req)
    finally:
        rep.close(linger=0)
        pull.close(linger=0)
        zctx.term()


class ZmqPath:
    name = "pyzmq ipc://"

    async def start(self, ctx: Any, directory: str) -> None:
        ready = ctx.Event()
        self.proc = ctx.Process(target=zmq_server, args=(directory, ready), daemon=True)
        self.proc.start()
        if not await asyncio.to_thread(ready.wait, 30):
            raise RuntimeError("the zmq server did not start")
        self.zctx = zmq.Context()
        self.req = self.zctx.socket(zmq.REQ)
        self.push = self.zctx.socket(zmq.PUSH)
        for sock in (self.req, self.push):
            sock.rcvtimeo = sock.sndtimeo = int(LIMIT * 1000)  # blocking: wait_for cannot interrupt
        self.req.connect(f"ipc://{directory}/zr.sock")
        self.push.connect(f"ipc://{directory}/zp.sock")

    async def rtt(self, n: int) -> float:
        req = self.req
        t0 = time.perf_counter()
        for _ in range(n):
            req.send(MSG)
            req.recv()
        return (time.perf_counter() - t0) / n

    async def throughput(self, n: int) -> float:
        req, push = self.req, self.push
        t0 = time.perf_counter()
        req.send(b"count:%d" % n)
        for _ in range(n):
            push.send(MSG)
        assert req.recv() == b"done"
        return n / (time.perf_counter() - t0)

    async def stop(self) -> None:
        self.req.rcvtimeo = self.req.sndtimeo = 5000
        try:
            self.req.send(b"quit")
            self.req.recv()
        except zmq.ZMQError:  # zmq.Again (timeout) or a REQ in the wrong state after a failure
            pass
        self.req.close(linger=0)
        self.push.close(linger=0)
        self.zctx.term()
        await asyncio.to_thread(self.proc.join, 5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# --------------------------------------------------------------- driver


async def measure(f: Callable[[int], Awaitable[float]], n: int) -> float:
    return await asyncio.wait_for(f(n), LIMIT)


def fmt_span(values: list[float], scale: float, spec: str) -> str:
    return f"{format(min(values) * scale, spec)}-{format(max(values) * scale, spec)}"


async def main(args: argparse.Namespace) -> None:
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="mb", dir="/tmp")  # short: AF_UNIX paths are limited
    mesh_path, pipe_path, stream_path = MeshPath(), PipePath(), StreamPath()
    paths: list[Any] = [mesh_path, pipe_path, stream_path]
    zmq_path = ZmqPath() if zmq is not None else None
    if zmq_path is not None:
        paths.append(zmq_path)
    rtts: dict[str, list[float]] = {p.name: [] for p in paths}
    tps: dict[str, list[float]] = {p.name: [] for p in paths}
    started: list[Any] = []
    try:
        async with meshipc.Mesh(runtime_dir=os.path.join(tmp, "rt")) as mesh:
            try:
                await mesh_path.start(mesh)
                started.append(mesh_path)
                await pipe_path.start(ctx)
                started.append(pipe_path)
                await stream_path.start(ctx, tmp, args.loop)
                started.append(stream_path)
                if zmq_path is not None:
                    await zmq_path.start(ctx, tmp)
                    started.append(zmq_path)
                # warm-up (imports, connections, caches), not counted
                for p in paths:
                    await measure(p.rtt, 200)
                    await measure(p.throughput, 2000)
                for run in range(args.runs):
                    order = paths[run % len(paths) :] + paths[: run % len(paths)]
                    for p in order:
                        rtts[p.name].append(await measure(p.rtt, args.rtt_n))
                        tps[p.name].append(await measure(p.throughput, args.tp_n))
                    print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
            finally:
                for p in reversed(started):
                    await p.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.loop == "uvloop":
        import uvloop

        loop_desc = f"uvloop {uvloop.__version__} loop"
    else:
        loop_desc = "stock asyncio loop"
    zmq_desc = f", pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})" if zmq is not None else ""
    print()
    print(
        f"64-byte messages, median of {args.runs} interleaved runs "
        f"(RTT: {args.rtt_n} sequential round trips per run; throughput: {args.tp_n} messages per run)"
    )
    print(
        f"Python {platform.python_version()}, msgspec {msgspec.__version__}, meshipc {meshipc.__version__}"
        f"{zmq_desc}, {loop_desc}, {os.cpu_count()} CPUs, {platform.machine()}"
    )
    if zmq is None:
        print("(pyzmq not installed: the zmq path is skipped; pip install '.[bench]')")
    print()
    w = 22
    print(f"{'path':<{w}} {'RTT µs':>9} {'(min-max)':>13}   {'throughput msg/s':>17} {'(min-max, k/s)':>15}")
    print("-" * (w + 62))
    med_rtt = {k: statistics.median(v) for k, v in rtts.items()}
    med_tp = {k: statistics.median(v) for k, v in tps.items()}
    for p in paths:
        print(
            f"{p.name:<{w}} {med_rtt[p.name] * 1e6:>9.1f} {fmt_span(rtts[p.name], 1e6, '.0f'):>13}"
            f"   {med_tp[p.name]:>17,.0f} {fmt_span(tps[p.name], 1e-3, '.0f'):>15}"
        )
    print()
    print("ratios meshipc / peer (RTT: > 1 means meshipc is slower; throughput: > 1 means meshipc is faster)")
    print(f"{'peer':<{w}} {'RTT ratio':>9}   {'throughput ratio':>17}")
    print("-" * (w + 30))
    m = mesh_path.name
    for p in paths[1:]:
        print(f"{p.name:<{w}} {med_rtt[m] / med_rtt[p.name]:>8.2f}x   {med_tp[m] / med_tp[p.name]:>16.2f}x")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="interleaved runs (default 5)")
    ap.add_argument("--rtt-n", type=int, default=2000, help="round trips per run (default 2000)")
    ap.add_argument("--tp-n", type=int, default=100_000, help="messages per throughput run (default 100000)")
    ap.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of the parent and of meshipc's workers (default asyncio, the stock loop)",
    )
    return ap.parse_args()


if __name__ == "__main__":
    _args = parse_args()
    if zmq is None:
        print("note: pyzmq is not installed (import zmq failed): the zmq path is skipped", file=sys.stderr)
    # spawned meshipc workers pick their loop from the environment: the same as ours
    os.environ["MESHIPC_UVLOOP"] = "1" if _args.loop == "uvloop" else "0"
    run_loop(main(_args), _args.loop)
