"""Where meshes live on disk: the runtime folder, every path inside it, and
the name locks.

Layout, for the runtime folder ``<root>`` (``runtime_location``)::

    <root>/mesh-<name>.lock        the name's lock (held while the mesh lives)
    <root>/mesh-<name>/            the mesh directory, mode 0700
    <root>/mesh-<name>/<12 hex>    a node's socket (``node_path``)
    <root>/mesh-<name>/listen.sock the listener (``LISTENER_NAME``)
    <root>/bodies/                 out-of-band body files while they are
                                   made (``body_directory``; file-body
                                   platforms only), mode 0700

Every ``mesh-…`` path is built here and nowhere else. Nothing here opens a
socket; the only I/O is on the file system (folders, lock files,
``/proc/locks``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ._errors import MeshError, MeshNameInUse, SocketPathTooLong
from ._platform import MAX_SOCKET_NAME, MAX_SOCKET_PATH, PLATFORM

log = logging.getLogger("meshipc")

#: A mesh name: 1-64 letters, digits, ``.``, ``_`` or ``-``, not starting
#: with a punctuation mark (so it is never a hidden or relative path).
NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: File name of a mesh's listener socket, in its directory (``connect(name)`` looks there).
LISTENER_NAME: Final = "listen.sock"
#: Hex digits of a node id that name its socket: 48 bits of a random id,
#: short so that any mesh name fits an AF_UNIX address.
NODE_SOCKET_HEX: Final = 12

#: Folder under the runtime root where file bodies are made (each is
#: unlinked at once): private, unlike the system's temporary folder.
BODY_FOLDER: Final = "bodies"
#: the folder in a mesh directory holding its TLS keys and grants (``_tls``)
TLS_FOLDER: Final = "tls"

_PREFIX: Final = "mesh-"
_LOCK_SUFFIX: Final = ".lock"
#: Mesh names up to this long name their directory verbatim (``mesh-<name>``).
VERBATIM_NAME: Final = 40
#: Characters of a longer mesh name kept in its directory name, before
#: ``~`` and ``_DIGEST_HEX`` hex digits of the name's SHA-256 (``~`` is not
#: in a name, so no verbatim name can look like a cut one).
_CUT_NAME: Final = 23
_DIGEST_HEX: Final = 16
#: Longest mesh directory name, whatever the mesh name's length.
MAX_DIRECTORY_NAME: Final = len(_PREFIX) + VERBATIM_NAME
#: Longest runtime root with room for every mesh name: ``<root>/<mesh
#: directory>/<socket>`` stays within ``MAX_SOCKET_PATH`` (41 bytes; the
#: default roots, ``/run/user/<uid>`` and ``/tmp/meshipc-<uid>``, are at
#: most 23).
MAX_ROOT_FOR_ANY_NAME: Final = MAX_SOCKET_PATH - (1 + MAX_DIRECTORY_NAME + 1 + MAX_SOCKET_NAME)
#: Times ``claim_name`` retries when the lock file it locked was replaced
#: under it (its owner removed it as it closed); a real race ends in one.
_CLAIM_ATTEMPTS: Final = 100
#: The environment variable naming the runtime folder (before
#: ``XDG_RUNTIME_DIR``): the way to point a service and its clients at the
#: same folder whatever session each starts from.
ENV_RUNTIME_DIR: Final = "MESHIPC_RUNTIME_DIR"
#: What ``not_running_reason`` says when the mesh runs in another runtime folder.
RUNS_ELSEWHERE: Final = "but one runs in"
#: ``runtime_location``'s reason for a folder the caller chose.
GIVEN: Final = "given as runtime_dir"
_HOW_ELSEWHERE: Final = (
    f"set {ENV_RUNTIME_DIR} (or XDG_RUNTIME_DIR) to a private folder of yours (mode 0700), "
    "pass runtime_dir= or --runtime-dir"
)


# ------------------------------------------------------------ the runtime folder


def check_private_dir(path: Path) -> None:
    """Refuse a directory that is not ours alone (owner, mode 0700, no symlink)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise MeshError(f"{path} exists and is not a directory (refusing to use it)")
    if st.st_uid != os.getuid():
        raise MeshError(f"{path} is owned by uid {st.st_uid}, not by us (refusing to use it)")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise MeshError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}; a mesh directory must be 0700")


def runtime_location(runtime_dir: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """The folder holding this user's mesh directories, and why that one.

    The first of: ``runtime_dir`` if given (created 0700 if missing);
    ``$MESHIPC_RUNTIME_DIR``, ``$XDG_RUNTIME_DIR`` (never created); the login session's
    runtime folder ``/run/user/<uid>`` if it exists (what systemd and
    ``platformdirs`` use: a client started from cron, ssh or sudo finds a
    service started in a desktop or systemd session); else
    ``/tmp/meshipc-<uid>`` (created 0700). The folder must be a real
    directory owned by us with mode 0700; one that is not is refused with
    ``MeshError`` saying which folder and why, never silently replaced by
    another (a service and its clients must look in the same place)."""
    if runtime_dir is not None:
        return _made_private(Path(runtime_dir)), GIVEN
    env = os.environ.get(ENV_RUNTIME_DIR)
    if env:
        return _checked_env(ENV_RUNTIME_DIR, env), f"from {ENV_RUNTIME_DIR}"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return _checked_env("XDG_RUNTIME_DIR", xdg), "from XDG_RUNTIME_DIR"
    session = PLATFORM.session_runtime_dir()
    if session is not None and _is_private_dir(session):
        return session, "the login session's folder; XDG_RUNTIME_DIR is not set"
    root = PLATFORM.default_runtime_root()
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    try:
        check_private_dir(root)
    except MeshError as exc:
        raise MeshError(
            f"{exc}; someone else may have made it to block or watch your meshes: {_HOW_ELSEWHERE}"
        ) from None
    return root, "no runtime folder is set and no login session folder exists"


def _made_private(root: Path) -> Path:
    if not os.path.lexists(root):
        root.mkdir(mode=0o700, parents=True)
    check_private_dir(root)  # lstat: a symlink, dangling or not, is refused
    return root


def _checked_env(var: str, value: str) -> Path:
    """The runtime folder the environment variable ``var`` names, checked
    (never created: a mistyped path is an error, not a new folder);
    ``MeshError`` naming the variable and the fix otherwise."""
    root = Path(value)
    try:
        if not root.is_absolute():
            raise MeshError("it is not an absolute path")
        check_private_dir(root)
    except FileNotFoundError:
        raise MeshError(f"{var}={value} does not exist; {_HOW_ELSEWHERE}, or unset {var}") from None
    except (MeshError, OSError) as exc:
        why = f"{var}={value} cannot hold meshes: {exc}"
        raise MeshError(f"{why}; {_HOW_ELSEWHERE}, or unset {var}") from None
    return root


def _is_private_dir(path: Path) -> bool:
    try:
        check_private_dir(path)
    except (OSError, MeshError):
        return False
    return True


def other_runtime_roots(chosen: Path) -> list[Path]:
    """The runtime folders other than ``chosen`` that another process of
    this user may have picked in another environment: the ones the
    environment variables name, the login session's, the fallback."""
    seen: list[Path] = []
    for value in (os.environ.get(ENV_RUNTIME_DIR), os.environ.get("XDG_RUNTIME_DIR")):
        if value and os.path.isabs(value):
            seen.append(Path(value))
    session = PLATFORM.session_runtime_dir()
    if session is not None:
        seen.append(session)
    seen.append(PLATFORM.default_runtime_root())
    out: list[Path] = []
    for p in seen:
        if p != chosen and p not in out and _is_private_dir(p):
            out.append(p)
    return out


def runtime_root(runtime_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding this user's mesh directories (see ``runtime_location``)."""
    return runtime_location(runtime_dir)[0]


def body_directory(root: Path) -> Path:
    """``<root>/bodies``, created 0700 if missing; ``MeshError`` if it is
    not a private folder of ours (see ``check_private_dir``)."""
    folder = root / BODY_FOLDER
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    check_private_dir(folder)
    return folder


# ------------------------------------------------------------------ paths


def mesh_directory(root: Path, name: str) -> Path:
    """The directory of mesh ``name``: its name is at most
    ``MAX_DIRECTORY_NAME`` bytes whatever the mesh name's length."""
    if len(name) <= VERBATIM_NAME:
        return root / f"{_PREFIX}{name}"
    digest = hashlib.sha256(name.encode()).hexdigest()[:_DIGEST_HEX]
    return root / f"{_PREFIX}{name[:_CUT_NAME]}~{digest}"


def tls_directory(directory: Path) -> Path:
    """Where the mesh at ``directory`` keeps its TLS keys and grants
    (``TlsAuthority`` makes it 0700 and checks it)."""
    return directory / TLS_FOLDER


def lock_path(root: Path, name: str) -> Path:
    """The lock file of the mesh name ``name``."""
    return root / f"{_PREFIX}{name}{_LOCK_SUFFIX}"


def named_meshes(root: Path) -> list[str]:
    """The names that have a lock file under ``root`` (live or stale), sorted."""
    names = []
    for entry in sorted(os.listdir(root)):
        if entry.startswith(_PREFIX) and entry.endswith(_LOCK_SUFFIX):
            names.append(entry[len(_PREFIX) : -len(_LOCK_SUFFIX)])
    return names


def node_path(directory: Path, node: bytes) -> Path:
    """Where node ``node`` listens: the first 48 bits of its (random) id in
    hex, short so that any mesh name fits an AF_UNIX address; a clash is
    refused at bind and the handshake checks the whole id."""
    return directory / node.hex()[:NODE_SOCKET_HEX]


def listener_path(name_or_path: str | os.PathLike[str], runtime_dir: str | os.PathLike[str] | None) -> Path:
    """The listener socket ``connect`` goes to: a path (anything with a
    ``/``) as given, a mesh name's in its directory under the runtime folder."""
    s = os.fspath(name_or_path)
    if "/" in s:
        return Path(s)
    return mesh_directory(runtime_root(runtime_dir), s) / LISTENER_NAME


def check_socket_room(directory: Path) -> None:
    """Refuse (``SocketPathTooLong``) a mesh directory whose sockets' paths
    would exceed ``MAX_SOCKET_PATH``; checked before anything is created.
    Every socket of a mesh is ``<directory>/<name>`` with a name of at most
    ``MAX_SOCKET_NAME`` bytes (node sockets, the listener), so this one
    check bounds them all."""
    names = (node_path(directory, bytes(16)).name, LISTENER_NAME)
    longest = directory / max(names, key=len)
    n = len(os.fsencode(longest))
    if n > MAX_SOCKET_PATH:
        raise SocketPathTooLong(os.fspath(longest), n, MAX_SOCKET_PATH)


# ------------------------------------------------------------- name locks


def claim_name(root: Path, name: str, *, fresh: bool = True) -> tuple[Path, int]:
    """Take the name ``name`` under ``root``: returns the (fresh) mesh
    directory and the lock fd to hold while the mesh lives.

    A lock file held with ``flock`` tells a live mesh from a dead one: the
    kernel drops the lock when its process dies, whatever way it died. A mesh
    that closes cleanly removes the file while still holding the lock, so a
    lock taken here counts only if the path still names the locked file."""
    lock = lock_path(root, name)
    for _ in range(_CLAIM_ATTEMPTS):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MeshError(f"cannot open lock file {lock}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise MeshError(f"{lock} is not a regular file of ours (refusing to use it)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MeshNameInUse(f"a live mesh named {name!r} already runs (lock {lock})") from None
            try:
                current = os.stat(lock, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            if current is None or current.st_ino != st.st_ino or current.st_dev != st.st_dev:
                os.close(fd)  # its owner removed it as we locked it: take the new one
                continue
            directory = mesh_directory(root, name)
            if os.path.lexists(directory):
                check_private_dir(directory)  # anything not ours is refused, never deleted
                log.info("replacing stale directory %s of a dead mesh %r", directory, name)
                shutil.rmtree(directory)
            if fresh:
                directory.mkdir(mode=0o700)
            return directory, fd
        except BaseException:
            os.close(fd)
            raise
    raise MeshError(f"could not take the lock {lock}: it keeps changing")


def release_name(root: Path, name: str, fd: int) -> None:
    """Give the name back: remove the lock file, then drop the lock."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(root, name))
    os.close(fd)


def prune_stale(root: Path) -> list[str]:
    """Remove what dead named meshes left under ``root`` (lock file and
    directory); returns their names. A name is taken exactly as a new mesh
    would take it (its lock, then the inode check), so a live mesh, or one
    starting at that moment, is never touched; anything not ours is kept."""
    pruned = []
    for name in named_meshes(root):
        if not NAME.match(name):
            continue
        try:
            directory, fd = claim_name(root, name, fresh=False)
        except MeshError as exc:  # live, or not ours
            log.debug("prune: keeping %r: %s", name, exc)
            continue
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(directory)
        release_name(root, name, fd)
        pruned.append(name)
    return pruned


#: An unnamed mesh's directory (``mesh-`` + 16 hex, no lock file) is pruned
#: only when nothing in it changed for this many seconds and no socket in it
#: answers: a mesh being created has its folder a moment before its socket.
UNNAMED_GRACE: Final = 10.0
_UNNAMED: Final = re.compile(r"[0-9a-f]{16}")
_NODE_SOCKET: Final = re.compile(f"[0-9a-f]{{{NODE_SOCKET_HEX}}}")


def prune_unnamed(root: Path, alive: Callable[[Path], bool]) -> list[Path]:
    """Remove the directories of dead unnamed meshes under ``root``: ours
    (owned by us, a real directory, not a symlink), unchanged for
    ``UNNAMED_GRACE`` seconds, with no socket in them that ``alive``
    (``_sockets.is_socket_alive``) says answers. Returns what was removed."""
    removed = []
    uid = os.getuid()
    now = time.time()
    for entry in sorted(os.listdir(root)):
        if not entry.startswith(_PREFIX) or not _UNNAMED.fullmatch(entry[len(_PREFIX) :]):
            continue
        directory = root / entry
        try:
            st = os.lstat(directory)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or now - st.st_mtime < UNNAMED_GRACE:
                continue
            if os.path.lexists(root / f"{entry}{_LOCK_SUFFIX}"):
                continue  # a named mesh's
            socks = [directory / n for n in os.listdir(directory)]
            if any(stat.S_ISSOCK(os.lstat(p).st_mode) and alive(p) for p in socks):
                continue
        except OSError as exc:
            log.debug("prune: keeping %s: %s", directory, exc)
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def remove_dead_socket(directory: Path, node: bytes, alive: Callable[[Path], bool]) -> bool:
    """Unlink the socket node ``node`` left in its mesh ``directory`` if it
    no longer answers (``alive`` says no: its process died without removing
    it). Only a socket of ours named like a node's is touched; a live one
    never. Returns whether it was removed."""
    path = node_path(directory, node)
    if not _NODE_SOCKET.fullmatch(path.name):
        return False
    try:
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or alive(path):
            return False
        os.unlink(path)
    except OSError:
        return False
    return True


def lock_is_held(path: Path) -> bool | None:
    """Whether some process holds a ``flock`` on the file ``path`` (a live
    mesh holds its name's lock); ``None`` when that cannot be told. Reads
    ``/proc/locks`` instead of trying the lock, so that looking never makes
    a mesh starting at that moment fail to take its name."""
    try:
        st = os.stat(path, follow_symlinks=False)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; waiters are marked "->"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
            return True
    return False


def name_is_live(root: Path, name: str) -> bool:
    """Whether a live mesh holds the name ``name``: read from ``/proc/locks``
    (``lock_is_held``), because trying the lock could make a mesh starting at
    this moment believe its name is taken; where that cannot be read, by
    trying a shared lock."""
    lock = lock_path(root, name)
    held = lock_is_held(lock)
    if held is not None:
        return held
    fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def not_running_reason(root: Path, why: str, name: str) -> str:
    """Why nothing answers at the listener of mesh ``name``, for an error.
    A mesh of that name found in another runtime folder of ours (another
    process picked another one: a different environment) is named, with
    the way to point at it."""
    lock = lock_path(root, name)
    directory = mesh_directory(root, name)
    if lock_is_held(lock):
        return f"mesh {name!r} is running but not listening (no listener at {directory / LISTENER_NAME})"
    if not os.path.lexists(directory):
        others = other_runtime_roots(root) if why != GIVEN else []
        for other in others:
            if lock_is_held(lock_path(other, name)):
                return (
                    f"no mesh named {name!r} in the runtime folder {root} ({why}), {RUNS_ELSEWHERE} {other} "
                    f"(started in another environment): set {ENV_RUNTIME_DIR}={other} or pass "
                    f"--runtime-dir {other} (runtime_dir= in Python)"
                )
        also = f"; also looked in {', '.join(map(str, others))}" if others else ""
        return f"no mesh named {name!r} is running (runtime dir {root}, {why}{also})"
    stamps = []
    for p in (directory, lock, directory / LISTENER_NAME):
        with contextlib.suppress(OSError):
            stamps.append(os.lstat(p).st_mtime)
    if not stamps:
        return f"no mesh named {name!r} is running (runtime dir {root}, {why})"
    last = max(stamps)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last))
    return (
        f"mesh {name!r} is not running any more (stale since {since}; "
        "a new mesh of that name or `meshipc ls --prune` clears it)"
    )
