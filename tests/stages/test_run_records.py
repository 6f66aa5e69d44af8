"""Every stage's metrics file carries a run record; the record's wall time runs from the stage's start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import stages
from stages import run_record, run_stage
from tests.defend.test_ecso import test_stage_main_end_to_end_with_fakes as run_ecso_stage_with_fakes
from tests.defend.test_guard import test_stage_main_end_to_end_with_fakes as run_guard_stage_with_fakes


def test_the_wall_time_runs_from_the_start_of_run_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 112.5])
    monkeypatch.setattr(stages.time, "monotonic", lambda: next(clock))
    records = []
    run_stage(lambda: records.append(run_record("m", "r", "cpu")))
    assert records[0]["wall_time_s"] == 12.5
    assert (records[0]["model_name"], records[0]["model_revision"], records[0]["device"]) == ("m", "r", "cpu")


@pytest.mark.parametrize(
    ("stage", "summary"),
    [(run_ecso_stage_with_fakes, "data/ecso/summary.json"), (run_guard_stage_with_fakes, "data/guard/summary.json")],
    ids=["ecso", "guard"],
)
def test_a_model_stage_records_its_model_and_device(
    stage: object, summary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage(tmp_path, monkeypatch)  # type: ignore[operator]
    record = json.loads((tmp_path / summary).read_text())["run"]
    assert record["model_name"] == "fake" and record["device"] == "cpu"
    assert set(record) >= {"project_version", "git_commit", "git_dirty", "python", "libraries", "wall_time_s"}
