"""Request sources: validation errors, the index, grouped splits, atomic writes, the demo data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

import pipeline.data.sources as sources_module
from pipeline.config import LABELS, SPLITS, LimitsConfig, PrepareConfig
from pipeline.data.images import sha256_file
from pipeline.data.sources import (
    INDEX_COLUMNS,
    DatasetError,
    RequestRecord,
    assign_splits,
    build_index,
    read_index,
    read_requests,
)
from tests.paths import PROJECT_ROOT

DEMO = PROJECT_ROOT / "data" / "demo" / "requests.jsonl"


def _row(i: int, label: str = "benign", category: str = "cooking", **extra: Any) -> dict[str, Any]:
    return {"request_id": f"r{i}", "category": category, "label": label, "text": f"request number {i}", **extra}


def _write(path: Path, rows: list[Any]) -> Path:
    """Rows as JSONL; a str row is written verbatim (to plant broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _small_source(path: Path) -> Path:
    """Sixteen requests over two categories and both labels, with every image kind."""
    image = path.parent / "pics" / "photo.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(image)
    rows = []
    for i in range(16):
        label = "harmful" if i % 2 else "benign"
        category = "a" if i % 4 < 2 else "b"
        rows.append(_row(i, label, category))
    rows[1]["image"] = {"kind": "typography", "text": "typed words"}
    rows[2]["image"] = {"kind": "scene", "seed": 5, "caption": "a field"}
    rows[3]["image"] = "pics/photo.png"
    rows.append({**_row(1, "harmful", "a"), "text": "the same request, as plain text"})
    return _write(path, rows)


@pytest.fixture(scope="module")
def demo_records() -> list[RequestRecord]:
    return read_requests(DEMO)


# --- validation ------------------------------------------------------------------------------

BAD_LINES: dict[str, tuple[Any, str]] = {
    "invalid json": ('{"request_id": "x", "label": ', "invalid JSON"),
    "not an object": ("[1, 2]", "JSON object"),
    "missing field": ({"request_id": "x", "category": "c", "label": "benign"}, "missing field.*text"),
    "empty text": (_row(9, text="   "), "'text' is empty"),
    "unknown label": (_row(9, label="unsafe"), r"unknown label 'unsafe'; allowed: \['benign', 'harmful'\]"),
    "unknown image kind": (_row(9, image={"kind": "video", "text": "x"}), "unknown image kind 'video'"),
    "typography without text": (_row(9, image={"kind": "typography"}), "typography image takes exactly"),
    "boolean seed": (_row(9, image={"kind": "scene", "seed": True, "caption": "c"}), "seed must be"),
    "missing image file": (_row(9, image="nowhere.png"), "nowhere.png: image file not found"),
    "corrupt image file": (_row(9, image="corrupt.png"), "corrupt.png: not a readable image"),
    "misspelt image key": (
        _row(9, imgae="pic.png"),
        r"unknown key\(s\) \['imgae'\] \('imgae': did you mean 'image'\?\); "
        r"known keys: \['request_id', 'category', 'label', 'text', 'image'\]",
    ),
    "lone surrogate": (
        '{"request_id": "r9", "category": "c", "label": "benign", "text": "a \\ud83d b"}',
        "lone surrogate",
    ),
    "surrogate in image text": (
        _row(9, image={"kind": "typography", "text": "x\udc00"}),
        r"field 'image\.text' holds a lone surrogate \(\\udc00\)",
    ),
    "text over the limit": (_row(9, text="z" * 32_769), r"field 'text' is 32,769 characters, over the limit of 32,768"),
    "absolute image path": (_row(9, image="/etc/x.png"), r"field 'image' is an absolute path \(/etc/x\.png\)"),
    "image outside the folder": (_row(9, image="../up.png"), r"image '\.\./up\.png' resolves to .*up\.png, outside"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_rows_name_file_and_line(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthen nothing useful")
    Image.new("RGB", (4, 4)).save(tmp_path / "up.png")  # a real image, but outside the source's folder
    bad, message = BAD_LINES[case]
    source = _write(folder / "mixed.jsonl", [_row(1), _row(2), bad, _row(3)])
    with pytest.raises(DatasetError, match=rf"mixed\.jsonl:3: .*{message}"):
        read_requests(source)


def test_unknown_label_lists_the_allowed_labels(tmp_path: Path) -> None:
    source = _write(tmp_path / "s.jsonl", [_row(1, label="spam")])
    with pytest.raises(DatasetError) as info:
        read_requests(source)
    assert all(label in str(info.value) for label in LABELS)


def test_missing_and_empty_sources_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="absent.jsonl: no such request source"):
        read_requests(tmp_path / "absent.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="blank.jsonl: no requests"):
        read_requests(tmp_path / "blank.jsonl")


def test_one_request_id_cannot_carry_two_labels(tmp_path: Path) -> None:
    source = _write(tmp_path / "s.jsonl", [_row(1, "benign"), {**_row(1, "harmful"), "text": "other"}])
    expected = r"s\.jsonl:2: request_id 'r1' is harmful/cooking here but benign/cooking on line 1"
    with pytest.raises(DatasetError, match=expected):
        read_requests(source)


def test_valid_rows_parse_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    source = _small_source(tmp_path / "src" / "small.jsonl")
    source.write_text(source.read_text() + "\n")
    records = read_requests(source)
    assert len(records) == 17 and records[0].source == "small" and records[0].line == 1
    assert records[1].image_kind == "typography" and records[1].image_text == "typed words"
    assert records[2].image_kind == "scene" and records[2].image_seed == 5
    assert records[3].image_kind == "file" and records[3].image_file == (source.parent / "pics" / "photo.png").resolve()


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    source = tmp_path / "bom.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + (json.dumps(_row(1)) + "\n" + json.dumps(_row(2)) + "\n").encode())
    assert [r.request_id for r in read_requests(source)] == ["r1", "r2"]


def test_line_separators_inside_strings_stay_in_their_record(tmp_path: Path) -> None:
    # JSON allows U+2028, U+2029 and U+0085 raw inside strings; only "\n" ends a JSON-lines record.
    odd = ["first\u2028second", "para\u2029graph", "next\x85line"]
    rows = [_row(i, text=text) for i, text in enumerate(odd)]
    source = tmp_path / "separators.jsonl"
    source.write_text("".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows), encoding="utf-8")
    assert "\u2028" in source.read_text(encoding="utf-8"), "the separator must be written raw for this test"
    records = read_requests(source)
    assert [r.text for r in records] == odd and [r.line for r in records] == [1, 2, 3]


def test_an_image_symlink_is_judged_by_where_it_points(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    (folder / "pics").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(folder / "pics" / "real.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    (folder / "inside.png").symlink_to(folder / "pics" / "real.png")
    (folder / "outside.png").symlink_to(tmp_path / "secret.png")
    inside = read_requests(_write(folder / "ok.jsonl", [_row(1, image="inside.png")]))
    assert inside[0].image_file == (folder / "pics" / "real.png").resolve()
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: image 'outside\.png' resolves to .*secret\.png, outside"):
        read_requests(_write(folder / "bad.jsonl", [_row(1, image="outside.png")]))


def test_the_given_limits_apply(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    source = _write(tmp_path / "s.jsonl", [_row(1, text="eleven char"), _row(2, image="photo.png")])
    assert len(read_requests(source)) == 2
    with pytest.raises(DatasetError, match=r"s\.jsonl:1: field 'text' is 11 characters, over the limit of 10"):
        read_requests(source, LimitsConfig(max_request_chars=10))
    with pytest.raises(DatasetError, match=r"s\.jsonl:2: .*photo\.png: 8x8 = 64 pixels, over the limit of 63"):
        read_requests(source, LimitsConfig(max_image_pixels=63))
    typed = _write(tmp_path / "t.jsonl", [_row(1, image={"kind": "typography", "text": "hello"})])
    with pytest.raises(DatasetError, match=r"t\.jsonl:1: typography image: 760x760 = 577,600 pixels, over the limit"):
        read_requests(typed, LimitsConfig(max_image_pixels=577_599))


def test_oversized_typography_is_refused_without_rendering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rendering(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the typography image was rendered")

    monkeypatch.setattr(sources_module, "render_typography", no_rendering)
    rows = [_row(i, "harmful" if i % 2 else "benign") for i in range(12)]
    rows[5]["image"] = {"kind": "typography", "text": "a line\n" * 2000}
    source = _write(tmp_path / "typed.jsonl", rows)
    with pytest.raises(
        DatasetError, match=r"typed\.jsonl:6: typography image: 760x\d+ = .* over the limit of 40,000,000"
    ):
        build_index([source], tmp_path / "out", PrepareConfig())
    assert not (tmp_path / "out").exists()


# --- the index -------------------------------------------------------------------------------


def test_build_index_columns_images_and_order(tmp_path: Path) -> None:
    source = _small_source(tmp_path / "src" / "small.jsonl")
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
    source = _small_source(tmp_path / "src" / "small.jsonl")
    out = tmp_path / "out"
    config = PrepareConfig(sources=(str(source),))
    build_index([source], out, config)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = _write(tmp_path / "src" / "broken.jsonl", [_row(1), "{not json"])
    with pytest.raises(DatasetError, match=r"broken\.jsonl:2"):
        build_index([source, broken], out, config)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_a_failed_split_check_writes_no_images(tmp_path: Path) -> None:
    source = _small_source(tmp_path / "src" / "small.jsonl")
    out = tmp_path / "out"
    build_index([source], out, PrepareConfig(sources=(str(source),)))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # Valid rows, one with a new image, but no harmful request: the split check fails.
    rows = [_row(i) for i in range(12)]
    rows[0]["image"] = {"kind": "typography", "text": "an image not seen before"}
    benign = _write(tmp_path / "src" / "benign.jsonl", rows)
    with pytest.raises(DatasetError, match="has no harmful rows"):
        build_index([benign], out, PrepareConfig())
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_crash_while_writing_keeps_the_previous_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _small_source(tmp_path / "src" / "small.jsonl")
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
    first = _small_source(tmp_path / "one" / "data.jsonl")
    second = _small_source(tmp_path / "two" / "data.jsonl")
    with pytest.raises(DatasetError, match="source name 'data' is already used"):
        build_index([first, second], tmp_path / "out", PrepareConfig())


def test_a_split_without_both_labels_is_refused(tmp_path: Path) -> None:
    source = _write(tmp_path / "benign_only.jsonl", [_row(i) for i in range(12)])
    with pytest.raises(DatasetError, match="has no harmful rows"):
        build_index([source], tmp_path / "out", PrepareConfig())


def test_read_index_checks_file_and_columns(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such index"):
        read_index(tmp_path / "index.parquet")
    pl.DataFrame({"row_id": [2, 1], "text": ["b", "a"]}).write_parquet(tmp_path / "thin.parquet")
    with pytest.raises(DatasetError, match="lacks column"):
        read_index(tmp_path / "thin.parquet")


# --- splits ----------------------------------------------------------------------------------


def _demo_splits(records: list[RequestRecord], seed: int = 0) -> list[str]:
    groups = [f"{r.source}\x1f{r.request_id}" for r in records]
    strata = [f"{r.label}\x1f{r.category}" for r in records]
    return assign_splits(groups, strata, PrepareConfig(seed=seed))


def test_no_request_spans_two_splits(demo_records: list[RequestRecord]) -> None:
    splits = _demo_splits(demo_records)
    seen: dict[str, set[str]] = {}
    for record, split in zip(demo_records, splits, strict=True):
        seen.setdefault(record.request_id, set()).add(split)
    assert all(len(s) == 1 for s in seen.values())
    repeats = Counter(r.request_id for r in demo_records)
    assert any(n > 1 for n in repeats.values()), "demo data has no repeated requests"


def test_every_split_has_both_labels_and_its_share(demo_records: list[RequestRecord]) -> None:
    splits = _demo_splits(demo_records)
    expected = dict(PrepareConfig().split_fractions)
    for split in SPLITS:
        labels = Counter(r.label for r, s in zip(demo_records, splits, strict=True) if s == split)
        assert set(labels) == set(LABELS), f"{split} lacks a label"
        share = sum(labels.values()) / len(demo_records)
        assert abs(share - expected[split]) < 0.05, f"{split}: {share:.2f} vs {expected[split]}"


def test_splits_are_reproducible_and_follow_the_seed(demo_records: list[RequestRecord]) -> None:
    assert _demo_splits(demo_records, seed=0) == _demo_splits(demo_records, seed=0)
    assert _demo_splits(demo_records, seed=0) != _demo_splits(demo_records, seed=1)


def test_too_few_requests_to_split() -> None:
    with pytest.raises(DatasetError, match="at least 4 distinct requests"):
        assign_splits(["a", "a", "b"], ["x", "x", "y"], PrepareConfig())


# --- the shipped demo data -------------------------------------------------------------------


def test_demo_data_is_valid_and_large_enough(demo_records: list[RequestRecord]) -> None:
    labels = Counter(r.label for r in demo_records)
    assert labels["harmful"] >= 170 and labels["benign"] >= 170
    categories = Counter((r.category, r.label) for r in demo_records)
    names = {c for c, _ in categories}
    assert len(names) >= 8
    assert all(categories[(c, "harmful")] >= 15 and categories[(c, "benign")] >= 15 for c in names)
    kinds = Counter(r.image_kind for r in demo_records)
    assert set(kinds) == {None, "typography", "scene"}


def test_demo_typography_prompts_do_not_reveal_the_label(demo_records: list[RequestRecord]) -> None:
    typed = [r for r in demo_records if r.image_kind == "typography"]
    prompts = {label: {r.text for r in typed if r.label == label} for label in LABELS}
    assert prompts["harmful"] == prompts["benign"]


def test_demo_length_alone_does_not_separate_the_labels(demo_records: list[RequestRecord]) -> None:
    # A detector that beats this baseline only by reading length has learned the data, not harm.
    y = np.array([LABELS[r.label] for r in demo_records])
    for length in ([len(r.text) for r in demo_records], [len(r.text.split()) for r in demo_records]):
        auroc = roc_auc_score(y, length)
        assert 0.4 < auroc < 0.6, f"length-only AUROC {auroc:.3f}"
