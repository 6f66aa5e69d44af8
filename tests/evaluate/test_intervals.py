"""Wilson and bootstrap intervals, the paired bootstrap, and where they are written and shown."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.config import ConfigError, EvaluateConfig
from pipeline.evaluate.intervals import (
    BootstrapSpec,
    Interval,
    bootstrap_detection,
    interval_of,
    paired_bootstrap,
    stratified_weights,
    weighted_f1,
    weighted_ranking_metrics,
    wilson,
    wilson_fields,
)
from pipeline.evaluate.metrics import detection_metrics, tpr_at_fpr
from pipeline.evaluate.paired import held_out_comparison, in_source_paired, paired_markdown, paired_record

SPEC = BootstrapSpec(resamples=400, confidence=0.95, seed=3)


def wilson_by_hand(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval as Wilson (1927) wrote it."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (1, 2), (3, 7), (37, 80), (0, 1)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_wilson_matches_the_formula_written_out(k: int, n: int, confidence: float) -> None:
    z = {0.95: 1.959963984540054, 0.9: 1.6448536269514722}[confidence]
    interval = wilson(k, n, confidence)
    assert interval.value == k / n
    assert (interval.low, interval.high) == pytest.approx(wilson_by_hand(k, n, z), abs=1e-9)


def test_wilson_ends_and_refusals() -> None:
    assert wilson(0, 10).low == 0.0 and wilson(0, 10).high == pytest.approx(0.2775328, abs=1e-6)
    assert wilson(10, 10).high == 1.0 and wilson(10, 10).low == pytest.approx(0.7224672, abs=1e-6)
    assert math.isnan(wilson(0, 0).value)
    with pytest.raises(ValueError, match="k=3, n=2"):
        wilson(3, 2)
    with pytest.raises(ValueError, match="confidence"):
        wilson(1, 2, confidence=1.0)


def test_interval_formats() -> None:
    assert Interval(0.8612, 0.7904, 0.9218).format() == "0.86 [0.79, 0.92]"
    assert Interval(0.625, 0.3857, 0.8148).percent() == "62.5% [38.6%, 81.5%]"
    assert Interval(math.nan, math.nan, math.nan).format() == "–"
    assert Interval(0.5, 0.25, 0.75).fields("auroc") == {"auroc": 0.5, "auroc_low": 0.25, "auroc_high": 0.75}
    assert interval_of({"auroc": 0.5, "auroc_low": 0.4, "auroc_high": 0.6}, "auroc") == Interval(0.5, 0.4, 0.6)
    assert interval_of({"auroc": 0.5}, "auroc") is None


def test_wilson_fields_adds_ends_beside_each_rate() -> None:
    summary = {"n_harmful": 6, "n_benign": 0, "refused": 2 / 6, "answered": None}
    out = wilson_fields(summary, {"refused": "n_harmful", "answered": "n_benign"})
    expected = wilson(2, 6)
    assert (out["refused_low"], out["refused_high"]) == pytest.approx((expected.low, expected.high), abs=1e-6)
    assert out["answered_low"] is None and out["answered_high"] is None
    assert out["refused"] == summary["refused"]


def _scored(n: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    scores = rng.normal(size=n) + labels
    return labels, np.round(scores, 1) if ties else scores


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_metrics_equal_scikit_learn_with_and_without_weights(ties: bool) -> None:
    labels, scores = _scored(90, seed=1, ties=ties)
    weights = stratified_weights(labels, 3, np.random.default_rng(0))
    ones = np.ones((1, len(labels)))
    plain = weighted_ranking_metrics(labels, scores, ones)
    assert plain["auroc"][0] == pytest.approx(roc_auc_score(labels, scores))
    assert plain["auprc"][0] == pytest.approx(average_precision_score(labels, scores))
    assert plain["tpr_at_5pct_fpr"][0] == pytest.approx(tpr_at_fpr(labels, scores, 0.05))
    assert plain["tpr_at_1pct_fpr"][0] == pytest.approx(tpr_at_fpr(labels, scores, 0.01))
    drawn = weighted_ranking_metrics(labels, scores, weights)
    for b in range(3):
        assert drawn["auroc"][b] == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights[b]))
        assert drawn["auprc"][b] == pytest.approx(average_precision_score(labels, scores, sample_weight=weights[b]))


def test_stratified_weights_keep_each_class_count() -> None:
    labels = np.array([0, 0, 0, 1, 1, 0, 1])
    weights = stratified_weights(labels, 50, np.random.default_rng(0))
    assert weights.shape == (50, 7)
    assert (weights[:, labels == 1].sum(axis=1) == 3).all() and (weights[:, labels == 0].sum(axis=1) == 4).all()


def test_weighted_f1_counts_each_drawn_row() -> None:
    labels, predicted = np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])
    # Row 0 drawn twice, row 2 not at all: tp 2, fn 1, fp 0 -> 4 / 5.
    assert weighted_f1(labels, predicted, np.array([[2.0, 1.0, 0.0, 1.0]]))[0] == pytest.approx(0.8)
    assert weighted_f1(labels, np.zeros(4), np.ones((1, 4)))[0] == 0.0


def test_bootstrap_is_seeded_and_brackets_the_point_value() -> None:
    labels, scores = _scored(120, seed=2)
    first = bootstrap_detection(labels, scores, 0.5, SPEC)
    assert first == bootstrap_detection(labels, scores, 0.5, SPEC)
    assert first != bootstrap_detection(labels, scores, 0.5, BootstrapSpec(400, 0.95, seed=4))
    for key, interval in first.items():
        assert interval.low <= interval.value <= interval.high, key
    assert first["auroc"].value == pytest.approx(roc_auc_score(labels, scores))
    wider = bootstrap_detection(labels, scores, 0.5, BootstrapSpec(400, 0.99, seed=3))["auroc"]
    assert wider.high - wider.low > first["auroc"].high - first["auroc"].low
    assert all(math.isnan(i.value) for i in bootstrap_detection(np.ones(5), np.arange(5.0), 0.5, SPEC).values())


def test_detection_metrics_keep_their_points_and_add_ends() -> None:
    labels, scores = _scored(60, seed=5)
    plain = detection_metrics(labels, scores, 0.5)
    with_ends = detection_metrics(labels, scores, 0.5, SPEC)
    assert {key: with_ends[key] for key in plain} == plain
    for key in ("auroc", "auprc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "f1", "accuracy", "tpr", "fpr"):
        assert with_ends[f"{key}_low"] <= plain[key] <= with_ends[f"{key}_high"], key
    predicted = scores > 0.5
    tpr = wilson(int(predicted[labels == 1].sum()), int((labels == 1).sum()))
    assert (with_ends["tpr_low"], with_ends["tpr_high"]) == (tpr.low, tpr.high)


def test_paired_bootstrap_excludes_zero_only_for_a_clearly_better_detector() -> None:
    labels, noisy = _scored(100, seed=6)
    clean = labels + np.random.default_rng(7).normal(scale=0.3, size=len(labels))
    better = paired_bootstrap(labels, clean, noisy, SPEC)
    assert better.difference > 0 and better.low > 0
    assert better.p_value == pytest.approx(2 / (SPEC.resamples + 1))
    same = paired_bootstrap(labels, noisy, noisy.copy(), SPEC)
    assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    worse = paired_bootstrap(labels, noisy, clean, SPEC)
    assert worse.high < 0 and worse.difference == pytest.approx(-better.difference)
    assert paired_bootstrap(labels, clean, noisy, SPEC) == better  # seeded
    with pytest.raises(ValueError, match="one row each"):
        paired_bootstrap(labels, clean[:-1], noisy, SPEC)


def test_held_out_comparison_and_its_record() -> None:
    labels, scores = {}, {}
    for position, source in enumerate(("a", "b")):
        y, noisy = _scored(80, seed=10 + position)
        clean = y + np.random.default_rng(position).normal(scale=0.3, size=len(y))
        labels[source], scores[source] = y, {"lsi": clean, "twin": clean.copy(), "weak": noisy}
    held = held_out_comparison("lsi", labels, scores, SPEC)
    assert held.mean["twin"].p_value == 1.0 and held.mean["twin"].low == 0.0 == held.mean["twin"].high
    assert held.mean["weak"].low > 0
    means = [roc_auc_score(labels[s], scores[s]["weak"]) for s in ("a", "b")]
    assert held.mean_auroc["weak"].value == pytest.approx(np.mean(means))
    assert held.min_auroc["weak"].value == pytest.approx(min(means))
    assert held.per_source["a"]["weak"].difference == pytest.approx(
        roc_auc_score(labels["a"], scores["a"]["lsi"]) - means[0]
    )
    in_source = in_source_paired("lsi", labels["a"], scores["a"], SPEC)
    record = paired_record("lsi", SPEC, in_source, held)
    assert set(record) == {"reference", "metric", "confidence", "resamples", "in_source", "held_out_mean", "held_out"}
    table = paired_markdown(record, ["weak", "twin"])
    assert table.splitlines()[0] == "| baseline | in-source | mean held out | a | b |"
    assert "| twin | +0.000 [+0.000, +0.000], p 1.000 |" in table
    assert "95% paired bootstrap interval" in table


def test_evaluate_section_checks_the_new_keys() -> None:
    assert EvaluateConfig().bootstrap_resamples == 1000 and EvaluateConfig().confidence == 0.95
    with pytest.raises(ConfigError, match="evaluate.bootstrap_resamples"):
        EvaluateConfig(bootstrap_resamples=10)
    with pytest.raises(ConfigError, match="evaluate.confidence"):
        EvaluateConfig(confidence=1.0)
    with pytest.raises(ConfigError, match="evaluate.confidence"):
        EvaluateConfig(confidence=True)  # type: ignore[arg-type]
