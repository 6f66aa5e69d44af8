"""The detectors a run can ship: linear probes folded from scikit-learn, LSI behind the same interface,
both scikit-learn classifiers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from pipeline.config import VARIANTS, TrainConfig
from pipeline.detect.detector import (
    DELTA_ONLY,
    DETECTORS,
    HS_DELTA,
    LSI,
    PLAIN,
    PLAIN_ALL,
    LinearDetector,
    LSIDetector,
    pieces_for,
)
from pipeline.detect.features import InMemoryFeatures, features_from_states
from pipeline.detect.logistic import choose_plain_layer, fit_logistic, folded, positive_scores
from pipeline.detect.pieces import Piece, getter_from_states
from pipeline.detect.probe import LSIProbe, ProbeMeta, train_probe
from pipeline.detect.shipped import load_detector, save_detector
from pipeline.detect.sweep import FEWEST_INPUTS_FIRST, DetectorScore, choose_detector, tie_margin

HIDDEN = 6
LAYERS = (1, 3)


def _states(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random states ``(n, framings, layers, hidden)`` whose plain state at layer 3 carries the label."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    states = rng.normal(size=(n, len(VARIANTS), len(LAYERS), HIDDEN)).astype(np.float32)
    states[:, VARIANTS.index("plain"), 1, 0] += 2.0 * labels
    return states, labels


def test_a_folded_regression_scores_as_the_fitted_pipeline() -> None:
    states, labels = _states()
    pieces = pieces_for(PLAIN_ALL, LAYERS, 3, 1)
    detector = LinearDetector(PLAIN_ALL, pieces)
    x = np.concatenate([states[:, VARIANTS.index("plain"), k] for k in range(len(LAYERS))], axis=1)
    np.testing.assert_array_equal(detector.inputs(states, LAYERS), x)
    assert detector.fit(x, labels) is detector
    expected = positive_scores(fit_logistic(x, labels, seed=0), x)
    np.testing.assert_allclose(detector.score_states(states, LAYERS), expected, rtol=1e-4, atol=1e-6)
    assert detector.layers == LAYERS and detector.variants == ("plain",)


def test_pieces_name_the_states_each_detector_reads() -> None:
    assert pieces_for(HS_DELTA, LAYERS, 3, 1) == (Piece("benign", 1), Piece("delta", 3))
    assert pieces_for(PLAIN, LAYERS, 3, 1, plain_layer=1) == (Piece("plain", 1),)
    assert [p.label() for p in pieces_for(PLAIN_ALL, LAYERS, 3, 1)] == ["plain@1", "plain@3"]
    with pytest.raises(ValueError, match="needs its layer"):
        pieces_for(PLAIN, LAYERS, 3, 1)
    with pytest.raises(ValueError, match="unknown linear detector"):
        pieces_for("logreg_nothing", LAYERS, 3, 1)


def test_a_delta_detector_reads_the_benign_and_malicious_framings() -> None:
    detector = LinearDetector.from_weights(DELTA_ONLY, [Piece("delta", 3)], np.ones(HIDDEN), 0.0)
    assert detector.variants == ("benign", "malicious")


def test_lsi_detector_scores_as_its_probe() -> None:
    states, _ = _states(n=8)
    torch.manual_seed(0)
    probe = LSIProbe(HIDDEN, alpha=1.0, init_gain=1.0)
    detector = LSIDetector.from_probe(probe, fusion_layer=3, safety_layer=1)
    expected = probe.score(features_from_states(states, LAYERS, 3, 1))
    np.testing.assert_allclose(detector.score_states(states, LAYERS), expected, rtol=1e-5)
    framed = states[:, :2]  # the guard runs only the two framings LSI reads
    np.testing.assert_allclose(detector.score_states(framed, LAYERS, detector.variants), expected, rtol=1e-5)


def test_a_linear_detector_is_a_scikit_learn_classifier_folded_from_its_regression() -> None:
    states, labels = _states()
    pieces = (Piece("benign", 1), Piece("delta", 3))
    detector = LinearDetector(HS_DELTA, pieces, random_state=3)
    params = {"name": HS_DELTA, "pieces": pieces, "pooling": "last", "random_state": 3, "max_iter": 2000}
    assert detector.get_params() == params
    assert detector.pieces is pieces  # hyperparameters are stored as given
    with pytest.raises(NotFittedError):
        detector.score_states(states, LAYERS)
    x = detector.inputs(states, LAYERS)
    detector.fit(x, labels)
    weight, bias = folded(fit_logistic(x, labels, seed=3))
    # The folded regression as the float32 weights and bias the guard multiplies by (as saved), and nothing else fitted.
    np.testing.assert_array_equal(detector.coef_, weight.astype(np.float32).reshape(1, -1))
    assert detector.intercept_.tolist() == [float(np.float32(bias))] and detector.classes_.tolist() == [0, 1]
    assert detector.n_features_in_ == 2 * HIDDEN and detector.n_iter_[0] >= 1
    # The scikit-learn methods are the guard's float32 path, bit for bit.
    scores = detector.score_states(states, LAYERS)
    np.testing.assert_array_equal(detector.predict_proba(x)[:, 1], scores)
    with torch.no_grad():
        logits = detector.logits(getter_from_states(states, LAYERS)).numpy()
    np.testing.assert_array_equal(detector.decision_function(x), logits)
    np.testing.assert_array_equal(detector.predict(x), (logits > 0).astype(int))
    again = clone(detector).set_params(random_state=4)
    assert again.random_state == 4 and not hasattr(again, "coef_")
    with pytest.raises(ValueError, match="expects 12 input features, got 6"):
        detector.logits(lambda part, layer: torch.zeros(len(x), HIDDEN // 2))
    with pytest.raises(ValueError, match="unknown linear detector"):
        LinearDetector("logreg_nothing", pieces).fit(x, labels)
    with pytest.raises(ValueError, match="Only binary classification"):
        LinearDetector(HS_DELTA, pieces).fit(x, np.arange(len(x)) % 3)


def _lsi_sets(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training and validation states with labels, LSI's fusion layer 3 carrying the signal."""
    states, labels = _states(n=48, seed=seed)
    states[:, VARIANTS.index("malicious"), 1, 2] += 1.5 * labels
    return states[:32], labels[:32], states[32:], labels[32:]


CONFIG = TrainConfig(fusion_layer=3, safety_layer=1, lr=2e-2, epochs=4, alpha=1.0, batch_size=8, standardize=True)


def _same_weights(a: LSIProbe, b: LSIProbe) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_lsi_fit_runs_train_probe_and_scores_as_its_probe() -> None:
    train_states, train_y, val_states, val_y = _lsi_sets()
    detector = LSIDetector.from_config(CONFIG, 3, 1)
    assert detector.training_config() == CONFIG
    with pytest.raises(NotFittedError):
        detector.predict_proba(np.zeros((2, 2 * HIDDEN)))
    x, x_val = detector.inputs(train_states, LAYERS), detector.inputs(val_states, LAYERS)
    assert detector.fit(x, train_y, X_val=x_val, y_val=val_y) is detector
    train = InMemoryFeatures(features_from_states(train_states, LAYERS, 3, 1), train_y)
    val = InMemoryFeatures(features_from_states(val_states, LAYERS, 3, 1), val_y)
    probe, history = train_probe(train, val, CONFIG, progress=False)
    _same_weights(detector.probe_, probe)
    assert detector.history_ == history and detector.n_features_in_ == 2 * HIDDEN
    np.testing.assert_array_equal(detector.predict_proba(x_val)[:, 1], probe.score(val.features))
    np.testing.assert_array_equal(detector.score_states(val_states, LAYERS), detector.predict_proba(x_val)[:, 1])
    # Without validation rows the training rows choose the epoch.
    alone = LSIDetector.from_config(CONFIG, 3, 1).fit(x, train_y)
    _same_weights(alone.probe_, train_probe(train, train, CONFIG, progress=False)[0])
    # Labels of any two names: the second sorted one is the harmful class.
    named = LSIDetector.from_config(CONFIG, 3, 1).fit(x, np.where(train_y == 1, "harmful", "benign"))
    _same_weights(named.probe_, alone.probe_)
    assert named.classes_.tolist() == ["benign", "harmful"]
    with pytest.raises(ValueError, match="even width, got 5"):
        LSIDetector.from_config(CONFIG, 3, 1).fit(x[:, :5], train_y)
    with pytest.raises(ValueError, match="both X_val and y_val"):
        LSIDetector.from_config(CONFIG, 3, 1).fit(x, train_y, X_val=x_val)


def test_lsi_fit_sources_trains_from_chunked_sources_as_train_probe_does() -> None:
    train_states, train_y, val_states, val_y = _lsi_sets(seed=1)
    config = replace(CONFIG, class_weight="balanced", weight_decay=0.1, seed=5)

    def sources() -> tuple[InMemoryFeatures, InMemoryFeatures]:
        return (
            InMemoryFeatures(features_from_states(train_states, LAYERS, 3, 1), train_y, chunk_rows=7),
            InMemoryFeatures(features_from_states(val_states, LAYERS, 3, 1), val_y, chunk_rows=5),
        )

    detector = LSIDetector.from_config(config, 3, 1).fit_sources(*sources())
    probe, history = train_probe(*sources(), config, progress=False)
    _same_weights(detector.probe_, probe)
    assert detector.history_ == history and detector.classes_.tolist() == [0, 1]


def _meta(name: str, pieces: list[str]) -> ProbeMeta:
    return ProbeMeta(
        hidden_size=HIDDEN,
        alpha=0.1,
        fusion_layer=3,
        safety_layer=1,
        best_epoch=-1,
        best_val_auroc=0.9,
        store_provenance={},
        detector=name,
        pieces=pieces,
        held_out_auroc=0.8,
    )


def test_a_linear_detector_round_trips_through_safetensors_and_json(tmp_path: Path) -> None:
    states, labels = _states()
    detector = LinearDetector(PLAIN, [Piece("plain", 3)])
    detector.fit(detector.inputs(states, LAYERS), labels)
    save_detector(detector, _meta(PLAIN, ["plain@3"]), tmp_path)
    loaded, meta = load_detector(tmp_path)
    assert isinstance(loaded, LinearDetector) and meta.detector == PLAIN and meta.held_out_auroc == 0.8
    np.testing.assert_array_equal(loaded.coef_, detector.coef_)
    np.testing.assert_array_equal(loaded.score_states(states, LAYERS), detector.score_states(states, LAYERS))


def test_an_lsi_file_without_a_detector_field_loads_as_lsi(tmp_path: Path) -> None:
    save_detector(LSIDetector.from_probe(LSIProbe(HIDDEN), 3, 1), _meta(LSI, []), tmp_path)
    meta = json.loads((tmp_path / "probe.json").read_text())
    for key in ("detector", "pieces", "held_out_auroc"):
        del meta[key]  # a file written before these fields existed
    (tmp_path / "probe.json").write_text(json.dumps(meta))
    loaded, _ = load_detector(tmp_path)
    assert isinstance(loaded, LSIDetector) and loaded.layers == (1, 3)


def test_a_detector_file_that_disagrees_with_its_metadata_is_refused(tmp_path: Path) -> None:
    detector = LinearDetector.from_weights(PLAIN, [Piece("plain", 3)], np.ones(HIDDEN), 0.0)
    with pytest.raises(ValueError, match="names detector"):
        save_detector(detector, _meta(LSI, []), tmp_path)
    save_detector(detector, _meta(PLAIN, ["plain@3", "plain@1"]), tmp_path)
    with pytest.raises(ValueError, match=r"6 weights, but 2 piece\(s\)"):
        load_detector(tmp_path)
    with pytest.raises(FileNotFoundError, match="dvc repro train"):
        load_detector(tmp_path / "missing")


def _score(name: str, auroc: float, per_group: dict[str, float]) -> DetectorScore:
    """A detector's held-out validation score, as the sweep writes it."""
    return DetectorScore(name=name, held_out_auroc=auroc, per_group=per_group)


def test_best_takes_the_highest_held_out_score_and_lsi_is_lsi() -> None:
    scores = [_score(LSI, 0.9, {}), _score(PLAIN, 0.7, {}), _score(HS_DELTA, float("nan"), {})]
    assert choose_detector(scores, "best").name == LSI
    assert choose_detector(scores, "best", tolerance=0.1).name == LSI  # 0.2 behind is no tie
    scores = [_score(LSI, 0.7, {}), _score(PLAIN, 0.9, {}), _score(HS_DELTA, float("nan"), {})]
    assert choose_detector(scores, "best").name == PLAIN
    assert choose_detector(scores, "lsi").name == LSI
    # Nothing scored (every held-out group single-label): the method's own detector.
    assert choose_detector([_score(LSI, float("nan"), {}), _score(PLAIN, float("nan"), {})], "best").name == LSI


def test_best_ships_the_detector_with_fewest_inputs_among_near_ties() -> None:
    scores = [
        _score(LSI, 0.897, {}),
        _score(PLAIN_ALL, 0.893, {}),
        _score(HS_DELTA, 0.890, {}),
        _score(PLAIN, 0.878, {}),
    ]
    assert choose_detector(scores, "best").name == LSI  # no tolerance: the highest
    assert choose_detector(scores, "best", tolerance=0.005).name == LSI  # two blocks before every block
    assert choose_detector(scores, "best", tolerance=0.01).name == HS_DELTA  # no projector before LSI's
    assert choose_detector(scores, "best", tolerance=0.02).name == PLAIN  # one block before two
    # An exact tie is a tie: the plain probe (one block) ships rather than LSI (two, and a projector).
    assert choose_detector([_score(LSI, 0.8, {}), _score(PLAIN, 0.8, {})], "best").name == PLAIN
    assert FEWEST_INPUTS_FIRST[0] == PLAIN and set(FEWEST_INPUTS_FIRST) == set(DETECTORS)


def test_best_widens_the_tie_to_one_standard_error_of_the_best_over_its_groups() -> None:
    steady = {"a": 0.90, "b": 0.90, "c": 0.90, "d": 0.90}  # no spread: the tolerance alone
    noisy = {"a": 0.98, "b": 0.82, "c": 0.96, "d": 0.84}  # mean 0.90, standard error 0.041
    assert tie_margin(_score(LSI, 0.90, steady), 0.02) == 0.02
    assert tie_margin(_score(LSI, 0.90, noisy), 0.02) == pytest.approx(0.0408, abs=1e-4)
    assert tie_margin(_score(LSI, 0.90, {"a": 0.9}), 0.02) == 0.02  # one group: no spread to read
    behind = _score(PLAIN, 0.87, {"a": 0.87, "b": 0.87, "c": 0.87, "d": 0.87})
    assert choose_detector([_score(LSI, 0.90, steady), behind], "best", tolerance=0.02).name == LSI
    assert choose_detector([_score(LSI, 0.90, noisy), behind], "best", tolerance=0.02).name == PLAIN
    far = _score(PLAIN, 0.85, {"a": 0.85, "b": 0.85, "c": 0.85, "d": 0.85})
    assert choose_detector([_score(LSI, 0.90, noisy), far], "best", tolerance=0.02).name == LSI


def _layered(labels: np.ndarray, layers: list[int], signal: dict[int, float], seed: int) -> dict[int, np.ndarray]:
    """Noise states per layer, with the labels added to one coordinate at ``signal[layer]`` strength."""
    rng = np.random.default_rng(seed)
    states = {}
    for layer in layers:
        x = rng.normal(size=(len(labels), 8))
        x[:, 3] += signal.get(layer, 0.0) * labels
        states[layer] = x
    return states


def _labels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % 2)


def test_choose_plain_layer_finds_the_planted_signal() -> None:
    layers = [2, 5, 9, 14]
    train_y, val_y = _labels(200, 1), _labels(200, 2)
    # Layer 9 separates the classes well, layer 5 a little, the others not at all.
    signal = {5: 0.5, 9: 3.0}
    layer, auroc = choose_plain_layer(
        _layered(train_y, layers, signal, seed=3), train_y, _layered(val_y, layers, signal, seed=4), val_y
    )
    assert layer == 9
    assert auroc > 0.95


def test_choose_plain_layer_prefers_the_shallower_layer_on_a_tie() -> None:
    train_y, val_y = _labels(60, 1), _labels(60, 2)
    train = _layered(train_y, [4], {4: 3.0}, seed=5)[4]
    val = _layered(val_y, [4], {4: 3.0}, seed=6)[4]
    # Identical states at every layer: equal AUROCs, so the shallowest layer must win,
    # whatever order the mapping lists them in.
    layer, auroc = choose_plain_layer({8: train, 3: train, 6: train}, train_y, {6: val, 8: val, 3: val}, val_y)
    assert layer == 3
    assert 0.5 < auroc <= 1.0


def test_choose_plain_layer_rejects_mismatched_layers() -> None:
    y = _labels(20, 0)
    x = np.zeros((20, 3))
    with pytest.raises(ValueError, match=r"\[1, 2\].*\[1\]"):
        choose_plain_layer({1: x, 2: x}, y, {1: x}, y)


def test_choose_plain_layer_needs_both_classes_in_validation() -> None:
    y = _labels(20, 0)
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="validation labels"):
        choose_plain_layer({1: x}, y, {1: x}, np.ones(20, dtype=int))
