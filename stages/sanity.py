"""DVC stage ``sanity``: the run's guard on the everyday sanity set, a fresh set it was never trained on.

Writes ``data/sanity/rows.jsonl`` (one line per request: score, tau, action, whether it was right)
and ``data/sanity/metrics.json`` (accuracy, harmful refused and benign answered shares with their
Wilson intervals, per input, failed checks; for ``dvc metrics``). Prints the accuracy and the two
examples' scores that docs/guarding.md shows.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import load_params
from pipeline.defend.guard import Guard
from pipeline.evaluate.intervals import interval_of
from pipeline.evaluate.sanity import example_rows, misses, run_sanity
from pipeline.io import write_json_atomic, write_jsonl_atomic
from pipeline.layout import PARAMS, SANITY_METRICS, SANITY_RENDER, SANITY_ROWS, SANITY_SET
from pipeline.models.base import resolve_device
from stages import run_record, run_stage


def _fmt(value: float | None) -> str:
    """A score or share for the printout; a failed check has none."""
    return "n/a" if value is None else f"{value:.4f}"


def _share(summary: dict[str, Any], key: str) -> str:
    """A share with its Wilson interval, ``0.617 [0.490, 0.729]``; ``n/a`` when there is none."""
    interval = interval_of(summary, key)
    return _fmt(summary[key]) if interval is None else interval.format(3)


def main() -> None:
    """Score the set with the run's guard, write rows and metrics, print the headline numbers."""
    confidence = load_params(PARAMS).evaluate.confidence
    guard = Guard.from_run(".")
    result = run_sanity(SANITY_SET, guard, SANITY_RENDER, confidence=confidence)
    write_jsonl_atomic(SANITY_ROWS, [row.record() for row in result.rows])
    device = str(resolve_device(load_params(PARAMS).model.device))
    run = run_record(guard.adapter.info.name, guard.adapter.info.revision, device)
    write_json_atomic(SANITY_METRICS, {**result.summary, "run": run})

    summary = result.summary
    print(
        f"sanity accuracy {_share(summary, 'accuracy')} on {summary['n']} requests "
        f"(harmful refused {_share(summary, 'harmful_refused')}, benign answered {_share(summary, 'benign_answered')}, "
        f"failed checks {summary['n_errors']}; {100 * confidence:g}% Wilson intervals)"
    )
    for text, row in example_rows(result.rows).items():
        print(f"{text!r}: score {_fmt(row.score)} vs tau {row.tau:.4f} -> {row.action}")
    for row in misses(result.rows):
        print(
            f"miss {row.request_id} ({row.label}, {row.action}, score {_fmt(row.score)}): {row.image_text or row.text}"
        )


if __name__ == "__main__":
    run_stage(main)
