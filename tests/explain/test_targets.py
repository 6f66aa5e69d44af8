"""What an attribution integrates (pipeline.explain.targets): the detector's logit or the contrast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.detect.detector import LinearDetector, LSIDetector
from pipeline.detect.pieces import Piece, getter_from_states
from pipeline.explain.targets import Target, attribution_target, contrast_target, detector_target
from pipeline.testing.tiny_embedded import HIDDEN, tiny_probe

LAYERS = [0, 1, 2]


def states(seed: int = 0) -> np.ndarray:
    """Random states ``(n, framings, layers, hidden)`` in store order (benign, malicious, plain)."""
    return np.random.default_rng(seed).normal(size=(4, 3, len(LAYERS), HIDDEN)).astype(np.float32)


def test_contrast_is_the_norm_of_delta_at_the_fusion_layer() -> None:
    data = states()
    target = contrast_target(2, detector="LSI at fusion layer 2 / safety layer 1")
    value = target.score(getter_from_states(data, LAYERS))
    np.testing.assert_allclose(value.numpy(), np.linalg.norm(data[:, 1, 2] - data[:, 0, 2], axis=-1), rtol=1e-6)
    assert (target.kind, target.layers, target.variants) == ("contrast", (2,), ("benign", "malicious"))
    assert target.record_fields() == {
        "target": "contrast",
        "target_label": "||h_m - h_b|| at layer 2",
        "detector": "LSI at fusion layer 2 / safety layer 1",
        "layers": [2],
    }


def test_detector_target_is_the_detectors_logit_over_what_it_reads() -> None:
    data = states(1)
    weight = np.random.default_rng(2).normal(size=2 * HIDDEN)
    linear = LinearDetector.from_weights("logreg_plain_all", [Piece("plain", 2), Piece("plain", 0)], weight, -0.5)
    target = detector_target(linear)
    assert (target.kind, target.layers, target.variants) == ("detector", (0, 2), ("plain",))
    assert target.detector == "logreg_plain_all on plain@2, plain@0"
    torch.testing.assert_close(
        target.score(getter_from_states(data, LAYERS)), linear.logits(getter_from_states(data, LAYERS))
    )
    probe, _ = tiny_probe(seed=0)
    lsi = detector_target(LSIDetector.from_probe(probe, fusion_layer=2, safety_layer=1))
    assert (lsi.layers, lsi.variants) == ((1, 2), ("benign", "malicious"))
    assert lsi.label == "the logit of LSI at fusion layer 2 / safety layer 1"


def test_attribution_target_picks_by_name() -> None:
    probe, _ = tiny_probe(seed=0)
    lsi = LSIDetector.from_probe(probe, fusion_layer=2, safety_layer=1)
    assert attribution_target("detector", lsi, 0).kind == "detector"
    contrast = attribution_target("contrast", lsi, 0)
    assert (contrast.kind, contrast.layers, contrast.detector) == ("contrast", (0,), lsi.describe())
    with pytest.raises(ValueError, match="unknown attribution target 'logit'"):
        attribution_target("logit", lsi, 0)


def test_a_target_must_read_framings_in_store_order() -> None:
    def score(get: object) -> torch.Tensor:
        return torch.zeros(1)

    with pytest.raises(ValueError, match="in that order"):
        Target(kind="detector", label="x", detector="", layers=(1,), variants=("plain", "benign"), score=score)
    with pytest.raises(ValueError, match="at least one layer"):
        Target(kind="detector", label="x", detector="", layers=(), variants=("plain",), score=score)
    with pytest.raises(ValueError, match="unknown attribution target"):
        Target(kind="probe", label="x", detector="", layers=(1,), variants=("plain",), score=score)
