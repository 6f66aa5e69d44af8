"""Bad-input matrix, sources surface: every bad source fails prepare by file:line, and an earlier index survives.

Each case runs the prepare stage's own library call (``build_index`` with ``params.limits``)
on a source whose fourth line is broken, into a folder that already holds an index from an
earlier run, and checks both the message and that every earlier file is byte-identical.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.config import DEFAULT_LIMITS, PrepareConfig
from pipeline.data.index import build_index
from pipeline.data.sources import DatasetError
from tests.data.conftest import corrupt_idat_bytes, huge_png_bytes
from tests.snapshots import folder_digests


def _row(i: int, label: str = "benign", **extra: Any) -> dict[str, Any]:
    return {"request_id": f"r{i}", "category": "cooking", "label": label, "text": f"request number {i}", **extra}


def _line(**fields: Any) -> str:
    """A JSON line for a row of its own (id r99) with ``fields`` replacing or adding keys (None removes one)."""
    row = {**_row(99), **fields}
    return json.dumps({key: value for key, value in row.items() if value is not None})


def _nothing(folder: Path) -> None:
    """No extra files needed next to the source."""


@dataclass(frozen=True)
class BadSource:
    """One broken line (written verbatim as line 4 of a source), the files it needs, the expected error."""

    id: str
    line: str
    expect: str
    setup: Callable[[Path], None] = _nothing


def _outside_image(folder: Path) -> None:
    Image.new("RGB", (8, 8), "red").save(folder.parent / "outside.png")


def _escaping_link(folder: Path) -> None:
    _outside_image(folder)
    os.symlink(folder.parent / "outside.png", folder / "link.png")


def _corrupt_png(folder: Path) -> None:
    (folder / "idat.png").write_bytes(corrupt_idat_bytes())


def _huge_png(folder: Path) -> None:
    (folder / "huge.png").write_bytes(huge_png_bytes())  # 20,000 x 20,000 pixels in about 50 KB


# 10,000 characters, well within the text limit, but 2,000 lines: some 90,000 px tall.
LONG_TYPOGRAPHY = "line\n" * 2000
assert len(LONG_TYPOGRAPHY) <= DEFAULT_LIMITS.max_request_chars


CASES = [
    BadSource("invalid-json", '{"request_id": "x", "label": ', r"invalid JSON \(Expecting value at column 30\)"),
    BadSource("not-an-object", "[1, 2]", r"expected a JSON object, got list"),
    BadSource("lone-surrogate", _line(text="bad \ud800 text"), r"field 'text' holds a lone surrogate \(\\ud800\)"),
    BadSource("missing-text", _line(text=None), r"missing field\(s\) \['text'\]"),
    BadSource("empty-text", _line(text="   "), r"field 'text' is empty"),
    BadSource(
        "too-long-text",
        _line(text="x" * (DEFAULT_LIMITS.max_request_chars + 1)),
        r"field 'text' is 32,769 characters, over the limit of 32,768 \(limits\.max_request_chars\)",
    ),
    BadSource(
        "misspelt-image-key",
        _line(imgae="pic.png"),
        r"unknown key\(s\) \['imgae'\] \('imgae': did you mean 'image'\?\); known keys: \[",
    ),
    BadSource("bad-label", _line(label="unsafe"), r"unknown label 'unsafe'; allowed: \['benign', 'harmful'\]"),
    BadSource(
        "image-outside-folder",
        _line(image="../outside.png"),
        r"image '\.\./outside\.png' resolves to .*outside\.png, outside the source's folder",
        _outside_image,
    ),
    BadSource(
        "symlink-out-of-folder",
        _line(image="link.png"),
        r"image 'link\.png' resolves to .*outside\.png, outside the source's folder",
        _escaping_link,
    ),
    BadSource("absolute-image-path", _line(image="/etc/x.png"), r"field 'image' is an absolute path \(/etc/x\.png\)"),
    BadSource("missing-image", _line(image="nowhere.png"), r".*/nowhere\.png: image file not found"),
    BadSource("corrupt-idat-png", _line(image="idat.png"), r".*/idat\.png: not a readable image", _corrupt_png),
    BadSource(
        "too-many-pixels-png",
        _line(image="huge.png"),
        r".*/huge\.png: 20000x20000 = 400,000,000 pixels, over the limit of 40,000,000 \(limits\.max_image_pixels",
        _huge_png,
    ),
    BadSource(
        "typography-too-large",
        _line(image={"kind": "typography", "text": LONG_TYPOGRAPHY}),
        r"typography image: 760x\d+ = [\d,]+ pixels, over the limit of 40,000,000 .*shorten the image text",
    ),
    BadSource(
        "typography-text-too-long",
        _line(image={"kind": "typography", "text": "y" * 40_000}),
        r"image text is 40,000 characters, over the limit of 32,768",
    ),
    BadSource(
        "negative-scene-seed",
        _line(image={"kind": "scene", "seed": -1, "caption": "c"}),
        r"image seed must be a non-negative integer, got -1",
    ),
    BadSource(
        "conflicting-duplicate-id",
        json.dumps(_row(1, "benign")),
        r"request_id 'r1' is benign/cooking here but harmful/cooking on line 1",
    ),
]


def _write_source(path: Path, bad_line: str) -> None:
    good = [json.dumps(_row(i, "harmful" if i % 2 else "benign")) for i in range(1, 13)]
    path.write_text("\n".join([*good[:3], bad_line, *good[3:]]) + "\n", encoding="utf-8")


@pytest.fixture
def earlier_index(tmp_path: Path) -> Path:
    """An output folder holding an earlier run's index, summary and images."""
    folder = tmp_path / "earlier"
    folder.mkdir()
    rows = [_row(i, "harmful" if i % 2 else "benign") for i in range(16)]
    rows[1]["image"] = {"kind": "typography", "text": "typed words"}
    rows[2]["image"] = {"kind": "scene", "seed": 5, "caption": "a field"}
    source = folder / "earlier.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "prepared"
    build_index([source], out, PrepareConfig())
    return out


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_source_fails_by_line_and_keeps_the_earlier_index(
    tmp_path: Path, earlier_index: Path, case: BadSource
) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    case.setup(folder)
    source = folder / "bad.jsonl"
    _write_source(source, case.line)
    before = folder_digests(earlier_index)
    assert {"index.parquet", "summary.json"} <= set(before) and any(name.startswith("images/") for name in before)
    with pytest.raises(DatasetError) as info:
        build_index([source], earlier_index, PrepareConfig(), DEFAULT_LIMITS)
    message = str(info.value)
    assert re.search(rf"^{re.escape(str(source))}:4: {case.expect}", message), message
    assert folder_digests(earlier_index) == before
    assert not [p for p in earlier_index.rglob("*") if p.name.endswith(".tmp")]
