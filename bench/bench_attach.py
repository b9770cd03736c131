"""Attach latency: a fresh client process's connect -> first RPC reply.

Compared in the same run with ``multiprocessing.connection`` (Listener /
Client with an authkey, also HMAC-authenticated). Each trial starts the
client *process* first and measures inside it, from just before connecting
to the first reply, so interpreter start-up is not counted.

    python bench/bench_attach.py [trials]
"""

from __future__ import annotations

import asyncio
import multiprocessing.connection as mpc
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading

import meshipc

MESH_CLIENT = r"""
import asyncio, sys, time, meshipc
async def main():
    t = time.perf_counter()
    async with meshipc.connect(sys.argv[1], runtime_dir=sys.argv[2]) as conn:
        conn.port.send("ping")
        await conn.port.recv()
        print(time.perf_counter() - t)
asyncio.run(main())
"""

MPC_CLIENT = r"""
import sys, time, multiprocessing.connection as mpc
t = time.perf_counter()
c = mpc.Client(sys.argv[1], family="AF_UNIX", authkey=bytes.fromhex(sys.argv[2]))
c.send_bytes(b"ping"); c.recv_bytes()
print(time.perf_counter() - t)
c.close()
"""


async def bench_mesh(trials: int) -> list[float]:
    rt = tempfile.mkdtemp(prefix="mb", dir="/tmp")
    out = []
    async with meshipc.Mesh(name="bench", runtime_dir=rt) as mesh:
        listener = await mesh.listen()

        async def serve() -> None:
            async for conn in listener:
                msg = await conn.port.recv()
                conn.port.send(msg)

        task = asyncio.create_task(serve())
        for _ in range(trials):
            p = await asyncio.create_subprocess_exec(
                sys.executable, "-c", MESH_CLIENT, "bench", rt, stdout=subprocess.PIPE
            )
            stdout, _ = await p.communicate()
            out.append(float(stdout))
        task.cancel()
    return out


def bench_mpc(trials: int) -> list[float]:
    d = tempfile.mkdtemp(prefix="mb", dir="/tmp")
    path = os.path.join(d, "l.sock")
    key = secrets.token_bytes(32)
    lis = mpc.Listener(path, family="AF_UNIX", authkey=key)

    def serve() -> None:
        for _ in range(trials):
            c = lis.accept()
            c.send_bytes(c.recv_bytes())
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    out = []
    for _ in range(trials):
        r = subprocess.run(
            [sys.executable, "-c", MPC_CLIENT, path, key.hex()], capture_output=True, check=True
        )
        out.append(float(r.stdout))
    t.join()
    lis.close()
    return out


def main() -> None:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    mesh, mp = [], []
    for _ in range(3):  # interleave the two so drift hits both
        mesh += asyncio.run(bench_mesh(trials))
        mp += bench_mpc(trials)
    m, p = statistics.median(mesh), statistics.median(mp)
    print(f"attach latency (connect -> first reply), median of {len(mesh)} client processes")
    print(f"  meshipc.connect (new node, HMAC both ways)  {m * 1e3:8.2f} ms")
    print(f"  multiprocessing.connection.Client (authkey) {p * 1e3:8.2f} ms")
    print(f"  ratio meshipc / multiprocessing             {m / p:8.2f}x")


if __name__ == "__main__":
    main()
