"""bench/refits.py's comparison of two held-out results: identical scores, and the largest gaps."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.detection import HeldOutResults
from tests.bench.test_interleaved_ratios import bench_module


def results(lsi: list[float], auroc: float) -> HeldOutResults:
    """Two groups' results, the second one's LSI scores and AUROC as given."""
    labels = np.array([0, 1, 1])
    return HeldOutResults(
        metrics={"a": {"lsi": {"auroc": 0.9, "tau": float("nan")}}, "b": {"lsi": {"auroc": auroc, "n": 3}}},
        labels={"a": labels, "b": labels},
        scores={"a": {"lsi": np.array([0.1, 0.8, 0.9])}, "b": {"lsi": np.array(lsi)}},
    )


def test_differences_report_identical_scores_and_the_largest_gaps() -> None:
    refits = bench_module("refits")
    same = refits.differences(results([0.2, 0.5, 0.7], 0.8), results([0.2, 0.5, 0.7], 0.8))
    assert same["identical_scores"] and same["max_score_gap"] == 0.0 and same["max_metric_gap"] == 0.0
    moved = refits.differences(results([0.2, 0.5, 0.7], 0.8), results([0.2, 0.25, 0.7], 0.75))
    assert not moved["identical_scores"]
    assert moved["max_score_gap"] == pytest.approx(0.25) and moved["max_score_gap_by_detector"] == {
        "lsi": pytest.approx(0.25)
    }
    assert moved["max_auroc_gap"] == pytest.approx(0.05) and moved["max_metric_gap_at"] == "/b/lsi/auroc"
    with pytest.raises(ValueError, match="different groups or detectors"):
        refits.differences(results([0.2, 0.5, 0.7], 0.8), HeldOutResults())
