"""The request index: one table of every validated row with its split and image, and its summary.

``build_index`` reads the sources, renders their images, assigns splits and writes
``index.parquet`` and ``summary.json``; ``read_index`` is how every later stage reads it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.config import DEFAULT_LIMITS, LABELS, SPLITS, LimitsConfig, PrepareConfig
from pipeline.data.augment import original_request_id
from pipeline.data.image_files import render_images, write_images
from pipeline.data.sources import DatasetError, RequestRecord, read_sources
from pipeline.data.splits import assign_splits, check_splits
from pipeline.io import replace_atomic

INDEX_COLUMNS: tuple[str, ...] = (
    "row_id",
    "request_id",
    "source",
    "upstream",
    "presentation",
    "category",
    "split",
    "label",
    "image_path",
    "image_sha256",
    "image_kind",
    "text",
    "image_text",
)
INDEX_FILE = "index.parquet"
SUMMARY_FILE = "summary.json"
IMAGES_DIR = "images"


def index_frame(
    records: Sequence[RequestRecord], images: Sequence[tuple[str, str] | None], splits: Sequence[str]
) -> pl.DataFrame:
    """The index table, one row per record in source order."""
    return pl.DataFrame(
        {
            "row_id": list(range(len(records))),
            "request_id": [r.request_id for r in records],
            "source": [r.source for r in records],
            "upstream": [r.upstream for r in records],
            "presentation": [r.presentation for r in records],
            "category": [r.category for r in records],
            "split": list(splits),
            "label": [LABELS[r.label] for r in records],
            "image_path": [image[0] if image else None for image in images],
            "image_sha256": [image[1] if image else None for image in images],
            "image_kind": [r.image_kind for r in records],
            "text": [r.text for r in records],
            "image_text": [r.image_text for r in records],
        },
        schema={
            "row_id": pl.Int64,
            "request_id": pl.String,
            "source": pl.String,
            "upstream": pl.String,
            "presentation": pl.String,
            "category": pl.String,
            "split": pl.String,
            "label": pl.Int64,
            "image_path": pl.String,
            "image_sha256": pl.String,
            "image_kind": pl.String,
            "text": pl.String,
            "image_text": pl.String,
        },
    )


def summarize(index: pl.DataFrame) -> dict[str, Any]:
    """Counts per split x label x category, plus per image kind, for ``summary.json``."""
    names = {value: key for key, value in LABELS.items()}
    splits: dict[str, dict[str, dict[str, int]]] = {split: {label: {} for label in LABELS} for split in SPLITS}
    for split, label, category in zip(index["split"], index["label"], index["category"], strict=True):
        cell = splits[split][names[label]]
        cell[category] = cell.get(category, 0) + 1
    for split in splits.values():
        for label in split:
            split[label] = dict(sorted(split[label].items()))
    return {
        "rows": index.height,
        "requests": index.select(pl.struct("source", "request_id").n_unique()).item(),
        "sources": sorted(set(index["source"].to_list())),
        "upstreams": _counts(index, "upstream"),
        "presentations": _counts(index, "presentation"),
        "labels": {label: int((index["label"] == value).sum()) for label, value in LABELS.items()},
        "image_kinds": dict(sorted(Counter(kind or "none" for kind in index["image_kind"].to_list()).items())),
        "splits": splits,
    }


def _counts(index: pl.DataFrame, column: str) -> dict[str, dict[str, int]]:
    """Rows per value of ``column``, by label name."""
    names = {value: key for key, value in LABELS.items()}
    counts: dict[str, dict[str, int]] = {}
    for value, label in zip(index[column].to_list(), index["label"].to_list(), strict=True):
        cell = counts.setdefault(value, {})
        cell[names[label]] = cell.get(names[label], 0) + 1
    return dict(sorted(counts.items()))


def write_index(index: pl.DataFrame, output_dir: str | Path) -> None:
    """Write ``index.parquet`` and ``summary.json`` under ``output_dir``, each atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = json.dumps(summarize(index), indent=2) + "\n"
    replace_atomic(output_dir / INDEX_FILE, lambda tmp: index.write_parquet(tmp))
    replace_atomic(output_dir / SUMMARY_FILE, lambda tmp: tmp.write_text(summary))


def _prune_images(images_dir: Path, keep: Iterable[str]) -> None:
    """Remove images no longer referenced, so DVC does not keep hashing stale files."""
    wanted = {Path(path).name for path in keep}
    if images_dir.is_dir():
        for path in images_dir.iterdir():
            if path.is_file() and path.name not in wanted:
                path.unlink()


def build_index(
    sources: Sequence[str | Path], output_dir: str | Path, config: PrepareConfig, limits: LimitsConfig = DEFAULT_LIMITS
) -> pl.DataFrame:
    """Read ``sources``, write their images, split them and write the index; return the index.

    Outputs under ``output_dir``: ``images/<sha256>.<ext>``, ``index.parquet`` and
    ``summary.json``. Every source is validated (against ``limits`` too), split, checked and
    its images rendered in memory before anything under ``output_dir`` is created or written,
    so a bad source leaves an earlier index, its summary and its images exactly as they were.
    """
    output_dir = Path(output_dir)
    records = read_sources(sources, limits)
    # An augmented copy goes where its original goes: the same request never straddles two splits.
    groups = [f"{r.source}\x1f{original_request_id(r.request_id)}" for r in records]
    strata = [f"{r.label}\x1f{r.category}" for r in records]
    splits = assign_splits(groups, strata, config)
    check_splits(index_frame(records, [None] * len(records), splits))
    images_dir = output_dir / IMAGES_DIR
    try:
        rendered = render_images(records, limits.max_image_pixels)
    except OSError as exc:
        raise DatasetError(f"cannot read a source's image ({exc})") from None
    try:
        images = write_images(rendered, images_dir)
    except OSError as exc:
        raise DatasetError(f"{images_dir}: cannot write images ({exc})") from None
    index = index_frame(records, images, splits)
    write_index(index, output_dir)
    _prune_images(images_dir, (image[0] for image in images if image))
    return index


def read_index(path: str | Path) -> pl.DataFrame:
    """Read an index written by :func:`build_index`, sorted by ``row_id``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such index; run the prepare stage first")
    try:
        index = pl.read_parquet(path)
    except Exception as exc:  # polars raises several unrelated types for a bad file
        raise DatasetError(f"{path}: not a readable parquet index ({exc})") from None
    missing = [column for column in INDEX_COLUMNS if column not in index.columns]
    if missing:
        raise DatasetError(f"{path}: index lacks column(s) {missing}")
    return index.sort("row_id")
