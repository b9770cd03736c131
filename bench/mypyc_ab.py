"""Would a mypyc-compiled hot path pay? (Issue 24, item 4.) The pure sources
against the same sources compiled by mypyc, measured in one run.

    python bench/mypyc_ab.py [--modules _wire _ports] [--rounds 5] [--callgrind [mesh]] [--dir DIR [--reuse]]

Copies ``src`` twice under DIR (``pure/src``, ``compiled/src``), applies to
the compiled copy the source changes mypyc needs (``PATCHES``, below),
compiles ``--modules`` there with mypyc (``MYPYC_OPT_LEVEL=3``, one shared
library for the group, as a build hook would) and prints:

- the build: wall and CPU seconds (mypyc and gcc), the extension modules'
  size on disk and deflated (what a wheel would carry);
- the import time of the compiled modules, pure and compiled (interleaved,
  median of 9 fresh interpreters);
- ``bench/ab_cpu.py PURE COMPILED``: interleaved CPU per op (``rtt``,
  ``oneway``, both processes; the in-process ``send_us``/``recv_us`` rows);
- with ``--callgrind``: instructions per op instead (``ab_cpu.py
  --callgrind``: the engine's send, receive, runs, an in-memory round trip,
  an fd), and ``mesh_rtt``, the instructions of the calling process per real
  round trip to a spawned echo worker (sockets, loop, transport included:
  the whole round trip as one side of it sees it).

What mypyc (mypy 2.4.1) refuses or gets wrong in these sources:

- ``_ports``: the class-level swap ``Engine.send_value =
  Engine._send_value_traced`` (``_trace.when_tracing``): a native class's
  attributes cannot be assigned ("Only class variables defined as ClassVar
  can be assigned to"). Patched: ``send_value`` a method that checks a
  module flag (in pure Python that is one more frame per send, which is
  why the swap exists).
- ``_wire``: ``MsgEvent.__eq__`` reads ``self.__slots__``, which a native
  class does not have (AttributeError at run time, so ``tests/test_wire.py``
  fails; ``tests/test_ports.py`` reads ``cls.__slots__`` the same way).
  Patched: the names spelled out.
- ``_ids``: ``NodeId``/``PortId`` subclass ``bytes`` ("Inheriting from most
  builtin types is unimplemented").
- ``_codec``: compiles, then segfaults on the first message with a port
  (``ResourceTables(threading.local)`` as a native class); marked
  ``@mypyc_attr(native_class=False)`` the generated C does not build
  (``CPyModule__thread`` undeclared).
- ``_channel`` (not sans-IO; asyncio): ``continue`` inside ``with`` (a
  try/finally) and ``if TYPE_CHECKING:`` in class bodies are unimplemented.
- ``_handshake``: compiles, then the first certificate fails
  (``Authority.issue`` -> ``Certificate.body``: ``struct.pack`` "returned a
  result with an exception set", a ``KeyError: '__repr__'`` underneath).
  Not on the per-message path anyway (once per link).
- ``_transport`` and ``_trace`` (neither sans-IO) compile unchanged.
- Tests that patch the engine stop working on a compiled one:
  ``tests/rel_workers.py`` assigns ``Engine._report_consumed`` (a native
  class refuses), ``tests/test_reliability.py`` patches
  ``_ports.MAX_OOB_BODY`` (a ``Final`` mypyc inlines: the patch is not seen).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (module, text in the source, its replacement): what mypyc needs changed
#: (the module docstring says why). A source that no longer holds the text
#: stops the run: update the patch.
PATCHES: tuple[tuple[str, str, str], ...] = (
    (
        "_ports",
        "    send_value = _send_value\n",
        "    def send_value(\n"
        "        self, st: PortState, kind: int, obj: Any, body: bytes | None = None,\n"
        "        force: bool = False, extra: int = 0, trace: bytes | None = None,\n"
        "    ) -> None:\n"
        "        if trace is None and _TRACED:\n"
        "            trace = prefix()\n"
        "        self._send_value(st, kind, obj, body, force, extra, trace)\n",
    ),
    (
        "_ports",
        "def _trace_sends() -> None:",
        "_TRACED = False\n\n\ndef _trace_sends() -> None:",
    ),
    (
        "_ports",
        "    Engine.send_value = Engine._send_value_traced\n",
        "    global _TRACED\n    _TRACED = True\n",
    ),
    (
        "_wire",
        "for k in self.__slots__",
        'for k in ("body", "flags", "kind", "nfds", "port", "ports", "seq")',
    ),
)


def _prepare(work: Path, modules: list[str]) -> None:
    pure, comp = work / "pure" / "src", work / "compiled" / "src"
    for dst in (pure, comp):
        shutil.rmtree(dst.parent, ignore_errors=True)
        shutil.copytree(ROOT / "src", dst, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for mod, old, new in PATCHES:
        if mod not in modules:
            continue
        path = comp / "meshipc" / f"{mod}.py"
        text = path.read_text()
        if old not in text:
            raise SystemExit(f"{mod}.py no longer holds {old.strip()!r}: update PATCHES")
        path.write_text(text.replace(old, new, 1))
    for src in (pure, comp):  # imports read bytecode, as from an installed wheel
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True)


def _build(comp: Path, modules: list[str]) -> None:
    cmd = [sys.executable, "-m", "mypyc", *(f"meshipc/{m}.py" for m in modules)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    res = subprocess.run(
        cmd, cwd=comp, capture_output=True, text=True, env={**_env(), "MYPYC_OPT_LEVEL": "3"}
    )
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        errors = [ln for ln in (res.stdout + res.stderr).splitlines() if "error" in ln]
        raise SystemExit("mypyc failed:\n" + "\n".join(errors[:40]))
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    libs = sorted(comp.glob("*.so")) + sorted(comp.glob("meshipc/*.so"))
    size = sum(p.stat().st_size for p in libs)
    packed = sum(len(zlib.compress(p.read_bytes(), 6)) for p in libs)
    print(f"build: {len(modules)} modules, {wall:.1f} s wall, {cpu:.1f} s CPU (mypyc + gcc)")
    print(
        f"extension modules: {len(libs)} files, {size / 1e6:.2f} MB, {packed / 1e6:.2f} MB deflated",
        flush=True,
    )


def _env(src: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, MESHIPC_UVLOOP="0")
    if src is not None:
        env["PYTHONPATH"] = f"{src}{os.pathsep}{ROOT}"
    return env


def _import_time(src: Path, modules: list[str]) -> float:
    names = ", ".join(f"meshipc.{m}" for m in modules)
    code = f"import time; t = time.perf_counter(); import {names}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], env=_env(src), capture_output=True, text=True)
    return float(out.stdout.strip())


def _imports(pure: Path, comp: Path, modules: list[str]) -> None:
    times: dict[Path, list[float]] = {pure: [], comp: []}
    for _ in range(9):
        for src in (pure, comp):
            times[src].append(_import_time(src, modules))
    a, b = (statistics.median(times[s]) * 1e3 for s in (pure, comp))
    print(
        f"import of {', '.join(modules)}: pure {a:.2f} ms  compiled {b:.2f} ms  compiled/pure {b / a:.3f}",
        flush=True,
    )


def _mesh_rtt(n: int) -> None:
    """``n`` round trips to a spawned echo worker (``ab_cpu._measure``; one
    one-way message, a cost the difference of two runs cancels)."""
    import asyncio

    from bench.ab_cpu import _measure

    asyncio.run(_measure(n, 1))  # (the sink answers a count of 1 or more)


def _mesh_rtt_instructions(pure: Path, comp: Path) -> None:
    from bench.ab_cpu import _instructions_of

    lo, hi = 200, 1000
    per = []
    for src in (pure, comp):
        code = "from bench.mypyc_ab import _mesh_rtt; _mesh_rtt({n})"
        count = [_instructions_of(str(src), code.format(n=n)) for n in (lo, hi)]
        per.append((count[1] - count[0]) / (hi - lo))
    print(
        f"mesh_rtt (calling process): pure {per[0]:.0f}  compiled {per[1]:.0f} instructions/op"
        f"  compiled/pure {per[1] / per[0]:.3f}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", nargs="+", default=["_wire", "_ports"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--callgrind",
        nargs="?",
        const="all",
        choices=("all", "mesh"),
        help="count instructions (valgrind) instead; mesh: only mesh_rtt",
    )
    ap.add_argument("--dir", type=Path, help="keep the two copies here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="measure the copies already in --dir")
    args = ap.parse_args()
    if str(ROOT) not in sys.path:  # run as a script: ``bench.ab_cpu`` for the instruction counts
        sys.path.insert(0, str(ROOT))
    work = args.dir or Path(tempfile.mkdtemp(prefix="meshipc-mypyc-"))
    try:
        pure, comp = work / "pure" / "src", work / "compiled" / "src"
        if not (args.reuse and any(comp.glob("meshipc/*.so"))):
            _prepare(work, args.modules)
            _build(comp, args.modules)
        _imports(pure, comp, args.modules)
        ab = [sys.executable, str(ROOT / "bench" / "ab_cpu.py"), str(pure), str(comp)]
        if args.callgrind:
            if args.callgrind == "all":
                subprocess.run([*ab, "--callgrind"], check=True)
            _mesh_rtt_instructions(pure, comp)
        else:
            subprocess.run([*ab, "--rounds", str(args.rounds)], check=True)
        print("(A: pure, B: compiled)")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
