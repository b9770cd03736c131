"""Node and port identities: 16 random bytes each (layer 1)."""

from __future__ import annotations

import os

ID_LEN = 16


class _Id(bytes):
    """16 random bytes with a short hex repr.

    A ``bytes`` subclass so it hashes and compares equal to the raw 16 bytes
    read off the wire: tables are keyed by plain bytes on the hot path.
    """

    __slots__ = ()

    @classmethod
    def random(cls) -> _Id:
        return cls(os.urandom(ID_LEN))

    @classmethod
    def from_hex(cls, text: str) -> _Id:
        raw = bytes.fromhex(text)
        if len(raw) != ID_LEN:
            raise ValueError(f"expected {ID_LEN * 2} hex digits, got {len(text)}")
        return cls(raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hex()[:12]})"

    def __str__(self) -> str:
        return self.hex()[:12]


class NodeId(_Id):
    """Identity of one node of a mesh (its socket is named after it)."""

    __slots__ = ()


class PortId(_Id):
    """Identity of one port (one end of a channel) on one node."""

    __slots__ = ()
