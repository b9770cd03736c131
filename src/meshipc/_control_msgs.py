"""The control plane's vocabulary: its bounds (``ControlLimits`` and the
constants), the checks every side makes (``check_timeout``,
``check_service_name``) and every record that crosses a link, as tagged
msgspec Structs: a session's ``Hello``/``Welcome``/``Redirect``, the
registry's requests *and its replies* (``RegistryReply``: no untyped dicts on
the wire), the root's questions to a node, a service request's deadline
envelope (``_Req``), and the records a node hands its control plane
(``WorkerStatus``) or returns (``ControlStatistics``).

A reply from the root is checked against its type where it arrives
(``as_reply``): a malformed one raises ``MessageError``, never reaches the
application as a half-valid value.

The work one client can make a service or the root do is bounded
(``ControlLimits``): calls a service runs at once, per client and in all;
inspect requests in progress, per client and in all; the timeouts and
deadlines a server grants. Timeouts are checked on both sides: the API
raises ``ValueError`` for a NaN, infinite or negative one; a server answers
a malformed one from a peer with ``ValueError``/``MessageError``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec

from ._channel import Port, Sender
from ._errors import MessageError
from ._handshake import CREDENTIAL_LEN

#: Seconds a node gets to open its control session (hello, maybe a redirect, welcome).
SESSION_TIMEOUT: Final = 10.0
#: Services of dead nodes remembered (to answer NodeFailure, not "unknown").
MAX_TOMBSTONES: Final = 256
#: Seconds after joining that a node starts its session with the root
#: (at once if it uses the control plane first).
SESSION_DELAY: Final = 0.05
#: Seconds a handler runs before a task starts watching for its caller to give up.
WATCH_AFTER: Final = 0.05
#: Seconds an inspect request waits for the root beyond its own timeout
#: (which bounds the root's fan-out to the nodes).
ROOT_GRACE: Final = 2.0
#: The port id at which every node's control plane takes a ``Hello``: never
#: a random port id (those are 16 random bytes), never held by an engine.
CONTROL_PORT: Final = b"meshipc:control\x00"
#: Hellos a node that is not the root holds while its own session opens (it
#: redirects them once it knows the root); more are refused. A node's
#: invitees say hello once each: this is many more than a node invites at once.
MAX_PENDING_REDIRECTS: Final = 64
#: A service name: 1-128 letters, digits, ``.``, ``_``, ``-``, ``:``, ``@``
#: or ``+``, not starting with punctuation but ``_`` (printable and shell-safe;
#: no ``/``, which separates inspect paths). Checked by ``serve`` and by the root.
SERVICE_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@+-]{0,127}")
MAX_SERVICE_NAME: Final = 128
#: Longest inspect path a peer may send (characters).
MAX_INSPECT_PATH: Final = 1024
#: Longest type name, process name or role a peer may send (characters).
MAX_LABEL: Final = 256
#: Longest reason (why a service's node is gone, why the root refused) in a
#: registry reply (characters): the root cuts its own to it, a longer one is malformed.
MAX_REASON: Final = 4096
#: Bytes of a service's withdrawal token.
TOKEN_LEN: Final = 16


@dataclass(frozen=True)
class ControlLimits:
    """Bounds on the work one client (one node) can make the control plane
    do, so that no client can starve the others or grow a node without
    bound. ``Mesh(control_limits=...)`` sets them for that node's services
    and, on the mesh's first node, for the root.

    A *client* is the node a call or request came from (its link's
    authenticated id). Raises ``ValueError`` for a bound below 1.
    """

    #: Handler calls one service runs at once (one task each). Beyond it the
    #: service stops reading its receiver: calls wait in its port queue and
    #: flow control pushes back on callers (``drain()`` waits, ``BufferFull``
    #: at the hard limit). 256: far above the concurrency a handler usually
    #: has a use for, far below the 50,000 tasks one client could start.
    service_calls: int = 256
    #: Handler calls of one client one service runs at once; its further calls
    #: wait, in order, in a queue of that client's (others are not held up by
    #: it). 32: one client cannot take more than an eighth of ``service_calls``.
    client_calls: int = 32
    #: Calls of one client waiting beyond ``client_calls`` in one service;
    #: further calls of that client are refused at once with ``ServiceBusy``
    #: (each waiting call holds its request: about a kilobyte).
    client_queued: int = 1024
    #: Inspect and update requests of one client in progress on the root.
    #: Beyond it the root stops reading that client's registry channel (its
    #: requests wait; flow control pushes back). 4: a tool rarely needs more.
    client_inspects: int = 4
    #: Inspect and update requests in progress on the root from all clients;
    #: beyond it a request is refused at once with ``ServiceBusy``. Each one
    #: asks every node: 64 bounds the fan-out to 64 requests per node.
    total_inspects: int = 64
    #: Longest inspect/update timeout the root and each node grant, seconds
    #: (a longer one is cut to it): nobody holds a request for an hour.
    max_inspect_timeout: float = 60.0
    #: Farthest call deadline a service grants, seconds from now (a farther
    #: one is cut to it). A call without a deadline has none.
    max_call_timeout: float = 24 * 3600.0

    def __post_init__(self) -> None:
        for f in ("service_calls", "client_calls", "client_queued", "client_inspects", "total_inspects"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ControlLimits.{f} must be an int >= 1, got {v!r}")
        for f in ("max_inspect_timeout", "max_call_timeout"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"ControlLimits.{f} must be a finite number > 0, got {v!r}")


DEFAULT_CONTROL_LIMITS: Final = ControlLimits()


def check_timeout(timeout: Any, what: str = "timeout") -> float:
    """``timeout`` as seconds; ``ValueError`` unless a finite number >= 0
    (NaN, infinities, negatives, booleans and non-numbers are refused)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"{what} must be a number of seconds, got {type(timeout).__name__}")
    try:
        t = float(timeout)
    except OverflowError:
        raise ValueError(f"{what} is out of range") from None
    if not 0.0 <= t < math.inf:  # also refuses NaN
        raise ValueError(f"{what} must be finite and >= 0, got {timeout!r}")
    return t


def check_service_name(name: Any) -> str:
    """``name`` if it is a valid service name, else ``ValueError``."""
    if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
        shown = repr(name[:40]) + "..." if isinstance(name, str) and len(name) > 40 else repr(name)
        raise ValueError(
            f"a service name is 1-{MAX_SERVICE_NAME} letters, digits, '.', '_', '-', ':', '@' or '+' "
            f"(not starting with punctuation other than '_'), got {shown}"
        )
    return name


# ------------------------------------------------------------------ messages

_ServiceName = Annotated[str, msgspec.Meta(pattern=f"^{SERVICE_NAME.pattern}$")]
_Label = Annotated[str, msgspec.Meta(max_length=MAX_LABEL)]
_Path = Annotated[str, msgspec.Meta(max_length=MAX_INSPECT_PATH)]
_Token = Annotated[bytes, msgspec.Meta(max_length=TOKEN_LEN)]
_NodeId = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
_HexId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
_Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON)]
_Credential = Annotated[bytes, msgspec.Meta(max_length=CREDENTIAL_LEN)]


class _Req(msgspec.Struct, array_like=True, tag="meshipc.req"):
    """A service request with its deadline (``time.monotonic()`` seconds)."""

    deadline: float | None
    request: Any


class _TracedReq(_Req, array_like=True, tag="meshipc.req"):
    """A service request made with a trace context (``_trace``): one more
    field, so that a request without one keeps its bytes."""

    trace: bytes


def envelope(deadline: float | None, request: Any, trace: bytes | None) -> _Req:
    """A service request's envelope: its deadline and, if any, trace context."""
    return _Req(deadline, request) if trace is None else _TracedReq(deadline, request, trace)


class Hello(msgspec.Struct, tag=True):
    """A node's first message to its inviter's ``CONTROL_PORT`` (final: the
    port it left goes with it). Who it comes from is the link's business."""

    session: Port
    ctl: Sender[Any]
    pid: int
    uid: int
    role: _Label
    name: _Label
    started: float


class Welcome(msgspec.Struct, tag=True):
    registry: Sender[Any]


class Redirect(msgspec.Struct, tag=True):
    """From a node that is not the root: say hello to ``root`` instead."""

    root: _NodeId


SessionMsg = Welcome | Redirect


class Register(msgspec.Struct, tag=True):
    name: _ServiceName
    token: _Token
    sender: Sender[Any]
    request_type: _Label | None = None
    reply_type: _Label | None = None


class Unregister(msgspec.Struct, tag=True):
    name: _ServiceName
    token: _Token


class Lookup(msgspec.Struct, tag=True):
    name: _ServiceName


class ListServices(msgspec.Struct, tag=True):
    pass


class Mint(msgspec.Struct, tag=True):
    """A worker asks the root for a new worker's credential (to spawn one):
    the root draws the id; only a node whose certificate says "worker" gets
    one."""


class InspectMesh(msgspec.Struct, tag=True):
    path: _Path = ""
    depth: int | None = None
    timeout: float = 1.0
    sensitive: bool = False


class UpdateMesh(msgspec.Struct, tag=True):
    path: _Path
    value: Any
    timeout: float = 1.0


RegistryMsg = Register | Unregister | Lookup | ListServices | Mint | InspectMesh | UpdateMesh


class InspectNode(msgspec.Struct, tag=True):
    path: _Path = ""
    depth: int | None = None
    sensitive: bool = False
    timeout: float = 1.0


class UpdateNode(msgspec.Struct, tag=True):
    name: _Label
    value: Any


NodeMsg = InspectNode | UpdateNode


# ------------------------------------------------------------------ registry replies


class Done(msgspec.Struct, tag=True):
    """A registration (or withdrawal) the root carried out."""


class NameInUse(msgspec.Struct, tag=True):
    """A registration refused: node ``node`` (hex id) serves the name."""

    node: _HexId


class Found(msgspec.Struct, tag=True):
    """A lookup's answer: a ``Sender`` to the service."""

    sender: Sender[Any]


class Gone(msgspec.Struct, tag=True):
    """A lookup's answer: the service's node (hex id) died, and why."""

    node: _HexId
    reason: _Reason


class NotFound(msgspec.Struct, tag=True):
    """A lookup's answer: no service of that name."""


class ServiceInfo(msgspec.Struct):
    """One service in the registry: its node (hex id), its request and reply
    type names, and since when (``time.time()``)."""

    node: _HexId
    request_type: _Label | None
    reply_type: _Label | None
    since: float


class ServiceList(msgspec.Struct, tag=True):
    services: dict[_ServiceName, ServiceInfo]


class Credential(msgspec.Struct, tag=True):
    """A new worker's credential (``Identity.to_bytes()``), issued by the root."""

    credential: _Credential


class Refused(msgspec.Struct, tag=True):
    """A request the root will not carry out, and why."""

    reason: _Reason


RegisterReply = Done | NameInUse
LookupReply = Found | Gone | NotFound
MintReply = Credential | Refused
RegistryReply = Done | NameInUse | Found | Gone | NotFound | ServiceList | Credential | Refused


def accept_objects(tp: Any, obj: Any) -> Any:
    """msgspec's ``dec_hook``: a value that is already an object of the
    wanted class (a handle a message carried) is taken as it is."""
    origin = getattr(tp, "__origin__", None) or tp
    if isinstance(origin, type) and isinstance(obj, origin):
        return obj
    raise msgspec.ValidationError(f"Expected `{getattr(origin, '__name__', origin)}`")


def as_reply(value: Any, tp: Any, what: str) -> Any:
    """The registry's reply ``value`` checked as ``tp`` (a reply Struct or a
    union of them): the root's own replies are the objects themselves, a
    remote root's arrive as plain data. ``MessageError`` for anything else
    (whatever handles it carried are closed)."""
    if isinstance(value, msgspec.Struct) and isinstance(value, _members(tp)):
        return value
    try:
        return msgspec.convert(value, tp, dec_hook=accept_objects)
    except (msgspec.ValidationError, TypeError) as exc:
        _close_handles(value)
        raise MessageError(f"the mesh root sent a malformed {what} reply: {exc}") from None


def _members(tp: Any) -> tuple[type, ...]:
    args = getattr(tp, "__args__", None)
    return tuple(args) if args else (tp,)


def _close_handles(value: Any) -> None:
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for v in items:
        if isinstance(v, (Port, Sender)):
            v.close()


# ------------------------------------------------------------------ records a node hands its control plane


class WorkerStatus(msgspec.Struct, frozen=True):
    """One worker of a node, as its inspect subtree shows it."""

    name: str
    pid: int
    #: its exit status, None while it runs
    returncode: int | None
    #: successors started so far (``Process.restarts``)
    restarts: int = 0
    #: the latest restarts (``Process.restart_events``): at, kind, pid, reason, delay
    events: tuple[dict[str, Any], ...] = ()
    #: its entry in the inspect tree, the same across restarts (default: name-pid)
    key: str = ""
    #: between two incarnations (a restart under way)
    restarting: bool = False

    @property
    def state(self) -> str:
        if self.returncode is not None:
            return "exited"
        return "restarting" if self.restarting else "running"


@dataclass(frozen=True)
class ControlStatistics:
    """A snapshot of a node's control plane (``Mesh.control_statistics()``).
    On nodes other than the root, only ``services_here`` is filled."""

    #: nodes with a session open with the root (hex ids; not the root's own)
    sessions: tuple[str, ...]
    #: inspect and update requests the root is running, in all and per session
    inspects: int
    inspects_by_session: dict[str, int]
    #: the registry: service name -> node serving it (hex id)
    registry: dict[str, str]
    #: services this node serves
    services_here: tuple[str, ...]
