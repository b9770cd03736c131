"""A long-lived service with a worker process that control clients attach to.

python examples/service.py               # terminal 1: runs until Ctrl-C
python examples/control.py list          # terminal 2: attach, call the `jobs` service, detach
python examples/control_sync.py list     # the same with the blocking API
meshipc call jobs jobs '["list"]'        # the same from the shell; also `meshipc status jobs`
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import meshipc


async def worker(ready: meshipc.Sender[Any]) -> None:
    """Runs in a child process: a tiny job queue, served to the whole mesh as `jobs`."""
    jobs: list[str] = []

    async def handle(request: list[str]) -> Any:
        op, *args = request
        if op == "submit":
            jobs.append(args[0])
            return len(jobs)
        if op == "list":
            return {"pid": os.getpid(), "jobs": jobs}
        raise ValueError(f"unknown operation {op!r}")

    mesh = meshipc.current_mesh()  # this worker's own node
    mesh.inspect_add("jobs", lambda: {"queued": len(jobs)})  # `meshipc inspect jobs -r`
    service = mesh.serve("jobs", handle, request_type=list[str])
    await service  # registered for the whole mesh
    ready.send(True)
    await service.wait_closed()


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    async with meshipc.Mesh(name="jobs") as mesh:
        ready_tx, ready_rx = meshipc.channel()
        proc = await mesh.spawn("service:worker", ready_tx, name="jobs-worker")
        await ready_rx.recv()
        listener = await mesh.listen()
        print(f"service ready: worker pid {proc.pid}; attach with `python examples/control.py`", flush=True)
        async for conn in listener:
            conn.port.close()  # clients use the services; nothing to say on their port


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
