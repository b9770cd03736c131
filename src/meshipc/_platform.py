"""Every operating-system-specific call meshipc makes.

The rest of the package never tests ``sys.platform`` and never reads a
constant that only one system defines: it asks ``PLATFORM``, chosen once at
import by :func:`select`:

``Linux``
    ``SO_PEERCRED`` (pid, uid, gid), ``MSG_CMSG_CLOEXEC`` on every read,
    bodies of ``OOB_THRESHOLD`` bytes or more in a sealed memfd,
    ``PR_SET_PDEATHSIG``, exit watched through a pidfd, runtime root
    ``<tmp>/meshipc-<uid>``.
``MacOS``
    ``LOCAL_PEERCRED`` (``struct xucred``: uid, groups) and
    ``LOCAL_PEERPID``; close-on-exec set on each received descriptor; large
    bodies in an unlinked 0600 temporary file passed as a descriptor; the
    parent's death seen as end-of-file on a pipe only the parent writes to;
    ``EMSGSIZE``/``ENOBUFS`` from a ``sendmsg`` carrying descriptors means
    "the receiver's buffer is full, try later"; runtime root
    ``/tmp/meshipc-<uid>`` (``$TMPDIR`` is too long for socket paths).
``Portable`` (``MESHIPC_PORTABLE=1`` on Linux)
    the macOS code paths on a Linux kernel, so that they run in the test
    suite: everything as ``MacOS`` except where the kernel itself differs
    (credentials come from ``SO_PEERCRED``, through the same interface).

Everything a peer hands us here is untrusted: credential records are
length- and version-checked, body files are checked for type, size and
allocated blocks (a sparse file is refused before it costs a read) and
copied with ``pread`` (a file the sender truncates under us gives a short
read, never a fault). The one body that is mapped instead (``map_body``,
Linux) is a memfd sealed against writing, shrinking and growing: its bytes
cannot change under a decode and no access to the mapping can fault.

Making a body has two steps so that the slow one can leave the event loop:
``new_body`` (creating the descriptor: what fails on ``EMFILE``, a missing
or full folder) runs where the message is sent and raises ``MessageError``
with the cause; ``fill_body`` (the copy) may run in a worker thread: it only
calls ``write``, which releases the GIL.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from ._errors import MessageError, PeerCredentialsError, PlatformError, ProtocolError
from ._wire import OOB_THRESHOLD, Gather

#: Environment variable that selects the portable mode on Linux (``1``).
ENV_PORTABLE: Final = "MESHIPC_PORTABLE"

#: Budget for every AF_UNIX socket path meshipc binds or connects to, in
#: bytes: below Linux's 107 and macOS's 103 usable bytes of ``sun_path``.
MAX_SOCKET_PATH: Final = 100
#: Longest socket file name inside a mesh directory (node sockets are 12 hex
#: digits; ``listen.sock`` and ``control.sock`` are no longer).
MAX_SOCKET_NAME: Final = 12

# ---- macOS <sys/un.h>, <sys/ucred.h> (documented system interface)
SOL_LOCAL: Final = 0
LOCAL_PEERCRED: Final = 1
LOCAL_PEERPID: Final = 2
XUCRED_VERSION: Final = 0
XUCRED_NGROUPS: Final = 16
#: ``struct xucred {u_int cr_version; uid_t cr_uid; short cr_ngroups;
#: gid_t cr_groups[16];}`` (76 bytes: two bytes of padding after cr_ngroups)
XUCRED: Final = struct.Struct("=IIh2x16I")
_XUCRED_HEAD: Final = struct.Struct("=IIh2x")
_PID: Final = struct.Struct("=i")
_LINUX_CRED: Final = struct.Struct("=3i")

#: ``st_blocks`` counts 512-byte units on Linux and macOS, whatever the
#: file system's block size.
STAT_BLOCK: Final = 512
#: ``prctl`` options (<linux/prctl.h>)
PR_SET_DUMPABLE: Final = 4
PR_GET_DUMPABLE: Final = 3
#: Prefix of a body file's name while it exists (it is unlinked at once).
BODY_PREFIX: Final = "meshipc-body-"
#: Most received bodies mapped at once in this process (``Linux.map_body``):
#: each holds a descriptor and a memory area until the last view of it goes
#: (its message read and decoded). Beyond it bodies are copied, as files
#: are: a peer whose messages pile up unread cannot use up our descriptors.
MAX_MAPPED_BODIES: Final = 128


def parse_xucred(data: bytes) -> tuple[int, int]:
    """``(uid, gid)`` from a macOS ``struct xucred`` as ``LOCAL_PEERCRED``
    returns it; the gid is ``cr_groups[0]`` (the effective group), -1 when
    the record lists no group. Raises ``PeerCredentialsError`` for a record
    that is short, too long, of another version or with a bad group count."""
    if not _XUCRED_HEAD.size <= len(data) <= XUCRED.size:
        raise PeerCredentialsError(
            f"peer credentials record is {len(data)} bytes, expected {_XUCRED_HEAD.size}..{XUCRED.size}"
        )
    version, uid, ngroups = _XUCRED_HEAD.unpack_from(data)
    if version != XUCRED_VERSION:
        raise PeerCredentialsError(f"peer credentials record has version {version}, not {XUCRED_VERSION}")
    if not 0 <= ngroups <= XUCRED_NGROUPS:
        raise PeerCredentialsError(
            f"peer credentials record lists {ngroups} groups (at most {XUCRED_NGROUPS})"
        )
    if len(data) < _XUCRED_HEAD.size + 4 * ngroups:
        raise PeerCredentialsError(
            f"peer credentials record is cut short: {ngroups} groups in {len(data)} bytes"
        )
    gid: int = struct.unpack_from("=I", data, _XUCRED_HEAD.size)[0] if ngroups else -1
    return uid, gid


def parse_peerpid(data: bytes) -> int:
    """The pid from a macOS ``LOCAL_PEERPID`` answer (a ``pid_t``)."""
    if len(data) != _PID.size:
        raise PeerCredentialsError(f"peer pid record is {len(data)} bytes, expected {_PID.size}")
    pid: int = _PID.unpack(data)[0]
    if pid < 0:
        raise PeerCredentialsError(f"peer pid record says {pid}")
    return pid


class Platform:
    """The portable implementation; ``Linux`` and ``MacOS`` override what
    their kernels do better or differently."""

    #: short name, shown by ``meshipc`` and in logs
    name = "posix"
    #: flags for ``recvmsg``; 0 where received descriptors need
    #: ``adopt_received`` to become close-on-exec
    recv_flags = 0
    #: ``sendmsg`` errors that, with descriptors attached, mean "the
    #: receiver's buffer is full: retry later" rather than a broken peer
    fd_send_retry: frozenset[int] = frozenset({errno.EMSGSIZE, errno.ENOBUFS})
    #: how bodies of ``OOB_THRESHOLD`` bytes or more travel ("memfd" or "file")
    oob = "file"
    #: whether a spawned worker needs the parent-death pipe
    needs_parent_pipe = True
    #: folder holding ``meshipc-<uid>`` when no runtime folder is set or
    #: found (never ``$TMPDIR``: a service and its clients must agree
    #: whatever their environment)
    tmp_base: str = "/tmp"
    #: folder holding the per-login-session runtime folders (``<it>/<uid>``,
    #: made by systemd-logind); None where the system has none
    session_base: str | None = None

    # ------------------------------------------------------------ sockets

    def unix_socket(self) -> socket.socket:
        """A close-on-exec AF_UNIX stream socket (CPython makes every
        socket non-inheritable, atomically where the system can)."""
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def adopt_received(self, fds: Iterable[int]) -> None:
        """Make descriptors that just arrived close-on-exec (where
        ``recv_flags`` could not). A thread that forks and execs between the
        read and this call can leak them into its child; meshipc starts its
        own workers with ``close_fds``."""
        for fd in fds:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # not a valid descriptor: its user finds out

    def peer_cred(self, sock: socket.socket) -> tuple[int, int, int]:
        """``(pid, uid, gid)`` of the process at the other end of ``sock``
        (pid 0 where the kernel does not say)."""
        raise PlatformError(f"meshipc cannot read peer credentials on {sys.platform}")

    # ------------------------------------------------- out-of-band bodies

    def new_body(self, length: int, folder: Path | None = None) -> int:
        """A new, empty descriptor for a body of ``length`` bytes (the caller
        owns it): an unlinked 0600 file in ``folder`` (a private folder the
        caller made; default: the interpreter's temporary folder), refused
        at once if that file system has no room for ``length`` bytes.
        Raises ``MessageError`` naming the cause (``EMFILE``, a missing or
        full folder, ...)."""
        try:
            fd, path = tempfile.mkstemp(prefix=BODY_PREFIX, dir=folder)
        except OSError as exc:
            raise body_error(length, exc) from exc
        try:
            os.unlink(path)
            fs = os.fstatvfs(fd)
            if fs.f_bavail * fs.f_frsize < length:
                free = f"{fs.f_bavail * fs.f_frsize} bytes free in {folder or path}"
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {free}")
        except OSError as exc:
            os.close(fd)
            raise body_error(length, exc) from exc
        return fd

    def fill_body(self, fd: int, body: bytes | bytearray | memoryview | Gather) -> None:
        """Write ``body`` into a descriptor from ``new_body`` (and seal it
        where the kernel can). Only system calls that release the GIL: safe
        and useful in a worker thread. Raises ``OSError``."""
        _write_all(fd, body)

    def make_body(self, body: bytes | bytearray | memoryview | Gather, folder: Path | None = None) -> int:
        """``new_body`` and ``fill_body`` in one: a descriptor holding
        ``body`` (the caller owns it). Raises ``MessageError`` with the cause."""
        n = len(body) if isinstance(body, (Gather, bytes, bytearray)) else body.nbytes
        fd = self.new_body(n, folder)
        try:
            self.fill_body(fd, body)
        except OSError as exc:
            os.close(fd)
            raise body_error(n, exc) from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_body(self, fd: int, length: int) -> bytes:
        """The ``length`` bytes of a body descriptor from a peer (the caller
        closes it). ``ProtocolError`` unless it is a regular file of exactly
        that size whose blocks are allocated (a sparse file would cost us
        ``length`` bytes of zeros and the time to make them, for nothing on
        the sender's side); read with ``pread``, so a sender that changes
        the file meanwhile gets a short read refused, never a fault in this
        process. Only system calls that release the GIL after the checks."""
        try:
            check_body_file(fd, length)
            return _pread_all(fd, length)
        except OSError as exc:
            raise ProtocolError(f"unreadable out-of-band body: {exc}") from exc

    def map_body(self, fd: int, length: int) -> memoryview | None:
        """A read-only view of the ``length`` bytes of a body descriptor from
        a peer, without copying them, or None: the body must be read with
        ``read_body`` (here always: a file the sender can still change or
        shrink is never mapped)."""
        return None

    # ---------------------------------------------------------- key material

    def no_core_dumps(self) -> None:
        """Keep this process's memory (private keys, the root's signing key) out of core
        files: ``RLIMIT_CORE`` 0. Best effort: a system that refuses leaves
        the limit as it was."""
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (OSError, ValueError):
            pass

    # -------------------------------------------------------- processes

    def parent_pipe(self) -> tuple[int, int] | None:
        """``(read end, write end)`` of the parent-death pipe for a new
        worker, or None where the kernel tells the worker itself. The parent
        keeps the write end (close-on-exec, never written) until the worker
        exits; the worker gets the read end."""
        return os.pipe() if self.needs_parent_pipe else None

    def die_with_parent(self, watch_fd: int) -> None:
        """In a worker: SIGTERM ourselves when the parent dies. A daemon
        thread blocks in ``read`` on the pipe's read end (``watch_fd``),
        which ends with end-of-file when the last write end closes: when the
        parent exits, however it exits. No polling."""
        if watch_fd < 0:
            return
        os.set_inheritable(watch_fd, False)

        def watch() -> None:
            try:
                while os.read(watch_fd, 1):
                    pass  # the parent never writes; ignore it if it does
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="meshipc-parent-watch", daemon=True).start()

    def exit_fd(self, pid: int) -> int | None:
        """A descriptor that becomes readable when child ``pid`` exits, or
        None (the caller then waits in a thread)."""
        return None

    # ---------------------------------------------------- the runtime root

    def default_runtime_root(self) -> Path:
        """``/tmp/meshipc-<uid>``: where meshes live when no runtime folder
        is given, set or found (see ``_names.runtime_location``)."""
        return Path(self.tmp_base) / f"meshipc-{os.getuid()}"

    def session_runtime_dir(self) -> Path | None:
        """``/run/user/<uid>`` (what ``XDG_RUNTIME_DIR`` names in a login
        session) where the system has one, whether or not this process's
        environment says so (cron, ssh without a session, sudo); else None."""
        if self.session_base is None:
            return None
        return Path(self.session_base) / str(os.getuid())

    def tcp_liveness(self, sock: socket.socket, bound: float) -> None:
        """Make a TCP connection fail within about ``bound`` seconds once the
        peer stops answering: keepalive probes on an idle one (where the
        system lets us set their timing), ``TCP_USER_TIMEOUT`` on one with
        unacknowledged data (Linux)."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        idle = max(1, int(bound / 2))
        for opt, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, idle // 3)), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)

    def __repr__(self) -> str:
        return f"<meshipc platform {self.name}>"


class Linux(Platform):
    """Linux: the kernel does it (memfd, ``MSG_CMSG_CLOEXEC``, pdeathsig, pidfd)."""

    name = "linux"
    fd_send_retry: frozenset[int] = frozenset()
    oob = "memfd"
    needs_parent_pipe = False
    session_base: str | None = "/run/user"

    def __init__(self) -> None:
        import fcntl

        self.recv_flags = int(socket.MSG_CMSG_CLOEXEC)
        self._fcntl = fcntl
        self._seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL | fcntl.F_SEAL_GROW
        #: seals a body memfd from a peer must carry to be mapped rather than
        #: copied (``map_body``): no write (its bytes cannot change under a
        #: decode), no shrink (no ``SIGBUS`` reading the mapping), no growth
        self.map_seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        #: the mappings ``map_body`` made that are still alive (``MAX_MAPPED_BODIES``)
        self.mapped: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()
        # the page tables of a mapped body made in one call rather than a
        # fault per 64 KiB as it is decoded (measured: about 5% less CPU on receipt)
        self._map_flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

    def unix_socket(self) -> socket.socket:
        flags = socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        return socket.socket(socket.AF_UNIX, flags)

    def adopt_received(self, fds: Iterable[int]) -> None:
        pass  # MSG_CMSG_CLOEXEC did it atomically

    def peer_cred(self, sock: socket.socket) -> tuple[int, int, int]:
        return linux_peer_cred(sock)

    def tcp_liveness(self, sock: socket.socket, bound: float) -> None:
        super().tcp_liveness(sock, bound)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(bound * 1000)))

    def new_body(self, length: int, folder: Path | None = None) -> int:
        """A memfd (no disk behind it, no folder: ``folder`` is ignored; the
        receiver maps it once it is sealed: ``map_body``). Its memory is
        taken as it is written."""
        try:
            return os.memfd_create("meshipc-msg", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise body_error(length, exc) from exc

    def fill_body(self, fd: int, body: bytes | bytearray | memoryview | Gather) -> None:
        """Write, then seal: the receiver gets a file nobody can change."""
        _write_all(fd, body)
        self._fcntl.fcntl(fd, self._fcntl.F_ADD_SEALS, self._seals)

    def map_body(self, fd: int, length: int) -> memoryview | None:
        """A memfd sealed against writing, shrinking and growing (what
        ``fill_body`` makes) is mapped read-only instead of copied: its
        bytes cannot change under a decode and no access can fault (no
        ``SIGBUS`` from a shrink). The checks of ``read_body`` hold (size
        exactly ``length``, no holes: a sparse memfd would cost us pages
        the sender never paid for). None for anything else (a file body
        from a peer in portable mode, an unsealed or partly sealed memfd:
        ``read_body`` copies it), for a body under ``OOB_THRESHOLD`` (no
        meshipc sender makes one: a mapping would hold a descriptor and a
        memory area per tiny message), with ``MAX_MAPPED_BODIES`` mapped
        already, or when the mapping cannot be made (``EMFILE``,
        ``ENOMEM``: ``read_body`` says why if it fails too).
        ``ProtocolError`` for a sealed memfd that fails the checks.

        The view owns the mapping (it holds a duplicate of ``fd``, as a
        message carrying an fd does): it, and every view sliced from it or
        decoded out of it (a ``memoryview`` field, ``msgspec.Raw``), stays
        valid while referenced; the mapping goes with the last of them. The
        caller still closes ``fd``."""
        fcntl = self._fcntl
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            return None  # not a memfd
        if seals & self.map_seals != self.map_seals or length < OOB_THRESHOLD:
            return None
        if len(self.mapped) >= MAX_MAPPED_BODIES:
            return None
        try:
            check_body_file(fd, length)
        except OSError as exc:
            raise ProtocolError(f"unreadable out-of-band body: {exc}") from exc
        try:
            mapped = mmap.mmap(fd, length, flags=self._map_flags, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            return None
        self.mapped.add(mapped)
        return memoryview(mapped)

    def no_core_dumps(self) -> None:
        """``PR_SET_DUMPABLE`` 0: no core file, and no ``ptrace`` or
        ``/proc/<pid>`` access to this process's memory for other processes
        of our uid (a debugger needs ``CAP_SYS_PTRACE``). It lasts until the
        next ``exec``; ``RLIMIT_CORE`` 0 as well, should prctl be refused."""
        super().no_core_dumps()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def die_with_parent(self, watch_fd: int) -> None:
        """``PR_SET_PDEATHSIG``: the kernel sends SIGTERM when the parent dies."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        super().die_with_parent(watch_fd)

    def exit_fd(self, pid: int) -> int | None:
        try:
            return int(os.pidfd_open(pid))
        except (AttributeError, OSError):
            return None


def linux_peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """``SO_PEERCRED``: ``struct ucred {pid_t pid; uid_t uid; gid_t gid;}``."""
    opt = getattr(socket, "SO_PEERCRED", 17)
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, opt, _LINUX_CRED.size)
    except OSError as exc:
        raise PeerCredentialsError(f"no peer credentials: {exc}") from exc
    if len(data) != _LINUX_CRED.size:
        raise PeerCredentialsError(
            f"peer credentials record is {len(data)} bytes, expected {_LINUX_CRED.size}"
        )
    pid, uid, gid = _LINUX_CRED.unpack(data)
    return pid, uid, gid


class MacOS(Platform):
    """macOS: ``LOCAL_PEERCRED``/``LOCAL_PEERPID``, file bodies, the parent pipe."""

    name = "macos"

    def peer_cred(self, sock: socket.socket) -> tuple[int, int, int]:
        try:
            cred = sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, XUCRED.size)
            pid_data = sock.getsockopt(SOL_LOCAL, LOCAL_PEERPID, _PID.size)
        except OSError as exc:
            raise PeerCredentialsError(f"no peer credentials: {exc}") from exc
        uid, gid = parse_xucred(cred)
        return parse_peerpid(pid_data), uid, gid


class Portable(Platform):
    """The macOS code paths on Linux (``MESHIPC_PORTABLE=1``), so they are
    tested where the suite runs. Credentials still come from the kernel's
    only interface for them, ``SO_PEERCRED``."""

    name = "portable"

    def peer_cred(self, sock: socket.socket) -> tuple[int, int, int]:
        return linux_peer_cred(sock)


def select(system: str | None = None, environ: Mapping[str, str] | None = None) -> Platform:
    """The implementation for ``system`` (default ``sys.platform``) under
    ``environ`` (default ``os.environ``)."""
    system = sys.platform if system is None else system
    env: Mapping[str, Any] = os.environ if environ is None else environ
    if system.startswith("linux"):
        if env.get(ENV_PORTABLE, "").strip() == "1":
            return Portable()
        return Linux()
    if system == "darwin":
        return MacOS()
    return Platform()


def body_error(length: int, exc: OSError) -> MessageError:
    """What a send raises when a body cannot be made: ``MessageError`` with the cause."""
    return MessageError(f"could not make the out-of-band body of a {length}-byte message: {exc}")


def check_body_file(fd: int, length: int) -> None:
    """``ProtocolError`` unless ``fd`` (a body from a peer) is a regular
    file of exactly ``length`` bytes whose blocks are allocated (see
    ``Platform.read_body``). Raises ``OSError`` if it cannot be examined."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError("out-of-band body is not a regular file")
    if st.st_size != length:
        raise ProtocolError(f"out-of-band body is {st.st_size} bytes, frame said {length}")
    if st.st_blocks * STAT_BLOCK < length:
        used = st.st_blocks * STAT_BLOCK
        raise ProtocolError(f"out-of-band body is a sparse file ({used} of {length} bytes in use)")


def _write_all(fd: int, body: bytes | bytearray | memoryview | Gather) -> None:
    """Write every byte of ``body`` (a ``Gather``'s parts in one ``writev``,
    the caller's own buffers: nothing is copied in this process)."""
    views = [memoryview(p).cast("B") for p in (body.parts if isinstance(body, Gather) else (body,))]
    views = [v for v in views if v.nbytes]
    while views:
        n = os.writev(fd, views) if len(views) > 1 else os.write(fd, views[0])
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _pread_all(fd: int, length: int) -> bytes:
    data = os.pread(fd, length, 0)  # one allocation, nearly always one call
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        chunk = os.pread(fd, length - got, got)
        if not chunk:
            raise ProtocolError(f"out-of-band body ended after {got} of {length} bytes")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


#: The implementation this process uses.
PLATFORM: Final[Platform] = select()
