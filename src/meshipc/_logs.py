"""Worker log forwarding: what a spawned worker logs with the standard
``logging`` module is re-emitted in its parent, through the parent's own
``logging``, with the worker's name and pid on each record
(``record.meshipc_node``, ``record.meshipc_pid``, ``record.process``).

The parent (``spawn``) makes a port pair and sends one end first on the
worker's bootstrap port; the worker puts a ``Forwarder`` on its root logger
(``forward``) and the parent reads the other end (``LogPump``). What each
side says on that port, as tagged records::

    worker -> parent   Record            one log record, in the order logged
                       Dropped(n)        n records were dropped (over the window)
                       LevelSet(seq)     the level change seq took effect
    parent -> worker   Ack(n)            n more records were re-emitted
                       SetLevel(seq, logger, level)

Bounded both ways: the worker has at most ``LOG_WINDOW`` records that the
parent has not acknowledged; over it, a record is dropped and counted in the
worker, and the count travels once the window has room (the parent logs it,
at most once per ``LOG_INTERVAL`` s per worker). So a worker that logs in a
tight loop costs the parent at most ``LOG_WINDOW`` queued records and
``LOG_MAX_TEXT`` characters per field; the pump yields to the loop after
every batch, so the parent's data path keeps running.

Records reach the parent's handlers whatever the levels of the parent's
loggers: the worker's levels (``set_log_level``) decide what is forwarded.
Each record carries the trace it was logged in (``record.meshipc_trace``:
``str(meshipc.current_trace())``, or None). A record goes to the parent's
logger of the same name if one exists, else to its nearest existing
ancestor (a worker cannot make the parent create loggers). Worker output
that is not ``logging`` (print, stderr) is not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import traceback
from typing import Annotated, Final

import msgspec

from ._channel import Port
from ._errors import MeshError
from ._trace import current_trace

log = logging.getLogger("meshipc")

#: Records a worker may have in flight to its parent (sent, not yet
#: re-emitted there); beyond it a record is dropped and counted. Bounds the
#: parent's memory per worker to this many records of ``LOG_MAX_TEXT``.
LOG_WINDOW: Final = 256
#: The parent acknowledges after this many re-emitted records (and yields
#: its loop to other work).
LOG_ACK_EVERY: Final = LOG_WINDOW // 4
#: Characters kept of a record's message and of its traceback text (the
#: worker cuts longer ones; the parent refuses longer ones).
LOG_MAX_TEXT: Final = 64 * 1024
#: Characters of a logger, file, function or thread name.
LOG_MAX_NAME: Final = 1024
#: Seconds between two reports of dropped records of one worker.
LOG_INTERVAL: Final = 1.0

_Text = Annotated[str, msgspec.Meta(max_length=LOG_MAX_TEXT)]
_Name = Annotated[str, msgspec.Meta(max_length=LOG_MAX_NAME)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
_Level = Annotated[int, msgspec.Meta(ge=0, le=1000)]


class Record(msgspec.Struct, tag="r", array_like=True, frozen=True):
    """One log record of a worker (or of a worker's worker: ``node`` says
    whose, relative to the sender)."""

    logger: _Name
    level: _Level
    msg: _Text
    created: float
    path: _Name
    line: _Count
    func: _Name
    thread: _Name
    exc: _Text | None = None
    #: the node that logged it, below the sender ("" for the sender itself)
    node: _Name = ""
    pid: _Count = 0
    #: ``str(meshipc.current_trace())`` where it was logged, or ""
    trace: _Name = ""


class Dropped(msgspec.Struct, tag="d", array_like=True, frozen=True):
    count: _Count


class LevelSet(msgspec.Struct, tag="s", array_like=True, frozen=True):
    seq: _Count


class Ack(msgspec.Struct, tag="a", array_like=True, frozen=True):
    count: _Count


class SetLevel(msgspec.Struct, tag="l", array_like=True, frozen=True):
    seq: _Count
    logger: _Name
    level: _Level


ToParent = Record | Dropped | LevelSet
ToWorker = Ack | SetLevel


def level_number(level: int | str) -> int:
    """``level`` (``logging.DEBUG`` or ``"debug"``/``"DEBUG"``) as a number;
    ``ValueError`` for an unknown name or a number out of 0-1000."""
    if isinstance(level, bool):
        raise ValueError(f"not a log level: {level!r}")
    if isinstance(level, int):
        n = level
    elif isinstance(level, str) and level.strip().isdigit():
        n = int(level)
    elif isinstance(level, str) and level.upper() in logging.getLevelNamesMapping():
        n = logging.getLevelNamesMapping()[level.upper()]
    else:
        raise ValueError(f"not a log level: {level!r} (a number or DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    if not 0 <= n <= 1000:
        raise ValueError(f"a log level is 0-1000, got {n}")
    return n


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 20] + f"... [{len(text) - n + 20} cut]"


# ------------------------------------------------------------------ worker side


class Forwarder(logging.Handler):
    """The worker's handler: each record goes to the parent on ``port``
    while fewer than ``LOG_WINDOW`` are unacknowledged; others are counted
    as dropped. Safe from any thread; a record logged while sending one (by
    meshipc itself) is not forwarded."""

    def __init__(self, port: Port) -> None:
        super().__init__(logging.NOTSET)
        self._port = port
        self._in_flight = 0
        self._dropped = 0
        self._count_lock = threading.Lock()
        self._busy = threading.local()
        self._dead = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._dead or getattr(self._busy, "on", False):
            return
        with self._count_lock:
            if self._in_flight >= LOG_WINDOW:
                self._dropped += 1
                return
            dropped, self._dropped = self._dropped, 0
            self._in_flight += 1 + (dropped > 0)
        self._busy.on = True
        try:
            if dropped:
                self._port.send(Dropped(dropped))
            self._port.send(_record(record))
        except (MeshError, RuntimeError):
            self._dead = True  # the parent (or our loop, at exit) is gone: nobody to tell
        finally:
            self._busy.on = False

    def acked(self, n: int) -> None:
        """The parent re-emitted ``n`` more: room for as many; what was
        dropped meanwhile is reported now (it may be the last word)."""
        with self._count_lock:
            self._in_flight = max(0, self._in_flight - n)
            dropped, self._dropped = self._dropped, 0
            self._in_flight += dropped > 0
        if dropped:
            try:
                self._port.send(Dropped(dropped))
            except MeshError:
                self._dead = True

    async def serve(self) -> None:
        """Read the parent's acknowledgements and level changes until the
        port ends."""
        try:
            async for msg in self._port:
                if isinstance(msg, Ack):
                    self.acked(msg.count)
                elif isinstance(msg, SetLevel):
                    logging.getLogger(msg.logger or None).setLevel(msg.level)
                    self._port.send(LevelSet(msg.seq))
        except MeshError:
            pass
        finally:
            self._dead = True


def _record(record: logging.LogRecord) -> Record:
    try:
        msg = record.getMessage()
    except Exception:  # the application's format arguments do not fit: still say something
        msg = f"{record.msg!r} % {record.args!r} (unformattable)"
    exc = record.exc_text
    if record.exc_info and not exc:
        exc = "".join(traceback.format_exception(*record.exc_info))
    if record.stack_info:
        exc = f"{exc}\n{record.stack_info}" if exc else record.stack_info
    return Record(
        _cut(record.name, LOG_MAX_NAME),
        max(0, min(record.levelno, 1000)),
        _cut(msg, LOG_MAX_TEXT),
        record.created,
        _cut(record.pathname, LOG_MAX_NAME),
        max(0, record.lineno or 0),
        _cut(record.funcName or "", LOG_MAX_NAME),
        _cut(record.threadName or "", LOG_MAX_NAME),
        _cut(exc, LOG_MAX_TEXT) if exc else None,
        _cut(str(getattr(record, "meshipc_node", "")), LOG_MAX_NAME),
        getattr(record, "meshipc_pid", 0) if isinstance(getattr(record, "meshipc_pid", 0), int) else 0,
        _trace_of(record),
    )


def _trace_of(record: logging.LogRecord) -> str:
    """The trace a record was logged in: forwarded with it, or this task's."""
    forwarded = getattr(record, "meshipc_trace", None)
    if isinstance(forwarded, str):
        return forwarded[:LOG_MAX_NAME]
    t = current_trace()
    return "" if t is None else str(t)


def forward(port: Port) -> Forwarder:
    """In a worker: forward the root logger's records on ``port`` (the end
    the parent sent). The caller runs ``serve()`` and removes the handler
    (``stop``) at exit."""
    port._set_type(ToWorker)
    handler = Forwarder(port)
    logging.getLogger().addHandler(handler)
    return handler


def stop(handler: Forwarder) -> None:
    logging.getLogger().removeHandler(handler)
    handler._dead = True


# ------------------------------------------------------------------ parent side


def _existing_logger(name: str) -> logging.Logger:
    """The parent's logger ``name``, else its nearest existing ancestor,
    else the root logger: never a new one."""
    loggers = logging.root.manager.loggerDict
    while name:
        found = loggers.get(name)
        if isinstance(found, logging.Logger):
            return found
        name = name.rpartition(".")[0]
    return logging.getLogger()


class LogPump:
    """The parent's end of one worker's log port: re-emits its records in
    order, reports drops, changes levels (``set_level``)."""

    def __init__(self, port: Port, name: str) -> None:
        port._set_type(ToParent)
        self._port = port
        self.name = name
        self.pid = 0
        #: records re-emitted, and dropped in the worker (as reported)
        self.records = 0
        self.dropped = 0
        #: level set per logger name ("" the worker's root logger), as last asked
        self.levels: dict[str, int] = {}
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._last_report = 0.0
        self._unreported = 0
        self.task: asyncio.Task[None] | None = None

    def start(self, pid: int) -> None:
        self.pid = pid
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        unacked = 0
        try:
            async for msg in self._port:
                if isinstance(msg, Record):
                    self._emit(msg)
                    unacked += 1
                elif isinstance(msg, Dropped):
                    self._drops(msg.count)
                    unacked += 1
                elif isinstance(msg, LevelSet):
                    fut = self._waiting.pop(msg.seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                if unacked >= LOG_ACK_EVERY:
                    with contextlib.suppress(MeshError):  # the worker stopped reading: read on
                        self._port.send(Ack(unacked))
                    unacked = 0
                    await asyncio.sleep(0)  # a flood of records shares the loop
        except MeshError:
            pass  # the worker is gone; what it sent before is re-emitted
        finally:
            self._report(force=True)
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(MeshError(f"worker {self.name} exited before changing its log level"))
            self._waiting.clear()

    def _emit(self, r: Record) -> None:
        self.records += 1
        node = f"{self.name}/{r.node}" if r.node else self.name
        pid = r.pid if r.node else self.pid
        rec = logging.makeLogRecord(
            {
                "name": r.logger,
                "levelno": r.level,
                "levelname": logging.getLevelName(r.level),
                "msg": r.msg,
                "args": None,
                "pathname": r.path,
                "filename": os.path.basename(r.path),
                "module": os.path.splitext(os.path.basename(r.path))[0],
                "lineno": r.line,
                "funcName": r.func,
                "threadName": r.thread,
                "exc_text": r.exc,
                "process": pid,
                "processName": node,
                "meshipc_node": node,
                "meshipc_pid": pid,
                "meshipc_trace": r.trace or None,
            }
        )
        rec.created = r.created
        rec.msecs = (r.created - int(r.created)) * 1000
        rec.relativeCreated = (r.created - logging._startTime) * 1000  # type: ignore[attr-defined]
        _existing_logger(r.logger).handle(rec)

    def _drops(self, n: int) -> None:
        self.dropped += n
        self._unreported += n
        self._report()

    def _report(self, force: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        if self._unreported and (force or now - self._last_report >= LOG_INTERVAL):
            log.warning(
                "worker %s (pid %d) dropped %d log records (more than %d in flight; %d in all)",
                self.name,
                self.pid,
                self._unreported,
                LOG_WINDOW,
                self.dropped,
            )
            self._unreported = 0
            self._last_report = now

    async def set_level(self, level: int, logger: str = "") -> None:
        """Set the worker's logger ``logger`` ("": its root logger) to
        ``level``; returns once the worker has (its next record obeys it).
        ``MeshError`` if the worker is gone."""
        self._seq += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[self._seq] = fut
        try:
            self._port.send(SetLevel(self._seq, logger, level))
        except MeshError as exc:
            self._waiting.pop(self._seq, None)
            raise MeshError(f"worker {self.name} cannot change its log level: {exc}") from exc
        await fut
        self.levels[logger] = level

    async def wait(self) -> None:
        if self.task is not None:
            await asyncio.wait({self.task})

    def close(self) -> None:
        self._port.close()
