"""A service under a flood of silent connections: how long a real client
takes to attach during the noise and after it stops, the service's CPU time
while flooded, and how much it logged.

The service runs in its own process, optionally with a low fd limit (so the
flood exhausts its descriptors); this process opens the silent connections.

    python bench/bench_flood.py [silent] [fd-limit, 0 = unchanged] [node|listener]
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import meshipc

SERVICE = r"""
import asyncio, json, logging, resource, sys, meshipc
logging.basicConfig(level=logging.WARNING, stream=open(sys.argv[3], "w"))
async def main():
    async with meshipc.Mesh(name="flood", runtime_dir=sys.argv[1]) as mesh:
        listener = await mesh.listen()
        if int(sys.argv[2]):
            resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[2])))
        print(json.dumps({"node": str(mesh._node.path), "listener": str(listener.path)}), flush=True)
        async for conn in listener:
            conn.port.send("hello")
asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def attach(rd: str) -> str:
    t = time.perf_counter()
    try:
        async with asyncio.timeout(30):  # (not timeout=: also runs against older meshipc)
            async with meshipc.connect("flood", runtime_dir=rd) as conn:
                assert await conn.port.recv() == "hello"
    except (meshipc.JoinError, TimeoutError) as exc:
        return f"failed after {time.perf_counter() - t:.2f} s: {exc!r}"
    return f"{time.perf_counter() - t:.3f} s"


async def main(silent: int, fd_limit: int, target: str) -> None:
    rd = tempfile.mkdtemp(prefix="f", dir="/tmp")
    log_path = rd + ".log"
    svc = subprocess.Popen(
        [sys.executable, "-c", SERVICE, rd, str(fd_limit), log_path], stdout=subprocess.PIPE
    )
    held: list[socket.socket] = []
    try:
        assert svc.stdout is not None
        paths = json.loads(svc.stdout.readline())
        cpu0, t0 = cpu_seconds(svc.pid), time.perf_counter()
        for _ in range(silent):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(paths[target])
            except BlockingIOError:
                pass
            held.append(s)
        during = await attach(rd)
        await asyncio.sleep(5)  # the flood goes on: how busy is the service meanwhile?
        cpu = cpu_seconds(svc.pid) - cpu0
        wall = time.perf_counter() - t0
        for s in held:
            s.close()
        held = []
        after = await attach(rd)
        print(
            f"{silent} silent connections to the {target} socket, fd limit {fd_limit or 'unchanged'}:\n"
            f"  attach during the flood  {during}\n"
            f"  attach after it stopped  {after}\n"
            f"  service CPU while flooded {cpu:.2f} s in {wall:.1f} s\n"
            f"  service log              {os.path.getsize(log_path)} bytes"
        )
    finally:
        for s in held:
            s.close()
        svc.kill()
        svc.wait()
        shutil.rmtree(rd, ignore_errors=True)
        if os.path.exists(log_path):
            os.unlink(log_path)


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(
        main(int(a[0]) if a else 400, int(a[1]) if len(a) > 1 else 256, a[2] if len(a) > 2 else "node")
    )
