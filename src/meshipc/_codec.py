"""Message values <-> msgpack bytes, for messages that leave the process.

This module's one job is the codec: the msgspec encoders and decoders (and
their per-type caches), the extension types that carry resources inside a
message body (file descriptors here; port handles as registered by
``_channel`` through :func:`register_handle`), the per-thread resource
tables that collect a message's ports and fds while it is encoded or
decoded, and ``CODEC``, the :class:`_ports.Codec` the engine uses.

It names no handle class: a handle type registers how it is encoded (which
port states it gives up, what extension payload stands for it) and decoded
(which handle to build around received port states). It imports nothing
above ``_ports``, and no socket or event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import threading
import typing
from collections.abc import Callable
from typing import Any, Final, Literal, cast

import msgspec

from ._errors import ChannelClosed, MeshError, MessageError
from ._fd import Fd
from ._ids import ID_LEN, NodeId, PortId
from ._ports import Engine, Message, PortState
from ._trace import TRACING
from ._wire import (
    CALL_HEAD,
    MAX_FDS_PER_MESSAGE,
    MAX_OOB_BODY,
    OOB_THRESHOLD,
    THREAD_BODY_MIN,
    FdBody,
    Gather,
    bin_header,
)

#: Extension type code of a file descriptor inside a message body; handle
#: types register their own codes (``register_handle``). Part of the wire
#: format: never renumber.
EXT_FD: Final = 4

#: A resource reference inside an extension payload: an index into the
#: message's port or fd list.
_INDEX = struct.Struct("<I")
INDEX_SIZE: Final = _INDEX.size

#: Decoders built per message type; a process uses few types, so a small
#: cache keeps every decoder it needs without growing without bound.
DECODER_CACHE_SIZE: Final = 256
#: How deep ``walk_resources`` looks into a local value for handles and fds
#: (msgspec refuses deeper values anyway, with ``RecursionError``).
MAX_WALK_DEPTH: Final = 64

#: What a decoder raises for bytes that do not decode or validate.
DECODE_ERRORS: Final = (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError)

#: Values whose size is known without encoding them: one larger than
#: ``MAX_OOB_BODY`` is refused before any copy (msgspec cannot encode into
#: a buffer that stops at a limit, so a container is judged once encoded).
#: A ``str`` has at least as many bytes as characters.
_SIZED: Final = frozenset({bytes, bytearray, memoryview, str})

# which resource list a used index refers to
_PORTS: Final = 0
_FDS: Final = 1



class Failure(msgspec.Struct, array_like=True, frozen=True):
    """Why a call failed, as it travels (``K_REPLY_ERROR``, ``K_ERROR``): a
    msgpack array of the remote type's name (``_errors.remote_type_name``),
    its message and its traceback text; raised at the caller as
    ``RemoteError``."""

    type_name: str
    message: str
    traceback: str

class ResourceTables(threading.local):
    """The resources of the message being encoded or decoded on this thread.

    Encoding: ``engine`` (the engine the message leaves from), ``carrier``
    (the port it is sent on, which it must not contain), and the lists the
    message's ports and fds are collected into. Decoding: the received port
    states and fds, and which of them the body referred to (each at most
    once)."""

    def __init__(self) -> None:
        self.ports: list[PortState] = []
        self.fds: list[Any] = []
        self.engine: Engine | None = None
        self.carrier: PortState | None = None
        self.in_states: list[PortState] = []
        self.in_fds: list[Any] = []
        self.used: set[tuple[int, int]] = set()

    def add_ports(self, states: list[PortState]) -> list[int]:
        """Append port states leaving with the message; their indices."""
        first = len(self.ports)
        self.ports.extend(states)
        return list(range(first, len(self.ports)))

    def take_port(self, index: int) -> PortState:
        """The received port state at ``index`` (``MessageError`` if it is
        missing or was already referred to)."""
        return self.in_states[self._use(_PORTS, index, len(self.in_states))]

    def _use(self, kind: int, index: int, limit: int) -> int:
        if not 0 <= index < limit or (kind, index) in self.used:
            raise MessageError(f"message refers to resource {index} that is missing or used twice")
        self.used.add((kind, index))
        return index


_res = ResourceTables()


def pack_indices(indices: list[int]) -> bytes:
    """An extension payload naming resources by index."""
    return struct.pack(f"<{len(indices)}I", *indices)


def unpack_indices(data: memoryview, exactly_one: bool) -> tuple[int, ...]:
    """The indices of an extension payload (``MessageError`` if malformed)."""
    if (len(data) != INDEX_SIZE) if exactly_one else (len(data) % INDEX_SIZE):
        raise MessageError("bad port reference" if exactly_one else "bad receiver reference")
    return struct.unpack(f"<{len(data) // INDEX_SIZE}I", data)


@dataclasses.dataclass(frozen=True)
class HandleType:
    """How one handle class travels (see :func:`register_handle`)."""

    cls: type
    ext_code: int
    #: ``encode(handle, tables)``: give up the handle's port states into
    #: ``tables`` (``tables.add_ports``) and return the extension payload
    encode: Callable[[Any, ResourceTables], bytes]
    #: ``decode(payload, tables)``: the handle around ``tables.take_port(i)``
    decode: Callable[[memoryview, ResourceTables], Any]
    #: ``retype(handle, args)``: apply the receiving side's annotation (the
    #: ``T`` of a field typed ``Handle[T]``), which the wire does not carry
    retype: Callable[[Any, tuple[Any, ...]], None] | None
    #: ``detach(handle)``: take the handle's port states (to fail them)
    detach: Callable[[Any], list[PortState]]


_by_class: dict[type, HandleType] = {}
_by_code: dict[int, HandleType] = {}
#: what ``walk_resources`` collects: fds and every registered handle class
_resource_classes: tuple[type, ...] = (Fd,)
#: envelopes: a value with a trailing handle whose ports go last (an RPC
#: request and its reply port): class -> split(obj) -> (value, handle)
_envelopes: dict[type, Callable[[Any], tuple[Any, Any]]] = {}
#: class -> check(obj), called before an envelope is encoded (may raise)
_envelope_checks: dict[type, Callable[[Any], None]] = {}


def register_handle(
    cls: type,
    ext_code: int,
    encode: Callable[[Any, ResourceTables], bytes],
    decode: Callable[[memoryview, ResourceTables], Any],
    *,
    detach: Callable[[Any], list[PortState]],
    retype: Callable[[Any, tuple[Any, ...]], None] | None = None,
) -> None:
    """Teach the codec a handle class: instances inside a message value are
    encoded as extension ``ext_code`` and decoded back with ``decode``."""
    global _resource_classes
    if ext_code == EXT_FD or _by_code.get(ext_code, None) not in (None, _by_class.get(cls)):
        raise ValueError(f"extension type {ext_code} is taken")
    ht = HandleType(cls, ext_code, encode, decode, retype, detach)
    _by_class[cls] = ht
    _by_code[ext_code] = ht
    if cls not in _resource_classes:
        _resource_classes = (*_resource_classes, cls)


def register_envelope(
    cls: type, split: Callable[[Any], tuple[Any, Any]], check: Callable[[Any], None]
) -> None:
    """Teach the codec a value that carries one handle after its contents:
    ``split(obj)`` gives ``(value, handle)``; the value is the body and the
    handle's ports go after the value's own. ``check(obj)`` runs before one
    is encoded (and raises if it cannot go)."""
    _envelopes[cls] = split
    _envelope_checks[cls] = check


def _handle_type(obj: Any) -> HandleType | None:
    ht = _by_class.get(type(obj))
    if ht is None:
        for cls, t in _by_class.items():
            if isinstance(obj, cls):
                return t
    return ht


def _enc_hook(obj: Any) -> Any:
    ht = _handle_type(obj)
    if ht is not None:
        return msgspec.msgpack.Ext(ht.ext_code, ht.encode(obj, _res))
    if isinstance(obj, Fd):
        fds = _res.fds
        fds.append(Fd(obj.detach()))
        return msgspec.msgpack.Ext(EXT_FD, _INDEX.pack(len(fds) - 1))
    if isinstance(obj, (NodeId, PortId)):
        return bytes(obj)
    if isinstance(obj, BaseException):
        return f"{type(obj).__name__}: {obj}"
    raise NotImplementedError(f"cannot send objects of type {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
#: The body of a message that is one ``Fd`` and nothing else (the fd fast
#: path, issue 24: encoded and decoded without the extension hooks).
_LONE_FD: Final = _encoder.encode(msgspec.msgpack.Ext(EXT_FD, _INDEX.pack(0)))


# Values without ports or fds (the common case) need no per-message resource
# lists. The plain encoder's hook is only called for what msgspec cannot
# encode by itself (a handle, an fd, an unsupported type): it notes that the
# full encoder must judge (no exception on the hot path). Only the threads
# that drive engines use it, one encode at a time per thread; the note is a
# per-thread slot keyed by thread id: True (the full encoder must judge) or,
# while only ``Fd``s were met, the list of them (``encode_with_fds`` ships
# those without the full encoder; ``encode_plain`` leaves them to it).
_needs_full: dict[int, Literal[True] | list[Fd]] = {}
_get_ident = threading.get_ident
#: the extension payload of the i-th fd of a message, made once
_FD_REFS: Final = tuple(msgspec.msgpack.Ext(EXT_FD, _INDEX.pack(i)) for i in range(MAX_FDS_PER_MESSAGE))


def _plain_hook(obj: Any) -> Any:
    ident = _get_ident()
    if type(obj) is Fd:
        found = _needs_full.get(ident)
        if found is None:
            found = _needs_full[ident] = []
        if found is not True:
            i = len(found)
            if i < MAX_FDS_PER_MESSAGE and obj._fd >= 0 and all(f is not obj for f in found):
                found.append(obj)
                return _FD_REFS[i]
            # too many, closed, twice: the full encoder says what is wrong
        _needs_full[ident] = True
        return None
    _needs_full[ident] = True
    return None


_plain_encoder = msgspec.msgpack.Encoder(enc_hook=_plain_hook)


#: what msgspec raises for a value it cannot encode
ENCODE_ERRORS: Final = (TypeError, ValueError, OverflowError, NotImplementedError, RecursionError)


def refused(exc: BaseException) -> MeshError:
    """What a send raises for a value an encoder refused (``exc``): the one
    place an encoding error becomes a ``MessageError`` (ours pass as they
    are: a value too large, a port sent through itself)."""
    if isinstance(exc, MeshError):
        return exc
    what = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
    return MessageError(f"this value cannot be sent to another process: {what}")


def check_encodable(value: Any) -> None:
    """Raise ``MessageError`` for a value that has no handle or fd inside and
    that the encoder would still refuse (called where the real encode happens
    later, on another thread)."""
    if walk_resources(value):
        return
    try:  # no handle inside: the full encoder only says what it cannot take
        _encoder.encode(value)
    except ENCODE_ERRORS as exc:
        raise refused(exc) from None


def _known_size(obj: Any) -> int:
    """Bytes ``obj`` takes at least, for a type in ``_SIZED``."""
    return obj.nbytes if type(obj) is memoryview else len(obj)


def check_size(obj: Any) -> None:
    """``MessageError`` for a value whose known size exceeds ``MAX_OOB_BODY``
    (see ``_SIZED``), before anything is copied."""
    if type(obj) in _SIZED:
        n = _known_size(obj)
        if n > MAX_OOB_BODY:
            raise MessageError(f"a message of at least {n} bytes exceeds the limit of {MAX_OOB_BODY}")


def _ext_hook(code: int, data: memoryview) -> Any:
    ht = _by_code.get(code)
    if ht is not None:
        return ht.decode(data, _res)
    if code == EXT_FD:
        r = _res
        if len(data) != INDEX_SIZE:
            raise MessageError("bad fd reference")
        i = r._use(_FDS, _INDEX.unpack(data)[0], len(r.in_fds))
        fd = r.in_fds[i]
        r.in_fds[i] = None
        return fd
    raise MessageError(f"unknown extension type {code}")


def _dec_hook(tp: Any, obj: Any) -> Any:
    origin = typing.get_origin(tp) or tp
    if isinstance(origin, type) and isinstance(obj, origin):
        ht = _handle_type(obj)
        if ht is not None and ht.retype is not None:
            # the element type is not on the wire: the receiving side's
            # annotation (a field typed Receiver[Point]) says what to validate
            args = typing.get_args(tp)
            if args:
                ht.retype(obj, args)
        return obj
    if origin in (NodeId, PortId) and isinstance(obj, bytes) and len(obj) == ID_LEN:
        return origin(obj)
    raise msgspec.ValidationError(
        f"Expected `{getattr(origin, '__name__', origin)}`, got `{type(obj).__name__}`"
    )


@functools.lru_cache(maxsize=DECODER_CACHE_SIZE)
def _decoder(tp: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(tp, ext_hook=_ext_hook, dec_hook=_dec_hook)


def _no_resources(code: int, data: memoryview) -> Any:
    raise MessageError(f"message refers to a resource (extension type {code}) it does not carry")


@functools.lru_cache(maxsize=DECODER_CACHE_SIZE)
def plain_decoder(tp: Any) -> msgspec.msgpack.Decoder[Any]:
    """The decoder of ``tp`` values for messages without ports or fds."""
    return msgspec.msgpack.Decoder(tp, ext_hook=_no_resources, dec_hook=_dec_hook)


#: the plain decoder of any value (a call's reply: no cache lookup per call)
ANY_PLAIN_DECODER: Final = plain_decoder(Any)


def decode(msg: Message, tp: Any) -> Any:
    """The value of a message from another node, validated against ``tp``.

    Raises ``MessageError`` (the resources of the message are closed)."""
    body = msg.body if msg.body is not None else b""
    fds = msg.fds
    if not msg.ports:
        if not fds:
            try:
                return plain_decoder(tp).decode(body)
            except DECODE_ERRORS as exc:
                raise MessageError(f"invalid message: {exc}") from None
        if len(fds) == 1 and body == _LONE_FD and (tp is Any or tp is Fd):
            return fds[0]  # a lone fd (what _ext_hook gives, without msgspec and the hook)
    r = _res
    r.in_states = msg.ports or []
    r.in_fds = list(msg.fds or [])
    r.used = set()
    try:
        value = _decoder(tp).decode(body)
    except (*DECODE_ERRORS, struct.error) as exc:
        _close_unused(r.in_states, r.used)
        _close_fds(r.in_fds)
        raise MessageError(f"invalid message: {exc}") from None
    finally:
        states, fds = r.in_states, r.in_fds
        r.in_states, r.in_fds = [], []
    # anything the body did not refer to would leak otherwise
    _close_unused(states, r.used)
    _close_fds(fds)
    return value


def _close_unused(states: list[PortState], used: set[tuple[int, int]]) -> None:
    for i, st in enumerate(states):
        if (_PORTS, i) not in used:
            st.engine.close(st)


def _close_fds(fds: list[Any]) -> None:
    for fd in fds:
        if fd is not None:
            fd.close()


def walk_resources(obj: Any, _depth: int = 0) -> list[Any]:
    """Handles and fds inside a local message value."""
    out: list[Any] = []
    if _depth > MAX_WALK_DEPTH:
        return out
    if isinstance(obj, _resource_classes):
        out.append(obj)
    elif isinstance(obj, (str, bytes, int, float, bool, type(None))):
        pass
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for x in obj:
            out.extend(walk_resources(x, _depth + 1))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(walk_resources(k, _depth + 1))
            out.extend(walk_resources(v, _depth + 1))
    elif isinstance(obj, msgspec.Struct):
        for name in obj.__struct_fields__:
            out.extend(walk_resources(getattr(obj, name), _depth + 1))
    elif type(obj) in _envelopes:
        value, handle = _envelopes[type(obj)](obj)
        out.extend(walk_resources(value, _depth + 1))
        out.append(handle)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out.extend(walk_resources(getattr(obj, f.name), _depth + 1))
    return out


class MsgpackCodec:
    """Bridges message values and bytes for the engine (see ``_ports.Codec``)."""

    def encode(
        self, engine: Engine, obj: Any, carrier: PortState | None = None
    ) -> tuple[bytes, list[PortState], list[Any]]:
        r = _res
        check_size(obj)
        r.engine, r.ports, r.fds, r.carrier = engine, [], [], carrier
        try:
            if type(obj) is Fd:  # a lone fd: _enc_hook's work, without msgspec and the hook
                r.fds.append(Fd(obj.detach()))
                return _LONE_FD, r.ports, r.fds
            split = _envelopes.get(type(obj))
            if split is not None:
                # the contents first, then the trailing handle's ports (an RPC
                # request's reply port goes last, after the request's own)
                _envelope_checks[type(obj)](obj)
                value, handle = split(obj)
                body = _encoder.encode(value)
                _enc_hook(handle)
            else:
                body = _encoder.encode(obj)
            return body, r.ports, r.fds
        except BaseException as exc:
            # nothing leaves: close what was taken out of the value, re-raise
            for st in r.ports:
                st.engine.close(st)
            for fd in r.fds:
                fd.close()
            if isinstance(exc, ENCODE_ERRORS):
                raise refused(exc) from None
            raise
        finally:
            r.engine, r.ports, r.fds, r.carrier = None, [], [], None

    def encode_plain(self, obj: Any, fds: bool = False) -> bytes | None:
        """The bytes of a value without ports or fds; None if it has any (or
        a type only the full encoder can judge). ``MessageError`` for a value
        known to be too large (``check_size``), before any copy. A ``bytes``
        value of ``THREAD_BODY_MIN`` bytes or more is not copied: its body is
        a ``Gather`` (msgpack's header, then the value), which the link
        writes in a worker thread; it passes for bytes on the way there.

        ``fds``: a value of ``Fd``s and plain values is encoded too (the fd
        fast path, issue 24: the same one pass, no resource tables); its
        body is an ``FdBody``, which also passes for bytes as far as the
        link, and holds the ``Fd``s as they are: the link takes them over
        when it queues the frame. Only for a send on the engine's thread,
        where nothing runs between this and the link (elsewhere the ``Fd``s
        could be closed in between), and not once a trace context may be
        set (``TRACING``: the full encoder's frame carries it). A closed
        ``Fd``, the same one twice or more than ``MAX_FDS_PER_MESSAGE``
        still go to the full encoder, which says what is wrong."""
        t = type(obj)
        if t is Fd:
            # a lone fd: what the plain encoder would make, without msgspec
            if fds and obj._fd >= 0 and not TRACING[0]:
                return cast(bytes, FdBody(_LONE_FD, [obj]))
            return None
        if t in _SIZED and (obj.nbytes if t is memoryview else len(obj)) >= THREAD_BODY_MIN:
            check_size(obj)
            if type(obj) is bytes:
                return cast(bytes, Gather([bin_header(len(obj)), obj]))
        try:
            body = _plain_encoder.encode(obj)
        except BaseException:
            _needs_full.pop(_get_ident(), None)  # forget the note, then re-raise
            raise
        if _needs_full:
            found = _needs_full.pop(_get_ident(), None)
            if found:
                if fds and found is not True and not TRACING[0]:
                    return cast(bytes, FdBody(body, found))
                return None
        return body

    def encode_call(self, obj: Any) -> bytes | bytearray | None:
        """``encode_plain`` for an RPC request. A large request known to be
        large (a ``_SIZED`` value of ``OOB_THRESHOLD`` bytes or more) comes
        as a ``bytearray`` with ``CALL_HEAD`` bytes of room at its front,
        which ``Engine.call_plain`` fills with the call's head in place: the
        request is copied once (encoding), not twice. Smaller ones come as
        ``bytes`` (prepending their head costs less than making room)."""
        if type(obj) not in _SIZED or _known_size(obj) < OOB_THRESHOLD:
            return self.encode_plain(obj)
        check_size(obj)
        if type(obj) is bytes and len(obj) >= THREAD_BODY_MIN:  # not copied at all (see encode_plain)
            return cast(bytes, Gather([bytearray(CALL_HEAD), bin_header(len(obj)), obj]))
        buf = bytearray(CALL_HEAD)
        _plain_encoder.encode_into(obj, buf, CALL_HEAD)  # a sized value never needs the full encoder
        return buf

    def encode_error(self, exc: BaseException) -> bytes:
        return _encoder.encode(Failure("MessageError", f"message could not be encoded: {exc}", ""))

    def dispose(self, obj: Any, reason: str | None = None) -> None:
        for res in walk_resources(obj):
            ht = _handle_type(res) if reason is not None else None
            if ht is not None:
                for st in ht.detach(res):
                    st.engine.fail(st, reason or "")
            else:
                res.close()


CODEC: Final = MsgpackCodec()
#: a bound method, as the engine calls it (the hot path of every plain send)
encode_plain: Final = CODEC.encode_plain
encode_call: Final = CODEC.encode_call


def check_sendable(states: list[PortState], what: str) -> Engine:
    """For handle encoders: refuse a handle that holds the port the message
    is sent on, or one with no port left (closed or sent already); else the
    engine the message leaves from."""
    r = _res
    if r.carrier is not None and r.carrier in states:
        raise MessageError(f"a {what} cannot be sent through itself")
    if r.engine is None or not states:
        raise ChannelClosed(f"cannot send a closed or already sent {what}")
    return r.engine
