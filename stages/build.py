"""DVC stage ``build``: request sources built from benchmark files, harmful and benign matched in style.

Reads ``params.yaml``'s ``build`` section (the vendored public instructions in ``build.public``,
and the benchmark files in ``build.benchmarks`` when set) and writes ``data/built/<source>.jsonl`` per built
source, ``data/built/sources.json`` (the list of those files, which the ``prepare`` stage adds
to its sources) and ``data/built/summary.json`` (rows, median length and length-only AUROC per
source). With ``build.augment_share`` above 0, each source (but the already wrapped ones) also
holds copies of a share of its requests in attacker-style wrappers (:mod:`pipeline.data.augment`).
With both folders empty the list is empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import load_params
from pipeline.data.augment import with_augmented_copies
from pipeline.data.benchmarks.files import BenchmarkError
from pipeline.data.build import build_sources, summarize_source
from pipeline.data.built_sources import write_sources
from pipeline.data.public import build_public_sources, read_public
from pipeline.io import restore_dir_on_failure, write_json_atomic
from pipeline.layout import BUILT_DIR, BUILT_SUMMARY, SOURCES_FILE
from stages import run_stage


def describe(summaries: dict[str, dict[str, Any]]) -> str:
    """One line per source: rows and median text length per label, and the length-only AUROC."""
    if not summaries:
        return "no sources built (build.public and build.benchmarks are empty)"
    lines = []
    for name, summary in summaries.items():
        rows, median = summary["rows"], summary["median_length"]
        line = (
            f"{name:<18} {rows['harmful']:>4} harmful  {rows['benign']:>4} benign  "
            f"median length {median['harmful']:.0f} / {median['benign']:.0f}  "
            f"length AUROC {summary['length_auroc']:.3f}"
        )
        if summary["image_text_length_auroc"] is not None:
            line += f"  (image text {summary['image_text_length_auroc']:.3f})"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    """Build the sources from ``params.yaml``'s ``build`` section, write them and print a summary."""
    params = load_params()
    config = params.build
    sources: dict[str, list[dict[str, Any]]] = {}
    if config.public:
        sources.update(build_public_sources(read_public(config.public), config.per_source, config.seed))
    if config.benchmarks:
        folder = Path(config.benchmarks)
        if not folder.is_dir():
            raise BenchmarkError(f"{folder}: no such benchmark folder (build.benchmarks)")
        sources.update(build_sources(folder, config))
    if config.augment_share > 0:
        sources = with_augmented_copies(
            sources,
            share=config.augment_share,
            families=config.augment_families,
            seed=config.seed,
            limits=params.limits,
        )
    summaries = {name: summarize_source(rows) for name, rows in sources.items()}
    # sources.json names the files by their final paths, so the folder is updated in place, and put
    # back whole if anything fails (persist: true in dvc.yaml).
    with restore_dir_on_failure(BUILT_DIR):
        written = write_sources(sources, BUILT_DIR, SOURCES_FILE.name)
        write_json_atomic(BUILT_SUMMARY, summaries)
    print(describe(summaries))
    print(f"wrote {SOURCES_FILE} ({len(written)} source(s))")


if __name__ == "__main__":
    # A missing folder or a malformed benchmark file ends in one "error: ..." line and exit status 1.
    run_stage(main)
