"""Fuzz the wire frame decoder: any bytes, fed in any chunks, give events or
``ProtocolError`` (see README.md)."""

import sys

import atheris

with atheris.instrument_imports():
    from meshipc._errors import ProtocolError
    from meshipc._wire import FrameDecoder


def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cut = fdp.ConsumeIntInRange(1, 64)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    dec = FrameDecoder()
    try:
        for i in range(0, len(rest), cut):
            dec.feed(rest[i : i + cut])
    except ProtocolError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
