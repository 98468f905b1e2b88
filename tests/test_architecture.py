"""docs/architecture.md's module map names real modules, and every module has a line in it."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHITECTURE = REPO / "docs" / "architecture.md"
PACKAGES = ("k3batch", "pipelines")


def named_paths() -> set[str]:
    """Paths the page names in backticks: `k3batch/x.py`, `k3batch/pkg/`, `pipelines/x.py`."""
    return set(re.findall(r"`((?:k3batch|pipelines)/[\w/]*?(?:\.py|/))`", ARCHITECTURE.read_text()))


def test_every_module_the_map_names_exists():
    names = named_paths()
    assert len(names) > 20, names  # the pattern still finds the map
    missing = sorted(name for name in names if not (REPO / name).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_has_a_line_in_the_map():
    names = named_paths()
    modules = sorted(
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if path.name != "__init__.py"
    )
    unnamed = [module for module in modules if module not in names]
    assert not unnamed, f"docs/architecture.md's module map lacks: {unnamed}"


def test_the_dataflow_picture_renders_on_github():
    text = ARCHITECTURE.read_text()
    assert "```mermaid\nflowchart" in text
