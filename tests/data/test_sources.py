"""Request sources: validation errors, file and line in every message, the shipped demo data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

import pipeline.data.image_files as image_files_module
from pipeline.config import LABELS, LimitsConfig, PrepareConfig
from pipeline.data.index import build_index, index_frame
from pipeline.data.sources import DatasetError, RequestRecord, read_requests
from tests.data.source_rows import DEMO, request_row, small_source, write_source


@pytest.fixture(scope="module")
def demo_records() -> list[RequestRecord]:
    return read_requests(DEMO)


# --- validation ------------------------------------------------------------------------------

BAD_LINES: dict[str, tuple[Any, str]] = {
    "invalid json": ('{"request_id": "x", "label": ', "invalid JSON"),
    "not an object": ("[1, 2]", "JSON object"),
    "missing field": ({"request_id": "x", "category": "c", "label": "benign"}, "missing field.*text"),
    "empty text": (request_row(9, text="   "), "'text' is empty"),
    "unknown label": (request_row(9, label="unsafe"), r"unknown label 'unsafe'; allowed: \['benign', 'harmful'\]"),
    "unknown image kind": (request_row(9, image={"kind": "video", "text": "x"}), "unknown image kind 'video'"),
    "typography without text": (request_row(9, image={"kind": "typography"}), "typography image takes exactly"),
    "boolean seed": (request_row(9, image={"kind": "scene", "seed": True, "caption": "c"}), "seed must be"),
    "missing image file": (request_row(9, image="nowhere.png"), "nowhere.png: image file not found"),
    "corrupt image file": (request_row(9, image="corrupt.png"), "corrupt.png: not a readable image"),
    "misspelt image key": (
        request_row(9, imgae="pic.png"),
        r"unknown key\(s\) \['imgae'\] \('imgae': did you mean 'image'\?\); "
        r"known keys: \['request_id', 'category', 'label', 'text', 'image', 'upstream', 'presentation'\]",
    ),
    "lone surrogate": (
        '{"request_id": "r9", "category": "c", "label": "benign", "text": "a \\ud83d b"}',
        "lone surrogate",
    ),
    "surrogate in image text": (
        request_row(9, image={"kind": "typography", "text": "x\udc00"}),
        r"field 'image\.text' holds a lone surrogate \(\\udc00\)",
    ),
    "text over the limit": (
        request_row(9, text="z" * 32_769),
        r"field 'text' is 32,769 characters, over the limit of 32,768",
    ),
    "absolute image path": (request_row(9, image="/etc/x.png"), r"field 'image' is an absolute path \(/etc/x\.png\)"),
    "image outside the folder": (
        request_row(9, image="../up.png"),
        r"image '\.\./up\.png' resolves to .*up\.png, outside",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_rows_name_file_and_line(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthen nothing useful")
    Image.new("RGB", (4, 4)).save(tmp_path / "up.png")  # a real image, but outside the source's folder
    bad, message = BAD_LINES[case]
    source = write_source(folder / "mixed.jsonl", [request_row(1), request_row(2), bad, request_row(3)])
    with pytest.raises(DatasetError, match=rf"mixed\.jsonl:3: .*{message}"):
        read_requests(source)


def test_unknown_label_lists_the_allowed_labels(tmp_path: Path) -> None:
    source = write_source(tmp_path / "s.jsonl", [request_row(1, label="spam")])
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
    rows = [request_row(1, "benign"), {**request_row(1, "harmful"), "text": "other"}]
    source = write_source(tmp_path / "s.jsonl", rows)
    expected = r"s\.jsonl:2: request_id 'r1' is harmful/cooking here but benign/cooking on line 1"
    with pytest.raises(DatasetError, match=expected):
        read_requests(source)


def test_valid_rows_parse_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    source = small_source(tmp_path / "src" / "small.jsonl")
    source.write_text(source.read_text() + "\n")
    records = read_requests(source)
    assert len(records) == 17 and records[0].source == "small" and records[0].line == 1
    assert records[1].image_kind == "typography" and records[1].image_text == "typed words"
    assert records[2].image_kind == "scene" and records[2].image_seed == 5
    assert records[3].image_kind == "file" and records[3].image_file == (source.parent / "pics" / "photo.png").resolve()


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    source = tmp_path / "bom.jsonl"
    lines = json.dumps(request_row(1)) + "\n" + json.dumps(request_row(2)) + "\n"
    source.write_bytes(b"\xef\xbb\xbf" + lines.encode())
    assert [r.request_id for r in read_requests(source)] == ["r1", "r2"]


def test_line_separators_inside_strings_stay_in_their_record(tmp_path: Path) -> None:
    # JSON allows U+2028, U+2029 and U+0085 raw inside strings; only "\n" ends a JSON-lines record.
    odd = ["first\u2028second", "para\u2029graph", "next\x85line"]
    rows = [request_row(i, text=text) for i, text in enumerate(odd)]
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
    inside = read_requests(write_source(folder / "ok.jsonl", [request_row(1, image="inside.png")]))
    assert inside[0].image_file == (folder / "pics" / "real.png").resolve()
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: image 'outside\.png' resolves to .*secret\.png, outside"):
        read_requests(write_source(folder / "bad.jsonl", [request_row(1, image="outside.png")]))


def test_the_given_limits_apply(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    source = write_source(tmp_path / "s.jsonl", [request_row(1, text="eleven char"), request_row(2, image="photo.png")])
    assert len(read_requests(source)) == 2
    with pytest.raises(DatasetError, match=r"s\.jsonl:1: field 'text' is 11 characters, over the limit of 10"):
        read_requests(source, LimitsConfig(max_request_chars=10))
    with pytest.raises(DatasetError, match=r"s\.jsonl:2: .*photo\.png: 8x8 = 64 pixels, over the limit of 63"):
        read_requests(source, LimitsConfig(max_image_pixels=63))
    typed = write_source(tmp_path / "t.jsonl", [request_row(1, image={"kind": "typography", "text": "hello"})])
    with pytest.raises(DatasetError, match=r"t\.jsonl:1: typography image: 760x760 = 577,600 pixels, over the limit"):
        read_requests(typed, LimitsConfig(max_image_pixels=577_599))


def test_oversized_typography_is_refused_without_rendering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rendering(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the typography image was rendered")

    monkeypatch.setattr(image_files_module, "render_typography", no_rendering)
    rows = [request_row(i, "harmful" if i % 2 else "benign") for i in range(12)]
    rows[5]["image"] = {"kind": "typography", "text": "a line\n" * 2000}
    source = write_source(tmp_path / "typed.jsonl", rows)
    with pytest.raises(
        DatasetError, match=r"typed\.jsonl:6: typography image: 760x\d+ = .* over the limit of 40,000,000"
    ):
        build_index([source], tmp_path / "out", PrepareConfig())
    assert not (tmp_path / "out").exists()


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


def test_upstream_and_presentation_default_from_the_row_and_can_be_given(tmp_path: Path) -> None:
    rows = [
        request_row(0, text="How do I bake bread?"),
        request_row(1, text="Write a poem."),
        request_row(2, image={"kind": "typography", "text": "hello"}),
        {**request_row(3), "upstream": "example/project", "presentation": "wrapped"},
    ]
    path = write_source(tmp_path / "mine.jsonl", rows)
    records = read_requests(path)
    assert [r.upstream for r in records] == ["mine", "mine", "mine", "example/project"]
    assert [r.presentation for r in records] == ["question", "imperative", "typography", "wrapped"]
    index = index_frame(records, [None] * len(records), ["train"] * len(records))
    assert index["upstream"].to_list() == ["mine", "mine", "mine", "example/project"]
    assert index["presentation"].to_list()[3] == "wrapped"
    bad = write_source(tmp_path / "bad.jsonl", [{**request_row(0), "upstream": "  "}])
    with pytest.raises(DatasetError, match="bad.jsonl:1: field 'upstream' is empty"):
        read_requests(bad)
