"""The ``meshipc`` command against hostile peers and hostile arguments, and
the clean-up of what dead peers leave in the runtime folder.

The CLI runs as a real subprocess (``python -m meshipc``) against a real
mesh in this process whose services, inspect entries and one client node's
answer carry terminal escapes, fake lines, bidi overrides, deep nesting and
malformed records.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import meshipc
from meshipc._names import node_path
from relutil import wait_until
from test_control import cli

T = 10.0
#: Strings a hostile peer puts where the CLI prints a name, a key or a value.
EVIL = "x\x1b[2J\x1b]0;pwned\x07\nFAKE line\r\u202eevil\u2066"
FORBIDDEN = ("\x1b", "\x07", "\r", "\u202e", "\u2066", "\nFAKE")


def nested(n: int) -> Any:
    v: Any = "bottom"
    for _ in range(n):
        v = {"d": v}
    return v


def assert_clean(text: str) -> None:
    for bad in FORBIDDEN:
        assert bad not in text, f"{bad!r} reached the terminal:\n{text}"


async def test_status_and_inspect_escape_what_peers_send(runtime_dir: Path) -> None:
    async with meshipc.Mesh(name="evil", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()

        async def handler(req: Any) -> Any:
            return {(1, 2): EVIL}  # a tuple-keyed reply

        # service names are checked by the registry (a hostile one is refused
        # there: test_hostile_control); the reply and the inspect tree carry it
        mesh.serve("evil-svc", handler)
        mesh.inspect_add("k" + EVIL, lambda: {EVIL: EVIL, "deep": nested(300)})
        async with (
            meshipc.connect("evil", runtime_dir=runtime_dir) as conn,
            meshipc.connect("evil", runtime_dir=runtime_dir) as named,
        ):
            # one node answers garbage for itself, another a hostile name
            garbage = {"role": [EVIL], "workers": [1], "name": {EVIL: 1}}
            conn.mesh._control.inspector.node_tree = lambda *_: garbage
            real = named.mesh._control.inspector.node_tree
            named.mesh._control.inspector.node_tree = lambda *a: {**real(*a), "name": EVIL}
            code, out, err = await cli(runtime_dir, "status", "evil")
            assert code == 0, err
            assert_clean(out)
            assert "\\x1b[2J" in out  # shown, escaped
            assert "error      node" in out  # the malformed node, in its place
            for args in (["inspect", "evil", "-r"], ["inspect", "evil", "-r", "-j"]):
                code, out, err = await cli(runtime_dir, *args)
                assert code == 0, err
                assert_clean(out)
                assert "attached" in out  # the tree is shown, not lost
            code, out, err = await cli(runtime_dir, "call", "evil", "evil-svc")
            assert code == 0, err
            assert_clean(out)
            assert "(1, 2)" in out
            code, out, err = await cli(runtime_dir, "call", "evil", EVIL)
            assert code != 0 and len(err.strip().splitlines()) == 1, err
            assert_clean(out + err)


async def test_hostile_arguments_give_one_line(runtime_dir: Path) -> None:
    async with meshipc.Mesh(name="args", runtime_dir=runtime_dir) as mesh:
        await mesh.listen()

        async def echo(req: Any) -> Any:
            return req

        mesh.serve("echo", echo)
        deep = "[" * 20_000 + "]" * 20_000
        for args in (
            ["call", "args", "echo", deep],
            ["call", "args", "echo", "1", "-t", "nan"],
            ["status", "args", "-t", "inf"],
            ["inspect", "args", "-t", "-1"],
            ["inspect", "args", "nodes/x/y", "-u", deep],
            ["inspect", "args", "-l", "-3"],
        ):
            code, _, err = await cli(runtime_dir, *args)
            assert code != 0, args
            assert "Traceback" not in err, err
            assert len(err.strip().splitlines()) == 1, err


async def test_killed_clients_sockets_are_removed_by_the_service(runtime_dir: Path) -> None:
    client = Path(__file__).with_name("attach_client.py")
    async with meshipc.Mesh(name="svc", runtime_dir=runtime_dir) as mesh:
        listener = await mesh.listen()
        before = set(os.listdir(mesh.directory))
        procs = []
        conns = []
        try:
            for _ in range(3):
                p = await asyncio.create_subprocess_exec(
                    sys.executable,
                    os.fspath(client),
                    "session",
                    "svc",
                    os.fspath(runtime_dir),
                    stdout=asyncio.subprocess.PIPE,
                    stdin=asyncio.subprocess.DEVNULL,
                )
                procs.append(p)
                conns.append(await asyncio.wait_for(listener.accept(), T))  # kept open
                assert p.stdout is not None
                assert b"attached" in await asyncio.wait_for(p.stdout.readline(), T)
            await wait_until(lambda: len(os.listdir(mesh.directory)) >= len(before) + 3, "client sockets", 30)
            for p in procs:
                p.send_signal(signal.SIGKILL)
                await p.wait()
            await wait_until(
                lambda: set(os.listdir(mesh.directory)) == before, "dead clients' sockets removed"
            )
            assert os.path.exists(mesh.stats().node.path)  # our own live one stays
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()


async def test_prune_removes_dead_unnamed_meshes_only(runtime_dir: Path) -> None:
    # a dead unnamed mesh: its folder with a socket nothing listens on
    dead = runtime_dir / "mesh-0123456789abcdef"
    dead.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fspath(node_path(dead, os.urandom(16))))
    s.close()
    old = time.time() - 3600
    os.utime(dead, (old, old))
    async with meshipc.Mesh(runtime_dir=runtime_dir) as live:
        os.utime(live.directory, (old, old))  # old, but its socket answers
        code, out, err = await cli(runtime_dir, "ls", "--prune")
        assert code == 0, err
        assert "mesh-0123456789abcdef\tpruned (unnamed)" in out
        assert not dead.exists()
        assert live.directory.exists()
