"""``connect_tls``: attach to a mesh on another host through its TLS
listener, with an access file that ``TlsListener.grant`` wrote.

This process starts a private ``Mesh`` of its own, opens the TLS connection
(``_tls.open_tls``: TLS 1.3, our grant's certificate, the server's pin
checked) and a boundary link (``Gateway``) over it, whose first port talks
to the far side's ``FarServer``. The result is a ``TlsAttachment``: the
same control-plane methods as ``connect(name)`` gives.
"""

from __future__ import annotations

import os

from ._attach import Attaching, Attachment
from ._boundary import BoundaryLimits
from ._channel import Port
from ._control import Control
from ._far import FarPlane, plane_of
from ._gateway import Gateway
from ._join import JOIN_TIMEOUT
from ._mesh import Mesh
from ._tls import TCP_TIMEOUT, open_tls, read_access

__all__ = ("TlsAttachment", "connect_tls")


class TlsAttachment(Attachment):
    """This process attached to a mesh on another host over TLS: the
    control-plane methods (``services``, ``call``, ``open``, ``inspect``,
    ``inspect_update``) act on the far mesh; ``mesh`` is this process's own
    private mesh (its gateway's node); ``gateway`` is the link. There is no
    admission port: ``port``'s peer is closed. When the link is lost, calls
    in progress and ports that crossed fail with ``NodeFailure`` naming the
    link (``tls:host:port``)."""

    __slots__ = ("_far", "gateway")

    def __init__(self, mesh: Mesh, gateway: Gateway, far: FarPlane) -> None:
        port, other = Port.pair()
        other.close()
        super().__init__(port, mesh)
        self.gateway = gateway
        self._far = far

    def _plane(self) -> Control:
        return plane_of(self._far)

    async def aclose(self) -> None:
        """Close the link (GOODBYE) and this process's private mesh. Safe to call twice."""
        if self._closed:
            return
        self._far.close()
        try:
            await self.gateway.aclose()
        finally:
            await super().aclose()

    def __repr__(self) -> str:
        return f"<TlsAttachment {self.gateway.label}>"


def connect_tls(
    path: str | os.PathLike[str],
    *,
    timeout: float | None = JOIN_TIMEOUT,
    limits: BoundaryLimits | None = None,
    tcp_timeout: float = TCP_TIMEOUT,
    runtime_dir: str | os.PathLike[str] | None = None,
) -> Attaching:
    """Attach to a mesh on another host with the access file at ``path``:
    ``async with meshipc.connect_tls(path) as conn`` or ``conn = await
    meshipc.connect_tls(path)``. ``timeout`` bounds the TCP connect, the
    TLS handshake and the link's HELLO (default 10 s); ``tcp_timeout``
    bounds how long unacknowledged data may wait before the connection is
    declared dead. Raises ``AccessFileError`` (missing, readable by others,
    malformed), ``ConnectError`` (TCP), ``AuthenticationError`` (the
    handshake was refused — a revoked or expired grant — or the server's
    certificate does not match the pin), ``JoinTimeout``, and what
    ``Gateway.open`` raises (a version mismatch names both versions)."""

    async def make() -> Attachment:
        access = read_access(path)
        reader, writer = await open_tls(access, timeout, tcp_timeout)
        try:
            mesh = await Mesh(runtime_dir=runtime_dir)
        except BaseException:
            writer.close()
            raise
        try:
            kept, first = Port.pair()
            try:
                gw = await mesh.open_gateway(
                    reader, writer, first, label=access.label, limits=limits, timeout=timeout
                )
            except BaseException:
                kept.close()
                writer.close()
                raise
            far = FarPlane(kept, access.label)
            far.start()
            return TlsAttachment(mesh, gw, far)
        except BaseException:
            await mesh.aclose()
            raise

    return Attaching(make)
