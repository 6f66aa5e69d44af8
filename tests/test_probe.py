"""The LSI probe: the method's shape, training that learns, best-epoch selection, safe persistence."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.features import LSIFeatures
from pipeline.probe import (
    LSIProbe,
    ProbeMeta,
    best_epoch,
    load_probe,
    save_probe,
    train_probe,
)

HIDDEN = 16


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
    train, train_y = synthetic(256, 0)
    val, val_y = synthetic(96, 1)
    config = TrainConfig(lr=5e-3, epochs=15)
    probe, history = train_probe(train, train_y, val, val_y, config, progress=False)
    assert len(history) == 15
    assert best_epoch(history).val_auroc > 0.9
    # the kept weights are the best epoch's: scoring validation again reproduces its AUROC
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(val_y, probe.score(val)) == pytest.approx(best_epoch(history).val_auroc, abs=1e-6)


def test_training_is_reproducible() -> None:
    train, train_y = synthetic(64, 0)
    val, val_y = synthetic(32, 1)
    config = TrainConfig(epochs=3)
    a, _ = train_probe(train, train_y, val, val_y, config, progress=False)
    b, _ = train_probe(train, train_y, val, val_y, config, progress=False)
    np.testing.assert_array_equal(a.score(val), b.score(val))
    c, _ = train_probe(train, train_y, val, val_y, replace(config, seed=1), progress=False)
    assert not np.array_equal(a.score(val), c.score(val))


def test_save_and_load_safetensors_and_json(tmp_path: Path) -> None:
    probe = LSIProbe(HIDDEN)
    meta = ProbeMeta(HIDDEN, 0.1, 12, 3, 4, 0.9, {"model_name": "tiny"})
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
    save_probe(LSIProbe(HIDDEN), ProbeMeta(HIDDEN, 0.1, 12, 3, 0, 0.5, {}), tmp_path)
    meta = json.loads((tmp_path / "probe.json").read_text())
    meta["hidden_size"] = HIDDEN * 2
    (tmp_path / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match"):
        load_probe(tmp_path)
