"""A long-lived service with a worker process that control clients attach to.

python examples/service.py          # terminal 1: runs until Ctrl-C
python examples/control.py status   # terminal 2: attach, drive, detach
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import meshipc


async def worker(rx: meshipc.Receiver[Any]) -> None:
    """Runs in a child process: a tiny job queue."""
    jobs: list[str] = []
    async for call in rx:
        op, *args = call.request
        if op == "submit":
            jobs.append(args[0])
            call.reply(len(jobs))
        elif op == "list":
            call.reply({"pid": os.getpid(), "jobs": jobs})
        else:
            call.fail(ValueError(f"unknown operation {op!r}"))


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    async with meshipc.Mesh(name="jobs") as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("service:worker", rx, name="jobs-worker")
        listener = await mesh.listen()
        print(f"service ready: worker pid {proc.pid}; attach with `python examples/control.py`")
        async for conn in listener:
            # each client gets its own sender to the worker and drives it directly
            conn.port.send(tx.clone())


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
