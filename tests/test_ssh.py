"""``meshipc.ssh`` against a real OpenSSH server: a user-level ``sshd`` on a
high loopback port with its own host key and ``authorized_keys`` in a
temporary folder, started and stopped by the test. Marked ``ssh`` and left
out of the default run (``-m ssh`` runs it, by hand, where ``ssh``,
``sshd`` and ``ssh-keygen`` exist)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import meshipc
from meshipc import Call, Mesh, NodeFailure, SpawnError, channel
from relutil import private_dir, within

TESTS = Path(__file__).resolve().parent
SRC = Path(meshipc.__file__).resolve().parent.parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _missing() -> str | None:
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"no {tool} on this machine"
    if not os.path.exists(SSHD):
        return "no sshd on this machine (apt-get install openssh-server)"
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        return "sshd run as root needs its privilege separation folder: mkdir -p /run/sshd"
    return None


pytestmark = [pytest.mark.ssh, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _run(*argv: str) -> None:
    p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    assert await within(p.wait()) == 0, argv


@contextlib.asynccontextmanager
async def user_sshd(d: Path) -> AsyncIterator[list[str]]:
    """An ``sshd`` for this user on 127.0.0.1; yields the ssh options that
    reach it (its key, its port, its host key pinned, no user config)."""
    await _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host"))
    await _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user"))
    shutil.copy(d / "user.pub", d / "authorized_keys")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "PermitRootLogin prohibit-password\nLogLevel ERROR\n"
    )
    host_key = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    log = d / "sshd.log"  # our readiness probe's hang-up is logged there, not on the test's output
    sshd = await asyncio.create_subprocess_exec(SSHD, "-D", "-E", str(log), "-f", str(d / "sshd_config"))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:  # its port answers once it listens
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                banner = await within(r.readline())  # read: a silent hang-up is logged as an error
                w.close()
                if banner.startswith(b"SSH-"):
                    break
            except OSError:
                if loop.time() > deadline or sshd.returncode is not None:
                    said = log.read_text() if log.exists() else ""
                    raise AssertionError(f"sshd did not start listening: {said}") from None
                await asyncio.sleep(0.02)
        yield [
            "-F", "/dev/null", "-p", str(port), "-i", str(d / "user"),
            "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes",
        ]  # fmt: skip
    finally:
        if sshd.returncode is None:
            sshd.terminate()
        await within(sshd.wait())


def _python(far_dir: Path) -> str:
    """The far command's python: ours, with this checkout and the tests on
    its path (an ssh session does not inherit our environment)."""
    return f"env PYTHONPATH={SRC}{os.pathsep}{TESTS} MESHIPC_RUNTIME_DIR={far_dir} {sys.executable}"


async def test_spawn_over_ssh_calls_both_ways_and_fails_calls_when_cut(runtime_dir: Path) -> None:
    with private_dir("ssh") as d, private_dir("far") as far_dir:
        async with user_sshd(d) as options, Mesh(runtime_dir=runtime_dir) as mesh:
            carrier = meshipc.ssh("127.0.0.1", python=_python(far_dir), options=options)
            tx, rx = channel(Call[Any])
            proc = await within(mesh.spawn("carrier_workers:echo", rx, via=carrier), 30)
            assert proc.label == "ssh:127.0.0.1" and proc.remote_pid != proc.pid
            for i in range(200):
                assert await within(tx.call({"i": i, "b": b"x" * i})) == {"i": i, "b": b"x" * i}
            big = os.urandom(8 << 20)
            assert await within(tx.call(big), 60) == big
            # the ssh process dies: calls fail, naming the link
            proc.kill()
            with pytest.raises(NodeFailure, match=r"ssh:127\.0\.0\.1"):
                await within(tx.call("after the cut"), 15)
            assert await within(proc.wait(), 15) == -9


async def test_ssh_to_a_host_without_our_key_is_a_spawn_error(runtime_dir: Path) -> None:
    with private_dir("ssh") as d, private_dir("far") as far_dir:
        async with user_sshd(d) as options, Mesh(runtime_dir=runtime_dir) as mesh:
            (d / "authorized_keys").write_text("")
            carrier = meshipc.ssh("127.0.0.1", python=_python(far_dir), options=options)
            with pytest.raises(
                SpawnError, match=r"(?s)ssh:127.0.0.1.*exited with code 255.*Permission denied"
            ):
                await within(mesh.spawn("carrier_workers:idle", None, via=carrier), 30)
