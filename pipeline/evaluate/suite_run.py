"""One comparison suite, run to the end across kills: resume, run what is left, order the rows, summarise.

The partial file's protocol lives in :mod:`pipeline.evaluate.resume`; this module decides what
is already done, runs the rest batch by batch (appending each), and returns every row in suite
order, then defence order, whatever order the batches and the resume gave.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import CompareConfig, ConfigError
from pipeline.data.benchmarks.loaders import EvalExample
from pipeline.defend.guard import Guard
from pipeline.evaluate.comparison import iter_comparison
from pipeline.evaluate.judges import Judge
from pipeline.evaluate.resume import append_rows, done_examples, finished_rows, read_partial, start_partial

logger = logging.getLogger(__name__)


def example_keys(examples: Sequence[EvalExample], suite: str) -> list[str]:
    """``benchmark/example_id`` of every example, in suite order; two examples with one key are refused."""
    keys = [f"{example.benchmark}/{example.example_id}" for example in examples]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"compare.suites.{suite}: two benchmarks yield the same example ids; rename one")
    return keys


def run_resumable(
    guard: Guard,
    judge: Judge,
    examples: Sequence[EvalExample],
    keys: Sequence[str],
    config: CompareConfig,
    suite: str,
    partial: Path,
    expected: str,
    kept: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Every defence's row for every example, after the rows ``kept`` from ``partial`` (see :func:`kept_rows`).

    ``keys`` are the examples' :func:`example_keys`; ``expected`` is the run's fingerprint.
    ``partial`` is left in place for the caller to delete once the outputs are written.
    """
    records = list(kept)
    finished = done_examples(records, config.defences)
    todo = [e for e in examples if (e.benchmark, e.example_id) not in finished]
    if finished:
        logger.info("%s: resuming, %d examples already done in %s", suite, len(finished), partial)
    start_partial(partial, expected, suite, records)
    for batch in iter_comparison(guard, todo, judge, config.defences, config.batch_size, config.max_new_tokens):
        batch_records = [row.record() for row in batch]
        append_rows(partial, batch_records)
        records.extend(batch_records)
    position = {key: i for i, key in enumerate(keys)}
    records.sort(key=lambda r: (position[f"{r['benchmark']}/{r['example_id']}"], config.defences.index(r["defence"])))
    return records


def kept_rows(partial: Path, expected: str, defences: Sequence[str]) -> list[dict[str, Any]]:
    """The whole examples a killed run left in ``partial``; read before the model loads, so a mismatch costs nothing."""
    return finished_rows(read_partial(partial, expected), defences)


def compact_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without its per-category tables: what ``dvc metrics show`` prints stays readable."""
    return {
        benchmark: {defence: {k: v for k, v in m.items() if k != "per_category"} for defence, m in defences.items()}
        for benchmark, defences in summary.items()
    }
