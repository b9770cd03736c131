"""A mesh with a TLS listener, in its own process, for ``test_tls_attach.py``
and ``tls_netns.py``.

``python tls_server.py DIR HOST [--wait-link IFACE ADDR]``: serves ``double``,
``count`` (n -> a Receiver of 0..n-1) and ``total`` (a Receiver of ints ->
their sum), listens on HOST (port 0), writes ``DIR/good.access`` (60 s),
prints one JSON line ``{"port": N, "grant": ID}`` and then obeys lines on
stdin: ``grant NAME SECONDS`` (answers the grant id), ``revoke ID``,
``stats`` (answers the listener's counters). It exits when stdin closes.
With ``--wait-link`` it first waits for the network interface IFACE to
appear (moved into its network namespace), gives it ADDR and brings it up.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import meshipc
from meshipc._boundary import BoundaryLimits

HEARTBEAT = float(os.environ.get("TLS_TEST_HEARTBEAT", "0") or 0)


async def double(x: int) -> int:
    return 2 * x


async def count(n: int) -> meshipc.Receiver[int]:
    tx, rx = meshipc.channel(int)
    for i in range(n):
        tx.send(i)
    tx.close()
    return rx


async def total(rx: meshipc.Receiver[int]) -> int:
    s = 0
    async for x in rx:
        s += x
    return s


def wait_link(iface: str, addr: str) -> None:
    deadline = time.monotonic() + 20
    while subprocess.run(["ip", "link", "show", iface], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"no interface {iface} appeared")
        time.sleep(0.01)  # a process outside moves it here: nothing to wait on but its presence
    for cmd in (
        ["ip", "addr", "add", addr, "dev", iface],
        ["ip", "link", "set", iface, "up"],
        ["ip", "link", "set", "lo", "up"],
    ):
        subprocess.run(cmd, check=True)


def reply(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    folder, host = Path(sys.argv[1]), sys.argv[2]
    if "--wait-link" in sys.argv:
        i = sys.argv.index("--wait-link")
        wait_link(sys.argv[i + 1], sys.argv[i + 2])
    limits = None
    if HEARTBEAT:
        limits = BoundaryLimits(heartbeat_interval=HEARTBEAT, heartbeat_timeout=4 * HEARTBEAT)
    tcp_timeout = float(os.environ.get("TLS_TEST_TCP_TIMEOUT", "10"))
    async with meshipc.Mesh() as mesh:
        mesh.serve("double", double, request_type=int)
        mesh.serve("count", count, request_type=int)
        mesh.serve("total", total)
        tls = await mesh.listen_tls((host, 0), limits=limits, tcp_timeout=tcp_timeout)
        g = tls.grant(folder / "good.access", expires=60)
        reply({"port": tls.address[1], "grant": g.id, "pid": os.getpid()})
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd, *rest = line.split()
            if cmd == "grant":
                reply({"grant": tls.grant(folder / rest[0], expires=float(rest[1])).id})
            elif cmd == "revoke":
                tls.revoke(rest[0])
                reply({"revoked": rest[0]})
            elif cmd == "stats":
                st = tls.stats()
                reply({"accepted": st.server.accepted, "refused": st.server.refused, "links": st.links})


if __name__ == "__main__":
    asyncio.run(main())
