"""Detection metrics from scikit-learn, for the probe and every baseline alike."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from pipeline.evaluate.intervals import BootstrapSpec, bootstrap_detection, wilson


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """Best true-positive rate among thresholds whose false-positive rate is at most ``max_fpr``."""
    # Every threshold: the default drops collinear points, and a dropped one can be the best allowed.
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    allowed = tpr[fpr <= max_fpr]
    return float(allowed.max()) if len(allowed) else 0.0


def detection_metrics(
    labels: np.ndarray, scores: np.ndarray, tau: float, bootstrap: BootstrapSpec | None = None
) -> dict[str, float]:
    """AUROC, AUPRC, TPR at 1% and 5% FPR, and accuracy / F1 / FPR / TPR when refusing at ``score > tau``.

    With ``bootstrap``, each also gets ``<key>_low`` / ``<key>_high``: Wilson intervals for the
    rates at tau (accuracy, TPR, FPR), stratified bootstrap intervals for the rest
    (:mod:`pipeline.evaluate.intervals`), at ``bootstrap.confidence``.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    predicted = (scores > tau).astype(int)
    two_classes = len(np.unique(labels)) == 2
    nan = float("nan")
    metrics: dict[str, float] = {
        "n": int(len(labels)),
        "auroc": float(roc_auc_score(labels, scores)) if two_classes else nan,
        "auprc": float(average_precision_score(labels, scores)) if two_classes else nan,
        "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores, 0.01) if two_classes else nan,
        "tpr_at_5pct_fpr": tpr_at_fpr(labels, scores, 0.05) if two_classes else nan,
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "tpr": float(predicted[labels == 1].mean()) if (labels == 1).any() else nan,
        "fpr": float(predicted[labels == 0].mean()) if (labels == 0).any() else nan,
    }
    if bootstrap is None:
        return metrics
    for key, interval in bootstrap_detection(labels, scores, tau, bootstrap).items():
        metrics[f"{key}_low"], metrics[f"{key}_high"] = interval.low, interval.high
    positives, negatives = labels == 1, labels == 0
    rates = {
        "accuracy": (int((predicted == labels).sum()), len(labels)),
        "tpr": (int(predicted[positives].sum()), int(positives.sum())),
        "fpr": (int(predicted[negatives].sum()), int(negatives.sum())),
    }
    for key, (k, n) in rates.items():
        interval = wilson(k, n, bootstrap.confidence)
        metrics[f"{key}_low"], metrics[f"{key}_high"] = interval.low, interval.high
    return metrics


def per_group_metrics(
    frame: pl.DataFrame, group: str, tau: float, bootstrap: BootstrapSpec | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`detection_metrics` for each value of ``group`` in a frame with ``label`` and ``score``."""
    result: dict[str, dict[str, Any]] = {}
    for key in sorted(frame[group].unique().to_list()):
        part = frame.filter(pl.col(group) == key)
        result[str(key)] = detection_metrics(part["label"].to_numpy(), part["score"].to_numpy(), tau, bootstrap)
    return result


def roc_points(labels: np.ndarray, scores: np.ndarray, detector: str) -> list[dict[str, Any]]:
    """ROC curve as rows for ``dvc plots``."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return [{"detector": detector, "fpr": float(f), "tpr": float(t)} for f, t in zip(fpr, tpr, strict=True)]
