"""DVC stage ``compare``: no defence, LSI, ECSO and LSI then ECSO on one suite of benchmarks.

    python -m stages.compare demo    # the demo data's test split (dvc.yaml)
    python -m stages.compare dev     # the benchmark files in ../shared/benchmarks (dev/dvc.yaml)

The suite's benchmarks come from ``compare.suites.<name>`` in ``params.yaml``; the guard is the
run's (probe, tau, model). Writes, under ``data/compare/<suite>/``:

- ``rows.jsonl``: every defence's response to every example, its judge verdict, the LSI score
  and reason, every ECSO step and the timed parts;
- ``metrics.json``: refusal, attack success, harmless and benign-answer rates (each with its Wilson
  interval at ``evaluate.confidence``), ECSO use and added latency per benchmark and defence (for
  ``dvc metrics``); ``summary.json`` adds the per-category numbers;
- ``comparison.md``: the same as tables.

A long run keeps what it finished: each batch is appended to ``data/compare/<suite>.partial.jsonl``
(beside the output folder, which DVC empties before a run) and a rerun with the same setup
continues after the last whole batch (:mod:`pipeline.evaluate.resume`). A different setup
(params, probe, tau, examples) is refused, naming the file to delete.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.config import BenchmarkSpec, CompareConfig, Params, load_params
from pipeline.data.benchmarks.suites import check_suites, load_suite
from pipeline.defend.guard import Guard
from pipeline.detect.calibration import load_calibration
from pipeline.evaluate.comparison import ComparisonRow, comparison_markdown, summarise
from pipeline.evaluate.judges import build_judge
from pipeline.evaluate.resume import fingerprint
from pipeline.evaluate.suite_run import compact_metrics, example_keys, kept_rows, run_resumable
from pipeline.io import replace_dir_atomic, sha256_file, write_json_atomic, write_jsonl_atomic, write_text_atomic
from pipeline.layout import (
    CALIBRATION,
    PARAMS,
    PARTIAL_SUFFIX,
    PROBE_DIR,
    RENDER_ROOT,
    compare_dir,
    compare_partial,
)
from pipeline.models.base import resolve_device
from stages import run_record, run_stage

logger = logging.getLogger(__name__)


def limited(spec: BenchmarkSpec, limit: int | None) -> BenchmarkSpec:
    """``spec`` keeping at most ``limit`` examples (None: as params.yaml says; its 0 means all)."""
    if limit is None:
        return spec
    return replace(spec, limit=limit if spec.limit == 0 else min(spec.limit, limit))


def run_suite(suite: str, params: Params, output: Path | None = None, limit: int | None = None) -> dict[str, Any]:
    """Load the suite, run every defence on it (resuming a killed run), write its outputs; the summary.

    Paths are read from the current folder (the run). ``output`` replaces ``data/compare/<suite>``
    (the partial file of a killed run then sits beside it); ``limit`` caps every benchmark's examples.
    """
    config: CompareConfig = params.compare
    check_suites(config)
    specs = [limited(spec, limit) for spec in config.suite(suite)]
    target = compare_dir(suite) if output is None else output
    partial = compare_partial(suite) if output is None else output.with_name(output.name + PARTIAL_SUFFIX)
    # Load and validate every benchmark before the model: a bad file costs seconds, not a model load.
    examples = load_suite(specs, config.seed, RENDER_ROOT)
    keys = example_keys(examples, suite)
    logger.info("%s: %d examples from %d benchmark(s)", suite, len(examples), len(specs))

    tau = load_calibration(CALIBRATION).tau
    expected = fingerprint(params, suite, keys, tau, sha256_file(PROBE_DIR / "probe.safetensors"))
    kept = kept_rows(partial, expected, config.defences)
    guard = Guard.from_run(".", max_new_tokens=config.max_new_tokens)
    judge = build_judge(config.judge, own_model=guard.adapter)
    records = run_resumable(guard, judge, examples, keys, config, suite, partial, expected, kept)

    confidence = params.evaluate.confidence
    summary = summarise([ComparisonRow(**record) for record in records], confidence)
    meta = {
        "suite": suite,
        "judge": judge.name,
        "model": guard.adapter.info.name,
        "tau": tau,
        "detector": guard.detector.describe(),
        "defences": list(config.defences),
        "n_examples": {spec.name: sum(e.benchmark == spec.name for e in examples) for spec in specs},
        "confidence": confidence,
        "run": run_record(
            guard.adapter.info.name, guard.adapter.info.revision, str(resolve_device(params.model.device))
        ),
    }
    # Built beside data/compare/<suite> and swapped in whole (persist: true in dev/dvc.yaml).
    with replace_dir_atomic(target) as out:
        write_jsonl_atomic(out / "rows.jsonl", records)
        write_json_atomic(out / "summary.json", {**meta, "benchmarks": summary})
        write_json_atomic(out / "metrics.json", {**meta, "benchmarks": compact_metrics(summary)})
        write_text_atomic(out / "comparison.md", comparison_markdown(summary, confidence))
    partial.unlink()
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Run the suite named on the command line (``demo`` by default) and print its tables."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1:
        raise SystemExit("usage: python -m stages.compare [SUITE]")
    suite = args[0] if args else "demo"
    params = load_params(PARAMS)
    summary = run_suite(suite, params)
    print(comparison_markdown(summary, params.evaluate.confidence))


if __name__ == "__main__":
    run_stage(main)
