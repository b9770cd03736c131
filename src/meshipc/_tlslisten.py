"""``TlsListener`` (``mesh.listen_tls``): a mesh's TCP port for clients on
other hosts. Each client that passes the TLS handshake (``_tls``: mutual,
pinned, its grant checked) gets a boundary link (``Gateway``) whose first
port is served by a ``FarServer`` with the mesh's control plane; ports it
is given (``open``) cross as relays. Grants are made, listed and revoked
here; revoking one also ends the links its certificate holds open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._boundary import BoundaryLimits
from ._channel import Port
from ._control import ControlPlane
from ._far import FarServer
from ._gateway import Gateway
from ._node import Node
from ._tls import DEFAULT_GRANT_LIFETIME, TCP_TIMEOUT, Grant, TlsAuthority, TlsServer, TlsServerStats

log = logging.getLogger("meshipc")


@dataclass(frozen=True, slots=True)
class TlsListenerStats:
    """A snapshot of a ``TlsListener``: its accept loop and its grants."""

    server: TlsServerStats
    #: grants not yet expired, revoked ones included
    grants: int
    #: boundary links open now
    links: int


class TlsListener:
    """A mesh's TLS listener. ``address`` is the bound ``(host, port)``;
    ``grant`` writes access files; ``grants``/``revoke`` manage them;
    ``close()`` stops accepting and ends every link (its ports fail with
    ``NodeFailure`` at the clients)."""

    def __init__(
        self,
        node: Node,
        plane: ControlPlane,
        authority: TlsAuthority,
        *,
        limits: BoundaryLimits | None = None,
        tcp_timeout: float = TCP_TIMEOUT,
    ) -> None:
        self._node = node
        self._plane = plane
        self._authority = authority
        self._limits = limits
        self._server = TlsServer(authority, self._client, tcp_timeout)
        self._links: dict[str, set[Gateway]] = {}  # grant id -> its open links
        self.closed = False

    async def start(self, host: str, port: int) -> None:
        await self._server.start(host, port)

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the port the system picked for 0)."""
        return self._server.address

    def grant(
        self,
        path: str | os.PathLike[str],
        *,
        expires: float = DEFAULT_GRANT_LIFETIME,
        host: str | None = None,
    ) -> Grant:
        """Write one client's access file at ``path`` (mode 0600): the
        address to reach this listener (``host``, default the bound one:
        give it when listening on ``0.0.0.0`` or ``::``), its certificate's
        pin and a client certificate and key minted for this grant, valid
        ``expires`` seconds (default 30 days). Whoever reads the file can
        attach: keep it private. Raises ``ValueError`` for a bad
        ``expires`` or a wildcard address without ``host``, ``MeshError``
        past ``MAX_GRANTS``, ``OSError`` if the file cannot be written."""
        bound, port = self.address
        if host is None:
            if bound in ("0.0.0.0", "::"):
                raise ValueError(
                    f"listening on {bound}: say which address clients use (grant(..., host=...))"
                )
            host = bound
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"not a host name or address: {host!r}")
        return self._authority.grant((host, port), Path(path), expires)

    def grants(self) -> list[Grant]:
        """The grants not yet expired (revoked ones too), oldest first."""
        return self._authority.grants()

    def revoke(self, grant_id: str) -> Grant:
        """Revoke a grant: its certificate fails the TLS handshake from now
        on, and its open links are closed. ``KeyError`` for an unknown id."""
        g = self._authority.revoke(grant_id)
        for gw in self._links.pop(grant_id, set()):
            gw.close()
        return g

    def inspect(self) -> dict[str, Any]:
        """The listener for the inspect tree: address, counters, grants (no key material)."""
        st = self.stats()
        return {
            "address": f"{self.address[0]}:{self.address[1]}",
            "accepted": st.server.accepted,
            "refused": st.server.refused,
            "handshaking": st.server.handshaking,
            "links": st.links,
            "grants": {
                g.id: {"path": g.path, "state": g.state(), "issued": g.issued, "expires": g.expires}
                for g in self.grants()
            },
        }

    def stats(self) -> TlsListenerStats:
        return TlsListenerStats(
            self._server.stats(), len(self._authority.grants()), sum(len(s) for s in self._links.values())
        )

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, grant: Grant, peer: str
    ) -> None:
        kept, first = Port.pair()
        try:
            gw = await Gateway.open(
                self._node, reader, writer, first, label=f"tls:{peer}", limits=self._limits
            )
        except BaseException:
            kept.close()
            raise
        links = self._links.setdefault(grant.id, set())
        links.add(gw)
        server = FarServer(kept, self._plane, gw.label)
        serving = asyncio.get_running_loop().create_task(server.run())
        try:
            await gw.wait_closed()
        finally:
            serving.cancel()
            server.close()
            links.discard(gw)
            if not links and self._links.get(grant.id) is links:
                del self._links[grant.id]
            with contextlib.suppress(Exception):
                await gw.aclose()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._server.close()
        for links in self._links.values():
            for gw in links:
                gw.close()
        self._links.clear()

    def __repr__(self) -> str:
        return f"<TlsListener {self.address[0]}:{self.address[1]}>"
