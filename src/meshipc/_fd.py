"""Owned file descriptors that travel inside messages."""

from __future__ import annotations

import os
from types import TracebackType
from typing import IO, Any


class Fd:
    """An owned file descriptor. It may appear anywhere in a message; the
    receiving process gets a working descriptor (close-on-exec) of its own.

    Sending an ``Fd`` hands it over: the sender's copy is closed once sent.
    ``fileno()`` raises ``ValueError`` on a closed or detached ``Fd``.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        """Take ownership of ``fd`` (it is closed with this object)."""
        self._fd = -1
        if not isinstance(fd, int) or fd < 0:
            raise ValueError(f"not a file descriptor: {fd!r}")
        self._fd = fd

    @classmethod
    def _take(cls, other: Fd) -> Fd:
        """A new ``Fd`` that owns ``other``'s descriptor (``other`` is left
        detached): ``other.detach()`` then ``Fd(n)``, without re-checking a
        number an ``Fd`` already holds. ``ValueError`` if ``other`` is closed."""
        n = other._fd
        if n < 0:
            raise ValueError("Fd is closed or detached")
        other._fd = -1
        new = object.__new__(cls)
        new._fd = n
        return new

    @classmethod
    def dup(cls, f: int | IO[Any] | Any) -> Fd:
        """A new owned duplicate of ``f`` (an int or anything with ``fileno()``)."""
        n = f if isinstance(f, int) else f.fileno()
        return cls(os.dup(n))  # os.dup makes the copy non-inheritable

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("Fd is closed or detached")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def detach(self) -> int:
        """Give up ownership and return the raw descriptor."""
        n = self.fileno()
        self._fd = -1
        return n

    def close(self) -> None:
        if self._fd >= 0:
            n, self._fd = self._fd, -1
            try:
                os.close(n)
            except OSError:
                pass

    def __enter__(self) -> Fd:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    #: closed when dropped (``close`` itself: one call less per ``Fd``, and
    #: every message of fds makes and drops a few)
    __del__ = close

    def __repr__(self) -> str:
        return f"Fd({self._fd})" if self._fd >= 0 else "Fd(closed)"
