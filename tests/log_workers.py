"""Worker functions for ``test_logs.py``: they log with the standard
``logging`` module; the test sees the records in its own process."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from meshipc import Call, Receiver

log = logging.getLogger("logw")
flood_log = logging.getLogger("logw.flood")


async def levels(arg: Any) -> None:
    """Log one record at each level, then one with a traceback."""
    logging.getLogger().setLevel(logging.DEBUG)
    log.debug("d %d", 1)
    log.info("i %d", 2)
    log.warning("w %d", 3)
    log.error("e %d", 4)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("x %d", 5)


async def on_call(rx: Receiver[Call[Any]]) -> None:
    """Per call: log the request at DEBUG and at WARNING, then reply."""
    async for call in rx:
        log.debug("debug %s", call.request)
        log.warning("warning %s", call.request)
        call.reply(call.request)


async def flood(rx: Receiver[Call[Any]]) -> None:
    """Per call: log ``call.request`` records as fast as possible (yielding
    to the loop every thousand, as a busy worker does), then reply with how
    many were logged."""
    async for call in rx:
        n = int(call.request)
        for i in range(n):
            flood_log.warning("flood %d", i)
            if i % 1000 == 999:
                await asyncio.sleep(0)
        call.reply(n)


async def hostile(arg: Any) -> None:
    """Send, on this worker's own log port, what no honest worker sends:
    oversized and malformed records, an unasked level report, then one
    good record."""
    from meshipc._logs import LOG_MAX_TEXT, Forwarder, LevelSet

    (fw,) = [h for h in logging.getLogger().handlers if isinstance(h, Forwarder)]
    port = fw._port
    port.send(["r", "n", 30, "y" * (LOG_MAX_TEXT + 1), 0.0, "p", 1, "f", "t"])
    port.send(["r", "n", 5000, "m", 0.0, "p", 1, "f", "t"])
    port.send(["junk", b"\x00" * 100])
    port.send({"not": "a record"})
    port.send(LevelSet(12345))
    log.warning("still heard")
