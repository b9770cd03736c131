"""Cost of the portable mode's out-of-band bodies against Linux's memfd:
round trips of 16 MiB messages (``await tx.call(body)`` to a spawned worker
that replies with the request, so each round trip moves 32 MiB through two
bodies), in the same run.

    python bench/bench_bodies.py [--runs 5] [--n 20] [--size-mib 16]

Each run measures both modes once, in alternating order, each in a fresh
interpreter (the platform is chosen at import: ``MESHIPC_PORTABLE=0`` gives
the sealed memfd, mapped on receipt; ``MESHIPC_PORTABLE=1`` the unlinked
temporary file, copied with ``pread``); the table gives the median wall
time and CPU time (this process and the worker, all threads) per round
trip and the ratios portable/memfd. Not collected by pytest (lives in
bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import meshipc


async def echo(rx: meshipc.Receiver[Any]) -> None:
    async for call in rx:
        call.reply(call.request)


async def one_mode(n: int, size: int) -> dict[str, Any]:
    from meshipc._platform import PLATFORM

    body = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="b", dir="/tmp") as d:
        async with meshipc.Mesh(runtime_dir=d) as mesh:
            tx, rx = meshipc.channel()
            proc = await mesh.spawn("bench_bodies:echo", rx)
            assert await tx.call(body) == body  # warm up (and check)
            c0, w0 = time.process_time(), _proc_cpu(proc.pid)
            t0 = time.perf_counter()
            for _ in range(n):
                await tx.call(body)
            dt = time.perf_counter() - t0
            cpu = time.process_time() - c0 + _proc_cpu(proc.pid) - w0
            tx.close()
    return {"mode": PLATFORM.name, "oob": PLATFORM.oob, "per_call": dt / n, "cpu_per_call": cpu / n}


def _proc_cpu(pid: int | None) -> float:
    """User + system seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(portable: bool, n: int, size: int) -> dict[str, Any]:
    env = dict(os.environ, MESHIPC_PORTABLE="1" if portable else "0")
    here = str(Path(__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join([here, *sys.path])
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--n", str(n), "--size", str(size)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=here,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--size-mib", type=int, default=16)
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    size = args.size or args.size_mib * 1024 * 1024
    if args.child:
        print(json.dumps(meshipc.run(one_mode(args.n, size))))
        return
    times: dict[str, list[float]] = {"memfd": [], "file": []}
    cpus: dict[str, list[float]] = {"memfd": [], "file": []}
    for i in range(args.runs):
        for portable in (False, True) if i % 2 == 0 else (True, False):
            r = measure(portable, args.n, size)
            times[r["oob"]].append(r["per_call"])
            cpus[r["oob"]].append(r["cpu_per_call"])
    mib = size / (1024 * 1024)
    print(f"{mib:g} MiB round trips ({args.n} per run, {args.runs} runs, median [min-max]):")
    med, cpu = {}, {}
    for oob, label in (("memfd", "linux (sealed memfd, mapped)"), ("file", "portable (unlinked file)")):
        v, c = times[oob], cpus[oob]
        med[oob], cpu[oob] = statistics.median(v), statistics.median(c)
        print(
            f"  {label:30} {med[oob] * 1e3:7.2f} ms  [{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}]"
            f"  {2 * mib / med[oob]:7.0f} MiB/s  CPU {cpu[oob] * 1e3:7.2f} ms"
        )
    wall_ratio, cpu_ratio = med["file"] / med["memfd"], cpu["file"] / cpu["memfd"]
    print(f"  ratio portable/memfd: wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x")


if __name__ == "__main__":
    main()
