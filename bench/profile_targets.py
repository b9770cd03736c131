"""Where the time and memory go for the targets the suite reports missed.

    python bench/profile_targets.py memory [N]     tracemalloc in a service while N clients attach
    python bench/profile_targets.py rtt            cProfile of 64 B round trips (caller; echo worker)
    python bench/profile_targets.py throughput     cProfile of 64 B one-way sends (sender; sink worker)
    python bench/profile_targets.py large          16 MiB: the cost of each copy, and cProfile of both sides
    python bench/profile_targets.py fd             cProfile of fd-carrying sends (sender; sink worker)
    python bench/profile_targets.py carrier [tp]   rtt (or throughput) with the worker spawned via
                                                   meshipc.command (python -m meshipc.remote)
    python bench/profile_targets.py import         the biggest self times of loading all of meshipc
    python bench/profile_targets.py cold           the same for the `meshipc call` command

Worker sides are profiled in the worker (``BENCH_PROFILE`` names the stats
file; workers inherit the environment). Stock asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import meshipc
from bench.core import MSG, short_tmp
from bench.paths import SinkArgs, mesh_echo, mesh_fd_sink, mesh_sink


def show(stats: pstats.Stats | cProfile.Profile, title: str, n: int = 14) -> None:
    s = io.StringIO()
    st = stats if isinstance(stats, pstats.Stats) else pstats.Stats(stats, stream=s)
    st.stream = s  # type: ignore[attr-defined]
    st.sort_stats("tottime").print_stats(n)
    print(f"=== {title}")
    lines = s.getvalue().splitlines()
    start = next((i for i, x in enumerate(lines) if "ncalls" in x), 0)
    for line in lines[start - 2 : start + n + 1]:
        print(line[:160])


def _profiled_worker(fn: Any, arg: Any) -> Any:
    async def run() -> None:
        pr = cProfile.Profile()
        pr.enable()
        try:
            await fn(arg)
        finally:
            pr.disable()
            pr.dump_stats(os.environ["BENCH_PROFILE"])

    return run()


async def prof_echo(rx: meshipc.Receiver[Any]) -> None:
    await _profiled_worker(mesh_echo, rx)


async def prof_sink(arg: SinkArgs) -> None:
    await _profiled_worker(mesh_sink, arg)


async def prof_fd_sink(arg: dict[str, Any]) -> None:
    await _profiled_worker(mesh_fd_sink, arg)


async def profile_two_sides(what: str, via: Any = None) -> None:
    stats = tempfile.mktemp(suffix=".prof")
    os.environ["BENCH_PROFILE"] = stats
    os.environ["MESHIPC_UVLOOP"] = "0"
    tmp = short_tmp()
    async with meshipc.Mesh(runtime_dir=os.path.join(tmp, "rt")) as mesh:
        pr = cProfile.Profile()
        if what == "rtt":
            tx, rx = meshipc.channel()
            proc = await mesh.spawn("bench.profile_targets:prof_echo", rx, via=via)
            for _ in range(500):
                await tx.call(MSG)
            n = 20_000
            t0 = time.perf_counter()
            pr.enable()
            for _ in range(n):
                await tx.call(MSG)
            pr.disable()
            print(f"{(time.perf_counter() - t0) / n * 1e6:.1f} µs per call (profiled)")
            tx.close()
        elif what in ("throughput", "large"):
            size, n = (64, 200_000) if what == "throughput" else (16 << 20, 12)
            data_tx, data_rx = meshipc.channel(bytes)
            ctl_tx, ctl_rx = meshipc.channel(int)
            done_tx, done_rx = meshipc.channel(int)
            proc = await mesh.spawn(
                "bench.profile_targets:prof_sink", SinkArgs(data_rx, ctl_rx, done_tx), via=via
            )
            blob = MSG if size == 64 else os.urandom(size)
            t0 = time.perf_counter()
            pr.enable()
            if size == 64:
                ctl_tx.send(n)
                for i in range(n):
                    data_tx.send(blob)
                    if i % 256 == 255:
                        await asyncio.sleep(0)
                await done_rx.recv()
            else:
                ctl_tx.send(-n)
                for i in range(n):
                    if i >= 2:
                        await done_rx.recv()
                    data_tx.send(blob)
                for _ in range(2):
                    await done_rx.recv()
            pr.disable()
            dt = time.perf_counter() - t0
            print(f"{n / dt:,.0f} msg/s, {n * size / dt / 1e6:,.0f} MB/s (profiled)")
            for t in (data_tx, ctl_tx):
                t.close()
        else:  # fd
            tx, rx = meshipc.channel()
            ctl_tx, ctl_rx = meshipc.channel(int)
            done_tx, done_rx = meshipc.channel(int)
            arg = {"rx": rx, "ctl": ctl_rx, "done": done_tx}
            proc = await mesh.spawn("bench.profile_targets:prof_fd_sink", arg)
            dn = os.open(os.devnull, os.O_RDONLY)
            n = 40_000
            t0 = time.perf_counter()
            pr.enable()
            ctl_tx.send(n)
            for i in range(n):
                tx.send(meshipc.Fd(os.dup(dn)))
                if i % 256 == 255:
                    await tx.drain()
            await done_rx.recv()
            pr.disable()
            print(f"{n / (time.perf_counter() - t0):,.0f} msg/s (profiled)")
            for t in (tx, ctl_tx):
                t.close()
        await proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    show(pr, f"{what}: this process (caller / sender)")
    show(pstats.Stats(stats), f"{what}: the worker (callee / receiver)")
    os.unlink(stats)


def large_copies() -> None:
    """The cost of each step a 16 MiB bytes body takes, alone."""
    import mmap

    import msgspec

    from meshipc._platform import PLATFORM

    size, k = 16 << 20, 10
    blob = os.urandom(size)
    enc = msgspec.msgpack.encode(blob)

    def t(fn: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) / k * 1e3

    memfds = [PLATFORM.make_body(enc) for _ in range(k)]
    it = iter(memfds)
    print("=== large: one 16 MiB message, ms per step (alone, this process)")
    print(f"  msgspec encode (bytes -> msgpack)  {t(lambda: msgspec.msgpack.encode(blob)):7.2f}")
    print(f"  make_body (memfd + write + seal)   {t(lambda: os.close(PLATFORM.make_body(enc))):7.2f}")
    print(f"  read_body (pread, checked)         {t(lambda: PLATFORM.read_body(next(it), len(enc))):7.2f}")
    print(f"  msgspec decode (msgpack -> bytes)  {t(lambda: msgspec.msgpack.decode(enc)):7.2f}")
    print(f"  bytes copy (memcpy reference)      {t(lambda: bytearray(blob)):7.2f}")
    fd = os.memfd_create("x")
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as m:
        print(f"  memcpy into a reused mapping       {t(lambda: m.__setitem__(slice(0, size), blob)):7.2f}")
    os.close(fd)
    for body_fd in memfds:
        os.close(body_fd)


def memory(n: int) -> None:
    from bench.core import rss_kib
    from bench.procs import HOLD_MESH

    async def main() -> None:
        tmp = short_tmp()
        name = f"prof-{os.getpid()}"
        async with meshipc.Mesh(name=name, runtime_dir=tmp) as mesh:
            listener = await mesh.listen()

            tasks = set()

            async def serve() -> None:
                async for conn in listener:
                    t = asyncio.create_task(pinger(conn))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)

            async def pinger(conn: Any) -> None:
                with contextlib.suppress(meshipc.MeshError):
                    async for msg in conn.port:
                        conn.port.send(msg)

            task = asyncio.create_task(serve())

            async def attach(k: int) -> asyncio.subprocess.Process:
                h = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    HOLD_MESH,
                    name,
                    tmp,
                    str(k),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                assert h.stdout is not None and h.stdin is not None
                await h.stdout.readline()
                h.stdin.write(b"go\n")
                await h.stdin.drain()
                await h.stdout.readline()
                return h

            w = await attach(1)
            assert w.stdin is not None
            w.stdin.close()
            await w.wait()
            await asyncio.sleep(0.3)
            tracemalloc.start(12)
            snap0, rss0 = tracemalloc.take_snapshot(), rss_kib(os.getpid())
            holders = [await attach(n // 4) for _ in range(4)]
            await asyncio.sleep(2.0)  # idle: control sessions are set up 50 ms after a node joins
            snap1, rss1 = tracemalloc.take_snapshot(), rss_kib(os.getpid())
            diff = snap1.compare_to(snap0, "lineno")
            total = sum(d.size_diff for d in diff)
            print(f"=== memory: {n} idle attached clients")
            print(
                f"  RSS growth {(rss1 - rss0) / n:.1f} KiB per client; Python allocations "
                f"(tracemalloc) {total / 1024 / n:.1f} KiB per client"
            )
            for d in diff[:12]:
                fr = d.traceback[0]
                print(
                    f"  {d.size_diff / 1024 / n:7.2f} KiB/client  {d.count_diff / n:6.1f} blocks/client  "
                    f"{Path(fr.filename).name}:{fr.lineno}"
                )
            for h in holders:
                assert h.stdin is not None
                h.stdin.close()
            for h in holders:
                await h.wait()
            task.cancel()
        shutil.rmtree(tmp, ignore_errors=True)

    asyncio.run(main())


def importtime(argv: list[str], title: str) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True)
    rows = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self" not in line:
            self_us, cum_us, mod = line[len("import time:") :].split("|")
            rows.append((int(self_us), int(cum_us), mod.rstrip()))
    total = max(c for _, c, _ in rows) if rows else 0
    spent = sum(s for s, _, _ in rows) / 1e3
    print(f"=== {title}: {spent:.1f} ms importing (largest single tree {total / 1e3:.1f} ms)")
    for s, c, mod in sorted(rows, reverse=True)[:15]:
        print(f"  self {s / 1e3:6.2f} ms  cumulative {c / 1e3:6.2f} ms  {mod.strip()}")


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else "rtt"
    if what == "memory":
        memory(int(sys.argv[2]) if len(sys.argv) > 2 else 100)
    elif what == "large":
        large_copies()
        asyncio.run(profile_two_sides("large"))
    elif what in ("rtt", "throughput", "fd"):
        asyncio.run(profile_two_sides(what))
    elif what == "carrier":
        from bench.carrier import far_command

        via = meshipc.command(far_command("meshipc.remote"), label="command:profile")
        tp = len(sys.argv) > 2 and sys.argv[2] == "tp"
        asyncio.run(profile_two_sides("throughput" if tp else "rtt", via))
    elif what == "import":
        everything = "import meshipc; [getattr(meshipc, n) for n in meshipc.__all__]"
        importtime(["-c", everything], "load all of meshipc")
    elif what == "cold":
        importtime(["-m", "meshipc", "call", "nonexistent-mesh", "echo"], "meshipc call (imports)")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
