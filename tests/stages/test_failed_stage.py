"""A failed stage loses no output: ``dvc repro`` that fails leaves the persisted outputs byte-identical.

DVC deletes a stage's outputs before running it unless they are ``persist: true``; dvc.yaml
persists the outputs of the cheap stages whose inputs users edit, and those stages replace their
folders whole. The fast tests run ``dvc repro`` on stand-in stages declared with the real stages'
outputs (so dvc.yaml's settings are what is tested) and writing through the same helpers; the
integration test runs the real ``prepare`` and ``train`` stages on a tiny source and a synthetic
activation store.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.config import params_from_dict
from pipeline.detect.provenance import expected_provenance
from pipeline.detect.store import ActivationStore
from pipeline.detect.store_schema import Provenance
from pipeline.models.embedded import PROVENANCE_FILE
from tests.paths import PROJECT_ROOT
from tests.snapshots import folder_digests
from tests.stages.test_pipeline_dvc import tiny_requests

DVC_YAML = PROJECT_ROOT / "dvc.yaml"
DEV_DVC_YAML = PROJECT_ROOT / "dev" / "dvc.yaml"
# Cheap stages whose inputs users edit: a failed run must leave their previous outputs in place.
PERSISTED = {"build", "prepare", "sweep", "train", "calibrate", "evaluate", "report"}
OUTPUT_KINDS = ("outs", "metrics", "plots")
WHOLE_FOLDER_WRITERS = ("replace_dir_atomic", "restore_dir_on_failure")


def stages_of(dvc_yaml: Path) -> dict[str, dict[str, Any]]:
    """The stages of a dvc.yaml, as written."""
    return yaml.safe_load(dvc_yaml.read_text())["stages"]


def outputs(stage: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every output of a stage (outs, metrics, plots) with its options (empty for a bare path)."""
    found = []
    for kind in OUTPUT_KINDS:
        for entry in stage.get(kind, []):
            if isinstance(entry, str):
                found.append((entry, {}))
            else:
                ((path, options),) = entry.items()
                found.append((path, options or {}))
    return found


def imported_names(module: Path) -> set[str]:
    """Names a module imports with ``from ... import``."""
    tree = ast.parse(module.read_text())
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}


def digest_tree(*folders: Path) -> dict[str, str]:
    """Every file under the folders (path relative to the project) with the SHA-256 of its bytes."""
    root = folders[0].parent.parent
    return {key: value for folder in folders for key, value in folder_digests(folder, root).items()}


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m dvc`` in ``project`` with this interpreter first on PATH and the project's code importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env["DVC_NO_ANALYTICS"] = "1"
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result


def init_project(project: Path, stages: dict[str, Any], params: dict[str, Any]) -> None:
    """A DVC project (no git) holding ``stages`` and ``params``."""
    project.mkdir(parents=True, exist_ok=True)
    dvc(project, "init", "--no-scm", "-q")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    write_params(project, params)


def write_params(project: Path, params: dict[str, Any]) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# The dvc.yaml settings themselves.


@pytest.mark.parametrize("name", sorted(PERSISTED))
def test_cheap_stages_persist_every_output_and_write_whole_folders(name: str) -> None:
    stage = stages_of(DVC_YAML)[name]
    not_persisted = [path for path, options in outputs(stage) if options.get("persist") is not True]
    assert not not_persisted, f"dvc.yaml stage {name!r}: outputs without persist: true: {not_persisted}"
    module = PROJECT_ROOT / "stages" / f"{name}.py"
    # DVC no longer empties a persisted folder: the stage must replace it whole or put it back on failure.
    assert imported_names(module) & set(WHOLE_FOLDER_WRITERS), f"{module}: writes its outputs without a folder swap"


def test_every_output_is_cached_or_persisted() -> None:
    """A failed run must never lose an output for good: either DVC keeps it or ``dvc checkout`` restores it."""
    lost = [
        f"{dvc_yaml.relative_to(PROJECT_ROOT)} stage {name!r}: {path}"
        for dvc_yaml in (DVC_YAML, DEV_DVC_YAML)
        for name, stage in stages_of(dvc_yaml).items()
        for path, options in outputs(stage)
        if options.get("cache", True) is False and options.get("persist") is not True
    ]
    assert not lost, "uncached outputs that DVC deletes before the stage runs:\n" + "\n".join(lost)


def test_dev_stages_persist_their_uncached_outputs_and_write_whole_folders() -> None:
    for name, stage in stages_of(DEV_DVC_YAML).items():
        assert all(options.get("persist") is True for _, options in outputs(stage)), name
        module = PROJECT_ROOT / "stages" / f"{stage['cmd'].split()[2].split('.')[1]}.py"
        assert "replace_dir_atomic" in imported_names(module), module


# Stand-in stages with the real stages' outputs: dvc repro, then a failing dvc repro.

STAND_IN = textwrap.dedent(
    """
    # A stage that writes the files of a real one through the same helpers, and fails midway when told.
    import sys
    from pathlib import Path

    import yaml

    from pipeline.io import replace_dir_atomic, restore_dir_on_failure, write_text_atomic

    stage = sys.argv[1]
    params = yaml.safe_load(Path("params.yaml").read_text())[stage]
    version, fail = params["version"], params["fail"]


    def midway():
        if fail:
            sys.exit(f"error: {stage}: failing after the first file, as params.yaml asks")


    if stage == "train":
        with replace_dir_atomic(Path("data/probe")) as out:
            for name in ("probe.safetensors", "probe.json", "history.json", "train_metrics.json"):
                write_text_atomic(out / name, f"{name} v{version}\\n")
                midway()
    else:
        prepared = Path("data/prepared")
        with restore_dir_on_failure(prepared):
            (prepared / "images").mkdir(parents=True, exist_ok=True)
            write_text_atomic(prepared / "images" / f"image-v{version}.png", f"image v{version}\\n")
            midway()
            write_text_atomic(prepared / "index.parquet", f"index v{version}\\n")
            write_text_atomic(prepared / "summary.json", f"summary v{version}\\n")
            for image in (prepared / "images").iterdir():  # stale images go, as build_index prunes them
                if image.name != f"image-v{version}.png":
                    image.unlink()
    """
)


def stand_in_stages(strip_persist: bool) -> dict[str, Any]:
    """``prepare`` and ``train`` with dvc.yaml's outputs as written (or without persist), run by the stand-in."""
    real = stages_of(DVC_YAML)
    stages = {}
    for name, deps in (("prepare", ["stand_in.py"]), ("train", ["stand_in.py", "data/prepared"])):
        stage: dict[str, Any] = {"cmd": f"python stand_in.py {name}", "deps": deps, "params": [name]}
        for kind in OUTPUT_KINDS:
            if kind in real[name]:
                stage[kind] = json.loads(json.dumps(real[name][kind]))
                if strip_persist:
                    for entry in stage[kind]:
                        if isinstance(entry, dict):
                            next(iter(entry.values())).pop("persist", None)
        stages[name] = stage
    return stages


def stand_in_project(tmp_path: Path, strip_persist: bool) -> Path:
    project = tmp_path / "project"
    init_project(
        project,
        stand_in_stages(strip_persist),
        {"prepare": {"version": 1, "fail": False}, "train": {"version": 1, "fail": False}},
    )
    (project / "stand_in.py").write_text(STAND_IN)
    dvc(project, "repro")
    return project


@pytest.mark.parametrize("broken", ["prepare", "train"])
def test_a_failed_stand_in_stage_leaves_every_output_byte_identical(tmp_path: Path, broken: str) -> None:
    project = stand_in_project(tmp_path, strip_persist=False)
    folders = (project / "data" / "prepared", project / "data" / "probe")
    before = digest_tree(*folders)
    assert "data/probe/train_metrics.json" in before and "data/prepared/images/image-v1.png" in before
    params = {"prepare": {"version": 1, "fail": False}, "train": {"version": 1, "fail": False}}
    params[broken] = {"version": 2, "fail": True}
    write_params(project, params)
    failed = dvc(project, "repro", check=False)
    assert failed.returncode != 0
    assert f"error: {broken}: failing after the first file" in failed.stderr
    assert digest_tree(*folders) == before
    assert sorted(p.name for p in (project / "data").iterdir()) == ["prepared", "probe"]  # no temp folder left
    # The next good run replaces them, with nothing stale left over.
    write_params(project, {"prepare": {"version": 3, "fail": False}, "train": {"version": 3, "fail": False}})
    dvc(project, "repro")
    after = digest_tree(*folders)
    assert sorted(after) == sorted(path.replace("v1", "v3") for path in before)
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout


def test_without_persist_dvc_deletes_the_outputs_and_checkout_restores_them(tmp_path: Path) -> None:
    """Why dvc.yaml persists: DVC empties the outputs first; being cached, ``dvc checkout`` brings them back."""
    project = stand_in_project(tmp_path, strip_persist=True)
    probe = project / "data" / "probe"
    before = digest_tree(probe)
    write_params(project, {"prepare": {"version": 1, "fail": False}, "train": {"version": 2, "fail": True}})
    assert dvc(project, "repro", check=False).returncode != 0
    assert not (probe / "train_metrics.json").exists() and not (probe / "history.json").exists()
    dvc(project, "checkout", "train")
    assert digest_tree(probe) == before


# The real stages.


def model_metadata(folder: Path, hidden: int = 8) -> Path:
    """The metadata files of an embedded model folder: all a store's readers check (no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROVENANCE_FILE).write_text(json.dumps({"name": "Synthetic", "source_sha256": "ab" * 32}))
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "hidden_size": hidden}))
    return folder


def synthetic_store(path: Path, rows: int, provenance: Provenance) -> None:
    """A complete activation store of random states for rows ``0..rows-1`` (the index numbers rows from 0)."""
    store = ActivationStore.create(path, list(range(rows)), provenance)
    shape = (rows, len(provenance.variants), len(provenance.layers), provenance.hidden_size)
    store.write_block(0, np.random.default_rng(0).normal(size=shape).astype(np.float32))
    store.mark_complete()


@pytest.mark.integration
def test_failed_real_train_and_prepare_leave_probe_and_index_byte_identical(tmp_path: Path) -> None:
    project = tmp_path / "project"
    real = stages_of(DVC_YAML)
    source = project / "data" / "demo" / "requests.jsonl"
    tiny_requests(source, per_group=4)
    rows = len(source.read_text().splitlines())
    # The real stages' commands and outputs; the code deps are the project's own (it runs from PROJECT_ROOT).
    stages = {
        "prepare": {**real["prepare"], "deps": ["data/demo"]},
        "train": {
            **real["train"],
            "deps": ["data/prepared/index.parquet", "data/activations/store.zarr", "data/sweep/sweep.json"],
        },
    }
    params = {
        "prepare": {"sources": ["data/demo/requests.jsonl"]},
        "train": {"fusion_layer": 2, "safety_layer": 1, "epochs": 2, "batch_size": 8},
        "extract": {"layers": [0, 1, 2]},
        "guard": {"detector": "lsi"},
        "limits": {"max_request_chars": 32768},
        "model": {"kind": "embedded", "path": str(model_metadata(tmp_path / "model")), "dtype": "float32"},
    }
    init_project(project, stages, params)
    provenance = expected_provenance(params_from_dict(params))
    synthetic_store(project / "data" / "activations" / "store.zarr", rows, provenance)
    sweep = {"detectors": [{"name": "lsi", "held_out_auroc": 0.5, "per_group": {}}]}
    (project / "data" / "sweep").mkdir(parents=True)
    (project / "data" / "sweep" / "sweep.json").write_text(json.dumps(sweep))
    dvc(project, "repro")
    folders = (project / "data" / "prepared", project / "data" / "probe")
    before = digest_tree(*folders)
    assert "data/probe/train_metrics.json" in before and "data/prepared/index.parquet" in before

    # train fails when it opens the store: params name a layer (as if extracted) that the store does not hold.
    params["extract"]["layers"] = [0, 1, 2, 7]
    params["train"]["safety_layer"] = 7
    write_params(project, params)
    failed = dvc(project, "repro", check=False)
    assert failed.returncode != 0 and "Running stage 'train'" in failed.stdout
    assert "written under a different setup" in failed.stderr and "layers: store has" in failed.stderr, failed.stderr
    assert digest_tree(*folders) == before

    # prepare fails: a malformed row in its source.
    params["extract"]["layers"] = [0, 1, 2]
    params["train"]["safety_layer"] = 1
    write_params(project, params)
    with source.open("a") as handle:
        handle.write('{"request_id": "bad-1", "category": "weapons", "label": "harmful", "text": ""}\n')
    failed = dvc(project, "repro", check=False)
    assert failed.returncode != 0 and f"requests.jsonl:{rows + 1}" in failed.stderr, failed.stderr
    assert digest_tree(*folders) == before
    assert sorted(p.name for p in (project / "data").iterdir()) == ["activations", "demo", "prepared", "probe", "sweep"]
