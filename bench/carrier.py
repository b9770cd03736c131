"""The command carrier (issue 21): meshipc over ``python -m meshipc.remote``'s
stdio against the same carrier's raw echo (a tiny stdio program speaking
``[u32 len][data]`` frames, ``python -m bench.carrier``), in the same run.
Both far sides are started with the same command shape, pipes on both ends,
so the ratio is what the boundary link and the two meshes add."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import Any

import meshipc
from meshipc import _carrier
from meshipc.remote import open_stdio, take_stdio

from .core import rmtree, short_tmp
from .paths import MeshPath, SinkArgs, StreamPath, serve_frames


def far_command(*module: str) -> list[str]:
    """This interpreter running ``module``, with our import path (the far
    side finds meshipc and ``bench`` as we do)."""
    return [
        "env",
        f"PYTHONPATH={os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}",
        sys.executable,
        "-m",
        *module,
    ]


class CarrierMeshPath(MeshPath):
    """meshipc: an echo and a sink worker spawned through
    ``meshipc.command([... "-m", "meshipc.remote"])`` (``MeshPath``'s measures)."""

    async def start(self) -> None:
        self.tmp = short_tmp()
        self.stack = contextlib.AsyncExitStack()
        mesh = await self.stack.enter_async_context(meshipc.Mesh(runtime_dir=self.tmp))
        carrier = meshipc.command(far_command("meshipc.remote"), label="command:bench")
        self.call_tx, call_rx = meshipc.channel()
        self.data_tx, data_rx = meshipc.channel(bytes)
        self.ctl_tx, ctl_rx = meshipc.channel(int)
        done_tx, self.done_rx = meshipc.channel(int)
        await mesh.spawn("bench.paths:mesh_echo", call_rx, name="echo", via=carrier)
        await mesh.spawn(
            "bench.paths:mesh_sink", SinkArgs(data_rx, ctl_rx, done_tx), name="sink", via=carrier
        )

    async def stop(self) -> None:
        for tx in (self.call_tx, self.data_tx, self.ctl_tx):
            tx.close()
        await self.stack.aclose()
        rmtree(self.tmp)


class CarrierRawPath(StreamPath):
    """The same carrier's raw echo: ``StreamPath``'s measures over a
    subprocess's pipes, set up as the command carrier sets up its own
    (``exec_piped``)."""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, protocol, self.reader, self.writer, self.rt = await _carrier.exec_piped(
            far_command("bench.carrier"), lambda: asyncio.subprocess.SubprocessStreamProtocol(2**16, loop)
        )
        self.proc = asyncio.subprocess.Process(self.transport, protocol, loop)

    async def stop(self) -> None:
        self.writer.close()
        await self.proc.wait()
        self.rt.close()


async def _echo() -> None:
    reader, writer = await open_stdio(*take_stdio())
    await serve_frames(reader, writer)


def main(argv: list[str] | None = None) -> Any:
    """The raw echo program: frames on stdin, answers on stdout (on the loop
    ``python -m meshipc.remote`` would pick)."""
    meshipc.run(_echo())


if __name__ == "__main__":
    main()
