"""The ``build`` stage end to end, from a params file in a temporary working directory."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import yaml

from pipeline.data.sources import read_requests
from stages import build, run_stage
from tests.data.benchmarks.test_files import write_benchmarks
from tests.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT


def _params(folder: Path, **build_section: object) -> None:
    """A params file whose build section is ``build_section``; the public sources are off unless given."""
    (folder / "params.yaml").write_text(yaml.safe_dump({"build": {"public": "", **build_section}}))


def test_stage_writes_sources_list_and_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    benchmarks = write_benchmarks(tmp_path / "benchmarks")
    _params(tmp_path, benchmarks=str(benchmarks), per_source=4)
    monkeypatch.chdir(tmp_path)
    build.main()
    listed = json.loads(Path("data/built/sources.json").read_text())
    assert listed == ["data/built/mmsb-typo.jsonl", "data/built/mmsb-text.jsonl", "data/built/mmsb-wrapped.jsonl"]
    for path in listed:
        records = read_requests(path)  # valid request sources, named by their stem
        assert len(records) == 8 and {r.label for r in records} == {"harmful", "benign"}
    summary = json.loads(Path("data/built/summary.json").read_text())
    assert set(summary) == {"mmsb-typo", "mmsb-text", "mmsb-wrapped"}
    assert summary["mmsb-typo"]["rows"] == {"harmful": 4, "benign": 4}
    assert summary["mmsb-typo"]["length_auroc"] == pytest.approx(0.5)
    printed = capsys.readouterr().out
    assert (
        "mmsb-text" in printed
        and "length AUROC" in printed
        and "wrote data/built/sources.json (3 source(s))" in printed
    )
    assert not list(Path("data/built").glob(".*.tmp"))  # atomic writes leave no temp files


def test_stale_sources_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    benchmarks = write_benchmarks(tmp_path / "benchmarks")
    monkeypatch.chdir(tmp_path)
    Path("data/built").mkdir(parents=True)
    Path("data/built/old-source.jsonl").write_text("{}\n")
    _params(tmp_path, benchmarks=str(benchmarks), per_source=4)
    build.main()
    assert not Path("data/built/old-source.jsonl").exists()
    # Switching to the confounded setup leaves only the naive source behind.
    _params(tmp_path, benchmarks=str(benchmarks), per_source=4, match_style=False)
    build.main()
    assert json.loads(Path("data/built/sources.json").read_text()) == ["data/built/mmsb-naive.jsonl"]
    assert sorted(p.name for p in Path("data/built").glob("*.jsonl")) == ["mmsb-naive.jsonl"]


def test_empty_benchmarks_writes_an_empty_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data/built").mkdir(parents=True)
    Path("data/built/mmsb-text.jsonl").write_text("{}\n")
    _params(tmp_path, benchmarks="")
    build.main()
    assert json.loads(Path("data/built/sources.json").read_text()) == []
    assert json.loads(Path("data/built/summary.json").read_text()) == {}
    assert not list(Path("data/built").glob("*.jsonl"))
    assert "no sources built" in capsys.readouterr().out


def test_missing_benchmark_folder_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _params(tmp_path, benchmarks="no/such/folder")
    with pytest.raises(SystemExit) as info:
        run_stage(build.main)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: no/such/folder: no such benchmark folder (build.benchmarks)\n"
    assert not Path("data/built").exists()


def test_malformed_benchmark_file_exits_1_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    benchmarks = write_benchmarks(tmp_path / "benchmarks")
    (benchmarks / "MM-Vet" / "mm-vet_metadata.json").write_text("[{")
    _params(tmp_path, benchmarks=str(benchmarks), per_source=4)
    monkeypatch.chdir(tmp_path)
    # Run the module as ``python -m stages.build`` does, through its __main__ block.
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "stages" / "build.py"), run_name="__main__")
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "mm-vet_metadata.json: invalid JSON" in err


def test_too_large_per_source_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    benchmarks = write_benchmarks(tmp_path / "benchmarks")
    _params(tmp_path, benchmarks=str(benchmarks), per_source=500)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_stage(build.main)
    err = capsys.readouterr().err
    assert err.startswith("error: mmsb-typo: ") and "build.per_source" in err and err.count("\n") == 1


def test_the_default_build_writes_the_public_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _params(tmp_path, public=str(PROJECT_ROOT / "data" / "public"), per_source=10)
    build.main()
    listed = json.loads(Path("data/built/sources.json").read_text())
    assert [Path(p).stem for p in listed] == ["public-imperative", "public-questions", "public-wrapped", "public-typo"]
    summary = json.loads(Path("data/built/summary.json").read_text())
    for name, row in summary.items():
        assert row["rows"] == {"harmful": 10, "benign": 10}, name
        assert abs(row["length_auroc"] - 0.5) < 0.15, name  # matched in length


def test_a_missing_public_folder_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _params(tmp_path, public="no-such-folder")
    with pytest.raises(SystemExit) as exit_info:
        run_stage(build.main)
    assert exit_info.value.code == 1
