"""Attaching over TCP + TLS 1.3 to a mesh in another process
(``tls_server.py``): a granted client gets the control plane (services,
call, open, inspect) and streams both ways through relays; revoked,
expired, stranger and wrong-pin grants, plain TCP and garbage are refused
while good clients are served; the CLI's ``--access``; and a link between
two network namespaces that goes down (``tls_netns.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import meshipc
from meshipc import AuthenticationError, PortFailed
from meshipc._tls import TlsAuthority, open_tls, read_access
from relutil import STEP, private_dir, wait_until, within

HERE = Path(__file__).parent


class Server:
    def __init__(self, proc: asyncio.subprocess.Process, folder: Path, info: dict[str, Any]) -> None:
        self.proc = proc
        self.folder = folder
        self.port: int = info["port"]
        self.grant: str = info["grant"]

    @property
    def access(self) -> Path:
        return self.folder / "good.access"

    async def ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        out: dict[str, Any] = json.loads(await within(self.proc.stdout.readline()))
        return out


@contextlib.asynccontextmanager
async def tls_server(runtime_dir: Path, **env: str) -> AsyncIterator[Server]:
    with private_dir("tlsf") as folder:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "tls_server.py"),
            str(folder),
            "127.0.0.1",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "MESHIPC_RUNTIME_DIR": str(runtime_dir), **env},
        )
        try:
            assert proc.stdout is not None
            first = await within(proc.stdout.readline(), 30)
            assert first, "the TLS server did not start"
            yield Server(proc, folder, json.loads(first))
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await within(proc.wait())
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_attach_call_stream_services_inspect(runtime_dir: Path) -> None:
    async with tls_server(runtime_dir) as srv, meshipc.connect_tls(srv.access) as conn:
        assert isinstance(conn, meshipc.TlsAttachment)
        services = await within(conn.services())
        assert {"double", "count", "total"} <= set(services)
        assert await within(conn.call("double", 21)) == 42
        # a stream from the far side: a Receiver crosses as a relay
        rx = await within(conn.call("count", 2000))
        got = [x async for x in rx]
        assert got == list(range(2000))
        # and one to it, sent while the far side sums it
        tx, rx2 = meshipc.channel(int)
        summing = asyncio.ensure_future(conn.call("total", rx2))
        for i in range(2000):
            tx.send(i)
            if i % 256 == 0:
                await tx.drain()
        tx.close()
        assert await within(summing) == sum(range(2000))
        sender = await within(conn.open("double"))
        assert await within(sender.call(5)) == 10
        sender.close()
        tree = await within(conn.inspect(depth=8))
        text = json.dumps(tree, default=str)
        assert srv.grant in text and "BEGIN" not in text and "PRIVATE" not in text
        with pytest.raises(meshipc.ServiceNotFound):
            await within(conn.call("nope", 1))


async def test_a_wildcard_listener_grants_with_the_host_clients_use(runtime_dir: Path) -> None:
    with private_dir("tlsw") as folder:
        async with meshipc.Mesh(runtime_dir=runtime_dir) as mesh:
            mesh.serve("double", double_here)
            tls = await mesh.listen_tls(("0.0.0.0", 0))
            with pytest.raises(ValueError, match="host="):
                tls.grant(folder / "a.access")
            tls.grant(folder / "a.access", host="127.0.0.1")
            assert f"address: 127.0.0.1 {tls.address[1]}" in (folder / "a.access").read_text()
            async with meshipc.connect_tls(folder / "a.access", runtime_dir=runtime_dir) as conn:
                assert await within(conn.call("double", 4)) == 8
            assert [g.state() for g in tls.grants()] == ["valid"]


async def double_here(x: int) -> int:
    return 2 * x


async def test_sync_connect_tls(runtime_dir: Path) -> None:
    async with tls_server(runtime_dir) as srv:

        def use() -> Any:
            with meshipc.sync.connect_tls(srv.access) as conn:
                return conn.call("double", 4), sorted(conn.services())

        assert await within(asyncio.to_thread(use), 30) == (8, ["count", "double", "total"])


async def test_revoked_expired_stranger_and_wrong_pin_are_refused(runtime_dir: Path) -> None:
    async with tls_server(runtime_dir) as srv:
        short = (await srv.ask("grant short.access 1"))["grant"]
        issued = time.time()
        doomed = (await srv.ask("grant doomed.access 60"))["grant"]
        async with meshipc.connect_tls(srv.folder / "doomed.access") as held:
            sender = await within(held.open("double"))  # a relay across its link
            assert await within(sender.call(1)) == 2
            await srv.ask(f"revoke {doomed}")
            # revoking ends the grant's open link: what crossed it fails
            with pytest.raises(PortFailed, match="tls:"):
                await within(sender.call(2))
            with pytest.raises(meshipc.MeshError):
                await within(held.call("double", 1))
        with pytest.raises(AuthenticationError, match="refused our certificate"):
            await within(meshipc.connect_tls(srv.folder / "doomed.access"))
        with private_dir("tls2") as other:  # a grant of another mesh
            TlsAuthority(other / "tls").grant(("127.0.0.1", srv.port), other / "x.access", 60)
            with pytest.raises(AuthenticationError, match="certificate verify failed"):
                await within(meshipc.connect_tls(other / "x.access"))
            wrong = other / "wrong.access"
            text = srv.access.read_text()
            pin = next(line for line in text.splitlines() if line.startswith("pin: "))
            wrong.write_text(text.replace(pin, "pin: sha256:" + "1" * 64))
            wrong.chmod(0o600)
            with pytest.raises(AuthenticationError, match="pin"):
                await within(meshipc.connect_tls(wrong))
        await wait_until(lambda: time.time() > issued + 1.2, "the short grant to expire")
        with pytest.raises(AuthenticationError, match="refused our certificate"):
            await within(meshipc.connect_tls(srv.folder / "short.access"))
        assert short
        async with meshipc.connect_tls(srv.access) as conn:  # the good one still works
            assert await within(conn.call("double", 2)) == 4


async def test_hostile_connections_do_not_stop_a_good_client(runtime_dir: Path) -> None:
    async with tls_server(runtime_dir) as srv:
        hostile: list[asyncio.StreamWriter] = []
        with private_dir("tls3") as other:
            TlsAuthority(other / "tls").grant(("127.0.0.1", srv.port), other / "x.access", 60)
            stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            stranger.check_hostname = False
            stranger.verify_mode = ssl.CERT_NONE  # a hostile client checks nothing
            stranger.load_cert_chain(other / "x.access")

            async def one(i: int) -> None:
                with contextlib.suppress(OSError, ssl.SSLError):
                    if i % 4 == 3:
                        _, w = await asyncio.open_connection("127.0.0.1", srv.port, ssl=stranger)
                    else:
                        _, w = await asyncio.open_connection("127.0.0.1", srv.port)
                        if i % 4 == 1:
                            w.write(os.urandom(300))
                        elif i % 4 == 2:
                            w.write(b"\x16\x03\x01\x02\x00" + os.urandom(40))
                    hostile.append(w)

            async def granted_garbage() -> None:
                # past TLS with a real grant, then not the link's HELLO: refused, one line
                _, w = await open_tls(read_access(srv.access), STEP)
                w.write(b"MESHIPC?" + os.urandom(200))
                hostile.append(w)

            try:
                await within(asyncio.gather(*(one(i) for i in range(200))), 30)
                await within(asyncio.gather(*(granted_garbage() for _ in range(5))))

                async def served() -> int:
                    async with meshipc.connect_tls(srv.access) as conn:
                        return await conn.call("double", 3)

                # attached and answered within STEP despite the flood (a bounded wait)
                assert await within(served(), STEP) == 6
                stats = await srv.ask("stats")
                assert stats["refused"] >= 50 and stats["accepted"] >= 1
            finally:
                for w in hostile:
                    w.close()


def cli(*args: str, runtime_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshipc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MESHIPC_RUNTIME_DIR": str(runtime_dir)},
        check=False,
    )


async def test_cli_with_access(runtime_dir: Path) -> None:
    async with tls_server(runtime_dir) as srv:
        a = str(srv.access)
        out = await asyncio.to_thread(cli, "call", "--access", a, "double", "21", runtime_dir=runtime_dir)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == 42
        out = await asyncio.to_thread(cli, "status", "--access", a, "-j", runtime_dir=runtime_dir)
        assert out.returncode == 0, out.stderr
        assert "double" in out.stdout
        out = await asyncio.to_thread(cli, "call", "--access", a, "nope", runtime_dir=runtime_dir)
        assert out.returncode == 1 and "nope" in out.stderr and "Traceback" not in out.stderr
        # the hint is a command that works, and the mesh is named by its access file
        assert f"in the mesh at {a}; `meshipc status --access {a}` lists them" in out.stderr, out.stderr
        out = await asyncio.to_thread(
            cli, "call", "--access", str(runtime_dir), "double", runtime_dir=runtime_dir
        )
        assert out.returncode == 1 and "not a regular file" in out.stderr and "Traceback" not in out.stderr
        out = await asyncio.to_thread(cli, "call", "double", runtime_dir=runtime_dir)
        assert out.returncode == 2 and "SERVICE is required" in out.stderr


# ------------------------------------------------------------------ two network namespaces


def _unshare_refused() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is not installed"
    probe = subprocess.run(
        ["unshare", "-Urn", "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return (
        None
        if probe.returncode == 0
        else f"unshare -Urn with a veth pair is refused here: {probe.stderr.strip()}"
    )


async def test_tls_between_network_namespaces_and_link_down(runtime_dir: Path) -> None:
    why = _unshare_refused()
    if why is not None:
        pytest.skip(why)
    with private_dir("tlsn") as folder:
        out = await asyncio.to_thread(
            subprocess.run,
            ["unshare", "-Urn", sys.executable, str(HERE / "tls_netns.py"), str(folder)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MESHIPC_RUNTIME_DIR": str(runtime_dir)},
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert report["double"] == 42
        assert report["streamed"] == 1000
        # the link went down: the waiting call and the crossing port failed
        # with NodeFailure naming the link, within the stated bound
        assert report["failed"]["node_failure"], report  # a LinkFailure, which is a NodeFailure
        assert "tls:10.77.0.2" in report["failed"]["text"]
        assert report["port_failed"] is True, report
        assert report["seconds"] < report["bound"], report
