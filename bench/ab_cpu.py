"""CPU per message, A against B, in one run: process CPU time, not wall.

    python bench/ab_cpu.py SRC_A SRC_B [--rounds 5] [--rtt N] [--oneway N]
    python bench/ab_cpu.py SRC_A SRC_B --callgrind

Runs ``measure`` in a fresh interpreter with ``SRC_A`` (then ``SRC_B``, then
A again ...) first on the path, ``--rounds`` times each, interleaved, and
prints the median CPU µs per op of each side and the ratio B/A (also of
the in-process ``_micro`` rows, which other load on the machine barely
moves). One
measurement: a mesh, the echo and sink workers of ``bench.paths``; ``rtt``
is N 64-byte RPC round trips, ``oneway`` N 64-byte one-way sends; CPU is
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
    ``fd`` (a message of one ``Fd`` between two such engines, read and closed)."""
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


def _instructions(src: str, mode: str, n: int) -> int:
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT}", PYTHONHASHSEED="0")
    code = f"from bench.ab_cpu import _ops; _ops({mode!r}, {n})"
    res = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c", code],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    for line in res.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1])
    raise RuntimeError(res.stderr[-2000:])


def callgrind(a: str, b: str) -> None:
    """Instructions per op (valgrind's count: the same on a busy machine),
    the difference of a short and a long run of each mode."""
    modes = (
        ("send", 2048, 12288),
        ("recv", 2048, 12288),
        ("run", 2048, 12288),
        ("rtt", 500, 3500),
        ("fd", 500, 3500),
    )
    for mode, lo, hi in modes:
        per = []
        for src in (a, b):
            per.append((_instructions(src, mode, hi) - _instructions(src, mode, lo)) / (hi - lo))
        ratio = per[1] / per[0]
        print(f"{mode}: A {per[0]:.0f}  B {per[1]:.0f} instructions/op  B/A {ratio:.3f}", flush=True)


def _one(src: str, n_rtt: int, n_oneway: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT}", MESHIPC_UVLOOP="0")
    mesh = f"r.update(asyncio.run(_measure({n_rtt}, {n_oneway}))); " if n_rtt else ""
    code = (
        "import asyncio, json, sys; from bench.ab_cpu import _measure, _micro; "
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
    ap.add_argument("--callgrind", action="store_true", help="count instructions (valgrind) instead")
    args = ap.parse_args()
    if args.callgrind:
        callgrind(args.a, args.b)
        return
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        order = [("A", args.a), ("B", args.b)] if r % 2 == 0 else [("B", args.b), ("A", args.a)]
        for side, src in order:
            got = _one(src, args.rtt, args.oneway)
            runs[side].append(got)
            print(f"round {r} {side}: " + " ".join(f"{k}={v:.2f}" for k, v in got.items()), flush=True)
    for key in ("rtt", "oneway", "send_us", "recv_us") if args.rtt else ("send_us", "recv_us"):
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
