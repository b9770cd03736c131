"""Attach to the running `jobs` service, drive its worker, detach.

python examples/control.py submit "build the kernel"
python examples/control.py list
"""

from __future__ import annotations

import asyncio
import sys

import meshipc


async def main(argv: list[str]) -> int:
    try:
        async with meshipc.connect("jobs") as conn:
            jobs = await conn.port.recv()  # a Sender to the service's worker
            if argv[:1] == ["submit"] and len(argv) == 2:
                print("queued as job", await jobs.call(["submit", argv[1]]))
            else:
                print(await jobs.call(["list"]))
            jobs.close()
    except meshipc.ConnectError as exc:
        print(f"is the service running? {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
