"""Tables that are not a published benchmark: a generic CSV/JSONL/Parquet table, and the prepared index."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.config import SPLITS
from pipeline.data.benchmarks import schema
from pipeline.data.benchmarks.schema import EvalExample, LoaderError
from pipeline.data.index import read_index
from pipeline.data.sources import DatasetError
from pipeline.io import json_lines

# Accepted spellings of a binary label in generic tables.
GENERIC_LABELS: dict[Any, int] = {
    0: 0,
    1: 1,
    "0": 0,
    "1": 1,
    "benign": 0,
    "harmful": 1,
    "safe": 0,
    "unsafe": 1,
}


def _generic_label(value: Any, column: str, where: str) -> int:
    """0 or 1 from 0/1, "harmful"/"benign" or "unsafe"/"safe"."""
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, bool) or key not in GENERIC_LABELS:
        raise LoaderError(f"{where}: field '{column}' must be 0/1, harmful/benign or unsafe/safe, got {value!r}")
    return GENERIC_LABELS[key]


def _generic_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of a CSV, Parquet or JSON-lines table by suffix."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet"):
        yield from schema.table_rows(path, required)
    elif suffix in (".jsonl", ".ndjson"):
        for _, where, row in json_lines(path, LoaderError, "benchmark file"):
            if not isinstance(row, dict):
                raise LoaderError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [column for column in required if column not in row]
            if missing:
                raise LoaderError(f"{where}: missing field(s) {missing}")
            yield where, row
    else:
        raise LoaderError(f"{path}: unsupported file type {suffix!r}; use .csv, .jsonl or .parquet")


def load_generic(
    path: str | Path,
    text_column: str = "text",
    image_column: str = "image",
    label_column: str = "label",
    category_column: str | None = None,
    id_column: str | None = None,
) -> list[EvalExample]:
    """A table of prompts (CSV, JSONL or Parquet by suffix) in the common schema.

    Image paths are relative to the file's folder (an absent column or empty cell means no
    image); labels are 0/1, harmful/benign or unsafe/safe. Without ``id_column`` the id is the
    row number; without ``category_column`` the category is "unknown". ``benchmark`` is the file stem.
    """
    path = Path(path)
    required = (text_column, label_column) + tuple(c for c in (category_column, id_column) if c is not None)
    examples: list[EvalExample] = []
    for number, (where, row) in enumerate(_generic_rows(path, required)):
        image: Path | None = None
        value = row.get(image_column)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            if not isinstance(value, str):
                raise LoaderError(f"{where}: field '{image_column}' must be a path, got {value!r}")
            candidate = Path(value.strip())
            image = schema.existing_image(candidate if candidate.is_absolute() else path.parent / candidate, where)
        examples.append(
            EvalExample(
                example_id=schema.str_value(row, id_column, where) if id_column else str(number),
                benchmark=path.stem,
                text=schema.str_value(row, text_column, where),
                image=image,
                label=_generic_label(row[label_column], label_column, where),
                category=schema.str_value(row, category_column, where) if category_column else "unknown",
                attack="none",
            )
        )
    return schema.check_unique(examples, path)


def load_prepared(index: str | Path, split: str = "test", source: str | None = None) -> list[EvalExample]:
    """One split of this pipeline's prepared index (``data/prepared/index.parquet``), images as rendered there.

    ``source`` keeps only one request source (a file stem such as ``lookalike``). The id is the
    index's ``row_id``, the attack its image kind (``text``, ``typography``, ``scene``, ``file``).
    """
    path = Path(index)
    if split not in SPLITS:
        raise LoaderError(f"{path}: unknown split {split!r}; choose one of {list(SPLITS)}")
    try:
        index_rows = read_index(path)
    except DatasetError as exc:
        raise LoaderError(str(exc)) from None
    frame = index_rows.filter(pl.col("split") == split)
    if source is not None:
        known = sorted(set(index_rows["source"].to_list()))
        if source not in known:
            raise LoaderError(f"{path}: no source {source!r}; the index holds {known}")
        frame = frame.filter(pl.col("source") == source)
    examples = [
        EvalExample(
            example_id=str(row["row_id"]),
            benchmark=source or "prepared",
            text=row["text"],
            image=None if row["image_path"] is None else Path(row["image_path"]),
            label=int(row["label"]),
            category=row["category"],
            attack=row["image_kind"] or "none",
        )
        for row in frame.iter_rows(named=True)
    ]
    if not examples:
        raise LoaderError(f"{path}: no {split!r} rows" + (f" from source {source!r}" if source else ""))
    return examples
