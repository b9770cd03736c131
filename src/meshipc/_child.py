"""Entry point of a spawned worker (started by ``_process.worker_command``)."""

from __future__ import annotations

import asyncio
import base64
import ctypes
import importlib
import logging
import os
import signal
import socket
import sys
import traceback
from typing import Any

import msgspec

from ._errors import MeshError
from ._process import ENV_INVITATION, ChildInvitation

log = logging.getLogger("meshipc")


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM us if the parent dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _read_secret(sock: socket.socket) -> bytes:
    """The mesh secret: the first 32 bytes the parent wrote on our socket."""
    sock.settimeout(30)
    buf = b""
    while len(buf) < 32:
        chunk = sock.recv(32 - len(buf))
        if not chunk:
            raise MeshError("the parent closed the bootstrap socket before sending the secret")
        buf += chunk
    sock.setblocking(False)
    return buf


async def _run(inv: ChildInvitation) -> int:
    from ._channel import Port
    from ._mesh import Mesh

    sock = socket.socket(fileno=inv.fd)
    secret = _read_secret(sock)
    async with Mesh._joined(inv.directory, secret, inv.node) as mesh:
        node = mesh._node
        node.connect_via(inv.parent, sock)
        port = Port._wrap([node.engine.new_bound(inv.port, inv.parent, inv.peer_port)])
        try:
            arg = await port.recv()
        except MeshError as exc:
            print(f"meshipc worker {inv.name}: no start message: {exc}", file=sys.stderr)
            return 1
        mod_name, func_name = inv.target.split(":")
        try:
            func = getattr(importlib.import_module(mod_name), func_name)
            work: asyncio.Task[Any] = asyncio.ensure_future(func(arg))
        except Exception as exc:
            port.send(["error", type(exc).__qualname__, str(exc), "".join(traceback.format_exception(exc))])
            traceback.print_exc()
            return 1
        # the bootstrap port says when the parent is gone or wants us to stop
        watch = asyncio.ensure_future(port.recv())
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            try:
                await work
            except BaseException:
                pass
            return 0 if watch.exception() is None or isinstance(watch.exception(), MeshError) else 1
        watch.cancel()
        err = work.exception()
        if err is not None:
            port.send(["error", type(err).__qualname__, str(err), "".join(traceback.format_exception(err))])
            print(f"meshipc worker {inv.name} failed:", file=sys.stderr)
            traceback.print_exception(err)
            port.close()
            return 1
        port.send(["ok"])
        port.close()
        return 0


def main() -> None:
    raw = os.environ.pop(ENV_INVITATION, None)
    if raw is None:
        print("meshipc._child is started by Mesh.spawn, not by hand", file=sys.stderr)
        sys.exit(2)
    _die_with_parent()
    try:
        inv = msgspec.msgpack.decode(base64.b64decode(raw), type=ChildInvitation)
    except (ValueError, msgspec.DecodeError) as exc:
        print(f"meshipc worker: bad invitation: {exc}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Ctrl-C in a terminal reaches the whole process group: the parent decides
    # when its workers stop (it closes their bootstrap port on mesh exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(asyncio.run(_run(inv)))


if __name__ == "__main__":
    main()
