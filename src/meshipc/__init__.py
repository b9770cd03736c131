"""meshipc: a secure inter-process mesh for Python on Linux.

Typed channels and RPC between processes over Unix domain sockets, ports
that travel between processes, file descriptors passed with messages, worker
processes that join at spawn, and already-running processes that attach to a
running mesh at runtime. See README.md.
"""

from . import sync  # the blocking API: meshipc.sync.connect
from ._channel import Call, Port, Receiver, Sender, channel
from ._control import Service, ServiceCall, ServiceNameInUse, ServiceNotFound, ServiceSender
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
    SocketPathTooLong,
    SpawnError,
)
from ._fd import Fd
from ._ids import NodeId, PortId
from ._invitation import Invitation, Inviter
from ._join import Attachment
from ._listener import Admission, Listener
from ._loop import run
from ._mesh import Mesh, connect, current_mesh, join
from ._ports import Limits
from ._process import Process
from ._sockets import PeerCred

#: Earlier names of ``Admission`` and ``Attachment``, kept for existing code.
Connection = Admission
ClientConnection = Attachment

__version__ = "0.1.0"

__all__ = (
    "PeerCred",
    "join",
    "connect",
    "Listener",
    "Inviter",
    "Invitation",
    "Admission",
    "Attachment",
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
