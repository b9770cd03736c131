"""The documentation keeps up with the code: every public name has a
reference entry under its public path, the examples are valid Python, and
the files a package index shows link nowhere it cannot follow.

Plain text checks of the files in the source tree; building the site
(mkdocs, mkdocstrings) is ``.ci/docs``'s job.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

import meshipc
import meshipc.sync

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"

#: ``::: meshipc.X`` (mkdocstrings) or an explicit anchor for a name that is
#: documented by hand (the earlier names, which are plain aliases)
_DIRECTIVE = re.compile(r"^::: (\S+)\s*$", re.M)
_ANCHOR = re.compile(r'<a id="(meshipc\.[A-Za-z_]\w*)"></a>')


def _reference_text() -> str:
    return "\n".join(p.read_text() for p in sorted(REFERENCE.glob("*.md")))


def _documented() -> list[str]:
    text = _reference_text()
    return _DIRECTIVE.findall(text) + _ANCHOR.findall(text)


def test_every_public_name_has_a_reference_entry() -> None:
    documented = set(_documented())
    missing = [n for n in meshipc.__all__ if f"meshipc.{n}" not in documented]
    assert not missing, f"names in meshipc.__all__ with no entry in docs/reference/: {missing}"
    assert "meshipc.sync" in documented
    missing = [n for n in meshipc.sync.__all__ if f"meshipc.sync.{n}" not in documented]
    assert not missing, f"names in meshipc.sync.__all__ with no entry in docs/reference/: {missing}"


def test_reference_entries_use_public_paths_only() -> None:
    """Private modules move between versions; the reference names each
    object by the path users import it from, so a move cannot break it."""
    public = {f"meshipc.{n}" for n in meshipc.__all__}
    public |= {f"meshipc.sync.{n}" for n in meshipc.sync.__all__}
    wrong = [d for d in _DIRECTIVE.findall(_reference_text()) if d not in public]
    assert not wrong, f"reference entries not under a public meshipc.X path: {wrong}"
    entries = _documented()
    twice = sorted({d for d in entries if entries.count(d) > 1})
    assert not twice, f"documented twice: {twice}"


def test_every_page_is_in_the_site_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    block = re.search(r"^nav:\n((?:[ #].*\n)+)", config, re.M)
    assert block is not None, "mkdocs.yml has a nav"
    nav = set(re.findall(r"[\w/.-]+\.md", block.group(1)))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), "pages missing from mkdocs.yml's nav"
    assert nav - pages == set(), "nav entries with no page"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.M | re.S)


@pytest.mark.parametrize(
    "page", sorted(p.relative_to(ROOT).as_posix() for p in [*DOCS.rglob("*.md"), ROOT / "README.md"])
)
def test_python_examples_are_valid_python(page: str) -> None:
    """Every ```python block parses (top-level ``await``/``async with`` as in
    an asyncio REPL, since the examples are fragments of an ``async def``)."""
    for block in _python_blocks(ROOT / page):
        compile(block, page, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


def test_readme_links_work_on_a_package_index() -> None:
    """A package index shows README.md on its own: a link relative to the
    source tree leads nowhere there. Only in-page anchors and full URLs."""
    targets = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    relative = [t for t in targets if not t.startswith(("#", "https://", "http://", "mailto:"))]
    assert not relative, f"README.md links relative to the source tree: {relative}"


def test_fuzz_readme_names_test_files_that_exist() -> None:
    named = set(re.findall(r"tests/[\w/]+\.py", (ROOT / "fuzz" / "README.md").read_text()))
    assert named, "fuzz/README.md names the tests that run the bounded versions"
    assert [n for n in sorted(named) if not (ROOT / n).is_file()] == []


def test_package_metadata_license() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"  # an SPDX expression (PEP 639)
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    # with an SPDX expression, a License :: classifier is refused by backends
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "src" / "meshipc" / "py.typed").is_file()
