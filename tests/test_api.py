"""The public names of ``meshipc`` (``__all__``)."""

from __future__ import annotations

import types
from typing import Any

import meshipc


def test_all_matches_public_names():
    names = meshipc.__all__
    assert len(set(names)) == len(names), "duplicates in __all__"
    missing = [n for n in names if not hasattr(meshipc, n)]
    assert not missing, f"in __all__ but not defined: {missing}"
    public = {
        n
        for n, v in vars(meshipc).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "__version__"
    }
    assert public - set(names) == set(), "public but not in __all__"
    assert isinstance(meshipc.__version__, str)


def test_star_import_gives_exactly_all():
    ns: dict[str, Any] = {}
    exec("from meshipc import *", ns)
    assert {n for n in ns if n != "__builtins__"} == set(meshipc.__all__)
