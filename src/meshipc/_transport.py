"""A link: the framed I/O of one authenticated connection between two nodes,
on asyncio's event loop. It makes no protocol decisions: it hands what it
reads to its node and writes what its node gives it.

Reads and writes go straight to a non-blocking AF_UNIX socket with
``recvmsg``/``sendmsg`` (asyncio transports cannot carry descriptors):

* reads land in one reused buffer (``recvmsg_into``) and go to the sans-IO
  :class:`FrameDecoder`; received descriptors queue in a FIFO and each MSG
  frame takes the number it declares;
* writes are coalesced: frames collect in a batch and are written once per
  loop iteration, with the batch's descriptors riding on the first byte;
* bodies of ``OOB_THRESHOLD`` bytes or more travel out of band, in a
  descriptor ``PLATFORM.make_body`` fills (a sealed memfd on Linux, an
  unlinked temporary file elsewhere);
* a write whose descriptors the receiver has no room for yet
  (``PLATFORM.fd_send_retry``) is retried later, not taken as a failure.
"""

from __future__ import annotations

import array
import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from ._errors import DescriptorsTruncated, ProtocolError
from ._fd import Fd
from ._ids import NodeId
from ._platform import PLATFORM
from ._wire import (
    F_OOB,
    MAX_FDS_PER_MESSAGE,
    OOB_THRESHOLD,
    Event,
    FrameDecoder,
    MsgEvent,
    data_frame,
    encode_event,
    encode_msg_header,
    oob_body_length,
    oob_body_marker,
)

log = logging.getLogger("meshipc")

#: Linux passes at most this many descriptors in one sendmsg (SCM_MAX_FD).
SCM_MAX_FD = 253
#: Seconds after an immediate write during which the next plain message is
#: taken as part of a burst: it waits for the turn's one coalesced write
#: instead of a syscall of its own. A stream's messages come microseconds
#: apart; a call's request and reply, a round trip apart (tens of µs or
#: more), so they still go out at once, with no extra loop turn.
BURST_GAP: Final = 10e-6
_monotonic = time.monotonic

#: Size of the reused read buffer. Small enough to stay out of glibc's mmap
#: threshold trap (a fresh 256 KiB allocation per read), big enough for
#: hundreds of small frames per syscall.
READ_SIZE = 128 * 1024
#: Most descriptors queued on one link before the peer is deemed broken.
MAX_QUEUED_FDS = 4 * MAX_FDS_PER_MESSAGE
#: Bytes of a descriptor in an SCM_RIGHTS record (a C int).
FD_SIZE = array.array("i").itemsize
#: Ancillary buffer of one read: room for the most descriptors one sendmsg carries.
_ANCILLARY_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * FD_SIZE)
#: Bodies of this size or more are written as their own chunk, after their
#: header, instead of being copied onto it.
SEPARATE_BODY_MIN = 4096
#: Most reads of what a peer left in the socket before its link is declared
#: lost (after a failed write): bounds the work for a peer that keeps writing.
DRAIN_READS_MAX = 1024
# plain ints: the socket module's IntFlag members cost an enum operation per read
_RECV_FLAGS = PLATFORM.recv_flags
_CTRUNC = int(socket.MSG_CTRUNC)
#: Seconds between retries of a write whose descriptors the receiver had no
#: room for yet (``Platform.fd_send_retry``): doubling from the first to the last.
RETRY_FIRST, RETRY_MAX = 0.001, 0.1


def _read_body(fd: Fd, length: int) -> bytes:
    try:
        return PLATFORM.read_body(fd.fileno(), length)
    finally:
        fd.close()


class ReadBuffer:
    """The read buffer of the links of one node. They read one at a time, on
    the node's loop, and the decoder copies out whatever it keeps, so the
    bytes of a read are dead once it is handled: one buffer serves every link
    (an idle attached client costs no buffer of its own). A read that starts
    while another is being handled (re-entered from a callback) takes a
    buffer of its own."""

    __slots__ = ("busy", "view")

    def __init__(self, size: int = READ_SIZE) -> None:
        self.view = memoryview(bytearray(size))
        self.busy = False


class Link:
    """Framed, fd-carrying, coalescing I/O on one connected socket to node ``peer``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        peer: bytes,
        on_event: Callable[[bytes, Event, list[Any]], None],
        on_lost: Callable[[Link, str], None],
        on_data: Callable[[bytes, int, int, bytes], None],
        on_run: Callable[[bytes, int, list[bytes]], None] | None = None,
        reads: ReadBuffer | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.peer = peer
        self._on_event = on_event
        self._on_lost = on_lost
        self._on_data = on_data  # plain messages: (port, seq, kind, body)
        self._on_run = on_run  # runs of them on one port: (port, first seq, bodies)
        self._decoder = FrameDecoder()
        self._reads = reads if reads is not None else ReadBuffer()
        self._received_fds: deque[Fd] = deque()
        # batches of (chunks, fds); a batch carries at most SCM_MAX_FD fds
        self._chunks: list[bytes] = []
        self._batch_fds: list[Fd] = []
        self._batches: deque[tuple[bytes | memoryview, list[Fd]]] = deque()
        self._flush_scheduled = False
        self._writing = False  # a write is pending: later frames queue behind it
        self._watching_writable = False  # the loop watches the socket for room
        self._retry: asyncio.TimerHandle | None = None
        self._retry_wait = 0.0
        self._in_read_batch = False  # in a read batch: replies coalesce until it ends
        self._streaming = False  # the last flush had several frames to write
        self._last_immediate = 0.0  # when the last message went out at once
        self.closed = False
        self.frames_out = 0
        self.bytes_in = 0
        self.writes = 0  # send/sendmsg calls: coalescing keeps this far below frames_out
        self.bytes_out = 0
        self.retries = 0  # writes retried because the receiver had no room for descriptors
        #: bytes of sealed batches not written yet (the peer is not keeping
        #: up): the flow-control view of this link (``Limits.link_buffer_bytes``)
        self.backlog = 0
        # out-of-band bodies queued (by the id of their Fd): counted in the
        # backlog until their batch starts going
        self._oob_sizes: dict[int, int] = {}
        self._backlog_waiters: list[tuple[int, Callable[[], None]]] = []
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    # ---------------------------------------------------------------- writing

    @property
    def frames_in(self) -> int:
        """Frames received and decoded on this link."""
        return self._decoder.frames

    def write_event(self, ev: Event, fds: list[Any]) -> None:
        if self.closed:
            for f in fds:
                f.close()
            return
        if isinstance(ev, MsgEvent):
            body = ev.body
            if len(body) >= OOB_THRESHOLD:
                body_fd = Fd(PLATFORM.make_body(body))
                self._oob_sizes[id(body_fd)] = len(body)
                self.backlog += len(body)
                fds = [*fds, body_fd]
                marker = oob_body_marker(len(body))
                head = encode_msg_header(ev.port, ev.seq, ev.kind, F_OOB, ev.ports, len(fds), len(marker))
                self._add(head + marker, fds)
            else:
                head = encode_msg_header(ev.port, ev.seq, ev.kind, ev.flags, ev.ports, len(fds), len(body))
                if len(body) < SEPARATE_BODY_MIN:
                    self._add(head + body, fds)
                else:
                    self._add(head, fds)
                    self._chunks.append(body)
        else:
            self._add(encode_event(ev), fds)

    def write_data(self, port: bytes, seq: int, kind: int, body: bytes) -> None:
        """A plain message (no ports, no fds): the hot path of ``write_event``."""
        n = len(body)
        if n >= SEPARATE_BODY_MIN or self.closed:
            self.write_event(MsgEvent(port, seq, kind, 0, [], 0, body), [])
            return
        frame = data_frame(port, seq, kind, body)
        self.frames_out += 1
        if not self._flush_scheduled:
            if not (self._streaming or self._batches or self._writing or self._in_read_batch):
                now = _monotonic()
                if now - self._last_immediate >= BURST_GAP:
                    # nothing queued, no stream going, nothing sent just now:
                    # out at once, no loop turn (a call's request or reply)
                    self._last_immediate = now
                    self._send_now(frame)
                    return
            # a burst: this and what follows in the turn go out in one write
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)
        self._chunks.append(frame)

    def _send_now(self, data: bytes) -> None:
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            # not from here: this runs inside a send (or the engine's own
            # processing), which must not see the peer fail under it
            self.loop.call_soon(self._drain_then_lose, f"write failed: {exc}")
            return
        self.writes += 1
        self.bytes_out += n
        if n < len(data):
            self._batches.append((memoryview(data)[n:], []))
            self.backlog += len(data) - n
            self._writing = True
            self._watching_writable = True
            self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _add(self, data: bytes, fds: list[Any]) -> None:
        if fds:
            if len(self._batch_fds) + len(fds) > SCM_MAX_FD:
                self._seal_batch()
            self._batch_fds.extend(fds)
        self._chunks.append(data)
        self.frames_out += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def _seal_batch(self) -> None:
        if self._chunks:
            data = b"".join(self._chunks)
            self.backlog += len(data)
            self._batches.append((data, self._batch_fds))
            self._chunks = []
            self._batch_fds = []

    def flush(self) -> None:
        self._flush_scheduled = False
        # several frames queued in one turn mean a stream: keep coalescing
        # (one write per loop turn) until a turn brings one frame or none
        self._streaming = len(self._chunks) > 1
        self._seal_batch()
        if self._writing or self.closed:
            return
        self._write_batches()

    def _write_batches(self) -> None:
        batches = self._batches
        while batches:
            data, fds = batches[0]
            try:
                if fds:
                    arr = array.array("i", [f.fileno() for f in fds])
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, arr)]
                    n = self.sock.sendmsg([data], anc)
                else:
                    n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                if fds and exc.errno in PLATFORM.fd_send_retry:
                    # the receiver has no room for descriptors yet (macOS):
                    # the socket may well poll writable, so wait a while
                    self._retry_later()
                    return
                # the peer may have exited after sending its last words: read
                # what it left in the socket before declaring it gone
                self._drain_then_lose(f"write failed: {exc}")
                return
            if fds and n > 0:
                # delivered with the first byte: never send them again
                for f in fds:
                    if self._oob_sizes:
                        self.backlog -= self._oob_sizes.pop(id(f), 0)
                    f.close()
                fds = []
            self.bytes_out += n
            self.backlog -= n
            self.writes += 1
            if n > 0:
                self._retry_wait = 0.0
            if n < len(data):
                batches[0] = (memoryview(data)[n:], fds)
                self._writing = True
                if not self._watching_writable:
                    self._watching_writable = True
                    self.loop.add_writer(self.sock.fileno(), self._on_writable)
                if self._backlog_waiters:
                    self._wake_backlog()
                return
            batches.popleft()
        if self._backlog_waiters:
            self._wake_backlog()
        self._writing = False
        if self._watching_writable:
            self._watching_writable = False
            self.loop.remove_writer(self.sock.fileno())

    def _retry_later(self) -> None:
        """Write the first batch again after a pause (doubling from
        ``RETRY_FIRST`` to ``RETRY_MAX``); frames queued meanwhile wait."""
        self._writing = True
        if self._watching_writable:
            self._watching_writable = False
            self.loop.remove_writer(self.sock.fileno())
        self._retry_wait = min(RETRY_MAX, self._retry_wait * 2) if self._retry_wait else RETRY_FIRST
        self.retries += 1
        self._retry = self.loop.call_later(self._retry_wait, self._retry_write)

    def _retry_write(self) -> None:
        self._retry = None
        if not self.closed:
            self._write_batches()

    def _on_writable(self) -> None:
        self._write_batches()

    def watch_backlog(self, below: int, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the backlog is at most ``below`` bytes (or the
        link closed); later, from the loop, never inside this call."""
        if self.closed or self.backlog <= below:
            self.loop.call_soon(fn)
        else:
            self._backlog_waiters.append((below, fn))

    def _wake_backlog(self) -> None:
        keep = []
        for below, fn in self._backlog_waiters:
            if self.closed or self.backlog <= below:
                fn()
            else:
                keep.append((below, fn))
        self._backlog_waiters = keep

    @property
    def idle(self) -> bool:
        """Nothing queued and no write pending."""
        return not (self._batches or self._chunks or self._writing)

    @property
    def queued_bytes(self) -> int:
        """Bytes handed to the link and not yet written."""
        return sum(len(c) for c in self._chunks) + sum(len(data) for data, _ in self._batches)

    # ---------------------------------------------------------------- reading

    def _drain_then_lose(self, reason: str) -> None:
        for _ in range(DRAIN_READS_MAX):
            if self.closed:
                return
            if not self._read_once():
                break
        self._lost(reason)

    def _on_readable(self) -> None:
        self._in_read_batch = True
        try:
            self._read_once()
        finally:
            self._in_read_batch = False
        # answer a batch of reads right away instead of waiting a loop turn
        if self._flush_scheduled and not self.closed:
            self.flush()

    def _read_once(self) -> bool:
        """One read; False when nothing more is to be read now."""
        reads = self._reads
        if reads.busy:  # re-entered from a callback: not the shared buffer
            return self._read_into(memoryview(bytearray(READ_SIZE)))
        reads.busy = True
        try:
            return self._read_into(reads.view)
        finally:
            reads.busy = False

    def _read_into(self, buf: memoryview) -> bool:
        """One read into ``buf``, decoded before returning (nothing keeps a view of it)."""
        try:
            n, anc, flags, _ = self.sock.recvmsg_into([buf], _ANCILLARY_SPACE, _RECV_FLAGS)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._lost(f"read failed: {exc}")
            return False
        try:
            if anc:
                arrived: list[Fd] = []
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        arr = array.array("i")
                        arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
                        arrived.extend(Fd(x) for x in arr)
                PLATFORM.adopt_received(f.fileno() for f in arrived)
                if flags & _CTRUNC:
                    # what did arrive is closed here: nothing leaks
                    for f in arrived:
                        f.close()
                    raise DescriptorsTruncated(
                        f"descriptors were truncated ({len(arrived)} arrived; the peer sent more)"
                    )
                self._received_fds.extend(arrived)
            elif flags & _CTRUNC:
                raise DescriptorsTruncated("descriptors were truncated (none arrived; the peer sent some)")
            if len(self._received_fds) > MAX_QUEUED_FDS:
                raise ProtocolError("peer sent descriptors that no frame claims")
            if n == 0:
                self._lost("connection closed by peer")
                return False
            self.bytes_in += n
            self._decoder.feed_each(buf[:n], self._on_data, self._deliver_event, self._on_run)
        except ProtocolError as exc:
            log.warning("dropping connection to node %s: protocol error: %s", NodeId(self.peer), exc)
            self._lost(f"protocol error: {exc}")
            return False
        return True

    def _deliver_event(self, ev: Event) -> None:
        fds: list[Any] = []
        if isinstance(ev, MsgEvent):
            if ev.nfds:
                if ev.nfds > len(self._received_fds):
                    raise ProtocolError("frame claims descriptors that did not arrive")
                fds = [self._received_fds.popleft() for _ in range(ev.nfds)]
            if ev.flags & F_OOB:
                ev.body = _read_body(fds.pop(), oob_body_length(ev.body))
                ev.nfds -= 1
                ev.flags = 0
        self._on_event(self.peer, ev, fds)

    # ---------------------------------------------------------------- closing

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self.close()
        self._on_lost(self, reason)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        fd = self.sock.fileno()
        if fd >= 0:
            self.loop.remove_reader(fd)
            if self._watching_writable:
                self.loop.remove_writer(fd)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.sock.close()
        for f in self._received_fds:
            f.close()
        self._received_fds.clear()
        for _, fds in self._batches:
            for f in fds:
                f.close()
        for f in self._batch_fds:
            f.close()
        self._batches.clear()
        self._chunks = []
        self._batch_fds = []
        self.backlog = 0
        self._oob_sizes.clear()
        self._wake_backlog()
