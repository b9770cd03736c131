"""Worker functions run in spawned processes by ``test_process.py``.

Every function here is an ``async def func(arg)`` started by
``Mesh.spawn("workers:func", arg)``. Children import this module through the
parent's ``sys.path`` (``tests/`` is on it via ``conftest.py``). Workers talk
back to the test only through mesh messages, never through files or sleeps.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import os
import resource
from typing import Any

import meshipc
import meshipc._child
from meshipc import Call, ChannelClosed, Fd, Port, Receiver, Sender
from relutil import LagMeter


async def echo(rx: Receiver[Call[Any]]) -> None:
    """Serve calls on ``rx``: reply with the request, unchanged."""
    async for call in rx:
        call.reply(call.request)


async def whoami(rx: Receiver[Call[Any]]) -> None:
    """Serve calls on ``rx``: reply with ``[pid, request]``."""
    async for call in rx:
        call.reply([os.getpid(), call.request])


async def relay(arg: dict[str, Any]) -> None:
    """Serve calls on ``arg["rx"]`` by calling ``arg["to"]`` (another worker)
    and replying with ``[pid, its answer]``."""
    rx: Receiver[Call[Any]] = arg["rx"]
    with arg["to"] as to:
        async for call in rx:
            call.reply([os.getpid(), await to.call(call.request)])


async def write_fd(arg: dict[str, Any]) -> None:
    """Write ``arg["data"]`` into the received descriptor ``arg["fd"]``."""
    fd: Fd = arg["fd"]
    if not isinstance(fd, Fd):
        raise TypeError(f"expected a meshipc.Fd, got {type(fd).__name__}")
    with fd:
        view = memoryview(arg["data"])
        while view:
            view = view[os.write(fd.fileno(), view) :]


async def fd_writer(rx: Receiver[Call[Any]]) -> None:
    """Serve calls whose request is ``{"fd": Fd, "data": bytes}``: write the
    data into the fd, close it, reply with the number of bytes written."""
    async for call in rx:
        await write_fd(call.request)
        call.reply(len(call.request["data"]))


def _fds_in(value: Any) -> list[Fd]:
    if isinstance(value, Fd):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [f for x in value for f in _fds_in(x)]
    return []


async def fd_stream_writer(arg: dict[str, Any]) -> None:
    """Read ``arg["n"]`` messages of fds (a lone ``Fd``, or ``Fd``s among
    plain values) from ``arg["rx"]``: write ``b"i.j;"`` into the j-th fd of
    the i-th message and close it. Sends ``arg["done"]`` how many
    descriptors this process has open first (before any message is sent:
    the sender waits for it), then after the last message."""
    rx, done = arg["rx"], arg["done"]
    done.send(len(os.listdir("/proc/self/fd")))
    for i in range(arg["n"]):
        for j, fd in enumerate(_fds_in(await rx.recv())):
            with fd:
                os.write(fd.fileno(), b"%d.%d;" % (i, j))
    done.send(len(os.listdir("/proc/self/fd")))


async def noop(arg: Any) -> None:
    """Return at once, without touching ``arg``."""


async def fail(arg: Any) -> None:
    """A worker whose function raises."""
    raise ValueError(f"worker refused {arg!r}")


async def talk_sender(arg: dict[str, Any]) -> None:
    """Worker A of the three-process test: for each ``n`` read from
    ``arg["go"]``, send ``n`` messages then an end-of-round marker on
    ``arg["tx"]`` (whose receiver is in worker B); close ``tx`` at the end."""
    tx: Sender[Any] = arg["tx"]
    go: Receiver[int] = arg["go"]
    pid = os.getpid()
    rounds = 0
    with tx:
        async for n in go:
            rounds += 1
            for i in range(n):
                tx.send(["msg", pid, rounds, i])
            tx.send(["end", pid, rounds, n])


async def talk_receiver(arg: dict[str, Any]) -> None:
    """Worker B of the three-process test: read ``arg["rx"]`` (fed by worker
    A); at each end-of-round marker report ``["round", round, count, ok,
    sender pids]`` on ``arg["report"]``; at the end report ``["done", total]``."""
    rx: Receiver[Any] = arg["rx"]
    report: Sender[Any] = arg["report"]
    total = 0
    count = 0
    ok = True
    pids: set[int] = set()
    async for kind, pid, rnd, i in rx:
        pids.add(pid)
        if kind == "msg":
            ok = ok and i == count
            count += 1
            total += 1
        else:
            report.send(["round", rnd, count, ok and i == count, sorted(pids), os.getpid()])
            count = 0
            ok = True
    report.send(["done", total])
    report.close()


async def forward_port(arg: dict[str, Any]) -> None:
    """Receive a port on ``arg["ports"]``, read ``arg["keep"]`` messages from
    it, then send the port on to ``arg["to"]`` (another worker) and report the
    messages read on ``arg["report"]``; return once ``arg["ports"]`` closes."""
    ports: Receiver[Port] = arg["ports"]
    port = await ports.recv()
    got = [await port.recv() for _ in range(arg["keep"])]
    arg["to"].send(port)
    arg["to"].close()
    arg["report"].send(["forwarded", os.getpid(), got])
    arg["report"].close()
    # stay until the parent closes ``ports``: exiting while the moved port
    # still proxies through us is test_messages_sent_before_a_worker_exits...
    async for _ in ports:
        pass


async def collect_port(arg: dict[str, Any]) -> None:
    """Receive a port on ``arg["ports"]``, read it to its end and report
    ``["collected", pid, values, end]`` on ``arg["report"]``."""
    ports: Receiver[Port] = arg["ports"]
    port = await ports.recv()
    values = []
    end = "open"
    try:
        while True:
            values.append(await port.recv())
    except ChannelClosed:
        end = "closed"
    except Exception as exc:
        end = f"{type(exc).__name__}: {exc}"
    arg["report"].send(["collected", os.getpid(), values, end])
    arg["report"].close()


async def stream_and_serve(arg: dict[str, Any]) -> None:
    """Stream increasing ints on ``arg["out"]`` forever, paced by the
    reader (``drain()``: what is unread stays within the window, so a test
    that reads the rest after a kill has little to read), while serving
    calls on ``arg["calls"]``: ``"ping"`` is answered with ``"pong"``; any
    other request is held unanswered (and ``["held", request]`` is put in the
    stream so the caller knows it arrived)."""
    out: Sender[Any] = arg["out"]
    calls: Receiver[Call[Any]] = arg["calls"]
    held: list[Call[Any]] = []

    async def serve() -> None:
        async for call in calls:
            if call.request == "ping":
                call.reply("pong")
            else:
                held.append(call)
                out.send(["held", call.request])

    server = asyncio.ensure_future(serve())
    try:
        i = 0
        while True:
            for _ in range(100):
                out.send(i)
                i += 1
            await out.drain()
            await asyncio.sleep(0.001)  # pacing (and the calls' turn), not synchronization
    finally:
        server.cancel()


async def stubborn(arg: Sender[Any]) -> None:
    """Ignore cancellation: the mesh must kill this one on exit. Tells the
    parent it is running by sending its pid on ``arg``."""
    arg.send(os.getpid())
    while True:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass


async def stubborn_brief(arg: Sender[Any]) -> None:
    """``stubborn``, with a grace of 1 s instead of ``TERM_GRACE``'s 5 once
    SIGTERM tells it to stop: the same alarm ends it, sooner."""
    meshipc._child.TERM_GRACE = 1
    await stubborn(arg)


async def idle(arg: Sender[Any]) -> None:
    """Report the pid on ``arg``, then wait until the mesh stops us."""
    arg.send(os.getpid())
    await asyncio.Event().wait()


async def fail_later(rx: Receiver[Any]) -> None:
    """Serve calls on ``rx`` (reply ``"ready"``) until a plain message comes;
    then raise ``ValueError`` naming it."""
    while True:
        msg = await rx.recv()
        if isinstance(msg, Call):
            msg.reply("ready")
            continue
        raise ValueError(f"told to fail: {msg!r}")


async def last_words(arg: dict[str, Any]) -> None:
    """Say ``"hello"`` on ``arg["out"]``; when ``arg["go"]`` says so, send
    ``"last words"`` and return (the process exits)."""
    out: Sender[Any] = arg["out"]
    out.send("hello")
    await arg["go"].recv()
    out.send("last words")


async def report_environment(arg: Sender[Any]) -> None:
    """Report whether the invitation is still in our environment, and our
    initial environment block as the kernel shows it."""
    with open("/proc/self/environ", "rb") as f:
        initial = f.read()
    arg.send({"env": sorted(os.environ), "proc_environ": initial})


async def report_imports(arg: Sender[Any]) -> None:
    """Report our import path and where msgspec, meshipc and this module came from."""
    import sys

    import msgspec

    import meshipc

    arg.send(
        {
            "path": sys.path,
            "files": {"msgspec": msgspec.__file__, "meshipc": meshipc.__file__, "workers": __file__},
        }
    )


def not_async(arg: Any) -> int:
    """A plain function: not something a worker can run."""
    return 1


async def relay_later(arg: dict[str, Any]) -> None:
    """``relay``, but the worker to call arrives later, on ``arg["to"]``
    (a Receiver of one Sender): this worker links to it only then."""
    rx: Receiver[Call[Any]] = arg["rx"]
    with await arg["to"].recv() as to:
        async for call in rx:
            call.reply([os.getpid(), await to.call(call.request)])


async def try_to_admit(report: Sender[Any]) -> None:
    """Try to spawn, listen and invite from a worker (not the mesh's root);
    report what each raised."""
    mesh = meshipc.current_mesh()
    errors = []
    for attempt in (lambda: mesh.spawn("workers:noop"), mesh.listen, mesh.inviter):
        try:
            result = attempt()
            if inspect.isawaitable(result):
                await result
            errors.append(None)
        except meshipc.MeshError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    report.send(errors)


async def sizes(rx: Receiver[Call[Any]]) -> None:
    """Serve calls on ``rx``: reply with the length of a bytes request, with
    this process's worst event-loop delay so far (seconds, then reset) to
    ``"lag"``, and with the request itself otherwise."""
    async with LagMeter() as lag:
        async for call in rx:
            req = call.request
            if isinstance(req, bytes):
                call.reply(len(req))
            elif req == "lag":
                call.reply(lag.reset())
            else:
                call.reply(req)


async def core_dumps(report: Sender[Any]) -> None:
    """Report ``(PR_GET_DUMPABLE, RLIMIT_CORE soft limit)`` of this worker."""
    with report:
        libc = ctypes.CDLL(None)
        pr_get_dumpable = 3  # <linux/prctl.h>
        report.send((libc.prctl(pr_get_dumpable, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE)[0]))


class AppError(Exception):
    """An application's own error type (see test_user_side)."""


async def raise_errors(rx: Receiver[Call[Any]]) -> None:
    """Fails each call with the error its request names: ``"app"`` an
    ``AppError``, anything else a ``KeyError``."""
    async for call in rx:
        try:
            raise AppError("app failed") if call.request == "app" else KeyError(call.request)
        except Exception as exc:
            call.fail(exc)


async def send_on_port(port: Port) -> None:
    """Sends a str, then an int, on the port it got; returns once told to."""
    port.send("not an int")
    port.send(5)
    await port.recv()


async def report_state(arg: Sender[Any]) -> None:
    """Report what a worker takes from its parent at spawn time (``test_zygote``):
    pid, parent pid, current directory, ``MESHIPC_TEST_MARK``, import path,
    umask and open descriptors (fd -> what it is)."""
    import sys

    with open("/proc/self/status") as f:
        umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own descriptor, closed by now
    arg.send(
        {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "cwd": os.getcwd(),
            "mark": os.environ.get("MESHIPC_TEST_MARK"),
            "path": sys.path,
            "umask": umask,
            "fds": fds,
        }
    )
