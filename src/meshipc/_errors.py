"""The meshipc exception tree, rooted at ``MeshError``.

This module's one job is the exceptions meshipc raises, with no logic.

Every exception that carries attributes defines ``__reduce__`` so it survives
pickling by code that reports errors across processes (for instance
``concurrent.futures``); meshipc itself never unpickles peer data.
"""

from __future__ import annotations

from typing import Any


class MeshError(Exception):
    """Root of every error meshipc raises."""


class ChannelClosed(MeshError):
    """Raised by ``recv``/``call`` when the other side closed normally, or when
    using an end that this process already closed or sent away."""


class PortFailed(MeshError):
    """Raised by ``recv``/``call`` when the other side is gone abnormally: it
    failed explicitly (``Port.fail``) or its node died. ``cause`` says why."""

    def __init__(self, cause: str = "peer failed") -> None:
        super().__init__(cause)
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.cause,))


class NodeFailure(PortFailed):
    """The node holding the peer died, or broke the protocol, or could not be
    reached. Raised where ``PortFailed`` is; ``node`` is its id (hex)."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"node {node[:12]} failed: {reason}")
        self.node = node
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.node, self.reason))


class LinkFailure(NodeFailure):
    """A boundary link (a gateway's byte stream to another mesh, see
    ``_gateway``) was lost: its stream ended or broke, heartbeats went
    unanswered past the bound, the far side broke the protocol, or it was
    closed. Every port crossing it fails with this; ``label`` names the link
    (``"ssh:host"``, ``"tls:1.2.3.4:5678"``), ``reason`` the cause. Messages in
    flight at that moment may or may not have been processed: the text says
    so. (An end in another process of the mesh, whose peer was a relay,
    gets the same text as a ``PortFailed``.)"""

    def __init__(self, label: str, reason: str) -> None:
        PortFailed.__init__(
            self,
            f"boundary link {label} failed: {reason} "
            "(messages in flight may or may not have been processed)",
        )
        self.node = label
        self.label = label
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.label, self.reason))


class RemoteError(MeshError):
    """Raised by ``Sender.call`` when the callee failed the call
    (``Call.fail`` or an exception in a served handler).

    When the remote error's type is a built-in exception (``ValueError``,
    ``KeyError``, ``OSError``...) or one registered with
    ``register_remote_error``, the error raised is also an instance of that
    type: ``except ValueError`` catches a ``ValueError`` raised in a worker,
    and ``except RemoteError`` still catches every remote failure. Only
    subclasses of ``Exception`` are mapped (never ``SystemExit``,
    ``KeyboardInterrupt`` or ``StopIteration``: a peer cannot make the caller
    exit or end a generator). The remote traceback is in ``traceback`` and
    shown once, as a note under the error (at most
    ``MAX_REMOTE_TRACEBACK_NOTE`` characters, its end kept)."""

    type_name: str
    message: str
    traceback: str

    def __new__(cls, type_name: str = "", message: str = "", traceback: str = "") -> RemoteError:
        if cls is RemoteError:
            cls = _remote_class(type_name)
        return _new_exception(cls)

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.args = (f"{type_name}: {message}",)  # also for OSError, which kept none
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        if traceback:
            note = traceback
            if len(note) > MAX_REMOTE_TRACEBACK_NOTE:
                note = "...\n" + note[-MAX_REMOTE_TRACEBACK_NOTE:]
            self.__notes__ = ["remote traceback:\n" + note.rstrip("\n")]

    def __str__(self) -> str:  # not the base type's (KeyError would repr it, OSError add an errno)
        return f"{self.type_name}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError, (self.type_name, self.message, self.traceback))


#: Longest remote traceback shown under a ``RemoteError`` (characters; the
#: rest stays in ``RemoteError.traceback``).
MAX_REMOTE_TRACEBACK_NOTE = 16 * 1024

#: Built-in exception types never mapped: they end generators or processes.
_NOT_MAPPED = (StopIteration, StopAsyncIteration)

#: Remote type name -> the local class its errors are raised as.
_remote_classes: dict[str, type[RemoteError]] = {}


def remote_type_name(cls: type[BaseException]) -> str:
    """The name a callee sends for an exception of type ``cls``: the bare
    name of a built-in or meshipc type (meshipc's own are never mapped back:
    a handler's ``ServiceNotFound`` is not the caller's), ``module.QualifiedName``
    for any other."""
    if cls.__module__ == "builtins" or cls.__module__.startswith("meshipc."):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _new_exception(cls: type[RemoteError]) -> RemoteError:
    # the base type's own constructor: OSError's refuses object.__new__-style
    # construction for its subclasses, and would read our arguments as an errno
    for base in cls.__mro__:
        if base is not RemoteError and "__new__" in vars(base):
            return base.__new__(cls)  # type: ignore[call-overload, no-any-return]
    return Exception.__new__(cls)


def _combine(base: type[Exception]) -> type[RemoteError]:
    """The class of remote errors of type ``base``: both ``RemoteError`` and ``base``."""
    name = f"Remote{base.__name__}"
    return type(name, (RemoteError, base), {"__module__": "meshipc", "__qualname__": name})


def _remote_class(type_name: str) -> type[RemoteError]:
    cls = _remote_classes.get(type_name)
    return cls if cls is not None else RemoteError


def register_remote_error(cls: type[Exception]) -> type[Exception]:
    """Raise remote errors of type ``cls`` as ``RemoteError`` instances that
    are also ``cls`` instances (``except cls`` catches them). ``cls`` must be
    importable under the same module and name on both sides (the callee sends
    ``remote_type_name(cls)``); its constructor is not called (the remote
    error's attributes are ``type_name``, ``message`` and ``traceback``).
    Usable as a class decorator; returns ``cls``. Raises ``TypeError`` for a
    class that is not an ``Exception`` subclass or cannot be combined."""
    if not (isinstance(cls, type) and issubclass(cls, Exception)) or issubclass(
        cls, (RemoteError, *_NOT_MAPPED)
    ):
        raise TypeError(f"register_remote_error takes an Exception subclass, got {cls!r}")
    combined = _combine(cls)
    combined("check", "check")  # TypeError now, not at the first remote error
    _remote_classes[remote_type_name(cls)] = combined
    return cls


def _register_builtins() -> None:
    import builtins

    made: dict[type[Exception], type[RemoteError]] = {}
    for value in vars(builtins).values():
        if not (isinstance(value, type) and issubclass(value, Exception)) or issubclass(value, _NOT_MAPPED):
            continue
        # a type whose constructor needs more than a message (UnicodeDecodeError)
        # is raised as its nearest base that takes one (UnicodeError)
        for base in value.__mro__:
            if base in made:
                _remote_classes[value.__qualname__] = made[base]
                break
            try:
                cls = _combine(base)
                cls("check", "check")
            except TypeError:
                continue
            made[base] = _remote_classes[value.__qualname__] = cls
            break


_register_builtins()


class ProtocolError(MeshError):
    """Malformed bytes from a peer. Raised by the wire decoder; the node that
    reads them drops that connection and keeps running."""


class MessageError(MeshError, ValueError):
    """A value that cannot travel: raised by ``send``/``call`` (in the caller,
    before anything is queued) for a value that cannot be encoded, is nested
    too deep or is too large; the channel stays usable. Messages from other
    processes that do not decode or validate are dropped and logged by the
    receiver instead (see ``Receiver.bad_messages``)."""


class BoundaryProtocolError(ProtocolError):
    """Malformed bytes on a boundary link (``_boundary``): the gateway drops
    that link (every port crossing it fails) and the node keeps running."""


class BoundaryVersionError(BoundaryProtocolError):
    """The far side of a boundary link speaks no protocol version we do; the
    message names both sides' meshipc versions and protocol ranges."""


class BufferFull(MeshError):
    """Raised by ``send`` when the port already holds its hard limit of
    messages or bytes that the receiver has not consumed
    (``Limits.max_messages``/``Limits.max_bytes``). Nothing was queued; a
    producer that awaits ``drain()`` never sees this."""


class HandshakeError(ProtocolError):
    """A node-to-node connection failed its handshake (wrong version, a
    certificate or signature that does not prove the claimed node, or
    unexpected peer uid). Logged by the accepting node."""


class PeerCredentialsError(HandshakeError, OSError):
    """The kernel's record of a socket peer's credentials could not be read
    or did not parse (wrong size, unknown version, group count out of
    range). The connection is refused."""


class DescriptorsTruncated(ProtocolError):
    """A read from a peer came with its descriptors cut short (the kernel
    set ``MSG_CTRUNC``). The descriptors that did arrive are closed and the
    connection dropped."""


class PlatformError(MeshError):
    """This system lacks something meshipc needs (for instance peer
    credentials on an unsupported system)."""


class SocketPathTooLong(MeshError):
    """A socket of the mesh would have a path longer than meshipc's budget
    (``limit`` bytes, below every supported system's AF_UNIX limit):
    raised by ``Mesh()`` before anything is created. ``path`` is the
    longest socket path, ``length`` its size in bytes."""

    def __init__(self, path: str, length: int, limit: int) -> None:
        super().__init__(
            f"socket path {path} would be {length} bytes, over the AF_UNIX limit of {limit}: "
            "use a shorter runtime folder (runtime_dir= or MESHIPC_RUNTIME_DIR)"
        )
        self.path = path
        self.length = length
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.length, self.limit))


class JoinError(MeshError):
    """A process could not join a mesh (base of the ``connect``/``join`` errors;
    raised itself for a failure while joining after the invitation was read)."""


class ConnectError(JoinError):
    """``connect`` could not reach the listener: no such path, refused, or
    permission denied. ``path`` is the address tried."""

    #: the OS error number of the failed connect, when there was one
    errno: int | None = None

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot connect to mesh listener {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


class InvitationReadError(JoinError):
    """``connect`` reached the listener, but the stream ended or broke before a
    whole invitation arrived."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"listener {path} closed before sending a whole invitation: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


class InvitationTooLarge(JoinError):
    """The listener announced an invitation longer than the cap
    (``length`` is the announced size)."""

    def __init__(self, path: str, length: int, limit: int) -> None:
        super().__init__(f"listener {path} announced a {length}-byte invitation (limit {limit})")
        self.path = path
        self.length = length
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.length, self.limit))


class InvitationDecodeError(JoinError):
    """The invitation bytes were not a valid invitation."""


class AuthenticationError(JoinError):
    """The listener runs as an unexpected uid, or the inviting node refused
    our credential (or could not prove its own)."""


class AccessFileError(JoinError):
    """``connect_tls``: the access file is missing, unreadable, readable by
    others, too large or malformed. ``path`` is the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"access file {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


class MeshNameInUse(JoinError):
    """``Mesh(name=...)``: a live mesh of this user already holds the name."""


class InvitationExpired(JoinError):
    """The invitation was already used, or expired before it was used."""


class VersionMismatch(JoinError, HandshakeError):
    """Two meshipc releases that speak no protocol version in common: the
    message names both ranges and what to upgrade ("the service speaks 2,
    this client 3: upgrade the service or use meshipc<0.2"). ``ours`` and
    ``theirs`` are the (lowest, highest) protocol versions of this process
    and of the peer. Raised by ``connect``/``join`` (a ``JoinError``); a link
    between two nodes refused for it is a ``HandshakeError``."""

    def __init__(self, message: str, ours: tuple[int, int], theirs: tuple[int, int]) -> None:
        super().__init__(message)
        self.ours = ours
        self.theirs = theirs

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.ours, self.theirs))


class JoinTimeout(JoinError, TimeoutError):
    """``connect``/``join``: the mesh did not answer in time (a stopped or
    overloaded service, a listener that never speaks). ``path`` is the socket
    that did not answer, ``timeout`` the bound in seconds."""

    def __init__(self, path: str, timeout: float) -> None:
        n = f"{timeout:g}" if isinstance(timeout, int | float) else timeout
        super().__init__(f"the mesh at {path} did not answer in time (timed out after {n} s)")
        self.path = path
        self.timeout = timeout

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.timeout))


class SpawnError(MeshError):
    """``Mesh.spawn``: the worker could not start ``target`` (module or
    function missing, an error while importing it, or the process died
    before starting it). ``reason`` says why; ``traceback`` is the worker's
    own traceback text when it had one (also attached as a note, so an
    uncaught ``SpawnError`` shows it once)."""

    def __init__(self, name: str, target: str, reason: str, traceback: str = "") -> None:
        super().__init__(f"worker {name!r} could not start {target!r}: {reason}")
        self.name = name
        self.target = target
        self.reason = reason
        self.traceback = traceback
        if traceback:
            self.add_note(f"traceback in the worker:\n{traceback.rstrip()}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.target, self.reason, self.traceback))


class RestartError(MeshError):
    """``Process.restart``: the worker did not hand its state over (it did
    not return within the deadline and was killed, raised, or exited
    first); also ``Process.error`` once crash restarts stopped at their
    limit. ``reason`` says why; ``__cause__`` is the worker's own error when
    it had one. (A successor that cannot start raises ``SpawnError``.)"""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"worker {name!r}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.reason))


# ------------------------------------------------------------------ control plane


class ServiceNotFound(MeshError, LookupError):
    """No live service of that name in the mesh (``service`` is the name)."""

    def __init__(self, service: str) -> None:
        super().__init__(f"no service named {service!r} in this mesh")
        self.service = service

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service,))


class ServiceNameInUse(MeshError):
    """``serve``: a live service of the mesh already has that name."""

    def __init__(self, service: str, node: str = "") -> None:
        where = f" (on node {node[:12]})" if node else ""
        super().__init__(f"a service named {service!r} is already registered{where}")
        self.service = service
        self.node = node

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service, self.node))


class ServiceBusy(MeshError):
    """The serving side is at one of its per-client bounds (``ControlLimits``)
    and refused this request instead of queueing it: try again later."""

    def __init__(self, what: str) -> None:
        super().__init__(f"busy: {what}")
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.what,))
