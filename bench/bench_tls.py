"""TLS (issue 21): a service reached through ``meshipc.connect_tls`` (a
``ServiceSender`` from ``conn.open``, so each call is one relay message each
way over the boundary link) against a raw TLS echo of the same 64-byte
payload (``StreamPath``'s ``[u32 len][data]`` frames and measures, asyncio
streams, the same TLS context and the same kind of server process), in the
same run. ``python -m bench --only tls_rtt`` runs them as rows; by
hand:

    python -m bench.bench_tls [--runs 5] [--n 2000]

prints medians per round trip and the ratio meshipc/raw (each run measures
both paths, alternating which goes first). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import ssl
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import meshipc
from meshipc._tls import TlsServer, open_tls, read_access

from .carrier import far_command
from .core import MSG, rmtree, short_tmp
from .paths import StreamPath, serve_frames


async def echo(req: bytes) -> bytes:
    return req


async def serve(folder: Path) -> None:
    """The server process: a mesh serving ``echo`` over ``listen_tls`` (a
    grant in ``folder``) and a raw TLS frame echo with the same authority;
    prints ``ready <raw port>``, runs until stdin ends."""
    async with meshipc.Mesh(runtime_dir=folder / "rt") as mesh:
        mesh.serve("echo", echo)
        tls = await mesh.listen_tls(("127.0.0.1", 0))
        tls.grant(folder / "a.access", expires=3600)
        raw = TlsServer(tls._authority, lambda r, w, *_: serve_frames(r, w))
        await raw.start("127.0.0.1", 0)
        print(f"ready {raw.address[1]}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        raw.close()


class _Server:
    """A ``serve`` process of this module (the driver's loop is inherited
    through ``MESHIPC_UVLOOP``)."""

    async def start_server(self) -> tuple[Path, int]:
        self.tmp = short_tmp()
        self.server = await asyncio.create_subprocess_exec(
            *far_command("bench.bench_tls", "--serve", self.tmp),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.server.stdout is not None
        line = await asyncio.wait_for(self.server.stdout.readline(), 60)
        if not line.startswith(b"ready "):
            raise RuntimeError(f"the TLS server did not start: {line!r}")
        return Path(self.tmp) / "a.access", int(line.split()[1])

    async def stop_server(self) -> None:
        assert self.server.stdin is not None
        self.server.stdin.close()
        await asyncio.wait_for(self.server.wait(), 30)
        rmtree(self.tmp)


class TlsMeshPath(_Server):
    """meshipc: ``conn.open("echo")`` of ``meshipc.connect_tls(grant)``."""

    is_async = True

    async def start(self) -> None:
        access, _ = await self.start_server()
        self.stack = contextlib.AsyncExitStack()
        conn = await self.stack.enter_async_context(meshipc.connect_tls(access))
        self.tx = await conn.open("echo")

    async def rtt(self, n: int) -> float:
        tx = self.tx
        t0 = time.perf_counter()
        for _ in range(n):
            await tx.call(MSG)
        return (time.perf_counter() - t0) / n * 1e6

    async def stop(self) -> None:
        self.tx.close()
        await self.stack.aclose()
        await self.stop_server()


class TlsRawPath(StreamPath, _Server):
    """The raw TLS echo: ``StreamPath``'s measures over ``open_tls`` (the
    grant's client certificate and pin) to the server's raw port."""

    async def start(self) -> None:
        access, port = await self.start_server()
        grant = read_access(access)
        self.reader, self.writer = await open_tls(dataclasses.replace(grant, port=port), 10)

    async def stop(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()
        await self.stop_server()


async def _client(runs: int, n: int) -> dict[str, list[float]]:
    paths: dict[str, Any] = {"meshipc connect_tls call": TlsMeshPath(), "raw TLS echo": TlsRawPath()}
    out: dict[str, list[float]] = {name: [] for name in paths}
    for p in paths.values():
        await p.start()
    try:
        for p in paths.values():
            await p.rtt(200)  # warm-up
        items = list(paths.items())
        for i in range(runs):
            for name, p in items if i % 2 == 0 else items[::-1]:
                out[name].append(await p.rtt(n))
    finally:
        for p in paths.values():
            await p.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--serve", metavar="DIR")
    args = ap.parse_args()
    if args.serve:
        if os.environ.get("BENCH_PROFILE"):  # bench/profile_targets.py-style: the server's profile
            import cProfile

            with cProfile.Profile() as pr:
                meshipc.run(serve(Path(args.serve)))
            pr.dump_stats(os.environ["BENCH_PROFILE"])
        else:
            meshipc.run(serve(Path(args.serve)))
        return
    res = meshipc.run(_client(args.runs, args.n))
    print(f"{'path':<28}{'median µs/round trip':>22}{'min-max':>20}")
    for name, v in res.items():
        print(f"{name:<28}{statistics.median(v):>22.1f}{min(v):>10.1f}-{max(v):.1f}")
    mm, rr = (statistics.median(v) for v in res.values())
    print(f"ratio meshipc/raw: {mm / rr:.2f}x  (uvloop: {os.environ.get('MESHIPC_UVLOOP', 'default')})")


if __name__ == "__main__":
    main()
