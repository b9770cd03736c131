"""meshipc: a secure inter-process mesh for Python on Linux.

Typed channels and RPC between processes over Unix domain sockets, ports
that travel between processes, file descriptors passed with messages, worker
processes that join at spawn, and already-running processes that attach to a
running mesh at runtime. See README.md.
"""

from . import sync  # the blocking API: meshipc.sync.connect
from ._channel import Call, Port, Receiver, Sender, channel
from ._control import Service, ServiceCall, ServiceSender
from ._errors import (
    AuthenticationError,
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
    MeshError,
    MeshNameInUse,
    MessageError,
    NodeFailure,
    PeerCredentialsError,
    PlatformError,
    PortFailed,
    ProtocolError,
    RemoteError,
    ServiceNameInUse,
    ServiceNotFound,
    SocketPathTooLong,
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
    "run",
    "current_mesh",
    "sync",
    "Service",
    "ServiceCall",
    "ServiceNameInUse",
    "ServiceNotFound",
    "ServiceSender",
)
