"""Split assignment: grouped by request, stratified, reproducible for a seed."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.config import LABELS, SPLITS, PrepareConfig
from pipeline.data.sources import DatasetError, RequestRecord, read_requests
from pipeline.data.splits import assign_splits
from tests.data.source_rows import DEMO


@pytest.fixture(scope="module")
def demo_records() -> list[RequestRecord]:
    return read_requests(DEMO)


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
