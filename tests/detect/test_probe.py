"""The LSI probe: the method's shape, training that learns, best-epoch selection, safe persistence."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.detect.features import InMemoryFeatures, LSIFeatures
from pipeline.detect.probe import (
    LSIProbe,
    ProbeMeta,
    adam,
    best_epoch,
    class_weights,
    input_stats,
    load_probe,
    save_probe,
    train_probe,
)

HIDDEN = 16
# The metadata of a probe trained from no store.
META = ProbeMeta(
    hidden_size=HIDDEN,
    alpha=0.1,
    fusion_layer=12,
    safety_layer=3,
    best_epoch=0,
    best_val_auroc=0.5,
    store_provenance={},
)


def source(n: int, seed: int, chunk_rows: int = 1 << 30) -> InMemoryFeatures:
    features, labels = synthetic(n, seed)
    return InMemoryFeatures(features, labels, chunk_rows)


def synthetic(n: int, seed: int) -> tuple[LSIFeatures, np.ndarray]:
    """Harmful rows shift delta_h along one direction; h_s is noise, so only the injection can separate."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    direction = np.zeros(HIDDEN, dtype=np.float32)
    direction[0] = 1.0
    h_s = rng.normal(size=(n, HIDDEN)).astype(np.float32)
    delta = rng.normal(size=(n, HIDDEN)).astype(np.float32) + 6.0 * labels[:, None] * direction
    return LSIFeatures(h_s, delta), labels


def test_initial_projector_is_small_and_bias_zero() -> None:
    probe = LSIProbe(HIDDEN, alpha=0.1, init_gain=0.02)
    assert torch.all(probe.projector.bias == 0)
    assert probe.projector.weight.std() < 0.05


def test_forward_is_the_method() -> None:
    probe = LSIProbe(HIDDEN, alpha=0.1)
    h_s, delta = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)
    expected = probe.probe(h_s + 0.1 * probe.projector(delta)).squeeze(-1)
    torch.testing.assert_close(probe(h_s, delta), expected)


def test_training_learns_from_delta_h() -> None:
    train, val = source(256, 0), source(96, 1)
    val_y = val.labels
    config = TrainConfig(lr=5e-3, epochs=15)
    probe, history = train_probe(train, val, config, progress=False)
    assert len(history) == 15
    assert best_epoch(history).val_auroc > 0.9
    # the kept weights are the best epoch's: scoring validation again reproduces its AUROC
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(val_y, probe.score(val.features)) == pytest.approx(best_epoch(history).val_auroc, abs=1e-6)


def test_training_is_reproducible() -> None:
    train, val = source(64, 0), source(32, 1)
    config = TrainConfig(epochs=3)
    a, _ = train_probe(train, val, config, progress=False)
    b, _ = train_probe(train, val, config, progress=False)
    np.testing.assert_array_equal(a.score(val.features), b.score(val.features))
    c, _ = train_probe(train, val, replace(config, seed=1), progress=False)
    assert not np.array_equal(a.score(val.features), c.score(val.features))


def test_fused_adam_is_the_same_update_as_the_per_tensor_loop() -> None:
    """The fused kernel only reorders rounding: one step from the same weights lands within float error."""
    config = TrainConfig(lr=1e-2, weight_decay=0.01)
    torch.manual_seed(0)
    h_s, delta, y = torch.randn(16, HIDDEN), torch.randn(16, HIDDEN), (torch.rand(16) > 0.5).float()
    fused, loop = LSIProbe(HIDDEN), LSIProbe(HIDDEN)
    loop.load_state_dict(fused.state_dict())
    start = fused.projector.weight.detach().clone()
    for model, is_fused in ((fused, True), (loop, False)):
        optimiser = adam(model, config, fused=is_fused)
        assert optimiser.defaults["fused"] is is_fused
        for _ in range(3):
            optimiser.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(h_s, delta), y).backward()
            optimiser.step()
    assert not torch.equal(fused.projector.weight.detach(), start)  # the steps did move the weights
    for name, value in fused.state_dict().items():
        torch.testing.assert_close(value, loop.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_learns_with_either_adam() -> None:
    train, val = source(256, 0), source(96, 1)
    config = TrainConfig(lr=5e-3, epochs=15)
    for fused in (True, False):
        _, history = train_probe(train, val, config, progress=False, fused=fused)
        assert best_epoch(history).val_auroc > 0.9, fused


def test_save_and_load_safetensors_and_json(tmp_path: Path) -> None:
    probe = LSIProbe(HIDDEN)
    meta = ProbeMeta(
        hidden_size=HIDDEN,
        alpha=0.1,
        fusion_layer=12,
        safety_layer=3,
        best_epoch=4,
        best_val_auroc=0.9,
        store_provenance={"model_name": "tiny"},
    )
    save_probe(probe, meta, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.json", "probe.safetensors"]
    assert json.loads((tmp_path / "probe.json").read_text())["fusion_layer"] == 12
    loaded, loaded_meta = load_probe(tmp_path)
    assert loaded_meta == meta
    features, _ = synthetic(5, 2)
    np.testing.assert_array_equal(loaded.score(features), probe.score(features))


def test_load_refuses_mismatched_or_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the 'train' stage"):
        load_probe(tmp_path)
    save_probe(LSIProbe(HIDDEN), META, tmp_path)
    meta = json.loads((tmp_path / "probe.json").read_text())
    meta["hidden_size"] = HIDDEN * 2
    (tmp_path / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match"):
        load_probe(tmp_path)


class CountingSource(InMemoryFeatures):
    """Records the largest block read at once."""

    largest: int = 0

    def read(self, start: int, stop: int) -> LSIFeatures:
        self.largest = max(self.largest, stop - start)
        return super().read(start, stop)


def test_training_in_tiny_chunks_reads_at_most_a_chunk_and_still_learns() -> None:
    features, labels = synthetic(256, 0)
    train = CountingSource(features, labels, chunk_rows=7)
    val = CountingSource(*synthetic(96, 1), chunk_rows=5)
    probe, history = train_probe(train, val, TrainConfig(lr=5e-3, epochs=10), progress=False)
    assert train.largest <= 7 and val.largest <= 5
    assert best_epoch(history).val_auroc > 0.9
    again, _ = train_probe(
        CountingSource(features, labels, chunk_rows=7),
        val,
        TrainConfig(lr=5e-3, epochs=10),
        progress=False,
    )
    np.testing.assert_array_equal(probe.score(val.features), again.score(val.features))


def test_standardization_is_streamed_exactly_and_saved_with_the_probe(tmp_path: Path) -> None:
    features, labels = synthetic(50, 3)
    features = LSIFeatures(features.h_s * 40 + 7, features.delta_h * 0.01 - 2)
    stats = input_stats(InMemoryFeatures(features, labels, chunk_rows=3))
    np.testing.assert_allclose(stats.h_s_mean, features.h_s.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.delta_h_std, features.delta_h.std(axis=0), rtol=1e-4)
    probe = LSIProbe(HIDDEN)
    probe.set_standardization(stats)
    save_probe(probe, META, tmp_path)
    loaded, _ = load_probe(tmp_path)
    np.testing.assert_array_equal(loaded.score(features), probe.score(features))
    # The stored statistics are applied: scores differ from an unstandardised probe with equal weights.
    plain = LSIProbe(HIDDEN)
    plain.load_state_dict(
        {k: v for k, v in probe.state_dict().items() if "mean" not in k and "scale" not in k}, strict=False
    )
    assert not np.allclose(plain.score(features), probe.score(features))


def test_balanced_class_weights_and_weight_decay_change_training() -> None:
    assert class_weights(np.array([0, 0, 0, 1]), "none") == (1.0, 1.0)
    assert class_weights(np.array([0, 0, 0, 1]), "balanced") == pytest.approx((4 / 6, 4 / 2))
    with pytest.raises(ValueError, match="both labels"):
        class_weights(np.array([1, 1]), "balanced")
    features, labels = synthetic(120, 4)
    keep = np.r_[np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)[:10]]  # imbalanced
    train = InMemoryFeatures(features.take(keep), labels[keep])
    val = source(60, 5)
    base = TrainConfig(lr=5e-3, epochs=4)
    plain, _ = train_probe(train, val, base, progress=False)
    balanced, _ = train_probe(train, val, replace(base, class_weight="balanced"), progress=False)
    decayed, _ = train_probe(train, val, replace(base, weight_decay=1.0), progress=False)
    # Upweighting the rare harmful class raises harmful scores; decay shrinks the weights.
    assert balanced.score(val.features).mean() > plain.score(val.features).mean()
    assert decayed.projector.weight.norm() < plain.projector.weight.norm()
