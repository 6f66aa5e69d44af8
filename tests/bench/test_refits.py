"""bench/refits.py's comparisons of two held-out results and of two sweeps: identical or not, the largest gaps."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detect.sweep import DetectorScore, PairScore, SweepResult
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


def sweep_result(lsi_beta: float, pair_val: float) -> SweepResult:
    """Two pairs and two detectors over two groups; LSI's 'beta' AUROC and the first pair's as given."""
    pairs = [PairScore(fusion_layer=1, safety_layer=1, val_auroc=pair_val, held_out_auroc=float("nan"))]
    pairs.append(PairScore(fusion_layer=1, safety_layer=2, val_auroc=0.7, held_out_auroc=0.8))
    detectors = [
        DetectorScore(name="lsi", held_out_auroc=(0.9 + lsi_beta) / 2, per_group={"alpha": 0.9, "beta": lsi_beta}),
        DetectorScore(name="logreg_plain", held_out_auroc=0.8, per_group={"alpha": 0.8, "beta": 0.8}),
    ]
    return SweepResult(pairs, pairs[1], detectors)


def test_sweep_differences_report_the_gaps_and_whether_the_choices_agree() -> None:
    refits = bench_module("refits")
    same = refits.sweep_differences(sweep_result(0.9, 0.6), sweep_result(0.9, 0.6), 0.02)
    assert same["identical_scores"] and same["max_pair_gap"] == 0.0 and same["max_detector_gap"] == 0.0
    assert same["same_pair"] and same["same_detector"]
    # LSI falls from 0.9 to 0.6 on 'beta': the plain probe now ships instead.
    moved = refits.sweep_differences(sweep_result(0.9, 0.6), sweep_result(0.6, 0.65), 0.02)
    assert not moved["identical_scores"] and not moved["same_detector"] and moved["same_pair"]
    assert moved["detector"] == "logreg_plain" and moved["pair"] == "fusion 1, safety 2"
    assert moved["max_pair_gap"] == pytest.approx(0.05) and moved["max_detector_gap"] == pytest.approx(0.3)
    assert moved["max_detector_gap_by_detector"] == {"lsi": pytest.approx(0.3), "logreg_plain": 0.0}
    other = sweep_result(0.9, 0.6)
    with pytest.raises(ValueError, match="different detectors or groups"):
        refits.sweep_differences(other, SweepResult(other.pairs, other.best, other.detectors[:1]), 0.02)


def test_detector_differences_compare_the_detector_half_alone() -> None:
    refits = bench_module("refits")
    a, b = sweep_result(0.9, 0.6).detectors, sweep_result(0.6, 0.6).detectors
    moved = refits.detector_differences(a, b, 0.02)
    assert moved["max_detector_gap"] == pytest.approx(0.3) and moved["detector"] == "logreg_plain"
    assert not moved["same_detector"] and not moved["identical_scores"]
    assert moved["mean_auroc_by_detector"] == {"lsi": pytest.approx(0.75), "logreg_plain": pytest.approx(0.8)}
    assert refits.detector_differences(a, a, 0.02)["identical_scores"]
