"""The core installs and imports without any extra; each feature that needs one names it when it is missing.

The missing extras are simulated: ``sys.modules[name] = None`` makes ``import name`` (and of its
submodules) raise ``ModuleNotFoundError``, exactly as an environment without the package does.
Whole-library checks run in a fresh interpreter, so that nothing this test process already
imported hides an import the core makes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pipeline.config import ClusterConfig
from pipeline.detect.cluster_open import open_cluster
from pipeline.errors import LSIGuardError
from pipeline.evaluate.judges.http_judge import HTTPJudge
from pipeline.extras import MissingExtraError, check_installed, installed, require
from tests.paths import PROJECT_ROOT

# The top-level modules each extra brings that the code imports itself. httpx is the serve
# extra's too, but the core's huggingface_hub depends on it, so it is never missing from a core install.
EXTRA_MODULES = {
    "serve": ("fastapi", "starlette", "uvicorn", "prometheus_client"),
    "judge": ("openai",),
    "demo": ("gradio",),
    "cluster": ("distributed",),
    "pipeline": ("dvc",),
}
BLOCKED = tuple(module for modules in EXTRA_MODULES.values() for module in modules)

# Modules that need an extra to import at all, and the one they need. Each is reached only through
# an entry point that checks the extra first: the stages' cluster branch (pipeline.detect.cluster_open),
# the serve command, and the tests' fake judge server.
NEEDS_EXTRA = {
    "pipeline.detect.cluster": "distributed",
    "pipeline.detect.cluster_data": "distributed",
    "pipeline.detect.cluster_extraction": "distributed",
    "pipeline.detect.cluster_sweep": "distributed",
    "pipeline.evaluate.cluster_refits": "distributed",
    "pipeline.testing.judge_server": "uvicorn",
    "lsi_guard_app.serve.app": "fastapi starlette prometheus_client",
    "lsi_guard_app.serve.metrics": "prometheus_client",
    "lsi_guard_app.serve.upstream": "starlette",
}

BLOCK = textwrap.dedent(
    f"""
    import sys
    for name in {BLOCKED!r}:
        sys.modules[name] = None  # import name -> ModuleNotFoundError, as without the package
    """
)


def run_without_extras(code: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter where every extra's modules are missing."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def project_modules() -> list[str]:
    """Every module of the shipped packages, by dotted name (``__main__`` modules run a program, so not them)."""
    names = []
    for package in ("pipeline", "stages", "lsi_guard_app"):
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
            if "__pycache__" in parts or parts[-1] == "__main__":
                continue
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_of_the_core_imports_without_the_extras() -> None:
    """All of pipeline/, stages/ and lsi_guard_app/ import, except the few modules NEEDS_EXTRA names."""
    result = run_without_extras(
        f"""
        import importlib, json
        failed = {{}}
        for name in {project_modules()!r}:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                failed[name] = str(exc)
        print(json.dumps(failed))
        """
    )
    assert result.returncode == 0, result.stderr
    failed: dict[str, str] = json.loads(result.stdout.splitlines()[-1])
    assert sorted(failed) == sorted(NEEDS_EXTRA), failed
    for name, error in failed.items():
        # Only a blocked extra's module may be what is missing, never a core dependency.
        assert any(module in error for module in NEEDS_EXTRA[name].split()), (name, error)


def test_the_extras_in_the_test_match_pyproject() -> None:
    """Every extra this test blocks is declared in pyproject.toml, and dev pulls in every other extra."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRA_MODULES) <= set(extras)
    self_references = [Requirement(line) for line in extras["dev"] if Requirement(line).name == project["name"]]
    assert [sorted(req.extras) for req in self_references] == [sorted(set(extras) - {"dev"})]
    core = {Requirement(line).name for line in project["dependencies"]}
    assert not core & {"fastapi", "uvicorn", "prometheus-client", "openai", "gradio", "dvc"}


def test_the_stages_run_in_process_without_the_cluster_extra() -> None:
    result = run_without_extras(
        """
        from pipeline.config import ClusterConfig
        from pipeline.detect.cluster_open import open_cluster, resolve_cluster
        import stages.extract, stages.sweep, stages.evaluate, stages.compare
        with open_cluster(ClusterConfig()) as client:
            assert client is None
        # auto (the shipped default) falls back to in process when distributed is missing
        with open_cluster(resolve_cluster(ClusterConfig(address="auto"), with_model=False)) as client:
            assert client is None
        assert "pipeline.detect.cluster" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]


def test_the_cli_starts_and_check_runs_without_serve_and_demo(tmp_path: Path) -> None:
    """``--help`` and ``check`` work; check reaches loading the guard, which fails only for the empty run."""
    result = run_without_extras(
        f"""
        from lsi_guard_app.cli import main
        try:
            main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        print("check exit", main(["check", "--text", "hello", "--run", {str(tmp_path)!r}]))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "demo" in result.stdout  # the help lists every command
    assert result.stdout.splitlines()[-1] == "check exit 2"
    assert "lsi-guard: error:" in result.stderr
    assert "extra" not in result.stderr and "No module named" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve"], "lsi-guard serve needs the 'serve' extra: pip install 'lsi-guard[serve]'"),
        (["demo"], "lsi-guard demo needs the 'demo' extra: pip install 'lsi-guard[demo]'"),
    ],
)
def test_serve_and_demo_name_their_missing_extra(tmp_path: Path, argv: list[str], message: str) -> None:
    result = run_without_extras(
        f"""
        from lsi_guard_app.cli import main
        print("exit", main({argv!r} + ["--run", {str(tmp_path)!r}]))
        print("guard loaded", "pipeline.defend.guard" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["exit", "2", "guard", "loaded", "False"]  # said before any model work
    assert f"lsi-guard: error: {message}" in result.stderr


def test_the_web_demo_module_names_the_demo_extra(tmp_path: Path) -> None:
    """``python -m lsi_guard_app.web`` says the same, before loading the run."""
    result = run_without_extras(
        f"""
        from lsi_guard_app.web.app import main
        print("exit", main(["--run", {str(tmp_path)!r}]))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["exit", "2"]
    assert "error: the web demo (lsi-guard demo) needs the 'demo' extra: pip install 'lsi-guard[demo]'" in result.stderr


def test_require_returns_an_installed_module() -> None:
    assert require("json", "serve", "anything") is json


def test_require_names_the_extra_of_a_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(MissingExtraError) as caught:
        require("gradio", "demo", "lsi-guard demo")
    error = caught.value
    assert str(error).startswith("lsi-guard demo needs the 'demo' extra: pip install 'lsi-guard[demo]' (")
    assert "gradio" in str(error)
    # An ImportError for callers that expect one; an LSIGuardError so the CLI prints it without a traceback.
    assert isinstance(error, ImportError) and isinstance(error, LSIGuardError)
    assert (error.name, error.extra) == ("gradio", "demo")
    assert isinstance(error.__cause__, ModuleNotFoundError)


def test_check_installed_finds_without_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "this", raising=False)
    check_installed("this", "demo", "anything")  # the stdlib's Zen of Python: importing it prints
    assert "this" not in sys.modules
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(MissingExtraError, match=r"^lsi-guard demo needs the 'demo' extra"):
        check_installed("gradio", "demo", "lsi-guard demo")
    with pytest.raises(MissingExtraError, match=r"no module named 'not_a_package\.sub'"):
        check_installed("not_a_package.sub", "demo", "lsi-guard demo")


def test_a_leftover_folder_of_an_uninstalled_extra_is_not_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip uninstall keeps files a package wrote at run time; Python would import that folder as an empty package."""
    (tmp_path / "leftover_extra" / "media_assets").mkdir(parents=True)
    (tmp_path / "leftover_extra" / "hash_seed.txt").write_text("1", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "leftover_extra", raising=False)
    leftover = r"^lsi-guard demo needs the 'demo' extra: .*only a folder named 'leftover_extra' without its code"
    with pytest.raises(MissingExtraError, match=leftover):
        check_installed("leftover_extra", "demo", "lsi-guard demo")
    with pytest.raises(MissingExtraError, match=leftover):
        require("leftover_extra", "demo", "lsi-guard demo")
    assert not installed("leftover_extra")


def test_installed_finds_a_module_without_importing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    assert installed("colorsys") and "colorsys" not in sys.modules
    assert not installed("no_such_module_here") and not installed("no_such_package.child")
    monkeypatch.setitem(sys.modules, "distributed", None)  # blocked, as when an extra is missing
    assert not installed("distributed")


def test_a_cluster_address_names_the_cluster_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(MissingExtraError, match=r"^cluster.address 'local:2' \(a Dask cluster\) needs the 'cluster'"):
        with open_cluster(ClusterConfig(address="local:2")):
            pass
    with open_cluster(ClusterConfig()) as client:  # in process: no Dask scheduler needed
        assert client is None


def test_the_http_judge_names_the_judge_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(MissingExtraError, match=r"^the HTTP judge \(judge kind http\) needs the 'judge' extra"):
        HTTPJudge(base_url="http://127.0.0.1:1/v1", model="m")
