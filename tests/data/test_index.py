"""The request index: columns, content-addressed images, atomic writes and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.config import PrepareConfig
from pipeline.data.index import INDEX_COLUMNS, build_index, read_index
from pipeline.data.sources import DatasetError
from pipeline.io import sha256_file
from tests.data.source_rows import request_row, small_source, write_source


def test_build_index_columns_images_and_order(tmp_path: Path) -> None:
    source = small_source(tmp_path / "src" / "small.jsonl")
    out = tmp_path / "out"
    index = build_index([source], out, PrepareConfig(sources=(str(source),)))
    assert tuple(index.columns) == INDEX_COLUMNS
    assert index["row_id"].to_list() == list(range(17))
    assert index["source"].unique().to_list() == ["small"]
    assert index["label"].dtype == pl.Int64 and set(index["label"]) == {0, 1}
    kinds = index["image_kind"].to_list()
    assert kinds[:5] == [None, "typography", "scene", "file", None]
    assert index["image_text"].to_list()[:3] == [None, "typed words", "a field"]
    for path, digest in zip(index["image_path"], index["image_sha256"], strict=True):
        if path is not None:
            assert Path(path).parent == out / "images" and sha256_file(path) == digest
    # Given files are copied byte for byte, not re-encoded.
    copied = Path(index["image_path"][3])
    assert copied.read_bytes() == (source.parent / "pics" / "photo.png").read_bytes()
    assert read_index(out / "index.parquet").equals(index)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 17 and summary["requests"] == 16
    assert sum(n for split in summary["splits"].values() for cell in split.values() for n in cell.values()) == 17


def test_a_failed_build_keeps_the_previous_outputs(tmp_path: Path) -> None:
    source = small_source(tmp_path / "src" / "small.jsonl")
    out = tmp_path / "out"
    config = PrepareConfig(sources=(str(source),))
    build_index([source], out, config)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = write_source(tmp_path / "src" / "broken.jsonl", [request_row(1), "{not json"])
    with pytest.raises(DatasetError, match=r"broken\.jsonl:2"):
        build_index([source, broken], out, config)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_a_failed_split_check_writes_no_images(tmp_path: Path) -> None:
    source = small_source(tmp_path / "src" / "small.jsonl")
    out = tmp_path / "out"
    build_index([source], out, PrepareConfig(sources=(str(source),)))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # Valid rows, one with a new image, but no harmful request: the split check fails.
    rows = [request_row(i) for i in range(12)]
    rows[0]["image"] = {"kind": "typography", "text": "an image not seen before"}
    benign = write_source(tmp_path / "src" / "benign.jsonl", rows)
    with pytest.raises(DatasetError, match="has no harmful rows"):
        build_index([benign], out, PrepareConfig())
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_crash_while_writing_keeps_the_previous_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = small_source(tmp_path / "src" / "small.jsonl")
    out = tmp_path / "out"
    config = PrepareConfig(sources=(str(source),))
    build_index([source], out, config)
    before = (out / "index.parquet").read_bytes()

    def half_write(self: pl.DataFrame, path: Any, **kwargs: Any) -> None:
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", half_write)
    with pytest.raises(OSError, match="disk full"):
        build_index([source], out, PrepareConfig(sources=(str(source),), seed=1))
    assert (out / "index.parquet").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_sources_with_the_same_name_are_refused(tmp_path: Path) -> None:
    first = small_source(tmp_path / "one" / "data.jsonl")
    second = small_source(tmp_path / "two" / "data.jsonl")
    with pytest.raises(DatasetError, match="source name 'data' is already used"):
        build_index([first, second], tmp_path / "out", PrepareConfig())


def test_a_split_without_both_labels_is_refused(tmp_path: Path) -> None:
    source = write_source(tmp_path / "benign_only.jsonl", [request_row(i) for i in range(12)])
    with pytest.raises(DatasetError, match="has no harmful rows"):
        build_index([source], tmp_path / "out", PrepareConfig())


def test_read_index_checks_file_and_columns(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such index"):
        read_index(tmp_path / "index.parquet")
    pl.DataFrame({"row_id": [2, 1], "text": ["b", "a"]}).write_parquet(tmp_path / "thin.parquet")
    with pytest.raises(DatasetError, match="lacks column"):
        read_index(tmp_path / "thin.parquet")
