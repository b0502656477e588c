"""The shape of the code: storage knows nothing of the web, modules stay small, imports form no
cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "conversational_core"
MAX_LINES = 700


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT / "src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


STORAGE_MODULES = sorted(_module(p) for p in (PACKAGE / "storage").rglob("*.py"))


@pytest.mark.parametrize("module", STORAGE_MODULES)
def test_storage_loads_no_web_framework(module: str) -> None:
    """A store can be used (and swapped) without the web layer."""
    probe = (
        f"import sys; import {module}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'starlette') or m in ('conversational_core.errors', "
        "'conversational_core.http')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert loaded == "[]", f"{module} loads {loaded}"


def test_no_source_file_is_over_700_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for folder in ("src", "tests", "bench", "testkit")
        for path in (ROOT / folder).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def _imports(path: Path) -> set[str]:
    """The package's modules `path` imports at import time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)

    visit(tree.body)
    return {name for name in found if name.startswith("conversational_core")}


def test_modules_import_no_cycle() -> None:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    # A package imports its __init__ first: a cycle through a package's own modules is only one
    # when it closes at module level, which the graph above shows.
    visiting: set[str] = set()
    done: set[str] = set()

    def walk(name: str, trail: list[str]) -> None:
        if name in done:
            return
        if name in visiting:
            raise AssertionError(" -> ".join([*trail[trail.index(name) :], name]))
        visiting.add(name)
        for target in sorted(graph[name]):
            walk(target, [*trail, name])
        visiting.discard(name)
        done.add(name)

    for name in sorted(graph):
        walk(name, [])
