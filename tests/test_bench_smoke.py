"""A smoke test of the benchmark runner (bench/run.py): its argument parsing,
one tiny benchmark (meshipc and multiprocessing.Pipe round trips, a few
dozen calls, one run) and rendering a saved run. The benchmarks themselves
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
    paths = "meshipc (stock,multiprocessing.Pipe"
    argv = ["--only", "rtt", "--paths", paths, "--runs", "1", "--scale", "0.01", "--json", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr  # (the 60 s timeout only turns a hang into a failure)
    assert run.PIPE in r.stdout
    data = json.loads(out.read_text())
    rtt = data["benches"]["rtt"]
    assert set(rtt["paths"]) == {run.M_STOCK, run.PIPE}
    assert all(p["median"] > 0 for p in rtt["paths"].values())
    assert rtt["pairs"] == [[run.M_STOCK, run.PIPE]]
    assert data["machine"]["cpus"] and data["machine"]["python"]
    md = tmp_path / "r.md"
    assert run.main(["--from-json", str(out), "--markdown", str(md)]) == 0
    assert f"| {run.M_STOCK} |" in md.read_text()
