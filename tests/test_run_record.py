"""The run record: code version and git state, libraries, device, model and wall time; and version warnings."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest

import pipeline.run_record as run_record
from pipeline import __version__
from pipeline.run_record import (
    NOT_INSTALLED,
    UNKNOWN,
    LibraryVersionWarning,
    build_run_record,
    git_state,
    library_versions,
    version_mismatch_message,
    warn_if_versions_differ,
)


def git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_a_record_names_code_libraries_device_model_and_time(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / "tracked.txt").write_text("one\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git(tmp_path, "add", "tracked.txt", "dvc.lock")
    git(tmp_path, "commit", "-q", "-m", "first")
    record = build_run_record(model_name="tiny", model_revision="abc", device="cpu", wall_time_s=1.23456, root=tmp_path)
    assert record["project_version"] == __version__
    assert record["git_commit"] == git(tmp_path, "rev-parse", "HEAD") and record["git_dirty"] is False
    assert set(record["libraries"]) == {"torch", "transformers", "zarr", "dvc"}
    assert record["libraries"]["torch"] == library_versions(["torch"])["torch"] != NOT_INSTALLED
    assert (record["device"], record["model_name"], record["model_revision"]) == ("cpu", "tiny", "abc")
    assert record["wall_time_s"] == 1.235 and record["python"].count(".") == 2
    json.dumps(record)  # goes into metrics files as is

    (tmp_path / "untracked.txt").write_text("data\n")
    assert git_state(tmp_path)["dirty"] is False  # untracked files (data, the model link) do not count
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert git_state(tmp_path)["dirty"] is False  # dvc repro rewrites dvc.lock during a clean run
    (tmp_path / "tracked.txt").write_text("two\n")
    assert git_state(tmp_path)["dirty"] is True


def test_outside_a_checkout_or_without_git_the_commit_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert git_state(tmp_path) == {"commit": UNKNOWN, "dirty": None}

    def no_git(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(run_record.subprocess, "run", no_git)
    record = build_run_record(model_name="m", model_revision="r", device="cpu", wall_time_s=0.0, root=tmp_path)
    assert (record["git_commit"], record["git_dirty"]) == (UNKNOWN, None)

    def slow_git(*args: object, **kwargs: object) -> None:
        raise subprocess.TimeoutExpired("git", run_record.GIT_TIMEOUT_S)

    monkeypatch.setattr(run_record.subprocess, "run", slow_git)
    assert git_state(tmp_path)["commit"] == UNKNOWN


def test_library_versions_come_from_metadata_and_name_absent_ones() -> None:
    versions = library_versions(["zarr", "no-such-distribution-here"])
    assert versions["zarr"].startswith("3.") and versions["no-such-distribution-here"] == NOT_INSTALLED


def test_a_version_difference_is_named_both_ways() -> None:
    now = {"torch": "2.13.0", "transformers": "5.1.0"}
    assert version_mismatch_message("store.zarr", dict(now), now) is None
    assert version_mismatch_message("store.zarr", {"zarr": "2"}, now) is None  # only what both name
    message = version_mismatch_message("store.zarr", {"torch": "2.12.0", "transformers": "5.0.1"}, now)
    assert message == (
        "store.zarr was written with torch 2.12.0, transformers 5.0.1; "
        "this is torch 2.13.0, transformers 5.1.0: hidden states may differ"
    )


def test_warn_if_versions_differ_warns_only_on_a_difference() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_versions_differ("x", library_versions(run_record.HIDDEN_STATE_LIBRARIES))
        warn_if_versions_differ("x", None)  # written before versions were recorded
    with pytest.warns(LibraryVersionWarning, match=r"probe\.json was written with torch 0\.0\.1; this is torch "):
        warn_if_versions_differ("probe.json", {"torch": "0.0.1"})
