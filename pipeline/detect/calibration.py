"""Choose the refusal threshold tau on a calibration split, calibrate the probe's scores, and persist both as JSON.

Tau always lives in raw-score space: the guard and the evaluate stage refuse when the probe's raw
sigmoid score is above it. The optional score scaling (Platt or temperature) is monotonic, so it
never moves tau; it only turns raw scores into probabilities that mean what they say, which the
expected calibration error and the reliability diagram measure.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, precision_recall_curve

from pipeline.config import CalibrateConfig
from pipeline.errors import LSIGuardError
from pipeline.io import write_text_atomic

SCALING_KINDS = ("none", "platt", "temperature")
METHODS = ("target_fpr", "best_f1")

# Raw sigmoid scores are clipped this far from 0 and 1 so that their logit stays finite.
SCORE_EPS = 1e-7


class CalibrationError(LSIGuardError, ValueError):
    """Calibration input that cannot be used: one label missing, scores ranking the wrong way, a bad file."""


@dataclass(frozen=True)
class ScoreScaling:
    """A monotonic map from the probe's raw sigmoid score to a calibrated probability, via its logit.

    ``platt``: ``sigmoid(slope * logit(s) + intercept)``; ``temperature``: ``sigmoid(logit(s) / T)``,
    stored as ``slope = 1 / T`` and ``intercept = 0``; ``none``: the raw score itself.
    """

    kind: str = "none"
    slope: float = 1.0
    intercept: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCALING_KINDS:
            raise CalibrationError(f"score scaling must be one of {SCALING_KINDS}, got {self.kind!r}")
        if not self.slope > 0:
            raise CalibrationError(
                f"score scaling slope must be positive (a monotonic increasing map), got {self.slope}"
            )

    def probability(self, raw_scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for raw probe scores in [0, 1]."""
        raw = np.asarray(raw_scores, dtype=np.float64)
        if self.kind == "none":
            return raw
        return expit(self.slope * score_logit(raw) + self.intercept)


IDENTITY = ScoreScaling()


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Refuse when the raw probe ``score > tau``; tau was chosen on the calibration split by ``method``.

    ``calib_fpr`` / ``calib_tpr`` / ``calib_f1`` are those of ``score > tau`` on the calibration split.
    ``scaling`` maps raw scores to calibrated probabilities (it does not move tau). ``ece_raw`` and
    ``ece_scaled`` are the expected calibration errors of the raw and scaled scores on the same split
    the scaling was fitted on (so ``ece_scaled`` is optimistic); ``None`` where not measured, e.g. a
    baseline thresholded with :func:`choose_tau` whose scores are not probabilities.
    """

    tau: float
    target_fpr: float
    calib_fpr: float
    calib_tpr: float
    n_benign: int
    n_harmful: int
    method: str = "target_fpr"
    scaling: ScoreScaling = IDENTITY
    calib_f1: float | None = None
    ece_raw: float | None = None
    ece_scaled: float | None = None

    def probability(self, raw_scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for raw probe scores (see :class:`ScoreScaling`)."""
        return self.scaling.probability(raw_scores)


def score_logit(raw_scores: np.ndarray) -> np.ndarray:
    """The logit of raw sigmoid scores, clipped away from 0 and 1 so that it stays finite."""
    return logit(np.clip(np.asarray(raw_scores, dtype=np.float64), SCORE_EPS, 1.0 - SCORE_EPS))


def _is_probability(scores: np.ndarray) -> bool:
    """Whether every score lies in [0, 1] (NaN does not)."""
    return bool(np.all((scores >= 0) & (scores <= 1)))


def _split(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as 0/1 ints and scores as float64, checked to be aligned and to hold both labels."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise CalibrationError(f"labels {labels.shape} and scores {scores.shape} must be 1-D and of the same length")
    n_benign, n_harmful = int(np.sum(labels == 0)), int(np.sum(labels == 1))
    if n_benign == 0 or n_harmful == 0:
        raise CalibrationError(f"calibration needs both labels, got {n_benign} benign and {n_harmful} harmful rows")
    return labels, scores


def _threshold_record(
    labels: np.ndarray, scores: np.ndarray, tau: float, target_fpr: float, method: str
) -> Calibration:
    """The rates of ``score > tau`` on the split, as a calibration without scaling."""
    benign, harmful = scores[labels == 0], scores[labels == 1]
    return Calibration(
        tau=float(tau),
        target_fpr=target_fpr,
        calib_fpr=float(np.mean(benign > tau)),
        calib_tpr=float(np.mean(harmful > tau)),
        n_benign=int(len(benign)),
        n_harmful=int(len(harmful)),
        method=method,
        calib_f1=float(f1_score(labels, scores > tau, zero_division=0.0)),
    )


def choose_tau(labels: np.ndarray, scores: np.ndarray, target_fpr: float) -> Calibration:
    """The lowest tau whose false-positive rate on benign calibration rows is at most ``target_fpr``.

    The lowest such tau refuses the most harmful requests for the allowed false positives. Works for
    any score where higher means more harmful (baselines too); the ECE fields stay ``None``.
    """
    labels, scores = _split(labels, scores)
    benign = scores[labels == 0]
    allowed = int(np.floor(target_fpr * len(benign)))  # benign rows that may score above tau
    descending = np.sort(benign)[::-1]
    tau = float(descending[allowed]) if allowed < len(benign) else float(descending[-1]) - 1e-12
    return _threshold_record(labels, scores, tau, target_fpr, "target_fpr")


def choose_tau_best_f1(labels: np.ndarray, scores: np.ndarray, target_fpr: float = 0.0) -> Calibration:
    """The tau that maximises the F1 of ``score > tau`` (harmful is positive) on the split.

    ``precision_recall_curve`` scores every distinct score ``t`` as ``score >= t``; the same rows are
    refused by ``score > tau`` for any tau between ``t`` and the next lower distinct score, so tau is
    their midpoint (the farthest from both, for scores recomputed with float noise), or just below
    ``t`` when ``t`` is the lowest score. Ties in F1 go to the lowest threshold (more refusals).
    ``target_fpr`` is only recorded, for a calibration file that states the configured value.
    """
    labels, scores = _split(labels, scores)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[: len(thresholds)], recall[: len(thresholds)]  # drop the "refuse none" point
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    chosen = float(thresholds[best])
    lower = scores[scores < chosen]
    tau = (chosen + float(lower.max())) / 2 if len(lower) else float(np.nextafter(chosen, -np.inf))
    return _threshold_record(labels, scores, tau, target_fpr, "best_f1")


def fit_scaling(kind: str, labels: np.ndarray, raw_scores: np.ndarray) -> ScoreScaling:
    """Fit a :class:`ScoreScaling` of ``kind`` (none | platt | temperature) to the split by binary NLL.

    Platt is an unpenalised logistic regression on the score's logit (slope and intercept);
    temperature is the same without the intercept, whose slope is ``1 / T`` (the NLL is convex in
    ``1 / T``, so its unconstrained minimum is the best ``T > 0`` whenever it is positive). A slope
    ``<= 0`` means higher raw scores are *less* likely harmful here: no monotonic calibration fits.
    """
    if kind not in SCALING_KINDS:
        raise CalibrationError(f"score scaling must be one of {SCALING_KINDS}, got {kind!r}")
    labels, raw_scores = _split(labels, raw_scores)
    if kind == "none":
        return IDENTITY
    if not _is_probability(raw_scores):
        raise CalibrationError(f"{kind} scaling needs sigmoid scores in [0, 1], got scores outside it (or NaN)")
    model = LogisticRegression(C=np.inf, fit_intercept=kind == "platt", max_iter=1000)
    model.fit(score_logit(raw_scores).reshape(-1, 1), labels)
    slope = float(model.coef_[0, 0])
    intercept = float(model.intercept_[0]) if kind == "platt" else 0.0
    if not slope > 0:
        raise CalibrationError(
            f"{kind} scaling fitted slope {slope:.4g} <= 0: the probe's scores rank the calibration split the "
            "wrong way (higher scores are less often harmful); check the probe and the labels"
        )
    return ScoreScaling(kind=kind, slope=slope, intercept=intercept)


def _bin_stats(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> tuple[np.ndarray, ...]:
    """Per equal-width bin on [0, 1]: count, summed probability, summed label, and the bin edges.

    Bins are ``(lower, upper]`` except the first, which also holds 0, as in ``calibration_curve``.
    """
    if bins < 1:
        raise CalibrationError(f"bins must be at least 1, got {bins}")
    labels = np.asarray(labels).astype(np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.shape != probabilities.shape or labels.ndim != 1 or len(labels) == 0:
        raise CalibrationError(
            f"labels {labels.shape} and probabilities {probabilities.shape} must be 1-D, non-empty, equal"
        )
    if not _is_probability(probabilities):
        raise CalibrationError("probabilities must lie in [0, 1] (and not be NaN)")
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], probabilities)
    count = np.bincount(ids, minlength=bins)
    predicted = np.bincount(ids, weights=probabilities, minlength=bins)
    positive = np.bincount(ids, weights=labels, minlength=bins)
    return count, predicted, positive, edges


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> float:
    """ECE over ``bins`` equal-width bins: sum over bins of (count / n) * |mean predicted - fraction harmful|."""
    count, predicted, positive, _ = _bin_stats(labels, probabilities, bins)
    # |sum p - sum y| / n is count / n times the per-bin gap, and is 0 for empty bins
    return float(np.sum(np.abs(predicted - positive)) / np.sum(count))


def reliability_rows(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> list[dict[str, Any]]:
    """One row per non-empty equal-width bin: ``bin_lower``, ``bin_upper``, ``mean_predicted``,
    ``fraction_harmful`` and ``count`` (the reliability diagram's points)."""
    count, predicted, positive, edges = _bin_stats(labels, probabilities, bins)
    return [
        {
            "bin_lower": float(edges[i]),
            "bin_upper": float(edges[i + 1]),
            "mean_predicted": float(predicted[i] / count[i]),
            "fraction_harmful": float(positive[i] / count[i]),
            "count": int(count[i]),
        }
        for i in np.flatnonzero(count)
    ]


def choose_tau_by_method(labels: np.ndarray, scores: np.ndarray, config: CalibrateConfig) -> Calibration:
    """Tau by ``config.method`` (``target_fpr`` or ``best_f1``) for any score where higher means more harmful.

    No scaling and no ECE: this is the rule baselines get, whose scores need not be probabilities.
    """
    if config.method == "target_fpr":
        return choose_tau(labels, scores, config.target_fpr)
    if config.method == "best_f1":
        return choose_tau_best_f1(labels, scores, config.target_fpr)
    raise CalibrationError(f"calibrate.method must be one of {METHODS}, got {config.method!r}")


def calibrate(labels: np.ndarray, raw_scores: np.ndarray, config: CalibrateConfig) -> Calibration:
    """Fit ``config.scaling``, pick tau on the raw scores by ``config.method``, and measure ECE raw and scaled.

    Tau does not depend on the scaling: it is chosen on raw scores, and the scaling is monotonic.
    Scores outside [0, 1] (a baseline's, say) are thresholded with ``scaling: none`` and no ECE.
    """
    labels, raw_scores = _split(labels, raw_scores)
    chosen = choose_tau_by_method(labels, raw_scores, config)
    scaling = fit_scaling(config.scaling, labels, raw_scores)
    if not _is_probability(raw_scores):
        return chosen
    return replace(
        chosen,
        scaling=scaling,
        ece_raw=expected_calibration_error(labels, raw_scores, config.bins),
        ece_scaled=expected_calibration_error(labels, scaling.probability(raw_scores), config.bins),
    )


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Write the calibration as JSON (the scaling as a nested object), atomically."""
    write_text_atomic(path, json.dumps(asdict(calibration), indent=2) + "\n")


def _check_keys(path: Path, what: str, found: dict[str, Any], expected: set[str]) -> None:
    """Name the file, and the keys missing or unknown, when a JSON object has not exactly ``expected``."""
    missing, unknown = sorted(expected - set(found)), sorted(set(found) - expected)
    if missing or unknown:
        raise CalibrationError(
            f"{path}: {what} is missing {missing} and has unknown keys {unknown}; it was written by another "
            "version of the pipeline: rerun dvc repro calibrate"
        )


def load_calibration(path: Path) -> Calibration:
    """Read a calibration written by :func:`save_calibration`; every field must be there, and no other."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no calibration; run the 'calibrate' stage (dvc repro calibrate)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}: not valid JSON ({exc}); rerun dvc repro calibrate") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("scaling"), dict):
        raise CalibrationError(
            f"{path}: expected a JSON object with a nested 'scaling' object; rerun dvc repro calibrate"
        )
    _check_keys(path, "the calibration", raw, {f.name for f in fields(Calibration)})
    _check_keys(path, "'scaling'", raw["scaling"], {f.name for f in fields(ScoreScaling)})
    try:
        return Calibration(**{**raw, "scaling": ScoreScaling(**raw["scaling"])})
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"{path}: {exc}") from exc
