"""Node and port identities: 16 random bytes each, drawn from a pool."""

from __future__ import annotations

import os
from collections import deque

ID_LEN = 16
#: Ids drawn per read of the OS random source. Ids stay unguessable (a port
#: id is what a peer addresses); one getrandom per this many ports instead
#: of one per port (an RPC call makes two).
_POOL_IDS = 256
_pool: deque[bytes] = deque()


def random_id() -> bytes:
    """16 fresh random bytes (from a pool refilled from ``os.urandom``)."""
    try:
        return _pool.popleft()  # atomic: safe from any thread
    except IndexError:
        raw = os.urandom(ID_LEN * _POOL_IDS)
        # a list, not a generator: one Python frame per refill, not one per id
        _pool.extend([raw[i : i + ID_LEN] for i in range(ID_LEN, len(raw), ID_LEN)])
        return raw[:ID_LEN]


# a forked child must not hand out the ids its parent will also use
os.register_at_fork(after_in_child=_pool.clear)


class _Id(bytes):
    """16 random bytes with a short hex repr.

    A ``bytes`` subclass so it hashes and compares equal to the raw 16 bytes
    read off the wire: tables are keyed by plain bytes on the hot path.
    """

    __slots__ = ()

    @classmethod
    def random(cls) -> _Id:
        return cls(random_id())

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
