"""dvc.yaml's code dependencies match what each stage's module imports, so a code change reruns what it affects.

Read from the source (no import runs, no model loads): a missing dependency would leave stale
outputs marked up to date; a needless one would rerun expensive stages (extraction) for nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.imports import covered, import_closure, stage_code
from tests.paths import PROJECT_ROOT

DVC_FILES = [PROJECT_ROOT / "dvc.yaml", PROJECT_ROOT / "dev" / "dvc.yaml"]
CODE_ROOTS = ("pipeline", "stages")


def _is_code(dep: str) -> bool:
    return Path(dep).parts[0] in CODE_ROOTS


@pytest.mark.parametrize("dvc_yaml", DVC_FILES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_imported_repository_file_is_a_dependency(dvc_yaml: Path) -> None:
    missing = [
        f"{dvc_yaml.name} stage {name!r}: {file} is imported but not covered by its deps"
        for name, (files, deps) in stage_code(PROJECT_ROOT, dvc_yaml).items()
        for file in sorted(files)
        if not covered(file, deps)
    ]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("dvc_yaml", DVC_FILES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_code_dependency_exists_and_is_imported(dvc_yaml: Path) -> None:
    """A dependency on a missing file fails ``dvc repro``; one on code the stage never runs reruns it needlessly."""
    wrong = []
    for name, (files, deps) in stage_code(PROJECT_ROOT, dvc_yaml).items():
        for dep in filter(_is_code, deps):
            path = PROJECT_ROOT / dep
            if not path.exists():
                wrong.append(f"{dvc_yaml.name} stage {name!r}: dependency {dep} does not exist")
            elif path.is_dir() and not any(path.rglob("*.py")):
                continue  # data the code reads (report templates), not imports
            elif not any(covered(file, [dep]) for file in files):
                wrong.append(f"{dvc_yaml.name} stage {name!r}: dependency {dep} is code the stage never imports")
    assert not wrong, "\n".join(wrong)


def test_closure_follows_imports_inside_functions_and_packages(tmp_path: Path) -> None:
    """The walk itself: nested, relative and function-level imports count, installed packages do not."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .leaf import VALUE\n")
    (package / "sub" / "leaf.py").write_text("import json\nVALUE = 1\n")
    (package / "late.py").write_text("")
    (package / "unused.py").write_text("")
    (package / "main.py").write_text("from pkg import sub\n\ndef run():\n    from pkg.late import x\n")
    files = import_closure(tmp_path, ["pkg.main"])
    expected = {"pkg/__init__.py", "pkg/main.py", "pkg/sub/__init__.py", "pkg/sub/leaf.py", "pkg/late.py"}
    assert files == {Path(name) for name in expected}


def test_dev_pipeline_is_a_dvc_project_of_its_own() -> None:
    """The main project's pull, push and status then never see the stages that need ../shared."""
    assert (PROJECT_ROOT / "dev" / ".dvc" / "config").is_file()
