"""Choosing tau for a target false-positive rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.calibration import choose_tau, load_calibration, save_calibration


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
