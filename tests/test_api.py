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


def test_the_lazy_table_and_all_agree_and_import_loads_nothing_else():
    """Every public name is in the lazy table (or is the ``sync`` submodule)
    and resolves to what its module defines; ``import meshipc`` alone loads
    none of the submodules (checked in a fresh interpreter)."""
    import subprocess
    import sys

    lazy = meshipc._LAZY  # type: ignore[attr-defined]
    assert set(lazy) | {"sync"} == set(meshipc.__all__)
    for name, (module, attr) in lazy.items():
        mod = __import__(f"meshipc{module}", fromlist=[attr])
        assert getattr(meshipc, name) is getattr(mod, attr), name
    code = "import sys, meshipc; print(sorted(m for m in sys.modules if m.startswith('meshipc.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
