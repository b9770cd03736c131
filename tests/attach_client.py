"""An external client process for ``test_attach.py``.

Run as ``python attach_client.py MODE ...``. It attaches to a running mesh
(``meshipc.connect`` or ``meshipc.join``) and then obeys commands that the
test sends on the connection's port. It talks to the test only through mesh
messages and one JSON line per event on stdout, never through files or
sleeps.

Modes:

``session TARGET RUNTIME_DIR``
    ``connect(TARGET, runtime_dir=RUNTIME_DIR)`` (a name or a listener path;
    ``-`` for no runtime dir), then run the command loop (see ``session``).
``join``
    read an invitation as hex from stdin, ``join`` it, run the command loop.
``many TARGET N [TIMEOUT]``
    ``N`` concurrent ``connect`` contexts (``asyncio.gather``; ``TIMEOUT``
    for each, default ``JOIN_TIMEOUT``); each receives a ``Sender`` on its
    port and makes one call ``[pid, i]``; prints ``{"ok": N}`` when all
    succeeded, else ``{"ok": <how many did>, "errors": {<error>: count}}``
    and exits with status 3.
``cycles TARGET N``
    ``N`` times in a row: ``connect``, receive a ``Sender``, make one call
    ``[pid, i]``, leave; prints ``{"ok": N}`` (soak tests).
``connect-only TARGET EXPECTED_UID``
    try ``connect``; print the outcome (used for refused clients).
``burst-service RUNTIME_DIR NAME NOFILE BACKLOG``
    own ``Mesh(name=NAME)`` with a listener (kernel backlog ``BACKLOG`` for
    every socket it listens on, ``RLIMIT_NOFILE`` lowered to ``NOFILE``;
    0 leaves either as is); each client it admits gets a ``Sender`` whose
    calls ``[pid, i]`` it answers ``[pid, i, "ok"]``. Prints
    ``{"listener": path}`` once ready, then for each line on stdin its
    figures ``{"attached", "evicted", "out_of_fds"}``.
``named RUNTIME_DIR NAME``
    own ``Mesh(name=NAME)`` with a listener and wait forever (to be killed).

Every mode prints ``{"error": <JoinError class name>, "message": ...}`` and
exits with status 3 if attaching fails. Set ``ATTACH_CLIENT_LOG=1`` to log
meshipc at DEBUG level to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import meshipc
from meshipc._join import JOIN_TIMEOUT


def emit(**obj: Any) -> None:
    print(json.dumps(obj), flush=True)


async def read_all(fd: int) -> bytes:
    """Everything readable from the pipe ``fd`` until EOF (takes ownership)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0)
    )
    try:
        return await reader.read()
    finally:
        transport.close()


async def serve(rx: meshipc.Receiver[Any]) -> None:
    async for call in rx:
        call.reply({"served_by": os.getpid(), "request": call.request})


async def session(conn: meshipc.Attachment) -> str:
    """Obey commands ``{"op": ...}`` from the server until told to leave.

    Replies go back on ``conn.port``. Returns why the loop ended."""
    port = conn.port
    tasks: list[asyncio.Task[None]] = []
    receivers: list[meshipc.Receiver[Any]] = []
    try:
        while True:
            try:
                cmd = await port.recv()
            except meshipc.ChannelClosed:
                return "closed"
            op = cmd["op"]
            if op == "whoami":
                port.send({"pid": os.getpid(), "uid": os.getuid()})
            elif op == "call":  # call a Sender the server gave us
                port.send({"result": await cmd["tx"].call(cmd["request"])})
            elif op == "serve":  # give the server a Sender whose calls we answer
                tx, rx = meshipc.channel()
                receivers.append(rx)
                tasks.append(asyncio.create_task(serve(rx)))
                port.send({"tx": tx})
            elif op == "port":  # a raw Port: read one int, answer it + 1, close
                p: meshipc.Port = cmd["port"]
                with p:
                    p.send(await p.recv() + 1)
                port.send({"port": "done"})
            elif op == "fd_write":  # the server gave us a pipe's write end
                fd: meshipc.Fd = cmd["fd"]
                if not isinstance(fd, meshipc.Fd):
                    raise TypeError(f"expected a meshipc.Fd, got {type(fd).__name__}")
                with fd:
                    os.write(fd.fileno(), cmd["data"])
                port.send({"written": len(cmd["data"])})
            elif op == "fd_give":  # we give the server a pipe's write end, then read
                r, w = os.pipe()
                port.send({"fd": meshipc.Fd(w)})
                port.send({"read": await read_all(r)})
            elif op == "hang":
                port.send({"hanging": os.getpid()})
                await asyncio.Event().wait()
            elif op == "leave":
                return "leave"
            else:
                raise ValueError(f"unknown op {op!r}")
    finally:
        for t in tasks:
            t.cancel()
        for rx in receivers:
            rx.close()


def join_failed(exc: meshipc.JoinError) -> int:
    emit(error=type(exc).__name__, message=str(exc))
    return 3


async def main_session(target: str, runtime_dir: str) -> int:
    rd = None if runtime_dir == "-" else runtime_dir
    try:
        async with meshipc.connect(target, runtime_dir=rd) as conn:
            emit(attached=os.getpid())
            why = await session(conn)
    except meshipc.JoinError as exc:
        return join_failed(exc)
    emit(left=why)
    return 0


async def main_join() -> int:
    data = bytes.fromhex(sys.stdin.readline().strip())
    try:
        async with meshipc.join(meshipc.Invitation.from_bytes(data)) as conn:
            emit(attached=os.getpid())
            why = await session(conn)
    except meshipc.JoinError as exc:
        return join_failed(exc)
    emit(left=why)
    return 0


async def main_many(target: str, n: int, timeout: float) -> int:
    async def one(i: int) -> None:
        stage = "connect"
        try:
            async with asyncio.timeout(2 * timeout):  # a hang shows as an error, saying where
                async with meshipc.connect(target, timeout=timeout) as conn:
                    stage = "receive its sender"
                    with await conn.port.recv() as tx:
                        stage = "call"
                        answer = await tx.call([os.getpid(), i])
                    stage = "leave"
        except TimeoutError:
            raise TimeoutError(f"stuck at: {stage}") from None
        if answer != [os.getpid(), i, "ok"]:
            raise RuntimeError(f"client {i}: unexpected answer {answer!r}")

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    errors: dict[str, int] = {}
    for r in results:
        if isinstance(r, BaseException):
            why = f"{type(r).__name__}: {r}"
            errors[why] = errors.get(why, 0) + 1
    if errors:
        emit(ok=n - sum(errors.values()), errors=errors)
        return 3
    emit(ok=n)
    return 0


async def main_burst_service(runtime_dir: str, name: str, nofile: int, backlog: int) -> int:
    import resource

    import meshipc._sockets

    if backlog:
        meshipc._sockets.listen_private.__defaults__ = (backlog,)
    if nofile:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    loop = asyncio.get_running_loop()
    async with meshipc.Mesh(name=name, runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        tx, rx = meshipc.channel()

        async def answer() -> None:
            while True:
                try:
                    call = await rx.recv()
                except meshipc.PortFailed:
                    continue  # one client's node left with its sender open
                call.reply([*call.request, "ok"])

        async def hand_out() -> None:
            async for conn in listener:
                conn.port.send(tx.clone())
                conn.port.close()

        tasks = [asyncio.create_task(answer()), asyncio.create_task(hand_out())]
        emit(listener=os.fspath(listener.path))
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.readline():
            stats = mesh.stats()
            accs = [a for a in (stats.node.acceptor, listener.stats().acceptor) if a is not None]
            emit(
                attached=stats.node.attached,
                evicted=sum(a.evicted for a in accs),
                out_of_fds=sum(a.out_of_fds for a in accs),
            )
        for t in tasks:
            t.cancel()
    return 0


async def main_cycles(target: str, n: int) -> int:
    try:
        for i in range(n):
            async with meshipc.connect(target) as conn:
                with await conn.port.recv() as tx:
                    answer = await tx.call([os.getpid(), i])
                if answer != [os.getpid(), i, "ok"]:
                    raise RuntimeError(f"cycle {i}: unexpected answer {answer!r}")
    except meshipc.JoinError as exc:
        return join_failed(exc)
    emit(ok=n)
    return 0


async def main_connect_only(target: str, expected_uid: int) -> int:
    try:
        async with meshipc.connect(target, expected_uid=expected_uid):
            emit(attached=os.getpid())
    except meshipc.JoinError as exc:
        return join_failed(exc)
    return 0


async def main_named(runtime_dir: str, name: str) -> int:
    async with meshipc.Mesh(name=name, runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        emit(directory=os.fspath(mesh.directory), listener=os.fspath(listener.path), pid=os.getpid())
        await asyncio.Event().wait()
    return 0


def main(argv: list[str]) -> int:
    if os.environ.get("ATTACH_CLIENT_LOG"):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    mode, args = argv[0], argv[1:]
    if mode == "session":
        return asyncio.run(main_session(args[0], args[1]))
    if mode == "join":
        return asyncio.run(main_join())
    if mode == "many":
        timeout = float(args[2]) if len(args) > 2 else JOIN_TIMEOUT
        return asyncio.run(main_many(args[0], int(args[1]), timeout))
    if mode == "burst-service":
        return asyncio.run(main_burst_service(args[0], args[1], int(args[2]), int(args[3])))
    if mode == "cycles":
        return asyncio.run(main_cycles(args[0], int(args[1])))
    if mode == "connect-only":
        return asyncio.run(main_connect_only(args[0], int(args[1])))
    if mode == "named":
        return asyncio.run(main_named(args[0], args[1]))
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
