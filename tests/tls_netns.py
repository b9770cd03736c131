"""Run by ``test_tls_attach.py`` as ``unshare -Urn python tls_netns.py DIR``:
in this private network namespace (A), make a veth pair, start
``tls_server.py`` in a nested namespace (B, ``unshare -n``), move one end
there, attach over TLS from A, call and stream, then take the link down and
time how long a waiting call and a crossing port take to fail. Prints one
JSON report line; the test checks it."""

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

HERE = Path(__file__).parent
#: seconds: TCP_USER_TIMEOUT/keepalive of both ends, and the gateways' heartbeat
TCP_TIMEOUT = 2.0
HEARTBEAT = 0.5
#: the bound the report is checked against (either mechanism, plus room for a loaded machine)
BOUND = TCP_TIMEOUT + 4 * HEARTBEAT + 3.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


async def main() -> dict[str, Any]:
    folder = Path(sys.argv[1])
    ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
    ip("addr", "add", "10.77.0.1/24", "dev", "va")
    ip("link", "set", "va", "up")
    ip("link", "set", "lo", "up")
    env = {**os.environ, "TLS_TEST_HEARTBEAT": str(HEARTBEAT), "TLS_TEST_TCP_TIMEOUT": str(TCP_TIMEOUT)}
    server = await asyncio.create_subprocess_exec(
        "unshare",
        "-n",
        sys.executable,
        str(HERE / "tls_server.py"),
        str(folder),
        "10.77.0.2",
        "--wait-link",
        "vb",
        "10.77.0.2/24",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 20
        while True:  # unshare runs before it execs python: wait for the new namespace
            try:
                if os.readlink(f"/proc/{server.pid}/ns/net") != mine:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server never entered its own network namespace")
            await asyncio.sleep(0.01)
        ip("link", "set", "vb", "netns", str(server.pid))
        assert server.stdout is not None
        info = json.loads(await asyncio.wait_for(server.stdout.readline(), 30))
        del info
        report: dict[str, Any] = {"bound": BOUND}
        limits = BoundaryLimits(heartbeat_interval=HEARTBEAT, heartbeat_timeout=4 * HEARTBEAT)
        async with meshipc.connect_tls(
            folder / "good.access", limits=limits, tcp_timeout=TCP_TIMEOUT
        ) as conn:
            report["double"] = await asyncio.wait_for(conn.call("double", 21), 10)
            rx = await asyncio.wait_for(conn.call("count", 1000), 10)
            got = [await asyncio.wait_for(rx.recv(), 10) for _ in range(1000)]
            report["streamed"] = len(got) if got == list(range(1000)) else -1
            sender = await asyncio.wait_for(conn.open("double"), 10)  # a port crossing the link
            assert await asyncio.wait_for(sender.call(2), 10) == 4
            ip("link", "set", "va", "down")
            cut = time.monotonic()
            waiting = asyncio.ensure_future(conn.call("double", 1))
            try:
                await asyncio.wait_for(waiting, BOUND * 3)
                report["failed"] = {"type": "none"}
            except BaseException as exc:
                report["failed"] = {
                    "type": type(exc).__name__,
                    "text": str(exc),
                    "node_failure": isinstance(exc, meshipc.NodeFailure),
                }
            report["seconds"] = time.monotonic() - cut
            try:
                await asyncio.wait_for(sender.call(3), BOUND * 3)
                report["port_failed"] = "none"
            except BaseException as exc:
                report["port_failed"] = isinstance(exc, meshipc.NodeFailure)
                report["port_text"] = str(exc)
        return report
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            await asyncio.wait_for(server.wait(), 10)
        except TimeoutError:
            server.kill()
            await server.wait()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
