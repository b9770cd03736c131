"""Fuzz the message decoder: any body, decoded as any of a few types, with
or without descriptors beside it, gives a value or ``MessageError``; the
descriptors are always closed (see README.md)."""

import os
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    import msgspec

    from meshipc._channel import Port, Receiver, Sender
    from meshipc._codec import decode
    from meshipc._errors import MessageError
    from meshipc._fd import Fd
    from meshipc._ports import Message


class Point(msgspec.Struct):
    x: int
    y: float
    tags: list[str] = []


TYPES: list[Any] = [Any, int, str, list[int], dict[str, Any], Point, Port, Sender[int], Receiver[Point], Fd]
DEVNULL = os.open(os.devnull, os.O_RDONLY)


def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    tp = TYPES[fdp.ConsumeIntInRange(0, len(TYPES) - 1)]
    with_fd = fdp.ConsumeBool()
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    fds = [Fd.dup(DEVNULL)] if with_fd else None
    try:
        decode(Message(0, body=body, fds=fds), tp)
    except MessageError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
