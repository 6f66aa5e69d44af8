"""DVC stage ``prepare``: validate the request sources, render their images, split them.

Writes ``<prepare.output_dir>/index.parquet``, ``images/`` and ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.config import SPLITS, load_params
from pipeline.dataset import INDEX_FILE, build_index
from stages.common import run_stage


def describe(index: pl.DataFrame) -> str:
    """A short summary: total rows, then rows and labels per split."""
    lines = [f"{index.height} rows from {index['source'].n_unique()} source(s)"]
    for split in SPLITS:
        part = index.filter(pl.col("split") == split)
        harmful = int(part["label"].sum())
        lines.append(f"  {split:<6} {part.height:>5} rows  ({harmful} harmful, {part.height - harmful} benign)")
    return "\n".join(lines)


def main() -> None:
    """Build the index from ``params.yaml``'s ``prepare`` section and print a summary."""
    config = load_params().prepare
    index = build_index(config.sources, config.output_dir, config)
    print(describe(index))
    print(f"wrote {Path(config.output_dir) / INDEX_FILE}")


if __name__ == "__main__":
    # Bad params or sources end in one "error: ..." line and exit status 1, not a traceback.
    run_stage(main)
