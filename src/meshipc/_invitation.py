"""Named meshes, listeners, invitations and ``connect`` (layer 8)."""

from __future__ import annotations

from pathlib import Path

from ._errors import MeshNameInUse
from ._node import check_private_dir


def claim_name(root: Path, name: str) -> Path:
    directory = root / f"mesh-{name}"
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        check_private_dir(directory)
        raise MeshNameInUse(f"a mesh named {name!r} already exists at {directory}") from None
    return directory
