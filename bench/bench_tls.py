"""Round trip over TLS: a service call through ``meshipc.connect_tls`` (a
``ServiceSender`` from ``conn.open``, so each call is one relay message each
way over the boundary link) against a raw TLS echo of the same 64-byte
payload (a 4-byte length prefix, asyncio streams, the same TLS context and
the same server process), in the same run.

    python bench/bench_tls.py [--runs 5] [--n 2000]

The server process runs both; each run measures both paths, alternating
which goes first; the table gives medians per round trip and the ratio
meshipc/raw. Not collected by pytest (lives in bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import meshipc
from meshipc._tls import TlsServer, open_tls, read_access

PAYLOAD = b"x" * 64


async def echo(req: bytes) -> bytes:
    return req


async def serve(folder: Path) -> None:
    async with meshipc.Mesh(runtime_dir=folder) as mesh:
        mesh.serve("echo", echo)
        tls = await mesh.listen_tls(("127.0.0.1", 0))
        tls.grant(folder / "a.access", expires=3600)

        async def raw(r: asyncio.StreamReader, w: asyncio.StreamWriter, *_: Any) -> None:
            while True:
                try:
                    head = await r.readexactly(4)
                    body = await r.readexactly(struct.unpack("<I", head)[0])
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                w.write(head + body)

        raw_server = TlsServer(tls._authority, raw)
        await raw_server.start("127.0.0.1", 0)
        (folder / "ports.json").write_text(json.dumps({"raw": raw_server.address[1]}))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        raw_server.close()


async def client(folder: Path, runs: int, n: int) -> dict[str, list[float]]:
    access = read_access(folder / "a.access")
    raw_port = json.loads((folder / "ports.json").read_text())["raw"]
    out: dict[str, list[float]] = {"meshipc": [], "raw": []}
    async with meshipc.connect_tls(folder / "a.access") as conn:
        tx = await conn.open("echo")
        raw_access = type(access)(access.path, access.host, raw_port, access.pin, access.grant, access.ca_pem)
        r, w = await open_tls(raw_access, 10)

        async def m() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                await tx.call(PAYLOAD)
            return (time.perf_counter() - t0) / n

        async def raw() -> float:
            msg = struct.pack("<I", len(PAYLOAD)) + PAYLOAD
            t0 = time.perf_counter()
            for _ in range(n):
                w.write(msg)
                await r.readexactly(len(msg))
            return (time.perf_counter() - t0) / n

        await m()
        await raw()  # warm up
        for i in range(runs):
            order = [("meshipc", m), ("raw", raw)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                out[name].append(await fn())
        w.close()
        tx.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--serve", metavar="DIR")
    args = ap.parse_args()
    if args.serve:
        meshipc.run(serve(Path(args.serve)))
        return
    with tempfile.TemporaryDirectory(prefix="bt", dir="/tmp") as d:
        import subprocess

        server = subprocess.Popen([sys.executable, __file__, "--serve", d], stdin=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not (Path(d) / "ports.json").exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.05)
            res = meshipc.run(client(Path(d), args.runs, args.n))
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(10)
    mm, rr = statistics.median(res["meshipc"]), statistics.median(res["raw"])
    print(f"{'path':<28}{'median µs/round trip':>22}{'min-max':>20}")
    for name, v in (("meshipc connect_tls call", res["meshipc"]), ("raw TLS echo", res["raw"])):
        print(f"{name:<28}{statistics.median(v) * 1e6:>22.1f}{min(v) * 1e6:>10.1f}-{max(v) * 1e6:.1f}")
    print(f"ratio meshipc/raw: {mm / rr:.2f}x  (uvloop: {os.environ.get('MESHIPC_UVLOOP', 'default')})")


if __name__ == "__main__":
    main()
