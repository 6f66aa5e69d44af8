"""DVC stage ``prepare``: validate the request sources, render their images, split them.

The sources are ``params.yaml``'s ``prepare.sources`` followed by the files the ``build`` stage
listed in ``data/built/sources.json``, when that file exists. Writes
``data/prepared/index.parquet``, ``images/`` and ``summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from pipeline.config import SPLITS, load_params
from pipeline.data.sources import DatasetError, build_index
from stages.build import SOURCES_FILE
from stages.common import INDEX, run_stage


def built_sources(path: Path = SOURCES_FILE) -> list[str]:
    """The source files listed by the ``build`` stage; none when it has not written the list."""
    if not path.is_file():
        return []
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the built source list ({exc}); rerun the build stage") from None
    if not isinstance(listed, list) or not all(isinstance(item, str) and item for item in listed):
        raise DatasetError(f"{path}: expected a JSON list of source file paths, got {listed!r:.80}")
    return listed


def all_sources(configured: Sequence[str], built: Sequence[str]) -> list[str]:
    """The configured sources, then the built ones; a file listed twice is read once."""
    sources: list[str] = []
    seen: set[Path] = set()
    for source in [*configured, *built]:
        key = Path(source).resolve()
        if key not in seen:
            seen.add(key)
            sources.append(source)
    return sources


def describe(index: pl.DataFrame) -> str:
    """A short summary: total rows, then rows and labels per split."""
    lines = [f"{index.height} rows from {index['source'].n_unique()} source(s)"]
    for split in SPLITS:
        part = index.filter(pl.col("split") == split)
        harmful = int(part["label"].sum())
        lines.append(f"  {split:<6} {part.height:>5} rows  ({harmful} harmful, {part.height - harmful} benign)")
    return "\n".join(lines)


def main() -> None:
    """Build the index from ``params.yaml``'s ``prepare`` section and the built sources, and print a summary."""
    config = load_params().prepare
    index = build_index(all_sources(config.sources, built_sources()), INDEX.parent, config)
    print(describe(index))
    print(f"wrote {INDEX}")


if __name__ == "__main__":
    # Bad params or sources end in one "error: ..." line and exit status 1, not a traceback.
    run_stage(main)
