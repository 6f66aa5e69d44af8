"""Choosing tau (target false-positive rate or best F1), score scaling, calibration error, and the calibration file."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.metrics import f1_score, log_loss

from pipeline.config import CalibrateConfig
from pipeline.detect.calibration import (
    ScoreScaling,
    calibrate,
    choose_tau,
    choose_tau_best_f1,
    choose_tau_by_method,
    expected_calibration_error,
    fit_scaling,
    load_calibration,
    reliability_rows,
    save_calibration,
)


def test_tau_meets_the_target_fpr() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200), np.ones(100)].astype(int)
    scores = np.r_[rng.uniform(0, 0.7, 200), rng.uniform(0.3, 1.0, 100)]
    calibration = choose_tau(labels, scores, target_fpr=0.05)
    assert calibration.calib_fpr <= 0.05
    assert np.mean(scores[labels == 0] > calibration.tau) == pytest.approx(calibration.calib_fpr)
    # lowest such tau: the next benign score below it would exceed the budget
    benign = np.sort(scores[labels == 0])
    below = benign[benign < calibration.tau].max()
    assert np.mean(scores[labels == 0] > below) > 0.05


def test_zero_target_refuses_no_benign() -> None:
    labels = np.array([0, 0, 1, 1])
    calibration = choose_tau(labels, np.array([0.2, 0.6, 0.5, 0.9]), target_fpr=0.0)
    assert calibration.tau == 0.6 and calibration.calib_fpr == 0.0 and calibration.calib_tpr == 0.5


def test_one_label_is_refused() -> None:
    with pytest.raises(ValueError, match="both labels"):
        choose_tau(np.zeros(3, dtype=int), np.array([0.1, 0.2, 0.3]), 0.05)


def test_roundtrip(tmp_path: Path) -> None:
    calibration = choose_tau(np.array([0, 1]), np.array([0.1, 0.9]), 0.05)
    save_calibration(calibration, tmp_path / "c.json")
    assert load_calibration(tmp_path / "c.json") == calibration
    with pytest.raises(FileNotFoundError, match="calibrate"):
        load_calibration(tmp_path / "missing.json")


# --- best-F1 tau, score scaling, expected calibration error, the JSON file, the stage's outputs ---


def miscalibrated(n: int, seed: int, sharpness: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores whose true harmful probability is sigmoid(sharpness * logit(s)): under-confident for sharpness > 1."""
    rng = np.random.default_rng(seed)
    raw = expit(rng.normal(0.0, 1.0, n))
    labels = (rng.uniform(size=n) < expit(sharpness * logit(raw))).astype(int)
    return labels, raw


def nll(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(log_loss(labels, np.clip(probabilities, 1e-12, 1 - 1e-12)))


@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many tied scores
def test_best_f1_tau_is_the_best_threshold(decimals: int | None) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1)
    if decimals is not None:
        scores = np.round(scores, decimals)
    calibration = choose_tau_best_f1(labels, scores)
    # every distinct way of splitting the rows by `score > t`, including refusing all of them
    candidates = np.r_[np.unique(scores), scores.min() - 1.0]
    brute = max(f1_score(labels, scores > t, zero_division=0.0) for t in candidates)
    assert calibration.method == "best_f1"
    assert calibration.calib_f1 == pytest.approx(brute, abs=1e-12)
    assert calibration.calib_f1 == pytest.approx(f1_score(labels, scores > calibration.tau), abs=1e-12)
    assert calibration.calib_fpr == pytest.approx(np.mean(scores[labels == 0] > calibration.tau))
    assert calibration.calib_tpr == pytest.approx(np.mean(scores[labels == 1] > calibration.tau))


def test_best_f1_tau_sits_strictly_between_scores() -> None:
    labels = np.array([0, 0, 1, 1])
    calibration = choose_tau_best_f1(labels, np.array([0.1, 0.3, 0.6, 0.9]))
    assert calibration.tau == pytest.approx(0.45) and calibration.calib_f1 == 1.0
    # the best split refuses every row: tau just below the lowest score still refuses it
    everything = choose_tau_best_f1(np.array([0, 1, 1, 1]), np.array([0.5, 0.2, 0.6, 0.9]))
    assert everything.tau < 0.2 and everything.calib_tpr == 1.0 and everything.calib_fpr == 1.0
    assert everything.calib_f1 == pytest.approx(f1_score([0, 1, 1, 1], [1, 1, 1, 1]))


def test_choose_tau_fills_f1_but_no_ece() -> None:
    labels = np.array([0, 0, 1, 1])
    calibration = choose_tau(labels, np.array([0.2, 0.6, 0.5, 0.9]), target_fpr=0.0)
    assert calibration.method == "target_fpr" and calibration.scaling == ScoreScaling()
    assert calibration.calib_f1 == pytest.approx(f1_score(labels, [0, 0, 0, 1]))
    assert calibration.ece_raw is None and calibration.ece_scaled is None


@pytest.mark.parametrize("kind", ["platt", "temperature"])
def test_scaling_fixes_miscalibrated_scores(kind: str) -> None:
    labels, raw = miscalibrated(4000, seed=2)
    scaling = fit_scaling(kind, labels, raw)
    scaled = scaling.probability(raw)
    assert scaling.kind == kind and scaling.slope == pytest.approx(3.0, abs=0.4)
    if kind == "temperature":
        assert scaling.intercept == 0.0
    assert expected_calibration_error(labels, scaled, 10) < 0.5 * expected_calibration_error(labels, raw, 10)
    assert nll(labels, scaled) < nll(labels, raw)
    # held-out rows from the same source are better calibrated too
    test_labels, test_raw = miscalibrated(4000, seed=3)
    assert nll(test_labels, scaling.probability(test_raw)) < nll(test_labels, test_raw)


def test_scaling_formulas() -> None:
    raw = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    z = logit(np.clip(raw, 1e-7, 1 - 1e-7))
    assert np.array_equal(ScoreScaling().probability(raw), raw)
    np.testing.assert_allclose(ScoreScaling("platt", 2.0, -0.5).probability(raw), expit(2.0 * z - 0.5))
    np.testing.assert_allclose(ScoreScaling("temperature", 0.5, 0.0).probability(raw), expit(z / 2.0))
    assert np.all(np.isfinite(ScoreScaling("platt", 2.0, 0.0).probability(raw)))
    assert fit_scaling("none", np.array([0, 1]), np.array([0.3, 0.4])) == ScoreScaling()


@pytest.mark.parametrize("kind", ["platt", "temperature"])
def test_scores_ranking_the_wrong_way_are_refused(kind: str) -> None:
    labels, raw = miscalibrated(500, seed=4)
    with pytest.raises(ValueError, match="wrong way"):
        fit_scaling(kind, 1 - labels, raw)


@pytest.mark.parametrize("method", ["target_fpr", "best_f1"])
def test_tau_does_not_depend_on_the_scaling(method: str) -> None:
    labels, raw = miscalibrated(600, seed=5)
    results = {
        scaling: calibrate(labels, raw, CalibrateConfig(target_fpr=0.1, method=method, scaling=scaling))
        for scaling in ("none", "platt", "temperature")
    }
    taus = {(c.tau, c.calib_fpr, c.calib_tpr, c.calib_f1) for c in results.values()}
    assert len(taus) == 1
    assert results["none"].ece_scaled == results["none"].ece_raw
    assert results["platt"].ece_scaled < results["platt"].ece_raw
    assert results["platt"].scaling.kind == "platt" and results["platt"].method == method
    if method == "target_fpr":
        assert results["none"].tau == choose_tau(labels, raw, 0.1).tau
    else:
        assert results["none"].tau == choose_tau_best_f1(labels, raw).tau
    # the scaling is monotonic: refusing on the scaled probability above scaled tau refuses the same rows
    platt = results["platt"]
    refused = raw > platt.tau
    assert np.array_equal(platt.probability(raw) > platt.probability(np.array([platt.tau]))[0], refused)


def test_ece_and_reliability_by_hand() -> None:
    labels = np.array([0, 1, 1, 1, 0])
    probabilities = np.array([0.1, 0.2, 0.8, 0.9, 0.95])
    # bin [0, 0.5]: mean 0.15, 1 of 2 harmful, gap 0.35, weight 2/5; bin (0.5, 1]: mean 0.85 - 0.05/3, 2 of 3
    low_gap, high_gap = 0.35, abs((0.8 + 0.9 + 0.95) / 3 - 2 / 3)
    assert expected_calibration_error(labels, probabilities, 2) == pytest.approx(2 / 5 * low_gap + 3 / 5 * high_gap)
    assert expected_calibration_error(labels, probabilities, 2) == pytest.approx(0.27)
    rows = reliability_rows(labels, probabilities, 2)
    assert rows == [
        {
            "bin_lower": 0.0,
            "bin_upper": 0.5,
            "mean_predicted": pytest.approx(0.15),
            "fraction_harmful": 0.5,
            "count": 2,
        },
        {
            "bin_lower": 0.5,
            "bin_upper": 1.0,
            "mean_predicted": pytest.approx(2.65 / 3),
            "fraction_harmful": pytest.approx(2 / 3),
            "count": 3,
        },
    ]
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0]), 10) == 0.0


def test_reliability_rows_match_scikit_learn() -> None:
    labels, raw = miscalibrated(500, seed=6)
    rows = reliability_rows(labels, raw, 10)
    fraction, predicted = calibration_curve(labels, raw, n_bins=10)
    np.testing.assert_allclose([r["fraction_harmful"] for r in rows], fraction)
    np.testing.assert_allclose([r["mean_predicted"] for r in rows], predicted)
    assert sum(r["count"] for r in rows) == 500
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(labels, raw * 2, 10)


def test_roundtrip_with_scaling(tmp_path: Path) -> None:
    labels, raw = miscalibrated(300, seed=7)
    calibration = calibrate(labels, raw, CalibrateConfig(method="best_f1", scaling="platt", bins=5))
    path = tmp_path / "calibration.json"
    save_calibration(calibration, path)
    stored = json.loads(path.read_text())
    assert stored["scaling"] == {
        "kind": "platt",
        "slope": calibration.scaling.slope,
        "intercept": calibration.scaling.intercept,
    }
    loaded = load_calibration(path)
    assert loaded == calibration
    np.testing.assert_array_equal(loaded.probability(raw), calibration.probability(raw))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    old = {"tau": 0.5, "target_fpr": 0.05, "calib_fpr": 0.0, "calib_tpr": 1.0, "n_benign": 1, "n_harmful": 1}
    path.write_text(json.dumps(old))  # written before scaling existed
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*rerun dvc repro calibrate"):
        load_calibration(path)
    full = asdict(choose_tau(np.array([0, 1]), np.array([0.1, 0.9]), 0.05))
    path.write_text(json.dumps({**full, "extra": 1}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*unknown keys \['extra'\]"):
        load_calibration(path)
    path.write_text(json.dumps({**full, "scaling": {"kind": "platt", "slope": 1.0}}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*'scaling' is missing \['intercept'\]"):
        load_calibration(path)
    path.write_text(json.dumps({**full, "scaling": {"kind": "isotonic", "slope": 1.0, "intercept": 0.0}}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*isotonic"):
        load_calibration(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*not valid JSON"):
        load_calibration(path)


def test_stage_writes_calibration_and_reliability(tmp_path: Path) -> None:
    from stages.calibrate import summary_line, write_calibration

    labels, raw = miscalibrated(400, seed=8)
    calibration = write_calibration(labels, raw, CalibrateConfig(scaling="temperature", bins=8), tmp_path)
    assert load_calibration(tmp_path / "calibration.json") == calibration
    rows = json.loads((tmp_path / "reliability.json").read_text())
    assert {r["scaling"] for r in rows} == {"raw", "temperature"}
    assert sum(r["count"] for r in rows if r["scaling"] == "raw") == 400
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = summary_line(calibration)
    assert f"tau={calibration.tau:.4f} (target_fpr)" in line and "ECE raw" in line and "temperature" in line

    plain = write_calibration(labels, raw, CalibrateConfig(), tmp_path / "plain")
    assert plain.tau == calibration.tau
    assert {r["scaling"] for r in json.loads((tmp_path / "plain" / "reliability.json").read_text())} == {"raw"}


def test_scores_that_are_not_probabilities_get_a_tau_but_no_ece() -> None:
    labels, raw = miscalibrated(300, seed=9)
    cosine_sums = 4.0 * logit(raw)  # a baseline's score: any real number, higher means more harmful
    for method in ("target_fpr", "best_f1"):
        config = CalibrateConfig(method=method)
        calibration = calibrate(labels, cosine_sums, config)
        assert calibration.tau == choose_tau_by_method(labels, cosine_sums, config).tau
        assert calibration.ece_raw is None and calibration.scaling == ScoreScaling()
        # the same rows are refused as on the raw probabilities, since the map is monotonic
        assert calibration.calib_tpr == calibrate(labels, raw, config).calib_tpr
    with pytest.raises(ValueError, match=r"platt scaling needs sigmoid scores in \[0, 1\]"):
        calibrate(labels, cosine_sums, CalibrateConfig(scaling="platt"))
