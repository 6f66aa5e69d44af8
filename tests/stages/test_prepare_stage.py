"""The ``prepare`` stage end to end, from a params file in a temporary working directory."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import polars as pl
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from pipeline.data.index import read_index
from pipeline.data.sources import read_requests
from stages import prepare, run_stage
from tests.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT
DEMO = ROOT / "data" / "demo" / "requests.jsonl"


def _params(folder: Path, sources: list[str], **prepare_extra: object) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"prepare": {"sources": sources, **prepare_extra}}))
    return path


def test_stage_prepares_the_demo_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _params(tmp_path, [str(DEMO)])
    monkeypatch.chdir(tmp_path)
    prepare.main()
    printed = capsys.readouterr().out
    assert "rows from 1 source(s)" in printed and "data/prepared/index.parquet" in printed
    index = read_index("data/prepared/index.parquet")
    assert index.height >= 340 and index["source"].unique().to_list() == ["requests"]
    images = index.filter(pl.col("image_path").is_not_null())
    # Image paths are relative to the working directory the stage ran in.
    assert all(Path(p).is_file() and p.startswith("data/prepared/images/") for p in images["image_path"])
    assert len(list(Path("data/prepared/images").iterdir())) == images["image_sha256"].n_unique()
    summary = json.loads(Path("data/prepared/summary.json").read_text())
    assert summary["rows"] == index.height and set(summary["splits"]) == {"train", "val", "calib", "test"}


def test_bad_params_end_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _params(tmp_path, [str(DEMO)], shuffle=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        run_stage(prepare.main)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "shuffle" in err and err.count("\n") == 1
    assert not Path("data/prepared").exists()


def test_bad_source_exits_1_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(
        json.dumps({"request_id": "a", "category": "c", "label": "benign", "text": "fine"})
        + "\n"
        + json.dumps({"request_id": "b", "category": "c", "label": "maybe", "text": "not fine"})
        + "\n"
    )
    _params(tmp_path, [str(source)])
    monkeypatch.chdir(tmp_path)
    # Run the module as ``python -m stages.prepare`` does, through its __main__ block.
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "stages" / "prepare.py"), run_name="__main__")
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "bad.jsonl:2" in err and "unknown label 'maybe'" in err
    assert not (tmp_path / "out" / "index.parquet").exists()


LOOKALIKE = ROOT / "data" / "demo" / "lookalike.jsonl"


def test_stage_adds_the_built_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = tmp_path / "data" / "built"
    built.mkdir(parents=True)
    rows = [
        {"request_id": f"{label}-{i}", "category": "c", "label": label, "text": f"{label} request {i}", "image": None}
        for i in range(12)
        for label in ("harmful", "benign")
    ]
    (built / "extra.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # The lookalike file is listed twice (params and built list): it is read once.
    (built / "sources.json").write_text(json.dumps(["data/built/extra.jsonl", str(LOOKALIKE)]))
    _params(tmp_path, [str(LOOKALIKE)])
    monkeypatch.chdir(tmp_path)
    prepare.main()
    index = read_index("data/prepared/index.parquet")
    assert index["source"].unique(maintain_order=True).to_list() == ["lookalike", "extra"]
    assert index.filter(pl.col("source") == "extra").height == 24


def test_unreadable_built_list_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data" / "built").mkdir(parents=True)
    (tmp_path / "data" / "built" / "sources.json").write_text(json.dumps({"not": "a list"}))
    _params(tmp_path, [str(LOOKALIKE)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        run_stage(prepare.main)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: data/built/sources.json: expected a JSON list") and err.count("\n") == 1


def test_lookalike_demo_source_is_valid_and_balanced() -> None:
    records = read_requests(LOOKALIKE)
    assert 70 <= len(records) <= 90
    categories = {r.category for r in read_requests(DEMO)}
    assert {r.category for r in records} == categories
    for category in categories:
        assert {r.label for r in records if r.category == category} == {"harmful", "benign"}
    # Typography forms share a request id with a plain-text form of the same request.
    texts = {r.request_id: r.text for r in records if r.image_kind is None}
    typography = [r for r in records if r.image_kind == "typography"]
    assert len(typography) >= 8 and all(texts[r.request_id] == r.image_text for r in typography)
    assert {r.label for r in typography} == {"harmful", "benign"}
    # Not separable by wording or length alone: "how do I" on both sides, lengths alike, nothing copied.
    plain = [r for r in records if r.image_kind is None]
    for label in ("harmful", "benign"):
        assert sum(r.text.lower().startswith("how do i") for r in plain if r.label == label) >= 8
    auroc = roc_auc_score([r.label == "harmful" for r in plain], [len(r.text) for r in plain])
    assert 0.35 <= auroc <= 0.65
    assert not {r.text for r in plain} & {r.text for r in read_requests(DEMO)}
