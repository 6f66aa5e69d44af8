"""Detection metrics and the plain baselines."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.detect.logistic import fit_logistic, positive_scores
from pipeline.evaluate.baselines import length_features, style_features
from pipeline.evaluate.metrics import (
    detection_metrics,
    per_group_metrics,
    roc_points,
    tpr_at_fpr,
)


def test_perfect_and_inverted_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    perfect = detection_metrics(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9]), tau=0.5)
    assert perfect["auroc"] == 1.0 and perfect["f1"] == 1.0 and perfect["fpr"] == 0.0
    inverted = detection_metrics(labels, np.array([0.9, 0.8, 0.7, 0.2, 0.1]), tau=0.5)
    assert inverted["auroc"] == 0.0 and inverted["tpr"] == 0.0 and inverted["fpr"] == 1.0


def test_tpr_at_fpr_respects_the_budget() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    scores = np.r_[np.linspace(0, 0.9, 10), np.linspace(0.5, 1.0, 10)]
    assert tpr_at_fpr(labels, scores, 0.0) < tpr_at_fpr(labels, scores, 0.3)


def test_one_class_gives_nan_not_crash() -> None:
    metrics = detection_metrics(np.array([1, 1]), np.array([0.2, 0.9]), tau=0.5)
    assert np.isnan(metrics["auroc"]) and metrics["tpr"] == 0.5


def test_per_group() -> None:
    frame = pl.DataFrame({"category": ["a", "a", "b", "b"], "label": [0, 1, 0, 1], "score": [0.1, 0.9, 0.8, 0.2]})
    groups = per_group_metrics(frame, "category", tau=0.5)
    assert groups["a"]["auroc"] == 1.0 and groups["b"]["auroc"] == 0.0


def test_roc_points_are_rows() -> None:
    rows = roc_points(np.array([0, 1]), np.array([0.2, 0.8]), "lsi")
    assert rows[0]["detector"] == "lsi" and rows[-1]["tpr"] == 1.0


def test_length_baseline_learns_length() -> None:
    texts = ["short"] * 20 + ["a much longer request " * 5] * 20
    labels = np.r_[np.zeros(20), np.ones(20)].astype(int)
    model = fit_logistic(length_features(texts), labels)
    assert detection_metrics(labels, positive_scores(model, length_features(texts)), 0.5)["auroc"] == 1.0
    assert style_features(texts).shape == (40, 8)


def test_style_features_are_finite_for_empty_text() -> None:
    assert np.isfinite(style_features([""])).all()
    assert length_features(["two words"]).tolist() == [[9.0, 2.0]]
    with pytest.raises(ValueError):
        fit_logistic(np.zeros((4, 2)), np.zeros(4, dtype=int))  # one class cannot be fitted
