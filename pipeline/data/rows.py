"""Index rows as the stages use them: balanced and illustrative samples, the fields outputs repeat, rates."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import polars as pl

from pipeline.config import LABELS
from pipeline.data.sources import DatasetError

T = TypeVar("T")

HARMFUL, BENIGN = LABELS["harmful"], LABELS["benign"]

# The index columns every output line repeats, so a line can be read on its own.
ROW_FIELDS = ("row_id", "label", "category", "text", "image_path")


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def row_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The index columns every output line repeats (``ROW_FIELDS``); a missing one is None."""
    return {key: row.get(key) for key in ROW_FIELDS}


def rate(records: Sequence[Mapping[str, Any]], key: str, label: int) -> float | None:
    """Fraction of records with ``label`` whose ``key`` is true; None (JSON null) when there are none."""
    values = [bool(r[key]) for r in records if r["label"] == label]
    return sum(values) / len(values) if values else None


def _test_split(index: pl.DataFrame, what: str) -> pl.DataFrame:
    """The test-split rows sorted by ``row_id`` (so a sample never depends on the index's row order)."""
    test = index.filter(pl.col("split") == "test").sort("row_id")
    if test.height == 0:
        raise DatasetError(f"the index has no test-split rows to {what}")
    return test


def balanced_test_sample(index: pl.DataFrame, sample_size: int, seed: int) -> pl.DataFrame:
    """A deterministic sample of test-split rows, half harmful and half benign, sorted by ``row_id``.

    Harmful gets the odd row out. When one label has too few rows, the other fills the gap, so
    the sample is as large as the test split allows.
    """
    if sample_size < 1:
        raise DatasetError(f"sample_size must be at least 1, got {sample_size}")
    test = _test_split(index, "sample from")
    rng = np.random.default_rng(seed)
    ids = {label: test.filter(pl.col("label") == label)["row_id"].to_numpy() for label in (HARMFUL, BENIGN)}
    shuffled = {label: ids[label][rng.permutation(len(ids[label]))] for label in (HARMFUL, BENIGN)}
    quota = {HARMFUL: (sample_size + 1) // 2, BENIGN: sample_size // 2}
    take = {label: min(quota[label], len(ids[label])) for label in (HARMFUL, BENIGN)}
    shortfall = sample_size - sum(take.values())
    for label in (HARMFUL, BENIGN):
        extra = min(shortfall, len(ids[label]) - take[label])
        take[label] += extra
        shortfall -= extra
    chosen = np.concatenate([shuffled[label][: take[label]] for label in (HARMFUL, BENIGN)])
    return test.filter(pl.col("row_id").is_in(chosen.tolist())).sort("row_id")


def _spread(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows in order, but the first row of each category ahead of any repeats.

    A handful of examples then shows as many kinds of request as it can.
    """
    seen: set[Any] = set()
    first: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    for row in rows:
        (rest if row["category"] in seen else first).append(row)
        seen.add(row["category"])
    return first + rest


def _ordered_candidates(rows: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows with an image first, then those without; each group by ``row_id``, spread over categories."""
    ordered = rows.sort("row_id").to_dicts()
    with_image = [row for row in ordered if row["image_path"] is not None]
    without = [row for row in ordered if row["image_path"] is None]
    return _spread(with_image) + _spread(without)


def pick_examples(index: pl.DataFrame, n: int) -> pl.DataFrame:
    """A deterministic choice of ``n`` test-split rows: mostly harmful with images, at least one benign.

    One benign row per four examples (at least one once ``n >= 2``); when a label runs short the
    other fills in. Returned sorted by ``row_id``.
    """
    if n < 1:
        raise DatasetError(f"attribute.examples must be at least 1, got {n}")
    test = _test_split(index, "attribute")
    candidates = {label: _ordered_candidates(test.filter(pl.col("label") == label)) for label in (HARMFUL, BENIGN)}
    want_benign = max(1, n // 4) if n >= 2 else 0
    take = {BENIGN: min(want_benign, len(candidates[BENIGN]))}
    take[HARMFUL] = min(n - take[BENIGN], len(candidates[HARMFUL]))
    take[BENIGN] = min(n - take[HARMFUL], len(candidates[BENIGN]))
    chosen = [row["row_id"] for label in (HARMFUL, BENIGN) for row in candidates[label][: take[label]]]
    return test.filter(pl.col("row_id").is_in(chosen)).sort("row_id")


def row_title(row: Mapping[str, Any]) -> str:
    """A figure title naming the row, its label and category."""
    label = "harmful" if row["label"] == HARMFUL else "benign"
    return f"row {row['row_id']} ({label}, {row['category']})"
