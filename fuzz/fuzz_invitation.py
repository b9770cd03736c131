"""Fuzz the invitation decoder: any bytes give an ``Invitation`` or
``InvitationDecodeError`` (see README.md)."""

import math
import sys

import atheris

with atheris.instrument_imports():
    from meshipc._errors import InvitationDecodeError
    from meshipc._invitation import Invitation


def one(data: bytes) -> None:
    try:
        inv = Invitation.from_bytes(data)
    except InvitationDecodeError:
        return
    if not (inv.directory.startswith("/") and math.isfinite(inv.expires)):
        raise AssertionError(f"accepted an invalid invitation: {inv!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
