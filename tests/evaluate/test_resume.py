"""The comparison's resume protocol (pipeline.evaluate.resume): header, synced batches, torn lines, mismatches."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import ConfigError, Params
from pipeline.evaluate.resume import (
    ResumeMismatch,
    append_rows,
    done_examples,
    fingerprint,
    finished_rows,
    read_partial,
    start_partial,
)
from pipeline.evaluate.suite_run import compact_metrics, example_keys
from pipeline.io import sha256_file

ROWS = [{"benchmark": "b", "example_id": str(i), "defence": d} for i in range(2) for d in ("none", "lsi")]


def test_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    partial = tmp_path / "p.jsonl"
    start_partial(partial, "f", "s", [])
    append_rows(partial, ROWS)
    with partial.open("a") as file:
        file.write('{"benchmark": "b", "exam')
    records = read_partial(partial, "f")
    assert records == ROWS
    assert done_examples(records, ("none", "lsi")) == {("b", "0"), ("b", "1")}
    assert done_examples(records, ("none", "lsi", "ecso")) == set()
    assert read_partial(tmp_path / "absent.jsonl", "f") == []


def test_start_partial_keeps_the_rows_given_under_a_fresh_header(tmp_path: Path) -> None:
    partial = tmp_path / "p.jsonl"
    start_partial(partial, "f", "s", ROWS[:2])
    header, *lines = partial.read_text().splitlines()
    assert json.loads(header) == {"fingerprint": "f", "suite": "s"}
    assert [json.loads(line) for line in lines] == ROWS[:2]
    assert read_partial(partial, "f") == ROWS[:2]


def test_a_half_done_example_is_dropped_whole() -> None:
    half = [*ROWS, {"benchmark": "b", "example_id": "2", "defence": "none"}]
    assert finished_rows(half, ("none", "lsi")) == ROWS


@pytest.mark.parametrize("header", ['{"fingerprint": "other"}', "not json", "[1, 2]", ""])
def test_another_setup_or_a_broken_header_is_refused(tmp_path: Path, header: str) -> None:
    partial = tmp_path / "s.partial.jsonl"
    partial.write_text(header + "\n" if header else "")
    with pytest.raises(ResumeMismatch, match=r"s\.partial\.jsonl: left by a comparison run under a different setup"):
        read_partial(partial, "f")


def test_fingerprint_follows_what_decides_a_row_and_ignores_report_settings(tmp_path: Path) -> None:
    params = Params()
    suite = "s"
    base = fingerprint(params, suite, ["b/0", "b/1"], 0.5, "probe")
    assert base == fingerprint(params, suite, ["b/0", "b/1"], 0.5, "probe")
    assert base != fingerprint(params, suite, ["b/0"], 0.5, "probe")
    assert base != fingerprint(params, suite, ["b/0", "b/1"], 0.6, "probe")
    assert base != fingerprint(params, suite, ["b/0", "b/1"], 0.5, "other probe")
    reported = replace(
        params, compare=replace(params.compare, examples_in_report=params.compare.examples_in_report + 1)
    )
    assert fingerprint(reported, suite, ["b/0", "b/1"], 0.5, "probe") == base
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc")
    assert sha256_file(weights) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_example_keys_refuse_a_clash_and_metrics_drop_categories() -> None:
    examples = [SimpleNamespace(benchmark="b", example_id="1"), SimpleNamespace(benchmark="b", example_id="2")]
    assert example_keys(examples, "s") == ["b/1", "b/2"]  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"compare\.suites\.s: two benchmarks yield the same example ids"):
        example_keys([*examples, examples[0]], "s")  # type: ignore[list-item]
    summary = {"b": {"lsi": {"harmful_refusal_rate": 0.5, "per_category": {"x": {}}}}}
    assert compact_metrics(summary) == {"b": {"lsi": {"harmful_refusal_rate": 0.5}}}
