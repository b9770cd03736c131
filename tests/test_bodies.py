"""Out-of-band bodies received without a copy (issue 24): a memfd sealed
against writing, shrinking and growing is mapped read-only; anything else a
peer hands over (a file body from a portable-mode peer, an unsealed or
partly sealed memfd) is copied with ``pread`` as before; every check holds
(size against the frame and the cap, no holes) before a byte is mapped.

A value decoded out of a mapped body stays valid after the message is
gone: ``bytes`` are copies, a ``memoryview`` field keeps the mapping alive
(the buffer protocol's reference), and the mapping goes with the last view.
Proven in memory (two links on a socket pair), through a worker (bodies
from a child process, both modes) and against a hostile peer that is a
separate process holding an authenticated link."""

from __future__ import annotations

import array
import asyncio
import fcntl
import gc
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import meshipc
from meshipc import Mesh, ProtocolError, _platform
from meshipc._codec import decode, encode_plain
from meshipc._platform import Linux, Portable
from meshipc._ports import Message
from meshipc._wire import (
    F_OOB,
    K_DATA,
    MAX_OOB_BODY,
    OOB_THRESHOLD,
    THREAD_BODY_MIN,
    encode_msg_header,
    oob_body_marker,
)
from relutil import reaped, wait_until, within
from test_hostile import handshake
from test_transport import PORT, Inbox, linked, make_link

LINUX = _platform.PLATFORM.oob == "memfd"
ALL_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def memfd(data: bytes, seals: int = ALL_SEALS, size: int | None = None) -> int:
    """A memfd holding ``data`` (then cut or extended to ``size``), with ``seals``."""
    fd = os.memfd_create("test-body", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if size is not None:
        os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def mappings() -> int:
    """Mappings of meshipc body memfds in this process."""
    with open("/proc/self/maps") as f:
        return sum("memfd:meshipc-msg" in line for line in f)


class Holder(msgspec.Struct):
    data: memoryview


# ------------------------------------------------------------ the platform


def test_only_a_fully_sealed_memfd_is_mapped() -> None:
    linux, body = Linux(), os.urandom(OOB_THRESHOLD + 1)
    fd = linux.make_body(body)
    try:
        view = linux.map_body(fd, len(body))
        assert view is not None and view.readonly and view == body
        assert Portable().map_body(fd, len(body)) is None  # portable mode never maps
    finally:
        os.close(fd)
    assert view == body  # the view holds its own reference to the memfd: fd closed, still readable
    view.release()

    # copied, not mapped: no seal, a seal missing, too small to be worth a mapping, a file, a pipe
    for seals in (0, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW):
        fd = memfd(body, seals)
        try:
            assert linux.map_body(fd, len(body)) is None
            assert linux.read_body(fd, len(body)) == body
        finally:
            os.close(fd)
    fd = memfd(body[:100])
    try:
        assert linux.map_body(fd, 100) is None and linux.read_body(fd, 100) == body[:100]
    finally:
        os.close(fd)
    fd = Portable().make_body(body)
    r, w = os.pipe()
    try:
        assert linux.map_body(fd, len(body)) is None and linux.map_body(r, len(body)) is None
    finally:
        for x in (fd, r, w):
            os.close(x)


def test_mapped_bodies_are_capped_then_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most ``MAX_MAPPED_BODIES`` are mapped at once (each holds a
    descriptor); beyond, bodies are copied; a mapping released makes room."""
    monkeypatch.setattr(_platform, "MAX_MAPPED_BODIES", 2)
    linux, body = Linux(), os.urandom(OOB_THRESHOLD)
    fd = linux.make_body(body)
    try:
        views = [linux.map_body(fd, len(body)) for _ in range(3)]
        assert views[0] is not None and views[1] is not None and views[2] is None
        views[0].release()
        del views[0]
        gc.collect()
        assert linux.map_body(fd, len(body)) == body
    finally:
        os.close(fd)


def test_a_sealed_memfd_that_fails_the_checks_is_refused_before_mapping() -> None:
    linux, body = Linux(), os.urandom(OOB_THRESHOLD)
    fd = memfd(body)
    try:
        with pytest.raises(ProtocolError, match=f"is {OOB_THRESHOLD} bytes, frame said {2 * OOB_THRESHOLD}"):
            linux.map_body(fd, 2 * OOB_THRESHOLD)  # short: the frame announced more
    finally:
        os.close(fd)
    fd = memfd(body, size=MAX_OOB_BODY)  # sealed, a GiB announced, its rest a hole
    try:
        with pytest.raises(ProtocolError, match="sparse file"):
            linux.map_body(fd, MAX_OOB_BODY)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- in memory


@pytest.mark.skipif(not LINUX, reason="bodies are files in portable mode: always copied")
async def test_a_mapped_body_outlives_its_message_and_goes_with_its_last_view() -> None:
    """Two links in memory: the large body arrives mapped (``bodies_mapped``);
    a ``bytes`` value decoded out of it is a copy, a ``memoryview`` field is
    a view of the mapping that stays readable after the message, its body
    and the link are gone; the mapping goes with the last view."""
    payload = os.urandom(2 * OOB_THRESHOLD)
    before = mappings()
    async with linked() as (a, b, _, got):
        for value in (payload, Holder(memoryview(payload))):
            body = encode_plain(value)
            assert body is not None
            a.write_data(PORT, len(got.events), K_DATA, body)
        await wait_until(lambda: len(got.events) == 2, "both messages")
        assert b.stats().bodies_mapped == 2 and b.stats().bodies_copied == 0
        assert mappings() == before + 2
        first, second = (ev.body for ev, _ in got.events)
        assert type(first) is memoryview and first.readonly
        value = decode(Message(K_DATA, None, first), bytes)
        held = decode(Message(K_DATA, None, second), Holder)
        got.events.clear()
        del first, second
    gc.collect()
    assert type(value) is bytes and value == payload
    assert mappings() == before + 1  # the bytes value's body is unmapped: it was copied out
    view = held.data
    del held
    gc.collect()
    assert view == payload and bytes(view[-4096:]) == payload[-4096:]  # no fault, the same bytes
    del view
    gc.collect()
    assert mappings() == before


async def test_a_body_from_a_peer_without_every_seal_is_copied_and_delivered() -> None:
    """A memfd that can still be shrunk (here: no seals) is not mapped: it is
    copied (a peer that cuts it short under the copy costs itself its link,
    never this process a fault: ``test_platform``), then delivered."""
    payload = os.urandom(THREAD_BODY_MIN)  # large: read in a thread
    raw, theirs = socket.socketpair()
    got = Inbox()
    link = make_link(theirs, b"A" * 16, got)
    fd = memfd(payload, seals=0)
    try:
        marker = oob_body_marker(len(payload))
        head = encode_msg_header(PORT, 0, K_DATA, F_OOB, [], 1, len(marker))
        raw.sendmsg([head + marker], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        await wait_until(lambda: len(got.events) == 1, "the message")
        ((ev, _fds),) = got.events
        assert type(ev.body) is bytes and ev.body == payload
        assert link.stats().bodies_copied == 1 and link.stats().bodies_mapped == 0
    finally:
        os.close(fd)
        link.close()
        raw.close()


# ------------------------------------------------------ over real processes


async def test_large_bodies_from_a_child_process_are_mapped_where_sealed(runtime_dir: Path) -> None:
    """A worker echoes 1 and 16 MiB: each reply comes from a child process,
    mapped on Linux (``bodies_mapped``), copied from a file in portable mode
    (``bodies_copied``); the values are the same either way."""
    async with Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        tx, rx = meshipc.channel()
        proc = await mesh.spawn("workers:echo", rx)
        procs.append(proc)
        for size in (1 << 20, 16 << 20):
            big = os.urandom(size)
            assert await within(tx.call(big), 60) == big
        (link,) = mesh.stats().node.links
        counted = link.bodies_mapped if LINUX else link.bodies_copied
        assert counted == 2 and link.bodies_mapped + link.bodies_copied == 2
        tx.close()


#: The hostile peer: a separate process on an authenticated link (the
#: socket's descriptor is ``argv[3]``) that sends one message whose body is
#: a memfd: ``short`` (sealed, shorter than announced), ``sparse`` (sealed,
#: its end a hole), ``huge`` (a frame announcing more than
#: ``MAX_OOB_BODY``) or ``unsealed`` (the right size, no seals: it could
#: still shrink it); then it reads until the node hangs up, or until it is
#: told to stop (a line on stdin).
HOSTILE = r"""
import array, fcntl, os, socket, sys, threading
from meshipc._wire import F_OOB, K_DATA, MAX_OOB_BODY, encode_msg_header, oob_body_marker
what, port, sock_fd = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
s = socket.socket(fileno=sock_fd)
s.setblocking(True)
fd = os.memfd_create("hostile", os.MFD_ALLOW_SEALING)
announced = 8 << 20
os.write(fd, os.urandom(announced if what == "unsealed" else 1 << 20))
if what == "sparse":
    os.ftruncate(fd, announced)
if what == "huge":
    announced = MAX_OOB_BODY + 1
if what != "unsealed":
    seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
marker = oob_body_marker(announced)
head = encode_msg_header(port, 1, K_DATA, F_OOB, [], 1, len(marker))
s.sendmsg([head + marker], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
threading.Thread(target=lambda: (sys.stdin.readline(), os._exit(0)), daemon=True).start()
while s.recv(65536):
    pass
"""


@pytest.mark.parametrize("attack", ["short", "sparse", "huge", "unsealed"])
async def test_a_hostile_process_sending_bad_bodies_loses_its_link_and_the_node_serves_on(
    attack: str, runtime_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sealed body shorter than announced, a sparse one, an announced size
    beyond the cap: the link is dropped with the reason before anything is
    mapped or read. An unsealed one (which could shrink under a mapping) is
    copied, not mapped, and the link stays. The node serves on."""
    caplog.set_level(logging.WARNING, logger="meshipc")
    async with Mesh(runtime_dir=runtime_dir) as mesh, reaped(mesh) as procs:
        node = mesh._node
        tx, rx = meshipc.channel()
        procs.append(await mesh.spawn("workers:echo", rx))
        me = os.urandom(16)
        s, _ = await handshake(mesh, me)
        with s:
            await wait_until(lambda: me in node.links, "the hostile peer to be connected")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
            child = subprocess.Popen(
                [sys.executable, "-c", HOSTILE, attack, os.urandom(16).hex(), str(s.fileno())],
                pass_fds=[s.fileno()],
                stdin=subprocess.PIPE,
                env=env,
            )
            try:
                if attack == "unsealed":
                    link = node.links[me]
                    await wait_until(lambda: link.stats().bodies_copied == 1, "the body to be copied", 30)
                    assert link.stats().bodies_mapped == 0 and not link.closed
                    assert child.stdin is not None
                    child.stdin.write(b"stop\n")
                    child.stdin.flush()
                else:
                    await wait_until(lambda: me not in node.links, "the hostile peer to be dropped", 30)
                assert await within(asyncio.to_thread(child.wait), 30) == 0
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                if child.stdin is not None:
                    child.stdin.close()
        if attack != "unsealed":
            why = [r.getMessage() for r in caplog.records if "protocol error" in r.getMessage()]
            expect = {
                "short": "is 1048576 bytes, frame said 8388608",
                "sparse": "sparse file",
                "huge": f"exceeds {MAX_OOB_BODY}",
            }[attack]
            assert why and expect in why[-1], why
        # the node goes on: a large body each way through the worker
        big = os.urandom(2 << 20)
        assert await within(tx.call(big), 30) == big
        tx.close()
