"""CPU per message, A against B, in one run: process CPU time, not wall.

    python bench/ab_cpu.py SRC_A SRC_B [--rounds 5] [--rtt N] [--oneway N]
    python bench/ab_cpu.py SRC_A SRC_B --callgrind [--modes svc,rtt]
    python bench/ab_cpu.py SRC_A SRC_B --svc 5000

Runs ``measure`` in a fresh interpreter with ``SRC_A`` (then ``SRC_B``, then
A again ...) first on the path, ``--rounds`` times each, interleaved, and
prints the median CPU µs per op of each side and the ratio B/A (also of
the in-process ``_micro`` rows, which other load on the machine barely
moves). One
measurement: a mesh, the echo and sink workers of ``bench.paths``; ``rtt``
is N 64-byte RPC round trips, ``oneway`` N 64-byte one-way sends (``svc``,
with ``--svc N``: N ``conn.call`` of a service in another process, as the
bench's ``conn.call`` path, and ``svc/rtt`` its ratio to ``rtt``); CPU is
the driver's ``time.process_time()`` plus the worker's user+system time
(``/proc/<pid>/stat``) over the ops, divided by N. Stock asyncio loop.

On a shared machine CPU time moves by 2x from run to run; ``--callgrind``
counts instructions per op instead (``_ops`` under valgrind), which other
load does not move.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def _measure(n_rtt: int, n_oneway: int) -> dict[str, float]:
    import meshipc
    from bench.core import MSG, rmtree, short_tmp
    from bench.paths import YIELD_EVERY, SinkArgs

    tmp = short_tmp()
    out: dict[str, float] = {}
    try:
        async with meshipc.Mesh(runtime_dir=os.path.join(tmp, "rt")) as mesh:
            call_tx, call_rx = meshipc.channel()
            data_tx, data_rx = meshipc.channel(bytes)
            ctl_tx, ctl_rx = meshipc.channel(int)
            done_tx, done_rx = meshipc.channel(int)
            echo = await mesh.spawn("bench.paths:mesh_echo", call_rx, name="echo")
            sink = await mesh.spawn("bench.paths:mesh_sink", SinkArgs(data_rx, ctl_rx, done_tx), name="sink")
            for _ in range(500):  # warm up both paths
                await call_tx.call(MSG)
            ctl_tx.send(500)
            for _ in range(500):
                data_tx.send(MSG)
            await done_rx.recv()

            c0, w0 = time.process_time(), _proc_cpu(echo.pid)
            for _ in range(n_rtt):
                await call_tx.call(MSG)
            out["rtt"] = (time.process_time() - c0 + _proc_cpu(echo.pid) - w0) / n_rtt * 1e6

            c0, w0 = time.process_time(), _proc_cpu(sink.pid)
            ctl_tx.send(n_oneway)
            for i in range(n_oneway):
                data_tx.send(MSG)
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)
            got = await done_rx.recv()
            out["oneway"] = (time.process_time() - c0 + _proc_cpu(sink.pid) - w0) / n_oneway * 1e6
            if got != n_oneway:
                raise RuntimeError(f"sink counted {got}")
            for tx in (call_tx, data_tx, ctl_tx):
                tx.close()
    finally:
        rmtree(tmp)
    return out


async def _measure_svc(n: int) -> dict[str, float]:
    """CPU µs per ``await conn.call("echo", 64 B)`` to a service process
    (``bench.paths.MeshServicePath``), both processes."""
    from bench.core import MSG
    from bench.paths import MeshServicePath

    path = MeshServicePath()
    await path.start()
    try:
        call = path.conn.call
        for _ in range(500):
            await call("echo", MSG)
        c0, w0 = time.process_time(), _proc_cpu(path.proc.pid)
        for _ in range(n):
            await call("echo", MSG)
        return {"svc": (time.process_time() - c0 + _proc_cpu(path.proc.pid) - w0) / n * 1e6}
    finally:
        await path.stop()
class _SinkLink:
    """A link that keeps nothing: the outbox's, and in ``Engine.links`` (a
    node shares its links; an older engine ignores them and goes through
    the outbox, as it did through the node) the send rows take the path of
    a message to a linked node."""

    def write_data(self, port: bytes, seq: int, kind: int, body: bytes) -> None:
        pass


class _Sink:
    """An outbox that keeps nothing (the micro rows: the engine's own work);
    a plain message goes to its node's link, as ``Node.send_data`` does."""

    def __init__(self) -> None:
        self.links: dict[bytes, _SinkLink] = {}

    def send_event(self, node: bytes, ev: object, fds: list[object]) -> None:
        pass

    def send_data(self, node: bytes, port: bytes, seq: int, kind: int, body: bytes) -> None:
        link = self.links.get(node)
        if link is not None:
            link.write_data(port, seq, kind, body)

    def watch(self, node: bytes) -> None:
        pass

    def backlog(self, node: bytes) -> int:
        return 0

    def watch_backlog(self, node: bytes, below: int, fn: object) -> None:
        pass


def _micro(n: int) -> dict[str, float]:
    """In one process, no socket: ``send_us``, CPU µs of ``Sender.send`` of
    64 bytes to a peer on another node (channel, codec, engine, outbox call);
    ``recv_us``, of ``Engine.receive_data`` plus ``Receiver.try_recv`` of one.
    The best of chunks of 5000 (other load only ever adds)."""
    import threading

    from bench.core import MSG
    from meshipc._channel import Receiver, Sender
    from meshipc._codec import CODEC
    from meshipc._ids import NodeId, PortId
    from meshipc._ports import Engine
    from meshipc._wire import K_DATA

    eng = Engine(NodeId.random(), _Sink(), CODEC)  # type: ignore[arg-type]
    eng.thread = threading.get_ident()
    other = NodeId.random()
    eng.links = eng.out.links = {other: _SinkLink()}  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    tx = Sender._wrap([eng.new_bound(PortId.random(), other, PortId.random())])
    send = tx.send
    chunk = 5000
    best = float("inf")
    for _ in range(max(1, n // chunk)):
        tx = Sender._wrap([eng.new_bound(PortId.random(), other, PortId.random())])  # a fresh window
        send = tx.send
        t0 = time.process_time()
        for _ in range(chunk):
            send(MSG)
        best = min(best, time.process_time() - t0)
    out["send_us"] = best / chunk * 1e6
    port = PortId.random()
    rx = Receiver._wrap([eng.new_bound(port, other, PortId.random())], bytes)
    body = CODEC.encode_plain(MSG) or b""
    receive, recv = eng.receive_data, rx.try_recv
    best = float("inf")
    first = 1
    for _ in range(max(1, n // chunk)):
        t0 = time.process_time()
        for seq in range(first, first + chunk):
            receive(other, port, seq, K_DATA, body)
            recv()
        best = min(best, time.process_time() - t0)
        first += chunk
    out["recv_us"] = best / chunk * 1e6
    return out


def _ops(mode: str, n: int) -> None:
    """n operations of one kind and nothing else, for ``--callgrind``:
    ``send`` (as ``send_us``), ``recv`` (as ``recv_us``), ``run`` (runs of 64
    received in one ``receive_run``, each read: by one ``recv_many`` batch
    where the side has it, else one ``try_recv`` each), ``rtt`` (a call and its reply
    between two engines of ``tests/memnet.py``, frames through the decoder),
    ``fd`` (a message of one ``Fd`` between two such engines, read and closed),
    ``svc`` (a service call between two such engines: ``_svc_ops``)."""
    import threading

    from bench.core import MSG
    from meshipc._channel import Receiver, Sender
    from meshipc._codec import CODEC
    from meshipc._ids import NodeId, PortId
    from meshipc._ports import Engine
    from meshipc._wire import K_DATA

    eng = Engine(NodeId.random(), _Sink(), CODEC)  # type: ignore[arg-type]
    eng.thread = threading.get_ident()
    other = NodeId.random()
    eng.links = eng.out.links = {other: _SinkLink()}  # type: ignore[attr-defined]
    body = CODEC.encode_plain(MSG) or b""
    if mode == "send":
        send = Sender._wrap([eng.new_bound(PortId.random(), other, PortId.random())]).send
        for _ in range(n):
            send(MSG)
    elif mode in ("recv", "run"):
        port = PortId.random()
        rx = Receiver._wrap([eng.new_bound(port, other, PortId.random())], bytes)
        recv = rx.try_recv
        if mode == "recv":
            for seq in range(1, n + 1):
                eng.receive_data(other, port, seq, K_DATA, body)
                recv()
        else:
            many = getattr(rx, "_poll_many", None)  # recv_many's batch (issue 24), if this side has it
            for seq in range(1, n + 1, 64):
                eng.receive_run(other, port, seq, [body] * 64)
                if many is not None:
                    many(64)
                else:
                    for _ in range(64):
                        recv()
    elif mode == "fd":
        sys.path.insert(0, str(ROOT / "tests"))
        from memnet import Net
        from meshipc import Fd

        net = Net(2)
        a, b = net.pair(0, 1)
        ftx, frx = Sender._wrap(a._detach()), Receiver._wrap(b._detach())
        null = os.open(os.devnull, os.O_RDONLY)
        for e in net.engines:
            e.thread = threading.get_ident()
        for _ in range(n):
            ftx.send(Fd(os.dup(null)))
            net.run()
            frx.try_recv().close()
        os.close(null)
    elif mode == "svc":
        asyncio.run(_svc_ops(n))
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from memnet import Net

        net = Net(2)
        a, b = net.pair(0, 1)
        tx, rx2 = Sender._wrap(a._detach()), Receiver._wrap(b._detach())

        async def rtt() -> None:
            for e in net.engines:
                e.thread = threading.get_ident()
            for _ in range(n):
                t = asyncio.ensure_future(tx.call(MSG))
                await asyncio.sleep(0)
                net.run()
                call = rx2.try_recv()
                call.reply(call.request)
                net.run()
                await t

        asyncio.run(rtt())


async def _svc_ops(n: int) -> None:
    """``svc`` of ``_ops``: n calls of a ``serve``d echo handler from a
    ``ServiceSender`` on another engine of ``tests/memnet.py`` (the service's
    reading, dispatch and answer; the caller's envelope), each call driven
    to its reply by loop turns."""
    import threading

    sys.path.insert(0, str(ROOT / "tests"))
    from bench.core import MSG
    from memnet import Net
    from meshipc import _channel
    from meshipc._control_msgs import DEFAULT_CONTROL_LIMITS
    from meshipc._service import Service, ServiceSender

    async def echo(req: object) -> object:
        return req

    net = Net(2)
    for e in net.engines:
        e.thread = threading.get_ident()
    local, _channel._local_engine = _channel._local_engine, net.engines[1]
    try:
        svc = Service(
            "echo", echo, None, None, None, limits=DEFAULT_CONTROL_LIMITS, on_close=lambda s: None
        )
    finally:
        _channel._local_engine = local
    a, b = net.pair(0, 1)
    svc._rx._add(b._detach()[0])
    tx = ServiceSender._wrap(a._detach())
    for _ in range(n):
        t = asyncio.ensure_future(tx.call(MSG))
        while not t.done():
            await asyncio.sleep(0)
            net.run()
        t.result()
    svc.close()


def _instructions(src: str, mode: str, n: int) -> int:
    return _instructions_of(src, f"from bench.ab_cpu import _ops; _ops({mode!r}, {n})")


def _instructions_of(src: str, code: str) -> int:
    """The instructions valgrind counts in ``python -c code`` with ``src`` first
    on the path (child processes run natively, uncounted; stock loop)."""
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT}", PYTHONHASHSEED="0", MESHIPC_UVLOOP="0")
    res = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c", code],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    for line in res.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1])
    raise RuntimeError(res.stderr[-2000:])


def callgrind(a: str, b: str, only: str = "") -> None:
    """Instructions per op (valgrind's count: the same on a busy machine),
    the difference of a short and a long run of each mode."""
    modes = (
        ("send", 2048, 12288),
        ("recv", 2048, 12288),
        ("run", 2048, 12288),
        ("rtt", 500, 3500),
        ("fd", 500, 3500),
        ("svc", 300, 2100),
    )
    for mode, lo, hi in modes:
        if only and mode not in only.split(","):
            continue
        per = []
        for src in (a, b):
            per.append((_instructions(src, mode, hi) - _instructions(src, mode, lo)) / (hi - lo))
        ratio = per[1] / per[0]
        print(f"{mode}: A {per[0]:.0f}  B {per[1]:.0f} instructions/op  B/A {ratio:.3f}", flush=True)


def _one(src: str, n_rtt: int, n_oneway: int, n_svc: int = 0) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT}", MESHIPC_UVLOOP="0")
    mesh = f"r.update(asyncio.run(_measure({n_rtt}, {n_oneway}))); " if n_rtt else ""
    if n_svc:
        mesh += f"r.update(asyncio.run(_measure_svc({n_svc}))); "
        if n_rtt:
            mesh += "r['svc/rtt'] = r['svc'] / r['rtt']; "
    code = (
        "import asyncio, json, sys; from bench.ab_cpu import _measure, _measure_svc, _micro; "
        f"r = _micro({n_oneway}); {mesh}print(json.dumps(r))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise RuntimeError(f"{src}: {res.stderr[-2000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rtt", type=int, default=20000, help="0: the micro rows only")
    ap.add_argument("--oneway", type=int, default=200000)
    ap.add_argument("--svc", type=int, default=0, help="N service conn.call too (0: none)")
    ap.add_argument("--callgrind", action="store_true", help="count instructions (valgrind) instead")
    ap.add_argument("--modes", default="", help="--callgrind: these modes only (e.g. svc,rtt)")
    args = ap.parse_args()
    if args.callgrind:
        callgrind(args.a, args.b, args.modes)
        return
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        order = [("A", args.a), ("B", args.b)] if r % 2 == 0 else [("B", args.b), ("A", args.a)]
        for side, src in order:
            got = _one(src, args.rtt, args.oneway, args.svc)
            runs[side].append(got)
            print(f"round {r} {side}: " + " ".join(f"{k}={v:.2f}" for k, v in got.items()), flush=True)
    keys = ("rtt", "oneway", "send_us", "recv_us") if args.rtt else ("send_us", "recv_us")
    if args.svc:
        keys += ("svc", "svc/rtt") if args.rtt else ("svc",)
    for key in keys:
        a = statistics.median(x[key] for x in runs["A"])
        b = statistics.median(x[key] for x in runs["B"])
        lo_a = min(x[key] for x in runs["A"])
        lo_b = min(x[key] for x in runs["B"])
        print(
            f"{key}: median A {a:.3f} µs  B {b:.3f} µs  B/A {b / a:.3f};"
            f"  min A {lo_a:.3f}  B {lo_b:.3f}  B/A {lo_b / lo_a:.3f}"
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
