"""examples/control.py with the blocking API: no async, works from a REPL,
threads or a notebook cell.

python examples/control_sync.py submit "build the kernel"
python examples/control_sync.py list
"""

from __future__ import annotations

import sys

import meshipc


def main(argv: list[str]) -> int:
    try:
        with meshipc.sync.connect("jobs") as conn:
            if argv[:1] == ["submit"] and len(argv) == 2:
                print("queued as job", conn.call("jobs", ["submit", argv[1]], timeout=5))
            else:
                print(conn.call("jobs", ["list"], timeout=5))
    except meshipc.ConnectError as exc:
        print(f"is the service running? {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
