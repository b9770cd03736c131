"""``_tls``: the mesh's TLS keys, grants and access files, the contexts and
the accept loop, tested at the TLS level (an echo behind the handshake);
the whole stack (a gateway, the far control plane, real processes) is in
``test_tls_attach.py``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshipc import AccessFileError, AuthenticationError, ConnectError
from meshipc._tls import (
    ACCEPTED,
    MAX_ACCESS_FILE,
    MAX_HANDSHAKING,
    Grant,
    TlsAuthority,
    TlsServer,
    open_tls,
    read_access,
)
from relutil import STEP, private_dir, wait_until, within


class Echo:
    """A TLS server whose clients get their grant id back, then an echo."""

    def __init__(self, folder: Path) -> None:
        self.authority = TlsAuthority(folder / "tls")
        self.served: list[str] = []
        # a short handshake bound: under uvloop a TLS 1.2-only client waits it out
        self.server = TlsServer(self.authority, self._client, handshake_timeout=1.0)

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, grant: Grant, peer: str
    ) -> None:
        self.served.append(grant.id)
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[Echo, Path]]:
    with private_dir("tls") as d:
        e = Echo(d)
        await e.server.start("127.0.0.1", 0)
        try:
            yield e, d
        finally:
            e.server.close()


async def roundtrip(access: Path) -> bytes:
    reader, writer = await open_tls(read_access(access), STEP)
    try:
        writer.write(b"ping")
        return await within(reader.readexactly(4))
    finally:
        writer.close()


async def test_grant_files_are_private_and_a_granted_client_is_served() -> None:
    async with serving() as (e, d):
        g = e.authority.grant(e.server.address, d / "a.access", 60)
        assert await roundtrip(d / "a.access") == b"ping"
        assert e.served == [g.id]
        assert stat.S_IMODE((d / "tls").stat().st_mode) == 0o700
        for f in [*(d / "tls").iterdir(), d / "a.access"]:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        text = (d / "a.access").read_text()
        assert f"pin: {e.authority.pin}" in text and f"address: 127.0.0.1 {e.server.address[1]}" in text
        assert [x.id for x in e.authority.grants()] == [g.id]
        # the keys and grants outlive the object: a second authority on the folder reads them
        again = TlsAuthority(d / "tls")
        assert again.pin == e.authority.pin and [x.id for x in again.grants()] == [g.id]


async def test_revoked_expired_and_unknown_certificates_fail_the_handshake(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving() as (e, d):
        revoked = e.authority.grant(e.server.address, d / "revoked.access", 60)
        e.authority.revoke(revoked.id)
        short = e.authority.grant(e.server.address, d / "short.access", 1.0)
        with private_dir("tls2") as other:  # another mesh's grant: a CA we do not know
            stranger = TlsAuthority(other / "tls")
            stranger.grant(e.server.address, d / "stranger.access", 60)
        good = e.authority.grant(e.server.address, d / "good.access", 60)
        caplog.set_level(logging.WARNING, "meshipc")
        with pytest.raises(AuthenticationError, match="refused our certificate"):
            await roundtrip(d / "revoked.access")
        assert "certificate revoked" in caplog.text
        # the stranger's file pins another server: the chain check fails first
        with pytest.raises(AuthenticationError, match="handshake refused: certificate verify failed"):
            await roundtrip(d / "stranger.access")
        await wait_until(lambda: time.time() > short.expires + 0.05, "the short grant to expire")
        with pytest.raises(AuthenticationError, match="refused our certificate"):
            await roundtrip(d / "short.access")
        assert await roundtrip(d / "good.access") == b"ping"
        assert e.served == [good.id]
        assert {g.id: g.state() for g in e.authority.grants()} == {revoked.id: "revoked", good.id: "valid"}


async def test_a_wrong_pin_is_refused_by_the_client() -> None:
    async with serving() as (e, d):
        e.authority.grant(e.server.address, d / "a.access", 60)
        text = (d / "a.access").read_text()
        wrong = text.replace(e.authority.pin, "sha256:" + "0" * 64)
        (d / "a.access").write_text(wrong)
        with pytest.raises(AuthenticationError, match="does not match the access file's pin"):
            await roundtrip(d / "a.access")
        assert e.served == []


async def test_plain_tcp_and_garbage_are_refused_with_one_line_and_others_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving() as (e, d):
        e.authority.grant(e.server.address, d / "a.access", 60)
        caplog.set_level(logging.WARNING, "meshipc")
        for junk in (b"GET / HTTP/1.0\r\n\r\n", os.urandom(600), b"\x16\x03\x01\x00\x05hello"):
            reader, writer = await asyncio.open_connection(*e.server.address)
            writer.write(junk)
            writer.write_eof()  # a truncated record must not wait for the handshake timeout
            assert await within(reader.read(100)) == b""  # closed, nothing of ours said
            writer.close()
        # TLS 1.2 only: refused in the handshake
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await within(asyncio.open_connection(*e.server.address, ssl=ctx))
        await wait_until(lambda: e.server.stats().refused >= 4, "the refusals to be counted")
        lines = [r for r in caplog.records if "refused" in r.getMessage()]
        assert lines and all("\n" not in r.getMessage() for r in lines)
        assert len(lines) <= 2  # rate-limited: one per kind
        assert await roundtrip(d / "a.access") == b"ping"


async def test_stalled_handshakes_are_capped_oldest_first() -> None:
    async with serving() as (e, d):
        e.authority.grant(e.server.address, d / "a.access", 60)
        idle = [await asyncio.open_connection(*e.server.address) for _ in range(MAX_HANDSHAKING + 20)]
        try:
            await wait_until(lambda: e.server.stats().handshaking == MAX_HANDSHAKING, "the cap")
            assert await roundtrip(d / "a.access") == b"ping"  # the oldest stalled one made room
            assert e.server.stats().handshaking <= MAX_HANDSHAKING
            assert await within(idle[0][0].read(10)) == b""  # the oldest was dropped
        finally:
            for _, w in idle:
                w.close()


def test_access_files_are_checked(tmp_path: Path) -> None:
    def write(text: str | bytes, mode: int = 0o600) -> Path:
        p = tmp_path / "x.access"
        p.unlink(missing_ok=True)
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        p.chmod(mode)
        return p

    with pytest.raises(AccessFileError, match="No such file"):
        read_access(tmp_path / "missing")
    with pytest.raises(AccessFileError, match="lets others read the key"):
        read_access(write("meshipc-access: 1\n", 0o644))
    # a folder or a FIFO in its place: a one-line error, no hang, no fd left open
    fifo = tmp_path / "fifo.access"
    os.mkfifo(fifo, 0o600)
    fds = len(os.listdir("/proc/self/fd"))
    for odd in (tmp_path, fifo):
        with pytest.raises(AccessFileError, match="not a regular file"):
            read_access(odd)
    assert len(os.listdir("/proc/self/fd")) == fds
    with pytest.raises(AccessFileError, match="MAX_ACCESS_FILE"):
        read_access(write(b"#" * (MAX_ACCESS_FILE + 1)))
    with pytest.raises(AccessFileError, match="not an ASCII"):
        read_access(write(b"\xff\xfe"))
    with pytest.raises(AccessFileError, match="version"):
        read_access(write("meshipc-access: 9\n"))
    with pytest.raises(AccessFileError, match="malformed line"):
        read_access(write("meshipc-access: 1\nnonsense\n"))
    head = "meshipc-access: 1\naddress: h 70000\npin: sha256:" + "a" * 64 + "\ngrant: " + "b" * 16 + "\n"
    with pytest.raises(AccessFileError, match="address, pin or grant"):
        read_access(write(head))
    head = head.replace("70000", "5")
    with pytest.raises(AccessFileError, match="malformed pin"):
        read_access(write(head.replace("a" * 64, "zz")))
    with pytest.raises(AccessFileError, match="client certificate, its key and the CA"):
        read_access(write(head))


async def test_nothing_listening_is_a_connect_error(tmp_path: Path) -> None:
    with private_dir("tls") as d:
        auth = TlsAuthority(d / "tls")
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        auth.grant(("127.0.0.1", port), d / "a.access", 60)
        with pytest.raises(ConnectError):
            await open_tls(read_access(d / "a.access"), STEP)


def test_grant_arguments_and_the_accepted_line() -> None:
    with private_dir("tls") as d:
        auth = TlsAuthority(d / "tls")
        for bad in (0, -1, float("nan"), float("inf"), "1"):
            with pytest.raises(ValueError):
                auth.grant(("h", 1), d / "a", bad)  # type: ignore[arg-type]
        with pytest.raises(KeyError):
            auth.revoke("nope")
        assert ACCEPTED.endswith(b"\n")


def test_no_switch_turns_a_check_off() -> None:
    """TLS 1.3 only, certificates always checked: nothing in the library
    lowers the version, turns verification off or skips the CRL."""
    src = Path(__file__).parent.parent / "src" / "meshipc"
    text = "\n".join(p.read_text() for p in src.glob("*.py"))
    for needle in (
        "CERT_NONE",
        "CERT_OPTIONAL",
        "TLSv1_2",
        "_create_unverified_context",
        "verify_mode = ssl.CERT_N",
    ):
        assert needle not in text, needle
    assert text.count("minimum_version = ssl.TLSVersion.TLSv1_3") == 2  # server and client


def test_the_cli_and_attach_load_x509_only_when_tls_is_used() -> None:
    """``cryptography.x509`` is imported on first use: a cold ``meshipc call``
    (which attaches over a Unix socket) does not pay for it; a grant does."""
    import subprocess
    import sys

    code = (
        "import sys, meshipc._ctlcli, meshipc._attach, meshipc._tls as t\n"
        "print('cryptography.x509' in sys.modules)\n"
        "print(t.NameOID.COMMON_NAME.dotted_string, 'cryptography.x509' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "2.5.4.3", "True"]
