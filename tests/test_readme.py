"""The README's one-page example runs as written: its ``service.py`` and
``control.py`` blocks are copied out of the README, run as two real
processes, and stopped with Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from relutil import STEP

README = Path(__file__).resolve().parent.parent / "README.md"


def one_page_files() -> dict[str, str]:
    """The README's python blocks that start with ``# NAME.py``, by name."""
    text = README.read_text()
    section = text[text.index("## In one page") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    files = {}
    for block in blocks:
        m = re.match(r"# (\w+\.py)\b", block)
        if m:
            files[m.group(1)] = block
    return files


def test_the_one_page_example_runs_as_written(tmp_path: Path, runtime_dir: Path) -> None:
    files = one_page_files()
    assert set(files) == {"service.py", "control.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    env = {**os.environ, "MESHIPC_RUNTIME_DIR": str(runtime_dir)}
    service = subprocess.Popen(
        [sys.executable, "service.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background jobs start with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert service.stdout is not None
        assert service.stdout.readline().strip() == "42"
        control = subprocess.run(
            [sys.executable, "control.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=6 * STEP,
        )
        assert control.returncode == 0, control.stderr
        lines = control.stdout.splitlines()
        assert len(lines) == 3 and lines[0].startswith("{'double': {") and lines[1:] == ["10", "10"]
        assert service.stdout.readline().startswith("attached: ")
        assert service.stdout.readline().startswith("attached: ")
        service.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = service.communicate(timeout=STEP)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    assert service.returncode == 130 and err == ""
