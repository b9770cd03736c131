"""Worker log forwarding (``_logs``): records a spawned worker logs with
``logging`` are re-emitted in the parent with the worker's name and pid, in
order, bounded (drops counted and reported), with live level changes."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import meshipc
from meshipc import MeshError
from meshipc._logs import LOG_MAX_NAME, LOG_MAX_TEXT, LOG_WINDOW, Ack, LogPump, Record, ToParent, level_number
from relutil import vmrss_kb, wait_until, within
from test_control import cli


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, node: str, logger: str = "logw") -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "meshipc_node", None) == node and r.name == logger]


@pytest.fixture
def collect() -> Iterator[Collect]:
    h = Collect()
    root = logging.getLogger()
    root.addHandler(h)
    try:
        yield h
    finally:
        root.removeHandler(h)


async def test_records_arrive_once_in_order_with_name_and_pid(runtime_dir: Path, collect: Collect) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        proc = await mesh.spawn("log_workers:levels", name="lv")
        assert await within(proc.wait()) == 0
        got = collect.of("lv")
        # every record re-emitted before wait() returned, once, in order
        assert [(r.levelname, r.getMessage()) for r in got] == [
            ("DEBUG", "d 1"),
            ("INFO", "i 2"),
            ("WARNING", "w 3"),
            ("ERROR", "e 4"),
            ("ERROR", "x 5"),
        ]
        assert {r.process for r in got} == {proc.pid} != {os.getpid()}
        assert {getattr(r, "meshipc_pid", None) for r in got} == {proc.pid}
        assert got[0].funcName == "levels" and got[0].filename == "log_workers.py"
        assert got[-1].exc_text is not None and "ValueError: boom" in got[-1].exc_text
        # a standard formatter shows the traceback of the worker
        assert "ValueError: boom" in logging.Formatter("%(processName)s %(message)s").format(got[-1])
        assert proc.logs is not None and proc.logs.records == 5 and proc.logs.dropped == 0


async def test_forward_logs_false_opts_out(runtime_dir: Path, collect: Collect) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        proc = await mesh.spawn("log_workers:levels", name="quiet", forward_logs=False)
        assert await within(proc.wait()) == 0
        assert collect.of("quiet") == [] and proc.logs is None
        with pytest.raises(MeshError, match="forward_logs=False"):
            await proc.set_log_level("DEBUG")


async def test_live_level_change_takes_effect_on_the_next_record(runtime_dir: Path, collect: Collect) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("log_workers:on_call", rx, name="oc")
        await within(tx.call(1))
        assert [r.levelname for r in collect.of("oc")] == ["WARNING"]  # the default level
        assert await within(mesh.set_log_level("oc", "debug")) == 1
        await within(tx.call(2))
        assert [(r.levelname, r.getMessage()) for r in collect.of("oc")][1:] == [
            ("DEBUG", "debug 2"),
            ("WARNING", "warning 2"),
        ]
        await within(mesh.set_log_level(proc, logging.ERROR, logger="logw"))
        await within(tx.call(3))
        assert len(collect.of("oc")) == 3
        assert mesh._log_levels() == {f"oc-{proc.pid}": {"root": "DEBUG", "logw": "ERROR"}}
        with pytest.raises(MeshError, match="no running worker"):
            await mesh.set_log_level("nobody", "INFO")
        with pytest.raises(ValueError, match="not a log level"):
            await mesh.set_log_level("oc", "LOUD")
        tx.close()
        await within(proc.wait())
        with pytest.raises(MeshError):
            await proc.set_log_level("INFO")


class Numbers(logging.Handler):
    """Keeps only what the flood test checks (records would weigh on the RSS it measures)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.nums: list[int] = []
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "meshipc_node", None) == "flood":
            self.nums.append(int(record.getMessage().split()[1]))
        elif record.name == "meshipc" and "dropped" in record.getMessage():
            self.reports.append(record.getMessage())


@pytest.mark.parametrize("n", [100_000, pytest.param(1_000_000, marks=pytest.mark.soak)])
async def test_flooding_worker_is_bounded_and_another_worker_still_answers(runtime_dir: Path, n: int) -> None:
    seen = Numbers()
    # the flood stays out of the root logger (pytest's capture would keep every record)
    flood_log = logging.getLogger("logw.flood")
    flood_log.propagate = False
    flood_log.addHandler(seen)
    logging.getLogger("meshipc").addHandler(seen)
    try:
        async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
            ftx, frx = meshipc.channel()
            etx, erx = meshipc.channel()
            flooder = await mesh.spawn("log_workers:flood", frx, name="flood")
            await mesh.spawn("workers:echo", erx, name="echo")
            logs = flooder.logs
            assert logs is not None
            rss0 = vmrss_kb()
            flooding = asyncio.ensure_future(ftx.call(n))
            await wait_until(lambda: logs.records > LOG_WINDOW, "records re-emitted")
            # the parent's loop is shared with the flood: a call to another worker answers within a second
            worst = 0.0
            while not flooding.done():
                t = time.monotonic()
                assert await within(etx.call("ping"), 1.0) == "ping"
                worst = max(worst, time.monotonic() - t)
                await asyncio.sleep(0.05)  # pacing the probes, not synchronisation
            assert await within(flooding) == n
            rss = vmrss_kb() - rss0
            await wait_until(lambda: logs.records + logs.dropped == n, "every record re-emitted or counted")
            assert logs.dropped > 0
            assert len(seen.nums) == logs.records < n
            assert seen.nums == sorted(seen.nums)  # in order, gaps where dropped
            # the drops are reported in the parent's log, at most about once a second
            assert seen.reports and "flood" in seen.reports[0]
            assert rss < 50_000, f"the parent grew by {rss} KiB"
            print(
                f"\nflood: {logs.records} re-emitted, {logs.dropped} dropped, {len(seen.reports)} reports, "
                f"worst ping {worst:.3f} s, parent rss +{rss} KiB"
            )
    finally:
        flood_log.removeHandler(seen)
        flood_log.propagate = True
        logging.getLogger("meshipc").removeHandler(seen)


def test_level_number() -> None:
    assert level_number("debug") == logging.DEBUG == level_number(10) == level_number("10")
    for bad in ("LOUD", -1, 1001, True, ""):
        with pytest.raises(ValueError):
            level_number(bad)  # type: ignore[arg-type]


def test_hostile_records_are_refused() -> None:
    """What arrives on the log port from another process is validated
    against ``ToParent`` (the channel drops what fails, and reads on):
    oversized texts and names, levels and counts out of range."""
    ok = Record("a.b", 30, "m", 0.0, "p", 1, "f", "t")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(ok), type=ToParent) == ok
    bad: list[Any] = [
        ["r", "x" * (LOG_MAX_NAME + 1), 30, "m", 0.0, "p", 1, "f", "t"],
        ["r", "n", 30, "y" * (LOG_MAX_TEXT + 1), 0.0, "p", 1, "f", "t"],
        ["r", "n", 30, "m", 0.0, "p", 1, "f", "t", "z" * (LOG_MAX_TEXT + 1)],
        ["r", "n", 5000, "m", 0.0, "p", 1, "f", "t"],
        ["d", -1],
        ["l", 1, "", 10],  # a worker does not set the parent's levels
        ["junk"],
    ]
    for b in bad:
        with pytest.raises(msgspec.ValidationError):
            msgspec.msgpack.decode(msgspec.msgpack.encode(b), type=ToParent)


async def test_unknown_logger_names_create_no_logger(collect: Collect) -> None:
    """A record goes to the parent's logger of that name or its nearest
    ancestor: a worker cannot make the parent create loggers."""
    ours, theirs = meshipc.Port.pair()
    pump = LogPump(ours, "w")
    pump.start(12345)
    before = set(logging.root.manager.loggerDict)
    theirs.send(Record("no.such.logger.at.all", 40, "kept", 0.0, "p", 1, "f", "t"))
    theirs.send(Record("meshipc.no.such", 40, "kept too", 0.0, "p", 1, "f", "t"))
    theirs.close()
    await within(pump.wait())
    assert set(logging.root.manager.loggerDict) == before
    got = [r for r in collect.records if getattr(r, "meshipc_node", None) == "w"]
    assert [(r.name, r.getMessage()) for r in got] == [
        ("no.such.logger.at.all", "kept"),
        ("meshipc.no.such", "kept too"),
    ]
    assert got[0].process == 12345 and pump.records == 2


def test_ack_is_small() -> None:
    assert len(msgspec.msgpack.encode(Ack(64))) < 8


async def test_meshipc_log_changes_a_workers_level(runtime_dir: Path, collect: Collect) -> None:
    async with meshipc.Mesh(name="lg", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        code, out, err = await cli(runtime_dir, "log", "lg", "DEBUG")  # no worker yet: said so
        assert code == 0 and out.strip() == "(no workers)", (out, err)
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("log_workers:on_call", rx, name="oc")
        code, out, err = await cli(runtime_dir, "log", "lg", "oc", "DEBUG")
        assert code == 0, err
        assert f"oc-{proc.pid}" in out and "DEBUG" in out
        await within(tx.call(1))
        assert [r.levelname for r in collect.of("oc")] == ["DEBUG", "WARNING"]
        code, out, err = await cli(runtime_dir, "log", "lg", "ERROR")  # every worker
        assert code == 0, err
        await within(tx.call(2))
        assert len(collect.of("oc")) == 2
        code, _, err = await cli(runtime_dir, "log", "lg", "nobody", "INFO")
        assert code == 1 and "no running worker named 'nobody'" in err
        code, _, err = await cli(runtime_dir, "log", "lg", "oc", "LOUD")
        assert code == 2 and "not a log level" in err


async def test_a_hostile_worker_cannot_break_its_parents_log(runtime_dir: Path, collect: Collect) -> None:
    """What a worker sends on its log port is validated in the parent:
    malformed records are dropped (and the drop logged), the stream goes on."""
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        proc = await mesh.spawn("log_workers:hostile", name="evil")
        assert await within(proc.wait()) == 0
        assert [r.getMessage() for r in collect.of("evil")] == ["still heard"]
        bad = [r for r in collect.records if "dropped a bad message" in r.getMessage()]
        assert len(bad) == 4 and {r.name for r in bad} == {"meshipc"}
        assert proc.logs is not None and proc.logs.records == 1
