"""What the project's code imports, read from the source: one module's imports, and a stage's closure.

The files a stage's code runs are its module and everything it imports inside the repository.

Read from the source with ``ast`` (no import is executed, no model loads), following imports at any
depth, including those inside functions, and the ``__init__.py`` of every package on the way. A
closure leaves out imports under ``if TYPE_CHECKING:``: they never run (the public API in
``pipeline/__init__.py`` names its types there and loads them only when a user asks for one).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

_MODULE_IN_CMD = re.compile(r"python\s+-m\s+([\w.]+)")


def module_file(root: Path, module: str) -> Path | None:
    """The file under ``root`` that defines ``module`` (a module or a package), or None outside the repository."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_inits(root: Path, module: str) -> list[Path]:
    """``__init__.py`` of every package above ``module``: importing it runs them first."""
    parts = module.split(".")
    inits = (module_file(root, ".".join(parts[:i])) for i in range(1, len(parts)))
    return [path for path in inits if path is not None and path.name == "__init__.py"]


def _is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): its body never runs."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST, runtime_only: bool) -> Iterator[ast.AST]:
    """Every node of ``tree``; with ``runtime_only``, without the bodies of ``if TYPE_CHECKING:`` blocks."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if runtime_only and _is_type_checking_block(node):
            assert isinstance(node, ast.If)
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))


def imported_modules(path: Path, module: str, runtime_only: bool = False) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in ``path`` may load, at any depth of the code.

    ``runtime_only`` leaves out imports under ``if TYPE_CHECKING:``, which only type checkers read.
    """
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(), filename=str(path)), runtime_only):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            names.add(base)
            # ``from package import name`` loads ``package.name`` when that is a submodule.
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def import_closure(root: Path, modules: Iterable[str]) -> set[Path]:
    """Files under ``root`` that importing ``modules`` runs, as paths relative to ``root``."""
    seen: set[Path] = set()
    pending = list(modules)
    visited: set[str] = set()
    while pending:
        module = pending.pop()
        if module in visited:
            continue
        visited.add(module)
        path = module_file(root, module)
        if path is None:
            continue  # the standard library or an installed package
        for file in [path, *_package_inits(root, module)]:
            seen.add(file.relative_to(root))
        pending.extend(imported_modules(path, module, runtime_only=True))
        pending.extend(".".join(module.split(".")[:i]) for i in range(1, len(module.split("."))))
    return seen


def stage_module(cmd: str) -> str:
    """The module a stage's ``python -m`` command runs."""
    found = _MODULE_IN_CMD.search(cmd)
    if found is None:
        raise ValueError(f"stage command {cmd!r} runs no `python -m <module>`")
    return found.group(1)


def stage_code(root: Path, dvc_yaml: Path) -> dict[str, tuple[set[Path], list[str]]]:
    """Per stage of ``dvc_yaml``: the repository files its code runs and its dependencies (relative to ``root``).

    Both are relative to the project root: a stage's ``wdir`` (relative to its dvc.yaml) must resolve there.
    """
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    result: dict[str, tuple[set[Path], list[str]]] = {}
    for name, stage in stages.items():
        wdir = (dvc_yaml.parent / stage.get("wdir", ".")).resolve()
        if wdir != root.resolve():
            raise ValueError(f"{dvc_yaml}: stage {name!r} runs in {wdir}, not in the project root {root}")
        result[name] = (import_closure(root, [stage_module(stage["cmd"])]), list(stage.get("deps", [])))
    return result


def covered(file: Path, deps: Iterable[str]) -> bool:
    """Whether a dependency is ``file`` itself or a folder above it."""
    return any(file == Path(dep) or Path(dep) in file.parents for dep in deps)
