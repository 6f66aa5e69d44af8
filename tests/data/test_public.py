"""Sources built from the vendored public instructions: matched in form and length, disjoint, valid."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.data.build import summarize_source
from pipeline.data.matching import BuildError
from pipeline.data.public import (
    PUBLIC_SOURCES,
    QUESTION_SOURCE,
    TYPO_PROMPTS,
    TYPO_SOURCE,
    WRAPPED_SOURCE,
    Instruction,
    build_public_sources,
    normalise,
    read_public,
)
from pipeline.data.sources import parse_request
from tests.paths import PROJECT_ROOT

PUBLIC = PROJECT_ROOT / "data" / "public"


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return read_public(PUBLIC)


@pytest.fixture(scope="module")
def sources(instructions: list[Instruction]) -> dict[str, list[dict]]:
    return build_public_sources(instructions, 60, seed=0)


def test_the_vendored_files_match_their_provenance() -> None:
    entries = json.loads((PUBLIC / "provenance.json").read_text())
    for entry in entries:
        records = json.loads((PUBLIC / entry["file"]).read_text())
        assert len(records) == entry["records"], entry["file"]
        assert entry["license"] in ("MIT", "Apache-2.0", "CC-BY-NC-4.0") and entry["taken_from"]["sha256"]
    readme = (PUBLIC / "README.md").read_text()
    assert all(Path(e["file"]).name in readme for e in entries)


def test_every_source_pairs_the_labels_in_form_and_length(sources: dict[str, list[dict]]) -> None:
    assert list(sources) == list(PUBLIC_SOURCES)
    for name, rows in sources.items():
        labels = Counter(row["label"] for row in rows)
        assert labels == {"harmful": 60, "benign": 60}, name
        summary = summarize_source(rows)
        assert abs(summary["length_auroc"] - 0.5) < 0.1, (name, summary)
        for row in rows:
            parse_request(row, name, name, 1, PUBLIC)  # valid rows of the source schema
    questions = sources[QUESTION_SOURCE]
    assert all(row["text"].endswith("?") for row in questions)
    for typo in sources[TYPO_SOURCE]:
        assert typo["text"] in TYPO_PROMPTS and typo["image"]["kind"] == "typography"
    # Pairs (harmful, benign) share a wrapper / a text prompt: each label sees each one equally often.
    for name in (WRAPPED_SOURCE, TYPO_SOURCE):
        rows = sources[name]
        for harmful, benign in zip(rows[0::2], rows[1::2], strict=True):
            assert harmful["label"] == "harmful" and benign["label"] == "benign"
            if name == TYPO_SOURCE:
                assert harmful["text"] == benign["text"]
            else:
                assert harmful["text"][:40] == benign["text"][:40]


def test_no_record_or_text_appears_twice(sources: dict[str, list[dict]]) -> None:
    ids = [row["request_id"] for rows in sources.values() for row in rows]
    assert len(ids) == len(set(ids))
    contents = [(row["image"] or {}).get("text") or row["text"] for rows in sources.values() for row in rows]
    assert len(contents) == len(set(contents))


def test_the_build_is_seeded(instructions: list[Instruction]) -> None:
    again = build_public_sources(instructions, 10, seed=3)
    assert again == build_public_sources(instructions, 10, seed=3)
    assert again != build_public_sources(instructions, 10, seed=4)


def test_too_few_records_name_what_ran_short(instructions: list[Instruction]) -> None:
    with pytest.raises(BuildError, match="public-typo: harmful instructions: need 5000"):
        build_public_sources(instructions, 5000, seed=0)


def test_endings_are_normalised_on_both_sides() -> None:
    assert normalise("  write a poem  about rain") == "Write a poem about rain."
    assert normalise("How do I cook rice?") == "How do I cook rice?"


def test_bad_files_are_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="provenance.json: no such file"):
        read_public(tmp_path)
    (tmp_path / "provenance.json").write_text(json.dumps([{"file": "h.json", "label": "harmful"}]))
    with pytest.raises(BuildError, match=r"entry 1 \(h.json\) needs an 'upstream'"):
        read_public(tmp_path)
    entry = {"file": "h.json", "label": "harmful", "upstream": "example/project"}
    (tmp_path / "provenance.json").write_text(json.dumps([entry]))
    with pytest.raises(BuildError, match="h.json: listed in provenance.json but missing"):
        read_public(tmp_path)
    (tmp_path / "h.json").write_text(json.dumps([{"instruction": "Do a thing"}, {"instruction": "  "}]))
    with pytest.raises(BuildError, match=r"h.json: record 1 has no instruction text"):
        read_public(tmp_path)
    (tmp_path / "provenance.json").write_text(json.dumps([{"file": "h.json", "label": "maybe"}]))
    with pytest.raises(BuildError, match="entry 1 needs 'file' and a 'label'"):
        read_public(tmp_path)


def test_rows_name_their_upstream_and_presentation(sources: dict[str, list[dict]]) -> None:
    entries = json.loads((PUBLIC / "provenance.json").read_text())
    upstream_of = {Path(e["file"]).stem: e["upstream"] for e in entries}
    presentations = {
        "public-imperative": "imperative",
        "public-questions": "question",
        "public-wrapped": "wrapped",
        "public-typo": "typography",
    }
    for name, rows in sources.items():
        assert {row["presentation"] for row in rows} == {presentations[name]}
        for row in rows:
            # request_id is file-stem/position: the upstream is the one provenance.json names for that file.
            assert row["upstream"] == upstream_of[row["request_id"].split("/")[0]]
        records = [parse_request(row, name, name, 1, PUBLIC) for row in rows]
        assert [r.upstream for r in records] == [row["upstream"] for row in rows]
    upstreams = {row["upstream"]: row["label"] for rows in sources.values() for row in rows}
    assert len({u for u, label in upstreams.items() if label == "harmful"}) >= 3


def test_every_benign_upstream_is_drawn_not_only_the_largest(sources: dict[str, list[dict]]) -> None:
    benign = Counter(row["upstream"] for rows in sources.values() for row in rows if row["label"] == "benign")
    entries = json.loads((PUBLIC / "provenance.json").read_text())
    upstreams = {e["upstream"] for e in entries if e["label"] == "benign"}
    assert set(benign) == upstreams and len(upstreams) >= 3
    # Alpaca holds ~97% of the benign pool; drawn in turn it fills well under all of the benign slots.
    assert max(benign.values()) < 0.7 * sum(benign.values())


def test_by_upstream_in_turn_alternates_and_stops_at_the_limit() -> None:
    import numpy as np

    from pipeline.data.public import by_upstream_in_turn

    def item(upstream: str, i: int) -> Instruction:
        text = f"{upstream} {i}."
        return Instruction(origin=f"{upstream}/{i}", category="c", text=text, label="benign", upstream=upstream)

    items = [item("a", i) for i in range(9)] + [item("b", i) for i in range(2)]
    taken = by_upstream_in_turn(items, 6, np.random.default_rng(0))
    assert [i.upstream for i in taken] == ["a", "b", "a", "b", "a", "a"]
    assert len(by_upstream_in_turn(items, 100, np.random.default_rng(0))) == 11
