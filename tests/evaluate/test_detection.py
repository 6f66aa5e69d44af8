"""In-source and held-out-source settings, every detector on the same rows, the layer sweep."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.config import VARIANTS, CalibrateConfig, TrainConfig
from pipeline.detect.detector import (
    DETECTORS,
    LSI,
    PLAIN,
    LinearDetector,
    LSIDetector,
    pieces_for,
)
from pipeline.detect.features import InMemoryFeatures, features_from_states
from pipeline.detect.heldout import (
    EvalData,
    HeldOutError,
    fit_detector,
    fit_lsi,
    held_out_scores,
    held_out_setting,
    in_source_setting,
    scoreable_groups,
)
from pipeline.detect.logistic import choose_plain_layer, fit_logistic, folded
from pipeline.detect.probe import train_probe
from pipeline.detect.sweep import (
    PairScore,
    SweepError,
    best_pair,
    detector_auroc,
    held_out_settings,
    held_out_validation,
    pairs_for_held_out,
    resolve_layers,
    score_detectors,
    score_matrix,
    selection_seeds,
    sweep,
    sweep_pairs,
)
from pipeline.evaluate.detection import (
    comparison_table,
    fit_detectors,
    group_results,
    held_out_markdown,
    held_out_results,
    held_out_summary,
    merge_held_out,
    per_source_metrics,
    score_setting,
)
from pipeline.evaluate.intervals import BootstrapSpec
from pipeline.evaluate.paired import held_out_comparison
from pipeline.layout import MissingOutput

LAYERS = (1, 2, 3)
HIDDEN = 6
SPLITS = ("train", "val", "calib", "test")


def synthetic_data(n_per_source: int = 80, seed: int = 0, refusal: bool = True) -> EvalData:
    """Three sources; harmful rows move the malicious framing at layer 3 and the plain request at layer 2."""
    rng = np.random.default_rng(seed)
    rows = []
    for source in ("alpha", "beta", "gamma"):
        for i in range(n_per_source):
            label = i % 2
            rows.append(
                {
                    "row_id": len(rows),
                    "source": source,
                    "upstream": source,
                    "presentation": "question",
                    "split": SPLITS[(i // 2) % 4],
                    "label": label,
                    # Texts of one length and style in both labels: style carries no signal.
                    "text": f"request number {i:03d} from {source}",
                    "category": "c",
                }
            )
    index = pl.DataFrame(rows)
    labels = index["label"].to_numpy()
    states = rng.normal(size=(len(index), 3, len(LAYERS), HIDDEN)).astype(np.float32)
    states[:, 1, 2, 0] += 5.0 * labels  # malicious framing, layer 3
    states[:, 2, 1, 1] += 5.0 * labels  # plain request, layer 2
    score = labels + rng.normal(scale=0.5, size=len(index)) if refusal else None
    return EvalData(index=index, states=states, layers=LAYERS, refusal=score)


CONFIG = TrainConfig(fusion_layer=3, safety_layer=1, lr=2e-2, epochs=12, alpha=1.0)


def test_held_out_setting_never_trains_on_the_source() -> None:
    data = synthetic_data()
    setting = held_out_setting(data.index, "source", "beta")
    sources = data.index["source"].to_numpy()
    splits = data.index["split"].to_numpy()
    for role in ("train", "val", "calib"):
        rows = getattr(setting, role)
        assert len(rows) and "beta" not in set(sources[rows]) and set(splits[rows]) == {role}
    assert set(sources[setting.test]) == {"beta"} and set(splits[setting.test]) == {"test"}
    inside = in_source_setting(data.index)
    assert set(setting.test) <= set(inside.test)
    assert scoreable_groups(data.index, "source") == ["alpha", "beta", "gamma"]


def test_every_detector_is_fitted_and_scored_on_the_same_rows() -> None:
    data = synthetic_data()
    inside = in_source_setting(data.index)
    scorers, layers = fit_detectors(data, inside, CONFIG, 3, 1)
    assert set(scorers) == {
        "lsi",
        "logreg_hs_delta",
        "logreg_hs",
        "logreg_delta",
        PLAIN,
        "logreg_plain_all",
        "length_only",
        "style_only",
        "refusal_direction",
    }
    assert layers == {PLAIN: 2}  # the plain request carries the signal at layer 2 only
    results = score_setting(data, inside, scorers, CalibrateConfig(), layers=layers)
    assert {row["n"] for row in results.values()} == {len(inside.test)}
    assert results["lsi"]["auroc"] > 0.9 and results[PLAIN]["auroc"] > 0.9 and results[PLAIN]["layer"] == 2
    assert results["logreg_hs"]["auroc"] < 0.75  # h_s (benign framing, layer 1) holds no signal
    assert results["length_only"]["auroc"] < 0.75


def test_cross_source_refits_without_the_source_and_tables_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    data = synthetic_data(refusal=False)
    cross = held_out_results(data, CONFIG, CalibrateConfig(), 3, 1, ["alpha", "gamma"], progress=True).metrics
    shown = capsys.readouterr().err
    assert "held out by source" in shown and "2/2" in shown  # the progress bar over the held-out groups
    assert set(cross) == {"alpha", "gamma"}
    assert cross["alpha"]["lsi"]["all_rows"]["n"] == 80 and cross["alpha"]["lsi"]["n"] == 20
    assert cross["gamma"]["lsi"]["all_rows"]["auroc"] > 0.85
    inside = in_source_setting(data.index)
    scorers, _ = fit_detectors(data, inside, CONFIG, 3, 1)
    from pipeline.evaluate.detection import per_source_metrics

    taus = {name: row["tau"] for name, row in score_setting(data, inside, scorers, CalibrateConfig()).items()}
    table = comparison_table(per_source_metrics(data, inside, scorers, taus), cross)
    assert table.height == 2 * len(cross["alpha"])
    row = table.filter((pl.col("source") == "alpha") & (pl.col("detector") == "lsi")).row(0, named=True)
    assert row["auroc_cross_source"] == cross["alpha"]["lsi"]["auroc"] and 0.0 <= row["auroc_in_source"] <= 1.0


def test_holding_out_the_only_harmful_source_is_a_clear_error() -> None:
    data = synthetic_data(refusal=False)
    index = data.index.with_columns(
        pl.when(pl.col("label") == 1).then(pl.lit("harm")).otherwise(pl.col("source")).alias("source")
    )
    with pytest.raises(ValueError, match="holding out source 'harm'.*one label only"):
        held_out_results(replace(data, index=index), CONFIG, CalibrateConfig(), 3, 1, ["harm"])


def test_sweep_finds_the_planted_pair_and_never_reads_test_rows() -> None:
    data = synthetic_data(refusal=False)
    test_rows = np.flatnonzero(data.index["split"].to_numpy() == "test")
    poisoned = data.states.copy()
    poisoned[test_rows] = np.nan  # any read of a test row would turn a score into NaN
    scores = sweep_pairs(replace(data, states=poisoned), replace(CONFIG, epochs=6, held_out_pairs=0), progress=False)
    assert len(scores) == len(LAYERS) ** 2
    assert not any(np.isnan(s.val_auroc) or np.isnan(s.held_out_auroc) for s in scores)
    best = best_pair(scores, "held_out")
    assert best.fusion_layer == 3 and best.held_out_auroc > 0.9
    matrix = score_matrix(scores, LAYERS, "val_auroc")
    assert matrix.shape == (3, 3) and matrix[2].min() > matrix[0].max()
    assert set(data.index["source"][held_out_validation(data.index, "source", "beta").test]) == {"beta"}


def test_sweep_scores_every_detector_on_each_held_out_group_at_the_chosen_pair() -> None:
    data = synthetic_data(refusal=False)
    test_rows = np.flatnonzero(data.index["split"].to_numpy() == "test")
    poisoned = data.states.copy()
    poisoned[test_rows] = np.nan  # the detectors, like the pairs, never read a test row
    config = replace(CONFIG, epochs=6, held_out_pairs=3)
    result = sweep(replace(data, states=poisoned), config, progress=False)
    assert repr(result.pairs) == repr(sweep_pairs(replace(data, states=poisoned), config, progress=False))
    assert result.best == best_pair(result.pairs, config.select_by, config.select_tolerance)
    assert [d.name for d in result.detectors] == list(DETECTORS)
    lf, ls = result.best.fusion_layer, result.best.safety_layer
    for d in result.detectors:
        assert list(d.per_group) == ["alpha", "beta", "gamma"]
        assert d.held_out_auroc == pytest.approx(np.mean(list(d.per_group.values())))
    by_name = {d.name: d for d in result.detectors}
    # The plain request carries the signal at layer 2 and the benign framing carries none.
    assert by_name[PLAIN].held_out_auroc > 0.9 and by_name["logreg_hs"].held_out_auroc < 0.75
    setting = held_out_validation(data.index, "source", "beta")
    assert by_name[LSI].per_group["beta"] == detector_auroc(data, setting, LSI, config, lf, ls)


def test_lsi_is_scored_by_the_mean_over_its_selection_seeds_and_each_regression_once() -> None:
    data = synthetic_data(refusal=False)
    config = replace(CONFIG, epochs=3, seed=5, selection_seeds=3)
    setting = held_out_validation(data.index, "source", "beta")
    assert selection_seeds(LSI, config) == (5, 6, 7) and selection_seeds(PLAIN, config) == (5,)
    one = [detector_auroc(data, setting, LSI, replace(config, seed=s, selection_seeds=1), 3, 1) for s in (5, 6, 7)]
    assert len(set(one)) > 1  # the seeds train differently, so the mean below is a real average
    assert detector_auroc(data, setting, LSI, config, 3, 1) == pytest.approx(np.mean(one))
    plain_once = detector_auroc(data, setting, PLAIN, replace(config, selection_seeds=1), 3, 1)
    assert detector_auroc(data, setting, PLAIN, config, 3, 1) == plain_once
    scores = score_detectors(data, config, 3, 1, names=(LSI, PLAIN), progress=False)
    assert [d.seeds for d in scores] == [3, 1]
    assert scores[0].per_group["beta"] == pytest.approx(np.mean(one))


def test_the_held_out_half_scores_only_the_shortlist_of_best_validation_pairs() -> None:
    data = synthetic_data(refusal=False)
    everything = sweep_pairs(data, replace(CONFIG, epochs=6, held_out_pairs=0), progress=False)
    shortlist = sweep_pairs(data, replace(CONFIG, epochs=6, held_out_pairs=2), progress=False)
    # The in-source half is the same; the held-out half only where validation ranked a pair top two.
    assert [s.val_auroc for s in shortlist] == [s.val_auroc for s in everything]
    held = [s for s in shortlist if not np.isnan(s.held_out_auroc)]
    assert len(held) == 2
    top_two = sorted(everything, key=lambda s: -s.val_auroc)[:2]
    assert {(s.fusion_layer, s.safety_layer) for s in held} == {(s.fusion_layer, s.safety_layer) for s in top_two}
    for s in held:
        full = next(e for e in everything if (e.fusion_layer, e.safety_layer) == (s.fusion_layer, s.safety_layer))
        assert s.held_out_auroc == full.held_out_auroc
    assert best_pair(shortlist, "held_out").fusion_layer == 3


def test_the_shortlist_ranks_nan_last_and_keeps_sweep_order() -> None:
    pairs = [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert pairs_for_held_out(pairs, [0.7, float("nan"), 0.9, 0.7], 2) == [(1, 1), (2, 1)]
    assert pairs_for_held_out(pairs, [0.7, float("nan"), 0.9, 0.7], 0) == pairs
    assert pairs_for_held_out(pairs, [0.7, float("nan"), 0.9, 0.7], 9) == pairs


def test_best_pair_falls_back_to_validation_and_breaks_exact_ties_by_order() -> None:
    nan = float("nan")
    scores = [
        PairScore(fusion_layer=1, safety_layer=1, val_auroc=0.7, held_out_auroc=nan),
        PairScore(fusion_layer=2, safety_layer=1, val_auroc=0.9, held_out_auroc=nan),
        PairScore(fusion_layer=3, safety_layer=1, val_auroc=0.9, held_out_auroc=nan),
    ]
    assert best_pair(scores, "held_out") == scores[1]
    scores = [
        PairScore(fusion_layer=1, safety_layer=1, val_auroc=0.9, held_out_auroc=0.6),
        PairScore(fusion_layer=2, safety_layer=1, val_auroc=0.7, held_out_auroc=0.8),
    ]
    assert best_pair(scores, "held_out") == scores[1] and best_pair(scores, "val") == scores[0]


def test_best_pair_takes_the_cheapest_of_the_near_tied_pairs() -> None:
    nan = float("nan")
    scores = [
        PairScore(fusion_layer=9, safety_layer=15, val_auroc=0.96, held_out_auroc=0.865),
        PairScore(fusion_layer=15, safety_layer=12, val_auroc=0.96, held_out_auroc=0.876),
        PairScore(fusion_layer=15, safety_layer=15, val_auroc=0.96, held_out_auroc=0.886),
        PairScore(fusion_layer=18, safety_layer=12, val_auroc=0.96, held_out_auroc=0.888),
        PairScore(fusion_layer=3, safety_layer=3, val_auroc=0.90, held_out_auroc=nan),
    ]
    assert best_pair(scores, "held_out") == scores[3]  # no tolerance: the highest
    # Within 0.02: every pair whose deepest block is 15 costs the same, and 15 / 15 scores highest.
    assert best_pair(scores, "held_out", tolerance=0.02) == scores[2]
    # 9 / 15 is 0.023 behind: no tie. An unscored pair never takes part, however cheap.
    assert best_pair(scores[:1] + scores[3:], "held_out", tolerance=0.02) == scores[3]
    assert best_pair(scores, "held_out", tolerance=0.03) == scores[2]


def test_resolve_layers_takes_best_from_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.json"
    assert resolve_layers(12, 3, "val", sweep) == (12, 3)
    with pytest.raises(MissingOutput, match="dvc repro sweep"):
        resolve_layers("best", 3, "val", sweep)
    pairs = [
        PairScore(fusion_layer=9, safety_layer=3, val_auroc=0.8, held_out_auroc=0.6),
        PairScore(fusion_layer=12, safety_layer=3, val_auroc=0.7, held_out_auroc=0.7),
        PairScore(fusion_layer=12, safety_layer=6, val_auroc=0.9, held_out_auroc=0.5),
    ]
    sweep.write_text(json.dumps({"pairs": [p.__dict__ for p in pairs]}))
    assert resolve_layers("best", "best", "held_out", sweep) == (12, 3)
    assert resolve_layers("best", "best", "val", sweep) == (12, 6)
    assert resolve_layers("best", 3, "val", sweep) == (9, 3)  # only pairs with safety layer 3
    with pytest.raises(SweepError, match="no swept pair"):
        resolve_layers("best", 15, "val", sweep)


def test_held_out_scores_come_from_probes_that_never_saw_the_row_source() -> None:
    data = synthetic_data(refusal=False)
    rows = np.flatnonzero(data.index["split"].to_numpy() == "calib")
    scores = held_out_scores(data, rows, "lsi", CONFIG, 3, 1)
    assert scores.shape == (len(rows),) and ((scores >= 0) & (scores <= 1)).all()
    # Equal to scoring each source's rows with a probe fitted on the held-out setting by hand.
    sources = data.index["source"].to_numpy()
    beta = rows[sources[rows] == "beta"]
    setting = held_out_setting(data.index, "upstream", "beta")
    by_hand = fit_lsi(data, setting, CONFIG, 3, 1).probe_.score(data.lsi(beta, 3, 1))
    np.testing.assert_allclose(scores[sources[rows] == "beta"], by_hand, rtol=1e-6)
    single = replace(data, index=data.index.with_columns(pl.lit("only").alias("upstream")))
    with pytest.raises(ValueError, match="at least two values of 'upstream'"):
        held_out_scores(single, rows, "lsi", CONFIG, 3, 1)


def test_held_out_scores_of_a_linear_detector_are_cross_fitted_too() -> None:
    data = synthetic_data(refusal=False)
    rows = np.flatnonzero(data.index["split"].to_numpy() == "calib")
    scores = held_out_scores(data, rows, PLAIN, CONFIG, 3, 1)
    beta = np.flatnonzero(data.index["source"].to_numpy()[rows] == "beta")
    setting = held_out_setting(data.index, "upstream", "beta")
    by_hand = data.scores(fit_detector(data, setting, PLAIN, CONFIG, 3, 1), rows[beta])
    np.testing.assert_allclose(scores[beta], by_hand, rtol=1e-6)


def _interleaved(data: EvalData, seed: int = 3) -> EvalData:
    """The same rows in a shuffled index order, so every source's rows are spread through it."""
    order = np.random.default_rng(seed).permutation(len(data.index))
    return replace(data, index=data.index[order], states=data.states[order], refusal=None)


def _state(data: EvalData, rows: np.ndarray, part: str, layer: int) -> np.ndarray:
    """The rows' states of one framing (or ``delta``, malicious minus benign) at one layer."""
    at = data.layers.index(layer)
    if part == "delta":
        return data.states[rows, VARIANTS.index("malicious"), at] - data.states[rows, VARIANTS.index("benign"), at]
    return data.states[rows, VARIANTS.index(part), at]


def _reference_held_out_scores(data: EvalData, rows: np.ndarray, name: str, config: TrainConfig) -> np.ndarray:
    """Leave-one-source-out by hand: for each source, fit on the other sources' train rows (val rows for the
    epoch or layer), in index order, and score that source's ``rows`` in the order given."""
    split, source, labels = data.index["split"].to_numpy(), data.index["source"].to_numpy(), data.labels
    lf, ls = 3, 1
    scores = np.full(len(rows), np.nan)
    for held in sorted(set(source[rows])):
        train = np.flatnonzero((split == "train") & (source != held))
        val = np.flatnonzero((split == "val") & (source != held))
        mine = source[rows] == held
        detector: LSIDetector | LinearDetector
        if name == LSI:
            probe, _ = train_probe(
                InMemoryFeatures(features_from_states(data.states[train], data.layers, lf, ls), labels[train]),
                InMemoryFeatures(features_from_states(data.states[val], data.layers, lf, ls), labels[val]),
                config,
                progress=False,
            )
            detector = LSIDetector.from_probe(probe, lf, ls)
        else:
            plain_layer = None
            if name == PLAIN:
                plain_layer, _ = choose_plain_layer(
                    {k: data.plain(train, k) for k in data.layers},
                    labels[train],
                    {k: data.plain(val, k) for k in data.layers},
                    labels[val],
                    seed=config.seed,
                )
            pieces = pieces_for(name, data.layers, lf, ls, plain_layer)
            x = np.concatenate([_state(data, train, p.part, p.layer) for p in pieces], axis=1)
            weight, bias = folded(fit_logistic(x, labels[train], seed=config.seed))
            detector = LinearDetector.from_weights(name, pieces, weight, bias)
        scores[mine] = detector.score_states(data.states[rows[mine]], data.layers)
    return scores


@pytest.mark.parametrize("name", DETECTORS)
def test_held_out_scores_are_the_leave_one_source_out_fits_by_hand_bit_for_bit(name: str) -> None:
    data = _interleaved(synthetic_data(n_per_source=40, refusal=False))
    calib = np.flatnonzero(data.index["split"].to_numpy() == "calib")
    rows = np.random.default_rng(1).permutation(calib)  # any order: each score lands on its own row
    config = replace(CONFIG, epochs=4)
    scores = held_out_scores(data, rows, name, config, 3, 1)
    np.testing.assert_array_equal(scores, _reference_held_out_scores(data, rows, name, config))


def test_held_out_settings_are_the_index_splits_of_each_leave_one_source_out_fold() -> None:
    data = _interleaved(synthetic_data(n_per_source=40, refusal=False))
    split, source = data.index["split"].to_numpy(), data.index["source"].to_numpy()
    for held in ("alpha", "beta", "gamma"):
        setting = held_out_setting(data.index, "source", held)
        for role in ("train", "val", "calib"):
            np.testing.assert_array_equal(getattr(setting, role), np.flatnonzero((split == role) & (source != held)))
        np.testing.assert_array_equal(setting.test, np.flatnonzero((split == "test") & (source == held)))
    validation = held_out_settings(data.index, "source")
    assert [s.name for s in validation] == ["held_out_val:alpha", "held_out_val:beta", "held_out_val:gamma"]
    for setting, held in zip(validation, ("alpha", "beta", "gamma"), strict=True):
        np.testing.assert_array_equal(setting.train, np.flatnonzero((split == "train") & (source != held)))
        np.testing.assert_array_equal(setting.val, np.flatnonzero((split == "val") & (source != held)))
        np.testing.assert_array_equal(setting.test, np.flatnonzero((split == "val") & (source == held)))
        assert len(setting.calib) == 0
    single = replace(data, index=data.index.with_columns(pl.lit("only").alias("source")))
    assert held_out_settings(single.index, "source") == []
    with pytest.raises(HeldOutError, match="no held-out fold for source 'only'"):
        held_out_setting(single.index, "source", "only")


def test_held_out_summary_gives_mean_lowest_and_operating_points() -> None:
    data = synthetic_data(refusal=False)
    cross = held_out_results(data, CONFIG, CalibrateConfig(), 3, 1, ["alpha", "gamma"]).metrics
    summary = held_out_summary(cross)
    lsi = summary["lsi"]
    aurocs = [cross[s]["lsi"]["all_rows"]["auroc"] for s in ("alpha", "gamma")]
    assert lsi["mean_auroc"] == pytest.approx(np.mean(aurocs)) and lsi["min_auroc"] == pytest.approx(min(aurocs))
    assert set(lsi["per_group"]["alpha"]) == {"n", "auroc", "tpr_at_5pct_fpr", "tpr", "fpr"}
    assert "fpr_at_shipped_tau" not in lsi["per_group"]["alpha"]
    shipped = held_out_summary(
        held_out_results(data, CONFIG, CalibrateConfig(), 3, 1, ["alpha", "gamma"], shipped_tau=("lsi", 1.0)).metrics
    )
    assert shipped["lsi"]["per_group"]["alpha"]["fpr_at_shipped_tau"] == 0.0  # nothing scores above 1
    assert shipped["lsi"]["per_group"]["alpha"]["tpr_at_shipped_tau"] == 0.0
    table = held_out_markdown(shipped, shipped="lsi")
    assert "At the run's own tau" in table
    assert "**lsi** (shipped)" in table and "| alpha | gamma |" in table.splitlines()[0] + " |"


def test_given_taus_are_used_as_given() -> None:
    data = synthetic_data(refusal=False)
    inside = in_source_setting(data.index)
    scorers, _ = fit_detectors(data, inside, CONFIG, 3, 1)
    results = score_setting(data, inside, scorers, CalibrateConfig(), taus={"lsi": 2.0})
    assert results["lsi"]["tau"] == 2.0 and results["lsi"]["tpr"] == 0.0  # nothing scores above 2
    assert results["logreg_hs_delta"]["tau"] < 1.0


def test_held_out_results_carry_intervals_and_the_scores_for_paired_tests() -> None:
    data = synthetic_data(refusal=False)
    spec = BootstrapSpec(resamples=200)
    held = held_out_results(data, CONFIG, CalibrateConfig(), 3, 1, ["alpha", "gamma"], ("lsi", 1.0), spec)
    lsi = held.metrics["alpha"]["lsi"]
    for row in (lsi, lsi["all_rows"], lsi["at_shipped_tau"]):
        for key in ("auroc", "tpr_at_5pct_fpr", "fpr", "tpr"):
            assert row[f"{key}_low"] <= row[key] <= row[f"{key}_high"], key
    # Source by source (as the cluster runs them), merged: the same results.
    parts = [group_results(data, CONFIG, CalibrateConfig(), 3, 1, s, ("lsi", 1.0), spec) for s in ("alpha", "gamma")]
    assert repr(merge_held_out(parts)) == repr(held)
    assert len(held.labels["alpha"]) == 80 and set(held.scores["alpha"]) == set(held.metrics["alpha"])
    comparison = held_out_comparison("lsi", held.labels, held.scores, spec)
    # The detector-level AUROC the comparison resamples is the one the metrics report.
    assert comparison.mean_auroc["lsi"].value == pytest.approx(
        np.mean([held.metrics[s]["lsi"]["all_rows"]["auroc"] for s in ("alpha", "gamma")])
    )
    assert comparison.mean["length_only"].low > 0  # LSI reads the signal; length carries none
    summary = held_out_summary(held.metrics, comparison)
    assert summary["lsi"]["mean_auroc_low"] <= summary["lsi"]["mean_auroc"] <= summary["lsi"]["mean_auroc_high"]
    assert "fpr_at_shipped_tau_low" in summary["lsi"]["per_group"]["alpha"]
    table = held_out_markdown(summary, shipped="lsi")
    assert "Brackets: the interval" in table and f"{summary['lsi']['mean_auroc']:.3f} [" in table
    inside = in_source_setting(data.index)
    scorers, _ = fit_detectors(data, inside, CONFIG, 3, 1)
    taus = {name: 0.5 for name in scorers}
    side_by_side = comparison_table(per_source_metrics(data, inside, scorers, taus, spec), held.metrics)
    assert {"auroc_in_source_low", "auroc_cross_source_all_rows_high", "fpr_cross_source_low"} <= set(
        side_by_side.columns
    )
