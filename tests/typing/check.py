"""Run by CI (``.ci/run``): ``passes.py`` type-checks under ``mypy --strict``
and ``fails.py`` fails exactly on its lines marked ``# error``. Exits
non-zero otherwise, saying what differed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def mypy(path: Path) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        capture_output=True,
        text=True,
    )
    return out.returncode, out.stdout + out.stderr


def main() -> int:
    code, out = mypy(HERE / "passes.py")
    if code != 0:
        print(f"tests/typing/passes.py does not type-check:\n{out}")
        return 1
    fails = HERE / "fails.py"
    lines = enumerate(fails.read_text().splitlines(), 1)
    want = {i for i, line in lines if line.rstrip().endswith("# error")}
    code, out = mypy(fails)
    got = {int(m.group(1)) for m in re.finditer(r"fails\.py:(\d+): error", out)}
    if code == 0 or got != want:
        print(f"tests/typing/fails.py: errors expected on lines {sorted(want)}, mypy reported {sorted(got)}:")
        print(out)
        return 1
    print(f"typing ok: passes.py clean, fails.py fails on its {len(want)} marked lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
