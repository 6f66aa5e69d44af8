"""DVC stage ``prepare``: validate the request sources, render their images, split them.

The sources are ``params.yaml``'s ``prepare.sources`` followed by the files the ``build`` stage
listed in ``data/built/sources.json``, when that file exists. Writes
``data/prepared/index.parquet``, ``images/`` and ``summary.json``. Texts and images are held to
``params.yaml``'s ``limits``; a bad source fails the stage before ``data/prepared/`` is touched.
"""

from __future__ import annotations

import polars as pl

from pipeline.config import SPLITS, load_params
from pipeline.data.built_sources import all_sources, read_built_sources
from pipeline.data.index import build_index
from pipeline.io import restore_dir_on_failure
from pipeline.layout import INDEX, SOURCES_FILE
from stages import run_stage


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
    params = load_params()
    config = params.prepare
    sources = all_sources(config.sources, read_built_sources(SOURCES_FILE))
    # The index names its images by their final paths, so the folder is updated in place, and put
    # back whole if anything fails (persist: true in dvc.yaml).
    with restore_dir_on_failure(INDEX.parent):
        index = build_index(sources, INDEX.parent, config, params.limits)
    print(describe(index))
    print(f"wrote {INDEX}")


if __name__ == "__main__":
    # Bad params or sources end in one "error: ..." line and exit status 1, not a traceback.
    run_stage(main)
