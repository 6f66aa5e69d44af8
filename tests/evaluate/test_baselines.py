"""Feature baselines: h_s alone, delta_h alone, and the plain framing's state at its best layer."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detect.features import LSIFeatures
from pipeline.evaluate.baselines import choose_plain_layer, delta_only_inputs, hs_only_inputs, lsi_inputs

HIDDEN = 6


def _features(seed: int = 0, n: int = 5) -> LSIFeatures:
    rng = np.random.default_rng(seed)
    return LSIFeatures(h_s=rng.normal(size=(n, HIDDEN)), delta_h=rng.normal(size=(n, HIDDEN)))


def test_hs_and_delta_inputs_are_the_halves_of_lsi_inputs() -> None:
    features = _features()
    both = lsi_inputs(features)
    np.testing.assert_array_equal(hs_only_inputs(features), both[:, :HIDDEN])
    np.testing.assert_array_equal(delta_only_inputs(features), both[:, HIDDEN:])
    np.testing.assert_array_equal(hs_only_inputs(features), features.h_s)
    np.testing.assert_array_equal(delta_only_inputs(features), features.delta_h)
    assert not np.array_equal(hs_only_inputs(features), delta_only_inputs(features))


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
