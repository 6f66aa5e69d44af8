"""Constructors with more than three parameters take them by keyword, so a call says what each argument is.

A class's ``__init__`` may take at most three parameters besides ``self`` positionally, and a
``@dataclass`` with more than three fields must say ``kw_only=True``. The few classes that keep a
positional signature for a reason are listed in :data:`ALLOWED`, each with the reason.
"""

from __future__ import annotations

import ast

import pytest

from tests.paths import PROJECT_ROOT

PACKAGES = ("pipeline", "lsi_guard_app")
MAX_POSITIONAL = 3

# "path::Class" -> why its constructor stays positional.
ALLOWED: dict[str, str] = {
    "lsi_guard_app/serve/schema.py::BadRequest": "an exception: raised with the message first, like any exception",
}


def _dataclass_decorator(node: ast.ClassDef) -> ast.expr | None:
    """The class's ``@dataclass`` / ``@dataclass(...)`` / ``@dataclasses.dataclass(...)`` decorator, if any."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
        if name == "dataclass":
            return decorator
    return None


def _says_kw_only(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Call) and any(
        keyword.arg == "kw_only" and isinstance(keyword.value, ast.Constant) and keyword.value.value is True
        for keyword in decorator.keywords
    )


def _keyword(call: ast.Call, name: str) -> object:
    """The constant value of keyword ``name`` in ``call``, or None."""
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def _positional_fields(node: ast.ClassDef) -> int:
    """How many fields a dataclass's ``__init__`` takes by position.

    Not a ClassVar, a ``field(init=False)`` or ``field(kw_only=True)``, nor a field after ``_: KW_ONLY``.
    """
    count = 0
    for statement in node.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        annotation = ast.unparse(statement.annotation)
        if annotation.endswith("KW_ONLY"):
            break
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        value = statement.value
        if isinstance(value, ast.Call) and (_keyword(value, "init") is False or _keyword(value, "kw_only") is True):
            continue
        count += 1
    return count


def positional_constructors(source: str) -> list[tuple[int, str, str]]:
    """``(line, class, what)`` for each class in ``source`` whose constructor takes over three arguments by position."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        decorator = _dataclass_decorator(node)
        if decorator is not None and not _says_kw_only(decorator):
            fields = _positional_fields(node)
            if fields > MAX_POSITIONAL:
                found.append((node.lineno, node.name, f"@dataclass with {fields} fields and no kw_only=True"))
        for statement in node.body:
            if isinstance(statement, ast.FunctionDef) and statement.name == "__init__":
                positional = len(statement.args.posonlyargs) + len(statement.args.args) - 1  # less self
                if positional > MAX_POSITIONAL:
                    found.append((statement.lineno, node.name, f"__init__ takes {positional} positional parameters"))
    return found


def project_offenders() -> dict[str, str]:
    """``path::Class`` -> ``path:line: Class: what`` for every positional constructor in the shipped packages."""
    offenders = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            relative = path.relative_to(PROJECT_ROOT).as_posix()
            for line, name, what in positional_constructors(path.read_text(encoding="utf-8")):
                offenders[f"{relative}::{name}"] = f"{relative}:{line}: {name}: {what}"
    return offenders


def test_constructors_with_many_parameters_are_keyword_only() -> None:
    offenders = [where for key, where in project_offenders().items() if key not in ALLOWED]
    assert offenders == [], "make these keyword-only (`*` after self, or kw_only=True):\n" + "\n".join(offenders)


def test_every_allowed_class_still_needs_its_exception() -> None:
    offenders = project_offenders()
    stale = [key for key in ALLOWED if key not in offenders]
    assert stale == [], f"keyword-only now (or gone): remove from ALLOWED: {stale}"


FOUR = [(2, "A", "__init__ takes 4 positional parameters")]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("class A:\n    def __init__(self, a, b, c, d): ...\n", FOUR),
        ("class A:\n    def __init__(self, a, b, c, *, d): ...\n", []),
        ("class A:\n    def __init__(self, a, /, b, c, d=1): ...\n", FOUR),
        (
            "@dataclass(frozen=True)\nclass D:\n    a: int\n    b: int\n    c: int\n    d: int = 0\n",
            [(2, "D", "@dataclass with 4 fields and no kw_only=True")],
        ),
        ("@dataclass(frozen=True, kw_only=True)\nclass D:\n    a: int\n    b: int\n    c: int\n    d: int\n", []),
        ("@dataclasses.dataclass\nclass D:\n    a: int\n    b: int\n    c: int\n    d: ClassVar[int] = 0\n", []),
        ("@dataclass\nclass D:\n    a: int\n    b: int\n    c: int\n    _: KW_ONLY\n    d: int\n", []),
        ("@dataclass\nclass D:\n    a: int\n    b: int\n    c: int\n    d: list = field(init=False)\n", []),
    ],
)
def test_the_checker_finds_positional_constructors(source: str, expected: list[tuple[int, str, str]]) -> None:
    assert positional_constructors(source) == expected
