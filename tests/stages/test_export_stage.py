"""The ``export`` stage: the run's guard as one folder under data/guard_bundle, with the stage's run record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.defend.bundle import MANIFEST, verify_bundle
from pipeline.defend.guard import Guard
from pipeline.layout import GUARD_BUNDLE
from pipeline.models.base import Request
from stages import export
from tests.app.test_guard_option import TEXTS, write_tiny_run
from tests.paths import PROJECT_ROOT


def test_the_stage_writes_the_bundle_that_loads_as_the_run(
    tiny_llava_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_tiny_run(tmp_path / "run", tiny_llava_folder)
    monkeypatch.chdir(run)
    export.main()
    bundle = run / GUARD_BUNDLE
    assert "tau=0.5000" in capsys.readouterr().out
    assert set(verify_bundle(bundle)) == {
        "detector/probe.safetensors",
        "detector/probe.json",
        "calibration.json",
        "settings.json",
        "model.json",
        "run.json",
    }
    record = json.loads((bundle / "run.json").read_text())
    assert record["model_name"] == tiny_llava_folder.name and record["device"] == "cpu"
    assert set(record) >= {"project_version", "git_commit", "libraries", "model_revision", "wall_time_s"}
    requests = [Request(text) for text in TEXTS]
    from_run = Guard.from_run(run)
    from_bundle = Guard.from_pretrained(bundle)  # the model folder it records
    assert from_bundle.scores(requests).tolist() == pytest.approx(from_run.scores(requests).tolist(), abs=1e-6)
    assert (from_bundle.tau, from_bundle.config, from_bundle.limits) == (from_run.tau, from_run.config, from_run.limits)
    # Run again: the folder is replaced whole, with nothing left beside it.
    export.main()
    assert (bundle / MANIFEST).is_file()
    assert sorted(p.name for p in (run / "data").iterdir()) == ["calibration", "guard_bundle", "probe"]


def test_dvc_yaml_shares_the_bundle_after_calibrate() -> None:
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    assert names.index("export") == names.index("calibrate") + 1
    stage = stages["export"]
    assert stage["cmd"] == "python -m stages.export"
    assert stage["outs"] == [{str(GUARD_BUNDLE): {"persist": True}}]
    assert {"data/probe/probe.safetensors", "data/calibration/calibration.json", "data/model"} <= set(stage["deps"])
    assert set(stage["params"]) == {"model", "prompts", "guard", "ecso", "limits"}
    assert f"/{GUARD_BUNDLE}/" in (PROJECT_ROOT / ".gitignore").read_text().splitlines()
