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
  descriptor ``PLATFORM.new_body`` makes and ``PLATFORM.fill_body`` fills (a
  sealed memfd on Linux, an unlinked file in the runtime root's private
  ``bodies`` folder elsewhere);
* bodies of ``THREAD_BODY_MIN`` bytes or more are copied in a worker thread,
  both ways, so the loop keeps serving every other link and port meanwhile
  (the copies are system calls that release the GIL). The link's order
  holds: a frame queued behind a body being written waits for it; a link
  that receives one stops reading until it is read, then goes on with what
  it had already received;
* a write whose descriptors the receiver has no room for yet
  (``PLATFORM.fd_send_retry``) is retried later, not taken as a failure.
"""

from __future__ import annotations

import array
import asyncio
import functools
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from ._errors import BufferFull, DescriptorsTruncated, MeshError, MessageError, ProtocolError
from ._fd import Fd
from ._ids import NodeId
from ._names import body_directory, runtime_root
from ._platform import PLATFORM, body_error
from ._wire import (
    DATA_HEAD,
    DATA_HEAD_LEN,
    F_OOB,
    FD_BODY,
    MAX_FDS_PER_MESSAGE,
    MAX_OOB_BODY,
    OOB_THRESHOLD,
    T_MSG,
    THREAD_BODY_MIN,
    Event,
    FdBody,
    FrameDecoder,
    MsgEvent,
    encode_event,
    encode_msg_header,
    fd_frame,
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
_pack_data_head = DATA_HEAD.pack

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
#: Most bytes of out-of-band bodies one link holds made and not yet handed
#: to the kernel (each pins its memory: a memfd, or a file's blocks). A
#: message that would go beyond it is refused with ``BufferFull`` (nothing
#: queued): two bodies of the largest size may wait at once.
MAX_OOB_IN_FLIGHT: Final = 2 * MAX_OOB_BODY


def _read_body(fd: Fd, length: int) -> bytes:
    try:
        return PLATFORM.read_body(fd.fileno(), length)
    finally:
        fd.close()


def _map_body(fd: Fd, length: int) -> bytes | None:
    """The body in ``fd`` mapped, not copied (``PLATFORM.map_body``: a
    sealed memfd), or None (``fd`` left open: it must be read). It passes
    for bytes where bodies go (a read-only ``memoryview``: length, slices,
    the buffer protocol); decoders copy out of it, or keep views of it that
    keep the mapping alive."""
    try:
        view = PLATFORM.map_body(fd.fileno(), length)
    except ProtocolError:  # the caller drops the link
        fd.close()
        raise
    if view is not None:
        fd.close()
    return cast(bytes, view)


class _Body:
    """An out-of-band body on its way out: its descriptor, sent in the
    message's place once filled (in a worker thread for a large one). It
    stands in a batch's descriptors like an ``Fd``: ``fileno``, ``close``."""

    __slots__ = ("closed", "fd", "filling", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = Fd(fd)
        self.size = size
        self.filling = False  # a worker thread is writing into it
        self.closed = False

    def fileno(self) -> int:
        return self.fd.fileno()

    def close(self) -> None:
        # never under a thread still writing into it: that thread's end does it
        self.closed = True
        if not self.filling:
            self.fd.close()


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


#: Why a link ended when its peer closed the connection: in practice, the
#: peer's process exited or closed its mesh (a service that went away).
PEER_CLOSED: Final = "its process closed the connection (it exited or left the mesh)"

@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of one ``Link`` (``Link.stats()``)."""

    #: the peer node's id (hex)
    peer: str
    bytes_in: int
    bytes_out: int
    frames_in: int
    frames_out: int
    #: send/sendmsg calls: coalescing keeps this far below ``frames_out``
    writes: int
    #: writes retried because the receiver had no room for descriptors
    retries: int
    #: bytes handed to the link and not written yet (open and sealed batches)
    queued_bytes: int
    #: bytes of sealed batches not written yet (``Limits.link_buffer_bytes``)
    backlog: int
    #: bytes of out-of-band bodies made and not written yet (``MAX_OOB_IN_FLIGHT``)
    oob_queued: int
    closed: bool
    #: the protocol version the handshake chose for this link (the highest
    #: both nodes speak; docs/compatibility.md)
    protocol: int = 0
    #: out-of-band bodies received and mapped (sealed memfds: no copy)
    bodies_mapped: int = 0
    #: out-of-band bodies received and copied (``pread``: file bodies,
    #: memfds without every seal)
    bodies_copied: int = 0


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
        body_root: Path | None = None,
    ) -> None:
        """``body_root``: the runtime root whose private ``bodies`` folder
        holds the files of large bodies where they are files (default: this
        user's runtime root, ``_names.runtime_root``)."""
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
        self._batch_fds: list[Fd | _Body] = []
        self._batches: deque[tuple[bytes | memoryview, list[Fd | _Body]]] = deque()
        self._flush_scheduled = False
        self._writing = False  # a write is pending: later frames queue behind it
        self._watching_writable = False  # the loop watches the socket for room
        self._retry: asyncio.TimerHandle | None = None
        self._retry_wait = 0.0
        self._in_read_batch = False  # in a read batch: replies coalesce until it ends
        self._streaming = False  # the last flush had several frames to write
        self._last_immediate = 0.0  # when the last message went out at once
        self._body_root = body_root
        self._body_folder: Path | None = None
        self._waiting_body: _Body | None = None  # the head batch waits for this body to be filled
        self._body_reading = False  # a body is read in a thread: reading paused
        self._lose_after: str | None = None  # the link is lost once the body being read is delivered
        self.oob_queued = 0  # bytes of out-of-band bodies made and not yet written
        self.closed = False
        #: the protocol version the handshake chose (set by the node)
        self.protocol = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.writes = 0  # send/sendmsg calls: coalescing keeps this far below frames_out
        self.bytes_out = 0
        self.retries = 0  # writes retried because the receiver had no room for descriptors
        self.bodies_mapped = 0  # out-of-band bodies received mapped (LinkStats)
        self.bodies_copied = 0  # ... and copied
        #: bytes of sealed batches not written yet (the peer is not keeping
        #: up): the flow-control view of this link (``Limits.link_buffer_bytes``)
        self.backlog = 0
        self._backlog_waiters: list[tuple[int, Callable[[], None]]] = []
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    # ---------------------------------------------------------------- writing

    @property
    def frames_in(self) -> int:
        """Frames received and decoded on this link."""
        return self._decoder.frames

    def stats(self) -> LinkStats:
        """What this link has carried and holds now (a snapshot; never raises)."""
        return LinkStats(
            peer=self.peer.hex(),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            frames_in=self.frames_in,
            frames_out=self.frames_out,
            writes=self.writes,
            retries=self.retries,
            queued_bytes=self.queued_bytes,
            backlog=self.backlog,
            oob_queued=self.oob_queued,
            closed=self.closed,
            protocol=self.protocol,
            bodies_mapped=self.bodies_mapped,
            bodies_copied=self.bodies_copied,
        )

    def write_event(self, ev: Event, fds: list[Any]) -> None:
        if self.closed:
            for f in fds:
                f.close()
            return
        if isinstance(ev, MsgEvent):
            body = ev.body
            if len(body) >= OOB_THRESHOLD:
                self._write_oob(ev, fds)
            else:
                head = encode_msg_header(ev.port, ev.seq, ev.kind, ev.flags, ev.ports, len(fds), len(body))
                if len(body) < SEPARATE_BODY_MIN:
                    self._add(head + body, fds)
                else:
                    self._add(head, fds)
                    self._chunks.append(body)
        else:
            self._add(encode_event(ev), fds)

    def _write_oob(self, ev: MsgEvent, fds: list[Any]) -> None:
        """A message whose body goes in a descriptor. Raises ``MessageError``
        if the body cannot be made (the cause: no descriptor left, no room in
        the folder, ...) or ``BufferFull`` beyond ``MAX_OOB_IN_FLIGHT``;
        nothing is queued then and the message's descriptors are closed."""
        body = ev.body
        n = len(body)
        try:
            if self.oob_queued + n > MAX_OOB_IN_FLIGHT:
                raise BufferFull(
                    f"{self.oob_queued} bytes of large messages to node {NodeId(self.peer)} are not "
                    f"written yet; another {n} would exceed {MAX_OOB_IN_FLIGHT}: send it once they are"
                )
            job = _Body(PLATFORM.new_body(n, self._folder_for_bodies()), n)
        except BaseException:
            for f in fds:
                f.close()
            raise
        if n >= THREAD_BODY_MIN:
            # the copy leaves the loop; frames queued from now on wait for it
            job.filling = True
            self._seal_batch()
            fut = self.loop.run_in_executor(None, PLATFORM.fill_body, job.fd.fileno(), body)
            fut.add_done_callback(functools.partial(self._body_filled, job))
        else:
            try:
                PLATFORM.fill_body(job.fd.fileno(), body)
            except OSError as exc:
                job.close()
                for f in fds:
                    f.close()
                raise body_error(n, exc) from exc
        self.oob_queued += n
        self.backlog += n  # until its batch starts going
        fds = [*fds, job]
        marker = oob_body_marker(n)
        head = encode_msg_header(ev.port, ev.seq, ev.kind, F_OOB, ev.ports, len(fds), len(marker))
        self._add(head + marker, fds)

    def _folder_for_bodies(self) -> Path | None:
        """Where this link makes file bodies (None: the platform needs no folder)."""
        if PLATFORM.oob != "file":
            return None
        if self._body_folder is None:
            try:
                root = self._body_root if self._body_root is not None else runtime_root()
                self._body_folder = body_directory(root)
            except (MeshError, OSError) as exc:
                raise MessageError(f"no private folder for the bodies of large messages: {exc}") from exc
        return self._body_folder

    def _body_filled(self, job: _Body, fut: asyncio.Future[None]) -> None:
        """A worker thread finished writing ``job`` (on the loop)."""
        job.filling = False
        exc = None if fut.cancelled() else fut.exception()
        if job.closed or self.closed:
            job.fd.close()
            return
        if fut.cancelled() or exc is not None:
            # its message has its sequence number: the stream cannot go on
            # without it, so the link (and what depends on it) fails, with the cause
            log.warning("could not make a large message's body for node %s: %s", NodeId(self.peer), exc)
            self._lost(str(body_error(job.size, OSError(str(exc or "cancelled")))))
            return
        if self._waiting_body is job:
            self._waiting_body = None
            self._write_batches()

    def write_data(self, port: bytes, seq: int, kind: int, body: bytes) -> None:
        """A plain message (no ports, no fds): the hot path of ``write_event``,
        the one Python frame between the engine and the socket (the frame is
        packed here, not by ``_wire.data_frame``, and a lone message is sent
        here)."""
        n = len(body)
        if n >= SEPARATE_BODY_MIN or self.closed or type(body) is FD_BODY:
            if type(body) is FD_BODY:
                self._write_fds(port, seq, kind, cast(FdBody, body))
            else:
                self.write_event(MsgEvent(port, seq, kind, 0, [], 0, body), [])
            return
        frame = _pack_data_head(n + DATA_HEAD_LEN, T_MSG, port, seq, kind, 0, 0, 0) + body
        self.frames_out += 1
        if not self._flush_scheduled:
            if not (self._streaming or self._batches or self._writing or self._in_read_batch):
                now = _monotonic()
                if now - self._last_immediate >= BURST_GAP:
                    # nothing queued, no stream going, nothing sent just now:
                    # out at once, no loop turn (a call's request or reply)
                    self._last_immediate = now
                    try:
                        sent = self.sock.send(frame)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError as exc:
                        self._send_failed(exc)
                        return
                    self.writes += 1
                    self.bytes_out += sent
                    if sent < len(frame):
                        self._send_rest(frame, sent)
                    return
            # a burst: this and what follows in the turn go out in one write
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)
        self._chunks.append(frame)

    def _write_fds(self, port: bytes, seq: int, kind: int, body: FdBody) -> None:
        """A message of fds and plain values (``Codec.encode_with_fds``): its
        ``Fd``s are taken over here and go with the turn's batch."""
        mine = body.fds
        fds = [Fd._take(mine[0])] if len(mine) == 1 else body.take()  # (a lone fd: no comprehension)
        raw = body.body
        if len(raw) >= SEPARATE_BODY_MIN or self.closed:
            self.write_event(MsgEvent(port, seq, kind, 0, [], len(fds), raw), fds)
            return
        self._add(fd_frame(port, seq, kind, len(fds), raw), fds)

    def _send_failed(self, exc: OSError) -> None:
        # not from here: this runs inside a send (or the engine's own
        # processing), which must not see the peer fail under it
        self.loop.call_soon(self._drain_then_lose, f"write failed: {exc}")

    def _send_rest(self, data: bytes, n: int) -> None:
        """The socket took ``n`` bytes of ``data`` written at once: the rest
        waits for room, and what follows queues behind it."""
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
            if fds and self._body_not_ready(fds):
                return
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
                    if type(f) is _Body:
                        self.oob_queued -= f.size
                        self.backlog -= f.size
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

    def _body_not_ready(self, fds: list[Any]) -> bool:
        """Whether a body in ``fds`` is still being filled: then this batch
        and everything behind it wait (``_body_filled`` writes them)."""
        for f in fds:
            if type(f) is _Body and f.filling:
                self._waiting_body = f
                self._writing = True
                if self._watching_writable:  # the socket has room: it would wake us for nothing
                    self._watching_writable = False
                    self.loop.remove_writer(self.sock.fileno())
                return True
        return False

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
            if self.closed or self._body_reading:
                break
            if not self._read_once():
                break
        if self._body_reading:  # the rest is read once that body is delivered
            self._lose_after = reason
            return
        self._lost(reason)

    def _on_readable(self) -> None:
        # _read_once, inlined (a frame per read)
        reads = self._reads
        shared = not reads.busy  # (re-entered from a callback: a buffer of its own)
        self._in_read_batch = reads.busy = True
        try:
            self._read_into(reads.view if shared else memoryview(bytearray(READ_SIZE)))
        finally:
            self._in_read_batch = False
            if shared:
                reads.busy = False
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
                        arr.frombytes(data[: len(data) - (len(data) % FD_SIZE)])
                        arrived.extend(map(Fd, arr))
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
                self._lost(PEER_CLOSED)
                return False
            self.bytes_in += n
            self._decoder.feed_each(buf[:n], self._on_data, self._deliver_event, self._on_run)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return False
        return not self._body_reading

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("dropping connection to node %s: protocol error: %s", NodeId(self.peer), exc)
        self._lost(f"protocol error: {exc}")

    def _deliver_event(self, ev: Event) -> bool:
        """Hand ``ev`` to the node; True (stop decoding) when its body is
        being read in a thread (``_body_read`` goes on)."""
        fds: list[Any] = []
        if isinstance(ev, MsgEvent):
            if ev.nfds:
                if ev.nfds > len(self._received_fds):
                    raise ProtocolError("frame claims descriptors that did not arrive")
                take = self._received_fds.popleft
                fds = [take()] if ev.nfds == 1 else [take() for _ in range(ev.nfds)]
            if ev.flags & F_OOB:
                length = oob_body_length(ev.body)
                mapped = _map_body(fds[-1], length)
                if mapped is not None:  # no copy, no thread
                    fds.pop()
                    self.bodies_mapped += 1
                    ev.body = mapped
                    ev.nfds -= 1
                    ev.flags = 0
                elif length >= THREAD_BODY_MIN:
                    self.bodies_copied += 1
                    # no frame after this one is handed over, and nothing more
                    # is read from the socket, until the body is read
                    self._body_reading = True
                    self.loop.remove_reader(self.sock.fileno())
                    fut = self.loop.run_in_executor(None, _read_body, fds.pop(), length)
                    fut.add_done_callback(functools.partial(self._body_read, ev, fds))
                    return True
                else:
                    self.bodies_copied += 1
                    ev.body = _read_body(fds.pop(), length)
                    ev.nfds -= 1
                    ev.flags = 0
        self._on_event(self.peer, ev, fds)
        return False

    def _body_read(self, ev: MsgEvent, fds: list[Any], fut: asyncio.Future[bytes]) -> None:
        """A worker thread read ``ev``'s body (on the loop): deliver it, go on
        with the frames received behind it, then read the socket again."""
        self._body_reading = False
        if self.closed or fut.cancelled():
            for f in fds:
                f.close()
            self._lost("reading an out-of-band body was cancelled")  # nothing if closed
            return
        try:
            ev.body = fut.result()
            ev.nfds -= 1
            ev.flags = 0
            self._on_event(self.peer, ev, fds)
            self._in_read_batch = True
            try:
                self._decoder.feed_each(b"", self._on_data, self._deliver_event, self._on_run)
            finally:
                self._in_read_batch = False
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        except MemoryError:
            self._lost("no memory to read an out-of-band body")
            return
        except BaseException as exc:
            # as if raised from a read (the decoder is spent): never left paused
            self._lost(f"failed to deliver a frame: {exc!r}")
            raise
        if self.closed or self._body_reading:
            return
        if self._flush_scheduled:
            self.flush()
        if self._lose_after is not None:
            self._drain_then_lose(self._lose_after)
            return
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

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
        for fd_ in self._received_fds:
            fd_.close()
        self._received_fds.clear()
        for _, fds in self._batches:
            for f in fds:
                f.close()
        for f in self._batch_fds:
            f.close()
        self._batches.clear()
        self._chunks = []
        self._batch_fds = []
        self._waiting_body = None
        self.oob_queued = 0
        self.backlog = 0
        self._wake_backlog()
