"""What the intervals add to the evaluate stage: its metric calls with and without them, same run, same shape.

The shape is the default run's (``data/eval/metrics.json``): 9 detectors; a 181-row in-source test
split; 6 sources, each with its share of the test split (12-72 rows) and, held out, its test rows
(12-72) and all its rows (80-352, plus the shipped detector at the run's tau); 22 categories of the
test split; then the paired tests (in-source and each held-out source). Scores are synthetic
(Gaussian, the harmful rows shifted), so no model or pipeline output is needed.

    python bench/intervals.py --resamples 1000 --rounds 3

Baseline: every metric without intervals (what the stage computed before). Prints both times and
the added seconds, and writes ``bench/results/intervals.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from pipeline.evaluate.intervals import BootstrapSpec
from pipeline.evaluate.metrics import detection_metrics
from pipeline.evaluate.paired import held_out_comparison, in_source_paired

RESULTS = Path("bench/results")
DETECTORS = 9
TEST_ROWS = 181
SOURCE_TEST_ROWS = (12, 26, 28, 21, 22, 72)
SOURCE_ALL_ROWS = (80, 120, 120, 120, 120, 352)
CATEGORIES = 22


def scored(n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Balanced labels and one score array per detector (each separating the labels a little differently)."""
    labels = np.arange(n) % 2
    return labels, {f"d{i}": rng.normal(size=n) + labels * (0.2 * i) for i in range(DETECTORS)}


def run_once(spec: BootstrapSpec | None, seed: int) -> float:
    """Seconds for every metric call of one evaluate stage (and its paired tests when ``spec`` is given)."""
    rng = np.random.default_rng(seed)
    settings = [scored(TEST_ROWS, rng)]
    settings += [scored(n, rng) for n in SOURCE_TEST_ROWS]  # in-source, per source
    settings += [scored(n, rng) for n in SOURCE_TEST_ROWS]  # held out, its test rows
    held = [scored(n, rng) for n in SOURCE_ALL_ROWS]  # held out, all its rows
    test_labels, test_scores = settings[0]
    categories = np.array_split(np.arange(TEST_ROWS), CATEGORIES)
    started = time.perf_counter()
    for labels, scores in [*settings, *held]:
        for values in scores.values():
            detection_metrics(labels, values, 0.5, spec)
    for labels, scores in held:  # the shipped detector at the run's own tau
        detection_metrics(labels, scores["d0"], 0.9, spec)
    for rows in categories:
        detection_metrics(test_labels[rows], test_scores["d0"][rows], 0.5, spec)
    if spec is not None:
        in_source_paired("d0", test_labels, test_scores, spec)
        labels_by_source = {f"s{i}": labels for i, (labels, _) in enumerate(held)}
        scores_by_source = {f"s{i}": scores for i, (_, scores) in enumerate(held)}
        held_out_comparison("d0", labels_by_source, scores_by_source, spec)
    return time.perf_counter() - started


def main() -> None:
    """Time the stage's metric calls without and with intervals, taking turns; print and write the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "intervals.json")
    args = parser.parse_args()
    spec = BootstrapSpec(resamples=args.resamples)
    plain, with_intervals = [], []
    for round_ in range(args.rounds):
        plain.append(run_once(None, round_))
        with_intervals.append(run_once(spec, round_))
    base, new = min(plain), min(with_intervals)
    result = {
        "resamples": args.resamples,
        "rounds": args.rounds,
        "seconds_without_intervals": round(base, 3),
        "seconds_with_intervals": round(new, 3),
        "added_seconds": round(new - base, 3),
        "ratio": round(new / base, 2),
        "machine": platform.platform(),
    }
    print(f"evaluate stage's metric calls, default run's shape, best of {args.rounds} rounds:")
    print(f"  without intervals {base:.2f} s, with intervals ({args.resamples} resamples) {new:.2f} s")
    print(f"  added {new - base:.2f} s ({new / base:.1f}x the metric calls alone)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
