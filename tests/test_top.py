"""``meshipc top`` (``_top``): the rows and rates it computes, and the
command in a real terminal (tmux), quitting on ``q`` and on Ctrl-C with the
terminal left as it was."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import meshipc
from meshipc._ctlcli import term
from meshipc._top import Sampler, sort_rows, table
from relutil import private_dir, wait_until, within


def _tree(calls: int, me: str = "me") -> dict[str, Any]:
    def node(name: str, role: str, pid: int, n: int) -> dict[str, Any]:
        return {
            "name": name,
            "role": role,
            "pid": pid,
            "connections": {"x": {"messages_in": {"$counter": n}, "bytes_in": {"$counter": 10 * n}}},
            "ports": {"queued_messages": 2, "unconsumed_out_messages": 3},
            "services": {
                "sv": {"calls": {"$counter": n}, "errors": {"$counter": 0}, "active": 1, "waiting": 1}
            },
        }

    return {
        "mesh": {"name": "m"},
        "nodes": {
            "a": node("alpha", "worker", os.getpid(), calls),
            "b": node("beta\x1b[2J", "client", 0, 0),
            me: node("myself", "client", 1, calls),
        },
    }


def test_rows_have_rates_and_exclude_our_own_node() -> None:
    s = Sampler("me")
    first = s.rows(_tree(0), 100.0)
    assert sorted(r.name for r in first) == ["alpha", "beta\x1b[2J"]
    assert all(r.msgs_in == 0 and r.cpu is None for r in first)
    rows = {r.name: r for r in s.rows(_tree(500), 100.5)}
    a = rows["alpha"]
    assert a.msgs_in == 1000 and a.bytes_in == 10_000
    assert a.queued == 2 and a.unconsumed == 3 and a.calls == 2
    assert a.services == ["sv 1000/s"] and a.rss is not None and a.rss > 0 and a.cpu is not None
    assert sort_rows(list(rows.values()), "in")[0].name == "alpha"

    screen = table(list(rows.values()), "t", "name", 300, term)
    assert "\x1b" not in screen and "beta\\x1b[2J" in screen  # what a peer names is escaped
    assert all(len(line) <= 40 for line in table(list(rows.values()), "t", "name", 40).splitlines())


def test_malformed_answers_give_rows_not_errors() -> None:
    s = Sampler("me")
    tree = {"nodes": {"a": {"pid": "x", "connections": [1], "services": {"s": 5}, "ports": None}, "b": 7}}
    for _ in range(2):
        (row,) = s.rows(tree, 1.0)
        assert row.name == "?" and row.pid == 0
    assert s.rows({"nodes": []}, 2.0) == []


# ------------------------------------------------------------------ in a terminal

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    """A tmux server of our own (its socket in a private folder) with one
    pane running a command; the pane stays after the command exits."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", os.fspath(self.sock), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "t")

    def show(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", "t", fmt).strip()


@contextlib.contextmanager
def tmux_running(command: str) -> Iterator[Tmux]:
    with private_dir("tx") as d:
        t = Tmux(d / "s")
        t("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "180", "-y", "30", "sh")
        try:
            t("set-option", "-t", "t", "remain-on-exit", "on")
            t("send-keys", "-t", "t", f'{command}; echo "EX""IT=$?"; {MODES}; exec sleep 60', "Enter")
            yield t
        finally:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                t("kill-server")


#: Prints the terminal's canonical and echo modes after the command, then "DONE".
MODES = (
    "stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' '; echo DO''NE"
)


def _top_command(rd: Path, name: str) -> str:
    env = f"PYTHONPATH={shlex.quote(os.pathsep.join(sys.path))}"
    return (
        f"env {env} {shlex.quote(sys.executable)} -m meshipc top {name} "
        f"--runtime-dir {shlex.quote(os.fspath(rd))} --period 0.2 --sort name"
    )


def _echo_in_rate(screen: str) -> float | None:
    for line in screen.splitlines():
        if line.startswith("echo "):
            v = line.split()[5]  # MSG/s IN
            scale = {"k": 1e3, "M": 1e6}.get(v[-1], 1.0)
            return float(v.rstrip("kM")) * scale
    return None


@contextlib.asynccontextmanager
async def streaming_mesh(rd: Path, name: str) -> AsyncIterator[asyncio.Event]:
    """A mesh with a worker "echo"; calls stream to it while the event is set."""
    go = asyncio.Event()
    async with meshipc.Mesh(name=name, runtime_dir=rd) as mesh:
        await mesh.listen()
        tx, rx = meshipc.channel()
        await mesh.spawn("workers:echo", rx, name="echo")

        async def stream() -> None:
            while True:
                await go.wait()
                await asyncio.gather(*(tx.call(i) for i in range(50)))
                await asyncio.sleep(0.005)  # paces the stream; nothing waits on it

        task = asyncio.ensure_future(stream())
        try:
            yield go
        finally:
            task.cancel()
            tx.close()


def _left_clean(t: Tmux, status: str) -> None:
    """The command exited with ``status``: off the alternate screen, the
    cursor shown, the terminal back in canonical mode with echo, nothing of
    the table left on the screen."""
    screen = t.screen()
    assert f"EXIT={status}\nicanon echo DONE" in screen, screen
    assert t.show("#{alternate_on}") == "0"
    assert t.show("#{cursor_flag}") == "1"
    assert "MSG/s" not in screen and "\x1b" not in screen


@needs_tmux
async def test_top_in_a_terminal_shows_rising_rates_and_quits_on_q(runtime_dir: Path) -> None:
    async with streaming_mesh(runtime_dir, "topq") as go:
        with tmux_running(_top_command(runtime_dir, "topq")) as t:
            await wait_until(lambda: _echo_in_rate(t.screen()) is not None, "top to show the worker echo")
            assert t.show("#{alternate_on}") == "1"
            screen = t.screen()
            assert "topq" in screen.splitlines()[0] and " client " not in screen  # not its own node
            assert _echo_in_rate(screen) == 0
            go.set()
            await wait_until(
                lambda: (_echo_in_rate(t.screen()) or 0) > 100, "the rate to rise while calls stream"
            )
            assert "sort: name" in t.screen()
            t("send-keys", "-t", "t", "s")  # the next sort key
            await wait_until(lambda: "sort: pid" in t.screen(), "s to change the sort key")
            t("send-keys", "-t", "t", "q")
            await wait_until(lambda: "DONE" in t.screen(), "top to quit on q")
            _left_clean(t, "0")


@needs_tmux
async def test_top_leaves_the_terminal_clean_on_ctrl_c(runtime_dir: Path) -> None:
    async with streaming_mesh(runtime_dir, "topc"):
        with tmux_running(_top_command(runtime_dir, "topc")) as t:
            await wait_until(lambda: _echo_in_rate(t.screen()) is not None, "top to show the worker echo")
            t("send-keys", "-t", "t", "C-c")
            await wait_until(lambda: "DONE" in t.screen(), "top to stop on Ctrl-C")
            _left_clean(t, "130")


async def test_top_through_a_pipe_prints_plain_tables(runtime_dir: Path) -> None:
    async with streaming_mesh(runtime_dir, "topp"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshipc", "top", "topp", "--runtime-dir", os.fspath(runtime_dir),
            "--count", "2", "--period", "0.1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await within(proc.communicate())
        assert proc.returncode == 0, err
        text = out.decode()
        assert text.count("MSG/s IN") == 2 and "\x1b" not in text
        assert any(line.startswith("echo ") for line in text.splitlines())


async def test_top_ends_quietly_when_the_reader_of_its_pipe_leaves(runtime_dir: Path) -> None:
    """`meshipc top NAME | head`: no traceback, no error line, SIGPIPE's status."""
    async with streaming_mesh(runtime_dir, "toph"):
        rd = os.fspath(runtime_dir)
        argv = [sys.executable, "-m", "meshipc", "top", "toph", "--runtime-dir", rd, "--period", "0.05"]
        top = shlex.join(argv)
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", f"set -o pipefail; {top} | head -n 2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await within(proc.communicate())
        assert "MSG/s IN" in out.decode()
        assert err == b"" and proc.returncode == 141, err


async def test_inspect_poll_names_nodes_and_leaves_out_its_own(runtime_dir: Path) -> None:
    async with meshipc.Mesh(name="insp", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:echo", rx, name="echo")
        await within(tx.call(1))
        rd = os.fspath(runtime_dir)
        argv = [
            "inspect",
            "insp",
            "nodes",
            "-p",
            "-l",
            "3",
            "--count",
            "2",
            "--period",
            "0.1",
            "--runtime-dir",
            rd,
        ]
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshipc",
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await within(p.communicate())
        text = out.decode()
        assert p.returncode == 0, err
        assert f"echo (pid {proc.pid}):" in text and f"insp (pid {os.getpid()}):" in text
        # no node id as a key (the ids stay as the `id` fields); the command's own node is left out
        assert not re.search(r"^ *[0-9a-f]{32}:", text, re.M), text
        assert text.count("\n  id: ") == 2 * 2  # two polls of the mesh's node and the worker


@needs_tmux
async def test_inspect_poll_redraws_in_place_in_a_terminal(runtime_dir: Path) -> None:
    async with meshipc.Mesh(name="inspt", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()
        command = _top_command(runtime_dir, "inspt").replace(" top inspt ", " inspect inspt nodes -p -l 1 ")
        command = command.replace(" --sort name", " --count 30")
        with tmux_running(command) as t:
            await wait_until(lambda: "inspt (pid" in t.screen(), "inspect -p to show the mesh's node")
            await wait_until(
                lambda: t.screen().count("meshipc inspect inspt") == 1 and "---" not in t.screen(), "a redraw"
            )
            t("send-keys", "-t", "t", "C-c")
            await wait_until(lambda: "DONE" in t.screen(), "inspect -p to stop on Ctrl-C")
            assert "EXIT=130\nicanon echo DONE" in t.screen()
