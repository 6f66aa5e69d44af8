"""Confidence intervals for the study's rates and ranking metrics, and a paired test between two detectors.

- Rates (refusal, answer, TPR / FPR at tau, accuracy) get Wilson score intervals: they hold their
  coverage at the small counts (12-352 rows) and the 0% / 100% ends these tables often show.
- AUROC, AUPRC, TPR at a fixed FPR and F1 at tau get percentile intervals from a stratified
  bootstrap: harmful and benign rows are resampled separately, so every resample keeps the
  split's class counts and every ranking metric stays defined.
- Two detectors scored on the same rows are compared by a paired bootstrap: both are scored on the
  same resampled rows, so the difference's spread is the noise of the rows, not of two draws.

The bootstrap is vectorised: a resample is a row of counts (how often each row was drawn), and
every metric is computed for all resamples at once from one sort of the scores. The metrics
follow scikit-learn's definitions (``roc_auc_score``, ``average_precision_score``, the full ROC
curve), so the point values equal :mod:`pipeline.evaluate.metrics`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest

# TPR at each fixed FPR the study reports, under its metrics key.
TPR_AT_FPR: dict[str, float] = {"tpr_at_1pct_fpr": 0.01, "tpr_at_5pct_fpr": 0.05}
RANKING_METRICS: tuple[str, ...] = ("auroc", "auprc", *TPR_AT_FPR)
BOOTSTRAPPED: tuple[str, ...] = (*RANKING_METRICS, "f1")


@dataclass(frozen=True)
class Interval:
    """A point value and the ends of its confidence interval (NaN throughout when undefined)."""

    value: float
    low: float
    high: float

    def format(self, digits: int = 2) -> str:
        """``0.86 [0.79, 0.92]``; ``–`` when the value is undefined."""
        if math.isnan(self.value):
            return "–"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def percent(self, digits: int = 1) -> str:
        """``86.0% [79.1%, 92.3%]``; ``–`` when the value is undefined."""
        if math.isnan(self.value):
            return "–"
        return f"{100 * self.value:.{digits}f}% [{100 * self.low:.{digits}f}%, {100 * self.high:.{digits}f}%]"

    def fields(self, key: str) -> dict[str, float]:
        """``{key: value, key_low: low, key_high: high}``: the JSON shape, beside the point value's own key."""
        return {key: self.value, f"{key}_low": self.low, f"{key}_high": self.high}


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan)


def interval_of(row: Mapping[str, Any], key: str) -> Interval | None:
    """The interval ``row`` holds for ``key`` (``key``, ``key_low``, ``key_high``); None when it holds no ends.

    A None value or end (a rate with no rows) reads as NaN, which formats as ``–``.
    """
    if f"{key}_low" not in row or key not in row:
        return None
    values = [row[key], row[f"{key}_low"], row[f"{key}_high"]]
    return Interval(*(math.nan if v is None else float(v) for v in values))


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def wilson(k: int, n: int, confidence: float = 0.95) -> Interval:
    """The share ``k / n`` and its Wilson score interval (scipy's ``binomtest``); NaN when ``n`` is 0."""
    _check_confidence(confidence)
    if n == 0:
        return NAN_INTERVAL
    if not 0 <= k <= n:
        raise ValueError(f"a rate needs 0 <= k <= n, got k={k}, n={n}")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(k / n, float(ci.low), float(ci.high))


def wilson_fields(
    summary: Mapping[str, Any], rates: Mapping[str, str], confidence: float = 0.95, digits: int = 6
) -> dict[str, Any]:
    """``summary`` with ``<rate>_low`` / ``<rate>_high`` added beside each rate named in ``rates``.

    ``rates`` maps a rate's key to the key of its denominator (``{"refusal_rate_harmful": "n_harmful"}``);
    the count is recovered as ``round(rate * n)``, exact for any share of fewer than a million rows.
    A None rate (no rows of that kind) gets None ends.
    """
    out = dict(summary)
    for key, count_key in rates.items():
        rate, n = summary[key], summary[count_key]
        if rate is None or n == 0:
            out[f"{key}_low"] = out[f"{key}_high"] = None
            continue
        interval = wilson(round(rate * n), n, confidence)
        out[f"{key}_low"], out[f"{key}_high"] = round(interval.low, digits), round(interval.high, digits)
    return out


def _seeded_weights(labels: np.ndarray, resamples: int, seed: int, stream: tuple[int, ...]) -> np.ndarray:
    """:func:`stratified_weights` from the generator ``[seed, *stream]``, kept for the next caller on the same rows.

    Every detector of a setting is scored on the same rows with the same generator, so the draws
    are the same for all of them: they are drawn once (read-only) and reused.
    """
    key = (np.asarray(labels).astype(np.int8).tobytes(), resamples, seed, stream)
    if _WEIGHTS_CACHE.get("key") != key:
        weights = stratified_weights(labels, resamples, np.random.default_rng([seed, *stream]))
        weights.flags.writeable = False
        _WEIGHTS_CACHE.update(key=key, weights=weights)
    return _WEIGHTS_CACHE["weights"]


_WEIGHTS_CACHE: dict[str, Any] = {}


def stratified_weights(labels: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, n)`` draw counts: each class's rows resampled with replacement, within the class."""
    labels = np.asarray(labels)
    weights = np.zeros((resamples, len(labels)), dtype=np.float64)
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        size = len(rows)
        draws = rng.integers(0, size, size=(resamples, size)) + size * np.arange(resamples)[:, None]
        weights[:, rows] = np.bincount(draws.ravel(), minlength=resamples * size).reshape(resamples, size)
    return weights


def _cumulative(weights: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``(resamples, len(columns) + 1)``: 0, then the running sum of ``weights`` over ``columns`` in order."""
    out = np.zeros((weights.shape[0], len(columns) + 1))
    np.cumsum(weights[:, columns], axis=1, out=out[:, 1:])
    return out


def weighted_ranking_metrics(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC, AUPRC and TPR at each :data:`TPR_AT_FPR` for each row of ``weights`` (``(resamples, n)``).

    Row ``b`` weighs row ``i`` of the data ``weights[b, i]`` times (a bootstrap's draw counts;
    ones give the plain metrics). Every threshold between distinct scores is a point of the curve,
    as in scikit-learn with ``drop_intermediate=False``; ties count half in the AUROC.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    positive = labels[order]
    # The last row of each run of equal scores: one threshold per distinct score; the curve starts at (0, 0).
    ends = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    # Each class is summed over its own rows only (half the work of summing every row twice), and each
    # threshold reads how many of the class's rows rank at or above it.
    pos_seen = np.r_[0, np.cumsum(positive)[ends]]
    neg_seen = np.r_[0, np.cumsum(~positive)[ends]]
    tps = _cumulative(weights, order[positive])[:, pos_seen]
    fps = _cumulative(weights, order[~positive])[:, neg_seen]
    total_pos, total_neg = tps[:, -1], fps[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = np.sum(np.diff(fps, axis=1) * (tps[:, 1:] + tps[:, :-1]), axis=1) / (2 * total_pos * total_neg)
        flagged = tps[:, 1:] + fps[:, 1:]
        precision = np.divide(tps[:, 1:], flagged, out=np.zeros_like(flagged), where=flagged > 0)
        result = {"auroc": auroc, "auprc": np.sum(np.diff(tps, axis=1) * precision, axis=1) / total_pos}
        for key, max_fpr in TPR_AT_FPR.items():
            # fps / N <= max_fpr, compared as scikit-learn does (after the division).
            allowed = fps / total_neg[:, None] <= max_fpr
            result[key] = np.max(np.where(allowed, tps, 0.0), axis=1) / total_pos
    return result


def weighted_f1(labels: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """F1 of fixed predictions for each row of ``weights``; 0 where nothing is flagged or positive."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    tp = weights @ (labels & predicted)
    wrong = weights @ (labels ^ predicted)
    denominator = 2 * tp + wrong
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def percentile_interval(value: float, draws: np.ndarray, confidence: float) -> Interval:
    """``value`` with the central ``confidence`` share of its bootstrap ``draws`` (percentile method)."""
    _check_confidence(confidence)
    if math.isnan(value) or not np.isfinite(draws).all():
        return NAN_INTERVAL
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(value), float(low), float(high))


@dataclass(frozen=True)
class BootstrapSpec:
    """How many stratified resamples, at what confidence level, from which seed."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise ValueError(f"resamples must be at least 1, got {self.resamples}")
        _check_confidence(self.confidence)

    def rng(self, *stream: int) -> np.random.Generator:
        """A generator for one computation: the same ``stream`` gives the same resamples in every run."""
        return np.random.default_rng([self.seed, *stream])


def bootstrap_detection(
    labels: np.ndarray, scores: np.ndarray, tau: float, spec: BootstrapSpec, stream: tuple[int, ...] = ()
) -> dict[str, Interval]:
    """AUROC, AUPRC, TPR at 1% and 5% FPR and F1 at ``score > tau``, each with its stratified bootstrap interval.

    All NaN when the rows hold one label only (no ranking metric is defined).
    """
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        return dict.fromkeys(BOOTSTRAPPED, NAN_INTERVAL)
    ones = np.ones((1, len(labels)))
    weights = _seeded_weights(labels, spec.resamples, spec.seed, stream)
    point = weighted_ranking_metrics(labels, scores, ones)
    draws = weighted_ranking_metrics(labels, scores, weights)
    predicted = scores > tau
    point["f1"] = weighted_f1(labels, predicted, ones)
    draws["f1"] = weighted_f1(labels, predicted, weights)
    return {key: percentile_interval(float(point[key][0]), draws[key], spec.confidence) for key in BOOTSTRAPPED}


@dataclass(frozen=True, kw_only=True)
class PairedDifference:
    """A detector's metric minus another's on the same rows: the difference, its interval, a two-sided p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    resamples: int

    def record(self) -> dict[str, float | int]:
        """The JSON shape written into ``metrics.json``."""
        return {
            "difference": self.difference,
            "low": self.low,
            "high": self.high,
            "p_value": self.p_value,
            "resamples": self.resamples,
        }

    def format(self, digits: int = 3) -> str:
        """``+0.052 [+0.011, +0.094], p 0.012``."""
        if math.isnan(self.difference):
            return "–"
        return f"{self.difference:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}], p {self.p_value:.3f}"


def _metric(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, metric: str) -> np.ndarray:
    return weighted_ranking_metrics(labels, scores, weights)[metric]


def paired_draws(
    labels: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    resamples: int,
    rng: np.random.Generator,
    metric: str = "auroc",
) -> tuple[float, np.ndarray]:
    """``metric(first) - metric(second)`` on the rows, and on each of ``resamples`` stratified resamples of them.

    Both detectors are scored on the same resampled rows (one set of draw counts), so what they
    share, the rows' difficulty, cancels in the difference.
    """
    if metric not in RANKING_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(RANKING_METRICS)}")
    labels = np.asarray(labels).astype(int)
    if not len(labels) == len(first) == len(second):
        raise ValueError(
            f"{len(labels)} labels, {len(first)} and {len(second)} scores: a paired test needs one row each"
        )
    if len(np.unique(labels)) < 2:
        return math.nan, np.full(resamples, math.nan)
    ones = np.ones((1, len(labels)))
    weights = stratified_weights(labels, resamples, rng)
    point = (
        weighted_ranking_metrics(labels, first, ones)[metric][0]
        - weighted_ranking_metrics(labels, second, ones)[metric][0]
    )
    draws = (
        weighted_ranking_metrics(labels, first, weights)[metric]
        - weighted_ranking_metrics(labels, second, weights)[metric]
    )
    return float(point), draws


def paired_difference(point: float, draws: np.ndarray, confidence: float) -> PairedDifference:
    """The difference, its percentile interval and a two-sided bootstrap p-value for "no difference".

    The p-value is twice the smaller share of resampled differences on either side of 0 (each
    share counted as ``(1 + k) / (1 + B)``, so it is never 0), capped at 1: identical detectors
    give 1, and one better on every resample gives ``2 / (1 + B)``.
    """
    interval = percentile_interval(point, draws, confidence)
    if math.isnan(interval.value):
        return PairedDifference(
            difference=math.nan, low=math.nan, high=math.nan, p_value=math.nan, resamples=len(draws)
        )
    below = (1 + np.count_nonzero(draws <= 0)) / (1 + len(draws))
    above = (1 + np.count_nonzero(draws >= 0)) / (1 + len(draws))
    p_value = min(1.0, 2 * min(below, above))
    return PairedDifference(
        difference=interval.value, low=interval.low, high=interval.high, p_value=float(p_value), resamples=len(draws)
    )


def paired_bootstrap(
    labels: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    spec: BootstrapSpec,
    metric: str = "auroc",
    stream: tuple[int, ...] = (),
) -> PairedDifference:
    """:func:`paired_draws` then :func:`paired_difference`: ``first`` minus ``second`` on the same rows."""
    point, draws = paired_draws(labels, first, second, spec.resamples, spec.rng(*stream), metric)
    return paired_difference(point, draws, spec.confidence)
