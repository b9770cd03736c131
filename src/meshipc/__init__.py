"""meshipc: a secure inter-process mesh for Python on Linux.

Typed channels and RPC between processes over Unix domain sockets, ports
that travel between processes, file descriptors passed with messages, worker
processes that join at spawn, and already-running processes that attach to a
running mesh at runtime. See README.md.
"""

import importlib
import warnings

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs more than the rest
if TYPE_CHECKING:
    from typing import Any

    from . import sync
    from ._attach import Attaching, Attachment, connect, join
    from ._boundary import BoundaryLimits
    from ._carrier import Carrier, RemoteProcess, command, ssh
    from ._channel import Call, ChannelStatistics, Port, Receiver, Rpc, Sender, channel
    from ._child import restarting
    from ._control_msgs import ControlLimits, ControlStatistics
    from ._errors import (
        AccessFileError,
        AuthenticationError,
        BoundaryProtocolError,
        BoundaryVersionError,
        BufferFull,
        ChannelClosed,
        ConnectError,
        DescriptorsTruncated,
        HandshakeError,
        InvitationDecodeError,
        InvitationExpired,
        InvitationReadError,
        InvitationTooLarge,
        JoinError,
        JoinTimeout,
        LinkFailure,
        MeshError,
        MeshNameInUse,
        MessageError,
        NodeFailure,
        PeerCredentialsError,
        PlatformError,
        PortFailed,
        ProtocolError,
        RemoteError,
        RestartError,
        ServiceBusy,
        ServiceNameInUse,
        ServiceNotFound,
        SocketPathTooLong,
        SpawnError,
        VersionMismatch,
        register_remote_error,
    )
    from ._fd import Fd
    from ._gateway import Gateway, GatewayStats
    from ._ids import NodeId, PortId
    from ._invitation import Invitation, Inviter
    from ._listener import Admission, Listener
    from ._loop import run
    from ._mesh import Mesh, current_mesh
    from ._ports import Limits
    from ._process import Process, RestartPolicy
    from ._service import Service, ServiceCall, ServiceSender
    from ._sockets import PeerCred
    from ._tls import Grant
    from ._tlsclient import TlsAttachment, connect_tls
    from ._tlslisten import TlsListener
    from ._trace import Trace, current_trace, start_trace

    Connection = Admission
    ClientConnection = Attachment
del TYPE_CHECKING

# Public names are loaded on first use (module __getattr__, PEP 562), so
# ``import meshipc`` stays cheap for a command that does not need all of
# it; ``meshipc.sync`` is the blocking API, a submodule.
#: public name -> (module, attribute)
_LAZY: dict[str, tuple[str, str]] = {
    "Call": ("._channel", "Call"),
    "Rpc": ("._channel", "Rpc"),
    "Port": ("._channel", "Port"),
    "Receiver": ("._channel", "Receiver"),
    "Sender": ("._channel", "Sender"),
    "channel": ("._channel", "channel"),
    "Service": ("._service", "Service"),
    "ServiceCall": ("._service", "ServiceCall"),
    "ServiceBusy": ("._errors", "ServiceBusy"),
    "ServiceNameInUse": ("._errors", "ServiceNameInUse"),
    "ServiceNotFound": ("._errors", "ServiceNotFound"),
    "ServiceSender": ("._service", "ServiceSender"),
    "AuthenticationError": ("._errors", "AuthenticationError"),
    "BufferFull": ("._errors", "BufferFull"),
    "ChannelClosed": ("._errors", "ChannelClosed"),
    "ConnectError": ("._errors", "ConnectError"),
    "DescriptorsTruncated": ("._errors", "DescriptorsTruncated"),
    "HandshakeError": ("._errors", "HandshakeError"),
    "InvitationDecodeError": ("._errors", "InvitationDecodeError"),
    "InvitationExpired": ("._errors", "InvitationExpired"),
    "InvitationReadError": ("._errors", "InvitationReadError"),
    "InvitationTooLarge": ("._errors", "InvitationTooLarge"),
    "JoinError": ("._errors", "JoinError"),
    "JoinTimeout": ("._errors", "JoinTimeout"),
    "MeshError": ("._errors", "MeshError"),
    "MeshNameInUse": ("._errors", "MeshNameInUse"),
    "MessageError": ("._errors", "MessageError"),
    "VersionMismatch": ("._errors", "VersionMismatch"),
    "NodeFailure": ("._errors", "NodeFailure"),
    "PeerCredentialsError": ("._errors", "PeerCredentialsError"),
    "PlatformError": ("._errors", "PlatformError"),
    "PortFailed": ("._errors", "PortFailed"),
    "ProtocolError": ("._errors", "ProtocolError"),
    "RemoteError": ("._errors", "RemoteError"),
    "SocketPathTooLong": ("._errors", "SocketPathTooLong"),
    "SpawnError": ("._errors", "SpawnError"),
    "register_remote_error": ("._errors", "register_remote_error"),
    "Fd": ("._fd", "Fd"),
    "NodeId": ("._ids", "NodeId"),
    "PortId": ("._ids", "PortId"),
    "Invitation": ("._invitation", "Invitation"),
    "Inviter": ("._invitation", "Inviter"),
    "Attachment": ("._attach", "Attachment"),
    "Attaching": ("._attach", "Attaching"),
    "Admission": ("._listener", "Admission"),
    "Listener": ("._listener", "Listener"),
    "run": ("._loop", "run"),
    "Mesh": ("._mesh", "Mesh"),
    "connect": ("._attach", "connect"),
    "current_mesh": ("._mesh", "current_mesh"),
    "join": ("._attach", "join"),
    "Limits": ("._ports", "Limits"),
    "ControlLimits": ("._control_msgs", "ControlLimits"),
    "ControlStatistics": ("._control_msgs", "ControlStatistics"),
    "ChannelStatistics": ("._channel", "ChannelStatistics"),
    "Process": ("._process", "Process"),
    "RestartPolicy": ("._process", "RestartPolicy"),
    "RestartError": ("._errors", "RestartError"),
    "restarting": ("._child", "restarting"),
    "PeerCred": ("._sockets", "PeerCred"),
    "Trace": ("._trace", "Trace"),
    "current_trace": ("._trace", "current_trace"),
    "start_trace": ("._trace", "start_trace"),
    "Carrier": ("._carrier", "Carrier"),
    "RemoteProcess": ("._carrier", "RemoteProcess"),
    "command": ("._carrier", "command"),
    "ssh": ("._carrier", "ssh"),
    "BoundaryLimits": ("._boundary", "BoundaryLimits"),
    "BoundaryProtocolError": ("._errors", "BoundaryProtocolError"),
    "BoundaryVersionError": ("._errors", "BoundaryVersionError"),
    "LinkFailure": ("._errors", "LinkFailure"),
    "Gateway": ("._gateway", "Gateway"),
    "GatewayStats": ("._gateway", "GatewayStats"),
    "AccessFileError": ("._errors", "AccessFileError"),
    "Grant": ("._tls", "Grant"),
    "TlsAttachment": ("._tlsclient", "TlsAttachment"),
    "TlsListener": ("._tlslisten", "TlsListener"),
    "connect_tls": ("._tlsclient", "connect_tls"),
}

__version__ = "0.1.0"

__all__ = (
    "PeerCred",
    "join",
    "connect",
    "Listener",
    "Inviter",
    "Invitation",
    "Admission",
    "Attaching",
    "Attachment",
    "AuthenticationError",
    "BufferFull",
    "Limits",
    "ControlLimits",
    "ControlStatistics",
    "ChannelStatistics",
    "Call",
    "Rpc",
    "ChannelClosed",
    "ConnectError",
    "DescriptorsTruncated",
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
    "PeerCredentialsError",
    "PlatformError",
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
    "SocketPathTooLong",
    "SpawnError",
    "channel",
    "register_remote_error",
    "run",
    "current_mesh",
    "sync",
    "Service",
    "ServiceCall",
    "ServiceBusy",
    "ServiceNameInUse",
    "ServiceNotFound",
    "ServiceSender",
    "RestartError",
    "RestartPolicy",
    "restarting",
    "Trace",
    "current_trace",
    "start_trace",
    "VersionMismatch",
    "Carrier",
    "RemoteProcess",
    "command",
    "ssh",
    "BoundaryLimits",
    "BoundaryProtocolError",
    "BoundaryVersionError",
    "LinkFailure",
    "Gateway",
    "GatewayStats",
    "AccessFileError",
    "Grant",
    "TlsAttachment",
    "TlsListener",
    "connect_tls",
)


#: Earlier names, kept working until 1.0 with a ``DeprecationWarning``:
#: earlier name -> (module, name, the name to use).
_DEPRECATED = {
    "Connection": ("._listener", "Admission"),
    "ClientConnection": ("._attach", "Attachment"),
}


def __getattr__(name: str) -> "Any":
    if name in _DEPRECATED:
        module, new = _DEPRECATED[name]
        warnings.warn(
            f"meshipc.{name} is an earlier name of meshipc.{new}, removed in 1.0: use meshipc.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module, __name__), new)  # not cached: warns every time
    if name == "sync":
        return importlib.import_module(".sync", __name__)
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where[0], __name__), where[1])
    globals()[name] = value  # next time without __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
