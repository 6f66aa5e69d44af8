"""The one schema every benchmark loader returns, :class:`EvalExample`, and the checks its records pass.

Errors are :class:`LoaderError` and name the file and the record (``file:line`` for CSV and JSON
lines, ``file[id]`` for JSON) and what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.data.benchmarks.files import BenchmarkError


@dataclass(frozen=True, kw_only=True)
class EvalExample:
    """One evaluation prompt in the common schema.

    ``example_id`` is unique within ``benchmark``; ``image`` is ``None`` for text-only prompts;
    ``label`` is 1 for a harmful request and 0 for a benign one; ``attack`` says how the request
    is delivered ("none", "typo", "sd", "sd_typo", "figstep", a JailBreakV format, ...).
    """

    example_id: str
    benchmark: str
    text: str
    image: Path | None
    label: int
    category: str
    attack: str


class LoaderError(BenchmarkError):
    """A benchmark file that cannot be loaded, named by path and record."""


def str_value(row: dict[str, Any], key: str, where: str) -> str:
    """A field that must be present and non-empty; numbers are accepted and turned into text."""
    if not isinstance(row, dict):
        raise LoaderError(f"{where}: expected an object, got {type(row).__name__}")
    if key not in row:
        raise LoaderError(f"{where}: missing field '{key}'")
    value = row[key]
    if value is None:  # an empty CSV cell reads as null
        raise LoaderError(f"{where}: field '{key}' is empty")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise LoaderError(f"{where}: field '{key}' must be text, got {value!r}")
    text = str(value).strip()
    if not text:
        raise LoaderError(f"{where}: field '{key}' is empty")
    return text


def existing_image(path: Path, where: str) -> Path:
    """``path`` if it is a file, else an error naming the record and the missing image."""
    if not path.is_file():
        raise LoaderError(f"{where}: image file {path} not found")
    return path


def check_unique(examples: list[EvalExample], path: Path) -> list[EvalExample]:
    """The examples, after checking ids are unique and there is at least one."""
    if not examples:
        raise LoaderError(f"{path}: no records in file")
    seen: set[str] = set()
    for example in examples:
        if example.example_id in seen:
            raise LoaderError(f"{path}[{example.example_id}]: duplicate id")
        seen.add(example.example_id)
    return examples


def table_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("file:line", row)`` for each row of a CSV or Parquet table that has all ``columns``.

    CSV cells are read as text (ids keep their leading zeros); the header is line 1.
    """
    path = Path(path)
    if not path.is_file():
        raise LoaderError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path)
            first_line = 0  # Parquet has no lines; rows are counted from 0 as "file:row"
        else:
            frame = pl.read_csv(path, infer_schema=False)
            first_line = 2
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{path}: cannot read table ({exc})") from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        where = f"{path}:1" if first_line else str(path)
        raise LoaderError(f"{where}: missing column(s) {missing}; found {frame.columns}")
    for number, row in enumerate(frame.iter_rows(named=True), start=first_line):
        yield f"{path}:{number}", row
