"""meshipc against its peers, same run, same machine.

    python -m bench [--quick] [--json FILE] [--chart FILE.png] [--markdown FILE|-]
    python bench/run.py ...                      (the same)
    python -m bench --from-json FILE --markdown -   (re-render a saved run)

Runs every benchmark (``--only KEY,...`` for some: see ``--list``),
interleaving meshipc and each peer in a rotating order so that drift (other
load on the machine) hits both, and prints a table of medians with their
spread (min-max over the runs): one row per comparison with meshipc's
figure, the peer's and the ratio meshipc/peer, then the targets (met /
missed). A peer that is not installed is skipped with a note
(``pip install -e '.[bench,fast]'`` installs them all). ``--quick`` is a
~one-minute subset with fewer runs and smaller counts; a full run takes a few
minutes on 2 CPUs.

Every path's measuring side runs in a process of its own (see core.py), so
each uses the event loop it names (``MESHIPC_UVLOOP`` is set for meshipc's
workers accordingly). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.core import ROOT, Driver, PathFailed, summary

INF = float("inf")


def have(mod: str) -> bool:
    """Whether ``mod`` can be imported (``a.b`` with ``a`` missing: no)."""
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


PEER_MODULES = {
    "zmq": "pyzmq",
    "Pyro5": "Pyro5",
    "grpc": "grpcio",
    "uvloop": "uvloop",
    "matplotlib": "matplotlib",
}

# ------------------------------------------------------------------ configuration

FULL = {
    "runs": 9,
    "rtt_n": 3000,
    "idle_n": 30,
    "tp_n": 100_000,
    "large": {1 << 20: 64, 16 << 20: 8},
    "fd_n": 20_000,
    "fail_trials": 7,
    "attach_runs": 15,
    "import_runs": 15,
    "many": (1, 10, 100, 1000),
    "workers": (1, 2, 4, 8, 16),
    "workers_runs": 3,
    "workers_n": 20_000,
    "inspect_k": 11,
}
QUICK = {
    "runs": 3,
    "rtt_n": 1000,
    "idle_n": 15,
    "tp_n": 30_000,
    "large": {1 << 20: 16, 16 << 20: 3},
    "fd_n": 5_000,
    "fail_trials": 3,
    "attach_runs": 3,
    "import_runs": 5,
    "many": (1, 10, 100),
    "workers": (1, 4, 16),
    "workers_runs": 1,
    "workers_n": 5_000,
    "inspect_k": 5,
}
BOUND = 2.0  # failure detection: a call still pending this long after the kill "hangs"
GAP = 0.010  # latency after idle: seconds between calls

BENCHES = {
    "rtt": "RPC round trip, 64 B request and reply",
    "idle": f"Round trip after idle ({GAP * 1e3:.0f} ms between calls)",
    "throughput": "One-way throughput, 64 B typed messages",
    "large_1m": "Large messages, 1 MiB",
    "large_16m": "Large messages, 16 MiB",
    "fd": "fd passing, one fd per message",
    "failure": "Failure detection: SIGKILL of the callee -> pending call fails",
    "attach": "Attach: running client connects, first reply",
    "cold": "Cold command: process start to exit, one call",
    "startup": "Start-up: python -c 'import X'",
    "many_time": "Attach N clients at once: time to all replied",
    "many_mem": "Service memory per idle attached client (RSS growth / N)",
    "workers": "RPC throughput with W worker processes",
    "inspect": "inspect time with W workers",
    "carrier_rtt": "Command carrier: RPC round trip, 64 B",
    "carrier_tp": "Command carrier: one-way throughput, 64 B typed messages",
    "tls_rtt": "TLS (connect_tls): service call round trip, 64 B",
    "spawn16": "Spawn 16 workers at once, each ready to answer (CPU per worker)",
}
UNITS = {
    "rtt": ("µs", "lower"),
    "idle": ("µs", "lower"),
    "throughput": ("msg/s", "higher"),
    "large_1m": ("MB/s", "higher"),
    "large_16m": ("MB/s", "higher"),
    "fd": ("msg/s", "higher"),
    "failure": ("ms", "lower"),
    "attach": ("ms", "lower"),
    "cold": ("ms", "lower"),
    "startup": ("ms", "lower"),
    "many_time": ("ms", "lower"),
    "many_mem": ("KiB", "lower"),
    "workers": ("calls/s", "higher"),
    "inspect": ("ms", "lower"),
    "carrier_rtt": ("µs", "lower"),
    "carrier_tp": ("msg/s", "higher"),
    "tls_rtt": ("µs", "lower"),
    "spawn16": ("ms", "lower"),
}
GROUPS = {
    "ipc": ("rtt", "idle", "throughput", "large_1m", "large_16m", "fd"),
    "failure": ("failure",),
    "attach": ("attach", "cold"),
    "startup": ("startup",),
    "many": ("many_time", "many_mem"),
    "workers": ("workers", "inspect"),
    "carrier": ("carrier_rtt", "carrier_tp"),
    "tls": ("tls_rtt",),
    "spawn": ("spawn16",),
}

M_STOCK, M_UV, M_SYNC = "meshipc (stock loop)", "meshipc (uvloop)", "meshipc.sync"
M_SVC = "meshipc conn.call (service)"
PIPE, MPC, RED = "multiprocessing.Pipe", "multiprocessing.connection (authkey)", "multiprocessing.reduction"
ST_STOCK, ST_UV = "asyncio streams (stock loop)", "asyncio streams (uvloop)"
ZMQ, PYRO, GRPC = "pyzmq ipc://", "Pyro5 (Unix socket)", "gRPC aio (Unix socket)"
FLOOR, FLOOR_UV = (
    "floor: asyncio.Protocol + msgspec (stock loop)",
    "floor: asyncio.Protocol + msgspec (uvloop)",
)

SP_Z, SP_EXEC = "meshipc spawn (zygote)", 'meshipc spawn (start="exec")'
SP_POOL = "ProcessPoolExecutor (forkserver)"
TLS_STOCK, TLS_UV = "meshipc via connect_tls (stock loop)", "meshipc via connect_tls (uvloop)"
TLS_RAW, TLS_RAW_UV = "raw TLS echo (stock loop)", "raw TLS echo (uvloop)"

# name -> (driver spec, kwargs, loop, is meshipc, needed module)
IPC_PATHS: dict[str, tuple[str, dict[str, Any], str | None, bool, str | None]] = {
    M_STOCK: ("bench.paths:MeshPath", {}, "asyncio", True, None),
    M_UV: ("bench.paths:MeshPath", {}, "uvloop", True, "uvloop"),
    M_SYNC: ("bench.paths:MeshSyncPath", {}, "asyncio", True, None),
    M_SVC: ("bench.paths:MeshServicePath", {}, "asyncio", True, None),
    PIPE: ("bench.paths:PipePath", {}, None, False, None),
    MPC: ("bench.paths:ListenerPath", {}, None, False, None),
    ST_STOCK: ("bench.paths:StreamPath", {"loop": "asyncio"}, "asyncio", False, None),
    ST_UV: ("bench.paths:StreamPath", {"loop": "uvloop"}, "uvloop", False, "uvloop"),
    ZMQ: ("bench.paths:ZmqPath", {}, None, False, "zmq"),
    PYRO: ("bench.paths:PyroPath", {}, None, False, "Pyro5"),
    GRPC: ("bench.paths:GrpcPath", {}, "asyncio", False, "grpc"),
    RED: ("bench.paths:ReductionPath", {}, None, False, None),
    FLOOR: ("bench.paths:FloorPath", {"loop": "asyncio"}, "asyncio", False, None),
    FLOOR_UV: ("bench.paths:FloorPath", {"loop": "uvloop"}, "uvloop", False, "uvloop"),
}
RPC_SET = [M_STOCK, M_UV, M_SYNC, M_SVC, PIPE, MPC, ST_STOCK, ST_UV, ZMQ, PYRO, GRPC, FLOOR, FLOOR_UV]
RPC_PAIRS = [
    (M_STOCK, FLOOR),
    (M_UV, FLOOR_UV),
    (M_SVC, M_STOCK),
    (M_SYNC, M_STOCK),
    *((M_STOCK, p) for p in (PIPE, MPC, ST_STOCK, ZMQ, PYRO, GRPC)),
    (M_UV, ST_UV),
    (M_UV, ZMQ),
    (M_SYNC, PIPE),
    (M_SYNC, MPC),
    (M_SYNC, PYRO),
    (M_SVC, PIPE),
    (M_SVC, ST_STOCK),
]
TP_SET = [M_STOCK, M_UV, PIPE, ZMQ, ST_STOCK, ST_UV, FLOOR, FLOOR_UV]
TP_PAIRS = [
    (M_STOCK, FLOOR),
    (M_UV, FLOOR_UV),
    (M_STOCK, PIPE),
    (M_STOCK, ZMQ),
    (M_STOCK, ST_STOCK),
    (M_UV, ZMQ),
    (M_UV, ST_UV),
]
LARGE_SET = [M_STOCK, PIPE, ST_STOCK, ZMQ]
LARGE_PAIRS = [(M_STOCK, p) for p in (PIPE, ST_STOCK, ZMQ)]

FAIL_PATHS: dict[str, tuple[str, dict[str, Any], str | None, bool, str | None]] = {
    M_STOCK: ("bench.failure:MeshFail", {}, "asyncio", True, None),
    PIPE: ("bench.failure:PipeFail", {}, None, False, None),
    MPC: ("bench.failure:ListenerFail", {}, None, False, None),
    ST_STOCK: ("bench.failure:StreamFail", {}, "asyncio", False, None),
    ZMQ: ("bench.failure:ZmqFail", {}, None, False, "zmq"),
    PYRO: ("bench.failure:PyroFail", {}, None, False, "Pyro5"),
    GRPC: ("bench.failure:GrpcFail", {}, "asyncio", False, "grpc"),
}

#: (label, bench, meshipc path, peer path or None, "<=" or ">=" or "<", threshold[, metric]):
#: the ratio meshipc/peer (or meshipc's own figure without a peer) of the wall
#: figure, or with metric "cpu" of the CPU time per operation (issue 24: the
#: figure that travels from machine to machine; lower is better).
TARGETS: list[tuple[Any, ...]] = [
    ("CPU per round trip <= 1.3x the floor (stock loop)", "rtt", M_STOCK, FLOOR, "<=", 1.3, "cpu"),
    ("CPU per round trip, uvloop <= 2.5x the uvloop floor", "rtt", M_UV, FLOOR_UV, "<=", 2.5, "cpu"),
    ("CPU per service conn.call <= 1.2x a plain worker call", "rtt", M_SVC, M_STOCK, "<=", 1.2, "cpu"),
    (
        "CPU per one-way message <= 1.5x the floor (stock loop)",
        "throughput",
        M_STOCK,
        FLOOR,
        "<=",
        1.5,
        "cpu",
    ),
    ("CPU per meshipc.sync round trip <= 1.2x the async one", "rtt", M_SYNC, M_STOCK, "<=", 1.2, "cpu"),
    ("meshipc.sync round trip <= 2.5x multiprocessing.Pipe (idle machine)", "rtt", M_SYNC, PIPE, "<=", 2.5),
    ("fd passing >= 1.0x multiprocessing.reduction", "fd", M_STOCK, RED, ">=", 1.0),
    ("16 MiB >= 1.0x multiprocessing.Pipe", "large_16m", M_STOCK, PIPE, ">=", 1.0),
    ("import meshipc no slower than import zmq", "startup", "import meshipc", "import zmq", "<=", 1.0),
    (
        "import meshipc <= 1.5x import multiprocessing.connection",
        "startup",
        "import meshipc",
        "import multiprocessing.connection",
        "<=",
        1.5,
    ),
    (
        "attach <= 1.0x multiprocessing.connection",
        "attach",
        "meshipc.connect + call",
        "multiprocessing.connection",
        "<=",
        1.0,
    ),
    ("16 MiB >= 3x multiprocessing.Pipe", "large_16m", M_STOCK, PIPE, ">=", 3.0),
    ("fd passing >= 2.5x multiprocessing.reduction", "fd", M_STOCK, RED, ">=", 2.5),
    ("failure detection < 50 ms", "failure", M_STOCK, None, "<", 50.0),
    ("service memory per idle attached client < 64 KiB", "many_mem", "@largest", None, "<", 64.0),
    ("RPC round trip, stock loop <= 0.9x pyzmq REQ/REP", "rtt", M_STOCK, ZMQ, "<=", 0.9),
    ("RPC round trip, stock loop <= 1.0x raw asyncio streams", "rtt", M_STOCK, ST_STOCK, "<=", 1.0),
    ("RPC round trip, uvloop <= 0.6x pyzmq REQ/REP", "rtt", M_UV, ZMQ, "<=", 0.6),
    ("one-way throughput >= 3.5x multiprocessing.Pipe", "throughput", M_STOCK, PIPE, ">=", 3.5),
    ("one-way throughput >= 1.0x pyzmq PUSH/PULL", "throughput", M_STOCK, ZMQ, ">=", 1.0),
    (
        "command carrier round trip <= 1.3x its raw echo",
        "carrier_rtt",
        "meshipc via command",
        "raw echo",
        "<=",
        1.3,
    ),
    ("TLS round trip, stock loop <= 1.3x a raw TLS echo", "tls_rtt", TLS_STOCK, TLS_RAW, "<=", 1.3),
    ("TLS round trip, uvloop <= 1.3x a raw TLS echo (uvloop)", "tls_rtt", TLS_UV, TLS_RAW_UV, "<=", 1.3),
    (
        "CPU to spawn 16 workers <= 1.5x ProcessPoolExecutor (forkserver)",
        "spawn16",
        SP_Z,
        SP_POOL,
        "<=",
        1.5,
        "cpu",
    ),
    ("spawn 16 workers <= 1.5x ProcessPoolExecutor (forkserver)", "spawn16", SP_Z, SP_POOL, "<=", 1.5),
]


# ------------------------------------------------------------------ results


class Results:
    def __init__(self) -> None:
        self.benches: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []

    def bench(self, key: str, title: str | None = None) -> dict[str, Any]:
        if key not in self.benches:
            unit, better = UNITS[key]
            self.benches[key] = {
                "key": key,
                "title": title or BENCHES[key],
                "unit": unit,
                "better": better,
                "paths": {},
                "pairs": [],
                "notes": [],
            }
        return self.benches[key]

    def add(self, key: str, name: str, values: list[Any], meshipc: bool) -> None:
        """``values``: figures, or (figure, CPU µs per op) pairs (issue 24)."""
        b = self.bench(key)
        figs = [v[0] if isinstance(v, tuple | list) else v for v in values]
        cpus = [v[1] for v in values if isinstance(v, tuple | list) and v[1] is not None]
        b["paths"][name] = {"meshipc": meshipc, **summary(figs)}
        if cpus:
            b["paths"][name]["cpu"] = summary(cpus)

    def pair(self, key: str, m: str, p: str) -> None:
        b = self.bench(key)
        if m in b["paths"] and p in b["paths"] and [m, p] not in b["pairs"]:
            b["pairs"].append([m, p])


def _select(
    table: dict[str, tuple[str, dict[str, Any], str | None, bool, str | None]],
    names: list[str],
    args: argparse.Namespace,
    res: Results,
) -> list[str]:
    out = []
    for name in names:
        mod = table[name][4]
        if args.paths and not any(s in name for s in args.paths):
            continue
        if mod is not None and not have(mod):
            note = f"{name}: skipped ({mod} is not installed: pip install {PEER_MODULES.get(mod, mod)})"
            if note not in res.notes:
                res.notes.append(note)
            continue
        out.append(name)
    return out


def _start(
    table: dict[str, tuple[str, dict[str, Any], str | None, bool, str | None]], names: list[str], res: Results
) -> dict[str, Driver]:
    drivers = {}
    for name in names:
        spec, kw, loop, _, _ = table[name]
        try:
            drivers[name] = Driver(spec, kw, loop)
        except PathFailed as exc:
            res.notes.append(f"{name}: failed to start: {str(exc).splitlines()[0]}")
            print(f"  {name}: failed to start: {exc}", file=sys.stderr)
    return drivers


def _rounds(
    plan: list[tuple[str, list[str], Callable[[str], Any]]],
    runs: int,
    failed: dict[str, str],
    label: str,
) -> dict[tuple[str, str], list[Any]]:
    """``plan``: (bench key, paths, measure(path)); a measure gives the figure
    or (figure, CPU µs per op). Per run, each bench's paths in an order
    rotating by one per run."""
    out: dict[tuple[str, str], list[Any]] = {}
    for run in range(runs):
        t0 = time.perf_counter()
        for key, names, fn in plan:
            k = run % len(names) if names else 0
            for name in names[k:] + names[:k]:
                if name in failed:
                    continue
                try:
                    out.setdefault((key, name), []).append(fn(name))
                except PathFailed as exc:
                    failed[name] = str(exc).splitlines()[0]
                    print(f"  {name}: FAILED {failed[name]}", file=sys.stderr)
        print(f"  {label}: run {run + 1}/{runs} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return out


def _finish(
    res: Results,
    table: dict[str, tuple[str, dict[str, Any], str | None, bool, str | None]],
    data: dict[tuple[str, str], list[Any]],
    failed: dict[str, str],
) -> None:
    for (key, name), values in data.items():
        if name not in failed:
            res.add(key, name, values, table[name][3])
    for name, why in failed.items():
        res.notes.append(f"{name}: failed: {why}")


def group_ipc(cfg: dict[str, Any], args: argparse.Namespace, res: Results, keys: set[str]) -> None:
    want = list(RPC_SET) if keys & {"rtt", "idle"} else []
    for k, s in (
        ("throughput", TP_SET),
        ("large_1m", LARGE_SET),
        ("large_16m", LARGE_SET),
        ("fd", [M_STOCK, RED]),
    ):
        if k in keys:
            want += [n for n in s if n not in want]
    names = _select(IPC_PATHS, want, args, res)
    drivers = _start(IPC_PATHS, names, res)
    try:
        # large bodies: made (and cached) in the warm-up, not in a measured call
        big = [
            ("throughput", (2, z)) for k, z in (("large_1m", 1 << 20), ("large_16m", 16 << 20)) if k in keys
        ]
        for name, d in drivers.items():  # warm-up: imports, connections, caches
            warm = [("rtt", (200,)), ("throughput", (2000, 64)), ("fds", (500,))]
            for method, a in warm + (big if name in LARGE_SET else []):
                try:
                    d.call(method, *a)
                except PathFailed:
                    pass
        live = [n for n in names if n in drivers]
        plan: list[tuple[str, list[str], Callable[[str], Any]]] = []
        rtt_n, idle_n, tp_n = (max(10, int(cfg[k] * args.scale)) for k in ("rtt_n", "idle_n", "tp_n"))
        if "rtt" in keys:
            plan.append(
                ("rtt", [n for n in RPC_SET if n in live], lambda n: drivers[n].measure("rtt", rtt_n, rtt_n))
            )
        if "idle" in keys:
            plan.append(
                (
                    "idle",
                    [n for n in RPC_SET if n in live],
                    lambda n: drivers[n].measure("idle", idle_n, idle_n, GAP),
                )
            )
        if "throughput" in keys:
            plan.append(
                (
                    "throughput",
                    [n for n in TP_SET if n in live],
                    lambda n: drivers[n].measure("throughput", tp_n, tp_n, 64),
                )
            )
        for key, size in (("large_1m", 1 << 20), ("large_16m", 16 << 20)):
            if key in keys:
                cnt = max(2, int(cfg["large"][size] * args.scale))
                plan.append(
                    (
                        key,
                        [n for n in LARGE_SET if n in live],
                        lambda n, cnt=cnt, size=size: drivers[n].measure(
                            "throughput", cnt, cnt, size, scale=size / 1e6
                        ),
                    )
                )
        if "fd" in keys:
            fd_n = max(10, int(cfg["fd_n"] * args.scale))
            plan.append(
                (
                    "fd",
                    [n for n in (M_STOCK, RED) if n in live],
                    lambda n: drivers[n].measure("fds", fd_n, fd_n),
                )
            )
        failed: dict[str, str] = {}
        data = _rounds(plan, args.runs or cfg["runs"], failed, "ipc")
    finally:
        for d in drivers.values():
            d.close()
    _finish(res, IPC_PATHS, data, failed)
    for key, pairs in (
        ("rtt", RPC_PAIRS),
        ("idle", RPC_PAIRS),
        ("throughput", TP_PAIRS),
        ("large_1m", LARGE_PAIRS),
        ("large_16m", LARGE_PAIRS),
        ("fd", [(M_STOCK, RED)]),
    ):
        if key in keys:
            for m, p in pairs:
                res.pair(key, m, p)
    if "rtt" in keys:
        res.bench("rtt")["notes"].append(
            "pyzmq: REQ/REP, blocking calls on both sides; Pyro5: marshal serializer; "
            "gRPC: grpc.aio, generic handler, bytes; meshipc: tx.call() to a spawned worker, "
            "meshipc.sync: a service in another process through conn.open(); meshipc conn.call: "
            "await conn.call('echo', msg) by name from meshipc.connect to that service"
        )
    if "throughput" in keys:
        res.bench("throughput")["notes"].append(
            "meshipc: channel(bytes) (validated by the receiver); pyzmq: PUSH/PULL; counted until "
            "the receiver has read them all"
        )
    for key in ("large_1m", "large_16m"):
        if key in keys:
            res.bench(key)["notes"].append(
                "meshipc keeps 2 messages in flight with acks from the worker, not drain(): drain() "
                "after a message larger than the byte window (2 MiB) does not return until another "
                "message is sent"
            )


def group_failure(cfg: dict[str, Any], args: argparse.Namespace, res: Results, keys: set[str]) -> None:
    names = _select(FAIL_PATHS, list(FAIL_PATHS), args, res)
    drivers = _start(FAIL_PATHS, names, res)
    try:
        failed: dict[str, str] = {}
        data = _rounds(
            [("failure", [n for n in names if n in drivers], lambda n: drivers[n].call("failure", BOUND))],
            args.runs or cfg["fail_trials"],
            failed,
            "failure",
        )
    finally:
        for d in drivers.values():
            d.close()
    _finish(res, FAIL_PATHS, data, failed)
    for n in names[1:]:
        res.pair("failure", M_STOCK, n)
    res.bench("failure")["notes"].append(
        f"one trial per run, a fresh server each; 'hangs' = still pending {BOUND:.0f} s after the kill "
        "(pyzmq REQ has no notion of a dead peer; ends only at its own timeout)"
    )


def _plain(
    res: Results, key: str, paths: dict[str, Callable[[], float]], runs: int, meshipc: Callable[[str], bool]
) -> None:
    failed: dict[str, str] = {}
    data = _rounds([(key, list(paths), lambda n: paths[n]())], runs, failed, key)
    for (k, name), values in data.items():
        if name not in failed:
            res.add(k, name, values, meshipc(name))
    for name, why in failed.items():
        res.notes.append(f"{name}: failed: {why}")


def group_attach(cfg: dict[str, Any], args: argparse.Namespace, res: Results, keys: set[str]) -> None:
    from bench import procs

    want = {"meshipc", "mpc"} | {k for k, m in (("pyro", "Pyro5"), ("grpc", "grpc")) if have(m)}
    for m in ("Pyro5", "grpc"):
        if not have(m):
            res.notes.append(f"{m}: skipped for attach/cold ({PEER_MODULES[m]} is not installed)")
    s = procs.Services(want)
    try:
        runs = args.runs or cfg["attach_runs"]
        if "attach" in keys:
            ap = procs.attach_paths(s)
            for _ in range(1):  # warm the page cache for every client once
                for f in ap.values():
                    f()
            _plain(res, "attach", ap, runs, lambda n: n.startswith("meshipc"))
            for p in ("multiprocessing.connection", "Pyro5", "gRPC"):
                for m in ("meshipc.connect + call", "meshipc.connect + port message"):
                    res.pair("attach", m, p)
            res.bench("attach")["notes"].append(
                "timed inside an already-running client from before connecting to the first reply "
                "(interpreter start and imports not counted); call = conn.call('echo') to a service, "
                "port message = a message on the listener connection's port and its answer"
            )
        if "cold" in keys:
            cp = procs.cold_paths(s)
            _plain(res, "cold", cp, runs, lambda n: n.startswith("meshipc"))
            for p in ("multiprocessing.connection", "Pyro5", "gRPC"):
                res.pair("cold", "meshipc call NAME echo", p)
            res.bench("cold")["notes"].append(
                "`meshipc call NAME echo '\"x\"'` (console script) against `python -c` clients doing the same"
            )
    finally:
        s.close()


def group_startup(cfg: dict[str, Any], args: argparse.Namespace, res: Results, keys: set[str]) -> None:
    from bench import procs

    avail = {k for k in procs.IMPORTS if k.startswith(("python", "import meshipc")) or have(k.split()[1])}
    for k in procs.IMPORTS:
        if k not in avail and k != "python -c pass":
            res.notes.append(f"{k}: skipped (not installed)")
    avail.add("python -c pass")
    _plain(
        res, "startup", procs.import_paths(avail), args.runs or cfg["import_runs"], lambda n: "meshipc" in n
    )
    for m in ("import meshipc", "import meshipc, load all"):
        for p in ("import zmq", "import multiprocessing.connection", "import Pyro5.api", "import grpc"):
            res.pair("startup", m, p)
    res.bench("startup")["notes"].append(
        "wall time of the whole `python -c` process; `python -c pass` for reference; `import meshipc` "
        "loads its submodules on first use, 'load all' touches every public name (what a program "
        "using meshipc pays)"
    )


def group_many(cfg: dict[str, Any], args: argparse.Namespace, res: Results, keys: set[str]) -> None:
    from bench import procs

    for n in cfg["many"]:
        for kind, label in (("meshipc", "meshipc"), ("mpc", "multiprocessing.connection")):
            name = f"{label}, {n} client{'s' if n > 1 else ''}"
            try:
                t, kib = procs.attach_many(kind, n)
            except (PathFailed, AssertionError, OSError) as exc:
                res.notes.append(f"{name}: failed: {exc}")
                continue
            print(f"  many: {name}: {t:.1f} ms, {kib:.1f} KiB/client", file=sys.stderr)
            res.add("many_time", name, [t], kind == "meshipc")
            res.add("many_mem", name, [kib], kind == "meshipc")
        for key in ("many_time", "many_mem"):
            res.pair(
                key,
                f"meshipc, {n} client{'s' if n > 1 else ''}",
                f"multiprocessing.connection, {n} client{'s' if n > 1 else ''}",
            )
    for key in ("many_time", "many_mem"):
        res.bench(key)["notes"].append(
            f"one run; clients attach concurrently from up to {procs.HOLDERS} client processes, "
            "at most 32 at a time each "
            "(meshipc: connect + a port message each; multiprocessing.connection: Client + a message, "
            "served by a thread per client); memory: service RSS after they idle 1 s minus before "
            "(after one warm-up client came and went), divided by N"
        )
    if 1000 not in cfg["many"]:
        res.notes.append("attach N clients: 1,000 clients only in a full run")


def group_workers(cfg: dict[str, Any], args: argparse.Namespace, res: Results, keys: set[str]) -> None:
    from bench import procs

    d = Driver("bench.procs:ScalePath", {}, "asyncio")
    data: dict[str, list[Any]] = {}
    try:
        n = max(100, int(cfg["workers_n"] * args.scale))
        for w in cfg["workers"]:
            ws = f"{w} worker{'s' if w > 1 else ''}"
            for _ in range(args.runs or cfg["workers_runs"]):
                if "workers" in keys:
                    data.setdefault(f"workers|meshipc, {ws}", []).append(d.measure("rpc", n, w, n))
                    data.setdefault(f"workers|ProcessPoolExecutor, {ws}", []).append(
                        d.measure("pool", n, w, n)
                    )
                if "inspect" in keys:
                    data.setdefault(f"inspect|mesh.inspect(), {ws}", []).append(
                        d.measure("inspect", cfg["inspect_k"], w, cfg["inspect_k"])
                    )
            if "inspect" in keys and w == max(cfg["workers"]):
                name, rd = d.call("where")
                data[f"inspect|meshipc inspect NAME -r -j (CLI), {ws}"] = [
                    procs.inspect_cli(name, rd) for _ in range(3)
                ]
            print(f"  workers: {ws} done", file=sys.stderr)
    finally:
        d.close()
    for k, v in data.items():
        key, name = k.split("|")
        res.add(key, name, v, not name.startswith("ProcessPool"))
    if "workers" in keys:
        for w in cfg["workers"]:
            ws = f"{w} worker{'s' if w > 1 else ''}"
            res.pair("workers", f"meshipc, {ws}", f"ProcessPoolExecutor, {ws}")
        res.bench("workers")["notes"].append(
            "8 calls in flight per worker from one asyncio client; meshipc: tx.call() to spawned echo "
            "workers; peer: loop.run_in_executor(ProcessPoolExecutor(W)) of an echo function"
        )
    if "inspect" in keys:
        res.bench("inspect")["notes"].append(
            "mesh.inspect() on the mesh's first node (the full tree), median of "
            f"{cfg['inspect_k']}; the CLI row is the whole command"
        )


CARRIER_PATHS: dict[str, tuple[str, dict[str, Any], str | None, bool, str | None]] = {
    "meshipc via command": ("bench.carrier:CarrierMeshPath", {}, "asyncio", True, None),
    "raw echo": ("bench.carrier:CarrierRawPath", {}, "asyncio", False, None),
}


TLS_PATHS: dict[str, tuple[str, dict[str, Any], str | None, bool, str | None]] = {
    TLS_STOCK: ("bench.bench_tls:TlsMeshPath", {}, "asyncio", True, None),
    TLS_RAW: ("bench.bench_tls:TlsRawPath", {}, "asyncio", False, None),
    TLS_UV: ("bench.bench_tls:TlsMeshPath", {}, "uvloop", True, "uvloop"),
    TLS_RAW_UV: ("bench.bench_tls:TlsRawPath", {"loop": "uvloop"}, "uvloop", False, "uvloop"),
}


def _vs_raw(
    cfg: dict[str, Any],
    args: argparse.Namespace,
    res: Results,
    keys: set[str],
    table: dict[str, tuple[str, dict[str, Any], str | None, bool, str | None]],
    pairs: list[tuple[str, str]],
    label: str,
    note: str,
) -> None:
    """meshipc over a boundary link against the same carrier's raw echo:
    rows ``<label>_rtt`` (round trip) and ``<label>_tp`` (one-way), CPU per op."""
    names = _select(table, list(table), args, res)
    drivers = _start(table, names, res)
    try:
        for d in drivers.values():  # warm-up
            d.call("rtt", 200)
            if f"{label}_tp" in keys:
                d.call("throughput", 2000, 64)
        live = [n for n in names if n in drivers]
        rtt_n, tp_n = (max(10, int(cfg[k] * args.scale)) for k in ("rtt_n", "tp_n"))
        plan: list[tuple[str, list[str], Callable[[str], Any]]] = []
        if f"{label}_rtt" in keys:
            plan.append((f"{label}_rtt", live, lambda n: drivers[n].measure("rtt", rtt_n, rtt_n)))
        if f"{label}_tp" in keys:
            plan.append((f"{label}_tp", live, lambda n: drivers[n].measure("throughput", tp_n, tp_n, 64)))
        failed: dict[str, str] = {}
        data = _rounds(plan, args.runs or cfg["runs"], failed, label)
    finally:
        for d in drivers.values():
            d.close()
    _finish(res, table, data, failed)
    for key in keys:
        for m, p in pairs:
            res.pair(key, m, p)
        res.bench(key)["notes"].append(note)


def group_carrier(cfg: dict[str, Any], args: argparse.Namespace, res: Results, keys: set[str]) -> None:
    """meshipc over the command carrier (``python -m meshipc.remote`` on the
    far end of a subprocess's pipes) against a raw stdio echo started the same way."""
    _vs_raw(
        cfg,
        args,
        res,
        keys,
        CARRIER_PATHS,
        [("meshipc via command", "raw echo")],
        "carrier",
        "both far sides are `env PYTHONPATH=… python -m …` children with pipes: meshipc spawns "
        "bench.paths workers via meshipc.command(python -m meshipc.remote) (a boundary link, a mesh "
        "on each side); the raw echo is bench.carrier speaking [u32 len][data] frames on its stdio",
    )


def group_tls(cfg: dict[str, Any], args: argparse.Namespace, res: Results, keys: set[str]) -> None:
    """A service call through ``meshipc.connect_tls`` against a raw TLS echo
    (bench/bench_tls.py), each loop."""
    _vs_raw(
        cfg,
        args,
        res,
        keys,
        TLS_PATHS,
        [(TLS_STOCK, TLS_RAW), (TLS_UV, TLS_RAW_UV)],
        "tls",
        "a server process (python -m bench.bench_tls --serve) runs a mesh serving echo on "
        "mesh.listen_tls and a raw TLS [u32 len][data] echo with the same authority; meshipc: "
        "conn.open('echo').call(64 B) over connect_tls(grant) (one relay message each way over the "
        "boundary link); raw: open_tls with the grant's certificate and pin",
    )


SPAWN_PATHS: dict[str, tuple[str, dict[str, Any], str | None, bool, str | None]] = {
    SP_Z: ("bench.spawn16:SpawnPath", {"kind": "meshipc"}, "asyncio", True, None),
    SP_EXEC: ("bench.spawn16:SpawnPath", {"kind": "meshipc", "start": "exec"}, "asyncio", True, None),
    SP_POOL: ("bench.spawn16:SpawnPath", {"kind": "pool"}, "asyncio", False, None),
}


def group_spawn(cfg: dict[str, Any], args: argparse.Namespace, res: Results, keys: set[str]) -> None:
    names = _select(SPAWN_PATHS, list(SPAWN_PATHS), args, res)
    drivers = _start(SPAWN_PATHS, names, res)
    failed: dict[str, str] = {}
    n = 16

    def batch(name: str) -> tuple[float, float]:
        d = drivers[name]
        value = d.measure("batch", n, n)
        d.call("reap")
        return value

    try:
        data = _rounds(
            [("spawn16", list(drivers), batch)], args.runs or (3 if args.quick else 7), failed, "spawn"
        )
    finally:
        for d in drivers.values():
            d.close()
    _finish(res, SPAWN_PATHS, data, failed)
    res.pair("spawn16", SP_Z, SP_POOL)
    res.pair("spawn16", SP_EXEC, SP_POOL)
    res.pair("spawn16", SP_Z, SP_EXEC)
    res.bench("spawn16")["notes"].append(
        "ms from the first spawn to the last of 16 answers; CPU per worker: the driver, the zygote or "
        "forkserver and the 16 workers over that span, divided by 16. meshipc: 16 concurrent "
        "mesh.spawn of an echo worker + one tx.call each, one mesh (and zygote) kept across batches; "
        "peer: a new ProcessPoolExecutor(16, forkserver) per batch, 16 tasks that meet at a barrier "
        "(16 distinct workers), the forkserver kept; workers stopped outside the span; one warm-up batch. "
        'The start="exec" row is the path before the zygote (a fresh interpreter per worker): on a '
        "loaded machine its 16 concurrent imports can outlast the node's 10 s handshake timeout, and "
        "the row then fails"
    )


GROUP_FN = {
    "ipc": group_ipc,
    "failure": group_failure,
    "attach": group_attach,
    "startup": group_startup,
    "many": group_many,
    "workers": group_workers,
    "carrier": group_carrier,
    "tls": group_tls,
    "spawn": group_spawn,
}


# ------------------------------------------------------------------ machine


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    libs = {
        k: _version(k) for k in ("meshipc", "msgspec", "uvloop", "pyzmq", "Pyro5", "grpcio", "matplotlib")
    }
    if have("zmq"):
        import zmq

        libs["libzmq"] = zmq.zmq_version()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "loops": "stock asyncio and uvloop (as named per row); peers' blocking paths use no loop",
        "libraries": libs,
        "meshipc_commit": commit,
        "loadavg_start": os.getloadavg(),
    }


# ------------------------------------------------------------------ output


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    if v == INF:
        return f"hangs (>{BOUND:.0f} s)"
    a = abs(v)
    s = f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"
    return s


def figure(p: dict[str, Any]) -> str:
    med = p["median"]
    if med is None:
        return "—"
    if med == INF:
        return fmt(med)
    if p["min"] is None or len(p["samples"]) < 2:
        return fmt(med)
    return f"{fmt(med)} ({fmt(p['min'])}-{fmt(p['max'])})"


def cpu_figure(p: dict[str, Any]) -> str:
    """The path's CPU µs per operation (median, spread), "—" if not measured."""
    return figure(p["cpu"]) if "cpu" in p else "—"


def ratio(b: dict[str, Any], m: str, p: str, metric: str = "wall") -> float | None:
    """meshipc/peer of the medians: of the figure, or (``metric="cpu"``) of CPU per op."""
    if metric == "cpu":
        pm, pp = b["paths"][m].get("cpu"), b["paths"][p].get("cpu")
        if pm is None or pp is None:
            return None
        a, c = pm["median"], pp["median"]
    else:
        a, c = b["paths"][m]["median"], b["paths"][p]["median"]
    if a is None or c is None or not (math.isfinite(a) and math.isfinite(c)) or c == 0:
        return None
    return float(a / c)


def verdict(b: dict[str, Any], r: float | None) -> str:
    if r is None or r <= 0:
        return ""
    faster = r < 1 if b["better"] == "lower" else r > 1
    k = 1 / r if b["better"] == "lower" else r
    if abs(math.log(r)) < 0.03:
        return "same"
    return f"{k:.2f}x better" if faster else f"{1 / k:.2f}x worse"


def rows(data: dict[str, Any]) -> list[list[str]]:
    out = []
    for b in data["benches"].values():
        title = f"{b['title']} [{b['unit']}, {b['better']} is better]"
        paired = {m for m, _ in b["pairs"]}
        for m, p in b["pairs"]:
            r, rc = ratio(b, m, p), ratio(b, m, p, "cpu")
            out.append(
                [
                    title,
                    m,
                    figure(b["paths"][m]),
                    cpu_figure(b["paths"][m]),
                    p,
                    figure(b["paths"][p]),
                    cpu_figure(b["paths"][p]),
                    "—" if r is None else f"{r:.2f}",
                    "—" if rc is None else f"{rc:.2f}",
                    verdict(b, r),
                ]
            )
        peers = {p for _, p in b["pairs"]}
        for name, pth in b["paths"].items():
            if pth["meshipc"] and name not in paired and name not in peers:
                out.append([title, name, figure(pth), cpu_figure(pth), "", "", "", "", "", ""])
            elif not pth["meshipc"] and name not in peers:  # a reference (python -c pass)
                out.append([title, "", "", "", name, figure(pth), cpu_figure(pth), "", "", ""])
    return out


HEAD = [
    "benchmark",
    "meshipc",
    "figure",
    "CPU µs/op",
    "peer",
    "figure",
    "CPU µs/op",
    "ratio m/p",
    "CPU m/p",
    "meshipc is",
]


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for label, key, m, p, op, thr, *more in TARGETS:
        metric = more[0] if more else "wall"
        b = data["benches"].get(key)
        t: dict[str, Any] = {"target": label, "status": "not measured", "figure": None}
        if b is not None:
            if m == "@largest":
                ms = [n for n, v in b["paths"].items() if v["meshipc"]]
                m = max(ms, key=lambda n: int(n.split(", ")[1].split()[0])) if ms else ""
            if m in b["paths"] and (p is None or p in b["paths"]):
                v = b["paths"][m]["median"] if p is None else ratio(b, m, p, metric)
                if v is None and p is None:
                    v = INF
                if v is not None:
                    ok = v <= thr if op == "<=" else v >= thr if op == ">=" else v < thr
                    t["status"] = "met" if ok else "missed"
                    t["figure"] = v
                    unit = ("x CPU" if metric == "cpu" else "x") if p is not None else f" {b['unit']}"
                    t["detail"] = f"{fmt(v)}{unit}" + (f" ({m})" if p is None else f" ({m} / {p})")
        out.append(t)
    return out


def print_table(data: dict[str, Any], file: Any = None) -> None:
    file = file or sys.stdout
    r = rows(data)
    widths = [max(len(HEAD[i]), *(len(x[i]) for x in r)) if r else len(HEAD[i]) for i in range(len(HEAD))]
    widths[0] = min(widths[0], 46)
    last = None
    print("  ".join(h.ljust(w) for h, w in zip(HEAD, widths, strict=True)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for x in r:
        if x[0] != last:
            print(x[0], file=file)
            last = x[0]
        print(
            "  ".join(["".ljust(widths[0]), *(c.ljust(w) for c, w in zip(x[1:], widths[1:], strict=True))]),
            file=file,
        )
    print(file=file)
    print("targets (one run):", file=file)
    unmeasured = 0
    for t in data["targets"]:
        if t["status"] == "not measured":
            unmeasured += 1
            continue
        print(f"  [{t['status']:>6}] {t['target']}: {t.get('detail', '—')}", file=file)
    if unmeasured:
        print(f"  ({unmeasured} target(s) not measured in this run)", file=file)
    if data["notes"]:
        print("\nnotes:", file=file)
        for n in data["notes"]:
            print(f"  {n}", file=file)


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    lines = [
        "# meshipc benchmark results",
        "",
        f"`python -m bench{' --quick' if data['quick'] else ''}` on {m['cpus']} x {m['cpu_model']}, "
        f"{m['platform']}, Python {m['python']}; loops: {m['loops']}; {libs}; "
        f"meshipc commit {m['meshipc_commit'] or '?'}; "
        f"load average {m['loadavg_start'][0]:.2f} at the start, "
        f"{data.get('loadavg_end', [0])[0]:.2f} at the end; "
        f"{data['elapsed_s']:.0f} s in all.",
        "",
        "Figures are medians over interleaved runs with the spread (min-max) in brackets; "
        "ratio = meshipc / peer. CPU µs/op: CPU time per operation of the measuring process and "
        "every process it started (servers, workers), all threads; for start-up and cold commands "
        "the command's own process only; for attach the client's own, from connecting to the first "
        "reply; none for failure detection and the N-clients rows (one-off events, not operations). "
        "The floor: asyncio.Protocol both sides, msgspec msgpack encode and decode both sides, "
        "length-prefixed frames.",
        "",
        "| " + " | ".join(HEAD) + " |",
        "|" + "---|" * len(HEAD),
    ]
    last = None
    for x in rows(data):
        t = x[0] if x[0] != last else ""
        last = x[0]
        lines.append("| " + " | ".join([t, *x[1:]]) + " |")
    lines += ["", "## Targets", "", "| target | status | figure |", "|---|---|---|"]
    for t in data["targets"]:
        lines.append(f"| {t['target']} | {t['status']} | {t.get('detail', '—')} |")
    notes = [f"{b['title']}: {n}" for b in data["benches"].values() for n in b["notes"]] + data["notes"]
    if notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"


#: The headline rows of ``--summary`` (the README's table): (label, bench, meshipc path, peer).
SUMMARY = [
    ("RPC round trip, 64 B (µs)", "rtt", M_STOCK, FLOOR),
    ("", "rtt", M_UV, FLOOR_UV),
    ("", "rtt", M_STOCK, ST_STOCK),
    ("", "rtt", M_STOCK, ZMQ),
    ("", "rtt", M_STOCK, PIPE),
    ("", "rtt", M_STOCK, PYRO),
    ("", "rtt", M_STOCK, GRPC),
    ("", "rtt", M_UV, ZMQ),
    ("", "rtt", M_SYNC, PIPE),
    ("round trip after 10 ms idle (µs)", "idle", M_STOCK, ZMQ),
    ("one-way 64 B (msg/s)", "throughput", M_STOCK, FLOOR),
    ("", "throughput", M_STOCK, PIPE),
    ("", "throughput", M_STOCK, ZMQ),
    ("16 MiB messages (MB/s)", "large_16m", M_STOCK, PIPE),
    ("fd passing (msg/s)", "fd", M_STOCK, RED),
    ("failure detection (ms)", "failure", M_STOCK, PIPE),
    ("", "failure", M_STOCK, ZMQ),
    ("attach, connect to first reply (ms)", "attach", "meshipc.connect + call", "multiprocessing.connection"),
    ("cold `meshipc call` (ms)", "cold", "meshipc call NAME echo", "multiprocessing.connection"),
    ("`python -c 'import ...'` (ms)", "startup", "import meshipc", "import zmq"),
    ("", "startup", "import meshipc, load all", "import zmq"),
    ("service RSS per idle client (KiB)", "many_mem", "@largest", "@largest"),
    ("RPC, 16 workers (calls/s)", "workers", "meshipc, 16 workers", "ProcessPoolExecutor, 16 workers"),
]


def summary_md(data: dict[str, Any]) -> str:
    """The headline rows and the targets, as markdown (for the README)."""
    m = data["machine"]
    lines = [
        f"{m['cpus']} x {m['cpu_model']}, Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v and k != "matplotlib")
        + f"; load average {m['loadavg_start'][0]:.1f}-{data.get('loadavg_end', [0])[0]:.1f}",
        "",
        "| | meshipc | | CPU µs/op | peer | | CPU µs/op | meshipc / peer | CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, key, mname, pname in SUMMARY:
        b = data["benches"].get(key)
        if b is None:
            continue
        if mname == "@largest":
            ms = [n for n, v in b["paths"].items() if v["meshipc"]]
            if not ms:
                continue
            mname = max(ms, key=lambda n: int(n.split(", ")[1].split()[0]))
            pname = mname.replace("meshipc", "multiprocessing.connection")
        if mname not in b["paths"] or pname not in b["paths"]:
            continue
        r, rc = ratio(b, mname, pname), ratio(b, mname, pname, "cpu")
        pm, pp = b["paths"][mname], b["paths"][pname]
        rs, rcs = ("—" if x is None else f"{x:.2f}x" for x in (r, rc))
        lines.append(
            f"| {label} | {mname} | {figure(pm)} | {cpu_figure(pm)} | {pname} | {figure(pp)} "
            f"| {cpu_figure(pp)} | {rs} | {rcs} |"
        )
    lines += ["", "| target | | |", "|---|---|---|"]
    for t in data["targets"]:
        if t["status"] != "not measured":
            lines.append(f"| {t['target']} | **{t['status']}** | {t.get('detail', '—')} |")
    return "\n".join(lines) + "\n"


def chart(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in data["benches"].values() if b["paths"]]
    cols = 3
    nrows = math.ceil(len(benches) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 3.2 * nrows), squeeze=False)
    for ax, b in zip(axes.flat, benches, strict=False):
        names = list(b["paths"])
        meds = [b["paths"][n]["median"] for n in names]
        hangs = [v is not None and not math.isfinite(v) for v in meds]
        finite = [v for v in meds if v is not None and math.isfinite(v)]
        cap = max(finite) * 1.15 if finite else 1.0
        vals = [cap if h else (v or 0) for v, h in zip(meds, hangs, strict=True)]
        lo = [
            max(0.0, v - (b["paths"][n]["min"] or v)) if not h else 0
            for n, v, h in zip(names, vals, hangs, strict=True)
        ]
        hi = [
            max(0.0, (b["paths"][n]["max"] or v) - v) if not h else 0
            for n, v, h in zip(names, vals, hangs, strict=True)
        ]
        colors = [
            "#c0392b" if h else "#1f77b4" if b["paths"][n]["meshipc"] else "#aaaaaa"
            for n, h in zip(names, hangs, strict=True)
        ]
        y = range(len(names))
        ax.barh(list(y), vals, xerr=[lo, hi], color=colors, capsize=2)
        ax.set_yticks(list(y))
        ax.set_yticklabels(
            [n + (" (hangs)" if h else "") for n, h in zip(names, hangs, strict=True)], fontsize=7
        )
        ax.invert_yaxis()
        ax.set_title(f"{b['title']}", fontsize=8)
        ax.set_xlabel(f"{b['unit']} ({b['better']} is better)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        if finite and min(finite) > 0 and max(finite) / min(finite) > 30:
            ax.set_xscale("log")
    for ax in list(axes.flat)[len(benches) :]:
        ax.axis("off")
    m = data["machine"]
    fig.suptitle(
        f"meshipc (blue) vs peers (grey), medians with min-max; {m['cpus']} CPUs, Python {m['python']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a ~one-minute subset: fewer runs, smaller counts")
    ap.add_argument(
        "--only",
        type=lambda s: [k.strip() for k in s.split(",") if k.strip()],
        default=None,
        metavar="KEY,...",
        help="run these benchmarks only (see --list)",
    )
    ap.add_argument(
        "--paths",
        type=lambda s: [k for k in s.split(",") if k],
        default=None,
        metavar="S,...",
        help="only paths whose name contains one of these strings (e.g. 'meshipc (stock,Pipe')",
    )
    ap.add_argument(
        "--runs", type=int, default=None, help="interleaved runs per benchmark (default: by mode)"
    )
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply message/call counts by this (default 1)"
    )
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--chart", metavar="FILE.png", help="write a chart (matplotlib)")
    ap.add_argument("--markdown", metavar="FILE", help="write a markdown table ('-': print it)")
    ap.add_argument("--summary", metavar="FILE", help="write the README's short table ('-': print it)")
    ap.add_argument("--from-json", metavar="FILE", help="do not measure: render a saved --json file")
    ap.add_argument("--list", action="store_true", help="list the benchmark keys and exit")
    args = ap.parse_args(argv)
    if args.only:
        bad = [k for k in args.only if k not in BENCHES]
        if bad:
            ap.error(f"unknown benchmark {', '.join(bad)} (see --list)")
    return args


def measure(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else FULL
    keys = set(args.only or BENCHES)
    res = Results()
    for mod, pkg in PEER_MODULES.items():
        if mod != "matplotlib" and not have(mod):
            print(
                f"note: {pkg} is not installed: its paths are skipped (pip install -e '.[bench,fast]')",
                file=sys.stderr,
            )
    info = machine()
    t0 = time.perf_counter()
    for group, gkeys in GROUPS.items():
        ks = keys & set(gkeys)
        if ks:
            tg = time.perf_counter()
            print(f"{group} ...", file=sys.stderr)
            GROUP_FN[group](cfg, args, res, ks)
            print(f"{group}: {time.perf_counter() - tg:.1f} s", file=sys.stderr)
    order = {k: i for i, k in enumerate(BENCHES)}
    data = {
        "quick": args.quick,
        "argv": sys.argv[1:],
        "machine": info,
        "elapsed_s": time.perf_counter() - t0,
        "loadavg_end": os.getloadavg(),
        "benches": dict(sorted(res.benches.items(), key=lambda kv: order[kv[0]])),
        "notes": res.notes,
    }
    data["targets"] = targets(data)
    return data


def _json_safe(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return "inf"
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_json_safe(v) for v in o]
    return o


def _json_load(o: Any) -> Any:
    if o == "inf":
        return INF
    if isinstance(o, dict):
        return {k: _json_load(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_json_load(v) for v in o]
    return o


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for k, t in BENCHES.items():
            print(f"{k:<11} {t}")
        return 0
    if args.from_json:
        data = _json_load(json.loads(Path(args.from_json).read_text()))
    else:
        data = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe(data), indent=1) + "\n")
    print_table(data)
    for dest, render in ((args.markdown, markdown), (args.summary, summary_md)):
        if dest:
            text = render(data)
            if dest == "-":
                print(text)
            else:
                Path(dest).write_text(text)
    if args.chart:
        if have("matplotlib"):
            chart(data, args.chart)
        else:
            print("note: matplotlib is not installed: no chart (pip install -e '.[bench]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
