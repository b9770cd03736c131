"""``python -m meshipc.remote``: the far end of a carrier (``meshipc.command``,
``meshipc.ssh``), started by ``Mesh.spawn(target, arg, via=carrier)``.

It speaks a boundary link on its stdin and stdout and nothing else: before
anything else runs, file descriptor 1 becomes a copy of stderr and 0 reads
``/dev/null`` (the link keeps private copies), so a stray ``print``, a C
library or a child process cannot corrupt the stream or steal its bytes.
It starts a private ``Mesh`` of its own (own secret, own runtime folder, own
node ids), opens a ``Gateway`` on the link and runs the requested function
*in this process*, as a spawned worker runs its own (``_child``), answering
on the link's first port (records in ``_carrier``). Its log goes to stderr
(``LEVEL name: message``), which the carrier re-emits on the other side.

Exit status: the function's (0 returned, 1 raised or could not start),
``EXIT_PARENT_LOST`` (3) when the link ended before it finished (stdin
closed: the spawning process died or the carrier was killed), 2 when started
by hand on a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from . import __version__
from ._carrier import (
    MAX_TEXT,
    MAX_TRACEBACK,
    Finished,
    SpawnRequest,
    Started,
    StartFailed,
    clip,
    open_pipes,
)
from ._channel import Port
from ._child import EXIT_PARENT_LOST, _arg_type, _call, _find, _format
from ._errors import ChannelClosed, MeshError, PortFailed, remote_type_name
from ._gateway import Gateway
from ._loop import run
from ._mesh import Mesh
from ._process import apply_receiver_types

log = logging.getLogger("meshipc")

#: The label this side gives its link (named in its errors and log lines).
LABEL = "carrier:stdio"
#: Most seconds the far side waits, once its function ended, for what its
#: ports still hold to cross before it says GOODBYE.
DRAIN_LIMIT = 60.0
#: Seconds the far side waits, after its last answer, for the spawning side
#: to close the first port before it says goodbye regardless.
GOODBYE_GRACE = 5.0


def take_stdio() -> tuple[int, int]:
    """Private copies of stdin and stdout for the link (not inherited by
    children); fd 1 becomes stderr and fd 0 ``/dev/null``."""
    link_in, link_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout = sys.stderr
    return link_in, link_out


async def open_stdio(link_in: int, link_out: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Asyncio streams over the two descriptors (``open_pipes``)."""
    reader, writer, _ = await open_pipes(link_in, link_out)
    return reader, writer


def _failed(exc: BaseException) -> StartFailed:
    return StartFailed(
        clip(type(exc).__qualname__, MAX_TEXT), clip(str(exc), MAX_TEXT), clip(_format(exc), MAX_TRACEBACK)
    )


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Run one worker for the spawning side at the other end of the link."""
    async with Mesh() as mesh:
        mine, first = Port.pair()
        gateway = await mesh.open_gateway(reader, writer, first, label=LABEL)
        try:
            return await _run(mine, gateway)
        finally:
            mine.close()
            # what the function sent before it returned may still wait here
            # for the other side's credit (a slow reader there): it crosses
            # before the GOODBYE, which would fail those ports
            await gateway.aclose(flush=DRAIN_LIMIT)
            # and out of our pipe before the process exits (the other side
            # may be slow to read it; the gateway waits a second at most)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), DRAIN_LIMIT)


async def _run(port: Port, gateway: Gateway) -> int:
    try:
        port._set_type(SpawnRequest)
        req: SpawnRequest = await port.recv()
        func = _find(req.target)
        port._set_type(_arg_type(func))
        arg = await port.recv()
        apply_receiver_types(arg, req.arg_types)
        work: asyncio.Task[Any] = asyncio.ensure_future(_call(req.target, func, arg))
    except (ChannelClosed, PortFailed) as exc:
        log.error("no spawn request on the link: %s", exc)
        return EXIT_PARENT_LOST
    except Exception as exc:
        port.send(_failed(exc))
        port._set_type(Any)  # the argument may follow: dropped, not refused as a bad request
        await _goodbye(port)
        return 1
    port.send(Started(os.getpid(), __version__))
    watch = asyncio.ensure_future(port.recv())  # closed: stop; failed: the link is gone
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:
        work.cancel()
        await asyncio.wait({work})
        if not work.cancelled():
            work.exception()  # retrieved: nobody hears it now
        lost = watch.exception()
        if lost is None or isinstance(lost, ChannelClosed):
            return 0  # asked to stop
        log.error("lost the link to the spawning side: %s", lost)
        return EXIT_PARENT_LOST
    err = work.exception()
    if err is None:
        port.send(Finished())
    else:
        port.send(
            Finished(
                clip(remote_type_name(type(err)), MAX_TEXT),
                clip(str(err), MAX_TEXT),
                clip(_format(err), MAX_TRACEBACK),
            )
        )
    await _goodbye(port, watch)
    return 0 if err is None else 1


async def _goodbye(port: Port, watch: asyncio.Future[Any] | None = None) -> None:
    """Wait (bounded) for the spawning side to close its end: our last
    answer has crossed by then."""
    try:
        async with asyncio.timeout(GOODBYE_GRACE):
            if watch is not None:
                await watch
            while True:
                await port.recv()  # what was sent after a failed start: dropped
    except (TimeoutError, ChannelClosed, PortFailed):
        pass
    except MeshError as exc:  # a message it could not read: we are leaving anyway
        log.warning("unreadable message after the answer: %s", exc)


def main() -> None:
    if os.isatty(0):
        print("meshipc.remote is started by Mesh.spawn(..., via=carrier), not by hand", file=sys.stderr)
        sys.exit(2)
    link_in, link_out = take_stdio()
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # Ctrl-C on the far terminal (if any) is not ours to act on: the
    # spawning side stops us by closing the port or the link
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # nor is a hang-up: our stdin's end says the link is over, and a SIGHUP
    # would end us without removing our mesh's folder
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    async def go() -> int:
        reader, writer = await open_stdio(link_in, link_out)
        return await serve(reader, writer)

    sys.exit(run(go()))


if __name__ == "__main__":
    main()
