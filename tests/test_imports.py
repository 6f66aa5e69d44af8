"""Import direction: stages are leaves, bench uses only the library, and the library's package data ships."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pipeline
from tests.paths import PROJECT_ROOT


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_stage_imports_another_stage() -> None:
    stage_files = sorted((PROJECT_ROOT / "stages").glob("*.py"))
    stage_names = {f"stages.{path.stem}" for path in stage_files if path.stem != "__init__"}
    assert stage_names, "no stage modules found"
    offenders = {
        path.name: sorted(imported_modules(path) & (stage_names - {f"stages.{path.stem}"}))
        for path in stage_files
        if imported_modules(path) & (stage_names - {f"stages.{path.stem}"})
    }
    assert offenders == {}


def test_bench_imports_nothing_from_stages() -> None:
    offenders = {
        path.name: sorted(name for name in imported_modules(path) if name == "stages" or name.startswith("stages."))
        for path in sorted((PROJECT_ROOT / "bench").glob("*.py"))
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_library_imports_neither_stages_nor_the_app_nor_test_doubles() -> None:
    above = ("stages", "lsi_guard_app", "tests", "bench", "pipeline.testing")
    offenders = {}
    for path in sorted((PROJECT_ROOT / "pipeline").rglob("*.py")):
        if "testing" in path.relative_to(PROJECT_ROOT / "pipeline").parts:
            continue
        found = sorted(n for n in imported_modules(path) if any(n == a or n.startswith(a + ".") for a in above))
        if found:
            offenders[str(path.relative_to(PROJECT_ROOT))] = found
    assert offenders == {}


def test_package_version_and_typing_marker_ship() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["version"] == pipeline.__version__
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["pipeline"]
    assert (PROJECT_ROOT / "pipeline" / "py.typed").is_file()
