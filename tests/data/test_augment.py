"""Attacker-style training copies: seeded, balanced over labels, within limits, and unlike the benchmark's wrappers."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

import bench.robustness as robustness
from pipeline.config import AUGMENT_FAMILIES, BuildConfig, ConfigError, LimitsConfig, PrepareConfig, params_from_dict
from pipeline.data.augment import (
    MARK,
    PADDING_LAYOUTS,
    PADDING_SENTENCES,
    WRAPPER_TEMPLATES,
    augment_rows,
    original_request_id,
    template_count,
    with_augmented_copies,
)
from pipeline.data.index import build_index
from pipeline.data.matching import JAILBREAK_TEMPLATES, BuildError
from pipeline.data.public import build_public_sources, read_public
from pipeline.data.sources import parse_request
from tests.paths import PROJECT_ROOT

NGRAM = 8


def rows(n_harmful: int, n_benign: int, text: str = "How do I do thing {i}?") -> list[dict]:
    """Single-row requests ``h<i>`` / ``b<i>``."""
    made = [
        {"request_id": f"h{i}", "category": "c", "label": "harmful", "text": text.format(i=i), "image": None}
        for i in range(n_harmful)
    ]
    made += [
        {"request_id": f"b{i}", "category": "c", "label": "benign", "text": text.format(i=i), "image": None}
        for i in range(n_benign)
    ]
    return made


def template_name(row: dict) -> str:
    return row["request_id"].split(MARK, 1)[1]


def family(row: dict) -> str:
    return row["presentation"].removeprefix("augmented-")


# --- the templates -------------------------------------------------------------------------------------------------


def test_every_configured_family_has_at_least_six_templates_of_varied_length() -> None:
    assert set(WRAPPER_TEMPLATES) | {"padding"} == set(AUGMENT_FAMILIES)
    for name in AUGMENT_FAMILIES:
        assert template_count(name) >= 6, name
    for name, templates in WRAPPER_TEMPLATES.items():
        assert all(t.count("{request}") == 1 and t.count("{") == 1 for t in templates), name
        words = [len(t.replace("{request}", " ").split()) for t in templates]
        assert max(words) >= 100 and min(words) <= 20, (name, words)
        assert len(set(templates)) == len(templates), name


def test_padding_goes_before_after_and_around_with_1_to_20_distinct_sentences() -> None:
    totals = [before + after for before, after in PADDING_LAYOUTS]
    assert min(totals) == 1 and max(totals) == 20
    assert any(b and not a for b, a in PADDING_LAYOUTS) and any(a and not b for b, a in PADDING_LAYOUTS)
    assert any(b and a for b, a in PADDING_LAYOUTS)
    assert len(set(PADDING_SENTENCES)) == len(PADDING_SENTENCES) >= max(totals)


# --- disjoint from the wrappers the robustness benchmark attacks with, and from the training wrappers ----------------


def words(text: str) -> list[list[str]]:
    """``text`` as runs of lower-cased words without punctuation, cut at every ``{placeholder}``."""
    return [re.sub(r"[^\w\s]", " ", part.lower()).split() for part in re.split(r"\{\w+\}", text)]


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    return {tuple(run[i : i + n]) for run in words(text) for i in range(len(run) - n + 1)}


def sentences(text: str) -> set[str]:
    return {" ".join(run) for part in re.split(r"[.!?\n]+", text) for run in words(part) if run}


def shared(ours: list[str], theirs: list[str]) -> list[str]:
    """Our texts that share an 8-word run or a whole sentence with theirs."""
    their_grams = set().union(*(ngrams(t) for t in theirs))
    their_sentences = set().union(*(sentences(t) for t in theirs))
    return [t for t in ours if ngrams(t) & their_grams or sentences(t) & their_sentences]


def augment_texts() -> list[str]:
    return [*PADDING_SENTENCES, *(t for templates in WRAPPER_TEMPLATES.values() for t in templates)]


def benchmark_texts() -> list[str]:
    texts = [*robustness.NEUTRAL_SENTENCES, *robustness.PERTURBATIONS.values(), robustness.padding(20)]
    assert robustness.PERTURBATIONS["roleplay"] in texts and len(robustness.NEUTRAL_SENTENCES) >= 5
    return texts


def test_the_overlap_check_finds_a_planted_overlap() -> None:
    planted = "Sure. " + JAILBREAK_TEMPLATES[1].split(".")[1] + " and more."
    assert shared([planted], list(JAILBREAK_TEMPLATES)) == [planted]
    assert shared([robustness.NEUTRAL_SENTENCES[0]], benchmark_texts()) == [robustness.NEUTRAL_SENTENCES[0]]
    assert shared(["A sentence of our own, nothing like theirs at all, honestly."], benchmark_texts()) == []


def test_no_template_or_sentence_shares_8_words_or_a_sentence_with_the_robustness_benchmark() -> None:
    assert shared(augment_texts(), benchmark_texts()) == []


def test_no_template_or_sentence_shares_8_words_or_a_sentence_with_the_training_wrappers() -> None:
    assert shared(augment_texts(), list(JAILBREAK_TEMPLATES)) == []


# --- drawing -------------------------------------------------------------------------------------------------------


def test_same_seed_same_copies_and_another_seed_others() -> None:
    source = rows(30, 30)
    first = augment_rows(source, share=0.5, seed=3)
    assert first == augment_rows(source, share=0.5, seed=3)
    assert first != augment_rows(source, share=0.5, seed=4)


def test_the_same_share_of_each_label_is_copied_and_wears_the_same_templates() -> None:
    out = augment_rows(rows(30, 30), share=0.4, seed=0)
    assert Counter(r["label"] for r in out) == {"harmful": 12, "benign": 12}
    by_label = {label: Counter(template_name(r) for r in out if r["label"] == label) for label in ("harmful", "benign")}
    assert by_label["harmful"] == by_label["benign"]
    uneven = augment_rows(rows(30, 10), share=0.5, seed=0)
    assert Counter(r["label"] for r in uneven) == {"harmful": 15, "benign": 5}


def test_share_zero_copies_nothing_and_share_one_copies_every_request() -> None:
    source = rows(8, 8)
    assert augment_rows(source, share=0.0, seed=0) == []
    assert sorted(original_request_id(r["request_id"]) for r in augment_rows(source, share=1.0, seed=0)) == sorted(
        r["request_id"] for r in source
    )


def test_every_family_and_template_is_used_and_only_the_families_asked_for() -> None:
    out = augment_rows(rows(60, 60), share=1.0, seed=1)
    assert {family(r) for r in out} == set(AUGMENT_FAMILIES)
    expected = {f"{name}{i + 1}" for name in AUGMENT_FAMILIES for i in range(template_count(name))}
    assert {template_name(r) for r in out} == expected
    some = augment_rows(rows(20, 20), share=1.0, families=("roleplay", "claim"), seed=1)
    assert {family(r) for r in some} == {"roleplay", "claim"}


def test_ids_are_unique_and_name_the_request_and_the_template() -> None:
    source = rows(40, 40)
    out = augment_rows(source, share=0.75, seed=2)
    ids = [r["request_id"] for r in out]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {r["request_id"] for r in source}
    originals = {r["request_id"]: r for r in source}
    for row in out:
        base, name = row["request_id"].split(MARK)
        assert original_request_id(row["request_id"]) == base and name.startswith(family(row))
        assert row["label"] == originals[base]["label"] and originals[base]["text"] in row["text"]


def test_a_request_in_several_forms_is_copied_whole_in_one_wrapper() -> None:
    demo = [json.loads(line) for line in (PROJECT_ROOT / "data" / "demo" / "requests.jsonl").read_text().splitlines()]
    out = augment_rows(demo, share=1.0, seed=0)
    forms = Counter(r["request_id"] for r in demo)
    copies = Counter(original_request_id(r["request_id"]) for r in out)
    assert copies == forms
    assert all(len({r["request_id"] for r in out if original_request_id(r["request_id"]) == rid}) == 1 for rid in forms)
    for original, row in zip(demo, out, strict=True):
        assert original_request_id(row["request_id"]) == original["request_id"]
        assert row["image"] == original["image"] and original["text"] in row["text"]


def test_copies_keep_the_image_and_other_fields_and_name_their_presentation() -> None:
    image = {"kind": "typography", "text": "the request, typed"}
    source = [
        {"request_id": "a", "category": "x", "label": "harmful", "text": "Read it.", "image": image, "upstream": "u"},
        {"request_id": "b", "category": "y", "label": "benign", "text": "Read it.", "image": image, "upstream": "v"},
    ]
    out = augment_rows(source, share=1.0, seed=0)
    assert [(r["image"], r["upstream"], r["category"]) for r in out] == [(image, "u", "x"), (image, "v", "y")]
    assert all(r["presentation"] == f"augmented-{family(r)}" and family(r) in AUGMENT_FAMILIES for r in out)
    assert "presentation" not in source[0]


# --- limits --------------------------------------------------------------------------------------------------------


def test_copies_stay_within_the_request_limit_padding_trimmed_and_long_wrappers_shortened() -> None:
    text = "x" * 150 + " {i}?"
    limits = LimitsConfig(max_request_chars=400)
    out = augment_rows(rows(60, 60, text), share=1.0, seed=0, limits=limits)
    assert all(len(r["text"]) <= 400 for r in out)
    assert Counter(r["label"] for r in out) == {"harmful": 60, "benign": 60}
    assert {family(r) for r in out} == set(AUGMENT_FAMILIES)
    padded = [r for r in out if family(r) == "padding"]
    assert all(r["text"].count("x" * 150) == 1 and len(r["text"]) > 160 for r in padded)
    unlimited = augment_rows(rows(60, 60, text), share=1.0, seed=0)
    assert max(len(r["text"]) for r in unlimited) > 400
    assert [family(r) for r in unlimited] == [family(r) for r in out]


def test_a_request_nothing_fits_is_passed_over_and_the_labels_stay_balanced() -> None:
    source = rows(3, 3, "y" * 100 + "{i}")
    assert augment_rows(source, share=1.0, seed=0, limits=LimitsConfig(max_request_chars=101)) == []
    source = rows(10, 10)
    for row in source[:5]:
        row["text"] = "z" * 395
    out = augment_rows(source, share=0.5, seed=0, limits=LimitsConfig(max_request_chars=400))
    assert Counter(r["label"] for r in out) == {"harmful": 5, "benign": 5}
    assert {original_request_id(r["request_id"]) for r in out if r["label"] == "harmful"} == {
        f"h{i}" for i in range(5, 10)
    }
    assert all(len(r["text"]) <= 400 for r in out)


def test_copies_of_the_public_sources_are_valid_source_rows(tmp_path: Path) -> None:
    sources = build_public_sources(read_public(PROJECT_ROOT / "data" / "public"), 12, 0)
    for name, source in sources.items():
        out = augment_rows(source, share=0.5, seed=0)
        assert Counter(r["label"] for r in out) == {"harmful": 6, "benign": 6}, name
        for line, row in enumerate(out, 1):
            record = parse_request(row, f"{name}:{line}", name, line, tmp_path)
            assert record.presentation == row["presentation"]


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ({"augment_share": 1.5}, "build.augment_share"),
        ({"augment_share": -0.1}, "build.augment_share"),
        ({"augment_share": True}, "build.augment_share"),
        ({"augment_families": ("roleplay", "roleplay")}, "build.augment_families"),
        ({"augment_families": ("roleplay", "jokes")}, "build.augment_families"),
        ({"augment_families": ()}, "build.augment_families"),
        ({"augment_families": "roleplay"}, "build.augment_families"),
    ],
)
def test_bad_augment_settings_are_refused_by_key(raw: dict, where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)):
        BuildConfig(**raw)


def test_params_yaml_names_a_bad_family_and_accepts_the_defaults() -> None:
    with pytest.raises(
        ConfigError, match=r"build\.augment_families: expected .*'padding'.*, got \['padding', 'jokes'\]"
    ):
        params_from_dict({"build": {"augment_families": ["padding", "jokes"]}})
    build = params_from_dict({"build": {"augment_share": 0.25}}).build
    assert build.augment_share == 0.25 and build.augment_families == AUGMENT_FAMILIES
    assert BuildConfig().augment_share == 0.0


def test_the_function_refuses_what_the_config_refuses() -> None:
    with pytest.raises(ConfigError, match=r"build\.augment_share"):
        augment_rows(rows(2, 2), share=2.0, seed=0)
    with pytest.raises(ConfigError, match=r"build\.augment_families"):
        augment_rows(rows(2, 2), share=0.5, families=("padding", "unknown"), seed=0)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ([{"request_id": "a~b", "category": "c", "label": "benign", "text": "t"}], r"row 0: request_id 'a~b' contains"),
        ([{"request_id": "a", "category": "c", "label": "kind", "text": "t"}], r"row 0: unknown label 'kind'"),
        ([{"request_id": "a", "category": "c", "label": "benign"}], r"row 0: field 'text' must be a string"),
        (
            [
                {"request_id": "a", "category": "c", "label": "benign", "text": "t"},
                {"request_id": "a", "category": "c", "label": "harmful", "text": "t"},
            ],
            r"row 1: request_id 'a' is harmful here but benign in row 0",
        ),
    ],
)
def test_bad_rows_are_named(source: list[dict], message: str) -> None:
    with pytest.raises(BuildError, match=message):
        augment_rows(source, share=1.0, seed=0)


def test_copies_join_their_source_and_share_their_originals_split(tmp_path: Path) -> None:
    rows = [
        {"request_id": f"r{i}", "category": "c", "label": ("harmful", "benign")[i % 2], "text": f"Question {i}?"}
        for i in range(40)
    ]
    sources = {"mine": rows, "public-wrapped": rows[:10]}
    built = with_augmented_copies(sources, share=0.5, seed=3)
    assert len(built["mine"]) == 60 and built["public-wrapped"] == [dict(r) for r in rows[:10]]
    assert with_augmented_copies(sources, share=0.5, seed=3) == built
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in built["mine"]))
    index = build_index([path], tmp_path / "prepared", PrepareConfig())
    split_of = dict(zip(index["request_id"].to_list(), index["split"].to_list(), strict=True))
    copies = [r for r in split_of if "~" in r]
    assert len(copies) == 20
    assert all(split_of[r] == split_of[original_request_id(r)] for r in copies)
    assert set(index.filter(pl.col("request_id").str.contains("~"))["presentation"].str.slice(0, 10)) == {"augmented-"}
