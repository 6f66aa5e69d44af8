"""The library's shape: imports point one way through the layers, and the module graph has no cycle.

Every import counts, at module level, inside functions and under ``TYPE_CHECKING``: an import
made lazy to dodge a cycle is still a cycle, and a type-only import of a higher layer is still a
backwards dependency.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import pipeline
from pipeline.version import __version__
from tests.imports import imported_modules
from tests.paths import PROJECT_ROOT

# Lowest first: a module may import its own layer and the ones before it, never one after it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "pipeline.version",
            "pipeline.config",
            "pipeline.errors",
            "pipeline.extras",
            "pipeline.layout",
            "pipeline.io",
            "pipeline.images",
            "pipeline.run_record",
        ),
    ),
    ("data", ("pipeline.data",)),
    ("models", ("pipeline.models",)),
    ("detect", ("pipeline.detect",)),
    ("explain", ("pipeline.explain",)),
    ("defend", ("pipeline.defend",)),
    ("evaluate", ("pipeline.evaluate",)),
    # The package itself is the public API: it names objects from every layer (loaded on first use).
    ("api", ("pipeline",)),
    ("testing", ("pipeline.testing",)),
    ("stages", ("stages",)),
    ("app", ("lsi_guard_app",)),
)
PACKAGES = ("pipeline", "stages", "lsi_guard_app")


def module_name(path: Path) -> str:
    """``pipeline/detect/store.py`` -> ``pipeline.detect.store``; a package's ``__init__`` is the package."""
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the shipped packages, by dotted name."""
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((PROJECT_ROOT / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules()
    return {
        name: {target for target in imported_modules(path, name) if target in modules and target != name}
        for name, path in modules.items()
    }


def layer_of(name: str) -> int:
    """The index in LAYERS of the longest prefix that owns ``name``."""
    best, best_length = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            owns = name == prefix or (name.startswith(prefix + ".") and prefix != "pipeline")
            if owns and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best < 0:
        raise AssertionError(f"{name} belongs to no layer; add its package to LAYERS in {__file__}")
    return best


def backwards_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a imports b`` lines where b sits in a later layer than a."""
    found = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(name):
                found.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_sits_in_a_layer() -> None:
    for name in project_modules():
        layer_of(name)


def test_imports_point_down_the_layers() -> None:
    assert backwards_imports(import_graph()) == []


def test_the_module_graph_has_no_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_models_never_import_data() -> None:
    """Model adapters read images through the base ``pipeline.images``, never through the data layer."""
    offenders = [
        f"{name} imports {target}"
        for name, targets in sorted(import_graph().items())
        if name.startswith("pipeline.models.") or name == "pipeline.models"
        for target in sorted(targets)
        if target == "pipeline.data" or target.startswith("pipeline.data.")
    ]
    assert offenders == []


def test_the_library_never_imports_its_test_doubles_tests_or_benchmarks() -> None:
    offenders = [
        f"{name} imports {target}"
        for name, path in project_modules().items()
        if name.startswith("pipeline.") and not name.startswith("pipeline.testing")
        for target in imported_modules(path, name)
        if target.split(".")[0] in ("tests", "bench") or target.startswith("pipeline.testing")
    ]
    assert offenders == []


def test_stages_are_leaves() -> None:
    """A stage module imports no other stage module (the runner in ``stages/__init__.py`` is no stage)."""
    graph = import_graph()
    offenders = [
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name.startswith("stages.")
        for target in targets
        if target.startswith("stages.")
    ]
    assert offenders == []


def test_bench_imports_only_the_library_and_apps() -> None:
    """Benchmarks measure the library and the apps (bench/limits.py times the demo's handler), not stages or tests."""
    offenders = [
        f"{path.name} imports {target}"
        for path in sorted((PROJECT_ROOT / "bench").glob("*.py"))
        for target in imported_modules(path, f"bench.{path.stem}")
        if target.split(".")[0] in ("stages", "tests")
    ]
    assert offenders == []


def test_package_version_and_typing_marker_ship() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["version"] == pipeline.__version__ == __version__
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["pipeline"]
    assert (PROJECT_ROOT / "pipeline" / "py.typed").is_file()


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a2"}, "a2": {"b"}, "b": {"b"}}, ["b", "b"]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected


def test_a_backwards_import_is_reported() -> None:
    graph = {"pipeline.config": {"pipeline.detect.store"}, "pipeline.detect.store": {"pipeline.config"}}
    assert backwards_imports(graph) == ["pipeline.config (base) imports pipeline.detect.store (detect)"]
    assert backwards_imports({"pipeline.defend.guard": {"pipeline.explain.attribution"}}) == []


def test_the_public_api_names_what_it_loads() -> None:
    """``__all__``, the lazy table and the TYPE_CHECKING imports of ``pipeline/__init__.py`` name the same objects."""
    facade = PROJECT_ROOT / "pipeline" / "__init__.py"
    checked: dict[str, str] = {}
    for node in ast.walk(ast.parse(facade.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom) and statement.module is not None
                checked.update({alias.name: statement.module for alias in statement.names})
    lazy: dict[str, str] = pipeline._PUBLIC
    assert checked == lazy
    assert pipeline.__all__ == ["__version__", *lazy]
    for name, module in lazy.items():
        assert getattr(pipeline, name) is getattr(importlib.import_module(module), name), name


def test_the_short_imports_work_and_load_no_model_code() -> None:
    """``import pipeline`` stays light: torch loads only when a user asks for a name that needs it."""
    code = (
        "import sys, pipeline; light = 'torch' not in sys.modules; "
        "from pipeline import Guard, make_request, load_params; "
        "print(light, Guard.__name__, make_request.__name__, load_params.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, check=True)
    assert result.stdout.split() == ["True", "Guard", "make_request", "load_params"]
    with pytest.raises(AttributeError, match="has no attribute 'Gaurd'"):
        pipeline.Gaurd  # noqa: B018


def test_library_and_stages_import_from_deep_paths() -> None:
    """The public API is for users: the library and the stages name each module they use.

    DVC's code dependencies are read from the imports (tests/imports.py), which cannot follow a
    name loaded lazily through ``pipeline``; a stage using the short imports would depend on code
    its ``dvc.yaml`` deps do not list.
    """
    offenders = [
        f"{name} imports {target}"
        for name, path in project_modules().items()
        if name.startswith(("pipeline.", "stages"))
        for target in imported_modules(path, name)
        if target == "pipeline" or target.removeprefix("pipeline.") in pipeline._PUBLIC
    ]
    assert offenders == []
