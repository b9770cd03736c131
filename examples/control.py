"""Attach to the running `jobs` mesh, call its `jobs` service, detach.

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
            if argv[:1] == ["submit"] and len(argv) == 2:
                print("queued as job", await conn.call("jobs", ["submit", argv[1]], timeout=5))
            else:
                print(await conn.call("jobs", ["list"], timeout=5))
    except meshipc.ConnectError as exc:
        print(f"is the service running? {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
