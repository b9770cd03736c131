"""A smoke test of the benchmark runner (bench/run.py): its argument parsing,
one tiny benchmark (meshipc, multiprocessing.Pipe and the floor's round
trips, a few dozen calls, one run: wall and CPU per call) and rendering a
saved run. The benchmarks themselves
are run by hand: ``python -m bench``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

run = pytest.importorskip("bench.run")


def test_parse_args() -> None:
    a = run.parse_args([])
    assert not a.quick and a.only is None and a.runs is None and a.scale == 1.0
    a = run.parse_args(["--quick", "--only", "rtt,fd", "--json", "x.json", "--chart", "x.png"])
    assert a.quick and a.only == ["rtt", "fd"] and a.json == "x.json" and a.chart == "x.png"
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "nope"])
    assert set(run.GROUPS) == set(run.GROUP_FN)
    assert {k for ks in run.GROUPS.values() for k in ks} == set(run.BENCHES) == set(run.UNITS)


def test_tiny_round_trip(tmp_path: Path) -> None:
    # in a process of its own: the runner's multiprocessing helpers (the
    # resource tracker) must not become children of the test process
    out = tmp_path / "r.json"
    paths = "meshipc (stock,multiprocessing.Pipe,floor: asyncio.Protocol + msgspec (stock"
    argv = ["--only", "rtt", "--paths", paths, "--runs", "1", "--scale", "0.01", "--json", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr  # (the 60 s timeout only turns a hang into a failure)
    assert run.PIPE in r.stdout
    data = json.loads(out.read_text())
    rtt = data["benches"]["rtt"]
    assert set(rtt["paths"]) == {run.M_STOCK, run.PIPE, run.FLOOR}
    assert all(p["median"] > 0 for p in rtt["paths"].values())
    # CPU per round trip, client and server: at least some of the wall time
    # (both sides are busy for part of each round trip), and never more than
    # two CPUs' worth of it
    for p in rtt["paths"].values():
        assert 0 < p["cpu"]["median"] <= 2.5 * p["median"], p
    assert rtt["pairs"] == [[run.M_STOCK, run.FLOOR], [run.M_STOCK, run.PIPE]]
    (cpu_target,) = (t for t in data["targets"] if t["target"].startswith("CPU per round trip <="))
    assert cpu_target["status"] in ("met", "missed") and cpu_target["figure"] > 0
    assert data["machine"]["cpus"] and data["machine"]["python"]
    md = tmp_path / "r.md"
    assert run.main(["--from-json", str(out), "--markdown", str(md)]) == 0
    assert f"| {run.M_STOCK} |" in md.read_text()


def test_tiny_tls_rows(tmp_path: Path) -> None:
    """The TLS rows (bench/bench_tls.py's paths) run, pair meshipc with the
    raw TLS echo and mark the <= 1.3x target met or missed."""
    out = tmp_path / "t.json"
    argv = ["--only", "tls_rtt", "--paths", "stock loop", "--runs", "1", "--scale", "0.01"]
    argv += ["--json", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    tls = data["benches"]["tls_rtt"]
    assert set(tls["paths"]) == {run.TLS_STOCK, run.TLS_RAW}
    assert all(p["median"] > 0 and p["cpu"]["median"] > 0 for p in tls["paths"].values())
    assert tls["pairs"] == [[run.TLS_STOCK, run.TLS_RAW]]
    (target,) = (t for t in data["targets"] if t["target"].startswith("TLS round trip, stock loop"))
    assert target["status"] in ("met", "missed") and target["figure"] > 0


def test_cpu_meter_counts_children_and_their_ended_threads() -> None:
    # The CPU rows count the server side too: a child process's thread that
    # burned CPU and ended before the span closed still counts (schedstat of
    # the live threads would miss it), and so does a child reaped in the span.
    from bench.core import CpuMeter

    burn = (
        "import threading, time\n"
        "def b():\n"
        "    t = time.thread_time()\n"
        "    while time.thread_time() - t < 0.2: pass\n"
        "th = threading.Thread(target=b); th.start(); th.join()\n"
        "print('x', flush=True); input()\n"
    )
    meter = CpuMeter()
    meter.start()
    live = subprocess.Popen(
        [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert live.stdout is not None and live.stdout.readline() == "x\n"
        reaped = subprocess.run([sys.executable, "-c", burn], input=b"\n", capture_output=True, timeout=60)
        assert reaped.returncode == 0
        cpu = meter.stop()
    finally:
        live.kill()
        live.wait()
    assert cpu >= 0.38, cpu  # two children x 0.2 s of a thread's CPU (and their start-up on top)
