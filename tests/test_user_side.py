"""What a user meets first: ``meshipc.run`` where a loop already runs (a
notebook cell) says what to do instead; ``spawn`` takes a function object,
and says how to fix one a worker cannot import; a connection kept across
notebook cells; ``serve`` checks its handler's annotations."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import msgspec
import pytest

import meshipc
import workers
from relutil import STEP, wait_until


async def test_run_inside_a_running_loop_says_to_await_instead() -> None:
    async def main() -> int:
        return 1

    coro = main()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "never awaited" warning either
        with pytest.raises(RuntimeError, match=r"already running .* await the coroutine instead"):
            meshipc.run(coro)
    assert coro.cr_frame is None  # closed, not left pending


def test_run_outside_a_loop_runs() -> None:
    async def main() -> int:
        return 7

    assert meshipc.run(main()) == 7


# ------------------------------------------------------- spawn a function


async def test_spawn_takes_a_function_object(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn(workers.echo, rx)
        assert proc.target == "workers:echo" and proc.name == "echo"
        assert await asyncio.wait_for(tx.call("hi"), STEP) == "hi"


def plain(arg: object) -> None:
    """Not async: refused at spawn."""


def _bad_targets() -> list[tuple[object, type[Exception], str]]:
    async def inner(arg: object) -> None:
        pass

    return [
        (lambda arg: None, ValueError, "a lambda cannot be spawned"),
        (inner, ValueError, "defined inside a function or class"),
        (plain, TypeError, "not an async function"),
        (42, TypeError, "spawn takes an async function"),
    ]


@pytest.mark.parametrize(("target", "error", "text"), _bad_targets())
async def test_spawn_refuses_what_a_worker_cannot_import_and_says_why(
    runtime_dir: Path, target: object, error: type[Exception], text: str
) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        with pytest.raises(error, match=text) as ei:
            await mesh.spawn(target, None)  # type: ignore[arg-type]
        assert "async def" in str(ei.value) or "async function" in str(ei.value)
        assert mesh.stats().workers == 0  # nothing started


def test_a_function_typed_into_a_repl_is_refused_with_the_fix() -> None:
    # `python -c` has a __main__ with no file, as a REPL or a notebook kernel
    code = (
        "import meshipc._process as p\n"
        "async def w(arg): pass\n"
        "try:\n    p.target_of(w)\nexcept ValueError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=STEP)
    assert "typed into an interactive session" in out.stdout, out
    assert "top level of a module file" in out.stdout


SCRIPT = """
import meshipc

async def worker(rx):                       # runs in a child process
    async for call in rx:
        call.reply(call.request * 2)

async def main():
    async with meshipc.Mesh() as mesh:
        tx, rx = meshipc.channel()
        await mesh.spawn(worker, rx)
        print(await tx.call(21), flush=True)

if __name__ == "__main__":
    print("main once", flush=True)
    meshipc.run(main())
"""


def test_a_script_under_any_name_spawns_its_own_function(tmp_path: Path, runtime_dir: Path) -> None:
    # the README's example, saved under a name no import would find, run
    # from another folder: the worker loads the script as __mp_main__
    script = tmp_path / "my service (copy).py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MESHIPC_RUNTIME_DIR": str(runtime_dir)}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd="/", env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["main", "once", "42"]  # the main block ran in the parent only


# ------------------------------------------ connections across notebook cells


async def test_connect_without_async_with_lives_until_aclose(runtime_dir: Path) -> None:
    async with meshipc.Mesh(name="cells", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("double", _double)
        conn = await meshipc.connect("cells", runtime_dir=runtime_dir, timeout=STEP)  # cell 1
        assert isinstance(conn, meshipc.Attachment) and not conn.closed
        await asyncio.sleep(0)  # another cell, later
        assert await conn.call("double", 4, timeout=STEP) == 8
        me = bytes(conn.mesh.node_id).hex()
        await wait_until(lambda: me in mesh.control_statistics().sessions, "the client's session")
        await conn.aclose()
        await conn.aclose()  # twice is fine
        assert conn.closed
        await wait_until(lambda: me not in mesh.control_statistics().sessions, "the session ends")
        with pytest.raises(meshipc.MeshError):
            await conn.call("double", 1)


async def test_an_unclosed_connection_warns_and_is_closed(runtime_dir: Path) -> None:
    async with meshipc.Mesh(name="dropped", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        conn = await meshipc.connect("dropped", runtime_dir=runtime_dir, timeout=STEP)
        client = conn.mesh
        me = bytes(client.node_id).hex()
        await wait_until(lambda: me in mesh.control_statistics().sessions, "the client's session")
        with pytest.warns(ResourceWarning, match=r"unclosed <Attachment .*await conn\.aclose\(\)"):
            del conn
            gc.collect()
        await wait_until(lambda: client._closed, "the dropped client's node closes")
        await wait_until(lambda: me not in mesh.control_statistics().sessions, "the session ends")


async def test_connect_in_async_with_and_entered_once(runtime_dir: Path) -> None:
    async with meshipc.Mesh(name="block", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        attaching = meshipc.connect("block", runtime_dir=runtime_dir, timeout=STEP)
        async with attaching as conn:
            assert await conn.services() == {}
            with pytest.raises(meshipc.MeshError, match="entered already"):
                await attaching.__aenter__()
        assert conn.closed


async def test_a_mesh_can_be_awaited_open(runtime_dir: Path) -> None:
    mesh = await meshipc.Mesh(runtime_dir=runtime_dir)
    try:
        assert mesh.directory.is_dir()
    finally:
        await mesh.aclose()
    assert not mesh.directory.exists()


async def _double(x: int) -> int:
    return x * 2


# ------------------------------------------------ serve() and its handler


class Rect(msgspec.Struct):
    w: int
    h: int


async def area(req: Rect) -> int:
    assert isinstance(req, Rect)  # converted before the handler runs
    return req.w * req.h


async def lies(req: int) -> int:
    return "not an int"  # type: ignore[return-value]


def blocking(req: int) -> int:
    return req


async def test_serve_checks_requests_and_replies_against_the_handlers_annotations(runtime_dir: Path) -> None:
    async with meshipc.Mesh(name="typed", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("area", area)
        mesh.serve("lies", lies)
        services = await mesh.services()
        assert services["area"]["request_type"] == "Rect" and services["area"]["reply_type"] == "int"
        async with meshipc.connect("typed", runtime_dir=runtime_dir, timeout=STEP) as conn:
            assert await conn.call("area", {"w": 2, "h": 3}, timeout=STEP) == 6
            with pytest.raises(meshipc.RemoteError, match=r"invalid request: .*`\$\.w`") as ei:
                await conn.call("area", {"w": "wide", "h": 3}, timeout=STEP)
            assert ei.value.type_name == "MessageError"
            with pytest.raises(meshipc.RemoteError, match="invalid reply: Expected `int`, got `str`"):
                await conn.call("lies", 1, timeout=STEP)


async def test_serve_refuses_a_plain_function_and_says_how(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        with pytest.raises(TypeError, match=r"blocking is a plain function: make it async .*to_thread"):
            mesh.serve("blocking", blocking)  # type: ignore[arg-type]
        assert await mesh.services() == {}


async def refuses(req: int) -> int:
    raise ValueError(f"bad request {req}")


async def test_a_blocking_call_raises_the_remote_type_without_internal_frames(runtime_dir: Path) -> None:
    async with meshipc.Mesh(name="blocking", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("refuses", refuses)

        def client() -> BaseException:
            with meshipc.sync.connect("blocking", runtime_dir=runtime_dir, timeout=STEP) as conn:
                try:
                    conn.call("refuses", 7, timeout=STEP)
                except ValueError as exc:  # the remote type
                    return exc
            raise AssertionError("the call did not fail")

        err = await asyncio.wait_for(asyncio.to_thread(client), 3 * STEP)
    assert isinstance(err, meshipc.RemoteError) and "bad request 7" in str(err)
    frames = traceback.extract_tb(err.__traceback__)
    files = {Path(f.filename).name for f in frames}
    assert files <= {"test_user_side.py", "sync.py"}, frames  # no loop, control-plane or portal-thread frames
    assert len(frames) <= 3, frames
    shown = "".join(traceback.format_exception(err))
    assert shown.count("bad request 7") == 2  # the error line, and the remote traceback's last line, once
    assert "During handling" not in shown


# ------------------------------------------------------------ the command


def test_bare_meshipc_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from meshipc._cli import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "ls", "status", "inspect", "call"):
        assert f"\n    {cmd} " in out
    assert "examples:" in out


@pytest.mark.parametrize("cmd", ["demo", "ls", "status", "inspect", "call"])
def test_every_command_has_a_description_and_examples(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    from meshipc._cli import main

    with pytest.raises(SystemExit) as ei:
        main([cmd, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    usage, description = out.split("\n\n")[:2]
    assert usage.startswith(f"usage: meshipc {cmd}") and len(description.split()) >= 8
    examples = out[out.index("examples:") :].splitlines()[1:]
    assert examples and all(line.startswith(f"  meshipc {cmd}") for line in examples if line.strip())


# ---------------------------------------------------------------- Ctrl-C


def test_run_turns_an_interrupt_into_a_quiet_exit() -> None:
    async def main() -> None:
        raise KeyboardInterrupt  # as Ctrl-C arrives in asyncio.run

    with pytest.raises(SystemExit) as ei:
        meshipc.run(main())
    assert ei.value.code == 130
    with pytest.raises(KeyboardInterrupt):
        meshipc.run(main(), exit_on_interrupt=False)


CTRL_C = """
import meshipc

async def main():
    async with meshipc.Mesh(name="ctrl-c") as mesh:
        await mesh.listen()
        print(mesh.directory, flush=True)
        async for conn in await mesh.listen("extra.sock"):
            pass

if __name__ == "__main__":
    meshipc.run(main())
"""


def test_ctrl_c_on_a_service_exits_130_cleanly_without_a_traceback(tmp_path: Path, runtime_dir: Path) -> None:
    script = tmp_path / "service.py"
    script.write_text(CTRL_C.replace('"extra.sock"', repr(str(tmp_path / "extra.sock"))))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MESHIPC_RUNTIME_DIR": str(runtime_dir)},
        # a shell's background jobs start with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        directory = Path(proc.stdout.readline().strip())
        assert directory.is_dir()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=STEP)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err == ""  # no traceback, no "during handling"
    assert not directory.exists()  # the mesh closed as on any exit


# ------------------------------------------------------------- typed RPC


async def test_an_rpc_channel_hands_the_server_rpc_objects() -> None:
    tx, rx = meshipc.channel(meshipc.Rpc[Rect, int])

    async def server() -> None:
        async for call in rx:
            assert isinstance(call, meshipc.Rpc) and isinstance(call, meshipc.Call)
            call.reply(call.request.w * call.request.h)

    task = asyncio.ensure_future(server())
    try:
        assert await asyncio.wait_for(tx.call(Rect(2, 3)), STEP) == 6
    finally:
        tx.close()
        await asyncio.wait_for(task, STEP)


async def test_conn_call_converts_the_reply_to_the_type_asked_for(runtime_dir: Path) -> None:
    async with meshipc.Mesh(name="reply-type", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        mesh.serve("rect", _rect)
        async with meshipc.connect("reply-type", runtime_dir=runtime_dir, timeout=STEP) as conn:
            got = await conn.call("rect", 3, timeout=STEP, reply_type=Rect)
            assert got == Rect(3, 6)
            with pytest.raises(meshipc.MessageError, match="not a <class 'int'>"):
                await conn.call("rect", 3, timeout=STEP, reply_type=int)


async def _rect(side: int) -> Rect:
    return Rect(side, 2 * side)


async def test_remote_errors_from_a_worker_are_caught_by_their_types(runtime_dir: Path) -> None:
    meshipc.register_remote_error(workers.AppError)
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        tx, rx = meshipc.channel(meshipc.Call[str])
        await mesh.spawn(workers.raise_errors, rx)
        with pytest.raises(KeyError) as key:
            await asyncio.wait_for(tx.call("k"), STEP)
        assert isinstance(key.value, meshipc.RemoteError) and key.value.type_name == "KeyError"
        with pytest.raises(workers.AppError) as app:
            await asyncio.wait_for(tx.call("app"), STEP)
        assert app.value.type_name == "workers.AppError" and "app failed" in str(app.value)
        assert "raise_errors" in app.value.traceback  # the worker's own traceback came along


def test_a_script_without_suffix_in_a_folder_with_a_colon_spawns_its_function(
    tmp_path: Path, runtime_dir: Path
) -> None:
    folder = tmp_path / "a:b"
    folder.mkdir()
    script = folder / "service"  # no .py
    script.write_text(SCRIPT)
    env = {**os.environ, "MESHIPC_RUNTIME_DIR": str(runtime_dir)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["main", "once", "42"]


def test_a_script_without_a_main_guard_is_told_so(tmp_path: Path, runtime_dir: Path) -> None:
    unguarded = SCRIPT.replace('if __name__ == "__main__":\n    print("main once", flush=True)\n    ', "")
    assert "__main__" not in unguarded
    script = tmp_path / "unguarded.py"
    script.write_text(unguarded)
    env = {**os.environ, "MESHIPC_RUNTIME_DIR": str(runtime_dir)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0
    assert "SpawnError" in out.stderr and 'if __name__ == "__main__":' in out.stderr, out.stderr


async def test_sender_call_takes_a_timeout_like_conn_call() -> None:
    tx, rx = meshipc.channel(meshipc.Call[int])
    with pytest.raises(TimeoutError, match=r"no reply within 0\.05 s"):
        await tx.call(1, timeout=0.05)  # nobody answers
    pending = rx.try_recv()  # the call the timeout gave up on
    assert isinstance(pending, meshipc.Call) and pending.cancelled
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            await tx.call(1, timeout=bad)


def test_a_missing_await_on_connect_says_so() -> None:
    attaching = meshipc.connect("nowhere")
    with pytest.raises(AttributeError, match=r"no attribute 'call'.*conn = await meshipc\.connect"):
        attaching.call  # noqa: B018


async def test_a_typed_port_pair_validates_what_another_process_sends(runtime_dir: Path) -> None:
    async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
        ours, theirs = meshipc.Port.pair(int)
        proc = await mesh.spawn(workers.send_on_port, theirs)
        assert await asyncio.wait_for(ours.recv(), STEP) == 5  # the str was dropped
        assert ours.bad_messages == 1
        ours.send(0)
        assert await asyncio.wait_for(proc.wait(), STEP) == 0
