"""``meshipc.sync`` against the async API, A against B, in one run.

    python bench/ab_sync.py SRC_A SRC_B [--rounds 3] [--calls 3000]
    python bench/ab_sync.py SRC_A SRC_B --callgrind

One measurement, in a fresh interpreter with ``SRC`` first on the path: a
service process (``bench.paths.sync_service``, an ``echo``), then the same
64-byte call to it through ``meshipc.sync`` (``conn.open("echo")``, then
``tx.call(msg)``) and through ``meshipc.connect`` (``await tx.call(msg)``):
CPU µs per call of both processes (the client's ``time.process_time()``
plus the service's user+system time), and wall µs. The sides run
interleaved, ``--rounds`` times each; printed: the medians, B/A, and each
side's sync/async CPU ratio per run (the figure the issue's target is
about: the same operation, the same service, the same run). Stock loop.

``--callgrind`` counts the client's instructions per call instead (valgrind;
the service is not traced): the difference of a short and a long run, which
other load on the machine does not move.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _measure(n: int, which: str) -> dict[str, float]:
    import meshipc
    import meshipc.sync
    from bench.ab_cpu import _proc_cpu
    from bench.paths import MSG, _wait_ready, ctx, sync_service

    rd = tempfile.mkdtemp(prefix="absync", dir="/tmp")
    name = f"absync{os.getpid()}"
    ready = ctx().Event()
    proc = ctx().Process(target=sync_service, args=(name, rd, ready), daemon=True)
    proc.start()
    _wait_ready(ready, "meshipc")
    out: dict[str, float] = {}

    def timed(key: str, c0: float, s0: float, w0: float) -> None:
        out[f"{key}_cpu"] = (time.process_time() - c0 + _proc_cpu(proc.pid) - s0) / n * 1e6
        out[f"{key}_wall"] = (time.perf_counter() - w0) / n * 1e6

    try:
        if which in ("both", "sync"):
            with meshipc.sync.connect(name, runtime_dir=rd) as conn:
                tx = conn.open("echo")
                for _ in range(200):
                    tx.call(MSG)
                c0, s0, w0 = time.process_time(), _proc_cpu(proc.pid), time.perf_counter()
                for _ in range(n):
                    tx.call(MSG)
                timed("sync", c0, s0, w0)
                tx.close()

        async def main() -> None:
            async with meshipc.connect(name, runtime_dir=rd) as conn:
                tx = await conn.open("echo")
                for _ in range(200):
                    await tx.call(MSG)
                c0, s0, w0 = time.process_time(), _proc_cpu(proc.pid), time.perf_counter()
                for _ in range(n):
                    await tx.call(MSG)
                timed("async", c0, s0, w0)
                tx.close()

        if which in ("both", "async"):
            asyncio.run(main())
    finally:
        proc.terminate()
        proc.join()
    return out


def _env(src: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT}", PYTHONHASHSEED="0", MESHIPC_UVLOOP="0")


def _one(src: str, n: int) -> dict[str, Any]:
    code = f"import json; from bench.ab_sync import _measure; print(json.dumps(_measure({n}, 'both')))"
    res = subprocess.run(
        [sys.executable, "-c", code], env=_env(src), capture_output=True, text=True, timeout=600, check=True
    )
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def _instructions(src: str, which: str, n: int) -> int:
    code = f"from bench.ab_sync import _measure; _measure({n}, {which!r})"
    res = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c", code],
        env=_env(src),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    for line in res.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1])
    raise RuntimeError(res.stderr[-2000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--callgrind", action="store_true", help="count the client's instructions (valgrind)")
    args = ap.parse_args()
    sides = (args.a, args.b)
    if args.callgrind:
        lo, hi = 300, 1300
        for which in ("sync", "async"):
            per = [(_instructions(s, which, hi) - _instructions(s, which, lo)) / (hi - lo) for s in sides]
            print(f"{which}: A {per[0]:.0f}  B {per[1]:.0f} client instr/call  B/A {per[1] / per[0]:.3f}")
        return
    runs: dict[str, list[dict[str, Any]]] = {args.a: [], args.b: []}
    for _ in range(args.rounds):
        for src in (args.a, args.b):
            runs[src].append(_one(src, args.calls))
    for key in ("sync_cpu", "async_cpu", "sync_wall", "async_wall"):
        a, b = (statistics.median(r[key] for r in runs[s]) for s in (args.a, args.b))
        print(f"{key:10s} A {a:8.1f}  B {b:8.1f} µs/call  B/A {b / a:.3f}")
    for name, src in (("A", args.a), ("B", args.b)):
        ratios = [round(r["sync_cpu"] / r["async_cpu"], 3) for r in runs[src]]
        print(f"{name} sync/async CPU per run: {ratios}")


if __name__ == "__main__":
    main()
