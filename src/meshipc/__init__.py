"""meshipc: a secure inter-process mesh for Python on Linux.

Typed channels and RPC between processes over Unix domain sockets, ports
that travel between processes, file descriptors passed with messages, worker
processes that join at spawn, and already-running processes that attach to a
running mesh at runtime. See README.md.
"""

import importlib

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs more than the rest
if TYPE_CHECKING:
    from typing import Any

    from . import sync
    from ._channel import Call, Port, Receiver, Sender, channel
    from ._control import Service, ServiceCall, ServiceNameInUse, ServiceNotFound, ServiceSender
    from ._errors import (
        AuthenticationError,
        BufferFull,
        ChannelClosed,
        ConnectError,
        HandshakeError,
        InvitationDecodeError,
        InvitationExpired,
        InvitationReadError,
        InvitationTooLarge,
        JoinError,
        JoinTimeout,
        MeshError,
        MeshNameInUse,
        MessageError,
        NodeFailure,
        PortFailed,
        ProtocolError,
        RemoteError,
        SpawnError,
    )
    from ._fd import Fd
    from ._ids import NodeId, PortId
    from ._invitation import ClientConnection, Connection, Invitation, Inviter, Listener, connect, join
    from ._loop import run
    from ._mesh import Mesh, current_mesh
    from ._node import PeerCred
    from ._ports import Limits
    from ._process import Process
del TYPE_CHECKING

# Public names are loaded on first use (module __getattr__, PEP 562), so
# ``import meshipc`` stays cheap for a command that does not need all of
# it; ``meshipc.sync`` is the blocking API, a submodule.
_LAZY: dict[str, str] = {
    "Call": "._channel",
    "Port": "._channel",
    "Receiver": "._channel",
    "Sender": "._channel",
    "channel": "._channel",
    "Service": "._control",
    "ServiceCall": "._control",
    "ServiceNameInUse": "._control",
    "ServiceNotFound": "._control",
    "ServiceSender": "._control",
    "AuthenticationError": "._errors",
    "BufferFull": "._errors",
    "ChannelClosed": "._errors",
    "ConnectError": "._errors",
    "HandshakeError": "._errors",
    "InvitationDecodeError": "._errors",
    "InvitationExpired": "._errors",
    "InvitationReadError": "._errors",
    "InvitationTooLarge": "._errors",
    "JoinError": "._errors",
    "JoinTimeout": "._errors",
    "MeshError": "._errors",
    "MeshNameInUse": "._errors",
    "MessageError": "._errors",
    "NodeFailure": "._errors",
    "PortFailed": "._errors",
    "ProtocolError": "._errors",
    "RemoteError": "._errors",
    "SpawnError": "._errors",
    "Fd": "._fd",
    "NodeId": "._ids",
    "PortId": "._ids",
    "ClientConnection": "._invitation",
    "Connection": "._invitation",
    "Invitation": "._invitation",
    "Inviter": "._invitation",
    "Listener": "._invitation",
    "connect": "._invitation",
    "join": "._invitation",
    "run": "._loop",
    "Mesh": "._mesh",
    "current_mesh": "._mesh",
    "PeerCred": "._node",
    "Limits": "._ports",
    "Process": "._process",
}

__version__ = "0.1.0"

__all__ = (
    "PeerCred",
    "join",
    "connect",
    "Listener",
    "Inviter",
    "Invitation",
    "Connection",
    "ClientConnection",
    "AuthenticationError",
    "BufferFull",
    "Limits",
    "Call",
    "ChannelClosed",
    "ConnectError",
    "Fd",
    "HandshakeError",
    "InvitationDecodeError",
    "InvitationExpired",
    "InvitationReadError",
    "InvitationTooLarge",
    "JoinError",
    "JoinTimeout",
    "Mesh",
    "MeshError",
    "MeshNameInUse",
    "MessageError",
    "NodeFailure",
    "NodeId",
    "Port",
    "PortFailed",
    "PortId",
    "Process",
    "ProtocolError",
    "Receiver",
    "RemoteError",
    "Sender",
    "SpawnError",
    "channel",
    "run",
    "current_mesh",
    "sync",
    "Service",
    "ServiceCall",
    "ServiceNameInUse",
    "ServiceNotFound",
    "ServiceSender",
)


def __getattr__(name: str) -> "Any":
    if name == "sync":
        return importlib.import_module(".sync", __name__)
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value  # next time without __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
