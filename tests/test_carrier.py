"""The command carrier (``meshipc.command``, ``python -m meshipc.remote``,
``Mesh.spawn(..., via=)``) with real processes: the far side runs in
``unshare -Urn`` (its own user and network namespace, no network at all, and
its own runtime folder), so nothing but the carrier's stdio can join the two
meshes. Worker functions are in ``carrier_workers.py``."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshipc
from carrier_workers import Duplex
from meshipc import Call, Fd, Mesh, MessageError, NodeFailure, Port, RemoteError, SpawnError, channel
from meshipc._carrier import MAX_LOG_LINE, MAX_LOG_RATE, Carrier, SpawnRequest, Started, StderrLines
from meshipc._tasks import TaskSet
from meshipc.remote import open_stdio
from relutil import private_dir, wait_until, within

TESTS = Path(__file__).resolve().parent
SRC = Path(meshipc.__file__).resolve().parent.parent


def _unshare_refused() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    got = subprocess.run(["unshare", "-Urn", "true"], capture_output=True, text=True)
    if got.returncode != 0:
        return f"unshare -Urn is refused here: {got.stderr.strip()[:200]}"
    return None


REFUSED = _unshare_refused()
needs_unshare = pytest.mark.skipif(REFUSED is not None, reason=REFUSED or "")


@pytest.fixture
def far_dir() -> Iterator[Path]:
    """The far mesh's runtime folder: not the near one's."""
    with private_dir("far") as d:
        yield d


def isolated(far_dir: Path, *unshare_flags: str, limits: meshipc.BoundaryLimits | None = None) -> Carrier:
    """A carrier into ``unshare -Urn``: no network, another runtime folder."""
    return meshipc.command(
        [
            "env",
            f"PYTHONPATH={SRC}{os.pathsep}{TESTS}",
            f"MESHIPC_RUNTIME_DIR={far_dir}",
            "unshare",
            "-Urn",
            *unshare_flags,
            sys.executable,
            "-m",
            "meshipc.remote",
        ],
        label="command:isolated",
        limits=limits,
    )


# ------------------------------------------------------------------ carriers, no process


def test_ssh_builds_a_batch_command_that_quotes_python() -> None:
    c = meshipc.ssh("me@gpu1", python="'/opt/my venv/bin/python' -X dev", options=["-p", "2222"])
    assert c.label == "ssh:me@gpu1"
    assert c.argv[:5] == ("ssh", "-T", "-o", "BatchMode=yes", "-o")
    i = c.argv.index("me@gpu1")
    assert c.argv[i - 2 : i] == ("-p", "2222")
    # each word of python quoted for the far shell: nothing in it is shell syntax
    assert c.argv[i + 1 :] == ("'/opt/my venv/bin/python'", "-X", "dev", "-m", "meshipc.remote")
    assert "'python3;'" in meshipc.ssh("h", python="python3; rm -rf /").argv


@pytest.mark.parametrize("dest", ["-oProxyCommand=sh", "", "a b"])
def test_ssh_refuses_a_destination_that_reads_as_an_option(dest: str) -> None:
    with pytest.raises(ValueError, match="destination"):
        meshipc.ssh(dest)


@pytest.mark.parametrize("argv", ["python -m meshipc.remote", [], [b"python"]])
def test_command_takes_a_list_of_strings(argv: Any) -> None:
    with pytest.raises(TypeError, match="list of strings"):
        meshipc.command(argv)


def test_records_are_capped_before_use() -> None:
    import msgspec

    dec = msgspec.msgpack.Decoder(SpawnRequest)
    with pytest.raises(msgspec.ValidationError, match="length"):
        dec.decode(msgspec.msgpack.encode({"type": "spawn", "target": "m:" + "f" * 5000, "name": "x"}))
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        dec.decode(msgspec.msgpack.encode({"type": "spawn", "target": "m:f", "name": "x", "more": 1}))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(Started(7, "0.1.0")), type=Started).pid == 7


async def test_far_stderr_is_reemitted_per_line_with_long_lines_cut(caplog: pytest.LogCaptureFixture) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"INFO meshipc: hello\nplain " + b"x" * (3 * MAX_LOG_LINE) + b"\nERROR a: b\nlast")
    reader.feed_eof()
    with caplog.at_level(logging.DEBUG, logger="meshipc.remote"):
        lines = StderrLines(reader, "command:t", TaskSet(asyncio.get_running_loop()))
        await within(lines.done)
    got = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "meshipc.remote"]
    assert [lvl for lvl, _ in got] == ["INFO", "WARNING", "ERROR", "WARNING"]
    assert got[0][1] == "[command:t] INFO meshipc: hello"
    assert len(got[1][1]) < MAX_LOG_LINE + 40 and got[1][1].endswith("[cut]")
    assert lines.last().splitlines()[-1] == "last"


async def test_a_chatty_far_side_does_not_flood_our_log(caplog: pytest.LogCaptureFixture) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"".join(b"line %d\n" % i for i in range(3 * MAX_LOG_RATE)))
    reader.feed_eof()
    with caplog.at_level(logging.DEBUG, logger="meshipc.remote"):
        lines = StderrLines(reader, "command:t", TaskSet(asyncio.get_running_loop()))
        await within(lines.done)
    got = [r.getMessage() for r in caplog.records if r.name == "meshipc.remote"]
    assert len(got) == MAX_LOG_RATE + 1  # one second's worth, then how many were held back
    assert (
        got[-1]
        == f"[command:t] {2 * MAX_LOG_RATE} more stderr lines not shown (over {MAX_LOG_RATE} a second)"
    )
    assert lines.last().splitlines()[-1] == f"line {3 * MAX_LOG_RATE - 1}"  # kept for a SpawnError


# ------------------------------------------------------------------ spawn, start, exit


@needs_unshare
async def test_spawn_runs_in_an_isolated_far_mesh_and_stops(
    runtime_dir: Path, far_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        with caplog.at_level(logging.WARNING, logger="meshipc.remote"):
            proc = await within(mesh.spawn("carrier_workers:idle", 7, via=isolated(far_dir)))
            assert isinstance(proc, meshipc.RemoteProcess) and proc.remote_version == meshipc.__version__
            assert proc.remote_pid == proc.pid  # unshare execs: the carrier is the far process
            assert mesh.stats().workers == 1
            # the far print went to stderr (not into the link) and was re-emitted here
            await wait_until(
                lambda: any(
                    "[command:isolated] a stray print on the far side 7" in r.getMessage()
                    for r in caplog.records
                ),
                "the far print re-emitted",
            )
        # its mesh lives in its own runtime folder, not ours
        assert any(far_dir.iterdir()) and not any(
            p.name.startswith("mesh-") and p != mesh.directory for p in runtime_dir.iterdir()
        )
        proc.terminate()
        assert await within(proc.wait()) == 0 and proc.exitcode == 0
        await wait_until(lambda: not any(far_dir.iterdir()), "the far mesh removed its folder")


@needs_unshare
async def test_closing_the_mesh_stops_remote_workers(runtime_dir: Path, far_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        proc = await within(mesh.spawn("carrier_workers:idle", None, via=isolated(far_dir)))
    assert proc.returncode == 0


@needs_unshare
async def test_a_missing_function_is_a_spawn_error_with_the_far_traceback(
    runtime_dir: Path, far_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        with pytest.raises(SpawnError, match="has no function 'nope'") as info:
            await within(mesh.spawn("carrier_workers:nope", None, via=isolated(far_dir)))
        assert "Traceback" in info.value.traceback and "_find" in info.value.traceback
        assert mesh.stats().workers == 0
    # the argument that followed the request was dropped quietly on the far side
    assert not [r for r in caplog.records if r.name == "meshipc.remote" and "bad message" in r.getMessage()]


@needs_unshare
async def test_a_failing_function_is_exit_1_and_its_error(runtime_dir: Path, far_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        proc = await within(mesh.spawn("carrier_workers:fails", 5, via=isolated(far_dir)))
        assert await within(proc.wait()) == 1
        assert isinstance(proc.error, RemoteError) and isinstance(proc.error, ValueError)
        assert "far failure 5" in str(proc.error) and "carrier_workers.py" in proc.error.traceback


async def test_a_command_that_is_not_meshipc_is_refused_with_its_stderr(runtime_dir: Path) -> None:
    bad = meshipc.command(
        [sys.executable, "-c", "import sys; print('no meshipc here', file=sys.stderr); sys.exit(4)"]
    )
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        with pytest.raises(SpawnError, match=r"(?s)exited with code 4.*no meshipc here"):
            await within(mesh.spawn("carrier_workers:idle", None, via=bad))
        # one that speaks garbage on stdout is refused too, and the node keeps running
        noisy = meshipc.command(
            [sys.executable, "-c", "print('hello, I am not a link'); import time; time.sleep(30)"]
        )
        with pytest.raises(SpawnError, match="command:python"):
            await within(mesh.spawn("carrier_workers:idle", None, via=noisy))
        assert mesh.stats().workers == 0


@pytest.mark.stock_loop  # the stock loop's child watcher is the one that lost the race
async def test_a_carrier_that_exits_at_once_is_reported_with_its_own_exit_code(
    runtime_dir: Path, far_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killing it must not reap it behind asyncio's back (``Popen.send_signal``
    polls): that turned the code into 255 with "Unknown child process"."""
    quits = meshipc.command(["sh", "-c", "exit 7"])  # gone before we can kill it
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        with pytest.raises(SpawnError, match="has no function"):  # a far start that failed first
            await within(mesh.spawn("carrier_workers:nope", None, via=isolated(far_dir)))
        for _ in range(3):
            with pytest.raises(SpawnError, match="exited with code 7 "):
                await within(mesh.spawn("carrier_workers:idle", None, via=quits))
    assert not [r for r in caplog.records if "Unknown child process" in r.getMessage()]


async def test_a_missing_program_is_a_spawn_error(runtime_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        with pytest.raises(SpawnError, match="cannot run the carrier command:no-such-program"):
            await mesh.spawn("carrier_workers:idle", None, via=meshipc.command(["no-such-program"]))


async def test_an_fd_in_the_argument_is_refused_before_anything_starts(runtime_dir: Path) -> None:
    r, w = os.pipe()
    os.close(w)
    with Fd(r) as fd:
        async with Mesh(runtime_dir=runtime_dir) as mesh:
            with pytest.raises(MessageError, match="cannot cross the carrier command:no-such-program"):
                # the program does not exist: reaching it would raise SpawnError instead
                await mesh.spawn("carrier_workers:idle", {"fd": fd}, via=meshipc.command(["no-such-program"]))


@needs_unshare
async def test_the_far_side_exits_when_its_carrier_dies(runtime_dir: Path, far_dir: Path) -> None:
    # unshare --fork: the carrier is a process of its own, the far python its child
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        proc = await within(mesh.spawn("carrier_workers:idle", None, via=isolated(far_dir, "--fork")))
        assert proc.remote_pid is not None and proc.remote_pid != proc.pid
        far = proc.remote_pid
        os.kill(proc.pid, 9)
        assert await within(proc.wait()) == -9
        # its stdin closed: the orphaned far process leaves (and removes its mesh)
        await wait_until(
            lambda: not os.path.exists(f"/proc/{far}") or _zombie(far), "the far process to exit"
        )
        await wait_until(lambda: not any(far_dir.iterdir()), "the far mesh removed its folder")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ------------------------------------------------------------------ across the boundary

#: CI counts (the soak variant runs the issue's full counts)
N_VALUES, N_CALLS = 20_000, 300


async def _duplex(mesh: Mesh, far_dir: Path, n: int, k: int) -> None:
    in_tx, in_rx = channel(int)
    out_tx, out_rx = channel(int)
    cin_tx, cin_rx = channel(Call[int])
    cout_tx, cout_rx = channel(Call[int])
    rep_tx, rep_rx = channel()
    arg = Duplex(in_rx, out_tx, cin_rx, cout_tx, rep_tx, n, k)
    proc = await within(mesh.spawn("carrier_workers:duplex", arg, via=isolated(far_dir)))

    async def write() -> None:
        for i in range(n):
            in_tx.send(i)
            if i % 256 == 255:
                await in_tx.drain()

    async def read() -> None:
        for i in range(n):
            assert await out_rx.recv() == i

    async def call() -> None:
        for i in range(k):
            assert await cin_tx.call(i) == i + 1

    async def serve() -> None:
        for _ in range(k):
            c = await cout_rx.recv()
            c.reply(2 * c.request)

    await within(asyncio.gather(write(), read(), call(), serve()), 120)
    assert await within(rep_rx.recv()) == [n, n, k, k]
    assert await within(proc.wait()) == 0


@needs_unshare
async def test_a_typed_stream_and_calls_both_ways(runtime_dir: Path, far_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        await _duplex(mesh, far_dir, N_VALUES, N_CALLS)


@pytest.mark.soak
@needs_unshare
async def test_a_typed_stream_and_calls_both_ways_full_counts(runtime_dir: Path, far_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        await _duplex(mesh, far_dir, 100_000, 1_000)


@needs_unshare
async def test_a_receiver_moves_across_and_back_while_values_stream(runtime_dir: Path, far_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        ctl, far_ctl = Port.pair()
        proc = await within(mesh.spawn("carrier_workers:bounce", far_ctl, via=isolated(far_dir)))
        tx, rx = channel(int)
        total = 6_000
        stop = asyncio.Event()

        async def stream() -> None:  # never pauses for the moves
            for i in range(total):
                tx.send(i)
                if i % 64 == 63:
                    await tx.drain()
            stop.set()

        writer = asyncio.ensure_future(stream())
        seen: list[int] = []
        for _ in range(5):
            seen += [await within(rx.recv()) for _ in range(200)]  # here
            ctl.send([rx, 500])  # there: the far side reads 500 of them
            rx, got = await within(ctl.recv())  # and back
            seen += got
        seen += [await within(rx.recv()) for _ in range(total - len(seen))]
        await within(writer)
        assert seen == list(range(total))  # in order, exactly once, across every move
        ctl.close()
        assert await within(proc.wait()) == 0


@needs_unshare
async def test_a_port_whose_peer_is_a_third_local_process(runtime_dir: Path, far_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = channel(Call[Any])
        local = await within(mesh.spawn("workers:whoami", rx))  # a third process, in our mesh
        back_tx, back_rx = channel()
        proc = await within(
            mesh.spawn(
                "carrier_workers:call_through", {"tx": tx, "n": 50, "back": back_tx}, via=isolated(far_dir)
            )
        )
        answers = await within(back_rx.recv())
        assert answers == [[local.pid, i] for i in range(50)]  # the far calls reached the third process
        assert await within(proc.wait()) == 0


@needs_unshare
async def test_an_fd_is_refused_per_message_and_the_port_lives_on(runtime_dir: Path, far_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = channel(Call[Any])
        await within(mesh.spawn("carrier_workers:echo", rx, via=isolated(far_dir)))
        r, w = os.pipe()
        os.close(w)
        # sent here, to a port known to cross: refused at the send, nothing sent
        with Fd(r) as fd:
            with pytest.raises(MessageError, match="Fd"):
                await tx.call({"fd": fd})
        assert await within(tx.call("still here")) == "still here"
        # forwarded from a third local process: closed at the gateway, that
        # one message arrives as an error, the port lives on
        relay_tx, relay_rx = channel(Call[Any])
        await within(mesh.spawn("carrier_workers:relay_calls", {"rx": relay_rx, "to": tx}))
        with open(os.devnull, "rb") as f:
            with pytest.raises(RemoteError, match="Fd cannot cross"):
                await within(relay_tx.call({"fd": Fd.dup(f.fileno())}))
        assert await within(relay_tx.call("after the fd")) == "after the fd"


@needs_unshare
async def test_a_64_mib_message_crosses_in_chunks(runtime_dir: Path, far_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = channel(Call[Any])
        await within(mesh.spawn("carrier_workers:echo", rx, via=isolated(far_dir)))
        big = os.urandom(64 << 20)
        assert await within(tx.call(big), 60) == big


@needs_unshare
@pytest.mark.parametrize("victim", ["far process", "carrier process"])
async def test_a_kill_fails_every_waiting_call_and_loses_nothing_before_it(
    runtime_dir: Path, far_dir: Path, victim: str
) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        out_tx, out_rx = channel(int)
        tx, rx = channel(Call[Any])
        n = 3_000
        # --fork: the carrier (unshare) and the far python are two processes
        proc = await within(
            mesh.spawn(
                "carrier_workers:hold_calls",
                {"out": out_tx, "rx": rx, "n": n},
                via=isolated(far_dir, "--fork"),
            )
        )
        waiting = [asyncio.ensure_future(tx.call(i)) for i in range(20)]
        assert [await within(out_rx.recv()) for _ in range(n)] == list(
            range(n)
        )  # nothing lost before the cut
        assert proc.remote_pid is not None
        os.kill(proc.remote_pid if victim == "far process" else proc.pid, 9)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for w in waiting:
            with pytest.raises(NodeFailure, match="command:isolated"):
                await within(w)
        assert loop.time() - t0 < 8  # the bound: the stream's end, or the carrier's exit + EXIT_GRACE
        with pytest.raises(NodeFailure):
            await within(out_rx.recv())
        await within(proc.wait())


async def test_a_far_side_of_another_protocol_version_is_refused_naming_both(runtime_dir: Path) -> None:
    fake = (
        "import sys; from meshipc._boundary import encode_hello, DEFAULT_BOUNDARY_LIMITS as L; "
        "sys.stdout.buffer.write(encode_hello('9.9.9', 1, L, lo=7, hi=9)); sys.stdout.flush(); "
        "sys.stdin.read()"
    )
    old = meshipc.command([sys.executable, "-c", fake], label="command:old")
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        with pytest.raises(SpawnError, match="command:old") as info:
            await within(mesh.spawn("carrier_workers:idle", None, via=old))
        assert isinstance(info.value.__cause__, meshipc.BoundaryVersionError)
        assert "9.9.9" in str(info.value) and meshipc.__version__ in str(info.value)


@needs_unshare
async def test_what_the_far_function_sent_before_returning_all_arrives(
    runtime_dir: Path, far_dir: Path
) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        out_tx, out_rx = channel(int)
        done_tx, done_rx = channel(int)
        n = 6_000  # several windows: most wait at the far gateway for credit when it returns
        arg = {"out": out_tx, "done": done_tx, "n": n}
        proc = await within(mesh.spawn("carrier_workers:send_and_return", arg, via=isolated(far_dir)))
        assert await within(done_rx.recv()) == n  # it returned; we read only now
        assert [await within(out_rx.recv()) for _ in range(n)] == list(range(n))
        with pytest.raises(meshipc.ChannelClosed):
            await within(out_rx.recv())
        assert await within(proc.wait()) == 0


@needs_unshare
async def test_a_stopped_far_side_fails_waiting_calls_within_the_heartbeat_bound(
    runtime_dir: Path, far_dir: Path
) -> None:
    quick = meshipc.BoundaryLimits(heartbeat_interval=0.2, heartbeat_timeout=1.0)
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = channel(Call[Any])
        proc = await within(mesh.spawn("carrier_workers:echo", rx, via=isolated(far_dir, limits=quick)))
        assert await within(tx.call("alive")) == "alive"
        assert proc.remote_pid is not None
        os.kill(proc.remote_pid, signal.SIGSTOP)  # alive, its pipes open, silent
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(NodeFailure, match="command:isolated"):
                await within(tx.call("never answered"))
            # heartbeat_timeout + one interval, with room for a loaded machine
            assert loop.time() - t0 < 5
        finally:
            os.kill(proc.remote_pid, signal.SIGCONT)
        assert await within(proc.wait()) != 0


@needs_unshare
async def test_a_worker_that_is_not_the_root_spawns_through_a_carrier(
    runtime_dir: Path, far_dir: Path
) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        back_tx, back_rx = channel()
        argv = list(isolated(far_dir).argv)
        proc = await within(mesh.spawn("carrier_workers:spawn_far", {"argv": argv, "back": back_tx}))
        assert await within(back_rx.recv()) == ["via a worker", True]
        assert await within(proc.wait()) == 0


@needs_unshare
async def test_no_id_or_path_of_the_near_mesh_crosses_the_carrier(
    runtime_dir: Path, far_dir: Path, tmp_path: Path
) -> None:
    # the carrier's stdin and stdout, recorded on their way (tee)
    seen_in, seen_out = tmp_path / "in", tmp_path / "out"
    inner = shlex.join(isolated(far_dir).argv)
    tapped = meshipc.command(
        ["sh", "-c", f"tee {seen_in} | {inner} | tee {seen_out}"], label="command:tapped"
    )
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        third_tx, third_rx = channel(Call[Any])
        await within(mesh.spawn("carrier_workers:echo", third_rx))  # a third process of our mesh
        calls, far_calls = channel(Call[Any])
        here, there = Port.pair()
        proc = await within(
            mesh.spawn("carrier_workers:far_identity", {"port": there, "calls": far_calls}, via=tapped)
        )
        far = await within(here.recv())
        # ports cross both ways inside calls, one of them peered with the third process
        a, b = Port.pair()
        back = await within(calls.call({"port": b, "sender": third_tx.clone(), "text": "hello"}))
        back["port"].send("round trip")
        assert await within(a.recv()) == "round trip"
        assert await within(back["sender"].call("to the third")) == "to the third"
        here.close()
        await within(proc.wait())
    crossed_in, crossed_out = seen_in.read_bytes(), seen_out.read_bytes()
    assert b"hello" in crossed_in and b"round trip" in crossed_in  # the tap saw the traffic
    ours = [
        bytes(mesh.node_id),
        os.fsencode(mesh.directory),
        os.fsencode(runtime_dir),
        mesh.node_id.hex().encode(),
    ]
    for secret in ours:
        assert secret not in crossed_in and secret not in crossed_out
    for theirs in (far["node"], os.fsencode(far["path"])):
        assert theirs not in crossed_in  # what we send never names the far mesh's ids either


def _read_all(fd: int) -> int:
    total = 0
    while chunk := os.read(fd, 1 << 16):
        total += len(chunk)
    return total


async def test_the_far_sides_writer_is_closed_only_once_its_bytes_are_out() -> None:
    # the far side waits on this before it exits: its last bytes (a GOODBYE)
    # must not die in its buffer when the other side is slow to read
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    try:
        reader, writer = await open_stdio(r_in, w_out)
        writer.write(b"x" * (1 << 20))  # far more than a pipe holds
        writer.close()
        closed = asyncio.ensure_future(writer.wait_closed())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not closed.done()  # nobody read yet
        assert await within(asyncio.to_thread(_read_all, r_out)) == 1 << 20
        await within(closed)
        os.close(w_in)
        assert await within(reader.read()) == b""
        reader._transport.close()  # type: ignore[attr-defined]  # (the far process just exits)
        for _ in range(3):  # uvloop frees the handle on a later turn
            await asyncio.sleep(0)
    finally:
        os.close(r_out)


@needs_unshare
async def test_a_hang_up_does_not_end_the_far_side(runtime_dir: Path, far_dir: Path) -> None:
    async with Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = channel(Call[Any])
        proc = await within(mesh.spawn("carrier_workers:echo", rx, via=isolated(far_dir)))
        assert proc.remote_pid is not None
        os.kill(proc.remote_pid, signal.SIGHUP)  # what a dropped terminal sends: its stdin says instead
        assert await within(tx.call("still here")) == "still here"
        tx.close()
        proc.terminate()
        assert await within(proc.wait()) == 0
        await wait_until(lambda: not any(far_dir.iterdir()), "the far mesh removed its folder")
